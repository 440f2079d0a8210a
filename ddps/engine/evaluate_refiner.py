"""Evaluation of a refiner: one function, :func:`evaluate_refiner`, gives the typed record (engine/record.py)
that ``ddps eval``, the pipeline, the sweep's cells and the held-out checks during training all use — the
base's own prediction and every refinement step in one pass, and on request the mask-reliance diagnostic,
the multi-scale + flip test and a few fixed images' refinements (strips and probabilities).

Mask reliance (does the denoiser read its mask input at all?), last-step mIoU when the denoiser is fed
(a) its own trajectory (normal inference), (b) the ground truth re-noised at a small t (an oracle mask,
one call), (c) a fresh random mask from q(x_T) at every step. (b) ≈ (c) means the mask input is ignored:
the "prior" is then only a decode head on the features.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ddps import names
from ddps.config import Config
from ddps.diffusion.process import NoiseProcess
from ddps.engine.device import autocast, to_device
from ddps.engine.evaluate import eval_loader
from ddps.engine.features import FeatureCache, base_batch, conditioning
from ddps.engine.record import Evaluation, Example, Reliance, Scores
from ddps.metrics import SegMetrics
from ddps.refiner.build import build_codec
from ddps.refiner.codecs import ResizeCodec
from ddps.refiner.sampler import refine


def oracle_input(process: NoiseProcess, batch, codec: ResizeCodec, t: int, ignore_index: int,
                 generator=None) -> torch.Tensor:
    """The ground truth at the mask size (ignore pixels: the base's guess), re-noised to time t."""
    gt = codec.encode(batch.labels)
    gt = codec.states(torch.where(gt == ignore_index, batch.base_pred, gt))
    B = gt.shape[0]
    t_batch = torch.full((B,), t, dtype=torch.long, device=gt.device)
    return process.q_sample_labels(gt, t_batch, generator=generator)


@torch.no_grad()
def evaluate_refiner(denoiser, process, cache: FeatureCache | None, cfg: Config, *,
                     num_classes: int | None = None, ignore_index: int | None = None, steps: int | None = None,
                     reliance: bool = False, multiscale: bool = False, examples: Sequence[int] = (), base=None,
                     dataset=None, class_names: Sequence[str] | None = None, device="cpu",
                     precision: str | None = None, batch_size: int | None = None,
                     head: bool | None = None) -> Evaluation:
    """Evaluate ``denoiser`` on a split whose frozen-base features are ``cache``; the record of it.

    ``cache`` None: the ``dataset``'s images stream through the ``base`` in batches of eval.batch_size (of one
    size each: ADE20K's images differ), nothing kept beyond a batch. The ``dataset``'s classes, ignore index
    and class names are the defaults of ``num_classes``, ``ignore_index`` and ``class_names``.
    ``steps``: test steps (default infer.steps); ``reliance``: the mask-reliance diagnostic; ``multiscale``:
    the multi-scale + flip test and ``examples``: these images' refinements — both run the ``base`` over
    ``dataset`` (the split's images). Forward passes — the base's too — run on ``device`` in ``precision``
    (fp32 | bf16 | fp16; default eval.precision); the random draws come from a generator on ``device``;
    scores are computed in float32 at the label resolution. ``head``: the UNet-as-head baseline, one call
    without a mask (default: what cfg.denoiser.method says).
    """
    head = cfg.denoiser.method == "head" if head is None else head
    if (cache is None or multiscale or examples) and (base is None or dataset is None):  # images to run
        raise ValueError("without a feature cache, and for the multi-scale test and the examples, "
                         "evaluate_refiner needs the base and the dataset")
    precision = precision or cfg.eval.precision
    if dataset is None and (num_classes is None or ignore_index is None):
        raise ValueError("evaluate_refiner needs num_classes and ignore_index, or the dataset")
    num_classes = dataset.num_classes if num_classes is None else num_classes
    ignore_index = dataset.ignore_index if ignore_index is None else ignore_index
    if class_names is None:
        class_names = dataset.class_names if dataset is not None else ()
    was_training = denoiser.training
    denoiser.eval()
    with autocast(device, precision, "eval.precision"):
        images, batches = _batches(cache, base, dataset, cfg, device, batch_size or cfg.eval.batch_size)
        scores = _single_scale(denoiser, process, images, batches, cfg, num_classes, ignore_index,
                               steps or cfg.infer.steps, reliance and not head, head, device)
        ms = _multiscale(denoiser, process, base, dataset, cfg, head, device) if multiscale else None
        shown = _examples(denoiser, process, base, dataset, [i for i in examples if i < len(dataset)], cfg, head,
                          device)
    denoiser.train(was_training)
    return Evaluation(**scores, multiscale=ms, examples=shown, class_names=tuple(class_names))


def class_trajectory(denoiser, process, features, cfg: Config, steps: int, head: bool, generator,
                renoise: str | None = None) -> tuple[list[torch.Tensor], list[int]]:
    """Every step's class logits (B, K, h, w) and times; the UNet head: its one call at t = 0."""
    classes = build_codec(cfg).classes
    if head:
        return [classes(denoiser(features))], [0]
    traj = refine(denoiser, process, features, steps, renoise or cfg.infer.renoise, cfg.infer.cfg_scale, generator,
                  times=cfg.infer.times)
    return [classes(logits) for logits in traj.logits], traj.times


def _batches(cache: FeatureCache | None, base, dataset, cfg: Config, device, batch_size: int):
    """(images, the conditioned batches over them): from the feature cache, or the dataset's test images
    through the base (eval.max_images of either)."""
    residual = cfg.denoiser.residual
    if cache is not None:
        limit = len(cache) if not cfg.eval.max_images else min(len(cache), cfg.eval.max_images)
        return limit, (conditioning(cache.batch(torch.arange(start, min(start + batch_size, limit)), device), residual)
                       for start in range(0, limit, batch_size))
    codec = build_codec(cfg)
    loader = eval_loader(dataset, replace(cfg.eval, batch_size=batch_size), device)
    return len(loader.dataset), (
        conditioning(base_batch(base, to_device(group["image"], device), to_device(group["mask"], device).long(),
                                codec), residual)
        for groups in loader for group in groups)


def generator_on(device, seed: int) -> torch.Generator:
    """The random draws of a refinement, on the device that computes it (seeded: the same draws every run)."""
    return torch.Generator(device=device).manual_seed(seed)


def _single_scale(denoiser, process, images: int, batches, cfg, num_classes, ignore_index, steps, reliance, head,
                  device) -> dict:
    """The base, every step and (with ``reliance``) the diagnostic over the batches, in one pass. The
    diagnostic draws from a generator of its own: with or without it, the trajectory gets the same draws and
    scores the same (sharing one, the diagnostic's draws on a batch moved every later batch's)."""
    codec = build_codec(cfg)
    generator = generator_on(device, cfg.infer.seed)
    diagnostic = generator_on(device, cfg.infer.seed + 1) if reliance else None
    initial = SegMetrics(num_classes, ignore_index)
    per_step: list[SegMetrics] = []
    extra = {name: SegMetrics(num_classes, ignore_index) for name in (("oracle", "random") if reliance else ())}
    times: list[int] = []
    oracle_t = cfg.infer.oracle_t or max(1, process.steps // 10)
    for batch in batches:
        size = batch.labels.shape[-2:]
        initial.update(codec.decode(batch.base_logits.float(), size).argmax(1), batch.labels)
        trajectory, times = class_trajectory(denoiser, process, batch.features, cfg, steps, head, generator)
        if not per_step:
            per_step = [SegMetrics(num_classes, ignore_index) for _ in trajectory]
        for metrics, logits in zip(per_step, trajectory):
            metrics.update(codec.decode(logits.float(), size).argmax(1), batch.labels)
        if reliance:
            x = oracle_input(process, batch, codec, oracle_t, ignore_index, diagnostic)
            t = torch.full((len(x),), oracle_t, dtype=torch.long, device=x.device)
            oracle = codec.classes(denoiser(batch.features, x, t)).float()
            extra["oracle"].update(codec.decode(oracle, size).argmax(1), batch.labels)
            fresh, _ = class_trajectory(denoiser, process, batch.features, cfg, steps, head, diagnostic,
                                        renoise="fresh")
            extra["random"].update(codec.decode(fresh[-1].float(), size).argmax(1), batch.labels)
    step_scores = tuple(Scores.from_metrics(m.compute()) for m in per_step)
    found = None
    if reliance:
        found = Reliance(step_scores[-1].mIoU, extra["oracle"].compute()["mIoU"], extra["random"].compute()["mIoU"],
                         oracle_t)
    return {"images": images, "base": Scores.from_metrics(initial.compute()), "steps": step_scores,
            "times": tuple(times), "reliance": found}


def _examples(denoiser, process, base, dataset, indices: list[int], cfg: Config, head: bool,
              device) -> tuple[Example, ...]:
    """These images through the base and every refinement step: class probabilities at the label size."""
    codec = build_codec(cfg)
    generator = generator_on(device, cfg.infer.seed)
    out = []
    for index in indices:
        rgb, label, _ = dataset.read(index)
        item = dataset[index]
        batch = conditioning(base_batch(base, to_device(item["image"][None], device),
                                        to_device(item["mask"][None], device).long(), codec), cfg.denoiser.residual)
        size = item["mask"].shape[-2:]
        trajectory, _ = class_trajectory(denoiser, process, batch.features, cfg, cfg.infer.steps, head, generator)
        probs = [codec.decode(logits.float(), size).softmax(1)[0].cpu().numpy()
                 for logits in (batch.base_logits, *trajectory)]
        out.append(Example(index, rgb, label, probs[0], tuple(probs[1:])))
    return tuple(out)


def _scaled_size(x: torch.Tensor, scale: float, multiple: int) -> tuple[int, int]:
    """(H, W) x scale, rounded to the multiple the denoiser's down-sampling needs (at least one multiple)."""
    return tuple(max(multiple, int(round(side * scale / multiple)) * multiple) for side in x.shape[-2:])


def _multiscale(denoiser, process, base, dataset, cfg: Config, head: bool, device) -> dict[str, Scores]:
    """The multi-scale + flip test of base and refiner (the 'ms' column of Tables 1, 2 and 4): at each of
    ``eval.scales`` (and its mirror image when ``eval.flip``) the base runs and the refiner refines from its
    features; the class probabilities of the base and of the last step are averaged over the copies at the
    label resolution, then scored."""
    codec = build_codec(cfg)
    multiple = 4 * cfg.denoiser.mask_scale  # the UNet halves the mask twice
    generator = generator_on(device, cfg.infer.seed)
    scores = {"base": SegMetrics(dataset.num_classes, dataset.ignore_index),
              "last": SegMetrics(dataset.num_classes, dataset.ignore_index)}
    for batch in (b for batches in eval_loader(dataset, cfg.eval, device) for b in batches):
        x, label = to_device(batch["image"], device), to_device(batch["mask"], device)
        size = label.shape[-2:]
        probs = {"base": 0.0, "last": 0.0}
        copies = 0
        for scale in cfg.eval.scales:
            xs = F.interpolate(x, size=_scaled_size(x, scale, multiple), mode="bilinear", align_corners=False)
            for flipped in ((False, True) if cfg.eval.flip else (False,)):
                xi = xs.flip(-1) if flipped else xs
                b = conditioning(base_batch(base, xi, None, codec), cfg.denoiser.residual)
                last = class_trajectory(denoiser, process, b.features, cfg, cfg.infer.steps, head, generator)[0][-1]
                for name, logits in (("base", b.base_logits), ("last", last)):
                    logits = logits.flip(-1) if flipped else logits
                    logits = F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=False)
                    probs[name] = probs[name] + logits.softmax(1)
                copies += 1
        for name in scores:
            scores[name].update((probs[name] / copies).argmax(1), label)
    return {name: Scores.from_metrics(m.compute()) for name, m in scores.items()}


def save_examples(evaluation: Evaluation, folder: Path) -> list[tuple[Path, str | None]]:
    """The record's examples as files in ``folder``: a refinement strip per image (image, ground truth, base,
    each step, named above each tile; ignore pixels black) and the first image's probabilities (float16 .npz).
    [(file, artifact folder)]."""
    from PIL import Image

    from ddps.engine.refine_images import palette, step_captions, strip
    if not evaluation.examples:
        return []
    num_classes = evaluation.examples[0].base_probs.shape[0]
    colours, written = palette(num_classes), []
    for ex in evaluation.examples:
        masks = [ex.label, ex.base_probs.argmax(0)] + [p.argmax(0) for p in ex.step_probs]
        masks = [np.where(m >= num_classes, 0, m) for m in masks]
        path = folder / f"strip-{ex.index}.png"
        captions = ["image", "truth", "base"] + step_captions(len(ex.step_probs))
        Image.fromarray(strip(ex.image, masks, colours, captions)).save(path)
        written.append((path, names.ARTIFACT_STRIPS))
    first = evaluation.examples[0]
    path = folder / names.ARTIFACT_PROBABILITIES
    np.savez_compressed(path, image=first.image, label=first.label, class_names=np.array(evaluation.class_names),
                        base=first.base_probs.astype(np.float16), steps=np.stack(first.step_probs).astype(np.float16))
    return written + [(path, None)]
