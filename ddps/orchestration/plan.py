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
every cell. Nothing here imports Ray or MLflow: the sweep runs what the plan lists.
"""
from __future__ import annotations

import operator
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ddps.config import Config, content_hash, resolve, to_flat
from ddps.config.load import read_experiment, read_experiment_file
from ddps.engine import train_base, train_refiner
from ddps.errors import ConfigError, choices
from ddps.paths import safe_name

EVAL_SECTIONS = ("data", "denoiser", "diffusion", "train", "infer", "eval")  # what an evaluation reads
COMPARE = {"<=": operator.le, "<": operator.lt, ">=": operator.ge, ">": operator.gt, "==": operator.eq,
           "!=": operator.ne}
REQUIRE = re.compile(r"^\s*([\w.]+)\s*(<=|>=|==|!=|<|>)\s*([\w.]+)\s*$")
# For the dry run's estimate only, on this 2-core machine: images/s of the cpu preset's models on 2 Ray Train
# workers (README), times the speed of other models relative to them (benchmarks/sweep_rates.py, 2 threads;
# crops scale as (64 / crop) ** 1.5 there); unmeasured models count as the cpu preset's.
RATE = {"base": 170.0, "stage1": 99.0, "stage2": 99.0, "multistep": 99.0, "head": 99.0}
BASE_RATIO = {("deeplabv3plus", "mobilenet_v2"): 0.52, ("deeplabv3plus", "resnet18"): 0.58,
              ("deeplabv3plus", "resnet50"): 0.26, ("segformer", "mit_b1"): 0.51}
DENOISER_RATIO = {"XXS": 1.25, "XS": 1.0, "T": 0.58, "S": 0.35}
START_S = 25.0  # starting and stopping a TorchTrainer (worker processes, imports, mapping the feature cache)
EVAL_CALLS_PER_S = 400.0  # denoiser calls per second in evaluation (1,000 images x 60 calls in 151 s)
EVAL_START_S = 20.0
ESTIMATED_PRESETS = ("smoke", "cpu")


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
    speed: float = 1.0  # relative to the cpu preset's model of this step (BASE_RATIO, DENOISER_RATIO)

    @property
    def seconds(self) -> float:
        return START_S + self.iters * self.batch_size / (RATE[self.step] * self.speed)


@dataclass
class Cell:
    coords: dict[str, str]
    cfg: Config
    chain: list[Training]
    eval_hash: str
    reliance: bool = False  # the one cell of its model that also runs the mask-reliance diagnostic

    @property
    def images(self) -> int:
        return min(self.cfg.data.val_scenes, self.cfg.eval.max_images or self.cfg.data.val_scenes)

    @property
    def eval_seconds(self) -> float:
        cfg = self.cfg
        calls = 1 if cfg.denoiser.method == "head" else cfg.infer.steps * (3 if self.reliance else 1)
        if cfg.eval.multiscale:  # every scale (and its mirror image) refined once more
            calls += (1 if cfg.denoiser.method == "head" else cfg.infer.steps) * len(cfg.eval.scales) * (
                2 if cfg.eval.flip else 1)
        calls *= 2 if cfg.infer.cfg_scale > 0 else 1  # guidance: a conditional and an unconditional call
        return EVAL_START_S + self.images * calls / EVAL_CALLS_PER_S / _pixels(cfg)


@dataclass
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


def _pixels(cfg: Config) -> float:
    """How much slower than at the cpu preset's 64-pixel crops (measured: ~ the 1.5th power of the side)."""
    return (cfg.data.crop / 64) ** 1.5


def chain_of(cfg: Config) -> list[Training]:
    """The trainings one cell needs, each with its content hash: base, then the refiner's stages."""
    base_h = train_base.base_hash(cfg)
    base_speed = BASE_RATIO.get((cfg.base.arch, cfg.base.backbone), 1.0) / _pixels(cfg)
    chain = [Training("base", base_h, cfg.train_base.iters, cfg.train_base.batch_size,
                      train_base.default_checkpoint(cfg), base_speed)]
    speed = DENOISER_RATIO.get(cfg.denoiser.size, 1.0) / _pixels(cfg)
    for stage in train_refiner.stages_of(cfg):
        chain.append(Training(stage, train_refiner.stage_hash(cfg, stage, base_h), train_refiner.stage_iters(cfg, stage),
                              cfg.train.batch_size, train_refiner.stage_checkpoint(cfg, stage, base_h), speed))
    return chain


def eval_hash(cfg: Config, chain: list[Training]) -> str:
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


def plan(experiment: Experiment, preset: str, overrides: dict | None = None) -> Plan:
    """Resolve every cell's config (preset <- experiment preset <- overrides <- the cell's values); cells that
    break a ``require`` rule are listed as invalid, not resolved (the config would refuse them)."""
    shared = {**read_experiment(experiment.path, preset), **(overrides or {})}  # the file is read once
    defaults = resolve(preset, None, shared)  # the experiment's config before any cell's values
    common = to_flat(defaults)
    cells, invalid = [], []
    for coords, cell_overrides in cells_of(experiment, preset):
        if not _valid({**common, **cell_overrides}, experiment.require):
            invalid.append(coords)
            continue
        cfg = resolve(preset, None, {**shared, **cell_overrides})
        chain = chain_of(cfg)
        cells.append(Cell(coords, cfg, chain, eval_hash(cfg, chain)))
    _choose_reliance_cells(cells, defaults)
    return Plan(experiment, preset, cells, invalid)


def _choose_reliance_cells(cells: list[Cell], common: Config) -> None:
    """One cell per trained DDPS model runs the mask-reliance diagnostic (three trajectories, 3x the cost):
    the first whose inference settings are the experiment's defaults, else the model's first cell."""
    by_model: dict[str, list[Cell]] = {}
    for cell in cells:
        if cell.cfg.denoiser.method != "head":
            by_model.setdefault(cell.chain[-1].hash, []).append(cell)
    for group in by_model.values():
        default = [c for c in group if c.cfg.infer == common.infer]
        (default or group)[0].reliance = True


def _evaluations(total: int, left: int) -> str:
    return str(total) if left == total else f"{total} ({total - left} finished)"


def describe(plans: list[Plan], finished: dict[str, set[str]] | None = None) -> str:
    """The dry run's printout: per table, cells, trainings (planned / naive), evaluations, and the estimated
    time alone (every training it needs that is not trained yet, every evaluation not finished yet) and in
    this order (after the tables above it have trained what they share with it). ``finished``: per
    experiment name, the evaluation hashes of its cells with a FINISHED run in MLflow."""
    finished = finished or {}
    lines = ["| experiment | preset | cells | trainings planned | naive | planned / naive | already trained | "
             "evaluations | estimated time alone | in this order |", "|---|---|---|---|---|---|---|---|---|---|"]

    def estimate(seconds: float, preset: str) -> str:  # the rates are this machine's, for its presets only
        return duration(seconds) if preset in ESTIMATED_PRESETS else "-"
    earlier: set[str] = set()
    total, unfinished_in_all = 0.0, 0
    for p in plans:
        steps = {}
        for t in p.trainings:
            steps[t.step] = steps.get(t.step, 0) + 1
        detail = ", ".join(f"{n} {s}" for s, n in steps.items())
        finished_here = finished.get(p.experiment.name, set())
        unfinished = {c.eval_hash: c.eval_seconds for c in p.cells if c.eval_hash not in finished_here}
        evals = sum(unfinished.values())
        unfinished_in_all += len(unfinished)
        alone = evals + sum(t.seconds for t in p.to_train)
        in_order = evals + sum(t.seconds for t in p.to_train if t.hash not in earlier)
        earlier |= {t.hash for t in p.trainings}
        total += in_order
        lines.append(f"| {p.experiment.name} | {p.preset} | {len(p.cells)} | {len(p.trainings)} ({detail}) | "
                     f"{p.naive_trainings} | {len(p.trainings) / p.naive_trainings:.1%} | "
                     f"{len(p.trainings) - len(p.to_train)} | {_evaluations(p.evaluations, len(unfinished))} | "
                     f"{estimate(alone, p.preset)} | {estimate(in_order, p.preset)} |")
    if len(plans) > 1:
        unique = {t.hash: t for p in plans for t in p.trainings}
        naive = sum(p.naive_trainings for p in plans)
        done = sum(t.path.exists() for t in unique.values())
        evaluations = sum(p.evaluations for p in plans)
        lines.append(f"| all (each training once) | | {sum(len(p.cells) for p in plans)} | {len(unique)} | {naive} | "
                     f"{len(unique) / naive:.1%} | {done} | {_evaluations(evaluations, unfinished_in_all)} | | "
                     f"{estimate(total, plans[0].preset)} |")
    if plans and plans[0].preset not in ESTIMATED_PRESETS:
        lines.append(f"\n(no time estimate for preset {plans[0].preset}: the rates are measured on this machine "
                     f"for {', '.join(ESTIMATED_PRESETS)})")
    return "\n".join(lines)


def duration(seconds: float) -> str:
    minutes = round(seconds / 60)
    return f"{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 else f"{minutes} min"
