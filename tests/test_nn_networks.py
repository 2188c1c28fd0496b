import pytest
import torch
import torch.nn.functional as F

from xrayforge.nn import Discriminator, Generator, NetworkConfig, load_networks, save_networks
from xrayforge.nn.networks import largest_group_size

TINY = NetworkConfig(resolution=32, latent_dim=16, fmap_base=128, fmap_max=16)


def nets(cfg=TINY, seed=0):
    torch.manual_seed(seed)
    return Generator(cfg), Discriminator(cfg)


def test_default_channel_schedule_is_the_papers():
    cfg = NetworkConfig()
    assert [cfg.channels_at(lv) for lv in range(cfg.num_levels)] == [512, 512, 512, 512, 256, 128, 64, 32, 16]
    assert cfg.num_levels == 9 and cfg.resolution_at(8) == 1024


@pytest.mark.parametrize("channels", [1, 3])
def test_output_shapes_at_every_level_and_alpha(channels):
    cfg = NetworkConfig(resolution=32, latent_dim=16, fmap_base=128, fmap_max=16, image_channels=channels)
    g, d = nets(cfg)
    for level in range(cfg.num_levels):
        for alpha in (0.0, 0.3, 1.0):
            img = g(torch.randn(4, 16), level, alpha)
            assert img.shape == (4, channels, 4 << level, 4 << level)
            assert d(img, level, alpha).shape == (4, 1)


def test_level_state_and_bad_arguments():
    g, d = nets()
    g.set_level(2, 0.25)
    assert g(torch.randn(2, 16)).shape == (2, 1, 16, 16)
    assert g.current_resolution == 16
    with pytest.raises(ValueError, match="level must be in"):
        g.set_level(4)
    with pytest.raises(ValueError, match="alpha must be in"):
        g.set_level(1, 1.5)
    with pytest.raises(ValueError, match=r"latents of shape \(N, 16\)"):
        g(torch.randn(2, 8))
    with pytest.raises(ValueError, match=r"expected images of shape \(N, 1, 32, 32\)"):
        d(torch.randn(2, 1, 16, 16))
    with pytest.raises(ValueError, match="power of two"):
        NetworkConfig(resolution=48)
    with pytest.raises(ValueError, match="channels has 2 entries"):
        NetworkConfig(resolution=32, channels=[4, 4])


def test_fade_in_endpoints_generator():
    g, _ = nets()
    z = torch.randn(3, 16)
    for level in range(1, TINY.num_levels):
        old = F.interpolate(g(z, level - 1, 1.0), scale_factor=2.0, mode="nearest")
        torch.testing.assert_close(g(z, level, 0.0), old)
        x, _ = g.features(z, level)
        torch.testing.assert_close(g(z, level, 1.0), g.to_rgb[level](x))
        # a tensor alpha always blends; at 1 it equals the new path
        torch.testing.assert_close(g(z, level, torch.tensor(1.0)), g(z, level, 1.0))


def test_fade_in_endpoints_discriminator():
    g, d = nets()
    for level in range(1, TINY.num_levels):
        img = torch.randn(4, 1, 4 << level, 4 << level)
        torch.testing.assert_close(d(img, level, 0.0), d(F.avg_pool2d(img, 2), level - 1, 1.0))
        mid = d(img, level, 0.5)
        assert not torch.allclose(mid, d(img, level, 1.0))


def test_fused_and_plain_networks_agree():
    cfg_fused = NetworkConfig(resolution=32, latent_dim=16, fmap_base=128, fmap_max=16, fused_resample_min_res=8)
    cfg_plain = NetworkConfig(resolution=32, latent_dim=16, fmap_base=128, fmap_max=16, fused_resample_min_res=10 ** 6)
    gf, df = nets(cfg_fused)
    gp, dp = nets(cfg_plain)
    gp.load_state_dict(gf.state_dict())
    dp.load_state_dict(df.state_dict())
    assert gf.blocks[1][0].fused and not gp.blocks[1][0].fused
    z = torch.randn(4, 16)
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 0.15)):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            a, b = gf(z, 3, 0.5), gp(z, 3, 0.5)
            torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol)
            torch.testing.assert_close(df(a, 3, 0.5).float(), dp(a, 3, 0.5).float(), rtol=tol, atol=tol)


def test_channels_last_and_bf16_autocast():
    g, d = nets()
    g_cl, d_cl = g.to(memory_format=torch.channels_last), d.to(memory_format=torch.channels_last)
    z = torch.randn(4, 16)
    ref = d(g(z))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        img = g_cl(z)
        score = d_cl(img.contiguous(memory_format=torch.channels_last))
    assert img.dtype == torch.bfloat16 and torch.isfinite(score).all()
    torch.testing.assert_close(score.float(), ref, rtol=0.2, atol=0.2)


def wgan_gp_penalty(d, real, fake, level=None, alpha=None):
    eps = torch.rand(real.shape[0], 1, 1, 1, dtype=real.dtype)
    mix = (real + (fake - real) * eps).requires_grad_(True)
    (grad,) = torch.autograd.grad(d(mix, level, alpha).sum(), mix, create_graph=True)
    return ((grad.flatten(1).norm(dim=1) - 1) ** 2).mean()


def test_gradgradcheck_through_a_tiny_discriminator():
    cfg = NetworkConfig(resolution=8, latent_dim=4, channels=[3, 2], mbstd_group_size=2)
    torch.manual_seed(0)
    d = Discriminator(cfg).double()
    d.set_level(1, 0.5)
    img = torch.randn(4, 1, 8, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: d(x), (img,))
    assert torch.autograd.gradgradcheck(lambda x: d(x), (img,))


def test_gradient_penalty_reaches_every_discriminator_weight():
    # Biases behind the last smooth nonlinearity only move leaky-ReLU masks, which are piecewise
    # constant, so the penalty's gradient reaches them as zero; every weight must get a gradient.
    g, d = nets()
    real = torch.randn(4, 1, 32, 32)
    fake = g(torch.randn(4, 16)).detach()
    wgan_gp_penalty(d, real, fake, 3, 0.5).backward()
    for name, p in d.named_parameters():
        if name.endswith("weight") and (not name.startswith("from_rgb") or name.split(".")[1] in ("2", "3")):
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_activation_checkpointing_gives_the_same_gradients():
    cfg_ck = NetworkConfig(resolution=32, latent_dim=16, fmap_base=128, fmap_max=16, checkpoint_min_res=16)
    g, d = nets()
    gc, dc = nets(cfg_ck)
    gc.load_state_dict(g.state_dict())
    dc.load_state_dict(d.state_dict())
    z, real = torch.randn(4, 16), torch.randn(4, 1, 32, 32)
    grads = []
    for gg, dd in ((g, d), (gc, dc)):
        torch.manual_seed(1)
        loss = dd(gg(z)).mean() + 10 * wgan_gp_penalty(dd, real, gg(z).detach())
        grads.append(torch.autograd.grad(loss, list(gg.parameters()) + list(dd.parameters()), allow_unused=True))
    for a, b in zip(*grads):
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_torch_compile_runs_the_networks():
    torch._dynamo.reset()
    g, d = nets()
    step = torch.compile(lambda z, a: d(g(z, 3, a), 3, a), backend="aot_eager")
    z, a = torch.randn(4, 16), torch.tensor(0.5)
    torch.testing.assert_close(step(z, a), d(g(z, 3, a), 3, a))


def test_largest_group_size():
    assert [largest_group_size(n, 4) for n in (1, 2, 3, 4, 6, 9, 14, 16)] == [1, 2, 3, 4, 3, 3, 2, 4]


def test_checkpoint_round_trip(tmp_path):
    g, d = nets()
    g.set_level(2, 0.4)
    save_networks(tmp_path / "ck", {"G": g, "D": d, "G_ema": g})
    assert not list((tmp_path / "ck").glob("*.tmp"))
    torch.load(tmp_path / "ck" / "networks.pt", weights_only=True)  # plain tensors only
    loaded = load_networks(tmp_path / "ck")
    assert set(loaded) == {"G", "D", "G_ema"}
    assert loaded["G"].level == 2 and float(loaded["G"].alpha) == pytest.approx(0.4)
    z = torch.randn(2, 16)
    torch.testing.assert_close(loaded["G"](z), g(z))
    with pytest.raises(ValueError, match="no network named"):
        load_networks(tmp_path / "ck", names=["H"])
    with pytest.raises(FileNotFoundError, match="networks.json"):
        load_networks(tmp_path)
    (tmp_path / "ck" / "networks.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_networks(tmp_path / "ck")



@pytest.mark.gpu
def test_load_networks_puts_them_on_the_asked_device(tmp_path):
    """map_location moves the networks, not only the loaded tensors (sampling on a GPU once
    failed with G's weights left on the CPU)."""
    cfg = NetworkConfig(resolution=8, fmap_max=8)
    save_networks(tmp_path / "ck", {"G_ema": Generator(cfg), "D": Discriminator(cfg)})
    G = load_networks(tmp_path / "ck", names=["G_ema"], map_location="cuda")["G_ema"]
    assert {p.device.type for p in G.parameters()} == {"cuda"}
    assert G(torch.randn(2, cfg.latent_dim, device="cuda")).is_cuda


# ------------------------------------------------------------------ the official network, by hand
# Karras et al.'s TF code (networks.py, G_paper / D_paper) written out in plain PyTorch from the
# modules' stored parameters: weights N(0, 1) scaled at run time by gain / sqrt(fan_in) (√2; √2/4 for
# G's dense, 1 for toRGB and D's last dense), biases unscaled; pixel norm after the latent, the dense
# layer and every conv; nearest ×2 up before a conv; D's conv + 2×2 average before bias and leaky
# ReLU (fused_scale=True); minibatch stddev over strided groups of min(4, N), biased variance.
def _official_lrelu(x):
    return torch.maximum(x, 0.2 * x)


def _official_pn(x):
    return x * torch.rsqrt(x.square().mean(dim=1, keepdim=True) + 1e-8)


def _official_w(w, gain=2 ** 0.5):
    return w * gain / w[0].numel() ** 0.5


def _official_conv(x, w, b, gain=2 ** 0.5):
    return F.conv2d(x, _official_w(w, gain), padding=w.shape[-1] // 2) + b.view(1, -1, 1, 1)


def _official_up(x):
    return x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)


def official_generator(p, z, level, alpha, c0):
    x = _official_pn(z) @ _official_w(p["dense.weight"], 2 ** 0.5 / 4).t()
    x = _official_pn(_official_lrelu(x.view(z.shape[0], c0, 4, 4) + p["dense_bias"].view(1, -1, 1, 1)))
    x = _official_pn(_official_lrelu(_official_conv(x, p["conv0.weight"], p["conv0.bias"])))
    prev = None
    for lv in range(1, level + 1):
        prev, x = x, _official_up(x)
        for i in (0, 1):
            x = _official_pn(_official_lrelu(_official_conv(x, p[f"blocks.{lv}.{i}.weight"], p[f"blocks.{lv}.{i}.bias"])))
    img = _official_conv(x, p[f"to_rgb.{level}.weight"], p[f"to_rgb.{level}.bias"], 1.0)
    if level == 0:
        return img
    old = _official_up(_official_conv(prev, p[f"to_rgb.{level - 1}.weight"], p[f"to_rgb.{level - 1}.bias"], 1.0))
    return old + (img - old) * alpha


def official_mbstd(x, group_size):
    n, c, h, w = x.shape
    y = x.reshape(group_size, -1, c, h, w)                     # [G, M, C, H, W]: sample i in group i % M
    y = ((y - y.mean(dim=0)).square().mean(dim=0) + 1e-8).sqrt().mean(dim=(1, 2, 3))
    return torch.cat([x, y.view(-1, 1, 1, 1).repeat(group_size, 1, h, w)], dim=1)


def official_discriminator(p, img, level, alpha, group_size):
    def from_rgb(i, lv):
        return _official_lrelu(_official_conv(i, p[f"from_rgb.{lv}.weight"], p[f"from_rgb.{lv}.bias"]))

    x = from_rgb(img, level)
    for lv in range(level, 0, -1):
        x = _official_lrelu(_official_conv(x, p[f"blocks.{lv}.conv.weight"], p[f"blocks.{lv}.conv.bias"]))
        w = p[f"blocks.{lv}.conv_down.weight"]
        x = F.avg_pool2d(F.conv2d(x, _official_w(w), padding=1), 2)
        x = _official_lrelu(x + p[f"blocks.{lv}.conv_down.bias"].view(1, -1, 1, 1))
        if lv == level:
            old = from_rgb(F.avg_pool2d(img, 2), level - 1)
            x = old + (x - old) * alpha
    x = _official_lrelu(_official_conv(official_mbstd(x, group_size), p["final_conv.weight"], p["final_conv.bias"]))
    x = _official_lrelu(x.flatten(1) @ _official_w(p["final_dense.weight"]).t() + p["final_dense.bias"])
    return x @ _official_w(p["out.weight"], 1.0).t() + p["out.bias"]


@pytest.mark.parametrize("fused_min", [8, 10 ** 6], ids=["fused", "plain"])
def test_networks_compute_the_official_formulas(fused_min):
    """G and D against the official network written out by hand, in float64, at every level and at
    fade-in α 0, 0.25 and 1, with random biases; D at batches 8, 4, 2 and 1 (groups of 4, 4, 2, 1) and
    6 (not divisible by 4: the largest group size <= 4 that divides it, 3)."""
    cfg = NetworkConfig(resolution=16, latent_dim=8, fmap_base=32, fmap_max=8, fused_resample_min_res=fused_min)
    g, d = nets(cfg)
    g, d = g.double(), d.double()
    with torch.no_grad():
        for p in list(g.parameters()) + list(d.parameters()):
            if p.dim() == 1:
                p.normal_(0, 0.3)
    pg, pd = dict(g.named_parameters()), dict(d.named_parameters())
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(8, 8, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        for level in range(cfg.num_levels):
            for alpha in (0.0, 0.25, 1.0):
                torch.testing.assert_close(g(z, level, alpha), official_generator(pg, z, level, alpha, 8),
                                           rtol=1e-10, atol=1e-10)
                for n, group in ((8, 4), (4, 4), (2, 2), (1, 1), (6, 3)):
                    img = torch.randn(n, 1, 4 << level, 4 << level, generator=gen, dtype=torch.float64)
                    torch.testing.assert_close(d(img, level, alpha), official_discriminator(pd, img, level, alpha, group),
                                               rtol=1e-10, atol=1e-10)
