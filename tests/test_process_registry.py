"""One noise-process interface and a registry by name: a toy third process registered here trains and
refines through the same objective, sampler and builders as the two built-in ones."""
import subprocess
import sys

import pytest
import torch

from ddps.config import resolve
from ddps.diffusion import PROCESSES, MaskDiffusion, create_process, register_process
from ddps.diffusion.process import MaskInput, NoiseProcess
from ddps.diffusion.rng import SampleRNG
from ddps.errors import ConfigError
from ddps.refiner.build import build_denoiser, build_process
from ddps.refiner.codecs import ResizeCodec
from ddps.refiner.objective import Batch, refiner_loss
from ddps.refiner.sampler import refine

K, C, T = 5, 8, 10
TOY = "keep-or-redraw"


class KeepOrRedraw(NoiseProcess):
    """q(x_t | x_0): x_0 with probability alpha_bar_t = 1 - t/T, else a uniform class; no [MASK], no VLB."""

    def __init__(self, num_classes, steps, **options):
        self.num_classes, self.steps = num_classes, steps

    @property
    def mask_input(self):
        return MaskInput("embed", num_states=self.num_classes)

    def draw_noise(self, rng, h, w, stream):
        return rng.rand((2, h, w), stream)  # per pixel: the keep coin and the redrawn class

    def q_sample_labels(self, x0, t, generator=None, noise=None):
        u = torch.rand((x0.shape[0], 2, *x0.shape[1:]), generator=generator) if noise is None else noise
        keep = u[:, 0] < 1 - torch.as_tensor(t).float().view(-1, 1, 1) / self.steps
        return torch.where(keep, x0, (u[:, 1] * self.num_classes).long().clamp(max=self.num_classes - 1))

    def prior(self, shape, generator=None, device=None, noise=None):
        return self.q_sample_labels(torch.zeros(shape, dtype=torch.long), self.steps, generator, noise)

    def free_step(self, logits, s, generator=None):
        return self.q_sample_labels(logits.argmax(1), s, generator)


@pytest.fixture(autouse=True)
def one_thread():
    """Tensors of a few hundred values gain nothing from threads, and on a busy host the threads' waiting
    makes each step ~50x slower: one thread, restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def toy():
    register_process(TOY, KeepOrRedraw)
    yield resolve("smoke", overrides={"diffusion.kind": TOY, "diffusion.steps": T, "infer.steps": 5})
    PROCESSES.pop(TOY)


def _batch(B=4, h=4):
    gen = torch.Generator().manual_seed(0)
    return Batch(features=torch.randn(B, C, h, h, generator=gen),
                 labels=torch.randint(0, K, (B, 4 * h, 4 * h), generator=gen),
                 base_pred=torch.randint(0, K, (B, h, h), generator=gen))


def _train_step(cfg, process):
    torch.manual_seed(0)
    net = build_denoiser(cfg, K, C, process).train()
    loss, parts = refiner_loss(net, process, _batch(), ResizeCodec(4), stage=2, target="first", loss="hybrid",
                               cond_dropout=0.5, rng=SampleRNG(0, torch.arange(4)))
    loss.backward()
    grads = [p.grad for p in net.parameters() if p.requires_grad]
    assert torch.isfinite(loss) and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert net.classifier.weight.grad.abs().sum() > 0
    return net.eval(), parts


def test_a_registered_process_trains_and_refines_through_the_common_interface(toy):
    process = build_process(toy, K)            # diffusion.kind names the toy: the config reads the registry
    assert isinstance(process, KeepOrRedraw) and process.steps == T
    net, parts = _train_step(toy, process)
    assert set(parts) == {"ce"}                # hybrid without a VLB term: cross-entropy alone
    assert net.embed.num_embeddings == K
    features = torch.randn(2, C, 4, 4)
    for renoise in ("free", "fresh"):
        traj = refine(net, process, features, 5, renoise, generator=torch.Generator().manual_seed(0))
        assert traj.times == [10, 8, 6, 4, 2]
        assert all(l.shape == (2, K, 4, 4) and torch.isfinite(l).all() for l in traj.logits)
    with pytest.raises(NotImplementedError, match="no posterior step"):
        refine(net, process, features, 5, "posterior")


def test_an_unknown_process_is_a_one_line_error_listing_the_names():
    with pytest.raises(ConfigError, match=r"^unknown diffusion kind 'gauss'; choose from: bits, discrete$"):
        create_process("gauss", K, T)
    with pytest.raises(ConfigError, match=r"diffusion.kind='gauss'.*choose from: bits, discrete$"):
        resolve("smoke", overrides={"diffusion.kind": "gauss"})
    with pytest.raises(ValueError, match="registered already"):
        register_process("discrete", KeepOrRedraw)


def test_the_discrete_process_may_diffuse_over_more_states_than_classes():
    """Published DDPS checkpoints diffuse over 151 states for 150 classes: the extra state is a real one
    that no class maps to; the denoiser's embedding follows the process's state count."""
    cfg = resolve("smoke", overrides={"diffusion.steps": T, "train.loss": "hybrid"})
    wide = create_process("discrete", K, T, num_states=K + 1)
    assert (wide.num_states, wide.num_categories, wide.mask_index) == (K + 1, K + 1, None)
    torch.testing.assert_close(wide.stationary(), torch.full((K + 1,), 1 / (K + 1), dtype=torch.float64))
    net, parts = _train_step(cfg, wide)
    assert net.embed.num_embeddings == K + 1 and parts["vlb"] >= 0
    traj = refine(net, wide, torch.randn(2, C, 4, 4), 5, "posterior", generator=torch.Generator().manual_seed(0))
    assert traj.final.shape == (2, K, 4, 4) and torch.isfinite(traj.final).all()
    masked = MaskDiffusion(K, T, transition="uniform+mask", num_states=K + 2)
    assert (masked.num_categories, masked.mask_index) == (K + 1, K + 1)
    default = MaskDiffusion(K, T, transition="uniform+mask")
    assert torch.equal(MaskDiffusion(K, T, transition="uniform+mask", num_states=K + 1).cumulative_matrices,
                       default.cumulative_matrices)
    with pytest.raises(ConfigError, match="num_states=5 is out of range: >= 6"):
        MaskDiffusion(K, T, transition="mask", num_states=K)


def test_the_built_in_processes_are_registered_and_the_registry_needs_no_torch():
    assert {"discrete", "bits"} <= set(PROCESSES)
    for name, mask_input in (("discrete", "embed"), ("bits", "bits")):
        process = create_process(name, K, T, transition="uniform", schedule="linear", bit_scale=0.1)
        assert isinstance(process, NoiseProcess) and process.mask_input.mask_input == mask_input
    code = "import sys, ddps.config, ddps.diffusion\nassert 'torch' not in sys.modules\nprint('clean')\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "clean" in out.stdout, out.stderr
