"""A reference MMSeg SegFormer (MixVisionTransformer + SegformerHead), written for the tests from MMSeg's
definition (module names and data flow as mmseg/models/backbones/mit.py and decode_heads/segformer_head.py
define them), not from ddps's code; and mmcv's checkpoint file layout."""
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# MMSeg's MiT configs: embed dims per stage, depths, heads, spatial-reduction ratios
MIT = {"mit_b0": ((32, 64, 160, 256), (2, 2, 2, 2)), "mit_b1": ((64, 128, 320, 512), (2, 2, 2, 2)),
       "mit_b2": ((64, 128, 320, 512), (3, 4, 6, 3))}
HEADS, SR = (1, 2, 5, 8), (8, 4, 2, 1)


def nlc_to_nchw(x, hw):
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], *hw)


def nchw_to_nlc(x):
    return x.flatten(2).transpose(1, 2)


class PatchEmbed(nn.Module):  # mmseg.models.utils.PatchEmbed: 'projection' conv + 'norm'
    def __init__(self, c_in, c_out, kernel, stride):
        super().__init__()
        self.projection = nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2)
        self.norm = nn.LayerNorm(c_out, eps=1e-6)

    def forward(self, x):
        x = self.projection(x)
        hw = x.shape[-2:]
        return self.norm(nchw_to_nlc(x)), hw


class EfficientMultiheadAttention(nn.Module):  # 'attn' = nn.MultiheadAttention; 'sr', 'norm' when sr > 1
    def __init__(self, dim, heads, sr):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.sr_ratio = sr
        if sr > 1:
            self.sr = nn.Conv2d(dim, dim, sr, sr)
            self.norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x, hw):
        kv = x
        if self.sr_ratio > 1:
            kv = self.norm(nchw_to_nlc(self.sr(nlc_to_nchw(x, hw))))
        return self.attn(query=x, key=kv, value=kv, need_weights=False)[0]


class MixFFN(nn.Module):  # 'layers' = [fc1 1x1 conv, 3x3 depthwise conv, GELU, Dropout, fc2 1x1 conv, Dropout]
    def __init__(self, dim, hidden):
        super().__init__()
        self.layers = nn.Sequential(nn.Conv2d(dim, hidden, 1), nn.Conv2d(hidden, hidden, 3, 1, 1, groups=hidden),
                                    nn.GELU(), nn.Dropout(0.0), nn.Conv2d(hidden, dim, 1), nn.Dropout(0.0))

    def forward(self, x, hw):
        return nchw_to_nlc(self.layers(nlc_to_nchw(x, hw)))


class TransformerEncoderLayer(nn.Module):
    def __init__(self, dim, heads, sr):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = EfficientMultiheadAttention(dim, heads, sr)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.ffn = MixFFN(dim, 4 * dim)

    def forward(self, x, hw):
        x = x + self.attn(self.norm1(x), hw)
        return x + self.ffn(self.norm2(x), hw)


class MixVisionTransformer(nn.Module):  # layers.{i} = [patch embed, [blocks], norm]
    def __init__(self, dims, depths):
        super().__init__()
        self.layers = nn.ModuleList()
        c_in = 3
        for i, (dim, depth) in enumerate(zip(dims, depths)):
            self.layers.append(nn.ModuleList([
                PatchEmbed(c_in, dim, 7 if i == 0 else 3, 4 if i == 0 else 2),
                nn.ModuleList(TransformerEncoderLayer(dim, HEADS[i], SR[i]) for _ in range(depth)),
                nn.LayerNorm(dim, eps=1e-6)]))
            c_in = dim

    def forward(self, x):
        outs = []
        for embed, blocks, norm in self.layers:
            x, hw = embed(x)
            for block in blocks:
                x = block(x, hw)
            x = nlc_to_nchw(norm(x), hw)
            outs.append(x)
        return outs


class ConvModule(nn.Module):  # mmcv: 'conv' (no bias before a norm), 'bn', ReLU
    def __init__(self, c_in, c_out):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 1, bias=False)
        self.bn = nn.BatchNorm2d(c_out)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class SegformerHead(nn.Module):
    def __init__(self, in_channels, channels, num_classes):
        super().__init__()
        self.convs = nn.ModuleList(ConvModule(c, channels) for c in in_channels)
        self.fusion_conv = ConvModule(4 * channels, channels)
        self.dropout = nn.Dropout2d(0.1)
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)

    def forward(self, inputs):
        outs = [F.interpolate(conv(x), size=inputs[0].shape[2:], mode="bilinear", align_corners=False)
                for conv, x in zip(self.convs, inputs)]
        features = self.fusion_conv(torch.cat(outs, dim=1))
        return features, self.conv_seg(self.dropout(features))


class EncoderDecoder(nn.Module):
    def __init__(self, variant="mit_b0", channels=32, num_classes=5):
        super().__init__()
        dims, depths = MIT[variant]
        self.backbone = MixVisionTransformer(dims, depths)
        self.decode_head = SegformerHead(dims, channels, num_classes)

    def forward(self, x):
        return self.decode_head(self.backbone(x))


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Every parameter and BatchNorm statistic random (norm weights around 1), so that no mapping error
    hides behind an identity or a zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point():
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif t.ndim == 1 and ("norm" in name or "bn" in name) and name.endswith("weight"):
                t.copy_(1 + 0.2 * torch.randn(t.shape, generator=g))
            elif t.ndim == 1:
                t.copy_(0.1 * torch.randn(t.shape, generator=g))
            else:
                t.copy_(torch.randn(t.shape, generator=g) / t[0].numel() ** 0.5)
    return model


def mmcv_file(path, state: dict, meta_extra=None):
    """Saved as mmcv's save_checkpoint does: meta (with numpy values), state_dict, optimizer."""
    meta = {"CLASSES": ("wall", "floor", "sky", "tree", "person"), "lr": np.float64(6e-5), "iter": np.int64(160000),
            "mean": np.array([123.675, 116.28, 103.53]), "mmcv_version": "1.4.2", **(meta_extra or {})}
    torch.save({"meta": meta, "state_dict": state, "optimizer": {"state": {}, "param_groups": []}}, path)
    return path
