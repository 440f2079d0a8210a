"""fashion-scenes: the embedded benchmark, real Fashion-MNIST photographs composed into scenes.

Each scene is a canvas with a smooth random colour background on which ``objects`` garments are pasted,
each scaled, flipped, tinted and placed at random; later garments occlude earlier ones. The label is
class + 1 where a garment's filled silhouette (pixels above a threshold, holes filled) is visible, 0 elsewhere.
Train scenes use only the 60k training photographs, val scenes only the 10k test photographs. With
``holdout_scenes`` > 0, a third split of scenes held out from training is composed from the last tenth of
the training photographs, which the train scenes then do not use: no garment photograph is shared between
train and holdout. Everything is drawn from one seed, so the same parameters give the same scenes, byte
for byte.

What it is not: natural scenes. Objects are small grey photographs, masks come from thresholding, and
there is no context between objects. It is a place where class confusions (T-shirt / shirt / pullover /
coat) and silhouettes are real, and where a mask prior has something to fix.
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from scipy import ndimage

from ddps.data import idx
from ddps.errors import DataError
from ddps.paths import cache_dir

GENERATOR_VERSION = 1
CLASS_NAMES = ("background",) + idx.CLASS_NAMES
SILHOUETTE_THRESHOLD = 12  # grey level (0..255) above which a resized photo pixel belongs to the garment
HOLDOUT_PHOTOS = 0.1       # share of the training photographs reserved for holdout scenes (when there are any)


@dataclass(frozen=True)
class SceneSpec:
    """Parameters of the composition; every field enters the cache key."""
    canvas: int = 64
    min_objects: int = 2
    max_objects: int = 4
    min_scale: float = 0.9  # object side = 28 px x scale
    max_scale: float = 1.6
    train_scenes: int = 8000
    val_scenes: int = 1000
    seed: int = 0
    holdout_scenes: int = 0

    def validate(self) -> None:
        if self.canvas < 32:
            raise DataError(f"fashion-scenes canvas={self.canvas} is too small; use 32 or more")
        if not 1 <= self.min_objects <= self.max_objects:
            raise DataError(f"fashion-scenes objects {self.min_objects}..{self.max_objects}: need 1 <= min <= max")
        if not 0 < self.min_scale <= self.max_scale or 28 * self.max_scale > self.canvas:
            raise DataError(f"fashion-scenes scale {self.min_scale}..{self.max_scale}: need 0 < min <= max "
                            f"and 28 x max <= canvas ({self.canvas})")
        if self.train_scenes < 1 or self.val_scenes < 1 or self.holdout_scenes < 0:
            raise DataError("fashion-scenes needs at least one train and one val scene (and holdout_scenes >= 0)")

    @property
    def splits(self) -> tuple[str, ...]:
        return ("train", "holdout", "val") if self.holdout_scenes else ("train", "val")


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A smooth random colour field plus fine noise, (size, size, 3) float32 in 0..255."""
    coarse = rng.uniform(0, 160, size=(3, 3, 3)).astype(np.float32)
    field = cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)
    field += rng.normal(0, 8, size=(size, size, 3)).astype(np.float32)
    return field


def _garment(rng: np.random.Generator, photo: np.ndarray, spec: SceneSpec) -> tuple[np.ndarray, np.ndarray]:
    """Scale, flip and tint one photo: returns (pixels (s, s, 3) float32, silhouette (s, s) bool)."""
    side = int(round(28 * rng.uniform(spec.min_scale, spec.max_scale)))
    grey = cv2.resize(photo, (side, side), interpolation=cv2.INTER_LINEAR)
    if rng.random() < 0.5:
        grey = grey[:, ::-1]
    silhouette = ndimage.binary_fill_holes(grey > SILHOUETTE_THRESHOLD)
    tint = rng.uniform(0.45, 1.0, size=3).astype(np.float32)
    pixels = grey.astype(np.float32)[..., None] * tint * rng.uniform(0.8, 1.15)
    return pixels, silhouette


def compose(photos: np.ndarray, labels: np.ndarray, count: int, spec: SceneSpec, seed: int
            ) -> tuple[np.ndarray, np.ndarray]:
    """Compose ``count`` scenes: images (N, S, S, 3) uint8 and masks (N, S, S) uint8 (0 = background)."""
    rng = np.random.default_rng(seed)
    size = spec.canvas
    images = np.empty((count, size, size, 3), np.uint8)
    masks = np.zeros((count, size, size), np.uint8)
    for n in range(count):
        canvas = _background(rng, size)
        mask = masks[n]
        for _ in range(rng.integers(spec.min_objects, spec.max_objects + 1)):
            k = rng.integers(len(photos))
            pixels, silhouette = _garment(rng, photos[k], spec)
            side = silhouette.shape[0]
            y, x = rng.integers(0, size - side + 1, size=2)
            window = (slice(y, y + side), slice(x, x + side))
            canvas[window][silhouette] = pixels[silhouette]
            mask[window][silhouette] = labels[k] + 1
        images[n] = np.clip(canvas, 0, 255).astype(np.uint8)
    return images, masks


def cache_key(spec: SceneSpec, data_root: str | os.PathLike | None = None) -> str:
    """sha256 of the generator version, the scene parameters and the source files' fingerprint."""
    payload = {"generator": GENERATOR_VERSION, "spec": spec.__dict__, "source": idx.fingerprint(data_root)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def build(spec: SceneSpec, data_root: str | os.PathLike | None = None, *, force: bool = False,
          folder: Path | None = None) -> Path:
    """Build the scenes once into a content-hashed .npz cache and return its path."""
    spec.validate()
    key = cache_key(spec, data_root)
    folder = folder or cache_dir("datasets")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"fashion-scenes-{key[:16]}.npz"
    if path.exists() and not force:
        if _readable(path, key, spec.splits):
            return path
        warnings.warn(f"fashion-scenes cache {path} is damaged; rebuilding it", stacklevel=2)
    train_photos, train_labels = idx.load_split("train", data_root)
    test_photos, test_labels = idx.load_split("test", data_root)
    arrays = {}
    if spec.holdout_scenes:
        cut = len(train_photos) - int(len(train_photos) * HOLDOUT_PHOTOS)
        arrays["holdout"] = compose(train_photos[cut:], train_labels[cut:], spec.holdout_scenes, spec,
                                    spec.seed * 2 + 7919)
        train_photos, train_labels = train_photos[:cut], train_labels[:cut]
    arrays["train"] = compose(train_photos, train_labels, spec.train_scenes, spec, spec.seed * 2)
    arrays["val"] = compose(test_photos, test_labels, spec.val_scenes, spec, spec.seed * 2 + 1)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}.npz")
    np.savez(tmp, key=np.array(key), **{f"{split}_{kind}": a for split, (images, masks) in arrays.items()
                                        for kind, a in (("images", images), ("masks", masks))})
    os.replace(tmp, path)  # never a partial file under the final name
    return path


def _readable(path: Path, key: str, splits: tuple[str, ...]) -> bool:
    try:
        with np.load(path) as archive:
            return str(archive["key"]) == key and all(
                f"{s}_{a}" in archive.files for s in splits for a in ("images", "masks"))
    except Exception:
        return False


def load(path: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images and masks of one split ('train', 'holdout' or 'val') from a built cache."""
    if split not in ("train", "holdout", "val"):
        raise DataError(f"fashion-scenes has no split {split!r}; choose from: train, holdout, val")
    try:
        with np.load(path) as archive:
            if f"{split}_images" not in archive.files:
                raise DataError(f"fashion-scenes cache {path} has no {split!r} split; set data.holdout > 0")
            return archive[f"{split}_images"], archive[f"{split}_masks"]
    except DataError:
        raise
    except Exception as e:  # OSError, KeyError, ValueError, zipfile.BadZipFile, zlib.error
        raise DataError(f"fashion-scenes cache {path} is unreadable ({e}); delete it to rebuild") from None


def spec_from(data_cfg) -> SceneSpec:
    """The scene parameters of a DataConfig."""
    d = data_cfg
    return SceneSpec(d.canvas, d.min_objects, d.max_objects, d.min_scale, d.max_scale, d.train_scenes,
                     d.val_scenes, d.scene_seed, d.holdout)


def summary(path: Path, spec: SceneSpec) -> str:
    """Counts and per-class pixel shares of a built cache, as printed by ``ddps data build``."""
    lines = [f"fashion-scenes: {path}",
             f"canvas {spec.canvas}x{spec.canvas}, {spec.min_objects}-{spec.max_objects} objects of "
             f"{28 * spec.min_scale:.0f}-{28 * spec.max_scale:.0f} px, seed {spec.seed}"]
    shares = {}
    for split in spec.splits:
        images, masks = load(path, split)
        shares[split] = pixel_shares(masks)
        lines.append(f"{split}: {len(images)} scenes")
    lines.append(f"{'class':<14}" + "".join(f"{split + ' %':>11}" for split in spec.splits))
    for k, name in enumerate(CLASS_NAMES):
        lines.append(f"{name:<14}" + "".join(f"{100 * shares[split][k]:>11.2f}" for split in spec.splits))
    return "\n".join(lines)


def pixel_shares(masks: np.ndarray, num_classes: int = len(CLASS_NAMES)) -> np.ndarray:
    """Fraction of pixels per class, (num_classes,)."""
    counts = np.bincount(masks.ravel(), minlength=num_classes).astype(np.float64)
    return counts / counts.sum()
