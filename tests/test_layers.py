"""The layers of docs/design.md ("Layers") hold: importing the core leaves ray and mlflow out of sys.modules."""
import subprocess
import sys

CORE = ["ddps.config", "ddps.checkpoint_io", "ddps.data", "ddps.segmentors", "ddps.segmentors.inference",
        "ddps.segmentors.pretrained", "ddps.segmentors.mmseg", "ddps.metrics", "ddps.diffusion", "ddps.diffusion.discrete", "ddps.diffusion.bits", "ddps.diffusion.registry",
        "ddps.names", "ddps.engine.record", "ddps.engine.evaluate_refiner", "ddps.denoiser", "ddps.refiner.model", "ddps.refiner.sampler",
        "ddps.refiner.objective", "ddps.refiner.checkpoint", "ddps.refiner.official", "ddps.engine.train_base", "ddps.engine.train_refiner",
        "ddps.engine.evaluate_checkpoint", "ddps.engine.refine_images", "ddps.engine.loop", "ddps.cli"]


def test_core_and_engine_do_not_import_ray_or_mlflow():
    code = ("import sys\n" + "".join(f"import {m}\n" for m in CORE) +
            "bad = [m for m in ('ray', 'mlflow') if m in sys.modules]\n"
            "assert not bad, bad\nprint('clean')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "clean" in out.stdout, out.stderr


def test_mlflow_is_imported_in_one_module_and_ray_only_in_orchestration():
    from pathlib import Path
    root = Path(__file__).resolve().parents[1] / "ddps"
    mlflow_users, ray_users = set(), set()
    for path in root.rglob("*.py"):
        text = path.read_text()
        rel = str(path.relative_to(root))
        if "import mlflow" in text or "from mlflow" in text:
            mlflow_users.add(rel)
        if "import ray" in text or "from ray" in text:
            ray_users.add(rel)
    assert mlflow_users == {"orchestration/tracking.py"}
    assert ray_users and all(p.startswith("orchestration/") for p in ray_users)
