"""Published weights for base segmentors: smp's ImageNet encoders by name, and whole bases to import.

Two config keys (``ddps.config.schema.BaseConfig``):

- ``base.encoder_weights=imagenet``: the encoder starts from smp's ImageNet weights. smp 0.6 keeps them on
  the Hugging Face Hub, one repo per encoder at a pinned revision (``smp-hub/mit_b2.imagenet`` at the
  commit its ``pretrained_settings`` names); they are fetched (or found in the local Hub cache) with
  huggingface_hub and loaded by the encoder's own ``load_state_dict`` (which drops the ImageNet classifier).
- ``base.pretrained``: a whole trained base instead of training one —

  ===========================  =========================================================================
  ``owner/name`` (not a path)  an smp-hub model, ``smp.from_pretrained(name)`` (config.json + weights)
  a folder                     written by smp's ``model.save_pretrained(folder)``
  a ``*.pth`` file             an MMSegmentation checkpoint: ``ddps.segmentors.mmseg.base_from_mmseg_file``
  a ``*.pt`` file              a ddps base checkpoint (e.g. the base ``ddps import official`` writes)
  ===========================  =========================================================================

  :func:`load_pretrained` turns each into a :class:`BaseSegmentor` (logits and features at 1/4; the
  feature channels are the loaded model's, not ``base.feature_channels``).

Before any compute, :func:`check_weights` makes sure what a config names is at hand: offline
(``HF_HUB_OFFLINE=1``), a Hub file missing from the local cache is one line saying what to fetch; online
it is fetched into the cache at once (so the workers find it there); a missing local folder or file is one
line naming the path. :func:`source_identity` is what an imported base's content hash covers: the smp-hub
name, or the sha256 of the local files' bytes.

Nothing here imports ray or mlflow (core layer).
"""
from __future__ import annotations

import hashlib
import inspect
import json
import os
import re
from functools import lru_cache
from pathlib import Path

import segmentation_models_pytorch as smp
from torch import nn

from ddps.config.choices import BACKBONES
from ddps.errors import CheckpointError, ConfigError, choices, reason
from ddps.segmentors.base import _CHANNELS_KWARG, ARCHITECTURES, BaseSegmentor, SegmentorSpec, check_state
from ddps.segmentors.checkpoint import base_from_payload, read_checkpoint
from ddps.segmentors.mmseg import base_from_mmseg_file
from ddps.storage import Location, StoragePath, is_uri, location

IMAGENET = "imagenet"
HUB, FOLDER, MMSEG, DDPS = "smp-hub", "folder", "mmseg", "ddps"  # the kinds of base.pretrained (source_kind)
CONFIG_FILE = "config.json"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # what PyTorchModelHubMixin loads, in its order
HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # a Hub repo id: owner/name
_HEAD = "segmentation_head.0."  # smp's 1x1 classifier inside its segmentation head: ddps's `classifier`
# smp config keys ddps sets itself, or that act after the logits (the head's upsampling and activation: ddps
# takes the logits at 1/4 and upsamples them itself); every other one must keep the default ddps builds with
_OWN_KEYS = {"encoder_name", "encoder_weights", "classes", "_model_class", "upsampling", "activation"}


# ---- the Hugging Face Hub -------------------------------------------------------------------------

def hub_offline() -> bool:
    """HF_HUB_OFFLINE as huggingface_hub read it at import, or as the environment says now."""
    from huggingface_hub import constants
    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}


def hub_cache() -> str:
    """The local Hub cache huggingface_hub reads and writes (HF_HUB_CACHE, else $HF_HOME/hub)."""
    from huggingface_hub import constants
    return str(constants.HF_HUB_CACHE)


def _cached(repo_id: str, filename: str, revision: str | None) -> str | None:
    from huggingface_hub import try_to_load_from_cache
    found = try_to_load_from_cache(repo_id, filename, revision=revision)
    return found if isinstance(found, str) else None


def _fetch_command(repo_id: str, revision: str | None) -> str:
    at = f" --revision {revision}" if revision else ""
    return f"`hf download {repo_id}{at}` (or `huggingface-cli download {repo_id}{at}`)"


def ensure_hub_files(repo_id: str, files: tuple[tuple[str, ...], ...], revision: str | None, what: str,
                     instead: str) -> None:
    """Make sure one file of each group in ``files`` is in the local Hub cache: found there, or (online)
    fetched now. Offline, or when the fetch fails, one ConfigError saying what to fetch and where.

    ``what`` names the config value (``base.pretrained=...``); ``instead`` the local alternative."""
    missing = [group for group in files if not any(_cached(repo_id, f, revision) for f in group)]
    if not missing:
        return
    fetch = (f"fetch it with {_fetch_command(repo_id, revision)} on a machine with internet (into its "
             f"Hugging Face cache, then copy that cache here), or {instead}")
    if hub_offline():
        raise ConfigError(f"{what} is not in the Hugging Face cache ({hub_cache()}) and the Hub is offline "
                          f"(HF_HUB_OFFLINE=1): {fetch}")
    from huggingface_hub import hf_hub_download
    for group in missing:
        error = None
        for filename in group:  # the first of the group the repo has
            try:
                hf_hub_download(repo_id, filename, revision=revision)
                error = None
                break
            except Exception as e:  # not found, no network, refused: all one line
                error = error or e
        if error is not None:
            raise ConfigError(f"{what} is not in the Hugging Face cache ({hub_cache()}) and could not be fetched "
                              f"({reason(error)}): {fetch}") from None


def _hub_errors(what: str, repo_id: str, revision: str | None, instead: str):
    """A context manager turning huggingface_hub's errors while loading into one ConfigError."""
    import contextlib

    @contextlib.contextmanager
    def translate():
        try:
            yield
        except (ConfigError, CheckpointError):
            raise
        except Exception as e:
            from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
            if isinstance(e, (LocalEntryNotFoundError, HfHubHTTPError, OSError)):
                raise ConfigError(f"{what}: cannot load {repo_id} from the Hugging Face Hub or its cache "
                                  f"({hub_cache()}) ({reason(e)}): fetch it with {_fetch_command(repo_id, revision)}"
                                  f" on a machine with internet, or {instead}") from None
            raise
    return translate()


# ---- base.encoder_weights=imagenet ---------------------------------------------------------------

def imagenet_source(backbone: str) -> tuple[str, str]:
    """(repo id, pinned revision) of smp's ImageNet weights for ``backbone`` (from its pretrained_settings)."""
    settings = smp.encoders.encoders.get(backbone, {}).get("pretrained_settings", {})
    if IMAGENET not in settings:
        raise ConfigError(f"base.encoder_weights=imagenet: smp has no ImageNet weights for {backbone!r} "
                          f"(it has: {choices(settings) or 'none'})")
    return settings[IMAGENET]["repo_id"], settings[IMAGENET]["revision"]


def _imagenet_what(backbone: str, repo_id: str, revision: str) -> str:
    return f"base.encoder_weights=imagenet ({backbone}: {repo_id} at revision {revision[:12]})"


_IMAGENET_INSTEAD = "set base.encoder_weights to a local state-dict file of the encoder"


def imagenet_state(backbone: str) -> dict:
    """smp's ImageNet state dict of ``backbone``'s encoder, as smp fetches it (config.json, model.safetensors at
    the pinned revision), from the local Hub cache or the Hub."""
    from huggingface_hub import hf_hub_download
    from safetensors.torch import load_file
    repo_id, revision = imagenet_source(backbone)
    with _hub_errors(_imagenet_what(backbone, repo_id, revision), repo_id, revision, _IMAGENET_INSTEAD):
        hf_hub_download(repo_id, filename=CONFIG_FILE, revision=revision)
        path = hf_hub_download(repo_id, filename=WEIGHT_FILES[0], revision=revision)
    try:
        return load_file(path, device="cpu")
    except Exception as e:
        raise CheckpointError(f"ImageNet weights of {backbone} in {path} cannot be read ({reason(e)})") from None


def load_imagenet_encoder(encoder: nn.Module, backbone: str) -> None:
    """Load smp's ImageNet weights into ``encoder`` through its own load_state_dict (strict; it drops the
    ImageNet classifier), as ``smp.encoders.get_encoder(backbone, weights='imagenet')`` does."""
    state = imagenet_state(backbone)
    try:
        encoder.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"smp's ImageNet weights of {backbone} do not fit its encoder "
                              f"({reason(e)})") from None


# ---- base.pretrained: what it names ---------------------------------------------------------------

def source_kind(value: str) -> str:
    """HUB (an smp-hub name, owner/name, not an existing path), FOLDER (a save_pretrained folder), MMSEG
    (a *.pth file) or DDPS (a *.pt file: a ddps base checkpoint, also in the storage: s3://…/x-base.pt?…)."""
    name = value.split("?")[0] if is_uri(value) else value
    if name.endswith(".pth"):
        return MMSEG
    if name.endswith(".pt"):
        return DDPS
    if Path(value).expanduser().exists() or not HUB_NAME.fullmatch(value):
        return FOLDER
    return HUB


def _weights_file(folder: Path) -> Path | None:
    return next((folder / f for f in WEIGHT_FILES if (folder / f).is_file()), None)


def check_local(value: str) -> Location:
    """The local folder or file ``base.pretrained`` names, or a ddps base checkpoint in the storage (a URI, as
    ``ddps import official --out s3://…`` writes); one line naming the path when it is not there."""
    if is_uri(value):
        if source_kind(value) != DDPS:
            raise CheckpointError(f"base.pretrained={value}: from a bucket only a ddps base checkpoint (*.pt) is "
                                  f"read; copy MMSegmentation files and smp folders to a local disk")
        path = location(value)
        if not path.is_file():
            raise CheckpointError(f"base.pretrained={value}: no such ddps base checkpoint in the storage")
        return path
    path = Path(value).expanduser()
    if source_kind(value) in (MMSEG, DDPS):
        if not path.is_file():
            what = "MMSegmentation" if source_kind(value) == MMSEG else "ddps base"
            raise CheckpointError(f"base.pretrained={value}: no such {what} checkpoint file ({path.absolute()})")
        return path
    if not path.exists():
        raise CheckpointError(f"base.pretrained={value}: no such folder ({path.absolute()}); give a folder written "
                              f"by smp's save_pretrained, an smp-hub name (owner/name), an MMSegmentation .pth file "
                              f"or a ddps base checkpoint (.pt)")
    if not path.is_dir():
        raise CheckpointError(f"base.pretrained={value} is a file but neither an MMSegmentation checkpoint (*.pth) "
                              f"nor a ddps base checkpoint (*.pt); give a folder written by smp's save_pretrained")
    if not (path / CONFIG_FILE).is_file() or _weights_file(path) is None:
        raise CheckpointError(f"base.pretrained={value}: {path.absolute()} is not a folder written by smp's "
                              f"save_pretrained (it needs {CONFIG_FILE} and {' or '.join(WEIGHT_FILES)})")
    return path


_PRETRAINED_INSTEAD = "set base.pretrained to a local folder written by smp's save_pretrained"


def check_weights(base) -> None:
    """Before any compute: what ``base`` (a BaseConfig) names is at hand (see the module's docstring)."""
    if base.pretrained:
        if source_kind(base.pretrained) == HUB:
            ensure_hub_files(base.pretrained, ((CONFIG_FILE,), WEIGHT_FILES), None, f"base.pretrained={base.pretrained}",
                             _PRETRAINED_INSTEAD)
        else:
            check_local(base.pretrained)
        return  # an imported base: base.encoder_weights is not used
    if base.encoder_weights == IMAGENET:
        repo_id, revision = imagenet_source(base.backbone)
        ensure_hub_files(repo_id, ((CONFIG_FILE,), (WEIGHT_FILES[0],)), revision,
                         _imagenet_what(base.backbone, repo_id, revision), _IMAGENET_INSTEAD)
    elif base.encoder_weights and not Path(base.encoder_weights).expanduser().is_file():
        raise CheckpointError(f"base.encoder_weights={base.encoder_weights}: no such file "
                              f"({Path(base.encoder_weights).expanduser().absolute()}); give a state-dict file of the "
                              f"{base.backbone} encoder, or imagenet")


@lru_cache(maxsize=32)
def _files_sha256(files: tuple[tuple[str, str, int, int], ...]) -> str:
    """sha256 over (name, bytes) of each file; keyed by (name, path, size, mtime) so each is read once."""
    digest = hashlib.sha256()
    for name, path, _, _ in files:
        digest.update(name.encode() + b"\0")
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def source_identity(value: str) -> str:
    """What an imported base is, for its content hash: ``smp-hub:<name>``, or ``sha256:<hex>`` of the local
    file's bytes (an MMSegmentation .pth) or of the folder's config.json and weights file."""
    kind = source_kind(value)
    if kind == HUB:
        return f"{HUB}:{value}"
    path = check_local(value)
    if isinstance(path, StoragePath):  # as a local copy of the same file would hash: its name, then its bytes
        return "sha256:" + hashlib.sha256(path.name.encode() + b"\0" + path.read_bytes()).hexdigest()
    chosen = [path] if kind in (MMSEG, DDPS) else [path / CONFIG_FILE, _weights_file(path)]
    stats = tuple((p.name, str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in chosen)
    return f"sha256:{_files_sha256(stats)}"


# ---- base.pretrained: loading ---------------------------------------------------------------------

def _plain(value):
    """Tuples as lists, recursively: a config read back from JSON compares equal to the defaults."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def base_from_smp(model: nn.Module, num_classes: int | None = None, where: str = "the smp model") -> BaseSegmentor:
    """An smp model (one ddps supports: ARCHITECTURES, with a backbone of BACKBONES) as a ddps BaseSegmentor with
    the very same weights: encoder, decoder, and the segmentation head's 1x1 conv as the classifier. Its feature
    channels are the model's decoder width. One-line errors for anything ddps would build differently."""
    arch = next((name for name, cls in ARCHITECTURES.items() if type(model) is cls), None)
    if arch is None:
        smp_names = ", ".join(f"{cls.__name__} ({name})" for name, cls in ARCHITECTURES.items())
        raise ConfigError(f"{where} is an smp {type(model).__name__}; ddps's bases are: {smp_names}")
    config = dict(getattr(model, "config", None) or {})
    backbone = config.get("encoder_name")
    if backbone not in BACKBONES[arch]:
        raise ConfigError(f"{where} is a {arch} with backbone {backbone!r}; ddps's {arch} takes: "
                          f"{', '.join(BACKBONES[arch])}")
    channels_key = _CHANNELS_KWARG[arch]
    defaults = {name: p.default for name, p in inspect.signature(type(model).__init__).parameters.items()
                if p.default is not inspect.Parameter.empty}
    for key, value in config.items():
        if key in _OWN_KEYS or key == channels_key or key not in defaults:
            continue
        if _plain(value) != _plain(defaults[key]):
            raise ConfigError(f"{where} sets {key}={value!r}; ddps builds its {arch} with {key}={defaults[key]!r}")
    classes = config.get("classes")
    if num_classes is not None and classes != num_classes:
        raise CheckpointError(f"{where} predicts {classes} classes but the dataset has {num_classes}")
    spec = SegmentorSpec(arch, backbone, int(classes),
                         feature_channels=int(config.get(channels_key, defaults.get(channels_key))))
    base = BaseSegmentor(spec)
    state = {("classifier." + k[len(_HEAD):] if k.startswith(_HEAD) else k): v for k, v in model.state_dict().items()}
    check_state(base, state, where)
    base.load_state_dict(state)
    return base


def load_smp_pretrained(value: str) -> nn.Module:
    """``smp.from_pretrained`` of an smp-hub name or a save_pretrained folder, on the CPU, without fetching any
    ImageNet encoder weights its config may name (the saved weights replace them)."""
    kind = source_kind(value)
    name = value if kind == HUB else str(check_local(value))
    what = f"base.pretrained={value}"
    if kind == HUB:
        with _hub_errors(what, value, None, _PRETRAINED_INSTEAD):
            return smp.from_pretrained(name, encoder_weights=None)
    try:
        return smp.from_pretrained(name, encoder_weights=None)
    except (OSError, ValueError, KeyError, AttributeError, RuntimeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{what}: {name} cannot be loaded with smp.from_pretrained ({reason(e)})") from None


def load_pretrained(value: str, num_classes: int | None = None) -> BaseSegmentor:
    """The base ``base.pretrained`` names, as a BaseSegmentor (checked against ``num_classes`` when given)."""
    if source_kind(value) == MMSEG:
        return base_from_mmseg_file(check_local(value), num_classes=num_classes)
    if source_kind(value) == DDPS:
        path = check_local(value)
        return base_from_payload(read_checkpoint(path), path, num_classes)
    return base_from_smp(load_smp_pretrained(value), num_classes, where=f"base.pretrained={value}")
