"""pytorch_GAN_zoo checkpoints: their forward pass, reimplemented here from their published
formulas, on random weights with their key names, against our converted networks."""
import math
import os

import pytest
import torch
import torch.nn.functional as F

from xrayforge.nn import load_pytorch_gan_zoo

DEPTHS = [16, 16, 8, 4]  # 4, 8, 16, 32 px
LATENT = 12


class FakeBaseConfig:
    """Stands for their models.utils.config.BaseConfig; never imported by the loader."""

    def __init__(self, alpha, **settings):
        self.alpha = alpha
        self.depthScale0 = DEPTHS[0]
        self.lossCriterion, self.leakyReluLeak = "WGANGP", 0.2  # as their PGGAN configs write them
        self.perChannelNormalization = self.equalizedlR = True
        self.__dict__.update(settings)


class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# ------------------------------------------------------------------ their formulas
def he(w):
    return math.sqrt(2.0 / w[0].numel())


def layer(x, sd, name, conv_padding=None):
    w, b = sd[f"{name}.module.weight"], sd[f"{name}.module.bias"]
    y = F.linear(x, w, b) if conv_padding is None else F.conv2d(x, w, b, padding=conv_padding)
    return y * he(w)  # ConstrainedLayer: the output, bias included, times He's constant


def pn(x):
    return x * ((x ** 2).mean(dim=1, keepdim=True) + 1e-8).rsqrt()


def up(x):
    return x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)


def lrelu(x):
    return F.leaky_relu(x, 0.2)


def zoo_generator(sd, z, alpha):
    n_scales = len(DEPTHS) - 1
    x = lrelu(layer(pn(z), sd, "formatLayer")).view(z.shape[0], -1, 4, 4)
    x = pn(x)
    x = pn(lrelu(layer(x, sd, "groupScale0.0", 1)))
    y = None
    if alpha > 0 and n_scales == 1:
        y = up(layer(x, sd, "toRGBLayers.0", 0))
    for s in range(n_scales):
        x = up(x)
        for i in (0, 1):
            x = pn(lrelu(layer(x, sd, f"scaleLayers.{s}.{i}", 1)))
        if alpha > 0 and s == n_scales - 2:
            y = up(layer(x, sd, f"toRGBLayers.{n_scales - 1}", 0))
    x = layer(x, sd, f"toRGBLayers.{n_scales}", 0)
    return alpha * y + (1 - alpha) * x if alpha > 0 else x


def zoo_mbstd(x, group=4):
    n, c, h, w = x.shape
    g = min(n, group)
    if n % g:
        g = n
    std = torch.sqrt(x.view(-1, g, c, h, w).var(dim=1) + 1e-8).view(n // g, -1).mean(dim=1)
    return torch.cat([x, std.repeat_interleave(g).view(n, 1, 1, 1).expand(n, 1, h, w)], dim=1)


def zoo_discriminator(sd, x, alpha):
    n_scales = len(DEPTHS) - 1
    y = lrelu(layer(F.avg_pool2d(x, 2), sd, f"fromRGBLayers.{n_scales - 1}", 0)) if alpha > 0 else None
    x = lrelu(layer(x, sd, f"fromRGBLayers.{n_scales}", 0))
    merge = alpha > 0 and n_scales > 1
    for s in reversed(range(n_scales)):
        for i in (0, 1):
            x = lrelu(layer(x, sd, f"scaleLayers.{s}.{i}", 1))
        x = F.avg_pool2d(x, 2)
        if merge:
            merge = False
            x = alpha * y + (1 - alpha) * x
    x = lrelu(layer(zoo_mbstd(x), sd, "groupScaleZero.0", 1))
    x = lrelu(layer(x.flatten(1), sd, "groupScaleZero.1"))
    return layer(x, sd, "decisionLayer")


def random_state_dicts(channels, seed=0, dtype=torch.float32):
    """Their key names and shapes; weights N(0, 1) as they store them, small random biases."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        t = torch.randn(*shape, generator=g, dtype=torch.float64)
        return (t if len(shape) > 1 else 0.1 * t).to(dtype)

    sd_g = {"formatLayer.module.weight": r(16 * DEPTHS[0], LATENT), "formatLayer.module.bias": r(16 * DEPTHS[0]),
            "groupScale0.0.module.weight": r(DEPTHS[0], DEPTHS[0], 3, 3), "groupScale0.0.module.bias": r(DEPTHS[0])}
    sd_d = {"groupScaleZero.0.module.weight": r(DEPTHS[0], DEPTHS[0] + 1, 3, 3),
            "groupScaleZero.0.module.bias": r(DEPTHS[0]),
            "groupScaleZero.1.module.weight": r(DEPTHS[0], DEPTHS[0] * 16), "groupScaleZero.1.module.bias": r(DEPTHS[0]),
            "decisionLayer.module.weight": r(1, DEPTHS[0]), "decisionLayer.module.bias": r(1)}
    for i, depth in enumerate(DEPTHS):
        sd_g[f"toRGBLayers.{i}.module.weight"] = r(channels, depth, 1, 1)
        sd_g[f"toRGBLayers.{i}.module.bias"] = r(channels)
        sd_d[f"fromRGBLayers.{i}.module.weight"] = r(depth, channels, 1, 1)
        sd_d[f"fromRGBLayers.{i}.module.bias"] = r(depth)
        if i:
            last = DEPTHS[i - 1]
            sd_g[f"scaleLayers.{i - 1}.0.module.weight"] = r(depth, last, 3, 3)
            sd_g[f"scaleLayers.{i - 1}.1.module.weight"] = r(depth, depth, 3, 3)
            sd_d[f"scaleLayers.{i - 1}.0.module.weight"] = r(depth, depth, 3, 3)
            sd_d[f"scaleLayers.{i - 1}.1.module.weight"] = r(last, depth, 3, 3)
            for j in (0, 1):
                sd_g[f"scaleLayers.{i - 1}.{j}.module.bias"] = r(depth)
            sd_d[f"scaleLayers.{i - 1}.0.module.bias"] = r(depth)
            sd_d[f"scaleLayers.{i - 1}.1.module.bias"] = r(last)
    return sd_g, sd_d


def _save(tmp_path, channels, their_alpha, dtype):
    sd_g, sd_d = random_state_dicts(channels, dtype=dtype)
    sd_avg = {k: v * 0.5 for k, v in sd_g.items()}
    path = tmp_path / "zoo.pt"
    torch.save({"netG": sd_g, "netD": sd_d, "avgG": sd_avg, "config": FakeBaseConfig(their_alpha)}, path)
    return path, sd_g, sd_d, sd_avg


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("their_alpha", [0.0, 0.35])
def test_conversion_is_exact_in_float64(tmp_path, channels, their_alpha):
    path, sd_g, sd_d, sd_avg = _save(tmp_path, channels, their_alpha, torch.float64)
    nets = load_pytorch_gan_zoo(path)
    assert set(nets) == {"G", "D", "G_ema"}
    assert nets["G"].level == 3 and float(nets["G"].alpha) == pytest.approx(1 - their_alpha)
    z = torch.randn(8, LATENT, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    img = torch.randn(8, channels, 32, 32, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    with torch.no_grad():
        ours = nets["G"](z)
        assert ours.shape == (8, channels, 32, 32) and ours.dtype == torch.float64
        torch.testing.assert_close(ours, zoo_generator(sd_g, z, their_alpha), rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(nets["G_ema"](z), zoo_generator(sd_avg, z, their_alpha), rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(nets["D"](img), zoo_discriminator(sd_d, img, their_alpha), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_float32_matches_within_their_own_rounding(tmp_path, seed):
    """In fp32 their network itself is off its exact (float64) value by up to ~1e-4 on random
    weights (pixel norm amplifies rounding), so the check is the op contract's: our fp32 error
    against the exact result is at most twice theirs."""
    path, sd_g, sd_d, _ = _save(tmp_path, 1, 0.35, torch.float32)
    nets = load_pytorch_gan_zoo(path)
    g = torch.Generator().manual_seed(seed)
    z, img = torch.randn(8, LATENT, generator=g), torch.randn(8, 1, 32, 32, generator=g)
    exact_g = {k: v.double() for k, v in sd_g.items()}
    exact_d = {k: v.double() for k, v in sd_d.items()}
    with torch.no_grad():
        for ours, theirs, exact in (
            (nets["G"](z), zoo_generator(sd_g, z, 0.35), zoo_generator(exact_g, z.double(), 0.35)),
            (nets["D"](img), zoo_discriminator(sd_d, img, 0.35), zoo_discriminator(exact_d, img.double(), 0.35)),
        ):
            err, their_err = (ours.double() - exact).abs().max(), (theirs.double() - exact).abs().max()
            assert err <= 2 * their_err + 1e-6, (err, their_err)


@pytest.mark.parametrize("data_parallel", [False, True])
def test_first_release_key_names_load(tmp_path, data_parallel):
    """Their first release's ConstrainedLayer.state_dict wrote 'formatLayer.weight' where the current
    code writes 'formatLayer.module.weight'; their loadStateDictCompatible reads both, so such a
    checkpoint is theirs and converts to the same networks (it was refused as missing a weight)."""
    sd_g, sd_d = random_state_dicts(1, dtype=torch.float64)
    prefix = "module." if data_parallel else ""

    def legacy(sd):
        return {prefix + k.replace(".module.", "."): v for k, v in sd.items()}

    torch.save({"netG": sd_g, "netD": sd_d, "avgG": sd_g, "config": {"alpha": 0.35}}, tmp_path / "new.pt")
    torch.save({"netG": legacy(sd_g), "netD": legacy(sd_d), "avgG": legacy(sd_g), "config": {"alpha": 0.35}},
               tmp_path / "old.pt")
    new, old = load_pytorch_gan_zoo(tmp_path / "new.pt"), load_pytorch_gan_zoo(tmp_path / "old.pt")
    z = torch.randn(4, LATENT, dtype=torch.float64)
    img = torch.randn(4, 1, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(old["G"](z), zoo_generator(sd_g, z, 0.35), rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(old["G_ema"](z), new["G_ema"](z), rtol=0, atol=0)
        torch.testing.assert_close(old["D"](img), zoo_discriminator(sd_d, img, 0.35), rtol=1e-10, atol=1e-10)


def test_the_config_entry_is_not_run_as_code(tmp_path):
    marker = tmp_path / "pwned"
    sd_g, sd_d = random_state_dicts(1)
    path = tmp_path / "evil.pt"
    torch.save({"netG": sd_g, "netD": sd_d, "config": Evil(marker)}, path)
    nets = load_pytorch_gan_zoo(path)
    assert not marker.exists()
    assert set(nets) == {"G", "D"}


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such"):
        load_pytorch_gan_zoo(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable torch checkpoint"):
        load_pytorch_gan_zoo(tmp_path / "junk.pt")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="expected netG, netD"):
        load_pytorch_gan_zoo(tmp_path / "other.pt")
    sd_g, sd_d = random_state_dicts(1)
    del sd_g["scaleLayers.1.0.module.bias"]
    torch.save({"netG": sd_g, "netD": sd_d}, tmp_path / "broken.pt")
    with pytest.raises(ValueError, match="missing weight"):
        load_pytorch_gan_zoo(tmp_path / "broken.pt")


@pytest.mark.parametrize("setting, value, said", [("lossCriterion", "DCGAN", "tanh"), ("lossCriterion", "MSE", "tanh"),
                                                  ("generationActivation", "tanh", "activation on G's output"),
                                                  ("leakyReluLeak", 0.1, "slope"),
                                                  ("perChannelNormalization", False, "pixel norm"),
                                                  ("equalizedlR", False, "He-constant")])
def test_settings_the_conversion_does_not_reproduce_are_refused(tmp_path, setting, value, said):
    """Their DCGAN / MSE losses put G's output through tanh, and other slopes, no pixel norm or no
    equalized learning rate change every layer: such a checkpoint loaded without a word generated
    other images than theirs."""
    sd_g, sd_d = random_state_dicts(1)
    torch.save({"netG": sd_g, "netD": sd_d, "config": FakeBaseConfig(0.0, **{setting: value})}, tmp_path / "z.pt")
    with pytest.raises(ValueError, match=f"z.pt: trained with {setting} = {value!r}; only .*{said}"):
        load_pytorch_gan_zoo(tmp_path / "z.pt")
    torch.save({"netG": sd_g, "netD": sd_d, "config": {"alpha": 0.0, setting: value}}, tmp_path / "d.pt")
    with pytest.raises(ValueError, match=f"trained with {setting}"):
        load_pytorch_gan_zoo(tmp_path / "d.pt")


def test_a_logistic_loss_checkpoint_loads(tmp_path):
    """Their Logistic loss, like WGANGP, has no output activation: nothing the conversion misses."""
    sd_g, sd_d = random_state_dicts(1)
    torch.save({"netG": sd_g, "netD": sd_d, "config": FakeBaseConfig(0.0, lossCriterion="Logistic",
                                                                     generationActivation=None)}, tmp_path / "l.pt")
    assert set(load_pytorch_gan_zoo(tmp_path / "l.pt")) == {"G", "D"}


def test_settings_left_none_in_their_config_count_as_unset(tmp_path):
    sd_g, sd_d = random_state_dicts(1)
    config = {"alpha": 0.0, "lossCriterion": None, "leakyReluLeak": None, "equalizedlR": None,
              "perChannelNormalization": None, "generationActivation": None}
    torch.save({"netG": sd_g, "netD": sd_d, "config": config}, tmp_path / "n.pt")
    assert set(load_pytorch_gan_zoo(tmp_path / "n.pt")) == {"G", "D"}


def _save_dicts(tmp_path, name, sd_g, sd_d, **extra):
    path = tmp_path / name
    torch.save({"netG": sd_g, "netD": sd_d, **extra}, path)
    return path


@pytest.mark.parametrize("net, key, shape", [
    ("netG", "scaleLayers.1.0.module.weight", (8, 1, 3, 3)),    # broadcast by copy_: loaded as other weights
    ("netG", "scaleLayers.1.0.module.bias", (1,)),
    ("netG", "toRGBLayers.2.module.weight", (3, 8, 1, 1)),      # a RuntimeError of copy_, naming no file
    ("netD", "fromRGBLayers.3.module.weight", (5, 1, 1, 1)),
    ("avgG", "formatLayer.module.bias", (1,)),
])
def test_a_weight_of_another_shape_is_refused_by_file_and_name(tmp_path, net, key, shape):
    import re

    sd_g, sd_d = random_state_dicts(1)
    sds = {"netG": sd_g, "netD": sd_d, "avgG": dict(sd_g)}
    sds[net][key] = torch.randn(*shape)
    path = tmp_path / "shape.pt"
    torch.save(sds, path)
    with pytest.raises(ValueError, match=rf"shape.pt: {net}: {re.escape(key)} has shape {re.escape(str(shape))}"):
        load_pytorch_gan_zoo(path)


def test_weights_a_pggan_of_its_shape_does_not_have_are_refused(tmp_path):
    """A layer the conversion does not read (another model's, or a scale netG lacks) was dropped without a
    word: the converted networks then compute something other than the checkpoint's."""
    sd_g, sd_d = random_state_dicts(1)
    extra = dict(sd_g, **{"toRGBLayers.4.module.weight": torch.randn(1, 4, 1, 1),
                          "toRGBLayers.4.module.bias": torch.randn(1)})
    with pytest.raises(ValueError, match=r"extra.pt: netG: weights a PGGAN of this shape does not have: "
                                         r"toRGBLayers.4.module.bias, toRGBLayers.4.module.weight"):
        load_pytorch_gan_zoo(_save_dicts(tmp_path, "extra.pt", extra, sd_d))
    # netD one scale beyond netG (64 px against 32 px): was loaded as a 32-px D, its 64-px layers dropped
    deeper = dict(sd_d, **{"fromRGBLayers.4.module.weight": torch.randn(4, 1, 1, 1),
                           "fromRGBLayers.4.module.bias": torch.randn(4),
                           "scaleLayers.3.0.module.weight": torch.randn(4, 4, 3, 3),
                           "scaleLayers.3.0.module.bias": torch.randn(4),
                           "scaleLayers.3.1.module.weight": torch.randn(4, 4, 3, 3),
                           "scaleLayers.3.1.module.bias": torch.randn(4)})
    with pytest.raises(ValueError, match=r"deeper.pt: netD has 5 scales \(64 px\), netG 4 \(32 px\)"):
        load_pytorch_gan_zoo(_save_dicts(tmp_path, "deeper.pt", sd_g, deeper))


def test_a_folder_a_non_state_dict_and_a_bad_alpha_are_said_of_the_file(tmp_path):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "networks.json").write_text("{}")
    with pytest.raises(ValueError, match=r"ckpt: a folder, not a pytorch_GAN_zoo checkpoint file .*load_networks"):
        load_pytorch_gan_zoo(tmp_path / "ckpt")
    sd_g, sd_d = random_state_dicts(1)
    with pytest.raises(ValueError, match=r"none.pt: its netG is a NoneType, not a state dict"):
        load_pytorch_gan_zoo(_save_dicts(tmp_path, "none.pt", None, sd_d))
    with pytest.raises(ValueError, match=r"cond.pt: only unconditional"):
        load_pytorch_gan_zoo(_save_dicts(tmp_path, "cond.pt", sd_g, dict(sd_d, **{
            "decisionLayer.module.weight": torch.randn(3, DEPTHS[0]), "decisionLayer.module.bias": torch.randn(3)})))
    for alpha in (1.5, "x"):  # their alpha 1.5 was said as 'alpha must be in [0, 1], got -0.5'
        with pytest.raises(ValueError, match=r"alpha.pt: its config's alpha \(the fade-in weight\) is "):
            load_pytorch_gan_zoo(_save_dicts(tmp_path, "alpha.pt", sd_g, sd_d, config={"alpha": alpha}))
