"""Segmentation datasets: the embedded fashion-scenes, ADE20K, Cityscapes and a generic folder layout.

Every dataset yields {"image": (3, H, W) float32 normalised, "mask": (H, W) int64, "index": int} and knows
its class names and ignore index — except with training augmentation, whose items are uint8 crops of at most
the crop size, padded and normalised per batch by ``dataset.collate`` (transforms.TrainTransform). Reading
checks each file: a corrupt image or mask, an image/mask size mismatch or a label value that is neither a
class nor the ignore index raises a one-line DataError that names the file.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image
from torch.utils.data import Dataset, default_collate

from ddps.config import DataConfig
from ddps.data import classes, fashion_scenes
from ddps.data.transforms import EvalTransform, TrainTransform
from ddps.errors import DataError, choices, reason

SPLITS = ("train", "holdout", "val")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
Transform = Callable[[np.ndarray, np.ndarray], tuple]


def check_labels(mask: np.ndarray, num_classes: int, ignore_index: int, where: str) -> None:
    values = np.flatnonzero(np.bincount(mask.ravel(), minlength=256)) if mask.dtype == np.uint8 else np.unique(mask)
    bad = values[((values < 0) | (values >= num_classes)) & (values != ignore_index)]
    if len(bad):
        raise DataError(f"{where}: label value {int(bad[0])} is not a class (0..{num_classes - 1}) "
                        f"nor the ignore index {ignore_index}")


class SegmentationDataset(Dataset):
    """Base: subclasses implement ``__len__`` and ``read(i) -> (image (H, W, 3) uint8, mask (H, W), where)``."""

    def __init__(self, name: str, class_names: Sequence[str], ignore_index: int, transform: Transform):
        if 0 <= ignore_index < len(class_names):
            raise DataError(f"{name}: ignore index {ignore_index} is one of its {len(class_names)} classes "
                            f"(0..{len(class_names) - 1}); choose data.ignore_index >= {len(class_names)}")
        self.name = name
        self.class_names = tuple(class_names)
        self.ignore_index = ignore_index
        self.transform = transform

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def read(self, i: int) -> tuple[np.ndarray, np.ndarray, str]:
        raise NotImplementedError

    @property
    def collate(self) -> Callable[[list[dict]], dict]:
        """The DataLoader collate of these items: the training transform's (pad and normalise the batch),
        else torch's default (stack)."""
        return getattr(self.transform, "collate", None) or default_collate

    def tail(self, n: int) -> "SegmentationDataset":
        """The last ``n`` items as a dataset of the same kind (e.g. training scenes held out for tuning)."""
        return _Slice(self, range(len(self) - n, len(self)))

    def head(self, n: int) -> "SegmentationDataset":
        """The first ``n`` items."""
        return _Slice(self, range(min(n, len(self))))

    def __getitem__(self, i: int) -> dict:
        image, mask, where = self.read(i)
        if image.shape[:2] != mask.shape:
            raise DataError(f"{where}: image is {image.shape[1]}x{image.shape[0]} but mask is "
                            f"{mask.shape[1]}x{mask.shape[0]}")
        check_labels(mask, self.num_classes, self.ignore_index, where)
        image_t, mask_t = self.transform(image, mask)
        return {"image": image_t, "mask": mask_t, "index": i}


class _Slice(SegmentationDataset):
    def __init__(self, parent: SegmentationDataset, indices: range):
        super().__init__(parent.name, parent.class_names, parent.ignore_index, parent.transform)
        self.parent, self.indices = parent, indices

    def __len__(self) -> int:
        return len(self.indices)

    def read(self, i: int):
        return self.parent.read(self.indices[i])


class ArrayDataset(SegmentationDataset):
    """Scenes held in memory: images (N, H, W, 3) uint8, masks (N, H, W) uint8."""

    def __init__(self, name, images, masks, class_names, ignore_index, transform):
        super().__init__(name, class_names, ignore_index, transform)
        self.images, self.masks = images, masks

    def __len__(self) -> int:
        return len(self.images)

    def read(self, i):
        return self.images[i], self.masks[i], f"{self.name} scene {i}"


def read_image(path: str | Path) -> np.ndarray:
    """An image file as (H, W, 3) uint8 RGB; a one-line DataError naming the file when it is missing or
    cannot be read (datasets and ``ddps refine`` alike)."""
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except FileNotFoundError:
        raise DataError(f"image {path} does not exist") from None
    except Exception as e:  # PIL raises many kinds on broken files (OSError, SyntaxError, DecompressionBomb...)
        raise DataError(f"cannot read image {path}: {reason(e)}") from None


def read_mask(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as im:
            mode = im.mode
            if mode in ("L", "P", "I", "I;16", "1"):
                return np.asarray(im).astype(np.int64)
    except Exception as e:
        raise DataError(f"cannot read mask {path}: {reason(e)}") from None
    raise DataError(f"mask {path} has mode {mode}; expected a single-channel label image (L, P, I or 1)")


class FileDataset(SegmentationDataset):
    """(image file, mask file) pairs; ``reduce_zero_label`` maps 0 -> ignore and k -> k - 1 (ADE20K)."""

    def __init__(self, name, pairs, class_names, ignore_index, transform, reduce_zero_label=False):
        super().__init__(name, class_names, ignore_index, transform)
        if not pairs:
            raise DataError(f"{name}: no images found")
        self.pairs = pairs
        self.reduce_zero_label = reduce_zero_label

    def __len__(self) -> int:
        return len(self.pairs)

    def read(self, i):
        image_path, mask_path = self.pairs[i]
        image, mask = read_image(image_path), read_mask(mask_path)
        if self.reduce_zero_label:
            mask = np.where(mask == 0, self.ignore_index, mask - 1)
            mask[mask == self.ignore_index - 1] = self.ignore_index  # mmseg: 255 -> 254 -> back to 255
        return image, mask, str(mask_path)


def _require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise DataError(f"{what} folder {path} does not exist")
    return path


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def ade20k_pairs(root: Path, split: str) -> list[tuple[Path, Path]]:
    """ADEChallengeData2016/images/{training,validation}/*.jpg + annotations/.../*.png."""
    base = root / "ADEChallengeData2016" if (root / "ADEChallengeData2016").is_dir() else root
    sub = {"train": "training", "val": "validation"}[split]
    images = _require_dir(base / "images" / sub, "ADE20K images")
    annotations = _require_dir(base / "annotations" / sub, "ADE20K annotations")
    pairs = []
    for image in _images_in(images):
        mask = annotations / image.relative_to(images).with_suffix(".png")
        if not mask.is_file():
            raise DataError(f"ADE20K image {image} has no annotation {mask}")
        pairs.append((image, mask))
    return pairs


def cityscapes_pairs(root: Path, split: str) -> list[tuple[Path, Path]]:
    """leftImg8bit/{split}/<city>/<stem>_leftImg8bit.png + gtFine/{split}/<city>/<stem>_gtFine_labelTrainIds.png."""
    images = _require_dir(root / "leftImg8bit" / split, "Cityscapes leftImg8bit")
    labels = _require_dir(root / "gtFine" / split, "Cityscapes gtFine")
    pairs = []
    for image in sorted(images.rglob("*_leftImg8bit.png")):
        rel = image.relative_to(images)
        mask = labels / rel.parent / rel.name.replace("_leftImg8bit.png", "_gtFine_labelTrainIds.png")
        if not mask.is_file():
            raise DataError(f"Cityscapes image {image} has no label {mask} (run cityscapesscripts' "
                            f"createTrainIdLabelImgs first)")
        pairs.append((image, mask))
    return pairs


def _read_lines(path: Path, what: str) -> list[str]:
    """The non-empty lines of a UTF-8 text file; an unreadable one is a one-line DataError."""
    try:
        return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{what} {path} cannot be read as UTF-8 text: {reason(e)}") from None


def folder_pairs(root: Path, split: str) -> list[tuple[Path, Path]]:
    """images/<stem>.png|jpg + masks/<stem>.png; splits/<split>.txt lists the stems of a split (optional)."""
    images = _require_dir(root / "images", "dataset images")
    masks = _require_dir(root / "masks", "dataset masks")
    by_stem = {p.stem: p for p in sorted(images.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES}
    split_file = root / "splits" / f"{split}.txt"
    if split_file.is_file():
        stems = [s.strip() for s in _read_lines(split_file, "split file")]
        unknown = [s for s in stems if s not in by_stem]
        if unknown:
            raise DataError(f"{split_file} names image {unknown[0]!r} that is not in {images}")
    else:
        stems = sorted(by_stem)
        if (root / "splits").is_dir():
            raise DataError(f"split file {split_file} does not exist; choose a split that has a file in {root / 'splits'}")
        warnings.warn(f"{root} has no splits/{split}.txt: the {split} split is every image", stacklevel=2)
    pairs = []
    for stem in stems:
        mask = masks / f"{stem}.png"
        if not mask.is_file():
            raise DataError(f"image {by_stem[stem]} has no mask {mask}")
        pairs.append((by_stem[stem], mask))
    return pairs


def folder_class_names(root: Path) -> tuple[str, ...]:
    path = root / "classes.txt"
    if not path.is_file():
        raise DataError(f"class-names file {path} does not exist (one class name per line)")
    names = tuple(line.strip() for line in _read_lines(path, "class-names file"))
    if not names:
        raise DataError(f"class-names file {path} is empty")
    return names


def _fashion_scenes(cfg: DataConfig, split: str, transform: Transform) -> SegmentationDataset:
    spec = fashion_scenes.spec_from(cfg)
    path = fashion_scenes.build(spec, cfg.root or None)
    images, masks = fashion_scenes.load(path, split)
    return ArrayDataset(f"fashion-scenes/{split}", images, masks, fashion_scenes.CLASS_NAMES,
                        cfg.ignore_index, transform)


def _files(finder, class_names, default_reduce):
    def make(cfg: DataConfig, split: str, transform: Transform) -> SegmentationDataset:
        if not cfg.root:
            raise DataError(f"data.root is not set: point it at the {cfg.dataset} folder")
        root = _require_dir(Path(cfg.root).expanduser(), f"{cfg.dataset} root")
        names = class_names(root) if callable(class_names) else class_names
        return FileDataset(f"{cfg.dataset}/{split}", finder(root, split), names, cfg.ignore_index, transform,
                           reduce_zero_label=default_reduce or cfg.reduce_zero_label)
    return make


DATASETS = {
    "fashion-scenes": _fashion_scenes,
    "ade20k": _files(ade20k_pairs, classes.ADE20K, True),
    "cityscapes": _files(cityscapes_pairs, classes.CITYSCAPES, False),
    "folder": _files(folder_pairs, folder_class_names, False),
}


DOWNLOAD = {
    "ade20k": "download ADEChallengeData2016.zip (http://data.csail.mit.edu/places/ADEchallenge/"
              "ADEChallengeData2016.zip), unzip it and pass its folder as --data-root (or --set data.root=...); "
              "it must hold images/{training,validation} and annotations/{training,validation}",
    "cityscapes": "download leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip (https://www.cityscapes-dataset"
                  ".com/downloads/, an account is needed), unzip both into one folder, run cityscapesscripts' "
                  "createTrainIdLabelImgs, and pass that folder as --data-root (or --set data.root=...)",
    "folder": "point --data-root (or data.root) at a folder with images/<split>/ and masks/<split>/ "
              "(README, 'Your own data')",
}


def check_dataset(cfg: DataConfig) -> None:
    """Before any compute: a dataset read in place must be where data.root says, else one line saying
    what to download and where to put it. fashion-scenes is built here from the embedded Fashion-MNIST."""
    if cfg.dataset == "fashion-scenes" or cfg.dataset not in DOWNLOAD:
        return
    root = Path(cfg.root).expanduser() if cfg.root else None
    if root is None or not root.is_dir():
        where = f"data.root {cfg.root!r} does not exist" if cfg.root else "data.root is not set"
        raise DataError(f"{cfg.dataset} is not here ({where}): {DOWNLOAD[cfg.dataset]}")
    pairs = {"ade20k": ade20k_pairs, "cityscapes": cityscapes_pairs}.get(cfg.dataset)
    if pairs:
        try:
            pairs(root, "val")
        except DataError as e:
            raise DataError(f"{cfg.dataset} at {root} is incomplete ({e}): {DOWNLOAD[cfg.dataset]}") from None


def selection_split(cfg: DataConfig) -> str:
    """Where hyper-parameters are chosen and plateaus checked: the holdout split when there is one, else val."""
    return "holdout" if cfg.holdout else "val"


def build_dataset(cfg: DataConfig, split: str, train: bool | None = None, seed: int | None = None
                  ) -> SegmentationDataset:
    """The dataset named by ``cfg.dataset``; training augmentation when ``train`` (default: split == 'train')."""
    if cfg.dataset not in DATASETS:
        raise DataError(f"unknown dataset {cfg.dataset!r}; choose from: {choices(DATASETS)}")
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; choose from: {', '.join(SPLITS)}")
    if split == "holdout" and not cfg.holdout:
        raise DataError("the holdout split needs data.holdout > 0 (training images held out from every training)")
    train = split == "train" if train is None else train
    transform = TrainTransform(cfg, seed) if train else EvalTransform(cfg)
    if cfg.dataset == "fashion-scenes" or split == "val" or not cfg.holdout:
        return DATASETS[cfg.dataset](cfg, split, transform)  # fashion-scenes composes its own holdout split
    full = DATASETS[cfg.dataset](cfg, "train", transform)
    if cfg.holdout >= len(full):
        raise DataError(f"data.holdout={cfg.holdout} leaves no training images of {full.name} ({len(full)} in all); "
                        f"choose a value below {len(full)}")
    return full.tail(cfg.holdout) if split == "holdout" else full.head(len(full) - cfg.holdout)
