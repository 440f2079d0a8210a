"""Reader for the IDX files of (Fashion-)MNIST, gzipped or not.

Format (LeCun et al.): big-endian magic = 0x0000 | dtype code | number of dims, then one uint32 per
dim, then the data. Fashion-MNIST uses dtype 0x08 (uint8) with 3 dims (images) or 1 dim (labels).
"""
from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

from ddps.errors import DataError, reason

DEBIAN_FOLDER = Path("/usr/share/datasets/fashion-mnist")
ENV_VAR = "DDPS_FASHION_MNIST"
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
               "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


def locate(data_root: str | os.PathLike | None = None) -> Path:
    """The folder holding the four IDX files: --data-root, else $DDPS_FASHION_MNIST, else Debian's."""
    folder = Path(data_root or os.environ.get(ENV_VAR) or DEBIAN_FOLDER).expanduser()
    for stems in FILES.values():
        for stem in stems:
            if _find(folder, stem) is None:
                raise DataError(
                    f"Fashion-MNIST file {folder / (stem + '.gz')} is missing; install the Debian package "
                    f"dataset-fashion-mnist, or pass --data-root / set {ENV_VAR} to a folder with the IDX files")
    return folder


def _find(folder: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def read_idx(path: Path) -> np.ndarray:
    """Read one IDX file into a numpy array (uint8)."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except Exception as e:  # OSError, EOFError, zlib.error on damaged gzip streams
        raise DataError(f"cannot read IDX file {path}: {type(e).__name__}: {reason(e)}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DataError(f"IDX file {path} is corrupt: bad magic number (expected uint8 IDX)")
    ndim = data[3]
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    if len(data) != header + int(np.prod(shape)):
        raise DataError(f"IDX file {path} is corrupt: {len(data) - header} data bytes for shape {shape}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def load_split(split: str, data_root: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 28, 28) uint8 and labels (N,) uint8 of the 'train' (60k) or 'test' (10k) split."""
    folder = locate(data_root)
    image_stem, label_stem = FILES[split]
    images, labels = read_idx(_find(folder, image_stem)), read_idx(_find(folder, label_stem))
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataError(f"Fashion-MNIST files in {folder} disagree: images {images.shape}, labels {labels.shape}")
    return images, labels


def fingerprint(data_root: str | os.PathLike | None = None) -> dict:
    """File names and sizes: enough to tell one copy of the data from another in a cache key."""
    folder = locate(data_root)
    return {p.name: p.stat().st_size for stems in FILES.values() for p in (_find(folder, s) for s in stems)}
