"""k nearest neighbours: Euclidean distances fused with a running top-k, never holding the
query × reference distance matrix.

``knn(queries, refs, k)`` returns, for every query row, the distances to its k nearest
reference rows (ascending) and their indices. ``exclude_self=True`` says queries and refs are
the same set: a row is not its own neighbour (the radius of the k-nearest-neighbour ball that
precision / recall / density / coverage use).

Two steps. The search (a backend) picks candidates by the expansion ``|q|² + |r|² - 2 q·r``,
fast (a matmul) but not exact: its rounding is relative to ``|q|² + |r|²``, not to the distance,
so it loses the near neighbours (identical 32 × 32 images came out up to 1e-6 apart in float64,
identical rows of values near 100 several units apart in the fp32 kernel). Then :func:`knn`, whatever
the backend, recomputes each candidate's distance exactly, ``||q - r[i]||`` from the inputs as
given (the difference, its squares and their sum in float64: identical rows are exactly 0 apart),
and sorts the candidates by it (equal distances by index). The search asks for ``EXTRA_CANDIDATES``
more than k (at most ``MAX_K``, at most the references there are), so that candidates the
expansion misordered still come back in their exact order: the k returned are the exact k
nearest unless more than ``EXTRA_CANDIDATES`` other references lie within the expansion's
rounding of the k-th distance (where the selection is the expansion's, the distances reported
are still exact). The recompute is O(N·(k + extra)·D) against the search's O(N·M·D), done a
chunk of queries at a time.

- ``reference``: the torch search: chunked float64 expansion on chunks of queries and
  references, merged with ``topk``; the CPU path.
- Triton: one program per block of queries streams blocks of references; for each it computes
  the block of squared distances (``tl.dot`` with fp32 accumulation for fp32 / bf16 / fp16
  inputs, fp32 products as IEEE FMA or three TF32 products (``KNN_PRECISION``); exact squared
  differences for float64) and merges its k
  smallest into a running top-k held in registers (replace the current worst while a smaller
  one exists). The k results are sorted on the host.

``reference`` and ``_triton`` are the searches alone (the expansion's distances); :func:`knn`
is the op. Ties: references at exactly the same distance come back by index among the
candidates; which of them the search keeps at the edge of its candidates is the backend's.
The fp32 search's squared distances carry a relative error of about 1e-6 of ``|q|² + |r|²``,
float64's about 1e-16: references whose distances differ by less than that may be selected out
of order (see above).

Not differentiable: a search, whose indices have no gradient and whose distances the metrics
only read. Every backend returns tensors without autograd history, also for inputs that require
gradients, and builds no graph on the way (the reference runs under ``torch.no_grad``): features
taken from a network still attached to it cost no memory for a backward that will not come.
"""
from __future__ import annotations

import math
import numbers

import torch

from . import _backend
from ._common import device_guard
from ..errors import UserError

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is a declared dependency
    triton = None

MAX_K = 16  # each of the k merge passes is unrolled in the kernel
# tl.dot's input precision for fp32 features on a GPU: "ieee" (fp32 FMA on CUDA cores) or
# "tf32x3" (three TF32 tensor-core products per fp32 product, about fp32's accuracy). Measured on
# an H200 (2026-11-26), radii of 100k × 100k 2048-d features, k = 3: tf32x3 0.70 s, ieee 5.46 s,
# the float64 torch reference 1.29 s; the same neighbours as the reference on 2,000 checked rows,
# distances within 8e-8 (tf32x3) and 1.4e-7 (ieee) relative.
KNN_PRECISION = "tf32x3"
# candidates the search finds beyond the k asked for, re-ranked by their exact distances (see the
# module docstring): the reference's topk and the kernel's merge cost little more for them
EXTRA_CANDIDATES = 4
# elements of the (queries, candidates, D) block of gathered references the exact recompute holds
# at a time (float64: 32 MiB, plus the gathered rows in the input dtype)
EXACT_CHUNK_ELEMENTS = 1 << 22


def _check(queries: torch.Tensor, refs: torch.Tensor, k: int, exclude_self: bool) -> None:
    if not isinstance(queries, torch.Tensor) or not isinstance(refs, torch.Tensor):
        raise UserError(f"knn: expected tensors, got {type(queries).__name__} and {type(refs).__name__}")
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise UserError(f"knn: k must be an integer, got {k!r}")
    if queries.dim() != 2 or refs.dim() != 2:
        raise UserError(f"knn: expected (N, D) queries and (M, D) references, got shapes {tuple(queries.shape)} and "
                        f"{tuple(refs.shape)}")
    if queries.shape[1] != refs.shape[1]:
        raise UserError(f"knn: queries have {queries.shape[1]} features and references {refs.shape[1]}")
    if not queries.is_floating_point() or not refs.is_floating_point():
        raise UserError(f"knn: expected floating-point features, got {queries.dtype} and {refs.dtype}")
    if not 1 <= k <= MAX_K:
        raise UserError(f"knn: k must be in 1 .. {MAX_K}, got {k}")
    available = len(refs) - (1 if exclude_self else 0)
    if k > available:
        raise UserError(f"knn: k = {k} neighbours asked of {len(refs)} references"
                        + (" (a point is not its own neighbour)" if exclude_self else ""))
    if exclude_self and len(queries) != len(refs):
        raise UserError(f"knn: exclude_self needs the same set twice, got {len(queries)} and {len(refs)} rows")


# --------------------------------------------------------------------------- reference
@torch.no_grad()  # a search: no graph, no history (see the module docstring)
def reference(queries: torch.Tensor, refs: torch.Tensor, k: int, exclude_self: bool = False,
              chunk_q: int = 2048, chunk_r: int = 16384,
              groups: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The torch search: distances (N, k) ascending (float64, from the expansion: :func:`knn`
    recomputes them exactly) and indices (N, k) (int64), on the references' device; without
    autograd history. ``groups`` (int64 codes, one per row; queries and refs the same set): a
    reference of the query's own group is skipped, as ``exclude_self`` skips the row itself (a slot
    no reference of another group fills stays at +inf)."""
    _check(queries, refs, k, exclude_self)
    if groups is not None and (len(queries) != len(refs) or len(groups) != len(refs)):
        raise UserError(f"knn: groups need the same set twice and one code a row, got {len(queries)} and "
                        f"{len(refs)} rows and {len(groups)} codes")
    dev = refs.device
    ref_sq = refs.double().square().sum(1)
    dists = torch.empty(len(queries), k, dtype=torch.float64, device=dev)
    index = torch.empty(len(queries), k, dtype=torch.long, device=dev)
    for qs in range(0, len(queries), chunk_q):
        q = queries[qs:qs + chunk_q].to(dev).double()
        q_sq = q.square().sum(1, keepdim=True)
        best_d = torch.full((len(q), k), float("inf"), dtype=torch.float64, device=dev)
        best_i = torch.zeros(len(q), k, dtype=torch.long, device=dev)
        for rs in range(0, len(refs), chunk_r):
            r = refs[rs:rs + chunk_r].double()
            d2 = (q_sq + ref_sq[rs:rs + chunk_r][None, :] - 2 * q @ r.T).clamp_min_(0)
            if exclude_self:
                rows = torch.arange(qs, qs + len(q), device=dev)
                cols = rows - rs
                ok = (cols >= 0) & (cols < len(r))
                d2[ok.nonzero().squeeze(1), cols[ok]] = float("inf")
            if groups is not None:
                d2.masked_fill_(groups[qs:qs + len(q), None] == groups[None, rs:rs + len(r)], float("inf"))
            cand_d = torch.cat([best_d, d2], 1)
            cand_i = torch.cat([best_i, torch.arange(rs, rs + len(r), device=dev).expand(len(q), -1)], 1)
            best_d, pos = cand_d.topk(k, dim=1, largest=False, sorted=True)
            best_i = cand_i.gather(1, pos)
        dists[qs:qs + len(q)], index[qs:qs + len(q)] = best_d.sqrt(), best_i
    return dists, index


# --------------------------------------------------------------------------- Triton
if triton is not None:
    @triton.jit
    def _knn_kernel(q_ptr, r_ptr, qsq_ptr, rsq_ptr, out_d_ptr, out_i_ptr, Q, R, D,
                    s_qn, s_qd, s_rn, s_rd,
                    K: tl.constexpr, KP: tl.constexpr, EXCLUDE: tl.constexpr, EXACT64: tl.constexpr,
                    FP32: tl.constexpr, PRECISION: tl.constexpr, BQ: tl.constexpr, BR: tl.constexpr,
                    BD: tl.constexpr):
        pid = tl.program_id(0)
        qi = pid * BQ + tl.arange(0, BQ)
        qmask = qi < Q
        cols = tl.arange(0, KP)[None, :]
        acc_t = tl.float64 if EXACT64 else tl.float32
        # padding slots (k .. KP-1) hold -inf: never the worst, so never replaced
        inf = tl.full((BQ, KP), float("inf"), acc_t)
        best_d = tl.where(cols < K, inf, -inf)
        best_i = tl.zeros((BQ, KP), tl.int32)
        if not EXACT64:
            qsq = tl.load(qsq_ptr + qi, mask=qmask, other=0.0)
        for r0 in range(0, R, BR):
            ri = r0 + tl.arange(0, BR)
            rmask = ri < R
            acc = tl.zeros((BQ, BR), acc_t)
            for d0 in range(0, D, BD):
                dd = d0 + tl.arange(0, BD)
                dmask = dd < D
                # 64-bit offsets: N × D can pass 2^31 elements at archive scale
                qv = tl.load(q_ptr + qi[:, None].to(tl.int64) * s_qn + dd[None, :].to(tl.int64) * s_qd,
                             mask=qmask[:, None] & dmask[None, :], other=0.0)
                rv = tl.load(r_ptr + ri[:, None].to(tl.int64) * s_rn + dd[None, :].to(tl.int64) * s_rd,
                             mask=rmask[:, None] & dmask[None, :], other=0.0)
                if EXACT64:  # exact squared differences
                    diff = qv[:, None, :] - rv[None, :, :]
                    acc += tl.sum(diff * diff, axis=2)
                elif FP32:  # fp32 products: IEEE or three TF32 products, never plain TF32
                    acc = tl.dot(qv, tl.trans(rv), acc, input_precision=PRECISION)
                else:  # bf16 / fp16 products, fp32 accumulation
                    acc = tl.dot(qv, tl.trans(rv), acc)
            if EXACT64:
                d2 = acc
            else:
                rsq = tl.load(rsq_ptr + ri, mask=rmask, other=0.0)
                # NaN (a NaN or inf feature) stays NaN, never a neighbour, as in the reference:
                # the default maximum made it 0, an exact match
                d2 = tl.maximum(qsq[:, None] + rsq[None, :] - 2.0 * acc, 0.0, propagate_nan=tl.PropagateNan.ALL)
            # a NaN distance is never a neighbour: made inf here, since tl.min on a GPU may return a NaN
            # (its combine keeps the second value of an unordered pair), which no merge would take
            valid = qmask[:, None] & rmask[None, :] & (d2 == d2)
            if EXCLUDE:
                valid = valid & (qi[:, None] != ri[None, :])
            d2 = tl.where(valid, d2, float("inf"))
            lane = tl.arange(0, BR)[None, :]
            for _ in tl.static_range(K):  # the block's k smallest per query, each merged in turn
                m, j = tl.min(d2, axis=1, return_indices=True)
                worst, wpos = tl.max(best_d, axis=1, return_indices=True)
                upd = (cols == wpos[:, None]) & (m < worst)[:, None]
                best_d = tl.where(upd, m[:, None], best_d)
                best_i = tl.where(upd, (r0 + j)[:, None].to(tl.int32), best_i)
                d2 = tl.where(lane == j[:, None], float("inf"), d2)
        out = qi[:, None].to(tl.int64) * K + cols
        omask = qmask[:, None] & (cols < K)
        tl.store(out_d_ptr + out, best_d, mask=omask)
        tl.store(out_i_ptr + out, best_i, mask=omask)


def _triton(queries: torch.Tensor, refs: torch.Tensor, k: int, exclude_self: bool, precision: str | None = None):
    """The Triton path; ``precision``: tl.dot's for fp32 features (default KNN_PRECISION)."""
    exact = queries.dtype == torch.float64 or refs.dtype == torch.float64
    dtype = torch.float64 if exact else (queries.dtype if queries.dtype == refs.dtype else torch.float32)
    q, r = queries.to(dtype), refs.to(dtype)
    scale = _search_scale(q, r) if dtype in (torch.float32, torch.bfloat16) else 1.0
    if scale != 1.0:  # a power of two: exact, and the neighbours' order is the same
        q, r = q * scale, r * scale
    n, m, d = len(q), len(r), q.shape[1]
    acc = torch.float64 if exact else torch.float32
    qsq, rsq = q.to(acc).square().sum(1), r.to(acc).square().sum(1)
    out_d = torch.empty(n, k, dtype=acc, device=q.device)
    out_i = torch.empty(n, k, dtype=torch.int32, device=q.device)
    precision = precision or KNN_PRECISION
    if precision not in ("ieee", "tf32x3"):
        raise UserError(f"knn: precision must be 'ieee' or 'tf32x3' (plain TF32 loses neighbours), got {precision!r}")
    stages = {}
    if _backend.triton_interpreter_active() or exact:  # float64: a 3-D tile of differences, kept small
        bq, br, bd, warps = 16, 16, 16, 4
    elif dtype == torch.float32 and precision == "ieee":  # a thin slice of D keeps the FMA path in registers
        bq, br, bd, warps = 64, 64, 16, 8
    else:  # tensor cores (bf16 / fp16, or fp32 as three TF32 products): Hopper GEMM-sized tiles
        bq, br, bd, warps = 128, 64, 32, 8
        stages = {"num_stages": 3}
    kp = triton.next_power_of_2(k)
    with device_guard(q):
        _knn_kernel[(triton.cdiv(n, bq),)](q, r, qsq, rsq, out_d, out_i, n, m, d, q.stride(0), q.stride(1),
                                           r.stride(0), r.stride(1), K=k, KP=kp, EXCLUDE=exclude_self, EXACT64=exact,
                                           FP32=dtype == torch.float32, PRECISION=precision, BQ=bq, BR=br, BD=bd,
                                           num_warps=warps, **stages)
    dist, order = out_d.double().sort(dim=1)
    return dist.sqrt() / scale, out_i.long().gather(1, order)


def _finite_amax(t: torch.Tensor) -> float:
    """The largest finite |value| of ``t`` (0 for none)."""
    if t.numel() == 0:
        return 0.0
    a = t.abs().amax()
    if not torch.isfinite(a):  # an inf or NaN feature: the largest of the others
        a = t.abs().nan_to_num(0.0, posinf=0.0, neginf=0.0).amax()
    return float(a)


def _search_scale(q: torch.Tensor, r: torch.Tensor) -> float:
    """A power of two that brings fp32 / bf16 features into the range where the fp32 expansion
    neither overflows nor underflows (1.0 when they are in it): features past about 1e19 / sqrt(D)
    made every squared distance inf (each query came back with index 0 k times, distance inf), and
    features below about 1e-19 made them all 0 (the first references by index were taken as the
    nearest). The search's relative rounding is the same at any scale."""
    amax = max(_finite_amax(q), _finite_amax(r))
    if amax > 2.0 ** 32 or 0.0 < amax < 2.0 ** -32:
        return math.ldexp(1.0, -math.frexp(amax)[1])
    return 1.0


# --------------------------------------------------------------------------- exact distances
def _exact(queries: torch.Tensor, refs: torch.Tensor, dist: torch.Tensor, index: torch.Tensor,
           k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k nearest of each query's candidates (``index`` (N, c), c >= k, from a search whose
    distances ``dist`` came from the expansion), by their exact distances ``||q - r[i]||``:
    float64 differences of the inputs as given, summed in float64, a chunk of queries at a
    time. Ascending, equal distances by index. A candidate the search did not find (an infinite
    distance: a NaN distance, or a slot no reference filled) stays infinite."""
    dev = refs.device
    n, c = index.shape
    exact = torch.empty(n, c, dtype=torch.float64, device=dev)
    rows = max(1, EXACT_CHUNK_ELEMENTS // max(1, c * refs.shape[1]))
    for s in range(0, n, rows):
        diff = refs[index[s:s + rows]].to(torch.float64)  # (rows, c, D), a copy: changed in place
        diff.sub_(queries[s:s + rows].to(device=dev, dtype=torch.float64)[:, None, :])
        exact[s:s + rows] = diff.square_().sum(2).sqrt_()
        del diff
    exact = torch.where(torch.isfinite(dist) & ~exact.isnan(), exact, float("inf"))
    index, by_index = index.sort(1)  # equal distances: by index
    exact, order = exact.gather(1, by_index).sort(dim=1, stable=True)
    return exact[:, :k].contiguous(), index.gather(1, order)[:, :k].contiguous()


# --------------------------------------------------------------------------- public
def knn(queries: torch.Tensor, refs: torch.Tensor, k: int = 1, exclude_self: bool = False,
        backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(distances (N, k) float64 ascending, indices (N, k) int64) of each query's k nearest references.

    The backend's search selects k + ``EXTRA_CANDIDATES`` candidates by the expansion
    ``|q|² + |r|² - 2 q·r``; their distances are then recomputed exactly from the differences
    (float64, from the inputs as given: identical rows are 0 apart, near-copies to float64
    rounding) and the k nearest by those returned, equal distances by index (see the module
    docstring for when the selection can still be the expansion's).

    Not differentiable: the results carry no autograd history whatever the inputs' requires_grad,
    on every backend, and no graph is built for them."""
    _check(queries, refs, k, exclude_self)
    k = int(k)  # a NumPy integer too
    impl = _backend.resolve("knn", refs, backend)
    wide = min(k + EXTRA_CANDIDATES, MAX_K, len(refs) - (1 if exclude_self else 0))
    with torch.no_grad():
        if impl == "triton":
            dist, index = _triton(queries.to(refs.device), refs, wide, exclude_self)
        else:
            dist, index = reference(queries, refs, wide, exclude_self)
        return _exact(queries, refs, dist, index, k)
