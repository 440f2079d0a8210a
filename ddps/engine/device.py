"""Where the engine's work runs and in what precision: one place for every command and step.

- ``resolve_device(gpu)``: "cuda" for ``--gpu`` (one line when no CUDA device is visible), else "cpu";
- ``configure(device, tf32)``: TF32 for CUDA matmuls and convolutions (on unless turned off: ``--no-tf32``);
  ``setup(gpu, tf32)`` both, for a process that computes;
- ``autocast(device, precision)``: the context forward passes run in — fp32 as they are, bf16 / fp16 under
  ``torch.autocast`` on the device's type (losses, metrics and probabilities are computed in float32 from
  the outputs); bf16 on a GPU without it is one line naming fp16;
- ``grad_scaler(device, precision)``: the gradient scaler fp16 training needs (None for fp32 and bf16, whose
  exponent range is float32's);
- ``loader_options(device)`` / ``to_device(tensor, device)``: pinned host memory and non-blocking copies
  when the device is a GPU.

The precision values are the config's ``train_base.precision``, ``train.precision`` (refiner training and the
frozen base's features it reads) and ``eval.precision`` (evaluation, refinement, sampling).
"""
from __future__ import annotations

import contextlib

import torch

from ddps.config.schema import PRECISION_NAMES
from ddps.errors import ConfigError, DDPSError, choices

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
assert tuple(DTYPES) == PRECISION_NAMES


class DeviceError(DDPSError):
    """The device asked for is not there."""


def is_cuda(device) -> bool:
    return torch.device(device).type == "cuda"


def resolve_device(gpu: bool) -> str:
    """The device a process computes on: "cuda" with ``gpu`` (one GPU per process: the first visible one,
    which Ray Train and Ray Tune choose through CUDA_VISIBLE_DEVICES), else "cpu"."""
    if not gpu:
        return "cpu"
    if not torch.cuda.is_available():
        raise DeviceError("--gpu: no CUDA device is visible to this process (torch.cuda.is_available() is False; "
                          f"torch {torch.__version__}); drop --gpu to run on the CPU")
    return "cuda"


def configure(device, tf32: bool = True) -> None:
    """Process-wide settings of ``device``: TF32 matmuls and convolutions on CUDA (``tf32``)."""
    if is_cuda(device):
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32


def setup(gpu: bool, tf32: bool = True) -> str:
    """The device of a process that computes (a command, an evaluation task), configured: resolve_device, then
    configure."""
    device = resolve_device(gpu)
    configure(device, tf32)
    return device


def check_precision(precision: str, what: str = "precision") -> None:
    if precision not in DTYPES:
        raise ConfigError(f"{what}={precision!r} is not a valid choice; choose from: {choices(DTYPES)}")


def autocast(device, precision: str = "fp32", what: str = "precision"):
    """The context forward passes on ``device`` run in for ``precision`` (fp32 | bf16 | fp16)."""
    check_precision(precision, what)
    dtype = DTYPES[precision]
    if dtype is None:
        return contextlib.nullcontext()
    if dtype is torch.bfloat16 and is_cuda(device) and not _native_bf16(device):
        raise ConfigError(f"{what}=bf16: {torch.cuda.get_device_name(device)} has no bfloat16; "
                          f"set {what}=fp16 (with a gradient scaler) or fp32")
    return torch.autocast(torch.device(device).type, dtype=dtype)


def _native_bf16(device) -> bool:
    """Whether the GPU computes bfloat16 itself: compute capability 8.0 (Ampere) and later. (torch's
    is_bf16_supported() also says yes for older GPUs, which emulate it.)"""
    return torch.cuda.get_device_capability(torch.device(device)) >= (8, 0)


def grad_scaler(device, precision: str):
    """A gradient scaler for fp16 training on ``device`` (loss scaling against float16's narrow range); None
    for fp32 and bf16."""
    if precision != "fp16":
        return None
    return torch.amp.GradScaler(torch.device(device).type)


def backward_step(loss: torch.Tensor, scaler) -> None:
    """``loss.backward()``, scaled first when fp16 training has a scaler."""
    (scaler.scale(loss) if scaler is not None else loss).backward()


def optimizer_step(optimizer: torch.optim.Optimizer, scaler) -> None:
    """The optimiser's step; with a scaler, unscaled (skipped when a gradient overflowed) and the scale updated."""
    if scaler is None:
        optimizer.step()
        return
    scaler.step(optimizer)
    scaler.update()


def loader_options(device) -> dict:
    """DataLoader options for batches bound for ``device``: pinned host memory on a GPU."""
    return {"pin_memory": is_cuda(device)}


def to_device(tensor: torch.Tensor, device) -> torch.Tensor:
    """``tensor`` on ``device``; from pinned host memory to a GPU without blocking the host."""
    if is_cuda(device) and tensor.device.type == "cpu":
        if not tensor.is_pinned():
            tensor = tensor.pin_memory()
        return tensor.to(device, non_blocking=True)
    return tensor.to(device)
