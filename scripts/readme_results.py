"""Rewrite README's "Results of the paper's tables" section from the committed report (reports/): the headline
table (Table 1), the paper's findings as `ddps report` judged them, and the sweeps' measured wall times
(reports/sweep-times-cpu*.tsv, copied from $DDPS_HOME by benchmarks/sweep_all.sh's user). Nothing in that
section is typed by hand.

    python scripts/readme_results.py [reports/]
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from readme_block import rewrite  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def section_of(markdown: str, heading: str) -> str:
    """The text under ``## heading`` up to the next ``## `` heading."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == f"## {heading}")
    stop = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    return "\n".join(lines[start + 1:stop]).strip()


def times(folder: Path) -> str:
    """The measured wall times (sweep_all.sh's files: a header line per run, then "<sweep>\t<seconds>")."""
    rows, total, counted = [], 0, 0
    for path in sorted(folder.glob("sweep-times-cpu*.tsv")):
        for line in path.read_text().splitlines():
            if not line.strip():
                continue
            if line.startswith("#"):  # a new run: its own sum
                rows.append(f"| *{line.lstrip('# ')}* | | |")
                total, counted = 0, 0
                continue
            table, seconds = line.split("\t")[:2]
            rows.append(f"| {table} | {path.name} | {int(seconds) // 3600} h {int(seconds) % 3600 // 60:02d} min "
                        f"{int(seconds) % 60:02d} s |")
            if table != "all (rerun)":
                total, counted = total + int(seconds), counted + 1
    if not rows:
        return "(no measured sweep times in reports/)"
    text = "| sweep | file | wall |\n|---|---|---|\n" + "\n".join(rows)
    if counted > 1:
        text += f"\n\nSum over the last run's sweeps: {total // 3600} h {total % 3600 // 60:02d} min."
    return text


def main(argv: list[str]) -> int:
    folder = Path(argv[0]) if argv else ROOT / "reports"
    index = (folder / "index.md").read_text()
    table1 = (folder / "table1.md").read_text().split("\n## Figures")[0].strip().splitlines()
    findings = section_of(index, "The paper's findings, on our numbers").replace("](table", "](reports/table")
    reliance = section_of(index, "Mask reliance of each DDPS model")
    text = "\n".join([
        f"Every table, figure and finding: **[reports/index.md](reports/index.md)** — written by `ddps report "
        f"--all --out reports/` from the MLflow runs of the `cpu` sweeps (parquet exports in `reports/runs/`).",
        "",
        f"**{table1[0].lstrip('# ')}** ([reports/table1.md](reports/table1.md))",
        "",
        *"\n".join(table1[1:]).strip().splitlines(),
        "",
        "**The paper's findings, on our numbers**",
        "",
        findings,
        "",
        "**Mask reliance of each DDPS model**",
        "",
        reliance,
        "",
        "**Wall time of the sweeps** (2 cores, `--workers 1`)",
        "",
        times(folder),
    ])
    rewrite(ROOT / "README.md", "results", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
