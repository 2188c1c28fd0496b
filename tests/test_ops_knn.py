"""k nearest neighbours (xrayforge.ops.knn) against numpy brute force: exact neighbour indices
and distances in float64, and within fp32 rounding in float32 (random data: no ties)."""
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
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    np.testing.assert_allclose(d.cpu().numpy(), bd, rtol=tol, atol=tol)


@pytest.mark.parametrize("kb", TRITON)
def test_triton_takes_half_precision_and_strided_input(kb):
    backend, device = kb
    q, r = data(24, 40, 32, torch.float32, seed=3)
    wide = torch.zeros(40, 64)
    wide[:, ::2] = r  # a non-contiguous view
    d, i = knn(q.to(device).half(), wide[:, ::2].to(device).half(), 2, backend=backend)
    bd, bi = brute(q.half().numpy(), r.half().numpy(), 2)
    np.testing.assert_allclose(d.cpu().numpy(), bd, rtol=2e-3)
    assert (i.cpu().numpy()[:, 0] == bi[:, 0]).mean() > 0.9  # fp16 inputs: near-ties may swap


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
    np.testing.assert_allclose(d.numpy(), [[1.0, 1.0, 1.0]])
    assert sorted(i[0].tolist()) == [0, 1, 2]


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
