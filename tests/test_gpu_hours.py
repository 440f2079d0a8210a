"""What the paper grid costs: the dry run's GPU-hours come from the rates benchmarks/gpu.py wrote on a GPU, and
without them the dry run says that no GPU rate was measured — never a number from nowhere."""
from pathlib import Path

import pytest

from ddps.cli import main
from ddps.errors import DDPSError
from ddps.orchestration.estimates import cell_calls, gpu_cell_hours, gpu_training_hours
from ddps.orchestration.plan import load_experiment, plan
from ddps.rates import GPURates, read_rates, write_rates

ROOT = Path(__file__).resolve().parents[1]
TABLE = ROOT / "experiments" / "table3e.yaml"
# rates as benchmarks/gpu.py writes them (its GPU run), numbers chosen for the arithmetic below
RATES = GPURates(device="NVIDIA H100 80GB HBM3", torch="2.11.0", measured="2026-12-05 15:00",
                 shapes={"crop": 512, "classes": 150, "base": "mmseg-segformer-mit_b2", "denoiser": "UNet-S", "T": 100},
                 base_images_per_s={"fp32": 20.0, "bf16": 40.0}, refiner_images_per_s={"fp32": 50.0, "bf16": 100.0},
                 eval_calls_per_s={"fp32": 200.0, "bf16": 400.0})


def dry_run(tmp_path, capsys, *extra) -> str:
    argv = ["sweep", str(TABLE), "--preset", "paper", "--dry-run", "--tracking-uri",
            f"sqlite:///{tmp_path / 'mlflow.db'}", *extra]
    assert main(argv) == 0
    return capsys.readouterr().out


def test_without_a_gpu_rate_the_dry_run_says_so(tmp_path, capsys):
    out = dry_run(tmp_path, capsys, "--gpu-rates", str(tmp_path / "absent.json"))
    assert f"no GPU rate measured: benchmarks/gpu.py writes one when it runs on a GPU ({tmp_path / 'absent.json'}" in out
    assert "GPU-hours" not in out


def test_the_dry_run_prints_gpu_hours_from_the_measured_rates(tmp_path, capsys):
    path = write_rates(RATES, tmp_path / "gpu.json")
    assert read_rates(path) == RATES
    out = dry_run(tmp_path, capsys, "--gpu-rates", str(path))
    assert "GPU-hours at the rates benchmarks/gpu.py measured on NVIDIA H100 80GB HBM3" in out
    p = plan(load_experiment(TABLE), "paper", {})
    # by hand: the paper preset trains in bf16 at 512 crops; iterations x batch / images/s
    train = sum(0 if t.imported else t.iters * t.batch_size / (40.0 if t.step == "base" else 100.0) / 3600
                for t in p.to_train)
    evals = sum(c.images * cell_calls(c) / 400.0 / 3600 for c in p.cells)
    assert train == pytest.approx(sum(gpu_training_hours(t, RATES) for t in p.to_train))
    assert evals == pytest.approx(sum(gpu_cell_hours(c, RATES) for c in p.cells))
    row = next(line for line in out.splitlines() if line.startswith(f"| {p.experiment.name} | {train:.1f} |"))
    assert row == f"| {p.experiment.name} | {train:.1f} | {evals:.1f} | {train + evals:.1f} |"
    assert train > 160_000 * 16 / 40.0 / 3600  # the paper's base alone: 160k iterations of 16 images


def test_a_precision_the_rates_lack_is_named_and_a_foreign_file_is_one_line(tmp_path, capsys):
    path = write_rates(GPURates(**{**RATES.__dict__, "base_images_per_s": {"fp32": 20.0}}), tmp_path / "gpu.json")
    out = dry_run(tmp_path, capsys, "--gpu-rates", str(path))
    assert "| no GPU rate measured for bf16 |" in out
    bad = tmp_path / "other.json"
    bad.write_text('{"images": 3}')
    with pytest.raises(DDPSError, match=rf"^{bad} is not a GPU rates file written by benchmarks/gpu.py"):
        read_rates(bad)


def test_gpu_hours_scale_a_refiner_by_its_masks_pixels(tmp_path):
    path = tmp_path / "masks.yaml"  # cells that differ only in denoiser.mask_scale
    path.write_text('{name: masks, axes: [{name: m, key: denoiser.mask_scale, values: [4, 2]}], rows: [m]}')
    p = plan(load_experiment(path), "paper", {})
    cells = {c.cfg.denoiser.mask_scale: c for c in p.cells}
    assert RATES.shapes["crop"] == cells[4].cfg.data.crop == 512 and "mask_scale" not in RATES.shapes  # measured at 4
    for s4, s2 in zip(cells[4].chain, cells[2].chain, strict=True):
        before = s4.iters * s4.batch_size / (40.0 if s4.step == "base" else 100.0) / 3600  # bf16, as above
        assert before > 0 and gpu_training_hours(s4, RATES) == pytest.approx(before)
        assert gpu_training_hours(s2, RATES) == pytest.approx(before * (1 if s4.step == "base" else 4))  # 4x pixels
    assert gpu_cell_hours(cells[4], RATES) == pytest.approx(cells[4].images * cell_calls(cells[4]) / 400.0 / 3600)
    assert gpu_cell_hours(cells[2], RATES) == pytest.approx(4 * gpu_cell_hours(cells[4], RATES))
