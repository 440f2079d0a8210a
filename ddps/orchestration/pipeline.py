"""The pipeline: base -> stage 1 -> stage 2 (or the UNet head) -> evaluation, tracked in MLflow.

Each step is addressed by the content hash of what determines it (its config sections plus its inputs'
hashes): a step whose checkpoint exists is never recomputed, and a step with a FINISHED MLflow run of the
same hash is not re-logged. One parent run per pipeline, one nested run per step (``mlflow.parentRunId``);
runs left RUNNING by a driver that died are marked KILLED when the pipeline is submitted again.

Where the evaluation runs: in the driver on its CPU threads; with --gpu on one GPU — a Ray task holding one
(``gpu_task_options``) whose record comes back to the driver, or, in a sweep's evaluation trial, the trial's
own GPU. MLflow logging stays in the driver (the trial).
"""
from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import yaml

from ddps import names
from ddps.config import Config, content_hash, to_flat
from ddps.orchestration import ray_train
from ddps.orchestration.plan import EVAL_SECTIONS, Training, chain_of, eval_hash
from ddps.orchestration.ray_train import Cluster
from ddps.orchestration.tracking import MLflowReporter, Tracker, TrackingError, cache_spool, is_secret
from ddps.paths import safe_name
from ddps.segmentors.checkpoint import read_checkpoint

STRIP_IMAGES = (0, 1, 2, 3)


@functools.lru_cache(maxsize=None)
def _git(*args: str) -> str:
    """What ``git`` says about the checkout ddps runs from ("" outside one, or without git); asked once per
    process (the code a process runs does not change under it)."""
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def git_commit() -> str:
    return _git("rev-parse", "HEAD") or "unknown"


COMMANDS = ("pipeline", "sweep", "demo")  # the ddps commands that start runs


def command_name() -> str:
    """This process's ddps command, e.g. "ddps pipeline" (the runs' Source); "ddps" where it is not the ddps
    command line (a Ray Tune trial, a test)."""
    argv = [a for a in sys.argv[1:] if not a.startswith("-")]
    main = Path(sys.argv[0]).name if sys.argv else ""
    if main in ("ddps", "__main__.py", "cli.py") and argv and argv[0] in COMMANDS:
        return f"ddps {argv[0]}"
    return "ddps"


def source_tags(command: str | None = None) -> dict:
    """MLflow's standard source tags, which its runs table shows (Source, Version, User): the ddps command,
    LOCAL, the git commit and branch of the code (where ddps runs from a checkout), the user."""
    commit, branch = git_commit(), _git("rev-parse", "--abbrev-ref", "HEAD")
    tags = {names.SOURCE_NAME: command or command_name(), names.SOURCE_TYPE: "LOCAL", names.USER: _user()}
    if commit != "unknown":
        tags[names.SOURCE_GIT_COMMIT] = commit
    if branch and branch != "HEAD":
        tags[names.SOURCE_GIT_BRANCH] = branch
    return tags


def _user() -> str:
    import getpass
    try:
        return getpass.getuser()
    except Exception:  # no name for this uid (a container)
        return "unknown"


def run_tags(cfg: Config, command: str | None = None) -> dict:
    """What ran and from which code (MLflow's source tags, and ``git_commit`` that the report reads); an
    imported base (base.pretrained) is named by its source, on every run, and tagged ddps.imported_from."""
    imported = {names.IMPORTED_FROM: cfg.base.pretrained} if cfg.base.pretrained else {}
    return {"dataset": cfg.data.dataset, "base": cfg.base.pretrained or f"{cfg.base.arch}-{cfg.base.backbone}",
            "denoiser": f"{cfg.denoiser.method}-UNet-{cfg.denoiser.size}", "preset": cfg.preset,
            names.GIT_COMMIT: git_commit(), **source_tags(command), **imported}


def data_hash(cfg: Config) -> str:
    """The content hash of the data section: what the data is (the dataset, its root, its scenes) and how a
    training reads it."""
    return content_hash(cfg, ("data",))


DIGEST_CHARS = 16  # a dataset input's digest: the data hash's first 16 characters (MLflow keeps 36 at most)


def dataset_input(cfg: Config, split: str, context: str) -> dict:
    """The keyword arguments of ``Tracker.log_dataset`` for one split of the config's data: name
    ``<dataset>-<split>``, digest the data hash (its full value in the input tag ddps.content_hash), source
    the data root — for fashion-scenes the Fashion-MNIST folder its scenes are built from."""
    data, digest = cfg.data, data_hash(cfg)
    profile = {"dataset": data.dataset, "split": split, names.CONTENT_HASH: digest}
    if data.dataset == "fashion-scenes":
        from ddps.data import idx
        source = str(Path(data.root or os.environ.get(idx.ENV_VAR) or idx.DEBIAN_FOLDER).expanduser().resolve())
        profile.update(built_from="Fashion-MNIST", scenes={"train": data.train_scenes, "holdout": data.holdout,
                                                           "val": data.val_scenes}.get(split))
    elif data.root and "://" not in data.root:
        source = str(Path(data.root).expanduser().resolve())
    else:
        source = data.root or "(data.root not set)"
    return {"name": f"{data.dataset}-{split}", "digest": digest[:DIGEST_CHARS], "source": source,
            "context": context, "tags": {names.CONTENT_HASH: digest}, "profile": profile}


def pipeline_hash(cfg: Config) -> str:
    return content_hash(cfg, ("data", "base", "train_base") + EVAL_SECTIONS)


def evaluation(refiner_path: Path, cfg: Config, reliance: bool, gpu: bool = False, tf32: bool = True):
    """The engine's evaluation record of the refiner on eval.split — val, or the holdout scenes for choosing
    settings (multi-scale when eval.multiscale, the strips' images): on this process's CPU threads, or with ``gpu`` on its first visible GPU — the one Ray or Tune
    assigned it; a one-line DeviceError when there is none."""
    from ddps.engine.device import setup
    from ddps.engine.evaluate_checkpoint import evaluate_refiner_file
    device = setup(gpu, tf32)
    result, _ = evaluate_refiner_file(refiner_path, cfg, split=cfg.eval.split, reliance=reliance,
                                      multiscale=cfg.eval.multiscale, examples=STRIP_IMAGES, device=device)
    return result


def gpu_task_options(cluster: Cluster) -> dict:
    """The Ray task options of the pipeline's evaluation with --gpu: one GPU, and a worker's CPUs."""
    return {"num_gpus": 1, "num_cpus": cluster.cpus_per_worker, "name": "ddps-evaluation"}


@dataclass
class Pipeline:
    cfg: Config
    cluster: Cluster = field(default_factory=Cluster)
    tracking_uri: str | None = None
    experiment: str | None = None
    log: Callable[[str], None] = print
    pid_dir: str | None = None
    tune: bool = False  # inside a Ray Tune trial (a sweep): trainings report their iterations to it
    parent: str | None = None  # the run its step runs nest under (a sweep's); run() starts its own
    extra_tags: dict = field(default_factory=dict)  # on every run it starts, beside run_tags (a sweep's, a table's)
    console: object = None  # progress.Console: where each training's progress line goes (not in a sweep)

    def __post_init__(self):
        self.tracker = Tracker(self.tracking_uri)  # an unreachable server fails here, before any compute
        self.experiment_name = safe_name(self.experiment or f"ddps-{self.cfg.data.dataset}", "MLflow experiment")
        self.experiment_id = self.tracker.experiment(self.experiment_name)
        self.tags = {**run_tags(self.cfg, "ddps sweep" if self.tune else None), **self.extra_tags}

    # ---- one step ---------------------------------------------------------------------------------
    def step(self, name: str, digest: str, path: Path, train: Callable[[str], None], data: bool = True) -> str:
        """Train (unless its checkpoint exists) and log (unless a FINISHED run of this hash exists in any
        experiment: a model trained by another table or pipeline is reused, not retrained) one step; its run id.
        Its run has the training split as its dataset input (``data``; not an imported base's, which read none)."""
        key = {names.STEP: name, names.CONTENT_HASH: digest}
        done = self.tracker.find_run(self.tracker.experiment_ids(), key)
        if path.exists() and done:
            self.log(f"[{name}] reusing {path} and MLflow run {done}")
            self.tracker.set_tags(self.parent, {names.STEP_LINK + name: done})
            return done
        run_id = self.tracker.start_run(self.experiment_id, name, {**self.tags, **key}, parent=self.parent)
        self.tracker.log_params(run_id, to_flat(self.cfg))
        self.tracker.set_tags(self.parent, {names.STEP_LINK + name: run_id})
        with self.tracker.ending(run_id):
            if data:
                self.tracker.log_dataset(run_id, **dataset_input(self.cfg, "train", names.CONTEXT_TRAINING))
            if path.exists():
                self.log(f"[{name}] checkpoint {path} exists: logging it, not retraining")
            else:
                train(run_id)
                if not MLflowReporter(self.tracker, run_id).flush():  # what a worker spooled while MLflow was down
                    raise TrackingError(f"MLflow {self.tracker.uri} is unreachable; the metrics of run {run_id} are "
                                        f"kept in {cache_spool()}")
            metrics = read_checkpoint(path).get("metrics", {})
            self.tracker.log_metrics(run_id, {f"final_{k}": v for k, v in metrics.items()
                                              if isinstance(v, (int, float))}, step=0)
        return run_id

    def _train_config(self, run_id: str, label: str, iters: int, out: Path, **extra) -> dict:
        return {"cfg": to_flat(self.cfg), "out": str(out), "label": label, "iters": iters,
                "tracking_uri": self.tracker.uri, "run_id": run_id, "pid_dir": self.pid_dir,
                "system_metrics": self.cluster.system_metrics, **extra}

    def train(self, chain: list[Training], i: int) -> str:
        """The i-th training of a chain (base, then the refiner's stages) on Ray Train; its MLflow run id.
        The trainings before it must be done: a stage reads the base's checkpoint, stage 2 stage 1's."""
        t, base = chain[i], chain[0]
        if t.step == "base" and t.imported:  # published weights: written as a base checkpoint here, no training
            return self.step(t.step, t.hash, t.path, lambda run_id: self._import_base(t.path), data=False)
        if t.step == "base":
            config = self._train_config("", "base", t.iters, t.path)
            kind = "base"
        else:
            init = str(chain[i - 1].path) if t.step == "stage2" else None
            config = self._train_config("", t.step, t.iters, t.path, stage=t.step, base=str(base.path), init=init)
            kind = "refiner"
        return self.step(t.step, t.hash, t.path, lambda run_id: ray_train.run(
            kind, {**config, "run_id": run_id}, self.cluster, name=f"{t.step}-{t.hash[:16]}", tune=self.tune,
            console=self.console))

    def _import_base(self, path: Path) -> None:
        from ddps.engine.reporter import ConsoleReporter
        from ddps.engine.train_base import import_base
        import_base(self.cfg, ConsoleReporter("base"), path)

    # ---- the whole pipeline -----------------------------------------------------------------------
    def run(self) -> dict:
        cfg, digest = self.cfg, pipeline_hash(self.cfg)
        self.tags[names.PIPELINE] = digest
        stale = self.tracker.mark_stale(self.experiment_id, {names.PIPELINE: digest})
        if stale:
            self.log(f"marked {stale} run(s) left RUNNING by an earlier driver as KILLED")
        self.parent = self.tracker.start_run(self.experiment_id, f"pipeline-{digest[:8]}",
                                             {**self.tags, names.STEP: names.STEP_PIPELINE, names.CONTENT_HASH: digest})
        self.tracker.log_params(self.parent, to_flat(cfg))
        with self.tracker.ending(self.parent):
            chain = chain_of(cfg)
            for i in range(len(chain)):
                self.train(chain, i)
            return self.evaluate(chain[-1].path, eval_hash(cfg, chain), base_path=chain[0].path)

    # ---- evaluation -------------------------------------------------------------------------------
    def evaluate(self, refiner_path: Path, digest: str, cell: dict | None = None, reliance: bool = True,
                 log_model: bool = True, name: str = names.STEP_EVAL, base_path: Path | None = None) -> dict:
        """Evaluate the refiner (the engine's one evaluation) and log its record: the split it scores
        (eval.split: val, or the holdout scenes; tagged ddps.eval_split) as its dataset input, per-step metrics as MLflow history (step 0 = the base's own prediction), per-class IoU
        per step, the mask-reliance diagnostic, strips and probabilities of fixed images of that split, the refiner
        itself and beside it its base's checkpoint (``base_path``, else the config's); the summary, which it
        returns.

        A sweep's cell passes its own tags (``cell``: table, row, column, its training run); the pipeline's
        parent then keeps no ``step.eval`` link (a sweep has many)."""
        key = {names.STEP: names.STEP_EVAL, names.CONTENT_HASH: digest}
        done = self.tracker.find_run(self.experiment_id, key)
        if done:
            self.log(f"[{name}] reusing MLflow run {done}")
            if cell is None:
                self.tracker.set_tags(self.parent, {names.STEP_LINK + names.STEP_EVAL: done})
            return json.loads(self.tracker.client.get_run(done).data.tags.get(names.SUMMARY, "{}"))
        split = self.cfg.eval.split
        run_id = self.tracker.start_run(self.experiment_id, name,
                                        {**self.tags, **(cell or {}), **key, names.EVAL_SPLIT: split},
                                        parent=self.parent)
        if cell is None:
            self.tracker.set_tags(self.parent, {names.STEP_LINK + names.STEP_EVAL: run_id})
        with self.tracker.ending(run_id):
            self.tracker.log_params(run_id, to_flat(self.cfg))
            self.tracker.log_dataset(run_id, **dataset_input(self.cfg, split, names.CONTEXT_EVALUATION))
            where = "on a GPU" if self.cluster.use_gpu else "on CPU threads"
            self.log(f"[{name}] evaluating on {split} ({self.cfg.infer.steps} refinement steps"
                     f"{', and the mask-reliance trajectories' if reliance else ''}) {where}")
            started = time.monotonic()
            summary = self._log_evaluation(run_id, refiner_path, reliance)
            self.log(f"[{name}] done in {time.monotonic() - started:.0f} s: last-step mIoU "
                     f"{summary.get(names.LAST_MIOU, float('nan')):.2f}")
            if log_model:
                self._log_model(run_id, refiner_path, base_path or chain_of(self.cfg)[0].path, cell)
        return summary

    def _log_model(self, run_id: str, refiner_path: Path, base_path: Path, cell: dict | None) -> None:
        """The refiner and its base's checkpoint, side by side in the run's model/ folder; their runs:/ URIs
        tagged on the cell's run, or on the pipeline's parent."""
        uris = {}
        for tag, path in ((names.REFINER_URI, refiner_path), (names.BASE_URI, base_path)):
            self.tracker.log_artifact(run_id, path, names.ARTIFACT_MODEL)
            uris[tag] = f"runs:/{run_id}/{names.ARTIFACT_MODEL}/{path.name}"
        self.tracker.set_tags(run_id if cell else self.parent, uris)

    def _evaluation(self, refiner_path: Path, reliance: bool):
        """The evaluation record, computed here (on CPU threads; with --gpu inside a sweep's trial, on the GPU
        Tune gave it) or, with --gpu, by a Ray task holding one GPU (the driver's machine may have none)."""
        gpu, tf32 = self.cluster.use_gpu, self.cluster.tf32
        if not gpu or self.tune:
            return evaluation(refiner_path, self.cfg, reliance, gpu, tf32)
        import ray
        task = ray.remote(evaluation).options(**gpu_task_options(self.cluster))
        with ray_train.ddps_errors():  # no GPU, bad data: the task's one line
            return ray.get(task.remote(refiner_path, self.cfg, reliance, gpu, tf32))

    def _log_evaluation(self, run_id: str, refiner_path: Path, reliance: bool) -> dict:
        """The engine's evaluation record of the refiner on eval.split, logged to ``run_id``; its summary."""
        from ddps.engine.evaluate_refiner import save_examples
        cfg = self.cfg
        result = self._evaluation(refiner_path, reliance)
        for k, metrics in result.history():
            self.tracker.log_metrics(run_id, metrics, step=k)
        summary = result.summary()
        self.tracker.set_tags(run_id, {names.SUMMARY: json.dumps(summary)})
        with tempfile.TemporaryDirectory() as folder:
            folder = Path(folder)
            (folder / names.ARTIFACT_CONFIG).write_text(yaml.safe_dump(  # as the params: no secret-looking name
                {k: v for k, v in to_flat(cfg).items() if not is_secret(k)}, sort_keys=True))
            self.tracker.log_artifact(run_id, folder / names.ARTIFACT_CONFIG)
            for path, artifact_folder in save_examples(result, folder):
                self.tracker.log_artifact(run_id, path, artifact_folder)
        return summary
