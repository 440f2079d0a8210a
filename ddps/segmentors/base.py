"""Base segmentors from segmentation-models-pytorch, behind one interface.

``BaseSegmentor(x)`` returns the class logits and the feature map just before the final classifier, both
at 1/4 of the input resolution: this feature map is what the DDPS denoiser conditions on (paper §3.1).
For SegFormer it is the all-MLP decoder's fused map; for DeepLabV3+ the decoder's output after the
low-level fusion; for ``mmseg-segformer`` (MMSeg's SegFormer head on smp's MiT encoder, with MMSeg's module
names: :mod:`ddps.segmentors.mmseg`) the head's ``fusion_conv`` output. The smp segmentation head is split:
its 1x1 conv is the classifier; its x4 upsampling is done by :meth:`BaseSegmentor.segment`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from torch import nn

from ddps.checkpoint_io import read_state_file
from ddps.config.choices import BACKBONES, check_base_names
from ddps.errors import CheckpointError
from ddps.segmentors.mmseg import PAD_MULTIPLE as MMSEG_PAD_MULTIPLE, MMSegSegformer

# each builds a model of smp's shape (encoder, decoder, segmentation_head); mmseg-segformer is MMSeg's
# SegFormer head on smp's MiT encoder, with MMSeg's module names (ddps.segmentors.mmseg)
ARCHITECTURES = {"segformer": smp.Segformer, "deeplabv3plus": smp.DeepLabV3Plus, "mmseg-segformer": MMSegSegformer}
assert set(ARCHITECTURES) == set(BACKBONES)
# the keyword smp uses for the width of each architecture's decoder output (= the feature channels)
_CHANNELS_KWARG = {"segformer": "decoder_segmentation_channels", "deeplabv3plus": "decoder_channels",
                   "mmseg-segformer": "channels"}
OUTPUT_STRIDE = 4
PAD_MULTIPLE = 32  # the smp backbones downsample by 32: inputs are padded to a multiple of it
PAD_MULTIPLES = {"mmseg-segformer": MMSEG_PAD_MULTIPLE}  # MMSeg's SegFormer pads test images to 16


class SegmentorOutput(NamedTuple):
    logits: torch.Tensor    # (B, K, H/4, W/4)
    features: torch.Tensor  # (B, C, H/4, W/4)


@dataclass(frozen=True)
class SegmentorSpec:
    arch: str
    backbone: str
    num_classes: int
    feature_channels: int = 256
    encoder_weights: str = ""  # '' = random init | 'imagenet' (smp's, by name: segmentors.pretrained) | a local
                               # file with the encoder's state dict

    @property
    def name(self) -> str:
        return f"{self.arch}-{self.backbone}"


class BaseSegmentor(nn.Module):
    """An smp model seen as (logits, features) at 1/4 resolution."""

    def __init__(self, spec: SegmentorSpec):
        super().__init__()
        check_base_names(spec.arch, spec.backbone)
        self.spec = spec
        model = ARCHITECTURES[spec.arch](
            encoder_name=spec.backbone, encoder_weights=None, classes=spec.num_classes,
            **{_CHANNELS_KWARG[spec.arch]: spec.feature_channels})
        self.encoder, self.decoder = model.encoder, model.decoder
        self.classifier = model.segmentation_head[0]  # the 1x1 conv; the x4 upsampling is segment()'s
        if spec.encoder_weights == "imagenet":  # smp's published ImageNet weights, from the Hugging Face Hub
            from ddps.segmentors.pretrained import load_imagenet_encoder
            load_imagenet_encoder(self.encoder, spec.backbone)
        elif spec.encoder_weights:
            load_state(self.encoder, spec.encoder_weights, what=f"{spec.backbone} encoder weights")

    @property
    def num_classes(self) -> int:
        return self.spec.num_classes

    @property
    def feature_channels(self) -> int:
        return self.spec.feature_channels

    @property
    def pad_multiple(self) -> int:
        """What each input side must be a multiple of (segmentors.inference.pad pads to it)."""
        return PAD_MULTIPLES.get(self.spec.arch, PAD_MULTIPLE)

    def forward(self, x: torch.Tensor) -> SegmentorOutput:
        assert x.ndim == 4 and x.shape[1] == 3, f"expected (B, 3, H, W), got {tuple(x.shape)}"
        m = self.pad_multiple
        assert x.shape[2] % m == 0 and x.shape[3] % m == 0, \
            f"input {tuple(x.shape[2:])} must be a multiple of {m}; see segmentors.inference.pad"
        features = self.decoder(self.encoder(x))  # (B, C, H/4, W/4)
        return SegmentorOutput(self.classifier(features), features)

    def segment(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits at the input resolution, (B, K, H, W)."""
        logits = self(x).logits
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)

    def freeze(self) -> "BaseSegmentor":
        """Stop all gradients and hold norm layers in eval mode, so BatchNorm statistics cannot drift."""
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()
        return self

    def train(self, mode: bool = True) -> "BaseSegmentor":
        frozen = not any(p.requires_grad for p in self.parameters())
        return super().train(mode and not frozen)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def create_base(arch: str, backbone: str, num_classes: int, **kwargs) -> BaseSegmentor:
    """Build a base segmentor by name, e.g. create_base('segformer', 'mit_b0', 11)."""
    return BaseSegmentor(SegmentorSpec(arch, backbone, num_classes, **kwargs))


def apply_state(module: nn.Module, payload, where: str) -> None:
    """Load a loaded file's state dict into ``module`` strictly, with a one-line error on any mismatch.

    Accepts a plain state dict, or a dict holding one under 'model' or 'state_dict' (as mmseg and timm save).
    """
    state = payload
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise CheckpointError(f"{where} holds a {type(state).__name__}, not a state dict")
    check_state(module, state, where)
    module.load_state_dict(state)


def load_state(module: nn.Module, path: str | Path, what: str) -> None:
    """Load a state-dict file into ``module`` strictly (see :func:`apply_state`)."""
    apply_state(module, read_state_file(path, what), f"{what} in {path}")


def check_state(module: nn.Module, state: dict, where: str) -> None:
    """Raise one CheckpointError naming missing keys, unexpected keys and shape mismatches."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state and hasattr(state[k], "shape") and state[k].shape != own[k].shape]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
    if shapes:
        problems.append(f"{len(shapes)} shape mismatches (e.g. {shapes[0]})")
    if problems:
        raise CheckpointError(f"{where} does not fit: " + "; ".join(problems))
