"""The sweep planner: an experiment's grid of cells, and the trainings and evaluations it really needs.

An experiment YAML (one per paper table, ``experiments/``) names its axes, how they map to the printed
table's rows and columns, the cells that are valid, and its presets::

    name: table3e
    title: "Table 3e: train steps x test steps"
    axes:
      - {name: train_steps, key: diffusion.steps, values: [20, 50, 100]}
      - {name: test_steps, key: infer.steps, values: [2, 5, 20, 50, 100]}
      # or labelled override sets: values: [{label: CE, set: {train.loss: ce}}, ...]
    rows: [train_steps]
    columns: [test_steps]
    require: ["infer.steps <= diffusion.steps"]
    presets: {cpu: {...}, paper: {...}}

**Train once, evaluate many.** A cell is one evaluation; its trainings are the chain base -> stage 1 ->
stage 2 (or base -> head), each addressed by its content hash. Cells that differ only in what no training
reads (test steps, re-noising, CFG scale) share every training; cells that share a base or a stage 1 share
those. A *training* is one optimiser run (one stage of one model); the *naive* plan runs the whole chain for
every cell. Nothing here imports Ray or MLflow: the sweep (``sweep.py``) runs what the plan lists, and the
dry run (``estimates.py``) prints what it costs.
"""
from __future__ import annotations

import operator
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ddps.config import Config, content_hash, resolve, to_flat
from ddps.config.load import parse_set, read_experiment, read_experiment_file
from ddps.data.datasets import selection_split
from ddps.engine import train_base, train_refiner
from ddps.errors import ConfigError, choices
from ddps.orchestration.estimates import test_steps
from ddps.paths import safe_name

EVAL_SECTIONS = ("data", "denoiser", "diffusion", "train", "infer", "eval")  # what an evaluation reads
COMPARE = {"<=": operator.le, "<": operator.lt, ">=": operator.ge, ">": operator.gt, "==": operator.eq,
           "!=": operator.ne}
REQUIRE = re.compile(r"^\s*([\w.]+)\s*(<=|>=|==|!=|<|>)\s*([\w.]+)\s*$")


@dataclass(frozen=True)
class Axis:
    name: str
    labels: tuple[str, ...]
    overrides: tuple[dict, ...]  # one flat override dict per value
    by_preset: tuple = ()  # ((preset, labels, overrides), ...): a preset's own values (e.g. cpu stand-ins)

    def values(self, preset: str | None = None) -> tuple[tuple[str, ...], tuple[dict, ...]]:
        for name, labels, overrides in self.by_preset:
            if name == preset:
                return labels, overrides
        return self.labels, self.overrides


@dataclass(frozen=True)
class Experiment:
    name: str
    title: str
    path: Path
    axes: tuple[Axis, ...]
    rows: tuple[str, ...]
    columns: tuple[str, ...]
    require: tuple[str, ...]


@dataclass(frozen=True)
class Training:
    step: str  # base | stage1 | stage2 | multistep | head
    hash: str
    iters: int
    batch_size: int
    path: Path  # its content-addressed checkpoint: when it exists, the training is done
    model: str  # what it trains: the base's arch-backbone, or the denoiser's size
    crop: int  # the side of its training crops
    imported: str = ""  # a base not trained but imported: base.pretrained (no iterations)
    precision: str = "fp32"  # what its forward passes run in (train_base.precision, train.precision)
    mask_scale: int = 4  # a refiner stage's denoiser.mask_scale: its masks' resolution, its cost (a base's: 4)
    check_calls: int = 0  # a refiner stage's denoiser calls in all its held-out checks (train.eval_every)


@dataclass(frozen=True)
class Cell:
    coords: dict[str, str]
    cfg: Config
    chain: tuple[Training, ...]
    eval_hash: str
    reliance: bool = False  # the one cell of its model that also runs the mask-reliance diagnostic

    @property
    def images(self) -> int:
        """The images its evaluation scores: the split of eval.split (val, or the holdout scenes), capped by
        eval.max_images."""
        return split_images(self.cfg, self.cfg.eval.split)


@dataclass(frozen=True)
class Plan:
    experiment: Experiment
    preset: str
    cells: list[Cell]
    invalid: list[dict[str, str]] = field(default_factory=list)

    @property
    def trainings(self) -> list[Training]:
        """Each training once, in the order a chain needs them (a base before its stages)."""
        seen: dict[str, Training] = {}
        for cell in self.cells:
            for training in cell.chain:
                seen.setdefault(training.hash, training)
        return list(seen.values())

    @property
    def naive_trainings(self) -> int:
        return sum(len(cell.chain) for cell in self.cells)

    @property
    def evaluations(self) -> int:
        return len({cell.eval_hash for cell in self.cells})

    @property
    def to_train(self) -> list[Training]:
        return [t for t in self.trainings if not t.path.exists()]

    @property
    def axis_order(self) -> dict[str, list[str]]:
        """Each axis's labels in the experiment file's order (the report prints rows and columns so)."""
        order: dict[str, list[str]] = {}
        for cell in self.cells:
            for axis, label in cell.coords.items():
                if label not in order.setdefault(axis, []):
                    order[axis].append(label)
        return order


# ---- reading an experiment ------------------------------------------------------------------------

def _axis(raw: Any, where: str) -> Axis:
    if not isinstance(raw, dict) or "name" not in raw or not isinstance(raw.get("values"), list) or not raw["values"]:
        raise ConfigError(f"{where}: an axis needs a name and a non-empty list of values")
    unknown = set(raw) - {"name", "key", "values", "presets"}
    if unknown:
        raise ConfigError(f"{where}: unknown axis field {sorted(unknown)[0]!r}; an axis has: name, key, values, presets")
    labels, overrides = _axis_values(raw, raw["values"], where)
    own = raw.get("presets") or {}
    if not isinstance(own, dict) or not all(isinstance(v, list) and v for v in own.values()):
        raise ConfigError(f"{where}: an axis' presets is {{preset: [values]}}, got {own!r}")
    by_preset = tuple((str(name), *_axis_values(raw, values, f"{where}: presets.{name}")) for name, values in own.items())
    return Axis(str(raw["name"]), labels, overrides, by_preset)


def _axis_values(raw: dict, values: list, where: str) -> tuple[tuple[str, ...], tuple[dict, ...]]:
    labels, overrides = [], []
    for value in values:
        if isinstance(value, dict):
            if set(value) - {"label", "set"} or "label" not in value or not isinstance(value.get("set"), dict):
                raise ConfigError(f"{where}: a labelled value is {{label: ..., set: {{section.key: value}}}}, "
                                  f"got {value!r}")
            labels.append(str(value["label"]))
            overrides.append(dict(value["set"]))
        elif "key" in raw:
            labels.append(str(value))
            overrides.append({raw["key"]: value})
        else:
            raise ConfigError(f"{where}: axis {raw['name']!r} has plain values but no key")
    if len(set(labels)) != len(labels):
        raise ConfigError(f"{where}: axis {raw['name']!r} repeats a label: {labels}")
    return tuple(labels), tuple(overrides)


def load_experiment(path: str | Path) -> Experiment:
    path = Path(path)
    doc = read_experiment_file(path)
    if not isinstance(doc.get("axes"), list) or not doc["axes"]:
        raise ConfigError(f"experiment file {path} has no axes: a sweep needs 'axes: [{{name, key, values}}, ...]'")
    axes = tuple(_axis(a, f"{path}: axes[{i}]") for i, a in enumerate(doc["axes"]))
    names = [a.name for a in axes]
    if len(set(names)) != len(names):
        raise ConfigError(f"{path}: axis names repeat: {names}")

    def axis_list(key: str) -> tuple[str, ...]:
        value = doc.get(key) or []
        value = [value] if isinstance(value, str) else list(value)
        for name in value:
            if name not in names:
                raise ConfigError(f"{path}: {key} names axis {name!r}; choose from: {choices(names)}")
        return tuple(value)

    rows, columns = axis_list("rows"), axis_list("columns")
    if sorted(rows + columns) != sorted(names):
        raise ConfigError(f"{path}: rows {list(rows)} and columns {list(columns)} must together name every axis "
                          f"exactly once ({names})")
    require = tuple(str(r) for r in (doc.get("require") or []))
    for rule in require:
        if not REQUIRE.match(rule):
            raise ConfigError(f"{path}: require {rule!r} is not 'section.key OP section.key|number' "
                              f"with OP one of {choices(COMPARE)}")
    name = safe_name(str(doc.get("name") or path.stem), f"{path}: name")  # a folder of Ray Tune, a report file
    return Experiment(name, str(doc.get("title") or path.stem), path, axes, rows,
                      columns, require)


def experiment_files(folder: str | Path | None = None) -> list[Path]:
    """Every experiment YAML of ``folder`` but the shared parts they include (``_*.yaml``) (default: experiments/ of the working directory, as under
    ``ray job submit --working-dir .``, else of the checkout ddps runs from), in name order."""
    if folder is None:
        folder = Path.cwd() / "experiments"
        if not folder.is_dir():
            folder = Path(__file__).resolve().parents[2] / "experiments"
    folder = Path(folder)
    files = sorted(f for f in folder.glob("*.yaml") if not f.name.startswith("_"))  # _*.yaml: shared parts
    if not files:
        raise ConfigError(f"no experiment files (*.yaml) in {folder}")
    return files


# ---- planning -------------------------------------------------------------------------------------

def _operand(cfg_flat: dict, token: str):
    if token in cfg_flat:
        return cfg_flat[token]
    try:
        return float(token)
    except ValueError:
        raise ConfigError(f"require: {token!r} is neither a config key nor a number") from None


def _valid(flat: dict, require: tuple[str, ...]) -> bool:
    for rule in require:
        left, op, right = REQUIRE.match(rule).groups()
        if not COMPARE[op](_operand(flat, left), _operand(flat, right)):
            return False
    return True


def chain_of(cfg: Config) -> list[Training]:
    """The trainings one cell needs, each with its content hash: base, then the refiner's stages."""
    base_h = train_base.base_hash(cfg)
    if cfg.base.pretrained:  # imported, not trained: no iterations
        chain = [Training("base", base_h, 0, 0, train_base.default_checkpoint(cfg), cfg.base.pretrained, cfg.data.crop,
                          imported=cfg.base.pretrained)]
    else:
        chain = [Training("base", base_h, cfg.train_base.iters, cfg.train_base.batch_size,
                          train_base.default_checkpoint(cfg), f"{cfg.base.arch}-{cfg.base.backbone}", cfg.data.crop,
                          precision=cfg.train_base.precision)]
    for stage in train_refiner.stages_of(cfg):
        chain.append(Training(stage, train_refiner.stage_hash(cfg, stage, base_h), train_refiner.stage_iters(cfg, stage),
                              cfg.train.batch_size, train_refiner.stage_checkpoint(cfg, stage, base_h),
                              cfg.denoiser.size, cfg.data.crop, precision=cfg.train.precision,
                              mask_scale=cfg.denoiser.mask_scale, check_calls=check_calls(cfg, stage)))
    return chain


def check_calls(cfg: Config, stage: str) -> int:
    """The denoiser calls of a refiner stage's held-out checks (one every train.eval_every iterations and one
    at the end, over the selection split capped by eval.max_images): stage 1 and the head one call per image,
    a multi-step stage its test steps, with train.check_reliance twice them and one oracle call."""
    iters = train_refiner.stage_iters(cfg, stage)
    checks = iters // cfg.train.eval_every + (1 if iters % cfg.train.eval_every else 0)
    per_image = 1
    if stage in ("stage2", "multistep"):
        per_image = test_steps(cfg)
        if train_refiner.checks_reliance(cfg, stage):
            per_image = 2 * per_image + 1
    return checks * split_images(cfg, selection_split(cfg.data)) * per_image


def split_images(cfg: Config, split: str) -> int:
    """The embedded benchmark's images an evaluation of ``split`` scores: the holdout scenes or the val scenes,
    capped by eval.max_images."""
    count = cfg.data.holdout if split == "holdout" else cfg.data.val_scenes
    return min(count, cfg.eval.max_images or count)


def eval_hash(cfg: Config, chain: Sequence[Training]) -> str:
    """An evaluation is addressed by what it reads plus the last training of its chain."""
    return content_hash(cfg, EVAL_SECTIONS, [chain[-1].hash])


def cells_of(experiment: Experiment, preset: str | None = None) -> list[tuple[dict[str, str], dict]]:
    """Every combination of axis values (the preset's own values where an axis has them): (coordinates by
    axis name, merged flat overrides), rows first."""
    combos: list[tuple[dict[str, str], dict]] = [({}, {})]
    for axis in experiment.axes:
        combos = [({**coords, axis.name: label}, {**over, **extra})
                  for coords, over in combos for label, extra in zip(*axis.values(preset))]
    return combos


CellOverride = tuple[str, str, dict]  # (axis name, value label, flat overrides): `--cell-set AXIS=LABEL:KEY=VALUE`


_CELL_SET = re.compile(r"^(?P<axis>[^=]+)=(?P<label>.+?):(?P<assignment>\w+\.\w+=.*)$")


def parse_cell_set(items: Sequence[str]) -> list[CellOverride]:
    """['axis=label:section.key=value', ...] -> [(axis, label, {section.key: value})]; the label ends at the
    first ':' followed by section.key= (a label may hold ':' itself, e.g. "2 (official list: …)")."""
    out = []
    for item in items:
        m = _CELL_SET.match(item)
        if not m or not m["axis"].strip() or not m["label"].strip():
            raise ConfigError(f"--cell-set {item!r} is not of the form AXIS=LABEL:section.key=value")
        out.append((m["axis"].strip(), m["label"].strip(), parse_set([m["assignment"]])))
    return out


def _scoped(experiment: Experiment, preset: str, cell_overrides: Sequence[CellOverride]) -> list[CellOverride]:
    """The cell overrides for this experiment's axes; a label its axis does not have is one line naming them."""
    axes = {axis.name: axis.values(preset)[0] for axis in experiment.axes}
    for axis, label, _ in cell_overrides:
        if axis in axes and label not in axes[axis]:
            raise ConfigError(f"--cell-set: {experiment.name}'s axis {axis!r} has no value {label!r}; its values: "
                              f"{', '.join(axes[axis])}")
    return [c for c in cell_overrides if c[0] in axes]


def plan(experiment: Experiment, preset: str, overrides: dict | None = None,
         cell_overrides: Sequence[CellOverride] = ()) -> Plan:
    """Resolve every cell's config (preset <- experiment preset <- overrides <- the cell's values <- the
    ``cell_overrides`` of its axis values); cells that break a ``require`` rule are listed as invalid, not
    resolved (the config would refuse them)."""
    shared = {**read_experiment(experiment.path, preset), **(overrides or {})}  # the file is read once
    defaults = resolve(preset, None, shared)  # the experiment's config before any cell's values
    common = to_flat(defaults)
    scoped = _scoped(experiment, preset, cell_overrides)
    cells, invalid = [], []
    for coords, cell_values in cells_of(experiment, preset):
        cell_values = {**cell_values, **{k: v for axis, label, over in scoped if coords.get(axis) == label
                                         for k, v in over.items()}}
        if not _valid({**common, **cell_values}, experiment.require):
            invalid.append(coords)
            continue
        cfg = resolve(preset, None, {**shared, **cell_values})
        train_refiner.check_trainable(cfg)
        chain = chain_of(cfg)
        cells.append(Cell(coords, cfg, tuple(chain), eval_hash(cfg, chain)))
    _check_imported_bases(cells)
    return Plan(experiment, preset, _with_reliance(cells, defaults), invalid)


def _check_imported_bases(cells: list[Cell]) -> None:
    """One published base (base.pretrained) named for cells that ask for different bases is a mistake (a
    global --set over a backbone axis): refused in one line rather than every cell silently sharing it."""
    asked: dict[str, set] = {}
    for cell in cells:
        if cell.cfg.base.pretrained:
            asked.setdefault(cell.cfg.base.pretrained, set()).add((cell.cfg.base.arch, cell.cfg.base.backbone))
    for source, bases in asked.items():
        if len(bases) > 1:
            named = ", ".join(f"{arch} {backbone}" for arch, backbone in sorted(bases))
            raise ConfigError(f"base.pretrained={source} names one base for cells that ask for different bases "
                              f"({named}): name a published base per cell in the experiment file (the axis "
                              f"values' set:, or --cell-set AXIS=LABEL:base.pretrained=...), or sweep a table whose "
                              f"cells share one base")


def _with_reliance(cells: list[Cell], common: Config) -> list[Cell]:
    """The cells, one per trained DDPS model running the mask-reliance diagnostic (three trajectories, 3x the
    cost): the first whose inference settings are the experiment's defaults, else the model's first cell."""
    by_model: dict[str, list[int]] = {}
    for i, cell in enumerate(cells):
        if cell.cfg.denoiser.method != "head":
            by_model.setdefault(cell.chain[-1].hash, []).append(i)
    chosen = set()
    for group in by_model.values():
        default = [i for i in group if cells[i].cfg.infer == common.infer]
        chosen.add((default or group)[0])
    return [replace(cell, reliance=True) if i in chosen else cell for i, cell in enumerate(cells)]
