"""`ddps report` against a real MLflow SQLite store holding known runs (written through mlflow's API):
the tables' cells, each finding's verdict, byte-identical Markdown, figures logged back, parquet, no torch."""
import json
import re
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from ddps.orchestration.tracking import Tracker
from ddps.report.write import ReportError, write_report

COMMIT = "0123456789abcdef0123"
# seeds: last mIoU 63.0 / 63.2 / 63.4 -> noise 0.20; last mBIoU 42.0 / 42.3 / 42.6 -> noise 0.30
TABLES = {
    "seeds": ("Seeds", ["seed"], [], [
        ({"seed": "0"}, 63.0, 63.0, 42.0), ({"seed": "1"}, 63.2, 63.2, 42.3), ({"seed": "2"}, 63.4, 63.4, 42.6)]),
    "table3a": ("Table 3a", ["transition"], [], [
        ({"transition": "mask-only"}, 62.0, 62.0, 41.0), ({"transition": "replace+mask"}, 63.4, 63.4, 42.0),
        ({"transition": "replace-only"}, 63.3, 63.5, 42.0)]),
    "table3b": ("Table 3b", ["target"], [], [
        ({"target": "ground truth"}, 64.0, 63.5, 42.0), ({"target": "initial prediction"}, 62.0, 62.0, 41.0),
        ({"target": "first prediction"}, 63.0, 63.0, 42.0)]),
    "table3c": ("Table 3c", ["renoise", "cfg"], [], [
        ({"renoise": "free", "cfg": "without CFG"}, 63.0, 63.0, 42.0),
        ({"renoise": "free", "cfg": "with CFG (s = 0.4)"}, 62.9, 62.9, 42.0),
        ({"renoise": "posterior", "cfg": "without CFG"}, 62.5, 62.5, 41.0)]),
    "table3d": ("Table 3d", ["loss", "stages"], [], [
        ({"loss": "CE", "stages": "one stage"}, 62.0, 62.0, 41.0),
        ({"loss": "CE", "stages": "multi-stage (MS)"}, 63.0, 63.0, 42.0),
        ({"loss": "hybrid (CE + VLB)", "stages": "multi-stage (MS)"}, 63.3, 63.3, 42.0)]),
    "table3e": ("Table 3e", ["train_steps"], ["test_steps"], [
        ({"train_steps": "20", "test_steps": "2"}, 63.0, 63.0, 42.0),
        ({"train_steps": "20", "test_steps": "20"}, 63.1, 63.1, 42.0),
        ({"train_steps": "100", "test_steps": "2"}, 63.2, 63.2, 42.0),
        ({"train_steps": "100", "test_steps": "100"}, 63.6, 63.6, 42.0)]),
    "table6": ("Table 6", ["ema"], ["train_steps"], [
        ({"ema": "without EMA", "train_steps": "20"}, 63.1, 63.1, 42.0),
        ({"ema": "with EMA", "train_steps": "20"}, 63.0, 63.0, 42.0),
        ({"ema": "without EMA", "train_steps": "50"}, 63.0, 63.0, 42.0),
        ({"ema": "with EMA", "train_steps": "50"}, 63.5, 63.5, 42.0)]),
    "table7": ("Table 7", ["method"], [], [
        ({"method": "UNet as decode head"}, 62.7, 62.7, 41.0), ({"method": "DDPS"}, 62.5, 63.0, 42.0)]),
    "table8": ("Table 8", ["diffusion"], [], [
        ({"diffusion": "bit diffusion"}, 63.0, 63.0, 42.0), ({"diffusion": "discrete"}, 62.9, 62.9, 42.0)]),
    "table1": ("Table 1", ["backbone"], [], [
        ({"backbone": "SegFormer MiT-B0"}, 62.8, 63.0, 42.0), ({"backbone": "DeepLabV3+ MobileNetV2"}, 59.0, 59.5, 38.1)]),
}
ORDER = {"table3b": {"target": ["ground truth", "initial prediction", "first prediction"]},
         "table6": {"ema": ["without EMA", "with EMA"], "train_steps": ["20", "50"]}}
BASES = {"DeepLabV3+ MobileNetV2": (60.0, 38.0)}  # the other cells: base 62.0 mIoU / 39.0 mBIoU

EXPECTED = [  # (verdict, claim) in the order index.md lists them
    ("≈", "Replace-only transitions beat mask-only and replace+mask"),           # 63.5 - 63.4 = +0.1
    ("✘", "The first prediction is the best diffusion target"),                  # 63.0 - 63.5 = -0.5
    ("✔", "With the ground-truth target, more steps degrade the mask"),          # 64.0 - 63.5 = +0.5
    ("✔", "Free re-noising beats the posterior (both without CFG)"),             # +0.5
    ("≈", "Classifier-free guidance helps (with free re-noising)"),              # -0.1
    ("✘", "CE beats the hybrid loss (both multi-stage)"),                        # -0.3
    ("✔", "Multi-stage training helps (CE)"),                                    # +1.0
    ("✔", "More train and test steps help"),                                     # 63.6 - 63.0 = +0.6
    ("≈", "EMA helps (T = 20)"),                                                 # -0.1
    ("✔", "EMA helps (T = 50)"),                                                 # +0.5
    ("✔", "The mask prior beats the same UNet as a decode head"),                # 63.0 - 62.7 = +0.3
    ("≈", "Discrete diffusion beats bit diffusion"),                             # -0.1
    ("✘", "DDPS improves its base, mIoU (DeepLabV3+ MobileNetV2)"),              # 59.5 - 60.0 = -0.5
    ("≈", "DDPS improves its base, mBIoU (DeepLabV3+ MobileNetV2)"),             # +0.1 vs 0.3
    ("✔", "DDPS improves its base, mIoU (SegFormer MiT-B0)"),                    # +1.0
    ("✔", "DDPS improves its base, mBIoU (SegFormer MiT-B0)"),                   # +3.0 vs 0.3
]


def _eval_run(tracker, experiment_id, parent, name, coords, step1, last, mbiou, i, artifacts=None):
    base_miou, base_mbiou = BASES.get(coords.get("backbone"), (62.0, 39.0))
    summary = {"base_mIoU": base_miou, "base_mBIoU": base_mbiou, "step1_mIoU": step1, "step1_mBIoU": mbiou,
               "last_mIoU": last, "last_mBIoU": mbiou, "steps": 20, "base_ms_mIoU": base_miou + 0.5,
               "last_ms_mIoU": last + 0.4, "reliance_own": last, "reliance_oracle": last + 0.5,
               "reliance_random": last - 0.1}
    tags = {"ddps.step": "eval", "ddps.content_hash": f"{name}-{i:02d}", "ddps.table": name, "preset": "cpu",
            "dataset": "fashion-scenes", "git_commit": COMMIT, "base": "segformer-mit_b0",
            "ddps.summary": json.dumps(summary), **{f"axis.{k}": v for k, v in coords.items()}}
    run = tracker.start_run(experiment_id, f"cell-{i}", tags, parent=parent)
    tracker.log_metrics(run, {"params_base_M": 3.45, "params_denoiser_M": 0.93}, 0)
    for k, (miou, mb) in enumerate([(base_miou, base_mbiou), (step1, mbiou)] + [(last, mbiou)] * 19):
        tracker.log_metrics(run, {"mIoU": miou, "mBIoU": mb, "IoU.shirt": miou + 1, "IoU.bag": miou - 1}, k)
    for path, folder in (artifacts or []):
        tracker.log_artifact(run, path, folder)
    tracker.end_run(run, "FINISHED")
    return run


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    folder = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    tracker = Tracker(uri)
    image = folder / "strip-0.png"
    Image.fromarray(np.zeros((8, 40, 3), np.uint8)).save(image)
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(3), size=(8, 8)).transpose(2, 0, 1).astype(np.float16)  # (K, H, W)
    npz = folder / "probabilities.npz"
    np.savez_compressed(npz, image=np.zeros((8, 8, 3), np.uint8), label=rng.integers(0, 3, (8, 8)),
                        base=probs, steps=np.stack([probs, probs]))
    for name, (title, rows, columns, cells) in TABLES.items():
        eid = tracker.experiment(name)
        order = ORDER.get(name, {})
        parent = tracker.start_run(eid, f"sweep-{name}", {"ddps.step": "sweep", "ddps.sweep": name, "ddps.title": title,
                                                          "ddps.rows": ",".join(rows), "ddps.columns": ",".join(columns),
                                                          "ddps.order": json.dumps(order)})
        for i, (coords, step1, last, mbiou) in enumerate(cells):
            artifacts = [(image, "strips"), (npz, None)] if name == "table1" else None
            _eval_run(tracker, eid, parent, name, coords, step1, last, mbiou, i, artifacts)
        tracker.end_run(parent, "FINISHED")
    return uri, tracker, folder


def test_tables_hold_the_runs_numbers_in_the_papers_layouts(store, tmp_path):
    uri, tracker, _ = store
    write_report(tracker, None, tmp_path, with_figures=False, parquet=False, log=lambda _: None)
    one = (tmp_path / "table1.md").read_text().splitlines()
    assert one[0] == "# Table 1"
    assert one[2] == (f"_dataset fashion-scenes · preset cpu · 2 cells, 3 FINISHED runs in MLflow experiment `table1` · "
                      f"git commit {COMMIT[:12]}_")
    assert "| Method | Backbone | #P(M) | mIoU (ss/ms) | mBIoU |" in one
    # no order tag: the labels alphabetically
    assert one[6:10] == ["| base | DeepLabV3+ MobileNetV2 | 3.45 | 60.00 / 60.50 | 38.00 |",
                         "| + DDPS (20 steps) | DeepLabV3+ MobileNetV2 | 4.38 | 59.50 (-0.50) / 59.90 (-0.60) | 38.10 (+0.10) |",
                         "| base | SegFormer MiT-B0 | 3.45 | 62.00 / 62.50 | 39.00 |",
                         "| + DDPS (20 steps) | SegFormer MiT-B0 | 4.38 | 63.00 (+1.00) / 63.40 (+0.90) | 42.00 (+3.00) |"]
    three_b = (tmp_path / "table3b.md").read_text().splitlines()
    assert three_b[4:9] == ["| target | 1st step | 20th step | mBIoU (20th step) |", "|---|---|---|---|",
                            "| ground truth | 64.00 (+2.00) | 63.50 (+1.50) | 42.00 (+3.00) |",  # the file's order
                            "| initial prediction | 62.00 (+0.00) | 62.00 (+0.00) | 41.00 (+2.00) |",
                            "| first prediction | 63.00 (+1.00) | 63.00 (+1.00) | 42.00 (+3.00) |"]
    assert "Base segmentor (step 0): 62.00 mIoU, 39.00 mBIoU; in parentheses, the change against it." in three_b
    three_e = (tmp_path / "table3e.md").read_text().splitlines()
    assert three_e[4:8] == ["| train_steps \\ test_steps | 2 | 20 | 100 |", "|---|---|---|---|",
                            "| 20 | 63.00 (+1.00) | 63.10 (+1.10) | – |",  # numeric order; no cell: a dash
                            "| 100 | 63.20 (+1.20) | – | 63.60 (+1.60) |"]
    seeds = (tmp_path / "seeds.md").read_text()
    assert "| mean ± std | 63.20 ± 0.20 | 42.30 ± 0.30 |" in seeds
    seven = (tmp_path / "table7.md").read_text().splitlines()
    assert seven[6:9] == ["| base segmentor | 3.45 | 62.00 | 39.00 |",
                          "| DDPS | 4.38 | 63.00 (+1.00) | 42.00 (+3.00) |",
                          "| UNet as decode head | 4.38 | 62.70 (+0.70) | 41.00 (+2.00) |"]


def test_each_finding_is_judged_against_the_seed_noise(store, tmp_path):
    _, tracker, _ = store
    write_report(tracker, None, tmp_path, with_figures=False, parquet=False, log=lambda _: None)
    index = (tmp_path / "index.md").read_text()
    assert "Noise (standard deviation of the default DDPS over 3 training seeds, `seeds`): 0.20 mIoU, 0.30 mBIoU." in index
    rows = [line.split(" | ") for line in index.splitlines() if line.startswith(("| ✔", "| ≈", "| ✘", "| ?"))]
    assert [(r[0][2:], r[1]) for r in rows] == EXPECTED
    assert "| replace-only 63.50 − max(mask-only 62.00, replace+mask 63.40) = +0.10 mIoU | 0.20 |" in index
    assert "| [Table 3a](table3a.md) | 3 | fashion-scenes | cpu |" in index
    assert "| table7 | method=DDPS | 63.00 | 63.50 | 62.90 |" in index  # mask reliance


def test_the_same_runs_give_byte_identical_markdown_and_no_torch_is_imported(store, tmp_path):
    uri, tracker, _ = store
    code = ("import sys\nfrom ddps.orchestration.tracking import Tracker\nfrom ddps.report.write import write_report\n"
            f"write_report(Tracker({uri!r}), None, {str(tmp_path / 'a')!r}, with_figures=False, parquet=False)\n"
            "bad = [m for m in ('torch', 'ray', 'segmentation_models_pytorch') if m in sys.modules]\n"
            "assert not bad, bad\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    write_report(tracker, None, tmp_path / "b", with_figures=False, parquet=False, log=lambda _: None)
    files = sorted(p.name for p in (tmp_path / "a").glob("*.md"))
    assert len(files) == len(TABLES) + 1
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_figures_are_written_and_logged_and_runs_export_to_parquet(store, tmp_path):
    _, tracker, _ = store
    written = write_report(tracker, ["table1", "seeds"], tmp_path, log=lambda _: None)
    figures = sorted(p.name for p in (tmp_path / "figures").iterdir())
    stems = ["table1-backbone-deeplabv3-mobilenetv2", "table1-backbone-segformer-mit-b0"]
    assert figures == sorted(["seeds-steps.png", "table1-steps.png"] +
                             [f"{s}-{kind}.png" for s in stems for kind in ("classes", "logits", "strip-0")])
    assert all(Image.open(tmp_path / "figures" / f).size[0] > 0 for f in figures)
    for name in ("table1", "seeds"):  # each table's file shows its own figures, linked relative to it
        linked = re.findall(r"!\[[^]]*\]\(figures/([^)]+)\)", (tmp_path / f"{name}.md").read_text())
        assert sorted(linked) == sorted(f for f in figures if f.startswith(name + "-")), name
    parent = tracker.search(["table1"], {"ddps.step": "sweep"})["run_id"].iloc[0]
    assert sorted(a.split("/")[-1] for a in tracker.list_artifacts(parent, "report")) == \
        sorted(f for f in figures if f.startswith("table1"))
    runs = pd.read_parquet(tmp_path / "runs" / "table1.parquet")
    steps = pd.read_parquet(tmp_path / "runs" / "table1-steps.parquet")
    assert len(runs) == 3 and set(runs["tags.ddps.step"]) == {"sweep", "eval"}
    assert len(steps) == 2 * 2 * 21 and set(steps["step"]) == set(range(21))
    assert set(written.tables) == {"table1", "seeds"}


def test_unknown_experiments_and_empty_stores_are_one_line_errors(store, tmp_path):
    _, tracker, _ = store
    with pytest.raises(ReportError, match="no MLflow experiment 'table9' .*experiments there: .*seeds, table1, table3a"):
        write_report(tracker, ["table9"], tmp_path)
    from ddps.cli import main
    assert main(["report", "--all", "--tracking-uri", f"sqlite:///{tmp_path / 'none.db'}"]) == 2
    assert not (tmp_path / "none.db").exists()  # nothing created by asking


def test_a_table_is_scored_on_one_split_val_unless_asked_or_it_has_only_holdout(tmp_path):
    """The same cells evaluated on val and on the holdout scenes (eval.split; runs logged before it have no
    tag and scored val): the table holds one split's cells, never both, and its header says holdout."""
    from ddps.report.runs import load_table
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}")
    eid = tracker.experiment("prior")
    cells = [({"row": "a"}, 61.0, 62.0, 40.0), ({"row": "b"}, 63.0, 64.0, 41.0)]
    for i, (coords, step1, last, mbiou) in enumerate(cells):
        _eval_run(tracker, eid, None, "prior", coords, step1, last, mbiou, i)  # no split tag: val
        run = _eval_run(tracker, eid, None, "prior", coords, step1 - 5, last - 5, mbiou, 10 + i)
        tracker.set_tags(run, {"ddps.eval_split": "holdout"})
    val, holdout = load_table(tracker, "prior"), load_table(tracker, "prior", split="holdout")
    assert (val.split, holdout.split) == ("val", "holdout")
    assert sorted(c.get("last_mIoU") for c in val.cells) == [62.0, 64.0]
    assert sorted(c.get("last_mIoU") for c in holdout.cells) == [57.0, 59.0]
    write_report(tracker, ["prior"], tmp_path / "out", with_figures=False, parquet=False, split="holdout",
                 log=lambda _: None)
    header = (tmp_path / "out" / "prior.md").read_text().splitlines()[2]
    assert "scored on the holdout split" in header and "2 cells" in header
    only = tracker.experiment("only-holdout")
    run = _eval_run(tracker, only, None, "only-holdout", {"row": "a"}, 50.0, 51.0, 30.0, 0)
    tracker.set_tags(run, {"ddps.eval_split": "holdout"})
    assert load_table(tracker, "only-holdout").split == "holdout"
    assert load_table(tracker, "only-holdout", split="val") is None


def test_the_prior_study_table_gives_gain_reliance_and_ddps_against_the_head_of_its_setting(tmp_path):
    """experiments/prior.yaml's layout: per cell base, step 1, last, last − step 1, own / oracle / random,
    own − random, and DDPS − the UNet head that shares its other coordinates."""
    from ddps.report.runs import load_table
    from dataclasses import replace

    from ddps.report.tables import layout, render, study
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}")
    eid = tracker.experiment("prior")
    parent = tracker.start_run(eid, "sweep-prior", {"ddps.step": "sweep", "ddps.sweep": "prior",
                                                    "ddps.title": "The mask prior", "ddps.rows": "iters,method",
                                                    "ddps.columns": "", "ddps.order": "{}"})
    cells = [({"iters": "400", "method": "DDPS"}, 61.0, 62.5, 40.0),
             ({"iters": "400", "method": "head"}, 61.8, 61.8, 40.0),
             ({"iters": "2000", "method": "DDPS"}, 63.0, 63.25, 41.0)]
    for i, (coords, step1, last, mbiou) in enumerate(cells):
        run = _eval_run(tracker, eid, parent, "prior", coords, step1, last, mbiou, i)
        if coords["method"] == "head":
            tracker.set_tags(run, {"denoiser": "head-UNet-XS"})
    tracker.end_run(parent, "FINISHED")
    table = load_table(tracker, "prior")
    assert layout(table) is layout(replace(table, name="prior-pilot")) is study
    lines = render(table).splitlines()
    assert lines[4] == ("| iters | method | base | step 1 | last | last − step 1 | own / oracle / random | own − random "
                        "| DDPS − head |")
    rows = [line for line in lines if line.startswith("| 400 ") or line.startswith("| 2000 ")]
    # _eval_run: base 62.00, reliance own = last, oracle = last + 0.5, random = last - 0.1
    assert rows == [
        "| 400 | DDPS | 62.00 | 61.00 (-1.00) | 62.50 (+0.50) | +1.50 | 62.50 / 63.00 / 62.40 | +0.10 | +0.70 |",
        "| 400 | head | 62.00 | 61.80 (-0.20) | 61.80 (-0.20) | – | 61.80 / 62.30 / 61.70 | +0.10 | – |",
        "| 2000 | DDPS | 62.00 | 63.00 (+1.00) | 63.25 (+1.25) | +0.25 | 63.25 / 63.75 / 63.15 | +0.10 | – |"]


def test_the_checks_figure_draws_reliance_and_gain_along_training_from_the_trained_models_run(tmp_path):
    """An evaluation names the run that trained its model (ddps.training_run); that run's held-out checks with
    train.check_reliance logged holdout_reliance_own / _random and holdout_multistep_gain by iteration."""
    from ddps.report.figures import check_curves
    from ddps.report.runs import load_table
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}")
    eid = tracker.experiment("prior-pilot")
    training = tracker.start_run(eid, "stage2", {"ddps.step": "stage2"})
    for it, (own, random, gain) in zip((100, 200, 300), ((60.0, 59.5, 0.2), (61.0, 60.0, 0.4), (62.0, 60.5, 0.9))):
        tracker.log_metrics(training, {"holdout_reliance_own": own, "holdout_reliance_random": random,
                                       "holdout_multistep_gain": gain}, it)
    tracker.end_run(training, "FINISHED")
    parent = tracker.start_run(eid, "sweep-prior-pilot", {"ddps.step": "sweep", "ddps.title": "Pilot",
                                                          "ddps.rows": "setting", "ddps.columns": ""})
    checked = _eval_run(tracker, eid, parent, "prior-pilot", {"setting": "checked"}, 61.0, 62.0, 40.0, 0)
    tracker.set_tags(checked, {"ddps.training_run": training})
    _eval_run(tracker, eid, parent, "prior-pilot", {"setting": "unchecked"}, 61.0, 62.0, 40.0, 1)
    tracker.end_run(parent, "FINISHED")
    table = load_table(tracker, "prior-pilot")
    curves = {c.coords["setting"]: check_curves(tracker, c) for c in table.cells}
    assert curves["unchecked"] == {}
    assert curves["checked"] == {"reliance": [(100, 0.5), (200, 1.0), (300, 1.5)],
                                 "gain": [(100, 0.2), (200, 0.4), (300, 0.9)], "split": "holdout"}
    written = write_report(tracker, ["prior-pilot"], tmp_path / "out", parquet=False, log_figures=False,
                           log=lambda _: None)
    figure = tmp_path / "out" / "figures" / "prior-pilot-checks.png"
    assert figure in written.files and Image.open(figure).size[0] > 500


def test_the_prior_study_over_seeds_gives_each_settings_mean_and_sd_the_pooled_noise_and_whether_the_prior_acts():
    """A study with a ``seed`` axis: per setting the mean ± sd over seeds of last − step 1 and own − random,
    the noise (their pooled seed-to-seed sd), and 'prior acts' only where both means are above it."""
    from ddps.report.runs import Cell, Table
    from ddps.report.tables import render

    def cell(setting, seed, step1, last, own, random, head=False):
        summary = {"base_mIoU": 44.0, "step1_mIoU": step1, "last_mIoU": last, "steps": 1 if head else 20,
                   "reliance_own": own, "reliance_random": random}
        return Cell(f"{setting}-{seed}", {"setting": setting, "seed": seed}, summary,
                    {"denoiser": "head-UNet-XS" if head else "ddps-UNet-XS", "ddps.content_hash": f"{setting}{seed}"})
    cells = [cell("default", s, 45.0, 45.0 + g, 45.0 + g + r, 45.0 + g)
             for s, g, r in (("0", 0.0, 0.1), ("1", 0.2, -0.1), ("2", -0.2, 0.0))]  # gain sd 0.2, reliance sd 0.1
    cells += [cell("no residual", s, 44.0, 44.0 + g, 44.0 + g + r, 44.0 + g)
              for s, g, r in (("0", 0.4, 0.3), ("1", 0.6, 0.4), ("2", 0.5, 0.2))]  # gain sd 0.1, reliance sd 0.1
    cells += [cell("dropout", s, 44.0, 44.0 + g, 44.0 + g + r, 44.0 + g)
              for s, g, r in (("0", 0.5, 0.05), ("1", 0.5, 0.1))]  # the gain acts, the reliance does not
    cells += [cell("UNet head", s, 45.5, 45.5, 45.5, 45.5, head=True) for s in ("0", "1")]  # no row: no steps
    order = {"setting": ["default", "no residual", "dropout", "UNet head"], "seed": ["0", "1", "2"]}
    table = Table("prior", "The mask prior", ["setting", "seed"], [], order, cells, runs=len(cells))
    lines = render(table).splitlines()
    start = lines.index("| setting | seeds | last | last − step 1 | own − random | DDPS − head | prior acts |")
    # pooled sd: gain sqrt((0.04 + 0.01 + 0) / 3) = 0.129, reliance sqrt((0.01 + 0.01 + 0.00125) / 3) = 0.0842;
    # DDPS − head: against the head of the same seed (the setting axis tells heads apart here), seed 2 has none
    assert lines[start + 2:start + 5] == [
        "| default | 3 | 45.00 | +0.00 ± 0.20 | +0.00 ± 0.10 | -0.40 ± 0.14 | no |",
        "| no residual | 3 | 44.50 | +0.50 ± 0.10 | +0.30 ± 0.10 | -1.00 ± 0.14 | yes |",
        "| dropout | 2 | 44.50 | +0.50 ± 0.00 | +0.07 ± 0.04 | -1.00 ± 0.00 | no |"]
    assert lines[start + 6] == ("Noise (the pooled seed-to-seed standard deviation): last − step 1 0.13, own − random "
                                "0.08. The prior acts where both means are above their noise.")
    one_seed = Table("prior-pilot", "Pilot", ["setting"], [], order, [c for c in cells if c.coords["seed"] == "0"], runs=4)
    assert "Over the training seeds" not in render(one_seed)  # no seed axis: no summary, no verdict


def test_ddps_is_compared_with_a_head_only_at_the_same_budget_same_base_and_data_as_many_iterations(tmp_path):
    """A pilot's one setting axis holds the head beside DDPS cells trained longer or on another base: only the
    cell with the head's base, data and iterations (stage 1 + stage 2; the head trains them at once) is
    compared with it, from the config params the evaluation runs log."""
    from ddps.report.runs import load_table
    from ddps.report.tables import render
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}")
    eid = tracker.experiment("prior-pilot")
    parent = tracker.start_run(eid, "sweep-prior-pilot", {"ddps.step": "sweep", "ddps.title": "Pilot",
                                                          "ddps.rows": "setting", "ddps.columns": ""})
    base = {"base.arch": "segformer", "base.backbone": "mit_b0", "train_base.iters": "2000", "data.crop": "64"}
    cells = [("default", 45.0, {}), ("UNet head", 44.6, {}), ("longer", 46.7, {"train.stage2_iters": "1200"}),
             ("weak base", 28.4, {"base.arch": "deeplabv3plus", "base.backbone": "mobilenet_v2"})]
    for i, (setting, last, changed) in enumerate(cells):
        run = _eval_run(tracker, eid, parent, "prior-pilot", {"setting": setting}, last, last, 30.0, i)
        tracker.log_params(run, {**base, "train.stage1_iters": "100", "train.stage2_iters": "300", **changed})
        if setting == "UNet head":
            tracker.set_tags(run, {"denoiser": "head-UNet-XS"})
    tracker.end_run(parent, "FINISHED")
    rows = {line.split(" | ")[0][2:]: line.split(" | ")[-1].rstrip(" |")
            for line in render(load_table(tracker, "prior-pilot")).splitlines() if line.startswith("| ")}
    assert (rows["default"], rows["UNet head"], rows["longer"], rows["weak base"]) == ("+0.40", "–", "–", "–")
