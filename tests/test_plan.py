"""The sweep planner: cells, the trainings they share (content hashes), bad experiment files."""
from pathlib import Path

import pytest
import yaml

from ddps.errors import ConfigError
from ddps.orchestration.estimates import describe
from ddps.orchestration.plan import cells_of, load_experiment, plan

ROOT = Path(__file__).resolve().parents[1]


def test_table3e_trains_each_train_step_count_once_and_evaluates_every_valid_test_step():
    p = plan(load_experiment(ROOT / "experiments" / "table3e.yaml"), "cpu")
    assert len(p.cells) == 12  # test steps <= train steps: 3 + 4 + 5
    assert sorted((c["train_steps"], c["test_steps"]) for c in p.invalid) == [("20", "100"), ("20", "50"),
                                                                             ("50", "100")]
    steps = [t.step for t in p.trainings]
    assert steps.count("base") == 1 and steps.count("stage1") == 3 and steps.count("stage2") == 3
    assert p.naive_trainings == 36 and p.evaluations == 12
    by_model: dict[str, list] = {}
    for cell in p.cells:
        by_model.setdefault(cell.chain[-1].hash, []).append(int(cell.coords["test_steps"]))
        assert cell.cfg.infer.steps == int(cell.coords["test_steps"])
        assert cell.cfg.diffusion.steps == int(cell.coords["train_steps"])
    assert sorted(map(sorted, by_model.values())) == [[2, 5, 20], [2, 5, 20, 50], [2, 5, 20, 50, 100]]
    table = describe([p])
    assert "| table3e | cpu | 12 | 7 (1 base, 3 stage1, 3 stage2) | 36 | 19.4% |" in table


def _write(tmp_path, doc) -> Path:
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_an_inference_only_axis_shares_every_training_and_labelled_values_set_several_keys(tmp_path):
    doc = {"name": "grid", "axes": [
        {"name": "loss", "values": [{"label": "CE", "set": {"train.loss": "ce"}},
                                    {"label": "CE+MS", "set": {"train.loss": "ce", "train.stages": "multi-step"}}]},
        {"name": "renoise", "key": "infer.renoise", "values": ["free", "posterior"]}],
        "rows": ["loss"], "columns": "renoise", "presets": {"smoke": {"train": {"stage1_iters": 4}}}}
    p = plan(load_experiment(_write(tmp_path, doc)), "smoke")
    assert len(p.cells) == 4 and p.evaluations == 4
    assert [t.step for t in p.trainings] == ["base", "stage1", "stage2", "multistep"]
    assert p.naive_trainings == 3 + 3 + 2 + 2
    assert all(c.cfg.train.stage1_iters == 4 for c in p.cells)  # the experiment's preset applies
    assert {c.cfg.train.stages for c in p.cells if c.coords["loss"] == "CE+MS"} == {"multi-step"}
    assert [c for c, _ in cells_of(p.experiment)][:2] == [{"loss": "CE", "renoise": "free"},
                                                          {"loss": "CE", "renoise": "posterior"}]


@pytest.mark.reliability(kind="bad_input", case="experiment grid")
@pytest.mark.parametrize("doc, message", [
    ({"presets": {}}, "has no axes"),
    ({"axes": [{"name": "a", "values": [1]}]}, "plain values but no key"),
    ({"axes": [{"name": "a", "key": "infer.steps", "values": [1, 1]}], "rows": ["a"]}, "repeats a label"),
    ({"axes": [{"name": "a", "key": "infer.steps", "values": [1]}], "rows": ["b"]}, "rows names axis 'b'"),
    ({"axes": [{"name": "a", "key": "infer.steps", "values": [1]}]}, "must together name every axis"),
    ({"axes": [{"name": "a", "key": "infer.steps", "values": [1]}], "rows": "a", "require": ["infer.steps ~ 3"]},
     "is not 'section.key OP"),
])
def test_a_bad_experiment_file_is_a_one_line_error_naming_it(tmp_path, doc, message):
    path = _write(tmp_path, doc)
    with pytest.raises(ConfigError, match=message) as err:
        load_experiment(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


@pytest.mark.reliability(kind="bad_input", case="unknown key on an axis")
def test_an_unknown_key_on_an_axis_is_refused_by_the_config(tmp_path):
    doc = {"axes": [{"name": "a", "key": "infer.stepz", "values": [1]}], "rows": ["a"]}
    with pytest.raises(ConfigError, match="infer.stepz"):
        plan(load_experiment(_write(tmp_path, doc)), "smoke")


def test_every_table_plans_and_all_of_them_need_at_most_40_percent_of_the_naive_trainings():
    from ddps.orchestration.plan import experiment_files
    files = experiment_files(ROOT / "experiments")
    names = {f.stem for f in files}
    assert names >= {"table1", "table2", "table3a", "table3b", "table3c", "table3d", "table3e", "table3f", "table4",
                     "table5", "table6", "table7", "table8"}
    for preset, bound in (("cpu", 0.40), ("paper", 0.41)):
        plans = [plan(load_experiment(f), preset) for f in files]
        unique = {t.hash for p in plans for t in p.trainings}
        naive = sum(p.naive_trainings for p in plans)
        assert len(unique) <= bound * naive, (preset, len(unique), naive)
        assert all(p.cells for p in plans)
    table = describe(plans)
    assert f"| all (each training once) | | {sum(len(p.cells) for p in plans)} | {len(unique)} | {naive} |" in table


def test_an_axis_may_have_its_own_values_per_preset(tmp_path):
    doc = {"name": "g", "axes": [{"name": "size", "key": "denoiser.size", "values": ["T", "S"],
                                  "presets": {"smoke": ["XXS"]}}], "rows": ["size"]}
    exp = load_experiment(_write(tmp_path, doc))
    assert [c.cfg.denoiser.size for c in plan(exp, "smoke").cells] == ["XXS"]
    assert [coords for coords, _ in cells_of(exp, "paper")] == [{"size": "T"}, {"size": "S"}]
    doc["axes"][0]["presets"] = {"smoke": "XXS"}
    with pytest.raises(ConfigError, match="presets is"):
        load_experiment(_write(tmp_path, doc))


def test_one_cell_per_model_runs_the_reliance_diagnostic_the_one_with_default_inference():
    p = plan(load_experiment(ROOT / "experiments" / "table3e.yaml"), "cpu")
    chosen = [(c.coords["train_steps"], c.coords["test_steps"]) for c in p.cells if c.reliance]
    assert chosen == [("20", "20"), ("50", "20"), ("100", "20")]  # the cpu preset's 20 test steps


@pytest.mark.reliability(kind="bad_input", case="paper sweep without its dataset")
def test_the_paper_preset_without_its_dataset_fails_at_once_saying_what_to_download(tmp_path, capsys):
    from ddps.cli import main
    rc = main(["sweep", str(ROOT / "experiments" / "table3a.yaml"), "--preset", "paper",
               "--data-root", str(tmp_path / "nowhere")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err
    assert "ade20k is not here" in err and "ADEChallengeData2016.zip" in err and "--data-root" in err


@pytest.mark.reliability(kind="bad_input", case="include cycle")
def test_an_included_file_applies_its_presets_first_and_an_include_cycle_is_refused(tmp_path):
    (tmp_path / "_shared.yaml").write_text(yaml.safe_dump({"presets": {"smoke": {"train": {"stage1_iters": 3,
                                                                                           "stage2_iters": 5}}}}))
    doc = {"include": "_shared.yaml", "axes": [{"name": "a", "key": "infer.steps", "values": [2]}], "rows": ["a"],
           "presets": {"smoke": {"train": {"stage2_iters": 7}}}}
    cfg = plan(load_experiment(_write(tmp_path, doc)), "smoke").cells[0].cfg
    assert (cfg.train.stage1_iters, cfg.train.stage2_iters) == (3, 7)  # the file's own value wins
    (tmp_path / "_shared.yaml").write_text(yaml.safe_dump({"include": "exp.yaml"}))
    with pytest.raises(ConfigError, match="includes itself"):
        plan(load_experiment(tmp_path / "exp.yaml"), "smoke")


def test_a_published_base_per_cell_is_imported_and_one_base_for_different_cells_is_refused(tmp_path):
    from messages import one_line
    from ddps.orchestration.plan import parse_cell_set
    files = {}
    for name in ("b0", "b2"):
        files[name] = tmp_path / f"segformer_{name}.pth"
        files[name].write_bytes(name.encode())  # only hashed by the planner, never read
    table1 = load_experiment(ROOT / "experiments" / "table1.yaml")
    scoped = parse_cell_set([f"backbone=SegFormer MiT-B0:base.pretrained={files['b0']}",
                             f"backbone=SegFormer MiT-B2:base.pretrained={files['b2']}"])
    p = plan(table1, "paper", None, scoped)
    imported = {c.coords["backbone"]: c.chain[0] for c in p.cells if c.chain[0].imported}
    assert sorted(imported) == ["SegFormer MiT-B0", "SegFormer MiT-B2"]
    assert all(t.iters == 0 and t.imported == str(files[k[-2:].lower()]) for k, t in imported.items())
    assert sum(1 for t in p.trainings if t.step == "base" and not t.imported) == 4  # the others are trained
    with pytest.raises(ConfigError) as e:  # one file for six different bases: a mistake, not a shared base
        plan(table1, "paper", {"base.pretrained": str(files["b2"])})
    assert "names one base for cells that ask for different bases" in one_line(e.value)
    with pytest.raises(ConfigError) as e:
        plan(table1, "paper", None, parse_cell_set([f"backbone=MiT-B9:base.pretrained={files['b2']}"]))
    assert "has no value 'MiT-B9'" in one_line(e.value)
    with pytest.raises(ConfigError):
        parse_cell_set(["backbone:base.pretrained=x"])


def test_cells_evaluated_on_the_holdout_split_share_every_training_and_count_its_images():
    """eval.split=holdout: the same trainings as on val (the split is not part of a training's hash), other
    evaluations (it is part of theirs), each scoring the data.holdout scenes; a preset without holdout scenes
    refuses it in one line."""
    table7 = load_experiment(ROOT / "experiments" / "table7.yaml")
    fewer_val = {"data.val_scenes": 600, "eval.max_images": 0}  # the cpu preset: as many val as holdout scenes
    val, holdout = plan(table7, "cpu", fewer_val), plan(table7, "cpu", {**fewer_val, "eval.split": "holdout"})
    assert [t.hash for t in holdout.trainings] == [t.hash for t in val.trainings]
    assert not {c.eval_hash for c in holdout.cells} & {c.eval_hash for c in val.cells}
    assert {c.images for c in val.cells} == {600}
    assert {c.images for c in holdout.cells} == {holdout.cells[0].cfg.data.holdout} != {600}
    with pytest.raises(ConfigError, match=r"eval.split='holdout'.*data.holdout > 0"):
        plan(table7, "smoke", {"eval.split": "holdout"})


def test_the_time_estimate_scales_a_refiner_by_its_mask_scale_at_the_measured_ratios(tmp_path):
    from ddps.orchestration import estimates as e
    doc = {"name": "masks", "axes": [{"name": "mask_scale", "key": "denoiser.mask_scale", "values": [4, 2]}],
           "rows": ["mask_scale"]}
    p = plan(load_experiment(_write(tmp_path, doc)), "cpu")
    cells = {c.cfg.denoiser.mask_scale: c for c in p.cells}
    assert sorted(cells) == [2, 4] and [t.step for t in p.trainings].count("base") == 1  # the base is shared
    assert e.MASK_SCALE_TRAIN_RATIO[2] < 0.5 and e.MASK_SCALE_EVAL_RATIO[2] < 0.5  # more than 2x slower
    cfg = cells[4].cfg
    assert cfg.data.crop == 64 and cfg.denoiser.size == "XS"  # the rates' own shapes: no crop or size factor
    for (s4, s2) in zip(cells[4].chain[1:], cells[2].chain[1:], strict=True):
        assert s4.step == s2.step and s4.step in ("stage1", "stage2") and (s4.mask_scale, s2.mask_scale) == (4, 2)
        iters = cfg.train.stage1_iters if s4.step == "stage1" else cfg.train.stage2_iters
        before = e.START_S + iters * cfg.train.batch_size / e.RATE[s4.step]  # the estimate before mask scales
        assert s4.check_calls == s2.check_calls > 0  # the same held-out checks, at the check's rates
        assert e.training_seconds(s4) == pytest.approx(before + s4.check_calls / e.CHECK_CALLS_PER_S)
        checks2 = s2.check_calls / (e.CHECK_CALLS_PER_S * e.MASK_SCALE_EVAL_RATIO[2])
        ratio = (e.training_seconds(s2) - checks2 - e.START_S) / (before - e.START_S)
        assert ratio == pytest.approx(1 / e.MASK_SCALE_TRAIN_RATIO[2], rel=1e-9)
    base = cells[2].chain[0]
    base_rate = e.RATE["base"] * e.BASE_RATIO.get(base.model, 1)  # the base's: no mask scale
    assert e.training_seconds(base) == pytest.approx(e.START_S + cfg.train_base.iters * cfg.train_base.batch_size / base_rate)
    calls = cfg.infer.steps * 3  # 20 even steps, each model's one cell with the reliance diagnostic (x3)
    assert all(c.reliance for c in p.cells) and cells[4].images == cells[2].images > 0
    assert e.cell_seconds(cells[4]) == pytest.approx(e.EVAL_START_S + cells[4].images * calls / e.EVAL_CALLS_PER_S)
    ratio = (e.cell_seconds(cells[2]) - e.EVAL_START_S) / (e.cell_seconds(cells[4]) - e.EVAL_START_S)
    assert ratio == pytest.approx(1 / e.MASK_SCALE_EVAL_RATIO[2], rel=1e-9)


def test_the_prior_pilot_scores_holdout_checks_reliance_and_shares_the_paper_sweeps_trainings():
    """experiments/studies/prior-pilot.yaml: every cell on the holdout split with reliance at each check; its
    default refiner's stage 1 and its UNet head are table 7's (what the checks read is not in their hash)."""
    from ddps.orchestration.plan import experiment_files
    pilot = plan(load_experiment(ROOT / "experiments" / "studies" / "prior-pilot.yaml"), "cpu")
    table7 = plan(load_experiment(ROOT / "experiments" / "table7.yaml"), "cpu")
    assert {(c.cfg.eval.split, c.cfg.train.check_reliance) for c in pilot.cells} == {("holdout", True)}
    shared = {t.hash for t in pilot.trainings} & {t.hash for t in table7.trainings}
    assert sorted(t.step for t in table7.trainings if t.hash in shared) == ["base", "head", "stage1"]
    assert "prior-pilot" not in {p.stem for p in experiment_files(ROOT / "experiments")}  # not in --all


def test_the_preset_study_runs_on_the_cpu_presets_own_base_with_its_stage_2_and_four_times_it(tmp_path):
    """experiments/studies/prior-preset.yaml: both cells refine the base `ddps train --preset cpu` plans (no
    _cpu.yaml), on the first 200 holdout scenes with reliance at each check; only stage 2's length differs."""
    study = plan(load_experiment(ROOT / "experiments" / "studies" / "prior-preset.yaml"), "cpu")
    doc = {"name": "preset", "axes": [{"name": "method", "key": "denoiser.method", "values": ["ddps"]}],
           "rows": ["method"]}
    preset = plan(load_experiment(_write(tmp_path, doc)), "cpu")
    bases = [{t.hash for t in p.trainings if t.step == "base"} for p in (study, preset)]
    assert len(bases[0]) == 1 and bases[0] == bases[1]
    assert {(c.cfg.eval.split, c.cfg.eval.max_images, c.cfg.train.check_reliance) for c in study.cells} == {
        ("holdout", 200, True)}
    default = preset.cells[0].cfg.train
    assert [(c.cfg.train.stage1_iters, c.cfg.train.stage2_iters) for c in study.cells] == [
        (default.stage1_iters, default.stage2_iters), (default.stage1_iters, 4 * default.stage2_iters)]


def test_the_time_estimate_counts_a_refiners_held_out_checks_and_their_reliance_trajectories(tmp_path):
    """One check every train.eval_every iterations and one at the end (the engine's condition), each over the
    selection split's images capped by eval.max_images: stage 1 and the head one call per image, stage 2 its
    test steps, with train.check_reliance 2 x steps + 1 (the random trajectory and the oracle call)."""
    from ddps.orchestration import estimates as e
    doc = {"name": "checks", "axes": [{"name": "method", "key": "denoiser.method", "values": ["ddps", "head"]}],
           "rows": ["method"]}
    experiment = load_experiment(_write(tmp_path, doc))
    every = {"train.stage1_iters": 100, "train.stage2_iters": 250, "train.eval_every": 100, "eval.max_images": 0}
    plain, diag = plan(experiment, "cpu", every), plan(experiment, "cpu", {**every, "train.check_reliance": True})
    cfg = plain.cells[0].cfg
    images, steps = cfg.data.holdout, cfg.infer.steps  # the cpu preset checks on its holdout scenes
    assert images > 0 and steps <= cfg.diffusion.steps
    calls = [{t.step: t.check_calls for t in p.trainings if t.step != "base"} for p in (plain, diag)]
    head_iters = cfg.train.stage1_iters + cfg.train.stage2_iters  # the head trains both stages' iterations at once
    assert calls[0] == {"stage1": images, "stage2": 3 * images * steps, "head": (head_iters // 100 + 1) * images}
    assert calls[1] == {**calls[0], "stage2": 3 * images * (2 * steps + 1)}  # stage 2 only: the others refine once
    capped = plan(experiment, "cpu", {**every, "eval.max_images": 50})
    assert {t.step: t.check_calls for t in capped.trainings if t.step == "stage1"} == {"stage1": 50}
    stage2 = [next(t for t in p.trainings if t.step == "stage2") for p in (plain, diag)]
    extra = e.training_seconds(stage2[1]) - e.training_seconds(stage2[0])
    assert extra == pytest.approx(3 * images * (steps + 1) / e.CHECK_CALLS_PER_S)  # the diagnostic's calls, priced
