"""Masked feature moments: the counts, means and centred second moments of K row subsets of a
feature batch, in one call, as float64.

``masked_moments(x, masks=None)`` takes features ``x`` (N, D; fp32 / bf16 / fp16 / float64)
and ``masks`` (K, N) booleans, one row subset each (``None``: one subset, every row), and
returns ``n`` (K,) int64, ``mean`` (K, D) float64 and ``m2`` (K, D, D) float64, the sum over
the subset of ``(x - mean)(x - mean)ᵀ`` (divide by ``n - 1`` for numpy.cov). An empty subset
gives n = 0 and zeros. This is what FID per finding needs (every image plus one subset per
finding: K = 15 for ChestX-ray14) and what ``fid.StreamingMoments`` adds per batch (K = 1).

- ``reference``: one float64 matmul per subset on its gathered rows (what StreamingMoments did
  before this op): the specification and the CPU path.
- Triton, two kernels over the gathered row lists of all K subsets at once:
  1. the sums per subset in float64 (each value converted, then added in float64: float64
     rounding only), hence the means;
  2. the masked Gram of the rows shifted by their subset's mean rounded to fp32, on the upper
     triangle of (BM × BM) tiles only (the lower one is its transpose, stored by the same
     program): fp32 products (``tl.dot``, IEEE fp32 by default) summed in fp32 over a block of
     BN rows, each block's sums then added into a float64 accumulator. The shift is
     (almost) the mean, so no raw sum of squares of uncentred data is ever formed; the exact
     remainder ``n (mean - shift)(mean - shift)ᵀ`` is taken off in float64 afterwards.
  Accuracy against float64 numpy on each subset: means to float64 rounding; m2 to about 1e-8 of
  its largest entry at 50k rows (each fp32 block sum carries ~1e-7 relative rounding, which
  averages down over the blocks); subsets under EXACT_BELOW rows, where it would not, and
  float64 input go through the reference, and so do features whose largest magnitude is outside
  FP32_SAFE, where fp32 products would overflow or underflow.
  Measured on an H200 (50k × 2048 fp32, 2026-11-26): 10.4 ms for K = 1 and 18.9 ms for K = 15
  against 8.8 and 17.1 ms for the float64 loop (Hopper's float64 tensor cores run it at
  48 TFLOP/s), so ``auto`` keeps the reference; the kernel is for GPUs with slow float64. That
  was before subsets under EXACT_BELOW rows went to float64, and that Gram kernel ran 4 warps at
  255 registers (one variant spilled, per the sm_90 AOT compile); it now runs 8 (135 registers,
  no spills): not yet measured.
"""
from __future__ import annotations


import torch

from . import _backend
from ._common import device_guard
from ..errors import UserError

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is a declared dependency
    triton = None

# tl.dot's input precision for the Gram: "ieee" (fp32 FMA, the accuracy above) or "tf32x3"
# (three TF32 tensor-core products per fp32 product: ~2e-7 relative on an H200).
GRAM_PRECISION = "ieee"
# Subsets with fewer rows go through the float64 reference: a few fp32 block sums cannot average
# their rounding down (1.6e-7 of the largest entry measured on 33-90 rows on an H200), and a
# small subset's float64 matmul is cheap.
EXACT_BELOW = 1024
# Features whose largest magnitude is outside this range go through the float64 reference: the
# Gram's fp32 products of deviations (up to twice the largest magnitude) summed over a block of rows
# overflow to inf above ~2^60 (bf16 and fp32 reach 3e38), and below ~2^-32 the products of
# ulp-sized deviations fall among fp32's subnormals (or flush to zero) and lose their digits.
FP32_SAFE = (2.0 ** -32, 2.0 ** 56)


def _check(x: torch.Tensor, masks: torch.Tensor | None) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise UserError(f"masked_moments: expected (N, D) features, got shape "
                        f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if not x.is_floating_point():
        raise UserError(f"masked_moments: expected floating-point features, got {x.dtype}")
    if masks is None:
        return
    if not isinstance(masks, torch.Tensor) or masks.dim() != 2 or masks.dtype != torch.bool:
        raise UserError("masked_moments: masks must be a (K, N) boolean tensor, got "
                        + (f"{masks.dtype} of shape {tuple(masks.shape)}" if isinstance(masks, torch.Tensor)
                           else type(masks).__name__))
    if masks.shape[1] != x.shape[0]:
        raise UserError(f"masked_moments: masks cover {masks.shape[1]} rows, the features have {x.shape[0]}")
    if masks.shape[0] == 0:
        raise UserError("masked_moments: masks hold no subset (K = 0)")


# --------------------------------------------------------------------------- reference
def reference(x: torch.Tensor, masks: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(n (K,), mean (K, D), m2 (K, D, D)): one float64 matmul per subset, on x's device."""
    _check(x, masks)
    d = x.shape[1]
    if masks is None:  # every row: no mask, no gather
        rows = x.double()
        mean = rows.mean(0) if len(x) else rows.new_zeros(d)  # no rows: zeros, as for an empty subset
        xc = rows - mean
        return (torch.tensor([len(x)], dtype=torch.int64, device=x.device), mean[None], (xc.T @ xc)[None])
    masks = masks.to(x.device)
    k = len(masks)
    n = masks.sum(1).to(torch.int64)
    mean = torch.zeros(k, d, dtype=torch.float64, device=x.device)
    m2 = torch.zeros(k, d, d, dtype=torch.float64, device=x.device)
    # every subset's rows in one gather (subset after subset: nonzero() is row-major), then one
    # matmul per subset written in place: two host syncs in all, not one per boolean index
    counts = n.tolist()
    rows = x.index_select(0, masks.nonzero()[:, 1])  # in x's dtype: float64 one subset at a time
    start = 0
    for j, count in enumerate(counts):
        if count:
            sub = rows[start:start + count].double()
            torch.mean(sub, 0, out=mean[j])
            xc = sub - mean[j]
            torch.mm(xc.T, xc, out=m2[j])
        start += count
    return n, mean, m2


# --------------------------------------------------------------------------- Triton
if triton is not None:
    @triton.jit
    def _rows(idx_ptr, r, rmask, GATHER: tl.constexpr):
        """Feature rows of list positions r: through the subsets' index list, or r itself."""
        if GATHER:
            return tl.load(idx_ptr + r, mask=rmask, other=0).to(tl.int64)
        return r.to(tl.int64)

    @triton.jit
    def _sums_kernel(x_ptr, idx_ptr, offs_ptr, out_ptr, D, s_n, s_d,
                     GATHER: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr):
        k = tl.program_id(1)
        cols = tl.program_id(0) * BD + tl.arange(0, BD)
        cmask = cols < D
        start = tl.load(offs_ptr + k)
        end = tl.load(offs_ptr + k + 1)
        acc = tl.zeros((BD,), tl.float64)
        for r0 in range(start, end, BN):
            r = r0 + tl.arange(0, BN)
            rmask = r < end
            rows = _rows(idx_ptr, r, rmask, GATHER)
            v = tl.load(x_ptr + rows[:, None] * s_n + cols[None, :].to(tl.int64) * s_d,
                        mask=rmask[:, None] & cmask[None, :], other=0.0)
            acc += tl.sum(v.to(tl.float64), axis=0)
        tl.store(out_ptr + k.to(tl.int64) * D + cols, acc, mask=cmask)

    @triton.jit
    def _gram_kernel(x_ptr, idx_ptr, offs_ptr, shift_ptr, ti_ptr, tj_ptr, out_ptr, D, s_n, s_d, ROWS_PER,
                     GATHER: tl.constexpr, ATOMIC: tl.constexpr, PRECISION: tl.constexpr,
                     BN: tl.constexpr, BM: tl.constexpr):
        t = tl.program_id(0)
        k = tl.program_id(1)
        split = tl.program_id(2)
        ti = tl.load(ti_ptr + t)
        tj = tl.load(tj_ptr + t)
        a = ti * BM + tl.arange(0, BM)
        b = tj * BM + tl.arange(0, BM)
        amask = a < D
        bmask = b < D
        sa = tl.load(shift_ptr + k.to(tl.int64) * D + a, mask=amask, other=0.0)
        sb = tl.load(shift_ptr + k.to(tl.int64) * D + b, mask=bmask, other=0.0)
        start = tl.load(offs_ptr + k)
        end = tl.load(offs_ptr + k + 1)
        lo = start + split * ROWS_PER
        hi = tl.minimum(lo + ROWS_PER, end)
        acc = tl.zeros((BM, BM), tl.float64)
        for r0 in range(lo, hi, BN):
            r = r0 + tl.arange(0, BN)
            rmask = r < hi
            rows = _rows(idx_ptr, r, rmask, GATHER)
            xa = tl.load(x_ptr + rows[:, None] * s_n + a[None, :].to(tl.int64) * s_d,
                         mask=rmask[:, None] & amask[None, :], other=0.0).to(tl.float32)
            xb = tl.load(x_ptr + rows[:, None] * s_n + b[None, :].to(tl.int64) * s_d,
                         mask=rmask[:, None] & bmask[None, :], other=0.0).to(tl.float32)
            # shifted by (almost) the subset's mean; rows past the subset's end contribute zero
            xa = tl.where(rmask[:, None], xa - sa[None, :], 0.0)
            xb = tl.where(rmask[:, None], xb - sb[None, :], 0.0)
            block = tl.dot(tl.trans(xa), xb, input_precision=PRECISION)  # this block's rows, fp32
            acc += block.to(tl.float64)
        base = out_ptr + k.to(tl.int64) * D * D
        omask = amask[:, None] & bmask[None, :]
        upper = base + a[:, None].to(tl.int64) * D + b[None, :]
        lower = base + b[None, :].to(tl.int64) * D + a[:, None]  # the transposed tile
        if ATOMIC:
            tl.atomic_add(upper, acc, mask=omask)
            if ti != tj:
                tl.atomic_add(lower, acc, mask=omask)
        else:
            tl.store(upper, acc, mask=omask)
            if ti != tj:
                tl.store(lower, acc, mask=omask)


def _subsets(x: torch.Tensor, masks: torch.Tensor | None):
    """(gather, row index list of every subset in turn (int32), offsets (K + 1), counts (K,))."""
    dev = x.device
    if masks is None:
        n = torch.tensor([len(x)], dtype=torch.int64, device=dev)
        return False, torch.zeros(1, dtype=torch.int32, device=dev), torch.tensor([0, len(x)], device=dev), n
    masks = masks.to(dev)
    n = masks.sum(1).to(torch.int64)
    idx = masks.nonzero()[:, 1].to(torch.int32)  # row-major: subset 0's rows, then subset 1's, ...
    offs = torch.zeros(len(masks) + 1, dtype=torch.int64, device=dev)
    offs[1:] = n.cumsum(0)
    return True, idx, offs, n


def _triton(x: torch.Tensor, masks: torch.Tensor | None = None, precision: str | None = None,
            blocks: tuple[int, int] | None = None, splits: int | None = None, exact_below: int | None = None):
    """The Triton path: subsets of at least ``exact_below`` rows (default EXACT_BELOW) through
    the kernels, smaller ones through the float64 reference. ``precision``: tl.dot input
    precision (default GRAM_PRECISION); ``blocks``: (BN rows, BM columns) per tile; ``splits``:
    programs per tile and subset, each on its share of the rows, added atomically (default:
    enough programs to fill an H100)."""
    if x.dtype == torch.float64:
        return reference(x, masks)
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise UserError(f"masked_moments: the Triton path takes fp32 / bf16 / fp16 features, got {x.dtype}")
    exact_below = EXACT_BELOW if exact_below is None else exact_below
    counts = torch.tensor([len(x)]) if masks is None else masks.sum(1).cpu()
    small = counts < exact_below
    if bool(small.all()):
        return reference(x, masks)
    # the largest magnitude without an abs() copy of the features; NaN / inf propagate
    largest = float(torch.linalg.vector_norm(x, float("inf"))) if x.numel() else 0.0
    if largest != 0.0 and not FP32_SAFE[0] <= largest <= FP32_SAFE[1]:  # NaN too: the reference says it
        return reference(x, masks)
    if not bool(small.any()):
        return _kernels(x, masks, precision, blocks, splits, int(counts.max()))
    masks = masks.to(x.device)
    big, few = (~small).nonzero()[:, 0].to(x.device), small.nonzero()[:, 0].to(x.device)
    n = torch.empty(len(masks), dtype=torch.int64, device=x.device)
    mean = torch.empty(len(masks), x.shape[1], dtype=torch.float64, device=x.device)
    m2 = torch.empty(len(masks), x.shape[1], x.shape[1], dtype=torch.float64, device=x.device)
    n[big], mean[big], m2[big] = _kernels(x, masks[big], precision, blocks, splits, int(counts.max()))
    n[few], mean[few], m2[few] = reference(x, masks[few])
    return n, mean, m2


def _kernels(x: torch.Tensor, masks: torch.Tensor | None, precision: str | None, blocks, splits, largest: int):
    """The two kernels on the subsets of ``masks`` (``largest``: the most rows any has)."""
    gather, idx, offs, n = _subsets(x, masks)
    k, d = len(n), x.shape[1]
    interp = _backend.triton_interpreter_active()
    bn, bm = blocks or ((16, 16) if interp else (32, 64))
    with device_guard(x):
        sums = torch.empty(k, d, dtype=torch.float64, device=x.device)
        bd = 32 if interp else 128
        _sums_kernel[(triton.cdiv(d, bd), k)](x, idx, offs, sums, d, x.stride(0), x.stride(1),
                                              GATHER=gather, BN=16 if interp else 64, BD=bd, num_warps=4)
        mean = sums / n.clamp_min(1).to(torch.float64)[:, None]
        shift = mean.to(torch.float32)
        tiles = triton.cdiv(d, bm)
        ti, tj = torch.triu_indices(tiles, tiles, device=x.device).to(torch.int32)
        # split the rows when tiles × subsets alone cannot fill the GPU (few, narrow features)
        programs = max(1, len(ti) * k)  # no tiles for D = 0
        fill = max(1, min(triton.cdiv(4 * 132, programs), triton.cdiv(largest, 64 * bn)))
        want = splits or (1 if interp else fill)
        rows_per = max(bn, triton.cdiv(triton.cdiv(max(largest, 1), want), bn) * bn)
        parts = triton.cdiv(max(largest, 1), rows_per)
        out = (torch.zeros if parts > 1 else torch.empty)(k, d, d, dtype=torch.float64, device=x.device)
        _gram_kernel[(len(ti), k, parts)](x, idx, offs, shift, ti, tj, out, d, x.stride(0), x.stride(1), rows_per,
                                         GATHER=gather, ATOMIC=parts > 1,
                                         PRECISION=precision or GRAM_PRECISION, BN=bn, BM=bm,
                                         num_warps=4 if interp else 8)  # 8: the float64 tile in registers
    rest = mean - shift.to(torch.float64)  # exact remainder of the shift, taken off in float64
    out.baddbmm_((rest * n.to(torch.float64)[:, None])[:, :, None], rest[:, None, :], alpha=-1)
    return n, mean, out


def _refusals(masks: torch.Tensor | None) -> tuple[tuple[str, str], ...]:
    """``(backend, why)`` for the Triton kernels when they cannot take this many subsets (see
    _backend.resolve_for_device): both launch one row of blocks per subset, along grid.y."""
    k = 1 if masks is None else masks.shape[0]
    excess = _backend.grid_excess((1, k))
    return (("triton", f"its kernels would launch {excess} (one row of blocks per subset; {k} subsets)"),) \
        if excess else ()


# --------------------------------------------------------------------------- public
def masked_moments(x: torch.Tensor, masks: torch.Tensor | None = None, backend: str | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(n (K,) int64, mean (K, D) float64, m2 (K, D, D) float64) of the K row subsets of ``x``
    given by ``masks`` (K, N) bool (``None``: all rows). ``m2`` is the centred sum of outer
    products: ``m2[k] / (n[k] - 1)`` is subset k's covariance. Not differentiable. The Triton
    kernels take at most 65535 subsets: past that ``auto`` uses the reference, a named 'triton' raises."""
    _check(x, masks)
    impl = _backend.resolve("masked_moments", x, backend, _refusals(masks))
    with torch.no_grad():
        if impl == "triton":
            return _triton(x, masks)
        return reference(x, masks)
