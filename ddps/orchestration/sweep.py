"""Sweeps: an experiment's plan (``plan.py``) run with Ray Tune — every training once, every cell evaluated.

Tune runs trials side by side but knows no order between them, and a stage needs its base: the plan runs
as **waves**, one ``Tuner`` each — bases, first refiner stages (stage 1, multi-step, head), stage 2, then the
evaluations. A training trial starts the step's ``TorchTrainer`` (its own data-parallel workers), an
evaluation trial evaluates in its own process; both call the pipeline's own step and evaluation code. A
trial's config is ``{"trial": {"label": ..., "job": Job}}``: its ``Job`` (what to run, and the ``SweepContext``
its table's trials share) passed through Tune's ``param_space`` as the object itself, and the job's label
beside it for the trial's name (Tune names a trial before it swaps its placeholders for such objects).
Several tables (``--all``) run as one schedule (``run_together``): every table's bases in one wave, every
first stage in the next, and so on, so the cluster stays full until the end and a training two tables
share runs once.

Resources: a training trial holds ``TRIAL_CPUS`` and its TorchTrainer workers ``workers x cpus_per_worker``,
so as many trainings run at once as the cluster's CPUs hold both (``docs/design.md``, on Ray's logical CPUs);
an evaluation trial holds ``workers x cpus_per_worker`` CPUs and uses as many threads, and with --gpu one GPU
it evaluates on (``trial_resources``). The live progress line
is ``progress.py``'s, its estimates ``estimates.py``'s.

MLflow: one experiment per table (the experiment file's ``name``); one parent run per sweep (tag
``ddps.sweep``, the hash of its cells' evaluations); one training run per trained model, tagged with its
content hash and found in any experiment (a model trained by another table or by ``ddps pipeline`` is
reused, not retrained); one evaluation run per cell, tagged ``ddps.table`` / ``ddps.row`` / ``ddps.column``
/ ``ddps.cell`` and ``ddps.training_run`` (the id of the run that trained its model).

Resume: a training whose checkpoint exists and has a FINISHED run, and a cell with a FINISHED evaluation
run, are not run again; runs an interrupted driver left RUNNING are marked KILLED. Running the same sweep
twice trains and logs nothing the second time.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Callable

from ddps import names
from ddps.config import from_flat, to_flat
from ddps.errors import DDPSError
from ddps.orchestration.estimates import cell_seconds, trial_seconds
from ddps.orchestration.plan import Cell, Plan, Training, chain_of, eval_hash
from ddps.orchestration.progress import Progress, say, tune_callback
from ddps.orchestration.ray_train import Cluster
from ddps.orchestration.tracking import Tracker, TrackingError, resolve_tracking_uri, sqlite_path
from ddps.storage import STORAGE_VAR, ray_storage, storage_uri

TRIAL_CPUS = 0.25  # what a training trial itself holds beside its TorchTrainer workers (Tune refuses 0)
WAVES = ("bases", "first stages", "second stages", "evaluations")


class SweepError(DDPSError):
    """A trial of the sweep failed."""


@dataclass(frozen=True)
class SweepContext:
    """What every trial of one table's sweep shares."""
    cluster: Cluster
    tracking_uri: str
    table: str  # the experiment file's name: its MLflow experiment and tag ddps.table
    parent: str  # the sweep's parent run
    sweep: str  # the sweep's hash (tag ddps.sweep)
    eval_cpus: float  # what an evaluation trial holds, and its threads
    prefix: str = ""  # before each label: the table's name where several tables run together
    storage: str | None = field(default_factory=storage_uri)  # the driver's (--storage), whatever a node's env says


@dataclass(frozen=True)
class Job:
    """One trial: a training (``kind`` train) or a cell's evaluation (``kind`` eval)."""
    kind: str
    context: SweepContext
    cfg: dict  # the cell's config, flat (to_flat): small to pickle
    label: str  # its name in the progress line and its trial's
    seconds: float  # estimated (estimates.py)
    index: int = 0  # a training's position in its chain (base 0)
    iters: int | None = None  # a training's iterations
    hash: str = ""  # a training's content hash: one two tables share runs once
    tags: dict = field(default_factory=dict)  # an evaluation's: where its cell sits in the table
    reliance: bool = False  # an evaluation that also runs the mask-reliance diagnostic


def sweep_hash(p: Plan) -> str:
    payload = json.dumps({"table": p.experiment.name, "preset": p.preset,
                          "cells": sorted(c.eval_hash for c in p.cells)}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def cell_tags(p: Plan, cell: Cell) -> dict[str, str]:
    """Where a cell sits in its printed table: the labels of its row axes and of its column axes."""
    exp = p.experiment
    return {names.TABLE: exp.name,
            names.ROW: " / ".join(cell.coords[a] for a in exp.rows),
            names.COLUMN: " / ".join(cell.coords[a] for a in exp.columns),
            names.CELL: ", ".join(f"{k}={v}" for k, v in cell.coords.items()),
            **{names.AXIS + k: v for k, v in cell.coords.items()}}


def _label(cell: Cell) -> str:
    return " ".join(f"{k}={v}" for k, v in cell.coords.items())


# ---- what is left to do ---------------------------------------------------------------------------

@dataclass
class Pending:
    trainings: list[list[tuple[Training, Cell]]]  # per wave (chain position): the training, a cell needing it
    cells: list[Cell]

    @property
    def empty(self) -> bool:
        return not self.cells and not any(self.trainings)


def pending(p: Plan, tracker: Tracker, experiment_id: str) -> Pending:
    """Trainings without a checkpoint or without a FINISHED run (anywhere); cells without a FINISHED
    evaluation run in this experiment."""
    everywhere = tracker.experiment_ids()
    waves: list[list[tuple[Training, Cell]]] = [[], [], []]
    seen: set[str] = set()
    for cell in p.cells:
        for i, t in enumerate(cell.chain):
            if t.hash in seen:
                continue
            seen.add(t.hash)
            if not (t.path.exists() and tracker.find_run(everywhere, {names.STEP: t.step, names.CONTENT_HASH: t.hash})):
                waves[i].append((t, cell))
    finished = finished_evaluations(tracker, experiment_id)
    return Pending(waves, [c for c in p.cells if c.eval_hash not in finished])


def finished_evaluations(tracker: Tracker, experiment_id: str) -> set[str]:
    """The content hashes of the cells of this experiment with a FINISHED evaluation run (one query)."""
    return {r.data.tags.get(names.CONTENT_HASH) for r in tracker.runs(experiment_id, {names.STEP: names.STEP_EVAL})
            if r.info.status == "FINISHED"}


def finished_cells(plans: list[Plan], tracking_uri: str | None, log: Callable[[str], None] | None = None
                   ) -> dict[str, set[str]]:
    """Per table, the evaluation hashes of its cells with a FINISHED evaluation run — what a sweep would skip.
    Empty where the store does not exist yet (nothing is created) or cannot be reached (said in one line)."""
    uri = resolve_tracking_uri(tracking_uri)
    db = sqlite_path(uri)
    if db and not db.exists():
        return {}
    try:
        tracker = Tracker(uri)
    except TrackingError as e:
        (log or say)(f"{e}: finished cells not counted")
        return {}
    found = {p.experiment.name: tracker.client.get_experiment_by_name(p.experiment.name) for p in plans}
    return {name: finished_evaluations(tracker, e.experiment_id) for name, e in found.items() if e is not None}


# ---- the trial ------------------------------------------------------------------------------------

def trial_resources(cluster: Cluster, evaluation: bool, eval_cpus: float) -> dict:
    """What a trial holds: a training trial TRIAL_CPUS (its TorchTrainer's workers hold their own CPUs and
    GPUs); an evaluation trial ``eval_cpus`` and, with --gpu, the GPU it evaluates on (Tune gives the trial
    its own through CUDA_VISIBLE_DEVICES)."""
    if not evaluation:
        return {"CPU": TRIAL_CPUS}
    return {"CPU": eval_cpus, "GPU": 1} if cluster.use_gpu else {"CPU": eval_cpus}


def _trial(config: dict) -> None:
    """One Tune trial: one training (on its own TorchTrainer) or one cell's evaluation (in this process, on
    the trial's GPU with --gpu)."""
    import torch
    from ray import tune

    from ddps.orchestration.pipeline import Pipeline
    job: Job = config["trial"]["job"]
    context, cfg = job.context, from_flat(job.cfg)
    if context.storage:
        os.environ[STORAGE_VAR] = context.storage
    pipeline = Pipeline(cfg, context.cluster, tracking_uri=context.tracking_uri, experiment=context.table, tune=True,
                        parent=context.parent, extra_tags={names.SWEEP: context.sweep, names.TABLE: context.table})
    chain = chain_of(cfg)
    if job.kind == "train":
        tune.report({"run_id": pipeline.train(chain, job.index)})
        return
    torch.set_num_threads(max(1, int(context.eval_cpus)))
    last = chain[-1]
    training_run = pipeline.tracker.find_run(pipeline.tracker.experiment_ids(),
                                             {names.STEP: last.step, names.CONTENT_HASH: last.hash}) or ""
    summary = pipeline.evaluate(last.path, eval_hash(cfg, chain), cell={**job.tags, names.TRAINING_RUN: training_run},
                                reliance=job.reliance, log_model=job.reliance, name=job.label)
    tune.report({names.LAST_MIOU: summary.get(names.LAST_MIOU, math.nan)})


# ---- the sweep ------------------------------------------------------------------------------------

@dataclass
class Sweep:
    plan: Plan
    cluster: Cluster = field(default_factory=Cluster)
    tracking_uri: str | None = None
    log: Callable[[str], None] = say

    def __post_init__(self):
        self.tracker = Tracker(self.tracking_uri)  # an unreachable server fails here, before any compute
        self.experiment_id = self.tracker.experiment(self.plan.experiment.name)
        self.hash = sweep_hash(self.plan)

    def resources(self) -> tuple[int, int, float]:
        """(trainings at once, evaluations at once, CPUs of an evaluation) from what the cluster has."""
        import ray
        total = ray.cluster_resources().get("CPU", 1.0)
        workers = self.cluster.workers * self.cluster.cpus_per_worker
        # a local Ray counts a training trial's TRIAL_CPUS as logical CPUs beside the cores (ensure_ray):
        # evaluations, which hold only their own CPUs, stay within the cores
        cores = total if os.environ.get("RAY_ADDRESS") else min(total, os.cpu_count() or 1)
        return (max(1, int(total // (workers + TRIAL_CPUS))), max(1, int(cores // workers)), workers)

    def run(self) -> Pending:
        """Run what is left of the plan; returns what was left when it started."""
        return run_together([self], self.log)[0]

    def prepare(self, prefix: str = "") -> tuple[Pending, SweepContext | None]:
        """What is left of the plan and, when something is, what every trial of this sweep shares: its
        parent run among it (after KILLED-marking what an earlier driver left RUNNING)."""
        p, tracker = self.plan, self.tracker
        todo = pending(p, tracker, self.experiment_id)
        name = p.experiment.name
        if todo.empty:
            self.log(f"[sweep {name}] all {len(p.cells)} cells of preset {p.preset} are finished in MLflow "
                     f"experiment {name}: nothing to run")
            return todo, None
        stale = tracker.mark_stale(self.experiment_id, {names.SWEEP: self.hash})
        if stale:
            self.log(f"[sweep {name}] marked {stale} run(s) left RUNNING by an earlier driver as KILLED")
        return todo, SweepContext(self.cluster, tracker.uri, name, self._parent(), self.hash, self.resources()[2],
                                  prefix)

    def train_jobs(self, todo: Pending, wave: int, context: SweepContext) -> list[Job]:
        return [Job("train", context, to_flat(cell.cfg), f"{context.prefix}{t.step} {t.hash[:8]} ({_label(cell)})",
                    trial_seconds(t), index=wave, iters=t.iters, hash=t.hash) for t, cell in todo.trainings[wave]]

    def eval_jobs(self, todo: Pending, context: SweepContext) -> list[Job]:
        return [Job("eval", context, to_flat(c.cfg), f"{context.prefix}{_label(c)}", cell_seconds(c),
                    tags=cell_tags(self.plan, c), reliance=c.reliance) for c in todo.cells]

    def _parent(self) -> str:
        """The sweep's parent run: the one an earlier driver of the same sweep started, else a new one."""
        p, tracker = self.plan, self.tracker
        tags = {names.STEP: names.STEP_SWEEP, names.SWEEP: self.hash}
        order = {names.ORDER: json.dumps(p.axis_order)}  # the printed table's row and column order
        runs = tracker.runs(self.experiment_id, tags)
        if runs:
            run_id = runs[0].info.run_id
            tracker.set_status(run_id, "RUNNING")
            tracker.set_tags(run_id, order)
            return run_id
        from ddps.orchestration.pipeline import run_tags
        cfg = p.cells[0].cfg
        run_id = tracker.start_run(self.experiment_id, f"sweep-{p.experiment.name}-{p.preset}-{self.hash[:8]}",
                                   {**run_tags(cfg), **tags, names.TABLE: p.experiment.name,
                                    names.TITLE: p.experiment.title, names.CELLS: len(p.cells),
                                    names.ROWS: ",".join(p.experiment.rows),
                                    names.COLUMNS: ",".join(p.experiment.columns), **order})
        tracker.log_params(run_id, {"sweep.experiment_file": str(p.experiment.path), "sweep.preset": p.preset,
                                    "sweep.cells": len(p.cells), "sweep.trainings": len(p.trainings),
                                    "sweep.naive_trainings": p.naive_trainings})
        return run_id


# ---- the waves ------------------------------------------------------------------------------------

def _run_wave(name: str, wave: str, jobs: list[Job], resources: dict, at_once: int, progress: Progress) -> None:
    """One Tuner (run ``name``) over the jobs of a wave, ``at_once`` trials at a time; a failed trial fails
    the wave."""
    if not jobs:
        return
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # Tune's legacy reporter, which verbose=0 silences
    import logging

    from ray import tune
    logging.getLogger("ray.tune").setLevel(logging.WARNING)  # not a line per wave about its state files
    progress.wave = f"{wave} ({len(jobs)})"
    storage_path, filesystem = ray_storage("ray/tune")  # Tune's state beside Ray Train's, in the storage
    tuner = tune.Tuner(
        tune.with_resources(_trial, resources),
        param_space={"trial": tune.grid_search([{"label": job.label, "job": job} for job in jobs])},
        tune_config=tune.TuneConfig(max_concurrent_trials=at_once,
                                    trial_name_creator=_trial_name, trial_dirname_creator=_trial_name),
        run_config=tune.RunConfig(name=name, storage_path=storage_path, storage_filesystem=filesystem, verbose=0,
                                  callbacks=[tune_callback(progress)],
                                  failure_config=tune.FailureConfig(max_failures=0)),
    )
    results = tuner.fit()
    if interrupted(results):
        raise KeyboardInterrupt  # Ctrl-C: Tune saved its state and returned; the next wave must not start
    errors = [(r.config["trial"]["label"], r.error) for r in results if r.error]
    if errors:
        label, error = errors[0]
        raise SweepError(f"{len(errors)} of {len(jobs)} {wave} failed; the first, {label}: "
                         f"{_last_line(error)}")


def interrupted(results) -> bool:
    """Whether Tune's run stopped before every trial ended: on SIGINT (Ctrl-C) Tune saves its state and
    returns normally, its unfinished trials TERMINATED as the finished ones; only a finished trial's last
    result says ``done``."""
    return any(not r.error and not r.metrics.get("done") for r in results)


def _trial_name(trial) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", trial.config["trial"]["label"])[:100] + f"_{trial.trial_id}"


def _last_line(error: BaseException) -> str:
    lines = [line for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def _once(jobs: list[Job]) -> list[Job]:
    """Each training once: a training two tables share runs as the first table's job."""
    first: dict[str, Job] = {}
    for job in jobs:
        first.setdefault(job.hash, job)
    return list(first.values())


def run_together(sweeps: list[Sweep], log=say) -> list[Pending]:
    """Several tables as one schedule: every table's bases in one wave, then every first stage, every second
    stage, every evaluation — so that as many trials run at once as the cluster holds from the first to the
    last, rather than a table's last, lonely training leaving cores idle. A training two tables share runs
    once (under the first table's experiment); each table keeps its parent run, tags and resumption. The
    sweeps share one tracking store (run_sweeps makes them so)."""
    several = len(sweeps) > 1  # labels then name their table
    every = [(s, *s.prepare(prefix=f"{s.plan.experiment.name}: " if several else "")) for s in sweeps]
    prepared = [(s, todo, context) for s, todo, context in every if not todo.empty]
    if not prepared:
        return [todo for _, todo, _ in every]
    waves = [_once([job for s, todo, c in prepared for job in s.train_jobs(todo, wave, c)]) for wave in range(3)]
    waves.append([job for s, todo, c in prepared for job in s.eval_jobs(todo, c)])
    if several:
        name = f"{len(prepared)} tables"
        run_name = "all-" + hashlib.sha256(" ".join(c.sweep for _, _, c in prepared).encode()).hexdigest()[:8]
    else:
        name, run_name = prepared[0][2].table, f"{prepared[0][2].table}-{prepared[0][2].sweep[:8]}"
    cells = sum(len(s.plan.cells) for s, _, _ in prepared)
    progress = Progress(name, sum(map(len, waves)), cells, cells - len(waves[3]), log)
    progress.add(sum(job.seconds for jobs in waves for job in jobs))
    trainings_at_once, evals_at_once, eval_cpus = prepared[0][0].resources()
    cluster = prepared[0][0].cluster
    with prepared[0][0].tracker.ending(*(c.parent for _, _, c in prepared)):
        for i, jobs in enumerate(waves):
            at_once = trainings_at_once if i < 3 else evals_at_once
            _run_wave(f"{run_name}-{WAVES[i].replace(' ', '-')}", WAVES[i], jobs,
                      trial_resources(cluster, i == 3, eval_cpus), at_once, progress)
    return [todo for _, todo, _ in every]


def run_sweeps(plans: list[Plan], cluster: Cluster, tracking_uri: str | None = None, log=say,
               verbose: bool = False) -> list[Pending]:
    """One table, or several as one schedule (run_together), on the cluster in RAY_ADDRESS or an in-process
    Ray with room for a trial beside its workers."""
    from ddps.orchestration.runtime import check_gpu, ensure_ray
    check_gpu(cluster)  # --gpu on a machine without one: one line before MLflow and Ray start
    sweeps = [Sweep(p, cluster, tracking_uri, log) for p in plans]  # every tracking check before compute
    ensure_ray(cluster, extra_cpus=TRIAL_CPUS, log_to_driver=verbose, log=log)
    if not verbose and os.environ.get("RAY_ADDRESS"):  # an in-process Ray's start said where (ensure_ray)
        log("workers' output goes to Ray's logs (/tmp/ray/session_latest/logs; --verbose shows it here)")
    if len(sweeps) == 1:
        return [sweeps[0].run()]
    return run_together(sweeps, log)
