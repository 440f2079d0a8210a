"""The DDPS denoiser: a DDPM-style UNet with time scale-and-shift (paper §3, Table 5).

Architecture (the lucidrains-style UNet the paper's official code uses; re-implemented here):

- time: sinusoidal embedding of width ``dim`` -> Linear(dim, 4 dim) -> GELU -> Linear(4 dim, 4 dim);
- 7x7 input conv ``in_channels -> dim``;
- down path, one level per entry of ``dim_mults`` (widths ``dims = [dim, dim*m1, dim*m2, ...]``):
  two residual blocks, a residual pre-norm linear attention, then a 4x4 stride-2 conv to the next
  level's width (the last level: a 3x3 conv to the next width, no downsampling). The first block's
  output and the attention's output are kept as long skips (two per level);
- middle: residual block, residual pre-norm full attention, residual block;
- up path mirroring it: each residual block takes concat(x, the matching skip); nearest x2 + 3x3 conv
  up (the last level: a 3x3 conv, no upsampling);
- final residual block on concat(x, the input conv's output) -> 1x1 conv to ``out_channels``.

A residual block is ``[WS-conv3x3 -> GroupNorm -> h (1 + scale) + shift -> SiLU] -> [WS-conv3x3 ->
GroupNorm -> SiLU] + res_conv(x)`` with (scale, shift) = Linear(SiLU(time embedding)) — the time step
enters every block by scale-and-shift.

Any H, W: the input is replicate-padded (bottom/right) to a multiple of 2^(levels - 1) and the output
cropped back to (H, W).

Parameter counts (paper Table 5; ``in_channels = 272`` = 256 base features + 16-dim mask embedding).
``count_params(create_unet(size, 272))`` counts everything from the input conv to the output conv,
time MLP included — the same module the official code reports as ``decode_head.unet`` — with
``out_channels`` at its default ``dim``:

====  ===============  ===========  =========  =======
size  dim, mults       ours         paper      diff
====  ===============  ===========  =========  =======
T     64, (1, 1, 1)      3,370,176    3.38 M    -0.3 %
S     128, (1, 1, 1)    11,295,104   11.34 M    -0.4 %
M     256, (1, 1, 1)    40,809,216   41.34 M    -1.3 %
L     256, (1, 2, 4)   157,963,520  158.53 M    -0.4 %
====  ===============  ===========  =========  =======

How the residuals are explained (arithmetic, pinned in tests/test_unet.py):
- the official head's ``out_dim`` defaults to 256 (its released config keeps 256); for T/S that adds
  64·192 + 192 = 12,480 / 128·128 + 128 = 16,512 (T: 3,382,656 = 3.38 M exactly; S: 11,311,616,
  -0.25 %). M and L are unchanged (dim = 256 already);
- M and L in the paper also hold the frozen SegFormer-B2 all-MLP head that sits in the same
  ``decode_head`` module: four 1x1 convs (64, 128, 320, 512 -> 256, no bias) + BN and the 1x1 fusion
  conv (1024 -> 256, no bias) + BN = 526,848 parameters. UNet-M + that = 41,336,064 = 41.34 M; UNet-L
  + that + the ADE20K classifier (256 -> 151, 38,807) = 158,529,175 = 158.53 M. T and S apparently were
  counted without it (they would be 0.53 M higher). That head belongs to the base segmentor, not here.
"""
from __future__ import annotations

import math
from math import gcd

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ddps.errors import ConfigError, choices

# Table 5's four sizes, plus two small ones for CPU budgets.
UNET_SIZES: dict[str, dict] = {
    "XXS": {"dim": 16, "dim_mults": (1, 1, 1)},
    "XS": {"dim": 32, "dim_mults": (1, 1, 1)},
    "T": {"dim": 64, "dim_mults": (1, 1, 1)},
    "S": {"dim": 128, "dim_mults": (1, 1, 1)},
    "M": {"dim": 256, "dim_mults": (1, 1, 1)},
    "L": {"dim": 256, "dim_mults": (1, 2, 4)},
}


def count_params(module: nn.Module) -> int:
    """Number of parameters (trainable or not); works on the meta device too."""
    return sum(p.numel() for p in module.parameters())


def _groups_for(channels: int, groups: int) -> int:
    """The largest divisor of ``channels`` that is at most ``groups`` (GroupNorm needs one)."""
    return gcd(channels, groups)


# ---------------------------------------------------------------------------------------------------
# building blocks
# ---------------------------------------------------------------------------------------------------

class SinusoidalTimeEmbedding(nn.Module):
    """emb(t) = [sin(t ω_i), cos(t ω_i)], ω_i = 10000^(-i / (half - 1)), i = 0 … half - 1 (DDPM, Ho et al.)."""

    def __init__(self, dim: int):
        super().__init__()
        if dim < 4 or dim % 2:
            raise ValueError(f"time embedding width must be even and >= 4, got {dim}")
        self.dim = dim

    def forward(self, t: Tensor) -> Tensor:  # (B,) -> (B, dim)
        half = self.dim // 2
        freqs = torch.exp(torch.arange(half, device=t.device, dtype=torch.float32)
                          * (-math.log(10000.0) / (half - 1)))
        angles = t.float()[:, None] * freqs[None, :]  # (B, half)
        return torch.cat([angles.sin(), angles.cos()], dim=1)


class WSConv2d(nn.Conv2d):
    """Conv2d with weight standardisation (Qiao et al. 2019): each output filter is normalised to zero
    mean and unit variance before use: ŵ_o = (w_o - mean(w_o)) / sqrt(var(w_o) + ε)."""

    def standardized_weight(self) -> Tensor:
        eps = 1e-5 if self.weight.dtype == torch.float32 else 1e-3
        var, mean = torch.var_mean(self.weight, dim=(1, 2, 3), correction=0, keepdim=True)
        return (self.weight - mean) * torch.rsqrt(var + eps)

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.standardized_weight(), self.bias, self.stride, self.padding,
                        self.dilation, self.groups)


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channel axis of a (B, C, H, W) map, with a gain and no bias."""

    def __init__(self, channels: int):
        super().__init__()
        self.gain = nn.Parameter(torch.ones(1, channels, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        eps = 1e-5 if x.dtype == torch.float32 else 1e-3
        var, mean = torch.var_mean(x, dim=1, correction=0, keepdim=True)
        return (x - mean) * torch.rsqrt(var + eps) * self.gain


class ResBlock(nn.Module):
    """Two (WS-conv3x3, GroupNorm, SiLU) layers; the time embedding scales and shifts the first:
    h = GN(conv(x)) · (1 + scale) + shift; out = layer2(SiLU(h)) + res_conv(x)."""

    def __init__(self, dim_in: int, dim_out: int, time_dim: int, groups: int = 8):
        super().__init__()
        self.time_proj = nn.Sequential(nn.SiLU(), nn.Linear(time_dim, 2 * dim_out))
        self.conv1 = WSConv2d(dim_in, dim_out, 3, padding=1)
        self.norm1 = nn.GroupNorm(_groups_for(dim_out, groups), dim_out)
        self.conv2 = WSConv2d(dim_out, dim_out, 3, padding=1)
        self.norm2 = nn.GroupNorm(_groups_for(dim_out, groups), dim_out)
        self.res_conv = nn.Conv2d(dim_in, dim_out, 1) if dim_in != dim_out else nn.Identity()

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        scale, shift = self.time_proj(temb)[:, :, None, None].chunk(2, dim=1)  # (B, dim_out, 1, 1) each
        h = self.norm1(self.conv1(x))
        h = F.silu(h * (1 + scale) + shift)
        h = F.silu(self.norm2(self.conv2(h)))
        return h + self.res_conv(x)


class LinearAttention(nn.Module):
    """Linear attention (Shen et al. 2021; Katharopoulos et al. 2020): softmax over features for q,
    over positions for k; out = q^T (k v^T), cost O(N d²) instead of O(N² d)."""

    def __init__(self, channels: int, heads: int = 4, dim_head: int = 32):
        super().__init__()
        self.heads, self.scale = heads, dim_head ** -0.5
        hidden = heads * dim_head
        self.to_qkv = nn.Conv2d(channels, 3 * hidden, 1, bias=False)
        self.to_out = nn.Sequential(nn.Conv2d(hidden, channels, 1), ChannelLayerNorm(channels))

    def forward(self, x: Tensor) -> Tensor:
        B, _, H, W = x.shape
        q, k, v = (z.reshape(B, self.heads, -1, H * W) for z in self.to_qkv(x).chunk(3, dim=1))  # (B, h, d, N)
        q = q.softmax(dim=-2) * self.scale
        k = k.softmax(dim=-1)
        v = v / (H * W)
        context = torch.einsum("bhdn,bhen->bhde", k, v)      # (B, h, d, d)
        out = torch.einsum("bhde,bhdn->bhen", context, q)    # (B, h, d, N)
        return self.to_out(out.reshape(B, -1, H, W))


class FullAttention(nn.Module):
    """Multi-head softmax attention over all H·W positions (scale dim_head^-1/2)."""

    def __init__(self, channels: int, heads: int = 4, dim_head: int = 32):
        super().__init__()
        self.heads = heads
        hidden = heads * dim_head
        self.to_qkv = nn.Conv2d(channels, 3 * hidden, 1, bias=False)
        self.to_out = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        B, _, H, W = x.shape
        q, k, v = (z.reshape(B, self.heads, -1, H * W).transpose(-1, -2)  # (B, h, N, d)
                   for z in self.to_qkv(x).chunk(3, dim=1))
        out = F.scaled_dot_product_attention(q, k, v)                      # (B, h, N, d)
        return self.to_out(out.transpose(-1, -2).reshape(B, -1, H, W))


class PreNormResidual(nn.Module):
    """x + fn(ChannelLayerNorm(x))."""

    def __init__(self, channels: int, fn: nn.Module):
        super().__init__()
        self.norm, self.fn = ChannelLayerNorm(channels), fn

    def forward(self, x: Tensor) -> Tensor:
        return x + self.fn(self.norm(x))


def _upsample(dim_in: int, dim_out: int) -> nn.Module:
    return nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(dim_in, dim_out, 3, padding=1))


# ---------------------------------------------------------------------------------------------------
# the UNet
# ---------------------------------------------------------------------------------------------------

class UNet(nn.Module):
    """Denoiser ``(x, t) -> features``: x (B, in_channels, H, W), t (B,) -> (B, out_channels, H, W).

    ``t`` is the diffusion time in the project's convention (t = 0 clean, t = T pure noise); the UNet
    only embeds it. ``out_channels`` defaults to ``dim``: DDPS puts dropout and its own 1x1 classifier
    after the UNet.
    """

    def __init__(self, in_channels: int, dim: int, dim_mults: tuple[int, ...] = (1, 1, 1),
                 out_channels: int | None = None, groups: int = 8, attn_heads: int = 4, attn_dim_head: int = 32):
        super().__init__()
        if not dim_mults:
            raise ValueError("dim_mults must name at least one level")
        self.in_channels, self.dim, self.dim_mults = in_channels, dim, tuple(dim_mults)
        self.out_channels = dim if out_channels is None else out_channels
        self.pad_multiple = 2 ** (len(dim_mults) - 1)  # one stride-2 downsample between levels

        time_dim = 4 * dim
        self.time_mlp = nn.Sequential(SinusoidalTimeEmbedding(dim), nn.Linear(dim, time_dim), nn.GELU(),
                                      nn.Linear(time_dim, time_dim))
        self.init_conv = nn.Conv2d(in_channels, dim, 7, padding=3)

        def block(c_in: int, c_out: int) -> ResBlock:
            return ResBlock(c_in, c_out, time_dim, groups)

        def linear_attn(c: int) -> PreNormResidual:
            return PreNormResidual(c, LinearAttention(c, attn_heads, attn_dim_head))

        dims = [dim, *(dim * m for m in dim_mults)]
        in_out = list(zip(dims[:-1], dims[1:]))
        self.downs = nn.ModuleList()
        for i, (c_in, c_out) in enumerate(in_out):
            last = i == len(in_out) - 1
            self.downs.append(nn.ModuleList([
                block(c_in, c_in), block(c_in, c_in), linear_attn(c_in),
                nn.Conv2d(c_in, c_out, 3, padding=1) if last else nn.Conv2d(c_in, c_out, 4, stride=2, padding=1),
            ]))

        mid = dims[-1]
        self.mid_block1 = block(mid, mid)
        self.mid_attn = PreNormResidual(mid, FullAttention(mid, attn_heads, attn_dim_head))
        self.mid_block2 = block(mid, mid)

        self.ups = nn.ModuleList()
        for i, (c_in, c_out) in enumerate(reversed(in_out)):
            last = i == len(in_out) - 1
            self.ups.append(nn.ModuleList([
                block(c_out + c_in, c_out), block(c_out + c_in, c_out), linear_attn(c_out),
                nn.Conv2d(c_out, c_in, 3, padding=1) if last else _upsample(c_out, c_in),
            ]))

        self.final_block = block(2 * dim, dim)
        self.final_conv = nn.Conv2d(dim, self.out_channels, 1)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        B, C, H, W = x.shape
        assert C == self.in_channels, f"expected {self.in_channels} input channels, got {C}"
        t = torch.as_tensor(t, device=x.device)
        t = t.expand(B) if t.ndim == 0 else t
        assert t.shape == (B,), f"t must be (B,) = ({B},), got {tuple(t.shape)}"

        m = self.pad_multiple
        pad_h, pad_w = -H % m, -W % m
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")  # (B, C, H', W'), multiples of m

        temb = self.time_mlp(t)  # (B, 4 dim)
        x = self.init_conv(x)
        stem = x
        skips = []
        for block1, block2, attn, down in self.downs:
            x = block1(x, temb)
            skips.append(x)
            x = attn(block2(x, temb))
            skips.append(x)
            x = down(x)

        x = self.mid_block2(self.mid_attn(self.mid_block1(x, temb)), temb)

        for block1, block2, attn, up in self.ups:
            x = block1(torch.cat([x, skips.pop()], dim=1), temb)
            x = attn(block2(torch.cat([x, skips.pop()], dim=1), temb))
            x = up(x)

        x = self.final_block(torch.cat([x, stem], dim=1), temb)
        return self.final_conv(x)[:, :, :H, :W]  # (B, out_channels, H, W)


def create_unet(size: str, in_channels: int, out_channels: int | None = None) -> UNet:
    """A UNet of a named size (``UNET_SIZES``); ConfigError listing the sizes for an unknown name."""
    if size not in UNET_SIZES:
        raise ConfigError(f"unknown UNet size {size!r}; choose one of: {choices(UNET_SIZES)}")
    spec = UNET_SIZES[size]
    return UNet(in_channels, spec["dim"], spec["dim_mults"], out_channels=out_channels)
