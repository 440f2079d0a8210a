"""From config to objects: the noise process and the denoiser a refiner config describes."""
from __future__ import annotations

from ddps.config import Config
from ddps.diffusion import create_process
from ddps.diffusion.process import MaskInput, NoiseProcess
from ddps.refiner.codecs import ResizeCodec
from ddps.refiner.model import MaskDenoiser

NO_MASK = MaskInput("none")  # the UNet-as-head baseline (Table 7): features only


def num_states(cfg: Config, num_classes: int) -> int:
    """What the denoiser predicts and the process diffuses: the classes, with ``diffusion.ignore_state`` one
    more (state 0, the ignore region, as the official checkpoints have it; class c is state c + 1)."""
    return num_classes + int(cfg.diffusion.ignore_state)


def build_process(cfg: Config, num_classes: int) -> NoiseProcess:
    """The process registered as ``diffusion.kind``, given the diffusion section's options."""
    d = cfg.diffusion
    return create_process(d.kind, num_states(cfg, num_classes), d.steps, transition=d.transition, schedule=d.schedule,
                          bit_scale=d.bit_scale)


def build_denoiser(cfg: Config, num_classes: int, feature_channels: int,
                   process: NoiseProcess | None = None) -> MaskDenoiser:
    """The denoiser of ``cfg.denoiser``, reading x_t the way ``process`` makes it (``process.mask_input``)."""
    dn = cfg.denoiser
    mask = NO_MASK if dn.method == "head" else process.mask_input
    channels = feature_channels + (num_classes if dn.residual else 0)  # residual: the base's logits appended
    return MaskDenoiser(feature_channels=channels, num_classes=num_states(cfg, num_classes), size=dn.size,
                        **mask._asdict(), embed_dim=dn.embed_dim, embed_trainable=dn.embed_trainable,
                        dropout=dn.dropout, residual=dn.residual, out_dim=dn.out_dim, time_input=dn.time_input,
                        steps=cfg.diffusion.steps)


def build_codec(cfg: Config) -> ResizeCodec:
    return ResizeCodec(cfg.denoiser.mask_scale, state_offset=int(cfg.diffusion.ignore_state))
