"""Evaluation of a refiner: metrics of the base's own prediction and of every refinement step, in one pass,
plus the mask-reliance diagnostic.

Mask reliance (does the denoiser read its mask input at all?), last-step mIoU when the denoiser is fed
(a) its own trajectory (normal inference), (b) the ground truth re-noised at a small t (an oracle mask,
one call), (c) a fresh random mask from q(x_T) at every step. (b) ≈ (c) means the mask input is ignored:
the "prior" is then only a decode head on the features.
"""
from __future__ import annotations

import torch

from ddps.config import Config
from ddps.diffusion.process import NoiseProcess
from ddps.engine.features import FeatureCache, conditioning
from ddps.metrics import SegMetrics
from ddps.refiner.codecs import ResizeCodec
from ddps.refiner.sampler import refine


def oracle_input(process: NoiseProcess, batch, codec: ResizeCodec, t: int, ignore_index: int,
                 generator=None) -> torch.Tensor:
    """The ground truth at the mask size (ignore pixels: the base's guess), re-noised to time t."""
    gt = codec.encode(batch.labels)
    gt = torch.where(gt == ignore_index, batch.base_pred, gt)
    B = gt.shape[0]
    t_batch = torch.full((B,), t, dtype=torch.long, device=gt.device)
    return process.q_sample_labels(gt, t_batch, generator=generator)


@torch.no_grad()
def evaluate_refiner(denoiser, process, cache: FeatureCache, cfg: Config, *, num_classes: int,
                     ignore_index: int, steps: int | None = None, renoise: str | None = None,
                     cfg_scale: float | None = None, reliance: bool = False, device="cpu",
                     batch_size: int | None = None, head: bool = False) -> dict:
    """{'initial': scores, 'steps': [scores per step], 'times': [...], 'reliance': {...}} over ``cache``.

    Scores are SegMetrics.compute() dicts (mIoU, aAcc, IoU, mBIoU, BIoU) at the label resolution. ``head``:
    the UNet-as-head baseline, one call without a mask.
    """
    ic = cfg.infer
    steps = steps or ic.steps
    renoise = renoise or ic.renoise
    cfg_scale = ic.cfg_scale if cfg_scale is None else cfg_scale
    codec = ResizeCodec(cfg.denoiser.mask_scale)
    batch_size = batch_size or cfg.eval.batch_size
    generator = torch.Generator().manual_seed(ic.seed)
    was_training = denoiser.training
    denoiser.eval()
    initial = SegMetrics(num_classes, ignore_index)
    per_step: list[SegMetrics] = []
    extra = {name: SegMetrics(num_classes, ignore_index) for name in (("oracle", "random") if reliance else ())}
    times: list[int] = []
    limit = len(cache) if not cfg.eval.max_images else min(len(cache), cfg.eval.max_images)
    oracle_t = ic.oracle_t or max(1, process.steps // 10)
    for start in range(0, limit, batch_size):
        batch = conditioning(cache.batch(torch.arange(start, min(start + batch_size, limit)), device),
                             cfg.denoiser.residual)
        size = batch.labels.shape[-2:]
        initial.update(codec.decode(batch.base_logits, size).argmax(1), batch.labels)
        if head:
            trajectory_logits, times = [denoiser(batch.features)], [0]
        else:
            traj = refine(denoiser, process, batch.features, steps, renoise, cfg_scale, generator)
            trajectory_logits, times = traj.logits, traj.times
        if not per_step:
            per_step = [SegMetrics(num_classes, ignore_index) for _ in trajectory_logits]
        for metrics, logits in zip(per_step, trajectory_logits):
            metrics.update(codec.decode(logits, size).argmax(1), batch.labels)
        if reliance and not head:
            x = oracle_input(process, batch, codec, oracle_t, ignore_index, generator)
            t = torch.full((len(x),), oracle_t, dtype=torch.long, device=x.device)
            extra["oracle"].update(codec.decode(denoiser(batch.features, x, t), size).argmax(1), batch.labels)
            fresh = refine(denoiser, process, batch.features, steps, "fresh", cfg_scale, generator)
            extra["random"].update(codec.decode(fresh.final, size).argmax(1), batch.labels)
    denoiser.train(was_training)
    result = {"initial": initial.compute(), "steps": [m.compute() for m in per_step], "times": times,
              "images": limit}
    if reliance and not head:
        result["reliance"] = {"own": result["steps"][-1]["mIoU"], "oracle": extra["oracle"].compute()["mIoU"],
                              "random": extra["random"].compute()["mIoU"], "oracle_t": oracle_t}
    return result


@torch.no_grad()
def trajectory_examples(denoiser, process, base, dataset, indices, cfg: Config, device="cpu") -> list[dict]:
    """For a few fixed images: the raw image, ground truth, base mask and the mask after every step, plus the
    base's and every step's class probabilities (what the report's strips and probability files show)."""
    from ddps.engine.features import base_batch, conditioning
    codec = ResizeCodec(cfg.denoiser.mask_scale)
    generator = torch.Generator().manual_seed(cfg.infer.seed)
    out = []
    for i in indices:
        rgb, label, _ = dataset.read(i)
        item = dataset[i]
        batch = conditioning(base_batch(base, item["image"][None].to(device), item["mask"][None].long().to(device),
                                        codec), cfg.denoiser.residual)
        size = item["mask"].shape[-2:]
        base_probs = codec.decode(batch.base_logits, size).softmax(1)[0]
        if cfg.denoiser.method == "head":
            steps = [denoiser(batch.features)]
        else:
            steps = refine(denoiser, process, batch.features, cfg.infer.steps, cfg.infer.renoise,
                           cfg.infer.cfg_scale, generator).logits
        step_probs = [codec.decode(l, size).softmax(1)[0] for l in steps]
        out.append({"index": i, "image": rgb, "label": label, "base_probs": base_probs.cpu().numpy(),
                    "step_probs": [p.cpu().numpy() for p in step_probs]})
    return out


def _scaled_size(x: torch.Tensor, scale: float, multiple: int) -> tuple[int, int]:
    """(H, W) x scale, rounded to the multiple the denoiser's down-sampling needs (at least one multiple)."""
    return tuple(max(multiple, int(round(side * scale / multiple)) * multiple) for side in x.shape[-2:])


@torch.no_grad()
def evaluate_refiner_multiscale(denoiser, process, base, dataset, cfg: Config, *, head: bool = False,
                                device="cpu") -> dict:
    """The multi-scale + flip test of base and refiner (the 'ms' column of Tables 1, 2 and 4): at each of
    ``eval.scales`` (and its mirror image when ``eval.flip``) the base runs and the refiner refines from its
    features; the class probabilities of the base and of the last step are averaged over the copies at the
    label resolution, then scored. {'base': scores, 'last': scores} (SegMetrics.compute() dicts)."""
    import torch.nn.functional as F

    from ddps.engine.evaluate import eval_loader
    from ddps.engine.features import base_batch
    codec = ResizeCodec(cfg.denoiser.mask_scale)
    multiple = 4 * cfg.denoiser.mask_scale  # the UNet halves the mask twice
    generator = torch.Generator().manual_seed(cfg.infer.seed)
    scores = {"base": SegMetrics(dataset.num_classes, dataset.ignore_index),
              "last": SegMetrics(dataset.num_classes, dataset.ignore_index)}
    was_training = denoiser.training
    denoiser.eval()
    for batch in (b for batches in eval_loader(dataset, cfg.eval) for b in batches):
        x, label = batch["image"].to(device), batch["mask"].to(device)
        size = label.shape[-2:]
        probs = {"base": 0.0, "last": 0.0}
        copies = 0
        for scale in cfg.eval.scales:
            xs = F.interpolate(x, size=_scaled_size(x, scale, multiple), mode="bilinear", align_corners=False)
            for flipped in ((False, True) if cfg.eval.flip else (False,)):
                xi = xs.flip(-1) if flipped else xs
                b = conditioning(base_batch(base, xi, None, codec), cfg.denoiser.residual)
                if head:
                    last = denoiser(b.features)
                else:
                    last = refine(denoiser, process, b.features, cfg.infer.steps, cfg.infer.renoise,
                                  cfg.infer.cfg_scale, generator).logits[-1]
                for name, logits in (("base", b.base_logits), ("last", last)):
                    logits = logits.flip(-1) if flipped else logits
                    logits = F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=False)
                    probs[name] = probs[name] + logits.softmax(1)
                copies += 1
        for name in scores:
            scores[name].update((probs[name] / copies).argmax(1), label)
    denoiser.train(was_training)
    return {name: m.compute() for name, m in scores.items()}
