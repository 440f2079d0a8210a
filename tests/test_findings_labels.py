"""Every table and label that ``ddps/report/findings.py`` looks up exists in ``experiments/*.yaml``.

A finding picks its cells by an experiment's name and by axis labels (``_pick(t("table3a"),
transition="replace-only")``); a label renamed in an experiment file would otherwise turn that finding into
'?' without any error, and a renamed experiment would drop its findings. Here the report's findings run
over a full table per experiment file, one cell per combination of its axes' labels as a sweep tags them,
every score a number: each lookup must find its table and its cell, so no verdict may be '?'.
"""
import math
import zlib

import pytest

from ddps.orchestration.plan import cells_of, experiment_files, load_experiment
from ddps.report import findings as F
from ddps.report.runs import Cell, Table


class AnyScore(dict):
    """A ddps.summary where every key is a number (this test is about labels, not summary keys)."""

    def __init__(self, seed: int):
        super().__init__()
        self.seed = seed

    def get(self, key, default=None):
        return 50.0 + zlib.crc32(f"{self.seed}:{key}".encode()) % 1000 / 100  # distinct per cell and key, never NaN


class Looked(dict):
    """The tables by experiment name, remembering which names findings() asked for."""

    def __init__(self, tables):
        super().__init__(tables)
        self.asked: set[str] = set()

    def get(self, name, default=None):
        self.asked.add(name)
        return super().get(name, default)

    def __getitem__(self, name):
        self.asked.add(name)
        return super().__getitem__(name)

    def __contains__(self, name):
        self.asked.add(name)
        return super().__contains__(name)


def full_tables(preset: str) -> dict[str, Table]:
    tables, seed = {}, 0
    for path in experiment_files():
        experiment = load_experiment(path)
        cells = []
        for coords, _ in cells_of(experiment, preset):
            seed += 1
            cells.append(Cell(f"run{seed}", coords, AnyScore(seed), {}))
        order = {axis.name: list(axis.values(preset)[0]) for axis in experiment.axes}
        tables[experiment.name] = Table(experiment.name, experiment.title, list(experiment.rows),
                                        list(experiment.columns), order, cells, runs=len(cells), preset=preset)
    return tables


@pytest.mark.parametrize("preset", ["cpu", "paper"])
def test_every_table_and_label_a_finding_looks_up_is_in_the_experiment_files(preset):
    tables = Looked(full_tables(preset))
    outcomes = F.findings(tables)
    assert tables.asked and tables.asked <= set(tables), \
        f"findings.py looks up experiments that experiments/*.yaml does not name: {sorted(tables.asked - set(tables))}"
    assert all(not math.isnan(v) for v in F.noise(tables).values())
    unknown = [f"{o.table}: {o.claim} ({o.detail})" for o in outcomes if o.verdict == F.UNKNOWN]
    assert not unknown, f"a label findings.py picks is not in its experiment file: {unknown}"
    asked_tables = tables.asked - {"seeds"}  # the noise, not a finding
    assert {o.table for o in outcomes} == asked_tables  # every table it looks up gives at least one finding
