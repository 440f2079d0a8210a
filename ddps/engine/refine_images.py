"""``ddps refine IMAGE...``: a trained refiner on a user's own images.

For each image: the refined mask as an indexed PNG (one palette colour per class, the class index as the
pixel value) and a trajectory strip, image | base | step 1 | ... | step K, as an RGB PNG with each tile's name
above it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from PIL import Image

from ddps.config import from_flat, parse_set
from ddps.data.datasets import read_image
from ddps.data.transforms import EvalTransform
from ddps.engine.device import autocast
from ddps.engine.evaluate_refiner import class_trajectory, generator_on
from ddps.engine.features import base_batch, conditioning
from ddps.refiner.build import build_codec
from ddps.refiner.checkpoint import load_refiner
from ddps.segmentors.checkpoint import read_checkpoint


def palette(num_classes: int) -> np.ndarray:
    """(K, 3) uint8 colours: black for class 0, then well-separated hues (deterministic)."""
    colours = [(0, 0, 0)]
    for k in range(1, num_classes):
        hue = (k * 0.618033988749895) % 1.0
        colours.append(tuple(int(255 * c) for c in _hsv(hue, 0.75, 0.95)))
    return np.array(colours[:num_classes], np.uint8)


def _hsv(h: float, s: float, v: float) -> tuple[float, float, float]:
    i, f = int(h * 6) % 6, h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    return [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]


def strip(image: np.ndarray, masks: list[np.ndarray], colours: np.ndarray, captions: list[str] | None = None,
          gap: int = 2) -> np.ndarray:
    """Side by side: the RGB image then each label map in colour, separated by white gaps; with ``captions``
    (one per tile), each tile's name on a white band above it."""
    tiles = [image] + [colours[m] for m in masks]
    h = image.shape[0]
    out = []
    for i, tile in enumerate(tiles):
        out.append(tile)
        if i + 1 < len(tiles):
            out.append(np.full((h, gap, 3), 255, np.uint8))
    row = np.concatenate(out, axis=1)
    return row if captions is None else _captioned(row, [t.shape[1] for t in tiles], captions, gap)


def step_captions(steps: int) -> list[str]:
    """``step 1`` ... ``step K``: what each refinement step's tile is called in a strip."""
    return [f"step {k}" for k in range(1, steps + 1)]


def _captioned(row: np.ndarray, widths: list[int], captions: list[str], gap: int) -> np.ndarray:
    """``row`` under a white band naming each tile (centred; the font scaled to the tiles, at least 9 px)."""
    from PIL import ImageDraw, ImageFont
    if len(captions) != len(widths):
        raise ValueError(f"{len(captions)} captions for {len(widths)} tiles")
    size = max(9, min(16, min(widths) // 6))
    font = ImageFont.load_default(size=size)
    band = Image.new("RGB", (row.shape[1], size + 6), (255, 255, 255))
    draw, x = ImageDraw.Draw(band), 0
    for width, caption in zip(widths, captions):
        draw.text((x + width / 2, 2), caption, fill=(0, 0, 0), font=font, anchor="ma")
        x += width + gap
    return np.concatenate([np.asarray(band), row], axis=0)


@torch.no_grad()
def refine_images(images: list[str | Path], checkpoint: str | Path, out: str | Path, steps: int | None = None,
                  seed: int = 0, device="cpu", overrides: Iterable[str] = ()) -> list[Path]:
    """Masks and refinement strips of ``images``, computed on ``device`` in eval.precision (its sampling noise
    drawn there, from ``seed``); ``overrides`` (section.key=value) change the checkpoint's infer.* / eval.* /
    data.test_resize settings."""
    payload = read_checkpoint(checkpoint)
    cfg = from_flat({**payload["config"], **parse_set(list(overrides))})
    denoiser, process, base, payload = load_refiner(checkpoint, use_ema=cfg.infer.ema, payload=payload)
    base, denoiser = base.to(device), denoiser.to(device)
    codec, transform = build_codec(cfg), EvalTransform(cfg.data)
    colours = palette(base.num_classes)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    generator = generator_on(device, seed)
    written = []
    for path in map(Path, images):
        rgb = read_image(path)
        x, _ = transform(rgb, np.zeros(rgb.shape[:2], np.uint8))
        label_size = rgb.shape[:2]
        labels = torch.zeros(1, *label_size, dtype=torch.long, device=device)
        with autocast(device, cfg.eval.precision, "eval.precision"):
            batch = conditioning(base_batch(base, x[None].to(device), labels, codec), cfg.denoiser.residual)
            trajectory, _ = class_trajectory(denoiser, process, batch.features, cfg, steps or cfg.infer.steps,
                                             cfg.denoiser.method == "head", generator)
        base_mask = codec.decode(batch.base_logits.float(), label_size).argmax(1)[0].cpu().numpy()
        masks = [codec.decode(logits.float(), label_size).argmax(1)[0].cpu().numpy() for logits in trajectory]
        mask_png = Image.fromarray(masks[-1].astype(np.uint8), mode="P")
        mask_png.putpalette(colours.reshape(-1).tolist())
        mask_path, strip_path = out / f"{path.stem}.png", out / f"{path.stem}-strip.png"
        mask_png.save(mask_path)
        captions = ["image", "base"] + step_captions(len(masks))
        Image.fromarray(strip(rgb, [base_mask] + masks, colours, captions)).save(strip_path)
        written += [mask_path, strip_path]
    return written
