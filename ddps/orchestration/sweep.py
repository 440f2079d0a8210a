"""Sweeps: an experiment's plan (``plan.py``) run with Ray Tune — every training once, every cell evaluated.

Tune runs trials side by side but knows no order between them, and a stage needs its base: the plan runs
as **waves**, one ``Tuner`` each — bases, first refiner stages (stage 1, multi-step, head), stage 2, then the
evaluations. A training trial starts the step's ``TorchTrainer`` (its own data-parallel workers), an
evaluation trial evaluates in its own process; both call the pipeline's own step and evaluation code.
Several tables (``--all``) run as one schedule (``run_together``): every table's bases in one wave, every
first stage in the next, and so on, so the cluster stays full until the end and a training two tables
share runs once.

Resources: a training trial holds ``TRIAL_CPUS`` and its TorchTrainer workers ``workers x cpus_per_worker``,
so as many trainings run at once as the cluster's CPUs hold both (DESIGN.md: logical CPUs); an evaluation
trial holds ``workers x cpus_per_worker`` CPUs and uses as many threads.

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
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

from ddps.config import from_flat, to_flat
from ddps.errors import DDPSError
from ddps.orchestration.plan import START_S, Cell, Plan, Training, duration, chain_of, eval_hash
from ddps.orchestration.ray_train import Cluster
from ddps.orchestration.tracking import Tracker, TrackingError, resolve_tracking_uri, sqlite_path
from ddps.paths import cache_dir

TRIAL_CPUS = 0.25  # what a training trial itself holds beside its TorchTrainer workers (Tune refuses 0)
WAVES = ("bases", "first stages", "second stages", "evaluations")


class SweepError(DDPSError):
    """A trial of the sweep failed."""


def sweep_hash(p: Plan) -> str:
    payload = json.dumps({"table": p.experiment.name, "preset": p.preset,
                          "cells": sorted(c.eval_hash for c in p.cells)}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def cell_tags(p: Plan, cell: Cell) -> dict[str, str]:
    """Where a cell sits in its printed table: the labels of its row axes and of its column axes."""
    exp = p.experiment
    return {"ddps.table": exp.name,
            "ddps.row": " / ".join(cell.coords[a] for a in exp.rows),
            "ddps.column": " / ".join(cell.coords[a] for a in exp.columns),
            "ddps.cell": ", ".join(f"{k}={v}" for k, v in cell.coords.items()),
            **{f"axis.{k}": v for k, v in cell.coords.items()}}


def axis_order(p: Plan) -> dict[str, list[str]]:
    """Each axis's labels in the experiment file's order (the report prints rows and columns so)."""
    order: dict[str, list[str]] = {}
    for cell in p.cells:
        for axis, label in cell.coords.items():
            if label not in order.setdefault(axis, []):
                order[axis].append(label)
    return order


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
            if not (t.path.exists() and tracker.find_run(everywhere, {"ddps.step": t.step, "ddps.content_hash": t.hash})):
                waves[i].append((t, cell))
    finished = finished_evaluations(tracker, experiment_id)
    return Pending(waves, [c for c in p.cells if c.eval_hash not in finished])


def finished_evaluations(tracker: Tracker, experiment_id: str) -> set[str]:
    """The content hashes of the cells of this experiment with a FINISHED evaluation run (one query)."""
    return {r.data.tags.get("ddps.content_hash") for r in tracker.runs(experiment_id, {"ddps.step": "eval"})
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

def _trial(config: dict) -> None:
    """One Tune trial: one training (on its own TorchTrainer) or one cell's evaluation."""
    import torch
    from ray import tune

    from ddps.orchestration.pipeline import Pipeline
    job = config["job"]
    common = job.get("common") or config["common"]  # a job of a merged run carries its own table's
    cfg = from_flat(job["cfg"])
    pipeline = Pipeline(cfg, Cluster(**common["cluster"]), tracking_uri=common["tracking_uri"],
                        experiment=common["experiment"], tune=True)
    pipeline.parent = common["parent"]
    pipeline.tags.update({"ddps.sweep": common["sweep"], "ddps.table": common["table"]})
    chain = chain_of(cfg)
    if job["kind"] == "train":
        run_id = pipeline.train(chain, job["index"])
        tune.report({"run_id": run_id})
        return
    torch.set_num_threads(max(1, int(common["eval_cpus"])))
    last = chain[-1]
    training_run = pipeline.tracker.find_run(pipeline.tracker.experiment_ids(),
                                             {"ddps.step": last.step, "ddps.content_hash": last.hash}) or ""
    summary = pipeline.evaluate(last.path, eval_hash(cfg, chain), cell={**job["tags"], "ddps.training_run": training_run},
                                reliance=job["reliance"], log_model=job["reliance"], name=job["label"])
    tune.report({"last_mIoU": summary.get("last_mIoU", math.nan)})


# ---- progress -------------------------------------------------------------------------------------

def say(line: str) -> None:
    """The sweep's default log: print, looked up when called (Ray swaps builtins.print in some processes)."""
    print(line, flush=True)


class Progress:
    """The sweep's live line over Tune's own reporter (silenced): jobs done / total, cells done / total, what
    runs now (a training with its iteration), elapsed, and an ETA — the plan's estimate of what is left,
    scaled by how the estimate has held so far. On a terminal the line rewrites itself; in a log, one line
    per event."""

    def __init__(self, table: str, jobs: int, cells_total: int, cells_done: int, log: Callable[[str], None]):
        self.table, self.jobs, self.cells_total, self.cells_done = table, jobs, cells_total, cells_done
        self.log, self.done, self.failed = log, 0, 0
        self.estimate_left = 0.0
        self.estimate_done = 0.0
        self.running: dict[str, list] = {}  # label -> [estimated seconds, iteration text, fraction done]
        self.start = time.monotonic()
        self.wave = ""
        self.tty = log is say and sys.stdout.isatty()

    def __getstate__(self) -> dict:
        # Tune pickles its callbacks with the experiment's state: the log function (a logger's method, or
        # print while another thread has swapped builtins.print) stays with the driver
        return {**self.__dict__, "log": say}

    def add(self, seconds: float) -> None:
        self.estimate_left += seconds

    def started(self, job: dict) -> None:
        self.running[job["label"]] = [job["seconds"], "", 0.0]
        self.line()

    def result(self, job: dict, result: dict) -> None:
        if "iter" in result and job["label"] in self.running:
            self.running[job["label"]][1] = f" it {result['iter']}/{job.get('iters', '?')}"
            if job.get("iters"):
                self.running[job["label"]][2] = min(1.0, result["iter"] / job["iters"])
            self.line()

    def finished(self, job: dict, ok: bool) -> None:
        seconds = self.running.pop(job["label"], [0.0])[0]
        self.estimate_left -= seconds
        self.estimate_done += seconds
        self.done += 1
        self.failed += not ok
        self.cells_done += job["kind"] == "eval" and ok
        self.line(end=True)

    def line(self, end: bool = False) -> None:
        elapsed = time.monotonic() - self.start
        # how the estimate held so far: elapsed against the estimate of what finished, running jobs counted
        # by the fraction of their iterations done
        done = self.estimate_done + sum(seconds * fraction for seconds, _, fraction in self.running.values())
        left = self.estimate_left - sum(seconds * fraction for seconds, _, fraction in self.running.values())
        scale = elapsed / done if done > 60 else 1.0
        now = "; ".join(label + it for label, (_, it, _) in self.running.items()) or "-"
        failed = f", {self.failed} failed" if self.failed else ""
        text = (f"[sweep {self.table}] {self.wave}: jobs {self.done}/{self.jobs}{failed} | cells "
                f"{self.cells_done}/{self.cells_total} | running: {now} | {duration(elapsed)} elapsed, "
                f"ETA {duration(max(0.0, left) * scale)}")
        if self.tty:
            sys.stdout.write("\r\033[K" + text + ("\n" if end and not self.running else ""))
            sys.stdout.flush()
        else:
            self.log(text)


_PROGRESS: dict[int, Progress] = {}  # Tune pickles its callbacks: they find the driver's Progress by key


def _callback(progress: Progress):
    from ray import tune
    key = id(progress)
    _PROGRESS[key] = progress

    class ProgressCallback(tune.Callback):
        def on_trial_start(self, iteration, trials, trial, **info):
            _PROGRESS[key].started(trial.config["job"])

        def on_trial_result(self, iteration, trials, trial, result, **info):
            _PROGRESS[key].result(trial.config["job"], result)

        def on_trial_complete(self, iteration, trials, trial, **info):
            _PROGRESS[key].finished(trial.config["job"], True)

        def on_trial_error(self, iteration, trials, trial, **info):
            _PROGRESS[key].finished(trial.config["job"], False)

    return ProgressCallback()


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

    def prepare(self, prefix: str = "") -> tuple[Pending, dict]:
        """What is left of the plan and, when something is, the parent run (KILLED-marking what an earlier
        driver left RUNNING) and what every trial of this sweep shares."""
        p, tracker = self.plan, self.tracker
        todo = pending(p, tracker, self.experiment_id)
        name = p.experiment.name
        if todo.empty:
            self.log(f"[sweep {name}] all {len(p.cells)} cells of preset {p.preset} are finished in MLflow "
                     f"experiment {name}: nothing to run")
            return todo, {}
        stale = tracker.mark_stale(self.experiment_id, {"ddps.sweep": self.hash})
        if stale:
            self.log(f"[sweep {name}] marked {stale} run(s) left RUNNING by an earlier driver as KILLED")
        common = {"cluster": asdict(self.cluster), "tracking_uri": tracker.uri, "experiment": name,
                  "parent": self._parent(), "sweep": self.hash, "table": name, "eval_cpus": self.resources()[2],
                  "prefix": prefix}
        return todo, common

    def train_jobs(self, todo: Pending, wave: int, common: dict) -> list[dict]:
        return [{"kind": "train", "cfg": to_flat(cell.cfg), "index": wave, "seconds": _seconds(t), "iters": t.iters,
                 "label": f"{common['prefix']}{t.step} {t.hash[:8]} ({_label(cell)})", "hash": t.hash,
                 "common": common} for t, cell in todo.trainings[wave]]

    def eval_jobs(self, todo: Pending, common: dict) -> list[dict]:
        return [{"kind": "eval", "cfg": to_flat(c.cfg), "tags": cell_tags(self.plan, c), "reliance": c.reliance,
                 "seconds": c.eval_seconds, "label": f"{common['prefix']}{_label(c)}", "common": common}
                for c in todo.cells]

    def _parent(self) -> str:
        """The sweep's parent run: the one an earlier driver of the same sweep started, else a new one."""
        p, tracker = self.plan, self.tracker
        tags = {"ddps.step": "sweep", "ddps.sweep": self.hash}
        order = {"ddps.order": json.dumps(axis_order(p))}  # the printed table's row and column order
        runs = tracker.runs(self.experiment_id, tags)
        if runs:
            run_id = runs[0].info.run_id
            tracker.set_status(run_id, "RUNNING")
            tracker.set_tags(run_id, order)
            return run_id
        from ddps.orchestration.pipeline import run_tags
        cfg = p.cells[0].cfg
        run_id = tracker.start_run(self.experiment_id, f"sweep-{p.experiment.name}-{p.preset}-{self.hash[:8]}",
                                   {**run_tags(cfg), **tags, "ddps.table": p.experiment.name,
                                    "ddps.title": p.experiment.title, "ddps.cells": len(p.cells),
                                    "ddps.rows": ",".join(p.experiment.rows),
                                    "ddps.columns": ",".join(p.experiment.columns), **order})
        tracker.log_params(run_id, {"sweep.experiment_file": str(p.experiment.path), "sweep.preset": p.preset,
                                    "sweep.cells": len(p.cells), "sweep.trainings": len(p.trainings),
                                    "sweep.naive_trainings": p.naive_trainings})
        return run_id


# ---- the waves ------------------------------------------------------------------------------------

def _run_wave(wave: str, jobs: list[dict], common: dict, resources: dict, at_once: int,
              progress: Progress) -> None:
    """One Tuner over the jobs of a wave, ``at_once`` trials at a time; a failed trial fails the wave."""
    if not jobs:
        return
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # Tune's legacy reporter, which verbose=0 silences
    import logging

    from ray import tune
    logging.getLogger("ray.tune").setLevel(logging.WARNING)  # not a line per wave about its state files
    progress.wave = f"{wave} ({len(jobs)})"
    tuner = tune.Tuner(
        tune.with_resources(_trial, resources),
        param_space={"common": common, "job": tune.grid_search(jobs)},
        tune_config=tune.TuneConfig(max_concurrent_trials=at_once,
                                    trial_name_creator=_trial_name, trial_dirname_creator=_trial_name),
        run_config=tune.RunConfig(name=f"{common['table']}-{common['sweep'][:8]}-{wave.replace(' ', '-')}",
                                  storage_path=str(cache_dir("ray") / "tune"), verbose=0,
                                  callbacks=[_callback(progress)],
                                  failure_config=tune.FailureConfig(max_failures=0)),
    )
    results = tuner.fit()
    errors = [(r.config["job"]["label"], r.error) for r in results if r.error]
    if errors:
        label, error = errors[0]
        raise SweepError(f"{len(errors)} of {len(jobs)} {wave} failed; the first, {label}: "
                         f"{_last_line(error)}")


def _seconds(t: Training) -> float:
    """A training's estimate; one whose checkpoint exists only needs its MLflow run (a start-up)."""
    return START_S if t.path.exists() else t.seconds


def _trial_name(trial) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", trial.config["job"]["label"])[:100] + f"_{trial.trial_id}"


def _last_line(error: BaseException) -> str:
    lines = [line for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def _progress(name: str, todos: list[tuple[Sweep, Pending]], log) -> Progress:
    """One progress line over these sweeps' pending jobs (a training shared by two tables counted once)."""
    trainings = {t.hash: t for _, todo in todos for wave in todo.trainings for t, _ in wave}
    cells = sum(len(s.plan.cells) for s, _ in todos)
    left = sum(len(todo.cells) for _, todo in todos)
    progress = Progress(name, len(trainings) + left, cells, cells - left, log)
    for t in trainings.values():
        progress.add(_seconds(t))
    for _, todo in todos:
        for cell in todo.cells:
            progress.add(cell.eval_seconds)
    return progress


def run_together(sweeps: list[Sweep], log=say) -> list[Pending]:
    """Several tables as one schedule: every table's bases in one wave, then every first stage, every second
    stage, every evaluation — so that as many trials run at once as the cluster holds from the first to the
    last, rather than a table's last, lonely training leaving cores idle. A training two tables share runs
    once (under the first table's experiment); each table keeps its parent run, tags and resumption."""
    several = len(sweeps) > 1  # labels then name their table
    every = [(s, *s.prepare(prefix=f"{s.plan.experiment.name}: " if several else "")) for s in sweeps]
    prepared = [(s, todo, common) for s, todo, common in every if not todo.empty]
    if not prepared:
        return [todo for _, todo, _ in every]
    if several:
        name = f"{len(prepared)} tables"
        together = {"table": "all", "sweep": hashlib.sha256(" ".join(c["sweep"] for _, _, c in prepared).encode())
                    .hexdigest()}
    else:
        name, together = prepared[0][0].plan.experiment.name, prepared[0][2]
    progress = _progress(name, [(s, todo) for s, todo, _ in prepared], log)
    trainings_at_once, evals_at_once, eval_cpus = prepared[0][0].resources()
    try:
        for wave in range(3):
            jobs, seen = [], set()
            for s, todo, common in prepared:
                for job in s.train_jobs(todo, wave, common):
                    if job["hash"] not in seen:
                        seen.add(job["hash"])
                        jobs.append(job)
            _run_wave(WAVES[wave], jobs, together, {"CPU": TRIAL_CPUS}, trainings_at_once, progress)
        jobs = [job for s, todo, common in prepared for job in s.eval_jobs(todo, common)]
        _run_wave(WAVES[3], jobs, together, {"CPU": eval_cpus}, evals_at_once, progress)
        for s, _, common in prepared:
            s.tracker.end_run(common["parent"], "FINISHED")
    except BaseException:
        for s, _, common in prepared:
            s.tracker.end_run(common["parent"], "FAILED")
        raise
    return [todo for _, todo, _ in every]


def run_sweeps(plans: list[Plan], cluster: Cluster, tracking_uri: str | None = None, log=say,
               verbose: bool = False) -> list[Pending]:
    """One table, or several as one schedule (run_together), on the cluster in RAY_ADDRESS or an in-process
    Ray with room for a trial beside its workers."""
    from ddps.orchestration.runtime import ensure_ray
    sweeps = [Sweep(p, cluster, tracking_uri, log) for p in plans]  # every tracking check before compute
    ensure_ray(cluster, extra_cpus=TRIAL_CPUS, log_to_driver=verbose)
    if not verbose:
        log("workers' output goes to Ray's logs (/tmp/ray/session_latest/logs; --verbose shows it here)")
    if len(sweeps) == 1:
        return [sweeps[0].run()]
    return run_together(sweeps, log)
