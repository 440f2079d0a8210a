"""README's picture: the refinement strips of `make demo`'s report, stacked and enlarged.

    .venv/bin/python scripts/readme_picture.py [--report DIR] [--out docs/images/demo-strips.png]

DIR is the demo's report folder (default: $DDPS_HOME/reports/ddps-fashion-scenes, what `make demo` writes);
its figures/*-strip-<i>.png are the strips of fixed val scenes (image | truth | base | step 1 ... step K,
each tile named above it). The scenes are 64 x 64 pixels: the picture repeats each pixel 3 x 3.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from ddps.paths import ddps_home

SCALE, GAP = 3, 4


def default_report() -> Path:
    """Where `make demo` writes its report: DDPS_HOME's reports/ (ddps.paths), its experiment's folder."""
    return ddps_home() / "reports" / "ddps-fashion-scenes"


def picture(strips: list[Path]) -> Image.Image:
    """The strips one under the other (white gaps), each pixel repeated SCALE x SCALE."""
    rows = [np.asarray(Image.open(p).convert("RGB")) for p in strips]
    width = max(r.shape[1] for r in rows)
    parts = []
    for i, row in enumerate(rows):
        parts.append(np.pad(row, ((0, 0), (0, width - row.shape[1]), (0, 0)), constant_values=255))
        if i + 1 < len(rows):
            parts.append(np.full((GAP, width, 3), 255, np.uint8))
    stacked = np.concatenate(parts, axis=0)
    return Image.fromarray(stacked.repeat(SCALE, axis=0).repeat(SCALE, axis=1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report", type=Path, default=default_report(), help="the demo's report folder")
    parser.add_argument("--out", type=Path, default=Path("docs/images/demo-strips.png"))
    args = parser.parse_args()
    strips = sorted((args.report / "figures").glob("*-strip-*.png"))
    if not strips:
        print(f"readme_picture: no *-strip-*.png in {args.report / 'figures'}; run `make demo` first", file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    picture(strips).save(args.out, optimize=True)
    print(f"{args.out}: {len(strips)} strips from {args.report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
