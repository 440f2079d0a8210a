"""The paper's findings, each computed from our numbers and judged against the seed-to-seed noise.

A finding compares A with B (B may be the best of several cells): d = A - B. With the noise n (the
standard deviation of the default DDPS over three training seeds, the ``seeds`` experiment, of the same
metric): ✔ if d > n (holds by more than the noise), ✘ if d < -n (reversed by more than the noise), ≈
otherwise. Last-step mIoU unless the finding names another figure.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

from ddps import names
from ddps.report.runs import Cell, Table
from ddps.report.tables import num

HOLDS, WITHIN, REVERSED, UNKNOWN = "✔", "≈", "✘", "?"


@dataclass
class Outcome:
    table: str
    claim: str           # the paper's finding, in words
    detail: str          # the numbers compared: "replace-only 63.20 - max(mask-only 62.90, ...)"
    d: float
    noise: float
    verdict: str


def verdict(d: float, noise: float) -> str:
    if math.isnan(d) or math.isnan(noise):
        return UNKNOWN
    return HOLDS if d > noise else REVERSED if d < -noise else WITHIN


def noise(tables: dict[str, Table]) -> dict[str, float]:
    """Sample standard deviation of the seeds experiment's last-step mIoU and mBIoU (NaN if < 2 seeds)."""
    cells = tables["seeds"].cells if "seeds" in tables else []
    out = {}
    for metric in names.SCORES:
        key = names.summary_key(names.LAST, metric)
        values = [c.get(key) for c in cells if not math.isnan(c.get(key))]
        out[metric] = statistics.stdev(values) if len(values) >= 2 else math.nan
    return out


# ---- the comparisons --------------------------------------------------------------------------------

def _pick(table: Table | None, **coords) -> Cell | None:
    """The cell with these labels; a label ending in '*' matches by prefix."""
    if table is None:
        return None
    for cell in table.sorted_cells():
        if all(cell.coords.get(k, "").startswith(v[:-1]) if v.endswith("*") else cell.coords.get(k) == v
               for k, v in coords.items()):
            return cell
    return None


def _compare(table: str, claim: str, a: tuple[str, Cell | None, str], bs: list[tuple[str, Cell | None, str]],
             noises: dict[str, float]) -> Outcome:
    """a / each b: (name, cell, summary key). B is the best of bs."""
    metric = names.MBIOU if a[2].endswith(names.MBIOU) else names.MIOU
    value = lambda c, key: math.nan if c is None else c.get(key)  # noqa: E731
    va = value(a[1], a[2])
    vbs = [value(c, key) for _, c, key in bs]
    vb = math.nan if any(math.isnan(v) for v in vbs) else max(vbs)
    d = va - vb
    b_text = (f"{bs[0][0]} {num(vbs[0])}" if len(bs) == 1
              else "max(" + ", ".join(f"{n} {num(v)}" for (n, _, _), v in zip(bs, vbs)) + ")")
    detail = f"{a[0]} {num(va)} − {b_text} = {'–' if math.isnan(d) else f'{d:+.2f}'} {metric}"
    return Outcome(table, claim, detail, d, noises[metric], verdict(d, noises[metric]))


def findings(tables: dict[str, Table]) -> list[Outcome]:
    """Every finding whose table was run (a missing cell gives '?')."""
    n = noise(tables)
    t = tables.get
    out: list[Outcome] = []
    last = names.LAST_MIOU
    if t("table3a"):
        out.append(_compare("table3a", "Replace-only transitions beat mask-only and replace+mask",
                            ("replace-only", _pick(t("table3a"), transition="replace-only"), last),
                            [(v, _pick(t("table3a"), transition=v), last) for v in ("mask-only", "replace+mask")], n))
    if t("table3b"):
        b = t("table3b")
        out.append(_compare("table3b", "The first prediction is the best diffusion target",
                            ("first prediction", _pick(b, target="first prediction"), last),
                            [(v, _pick(b, target=v), last) for v in ("ground truth", "initial prediction")], n))
        gt = _pick(b, target="ground truth")
        out.append(_compare("table3b", "With the ground-truth target, more steps degrade the mask",
                            ("ground truth, step 1", gt, names.STEP1_MIOU), [("its last step", gt, last)], n))
    if t("table3c"):
        c = t("table3c")
        out.append(_compare("table3c", "Free re-noising beats the posterior (both without CFG)",
                            ("free", _pick(c, renoise="free", cfg="without CFG"), last),
                            [("posterior", _pick(c, renoise="posterior", cfg="without CFG"), last)], n))
        out.append(_compare("table3c", "Classifier-free guidance helps (with free re-noising)",
                            ("with CFG", _pick(c, renoise="free", cfg="with CFG*"), last),
                            [("without", _pick(c, renoise="free", cfg="without CFG"), last)], n))
    if t("table3d"):
        d = t("table3d")
        ms = "multi-stage (MS)"
        out.append(_compare("table3d", "CE beats the hybrid loss (both multi-stage)",
                            ("CE + MS", _pick(d, loss="CE", stages=ms), last),
                            [("hybrid + MS", _pick(d, loss="hybrid*", stages=ms), last)], n))
        out.append(_compare("table3d", "Multi-stage training helps (CE)",
                            ("CE + MS", _pick(d, loss="CE", stages=ms), last),
                            [("CE alone", _pick(d, loss="CE", stages="one stage"), last)], n))
    if t("table3e"):
        e = t("table3e")
        trains, tests = e.labels("train_steps"), e.labels("test_steps")
        big = _pick(e, train_steps=trains[-1], test_steps=tests[-1]) if trains and tests else None
        small = _pick(e, train_steps=trains[0], test_steps=tests[0]) if trains and tests else None
        out.append(_compare("table3e", "More train and test steps help",
                            (f"T={trains[-1] if trains else '?'}, K={tests[-1] if tests else '?'}", big, last),
                            [(f"T={trains[0] if trains else '?'}, K={tests[0] if tests else '?'}", small, last)], n))
    if t("table6"):
        six = t("table6")
        for steps in six.labels("train_steps"):
            out.append(_compare("table6", f"EMA helps (T = {steps})",
                                ("with EMA", _pick(six, ema="with EMA", train_steps=steps), last),
                                [("without", _pick(six, ema="without EMA", train_steps=steps), last)], n))
    if t("table7"):
        out.append(_compare("table7", "The mask prior beats the same UNet as a decode head",
                            ("DDPS", _pick(t("table7"), method="DDPS"), last),
                            [("UNet head", _pick(t("table7"), method="UNet as decode head"), last)], n))
    if t("table8"):
        out.append(_compare("table8", "Discrete diffusion beats bit diffusion",
                            ("discrete", _pick(t("table8"), diffusion="discrete"), last),
                            [("bit", _pick(t("table8"), diffusion="bit diffusion"), last)], n))
    if t("table1"):
        one = t("table1")
        for cell in one.sorted_cells():
            name = " / ".join(cell.coords.get(a, "") for a in one.rows)
            for metric in names.SCORES:
                out.append(_compare("table1", f"DDPS improves its base, {metric} ({name})",
                                    ("DDPS", cell, names.summary_key(names.LAST, metric)),
                                    [("base", cell, names.summary_key(names.BASE, metric))], n))
    return out


def render(outcomes: list[Outcome], noises: dict[str, float]) -> list[str]:
    lines = [f"Noise (standard deviation of the default DDPS over 3 training seeds, `seeds`): "
             f"{num(noises['mIoU'])} mIoU, {num(noises['mBIoU'])} mBIoU. ✔ holds by more than the noise, "
             f"≈ within it, ✘ reversed by more than it" + (", ? not measured." if any(
                 o.verdict == UNKNOWN for o in outcomes) else "."), "",
             "| | finding | table | A − B | noise |", "|---|---|---|---|---|"]
    lines += [f"| {o.verdict} | {o.claim} | [{o.table}]({o.table}.md) | {o.detail} | {num(o.noise)} |"
              for o in outcomes]
    return lines
