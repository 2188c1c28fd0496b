"""The PGGAN generator and discriminator (Karras et al. 2018) with the official semantics.

Levels: level 0 works at 4×4, level l at 4·2^l; ``level`` and the fade-in ``alpha`` are
state (set with :meth:`set_level`) or per-call arguments. At ``alpha = 0`` the newest block
is bypassed (the old path, upsampled/downsampled); at ``alpha = 1`` only the new block
speaks. Every level's layers exist from the start, as in the official code, so the
parameter set never changes during training.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .. import ops
from .layers import SQRT2, EqualizedConv2d, EqualizedLinear, apply_epilogue


@dataclass
class NetworkConfig:
    """Architecture shared by G and D. The defaults are the paper's 1024-px network."""

    resolution: int = 1024
    latent_dim: int = 512
    image_channels: int = 1
    fmap_base: int = 8192
    fmap_max: int = 512
    channels: list[int] | None = None      # explicit channels per level (4 px first); overrides fmap_*
    fused_resample_min_res: int = 128      # fused up/down convolutions at and above this resolution
    mbstd_group_size: int = 4
    mbstd_channels: int = 1
    checkpoint_min_res: int | None = None  # activation checkpointing of blocks at or above this size
    # Compatibility with pytorch_GAN_zoo checkpoints (see load_pytorch_gan_zoo):
    latent_bias_per_feature: bool = False  # the first dense layer has one bias per output feature
    pool_after_activation: bool = False    # D: 2×2 average pooling after bias + leaky ReLU
    mbstd_mode: str = "official"           # or "gan_zoo": consecutive groups, unbiased variance
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.resolution < 4 or self.resolution & (self.resolution - 1):
            raise ValueError(f"resolution must be a power of two >= 4, got {self.resolution}")
        if self.image_channels < 1:
            raise ValueError(f"image_channels must be >= 1, got {self.image_channels}")
        if self.channels is not None and len(self.channels) != self.num_levels:
            raise ValueError(f"channels has {len(self.channels)} entries; a {self.resolution}-px network "
                             f"has {self.num_levels} levels (4 px ... {self.resolution} px)")
        if self.mbstd_mode not in ("official", "gan_zoo"):
            raise ValueError(f"mbstd_mode must be 'official' or 'gan_zoo', got {self.mbstd_mode!r}")

    @property
    def num_levels(self) -> int:
        return int(math.log2(self.resolution)) - 1

    def resolution_at(self, level: int) -> int:
        return 4 << level

    def channels_at(self, level: int) -> int:
        """512 (4–32 px), 256 (64), 128 (128), 64 (256), 32 (512), 16 (1024) by default."""
        if self.channels is not None:
            return self.channels[level]
        return max(1, min(self.fmap_base * 2 // self.resolution_at(level), self.fmap_max))

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


class _ProgressiveNetwork(nn.Module):
    """Level / alpha state shared by G and D."""

    def __init__(self, config: NetworkConfig):
        super().__init__()
        self.config = config
        self.level = config.num_levels - 1
        self.register_buffer("alpha", torch.ones(()))
        self._alpha_value = 1.0
        self.register_load_state_dict_post_hook(_sync_alpha)

    def set_level(self, level: int, alpha: float = 1.0) -> None:
        self._check_level(level, alpha)
        self.level = int(level)
        self.alpha.fill_(float(alpha))
        self._alpha_value = float(alpha)  # host copy: deciding to blend must not sync the GPU

    def _check_level(self, level: int, alpha) -> None:
        if not 0 <= level < self.config.num_levels:
            raise ValueError(f"level must be in [0, {self.config.num_levels - 1}], got {level}")
        a = float(alpha)
        if not 0.0 <= a <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {a}")

    def _state(self, level, alpha) -> tuple[int, torch.Tensor, bool]:
        """(level, alpha as a tensor, whether to blend with the previous level).

        A tensor alpha always blends (no host sync, no recompiles under torch.compile).
        """
        level = self.level if level is None else int(level)
        if alpha is None:
            alpha, blend = self.alpha, getattr(self, "_alpha_value", 1.0) < 1.0
        elif torch.is_tensor(alpha):
            blend = True
        else:
            self._check_level(level, alpha)
            # torch.full fills on the device; torch.tensor would copy from the host, and that blocking
            # copy (non_blocking=False) waits on a GPU for every kernel queued before it
            alpha, blend = torch.full((), float(alpha), device=self.alpha.device), float(alpha) < 1.0
        if not 0 <= level < self.config.num_levels:
            raise ValueError(f"level must be in [0, {self.config.num_levels - 1}], got {level}")
        return level, alpha, blend and level > 0

    def _run(self, block: nn.Module, x: torch.Tensor, level: int) -> torch.Tensor:
        limit = self.config.checkpoint_min_res
        if limit is not None and torch.is_grad_enabled() and self.config.resolution_at(level) >= limit:
            return checkpoint(block, x, use_reentrant=False)
        return block(x)

    @property
    def current_resolution(self) -> int:
        return self.config.resolution_at(self.level)

    def extra_repr(self) -> str:
        return f"level={self.level} ({self.current_resolution} px), alpha={self._alpha_value:.3f}"


def _sync_alpha(module: "_ProgressiveNetwork", incompatible_keys) -> None:
    module._alpha_value = float(module.alpha)


def _lerp(old: torch.Tensor, new: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    return old + (new - old) * alpha.to(new.dtype)


class _GeneratorBlock(nn.Sequential):
    def __init__(self, in_ch: int, out_ch: int, fused: bool):
        super().__init__(EqualizedConv2d(in_ch, out_ch, 3, activation="lrelu_pn", resample="up", fused=fused),
                         EqualizedConv2d(out_ch, out_ch, 3, activation="lrelu_pn"))


class Generator(_ProgressiveNetwork):
    """z (N, latent_dim) -> images (N, image_channels, R, R) at the current level's R."""

    def __init__(self, config: NetworkConfig | None = None, **overrides):
        config = dataclasses.replace(config or NetworkConfig(), **overrides)
        super().__init__(config)
        c0 = config.channels_at(0)
        self.dense = EqualizedLinear(config.latent_dim, c0 * 16, gain=SQRT2 / 4,
                                     bias=config.latent_bias_per_feature)
        # official: one bias per channel, applied after the reshape to 4×4
        self.dense_bias = nn.Parameter(torch.zeros(c0), requires_grad=not config.latent_bias_per_feature)
        self.conv0 = EqualizedConv2d(c0, c0, 3, activation="lrelu_pn")
        self.blocks = nn.ModuleList([nn.Identity()])
        for level in range(1, config.num_levels):
            fused = config.resolution_at(level) >= config.fused_resample_min_res
            self.blocks.append(_GeneratorBlock(config.channels_at(level - 1), config.channels_at(level), fused))
        self.to_rgb = nn.ModuleList([EqualizedConv2d(config.channels_at(level), config.image_channels, 1, gain=1.0)
                                     for level in range(config.num_levels)])

    def features(self, z: torch.Tensor, level: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Feature maps at ``level`` and at ``level - 1`` (None at level 0)."""
        if z.dim() != 2 or z.shape[1] != self.config.latent_dim:
            raise ValueError(f"Generator: expected latents of shape (N, {self.config.latent_dim}), "
                             f"got {tuple(z.shape)}")
        x = self.dense(ops.pixel_norm(z))
        x = apply_epilogue(x.view(z.shape[0], -1, 4, 4), self.dense_bias, "lrelu_pn")
        x = self.conv0(x)
        prev = None
        for lv in range(1, level + 1):
            prev = x
            x = self._run(self.blocks[lv], x, lv)
        return x, prev

    def forward(self, z: torch.Tensor, level: int | None = None, alpha=None) -> torch.Tensor:
        level, alpha, blend = self._state(level, alpha)
        x, prev = self.features(z, level)
        img = self.to_rgb[level](x)
        if blend:
            old = F.interpolate(self.to_rgb[level - 1](prev), scale_factor=2.0, mode="nearest")
            img = _lerp(old, img, alpha)
        return img


class _DiscriminatorBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, fused: bool, pool_after_activation: bool):
        super().__init__()
        self.conv = EqualizedConv2d(in_ch, in_ch, 3, activation="lrelu")
        self.pool_after_activation = pool_after_activation
        self.conv_down = EqualizedConv2d(in_ch, out_ch, 3, activation="lrelu",
                                         resample=None if pool_after_activation else "down", fused=fused)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_down(self.conv(x))
        return F.avg_pool2d(x, 2) if self.pool_after_activation else x


def largest_group_size(n: int, group_size: int) -> int:
    """The largest group size <= group_size that divides n (the trainer's rule)."""
    for g in range(min(group_size, n), 0, -1):
        if n % g == 0:
            return g
    return 1


def gan_zoo_minibatch_stddev(x: torch.Tensor, group_size: int = 4) -> torch.Tensor:
    """pytorch_GAN_zoo's variant: consecutive groups, unbiased variance, one channel."""
    n, c, h, w = x.shape
    g = min(n, group_size)
    if n % g:
        g = n
    if g == 1:
        return torch.cat([x, x.new_zeros(n, 1, h, w)], dim=1)
    y = x.view(-1, g, c, h, w).var(dim=1, unbiased=True)
    y = (y + 1e-8).sqrt().reshape(n // g, -1).mean(dim=1)
    y = y.view(-1, 1, 1, 1, 1).expand(-1, g, 1, h, w).reshape(n, 1, h, w)
    return torch.cat([x, y], dim=1)


class Discriminator(_ProgressiveNetwork):
    """images (N, image_channels, R, R) at the current level's R -> scores (N, 1)."""

    def __init__(self, config: NetworkConfig | None = None, **overrides):
        config = dataclasses.replace(config or NetworkConfig(), **overrides)
        super().__init__(config)
        self.from_rgb = nn.ModuleList([EqualizedConv2d(config.image_channels, config.channels_at(level), 1,
                                                       activation="lrelu") for level in range(config.num_levels)])
        self.blocks = nn.ModuleList([nn.Identity()])
        for level in range(1, config.num_levels):
            fused = config.resolution_at(level) >= config.fused_resample_min_res
            self.blocks.append(_DiscriminatorBlock(config.channels_at(level), config.channels_at(level - 1),
                                                   fused, config.pool_after_activation))
        c0 = config.channels_at(0)
        extra = config.mbstd_channels if config.mbstd_group_size > 1 else 0
        self.final_conv = EqualizedConv2d(c0 + extra, c0, 3, activation="lrelu")
        self.final_dense = EqualizedLinear(c0 * 16, c0, activation="lrelu")
        self.out = EqualizedLinear(c0, 1, gain=1.0)

    def _mbstd(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        if cfg.mbstd_group_size <= 1:
            return x
        if cfg.mbstd_mode == "gan_zoo":
            return gan_zoo_minibatch_stddev(x, cfg.mbstd_group_size)
        return ops.minibatch_stddev(x, largest_group_size(x.shape[0], cfg.mbstd_group_size), cfg.mbstd_channels)

    def forward(self, img: torch.Tensor, level: int | None = None, alpha=None) -> torch.Tensor:
        level, alpha, blend = self._state(level, alpha)
        res = self.config.resolution_at(level)
        if img.dim() != 4 or img.shape[1:] != (self.config.image_channels, res, res):
            raise ValueError(f"Discriminator at level {level}: expected images of shape "
                             f"(N, {self.config.image_channels}, {res}, {res}), got {tuple(img.shape)}")
        x = self.from_rgb[level](img)
        if level > 0:
            x = self._run(self.blocks[level], x, level)
            if blend:
                old = self.from_rgb[level - 1](F.avg_pool2d(img, 2))
                x = _lerp(old, x, alpha)
        for lv in range(level - 1, 0, -1):
            x = self._run(self.blocks[lv], x, lv)
        x = self.final_conv(self._mbstd(x))
        x = self.final_dense(x.flatten(1))
        return self.out(x)
