"""The `paper` preset and the `paper` sections of experiments/*.yaml say what the paper's text says.

Every assertion reads resolved configs — the preset, or the cells the planner resolves for a table — and
names where the paper states the value (its §4.1 and tables). The `cpu` and `smoke` grids are not the
paper's and keep the even step list their reported numbers were measured with.
"""
from pathlib import Path

import pytest

from ddps.config import resolve
from ddps.orchestration.plan import experiment_files, load_experiment, plan

ROOT = Path(__file__).resolve().parents[1]

# The paper's denoiser sizes (§4.1, App. D), in M parameters.
UNET_M = {"T": 3.38, "S": 11.34, "M": 41.34, "L": 158.53}

# #P(M) of each base and of DDPS on it: Table 1 (ADE20K) and Table 2 (Cityscapes), by the files' row labels.
TABLE1 = {"DeepLabV3+ MobileNetV2": (15.4, 27.9), "SegFormer MiT-B0": (3.8, 15.1),
          "DeepLabV3+ ResNet-50": (43.7, 54.2), "SegFormer MiT-B2": (27.5, 65.5),
          "DeepLabV3+ ResNet-101": (62.7, 104.3), "SegFormer MiT-B5": (84.7, 122.8)}
TABLE2 = {**TABLE1, "DeepLabV3+ ResNet-101": (62.7, 73.2)}
SMALL = {"DeepLabV3+ MobileNetV2", "SegFormer MiT-B0"}  # "20 training steps for small-size models" (§4.1)


def cells(table: str, preset: str = "paper"):
    return plan(load_experiment(ROOT / "experiments" / f"{table}.yaml"), preset).cells


def test_the_paper_preset_is_section_4_1_on_segformer_b2():
    cfg = resolve("paper")
    assert (cfg.base.arch, cfg.base.backbone, cfg.base.encoder_weights) == ("mmseg-segformer", "mit_b2", "imagenet")
    assert cfg.denoiser.size == "M"                              # UNet-M for SegFormer-B2 (#P(M) 65.5)
    assert (cfg.diffusion.steps, cfg.infer.steps) == (100, 20)   # T = 100 for non-small models, 20 test steps
    assert cfg.infer.times == "official"                         # the official code's step list
    t = cfg.train
    assert (t.stage1_iters, t.stage2_iters, t.batch_size) == (80000, 160000, 32)
    assert (t.lr, t.halve_every, t.min_lr) == (1.5e-4, 20000, 1e-6)  # "halved every 20k ... minimum 1e-6"
    assert (t.ema, t.ema_decay, t.ema_every) == (True, 0.99, 25)
    assert cfg.diffusion.transition == "uniform" and cfg.diffusion.schedule == "linear"  # replace-only, linear
    assert cfg.denoiser.mask_scale == 4                          # "predict at the 1/4 scale"


@pytest.mark.parametrize("table, published", [("table1", TABLE1), ("table2", TABLE2)])
def test_the_denoiser_matches_its_base_as_the_tables_parameter_counts_say(table, published):
    seen = {}
    for cell in cells(table):
        label = cell.coords["backbone"]
        base, ddps = published[label]
        nearest = min(UNET_M, key=lambda size: abs(UNET_M[size] - (ddps - base)))
        assert cell.cfg.denoiser.size == nearest, (table, label, ddps - base)
        assert cell.cfg.diffusion.steps == (20 if label in SMALL else 100), (table, label)
        seen[label] = cell.cfg
    assert set(seen) == set(published)
    assert all(c.train.batch_size == (16 if table == "table2" else 32) for c in seen.values())  # §4.1
    if table == "table2":
        assert all(c.data.dataset == "cityscapes" for c in seen.values())


def test_table3_defaults_train_100_steps_and_3f_uses_mobilenetv2_and_mit_b0():
    for table in ("table3a", "table3b", "table3c", "table3d"):
        for cell in cells(table):
            assert (cell.cfg.base.backbone, cell.cfg.diffusion.steps) == ("mit_b2", 100), table
    three_f = {(c.cfg.base.arch, c.cfg.base.backbone, c.cfg.denoiser.size, c.cfg.diffusion.steps)
               for c in cells("table3f")}
    assert three_f == {("deeplabv3plus", "mobilenet_v2", "S", 20), ("mmseg-segformer", "mit_b0", "S", 20)}
    # Table 3f's numbers are Table 1's rows for those bases: the same trained models
    one = {c.coords["backbone"]: c.chain[-1].hash for c in cells("table1")}
    assert {c.coords["base"]: c.chain[-1].hash for c in cells("table3f")} == {
        k: one[k] for k in ("DeepLabV3+ MobileNetV2", "SegFormer MiT-B0")}


def test_table3e_k_axis_uses_the_official_list_and_says_so():
    grid = {(c.cfg.diffusion.steps, c.cfg.infer.steps): c for c in cells("table3e")}
    assert set(grid) == {(t, k) for t in (20, 50, 100) for k in (2, 5, 20, 50, 100) if k <= t}
    for (t, k), cell in grid.items():
        assert cell.cfg.infer.times == "official"
        assert cell.coords["test_steps"] == f"{k} (official list)"


def test_table5_is_the_papers_six_rows_and_table6_its_two_train_step_counts():
    five = {(c.cfg.base.backbone, c.cfg.denoiser.size): c.cfg.diffusion.steps for c in cells("table5")}
    assert five == {("mit_b0", "T"): 20, ("mit_b0", "S"): 20, ("mit_b2", "S"): 100, ("mit_b2", "M"): 100,
                    ("mit_b5", "M"): 100, ("mit_b5", "L"): 100}
    six = cells("table6")
    assert sorted({c.cfg.diffusion.steps for c in six}) == [20, 100]
    # one model: Table 3e's (100, 20), Table 5's MiT-B2 / UNet-M, Table 6's (100, EMA), Table 7's and 8's DDPS
    default = {c.chain[-1].hash for c in cells("table3e")
               if (c.cfg.diffusion.steps, c.cfg.infer.steps) == (100, 20)}
    default |= {c.chain[-1].hash for c in cells("table5") if c.coords["denoiser"] == "MiT-B2 / UNet-M"}
    default |= {c.chain[-1].hash for c in six if c.cfg.diffusion.steps == 100}
    default |= {c.chain[-1].hash for t in ("table7", "table8") for c in cells(t)
                if c.cfg.denoiser.method == "ddps" and c.cfg.diffusion.kind == "discrete"}
    assert len(default) == 1


@pytest.mark.parametrize("preset", ["cpu", "smoke"])
def test_cpu_and_smoke_keep_the_even_step_list(preset):
    for path in experiment_files(ROOT / "experiments"):
        for cell in plan(load_experiment(path), preset).cells:
            assert cell.cfg.infer.times == "even", (path.name, cell.coords)
