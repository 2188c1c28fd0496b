"""Bias + leaky ReLU: the discriminator's conv epilogue, differentiable to any order.

``y = leaky_relu(x + bias[None, :, None, None], slope)``. The backward only needs the sign
of y: ``dx = dy * (1 if y > 0 else slope)`` and ``dbias = sum(dx)``. That map is linear in
dy with a piecewise-constant coefficient, so its own gradient is the same map again (as in
StyleGAN2's bias_act): WGAN-GP's double backward through the discriminator costs one more
fused pass, not a trip through the reference. The Triton kernels are pixel_norm's channel
epilogue kernels with normalisation switched off.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _backend
from ._common import check_float, check_number, dense
from .pixel_norm import _epilogue_refusals


def reference(x: torch.Tensor, bias: torch.Tensor, slope: float = 0.2) -> torch.Tensor:
    """``leaky_relu(x + bias, slope)`` in plain PyTorch, computed in x's dtype."""
    shape = (1, -1) + (1,) * (x.dim() - 2)
    return F.leaky_relu(x + bias.to(x.dtype).view(shape), slope)


class _BiasLReLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias, slope, backend):
        y = torch.ops.xrayforge.channel_epilogue_fwd(x, bias, slope, 0.0, True, False, backend)
        ctx.save_for_backward(y)
        ctx.cfg = (slope, backend, bias.dtype)
        return y

    @staticmethod
    def backward(ctx, dy):
        (y,) = ctx.saved_tensors
        slope, backend, bias_dtype = ctx.cfg
        dx, db = _LReLUGradFunction.apply(dy, y, slope, backend)
        return dx, db.to(bias_dtype), None, None


class _LReLUGradFunction(torch.autograd.Function):
    """(dy, y) -> (dx, db) with dx = dy * slope^(y <= 0), db = per-channel sum of dx."""

    @staticmethod
    def forward(ctx, dy, y, slope, backend):
        ctx.save_for_backward(y)
        ctx.cfg = (slope, backend)
        return torch.ops.xrayforge.channel_epilogue_bwd(dy, y, None, slope, 0.0, True, False, True, backend)

    @staticmethod
    def backward(ctx, ddx, ddb):
        (y,) = ctx.saved_tensors
        slope, backend = ctx.cfg
        if ddx is None:
            ddx = torch.zeros_like(y)
        if ddb is not None:  # db sums dx over pixels, so its gradient spreads back to every pixel
            ddx = ddx + ddb.to(ddx.dtype).view((1, -1) + (1,) * (y.dim() - 2))
        ddy, _ = _LReLUGradFunction.apply(ddx, y, slope, backend)
        return ddy, None, None, None  # the mask is piecewise constant in y


def bias_lrelu(x: torch.Tensor, bias: torch.Tensor, slope: float = 0.2, backend: str | None = None) -> torch.Tensor:
    """``leaky_relu(x + bias[None, :, None, None], slope)`` for (N, C) or (N, C, H, W) tensors.

    The Triton kernels' limits are pixel_norm's (channels per program, the launch grid): an input
    past them goes to the reference under ``auto`` (logged once) and is refused by a named 'triton'.
    """
    check_float("bias_lrelu", x)
    check_float("bias_lrelu (bias)", bias)
    if x.dim() not in (2, 4):
        raise ValueError(f"bias_lrelu: expected an (N, C) or (N, C, H, W) tensor, got shape {tuple(x.shape)}")
    if bias.dim() != 1 or bias.shape[0] != x.shape[1]:
        raise ValueError(f"bias_lrelu: bias must have shape ({x.shape[1]},), got {tuple(bias.shape)}")
    if bias.device != x.device:
        raise ValueError(f"bias_lrelu: x is on {x.device} but bias is on {bias.device}")
    check_number("bias_lrelu", "slope", slope)
    if not slope > 0:  # NaN too
        raise ValueError(f"bias_lrelu: slope must be positive (the backward reads the sign of the output), got {slope}")
    impl = _backend.resolve("bias_lrelu", x, backend, _epilogue_refusals(x, bias_grad=True))
    if impl == "torch":
        return reference(x, bias, slope)
    return _BiasLReLUFunction.apply(dense(x), bias, float(slope), impl)
