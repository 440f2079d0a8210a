"""Config layering, the flat dict, content hashes and the one-line errors of bad values."""
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ddps.config import PRESETS, content_hash, from_flat, known_keys, resolve, to_flat
from ddps.errors import ConfigError


def test_layering_order_defaults_preset_experiment_set(tmp_path):
    exp = tmp_path / "exp.yaml"
    exp.write_text("presets:\n  smoke:\n    train_base: {iters: 7, lr: 0.5}\n    data: {canvas: 40}\n")
    cfg = resolve("smoke", exp, ["train_base.iters=9"])
    assert cfg.train_base.iters == 9              # --set beats the experiment
    assert cfg.train_base.lr == 0.5               # the experiment beats the preset and the default
    assert cfg.data.canvas == 40
    assert cfg.data.train_scenes == PRESETS["smoke"]["data.train_scenes"]  # the preset beats the default
    assert cfg.data.min_objects == 2              # the default where nobody says otherwise


def test_flat_round_trip_and_hash_depends_only_on_chosen_sections():
    cfg = resolve("cpu")
    assert from_flat(to_flat(cfg)) == cfg
    other = resolve("cpu", overrides=["eval.flip=false"])
    assert content_hash(cfg, ["data", "base", "train_base"]) == content_hash(other, ["data", "base", "train_base"])
    assert content_hash(cfg, ["eval"]) != content_hash(other, ["eval"])
    assert content_hash(cfg, ["data"], ["a"]) != content_hash(cfg, ["data"], ["b"])
    # how often a run logs or evaluates does not change the weights it produces; the learning rate does
    watched = resolve("cpu", overrides=["train_base.log_every=7", "train_base.eval_every=9"])
    assert content_hash(watched, ["train_base"]) == content_hash(cfg, ["train_base"])
    assert content_hash(resolve("cpu", overrides=["train_base.lr=0.1"]), ["train_base"]) != content_hash(cfg, ["train_base"])


@pytest.mark.reliability(kind="bad_input", case="config value")
@pytest.mark.parametrize("item, match", [
    ("data.colour=1", r"unknown config key 'data.colour'; valid keys of data: dataset, root"),
    ("model.x=1", r"unknown config section 'model' .*; choose from: base, data, denoiser, diffusion, eval, infer, train, train_base"),
    ("train_base.iters=ten", r"train_base.iters='ten' has the wrong type: expected int"),
    ("data.flip=yes please", r"data.flip='yes please' has the wrong type: expected bool"),
    ("train_base.lr=-1", r"train_base.lr=-1.0 is out of range: > 0"),
    ("data.crop=50", r"data.crop=50 is out of range: a multiple of 32"),
    ("eval.mode=tiles", r"eval.mode='tiles' is out of range: whole or slide"),
    ("nonsense", r"--set 'nonsense' is not of the form section.key=value"),
    ("train_base.weight_decay=-1", r"train_base.weight_decay=-1.0 is out of range: >= 0"),
    ("data.ratio_max=.inf", r"data.ratio_max=inf is not a finite number"),
    ("train_base.lr=nan", r"train_base.lr='nan' is not a finite number"),
    ("train_base.min_lr=1.0", r"train_base.min_lr=1.0 is out of range: 0 <= min_lr <= lr"),
    ("eval.max_images=-3", r"eval.max_images=-3 is out of range"),
    ("base.backbone=mit_b9", r"unknown backbone 'mit_b9' for segformer; choose from: mit_b0"),
    ("base.arch=unet", r"unknown base architecture 'unet'; choose from: deeplabv3plus, mmseg-segformer, segformer"),
    ("data.max_scale=3.0", r"data.min_scale/max_scale=\(0.9, 3.0\) is out of range"),
])
def test_bad_values_give_one_line_errors(item, match):
    with pytest.raises(ConfigError, match=match) as info:
        resolve("cpu", overrides=[item])
    assert "\n" not in str(info.value)


def test_exponent_without_a_dot_is_a_float():
    assert resolve("cpu", overrides=["train_base.lr=2e-3"]).train_base.lr == 0.002


@pytest.mark.reliability(kind="bad_input", case="unknown preset, missing experiment file")
def test_unknown_preset_and_missing_experiment(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown preset 'gpu'; choose from: cpu, demo, paper, smoke"):
        resolve("gpu")
    with pytest.raises(ConfigError, match=r"experiment file .*nope.yaml does not exist"):
        resolve("cpu", tmp_path / "nope.yaml")


scalars = st.one_of(st.integers(-10**6, 10**6), st.floats(allow_nan=False), st.booleans(),
                    st.text(max_size=8), st.lists(st.floats(0.1, 4), max_size=3))


@pytest.mark.reliability(kind="bad_input", case="fuzzed --set overrides")
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(overrides=st.dictionaries(st.sampled_from(known_keys() + ["data.x", "y.z", "preset"]), scalars, max_size=4))
def test_fuzzed_overrides_either_resolve_or_raise_config_error(overrides, reliability):
    reliability["tried"] = reliability.get("tried", 0) + 1
    try:
        cfg = resolve("cpu", overrides=overrides)
    except ConfigError as e:
        assert "\n" not in str(e)
        reliability["refused"] = reliability.get("refused", 0) + 1
    else:
        assert from_flat(to_flat(cfg)) == cfg


def test_precision_values_and_keys_added_later_keep_the_old_hashes():
    import hashlib
    import json

    from ddps.config.load import LATER_DEFAULTS
    from ddps.config.schema import PRECISION_NAMES
    from ddps.engine.device import DTYPES
    assert tuple(DTYPES) == PRECISION_NAMES
    with pytest.raises(ConfigError, match=r"train.precision='fp8' is not a valid choice; choose from: bf16, fp16, "
                                          r"fp32"):
        resolve("smoke", overrides=["train.precision=fp8"])
    cfg = resolve("cpu")
    # at their defaults, the keys added later are left out: the hash is the one of the flat dict without them
    flat = {k: v for k, v in to_flat(cfg).items() if k.split(".")[0] in ("train", "eval") and k not in LATER_DEFAULTS
            and k not in ("train.log_every", "train.eval_every", "train.threads")}
    before = hashlib.sha256(json.dumps({"config": flat, "inputs": []}, sort_keys=True).encode()).hexdigest()
    assert content_hash(cfg, ["train", "eval"]) == before
    for key in ("train_base.precision", "train.precision", "eval.precision"):  # set otherwise, they are hashed
        section = key.split(".")[0]
        other = resolve("cpu", overrides=[f"{key}=bf16"])
        assert content_hash(other, [section]) != content_hash(cfg, [section])
    assert resolve("paper").train.precision == resolve("paper").train_base.precision == "bf16"
