"""MLflow, through one adapter: the only module of ddps that imports mlflow.

- The tracking URI is always absolute: ``--tracking-uri`` / ``MLFLOW_TRACKING_URI``, else the embedded
  store ``sqlite:///<DDPS_HOME>/mlflow.db`` with artifacts in ``<DDPS_HOME>/mlartifacts`` (Ray Train and
  Tune change the working directory of their workers, so a relative URI would scatter stores).
- An http server is checked before any compute: unreachable -> one-line error.
- Parameters whose names look like secrets (token, password, secret, key) are never logged.
- A new SQLite store is created under a file lock (``<store>.lock``): MLflow migrates a fresh file in
  several steps, and two processes doing so at once (a sweep and `ddps ui`, two sweeps, a driver and its
  trials) leave one of them with "table ... already exists".
- MLflow as its UI expects (docs/design.md, "The MLflow contract"): every experiment ddps creates or opens is
  of MLflow 3's kind for model training (``mlflow.experimentKind``); a run's data is a dataset input
  (``log_dataset``); a training's system metrics come from MLflow's own monitor (``system_metrics``), started
  where the training runs.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import time
import urllib.error
import urllib.request
from pathlib import Path

from ddps import names
from ddps.errors import DDPSError
from ddps.paths import ddps_home

SECRET = re.compile(r"(token|password|passwd|secret|credential|api[-_]?key|private[-_]?key|key[-_]?file|"
                    r"(^|[._-])key($|[._-]))", re.IGNORECASE)
CAMEL_KEY = re.compile(r"[a-z0-9]Key($|[A-Z._-])")  # sshKey, accessKeyId: a word 'Key' inside a camelCase name


def is_secret(name: str) -> bool:
    """Names that look like secrets (token, password, secret, key, ...); 'keypoints' or 'monkey' do not."""
    return bool(SECRET.search(name) or CAMEL_KEY.search(name))
PARENT_TAG = "mlflow.parentRunId"


class TrackingError(DDPSError):
    """The tracking server cannot be reached or refused a request."""


def resolve_tracking_uri(uri: str | None = None) -> str:
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or ""
    if not uri:
        return f"sqlite:///{ddps_home() / 'mlflow.db'}"
    if uri.startswith("sqlite:///"):
        return f"sqlite:///{sqlite_path(uri).expanduser().resolve()}"
    if "://" not in uri:
        raise TrackingError(f"tracking URI {uri!r} is not a URI; use http(s)://host:port or sqlite:////abs/path.db")
    return uri


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI; None for any other store."""
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """For an http(s) server: GET /health, else a one-line TrackingError before any compute starts."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as response:
            if response.status != 200:
                raise TrackingError(f"MLflow server {uri} answered /health with HTTP {response.status}")
    except (urllib.error.URLError, OSError) as e:
        raise TrackingError(f"MLflow server {uri} is unreachable ({getattr(e, 'reason', e)}); start it or "
                            f"set --tracking-uri / MLFLOW_TRACKING_URI") from None


def loggable_params(flat: dict) -> dict[str, str]:
    """The flat config as MLflow params: secret-looking names dropped, values as strings (<= 6000 chars)."""
    return {k: str(v)[:6000] for k, v in flat.items() if not is_secret(k)}


def _filter(tags: dict, status: str | None = None) -> str:
    """An MLflow search filter: every tag equal to its value (and the run in this status)."""
    clauses = [f"tags.`{k}` = '{v}'" for k, v in tags.items()]
    if status:
        clauses.append(f"attributes.status = '{status}'")
    return " and ".join(clauses)


@contextlib.contextmanager
def store_lock(db: Path):
    """An exclusive lock on ``<db>.lock`` for as long as the block runs (released if the process dies)."""
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class Tracker:
    """Runs of one tracking store: experiments, parent and nested runs, params, metrics, artifacts."""

    def __init__(self, uri: str | None = None, check: bool = True):
        import mlflow
        from mlflow.tracking import MlflowClient
        self.uri = resolve_tracking_uri(uri)
        if check:  # a worker's reporter does not check: it spools while the server is down
            check_reachable(self.uri)
        mlflow.set_tracking_uri(self.uri)
        db = sqlite_path(self.uri)
        with store_lock(db) if db else contextlib.nullcontext():
            self.client = MlflowClient(self.uri)  # creates (migrates) a new SQLite store, alone

    # ---- experiments and runs -----------------------------------------------------------------------
    def experiment(self, name: str) -> str:
        """The experiment's id, created if new; either way of MLflow 3's kind for model training (an
        experiment that names another kind keeps it: someone chose it in the UI)."""
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            if names.EXPERIMENT_KIND not in found.tags:  # made before ddps set it
                self.client.set_experiment_tag(found.experiment_id, names.EXPERIMENT_KIND, names.KIND_MODEL_TRAINING)
            return found.experiment_id
        location = None
        if self.uri.startswith("sqlite:///"):  # an absolute artifact root, whatever the working directory
            location = (ddps_home() / "mlartifacts" / re.sub(r"[^A-Za-z0-9._-]+", "_", name)).as_uri()
        return self.client.create_experiment(name, artifact_location=location,
                                             tags={names.EXPERIMENT_KIND: names.KIND_MODEL_TRAINING})

    def start_run(self, experiment_id: str, name: str, tags: dict | None = None, parent: str | None = None) -> str:
        tags = {k: str(v) for k, v in (tags or {}).items()}
        if parent:
            tags[PARENT_TAG] = parent
        return self.client.create_run(experiment_id, run_name=name, tags=tags).info.run_id

    def experiment_ids(self) -> list[str]:
        """Every active experiment of the store (a training is found wherever it was logged)."""
        return [e.experiment_id for e in self.client.search_experiments(max_results=1000)]

    def find_run(self, experiment_id: str | list[str], tags: dict, status: str | None = "FINISHED") -> str | None:
        """The newest run with all these tags (and this status) in this experiment (or these), else None."""
        ids = [experiment_id] if isinstance(experiment_id, str) else list(experiment_id)
        runs = self.client.search_runs(ids, _filter(tags, status), max_results=1,
                                       order_by=["attributes.start_time DESC"])
        return runs[0].info.run_id if runs else None

    def runs(self, experiment_id: str, tags: dict) -> list:
        """Every run of this experiment with these tags (any status)."""
        return self.client.search_runs([experiment_id], _filter(tags), max_results=10000)

    def search(self, experiment_names: list[str], tags: dict | None = None, status: str | None = "FINISHED"):
        """``mlflow.search_runs`` as a pandas DataFrame (columns run_id, status, start_time, metrics.*,
        params.*, tags.*): every run of these experiments with these tags and status; empty if none."""
        import mlflow
        names = [n for n in experiment_names if self.client.get_experiment_by_name(n) is not None]
        if not names:
            import pandas as pd
            return pd.DataFrame()
        return mlflow.search_runs(experiment_names=names, filter_string=_filter(tags or {}, status),
                                  max_results=100000, output_format="pandas")

    def experiment_names(self) -> list[str]:
        return sorted(e.name for e in self.client.search_experiments(max_results=1000))

    def history(self, run_id: str, key: str) -> list[tuple[int, float]]:
        """A metric's (step, value) pairs, by step."""
        return sorted((m.step, m.value) for m in self.client.get_metric_history(run_id, key))

    def metric_keys(self, run_id: str) -> list[str]:
        return sorted(self.client.get_run(run_id).data.metrics)

    def list_artifacts(self, run_id: str, folder: str | None = None) -> list[str]:
        return sorted(f.path for f in self.client.list_artifacts(run_id, folder))

    def set_status(self, run_id: str, status: str) -> None:
        self.client.update_run(run_id, status=status)

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status)

    @contextlib.contextmanager
    def ending(self, *run_ids: str):
        """Ends these runs FINISHED when the block completes, FAILED when anything escapes it (an interrupt
        too), then lets that go on."""
        try:
            yield
            for run_id in run_ids:
                self.end_run(run_id, "FINISHED")
        except BaseException:
            for run_id in run_ids:
                self.end_run(run_id, "FAILED")
            raise

    def mark_stale(self, experiment_id: str, tags: dict, status: str = "KILLED") -> int:
        """Runs with these tags left RUNNING by a driver that died: marked KILLED. Returns how many."""
        stale = self.client.search_runs([experiment_id], _filter(tags, "RUNNING"), max_results=1000)
        for run in stale:
            self.client.set_terminated(run.info.run_id, status)
        return len(stale)

    # ---- data -------------------------------------------------------------------------------------
    def log_params(self, run_id: str, flat: dict) -> None:
        from mlflow.entities import Param
        params = [Param(k, v) for k, v in loggable_params(flat).items()]
        for i in range(0, len(params), 100):
            self.client.log_batch(run_id, params=params[i:i + 100])

    def set_tags(self, run_id: str, tags: dict) -> None:
        from mlflow.entities import RunTag
        self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_metrics(self, run_id: str, metrics: dict, step: int, timestamp: int | None = None) -> None:
        from mlflow.entities import Metric
        now = timestamp or int(time.time() * 1000)
        batch = [Metric(k, float(v), now, int(step)) for k, v in metrics.items() if v == v]  # NaN dropped
        for i in range(0, len(batch), 1000):
            self.client.log_batch(run_id, metrics=batch[i:i + 1000])

    def log_dataset(self, run_id: str, name: str, digest: str, source: str, context: str,
                    tags: dict | None = None, profile: dict | None = None) -> None:
        """One dataset input of the run (the runs table's Dataset column): ``name``, ``digest`` (MLflow keeps
        36 characters at most), ``source`` (a local folder or a URI), ``context`` (training, evaluation) and
        ``tags`` as input tags, ``profile`` as its JSON profile."""
        from mlflow.entities import Dataset, DatasetInput, InputTag
        from mlflow.data.meta_dataset import MetaDataset
        described = MetaDataset(dataset_source(source), name=name, digest=digest).to_dict()
        dataset = Dataset(name=described["name"], digest=described["digest"], source_type=described["source_type"],
                          source=described["source"], profile=json.dumps(profile) if profile else None)
        input_tags = [InputTag(names.DATA_CONTEXT, context)] + [InputTag(k, str(v)) for k, v in (tags or {}).items()]
        self.client.log_inputs(run_id, datasets=[DatasetInput(dataset, input_tags)])

    def log_artifact(self, run_id: str, path, folder: str | None = None) -> None:
        """A local file, or a checkpoint in the storage (downloaded to a temporary folder for the upload)."""
        from ddps.storage import local_copy
        with local_copy(path) as local:
            self.client.log_artifact(run_id, str(local), folder)

    def download(self, uri: str, dst: str | Path | None = None) -> Path:
        """A ``runs:/<id>/<path>`` artifact as a local file."""
        import mlflow
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no bar per small file
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst) if dst else None,
                                                        tracking_uri=self.uri))


def dataset_source(source: str):
    """An MLflow DatasetSource for a local folder (``local``) or a URI (s3, gs, http, ...: MLflow's resolvers)."""
    import warnings

    from mlflow.data.sources import LocalArtifactDatasetSource
    if "://" in source:
        from mlflow.data.dataset_source_registry import resolve_dataset_source
        with warnings.catch_warnings():  # several resolvers claim some URIs; MLflow picks one and says so
            warnings.simplefilter("ignore")
            try:
                return resolve_dataset_source(source)
            except Exception:  # a scheme MLflow has no source for: kept as it is written
                pass
    return LocalArtifactDatasetSource(source)


def system_metrics(tracking_uri: str, run_id: str, node: str | None = None, log=None):
    """MLflow's system metrics monitor on this machine (CPU, memory, disk, network; each NVIDIA GPU's use,
    memory and power when pynvml finds one) for the run ``run_id``: a sample every
    ``MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL`` seconds (10 unless set), logged as ``system/<name>``
    (``system/<node>/<name>`` when ``node`` is given: one per machine of a multi-node training), its steps
    going on after those a restarted worker group left. The monitor stops when the run ends (or the server
    cannot be reached). Returns it, or None where it cannot start (then says why through ``log``)."""
    import logging
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
        logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # not a line per start and stop
        monitor = SystemMetricsMonitor(run_id, resume_logging=True, node_id=node, tracking_uri=tracking_uri)
        monitor.start()
        return monitor
    except Exception as e:  # psutil missing, the store unreachable: training goes on without them
        if log:
            log(f"no system metrics for run {run_id}: {type(e).__name__}: {e}")
        return None


def runs_url(server: str, experiment_id: str | None = None) -> str:
    """The MLflow UI's page of an experiment's runs (or the experiments list) in its Model training view:
    MLflow 3.17's UI opens an experiment on the tab its sidebar switch (GenAI / Model training, kept in the
    browser, GenAI at first) chooses, and ``workflowType=machine_learning`` in the address chooses Model
    training whatever the browser kept."""
    page = f"experiments/{experiment_id}/runs" if experiment_id else "experiments"
    return f"{server.rstrip('/')}/#/{page}?workflowType=machine_learning"


class MLflowReporter:
    """The engine's Reporter interface onto one MLflow run: metrics throttled to one batch every
    ``every_s`` seconds (evaluation metrics are sent at once), messages to the console.

    Training does not wait for the tracking server: a batch that cannot be sent (the server is down) goes
    to a spool file ``<DDPS_HOME>/spool/<run_id>.jsonl`` — a buffer, not a tracker — and the reporter tries
    again every ``retry_s`` seconds; the first send that succeeds replays the spool in order (with the
    metrics' own timestamps), so nothing is lost, including by a worker that died meanwhile: the next
    reporter of the same run (a restarted worker, the driver) replays what it left."""

    def __init__(self, tracker: Tracker, run_id: str, every_s: float = 10.0, echo=None, retry_s: float = 15.0):
        self.tracker, self.run_id, self.every_s, self.echo, self.retry_s = tracker, run_id, every_s, echo, retry_s
        self.pending: list[tuple[dict, int, int]] = []  # (metrics, step, timestamp in ms)
        self.last = 0.0
        self.down_since: float | None = None
        self.spool = cache_spool() / f"{re.sub(r'[^A-Za-z0-9]+', '_', run_id)}.jsonl"

    def log(self, metrics: dict, step: int) -> None:
        if self.echo:
            self.echo.log(metrics, step)
        self.pending.append((dict(metrics), step, int(time.time() * 1000)))
        urgent = any(not k.startswith(("loss", "lr", "img_per_s", "ce", "vlb")) for k in metrics)
        waited = time.monotonic() - self.last
        if (urgent and self.down_since is None) or waited >= (self.retry_s if self.down_since else self.every_s):
            self.flush()

    def info(self, message: str) -> None:
        if self.echo:
            self.echo.info(message)

    def flush(self) -> bool:
        """Send the spool (if any) then what is pending; on failure spool it. True if all was delivered."""
        self.last = time.monotonic()
        batches = self._spooled() + self.pending
        self.pending = []
        sent = 0
        try:
            for metrics, step, stamp in batches:
                self.tracker.log_metrics(self.run_id, metrics, step, timestamp=stamp)
                sent += 1
        except Exception as e:  # the server is unreachable or failing: keep every batch not yet sent
            self._write_spool(batches[sent:])
            if self.down_since is None:
                self.down_since = time.monotonic()
                self.info(f"MLflow unreachable ({type(e).__name__}); training goes on, metrics kept in "
                          f"{self.spool} and sent when it is back")
            return False
        self.spool.unlink(missing_ok=True)
        if self.down_since is not None:
            self.info(f"MLflow reachable again after {time.monotonic() - self.down_since:.0f} s; "
                      f"{len(batches)} spooled batches delivered")
            self.down_since = None
        return True

    def _spooled(self) -> list[tuple[dict, int, int]]:
        if not self.spool.exists():
            return []
        return [tuple(json.loads(line)) for line in self.spool.read_text().splitlines() if line.strip()]

    def _write_spool(self, batches: list) -> None:
        text = "".join(json.dumps(list(b)) + "\n" for b in batches)
        if not isinstance(self.spool, Path):  # in the storage: one PUT, whole or not at all
            self.spool.write_text(text)
            return
        tmp = self.spool.with_name(self.spool.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, self.spool)  # whole or not at all, as checkpoints are


def cache_spool():
    """Where workers spool what MLflow did not take: the storage's spool/ when there is one (the driver, on
    another node, replays it), else DDPS_HOME's."""
    from ddps.storage import folder
    return folder("spool")
