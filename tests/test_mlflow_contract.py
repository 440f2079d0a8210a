"""MLflow as its users know it (docs/design.md, "The MLflow contract"): experiments of MLflow 3's kind for model
training, the standard source tags, the data as a dataset input whose digest is its content hash, the base
checkpoint logged beside the refiner, system metrics on training runs (and none with them off), and `ddps ui`
leaving nothing behind when it is stopped.

The fast tests use a SQLite store and no Ray; the pipeline tests share one smoke pipeline (module fixture) and
are marked slow: its nested runs, its reuse when submitted again and its refiner served from the store too."""
import os
import signal
import subprocess
import sys
import time

import pytest

from ddps import names
from ddps.config import resolve
from ddps.orchestration.pipeline import data_hash, dataset_input, git_commit, run_tags
from ddps.orchestration.tracking import Tracker, runs_url
from procs import free_port, start, start_ui, stop
from sockets import descendants, listening

SYSTEM_CPU = names.SYSTEM_METRICS + "cpu_utilization_percentage"  # MLflow 3.17's name (its CPUMonitor)
STANDARD_SOURCE = (names.SOURCE_NAME, names.SOURCE_TYPE, names.SOURCE_GIT_COMMIT)


# ---- fast: a SQLite store, no Ray -----------------------------------------------------------------------

def test_experiments_are_of_mlflows_kind_for_model_training_new_or_made_before(tmp_path):
    tracker = Tracker(f"sqlite:///{tmp_path / 'm.db'}")
    new = tracker.experiment("table1")
    assert tracker.client.get_experiment(new).tags[names.EXPERIMENT_KIND] == "custom_model_development"
    old = tracker.client.create_experiment("made-before")  # a store written before ddps set the kind
    assert tracker.experiment("made-before") == old
    assert tracker.client.get_experiment(old).tags[names.EXPERIMENT_KIND] == "custom_model_development"
    chosen = tracker.client.create_experiment("chosen", tags={names.EXPERIMENT_KIND: "genai_development"})
    tracker.experiment("chosen")  # a kind someone chose is kept
    assert tracker.client.get_experiment(chosen).tags[names.EXPERIMENT_KIND] == "genai_development"


def test_runs_carry_mlflows_source_tags_and_the_tags_the_report_reads():
    tags = run_tags(resolve("smoke"), "ddps pipeline")
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                            cwd=os.path.dirname(names.__file__)).stdout.strip()
    assert tags[names.SOURCE_NAME] == "ddps pipeline" and tags[names.SOURCE_TYPE] == "LOCAL"
    assert tags[names.SOURCE_GIT_COMMIT] == commit == tags[names.GIT_COMMIT] == git_commit()
    assert {"dataset", "base", "denoiser", "preset", names.GIT_COMMIT} <= set(tags)  # ddps/report reads these


def test_a_dataset_input_has_the_data_hash_as_digest_and_the_data_root_as_source(tmp_path):
    cfg = resolve("smoke")
    tracker = Tracker(f"sqlite:///{tmp_path / 'm.db'}")
    run_id = tracker.start_run(tracker.experiment("x"), "base")
    tracker.log_dataset(run_id, **dataset_input(cfg, "train", names.CONTEXT_TRAINING))
    (given,) = tracker.client.get_run(run_id).inputs.dataset_inputs
    assert given.dataset.name == "fashion-scenes-train" and given.dataset.source_type == "local"
    assert given.dataset.digest == data_hash(cfg)[:16] and len(data_hash(cfg)) == 64
    tags = {t.key: t.value for t in given.tags}
    assert tags == {names.DATA_CONTEXT: "training", names.CONTENT_HASH: data_hash(cfg)}
    # a folder dataset read in place: its root; another data section, another digest
    folder = resolve("smoke", overrides={"data.dataset": "folder", "data.root": str(tmp_path)})
    described = dataset_input(folder, "val", names.CONTEXT_EVALUATION)
    assert described["source"] == str(tmp_path) and described["name"] == "folder-val"
    assert described["digest"] != data_hash(cfg)[:16]


def test_the_printed_links_open_the_runs_in_the_model_training_view():
    assert runs_url("http://127.0.0.1:5000", "7") == \
        "http://127.0.0.1:5000/#/experiments/7/runs?workflowType=machine_learning"
    assert runs_url("http://h:1/") == "http://h:1/#/experiments?workflowType=machine_learning"


# ---- `ddps ui`: stopped by a signal, nothing of it is left ---------------------------------------------

@pytest.mark.reliability(kind="fault", case="ddps ui stopped by SIGTERM leaves nothing listening")
def test_ddps_ui_stopped_by_sigterm_takes_its_server_and_uvicorn_down(tmp_path):
    ui, port, log = start_ui(tmp_path)
    try:
        tree = descendants(ui.pid)
        assert any(p == port for _, _, p in listening(tree)) and len(tree) >= 3  # ddps, mlflow server, uvicorn
        os.kill(ui.pid, signal.SIGTERM)  # to `ddps ui` alone, as `kill PID` or a service manager does
        assert ui.wait(60) == 0
        assert _alive(tree - {ui.pid}, within=30) == set(), log.read_text()[-2000:]
        assert not any(p == port for _, _, p in listening(_all_pids()))
        assert "workflowType=machine_learning" in log.read_text()
    finally:
        stop(ui)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_run_group_stops_the_whole_tree_on_sigint_and_sigterm(tmp_path, sig):
    """The mechanism of `ddps ui` (runtime.run_group) on a cheap tree: a child that listens and a grandchild
    that left its group; SIGINT (Ctrl-C, or `kill -INT`) or SIGTERM to the runner stops all of them."""
    port = free_port()
    grandchild = ("import os, time; os.setsid(); time.sleep(600)")
    child = (f"import socket, subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {grandchild!r}]); "
             f"s = socket.socket(); s.bind(('127.0.0.1', {port})); s.listen(); time.sleep(600)")
    runner = ("import sys; from ddps.orchestration.runtime import run_group; "
              f"sys.exit(run_group([sys.executable, '-c', {child!r}], dict(__import__('os').environ), grace_s=5))")
    log = tmp_path / "runner.log"
    proc = start([sys.executable, "-c", runner], log, {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        deadline = time.monotonic() + 60
        while not any(p == port for _, _, p in listening(descendants(proc.pid))):
            assert time.monotonic() < deadline and proc.poll() is None, log.read_text()
            time.sleep(0.2)
        tree = descendants(proc.pid)
        assert len(tree) == 3  # the runner, the child, the grandchild in a session of its own
        os.kill(proc.pid, sig)
        assert proc.wait(30) == 0, log.read_text()
        assert _alive(tree - {proc.pid}, within=15) == set()
    finally:
        stop(proc)


def _all_pids() -> set[int]:
    return {int(p) for p in os.listdir("/proc") if p.isdigit()}


def _alive(pids: set[int], within: float) -> set[int]:
    """Those of ``pids`` still running (zombies aside) after up to ``within`` seconds."""
    deadline = time.monotonic() + within
    while True:
        alive = set()
        for pid in pids:
            try:
                with open(f"/proc/{pid}/stat") as f:
                    if f.read().rsplit(")", 1)[1].split()[0] != "Z":
                        alive.add(pid)
            except OSError:
                pass
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.5)


# ---- slow: one smoke pipeline, then its stage 2 again with system metrics off ----------------------------

@pytest.fixture(scope="module")
def pipeline_runs(tmp_path_factory):
    """A smoke pipeline on an in-process Ray (system metrics sampled every second), then the stage 2 of the same
    config with another length and system metrics off (--no-system-metrics; its base and stage 1 reused):
    the client, the pipeline (its ``summary`` kept) and the experiment's runs, oldest first. The one smoke
    pipeline that the tests of nested runs, reuse and the MLflow contract share (a training each would repeat)."""
    from mlflow.tracking import MlflowClient

    from ddps.orchestration.pipeline import Pipeline
    from ddps.orchestration.plan import chain_of
    from ddps.orchestration.ray_train import Cluster
    from ddps.orchestration.runtime import ensure_ray
    import ray
    folder = tmp_path_factory.mktemp("contract")
    saved = {k: os.environ.get(k) for k in ("DDPS_HOME", "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL")}
    os.environ["DDPS_HOME"] = str(folder / "home")
    os.environ["MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"] = "1"  # before Ray starts: its workers inherit it
    os.environ["RAY_AUTH_MODE"] = "disabled"
    os.environ["RAY_TRAIN_ENABLE_PRINT_PATCH"] = "0"
    started = not ray.is_initialized()
    cluster = Cluster(workers=2, cpus_per_worker=0.5)
    try:
        ensure_ray(cluster)
        uri = f"sqlite:///{folder / 'mlflow.db'}"
        on = Pipeline(resolve("smoke"), cluster, tracking_uri=uri, log=lambda m: None)
        on.summary = on.run()
        off_cfg = resolve("smoke", overrides={"train.stage2_iters": 8})
        off = Pipeline(off_cfg, Cluster(workers=2, cpus_per_worker=0.5, system_metrics=False), tracking_uri=uri,
                       log=lambda m: None)
        off.parent = off.tracker.start_run(off.experiment_id, "stage2 without system metrics", off.tags)
        with off.tracker.ending(off.parent):
            off.train(chain_of(off_cfg), 2)  # stage 2 only: no evaluation
        client = MlflowClient(uri)
        runs = client.search_runs([on.experiment_id], order_by=["attributes.start_time ASC"])
        yield client, on, runs
    finally:
        if started:
            ray.shutdown()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.mark.slow
def test_pipeline_runs_have_source_tags_and_their_data_as_a_dataset_input(pipeline_runs):
    client, pipeline, runs = pipeline_runs
    experiment = client.get_experiment(pipeline.experiment_id)
    assert experiment.tags[names.EXPERIMENT_KIND] == "custom_model_development"
    digest = data_hash(pipeline.cfg)
    steps = [r for r in runs if r.data.tags.get(names.STEP) in ("base", "stage1", "stage2", "eval")]
    assert sorted(r.data.tags[names.STEP] for r in steps) == ["base", "eval", "stage1", "stage2", "stage2"]
    for run in runs:  # the parents too
        assert {*STANDARD_SOURCE, names.GIT_COMMIT} <= set(run.data.tags), run.info.run_name
        assert run.data.tags[names.SOURCE_GIT_COMMIT] == git_commit()
    for run in steps:
        (given,) = run.inputs.dataset_inputs
        training = run.data.tags[names.STEP] != "eval"
        assert given.dataset.name == ("fashion-scenes-train" if training else "fashion-scenes-val")
        assert given.dataset.digest == digest[:16]
        tags = {t.key: t.value for t in given.tags}
        assert tags == {names.DATA_CONTEXT: "training" if training else "evaluation", names.CONTENT_HASH: digest}


@pytest.mark.slow
def test_the_base_checkpoint_is_logged_beside_the_refiner(pipeline_runs, tmp_path):
    client, pipeline, runs = pipeline_runs
    first_eval = next(r for r in runs if r.data.tags.get(names.STEP) == "eval")
    model = sorted(a.path for a in client.list_artifacts(first_eval.info.run_id, names.ARTIFACT_MODEL))
    assert len(model) == 2 and any("/base-" in p for p in model) and any("/refiner-" in p for p in model)
    parent = client.get_run(first_eval.data.tags["mlflow.parentRunId"])
    base_uri, refiner_uri = parent.data.tags[names.BASE_URI], parent.data.tags[names.REFINER_URI]
    assert base_uri.startswith(f"runs:/{first_eval.info.run_id}/model/base-")
    from ddps.segmentors.checkpoint import read_checkpoint
    base = read_checkpoint(pipeline.tracker.download(base_uri, tmp_path / "dl"))
    refiner = read_checkpoint(pipeline.tracker.download(refiner_uri, tmp_path / "dl"))
    assert base["hash"] == refiner["base"]["hash"]  # the base the refiner was trained on


@pytest.mark.slow
def test_training_runs_have_system_metrics_unless_they_are_off(pipeline_runs):
    _, _, runs = pipeline_runs
    trainings = [r for r in runs if r.data.tags.get(names.STEP) in ("base", "stage1", "stage2")]
    on, off = trainings[:3], trainings[3:]
    assert [r.data.tags[names.STEP] for r in off] == ["stage2"]
    sampled = [r for r in on if SYSTEM_CPU in r.data.metrics]  # a sample a second while a worker lives
    assert sampled and sampled[0].data.tags[names.STEP] == "base"
    assert {names.SYSTEM_METRICS + k for k in ("system_memory_usage_megabytes", "system_memory_usage_percentage")} \
        <= set(sampled[0].data.metrics)
    assert not [k for k in off[0].data.metrics if k.startswith(names.SYSTEM_METRICS)]
    assert "loss" in off[0].data.metrics  # the run did train
    evaluations = [r for r in runs if r.data.tags.get(names.STEP) == "eval"]
    assert not [k for r in evaluations for k in r.data.metrics if k.startswith(names.SYSTEM_METRICS)]


@pytest.mark.slow
def test_pipeline_tracks_nested_runs_reuses_steps_and_serves_its_refiner(pipeline_runs, tmp_path):
    from ddps.orchestration.pipeline import Pipeline
    from ddps.orchestration.ray_train import Cluster
    client, pipeline, runs = pipeline_runs
    summary = pipeline.summary
    assert set(summary) >= {"base_mIoU", "step1_mIoU", "last_mIoU", "reliance_oracle"}
    parent = next(r for r in runs if r.info.run_name.startswith("pipeline-"))  # the first pipeline's
    steps = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(steps) == {"base", "stage1", "stage2", "eval"}
    for step in steps.values():
        assert step.info.status == "FINISHED"
        assert step.data.tags["dataset"] == "fashion-scenes" and "git_commit" in step.data.tags
        assert step.data.params["train.stage1_iters"] == "6"
    history = client.get_metric_history(steps["eval"].info.run_id, "mIoU")
    assert [m.step for m in sorted(history, key=lambda m: m.step)] == list(range(6))  # base + 5 steps
    assert len(client.get_metric_history(steps["eval"].info.run_id, "IoU.Trouser")) == 6
    assert len(client.get_metric_history(steps["stage2"].info.run_id, "loss")) >= 2
    artifacts = {a.path for a in client.list_artifacts(steps["eval"].info.run_id)}
    assert {"config.yaml", "strips", "probabilities.npz", "model"} <= artifacts
    # submitted again: nothing retrained, nothing re-logged, a new parent
    before = client.search_runs([pipeline.experiment_id])
    again = Pipeline(pipeline.cfg, Cluster(workers=2, cpus_per_worker=0.5), tracking_uri=pipeline.tracker.uri,
                     log=lambda m: None).run()
    assert again == summary
    after = client.search_runs([pipeline.experiment_id])
    new = {r.info.run_id for r in after} - {r.info.run_id for r in before}
    assert len(new) == 1 and next(r for r in after if r.info.run_id in new).info.run_name.startswith("pipeline-")
    # the logged refiner serves `ddps refine --checkpoint runs:/...`
    refiner_uri = client.get_run(parent.info.run_id).data.tags["refiner_uri"]
    local = Tracker(pipeline.tracker.uri).download(refiner_uri, tmp_path / "dl")
    assert local.exists() and local.suffix == ".pt"


def test_no_system_metrics_is_a_flag_of_every_command_that_trains():
    from ddps.cli import _cluster, build_parser
    parser = build_parser()
    for argv in (["pipeline"], ["sweep", "--all"], ["demo"]):
        assert parser.parse_args(argv).no_system_metrics is False
        assert parser.parse_args(argv + ["--no-system-metrics"]).no_system_metrics is True
    assert _cluster(parser.parse_args(["pipeline"])).system_metrics is True
    assert _cluster(parser.parse_args(["sweep", "--all", "--no-system-metrics"])).system_metrics is False
