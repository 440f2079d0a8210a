"""The command line, run as a user runs it: real subprocesses, one-line errors, printed tables."""
import json
import os
import subprocess
import sys

import pytest


def ddps(*args, env=None, timeout=600):
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "ddps", *args], capture_output=True, text=True,
                          timeout=timeout, env=full_env)


def test_data_build_prints_counts_and_class_shares(tiny_fashion):
    out = ddps("data", "build", "fashion-scenes", "--preset", "smoke", "--data-root", str(tiny_fashion))
    assert out.returncode == 0, out.stderr
    assert "train: 64 scenes" in out.stdout and "val: 16 scenes" in out.stdout
    lines = [l for l in out.stdout.splitlines() if l.startswith(("background", "Trouser", "Ankle boot"))]
    assert len(lines) == 3
    shares = [float(l.split()[-2]) for l in out.stdout.splitlines()[-11:]]
    assert sum(shares) == pytest.approx(100, abs=0.1)


@pytest.mark.slow
def test_train_base_then_eval_prints_the_row(tmp_path):
    ckpt = tmp_path / "base.pt"
    out = ddps("train-base", "--preset", "smoke", "--out", str(ckpt))
    assert out.returncode == 0, out.stderr
    assert "[train-base] it 20/20" in out.stdout and "val_mIoU" in out.stdout
    assert ckpt.exists() and ckpt.with_suffix(".json").exists()
    again = ddps("train-base", "--preset", "smoke", "--out", str(ckpt))
    assert "reusing" in again.stdout  # a finished checkpoint is not retrained
    ev = ddps("eval", str(ckpt))
    assert ev.returncode == 0, ev.stderr
    header, rule, row = ev.stdout.strip().splitlines()[-3:]
    assert header == "| Method | Backbone | #P(M) | mIoU (ss/ms) | mBIoU |"
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[:2] == ["SegFormer", "MiT-B0"]
    ss, ms = (float(v) for v in cells[3].split("/"))
    assert 0 <= ss <= 100 and 0 <= ms <= 100 and 0 <= float(cells[4]) <= 100


@pytest.mark.reliability(kind="bad_input", case="command line")
@pytest.mark.parametrize("args, env, message", [
    (["train-base", "--preset", "smoke", "--set", "base.backbone=vit_h"], {},
     "unknown backbone 'vit_h' for segformer; choose from: mit_b0"),
    (["train-base", "--preset", "smoke", "--set", "data.dataset=coco"], {},
     "unknown dataset 'coco'; choose from: ade20k, cityscapes, fashion-scenes, folder"),
    (["data", "build", "fashion-scenes", "--preset", "smoke", "--data-root", "/nonexistent/fmnist"], {},
     "Fashion-MNIST file /nonexistent/fmnist/train-images-idx3-ubyte.gz is missing"),
    (["data", "build", "fashion-scenes", "--preset", "smoke"], {"DDPS_FASHION_MNIST": "/nowhere"},
     "Fashion-MNIST file /nowhere/train-images-idx3-ubyte.gz is missing"),
    (["train-base", "--preset", "huge"], {}, "unknown preset 'huge'; choose from: cpu, demo, paper, smoke"),
    (["eval", "/nonexistent.pt"], {}, "checkpoint /nonexistent.pt does not exist"),
])
def test_bad_input_is_one_line_on_stderr_without_traceback(args, env, message):
    out = ddps(*args, env=env)
    assert out.returncode == 2
    assert message in out.stderr
    assert "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


@pytest.mark.reliability(kind="bad_input", case="paper preset without ADE20K")
def test_paper_preset_without_ade20k_says_what_to_set():
    out = ddps("train-base", "--preset", "paper")
    assert out.returncode == 2 and "ade20k is not here (data.root is not set): download ADEChallengeData2016.zip" in out.stderr


@pytest.mark.reliability(kind="bad_input", case="user weights that do not fit")
def test_eval_of_a_users_state_dict_file_and_its_mismatch_error(tmp_path):
    import torch

    from ddps.segmentors import create_base
    model = create_base("segformer", "mit_b0", 11, feature_channels=32)
    torch.save({"state_dict": model.state_dict()}, tmp_path / "user.pth")
    ok = ddps("eval", str(tmp_path / "user.pth"), "--preset", "smoke", "--no-ms")
    assert ok.returncode == 0, ok.stderr
    assert "| SegFormer | MiT-B0 |" in ok.stdout
    bad = ddps("eval", str(tmp_path / "user.pth"), "--preset", "smoke", "--set", "base.feature_channels=64")
    assert bad.returncode == 2 and "does not fit" in bad.stderr and "shape mismatches" in bad.stderr


@pytest.mark.slow
def test_train_refiner_then_eval_and_refine_a_users_image(tmp_path):
    import numpy as np
    from PIL import Image
    base = tmp_path / "base.pt"
    assert ddps("train-base", "--preset", "smoke", "--out", str(base)).returncode == 0
    out = ddps("train", "--preset", "smoke", "--base", str(base), "--out", str(tmp_path / "ref"))
    assert out.returncode == 0, out.stderr
    assert "[stage1] it 6/6" in out.stdout and "[stage2] it 6/6" in out.stdout
    ckpt = next((tmp_path / "ref").glob("refiner-ddps-stage2-*.pt"))
    again = ddps("train", "--preset", "smoke", "--base", str(base), "--out", str(tmp_path / "ref"))
    assert again.stdout.count("reusing") == 2  # both finished stages reused, none retrained
    ev = ddps("eval", str(ckpt), "--all-steps")
    assert ev.returncode == 0, ev.stderr
    lines = ev.stdout.splitlines()
    assert lines[0].startswith("| Method | Backbone | Denoiser | #P(M) | mIoU (base / step 1 / last)")
    assert lines[2].startswith("| DDPS (5 steps) | SegFormer MiT-B0 | UNet-XXS |")
    assert lines[3].startswith("mask reliance (mIoU): (a) own trajectory")
    assert [l.split("|")[1].strip() for l in lines if l.startswith("| ") and l.split("|")[1].strip().isdigit()] \
        == ["1", "2", "3", "4", "5"]
    image = tmp_path / "mine.png"
    Image.fromarray((np.random.default_rng(0).random((40, 50, 3)) * 255).astype(np.uint8)).save(image)
    rf = ddps("refine", str(image), "--checkpoint", str(ckpt), "--out", str(tmp_path / "out"))
    assert rf.returncode == 0, rf.stderr
    mask = Image.open(tmp_path / "out" / "mine.png")
    strip = Image.open(tmp_path / "out" / "mine-strip.png")
    assert mask.mode == "P" and mask.size == (50, 40) and max(np.asarray(mask).ravel()) < 11
    width, height = strip.size
    assert width == 50 * 7 + 2 * 6 and height > 40  # image | base | 5 steps, under a band of captions
    band = np.asarray(strip.convert("L"))[: height - 40]
    assert all((band[:, x:x + 50] < 128).any() for x in range(0, width, 52))  # each tile has its caption
    bad = ddps("refine", str(tmp_path / "missing.png"), "--checkpoint", str(ckpt), "--out", str(tmp_path / "out"))
    assert bad.returncode == 2 and "image" in bad.stderr and "missing.png does not exist" in bad.stderr
    wrong = ddps("eval", str(ckpt), "--set", "infer.steps=50")
    assert wrong.returncode == 2 and "infer.steps=50 is out of range" in wrong.stderr
    # the holdout scenes (eval.split, or --split): 8 composed for the evaluation; none in the smoke preset
    holdout = ddps("eval", str(ckpt), "--set", "eval.split=holdout", "--set", "data.holdout=8", "--json")
    assert holdout.returncode == 0, holdout.stderr
    assert json.loads(holdout.stdout.strip().splitlines()[-1])["images"] == 8
    none = ddps("eval", str(ckpt), "--split", "holdout")
    assert none.returncode == 2 and "the holdout split needs data.holdout > 0" in none.stderr
