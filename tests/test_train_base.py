"""The base segmentor's training loop: schedule, plateau measure, learning, reuse, evaluation."""
import math

import pytest
import torch

from ddps.config import TrainBaseConfig, resolve
from ddps.data import build_dataset
from ddps.engine.evaluate import evaluate_base
from ddps.engine.reporter import NullReporter
from ddps.engine.train_base import fit, lr_at, plateau_gain
from ddps.metrics import IoUAccumulator
from ddps.segmentors.checkpoint import load_base, read_checkpoint


def test_lr_warms_up_linearly_then_decays_to_min_lr():
    cfg = TrainBaseConfig(iters=100, lr=1.0, warmup_iters=10, poly_power=1.0, min_lr=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(10, cfg) == pytest.approx(1.0)
    assert lr_at(55, cfg) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_at(100, cfg) == pytest.approx(0.1)
    values = [lr_at(i, cfg) for i in range(10, 100)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_plateau_gain_is_final_minus_last_eval_within_the_first_four_fifths():
    history = [{"iter": i, "mIoU": m} for i, m in ((200, 40.0), (400, 48.0), (800, 50.0), (1000, 50.2))]
    assert plateau_gain(history, 1000) == pytest.approx(0.2)
    assert math.isnan(plateau_gain(history[:-1], 1000))  # no final evaluation: unknown, never 'flat'


def test_fit_learns_saves_history_and_is_reused(tmp_path):
    cfg = resolve("smoke", overrides={"train_base.iters": 40, "train_base.eval_every": 20,
                                      "train_base.log_every": 1, "train_base.lr": 2e-3})
    reporter = NullReporter()
    path = fit(cfg, reporter, checkpoint=tmp_path / "b.pt")
    losses = [m["loss"] for _, m in reporter.history if "loss" in m]
    assert len(losses) == 40
    assert sum(losses[-10:]) / 10 < 0.8 * sum(losses[:5]) / 5  # it learns
    payload = read_checkpoint(path)
    assert [h["iter"] for h in payload["history"]] == [20, 40]
    assert payload["metrics"]["val_mIoU"] == payload["history"][-1]["mIoU"]
    assert payload["metrics"]["images_seen"] == 40 * cfg.train_base.batch_size
    assert payload["config"]["train_base.iters"] == 40
    # the checkpoint's model scores what training reported
    model, _ = load_base(path, num_classes=11)
    val = build_dataset(cfg.data, "val")
    assert evaluate_base(model, val, cfg.eval)["mIoU"] == pytest.approx(payload["metrics"]["val_mIoU"])
    again = NullReporter()
    assert fit(cfg, again, checkpoint=path) == path and not again.history  # reused, not retrained


def test_evaluate_base_equals_a_plain_loop_over_the_val_set():
    cfg = resolve("smoke")
    val = build_dataset(cfg.data, "val")
    torch.manual_seed(0)
    from ddps.segmentors import create_base
    model = create_base("segformer", "mit_b0", val.num_classes, feature_channels=32).eval()
    acc = IoUAccumulator(val.num_classes, val.ignore_index)
    with torch.no_grad():
        for i in range(len(val)):
            item = val[i]
            acc.update(model.segment(item["image"][None]).argmax(1)[0], item["mask"])
    ours = evaluate_base(model, val, cfg.eval)
    assert ours["mIoU"] == pytest.approx(acc.compute()["mIoU"])
    ms = evaluate_base(model, val, cfg.eval, multiscale=True)
    assert 0 <= ms["mIoU"] <= 100 and ms["mIoU"] != ours["mIoU"]
