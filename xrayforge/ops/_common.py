"""Helpers shared by the op modules: input checks, memory layouts, higher-order gradients."""
from __future__ import annotations

import contextlib
import numbers
import operator
from typing import Callable, Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def device_guard(t: torch.Tensor):
    """A context that makes t's GPU the current one for a kernel launch (nothing for a CPU tensor)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def dtype_code(t: torch.Tensor) -> int:
    """The dtype code the CUDA extension expects (csrc/common.cuh: DType)."""
    return {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}[t.dtype]


def accumulation_dtype(x: torch.Tensor) -> torch.dtype:
    """What the kernels accumulate in: float64 for float64 tensors, float32 otherwise."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def check_float(name: str, x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected a float16, bfloat16, float32 or float64 tensor, got {x.dtype}")


def check_number(op: str, name: str, v) -> None:
    """Refuse an ``eps`` / ``slope`` that is no real number (a Python or NumPy number, or a
    one-element real tensor): a string such as "1e-8" ran on the fused backends (which take
    float(v)) and failed inside the reference, and None failed deep in either."""
    if isinstance(v, torch.Tensor):
        if v.numel() == 1 and (v.is_floating_point() or not (v.is_complex() or v.dtype == torch.bool)):
            return
    elif isinstance(v, numbers.Real) and not isinstance(v, bool):
        return
    raise TypeError(f"{op}: {name} must be a real number, got {v!r}")


def check_int(op: str, name: str, v, what: str = "an integer") -> int:
    """``v`` as an int where it is one (a Python or NumPy integer, an integer tensor of one element);
    a float (1.5 was taken as 1 by int()), a bool or a tuple is refused naming the argument."""
    try:
        if not isinstance(v, bool):
            return operator.index(v)
    except TypeError:
        pass
    raise TypeError(f"{op}: {name} must be {what}, got {v!r}")


def dense(x: torch.Tensor) -> torch.Tensor:
    """``x`` if it is contiguous or channels_last-contiguous, else a contiguous copy."""
    if x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)):
        return x
    return x.contiguous()


def like_layout(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``t`` with the same strides as the dense tensor ``x`` (copied only when they differ)."""
    if t.stride() == x.stride():
        return t
    fmt = torch.channels_last if (x.dim() == 4 and not x.is_contiguous()) else torch.contiguous_format
    return t.contiguous(memory_format=fmt)


def channel_view(x: torch.Tensor) -> tuple[int, int, int, int, int, int]:
    """Describe a dense (N, C) or (N, C, H, W) tensor as (B, C, P) rows of channels.

    Returns ``(B, C, P, stride_b, stride_c, stride_p)``: element (b, c, p) lives at
    ``b*stride_b + c*stride_c + p*stride_p``. A 2-D (N, C) tensor is one batch of N
    "pixels", which keeps the channel reduction the same kernel in every layout.
    """
    if x.dim() == 2:
        n, c = x.shape
        return 1, c, n, 0, x.stride(1), x.stride(0)
    n, c, h, w = x.shape
    # dense 4-D: H and W merge into one pixel axis of W's stride; a size-1 W may carry any stride
    # and still count as dense (a transposed (N, C, 1, W) view), so then the axis steps by H's
    return n, c, h * w, x.stride(0), x.stride(1), x.stride(3) if w > 1 else x.stride(2)


def reference_double_backward(
    reference: Callable[..., torch.Tensor],
    primals: Sequence[torch.Tensor],
    grad_out: torch.Tensor,
    grad_grads: Sequence[torch.Tensor | None],
) -> tuple[torch.Tensor, ...]:
    """Gradient of a fused backward, taken through the differentiable reference.

    The fused backward computes ``g = vjp(reference, primals)(grad_out)``; this returns the
    vector-Jacobian product of that map with ``grad_grads`` with respect to
    ``(*primals, grad_out)``. These are partial derivatives: ``grad_out`` usually depends on
    the primals itself (e.g. the gradient of ``D(x)**2``), and autograd adds that path on its
    own. torch.func keeps them partial and still differentiable, so any order works.
    """
    def fused_backward(*args):
        _, vjp = torch.func.vjp(reference, *args[:-1])
        return vjp(args[-1])

    (grads, vjp_of_backward) = torch.func.vjp(fused_backward, *primals, grad_out)
    cotangents = tuple(torch.zeros_like(g) if gg is None else gg for g, gg in zip(grads, grad_grads))
    return vjp_of_backward(cotangents)


def split_float(v: float) -> tuple[float, float]:
    """``v`` as two float32-representable parts whose float64 sum is within 2^-48 of ``v``
    (relative). Triton types a Python float kernel argument as float32; a float64 kernel adds
    the two parts in float64, so that an argument such as 0.2 keeps its float64 value to about
    1e-15 (0.2 in float32 is off by 1.5e-8)."""
    import numpy as np
    hi = float(np.float32(v))
    return hi, float(np.float32(v - hi))
