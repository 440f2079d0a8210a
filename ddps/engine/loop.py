"""What every training loop shares: where it runs (rank / world size), the data order and its position,
and periodic training-state checkpoints to resume from.

- ``Worker``: rank and world size of data-parallel training, the device, and how to wrap the model (DDP
  under Ray Train; nothing in one process). Rank 0 logs, evaluates and saves.
- ``GlobalOrder``: the order of samples is a function of (seed, epoch) only; a global batch of
  ``batch_size`` samples is cut into ``world_size`` equal shards, rank r taking the r-th. The effective
  batch is always the config's ``batch_size``, whatever the number of workers (it must divide it).
- ``FolderCheckpointer``: every N iterations the whole training state (model, EMA, optimiser, iteration,
  data position, RNG) is written to a temporary name, checksummed and renamed (``ddps.checkpoint_io``; in an
  object store, one PUT); the last K are kept. A truncated or altered file fails its checksum and the previous
  one is used, with a message. Single-process trainings (``ddps train-base``, ``ddps train``) keep theirs in
  :func:`state_folder` — the storage's ``states/<checkpoint name>/`` — which a rerun of the same config finds
  and which is removed once the final checkpoint is written; Ray Train keeps its own (``RayCheckpointer``).
"""
from __future__ import annotations

import re
import shutil
from dataclasses import dataclass, field
from typing import Callable, Iterator, Protocol

import torch
from torch import nn

from ddps import storage
from ddps.checkpoint_io import read_checked, sidecar, write_checked
from ddps.errors import CheckpointError, ConfigError, reason
from ddps.storage import Location, StoragePath

STATE_NAME = re.compile(r"state-(\d+)\.pt")


@dataclass
class Worker:
    rank: int = 0
    world_size: int = 1
    device: str = "cpu"
    wrap: Callable[[nn.Module], nn.Module] | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def local_batch(self, batch_size: int, what: str) -> int:
        if batch_size % self.world_size:
            raise ConfigError(f"{what}={batch_size} is not divisible by the {self.world_size} data-parallel "
                              f"workers; the effective batch stays {what}, so choose a multiple of the workers")
        return batch_size // self.world_size


@dataclass
class GlobalOrder:
    """Sample indices in global batches: epoch e is randperm(n) from seed (seed, e); ``position`` is
    (epoch, global batches done in it), enough to resume exactly."""
    n: int
    batch_size: int
    seed: int
    rank: int = 0
    world_size: int = 1
    epoch: int = 0
    offset: int = 0

    def __post_init__(self):
        assert self.n >= self.batch_size, (self.n, self.batch_size)

    @property
    def position(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset}

    def after(self, batches: int) -> dict:
        """The position after ``batches`` global batches from the start: what a training state saves, rather
        than :attr:`position`, which a DataLoader's prefetching workers run ahead of the loop."""
        per_epoch = self.n // self.batch_size
        return {"epoch": batches // per_epoch, "offset": batches % per_epoch}

    def seek(self, position: dict) -> None:
        self.epoch, self.offset = int(position["epoch"]), int(position["offset"])

    def permutation(self, epoch: int) -> torch.Tensor:
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Endless (this rank's indices, their keys); key = epoch x n + index, unique over the run."""
        per_epoch = self.n // self.batch_size
        local = self.batch_size // self.world_size
        while True:
            order = self.permutation(self.epoch)
            while self.offset < per_epoch:
                start = self.offset * self.batch_size + self.rank * local
                index = order[start:start + local]
                self.offset += 1
                yield index, self.epoch * self.n + index
            self.epoch, self.offset = self.epoch + 1, 0


class Checkpointer(Protocol):
    every: int

    def latest(self) -> dict | None: ...
    def save(self, state: dict, step: int) -> None: ...


@dataclass
class FolderCheckpointer:
    """Training-state checkpoints ``state-<iter>.pt`` in ``folder`` (a local folder or a storage URI's), every
    ``every`` iterations, the last ``keep``. :attr:`source` is the file :meth:`latest` returned."""
    folder: Location | str
    every: int = 500
    keep: int = 2
    log: Callable[[str], None] = print
    skipped: list = field(default_factory=list)
    source: Location | None = None

    def __post_init__(self):
        self.folder = storage.location(self.folder)

    def files(self) -> list[Location]:
        """The state files, oldest first (by iteration); none when the folder does not exist."""
        try:
            entries = list(self.folder.iterdir())
        except (FileNotFoundError, NotADirectoryError):
            return []
        found = [(int(m.group(1)), p) for p in entries if (m := STATE_NAME.fullmatch(p.name))]
        return [p for _, p in sorted(found, key=lambda pair: pair[0])]

    def latest(self) -> dict | None:
        for path in reversed(self.files()):
            state = read_checked(path)
            if state is not None:
                self.source = path
                return state
            self.skipped.append(path)
            self.log(f"checkpoint {path} is damaged (checksum mismatch or unreadable); using the one before it")
        return None

    def save(self, state: dict, step: int) -> None:
        write_checked(self.folder / f"state-{step:08d}.pt", state)
        for old in self.files()[:-self.keep]:
            old.unlink(missing_ok=True)
            sidecar(old).unlink(missing_ok=True)

    def clear(self, strict: bool = True) -> None:
        """Remove every state and the folder: a forced training starts over (``strict``: a state that cannot be
        removed is a one-line CheckpointError, as it would be resumed from), a finished one needs none (not
        ``strict``: what cannot be removed is said and left, as the finished checkpoint is reused first)."""
        try:
            if isinstance(self.folder, StoragePath):
                for path in self.folder.iterdir():
                    path.unlink(missing_ok=True)
            elif self.folder.exists():
                shutil.rmtree(self.folder)
        except OSError as e:
            message = f"cannot remove the training states in {self.folder}: {reason(e)}"
            if strict:
                raise CheckpointError(message) from None
            self.log(message)


def state_folder(name: str) -> Location:
    """Where a single-process training keeps its states: ``states/<name>`` in the storage (ddps.storage), else
    in DDPS_HOME; ``name`` is the default checkpoint's stem, addressed by the training's content hash, so a
    rerun of the same config finds them and another config never does."""
    return storage.folder("states") / name


def single_process_states(name: str, every: int | None, fresh: bool = False,
                          log: Callable[[str], None] = print) -> FolderCheckpointer:
    """The FolderCheckpointer of a single-process training in :func:`state_folder` (``every`` None or 0: it
    only clears); ``fresh`` (--force) removes what an earlier run left, so the training starts over."""
    states = FolderCheckpointer(state_folder(name), every=every or 0, log=log)
    if fresh:
        states.clear()
    return states


def rng_state() -> dict:
    """The CPU's random state, and the GPUs' when there are (dropout on a GPU draws from theirs)."""
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
