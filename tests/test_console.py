"""What a person reads: the pipeline's console (progress line in place on a terminal, held back elsewhere, all in
the log file), and DDP without its stride warning (fixed at the gradient's layout, not silenced)."""
import io
import subprocess
import sys
import textwrap

from ddps.orchestration.progress import Console, progress_text


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_on_a_terminal_the_progress_line_is_rewritten_in_place_and_messages_print_above_it(tmp_path):
    stream, log = Terminal(), tmp_path / "run.log"
    console = Console(log, stream=stream)
    console.say("[base] 3.34M params")
    console.update("[base] it 5/20 | loss 2.3", record="[base] it 5/20  loss 2.3  lr 0.001")
    console.update("[base] it 10/20 | loss 2.1")
    console.say("[base] done")
    console.close()
    assert stream.getvalue() == ("[base] 3.34M params\n" "\r\033[K[base] it 5/20 | loss 2.3" "\r\033[K[base] it 10/20 | loss 2.1"
                                 "\r\033[K[base] done\n[base] it 10/20 | loss 2.1" "\n")
    lines = [line.split(" ", 2)[2] for line in log.read_text().splitlines()]  # after the time stamp
    assert lines == ["[base] 3.34M params", "[base] it 5/20  loss 2.3  lr 0.001", "[base] it 10/20 | loss 2.1",
                     "[base] done"]


def test_in_a_log_the_progress_line_is_printed_every_so_often_and_before_the_next_message(tmp_path):
    stream = io.StringIO()
    console = Console(tmp_path / "run.log", stream=stream, every_s=3600)
    for step in (5, 10, 15):
        console.update(f"[base] it {step}/20")
    console.say("[base] done")
    console.update("[stage1] it 3/6")
    console.close()
    assert stream.getvalue().splitlines() == ["[base] it 5/20", "[base] it 15/20", "[base] done", "[stage1] it 3/6"]
    assert "[base] it 10/20" in (tmp_path / "run.log").read_text()  # every record in the log file


def test_in_a_log_a_line_held_back_and_then_outdated_is_not_printed_at_the_end(tmp_path, monkeypatch):
    from ddps.orchestration import progress
    clock = iter([100.0, 100.0, 110.0, 140.0, 140.0])  # A due, B held back (10 s < 30 s), C due
    monkeypatch.setattr(progress.time, "monotonic", lambda: next(clock))
    stream = io.StringIO()
    console = Console(tmp_path / "run.log", stream=stream, every_s=30)
    console.update("[stage2] it 250/300 | loss 0.49")
    console.update("[stage2] it 300/300 | loss 0.49")
    console.update("[stage2] it 300/300 | loss 0.49 | holdout last mIoU 35.58")
    console.end()
    assert stream.getvalue().splitlines() == ["[stage2] it 250/300 | loss 0.49",
                                              "[stage2] it 300/300 | loss 0.49 | holdout last mIoU 35.58"]


def test_the_progress_text_shows_iteration_loss_images_per_second_scores_and_eta():
    text = progress_text("stage1", 120, 400, {"loss": 0.5312, "lr": 1e-4, "img_per_s": 95.4, "val_last_mIoU": 61.234},
                         80.0)
    assert text == "[stage1] it 120/400 | loss 0.5312 | 95 img/s | val last mIoU 61.23 | ETA 1m20s"


DDP = textwrap.dedent("""
    import os, sys, torch, torch.distributed as dist
    from ddps.orchestration.ray_train import canonical_grad_strides
    from ddps.segmentors.base import create_base
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2])
    dist.init_process_group("gloo", rank=0, world_size=1)
    torch.manual_seed(0)
    model = create_base("segformer", "mit_b0", 11)
    if sys.argv[1] == "hooked":
        canonical_grad_strides(model)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(model.parameters(), 1e-3)
    for _ in range(2):
        optimizer.zero_grad(set_to_none=True)
        ddp(torch.randn(2, 3, 64, 64))[0].float().mean().backward()
        optimizer.step()
    torch.save(model.state_dict(), sys.argv[3])
""")


def test_ddp_trains_the_segformer_base_without_its_stride_warning_and_to_the_same_weights(tmp_path):
    """SegFormer's depthwise and 1x1 conv weights get gradients whose strides differ on size-1 dimensions: DDP
    warned and copied them; re-strided (same memory) it does neither, and the weights are the same."""
    import torch

    from procs import free_ports
    runs = {}
    for mode, port in zip(("plain", "hooked"), free_ports(2)):
        out = subprocess.run([sys.executable, "-c", DDP, mode, str(port), str(tmp_path / f"{mode}.pt")],
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        runs[mode] = (out.stderr, torch.load(tmp_path / f"{mode}.pt"))
    assert "Grad strides do not match bucket view strides" in runs["plain"][0]  # the warning this fixes
    assert "Grad strides" not in runs["hooked"][0]
    assert all(torch.equal(v, runs["hooked"][1][k]) for k, v in runs["plain"][1].items())
