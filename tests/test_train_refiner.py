"""The refiner's training loop: it learns, stage 2 starts from stage 1, a crashed run resumes to the same
weights, a damaged checkpoint is skipped, the data order shards by worker without changing the batch, and the
held-out checks measure mask reliance when asked."""
import pytest
import torch

from ddps import names
from ddps.checkpoint_io import read_checked, write_checked
from ddps.config import resolve
from ddps.engine.loop import FolderCheckpointer, GlobalOrder, Worker
from ddps.engine.reporter import NullReporter
from ddps.engine.train_base import fit as fit_base
from ddps.engine.train_refiner import checks_reliance, fit, fit_stage, prepare_data, stage_checkpoint
from ddps.errors import ConfigError
from ddps.segmentors.checkpoint import base_from_payload, read_checkpoint


@pytest.fixture(scope="module")
def smoke_base(tmp_path_factory):
    path = tmp_path_factory.mktemp("base") / "base.pt"
    cfg = resolve("smoke")
    fit_base(cfg, NullReporter(), checkpoint=path)
    payload = read_checkpoint(path)
    return path, payload, base_from_payload(payload, path).freeze()


@pytest.fixture(scope="module")
def smoke_data(smoke_base):
    return prepare_data(resolve("smoke"), smoke_base[2])


def test_two_stages_train_save_and_are_reused(smoke_base, tmp_path):
    cfg = resolve("smoke", overrides={"train.stage1_iters": 8, "train.stage2_iters": 10, "train.log_every": 1})
    reporters = {}

    def factory(stage, iters):
        reporters[stage] = NullReporter()
        return reporters[stage]
    path = fit(cfg, smoke_base[0], reporter_factory=factory, out_dir=tmp_path, log=lambda m: None)
    assert path == stage_checkpoint(cfg, "stage2", smoke_base[1]["hash"], tmp_path)
    payload = read_checkpoint(path)
    assert payload["kind"] == "refiner" and payload["stage"] == "stage2" and payload["ema"] is not None
    losses = [m["loss"] for _, m in reporters["stage1"].history if "loss" in m]
    assert len(losses) == 8 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3  # it learns
    assert [h["iter"] for h in payload["history"]] == [6, 10]
    again = {}
    fit(cfg, smoke_base[0], reporter_factory=lambda s, i: again.setdefault(s, NullReporter()), out_dir=tmp_path,
        log=lambda m: None)
    assert again == {}  # both stages reused


def test_stage2_starts_from_stage1_weights(smoke_base, smoke_data, tmp_path):
    cfg = resolve("smoke", overrides={"train.stage2_iters": 1, "train.lr": 1e-12, "train.min_lr": 0.0, "train.warmup_iters": 0,
                                      "train.ema": False})
    stage1 = fit_stage(cfg, "stage1", smoke_base[2], smoke_base[1], smoke_data, path=None, reporter=NullReporter())
    stage2 = fit_stage(cfg, "stage2", smoke_base[2], smoke_base[1], smoke_data, path=None,
                       init_state=stage1["model"], reporter=NullReporter())
    for key, value in stage1["model"].items():
        assert torch.allclose(value, stage2["model"][key], atol=1e-6), key  # lr ~ 0: unchanged from stage 1


class Recording(NullReporter):
    """A NullReporter that keeps its messages too."""

    def __init__(self):
        super().__init__()
        self.messages: list[str] = []

    def info(self, message: str) -> None:
        self.messages.append(message)


@pytest.mark.parametrize("stage, check_reliance, measured", [
    ("stage2", True, True), ("stage2", False, False), ("stage1", True, False)])
def test_held_out_checks_measure_mask_reliance_when_asked_in_multi_step_stages(smoke_base, smoke_data, stage,
                                                                               check_reliance, measured):
    """train.check_reliance: every held-out check of a multi-step stage keeps and reports (as <split>_<key>)
    the diagnostic's last-step mIoUs and its multi-step gain; without it, and in stage 1 (one step), the
    checks are what they were."""
    cfg = resolve("smoke", overrides={"train.stage1_iters": 2, "train.stage2_iters": 4, "train.eval_every": 2,
                                      "train.check_reliance": check_reliance})
    reporter = Recording()
    payload = fit_stage(cfg, stage, smoke_base[2], smoke_base[1], smoke_data, path=None, reporter=reporter)
    history, split = payload["history"], smoke_data.select_name
    assert [h["iter"] for h in history] == {"stage1": [2], "stage2": [2, 4]}[stage]
    reported = {step: m for step, m in reporter.history if f"{split}_{names.LAST_MIOU}" in m}
    assert sorted(reported) == [h["iter"] for h in history]
    keys = {"iter", *names.CHECK_KEYS, *(names.CHECK_RELIANCE_KEYS if measured else ())}
    for check in history:
        assert set(check) == keys
        assert reported[check["iter"]] == {f"{split}_{k}": v for k, v in check.items() if k != "iter"}
        if measured:
            for key in (names.RELIANCE_OWN, names.RELIANCE_ORACLE, names.RELIANCE_RANDOM):
                assert 0 <= check[key] <= 100, key
            assert check[names.RELIANCE_OWN] == check[names.LAST_MIOU]  # its own trajectory: normal inference
            assert check[names.MULTISTEP_GAIN] == check[names.LAST_MIOU] - check[names.STEP1_MIOU]
    assert payload["metrics"] == {"select_split": split, **history[-1]}
    assert ("evaluated on " + split + " (with the mask-reliance trajectories)" in reporter.messages[0]) == measured
    assert checks_reliance(cfg, "multistep") == check_reliance  # the multi-step-only ablation: as stage 2
    assert not checks_reliance(cfg, "head")  # the UNet head: one call


def test_reliance_checks_reach_the_stages_mlflow_run_as_history_by_iteration(smoke_base, smoke_data, tmp_path):
    """What the worker's MLflowReporter sends: each check's reliance keys at once (not held back with the
    throttled loss), one point per check at its iteration."""
    from ddps.orchestration.tracking import MLflowReporter, Tracker
    tracker = Tracker(f"sqlite:///{tmp_path / 'm.db'}")
    run_id = tracker.start_run(tracker.experiment("reliance"), "stage2")
    cfg = resolve("smoke", overrides={"train.stage2_iters": 4, "train.eval_every": 2, "train.check_reliance": True})
    reporter = MLflowReporter(tracker, run_id, every_s=3600)
    history = fit_stage(cfg, "stage2", smoke_base[2], smoke_base[1], smoke_data, path=None,
                        reporter=reporter)["history"]
    assert [h["iter"] for h in history] == [2, 4] and not reporter.pending
    for key in names.CHECK_RELIANCE_KEYS:
        points = tracker.history(run_id, f"{smoke_data.select_name}_{key}")
        assert points == [(h["iter"], h[key]) for h in history], key


class Crash(Exception):
    pass


class CrashingCheckpointer(FolderCheckpointer):
    """Saves, then dies once at a chosen iteration: a worker killed right after its checkpoint."""

    def __init__(self, folder, every, crash_at):
        super().__init__(folder, every=every, keep=2, log=lambda m: None)
        self.crash_at = crash_at

    def save(self, state, step):
        super().save(state, step)
        if step == self.crash_at:
            self.crash_at = None
            raise Crash(step)


@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_a_crashed_run_resumes_to_the_same_weights(smoke_base, smoke_data, tmp_path, stage):
    cfg = resolve("smoke", overrides={"train.stage1_iters": 9, "train.stage2_iters": 9, "train.eval_every": 4,
                                      "train.ema_every": 2, "train.cond_dropout": 0.3})
    args = (cfg, stage, smoke_base[2], smoke_base[1], smoke_data)
    straight = fit_stage(*args, path=None, reporter=NullReporter())
    checkpointer = CrashingCheckpointer(tmp_path / "ck", every=3, crash_at=6)
    with pytest.raises(Crash):
        fit_stage(*args, path=None, reporter=NullReporter(), checkpointer=checkpointer)
    assert [p.name for p in checkpointer.files()] == ["state-00000003.pt", "state-00000006.pt"]
    resumed_reporter = NullReporter()
    resumed = fit_stage(*args, path=None, reporter=resumed_reporter, checkpointer=checkpointer)
    assert min(step for step, _ in resumed_reporter.history) > 6  # it did not start over
    for key, value in straight["model"].items():
        assert torch.equal(value, resumed["model"][key]), key
    for key, value in straight["ema"].items():
        assert torch.equal(value, resumed["ema"][key]), key
    assert straight["history"] == resumed["history"]


def test_a_damaged_checkpoint_is_detected_and_the_previous_one_used(tmp_path):
    messages = []
    ck = FolderCheckpointer(tmp_path, every=1, keep=3, log=messages.append)
    for step in (1, 2, 3):
        ck.save({"iter": step, "w": torch.full((4,), float(step))}, step)
    newest = ck.files()[-1]
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte
    newest.write_bytes(bytes(data))
    assert ck.latest()["iter"] == 2
    assert len(messages) == 1 and "state-00000003.pt is damaged" in messages[0]
    ck.files()[-2].write_bytes(ck.files()[-2].read_bytes()[:100])  # truncated
    assert ck.latest()["iter"] == 1
    assert read_checked(tmp_path / "nothing.pt") is None


def test_checked_write_leaves_no_partial_file_under_the_final_name(tmp_path):
    class Unpicklable:
        pass
    with pytest.raises(Exception):
        write_checked(tmp_path / "state.pt", {"x": Unpicklable()})
    assert not (tmp_path / "state.pt").exists()
    write_checked(tmp_path / "state.pt", {"x": torch.ones(2)})
    assert torch.equal(read_checked(tmp_path / "state.pt")["x"], torch.ones(2))


def test_global_order_shards_each_global_batch_and_resumes_exactly():
    single = GlobalOrder(20, 8, seed=3)
    ranks = [GlobalOrder(20, 8, seed=3, rank=r, world_size=2) for r in range(2)]
    it_single, it_ranks = iter(single), [iter(r) for r in ranks]
    for _ in range(5):  # crosses an epoch boundary (2 batches per epoch)
        index, keys = next(it_single)
        parts = [next(i) for i in it_ranks]
        assert torch.equal(torch.cat([p[0] for p in parts]), index)
        assert torch.equal(torch.cat([p[1] for p in parts]), keys)
    assert len(set(torch.cat([next(it_single)[1] for _ in range(6)]).tolist())) == 48  # keys never repeat
    position = single.position
    after = [next(it_single)[0] for _ in range(3)]
    again = GlobalOrder(20, 8, seed=3)
    again.seek(position)
    it_again = iter(again)
    assert all(torch.equal(a, next(it_again)[0]) for a in after)


def test_batch_size_must_divide_among_workers():
    with pytest.raises(ConfigError, match="train.batch_size=9 is not divisible by the 2 data-parallel workers"):
        Worker(world_size=2).local_batch(9, "train.batch_size")


def test_feature_cache_holds_originals_then_flips_in_dataset_order(smoke_base):
    """Filled in place batch by batch: row i is image i, row n + i its mirror image, whatever the batch size."""
    from ddps.data import build_dataset
    from ddps.engine.features import base_batch, compute_cache
    from ddps.refiner.codecs import ResizeCodec
    base, codec = smoke_base[2], ResizeCodec(4)
    dataset = build_dataset(resolve("smoke").data, "val").head(5)
    cache = compute_cache(base, dataset, codec, flip=True, batch_size=2)
    assert len(cache) == 10 and cache.features.dtype == torch.float16
    for i in (0, 3, 4):
        item = dataset[i]
        for flipped in (False, True):
            x, y = item["image"][None], item["mask"][None]
            if flipped:
                x, y = x.flip(-1), y.flip(-1)
            b = base_batch(base, x, y, codec)
            row = i + 5 * flipped
            torch.testing.assert_close(cache.features[row].float(), b.features[0].half().float(), atol=2e-3, rtol=1e-2)
            torch.testing.assert_close(cache.base_logits[row].float(), b.base_logits[0].half().float(),
                                       atol=2e-3, rtol=1e-2)
            assert torch.equal(cache.labels[row], y[0].to(torch.uint8))


def test_the_feature_cache_is_kept_once_and_memory_mapped_by_every_later_training(smoke_base, monkeypatch):
    """prepare_data with the base's hash writes the train split's features to DDPS_HOME/features once; a
    second preparation (another stage, another worker) maps that file instead of running the base again,
    and a damaged file is computed again."""
    import ddps.engine.train_refiner as train_refiner
    cfg, (_, payload, base) = resolve("smoke"), smoke_base
    path = train_refiner.feature_cache_path(cfg, payload["hash"])
    path.unlink(missing_ok=True)
    calls = []
    real = train_refiner.compute_cache
    monkeypatch.setattr(train_refiner, "compute_cache", lambda *a, **k: calls.append(1) or real(*a, **k))
    first = prepare_data(cfg, base, base_hash=payload["hash"]).train_cache
    assert path.exists() and len(calls) == 2  # the held-out split, then the train split (kept)
    second = prepare_data(cfg, base, base_hash=payload["hash"]).train_cache
    assert len(calls) == 3  # only the held-out split again: the train split came from the file
    for name in ("features", "base_logits", "labels"):
        assert torch.equal(getattr(first, name), getattr(second, name)), name
    flipped = resolve("smoke", overrides={"train.flip": not cfg.train.flip})
    assert train_refiner.feature_cache_path(flipped, payload["hash"]) != path  # flips change what is cached
    path.write_bytes(b"not a cache")
    third = prepare_data(cfg, base, base_hash=payload["hash"]).train_cache
    assert len(calls) == 5 and torch.equal(third.features, first.features)
    assert len(torch.load(path, mmap=True, weights_only=True)["labels"]) == len(first)  # rewritten whole
