"""Load pytorch_GAN_zoo (facebookresearch) PGGAN checkpoints into xrayforge networks.

Their checkpoint is a dict with ``netG``, ``netD``, ``avgG`` state dicts and a pickled
``config`` object. The file is read with a restricted unpickler: tensors and containers
are rebuilt, every other class or function named in the pickle becomes an inert
placeholder that only records the data it was given, so no code from the file runs (the
``alpha`` of their config is read from that data).

Their conventions differ from the official network, and the conversion bridges each:
- ``ConstrainedLayer`` multiplies the layer output, bias included, by He's constant
  ``sqrt(2 / fan_in)``: the bias is rescaled, and weights are rescaled for our gains
  (toRGB 1 and the first dense layer √2/4 where they use √2 everywhere);
- the first dense layer has one bias per output feature, not per channel
  (``latent_bias_per_feature``);
- the discriminator pools after the activation (``pool_after_activation``) and its
  minibatch stddev uses consecutive groups and the unbiased variance (``mbstd_mode``);
- their fade-in weight runs from 1 (old path) to 0, ours from 0 to 1: ``alpha = 1 - theirs``.
"""
from __future__ import annotations

import math
import os
import pickle
import re
import types

import torch

from .networks import Discriminator, Generator, NetworkConfig

_ALLOWED = {
    ("collections", "OrderedDict"), ("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_tensor_v3"),
    ("torch._utils", "_rebuild_parameter"), ("torch._utils", "_rebuild_parameter_with_state"),
    ("torch", "Size"), ("torch", "device"), ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "slice"),
    ("builtins", "object"), ("copyreg", "_reconstructor"),
}


class Opaque:
    """Stands in for any class or function the checkpoint names that is not plain data."""

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs, self.state = args, kwargs, None

    def __setstate__(self, state):
        self.state = state

    def attribute(self, name, default=None):
        """An attribute of the pickled object, read from its recorded state."""
        state = self.state[1] if isinstance(self.state, tuple) and len(self.state) == 2 else self.state
        if isinstance(state, tuple) and state and isinstance(state[0], dict):
            state = state[0]
        return state.get(name, default) if isinstance(state, dict) else default


def _placeholder(module: str, name: str) -> type:
    return type(name, (Opaque,), {"__module__": f"opaque:{module}"})


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _ALLOWED or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        return _placeholder(module, name)


_restricted_pickle = types.ModuleType("xrayforge_restricted_pickle")
_restricted_pickle.Unpickler = _RestrictedUnpickler
_restricted_pickle.load = lambda f, **kw: _RestrictedUnpickler(f, **kw).load()
_restricted_pickle.__name__ = "xrayforge_restricted_pickle"


def read_checkpoint(path: str | os.PathLike) -> dict:
    """The checkpoint's dict, with nothing but tensors and plain containers instantiated."""
    if os.path.isdir(path):
        hint = " (an xrayforge checkpoint folder: load it with load_networks)" \
            if os.path.isfile(os.path.join(path, "networks.json")) else ""
        raise ValueError(f"{path}: a folder, not a pytorch_GAN_zoo checkpoint file{hint}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such pytorch_GAN_zoo checkpoint")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_restricted_pickle)
    except Exception as exc:  # a torch file is a zip of pickles; anything else lands here
        raise ValueError(f"{path}: not a readable torch checkpoint ({type(exc).__name__}: {exc})") from exc
    if not isinstance(ckpt, dict) or not {"netG", "netD"} <= set(ckpt):
        keys = sorted(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"{path}: not a pytorch_GAN_zoo PGGAN checkpoint (expected netG, netD, avgG; got {keys})")
    for key in ("netG", "netD", "avgG"):
        if key in ckpt and not isinstance(ckpt[key], dict):
            raise ValueError(f"{path}: its {key} is a {type(ckpt[key]).__name__}, not a state dict of tensors")
    return ckpt


def _he(fan_in: int) -> float:
    return math.sqrt(2.0 / fan_in)


def _strip_module(sd: dict) -> dict:
    """Their keys as their current code names them, ``<layer>.module.<weight|bias>``: avgG is saved
    from a DataParallel wrapper in some versions (a leading 'module.' is dropped), and their first
    release's ``ConstrainedLayer.state_dict`` wrote ``<layer>.<weight|bias>``, which their loader
    (``loadStateDictCompatible``) still reads as ``<layer>.module.<weight|bias>``."""
    out = {}
    for k, v in sd.items():
        k = k[len("module."):] if k.startswith("module.") else k
        head, _, leaf = k.rpartition(".")
        if leaf in ("weight", "bias") and head and not head.endswith(".module"):
            k = f"{head}.module.{leaf}"
        out[k] = v
    return out


def _count(sd: dict, prefix: str) -> int:
    idx = {int(m.group(1)) for k in sd for m in [re.match(re.escape(prefix) + r"(\d+)\.", k)] if m}
    return max(idx) + 1 if idx else 0


def _depths(sd_g: dict) -> list[int]:
    depths = [sd_g["groupScale0.0.module.weight"].shape[0]]
    for s in range(_count(sd_g, "scaleLayers.")):
        depths.append(sd_g[f"scaleLayers.{s}.0.module.weight"].shape[0])
    return depths


def _copy_layer(dst, w, b, their_fan_in: int):
    """Rewrite their (W, b) so that our layer computes what theirs does."""
    dst.weight.data.copy_(w * (math.sqrt(2.0) / dst.gain))
    dst.bias.data.copy_(b * _he(their_fan_in))


def _layer(sd, name, dst):
    """Their (W, b, fan-in) of layer ``name``, taken out of ``sd`` (what is left at the end is not theirs),
    checked to have ``dst``'s shapes: copy_ would broadcast a smaller tensor into the layer without a word."""
    w, b = sd.pop(f"{name}.module.weight"), sd.pop(f"{name}.module.bias")
    for leaf, theirs, ours in (("weight", w, dst.weight), ("bias", b, dst.bias)):
        if not torch.is_tensor(theirs) or theirs.shape != ours.shape:
            got = tuple(theirs.shape) if torch.is_tensor(theirs) else type(theirs).__name__
            raise ValueError(f"{name}.module.{leaf} has shape {got}; a PGGAN of the shape its other weights "
                             f"give needs {tuple(ours.shape)}")
    return w, b, w[0].numel()


def _no_more(sd: dict) -> None:
    if sd:
        names = sorted(sd)
        raise ValueError(f"weights a PGGAN of this shape does not have: {', '.join(names[:4])}"
                         f"{f' and {len(names) - 4} more' if len(names) > 4 else ''}")


def _config_from_weights(sd_g: dict, sd_d: dict | None) -> NetworkConfig:
    depths = _depths(sd_g)
    latent = sd_g["formatLayer.module.weight"].shape[1]
    channels_out = sd_g["toRGBLayers.0.module.weight"].shape[0]
    mbstd = 4
    if sd_d is not None:
        scales_d = max(_count(sd_d, "fromRGBLayers."), _count(sd_d, "scaleLayers.") + 1)
        if scales_d != len(depths):
            raise ValueError(f"netD has {scales_d} scales ({4 << (scales_d - 1)} px), netG {len(depths)} "
                             f"({4 << (len(depths) - 1)} px): not the two networks of one PGGAN")
        if sd_d["decisionLayer.module.weight"].shape[0] != 1:
            raise ValueError("only unconditional checkpoints are supported (decision layer of size 1)")
        mbstd = 4 if sd_d["groupScaleZero.0.module.weight"].shape[1] == depths[0] + 1 else 1
    return NetworkConfig(resolution=4 << (len(depths) - 1), latent_dim=latent, image_channels=channels_out,
                         channels=depths, latent_bias_per_feature=True, pool_after_activation=True,
                         mbstd_mode="gan_zoo", mbstd_group_size=mbstd)


def _dtype(sd: dict) -> torch.dtype:
    return next(iter(sd.values())).dtype


def convert_generator(sd: dict, config: NetworkConfig) -> Generator:
    """Our Generator, in the state dict's dtype, computing what their GNet computes."""
    sd = _strip_module(sd)
    g = Generator(config).to(_dtype(sd))
    w, b, fan = _layer(sd, "formatLayer", g.dense)
    g.dense.weight.data.copy_(w * (math.sqrt(2.0) / g.dense.gain))
    g.dense.bias.data.copy_(b * _he(fan))
    _copy_layer(g.conv0, *_layer(sd, "groupScale0.0", g.conv0))
    for level in range(1, config.num_levels):
        for i in (0, 1):
            _copy_layer(g.blocks[level][i], *_layer(sd, f"scaleLayers.{level - 1}.{i}", g.blocks[level][i]))
    for level in range(config.num_levels):
        _copy_layer(g.to_rgb[level], *_layer(sd, f"toRGBLayers.{level}", g.to_rgb[level]))
    _no_more(sd)
    return g


def convert_discriminator(sd: dict, config: NetworkConfig) -> Discriminator:
    """Our Discriminator, in the state dict's dtype, computing what their DNet computes."""
    sd = _strip_module(sd)
    d = Discriminator(config).to(_dtype(sd))
    for level in range(config.num_levels):
        _copy_layer(d.from_rgb[level], *_layer(sd, f"fromRGBLayers.{level}", d.from_rgb[level]))
    for level in range(1, config.num_levels):
        _copy_layer(d.blocks[level].conv, *_layer(sd, f"scaleLayers.{level - 1}.0", d.blocks[level].conv))
        _copy_layer(d.blocks[level].conv_down, *_layer(sd, f"scaleLayers.{level - 1}.1", d.blocks[level].conv_down))
    _copy_layer(d.final_conv, *_layer(sd, "groupScaleZero.0", d.final_conv))
    _copy_layer(d.final_dense, *_layer(sd, "groupScaleZero.1", d.final_dense))
    _copy_layer(d.out, *_layer(sd, "decisionLayer", d.out))
    _no_more(sd)
    return d


# what the conversion assumes of their config, where the config says (an older file may not):
# {their name: (the values supported, what another value would change)}
_ASSUMED = {
    # their losses' generationActivation: None for WGANGP and Logistic, tanh for MSE and DCGAN
    "lossCriterion": (("WGANGP", "Logistic"), "MSE and DCGAN put G's output through tanh, which the converted G "
                                              "does not"),
    "generationActivation": ((None,), "an activation on G's output, which the converted G does not have"),
    "leakyReluLeak": ((0.2,), "the leaky ReLU slope of every layer"),
    "perChannelNormalization": ((True,), "G's pixel norm"),
    "equalizedlR": ((True,), "the He-constant scaling of every layer"),
}
_ABSENT = object()


def _check_supported(path, setting) -> None:
    """A checkpoint trained with settings the converted networks do not reproduce is refused by name:
    loaded, it would generate other images than theirs, without an error."""
    for name, (supported, why) in _ASSUMED.items():
        value = setting(name, _ABSENT)
        if value is None and None not in supported:  # unset, as an absent one (only an activation's None says something)
            continue
        if value is not _ABSENT and value not in supported:
            raise ValueError(f"{path}: trained with {name} = {value!r}; only "
                             f"{' or '.join(map(repr, supported))} is supported ({why})")


def load_pytorch_gan_zoo(path: str | os.PathLike) -> dict:
    """{'G', 'D', 'G_ema'} from a pytorch_GAN_zoo PGGAN checkpoint, at its level and alpha.

    The architecture (scales, channel depths, latent size, image channels, minibatch
    stddev) is inferred from the weight shapes.
    """
    ckpt = read_checkpoint(path)
    nets, where = {}, ""
    try:
        config = _config_from_weights(_strip_module(ckpt["netG"]), _strip_module(ckpt["netD"]))
        for name, key, convert in (("G", "netG", convert_generator), ("D", "netD", convert_discriminator),
                                   ("G_ema", "avgG", convert_generator)):
            if key in ckpt:
                where = f"{key}: "
                nets[name] = convert(ckpt[key], config)
    except KeyError as exc:
        raise ValueError(f"{path}: {where}missing weight {exc} for a PGGAN of this shape") from exc
    except ValueError as exc:  # a shape, an extra weight, a conditional D: said of the file
        raise ValueError(f"{path}: {where}{exc}") from exc
    cfg = ckpt.get("config")
    setting = cfg.attribute if isinstance(cfg, Opaque) else cfg.get if isinstance(cfg, dict) else lambda k, d=None: d
    _check_supported(path, setting)
    try:
        their_alpha = float(setting("alpha", 0.0) or 0.0)
    except (TypeError, ValueError):
        their_alpha = math.nan
    if not 0.0 <= their_alpha <= 1.0:
        raise ValueError(f"{path}: its config's alpha (the fade-in weight) is {setting('alpha')!r}, not a number "
                         f"in [0, 1]")
    level = config.num_levels - 1
    for name, net in nets.items():
        alpha = 1.0 - their_alpha
        if level == 0 or (name == "D" and level == 1):
            alpha = 1.0  # their DNet only blends once it has two or more scales
        net.set_level(level, alpha)
    return nets
