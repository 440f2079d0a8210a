"""From config to objects: the noise process and the denoiser a refiner config describes."""
from __future__ import annotations

from ddps.config import Config
from ddps.diffusion.bits import BitDiffusion
from ddps.diffusion.discrete import MaskDiffusion
from ddps.refiner.codecs import ResizeCodec
from ddps.refiner.model import MaskDenoiser


def build_process(cfg: Config, num_classes: int) -> MaskDiffusion | BitDiffusion:
    d = cfg.diffusion
    if d.kind == "bits":
        return BitDiffusion(num_classes, d.steps, schedule=d.schedule, scale=d.bit_scale)
    return MaskDiffusion(num_classes, d.steps, transition=d.transition, schedule=d.schedule)


def build_denoiser(cfg: Config, num_classes: int, feature_channels: int,
                   process: MaskDiffusion | BitDiffusion | None = None) -> MaskDenoiser:
    dn = cfg.denoiser
    if dn.method == "head":
        mask_input, states, bits = "none", None, 0
    elif isinstance(process, BitDiffusion):
        mask_input, states, bits = "bits", None, process.bits
    else:
        mask_input, states, bits = "embed", process.num_states, 0
    channels = feature_channels + (num_classes if dn.residual else 0)  # residual: the base's logits appended
    return MaskDenoiser(feature_channels=channels, num_classes=num_classes, size=dn.size,
                        mask_input=mask_input, num_states=states, bits=bits, embed_dim=dn.embed_dim,
                        embed_trainable=dn.embed_trainable, dropout=dn.dropout, residual=dn.residual)


def build_codec(cfg: Config) -> ResizeCodec:
    return ResizeCodec(cfg.denoiser.mask_scale)
