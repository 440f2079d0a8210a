"""Bad input is refused with one line naming the file or value (and the valid choices), before anything is
written: experiment files, folder datasets, names that would escape their folder, a base trained on other
classes, a checkpoint carrying code. The config loader and the folder dataset loader are fuzzed."""
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from ddps.config import DataConfig
from ddps.config.load import read_experiment, resolve
from ddps.data.datasets import build_dataset
from ddps.errors import ConfigError, DataError
from ddps.orchestration.plan import load_experiment
from messages import one_line


def _folder(root: Path, classes=b"bg\nshirt\nbag\n", mask_mode="L", mask_value=1, split: bytes | None = None) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    Image.fromarray(np.zeros((12, 12, 3), np.uint8)).save(root / "images" / "a.png")
    _mask_image(np.full((12, 12), mask_value), mask_mode).save(root / "masks" / "a.png")
    (root / "classes.txt").write_bytes(classes)
    if split is not None:
        (root / "splits").mkdir()
        (root / "splits" / "train.txt").write_bytes(split)
    return root


def _mask_image(values: np.ndarray, mode: str) -> Image.Image:
    """A mask PNG of mode L / P (8-bit), I;16 (16-bit) or RGB (a colour image where a label map belongs)."""
    if mode == "I;16":
        return Image.fromarray(np.clip(values, 0, 65535).astype(np.uint16))
    values = np.clip(values, 0, 255).astype(np.uint8)
    if mode == "RGB":
        return Image.fromarray(np.stack([values] * 3, -1))
    if mode == "P":
        image = Image.new("P", values.shape[::-1])
        image.putdata(values.ravel().tolist())
        return image
    return Image.fromarray(values)


def _read_all(root: Path, split: str = "train"):
    ds = build_dataset(DataConfig(dataset="folder", root=str(root), crop=32), split, train=False)
    return [ds[i] for i in range(len(ds))]


# ---- folder datasets ------------------------------------------------------------------------------

@pytest.mark.reliability(kind="bad_input", case="negative mask label")
def test_a_negative_label_is_not_a_class():
    """PNG masks are unsigned, but a mask array from elsewhere (a user's loader, a 32-bit TIFF) may not be."""
    from ddps.data.datasets import check_labels
    with pytest.raises(DataError, match=r"m\.png: label value -1 is not a class \(0\.\.2\) nor the ignore index 255"):
        check_labels(np.array([[0, -1], [2, 255]]), 3, 255, "m.png")


@pytest.mark.reliability(kind="bad_input", case="16-bit mask label past the classes")
def test_a_16_bit_mask_with_a_label_past_the_classes(tmp_path):
    root = _folder(tmp_path / "d", mask_mode="I;16", mask_value=300)
    with pytest.raises(DataError, match=r"a\.png: label value 300 is not a class \(0\.\.2\) nor the ignore index 255") as e:
        _read_all(root)
    one_line(e.value)


@pytest.mark.reliability(kind="bad_input", case="class / split file not UTF-8")
@pytest.mark.parametrize("which", ["classes", "split"])
def test_text_files_that_are_not_utf8_name_the_file(tmp_path, which):
    bad = b"\xff\xfe\x00bad"
    root = _folder(tmp_path / "d", **({"classes": bad} if which == "classes" else {"split": bad}))
    with pytest.raises(DataError, match=r"(classes\.txt|train\.txt) cannot be read as UTF-8 text") as e:
        _read_all(root)
    one_line(e.value)


@pytest.mark.parametrize("content, match", [(None, r"image .*a\.png does not exist"),
                                            (b"not a png", r"cannot read image .*a\.png: ")])
def test_one_image_reader_for_datasets_and_ddps_refine(tmp_path, content, match):
    """A dataset and ``ddps refine`` read a user's image with the same function, so with the same message."""
    from ddps.data.datasets import read_image
    from ddps.engine import refine_images
    assert refine_images.read_image is read_image
    if content is not None:
        (tmp_path / "a.png").write_bytes(content)
    with pytest.raises(DataError, match=match) as e:
        read_image(tmp_path / "a.png")
    one_line(e.value)


# ---- experiment files -----------------------------------------------------------------------------

GOOD = {"name": "t", "axes": [{"name": "a", "key": "infer.steps", "values": [1]}], "rows": ["a"],
        "presets": {"smoke": {"train": {"lr": 0.002}}}}


@pytest.mark.reliability(kind="bad_input", case="experiment file")
@pytest.mark.parametrize("change, match", [
    ({"presetz": {"smoke": {}}}, r"unknown key 'presetz'; an experiment file holds name, title, include, presets"),
    ({"presets": [1, 2]}, "presets must map preset names to overrides"),
    ({"presets": {"smoke": 3}}, r"presets\.smoke must be a mapping of sections"),
    ({"include": "sub"}, r"sub cannot be read"),  # a folder
    ({"name": "../evil"}, r"name '\.\./evil' is not a safe name"),
    ({"name": "a b"}, r"name 'a b' is not a safe name"),
])
def test_bad_experiment_files_are_one_line_config_errors(tmp_path, change, match):
    (tmp_path / "sub").mkdir()
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump({**GOOD, **change}))
    with pytest.raises(ConfigError, match=match) as e:
        resolve("smoke", path)
        load_experiment(path)
    one_line(e.value)


@pytest.mark.reliability(kind="bad_input", case="experiment file not UTF-8")
def test_an_experiment_file_that_is_not_utf8(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_bytes(b"name: \xff\xfe\n")
    with pytest.raises(ConfigError, match=r"exp\.yaml cannot be read") as e:
        read_experiment(path, "smoke")
    one_line(e.value)


YAML_VALUES = st.recursive(st.none() | st.booleans() | st.integers(-5, 10**6) | st.floats(allow_nan=True)
                           | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                           max_leaves=12)
KEYS = st.sampled_from(["name", "title", "include", "presets", "axes", "rows", "columns", "require", "presetz"])
SECTIONS = st.dictionaries(st.sampled_from(["train", "infer", "data", "bogus"]),
                           st.dictionaries(st.sampled_from(["lr", "steps", "crop", "stage1_iters", "x"]), YAML_VALUES,
                                           max_size=2) | YAML_VALUES, max_size=2)
DOCS = st.fixed_dictionaries({}, optional={"presets": st.dictionaries(st.sampled_from(["smoke", "cpu"]), SECTIONS,
                                                                      max_size=2) | YAML_VALUES}) | \
    st.dictionaries(KEYS, YAML_VALUES, max_size=4)


FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def _tried(counts: dict, refused: bool) -> None:
    counts["tried"] = counts.get("tried", 0) + 1
    counts["refused"] = counts.get("refused", 0) + refused


@pytest.mark.reliability(kind="bad_input", case="fuzzed experiment files")
@settings(FUZZ, max_examples=150)
@given(doc=DOCS | YAML_VALUES)
def test_fuzzed_experiment_files_resolve_or_raise_one_line_config_errors(doc, reliability):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "exp.yaml"
        path.write_text(yaml.safe_dump(doc))
        refused = False
        for load in (lambda: resolve("smoke", path), lambda: load_experiment(path)):
            try:
                load()
            except ConfigError as e:
                one_line(e)
                refused = True
                break
        _tried(reliability, refused)


@pytest.mark.reliability(kind="bad_input", case="fuzzed folder datasets")
@settings(FUZZ, max_examples=60)
@given(size=st.tuples(st.integers(1, 20), st.integers(1, 20)), mask_size=st.tuples(st.integers(1, 20), st.integers(1, 20)),
       mode=st.sampled_from(["L", "P", "I;16", "RGB"]), value=st.integers(-2, 300), image_bytes=st.binary(max_size=40) | st.none(),
       classes=st.binary(max_size=20) | st.sampled_from([b"bg\nshirt\n", b"a\nb\nc\n"]),
       split=st.none() | st.binary(max_size=12) | st.just(b"a\n") | st.just(b"missing\n"))
def test_fuzzed_folder_datasets_load_or_raise_one_line_data_errors(size, mask_size, mode, value, image_bytes, classes,
                                                                   split, reliability):
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        (root / "images").mkdir()
        (root / "masks").mkdir()
        if image_bytes is None:
            Image.fromarray(np.zeros((*size, 3), np.uint8)).save(root / "images" / "a.png")
        else:
            (root / "images" / "a.png").write_bytes(image_bytes)  # not an image at all
        _mask_image(np.full(mask_size, value), mode).save(root / "masks" / "a.png")
        (root / "classes.txt").write_bytes(classes)
        if split is not None:
            (root / "splits").mkdir()
            (root / "splits" / "train.txt").write_bytes(split)
        try:
            _read_all(root)
            _tried(reliability, False)
        except (DataError, ConfigError) as e:
            one_line(e)
            _tried(reliability, True)


# ---- checkpoints ---------------------------------------------------------------------------

@pytest.mark.reliability(kind="bad_input", case="refiner training on a base with other classes")
def test_a_base_trained_on_other_classes_is_refused_before_training(tmp_path):
    from ddps.segmentors.base import create_base
    from ddps.segmentors.checkpoint import save_base
    base = save_base(tmp_path / "five.pt", create_base("segformer", "mit_b0", 5, feature_channels=32), config={},
                     class_names="abcde", metrics={}, history=[], content_hash="x")
    out = subprocess.run([sys.executable, "-m", "ddps", "train", "--preset", "smoke", "--base", str(base), "--out",
                          str(tmp_path / "ref")], capture_output=True, text=True, timeout=600)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines() == [
        "ddps: error: the base segmentor predicts 5 classes but fashion-scenes/train has 11; give a base trained on this "
        "dataset (ddps train-base)"]
    assert not (tmp_path / "ref").exists() or not list((tmp_path / "ref").iterdir())
