"""Minibatch standard deviation (Karras et al. 2018, section 3), as in the official PGGAN.

The batch of N is split into G = min(group_size, N) strided groups: ``x.reshape(G, M, ...)``
with M = N // G, so sample i belongs to group ``i % M``. For each group and each of the
``num_channels`` channel slices, the biased variance over the group's G members is taken per
element, ``sqrt(var + 1e-8)`` is averaged over the slice's channels and pixels, and the
result is appended to every member of the group as an extra constant feature map.

It sits in the discriminator, so WGAN-GP differentiates its gradient: the fused backward is
itself differentiable (through the reference).
"""
from __future__ import annotations

import torch

from . import _backend
from ._common import (accumulation_dtype, check_float, check_int, dense, device_guard, dtype_code,
                      reference_double_backward)

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is a declared dependency
    triton = None

EPS = 1e-8
CUDA_THREADS = 256  # csrc/minibatch_stddev.cu: kThreads (the backward's elements per block along grid.x)


def group_size_for(n: int, group_size: int = 4) -> int:
    """The group size the op uses for a batch of n: ``min(group_size, n)``."""
    return min(group_size, n)


def _check(x: torch.Tensor, group_size: int, num_channels: int) -> tuple[int, int]:
    check_float("minibatch_stddev", x)
    if x.dim() != 4:
        raise ValueError(f"minibatch_stddev: expected an (N, C, H, W) tensor, got shape {tuple(x.shape)}")
    n, c = x.shape[:2]
    # a float reached Triton's next_power_of_2 (a TypeError from inside Triton), 2.5 was said not
    # to divide the batch, and True was a group of 1 to the kernels and an error to the reference
    group_size = check_int("minibatch_stddev", "group_size", group_size)
    num_channels = check_int("minibatch_stddev", "num_channels", num_channels)
    if group_size < 1 or num_channels < 1:
        raise ValueError(f"minibatch_stddev: group_size and num_channels must be >= 1, got "
                         f"{group_size} and {num_channels}")
    if n == 0:
        raise ValueError("minibatch_stddev: the batch is empty")
    if x.numel() == 0:  # no element to take a deviation over: the statistic is undefined
        raise ValueError(f"minibatch_stddev: samples of shape {tuple(x.shape[1:])} hold no features")
    g = group_size_for(n, group_size)
    if n % g:
        raise ValueError(f"minibatch_stddev: batch size {n} is not divisible by the group size {g}; "
                         f"use a batch that is a multiple of {g} or a group size that divides {n}")
    if c % num_channels:
        raise ValueError(f"minibatch_stddev: {c} channels cannot be split into {num_channels} slices")
    return g, num_channels


# --------------------------------------------------------------------------- reference
def reference(x: torch.Tensor, group_size: int = 4, num_channels: int = 1) -> torch.Tensor:
    """The official formula in plain PyTorch: the specification and the CPU path. Half-precision
    inputs are computed in float32 and the statistic cast back, as the official code does (and the
    kernels, which accumulate in float32): in bf16 the variance of a batch that has nearly
    collapsed to one image came out about 4% high."""
    g, f = _check(x, group_size, num_channels)
    n, c, h, w = x.shape
    y = x.reshape(g, -1, f, c // f, h, w)             # [G, M, F, C/F, H, W]
    if y.dtype in (torch.float16, torch.bfloat16):
        y = y.float()
    y = y - y.mean(dim=0)
    y = (y.square().mean(dim=0) + EPS).sqrt()          # biased variance over the group
    y = y.mean(dim=(2, 3, 4))                          # [M, F]
    y = y.reshape(-1, f, 1, 1).repeat(g, 1, h, w)      # sample i gets group i % M
    return torch.cat([x, y.to(x.dtype)], dim=1)


# --------------------------------------------------------------------------- triton
if triton is not None:

    @triton.jit
    def _mbstd_group_tile(x_ptr, pid_k, mf, G, M, F, CF, H, W, sxn, sxc, sxh, sxw,
                          ACC_F64: tl.constexpr, I64: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_K: tl.constexpr):
        """Load one (G, BLOCK_K) tile of a group's channel slice; return it with its stats. I64: the
        element index k and the offsets within a sample in int64 (see _sample_i64); the int32 form
        is the GPU-validated one."""
        acc_t = tl.float64 if ACC_F64 else tl.float32
        m = mf // F
        f = mf % F
        if I64:
            k = pid_k.to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
        else:
            k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        hw = H * W
        c = f * CF + k // hw
        p = k % hw
        offs_g = tl.arange(0, BLOCK_G)
        n = (offs_g * M + m).to(tl.int64)
        if I64:  # CF * hw itself may pass int32
            mask = (offs_g[:, None] < G) & ((k // hw)[None, :] < CF)
        else:
            mask = (offs_g[:, None] < G) & (k[None, :] < CF * hw)
        inner = c * sxc + (p // W) * sxh + (p % W) * sxw
        x = tl.load(x_ptr + n[:, None] * sxn + inner[None, :], mask=mask, other=0.0).to(acc_t)
        mean = tl.sum(x, axis=0) / G
        d = tl.where(mask, x - mean[None, :], 0.0)
        sigma = tl.sqrt(tl.sum(d * d, axis=0) / G + 1e-8)
        return x, d, sigma, n, c, p, mask

    @triton.jit
    def _mbstd_fwd_kernel(x_ptr, out_ptr, partial_ptr, G, M, F, CF, H, W,
                          sxn, sxc, sxh, sxw, son, soc, soh, sow,
                          ACC_F64: tl.constexpr, I64: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_K: tl.constexpr):
        pid_k = tl.program_id(0)
        mf = tl.program_id(1)
        x, d, sigma, n, c, p, mask = _mbstd_group_tile(x_ptr, pid_k, mf, G, M, F, CF, H, W,
                                                       sxn, sxc, sxh, sxw, ACC_F64, I64, BLOCK_G, BLOCK_K)
        # the copy of x into the output rides along with the statistics
        o = n[:, None] * son + (c * soc + (p // W) * soh + (p % W) * sow)[None, :]
        tl.store(out_ptr + o, x.to(out_ptr.dtype.element_ty), mask=mask)
        sigma = tl.where(mask, sigma[None, :], 0.0)
        partial = tl.sum(tl.sum(sigma, axis=1), axis=0) / G  # each column counted G times
        if I64:
            tl.store(partial_ptr + mf.to(tl.int64) * tl.num_programs(0) + pid_k, partial)
        else:
            tl.store(partial_ptr + mf * tl.num_programs(0) + pid_k, partial)

    @triton.jit
    def _mbstd_bwd_kernel(x_ptr, dout_ptr, coef_ptr, dx_ptr, G, M, F, CF, H, W,
                          sxn, sxc, sxh, sxw, sdn, sdc, sdh, sdw,
                          ACC_F64: tl.constexpr, I64: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_K: tl.constexpr):
        # d sigma_k / d x_gk = (x_gk - mean_k) / (G sigma_k); coef = dstat / (C/F * H * W)
        pid_k = tl.program_id(0)
        mf = tl.program_id(1)
        x, d, sigma, n, c, p, mask = _mbstd_group_tile(x_ptr, pid_k, mf, G, M, F, CF, H, W,
                                                       sxn, sxc, sxh, sxw, ACC_F64, I64, BLOCK_G, BLOCK_K)
        coef = tl.load(coef_ptr + mf)
        dpass = tl.load(dout_ptr + n[:, None] * sdn + (c * sdc + (p // W) * sdh + (p % W) * sdw)[None, :],
                        mask=mask, other=0.0).to(coef.dtype)
        dx = dpass + coef * d / (G * sigma[None, :])
        xo = n[:, None] * sxn + (c * sxc + (p // W) * sxh + (p % W) * sxw)[None, :]
        tl.store(dx_ptr + xo, dx.to(dx_ptr.dtype.element_ty), mask=mask)


def _blocks(g: int, k: int) -> tuple[int, int]:
    block_g = triton.next_power_of_2(g)
    return block_g, max(16, min(triton.next_power_of_2(k), 2048 // block_g))


def _sample_i64(k: int, block_k: int, *tensors: torch.Tensor) -> bool:
    """Whether the kernels' indices within a sample can pass int32: the element index (up to k
    rounded up to whole blocks) or the offset of an element from its sample's start in any of
    ``tensors`` (x and the output or its gradient). Triton types the program ids, the aranges and
    strides below 2^31 as int32, and their products wrapped silently (a (4, 4096, 1024, 1024) x
    read channel 2048 on 2^32 elements before its sample). Those launches take the int64 form."""
    reach = triton.cdiv(k, block_k) * block_k
    for t in tensors:
        reach = max(reach, sum((size - 1) * abs(stride) for size, stride in zip(t.shape[1:], t.stride()[1:])))
    return reach > 2**31 - 1



def _refusals(x: torch.Tensor, g: int, f: int) -> tuple[tuple[str, str], ...]:
    """``(backend, why)`` for each fused backend whose kernels cannot take ``x`` with group size
    ``g`` and ``f`` channel slices (see _backend.resolve_for_device): their launch grids put one
    block, or one row of blocks, per (group, slice) pair, M * F of them. Decided on the shape
    alone, for the forward and the backward together: the backward runs on the backend the
    forward chose, when it is too late to fall back.

    - cuda (csrc/minibatch_stddev.cu): the forward launches M * F blocks along grid.x, the
      backward ceil(K / kThreads) along x by M * F along y (at most 65535);
    - triton: forward and backward launch (K blocks, M * F) (the same limit along y).
    """
    n, c, h, w = x.shape
    m, k = n // g, (c // f) * h * w
    def pairs() -> str:  # only where refused: formatting a size fixes it in a torch.compile graph
        return f"one per group and channel slice: {m} groups × {f} slices; x of shape {tuple(x.shape)}, group size {g}"
    refused = []
    for what, grid in (("forward", (m * f,)), ("backward", (-(-k // CUDA_THREADS), m * f))):
        excess = _backend.grid_excess(grid)
        if excess:
            refused.append(("cuda", f"its {what} would launch {excess} ({pairs()})"))
            break
    if triton is not None:
        _, block_k = _blocks(g, k)
        excess = _backend.grid_excess((-(-k // block_k), m * f))
        if excess:
            refused.append(("triton", f"its launches would need {excess} ({pairs()})"))
    return tuple(refused)


def _out_like(x: torch.Tensor, f: int) -> torch.Tensor:
    n, c, h, w = x.shape
    fmt = torch.contiguous_format if x.is_contiguous() else torch.channels_last
    return torch.empty((n, c + f, h, w), dtype=x.dtype, device=x.device, memory_format=fmt)



# --------------------------------------------------------------------------- custom ops
@torch.library.custom_op("xrayforge::minibatch_stddev_fwd", mutates_args=())
def _mbstd_fwd(x: torch.Tensor, group_size: int, num_channels: int, backend: str) -> torch.Tensor:
    n, c, h, w = x.shape
    g, f = group_size_for(n, group_size), num_channels
    m, cf = n // g, c // f
    k = cf * h * w
    out = _out_like(x, f)
    if backend == "triton":
        block_g, block_k = _blocks(g, k)
        grid = (triton.cdiv(k, block_k), m * f)
        partial = torch.empty((m * f, grid[0]), device=x.device, dtype=accumulation_dtype(x))
        with device_guard(x):  # Triton launches on the current device
            _mbstd_fwd_kernel[grid](x, out, partial, g, m, f, cf, h, w, *x.stride(), *out.stride(),
                                    ACC_F64=x.dtype == torch.float64, I64=_sample_i64(k, block_k, x, out),
                                    BLOCK_G=block_g, BLOCK_K=block_k)
        stat = partial.sum(1) / k
    elif backend == "cuda":
        ext = _backend.cuda_extension()
        stat = torch.empty((m * f,), device=x.device, dtype=accumulation_dtype(x))
        with device_guard(x):  # the kernel launches on the current device, into x's device's stream
            ext.minibatch_stddev_forward(x.data_ptr(), out.data_ptr(), stat.data_ptr(), dtype_code(x),
                                         g, m, f, cf, h, w, *x.stride(), *out.stride(),
                                         torch.cuda.current_stream(x.device).cuda_stream)
    else:
        raise ValueError(f"minibatch_stddev_fwd: no fused kernel for backend {backend!r}")
    out[:, c:] = stat.view(m, f, 1, 1).repeat(g, 1, h, w).to(x.dtype)
    return out


@_mbstd_fwd.register_fake
def _(x, group_size, num_channels, backend):
    return _out_like(x, num_channels)


@torch.library.custom_op("xrayforge::minibatch_stddev_bwd", mutates_args=())
def _mbstd_bwd(dout: torch.Tensor, x: torch.Tensor, group_size: int, num_channels: int,
               backend: str) -> torch.Tensor:
    n, c, h, w = x.shape
    g, f = group_size_for(n, group_size), num_channels
    m, cf = n // g, c // f
    k = cf * h * w
    dx = torch.empty_like(x)
    # gradient reaching each group's statistic: the sum over its broadcast copies
    coef = dout[:, c:].to(accumulation_dtype(x)).reshape(g, m, f, h * w).sum(dim=(0, 3)).reshape(-1) / k
    if backend == "triton":
        block_g, block_k = _blocks(g, k)
        grid = (triton.cdiv(k, block_k), m * f)
        with device_guard(x):
            _mbstd_bwd_kernel[grid](x, dout, coef, dx, g, m, f, cf, h, w, *x.stride(), *dout.stride(),
                                    ACC_F64=x.dtype == torch.float64, I64=_sample_i64(k, block_k, x, dout),
                                    BLOCK_G=block_g, BLOCK_K=block_k)
    elif backend == "cuda":
        ext = _backend.cuda_extension()
        with device_guard(x):
            ext.minibatch_stddev_backward(x.data_ptr(), dout.data_ptr(), coef.contiguous().data_ptr(),
                                          dx.data_ptr(), dtype_code(x), g, m, f, cf, h, w, *x.stride(),
                                          *dout.stride(), torch.cuda.current_stream(x.device).cuda_stream)
    else:
        raise ValueError(f"minibatch_stddev_bwd: no fused kernel for backend {backend!r}")
    return dx


@_mbstd_bwd.register_fake
def _(dout, x, group_size, num_channels, backend):
    return torch.empty_like(x)


# --------------------------------------------------------------------------- autograd
class _MinibatchStddevFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group_size, num_channels, backend):
        ctx.save_for_backward(x)
        ctx.cfg = (group_size, num_channels, backend)
        return torch.ops.xrayforge.minibatch_stddev_fwd(x, group_size, num_channels, backend)

    @staticmethod
    def backward(ctx, dout):
        (x,) = ctx.saved_tensors
        return _MinibatchStddevBackward.apply(dout, x, *ctx.cfg), None, None, None


class _MinibatchStddevBackward(torch.autograd.Function):
    """The fused backward as a differentiable function of (dout, x)."""

    @staticmethod
    def forward(ctx, dout, x, group_size, num_channels, backend):
        ctx.save_for_backward(dout, x)
        ctx.cfg = (group_size, num_channels)
        return torch.ops.xrayforge.minibatch_stddev_bwd(dout, x, group_size, num_channels, backend)

    @staticmethod
    def backward(ctx, ddx):
        dout, x = ctx.saved_tensors
        group_size, num_channels = ctx.cfg
        gx, gdout = reference_double_backward(lambda x_: reference(x_, group_size, num_channels),
                                              (x,), dout, (ddx,))
        return gdout, gx, None, None, None


# --------------------------------------------------------------------------- public API
def minibatch_stddev(x: torch.Tensor, group_size: int = 4, num_channels: int = 1,
                     backend: str | None = None) -> torch.Tensor:
    """Append the minibatch-stddev feature map(s): (N, C, H, W) -> (N, C + num_channels, H, W).

    Raises ValueError when N is not divisible by ``min(group_size, N)``. The fused kernels take at
    most 65535 (group, channel slice) pairs (N / group size × num_channels: a launch grid's y
    limit): past that ``auto`` falls back to the reference, logged once, and a backend named
    explicitly raises BackendUnavailableError saying the limit and the shape.
    """
    g, f = _check(x, group_size, num_channels)
    impl = _backend.resolve("minibatch_stddev", x, backend, _refusals(x, g, f))
    if impl == "torch":
        return reference(x, group_size, num_channels)
    return _MinibatchStddevFunction.apply(dense(x), int(group_size), int(num_channels), impl)
