"""MMSegmentation's training pipeline with albumentations, and the test-time resize."""
import random

import numpy as np
import torch

from ddps.config import DataConfig
from ddps.data.transforms import MEAN, STD, EvalTransform, TrainTransform, cat_max_ratio_window


def test_cat_max_ratio_window_avoids_crops_dominated_by_one_class():
    mask = np.zeros((100, 100), np.uint8)
    mask[:, 80:] = 1  # class 0 covers 80%: about one random 40x40 crop in six is balanced enough
    rng = random.Random(0)
    for _ in range(50):
        y1, y2, x1, x2 = cat_max_ratio_window(mask, 40, 0.75, 255, rng, tries=100)
        window = mask[y1:y2, x1:x2]
        assert (y2 - y1, x2 - x1) == (40, 40)
        counts = np.bincount(window.ravel(), minlength=2)
        assert counts.max() / counts.sum() < 0.75


def test_cat_max_ratio_ignores_the_ignore_index():
    mask = np.full((50, 50), 255, np.uint8)
    mask[:, :25] = 0
    mask[:, 25:30] = 1
    rng = random.Random(1)
    y1, y2, x1, x2 = cat_max_ratio_window(mask, 30, 0.75, 255, rng, tries=200)
    counts = np.bincount(mask[y1:y2, x1:x2][mask[y1:y2, x1:x2] != 255].ravel())
    counts = counts[counts > 0]
    assert len(counts) == 2 and counts.max() / counts.sum() < 0.75


def collated(transform, image, mask):
    """One augmented image as its batch of one (padded and normalised) -> (image (3, H, W), mask (H, W))."""
    x, y = transform(image, mask)
    batch = transform.collate([{"image": x, "mask": y, "index": 0}])
    return batch["image"][0], batch["mask"][0]


def test_train_transform_outputs_crop_size_and_pads_masks_with_ignore():
    cfg = DataConfig(crop=64, resize=0, ratio_min=0.5, ratio_max=0.5, photometric=False, flip=False)
    image = np.full((64, 64, 3), 128, np.uint8)
    mask = np.zeros((64, 64), np.uint8)
    mask[:, 32:] = 1
    transform = TrainTransform(cfg, seed=0)
    crop, crop_mask = transform(image, mask)  # the item: the scaled crop as uint8, not padded yet
    assert crop.shape == (3, 32, 32) and crop.dtype == torch.uint8 and crop_mask.shape == (32, 32)
    x, y = collated(transform, image, mask)
    assert x.shape == (3, 64, 64) and x.dtype == torch.float32 and y.shape == (64, 64) and y.dtype == torch.int64
    # scaled to 32x32, then padded bottom/right after normalisation: the padding is ignore in the mask
    # and 0 (= the mean colour) in the image, as the test-time padding of segmentors.inference.pad
    assert (y[32:, :] == 255).all() and (y[:, 32:] == 255).all() and (y[:32, :32] != 255).all()
    assert (x[:, 32:, :] == 0).all() and (x[:, :, 32:] == 0).all()
    grey = torch.tensor([(128 / 255 - m) / s for m, s in zip(MEAN, STD)]).view(3, 1, 1)
    assert torch.allclose(x[:, :32, :32], grey.expand(3, 32, 32), atol=1e-5)


def test_a_batch_pads_each_crop_to_the_crop_size_and_normalises_it_like_the_test_transform():
    cfg = DataConfig(crop=32, resize=0, ratio_min=1.0, ratio_max=1.0, photometric=False, flip=False)
    rng = np.random.default_rng(3)
    transform = TrainTransform(cfg, seed=0)
    small = {"image": torch.from_numpy(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).permute(2, 0, 1),
             "mask": torch.from_numpy(rng.integers(0, 3, (20, 24), dtype=np.uint8)), "index": 7}
    full = {"image": torch.from_numpy(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).permute(2, 0, 1),
            "mask": torch.from_numpy(rng.integers(0, 3, (32, 32), dtype=np.uint8)), "index": 9}
    batch = transform.collate([small, full])
    assert batch["index"].tolist() == [7, 9]
    for k, item in enumerate((small, full)):
        h, w = item["mask"].shape
        expected = EvalTransform(cfg)(item["image"].permute(1, 2, 0).numpy(), item["mask"].numpy())[0]
        assert torch.allclose(batch["image"][k, :, :h, :w], expected, atol=1e-5)
        assert torch.equal(batch["mask"][k, :h, :w], item["mask"].long())
        assert (batch["image"][k, :, h:] == 0).all() and (batch["image"][k, :, :, w:] == 0).all()
        assert (batch["mask"][k, h:] == 255).all() and (batch["mask"][k, :, w:] == 255).all()


def test_train_transform_resizes_short_side_and_keeps_labels_nearest():
    cfg = DataConfig(crop=64, resize=48, ratio_min=1.0, ratio_max=1.0, photometric=True, flip=False)
    image = np.random.default_rng(0).integers(0, 255, (60, 90, 3), dtype=np.uint8)
    mask = np.zeros((60, 90), np.uint8)
    mask[::2, ::3] = 200  # a fine pattern: any interpolation but nearest would invent values in between
    x, y = collated(TrainTransform(cfg, seed=0), image, mask)
    # short side 60 -> 48, long side 90 -> 72; the 64 crop keeps 48 rows, the rest is padding
    assert x.shape == (3, 64, 64)
    assert (y[48:] == 255).all() and (y[:48] != 255).all()
    assert set(np.unique(y[:48].numpy())) == {0, 200}


def test_train_transform_is_reproducible_with_a_seed():
    cfg = DataConfig(crop=32)
    image = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    mask = np.random.default_rng(1).integers(0, 3, (64, 64), dtype=np.uint8)
    a = [TrainTransform(cfg, seed=5)(image, mask) for _ in range(2)]
    assert torch.equal(a[0][0], a[1][0]) and torch.equal(a[0][1], a[1][1])


def test_test_transform_resizes_the_image_only():
    cfg = DataConfig(test_resize=32)
    image = np.zeros((64, 96, 3), np.uint8)
    mask = np.ones((64, 96), np.uint8)
    x, y = EvalTransform(cfg)(image, mask)
    assert x.shape == (3, 32, 48) and y.shape == (64, 96)


def test_reseeded_copies_draw_different_augmentations():
    # what each DataLoader worker does (ddps.engine.train_base.reseed_worker)
    cfg = DataConfig(crop=32)
    image = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    mask = np.random.default_rng(1).integers(0, 3, (64, 64), dtype=np.uint8)
    a, b = TrainTransform(cfg, seed=5), TrainTransform(cfg, seed=5)
    b.reseed(6)
    outs_a = [a(image, mask)[0] for _ in range(3)]
    outs_b = [b(image, mask)[0] for _ in range(3)]
    assert not all(torch.equal(p, q) for p, q in zip(outs_a, outs_b))
