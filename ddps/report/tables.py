"""Markdown tables in the paper's layouts, from a :class:`~ddps.report.runs.Table`.

Two decimals; a refined score carries its change against the base segmentor of the same cell in
parentheses; a missing number prints as "–". Rows and columns follow the experiment file's order, so the
same runs always give the same bytes.
"""
from __future__ import annotations

import math
import statistics

from ddps import names
from ddps.report.runs import Cell, Table

DASH = "–"


def num(x: float) -> str:
    return DASH if x is None or math.isnan(x) else f"{x:.2f}"


def delta(x: float, base: float) -> str:
    """'63.11 (+1.03)': a score and its change against the base."""
    if math.isnan(x):
        return DASH
    return f"{x:.2f}" if math.isnan(base) else f"{x:.2f} ({x - base:+.2f})"


def ordinal(k: int) -> str:
    suffix = "th" if 10 <= k % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(k % 10, "th")
    return f"{k}{suffix}"


def last_name(cells: list[Cell]) -> str:
    """'20th step' when every cell refines in the same number of steps, else 'last step'."""
    steps = {c.steps for c in cells}
    return f"{ordinal(steps.pop())} step" if len(steps) == 1 else "last step"


def _md(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def _coords(cell: Cell, axes: list[str]) -> list[str]:
    return [cell.coords.get(a, DASH) for a in axes]


# ---- layouts --------------------------------------------------------------------------------------

def bases(table: Table) -> list[str]:
    """Tables 1, 2, 4: each base segmentor and DDPS on it — #P(M), mIoU single / multi-scale, mBIoU."""
    rows = []
    for c in table.sorted_cells():
        backbone = " / ".join(_coords(c, table.rows))
        base_ss, base_ms = c.get(names.BASE_MIOU), c.get(names.BASE_MS_MIOU)
        rows.append(["base", backbone, num(c.params_base), f"{num(base_ss)} / {num(base_ms)}", num(c.get(names.BASE_MBIOU))])
        rows.append([f"+ DDPS ({c.steps} steps)", backbone, num(c.params_base + c.params_denoiser),
                     f"{delta(c.get(names.LAST_MIOU), base_ss)} / {delta(c.get(names.LAST_MS_MIOU), base_ms)}",
                     delta(c.get(names.LAST_MBIOU), c.get(names.BASE_MBIOU))])
    return _md(["Method", "Backbone", "#P(M)", "mIoU (ss/ms)", "mBIoU"], rows)


def steps(table: Table) -> list[str]:
    """Tables 3a–3d, 7, 8: mIoU after the 1st and the last refinement step, and the last step's mBIoU."""
    cells = table.sorted_cells()
    axes = table.rows + table.columns
    last = last_name(cells)
    rows = [_coords(c, axes) + [delta(c.get(names.STEP1_MIOU), c.get(names.BASE_MIOU)),
                                       delta(c.get(names.LAST_MIOU), c.get(names.BASE_MIOU)),
                                       delta(c.get(names.LAST_MBIOU), c.get(names.BASE_MBIOU))] for c in cells]
    return _md(axes + ["1st step", last, f"mBIoU ({last})"], rows) + ["", base_line(cells)]


def matrix(table: Table) -> list[str]:
    """Tables 3e, 6: rows x columns of last-step mIoU; a cell the grid does not hold prints '–'."""
    row_axes, col_axes = table.rows, table.columns
    row_keys = _keys(table, row_axes)
    col_keys = _keys(table, col_axes)
    header = [" / ".join(row_axes) + " \\ " + " / ".join(col_axes)] + [" / ".join(k) for k in col_keys]
    rows = []
    for rk in row_keys:
        line = [" / ".join(rk)]
        for ck in col_keys:
            c = table.find(**dict(zip(row_axes, rk)), **dict(zip(col_axes, ck)))
            line.append(DASH if c is None else delta(c.get(names.LAST_MIOU), c.get(names.BASE_MIOU)))
        rows.append(line)
    return _md(header, rows) + ["", base_line(table.cells)]


def trajectory(table: Table) -> list[str]:
    """Table 3f: mIoU of the initial prediction, after the 1st step and after the last, per base."""
    cells = table.sorted_cells()
    rows = [_coords(c, table.rows) + [num(c.get(names.BASE_MIOU)), delta(c.get(names.STEP1_MIOU), c.get(names.BASE_MIOU)),
                                             delta(c.get(names.LAST_MIOU), c.get(names.BASE_MIOU))] for c in cells]
    return _md(table.rows + ["initial", "1st step", last_name(cells)], rows)


def denoisers(table: Table) -> list[str]:
    """Table 5: denoiser size (rows, with its #P(M)) x base segmentor (columns), last-step mIoU."""
    row_keys, col_keys = _keys(table, table.rows), _keys(table, table.columns)
    header = [" / ".join(table.rows), "#P(M)"] + [" / ".join(k) for k in col_keys]
    rows = []
    for rk in row_keys:
        found = [table.find(**dict(zip(table.rows, rk)), **dict(zip(table.columns, ck))) for ck in col_keys]
        params = next((c.params_denoiser for c in found if c is not None), math.nan)
        rows.append([" / ".join(rk), num(params)] + [DASH if c is None else delta(c.get(names.LAST_MIOU), c.get(names.BASE_MIOU))
                                                      for c in found])
    return _md(header, rows) + ["", base_line(table.cells)]


def methods(table: Table) -> list[str]:
    """Table 7: the base, the UNet as a decode head, DDPS — #P(M), mIoU, mBIoU of the last step."""
    cells = table.sorted_cells()
    first = cells[0]
    rows = [["base segmentor", num(first.params_base), num(first.get(names.BASE_MIOU)), num(first.get(names.BASE_MBIOU))]]
    rows += [[" / ".join(_coords(c, table.rows + table.columns)), num(c.params_base + c.params_denoiser),
              delta(c.get(names.LAST_MIOU), c.get(names.BASE_MIOU)), delta(c.get(names.LAST_MBIOU), c.get(names.BASE_MBIOU))]
             for c in cells]
    return _md(["Method", "#P(M)", "mIoU", "mBIoU"], rows)


def seeds(table: Table) -> list[str]:
    """The seed-to-seed noise: last-step mIoU and mBIoU per training seed, their mean and standard deviation."""
    cells = table.sorted_cells()
    rows = [_coords(c, table.rows) + [delta(c.get(names.LAST_MIOU), c.get(names.BASE_MIOU)),
                                             delta(c.get(names.LAST_MBIOU), c.get(names.BASE_MBIOU))] for c in cells]
    if len(cells) >= 2:
        rows.append(["mean ± std"] + [f"{statistics.mean(v):.2f} ± {statistics.stdev(v):.2f}"
                                      for v in ([c.get(names.LAST_MIOU) for c in cells], [c.get(names.LAST_MBIOU) for c in cells])])
    return _md(table.rows + ["mIoU", "mBIoU"], rows)


def pipeline(table: Table) -> list[str]:
    """A pipeline's evaluation (``ddps pipeline``, ``make demo``): the base, DDPS after step 1 and after
    the last step; one block per evaluation run of the experiment (oldest first)."""
    lines: list[str] = []
    cells = table.sorted_cells()
    for c in cells:
        total = num(c.params_base + c.params_denoiser)
        rows = [[f"base ({c.tags.get('base', '?')})", num(c.params_base), num(c.get(names.BASE_MIOU)), num(c.get(names.BASE_MBIOU))],
                ["DDPS step 1", total, delta(c.get(names.STEP1_MIOU), c.get(names.BASE_MIOU)),
                 delta(c.get(names.STEP1_MBIOU), c.get(names.BASE_MBIOU))],
                [f"DDPS step {c.steps} (last)", total, delta(c.get(names.LAST_MIOU), c.get(names.BASE_MIOU)),
                 delta(c.get(names.LAST_MBIOU), c.get(names.BASE_MBIOU))]]
        if len(cells) > 1:
            lines += [f"## {c.coords['run']}", ""]
        lines += _md(["Method", "#P(M)", "mIoU", "mBIoU"], rows) + [""]
        if not math.isnan(c.get(names.RELIANCE_OWN)):
            lines += [f"Mask reliance (last-step mIoU): own trajectory {num(c.get(names.RELIANCE_OWN))} | oracle ground "
                      f"truth {num(c.get(names.RELIANCE_ORACLE))} | random mask {num(c.get(names.RELIANCE_RANDOM))}", ""]
    return lines


def _is_head(cell: Cell) -> bool:
    return cell.tags.get("denoiser", "").startswith("head-")  # run_tags: "<method>-UNet-<size>"


def _head_axis(table: Table) -> str | None:
    """The axis that tells UNet-head cells from DDPS cells: the one whose labels they never share."""
    heads = [c for c in table.cells if _is_head(c)]
    ddps = [c for c in table.cells if not _is_head(c)]
    axes = [a for a in table.rows + table.columns
            if heads and ddps and not {c.coords.get(a) for c in heads} & {c.coords.get(a) for c in ddps}]
    return axes[0] if len(axes) == 1 else None


def _against_head(table: Table):
    """cell -> its last-step mIoU minus that of the UNet head at the same budget: the head sharing its other
    coordinates, trained on the same base and data for as many iterations (NaN for a head, or without one)."""
    axes = table.rows + table.columns
    method = _head_axis(table)
    heads = {(tuple(c.coords.get(a) for a in axes if a != method), c.budget): c for c in table.cells if _is_head(c)}

    def over_head(cell: Cell) -> float:
        head = None if _is_head(cell) or method is None else heads.get(
            (tuple(cell.coords.get(a) for a in axes if a != method), cell.budget))
        return math.nan if head is None else cell.get(names.LAST_MIOU) - head.get(names.LAST_MIOU)
    return over_head


def study(table: Table) -> list[str]:
    """A study of the mask prior (experiments/studies/prior*.yaml), one row per cell: base, step 1 and last-step mIoU,
    the multi-step gain (last − step 1), the reliance diagnostic — last-step mIoU fed its own trajectory, the
    ground truth re-noised (oracle), a fresh random mask at each step — with own − random (how much the
    denoiser reads its mask), and DDPS − the UNet head of the same other coordinates and budget (the same
    base and data, as many iterations: the prior against a decode head)."""
    axes = table.rows + table.columns
    over_head = _against_head(table)
    rows = []
    for c in table.sorted_cells():
        last, first = c.get(names.LAST_MIOU), c.get(names.STEP1_MIOU)
        own, random = c.get(names.RELIANCE_OWN), c.get(names.RELIANCE_RANDOM)
        gain = DASH if _is_head(c) or c.steps < 2 else f"{last - first:+.2f}"
        rows.append(_coords(c, axes) + [
            num(c.get(names.BASE_MIOU)), delta(first, c.get(names.BASE_MIOU)), delta(last, c.get(names.BASE_MIOU)),
            gain, f"{num(own)} / {num(c.get(names.RELIANCE_ORACLE))} / {num(random)}",
            DASH if math.isnan(own - random) else f"{own - random:+.2f}",
            DASH if math.isnan(over_head(c)) else f"{over_head(c):+.2f}"])
    return _md(axes + ["base", "step 1", "last", "last − step 1", "own / oracle / random", "own − random",
                       "DDPS − head"], rows) + [
        "", "mIoU. Reliance: last-step mIoU fed the denoiser's own trajectory / the ground truth re-noised / a "
            "fresh random mask at every step; own − random near 0: the mask input is not read."] + _over_seeds(
                table, over_head)


SEED_AXIS = "seed"  # a study's axis of training seeds (train.seed): its cells are one setting's repeats


def _known(values) -> list[float]:
    """The values that are numbers (NaN: a metric a cell does not have, or a cell without a head)."""
    return [v for v in values if not math.isnan(v)]


def _mean_sd(values: list[float]) -> str:
    """'+0.39 ± 0.13' over the known values."""
    values = _known(values)
    if not values:
        return DASH
    sd = f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else ""
    return f"{statistics.mean(values):+.2f}{sd}"


def _pooled_sd(groups: list[list[float]]) -> float:
    """The seed-to-seed standard deviation: the root mean of each setting's sample variance (settings of
    two or more seeds); NaN without any."""
    variances = [statistics.variance(g) for g in groups if len(g) > 1]
    return math.sqrt(statistics.mean(variances)) if variances else math.nan


def _over_seeds(table: Table, over_head) -> list[str]:
    """With a ``seed`` axis: each setting's mean ± standard deviation over its seeds of the multi-step gain
    (last − step 1) and the reliance (own − random), the noise (their pooled standard deviation over seeds),
    and whether the prior acts — both means above their noise."""
    axes = [a for a in table.rows + table.columns if a != SEED_AXIS]
    if SEED_AXIS not in table.rows + table.columns:
        return []
    groups: dict[tuple, list[Cell]] = {}
    for c in table.sorted_cells():
        if not _is_head(c) and c.steps >= 2:
            groups.setdefault(tuple(c.coords.get(a, DASH) for a in axes), []).append(c)
    gain = {k: _known(c.get(names.LAST_MIOU) - c.get(names.STEP1_MIOU) for c in cs) for k, cs in groups.items()}
    reliance = {k: _known(c.get(names.RELIANCE_OWN) - c.get(names.RELIANCE_RANDOM) for c in cs)
                for k, cs in groups.items()}
    gain_noise, reliance_noise = _pooled_sd(list(gain.values())), _pooled_sd(list(reliance.values()))
    rows = []
    for k, cs in groups.items():
        g, r = gain[k], reliance[k]
        acts = "?" if not g or not r or math.isnan(gain_noise) or math.isnan(reliance_noise) else (
            "yes" if statistics.mean(g) > gain_noise and statistics.mean(r) > reliance_noise else "no")
        rows.append(list(k) + [str(len(cs)), f"{statistics.mean(c.get(names.LAST_MIOU) for c in cs):.2f}",
                               _mean_sd(g), _mean_sd(r), _mean_sd([over_head(c) for c in cs]), acts])
    if not rows:
        return []
    return ["", "Over the training seeds (mean ± standard deviation):", ""] + _md(
        axes + ["seeds", "last", "last − step 1", "own − random", "DDPS − head", "prior acts"], rows) + [
        "", f"Noise (the pooled seed-to-seed standard deviation): last − step 1 {num(gain_noise)}, own − random "
            f"{num(reliance_noise)}. The prior acts where both means are above their noise."]


LAYOUTS = {"table1": bases, "table2": bases, "table4": bases, "table3e": matrix, "table6": matrix,
           "table3f": trajectory, "table5": denoisers, "table7": methods, "seeds": seeds,
           "prior": study}


def layout(table: Table):
    if table.rows == ["run"]:
        return pipeline
    if table.name.startswith("prior-"):  # the mask-prior study's other experiments (its pilot, the preset's)
        return study
    return LAYOUTS.get(table.name, matrix if table.columns else steps)


# ---- pieces -----------------------------------------------------------------------------------------

def _keys(table: Table, axes: list[str]) -> list[tuple[str, ...]]:
    """The label tuples of these axes that some cell holds, in table order."""
    present = {tuple(c.coords.get(a, DASH) for a in axes) for c in table.cells}
    keys = [()]
    for a in axes:
        keys = [k + (v,) for k in keys for v in table.labels(a)]
    return [k for k in keys if k in present]


def base_line(cells: list[Cell]) -> str:
    bases = {(c.get(names.BASE_MIOU), c.get(names.BASE_MBIOU)) for c in cells}
    if len(bases) == 1:
        miou, mbiou = bases.pop()
        return (f"Base segmentor (step 0): {num(miou)} mIoU, {num(mbiou)} mBIoU; in parentheses, the change "
                f"against it.")
    return "In parentheses: the change against each cell's own base segmentor (step 0)."


def header(table: Table) -> str:
    commits = ", ".join(c[:12] for c in table.commits)
    cells = f"{len(table.cells)} cell{'' if len(table.cells) == 1 else 's'}"
    split = "" if table.split == "val" else f" · scored on the {table.split} split (training scenes held out)"
    return (f"dataset {table.dataset}{split} · preset {table.preset} · {cells}, {table.runs} FINISHED "
            f"runs in MLflow experiment `{table.name}` · git commit {commits}")


def render(table: Table, paper: dict | None = None) -> str:
    """The table's Markdown file: title, header line, the table, then (paper preset) the published one."""
    lines = [f"# {table.title}", "", f"_{header(table)}_", ""] + layout(table)(table)
    if paper:
        lines += ["", f"Published, for comparison ({paper['source']}):", ""] + _md(paper["header"], paper["rows"])
    return "\n".join(lines).rstrip() + "\n"
