"""Sweeps with real components: in-process Ray, Ray Tune trials starting Ray Train workers, MLflow on SQLite.

A 2 x 2 smoke grid — one axis that needs training (the learning rate), one that does not (test steps):
exactly the dry run's 2 trainings happen, 4 evaluation runs carry the right tags, and the same sweep run
again trains and logs nothing.
"""
import json

import pytest
import yaml

from ddps.engine import train_base
from ddps.orchestration.estimates import describe
from ddps.orchestration.plan import load_experiment, plan
from ddps.orchestration.ray_train import Cluster
from ddps.orchestration.sweep import Sweep, finished_cells
from ddps.paths import cache_dir

pytestmark = pytest.mark.slow

GRID = {
    "name": "smoke-grid", "title": "Smoke grid: learning rate x test steps",
    "axes": [{"name": "lr", "key": "train.lr", "values": [0.001, 0.002]},
             {"name": "test_steps", "key": "infer.steps", "values": [2, 5]}],
    "rows": ["lr"], "columns": ["test_steps"],
    "presets": {"smoke": {"train": {"stages": "multi-step"}, "data": {"val_scenes": 8}}},
}


def _runs(client, experiment_id):
    return client.search_runs([experiment_id], max_results=1000)


def test_a_2x2_grid_trains_twice_evaluates_four_cells_and_a_rerun_adds_nothing(ray_local, tmp_path):
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(GRID))
    p = plan(load_experiment(path), "smoke")
    train_base.fit(p.cells[0].cfg)  # the shared base exists beforehand: the grid's trainings are the refiners
    planned = [t.path for t in p.to_train]  # what the dry run prints as 'to train'
    assert [t.step for t in p.to_train] == ["multistep", "multistep"]
    before = set(cache_dir("checkpoints").glob("refiner-*.pt"))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cluster = Cluster(workers=2, cpus_per_worker=0.5, checkpoint_every=3)
    lines: list[str] = []
    assert finished_cells([p], uri) == {} and not (tmp_path / "mlflow.db").exists()  # a dry run creates no store
    sweep = Sweep(p, cluster, uri, log=lines.append)
    sweep.run()
    finished = finished_cells([p], uri)  # what the dry run now counts: every cell, none left to estimate
    assert finished == {"smoke-grid": {c.eval_hash for c in p.cells}}
    assert "| 4 (4 finished) |" in describe([p], finished)

    trained = set(cache_dir("checkpoints").glob("refiner-*.pt")) - before
    assert trained == set(planned) and len(trained) == 2  # exactly the dry run's trainings
    client = sweep.tracker.client
    runs = _runs(client, sweep.experiment_id)
    by_step: dict[str, list] = {}
    for run in runs:
        by_step.setdefault(run.data.tags["ddps.step"], []).append(run)
    assert len(by_step["sweep"]) == 1 and len(by_step["multistep"]) == 2 and len(by_step["eval"]) == 4
    parent = by_step["sweep"][0]
    assert parent.info.status == "FINISHED"
    assert json.loads(parent.data.tags["ddps.order"]) == {"lr": ["0.001", "0.002"], "test_steps": ["2", "5"]}
    assert all(r.info.status == "FINISHED" for r in runs)
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in runs if r is not parent)
    trainings = {r.data.tags["ddps.content_hash"]: r.info.run_id for r in by_step["multistep"]}
    cells = set()
    for run in by_step["eval"]:
        tags = run.data.tags
        cell = next(c for c in p.cells if c.eval_hash == tags["ddps.content_hash"])
        assert tags["ddps.table"] == "smoke-grid"
        assert tags["ddps.row"] == cell.coords["lr"] and tags["ddps.column"] == cell.coords["test_steps"]
        assert tags["ddps.training_run"] == trainings[cell.chain[-1].hash]  # linked to its model's training
        steps = client.get_metric_history(run.info.run_id, "mIoU")
        assert [m.step for m in steps] == list(range(int(cell.coords["test_steps"]) + 1))  # 0 = the base
        assert run.data.metrics["params_denoiser_M"] > 0 and run.data.metrics["params_base_M"] > 0  # #P(M)
        cells.add((tags["ddps.row"], tags["ddps.column"]))
    assert cells == {("0.001", "2"), ("0.001", "5"), ("0.002", "2"), ("0.002", "5")}
    assert sum("reliance_own" in r.data.metrics for r in by_step["eval"]) == 2  # once per trained model
    assert any("cells 4/4" in line for line in lines)

    # ... and into a report (ddps report reads these runs back): the lr x test-steps matrix of last-step mIoU
    from ddps.report.write import write_report
    write_report(sweep.tracker, ["smoke-grid"], tmp_path / "reports", log=lambda _: None)
    table = (tmp_path / "reports" / "smoke-grid.md").read_text().splitlines()
    assert "| lr \\ test_steps | 2 | 5 |" in table
    for run in by_step["eval"]:
        s, tags = json.loads(run.data.tags["ddps.summary"]), run.data.tags
        row = next(line for line in table if line.startswith(f"| {tags['ddps.row']} |"))
        value = [x.strip() for x in row.strip("|").split("|")][1 + ["2", "5"].index(tags["ddps.column"])]
        assert value == f"{s['last_mIoU']:.2f} ({s['last_mIoU'] - s['base_mIoU']:+.2f})"
    assert (tmp_path / "reports" / "figures" / "smoke-grid-steps.png").exists()

    mtimes = {f: f.stat().st_mtime for f in trained}
    again = Sweep(p, cluster, uri, log=lines.append)
    left = again.run()
    assert left.empty and "nothing to run" in lines[-1]
    assert len(_runs(client, sweep.experiment_id)) == len(runs)
    assert {f: f.stat().st_mtime for f in trained} == mtimes


def test_the_progress_eta_scales_what_is_left_by_how_the_estimate_held(monkeypatch):
    """Estimates 600 s + 600 s; the first job takes 1,200 s (2x its estimate): 1,200 s left. Halfway
    through the second, 600 s. A job that took no time (a reused checkpoint) does not zero the ETA."""
    from ddps.orchestration import progress as shown
    from ddps.orchestration.estimates import START_S
    from ddps.orchestration.sweep import Job, SweepContext
    clock = [0.0]
    monkeypatch.setattr(shown.time, "monotonic", lambda: clock[0])
    lines = []
    progress = shown.Progress("t", jobs=3, cells_total=1, cells_done=0, log=lines.append)
    context = SweepContext(Cluster(), "sqlite:///mlflow.db", "t", parent="", sweep="", eval_cpus=1.0)
    first, second = (Job("train", context, {}, n, seconds=600.0, iters=100) for n in "ab")
    reused = Job("train", context, {}, "r", seconds=START_S, iters=10)
    for job in (reused, first, second):
        progress.add(job.seconds)
    progress.started(reused)
    progress.finished(reused, True)
    assert lines[-1].endswith("0 min elapsed, ETA 20 min")  # 1,200 s of estimate, no measured scale yet
    progress.started(first)
    clock[0] = 1200.0
    progress.finished(first, True)
    assert lines[-1].endswith("20 min elapsed, ETA 19 min")  # 600 s x (1,200 / 640)
    progress.started(second)
    clock[0] = 1800.0
    progress.result(second, {"iter": 50})
    assert "running: b it 50/100" in lines[-1] and lines[-1].endswith("30 min elapsed, ETA 10 min")


def test_two_tables_run_as_one_schedule_and_a_shared_training_runs_once(ray_local, tmp_path):
    """`ddps sweep a.yaml b.yaml` (and --all): one wave per chain position over both tables. Table b's only
    model is one of table a's (same learning rate): 2 trainings in all, each table its parent and its cells."""
    from ddps.orchestration.sweep import run_sweeps
    lr = {"name": "lr", "key": "train.lr", "values": [0.003, 0.004]}  # models no other test of the session trains
    a = {**GRID, "name": "smoke-a", "title": "a", "axes": [lr], "columns": []}
    b = {**GRID, "name": "smoke-b", "title": "b", "axes": GRID["axes"][1:], "rows": ["test_steps"], "columns": [],
         "presets": {"smoke": {**GRID["presets"]["smoke"], "train": {"stages": "multi-step", "lr": 0.003}}}}
    plans = []
    for doc in (a, b):
        path = tmp_path / f"{doc['name']}.yaml"
        path.write_text(yaml.safe_dump(doc))
        plans.append(plan(load_experiment(path), "smoke"))
    train_base.fit(plans[0].cells[0].cfg)
    shared = {t.hash for t in plans[0].to_train} & {t.hash for t in plans[1].to_train}
    assert len(shared) == 1 and len({t.hash for p in plans for t in p.to_train}) == 2
    before = set(cache_dir("checkpoints").glob("refiner-*.pt"))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cluster = Cluster(workers=1, cpus_per_worker=1, checkpoint_every=3)
    lines: list[str] = []
    run_sweeps(plans, cluster, uri, log=lines.append)

    assert len(set(cache_dir("checkpoints").glob("refiner-*.pt")) - before) == 2
    sweeps = [Sweep(p, cluster, uri) for p in plans]
    client = sweeps[0].tracker.client
    steps = {}
    for s in sweeps:
        runs = _runs(client, s.experiment_id)
        steps[s.plan.experiment.name] = sorted(r.data.tags["ddps.step"] for r in runs)
        assert all(r.info.status == "FINISHED" for r in runs)
    # the base's checkpoint existed: its run is logged (under a), not retrained; b's model was trained once, under a
    assert steps == {"smoke-a": ["base", "eval", "eval", "multistep", "multistep", "sweep"],
                     "smoke-b": ["eval", "eval", "sweep"]}
    assert any("2 tables" in line and "cells 4/4" in line for line in lines)
    assert all(left.empty for left in run_sweeps(plans, cluster, uri, log=lines.append))
    assert sum(len(_runs(client, s.experiment_id)) for s in sweeps) == 9  # the rerun logged nothing


@pytest.mark.reliability(kind="fault", case="Ctrl-C during a sweep ends it")
def test_ctrl_c_during_a_wave_is_seen_so_the_next_wave_does_not_start(ray_local, tmp_path):
    """On SIGINT Ray Tune saves its state and returns from fit() as if done; `interrupted` tells the two
    apart (the sweep then stops with "interrupted; rerun the same command to resume" instead of starting its
    next wave — seen before: a Ctrl-C'd sweep went on to its second stages)."""
    import os
    import signal
    import threading

    from ray import tune

    from ddps.orchestration.sweep import interrupted

    def sleeper(config):  # defined here: pickled by value (the workers cannot import this test module)
        import time
        time.sleep(config["seconds"])
        tune.report({"done": 1})

    def fit(seconds: float, name: str):
        tuner = tune.Tuner(tune.with_resources(sleeper, {"CPU": 0.5}),
                           param_space={"seconds": tune.grid_search([seconds, seconds])},
                           run_config=tune.RunConfig(name=name, storage_path=str(tmp_path), verbose=0))
        return tuner.fit()

    whole = fit(0.1, "whole")
    assert whole.num_terminated == 2 and not interrupted(whole)
    timer = threading.Timer(8.0, os.kill, (os.getpid(), signal.SIGINT))  # while the trials sleep
    timer.start()
    try:
        results = fit(120.0, "stopped")
    finally:
        timer.cancel()
    assert results.num_terminated == 2 and interrupted(results)  # "terminated", but not done
