"""Training-step throughput of the base segmentor on this machine, configurations side by side.

    .venv/bin/python benchmarks/base_throughput.py [--repeats 2] [--steps 16]

Prints images/s per (batch, head channels, threads, channels_last) and the ratio to the first row. The
configurations are interleaved and repeated, since a shared machine's speed drifts; compare ratios
within one run, not absolute numbers across runs.
"""
from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from ddps.segmentors import create_base  # noqa: E402

CONFIGS = [  # (batch, feature channels, threads, channels_last)
    (16, 256, 2, False),
    (32, 256, 2, False),
    (16, 128, 2, False),
    (32, 128, 2, False),
    (32, 128, 2, True),
    (32, 128, 1, False),
]


def images_per_second(batch: int, channels: int, threads: int, channels_last: bool, steps: int, size: int = 64) -> float:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = create_base("segformer", "mit_b0", 11, feature_channels=channels)
    x, y = torch.randn(batch, 3, size, size), torch.randint(0, 11, (batch, size, size))
    if channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), 1e-3)
    for i in range(steps + 3):
        if i == 3:  # warm-up steps excluded
            start = time.perf_counter()
        loss = F.cross_entropy(model.segment(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return batch * steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--steps", type=int, default=16)
    args = parser.parse_args()
    results = {c: [] for c in CONFIGS}
    for _ in range(args.repeats):
        for config in CONFIGS:
            results[config].append(images_per_second(*config, steps=args.steps))
    base = sum(results[CONFIGS[0]]) / args.repeats
    print("| batch | head channels | threads | channels_last | images/s (runs) | ratio to row 1 |")
    print("|---|---|---|---|---|---|")
    for config, values in results.items():
        mean = sum(values) / len(values)
        runs = ", ".join(f"{v:.0f}" for v in values)
        print(f"| {config[0]} | {config[1]} | {config[2]} | {config[3]} | {mean:.0f} ({runs}) | {mean / base:.2f} |")


if __name__ == "__main__":
    main()
