"""Whole-image, sliding-window and multi-scale + flip inference."""
import torch
import torch.nn.functional as F

from ddps.segmentors.inference import pad, predict, predict_multiscale, predict_slide, predict_whole


def pointwise(x):
    """A 1x1 'segmentor' (3 -> 4 classes): translation-equivariant, so every tiling must agree."""
    w = torch.arange(12, dtype=torch.float32).view(4, 3, 1, 1) / 10
    return F.conv2d(x, w)


def test_pad_to_multiples_of_32():
    assert pad(torch.zeros(1, 3, 33, 64)).shape == (1, 3, 64, 64)
    assert pad(torch.zeros(1, 3, 64, 65)).shape == (1, 3, 64, 96)


def test_whole_crops_the_padding_off():
    x = torch.randn(2, 3, 40, 50)
    assert torch.allclose(predict_whole(pointwise, x), pointwise(x))


def test_slide_equals_whole_for_a_pointwise_model():
    x = torch.randn(1, 3, 70, 90)
    assert torch.allclose(predict_slide(pointwise, x, crop=32, stride=20), pointwise(x), atol=1e-6)


def test_slide_averages_overlaps():
    calls = []

    def count(x):
        calls.append(x.shape[-2:])
        return torch.ones(x.shape[0], 1, *x.shape[-2:])
    out = predict_slide(count, torch.zeros(1, 3, 64, 64), crop=32, stride=16)
    assert len(calls) == 9 and torch.allclose(out, torch.ones_like(out))


def test_multiscale_single_scale_no_flip_is_softmax_of_whole():
    x = torch.randn(1, 3, 32, 32)
    out = predict_multiscale(pointwise, x, scales=(1.0,), flip=False)
    assert torch.allclose(out, pointwise(x).softmax(1), atol=1e-6)


def test_multiscale_with_flip_averages_probabilities_at_input_size():
    x = torch.randn(2, 3, 48, 64)
    out = predict_multiscale(pointwise, x, scales=(0.5, 1.0, 1.5), flip=True)
    assert out.shape == (2, 4, 48, 64)
    assert torch.allclose(out.sum(1), torch.ones(2, 48, 64), atol=1e-5)
    # a pointwise model is flip-equivariant: flip adds nothing at scale 1
    assert torch.allclose(predict_multiscale(pointwise, x, (1.0,), True), predict_multiscale(pointwise, x, (1.0,), False), atol=1e-6)


def test_predict_dispatches_on_mode():
    x = torch.randn(1, 3, 64, 64)
    assert torch.allclose(predict(pointwise, x, "slide", 32, 32), predict(pointwise, x, "whole"), atol=1e-6)
