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
    assert evaluate_base(model, val, cfg.eval).mIoU == pytest.approx(payload["metrics"]["val_mIoU"])
    again = NullReporter()
    assert fit(cfg, again, checkpoint=path) == path and not again.history  # reused, not retrained


def test_out_path_of_another_config_is_refused_not_silently_reused(tmp_path):
    from ddps.errors import CheckpointError
    cfg = resolve("smoke", overrides={"train_base.iters": 4, "train_base.eval_every": 4})
    path = fit(cfg, NullReporter(), checkpoint=tmp_path / "b.pt")
    other = resolve("smoke", overrides={"train_base.iters": 6, "train_base.eval_every": 6})
    with pytest.raises(CheckpointError, match="exists but was trained with another config.*--force"):
        fit(other, NullReporter(), checkpoint=path)
    fit(other, NullReporter(), checkpoint=path, force=True)
    assert read_checkpoint(path)["config"]["train_base.iters"] == 6


def test_dataset_smaller_than_the_batch_is_refused():
    from ddps.errors import DataError
    cfg = resolve("smoke", overrides={"data.train_scenes": 4})
    with pytest.raises(DataError, match="has 4 images, fewer than train_base.batch_size=8"):
        fit(cfg, NullReporter())


def test_param_groups_head_lr_and_no_decay_on_norms_and_biases():
    from ddps.engine.train_base import param_groups
    from ddps.segmentors import create_base
    model = create_base("segformer", "mit_b0", 3, feature_channels=16)
    groups = param_groups(model, TrainBaseConfig(head_lr_mult=10.0, norm_decay=False, weight_decay=0.01))
    total = sum(p.numel() for g in groups for p in g["params"])
    assert total == model.num_params()
    names = {id(p): n for n, p in model.named_parameters()}
    for g in groups:
        for p in g["params"]:
            n = names[id(p)]
            assert g["lr_mult"] == (1.0 if n.startswith("encoder.") else 10.0)
            assert g["weight_decay"] == (0.0 if p.ndim <= 1 else 0.01)


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
    assert ours.mIoU == pytest.approx(acc.compute()["mIoU"])
    from ddps.segmentors.inference import predict_multiscale
    acc = IoUAccumulator(val.num_classes, val.ignore_index)
    with torch.no_grad():
        for i in range(len(val)):
            item = val[i]
            probs = predict_multiscale(model.segment, item["image"][None], cfg.eval.scales, cfg.eval.flip)
            acc.update(probs.argmax(1)[0], item["mask"])
    assert evaluate_base(model, val, cfg.eval, multiscale=True).mIoU == pytest.approx(acc.compute()["mIoU"])
