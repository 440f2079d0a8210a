"""The dry run: what a plan (``plan.py``) costs — its trainings and evaluations, and their time on this machine.

The rates are measured on this 2-core machine, for its presets only (``ESTIMATED_PRESETS``): images/s of the
cpu preset's models on 2 Ray Train workers (README), times the speed of other models relative to them
(``benchmarks/sweep_rates.py``, 2 threads; crops scale as (64 / crop) ** 1.5 there); unmeasured models count
as the cpu preset's. A refiner's training and evaluation also scale by its denoiser.mask_scale (the masks'
resolution: 64 x 64 at mask_scale 1 against the cpu preset's 16 x 16), at the speeds ``sweep_rates.py
--mask-scales`` measured relative to mask_scale 4 (MASK_SCALE_TRAIN_RATIO, MASK_SCALE_EVAL_RATIO); a base does not
depend on it. The sweep's progress line starts from the same estimates (``progress.py``).

Other presets (the ``paper`` one) get GPU-hours instead, from the rates ``benchmarks/gpu.py`` measured on a GPU
(``ddps.rates``: base and refiner training images/s, evaluation denoiser calls/s, per precision, at its
shapes); models and crops other than those measured are counted at the measured rates, scaled by their
pixels, and refiners at another mask scale by their masks' pixels (the rates are measured at mask_scale 4
only). Without a rates file the dry run says that no GPU rate was measured.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from ddps.rates import GPURates
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
# A refiner's held-out check runs in the main Ray Train worker alone (one thread of its worker's share, the other
# workers waiting): denoiser calls per second measured on the prior pilot's stage 2 (cpu preset, 2 workers, check
# with train.check_reliance: 200 holdout images x 41 calls in ~60 s, three checks alike).
CHECK_CALLS_PER_S = 137.0
# Speed at each denoiser.mask_scale relative to the cpu preset's 4 (UNet-XS, 64-pixel crops, 2 threads, CPU-time
# ratios): training images/s and evaluation denoiser calls/s (10 test steps), measured by
#   OMP_WAIT_POLICY=PASSIVE benchmarks/sweep_rates.py --mask-scales 4,8,2,1 --repeats 1 --steps 2 --eval-steps 10
# Training slows about as the masks' pixels grow (x4 at 2, x16 at 1); evaluation less, its decoding and scoring
# of every step at the label size do not grow. No power law fits both steps: a table (8 measured, not extrapolated).
MASK_SCALE_TRAIN_RATIO = {8: 2.08, 4: 1.0, 2: 0.315, 1: 0.065}
MASK_SCALE_EVAL_RATIO = {8: 1.48, 4: 1.0, 2: 0.461, 1: 0.157}
ESTIMATED_PRESETS = ("smoke", "cpu")


def _pixels(crop: int) -> float:
    """How much slower than at the cpu preset's 64-pixel crops (measured: ~ the 1.5th power of the side)."""
    return (crop / 64) ** 1.5


def training_seconds(t: Training) -> float:
    """One training from scratch: a start-up, then its images at its model's rate (a refiner's at its mask
    scale's) and a refiner's held-out checks at theirs; an imported base none."""
    if t.imported:
        return 0.0
    if t.step == "base":
        speed = BASE_RATIO.get(t.model, 1.0) / _pixels(t.crop)
        return START_S + t.iters * t.batch_size / (RATE[t.step] * speed)
    speed = DENOISER_RATIO.get(t.model, 1.0) * MASK_SCALE_TRAIN_RATIO[t.mask_scale] / _pixels(t.crop)
    checks = t.check_calls / (CHECK_CALLS_PER_S * MASK_SCALE_EVAL_RATIO[t.mask_scale] / _pixels(t.crop))
    return START_S + t.iters * t.batch_size / (RATE[t.step] * speed) + checks


def trial_seconds(t: Training) -> float:
    """A training's sweep trial; one whose checkpoint exists only logs its MLflow run (a start-up); an imported
    base is no training."""
    return (0.0 if t.imported else START_S) if t.path.exists() else training_seconds(t)


def cell_seconds(cell: Cell) -> float:
    """A cell's evaluation on this machine: its denoiser calls over its images, at its mask scale's rate."""
    speed = MASK_SCALE_EVAL_RATIO[cell.cfg.denoiser.mask_scale] / _pixels(cell.cfg.data.crop)
    return EVAL_START_S + cell.images * cell_calls(cell) / (EVAL_CALLS_PER_S * speed)


def test_steps(cfg) -> int:
    """The refinement steps of one trajectory at test time (infer.steps of the diffusion.steps, infer.times)."""
    return len(step_times(cfg.diffusion.steps, min(cfg.infer.steps, cfg.diffusion.steps), cfg.infer.times))


def cell_calls(cell: Cell) -> int:
    """Denoiser calls per image of a cell's evaluation: every step, x3 with the reliance diagnostic, every
    scale and mirror image of a multi-scale evaluation, x2 with guidance."""
    cfg = cell.cfg
    steps = test_steps(cfg)
    calls = 1 if cfg.denoiser.method == "head" else steps * (3 if cell.reliance else 1)
    if cfg.eval.multiscale:  # every scale (and its mirror image) refined once more
        calls += (1 if cfg.denoiser.method == "head" else steps) * len(cfg.eval.scales) * (
            2 if cfg.eval.flip else 1)
    calls *= 2 if cfg.infer.cfg_scale > 0 else 1  # guidance: a conditional and an unconditional call
    return calls


class NoRate(Exception):
    """The rates file has no rate for this precision."""


def _gpu_mask_pixels(mask_scale: int, rates: GPURates) -> float:
    """A refiner's cost on a GPU relative to the rates' mask scale: its masks' pixels. benchmarks/gpu.py
    measures at the paper preset's mask_scale 4 only (its file names no other), so there is no measured basis
    for a GPU's ratios, and the pixels are a first guess: the base's forward pass in its refiner rate does not
    grow with the masks, the UNet's middle attention grows with their square (on this machine, MASK_SCALE_*)."""
    return (rates.shapes.get("mask_scale", 4) / mask_scale) ** 2


def gpu_training_hours(t: Training, rates: GPURates) -> float:
    """One training on GPUs at the measured rate of its kind and precision, scaled by its crop's pixels (a
    refiner also by its masks' pixels)."""
    if t.imported:
        return 0.0
    table = rates.base_images_per_s if t.step == "base" else rates.refiner_images_per_s
    if t.precision not in table:
        raise NoRate(t.precision)
    scale = (t.crop / rates.shapes["crop"]) ** 2 * (1.0 if t.step == "base" else _gpu_mask_pixels(t.mask_scale, rates))
    return t.iters * t.batch_size * scale / table[t.precision] / 3600


def gpu_cell_hours(cell: Cell, rates: GPURates) -> float:
    """A cell's evaluation on a GPU: its denoiser calls over its images at the measured calls/s, scaled by its
    crop's pixels and its masks'."""
    precision = cell.cfg.eval.precision
    if precision not in rates.eval_calls_per_s:
        raise NoRate(precision)
    scale = (cell.cfg.data.crop / rates.shapes["crop"]) ** 2 * _gpu_mask_pixels(cell.cfg.denoiser.mask_scale, rates)
    return cell.images * cell_calls(cell) * scale / rates.eval_calls_per_s[precision] / 3600


def duration(seconds: float) -> str:
    minutes = round(seconds / 60)
    return f"{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 else f"{minutes} min"


def _evaluations(total: int, left: int) -> str:
    return str(total) if left == total else f"{total} ({total - left} finished)"


def describe(plans: list[Plan], finished: dict[str, set[str]] | None = None, gpu_rates: GPURates | None = None,
             rates_source: str = "") -> str:
    """The dry run's printout: per table, cells, trainings (planned / naive), evaluations, and the estimated
    time alone (every training it needs that is not trained yet, every evaluation not finished yet) and in
    this order (after the tables above it have trained what they share with it). ``finished``: per
    experiment name, the evaluation hashes of its cells with a FINISHED run in MLflow. For presets this
    machine's rates do not cover, GPU-hours from ``gpu_rates`` (read from ``rates_source``), or a line that no
    GPU rate was measured."""
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
        lines.append(_gpu_hours(plans, finished, gpu_rates, rates_source))
    return "\n".join(lines)


def _gpu_hours(plans: list[Plan], finished: dict[str, set[str]], rates: GPURates | None, source: str) -> str:
    """GPU-hours per table (what is left of it, alone) at the measured rates, or why there are none."""
    if rates is None:
        return (f"no GPU rate measured: benchmarks/gpu.py writes one when it runs on a GPU "
                f"({source or '$DDPS_HOME/rates/gpu.json'}; give another with --gpu-rates FILE)")
    shapes = ", ".join(f"{k} {v}" for k, v in sorted(rates.shapes.items()))
    lines = [f"\nGPU-hours at the rates benchmarks/gpu.py measured on {rates.device} ({rates.measured}; {shapes}; "
             f"{source}): other models counted at the measured models' rates, other crops scaled by their pixels, "
             f"other mask scales by their masks' pixels; a training on N GPUs takes about as many GPU-hours as "
             f"on one\n",
             "| experiment | trainings | evaluations | GPU-hours alone |", "|---|---|---|---|"]
    for p in plans:
        done = finished.get(p.experiment.name, set())
        try:
            train = sum(gpu_training_hours(t, rates) for t in p.to_train)
            evals = sum(gpu_cell_hours(c, rates) for c in p.cells if c.eval_hash not in done)
        except NoRate as e:
            lines.append(f"| {p.experiment.name} | no GPU rate measured for {e.args[0]} | | |")
            continue
        lines.append(f"| {p.experiment.name} | {train:.1f} | {evals:.1f} | {train + evals:.1f} |")
    return "\n".join(lines)
