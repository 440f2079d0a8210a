"""The dry run: what a plan (``plan.py``) costs — its trainings and evaluations, and their time on this machine.

The rates are measured on this 2-core machine, for its presets only (``ESTIMATED_PRESETS``): images/s of the
cpu preset's models on 2 Ray Train workers (README), times the speed of other models relative to them
(``benchmarks/sweep_rates.py``, 2 threads; crops scale as (64 / crop) ** 1.5 there); unmeasured models count
as the cpu preset's. The sweep's progress line starts from the same estimates (``progress.py``).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from ddps.refiner.steps import step_times

if TYPE_CHECKING:
    from ddps.orchestration.plan import Cell, Plan, Training

RATE = {"base": 170.0, "stage1": 99.0, "stage2": 99.0, "multistep": 99.0, "head": 99.0}
BASE_RATIO = {"deeplabv3plus-mobilenet_v2": 0.52, "deeplabv3plus-resnet18": 0.58,
              "deeplabv3plus-resnet50": 0.26, "segformer-mit_b1": 0.51}  # by Training.model (arch-backbone)
DENOISER_RATIO = {"XXS": 1.25, "XS": 1.0, "T": 0.58, "S": 0.35}  # by Training.model (the denoiser's size)
START_S = 25.0  # starting and stopping a TorchTrainer (worker processes, imports, mapping the feature cache)
EVAL_CALLS_PER_S = 400.0  # denoiser calls per second in evaluation (1,000 images x 60 calls in 151 s)
EVAL_START_S = 20.0
ESTIMATED_PRESETS = ("smoke", "cpu")


def _pixels(crop: int) -> float:
    """How much slower than at the cpu preset's 64-pixel crops (measured: ~ the 1.5th power of the side)."""
    return (crop / 64) ** 1.5


def training_seconds(t: Training) -> float:
    """One training from scratch: a start-up, then its images at its model's rate; an imported base none."""
    if t.imported:
        return 0.0
    speed = (BASE_RATIO if t.step == "base" else DENOISER_RATIO).get(t.model, 1.0) / _pixels(t.crop)
    return START_S + t.iters * t.batch_size / (RATE[t.step] * speed)


def trial_seconds(t: Training) -> float:
    """A training's sweep trial; one whose checkpoint exists only logs its MLflow run (a start-up); an imported
    base is no training."""
    return (0.0 if t.imported else START_S) if t.path.exists() else training_seconds(t)


def cell_seconds(cell: Cell) -> float:
    """A cell's evaluation: its denoiser calls (every step, x3 with the reliance diagnostic, every scale and
    mirror image of a multi-scale evaluation, x2 with guidance) over its images."""
    cfg = cell.cfg
    steps = len(step_times(cfg.diffusion.steps, min(cfg.infer.steps, cfg.diffusion.steps), cfg.infer.times))
    calls = 1 if cfg.denoiser.method == "head" else steps * (3 if cell.reliance else 1)
    if cfg.eval.multiscale:  # every scale (and its mirror image) refined once more
        calls += (1 if cfg.denoiser.method == "head" else steps) * len(cfg.eval.scales) * (
            2 if cfg.eval.flip else 1)
    calls *= 2 if cfg.infer.cfg_scale > 0 else 1  # guidance: a conditional and an unconditional call
    return EVAL_START_S + cell.images * calls / EVAL_CALLS_PER_S / _pixels(cfg.data.crop)


def duration(seconds: float) -> str:
    minutes = round(seconds / 60)
    return f"{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 else f"{minutes} min"


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
            step = f"{t.step} (imported)" if t.imported else t.step
            steps[step] = steps.get(step, 0) + 1
        detail = ", ".join(f"{n} {s}" for s, n in steps.items())
        finished_here = finished.get(p.experiment.name, set())
        unfinished = {c.eval_hash: cell_seconds(c) for c in p.cells if c.eval_hash not in finished_here}
        evals = sum(unfinished.values())
        unfinished_in_all += len(unfinished)
        alone = evals + sum(training_seconds(t) for t in p.to_train)
        in_order = evals + sum(training_seconds(t) for t in p.to_train if t.hash not in earlier)
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
