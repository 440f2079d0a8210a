"""A reference of the official DDPS head, written for the tests from its layout's definition (not ddps's model).

Module names are the official ones (lucidrains-style UNet: ``mlp``, ``block1.proj``/``block1.norm``,
``Residual(PreNorm(...))`` as ``fn.norm.g`` / ``fn.fn``, ``final_res_block``; the head: ``unet``, ``embed``,
``conv_seg_new`` and the schedule buffers), their time index (i = 0 is pure noise; the network sees i, the
noise level is T − 1 − i), their noise (q(x_n | x_0) = ᾱ_n one-hot + (1 − ᾱ_n)/S over all S states, the
ignore state 0 included) and their step list (range(0, T, T // K) + [T − 1]).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class WSConv(nn.Conv2d):
    def forward(self, x):
        eps = 1e-5 if x.dtype == torch.float32 else 1e-3
        w = self.weight
        mean = w.mean(dim=(1, 2, 3), keepdim=True)
        var = w.var(dim=(1, 2, 3), unbiased=False, keepdim=True)
        return F.conv2d(x, (w - mean) * (var + eps).rsqrt(), self.bias, self.stride, self.padding)


class Block(nn.Module):
    def __init__(self, dim, dim_out):
        super().__init__()
        self.proj, self.norm, self.act = WSConv(dim, dim_out, 3, padding=1), nn.GroupNorm(8, dim_out), nn.SiLU()

    def forward(self, x, scale_shift=None):
        x = self.norm(self.proj(x))
        if scale_shift is not None:
            scale, shift = scale_shift
            x = x * (scale + 1) + shift
        return self.act(x)


class ResnetBlock(nn.Module):
    def __init__(self, dim, dim_out, time_dim):
        super().__init__()
        self.mlp = nn.Sequential(nn.SiLU(), nn.Linear(time_dim, dim_out * 2))
        self.block1, self.block2 = Block(dim, dim_out), Block(dim_out, dim_out)
        self.res_conv = nn.Conv2d(dim, dim_out, 1) if dim != dim_out else nn.Identity()

    def forward(self, x, t):
        scale_shift = self.mlp(t)[:, :, None, None].chunk(2, dim=1)
        return self.block2(self.block1(x, scale_shift)) + self.res_conv(x)


class LayerNorm(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.g = nn.Parameter(torch.ones(1, dim, 1, 1))

    def forward(self, x):
        eps = 1e-5 if x.dtype == torch.float32 else 1e-3
        var = torch.var(x, dim=1, unbiased=False, keepdim=True)
        return (x - x.mean(dim=1, keepdim=True)) * (var + eps).rsqrt() * self.g


class PreNorm(nn.Module):
    def __init__(self, dim, fn):
        super().__init__()
        self.fn, self.norm = fn, LayerNorm(dim)

    def forward(self, x):
        return self.fn(self.norm(x))


class Residual(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x) + x


class LinearAttention(nn.Module):
    def __init__(self, dim, heads=4, dim_head=32):
        super().__init__()
        self.scale, self.heads = dim_head ** -0.5, heads
        self.to_qkv = nn.Conv2d(dim, heads * dim_head * 3, 1, bias=False)
        self.to_out = nn.Sequential(nn.Conv2d(heads * dim_head, dim, 1), LayerNorm(dim))

    def forward(self, x):
        b, c, h, w = x.shape
        q, k, v = (z.reshape(b, self.heads, -1, h * w) for z in self.to_qkv(x).chunk(3, dim=1))
        q = q.softmax(dim=-2) * self.scale
        k = k.softmax(dim=-1)
        v = v / (h * w)
        context = torch.einsum("bhdn,bhen->bhde", k, v)
        out = torch.einsum("bhde,bhdn->bhen", context, q)
        return self.to_out(out.reshape(b, -1, h, w))


class Attention(nn.Module):
    def __init__(self, dim, heads=4, dim_head=32):
        super().__init__()
        self.scale, self.heads = dim_head ** -0.5, heads
        self.to_qkv = nn.Conv2d(dim, heads * dim_head * 3, 1, bias=False)
        self.to_out = nn.Conv2d(heads * dim_head, dim, 1)

    def forward(self, x):
        b, c, h, w = x.shape
        q, k, v = (z.reshape(b, self.heads, -1, h * w) for z in self.to_qkv(x).chunk(3, dim=1))
        attn = (torch.einsum("bhdi,bhdj->bhij", q * self.scale, k)).softmax(dim=-1)
        out = torch.einsum("bhij,bhdj->bhid", attn, v)                  # (b, heads, N, d)
        return self.to_out(out.permute(0, 1, 3, 2).reshape(b, -1, h, w))


class SinusoidalPosEmb(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.dim = dim

    def forward(self, x):
        half = self.dim // 2
        emb = torch.exp(torch.arange(half, device=x.device) * -(math.log(10000) / (half - 1)))
        emb = x[:, None] * emb[None, :]
        return torch.cat((emb.sin(), emb.cos()), dim=-1)


class Unet(nn.Module):
    """The official ``UnetTimeEmbedding``'s layout: dims, blocks and names."""

    def __init__(self, dim, out_dim, channels, dim_mults):
        super().__init__()
        self.init_conv = nn.Conv2d(channels, dim, 7, padding=3)
        dims = [dim, *(dim * m for m in dim_mults)]
        in_out = list(zip(dims[:-1], dims[1:]))
        time_dim = dim * 4
        self.time_mlp = nn.Sequential(SinusoidalPosEmb(dim), nn.Linear(dim, time_dim), nn.GELU(),
                                      nn.Linear(time_dim, time_dim))
        self.downs, self.ups = nn.ModuleList(), nn.ModuleList()
        for i, (a, b) in enumerate(in_out):
            last = i == len(in_out) - 1
            self.downs.append(nn.ModuleList([
                ResnetBlock(a, a, time_dim), ResnetBlock(a, a, time_dim), Residual(PreNorm(a, LinearAttention(a))),
                nn.Conv2d(a, b, 3, padding=1) if last else nn.Conv2d(a, b, 4, 2, 1)]))
        mid = dims[-1]
        self.mid_block1 = ResnetBlock(mid, mid, time_dim)
        self.mid_attn = Residual(PreNorm(mid, Attention(mid)))
        self.mid_block2 = ResnetBlock(mid, mid, time_dim)
        for i, (a, b) in enumerate(reversed(in_out)):
            last = i == len(in_out) - 1
            self.ups.append(nn.ModuleList([
                ResnetBlock(b + a, b, time_dim), ResnetBlock(b + a, b, time_dim),
                Residual(PreNorm(b, LinearAttention(b))),
                nn.Conv2d(b, a, 3, padding=1) if last else nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                                                                         nn.Conv2d(b, a, 3, padding=1))]))
        self.final_res_block = ResnetBlock(dim * 2, dim, time_dim)
        self.final_conv = nn.Conv2d(dim, out_dim, 1)

    def forward(self, x, time):
        x = self.init_conv(x)
        r = x.clone()
        t = self.time_mlp(time)
        h = []
        for block1, block2, attn, down in self.downs:
            x = block1(x, t)
            h.append(x)
            x = attn(block2(x, t))
            h.append(x)
            x = down(x)
        x = self.mid_block2(self.mid_attn(self.mid_block1(x, t)), t)
        for block1, block2, attn, up in self.ups:
            x = block1(torch.cat((x, h.pop()), dim=1), t)
            x = attn(block2(torch.cat((x, h.pop()), dim=1), t))
            x = up(x)
        return self.final_conv(self.final_res_block(torch.cat((x, r), dim=1), t))


def linear_schedule(T: int, S: int):
    """Their linear schedule's log buffers: ᾱ_n for n = 0 .. T − 1 (and 1 appended), (1 − ᾱ_n)/S."""
    att = torch.arange(0, T) / (T - 1) * (0.000009 - 0.99999) + 0.99999
    att = torch.cat((torch.tensor([1.0]), att))
    at = att[1:] / att[:-1]
    att = torch.cat((att[1:], torch.tensor([1.0])))
    return {"log_cumprod_at": att.log(), "log_cumprod_bt": ((1 - att) / S).log(),
            "log_at": at.log(), "log_bt": ((1 - at) / S).log()}


class Head(nn.Module):
    """The DDPS part of the official decode head: unet, embed, conv_seg_new and the schedule buffers."""

    def __init__(self, dim, out_dim, channels, dim_mults, num_states, embed_dim, T):
        super().__init__()
        self.unet = Unet(dim, out_dim, channels, dim_mults)
        self.conv_seg_new = nn.Conv2d(out_dim, num_states, 1)
        self.embed = nn.Embedding(num_states, embed_dim)
        self.T, self.num_states = T, num_states
        for name, value in linear_schedule(T, num_states).items():
            self.register_buffer(name, value)

    def call(self, features, mask, i: int):
        """One call of the network at their time index i on the given noisy mask: logits (B, S, h, w)."""
        x = torch.cat([features, self.embed(mask).permute(0, 3, 1, 2)], dim=1)
        return self.conv_seg_new(self.unet(x, torch.full((features.shape[0],), i, dtype=torch.long)))

    def timesteps(self, K: int) -> list[int]:
        out = list(range(0, self.T, self.T // min(K, self.T)))
        return out if out[-1] == self.T - 1 else out + [self.T - 1]

    def q_pred_probs(self, x0, i: int):
        """Their q(x_n | x_0) at the noise level of call i (n = T − 1 − i), as probabilities (B, S, h, w)."""
        n = self.T - 1 - i
        onehot = F.one_hot(x0, self.num_states).permute(0, 3, 1, 2).float()
        log_x = torch.log(onehot.clamp(min=1e-30))
        a, b = self.log_cumprod_at[n], self.log_cumprod_bt[n]
        return torch.logaddexp(log_x + a, b).exp()
