"""The DDPS denoiser UNet: paper parameter counts (Table 5), shapes at any size, live time conditioning."""
import pytest
import torch
import torch.nn.functional as F

from ddps.denoiser import UNET_SIZES, UNet, count_params, create_unet
from ddps.denoiser.unet import FullAttention, WSConv2d
from ddps.errors import ConfigError

IN_CHANNELS = 272  # 256 SegFormer head features + 16-dim mask embedding (official config)
PAPER_PARAMS = {"T": 3.38e6, "S": 11.34e6, "M": 41.34e6, "L": 158.53e6}  # Table 5
OURS = {"T": 3_370_176, "S": 11_295_104, "M": 40_809_216, "L": 157_963_520}


def meta_unet(size, out_channels=None):
    """Built on the meta device: no memory, no init cost (UNet-L has 158M parameters)."""
    with torch.device("meta"):
        return create_unet(size, IN_CHANNELS, out_channels)


def segformer_head_params(in_channels=(64, 128, 320, 512), channels=256):
    """The official SegFormer all-MLP head inside the same decode_head: per-stage 1x1 conv (no bias) + BN,
    fusion 1x1 conv (no bias) + BN."""
    return sum(c * channels + 2 * channels for c in in_channels) + len(in_channels) * channels ** 2 + 2 * channels


@pytest.mark.parametrize("size", ["T", "S", "M", "L"])
def test_param_count_matches_paper_table5(size):
    n = count_params(meta_unet(size))
    assert n == OURS[size]
    assert abs(n / PAPER_PARAMS[size] - 1) < 0.02, (size, n)


def test_param_count_residuals_are_explained():
    # T with the official out_dim = 256: exactly 3.38M
    assert round(count_params(meta_unet("T", 256)) / 1e6, 2) == 3.38
    # M and L as the official decode_head counts them: + the SegFormer-B2 MLP head (+ L: the ADE classifier)
    head = segformer_head_params()
    assert head == 526_848
    assert round((OURS["M"] + head) / 1e6, 2) == 41.34
    assert round((OURS["L"] + head + 256 * 151 + 151) / 1e6, 2) == 158.53


def test_sizes_and_unknown_size():
    assert {"XXS", "XS", "T", "S", "M", "L"} <= set(UNET_SIZES)
    with pytest.raises(ConfigError, match="XXS"):
        create_unet("XL", IN_CHANNELS)


@pytest.mark.parametrize("size,shape", [("XXS", (2, 16, 16)), ("XS", (2, 16, 16)), ("XXS", (1, 15, 17)),
                                        ("XXS", (2, 13, 9)), ("XXS", (1, 1, 1)), ("XS", (1, 7, 30))])
def test_output_shape_any_size(size, shape):
    torch.manual_seed(0)
    batch, h, w = shape
    net = create_unet(size, 20)
    out = net(torch.randn(batch, 20, h, w), torch.randint(0, 100, (batch,)))
    assert out.shape == (batch, UNET_SIZES[size]["dim"], h, w)
    assert torch.isfinite(out).all()


def test_out_channels_and_group_count_for_odd_width():
    torch.manual_seed(0)
    net = UNet(6, dim=12, dim_mults=(1, 2), out_channels=5)  # GroupNorm(8) cannot split 12: uses 4
    assert net(torch.randn(2, 6, 8, 8), torch.tensor([0.0, 3.0])).shape == (2, 5, 8, 8)


def test_time_input_changes_output_and_dtype_does_not():
    torch.manual_seed(0)
    net = create_unet("XXS", 20).eval()
    x = torch.randn(2, 20, 16, 16)
    with torch.no_grad():
        a = net(x, torch.tensor([0, 0]))
        b = net(x, torch.tensor([50, 50]))
        c = net(x, torch.tensor([50.0, 50.0]))
        d = net(x, torch.tensor(50))  # a scalar broadcasts over the batch
    assert (a - b).abs().max() > 1e-3  # scale-and-shift is live
    torch.testing.assert_close(b, c)
    torch.testing.assert_close(b, d)


def test_gradients_reach_the_input_conv_and_time_mlp():
    torch.manual_seed(0)
    net = create_unet("XXS", 20)
    net(torch.randn(2, 20, 15, 17), torch.tensor([1, 7])).square().mean().backward()
    for p in (net.init_conv.weight, net.time_mlp[1].weight):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_weight_standardisation_is_applied():
    torch.manual_seed(0)
    conv = WSConv2d(5, 7, 3, padding=1)
    with torch.no_grad():
        conv.weight.mul_(3.0).add_(0.5)  # a raw weight far from standardised
    w = conv.standardized_weight()
    torch.testing.assert_close(w.mean(dim=(1, 2, 3)), torch.zeros(7), atol=1e-6, rtol=0)
    torch.testing.assert_close(w.var(dim=(1, 2, 3), unbiased=False), torch.ones(7), atol=1e-3, rtol=0)
    x = torch.randn(2, 5, 6, 6)
    torch.testing.assert_close(conv(x), F.conv2d(x, w, conv.bias, padding=1))
    assert not torch.allclose(conv(x), F.conv2d(x, conv.weight, conv.bias, padding=1))
    net = create_unet("XXS", 4)
    assert isinstance(net.downs[0][0].conv1, WSConv2d)


def test_full_attention_matches_naive_softmax_attention():
    torch.manual_seed(0)
    attn = FullAttention(8, heads=2, dim_head=4)
    x = torch.randn(2, 8, 3, 5)
    q, k, v = (z.reshape(2, 2, 4, 15) for z in attn.to_qkv(x).chunk(3, dim=1))  # (B, h, d, N)
    weights = torch.einsum("bhdi,bhdj->bhij", q, k).mul(4 ** -0.5).softmax(dim=-1)
    naive = attn.to_out(torch.einsum("bhij,bhdj->bhdi", weights, v).reshape(2, 8, 3, 5))
    torch.testing.assert_close(attn(x), naive)
