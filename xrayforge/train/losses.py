"""WGAN-GP losses of PGGAN: Wasserstein critic, gradient penalty (λ = 10) and drift (ε = 0.001)."""
from __future__ import annotations

import torch

from ..ops.conv2d import no_weight_gradients


def gradient_penalty(D, real: torch.Tensor, fake: torch.Tensor, level=None, alpha=None,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """mean((|∇ D(x̂)|₂ - 1)²) at x̂ = real + u (fake - real), u ~ U(0, 1) per sample.

    Built with ``create_graph=True``: its backward is the double backward through D.
    """
    u = torch.rand(real.shape[0], 1, 1, 1, device=real.device, dtype=real.dtype, generator=generator)
    mix = torch.lerp(real.detach(), fake.detach().to(real.dtype), u).requires_grad_(True)
    scores = D(mix, level, alpha)
    with no_weight_gradients():  # only d scores / d mix here; the weights' come in the loss's backward
        (grad,) = torch.autograd.grad(scores.float().sum(), mix, create_graph=True)
    return (grad.float().flatten(1).norm(dim=1) - 1.0).square().mean()


def discriminator_loss(real_scores: torch.Tensor, fake_scores: torch.Tensor, penalty: torch.Tensor,
                       gp_weight: float = 10.0, drift: float = 0.001) -> torch.Tensor:
    real_scores, fake_scores = real_scores.float(), fake_scores.float()
    return fake_scores.mean() - real_scores.mean() + gp_weight * penalty + drift * real_scores.square().mean()


def generator_loss(fake_scores: torch.Tensor) -> torch.Tensor:
    return -fake_scores.float().mean()
