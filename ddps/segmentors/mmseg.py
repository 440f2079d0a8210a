"""MMSegmentation's SegFormer as a base segmentor, and MMSeg checkpoints converted to it.

``MMSegSegformer`` is MMSeg's ``EncoderDecoder(MixVisionTransformer, SegformerHead)`` built from smp's MiT
encoder (``mit_b0`` .. ``mit_b5``) and a head that keeps MMSeg's module names, so an MMSeg state dict maps
onto it key by key:

- the head (``SegformerHead``): per encoder stage (strides 4, 8, 16, 32) ``convs.{i}`` = 1x1 conv (no
  bias) + BatchNorm + ReLU to ``channels``, each resized bilinearly (align_corners=False) to the stride-4
  size, concatenated in stage order 0, 1, 2, 3, then ``fusion_conv`` = 1x1 conv (4 x channels -> channels,
  no bias) + BatchNorm + ReLU: the 1/4-resolution features DDPS conditions on. The names mirror mmcv's
  ``ConvModule`` (``conv``, ``bn``);
- the classifier ``conv_seg``: Dropout2d(0.1) then a 1x1 conv with bias (dropout is identity in eval);
- the encoder's LayerNorms all use eps 1e-6 as MMSeg's MiT does (smp builds its patch-embedding and
  spatial-reduction norms with torch's 1e-5).

MMSeg pads test images to a multiple of 16 (``PAD_MULTIPLE``), not 32.

The model has smp's shape (``encoder``, ``decoder``, ``segmentation_head``), so ``BaseSegmentor`` builds it
as it builds smp's models. :func:`mmseg_mit_to_smp` converts MMSeg's MiT backbone keys to smp's;
:func:`base_from_mmseg` infers the MiT variant and the classes from a state dict's shapes and loads it.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from torch import nn

from ddps.checkpoint_io import mmcv_state_dict, shape_of
from ddps.errors import CheckpointError

PAD_MULTIPLE = 16  # MMSeg's SegFormer test pipeline pads to a multiple of 16
LN_EPS = 1e-6      # MMSeg's MiT: norm_cfg=dict(type='LN', eps=1e-6) everywhere
MIT_VARIANTS = ("mit_b0", "mit_b1", "mit_b2", "mit_b3", "mit_b4", "mit_b5")


def mit_params(variant: str) -> dict:
    """smp's MiT parameters of a variant: embed_dims, depths, num_heads, sr_ratios, ..."""
    return smp.encoders.encoders[variant]["params"]


class ConvModule(nn.Module):
    """mmcv's ConvModule as MMSeg's SegformerHead uses it: 1x1 conv (no bias), BatchNorm, ReLU."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.activate = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activate(self.bn(self.conv(x)))


class SegformerHead(nn.Module):
    """MMSeg's SegformerHead less its classifier: smp encoder features -> fused features at 1/4."""

    def __init__(self, in_channels: Sequence[int], channels: int = 256):
        super().__init__()
        self.convs = nn.ModuleList(ConvModule(c, channels) for c in in_channels)
        self.fusion_conv = ConvModule(channels * len(in_channels), channels)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        stages = features[-len(self.convs):]  # smp: [x, dummy, 1/4, 1/8, 1/16, 1/32]
        size = stages[0].shape[-2:]
        outs = [F.interpolate(conv(x), size=size, mode="bilinear", align_corners=False)
                for conv, x in zip(self.convs, stages)]
        return self.fusion_conv(torch.cat(outs, dim=1))  # stage order 0, 1, 2, 3, as MMSeg


class ConvSeg(nn.Conv2d):
    """MMSeg's ``conv_seg`` with the Dropout2d before it (BaseDecodeHead.cls_seg): a 1x1 conv with bias.
    Its state dict is the conv's alone (``weight``, ``bias``)."""

    def __init__(self, channels: int, num_classes: int, dropout: float = 0.1):
        super().__init__(channels, num_classes, 1)
        self.dropout = nn.Dropout2d(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.dropout(x))


class MMSegSegformer(nn.Module):
    """MMSeg's SegFormer on smp's MiT encoder, with smp's model shape: ``encoder``, ``decoder`` (the head's
    fused features at 1/4) and ``segmentation_head`` (the classifier, ``conv_seg``)."""

    def __init__(self, encoder_name: str = "mit_b0", encoder_weights: str | None = None, classes: int = 150,
                 channels: int = 256):
        super().__init__()
        if encoder_name not in MIT_VARIANTS:
            raise ValueError(f"mmseg-segformer takes a MiT encoder ({', '.join(MIT_VARIANTS)}), not {encoder_name!r}")
        self.encoder = smp.encoders.get_encoder(encoder_name, in_channels=3, depth=5, weights=encoder_weights)
        for module in self.encoder.modules():  # smp's patch-embedding and spatial-reduction norms: eps 1e-5
            if isinstance(module, nn.LayerNorm):
                module.eps = LN_EPS
        self.decoder = SegformerHead(mit_params(encoder_name)["embed_dims"], channels)
        self.segmentation_head = nn.Sequential(ConvSeg(channels, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits at 1/4 of the input resolution."""
        return self.segmentation_head(self.decoder(self.encoder(x)))


# ---- MMSeg checkpoints ------------------------------------------------------------------------------

_STAGE = re.compile(r"layers\.(\d+)\.(.*)")
_BLOCK = re.compile(r"1\.(\d+)\.(.*)")
# names inside one transformer block that are only renamed (MMSeg -> smp); the attention's in_proj is split
_BLOCK_RENAMES = {
    "norm1.": "norm1.", "norm2.": "norm2.", "attn.attn.out_proj.": "attn.proj.", "attn.sr.": "attn.sr.",
    "attn.norm.": "attn.norm.", "ffn.layers.1.": "mlp.dwconv.dwconv.",
}
_LINEAR_CONVS = {"ffn.layers.0.": "mlp.fc1.", "ffn.layers.4.": "mlp.fc2."}  # 1x1 convs -> Linear
_HEAD = {"decode_head.convs.": "decoder.convs.", "decode_head.fusion_conv.": "decoder.fusion_conv.",
         "decode_head.conv_seg.": "classifier."}


def _mit_key(key: str, value: torch.Tensor) -> dict[str, torch.Tensor] | None:
    """One MMSeg MiT key (without 'backbone.') as smp keys and tensors; None when it is not one of them."""
    stage = _STAGE.fullmatch(key)
    if not stage:
        return None
    i, rest = int(stage.group(1)), stage.group(2)
    n = i + 1
    if rest.startswith("0.projection."):
        return {f"patch_embed{n}.proj.{rest[len('0.projection.'):]}": value}
    if rest.startswith("0.norm."):
        return {f"patch_embed{n}.norm.{rest[len('0.norm.'):]}": value}
    if rest.startswith("2."):
        return {f"norm{n}.{rest[2:]}": value}
    block = _BLOCK.fullmatch(rest)
    if not block:
        return None
    j, name = block.group(1), block.group(2)
    prefix = f"block{n}.{j}."
    if name in ("attn.attn.in_proj_weight", "attn.attn.in_proj_bias"):
        c = value.shape[0] // 3  # rows [0:C] q, [C:2C] k, [2C:3C] v; smp's kv is k then v
        kind = name.rsplit("_", 1)[1]
        return {f"{prefix}attn.q.{kind}": value[:c], f"{prefix}attn.kv.{kind}": value[c:]}
    for old, new in _LINEAR_CONVS.items():
        if name.startswith(old):
            tail = name[len(old):]
            return {prefix + new + tail: value.flatten(1) if tail == "weight" else value}
    for old, new in _BLOCK_RENAMES.items():
        if name.startswith(old):
            return {prefix + new + name[len(old):]: value}
    return None


def mmseg_mit_to_smp(state: dict, where: str = "state dict") -> dict:
    """MMSeg's MiT backbone keys (``backbone.layers.…``) as smp's MiT encoder keys (``patch_embed1.…``,
    ``block1.0.attn.q.…``, ``norm1.…``). Keys outside ``backbone.`` are left out; a ``backbone.`` key that is
    not MiT's is a one-line CheckpointError naming it."""
    out = {}
    for key, value in state.items():
        if not key.startswith("backbone."):
            continue
        mapped = _mit_key(key[len("backbone."):], value)
        if mapped is None:
            raise CheckpointError(f"{where}: {key} is not a key of MMSeg's MiT backbone")
        out.update(mapped)
    return out


def mmseg_to_base_state(state: dict, where: str = "state dict") -> dict:
    """A whole MMSeg SegFormer state dict (``backbone.`` + ``decode_head.``) as a BaseSegmentor's keys
    (``encoder.…``, ``decoder.…``, ``classifier.…``); any other key is a one-line CheckpointError naming it."""
    out = {f"encoder.{k}": v for k, v in mmseg_mit_to_smp(state, where).items()}
    for key, value in state.items():
        if key.startswith("backbone."):
            continue
        old = next((p for p in _HEAD if key.startswith(p)), None)
        if old is None:
            raise CheckpointError(f"{where}: {key} is not a key of MMSeg's SegFormer (backbone + SegformerHead)")
        out[_HEAD[old] + key[len(old):]] = value
    return out


def _shape(state: dict, key: str, where: str) -> tuple[int, ...]:
    return shape_of(state, key, where, "an MMSeg SegFormer")


def infer_variant(state: dict, where: str = "state dict") -> str:
    """The MiT variant (mit_b0 .. mit_b5) of an MMSeg state dict, from its embed dims and per-stage depths."""
    dims = tuple(_shape(state, f"backbone.layers.{i}.0.projection.weight", where)[0] for i in range(4))
    depths = []
    for i in range(4):
        blocks = {int(m.group(1)) for k in state
                  if (m := re.match(rf"backbone\.layers\.{i}\.1\.(\d+)\.", k))}
        depths.append(len(blocks))
    for variant in MIT_VARIANTS:
        params = mit_params(variant)
        if tuple(params["embed_dims"]) == dims and tuple(params["depths"]) == tuple(depths):
            return variant
    raise CheckpointError(f"{where}: MiT embed dims {dims} and depths {tuple(depths)} (from "
                          f"backbone.layers.*.0.projection.weight) fit no variant of {', '.join(MIT_VARIANTS)}")


def base_from_mmseg(state_dict: dict, where: str, num_classes: int | None = None,
                    feature_channels: int | None = None):
    """A BaseSegmentor ``mmseg-segformer`` holding an MMSeg SegFormer state dict (loaded strictly): the MiT
    variant from the shapes, the classes and the head's width from ``decode_head.conv_seg.weight``. With
    ``num_classes`` / ``feature_channels`` given, a checkpoint with others is a one-line CheckpointError.
    Accepts the file's dict too (``{"meta": …, "state_dict": …}``)."""
    from ddps.segmentors.base import BaseSegmentor, SegmentorSpec, check_state
    state = mmcv_state_dict(state_dict, where)
    variant = infer_variant(state, where)
    classes, channels = _shape(state, "decode_head.conv_seg.weight", where)[:2]
    if num_classes is not None and classes != num_classes:
        raise CheckpointError(f"{where} predicts {classes} classes but {num_classes} are expected")
    if feature_channels is not None and channels != feature_channels:
        raise CheckpointError(f"{where} has a {channels}-channel head but {feature_channels} are expected")
    converted = mmseg_to_base_state(state, where)
    model = BaseSegmentor(SegmentorSpec("mmseg-segformer", variant, classes, feature_channels=channels))
    check_state(model, converted, where)
    model.load_state_dict(converted)
    return model


def base_from_mmseg_file(path: str | Path, num_classes: int | None = None):
    """:func:`base_from_mmseg` of an MMSeg checkpoint file, read weights-only (``read_foreign_checkpoint``)."""
    from ddps.checkpoint_io import read_foreign_checkpoint
    payload = read_foreign_checkpoint(path, "MMSeg checkpoint")
    return base_from_mmseg(payload, f"MMSeg checkpoint {path}", num_classes)
