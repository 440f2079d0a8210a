"""CPU seconds each process of this machine used while a block of code ran, read from /proc (Linux).

    with CpuByProcess() as cpu:
        work()
    cpu.table()  # process -> CPU s, largest first

A thread samples every process's utime + stime twice a second, so processes that start and end inside the
block (Ray's workers, actors) are counted too; a process is named by its title (Ray renames its workers
``ray::<Actor>.<method>``) or, failing that, its command name. Used by orchestration.py to show what else
takes the cores while a training runs under Ray.
"""
from __future__ import annotations

import os
import threading
from pathlib import Path

TICKS = os.sysconf("SC_CLK_TCK")


def _name(pid: str) -> str:
    try:
        words = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        title = words[0].decode(errors="replace").strip()
        if title.startswith("ray::") or not title:
            return title or Path(f"/proc/{pid}/comm").read_text().strip()
        program = os.path.basename(title.split()[0])
        if program.startswith("python") and len(words) > 1:
            script = next((w.decode(errors="replace") for w in words[1:] if w and not w.startswith(b"-")), "")
            return f"{program} {os.path.basename(script)}".strip()
        return program
    except OSError:
        return "?"


def _cpu_times() -> dict[str, tuple[str, float]]:
    out = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[pid] = float(int(fields[11]) + int(fields[12])) / TICKS  # utime, stime
    return out


class CpuByProcess:
    def __init__(self, every_s: float = 0.5):
        self.every_s = every_s
        self.first: dict[str, float] = {}
        self.last: dict[str, float] = {}
        self.names: dict[str, str] = {}
        self._stop = threading.Event()

    def _sample(self) -> None:
        for pid, seconds in _cpu_times().items():
            if pid not in self.first:
                # a process born during the block counts from zero; one alive before, from now
                self.first[pid] = seconds if self.started else 0.0
                self.names[pid] = _name(pid)
            self.last[pid] = seconds

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            self._sample()

    def __enter__(self):
        self.started = True
        self._sample()
        self.started = False
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._sample()

    def by_name(self) -> dict[str, float]:
        """CPU seconds per process name (processes of one name summed), largest first."""
        totals: dict[str, float] = {}
        for pid, seconds in self.last.items():
            used = seconds - self.first[pid]
            if used > 0:
                totals[self.names[pid]] = totals.get(self.names[pid], 0.0) + used
        return dict(sorted(totals.items(), key=lambda kv: -kv[1]))
