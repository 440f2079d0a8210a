"""What a report reads: the FINISHED evaluation runs of an MLflow experiment, as cells of a table.

Only MLflow (through the tracking adapter, which imports no torch): a sweep's parent run gives the table's
title, its row and column axes and their order; each evaluation run gives one cell — its coordinates
(``axis.<name>`` tags), the ``ddps.summary`` tag (base / step 1 / last-step scores, multi-scale, mask
reliance) and the #P(M) metrics. A pipeline's experiment (``ddps pipeline``, ``make demo``) has no sweep
parent: each of its evaluation runs is a cell of a one-column table.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from ddps import names


@dataclass
class Cell:
    run_id: str
    coords: dict[str, str]          # axis -> label
    summary: dict[str, float]       # base_mIoU, step1_mIoU, last_mIoU, ... (the ddps.summary tag)
    tags: dict[str, str]
    params_base: float = math.nan  # #P(M) of the base segmentor and of the denoiser
    params_denoiser: float = math.nan
    budget: str = ""  # what a refiner had to work with: its base and data (their config) and its iterations

    def get(self, key: str) -> float:
        return float(self.summary.get(key, math.nan))

    @property
    def steps(self) -> int:
        return int(self.summary.get("steps", 0))


@dataclass
class Table:
    name: str                       # the MLflow experiment
    title: str
    rows: list[str]                 # axis names
    columns: list[str]
    order: dict[str, list[str]]     # each axis's labels in the experiment file's order
    cells: list[Cell]
    runs: int                       # FINISHED runs of the experiment (evaluations, trainings, parents)
    preset: str = "?"
    dataset: str = "?"
    commits: list[str] = field(default_factory=list)
    parent: str | None = None       # the sweep's (or pipeline's) parent run: where figures are logged
    split: str = "val"              # what its evaluations scored (eval.split): val, or the holdout scenes

    def labels(self, axis: str) -> list[str]:
        """An axis's labels in table order: the file's order, else numeric, else alphabetical."""
        seen = sorted({c.coords[axis] for c in self.cells if axis in c.coords}, key=_natural)
        known = [v for v in self.order.get(axis, []) if v in seen]
        return known + [v for v in seen if v not in known]

    def find(self, **coords: str) -> Cell | None:
        for cell in self.cells:
            if all(cell.coords.get(k) == v for k, v in coords.items()):
                return cell
        return None

    def sorted_cells(self) -> list[Cell]:
        axes = self.rows + self.columns
        index = {a: {v: i for i, v in enumerate(self.labels(a))} for a in axes}
        return sorted(self.cells, key=lambda c: (tuple(index[a].get(c.coords.get(a), -1) for a in axes),
                                                 c.tags.get(names.CONTENT_HASH, c.run_id)))


def _natural(label: str):
    try:
        return (0, float(label), label)
    except ValueError:
        return (1, 0.0, label)


def _tag(row, key: str, default: str = "") -> str:
    value = row.get(f"tags.{key}")
    return default if value is None or (isinstance(value, float) and math.isnan(value)) else str(value)


def _metric(row, key: str) -> float:
    value = row.get(f"metrics.{key}")
    return math.nan if value is None else float(value)


def _newest_first(df):
    return df.sort_values(["start_time", "run_id"], ascending=[False, True], kind="stable")


BUDGET_SECTIONS = ("params.data.", "params.base.", "params.train_base.")


def _budget(row) -> str:
    """A refiner's budget from its evaluation run's config params: the base and the data it refines (their
    sections) and its training iterations (both stages; the UNet head trains as many at once)."""
    config = {k: row[k] for k in row.index if k.startswith(BUDGET_SECTIONS) and isinstance(row[k], str)}
    iters = [row.get(f"params.train.{k}") for k in ("stage1_iters", "stage2_iters")]
    if not config or not all(isinstance(i, str) for i in iters):
        return ""
    return json.dumps({**config, "iters": sum(int(i) for i in iters)}, sort_keys=True)


def load_table(tracker, name: str, evaluations: set[str] | None = None, split: str | None = None
               ) -> Table | None:
    """The table of experiment ``name`` (only these evaluations' content hashes, if given) on one split:
    ``split`` (val or holdout), else val when the experiment has val evaluations, else holdout — a cell
    evaluated on both is never two cells of one table. None if it has no FINISHED evaluation run there."""
    evals = tracker.search([name], {names.STEP: names.STEP_EVAL})
    if not evals.empty and evaluations is not None:
        evals = evals[evals["tags." + names.CONTENT_HASH].isin(evaluations)]
    if evals.empty:
        return None
    column = "tags." + names.EVAL_SPLIT  # runs logged before eval.split existed scored val
    splits = evals[column].fillna("val") if column in evals.columns else evals["run_id"].map(lambda _: "val")
    split = split or ("val" if (splits == "val").any() else "holdout")
    evals = evals[splits == split]
    if evals.empty:
        return None
    evals = _newest_first(evals).drop_duplicates("tags." + names.CONTENT_HASH, keep="first")  # one per cell
    everything = tracker.search([name])
    parents = tracker.search([name], {names.STEP: names.STEP_SWEEP}, status=None)
    title, rows, columns, order, parent = name, [], [], {}, None
    if not parents.empty:
        top = _newest_first(parents).iloc[0]
        parent = top["run_id"]
        title = _tag(top, names.TITLE, name)
        rows = [a for a in _tag(top, names.ROWS).split(",") if a]
        columns = [a for a in _tag(top, names.COLUMNS).split(",") if a]
        order = json.loads(_tag(top, names.ORDER, "{}"))
    else:  # a pipeline's experiment: its evaluation runs, one row each, newest last
        pipelines = tracker.search([name], {names.STEP: names.STEP_PIPELINE}, status=None)
        parent = _newest_first(pipelines).iloc[0]["run_id"] if not pipelines.empty else None
        rows = ["run"]
    cells = []
    for _, row in evals.iterrows():
        tags = {c[len("tags."):]: str(row[c]) for c in evals.columns
                if c.startswith("tags.") and isinstance(row[c], str)}
        found = {k[len(names.AXIS):]: v for k, v in tags.items() if k.startswith(names.AXIS)}
        axes = [a for a in rows + columns if a in found] + sorted(set(found) - set(rows + columns))
        coords = {a: found[a] for a in axes}  # the table's axis order, whatever order MLflow returns tags in
        if rows == ["run"]:
            coords = {"run": f"{tags.get('base', '?')} + {tags.get('denoiser', '?')} "
                             f"({tags.get(names.CONTENT_HASH, '')[:8]})"}
        cells.append(Cell(row["run_id"], coords, json.loads(tags.get(names.SUMMARY, "{}")), tags,
                          _metric(row, names.PARAMS_BASE), _metric(row, names.PARAMS_DENOISER), _budget(row)))
    if rows == ["run"]:
        starts = dict(zip(evals["run_id"], evals["start_time"]))
        order = {"run": [c.coords["run"] for c in sorted(cells, key=lambda c: (starts[c.run_id], c.run_id))]}
    commits = sorted({c.tags.get("git_commit", "unknown") for c in cells})
    first = cells[0].tags
    return Table(name, title, rows, columns, order, cells, len(everything), first.get("preset", "?"),
                 first.get("dataset", "?"), commits, parent, split)
