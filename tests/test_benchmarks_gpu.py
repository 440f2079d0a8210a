"""benchmarks/gpu.py in its CPU mode: three tables with fp32 and bf16 rows of finite positive figures, and
nothing of Ray, MLflow or albumentations imported (the GPU machines have none of them)."""
import math
import os
import runpy
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu.py"
TABLES = {"### base training": "step ms", "### refiner training": "step ms", "### evaluation": "images/s"}


def tables(out: str) -> dict[str, list[dict[str, str]]]:
    """Each '### title' line's Markdown table, as rows of {column: cell}."""
    found, title, header = {}, None, None
    for line in out.splitlines():
        if line.startswith("### "):
            title, header = line, None
        elif line.startswith("|") and title:
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if header is None:
                header = cells
            elif not set(line) <= set("|-"):
                found.setdefault(title, []).append(dict(zip(header, cells, strict=True)))
    return found


def test_cpu_mode_prints_three_tables_of_positive_figures_and_imports_no_ray_mlflow_or_albumentations(tmp_path):
    argv = [str(SCRIPT), "--device", "cpu", "--tiny", "--peak-tflops", "1", "--rates", str(tmp_path / "gpu.json")]
    code = (f"import runpy, sys\nsys.argv = {argv!r}\nrunpy.run_path({str(SCRIPT)!r}, run_name='__main__')\n"
            "bad = [m for m in ('ray', 'mlflow', 'albumentations', 'ddps.data') if m in sys.modules]\n"
            "print('imported:', bad, 'ddps from', sys.modules['ddps'].__file__)\n")
    # one thread: at this size a second one gains little, and loses much on a machine busy with other work
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert f"imported: [] ddps from {ROOT / 'ddps'}" in out, out[-500:]
    assert out.startswith("device: CPU") and "torch " in out and "TF32" in out and "flags: --device cpu" in out
    found = tables(out)
    for prefix, column in TABLES.items():
        (title,) = [t for t in found if t.startswith(prefix)]
        rows = found[title]
        assert {r["precision"] for r in rows} == {"fp32", "bf16"}, title
        assert all(column in r for r in rows), title
        for row in rows:
            for key, cell in row.items():
                if key == "precision" or cell == "n/a" and key == "peak GPU GiB":  # no GPU memory on a CPU
                    continue
                value = float(cell)
                assert math.isfinite(value) and value > 0, (title, key, cell)
            assert row["speed vs fp32"] == "1.00" or row["precision"] != "fp32"
    evaluation = found[next(t for t in found if t.startswith("### evaluation"))]
    assert {(r["K (test steps)"], r["denoiser calls per image"]) for r in evaluation} == {("20", "21"), ("2", "3")}
    training = [r for t, rows in found.items() if "training" in t for r in rows]
    assert all(r["MFU % of bf16 peak"] != "n/a" for r in training)  # --peak-tflops 1 given
    assert "noise draw alone" in out and "(gpu.py ran" in out
    assert not (tmp_path / "gpu.json").exists() and "rates for" not in out  # a CPU's rates are no GPU's


def test_the_bf16_peak_is_known_by_the_device_name_or_given():
    path, had_steps = list(sys.path), "steps" in sys.modules
    try:
        gpu = runpy.run_path(str(SCRIPT), run_name="gpu")  # defines; main() does not run
    finally:  # the script puts benchmarks/ on sys.path and imports its steps.py: not for the tests after this
        sys.path[:] = path
        if not had_steps:
            sys.modules.pop("steps", None)
    peak = gpu["peak_tflops"]
    assert peak("NVIDIA H100 80GB HBM3", None)[0] == 989
    assert peak("NVIDIA H200", None)[0] == 989
    assert peak("NVIDIA H100 PCIe", None)[0] == 756
    assert peak("NVIDIA A100-SXM4-80GB", None)[0] == 312
    assert peak("NVIDIA L40S", None)[0] == 362
    assert peak("CPU: Intel(R) Xeon(R) Processor", None)[0] is None
    assert peak("NVIDIA H100 80GB HBM3", 500.0) == (500.0, "--peak-tflops")
    num = gpu["num"]
    assert [num(x) for x in (1234.5, 12.34, 1.234, 0.01234, 0.0001234)] == ["1234", "12.3", "1.23", "0.0123", "0.000123"]
