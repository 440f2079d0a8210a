"""Orchestration overhead: a DDPS training step under Ray Train (1 worker) against the same loop in one process.

    .venv/bin/python benchmarks/orchestration.py [--repeats 2] [--iters 120] [--threads 2] [--env KEY=VALUE]

Both sides run ``engine.train_refiner.fit_stage`` — stage 2 of the `cpu` preset's refiner (UNet-XS, batch 32,
the memory-mapped feature cache) on a randomly initialised SegFormer-B0 base (speed does not depend on
weights): in this process with plain PyTorch, and through ``orchestration.ray_train.run`` — a TorchTrainer
with one worker holding the same threads, its rank logging to MLflow (a SQLite store in a temporary folder)
as the sweeps' trainings do. Throughput is the training's own images/s per logged window (every 10
iterations), the first window (warm-up) left out; start-up (worker process, imports, the feature cache) is
reported apart. Runs alternate (a shared machine's speed drifts). Budget: Ray Train / plain >= 0.95.

Beside the speeds, the CPU seconds every process of the machine used during each side's runs (/proc,
``proc_cpu.py``): what Ray's own processes take from the cores the training uses. ``--env`` sets a variable
before the local Ray starts (its raylet and workers inherit it), to try Ray's settings, e.g.
``--env RAY_worker_niceness=0``.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")

import torch  # noqa: E402

from ddps.config import resolve, to_flat  # noqa: E402
from ddps.data import build_dataset  # noqa: E402
from ddps.engine.train_refiner import fit_stage, prepare_data  # noqa: E402
from ddps.segmentors import create_base  # noqa: E402
from ddps.segmentors.checkpoint import base_from_payload, read_checkpoint, save_base  # noqa: E402

from proc_cpu import CpuByProcess  # noqa: E402

LOG_EVERY = 10


class Windows:
    """Collects the images/s of each logged window."""

    def __init__(self):
        self.rates: list[float] = []

    def log(self, metrics: dict, step: int) -> None:
        if "img_per_s" in metrics:
            self.rates.append(metrics["img_per_s"])

    def info(self, message: str) -> None:
        pass


def steady(rates: list[float]) -> float:
    return statistics.mean(rates[1:]) if len(rates) > 1 else float("nan")


def plain(cfg, base_path: Path, threads: int) -> tuple[float, float]:
    """(images/s, seconds outside the logged windows) of stage 2 in this process."""
    start = time.perf_counter()
    torch.set_num_threads(threads)
    payload = read_checkpoint(base_path)
    base = base_from_payload(payload, base_path).freeze()
    data = prepare_data(cfg, base, base_hash=payload["hash"])
    windows = Windows()
    fit_stage(cfg, "stage2", base, payload, data, path=None, reporter=windows)
    rate = steady(windows.rates)
    return rate, time.perf_counter() - start - cfg.train.stage2_iters * cfg.train.batch_size / rate


def on_ray(cfg, base_path: Path, threads: int, folder: Path, index: int) -> tuple[float, float]:
    """(images/s, seconds outside the logged windows) of the same stage through Ray Train, 1 worker."""
    from ddps.orchestration import ray_train
    from ddps.orchestration.tracking import Tracker
    tracker = Tracker(f"sqlite:///{folder / 'mlflow.db'}")
    run_id = tracker.start_run(tracker.experiment("orchestration-benchmark"), f"ray-{index}")
    iters = cfg.train.stage2_iters
    config = {"cfg": to_flat(cfg), "out": str(folder / f"ray-{index}.pt"), "label": "stage2", "iters": iters,
              "tracking_uri": tracker.uri, "run_id": run_id, "stage": "stage2", "base": str(base_path)}
    cluster = ray_train.Cluster(workers=1, cpus_per_worker=threads, max_failures=0, checkpoint_every=10 ** 9)
    start = time.perf_counter()
    ray_train.run("refiner", config, cluster, name=f"orchestration-benchmark-{os.getpid()}-{index}")
    wall = time.perf_counter() - start
    tracker.end_run(run_id)
    rates = [value for _, value in sorted(tracker.history(run_id, "img_per_s"))]
    rate = steady(rates)
    return rate, wall - iters * cfg.train.batch_size / rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--iters", type=int, default=120)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--scenes", type=int, default=2000, help="train scenes (the feature cache's size)")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="an environment variable for the local Ray (repeatable)")
    args = parser.parse_args()
    for item in args.env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            parser.error(f"--env {item!r}: expected KEY=VALUE")
        os.environ[key] = value
    cfg = resolve("cpu", None, {"data.train_scenes": args.scenes, "train.stage2_iters": args.iters,
                                "train.log_every": LOG_EVERY, "train.eval_every": args.iters,
                                "eval.max_images": 32, "train.warmup_iters": 10})
    from ddps.orchestration.runtime import ensure_ray
    from ddps.orchestration.ray_train import Cluster
    ensure_ray(Cluster(workers=1, cpus_per_worker=args.threads), log_to_driver=False)
    results: dict[str, list[tuple[float, float]]] = {"plain PyTorch, one process": [], "Ray Train, 1 worker": []}
    cpu: dict[str, dict[str, float]] = {name: {} for name in results}
    walls: dict[str, float] = {name: 0.0 for name in results}

    def timed(name, fn, *fn_args):
        start = time.perf_counter()
        with CpuByProcess() as sampler:
            results[name].append(fn(*fn_args))
        walls[name] += time.perf_counter() - start
        for process, seconds in sampler.by_name().items():
            cpu[name][process] = cpu[name].get(process, 0.0) + seconds
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        data = build_dataset(cfg.data, "train", train=False)
        base = create_base(cfg.base.arch, cfg.base.backbone, data.num_classes,
                           feature_channels=cfg.base.feature_channels)
        base_path = save_base(folder / "base.pt", base, config=to_flat(cfg), class_names=data.class_names,
                              metrics={}, history=[], content_hash=f"orchestration-benchmark-{args.scenes}")
        for i in range(args.repeats):
            timed("plain PyTorch, one process", plain, cfg, base_path, args.threads)
            timed("Ray Train, 1 worker", on_ray, cfg, base_path, args.threads, folder, i)
    extra = f", env {' '.join(args.env)}" if args.env else ""
    print(f"torch {torch.__version__}, {args.threads} threads, stage 2 of UNet-XS, batch {cfg.train.batch_size}, "
          f"{args.iters} iterations x {args.repeats} runs each, alternating{extra}\n")
    print("| loop | images/s (runs) | start-up and wind-down s (runs) | ratio to plain |\n|---|---|---|---|")
    reference = statistics.mean(r for r, _ in results["plain PyTorch, one process"])
    for name, runs in results.items():
        rate = statistics.mean(r for r, _ in runs)
        print(f"| {name} | {rate:.1f} ({', '.join(f'{r:.1f}' for r, _ in runs)}) | "
              f"{', '.join(f'{s:.0f}' for _, s in runs)} | {rate / reference:.3f} |")
    print(f"\nCPU seconds per process during each side's runs (whole start to end, {args.repeats} runs; "
          f"wall {walls['plain PyTorch, one process']:.0f} s plain, {walls['Ray Train, 1 worker']:.0f} s Ray), "
          f"the 8 largest:\n")
    print("| side | process | CPU s | % of the side's wall x cores |\n|---|---|---|---|")
    cores = os.cpu_count() or 1
    for name, table in cpu.items():
        for process, seconds in list(table.items())[:8]:
            print(f"| {name} | `{process}` | {seconds:.1f} | {100 * seconds / (walls[name] * cores):.1f} |")
    ratio = statistics.mean(r for r, _ in results["Ray Train, 1 worker"]) / reference
    print(f"\nbudget: Ray Train / plain = {ratio:.3f} >= 0.95: {'holds' if ratio >= 0.95 else 'NOT MET'}")


if __name__ == "__main__":
    main()
