import copy
import dataclasses

import pytest
import torch

from xrayforge.nn import Discriminator, Generator, NetworkConfig
from xrayforge.nn.layers import EqualizedConv2d
from xrayforge.train import PGGANStep, StepConfig, discriminator_loss, ema_update, gradient_penalty, losses, make_adam

TINY = NetworkConfig(resolution=16, latent_dim=8, fmap_base=64, fmap_max=8)


class LinearCritic(torch.nn.Module):
    def __init__(self, w):
        super().__init__()
        self.w = torch.nn.Parameter(w)

    def forward(self, x, level=None, alpha=None):
        return (x * self.w).flatten(1).sum(1, keepdim=True)


def test_gradient_penalty_of_a_linear_critic():
    w = torch.full((1, 2, 2), 0.25)  # |grad| = |w| = 0.5 everywhere -> (0.5 - 1)^2
    d = LinearCritic(w)
    gp = gradient_penalty(d, torch.randn(3, 1, 2, 2), torch.randn(3, 1, 2, 2))
    assert gp.item() == pytest.approx(0.25)
    gp.backward()  # d/dw (|w| - 1)^2 = 2 (|w| - 1) w / |w|
    torch.testing.assert_close(d.w.grad, 2 * (0.5 - 1) * w / 0.5)


def test_discriminator_loss_formula():
    real, fake = torch.tensor([[1.0], [3.0]]), torch.tensor([[-1.0], [0.0]])
    loss = discriminator_loss(real, fake, torch.tensor(0.5), gp_weight=10, drift=0.001)
    assert loss.item() == pytest.approx(-0.5 - 2.0 + 5.0 + 0.001 * 5.0)


def test_adam_settings():
    opt = make_adam([torch.nn.Parameter(torch.zeros(2))])
    group = opt.param_groups[0]
    assert group["lr"] == 1e-3 and group["betas"] == (0.0, 0.99) and group["eps"] == 1e-8


def test_ema_update():
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    expected = [0.9 * pa + 0.1 * pb for pa, pb in zip(a.parameters(), b.parameters())]
    a.level = b.level = 0
    b._alpha_value = 1.0
    ema_update(a, b, beta=0.9)
    for p, e in zip(a.parameters(), expected):
        torch.testing.assert_close(p, e)


@pytest.mark.parametrize("amp", [None, torch.bfloat16])
@pytest.mark.parametrize("accumulation", [1, 2])
def test_step_updates_both_networks_and_the_ema(amp, accumulation):
    torch.manual_seed(0)
    G, D = Generator(TINY), Discriminator(TINY)
    G_ema = copy.deepcopy(G)
    before = {n: copy.deepcopy(m.state_dict()) for n, m in (("G", G), ("D", D), ("E", G_ema))}
    step = PGGANStep(G, D, G_ema, make_adam(G.parameters()), make_adam(D.parameters()),
                     StepConfig(amp_dtype=amp, accumulation=accumulation))
    out = step(torch.randn(8, 1, 16, 16), 2, 0.5)
    assert set(out) >= {"d_loss", "g_loss", "gp", "real_score", "fake_score"}
    assert all(torch.isfinite(v) for v in out.values())
    for name, net in (("G", G), ("D", D), ("E", G_ema)):
        changed = [k for k, v in net.state_dict().items() if not torch.equal(v, before[name][k])]
        assert changed, name
    assert all(p.requires_grad for p in D.parameters())
    # EMA moved 0.1% of the way towards G
    k = "conv0.weight"
    torch.testing.assert_close(G_ema.state_dict()[k], before["E"][k] + 0.001 * (G.state_dict()[k] - before["E"][k]))


@pytest.mark.parametrize("mode", ["official", "gan_zoo"])
def test_accumulation_takes_the_full_batch_step(monkeypatch, mode):
    """Two micro-batches of 4 accumulate to the step on the batch of 8, given the same latents and
    gradient-penalty mixing factors: the minibatch-stddev groups are strided ({0, 2, 4, 6} and
    {1, 3, 5, 7} at 8), so micro-batch k takes samples k, k + 2, ... and keeps each group whole
    (consecutive chunks {0..3}, {4..7} regrouped them and moved D's weights by up to 2 lr); a
    pytorch_GAN_zoo D groups consecutive samples, so there the micro-batches are consecutive."""
    net = dataclasses.replace(TINY, mbstd_mode=mode)
    g = torch.Generator().manual_seed(0)
    real = torch.randn(8, 1, 16, 16, generator=g, dtype=torch.float64)
    z_d, z_g = (torch.randn(8, TINY.latent_dim, generator=g, dtype=torch.float64) for _ in range(2))
    u = torch.rand(8, generator=g, dtype=torch.float64)

    def trained(accumulation):
        torch.manual_seed(1)
        G, D = Generator(net).double(), Discriminator(net).double()
        step = PGGANStep(G, D, copy.deepcopy(G), make_adam(G.parameters()), make_adam(D.parameters()),
                         StepConfig(accumulation=accumulation))
        parts = [slice(k, None, accumulation) if mode == "official" else slice(k * 8 // accumulation,
                                                                              (k + 1) * 8 // accumulation)
                 for k in range(accumulation)]  # each micro-batch's samples
        latents = iter([z_d[p] for p in parts] + [z_g[p] for p in parts])
        mixing = iter([u[p].view(-1, 1, 1, 1) for p in parts])
        step._latents = lambda n, device, generator: next(latents)
        with monkeypatch.context() as m:
            m.setattr(losses.torch, "rand", lambda *shape, **kwargs: next(mixing))
            out = step(real, 2, 0.5)
        return G, D, out

    G1, D1, out1 = trained(1)
    G2, D2, out2 = trained(2)
    for k in ("d_loss", "g_loss", "gp", "real_score", "fake_score"):  # what is logged: the full batch's
        torch.testing.assert_close(out2[k].double(), out1[k].double(), rtol=1e-6, atol=1e-6, msg=k)
    for one, two in ((G1, G2), (D1, D2)):
        for (name, a), b in zip(one.named_parameters(), two.parameters()):
            torch.testing.assert_close(b, a, rtol=0, atol=1e-12, msg=name)


@pytest.mark.gpu
@pytest.mark.parametrize("alpha", [0.5, 1.0], ids=["fade-in", "stable"])
@pytest.mark.parametrize("amp", [None, torch.bfloat16], ids=["fp32", "bf16"])
def test_a_training_step_never_waits_for_the_gpu(alpha, amp):
    """No step waits for the GPU in the ways PyTorch's sync debug mode sees (a value read back,
    a blocking copy, a stream or device synchronize; 'error' raises on any), so the CPU queues the
    next step's kernels while the GPU runs this one. A float α passed to the networks used to
    become torch.tensor(α, device=...), a blocking host copy on every call; the trainer made its
    fade-in α the same way. channels_last and the fused conv2d_eqlr kernel, as training runs them."""
    dev = torch.device("cuda")
    cfg = NetworkConfig(resolution=32, latent_dim=16, fmap_base=64, fmap_max=16)
    G = Generator(cfg).to(dev).to(memory_format=torch.channels_last)
    D = Discriminator(cfg).to(dev).to(memory_format=torch.channels_last)
    for m in list(G.modules()) + list(D.modules()):
        if isinstance(m, EqualizedConv2d) and m.kernel_size == 3:
            m.eqlr_backend = "triton"
    G_ema = copy.deepcopy(G)
    step = PGGANStep(G, D, G_ema, make_adam(G.parameters()), make_adam(D.parameters()), StepConfig(amp_dtype=amp))
    gen = torch.Generator(dev).manual_seed(0)
    real = torch.randn(8, 1, 32, 32, device=dev).contiguous(memory_format=torch.channels_last)
    level = cfg.num_levels - 1

    def one(tensor_alpha):
        a = torch.full((), alpha, device=dev) if tensor_alpha else alpha  # the trainer's and a user's form
        return step(real, level, a, gen, ema_beta=0.99)

    one(True), one(False)  # first calls compile kernels and set up the optimisers' state
    torch.cuda.synchronize()
    before = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = [one(True), one(False)]
    finally:
        torch.cuda.set_sync_debug_mode(before)
    assert all(torch.isfinite(o["d_loss"]) and torch.isfinite(o["g_loss"]) for o in out)
