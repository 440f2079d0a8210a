"""Dataset loaders on tiny trees written in each real layout, and every bad-input case."""
import numpy as np
import pytest
import torch
from PIL import Image

from ddps.config import DataConfig
from ddps.data import build_dataset
from ddps.errors import DataError


def save(path, array, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array.astype(np.uint8), mode=mode).save(path)


def image(h=40, w=48, seed=0):
    return np.random.default_rng(seed).integers(0, 255, (h, w, 3))


def cfg(root, dataset, **kw):
    return DataConfig(dataset=dataset, root=str(root), crop=32, **kw)


def make_ade(root, n=3):
    base = root / "ADEChallengeData2016"
    for split in ("training", "validation"):
        for i in range(n):
            save(base / "images" / split / f"ADE_{split}_{i:08d}.jpg", image(seed=i))
            mask = np.zeros((40, 48)); mask[:20] = 1; mask[20:, :10] = 150
            save(base / "annotations" / split / f"ADE_{split}_{i:08d}.png", mask)
    return root


def make_cityscapes(root):
    for split in ("train", "val"):
        for city in ("aachen", "bremen"):
            stem = f"{city}_000000_000019"
            save(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", image())
            mask = np.full((40, 48), 255); mask[5:30, 5:40] = 18; mask[30:] = 0
            save(root / "gtFine" / split / city / f"{stem}_gtFine_labelTrainIds.png", mask)
    return root


def make_folder(root, n=4, classes=("bg", "cat", "dog")):
    for i in range(n):
        save(root / "images" / f"s{i}.png", image(seed=i))
        mask = np.zeros((40, 48)); mask[10:30, 10:30] = 1 + i % 2; mask[0, 0] = 255
        save(root / "masks" / f"s{i}.png", mask)
    (root / "classes.txt").write_text("\n".join(classes) + "\n")
    (root / "splits").mkdir()
    (root / "splits" / "train.txt").write_text("s0\ns1\ns2\n")
    (root / "splits" / "val.txt").write_text("s3\n")
    return root


def test_ade20k_layout_reduces_zero_label(tmp_path):
    ds = build_dataset(cfg(make_ade(tmp_path), "ade20k"), "val")
    assert ds.num_classes == 150 and len(ds) == 3
    item = ds[0]
    mask = item["mask"].numpy()
    assert item["image"].shape == (3, 40, 48)
    # 0 -> ignore, 1 -> 0, 150 -> 149
    assert set(np.unique(mask)) == {255, 0, 149}
    assert (mask[:20] == 0).all() and (mask[20:, :10] == 149).all() and (mask[20:, 10:] == 255).all()


def test_cityscapes_layout_uses_train_ids(tmp_path):
    ds = build_dataset(cfg(make_cityscapes(tmp_path), "cityscapes"), "train", train=False)
    assert ds.num_classes == 19 and len(ds) == 2
    assert set(np.unique(ds[1]["mask"].numpy())) == {0, 18, 255}


def test_folder_layout_with_split_files_and_class_names(tmp_path):
    root = make_folder(tmp_path)
    train = build_dataset(cfg(root, "folder"), "train")
    val = build_dataset(cfg(root, "folder"), "val")
    assert (len(train), len(val)) == (3, 1) and train.class_names == ("bg", "cat", "dog")
    item = train[0]  # training pipeline: a crop of at most 32 from a 40x48 image, as uint8
    assert item["image"].dtype == torch.uint8 and item["image"].shape[1:] == item["mask"].shape
    assert max(item["mask"].shape) <= 32
    batch = train.collate([item, train[1]])  # padded to the crop and normalised per batch
    assert batch["image"].shape == (2, 3, 32, 32) and batch["image"].dtype == torch.float32
    assert batch["mask"].shape == (2, 32, 32) and batch["mask"].dtype == torch.int64
    assert set(np.unique(val[0]["mask"].numpy())) <= {0, 2, 255}


def test_folder_ignore_index_is_configurable(tmp_path):
    root = make_folder(tmp_path)
    mask = np.zeros((40, 48)); mask[:5] = 9
    save(root / "masks" / "s3.png", mask)
    ds = build_dataset(cfg(root, "folder", ignore_index=9), "val")
    assert 9 in np.unique(ds[0]["mask"].numpy())
    with pytest.raises(DataError, match="label value 9"):
        build_dataset(cfg(root, "folder"), "val")[0]


def test_fashion_scenes_dataset_from_a_data_root(tiny_fashion):
    c = DataConfig(root=str(tiny_fashion), canvas=32, min_scale=0.6, max_scale=1.0, train_scenes=8,
                   val_scenes=4, crop=32)
    ds = build_dataset(c, "val")
    assert ds.num_classes == 11 and len(ds) == 4 and ds[0]["image"].shape == (3, 32, 32)


def test_holdout_is_the_tail_of_the_training_images_and_leaves_train(tmp_path):
    root = make_folder(tmp_path)
    train = build_dataset(cfg(root, "folder", holdout=1), "train", train=False)
    holdout = build_dataset(cfg(root, "folder", holdout=1), "holdout")
    full = build_dataset(cfg(root, "folder"), "train", train=False)
    assert (len(train), len(holdout), len(full)) == (2, 1, 3)
    np.testing.assert_array_equal(holdout[0]["image"].numpy(), full[2]["image"].numpy())
    np.testing.assert_array_equal(train[1]["image"].numpy(), full[1]["image"].numpy())
    with pytest.raises(DataError, match="data.holdout=3 leaves no training images .* choose a value below 3"):
        build_dataset(cfg(root, "folder", holdout=3), "train")
    with pytest.raises(DataError, match="holdout split needs data.holdout > 0"):
        build_dataset(cfg(root, "folder"), "holdout")


# ---- bad input: one case each, a one-line error naming the file or value ------------------------

@pytest.mark.reliability(kind="bad_input", case="corrupt image file")
def test_corrupt_image(tmp_path):
    root = make_folder(tmp_path)
    (root / "images" / "s3.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(DataError, match=r"cannot read image .*s3\.png"):
        build_dataset(cfg(root, "folder"), "val")[0]


@pytest.mark.reliability(kind="bad_input", case="corrupt mask file")
def test_corrupt_mask(tmp_path):
    root = make_folder(tmp_path)
    (root / "masks" / "s3.png").write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"cannot read mask .*s3\.png"):
        build_dataset(cfg(root, "folder"), "val")[0]


@pytest.mark.reliability(kind="bad_input", case="mask label past the classes")
def test_label_value_out_of_range(tmp_path):
    root = make_folder(tmp_path)
    mask = np.zeros((40, 48)); mask[3, 3] = 7
    save(root / "masks" / "s3.png", mask)
    with pytest.raises(DataError, match=r"s3\.png: label value 7 is not a class \(0\.\.2\) nor the ignore index 255"):
        build_dataset(cfg(root, "folder"), "val")[0]


@pytest.mark.reliability(kind="bad_input", case="image and mask sizes differ")
def test_image_mask_size_mismatch(tmp_path):
    root = make_folder(tmp_path)
    save(root / "masks" / "s3.png", np.zeros((20, 20)))
    with pytest.raises(DataError, match=r"s3\.png: image is 48x40 but mask is 20x20"):
        build_dataset(cfg(root, "folder"), "val")[0]


@pytest.mark.reliability(kind="bad_input", case="empty dataset folder")
def test_empty_dataset_folder(tmp_path):
    (tmp_path / "images").mkdir(); (tmp_path / "masks").mkdir()
    (tmp_path / "classes.txt").write_text("a\nb\n")
    with pytest.warns(UserWarning, match="no splits/val.txt"), pytest.raises(DataError, match="no images found"):
        build_dataset(cfg(tmp_path, "folder"), "val")


@pytest.mark.reliability(kind="bad_input", case="missing dataset folder")
def test_missing_dataset_folder(tmp_path):
    with pytest.raises(DataError, match=r"does-not-exist.* does not exist"):
        build_dataset(cfg(tmp_path / "does-not-exist", "ade20k"), "val")


@pytest.mark.reliability(kind="bad_input", case="image without its mask")
def test_missing_mask_file(tmp_path):
    root = make_folder(tmp_path)
    (root / "masks" / "s3.png").unlink()
    with pytest.raises(DataError, match=r"has no mask .*s3\.png"):
        build_dataset(cfg(root, "folder"), "val")


@pytest.mark.reliability(kind="bad_input", case="unknown dataset name")
def test_unknown_dataset_name():
    from ddps.config.choices import DATASET_NAMES
    from ddps.data import DATASETS
    from ddps.errors import ConfigError
    assert set(DATASETS) == set(DATASET_NAMES)
    with pytest.raises(ConfigError, match=r"unknown dataset 'coco'; choose from: ade20k, cityscapes, fashion-scenes, folder"):
        DataConfig(dataset="coco")


@pytest.mark.reliability(kind="bad_input", case="ignore index inside the classes")
def test_ignore_index_inside_the_class_range(tmp_path):
    with pytest.raises(DataError, match=r"ignore index 1 is one of its 3 classes"):
        build_dataset(cfg(make_folder(tmp_path), "folder", ignore_index=1), "val")


def test_mixed_image_sizes_are_evaluated_in_batches_of_one_size(tmp_path):
    import torch

    from ddps.config import EvalConfig
    from ddps.engine.evaluate import evaluate_base
    from ddps.segmentors import create_base
    root = make_folder(tmp_path)
    save(root / "images" / "s3.png", image(h=64, w=72))
    save(root / "masks" / "s3.png", np.ones((64, 72)))
    (root / "splits" / "val.txt").write_text("s2\ns3\ns1\n")
    ds = build_dataset(cfg(root, "folder"), "val")
    torch.manual_seed(0)
    model = create_base("segformer", "mit_b0", 3, feature_channels=16)
    batched = evaluate_base(model, ds, EvalConfig(batch_size=3, scales=(1.0,)))
    single = evaluate_base(model, ds, EvalConfig(batch_size=1, scales=(1.0,)))
    assert batched.mIoU == pytest.approx(single.mIoU) and batched.mBIoU == pytest.approx(single.mBIoU)


def test_mixed_image_sizes_are_refined_in_batches_of_one_size(tmp_path):
    """A refiner's evaluation streams the split's images through the base (ADE20K's differ in size: no
    feature cache of the whole split), in batches of one size; batched and one by one give the same scores."""
    from ddps.config import resolve
    from ddps.engine.evaluate_refiner import evaluate_refiner
    from ddps.refiner.build import build_denoiser, build_process
    from ddps.segmentors import create_base
    root = make_folder(tmp_path)
    save(root / "images" / "s3.png", image(h=64, w=72))
    save(root / "masks" / "s3.png", np.ones((64, 72)))
    (root / "splits" / "val.txt").write_text("s2\ns3\ns1\n")
    config = resolve("smoke", overrides={"data.dataset": "folder", "data.root": str(root), "eval.max_images": 0})
    ds = build_dataset(config.data, "val")
    torch.manual_seed(0)
    base = create_base("segformer", "mit_b0", 3, feature_channels=16).eval()
    process = build_process(config, 3)
    denoiser = build_denoiser(config, 3, 16, process)
    scores = [evaluate_refiner(denoiser, process, None, config, base=base, dataset=ds, batch_size=b, steps=2)
              for b in (3, 1)]
    assert scores[0].images == scores[1].images == 3 and len(scores[0].steps) == 2
    assert scores[0].base == scores[1].base  # the refinement's random draws depend on the batches, the base's not
    head = resolve("smoke", overrides={"data.dataset": "folder", "data.root": str(root), "denoiser.method": "head"})
    denoiser = build_denoiser(head, 3, 16, process)
    scores = [evaluate_refiner(denoiser, process, None, head, base=base, dataset=ds, batch_size=b) for b in (3, 1)]
    assert scores[0].last.mIoU == pytest.approx(scores[1].last.mIoU)  # deterministic: one call, no mask


@pytest.mark.reliability(kind="bad_input", case="unknown split")
def test_unknown_split(tmp_path):
    with pytest.raises(DataError, match=r"unknown split 'test'; choose from: train, holdout, val"):
        build_dataset(cfg(make_folder(tmp_path), "folder"), "test")
