"""Progress a person can read: the sweep's live line, fed by a Ray Tune callback (Tune's own reporter is
silenced), and the pipeline's console, fed by its trainings' rank-0 workers through a small Ray actor (the
workers' own output stays in Ray's logs unless --verbose)."""
from __future__ import annotations

import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from ddps.orchestration.estimates import duration

if TYPE_CHECKING:
    from ddps.orchestration.sweep import Job


def say(line: str) -> None:
    """The sweep's default log: print, looked up when called (Ray swaps builtins.print in some processes)."""
    print(line, flush=True)


class Progress:
    """Jobs done / total, cells done / total, what runs now (a training with its iteration), elapsed, and an
    ETA — the estimate of what is left (``estimates.py``), scaled by how the estimate has held so far. On a
    terminal the line rewrites itself; in a log, one line per event."""

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

    def started(self, job: Job) -> None:
        self.running[job.label] = [job.seconds, "", 0.0]
        self.line()

    def result(self, job: Job, result: dict) -> None:
        if "iter" in result and job.label in self.running:
            self.running[job.label][1] = f" it {result['iter']}/{job.iters or '?'}"
            if job.iters:
                self.running[job.label][2] = min(1.0, result["iter"] / job.iters)
            self.line()

    def finished(self, job: Job, ok: bool) -> None:
        seconds = self.running.pop(job.label, [0.0])[0]
        self.estimate_left -= seconds
        self.estimate_done += seconds
        self.done += 1
        self.failed += not ok
        self.cells_done += job.kind == "eval" and ok
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


def tune_callback(progress: Progress):
    """A Ray Tune callback that tells ``progress`` of each trial's start, results and end (a sweep trial's
    config: ``{"trial": {"label": ..., "job": Job}}``)."""
    from ray import tune
    key = id(progress)
    _PROGRESS[key] = progress

    class ProgressCallback(tune.Callback):
        def on_trial_start(self, iteration, trials, trial, **info):
            _PROGRESS[key].started(trial.config["trial"]["job"])

        def on_trial_result(self, iteration, trials, trial, result, **info):
            _PROGRESS[key].result(trial.config["trial"]["job"], result)

        def on_trial_complete(self, iteration, trials, trial, **info):
            _PROGRESS[key].finished(trial.config["trial"]["job"], True)

        def on_trial_error(self, iteration, trials, trial, **info):
            _PROGRESS[key].finished(trial.config["trial"]["job"], False)

    return ProgressCallback()


# ---- the pipeline's console: messages as lines, a training's progress as one line ------------------------------

class Console:
    """What a person reads of a pipeline: messages as lines, and the running training's progress as one line —
    rewritten in place on a terminal, at most every ``every_s`` seconds elsewhere (a job's log) — all of it
    appended to ``log_file`` as well, every progress record included."""

    def __init__(self, log_file: Path | None = None, stream=None, every_s: float = 30.0):
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty()
        self.file = open(log_file, "a", buffering=1) if log_file else None  # noqa: SIM115 - closed by close()
        self.log_file, self.every_s = log_file, every_s
        self.live, self.printed = "", 0.0
        self.lock = threading.Lock()

    def say(self, text: str) -> None:
        with self.lock:
            self._append(text)
            if not self.tty and self.live:  # the progress line held back (every_s) comes first
                self.stream.write(self.live + "\n")
                self.live, self.printed = "", time.monotonic()
            if self.tty and self.live:
                self.stream.write("\r\033[K")
            self.stream.write(text + "\n")
            if self.tty and self.live:
                self.stream.write(self.live)
            self.stream.flush()

    def update(self, text: str, record: str | None = None) -> None:
        """The progress line is now ``text``; ``record`` (default ``text``) goes to the log file."""
        with self.lock:
            self._append(record or text)
            if self.tty:
                self.stream.write("\r\033[K" + text)
                self.stream.flush()
                self.live = text
            elif time.monotonic() - self.printed >= self.every_s:
                self.stream.write(text + "\n")
                self.stream.flush()
                self.live, self.printed = "", time.monotonic()  # nothing held back for end()
            else:
                self.live = text  # printed by end() if it is the last

    def end(self) -> None:
        """The training is over: its last progress line stays."""
        with self.lock:
            if self.live:
                self.stream.write(("\n" if self.tty else self.live + "\n"))
                self.stream.flush()
            self.live, self.printed = "", 0.0

    def _append(self, text: str) -> None:
        if self.file:
            self.file.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {text}\n")

    def close(self) -> None:
        self.end()
        if self.file:
            self.file.close()
            self.file = None


def progress_text(label: str, step: int, total: int | None, metrics: dict, eta_s: float | None) -> str:
    """``[stage1] it 120/400 | loss 0.531 | 95 img/s | val mIoU 61.2 | ETA 1m20s``: what the line shows."""
    from ddps.engine.reporter import format_seconds
    parts = [f"[{label}] it {step}" + (f"/{total}" if total else "")]
    if "loss" in metrics:
        parts.append(f"loss {metrics['loss']:.4g}")
    if "img_per_s" in metrics:
        parts.append(f"{metrics['img_per_s']:.0f} img/s")
    parts += [f"{key.replace('_', ' ')} {value:.2f}" for key, value in metrics.items() if key.endswith("mIoU")]
    if eta_s is not None:
        parts.append(f"ETA {format_seconds(eta_s)}")
    return " | ".join(parts)


class FeedPump:
    """Carries what a training's rank-0 worker reports (a ``ProgressFeed`` actor) to the driver's Console: polled
    every ``every_s`` seconds in a thread while the training runs; the latest metrics of each kind are kept so
    that the line shows the last loss beside the last validation score."""

    def __init__(self, feed, console: Console, every_s: float = 0.5):
        self.feed, self.console, self.every_s = feed, console, every_s
        self.metrics: dict = {}
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._run, name="ddps-progress", daemon=True)

    def __enter__(self) -> "FeedPump":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop_event.set()
        self.thread.join(10)
        self.drain()
        self.console.end()

    def _run(self) -> None:
        while not self.stop_event.wait(self.every_s):
            self.drain()

    def drain(self) -> None:
        import ray

        from ddps.engine.reporter import record_line
        try:
            records = ray.get(self.feed.take.remote(), timeout=10)
        except Exception:  # noqa: BLE001 - progress is a courtesy: a lost record never stops a training
            return
        for record in records:
            if record[0] == "info":
                self.console.say(f"[{record[1]}] {record[2]}")
                continue
            _, label, step, total, metrics, eta_s = record
            self.metrics.update(metrics)
            self.console.update(progress_text(label, step, total, self.metrics, eta_s),
                                record=record_line(label, step, total, metrics, eta_s))


class ProgressFeed:
    """A Ray actor (no CPU) holding what a training's rank-0 worker reported and the driver has not taken yet."""

    def __init__(self):
        self.records: list = []

    def post(self, record: tuple) -> None:
        self.records.append(record)

    def take(self) -> list:
        records, self.records = self.records, []
        return records


def new_feed():
    import ray
    return ray.remote(num_cpus=0)(ProgressFeed).remote()
