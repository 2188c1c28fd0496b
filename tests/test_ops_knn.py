"""k nearest neighbours (xrayforge.ops.knn) against numpy brute force: exact neighbour indices,
and distances to float64 rounding of the inputs as given, for every input dtype (the search's
expansion selects candidates, knn recomputes their distances from the differences)."""
import importlib

import numpy as np
import pytest
import torch

from conftest import kernel_params
from xrayforge.errors import UserError
from xrayforge.ops.knn import knn

knn_module = importlib.import_module("xrayforge.ops.knn")  # the module; the package exports the function

TRITON = [p for p in kernel_params() if p.values[0][0] == "triton"]


def brute(q: np.ndarray, r: np.ndarray, k: int, exclude_self: bool = False):
    d = np.sqrt(((q[:, None, :].astype(np.float64) - r[None, :, :].astype(np.float64)) ** 2).sum(-1))
    if exclude_self:
        np.fill_diagonal(d, np.inf)
    idx = np.argsort(d, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(d, idx, 1), idx


def data(n, m, dim, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, dim, generator=g, dtype=torch.float64).to(dtype),
            torch.randn(m, dim, generator=g, dtype=torch.float64).to(dtype))


@pytest.mark.parametrize("n,m,dim,k", [(1, 7, 3, 1), (37, 53, 21, 3), (65, 40, 33, 5), (20, 17, 1, 8)])
def test_reference_equals_brute_force_in_float64(n, m, dim, k):
    q, r = data(n, m, dim, torch.float64)
    d, i = knn_module.reference(q, r, k, chunk_q=8, chunk_r=9)  # several chunks each way
    bd, bi = brute(q.numpy(), r.numpy(), k)
    np.testing.assert_array_equal(i.numpy(), bi)
    np.testing.assert_allclose(d.numpy(), bd, rtol=1e-12, atol=1e-12)


def test_reference_excludes_each_point_itself():
    x, _ = data(41, 1, 6, torch.float64)
    d, i = knn_module.reference(x, x, 4, exclude_self=True, chunk_q=10, chunk_r=7)
    bd, bi = brute(x.numpy(), x.numpy(), 4, exclude_self=True)
    np.testing.assert_array_equal(i.numpy(), bi)
    assert (i != torch.arange(41)[:, None]).all()
    np.testing.assert_allclose(d.numpy(), bd, rtol=1e-12)


@pytest.mark.parametrize("kb", TRITON)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("n,m,dim,k,exclude", [(1, 5, 4, 1, False), (37, 53, 21, 3, False), (70, 70, 40, 5, True),
                                               (19, 33, 17, 7, False), (33, 33, 3, 3, True)])
def test_triton_equals_brute_force(kb, dtype, n, m, dim, k, exclude):
    backend, device = kb
    q, r = data(n, m, dim, dtype, seed=n * m)
    if exclude:
        r = q
    d, i = knn(q.to(device), r.to(device), k, exclude_self=exclude, backend=backend)
    bd, bi = brute(q.numpy(), r.numpy(), k, exclude_self=exclude)
    assert d.dtype == torch.float64 and i.dtype == torch.int64 and d.shape == (n, k)
    np.testing.assert_array_equal(i.cpu().numpy(), bi)
    # fp32 too: the distances are recomputed in float64 from the fp32 values (the kernel's
    # expansion alone was within 2e-5)
    np.testing.assert_allclose(d.cpu().numpy(), bd, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kb", TRITON)
def test_triton_takes_half_precision_and_strided_input(kb):
    backend, device = kb
    q, r = data(24, 40, 32, torch.float32, seed=3)
    wide = torch.zeros(40, 64)
    wide[:, ::2] = r  # a non-contiguous view
    d, i = knn(q.to(device).half(), wide[:, ::2].to(device).half(), 2, backend=backend)
    bd, bi = brute(q.half().numpy(), r.half().numpy(), 2)
    # the fp16 values' exact distances (the expansion with fp16 products was within 2e-3, and
    # near-ties swapped); the extra candidates re-ranked by them give brute force's order
    np.testing.assert_allclose(d.cpu().numpy(), bd, rtol=1e-12)
    np.testing.assert_array_equal(i.cpu().numpy(), bi)


@pytest.mark.parametrize("kb", [pytest.param(("torch", "cpu"), id="torch")] + TRITON)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_results_carry_no_autograd_history(kb, dtype):
    # the reference returned distances attached to the inputs' graph (and built that graph: the
    # chunks' matmuls saved their operands), the Triton path did not; a search is not differentiable
    backend, device = kb
    q, r = (t.to(device).requires_grad_() for t in data(9, 12, 5, dtype))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        results = [knn(q, r, 3, backend=backend), knn(r, r, 2, exclude_self=True, backend=backend)]
        if backend == "torch":
            results.append(knn_module.reference(q, r, 3, chunk_q=4, chunk_r=5))
    for d, i in results:
        assert not d.requires_grad and d.grad_fn is None and not i.requires_grad
    assert saved == [], "a graph was built"
    bd, bi = brute(q.detach().cpu().numpy(), r.detach().cpu().numpy(), 3)
    np.testing.assert_array_equal(results[0][1].cpu().numpy(), bi)


def test_ties_give_equal_distances():
    r = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [3.0, 3.0]], dtype=torch.float64)
    d, i = knn(torch.zeros(1, 2, dtype=torch.float64), r, 3)
    assert d.tolist() == [[1.0, 1.0, 1.0]]
    assert i.tolist() == [[0, 1, 2]]  # equal distances by index among the candidates


@pytest.mark.parametrize("args,match", [
    ((torch.zeros(3), torch.zeros(4, 2), 1), "expected"),
    ((torch.zeros(3, 2), torch.zeros(4, 3), 1), "features"),
    ((torch.zeros(3, 2), torch.zeros(4, 2), 0), "k must be"),
    ((torch.zeros(3, 2), torch.zeros(4, 2), 2.0), "k must be an integer"),
    ((torch.zeros(3, 2), torch.zeros(4, 2), True), "k must be an integer"),
    (([[0.0, 0.0]], torch.zeros(4, 2), 1), "expected tensors, got list"),
    ((torch.zeros(3, 2), torch.zeros(4, 2), 5), "neighbours asked"),
    ((torch.zeros(3, 2, dtype=torch.long), torch.zeros(4, 2, dtype=torch.long), 1), "floating-point"),
])
def test_bad_input(args, match):
    with pytest.raises(UserError, match=match):
        knn(*args)
    with pytest.raises(UserError, match="same set"):
        knn(torch.zeros(3, 2), torch.zeros(4, 2), 1, exclude_self=True)
    with pytest.raises(UserError, match="not its own neighbour"):
        knn(torch.zeros(3, 2), torch.zeros(3, 2), 3, exclude_self=True)


@pytest.mark.gpu
@pytest.mark.parametrize("kb", [p for p in TRITON if p.values[0][1] == "cuda"])
@pytest.mark.parametrize("precision", ["ieee", "tf32x3"])
@pytest.mark.parametrize("exclude", [False, True])
def test_triton_at_archive_scale_on_gpu(kb, precision, exclude):
    """Many query and reference blocks, D not a multiple of the tile, at each tl.dot precision:
    the same neighbours as the float64 reference (random data: near-ties are rare) and
    distances to fp32 rounding."""
    _, device = kb
    q, r = (t.to(device) for t in data(3000, 5000, 500, torch.float32, seed=11))
    if exclude:
        r = q
    d, i = knn_module._triton(q, r, 5, exclude, precision=precision)
    rd, ri = knn_module.reference(q, r, 5, exclude)
    assert (i == ri).double().mean().item() > 0.999
    same = i == ri
    np.testing.assert_allclose(d[same].cpu().numpy(), rd[same].cpu().numpy(), rtol=1e-5)


@pytest.mark.parametrize("kb", TRITON)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_nan_and_inf_features_are_never_near(kb, dtype):
    # the fp32 kernel clamped a NaN squared distance to 0: a NaN query, or a reference with an
    # inf feature, came back as an exact match (a "copy" to the memorisation audit)
    backend, device = kb
    refs = torch.tensor([[float("inf"), 0.0], [1.0, 0.0], [2.0, 0.0], [3.0, 0.0]], dtype=dtype, device=device)
    queries = torch.tensor([[0.0, 0.0], [float("nan"), 0.0]], dtype=dtype, device=device)
    for q, r in ((queries, refs), (queries[:1], refs)):
        d, i = knn(q, r, 2, backend=backend)
        d_ref, i_ref = knn_module.reference(q, r, 2)
        torch.testing.assert_close(d, d_ref)
        torch.testing.assert_close(i[0], i_ref[0])
    d, i = knn(queries, refs, 2, backend=backend)
    assert d[0].tolist() == [1.0, 2.0] and i[0].tolist() == [1, 2]
    assert (d[1] > 0).all()


def test_a_numpy_integer_k_is_taken():
    r = torch.arange(8, dtype=torch.float64).view(4, 2)
    d, i = knn(r[:1], r, np.int64(2))
    assert i.tolist() == [[0, 1]] and d.shape == (1, 2)


# --------------------------------------------------------------------------- exact distances
# The search's expansion |q|² + |r|² - 2 q·r rounds relative to the norms, not to the distance:
# two identical 32 × 32 images came out 7.5e-7 apart (float64), rows of values near 100 several
# units apart (fp32 kernel), and candidates closer together than that rounding were misordered.
# knn recomputes the candidates' distances from the differences, in float64, and re-ranks them.
ALL = [pytest.param(("torch", "cpu"), id="torch")] + TRITON
SEARCH_DTYPE = {"torch": torch.float64, "triton": torch.float32}  # each backend's fast path


def pixel_rows(n, offset, seed=0, dim=1024):
    """n rows of 32 × 32 grey levels in [0, 1] (offset 0), or of values near 100 (large norms:
    |x|² about 1e7, where the expansion loses the most)."""
    g = torch.Generator().manual_seed(seed)
    return offset + torch.rand(n, dim, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("kb", ALL)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("offset", [0.0, 100.0])
def test_identical_rows_are_exactly_zero_apart(kb, dtype, offset):
    backend, device = kb
    refs = pixel_rows(24, offset)
    refs[9] = refs[3]  # a duplicate in the references
    refs, queries = refs.to(dtype), refs[[3, 11, 20, 0]].to(dtype).clone()  # copies of references
    d, i = knn(queries.to(device), refs.to(device), 2, backend=backend)
    assert d[:, 0].tolist() == [0.0] * 4
    assert i[:, 0].tolist() == [3, 11, 20, 0]
    assert d[0, 1].item() == 0.0 and i[0, 1].item() == 9  # both copies at 0, by index
    bd, bi = brute(queries.numpy(), refs.numpy(), 2, exclude_self=False)
    np.testing.assert_array_equal(i.cpu().numpy(), bi)
    np.testing.assert_allclose(d.cpu().numpy(), bd, rtol=1e-13, atol=0)


def distances_at(q, r, i):
    """Float64 distances of each query to the references ``i`` names (numpy, from the differences)."""
    q, r, i = q.double().numpy(), r.double().numpy(), i.cpu().numpy()
    return np.sqrt(((q[:, None, :] - r[i]) ** 2).sum(-1))


@pytest.mark.parametrize("kb", ALL)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("offset", [0.0, 100.0])
def test_exclude_self_skips_the_row_not_its_duplicate(kb, dtype, offset):
    backend, device = kb
    x = pixel_rows(30, offset, seed=1)
    x[7] = x[3]
    x[12] = x[3]  # three copies of one image
    x = x.to(dtype)
    d, i = knn(x.to(device), x.to(device), 3, exclude_self=True, backend=backend)
    assert (i.cpu() != torch.arange(30)[:, None]).all()
    for row, others in ((3, [7, 12]), (7, [3, 12]), (12, [3, 7])):
        assert i[row, :2].tolist() == others and d[row, :2].tolist() == [0.0, 0.0]
        assert d[row, 2].item() > 0
    # whatever was selected, its distance is exact
    np.testing.assert_allclose(d.cpu().numpy(), distances_at(x, x, i), rtol=1e-13, atol=0)
    if not (dtype == torch.float32 and backend == "triton" and offset):
        # (the fp32 expansion at norms about 3200 cannot order random rows 13 ± 0.3 apart: more
        # than EXTRA_CANDIDATES of them lie within its rounding)
        bd, bi = brute(x.numpy(), x.numpy(), 3, exclude_self=True)
        np.testing.assert_array_equal(i.cpu().numpy(), bi)
        np.testing.assert_allclose(d.cpu().numpy(), bd, rtol=1e-13, atol=0)


@pytest.mark.parametrize("kb", ALL)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("offset", [0.0, 100.0])
def test_near_duplicates_have_float64_relative_accuracy(kb, dtype, offset):
    """References 1e-4 (and 2e-4, 3e-4) from the queries, among others: their distances to 1e-6
    relative of float64 brute force on the same values (the expansion lost all digits of them at
    offset 100 in fp32, and several in float64)."""
    backend, device = kb
    g = torch.Generator().manual_seed(2)
    q = pixel_rows(10, offset, seed=2)
    near = q.repeat(3, 1)
    cols = torch.randint(0, q.shape[1], (30,), generator=g)
    near[torch.arange(30), cols] += 1e-4 * torch.arange(1, 4, dtype=torch.float64).repeat_interleave(10)
    r = torch.cat([near, pixel_rows(40, offset, seed=3)])
    r = r[torch.randperm(len(r), generator=g)]
    q, r = q.to(dtype), r.to(dtype)
    d, i = knn(q.to(device), r.to(device), 3, backend=backend)
    bd, bi = brute(q.numpy(), r.numpy(), 3)
    assert (bd < 4e-4).all()  # the three near-copies, as cast to dtype
    np.testing.assert_array_equal(i.cpu().numpy(), bi)
    np.testing.assert_allclose(d.cpu().numpy(), bd, rtol=1e-6, atol=0)


@pytest.mark.parametrize("kb", ALL)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("k,exclude", [(1, False), (4, True), (10, False), (10, True)])
def test_order_and_distances_equal_brute_force_at_large_norms(kb, dtype, k, exclude):
    """Random rows of 200 values in [offset, offset + 1] (distinct distances, 5.8 ± 0.4 apart):
    brute force's neighbours in its order, and its distances to float64 rounding. The offset is
    as large as the search's precision still orders them (the expansion's distances were off by
    up to about 1e-5 relative at 1e4 in float64, 1e-4 at 10 in fp32)."""
    backend, device = kb
    offset = 10.0 if backend == "triton" and dtype == torch.float32 else 1e4
    q, r = pixel_rows(33, offset, seed=4, dim=200), pixel_rows(45, offset, seed=5, dim=200)
    if exclude:
        r = q
    q, r = q.to(dtype), r.to(dtype)
    d, i = knn(q.to(device), r.to(device), k, exclude_self=exclude, backend=backend)
    bd, bi = brute(q.numpy(), r.numpy(), k, exclude_self=exclude)
    np.testing.assert_array_equal(i.cpu().numpy(), bi)
    np.testing.assert_allclose(d.cpu().numpy(), bd, rtol=1e-13, atol=0)


def misordered(dtype, step, n=12, dim=1024, seed=0):
    """Queries near 100, each with EXTRA_CANDIDATES + 1 references at step, 2 step, ... from it
    (shuffled), among 50 others: closer together than the search's rounding, so the expansion
    picks among them almost at random."""
    g = torch.Generator().manual_seed(seed)
    near = knn_module.EXTRA_CANDIDATES + 1
    q = pixel_rows(n, 100.0, seed=seed, dim=dim)
    u = torch.randn(n, near, dim, generator=g, dtype=torch.float64)
    u /= u.norm(dim=2, keepdim=True)
    steps = step * (torch.randperm(near, generator=g) + 1).double()
    r = torch.cat([pixel_rows(50, 100.0, seed=seed + 1, dim=dim), (q[:, None] + steps[:, None] * u).reshape(-1, dim)])
    return q.to(dtype), r[torch.randperm(len(r), generator=g)].to(dtype)


@pytest.mark.parametrize("kb", ALL)
@pytest.mark.parametrize("k", [1, 2])
def test_candidates_the_expansion_misorders_come_back_in_exact_order(kb, k):
    """The search asks for EXTRA_CANDIDATES more than k and knn keeps the k nearest by the exact
    distances: the right neighbours where the expansion alone (the search's own top k) gets them
    wrong, as long as at most EXTRA_CANDIDATES others lie within its rounding."""
    backend, device = kb
    dtype = SEARCH_DTYPE[backend]
    q, r = misordered(dtype, 1e-5 if dtype == torch.float64 else 0.05)
    bd, bi = brute(q.numpy(), r.numpy(), k)
    search = knn_module.reference if backend == "torch" else knn_module._triton
    _, raw = search(q.to(device), r.to(device), k, False)
    assert (raw.cpu().numpy() != bi).any(), "the case is meant to defeat the expansion"
    d, i = knn(q.to(device), r.to(device), k, backend=backend)
    np.testing.assert_array_equal(i.cpu().numpy(), bi)
    np.testing.assert_allclose(d.cpu().numpy(), bd, rtol=1e-13, atol=0)


@pytest.mark.parametrize("kb", ALL)
@pytest.mark.parametrize("qdtype,rdtype", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
                                           (torch.float16, torch.float32), (torch.float32, torch.bfloat16)])
def test_half_precision_inputs_are_measured_as_given(kb, qdtype, rdtype):
    """bf16 / fp16 (and mixed) inputs: the exact distances of the values as given (not of a
    rounded copy), identical rows 0 apart."""
    backend, device = kb
    if backend == "triton" and torch.bfloat16 in (qdtype, rdtype) and device == "cpu":
        pytest.skip("the Triton interpreter's tl.dot misreads bf16 operands (Triton 3.x on a CPU): a GPU test")
    x = pixel_rows(40, 0.0, seed=6, dim=64)
    q, r = x[:16].to(qdtype), x[4:].to(rdtype)  # queries 4 .. 15 are also references 0 .. 11 (rounded each way)
    d, i = knn(q.to(device), r.to(device), 3, backend=backend)
    bd, bi = brute(q.double().numpy(), r.double().numpy(), 3)
    np.testing.assert_array_equal(i.cpu().numpy(), bi)
    np.testing.assert_allclose(d.cpu().numpy(), bd, rtol=1e-13, atol=0)
    if qdtype == rdtype:
        assert d[4:, 0].tolist() == [0.0] * 12 and i[4:, 0].tolist() == list(range(12))


def test_exact_recompute_in_chunks_gives_the_same(monkeypatch):
    q, r = pixel_rows(37, 100.0, seed=7, dim=50), pixel_rows(41, 100.0, seed=8, dim=50)
    whole = knn(q, r, 5, backend="torch")
    for elements in (1, 3 * 9 * 50, 10**9):  # one query a chunk, three, all
        monkeypatch.setattr(knn_module, "EXACT_CHUNK_ELEMENTS", elements)
        d, i = knn(q, r, 5, backend="torch")
        assert torch.equal(d, whole[0]) and torch.equal(i, whole[1])


@pytest.mark.parametrize("kb", ALL)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scale", [1e-25, 1e20, 1e37], ids=["1e-25", "1e20", "1e37"])
def test_features_at_extreme_scales_find_the_nearest(kb, dtype, scale):
    """The fp32 search's squared norms overflowed past about 1e19 (every distance inf, each query
    given index 0 k times) and underflowed below about 1e-19 (every distance 0, the first
    references by index taken as the nearest): the neighbours are those of the data at scale 1."""
    backend, device = kb
    if backend == "triton" and dtype == torch.bfloat16 and device == "cpu":
        pytest.skip("the Triton interpreter's tl.dot misreads bf16 operands (Triton 3.x on a CPU): a GPU test")
    q, r = data(4, 20, 5, torch.float64, seed=3)
    q, r = (q * scale).to(dtype), (r * scale).to(dtype)
    bd, bi = brute(q.double().numpy() / scale, r.double().numpy() / scale, 3)  # in float64 at scale 1
    d, i = knn(q.to(device), r.to(device), 3, backend=backend)
    np.testing.assert_array_equal(i.cpu().numpy(), bi)
    np.testing.assert_allclose(d.cpu().numpy() / scale, bd, rtol=1e-12)
