"""The report's figures (matplotlib, PNG), drawn from what the evaluation runs logged to MLflow.

- ``<table>-steps.png``: mIoU and mBIoU against the refinement step (0 = the base), one line per cell;
- ``<table>-checks.png`` (cells trained with ``train.check_reliance``): the reliance (own − random) and the
  multi-step gain (last − step 1) at every held-out check of the trained model's stage 2, against the
  iteration, one line per cell — from the training run each evaluation names (``ddps.training_run``);
- ``<table>-<cell>-classes.png``: per-class IoU change, DDPS's last step minus the base (the paper's Fig. 6);
- ``<table>-<cell>-logits.png``: the base's against the refined log-probability of one class at every pixel
  of a fixed val image (the paper's Fig. 5), from the run's ``probabilities.npz``;
- ``<table>-<cell>-strip-<i>.png``: the run's refinement strips (image | ground truth | base | step 1 | ...),
  copied from its ``strips/`` artifacts.
"""
from __future__ import annotations

import re
import shutil
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np

from ddps import names
from ddps.report.runs import Cell, Table
from ddps.report.tables import SEED_AXIS

STRIPS_PER_CELL = 2


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()[:60] or "cell"


def cell_name(cell: Cell, omit: tuple[str, ...] = ()) -> str:
    return ", ".join(f"{k}={v}" for k, v in cell.coords.items() if k not in omit)


def steps_figure(tracker, table: Table, path: Path) -> Path:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for cell in table.sorted_cells():
        for ax, metric in zip(axes, names.SCORES):
            history = tracker.history(cell.run_id, metric)
            ax.plot([s for s, _ in history], [v for _, v in history], marker=".", label=cell_name(cell))
    for ax, metric in zip(axes, names.SCORES):
        ax.set_xlabel("refinement step (0 = base segmentor)")
        ax.set_ylabel(f"{table.split} {metric}")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="best")
    fig.suptitle(table.title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


CHECK_SPLITS = ("holdout", "val")  # where a training's held-out checks ran (holdout when data.holdout > 0)


def check_curves(tracker, cell: Cell) -> dict[str, list[tuple[int, float]]]:
    """The held-out checks of the model a cell evaluates, when they ran the reliance diagnostic: own − random
    and the multi-step gain by iteration ({} when its training run logged none)."""
    run = cell.tags.get(names.TRAINING_RUN)
    if not run:
        return {}
    for split in CHECK_SPLITS:
        own = dict(tracker.history(run, f"{split}_{names.RELIANCE_OWN}"))
        if own:
            random = dict(tracker.history(run, f"{split}_{names.RELIANCE_RANDOM}"))
            gain = tracker.history(run, f"{split}_{names.MULTISTEP_GAIN}")
            return {"reliance": [(i, own[i] - random[i]) for i in sorted(own) if i in random], "gain": gain,
                    "split": split}
    return {}


def checks_figure(tracker, table: Table, path: Path) -> Path | None:
    """Reliance (own − random) and the multi-step gain against the training iteration, one line per cell whose
    model's checks measured them, one colour per setting (a study's seeds share it); None when no cell's did."""
    curves = [(c, check_curves(tracker, c)) for c in table.sorted_cells()]
    curves = [(cell, c) for cell, c in curves if c]
    if not curves:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    seeds = Counter(cell_name(cell, omit=(SEED_AXIS,)) for cell, _ in curves)  # a study's seeds: one setting
    colours: dict[str, str] = {}
    for cell, c in curves:
        name = cell_name(cell, omit=(SEED_AXIS,))
        label = None if name in colours else name + (f" ({seeds[name]} seeds)" if seeds[name] > 1 else "")
        colours.setdefault(name, f"C{len(colours) % 10}")
        for ax, key in zip(axes, ("reliance", "gain")):
            ax.plot([i for i, _ in c[key]], [v for _, v in c[key]], marker=".", color=colours[name], label=label)
    split = curves[0][1]["split"]
    for ax, label in zip(axes, (f"reliance: own − random, last-step {split} mIoU",
                                f"multi-step gain: last − step 1, {split} mIoU")):
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xlabel("training iteration (stage 2)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="best")
    fig.suptitle(f"{table.title}: the held-out checks along training", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def class_changes(tracker, cell: Cell) -> dict[str, float]:
    """Per-class IoU, last step minus the base (step 0), from the run's IoU.<class> histories."""
    keys = sorted(k for k in tracker.metric_keys(cell.run_id) if k.startswith(names.CLASS_IOU))
    out = {}
    for key in keys:
        history = tracker.history(cell.run_id, key)
        if history:
            out[key[len(names.CLASS_IOU):]] = history[-1][1] - history[0][1]
    return out


def classes_figure(tracker, table: Table, cell: Cell, path: Path) -> Path:
    plt = _plt()
    changes = class_changes(tracker, cell)
    names = sorted(changes, key=lambda n: changes[n])
    fig, ax = plt.subplots(figsize=(7, 0.28 * len(names) + 1.2))
    ax.barh(names, [changes[n] for n in names], color=["tab:red" if changes[n] < 0 else "tab:green" for n in names])
    ax.axvline(0, color="black", lw=0.8)
    ax.set_xlabel(f"IoU, DDPS step {cell.steps} − base (points)")
    ax.set_title(f"{table.name}: {cell_name(cell)}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def logits_figure(npz: Path, table: Table, cell: Cell, path: Path) -> Path:
    """log p(class c) of the base against the last step's, every pixel of the image; c = the most frequent
    labelled class that is not class 0 (the background)."""
    plt = _plt()
    data = np.load(npz)
    label, base, last = data["label"], data["base"].astype(np.float32), data["steps"][-1].astype(np.float32)
    classes = base.shape[0]
    counts = np.bincount(label[label < classes].ravel(), minlength=classes)
    counts[0] = 0
    c = int(counts.argmax())
    name = f"class {c}"
    if "class_names" in data.files:  # written by evaluations since the report exists
        name = str(data["class_names"][c])
    x = np.log(np.clip(base[c], 1e-4, 1)).ravel()
    y = np.log(np.clip(last[c], 1e-4, 1)).ravel()
    inside = (label == c).ravel()
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.scatter(x[~inside], y[~inside], s=3, alpha=0.4, label=f"other pixels ({(~inside).sum()})")
    ax.scatter(x[inside], y[inside], s=3, alpha=0.6, label=f"pixels of {name} ({inside.sum()})")
    ax.plot([-9.3, 0], [-9.3, 0], color="black", lw=0.8)
    ax.set_xlabel(f"base: log p({name})")
    ax.set_ylabel(f"DDPS step {cell.steps}: log p({name})")
    ax.set_title(f"{table.name}: {cell_name(cell)}", fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def cell_figures(tracker, table: Table, cell: Cell, folder: Path) -> list[Path]:
    """Class changes, logits and strips of one cell."""
    stem = f"{table.name}-{slug(cell_name(cell))}"
    paths = [classes_figure(tracker, table, cell, folder / f"{stem}-classes.png")]
    artifacts = tracker.list_artifacts(cell.run_id)
    with tempfile.TemporaryDirectory() as tmp:
        if names.ARTIFACT_PROBABILITIES in artifacts:
            npz = tracker.download(f"runs:/{cell.run_id}/{names.ARTIFACT_PROBABILITIES}", tmp)
            paths.append(logits_figure(npz, table, cell, folder / f"{stem}-logits.png"))
        strips = (tracker.list_artifacts(cell.run_id, names.ARTIFACT_STRIPS) if names.ARTIFACT_STRIPS in artifacts
                  else [])
        for i, name in enumerate(strips[:STRIPS_PER_CELL]):
            local = tracker.download(f"runs:/{cell.run_id}/{name}", tmp)
            paths.append(Path(shutil.copyfile(local, folder / f"{stem}-strip-{i}.png")))
    return paths
