"""The embedded benchmark: deterministic, split-clean, cached by content, with clear errors."""
import numpy as np
import pytest

from ddps.data import fashion_scenes as fs
from ddps.data import idx
from ddps.errors import DataError

SPEC = fs.SceneSpec(canvas=48, min_objects=2, max_objects=3, min_scale=0.8, max_scale=1.2,
                    train_scenes=12, val_scenes=6, seed=3)


def test_same_seed_same_bytes_other_seed_other_scenes(tiny_fashion, tmp_path):
    a = fs.build(SPEC, tiny_fashion, folder=tmp_path / "a")
    b = fs.build(SPEC, tiny_fashion, folder=tmp_path / "b")
    assert a.name == b.name  # content-hashed name
    for split in ("train", "val"):
        for x, y in zip(fs.load(a, split), fs.load(b, split)):
            np.testing.assert_array_equal(x, y)
    other = fs.build(fs.SceneSpec(**{**SPEC.__dict__, "seed": 4}), tiny_fashion, folder=tmp_path / "a")
    assert other != a
    assert not np.array_equal(fs.load(other, "train")[1], fs.load(a, "train")[1])


def test_train_scenes_use_only_train_photos_and_val_only_test_photos(tiny_fashion, tmp_path):
    path = fs.build(SPEC, tiny_fashion, folder=tmp_path)
    _, train_masks = fs.load(path, "train")
    _, val_masks = fs.load(path, "val")
    # the fixture's train photos are classes 0-4 (labels 1-5), its test photos classes 5-9 (labels 6-10)
    assert set(np.unique(train_masks)) - {0} <= {1, 2, 3, 4, 5}
    assert set(np.unique(val_masks)) - {0} <= {6, 7, 8, 9, 10}
    assert len(set(np.unique(train_masks)) - {0}) >= 3


def test_holdout_scenes_use_photos_no_train_scene_uses(tmp_path):
    """With holdout scenes, the last tenth of the training photographs is theirs alone. Here those photos
    are the only ones of class 4 (label 5): the holdout has them, train never does."""
    from conftest import blob, write_idx
    rng = np.random.default_rng(0)
    root = tmp_path / "idx"
    root.mkdir()
    for stem, labels in (("train", [i % 4 for i in range(45)] + [4] * 5), ("t10k", [5, 6, 7, 8] * 3)):
        labels = np.array(labels, np.uint8)
        write_idx(root / f"{stem}-images-idx3-ubyte.gz", np.stack([blob(rng, int(c)) for c in labels]))
        write_idx(root / f"{stem}-labels-idx1-ubyte.gz", labels)
    spec = fs.SceneSpec(**{**SPEC.__dict__, "holdout_scenes": 5})
    path = fs.build(spec, root, folder=tmp_path)
    _, train_masks = fs.load(path, "train")
    images, holdout_masks = fs.load(path, "holdout")
    assert len(images) == 5 and len(train_masks) == 12
    assert set(np.unique(holdout_masks)) == {0, 5}
    assert 5 not in np.unique(train_masks) and len(set(np.unique(train_masks)) - {0}) >= 3
    assert "holdout: 5 scenes" in fs.summary(path, spec)
    with pytest.raises(DataError, match="has no 'holdout' split; set data.holdout > 0"):
        fs.load(fs.build(SPEC, root, folder=tmp_path), "holdout")


def test_scene_shapes_occlusion_and_filled_silhouettes(tiny_fashion, tmp_path):
    path = fs.build(SPEC, tiny_fashion, folder=tmp_path)
    images, masks = fs.load(path, "train")
    assert images.shape == (12, 48, 48, 3) and images.dtype == np.uint8
    assert masks.shape == (12, 48, 48) and masks.max() <= 10
    # the fixture's photos have an enclosed hole: the label fills it, so no background pixel is enclosed
    from scipy import ndimage
    for m in masks:
        fg = m > 0
        assert np.array_equal(ndimage.binary_fill_holes(fg), fg)
    shares = fs.pixel_shares(masks)
    assert shares.sum() == pytest.approx(1.0) and 0.2 < shares[0] < 0.95


def test_cache_is_reused(tiny_fashion, tmp_path):
    path = fs.build(SPEC, tiny_fashion, folder=tmp_path)
    mtime = path.stat().st_mtime_ns
    assert fs.build(SPEC, tiny_fashion, folder=tmp_path) == path
    assert path.stat().st_mtime_ns == mtime


def test_real_fashion_mnist_default_scenes_are_plausible():
    # the Debian package (make test installs it): 60k train / 10k test photographs
    images, labels = idx.load_split("test")
    assert images.shape == (10000, 28, 28) and set(np.unique(labels)) == set(range(10))
    scenes, masks = fs.compose(images, labels, 20, fs.SceneSpec(), seed=0)
    assert scenes.shape == (20, 64, 64, 3)
    assert 0.2 < (masks > 0).mean() < 0.5  # the default scenes: about a third foreground


@pytest.mark.reliability(kind="bad_input", case="missing Fashion-MNIST files")
def test_missing_fashion_mnist_files_name_the_file_and_the_fix(tmp_path):
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte.*dataset-fashion-mnist.*--data-root"):
        idx.locate(tmp_path)


@pytest.mark.reliability(kind="bad_input", case="corrupt IDX file")
def test_corrupt_idx_file_is_reported(tiny_fashion):
    (tiny_fashion / "t10k-labels-idx1-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.gz"):
        idx.load_split("test", tiny_fashion)


@pytest.mark.reliability(kind="bad_input", case="scene parameters")
@pytest.mark.parametrize("change, match", [({"canvas": 16}, "canvas"), ({"min_objects": 3, "max_objects": 2}, "objects"),
                                           ({"max_scale": 3.0}, "scale")])
def test_bad_scene_parameters(change, match):
    with pytest.raises(DataError, match=match):
        fs.SceneSpec(**{**SPEC.__dict__, **change}).validate()


def test_damaged_cache_is_rebuilt(tiny_fashion, tmp_path):
    path = fs.build(SPEC, tiny_fashion, folder=tmp_path)
    good = fs.load(path, "val")[1]
    path.write_bytes(path.read_bytes()[:1000])  # truncated
    with pytest.raises(DataError, match="unreadable"):
        fs.load(path, "val")
    with pytest.warns(UserWarning, match="damaged; rebuilding"):
        assert fs.build(SPEC, tiny_fashion, folder=tmp_path) == path
    np.testing.assert_array_equal(fs.load(path, "val")[1], good)


def test_damaged_gzip_stream_is_reported(tiny_fashion):
    path = tiny_fashion / "t10k-images-idx3-ubyte.gz"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte in the deflate stream
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.gz"):
        idx.load_split("test", tiny_fashion)
