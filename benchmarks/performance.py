"""Runs the performance benchmarks one after another and writes reports/performance.md.

    .venv/bin/python benchmarks/performance.py [--out reports/performance.md] [--only orchestration,mfu,...]
                                               [--gpu-output FILE]

Each benchmark is its own script (run it alone to try one): orchestration.py (Ray Train against one process),
mfu.py (model FLOPs utilisation), inference.py (latency and quality against K), data_loading.py (loader
against a preloaded batch, feature cache against none), and the sweep planner (`ddps sweep --all --dry-run`
with the measured wall times of the `cpu` sweeps from $DDPS_HOME/sweep-times-cpu*.tsv, written by
benchmarks/sweep_all.sh). gpu.py runs on a GPU machine; pass its printed output with --gpu-output to include
it. The page records machine, date and commit; every figure in it is a ratio measured in one run or a
measurement beside its own reference. Run it on a quiet machine: a second job on the cores changes the
absolute numbers (the ratios much less).
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = {
    "orchestration": ("1. Orchestration overhead (budget: Ray Train >= 0.95 of one process)", ["orchestration.py"]),
    "mfu": ("2. Compute efficiency (model FLOPs utilisation)", ["mfu.py"]),
    "inference": ("3. Inference: latency and quality against the refinement steps K", ["inference.py"]),
    "data_loading": ("4. Data loading (budget: loader-fed step >= 0.95 of a preloaded one)", ["data_loading.py"]),
    "sweep": ("5. Sweep planner and the measured `--all --preset cpu` run", None),
}


def run(args: list[str], env: dict) -> str:
    done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode:
        return f"(failed with exit status {done.returncode})\n\n```\n{done.stderr[-3000:]}\n```"
    return done.stdout.strip()


def sweep_section(env: dict) -> str:
    ddps = [sys.executable, "-m", "ddps"]
    plan = run(ddps + ["sweep", "--all", "--preset", "cpu", "--dry-run"], env)
    table = "\n".join(line for line in plan.splitlines() if line.startswith("|"))
    home = Path(env.get("DDPS_HOME") or Path(env.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ddps")
    times = []
    for path in sorted(home.glob("sweep-times-cpu*.tsv")):
        times.append(f"`{path.name}`:\n\n```\n{path.read_text().strip()}\n```")
    measured = "\n\n".join(times) or "(no measured sweep in this DDPS_HOME: run benchmarks/sweep_all.sh cpu)"
    return f"The plan (`ddps sweep --all --preset cpu --dry-run`, on this DDPS_HOME):\n\n{table}\n\n" \
           f"Measured wall times (seconds per table, as sweep_all.sh wrote them):\n\n{measured}"


def machine() -> str:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
    return f"{os.cpu_count()} CPUs ({cpu}), {memory:.0f} GiB, {platform.system()} {platform.release()}, " \
           f"Python {platform.python_version()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "performance.md")
    parser.add_argument("--only", help=f"comma-separated sections: {', '.join(SECTIONS)}")
    parser.add_argument("--gpu-output", type=Path, help="what benchmarks/gpu.py printed on a GPU machine")
    args = parser.parse_args()
    chosen = args.only.split(",") if args.only else list(SECTIONS)
    unknown = sorted(set(chosen) - set(SECTIONS))
    if unknown:
        sys.exit(f"performance.py: unknown section(s) {', '.join(unknown)}; choose from: {', '.join(SECTIONS)}")
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "MLFLOW_DISABLE_TELEMETRY": "true",
           "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(ROOT)}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip() or "?"
    parts = [f"# Performance\n\nMachine: {machine()}. Date: {dt.date.today().isoformat()}. Commit: {commit}. "
             f"Written by `benchmarks/performance.py`; each section is what its script printed.\n"]
    for key in chosen:
        title, script = SECTIONS[key]
        print(f"[performance] {key} ...", flush=True)
        start = dt.datetime.now()
        body = sweep_section(env) if script is None else run([sys.executable, f"benchmarks/{script[0]}"], env)
        took = (dt.datetime.now() - start).total_seconds()
        parts.append(f"## {title}\n\n`{'ddps sweep' if script is None else 'benchmarks/' + script[0]}` "
                     f"({took:.0f} s)\n\n{body}\n")
    gpu = "## 6. GPU (`benchmarks/gpu.py`)\n\n"
    if args.gpu_output:
        gpu += args.gpu_output.read_text().strip() + "\n"
    else:
        gpu += ("Not run yet: no GPU machine was lent to this run. The script is ready: `python3 "
                "benchmarks/gpu.py` on one H100 or H200 (fp32 against bf16 for base training, refiner training "
                "and evaluation at the `paper` shapes; its docstring has the command for this workplace's GPU "
                "machines); its CPU mode, `--device cpu --tiny`, runs in the tests "
                "(tests/test_benchmarks_gpu.py).\n")
    parts.append(gpu)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(parts))
    print(f"[performance] wrote {args.out}")


if __name__ == "__main__":
    main()
