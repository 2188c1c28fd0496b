"""WGAN-GP losses of PGGAN: Wasserstein critic, gradient penalty (λ = 10) and drift (ε = 0.001)."""
from __future__ import annotations

import torch

from ..ops.conv2d import no_weight_gradients


def gradient_penalty(D, real: torch.Tensor, fake: torch.Tensor, level=None, alpha=None,
                     generator: torch.Generator | None = None, norm_scale: float = 1.0) -> torch.Tensor:
    """mean((s |∇ D(x̂)|₂ - 1)²) at x̂ = real + u (fake - real), u ~ U(0, 1) per sample.

    ``norm_scale`` s converts the gradient's norm to another pixel grid's: the official PGGAN
    feeds D images nearest-upscaled by 2^lod to the final size, which divides the norm by 2^lod
    (s = 2^-lod; see ``gp_norm_scale``). Built with ``create_graph=True``: its backward is the
    double backward through D.
    """
    u = torch.rand(real.shape[0], 1, 1, 1, device=real.device, dtype=real.dtype, generator=generator)
    mix = torch.lerp(real.detach(), fake.detach().to(real.dtype), u).requires_grad_(True)
    scores = D(mix, level, alpha)
    with no_weight_gradients():  # only d scores / d mix here; the weights' come in the loss's backward
        (grad,) = torch.autograd.grad(scores.float().sum(), mix, create_graph=True)
    return (grad.float().flatten(1).norm(dim=1) * norm_scale - 1.0).square().mean()


GP_METRICS = ("full", "current")


def gp_norm_scale(metric: str, level: int, final_level: int) -> float:
    """The gradient-norm scale of the penalty at ``level`` of a network growing to ``final_level``.

    "full": the official PGGAN's metric. Its D sees every image at the final resolution (the
    current one nearest-upscaled by 2^lod, lod = final_level - level) and pools it down first,
    so each current pixel's gradient is spread over 4^lod full-size pixels at 1/4^lod each:
    |∇_full| = |∇_current| / 2^lod. On current-size images that is the penalty
    λ/4^lod (|∇| - 2^lod)²: a softer constraint toward a larger slope while the network is small.
    "current": the penalty on the current-size images as they are (the same at the final level).
    """
    if metric not in GP_METRICS:
        raise ValueError(f"gp metric must be one of {', '.join(GP_METRICS)}, got {metric!r}")
    return 2.0 ** -(final_level - level) if metric == "full" else 1.0


def discriminator_loss(real_scores: torch.Tensor, fake_scores: torch.Tensor, penalty: torch.Tensor,
                       gp_weight: float = 10.0, drift: float = 0.001) -> torch.Tensor:
    real_scores, fake_scores = real_scores.float(), fake_scores.float()
    return fake_scores.mean() - real_scores.mean() + gp_weight * penalty + drift * real_scores.square().mean()


def generator_loss(fake_scores: torch.Tensor) -> torch.Tensor:
    return -fake_scores.float().mean()
