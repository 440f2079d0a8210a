"""Import the official DDPS checkpoints (OpenGVLab/DDPS, Hugging Face Hub ``aaronb/DDPS-all``) as ddps checkpoints.

An official file is an mmcv checkpoint ``{"meta", "state_dict", "optimizer"}`` whose ``state_dict`` holds the
whole model: the frozen MMSegmentation SegFormer (``backbone.*`` in MMSeg's MiT layout and
``decode_head.convs`` / ``decode_head.fusion_conv``, the 256-channel features DDPS conditions on — the base's
own classifier ``decode_head.conv_seg`` is absent), the DDPS head (``decode_head.unet.*``, the frozen mask
embedding ``decode_head.embed``, the classifier ``decode_head.conv_seg_new``, the schedule's buffers
``decode_head.log_cumprod_at`` …) and the EMA hook's copies ``ema_<name with dots as _>``.

Which weights are which: the official EMA hook swaps the EMA weights into the model every evaluation interval
(16,000 iterations) before the checkpoint and evaluation hooks run, and swaps them back at the next
iteration, so a checkpoint saved then (every published one: they are saved at multiples of that interval)
holds the **EMA weights under the plain keys and the raw weights in ``ema_*``** (the official
``tools/convert_ema_model.py`` reads the raw ("origin") weights back from ``ema_*``). The import keeps both:
the plain keys become the refiner's ``ema`` state (used by default, ``infer.ema``), the ``ema_*`` copies its
raw ``model`` state (``--set infer.ema=false``).

What the import bridges (the official conventions, kept as configuration, not as a second model):
(a) their UNet's time input counts the other way (``denoiser.time_input=T-t``); (b) the ignore region is a
diffusion state and a logit (state 0; ``diffusion.ignore_state``: 151 states for ADE20K's 150 classes, 20 for
Cityscapes' 19); (c) the UNet's output width may differ from its base width (``denoiser.out_dim``);
(d) their inference appends a last call at t = 1 (``infer.times=official``); (e) test images padded to a
multiple of 16 (the ``mmseg-segformer`` base's pad multiple). Their UNet is the lucidrains-style UNet that
:mod:`ddps.denoiser.unet` re-implements; :func:`unet_key` renames its keys.

Only the SegFormer DDPS head's layout is public (the official repository holds the ADE20K SegFormer-B2
multi-step configuration: T = 100, UNet dim 256, mults (1, 1, 1), 272 input channels, 151 classes); sizes of
the other published SegFormer files are read from their tensors' shapes. The DeepLabV3+ DDPS files' head is
not public: they are refused in one line.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ddps.checkpoint_io import file_sha256, mmcv_state_dict, read_foreign_checkpoint, shape_of, write_checked
from ddps.config import resolve, to_flat
from ddps.data.classes import ADE20K, CITYSCAPES
from ddps.denoiser import UNET_SIZES
from ddps.diffusion.schedules import alpha_bar
from ddps.errors import CheckpointError
from ddps.refiner.build import build_denoiser, build_process
from ddps.refiner.checkpoint import refiner_payload
from ddps.segmentors.base import check_state
from ddps.segmentors.checkpoint import base_payload, read_checkpoint
from ddps.storage import location
from ddps.segmentors.mmseg import base_from_mmseg

HEAD = "decode_head."
UNET = HEAD + "unet."
SCHEDULE_BUFFERS = ("log_cumprod_at", "log_cumprod_bt", "log_at", "log_bt")
# what the number of diffusion states says about the dataset: (dataset, its classes' names)
DATASETS_BY_STATES = {len(ADE20K) + 1: ("ade20k", ADE20K), len(CITYSCAPES) + 1: ("cityscapes", CITYSCAPES)}

# their UNet's module names -> ours (ddps/denoiser/unet.py), applied in order to each key
_UNET_RENAMES = (
    (r"\.mlp\.1\.", ".time_proj.1."),           # ResnetBlock's time projection (SiLU, Linear)
    (r"\.block1\.proj\.", ".conv1."), (r"\.block1\.norm\.", ".norm1."),
    (r"\.block2\.proj\.", ".conv2."), (r"\.block2\.norm\.", ".norm2."),
    (r"\.fn\.norm\.g$", ".norm.gain"),           # Residual(PreNorm(LayerNorm g, fn)) -> PreNormResidual(norm, fn)
    (r"\.fn\.fn\.", ".fn."),
    (r"\.to_out\.1\.g$", ".to_out.1.gain"),      # the linear attention's output LayerNorm
    (r"^final_res_block\.", "final_block."),
)


def unet_key(key: str) -> str:
    """One key of their UNet (without the ``decode_head.unet.`` prefix) in ours."""
    out = key
    for pattern, replacement in _UNET_RENAMES:
        out = re.sub(pattern, replacement, out)
    return out


@dataclass(frozen=True)
class OfficialLayout:
    """What a DDPS SegFormer checkpoint's tensors say about the model that wrote it."""
    unet_size: str          # the named UNet size (ddps.denoiser.UNET_SIZES) with this dim and these mults
    out_dim: int            # the UNet's output width
    in_channels: int        # features + mask embedding
    embed_dim: int
    num_states: int         # the mask embedding's rows = the classifier's outputs (classes + the ignore state)
    steps: int              # T, from the schedule buffers
    dataset: str
    class_names: tuple[str, ...]

    @property
    def feature_channels(self) -> int:
        return self.in_channels - self.embed_dim


def _shape(state: dict, key: str, where: str) -> tuple[int, ...]:
    return shape_of(state, key, where, "an official DDPS SegFormer checkpoint")


def check_segformer_ddps(state: dict, where: str) -> None:
    """Refuse what is not a SegFormer DDPS model, in one line."""
    if not any(k.startswith(UNET) for k in state):
        raise CheckpointError(f"{where} has no DDPS head ({UNET}*): not an official DDPS checkpoint")
    if not any(k.startswith("backbone.layers.") for k in state) or f"{HEAD}fusion_conv.conv.weight" not in state:
        raise CheckpointError(f"{where} is a DDPS model on a base other than SegFormer (MiT backbone + SegFormer "
                              f"head): the layout of that DDPS head is not public (the official repository holds "
                              f"only the SegFormer configuration), so it cannot be imported")


def official_layout(state: dict, where: str, dataset: str | None = None) -> OfficialLayout:
    """Sizes of the DDPS head read from its tensors' shapes; one line when a size fits no named UNet."""
    check_segformer_ddps(state, where)
    dim, in_channels = _shape(state, UNET + "init_conv.weight", where)[:2]
    levels = sorted({int(k[len(UNET + "downs."):].split(".")[0]) for k in state if k.startswith(UNET + "downs.")})
    widths = [_shape(state, f"{UNET}downs.{level}.3.weight", where)[0] for level in levels]
    mults = tuple(w // dim for w in widths)
    size = next((name for name, spec in UNET_SIZES.items()
                 if spec["dim"] == dim and tuple(spec["dim_mults"]) == mults), None)
    if size is None:
        named = ", ".join(f"{n} = {s['dim']} {tuple(s['dim_mults'])}" for n, s in UNET_SIZES.items())
        raise CheckpointError(f"{where}: its UNet (dim {dim}, mults {mults}) is none of the named sizes {named}")
    num_states, embed_dim = _shape(state, HEAD + "embed.weight", where)
    out_dim = _shape(state, UNET + "final_conv.weight", where)[0]
    classifier = _shape(state, HEAD + "conv_seg_new.weight", where)
    if classifier[:2] != (num_states, out_dim):
        raise CheckpointError(f"{where}: its classifier {classifier} does not fit {num_states} states and a UNet "
                              f"output of {out_dim} channels")
    steps = _shape(state, HEAD + "log_at", where)[0]
    _check_schedule(state, steps, where)
    if dataset is None:
        if num_states not in DATASETS_BY_STATES:
            raise CheckpointError(f"{where}: {num_states} diffusion states fit no supported dataset: ade20k (151 = "
                                  f"150 classes + the ignore state) or cityscapes (20)")
        dataset, names = DATASETS_BY_STATES[num_states]
    else:
        names = {d: n for d, n in DATASETS_BY_STATES.values()}[dataset]
        if len(names) != num_states - 1:
            raise CheckpointError(f"{where}: {num_states} diffusion states are not {dataset}'s {len(names)} classes "
                                  f"+ the ignore state")
    return OfficialLayout(size, out_dim, in_channels, embed_dim, num_states, steps, dataset, tuple(names))


def _check_schedule(state: dict, steps: int, where: str) -> None:
    """Their linear schedule must be ours (alpha_bar_t at t = 1 .. T is their cumulative keep at n = t − 1)."""
    theirs = state[HEAD + "log_cumprod_at"].double().exp()[:steps].numpy()
    ours = alpha_bar("linear", steps)[1:]
    if not np.allclose(theirs, ours, rtol=1e-4, atol=1e-7):
        raise CheckpointError(f"{where}: its noise schedule is not the linear one (cosine or another is not "
                              f"supported by the import)")


# every key of an official SegFormer DDPS state dict, by prefix: what the import maps it to
KNOWN_PREFIXES = ("backbone.", HEAD + "convs.", HEAD + "fusion_conv.",            # the frozen base
                  UNET, HEAD + "embed.weight", HEAD + "conv_seg_new.",            # the DDPS head
                  *(HEAD + name for name in SCHEDULE_BUFFERS))                    # checked, then recomputed


def check_keys(state: dict, where: str) -> None:
    """A key the import cannot map stops it in one line (a layout it does not know)."""
    unknown = [k for k in state if not k.startswith(KNOWN_PREFIXES)]
    if unknown:
        raise CheckpointError(f"{where}: {len(unknown)} keys cannot be mapped (e.g. {unknown[0]}): not the layout "
                              f"of the official SegFormer DDPS checkpoints")


def split_ema(state: dict) -> tuple[dict, dict | None]:
    """(plain keys, the ``ema_*`` copies under the plain names) — None when the file has no EMA copies."""
    plain = {k: v for k, v in state.items() if not k.startswith("ema_")}
    copies = {k: state.get("ema_" + k.replace(".", "_")) for k in plain}
    if not any(v is not None for v in copies.values()):
        return plain, None
    return plain, {k: (v if v is not None else plain[k]) for k, v in copies.items()}


def denoiser_state(state: dict, where: str) -> dict:
    """The DDPS head's tensors as ddps's MaskDenoiser state dict (unet.*, embed.weight, classifier.*)."""
    out = {}
    for key, value in state.items():
        if key.startswith(UNET):
            out["unet." + unet_key(key[len(UNET):])] = value
        elif key == HEAD + "embed.weight":
            out["embed.weight"] = value
        elif key.startswith(HEAD + "conv_seg_new."):
            out["classifier." + key[len(HEAD + "conv_seg_new."):]] = value
    if not out:
        raise CheckpointError(f"{where} holds no DDPS head")
    return out


def base_state(state: dict, base_file_state: dict) -> tuple[dict, int]:
    """The MMSeg SegFormer state the base is built from: the DDPS file's frozen backbone and head convs (what
    DDPS conditioned on) and the base file's classifier; and how many shared tensors the two files differ in."""
    ours = {k: v for k, v in state.items()
            if k.startswith("backbone.") or k.startswith(HEAD + "convs.") or k.startswith(HEAD + "fusion_conv.")}
    differ = sum(1 for k, v in ours.items() if k in base_file_state and hasattr(v, "shape")
                 and (v.shape != base_file_state[k].shape or not torch.equal(v, base_file_state[k])))
    return {**ours, **{k: v for k, v in base_file_state.items() if k.startswith(HEAD + "conv_seg.")}}, differ


# the official ADE20K test is whole-image (its config); Cityscapes: MMSeg's SegFormer test, 1024 windows (inferred)
EVAL_MODES = {"ade20k": {"eval.mode": "whole"},
              "cityscapes": {"eval.mode": "slide", "eval.crop": 1024, "eval.stride": 768}}


def refiner_overrides(layout: OfficialLayout, backbone: str) -> dict:
    """The flat config of an imported model, over the ``paper`` preset: the official conventions (a)–(e)."""
    data = {"data.dataset": layout.dataset, "data.reduce_zero_label": layout.dataset == "ade20k"}
    if layout.dataset == "cityscapes":  # MMSeg's Cityscapes test (inferred: no DDPS Cityscapes config is public)
        data.update({"data.resize": 1024, "data.crop": 1024, "data.test_resize": 1024})
    return {
        **data,
        "base.arch": "mmseg-segformer", "base.backbone": backbone, "base.feature_channels": layout.feature_channels,
        "base.encoder_weights": "", "base.pretrained": "",
        **EVAL_MODES[layout.dataset],
        "denoiser.method": "ddps", "denoiser.size": layout.unet_size, "denoiser.out_dim": layout.out_dim,
        "denoiser.embed_dim": layout.embed_dim, "denoiser.embed_trainable": False, "denoiser.dropout": 0.1,
        "denoiser.mask_scale": 4, "denoiser.residual": False, "denoiser.time_input": "T-t",
        "diffusion.kind": "discrete", "diffusion.transition": "uniform", "diffusion.schedule": "linear",
        "diffusion.steps": layout.steps, "diffusion.ignore_state": True,
        "infer.steps": min(20, layout.steps), "infer.times": "official", "infer.renoise": "free",
        "infer.cfg_scale": 0.0, "infer.ema": True,
        "eval.precision": "fp32",  # as the official code evaluates (its published numbers); --set eval.precision=bf16
    }


def import_official(path: str | Path, base_file: str | Path | None, out: str | Path,
                    dataset: str | None = None, log=print) -> tuple[Path, Path]:
    """An official DDPS checkpoint -> (ddps base checkpoint, ddps refiner checkpoint) in folder ``out``: the base
    from the file's frozen SegFormer and ``base_file``'s classifier, the refiner (EMA and raw weights) under the
    official conventions (:func:`refiner_overrides`); both content-addressed by the two files' sha256."""
    path, out = Path(path), location(out)  # out: a folder, or one in the storage (a URI)
    if base_file is None:
        raise CheckpointError("an official DDPS checkpoint holds no classifier for its base (decode_head.conv_seg "
                              "is not saved with the DDPS head): pass --base with the MMSegmentation SegFormer "
                              "checkpoint it was trained on (MMSegmentation's model zoo, e.g. SegFormer mit-b2 "
                              "512x512 160k ADE20K)")
    state = mmcv_state_dict(read_foreign_checkpoint(path, "official DDPS checkpoint"), str(path))
    plain, raw = split_ema(state)
    layout = official_layout(plain, str(path), dataset)
    check_keys(plain, str(path))
    base_file = Path(base_file)
    base_file_state = mmcv_state_dict(read_foreign_checkpoint(base_file, "MMSegmentation base checkpoint"),
                                      str(base_file))
    if HEAD + "conv_seg.weight" not in base_file_state:
        raise CheckpointError(f"{base_file} has no decode_head.conv_seg: not an MMSegmentation SegFormer checkpoint")
    merged, differ = base_state(plain, base_file_state)
    base = base_from_mmseg(merged, f"{path} + {base_file}", num_classes=layout.num_states - 1,
                           feature_channels=layout.feature_channels)
    cfg = resolve("paper", None, refiner_overrides(layout, base.spec.backbone))
    flat = to_flat(cfg)
    source = {"file": path.name, "sha256": file_sha256(path), "base_file": base_file.name,
              "base_sha256": file_sha256(base_file)}
    base_hash = hashlib.sha256(f"official-base:{source['sha256']}:{source['base_sha256']}".encode()).hexdigest()
    b_payload = base_payload(base, config=flat, class_names=layout.class_names,
                             metrics={"imported_from": f"{source['file']} + {source['base_file']}"}, history=[],
                             content_hash=base_hash)

    process = build_process(cfg, len(layout.class_names))
    denoiser = build_denoiser(cfg, len(layout.class_names), base.feature_channels, process)
    weights = {"ema": denoiser_state(plain, str(path)), "model": denoiser_state(raw, str(path)) if raw else None}
    for name, w in weights.items():
        if w is not None:
            check_state(denoiser, w, f"{path} ({'EMA' if name == 'ema' else 'raw'} weights, renamed)")
    denoiser.load_state_dict(weights["ema"])
    r_payload = refiner_payload(
        denoiser=denoiser, ema_state=weights["ema"] if raw else None, config=flat, base_payload=b_payload,
        stage="stage2", metrics={"imported_from": source["file"]}, history=[],
        content_hash=hashlib.sha256(f"official-refiner:{source['sha256']}:{source['base_sha256']}".encode()).hexdigest(),
        class_names=layout.class_names)
    if raw:
        r_payload["model"] = weights["model"]
    # as an imported base records it (engine/train_base.import_base): source, kind, identity; and the files
    b_payload["imported_from"] = r_payload["imported_from"] = {
        "source": f"{source['file']} + {source['base_file']}", "kind": "official",
        "identity": f"sha256:{source['sha256']}+{source['base_sha256']}", **source}
    base_path, refiner_path = out / f"{path.stem}-base.pt", out / f"{path.stem}-refiner.pt"
    for target, payload in ((base_path, b_payload), (refiner_path, r_payload)):
        if target.exists() and read_checkpoint(target).get("hash") != payload["hash"]:
            raise CheckpointError(f"{target} exists and holds another import (another file of the same name?): "
                                  f"choose another --out")
    write_checked(base_path, b_payload)
    write_checked(refiner_path, r_payload)
    log(f"imported {path.name}: {layout.dataset}, SegFormer {base.spec.backbone} base, UNet-{layout.unet_size} "
        f"(out {layout.out_dim}), T = {layout.steps}, {layout.num_states} states, "
        f"{'EMA + raw weights' if raw else 'one set of weights (no ema_* copies)'}")
    if differ:
        log(f"note: {base_file.name} differs from the DDPS file's frozen base in {differ} tensors; the DDPS file's "
            f"are used (what the refiner was trained on), the classifier comes from {base_file.name}")
    log(f"base:    {base_path}\nrefiner: {refiner_path}\nnext:    ddps eval {refiner_path} "
        f"--set data.root=<the {layout.dataset} folder>")
    return base_path, refiner_path


