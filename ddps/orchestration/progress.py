"""The sweep's live progress line, fed by a Ray Tune callback (Tune's own reporter is silenced)."""
from __future__ import annotations

import sys
import time
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
