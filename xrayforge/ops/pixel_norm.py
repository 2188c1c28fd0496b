"""Pixel norm and the generator's fused conv epilogue (bias, leaky ReLU, pixel norm).

``pixel_norm(x) = x * rsqrt(mean_c(x**2) + eps)`` normalises every pixel's feature vector
(Karras et al. 2018, section 4.2). ``bias_lrelu_pixel_norm`` applies it after
``leaky_relu(x + bias, slope)``, which is what follows every convolution in the PGGAN
generator; fusing the three saves two round trips through memory in the forward pass and
three in the backward pass.

Backends: ``torch`` is :func:`reference`; ``triton`` and ``cuda`` run one fused kernel for
the forward and one for the backward (the backward recomputes the activation from the
saved input instead of storing it). Higher-order gradients go through the reference.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from . import _backend
from ._common import (accumulation_dtype, channel_view, check_float, check_number, dense, device_guard, dtype_code,
                      like_layout, reference_double_backward, split_float)

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is a declared dependency
    triton = None

MAX_TRITON_CHANNELS = 16384  # one program holds a pixel's whole channel vector in registers
MAX_CUDA_BIAS_CHANNELS = 1024  # csrc/pixel_norm.cu: kMaxBiasGradChannels (the bias gradient's shared memory)
CUDA_PIXELS_PER_BLOCK = 128  # csrc/pixel_norm.cu: kPixelsPerBlock (grid_for: ceil(P / it) blocks along x)


# --------------------------------------------------------------------------- reference
def reference(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Pixel norm in plain PyTorch: the specification and the CPU path."""
    return x * torch.rsqrt(x.square().mean(dim=1, keepdim=True) + eps)


def reference_bias_lrelu(x: torch.Tensor, bias: torch.Tensor, slope: float = 0.2,
                         eps: float = 1e-8) -> torch.Tensor:
    """``pixel_norm(leaky_relu(x + bias, slope))`` in plain PyTorch, computed in x's dtype."""
    shape = (1, -1) + (1,) * (x.dim() - 2)
    return reference(F.leaky_relu(x + bias.to(x.dtype).view(shape), slope), eps)


# --------------------------------------------------------------------------- triton
if triton is not None:

    @triton.jit
    def _inv_sqrt(v, ACC_F64: tl.constexpr):
        # IEEE-rounded sqrt: the fast approximate one costs accuracy for no bandwidth-bound gain
        if ACC_F64:
            return 1.0 / tl.sqrt(v)
        else:
            return 1.0 / tl.sqrt_rn(v)

    @triton.jit
    def _constant(hi, lo, ACC_F64: tl.constexpr):
        # a float argument arrives as float32: in float64, hi + lo restores it to about 1e-15
        if ACC_F64:
            return tl.cast(hi, tl.float64) + tl.cast(lo, tl.float64)
        else:
            return hi

    @triton.jit
    def _epilogue_fwd_kernel(x_ptr, b_ptr, y_ptr, C, P, stride_b, stride_c, stride_p, slope_hi, slope_lo,
                             eps_hi, eps_lo, HAS_BIAS: tl.constexpr, ACT: tl.constexpr, NORMALIZE: tl.constexpr,
                             ACC_F64: tl.constexpr, CHANNEL_I64: tl.constexpr, BLOCK_C: tl.constexpr,
                             BLOCK_P: tl.constexpr):
        """y = [pixel_norm]([leaky_relu](x [+ bias])) over (B, C, P) rows of channels. CHANNEL_I64:
        channel offsets in int64 (see _channel_i64); the int32 form is the GPU-validated one."""
        acc_t = tl.float64 if ACC_F64 else tl.float32
        slope = _constant(slope_hi, slope_lo, ACC_F64)
        eps = _constant(eps_hi, eps_lo, ACC_F64)
        pid_p = tl.program_id(0)
        pid_b = tl.program_id(1).to(tl.int64)
        # tiles are (pixels, channels): the channel reduction runs along the last axis
        offs_c = tl.arange(0, BLOCK_C)
        offs_p = pid_p.to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
        mask = (offs_p[:, None] < P) & (offs_c[None, :] < C)
        if CHANNEL_I64:
            offs = pid_b * stride_b + offs_p[:, None] * stride_p + offs_c[None, :].to(tl.int64) * stride_c
        else:
            offs = pid_b * stride_b + offs_p[:, None] * stride_p + offs_c[None, :] * stride_c
        h = tl.load(x_ptr + offs, mask=mask, other=0.0).to(acc_t)
        if HAS_BIAS:
            b = tl.load(b_ptr + offs_c, mask=offs_c < C, other=0.0).to(acc_t)
            h = h + b[None, :]
        if ACT:
            h = tl.where(h > 0, h, h * slope)
        if NORMALIZE:
            ms = tl.sum(h * h, axis=1) / C
            h = h * _inv_sqrt(ms + eps, ACC_F64)[:, None]
        tl.store(y_ptr + offs, h.to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _epilogue_bwd_kernel(x_ptr, b_ptr, dy_ptr, dx_ptr, db_ptr, C, P, stride_b, stride_c,
                             stride_p, slope_hi, slope_lo, eps_hi, eps_lo,
                             HAS_BIAS: tl.constexpr, ACT: tl.constexpr, NORMALIZE: tl.constexpr,
                             BIAS_GRAD: tl.constexpr, ACC_F64: tl.constexpr, CHANNEL_I64: tl.constexpr,
                             BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
        """dx (and per-block bias-gradient partial sums) of the forward above.

        y = h * r with r = (mean_c h^2 + eps)^-1/2  =>  dh = r * dy - h * r^3 * mean_c(dy * h);
        the leaky ReLU's slope applies where its input was not positive (the sign of its input
        and its output agree, so x may be either).
        """
        acc_t = tl.float64 if ACC_F64 else tl.float32
        slope = _constant(slope_hi, slope_lo, ACC_F64)
        eps = _constant(eps_hi, eps_lo, ACC_F64)
        pid_p = tl.program_id(0)
        pid_b = tl.program_id(1)
        offs_c = tl.arange(0, BLOCK_C)
        offs_p = pid_p.to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
        mask = (offs_p[:, None] < P) & (offs_c[None, :] < C)
        if CHANNEL_I64:
            offs = pid_b.to(tl.int64) * stride_b + offs_p[:, None] * stride_p + offs_c[None, :].to(tl.int64) * stride_c
        else:
            offs = pid_b.to(tl.int64) * stride_b + offs_p[:, None] * stride_p + offs_c[None, :] * stride_c
        a = tl.load(x_ptr + offs, mask=mask, other=0.0).to(acc_t)
        dh = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(acc_t)
        if HAS_BIAS:
            b = tl.load(b_ptr + offs_c, mask=offs_c < C, other=0.0).to(acc_t)
            a = a + b[None, :]
        if NORMALIZE:
            h = a
            if ACT:
                h = tl.where(a > 0, a, a * slope)
            ms = tl.sum(h * h, axis=1) / C
            r = _inv_sqrt(ms + eps, ACC_F64)
            proj = tl.sum(dh * h, axis=1) / C
            dh = r[:, None] * dh - h * (r * r * r * proj)[:, None]
        if ACT:
            dh = tl.where(a > 0, dh, dh * slope)
        if BIAS_GRAD:
            partial = tl.sum(dh, axis=0)  # this block's share of the bias gradient
            if CHANNEL_I64:  # the partial sums may hold as many elements as x: row * C past int32 too
                row = pid_b.to(tl.int64) * tl.num_programs(0) + pid_p
            else:
                row = pid_b * tl.num_programs(0) + pid_p
            tl.store(db_ptr + row * C + offs_c, partial.to(db_ptr.dtype.element_ty), mask=offs_c < C)
        tl.store(dx_ptr + offs, dh.to(dx_ptr.dtype.element_ty), mask=mask)


def _channel_i64(C: int, stride_c: int, partial_rows: int = 0) -> bool:
    """Whether a channel's offset within a sample, ``c * stride_c``, or an offset into the backward's
    (partial_rows, C) bias-gradient partial sums can pass int32: Triton types the arange of channels,
    the program ids and a stride below 2^31 as int32, and their product wrapped silently (channel
    2048 of a (N, 4096, 1024, 1024) tensor was read 2^32 elements before the sample). The kernels
    then take the int64 form; every other launch keeps the int32 one, the validated code."""
    return max((C - 1) * abs(stride_c), partial_rows * C - 1) > 2**31 - 1


def _triton_blocks(C: int, P: int) -> tuple[int, int, int]:
    if C > MAX_TRITON_CHANNELS:
        raise ValueError(f"pixel_norm: the triton backend supports up to {MAX_TRITON_CHANNELS} "
                         f"channels, got {C}; use backend='torch'")
    block_c = triton.next_power_of_2(max(C, 1))  # C = 0: an empty tensor's backward still sizes its blocks
    block_p = max(1, min(triton.next_power_of_2(P), 4096 // block_c))
    num_warps = 4 if block_c * block_p <= 2048 else 8
    return block_c, block_p, num_warps


def _epilogue_refusals(x: torch.Tensor, bias_grad: bool) -> tuple[tuple[str, str], ...]:
    """``(backend, why)`` for each fused backend whose channel-epilogue kernels cannot take
    ``x`` (see _backend.resolve_for_device). Decided on the shape alone, for the forward and the
    backward together: the backward runs on the backend the forward chose, when it is too late
    to fall back. ``bias_grad``: the backward sums a bias gradient.

    - triton: one program holds a pixel's channels (at most MAX_TRITON_CHANNELS); the launch grid
      is (pixel blocks, B), B = N for (N, C, H, W) input and 1 for (N, C);
    - cuda (csrc/pixel_norm.cu, grid_for): (ceil(P / kPixelsPerBlock), B); a bias gradient takes at
      most kMaxBiasGradChannels channels.
    """
    if x.numel() == 0:  # nothing launches
        return ()
    b, c, p = (1, x.shape[1], x.shape[0]) if x.dim() == 2 else (x.shape[0], x.shape[1], x.shape[2] * x.shape[3])
    refused = []
    if triton is not None:
        if c > MAX_TRITON_CHANNELS:
            refused.append(("triton", f"its kernel holds a pixel's channels in registers, at most "
                                      f"{MAX_TRITON_CHANNELS} channels, got {c}"))
        else:  # p pixel blocks at most (the block size would fix P and C in a torch.compile graph)
            excess = _backend.grid_excess((p, b))
            if excess:
                refused.append(("triton", f"its launch would need {excess} (one row of blocks per sample; "
                                          f"input of shape {tuple(x.shape)})"))
    excess = _backend.grid_excess((-(-p // CUDA_PIXELS_PER_BLOCK), b))
    if excess:
        refused.append(("cuda", f"its launch would need {excess} (one row of blocks per sample; "
                                f"input of shape {tuple(x.shape)})"))
    if bias_grad and c > MAX_CUDA_BIAS_CHANNELS:
        refused.append(("cuda", f"its bias gradient takes at most {MAX_CUDA_BIAS_CHANNELS} channels, got {c}"))
    return tuple(refused)


def _cuda_launch_args(x: torch.Tensor):
    """The extension module and the current stream, for backend='cuda' launches."""
    ext = _backend.cuda_extension()
    stream = torch.cuda.current_stream(x.device).cuda_stream
    return ext, stream



# --------------------------------------------------------------------------- custom ops
# One pair of ops serves every per-channel epilogue: pixel_norm (normalize), the generator's
# bias + leaky ReLU + pixel norm (bias, act, normalize) and the discriminator's bias + leaky
# ReLU (bias, act; see bias_lrelu.py). The CUDA extension implements the normalizing ones.

@torch.library.custom_op("xrayforge::channel_epilogue_fwd", mutates_args=())
def _epilogue_fwd(x: torch.Tensor, bias: Optional[torch.Tensor], slope: float, eps: float, act: bool,
                  normalize: bool, backend: str) -> torch.Tensor:
    y = torch.empty_like(x)
    B, C, P, sb, sc, sp = channel_view(x)
    if x.numel() == 0:
        return y
    bias = bias.contiguous() if bias is not None else None
    if backend == "triton":
        block_c, block_p, num_warps = _triton_blocks(C, P)
        grid = (triton.cdiv(P, block_p), B)
        with device_guard(x):  # Triton launches on the current device
            _epilogue_fwd_kernel[grid](x, bias if bias is not None else x, y, C, P, sb, sc, sp, *split_float(slope),
                                       *split_float(eps), HAS_BIAS=bias is not None, ACT=act, NORMALIZE=normalize,
                                       ACC_F64=x.dtype == torch.float64, CHANNEL_I64=_channel_i64(C, sc),
                                       BLOCK_C=block_c, BLOCK_P=block_p, num_warps=num_warps)
    elif backend == "cuda" and normalize and act == (bias is not None):
        ext, stream = _cuda_launch_args(x)
        with device_guard(x):  # the kernel launches on the current device, into x's device's stream
            ext.pixel_norm_forward(x.data_ptr(), bias.data_ptr() if bias is not None else 0,
                                   dtype_code(bias) if bias is not None else -1, y.data_ptr(),
                                   dtype_code(x), B, C, P, sb, sc, sp, float(slope), float(eps), stream)
    else:
        raise ValueError(f"channel_epilogue_fwd: no fused kernel for backend {backend!r} "
                         f"(act={act}, normalize={normalize})")
    return y


@_epilogue_fwd.register_fake
def _(x, bias, slope, eps, act, normalize, backend):
    return torch.empty_like(x)


@torch.library.custom_op("xrayforge::channel_epilogue_bwd", mutates_args=())
def _epilogue_bwd(dy: torch.Tensor, x: torch.Tensor, bias: Optional[torch.Tensor], slope: float, eps: float,
                  act: bool, normalize: bool, bias_grad: bool, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, db): db is summed in float32 (float64 for float64 x), empty unless bias_grad."""
    dy = like_layout(dy, x)
    dx = torch.empty_like(x)
    B, C, P, sb, sc, sp = channel_view(x)
    bias = bias.contiguous() if bias is not None else None
    if backend == "triton":
        block_c, block_p, num_warps = _triton_blocks(C, P)
        grid = (triton.cdiv(P, block_p), B)
        partial = torch.zeros((grid[0] * grid[1] if bias_grad else 0, C), device=x.device, dtype=accumulation_dtype(x))
        if x.numel():
            with device_guard(x):
                _epilogue_bwd_kernel[grid](x, bias if bias is not None else x, dy, dx, partial, C, P, sb, sc, sp,
                                           *split_float(slope), *split_float(eps), HAS_BIAS=bias is not None, ACT=act,
                                           NORMALIZE=normalize, BIAS_GRAD=bias_grad,
                                           ACC_F64=x.dtype == torch.float64,
                                           CHANNEL_I64=_channel_i64(C, sc, partial.shape[0]),
                                           BLOCK_C=block_c, BLOCK_P=block_p, num_warps=num_warps)
    elif backend == "cuda" and normalize and act == (bias is not None) and bias_grad == act:
        ext, stream = _cuda_launch_args(x)
        partial = torch.zeros((ext.pixel_norm_partial_rows(B, P) if bias_grad else 0, C), device=x.device,
                              dtype=accumulation_dtype(x))
        if x.numel():
            with device_guard(x):
                ext.pixel_norm_backward(x.data_ptr(), bias.data_ptr() if bias is not None else 0,
                                        dtype_code(bias) if bias is not None else -1, dy.data_ptr(), dx.data_ptr(),
                                        partial.data_ptr() if bias_grad else 0, dtype_code(x),
                                        B, C, P, sb, sc, sp, float(slope), float(eps), stream)
    else:
        raise ValueError(f"channel_epilogue_bwd: no fused kernel for backend {backend!r} "
                         f"(act={act}, normalize={normalize})")
    db = partial.sum(0) if bias_grad else x.new_empty(0, dtype=accumulation_dtype(x))
    return dx, db


@_epilogue_bwd.register_fake
def _(dy, x, bias, slope, eps, act, normalize, bias_grad, backend):
    n = x.shape[1] if bias_grad else 0
    return torch.empty_like(x), x.new_empty(n, dtype=accumulation_dtype(x))


# --------------------------------------------------------------------------- autograd
class _PixelNormFunction(torch.autograd.Function):
    """pixel_norm (bias None) or bias_lrelu_pixel_norm, fused forward and backward."""

    @staticmethod
    def forward(ctx, x, bias, slope, eps, backend):
        ctx.save_for_backward(x, bias)
        ctx.cfg = (slope, eps, backend)
        return torch.ops.xrayforge.channel_epilogue_fwd(x, bias, slope, eps, bias is not None, True, backend)

    @staticmethod
    def backward(ctx, dy):
        x, bias = ctx.saved_tensors
        dx, db = _PixelNormBackward.apply(dy, x, bias, *ctx.cfg)
        return dx, (db if bias is not None else None), None, None, None


class _PixelNormBackward(torch.autograd.Function):
    """The fused backward as a differentiable function of (dy, x, bias)."""

    @staticmethod
    def forward(ctx, dy, x, bias, slope, eps, backend):
        ctx.save_for_backward(dy, x, bias)
        ctx.cfg = (slope, eps)
        has_bias = bias is not None
        dx, db = torch.ops.xrayforge.channel_epilogue_bwd(dy, x, bias, slope, eps, has_bias, True, has_bias, backend)
        return dx, (db.to(bias.dtype) if has_bias else db)

    @staticmethod
    def backward(ctx, ddx, ddb):
        dy, x, bias = ctx.saved_tensors
        slope, eps = ctx.cfg
        if bias is None:
            gx, gdy = reference_double_backward(lambda x_: reference(x_, eps), (x,), dy, (ddx,))
            gb = None
        else:
            gx, gb, gdy = reference_double_backward(
                lambda x_, b_: reference_bias_lrelu(x_, b_, slope, eps), (x, bias), dy, (ddx, ddb))
        return gdy, gx, gb, None, None, None


# --------------------------------------------------------------------------- public API
def _check_input(op: str, x: torch.Tensor) -> torch.Tensor:
    check_float(op, x)
    if x.dim() not in (2, 4):
        raise ValueError(f"{op}: expected an (N, C) or (N, C, H, W) tensor, got shape {tuple(x.shape)}")
    return x


def pixel_norm(x: torch.Tensor, eps: float = 1e-8, backend: str | None = None) -> torch.Tensor:
    """``x * rsqrt(mean over channels of x**2 + eps)`` for (N, C) or (N, C, H, W) tensors.

    Contiguous and channels_last inputs keep their layout; other strides are copied first.
    Under ``auto``, an input a fused kernel cannot take (more than MAX_TRITON_CHANNELS channels
    for Triton; a batch past a launch grid's limit) goes to the next backend that can, logged
    once; a backend named explicitly raises BackendUnavailableError saying which limit.
    """
    _check_input("pixel_norm", x)
    check_number("pixel_norm", "eps", eps)
    impl = _backend.resolve("pixel_norm", x, backend, _epilogue_refusals(x, bias_grad=False))
    if impl == "torch":
        return reference(x, eps)
    return _PixelNormFunction.apply(dense(x), None, float(0.0), float(eps), impl)


def bias_lrelu_pixel_norm(x: torch.Tensor, bias: torch.Tensor, slope: float = 0.2, eps: float = 1e-8,
                          backend: str | None = None) -> torch.Tensor:
    """``pixel_norm(leaky_relu(x + bias[None, :, None, None], slope), eps)`` in one pass.

    The generator's whole conv epilogue. ``bias`` has shape (C,); the result has x's dtype.
    The fused kernels' limits are pixel_norm's, and the CUDA kernel's bias gradient takes at most
    MAX_CUDA_BIAS_CHANNELS channels: ``auto`` falls back past them, a named backend raises.
    """
    _check_input("bias_lrelu_pixel_norm", x)
    check_float("bias_lrelu_pixel_norm (bias)", bias)
    check_number("bias_lrelu_pixel_norm", "slope", slope)
    check_number("bias_lrelu_pixel_norm", "eps", eps)
    if bias.dim() != 1 or bias.shape[0] != x.shape[1]:
        raise ValueError(f"bias_lrelu_pixel_norm: bias must have shape ({x.shape[1]},), "
                         f"got {tuple(bias.shape)}")
    if bias.device != x.device:
        raise ValueError(f"bias_lrelu_pixel_norm: x is on {x.device} but bias is on {bias.device}")
    # refused in the forward, not in the backward (the bias gradient's limit included)
    impl = _backend.resolve("bias_lrelu_pixel_norm", x, backend, _epilogue_refusals(x, bias_grad=True))
    if impl == "torch":
        return reference_bias_lrelu(x, bias, slope, eps)
    return _PixelNormFunction.apply(dense(x), bias, float(slope), float(eps), impl)
