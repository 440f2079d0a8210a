"""mIoU / aAcc as MMSegmentation computes them, boundary IoU as DDPS evaluates it: hand-computed cases."""
import math

import numpy as np
import pytest
import torch

from ddps.metrics import BoundaryIoUAccumulator, IoUAccumulator, boundary_bands, boundary_width, erode


def t(rows):
    return torch.tensor(rows, dtype=torch.long)


def test_iou_hand_case_with_ignore_and_absent_class():
    # label 255 is ignored; class 2 never appears in label nor prediction -> NaN, excluded from the mean
    pred = t([[0, 0, 1], [1, 1, 0]])
    label = t([[0, 1, 1], [1, 255, 0]])
    acc = IoUAccumulator(num_classes=3, ignore_index=255)
    acc.update(pred, label)
    out = acc.compute()
    # valid pixels: (0,0) (0,1) (0,2) (1,0) (1,2); class 0: I=2, pred area 3, label 2 -> U=3
    # class 1: I=2, pred area 2, label 3 -> U=3
    assert out["IoU"][0] == pytest.approx(100 * 2 / 3)
    assert out["IoU"][1] == pytest.approx(100 * 2 / 3)
    assert math.isnan(out["IoU"][2])
    assert out["mIoU"] == pytest.approx(100 * 2 / 3)
    assert out["aAcc"] == pytest.approx(100 * 4 / 5)


def test_iou_accumulates_over_the_dataset_not_per_image():
    acc = IoUAccumulator(2, 255)
    acc.update(t([[0, 0]]), t([[0, 1]]))   # class 1: I 0, U 1
    acc.update(t([[1, 1]]), t([[1, 1]]))   # class 1: I 2, U 2
    # dataset level: class 1 I=2 U=3 (per-image averaging would give (0 + 1) / 2)
    assert acc.compute()["IoU"][1] == pytest.approx(100 * 2 / 3)


def test_iou_matches_bruteforce_on_random_maps():
    rng = np.random.default_rng(1)
    pred = rng.integers(0, 5, (3, 17, 13))
    label = rng.integers(0, 5, (3, 17, 13))
    label[rng.random(label.shape) < 0.1] = 255
    acc = IoUAccumulator(5, 255)
    acc.update(torch.from_numpy(pred), torch.from_numpy(label))
    valid = label != 255
    for c in range(5):
        i = np.sum((pred == c) & (label == c) & valid)
        u = np.sum(((pred == c) | (label == c)) & valid)
        assert acc.compute()["IoU"][c] == pytest.approx(100 * i / u)


def test_boundary_width_is_two_percent_of_the_diagonal():
    assert boundary_width(512, 512) == round(0.02 * math.hypot(512, 512)) == 14
    assert boundary_width(10, 10) == 1  # round(0.28) = 0 -> at least 1


def naive_erode(mask: np.ndarray, d: int) -> np.ndarray:
    out = mask.copy()
    for _ in range(d):
        padded = np.pad(out, 1, constant_values=False)
        nxt = np.ones_like(out)
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                nxt &= padded[1 + dy:1 + dy + out.shape[0], 1 + dx:1 + dx + out.shape[1]]
        out = nxt
    return out


@pytest.mark.parametrize("d", [1, 2, 3])
def test_erode_equals_d_repeated_3x3_erosions_with_background_border(d):
    rng = np.random.default_rng(d)
    masks = rng.random((4, 15, 11)) < 0.7
    ours = erode(torch.from_numpy(masks), d).numpy()
    for m, o in zip(masks, ours):
        np.testing.assert_array_equal(o, naive_erode(m, d))


def test_border_counts_as_contour():
    # a mask covering the whole image: its band is the outer ring of width d
    full = torch.zeros(1, 6, 6, dtype=torch.long)
    bands = boundary_bands(full, num_classes=1, d=1)[0, 0]
    expected = torch.ones(6, 6, dtype=torch.bool)
    expected[1:5, 1:5] = False
    assert torch.equal(bands, expected)


def test_boundary_iou_hand_case():
    # 10x10 -> d = 1. Label: class 1 is the 4x4 square rows 2..5, cols 2..5; prediction shifted right by 1.
    label = torch.zeros(1, 10, 10, dtype=torch.long)
    label[0, 2:6, 2:6] = 1
    pred = torch.zeros_like(label)
    pred[0, 2:6, 3:7] = 1
    acc = BoundaryIoUAccumulator(2, 255)
    acc.update(pred, label)
    out = acc.compute()
    # class 1 band = ring of the 4x4 square (12 px). Label ring cols 2..5, pred ring cols 3..6.
    g = np.zeros((10, 10), bool); g[2:6, 2:6] = True; g[3:5, 3:5] = False
    p = np.zeros((10, 10), bool); p[2:6, 3:7] = True; p[3:5, 4:6] = False
    iou1 = (g & p).sum() / (g | p).sum()
    # class 0 band: the image border ring plus the ring around the hole, computed by the naive reference
    gb = ~label[0].numpy().astype(bool); pb = ~pred[0].numpy().astype(bool)
    g0 = gb & ~naive_erode(gb, 1); p0 = pb & ~naive_erode(pb, 1)
    iou0 = (g0 & p0).sum() / (g0 | p0).sum()
    assert out["BIoU"][1] == pytest.approx(100 * iou1)
    assert out["BIoU"][0] == pytest.approx(100 * iou0)
    assert out["mBIoU"] == pytest.approx(100 * (iou0 + iou1) / 2)


def test_boundary_iou_drops_ignore_pixels_and_perfect_prediction_scores_100():
    label = torch.zeros(2, 12, 12, dtype=torch.long)
    label[:, 3:9, 3:9] = 1
    label[:, 0, :] = 255
    acc = BoundaryIoUAccumulator(3, 255)
    pred = label.clone()
    pred[label == 255] = 2  # whatever is predicted on ignore pixels does not count
    acc.update(pred, label)
    out = acc.compute()
    assert out["BIoU"][0] == pytest.approx(100) and out["BIoU"][1] == pytest.approx(100)
    assert math.isnan(out["BIoU"][2])  # class 2 exists only on ignore pixels -> union 0
    assert out["mBIoU"] == pytest.approx(100)
