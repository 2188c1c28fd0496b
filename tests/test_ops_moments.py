"""Masked feature moments (xrayforge.ops.masked_moments) against float64 numpy on each subset:
means to 1e-9 and m2 to 1e-7 of its largest entry (the issue's contract), for every subset
shape (all rows, a few, one, none), dtypes, strides, and the row-split (atomic) path.

The Triton kernels alone (``exact_below=0``) are held to KERNEL_RTOL on subsets of a few dozen
rows: a few fp32 block sums of 32 rows carry ~1e-7 of rounding that has nothing to average
with (1.6e-7 measured on an H200); the public path sends such subsets to float64."""
import importlib

import numpy as np
import pytest
import torch

from conftest import kernel_params
from xrayforge.errors import UserError
from xrayforge.ops import masked_moments

M = importlib.import_module("xrayforge.ops.moments")
TRITON = [p for p in kernel_params() if p.values[0][0] == "triton"]
KERNEL_RTOL = 4e-7


def numpy_moments(x: torch.Tensor, masks: torch.Tensor | None):
    """Per subset: count, mean and centred sum of outer products, in float64 numpy."""
    a = x.double().cpu().numpy()
    rows = [np.ones(len(a), bool)] if masks is None else list(masks.cpu().numpy())
    out = []
    for m in rows:
        s = a[m]
        if len(s) == 0:
            out.append((0, np.zeros(a.shape[1]), np.zeros((a.shape[1], a.shape[1]))))
            continue
        mu = s.mean(0)
        out.append((len(s), mu, (s - mu).T @ (s - mu)))
    return out


def assert_moments(got, want, m2_rtol=1e-7, mean_rtol=1e-9):
    n, mean, m2 = (t.cpu() for t in got)
    assert n.dtype == torch.int64 and mean.dtype == torch.float64 and m2.dtype == torch.float64
    assert len(n) == len(want)
    for k, (wn, wmu, wm2) in enumerate(want):
        assert n[k].item() == wn
        scale = max(np.abs(wmu).max(), 1e-300)
        assert np.abs(mean[k].numpy() - wmu).max() <= mean_rtol * scale, f"mean of subset {k}"
        m2_scale = np.abs(wm2).max()
        err = np.abs(m2[k].numpy() - wm2).max()
        assert err <= m2_rtol * m2_scale if m2_scale else err == 0.0, f"m2 of subset {k}: {err} vs {m2_scale}"


def features(n, d, dtype=torch.float32, offset=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    # non-negative with a mean larger than the spread, as Inception pool features are
    return (torch.rand(n, d, generator=g, dtype=torch.float64) * 2 + offset).to(dtype)


def subsets(n, rates, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(len(rates), n, generator=g) < torch.tensor(rates)[:, None]


def test_reference_equals_numpy():
    x = features(57, 9, torch.float64)
    masks = subsets(57, [1.0, 0.3, 0.0, 0.05])
    masks[3] = False
    masks[3, 11] = True  # one row: mean is the row, m2 is zero
    assert_moments(M.reference(x, masks), numpy_moments(x, masks), m2_rtol=1e-12, mean_rtol=1e-14)
    assert_moments(M.reference(x), numpy_moments(x, None), m2_rtol=1e-12, mean_rtol=1e-14)


def test_auto_on_cpu_is_the_reference():
    x = features(40, 6)
    masks = subsets(40, [0.5, 0.2])
    for a, b in zip(masked_moments(x, masks), M.reference(x, masks)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_more_subsets_than_a_launch_grid_holds_are_refused_by_triton(monkeypatch, caplog):
    # both kernels launch one row of blocks per subset along grid.y (at most 65535)
    from xrayforge.ops import BackendUnavailableError, _backend
    x = features(3, 2)
    many, fits = torch.ones(65536, 3, dtype=torch.bool), torch.ones(65535, 3, dtype=torch.bool)
    assert M._refusals(fits) == M._refusals(None) == ()
    (name, why), = M._refusals(many)
    assert name == "triton" and "65536 blocks along grid.y, above CUDA's limit of 65535" in why
    if TRITON:
        with pytest.raises(BackendUnavailableError, match="backend 'triton' cannot take this input: .*65536 subsets"):
            masked_moments(x, many, backend="triton")
    real = _backend.resolve_for_device  # auto on a GPU with Triton as a candidate: the reference runs
    monkeypatch.setattr(_backend, "resolve_for_device", lambda op, device, *args: real(op, torch.device("cuda"), *args))
    monkeypatch.setattr(_backend, "unavailable_reason", lambda name, op, device: None if name != "cuda" else "no")
    monkeypatch.setattr(_backend, "_warned", set())
    with _backend.auto_candidates(("triton",)), caplog.at_level("WARNING", logger="xrayforge.ops"):
        assert _backend.resolve("masked_moments", x, "auto", M._refusals(many)) == "torch"
        assert _backend.resolve("masked_moments", x, "auto", M._refusals(fits)) == "triton"
    assert "fell back to 'torch'" in caplog.text


@pytest.mark.parametrize("kb", TRITON)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,d,rates", [(70, 37, [1.0, 0.4, 0.0, 0.1]), (1, 5, [1.0]), (33, 16, [0.5]),
                                       (90, 3, [1.0, 1.0, 0.3])])
def test_triton_kernels_equal_numpy(kb, dtype, n, d, rates):
    _, device = kb
    x = features(n, d, dtype, seed=n + d)
    masks = subsets(n, rates, seed=d)
    got = M._triton(x.to(device), masks.to(device), exact_below=0)
    assert_moments(got, numpy_moments(x, masks), m2_rtol=KERNEL_RTOL)


@pytest.mark.parametrize("kb", TRITON)
def test_triton_all_rows_without_masks(kb):
    _, device = kb
    x = features(50, 20, offset=40.0)  # a large mean: the shift keeps the digits
    assert_moments(M._triton(x.to(device), exact_below=0), numpy_moments(x, None), m2_rtol=KERNEL_RTOL)


@pytest.mark.parametrize("kb", TRITON)
def test_triton_takes_off_the_shift_remainder(kb):
    """A mean of 1e4 with a spread of 1: the fp32-rounded shift is off the mean by ~1e-4, and
    only the float64 remainder term n (mean - shift)(mean - shift)^T brings m2 back to 1e-7."""
    _, device = kb
    x = features(300, 8, offset=1e4, seed=12)
    masks = subsets(300, [1.0, 0.5], seed=13)
    rest = (torch.from_numpy(np.stack([w[1] for w in numpy_moments(x, masks)]))
            - torch.from_numpy(np.stack([w[1] for w in numpy_moments(x, masks)])).float().double())
    assert rest.abs().max() > 1e-5  # the test is only worth something if the shift is visibly off
    assert_moments(M._triton(x.to(device), masks.to(device), exact_below=0), numpy_moments(x, masks),
                   m2_rtol=KERNEL_RTOL)


@pytest.mark.parametrize("kb", TRITON)
def test_triton_strided_and_split_rows(kb):
    _, device = kb
    base = features(24, 80, seed=3)
    x = base.T.to(device)  # (80, 24) non-contiguous, column-major
    assert not x.is_contiguous()
    masks = subsets(80, [1.0, 0.5, 0.1], seed=4).to(device)
    want = numpy_moments(x, masks)
    assert_moments(M._triton(x, masks, exact_below=0), want, m2_rtol=KERNEL_RTOL)
    # three row shares added atomically
    assert_moments(M._triton(x, masks, splits=3, exact_below=0), want, m2_rtol=KERNEL_RTOL)
    assert_moments(M._triton(x[::2], masks[:, ::2], splits=2, exact_below=0), numpy_moments(x[::2], masks[:, ::2]),
                   m2_rtol=KERNEL_RTOL)


@pytest.mark.parametrize("kb", TRITON)
def test_triton_sends_small_subsets_to_float64(kb, monkeypatch):
    backend, device = kb
    x = features(90, 12, seed=8).to(device)
    masks = subsets(90, [1.0, 0.1, 0.6, 0.0], seed=9).to(device)
    seen = []
    kernels = M._kernels
    monkeypatch.setattr(M, "_kernels", lambda x, m, *a: seen.append(None if m is None else m.sum(1).tolist())
                        or kernels(x, m, *a))
    want = numpy_moments(x, masks)
    got = M._triton(x, masks, exact_below=40)  # subsets 0 and 2 through the kernels, 1 and 3 exact
    assert seen == [[90, int(masks[2].sum())]]
    assert_moments(got, want, m2_rtol=KERNEL_RTOL)
    for k in (1, 3):  # the float64 ones are the reference's, bit for bit
        ref = M.reference(x, masks[k:k + 1])
        torch.testing.assert_close(got[2][k], ref[2][0], rtol=0, atol=0)
    seen.clear()
    got = masked_moments(x, masks, backend=backend)  # default threshold: everything here is small
    assert seen == [] and got[0].tolist() == [w[0] for w in want]


@pytest.mark.gpu
@pytest.mark.parametrize("kb", [p for p in TRITON if p.values[0][1] == "cuda"])
@pytest.mark.parametrize("precision", ["ieee", "tf32x3"])
def test_triton_at_fid_scale_on_gpu(kb, precision):
    backend, device = kb
    x = features(6000, 300, seed=5).to(device)  # tiles at the edge of D, many row blocks, 15 subsets
    masks = subsets(6000, [1.0] + [0.177, 0.119, 0.103, 0.056, 0.052, 0.047, 0.042, 0.03, 0.025, 0.022, 0.021,
                                   0.015, 0.013, 0.002], seed=6).to(device)
    got = M._triton(x, masks, precision=precision)  # subsets under EXACT_BELOW rows in float64
    assert_moments(got, numpy_moments(x, masks), m2_rtol=1e-7 if precision == "ieee" else 1e-6)


def test_float64_runs_the_reference_on_the_triton_path():
    x = features(30, 7, torch.float64)
    masks = subsets(30, [0.6, 1.0])
    for a, b in zip(M._triton(x, masks), M.reference(x, masks)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("x,masks,match", [
    (torch.zeros(5), None, r"\(N, D\) features"),
    (torch.zeros(4, 3, dtype=torch.int32), None, "floating-point"),
    (torch.zeros(4, 3), torch.ones(2, 4), "boolean"),
    (torch.zeros(4, 3), torch.ones(4, dtype=torch.bool), "boolean"),
    (torch.zeros(4, 3), torch.ones(2, 5, dtype=torch.bool), "cover 5 rows, the features have 4"),
    (torch.zeros(4, 3), torch.ones(0, 4, dtype=torch.bool), "K = 0"),
])
def test_bad_inputs(x, masks, match):
    with pytest.raises(UserError, match=match):
        masked_moments(x, masks)


def test_streaming_moments_and_subsets_agree_with_numpy():
    from xrayforge.fid.stats import StreamingMoments, update_subsets
    x = features(120, 11, seed=7)
    masks = subsets(120, [1.0, 0.3, 0.0])
    whole = StreamingMoments(11)
    per = [StreamingMoments(11) for _ in range(3)]
    for lo in range(0, 120, 25):  # batches
        whole.update(x[lo:lo + 25])
        update_subsets(per, x[lo:lo + 25], masks[:, lo:lo + 25])
    want = numpy_moments(x, masks)
    for m, (wn, wmu, wm2) in zip([whole] + per, [want[0]] + want):
        assert m.n == wn
        np.testing.assert_allclose(m.mean.numpy(), wmu, rtol=1e-12, atol=0)
        np.testing.assert_allclose(m.m2.numpy(), wm2, rtol=1e-10, atol=1e-10 * max(np.abs(wm2).max(), 1))


@pytest.mark.parametrize("backend", ["torch"] + [p.values[0][0] for p in TRITON])
def test_no_rows_without_masks_gives_zeros(backend):
    # "an empty subset gives n = 0 and zeros": all rows of an empty batch gave a NaN mean
    n, mean, m2 = masked_moments(torch.zeros(0, 3), backend=backend)
    assert n.tolist() == [0] and mean.shape == (1, 3) and m2.shape == (1, 3, 3)
    assert not mean.any() and not m2.any()


@pytest.mark.parametrize("kb", TRITON)
@pytest.mark.parametrize("with_masks", [False, True])
def test_triton_kernels_take_features_of_width_zero(kb, with_masks):
    # D = 0: no Gram tiles, so no programs; sizing the row split divided by their count
    _, device = kb
    x = torch.zeros(5, 0, device=device)
    masks = torch.ones(2, 5, dtype=torch.bool, device=device) if with_masks else None
    n, mean, m2 = M._triton(x, masks, exact_below=0)
    k = 2 if with_masks else 1
    assert n.tolist() == [5] * k and mean.shape == (k, 0) and m2.shape == (k, 0, 0)


@pytest.mark.parametrize("kb", TRITON)
@pytest.mark.parametrize("dtype,scale", [(torch.bfloat16, 1e20), (torch.float32, 1e20), (torch.float32, 1e-25)],
                         ids=["bf16-1e20", "fp32-1e20", "fp32-1e-25"])
def test_triton_sends_features_beyond_fp32_products_to_float64(kb, dtype, scale):
    """Deviations of 1e20 have fp32 products of inf (m2 was NaN), of 1e-25 products that flush to
    zero (m2 was 0 where it is 1e-50): such features go through the float64 reference."""
    _, device = kb
    x = (features(40, 5, torch.float64, offset=0.0, seed=21) * scale).to(dtype)
    masks = subsets(40, [1.0, 0.5], seed=22)
    got = M._triton(x.to(device), masks.to(device), exact_below=0)
    assert_moments(got, numpy_moments(x, masks), m2_rtol=1e-12, mean_rtol=1e-14)


@pytest.mark.parametrize("kb", TRITON)
@pytest.mark.parametrize("scale", [2.0 ** 55, 2.0 ** -31], ids=["2^55", "2^-31"])
def test_triton_kernels_keep_features_just_inside_the_fp32_range(kb, scale, monkeypatch):
    # the bounds of FP32_SAFE are inside what the kernels take: still the kernels there, as accurate
    _, device = kb
    calls = []
    kernels = M._kernels
    monkeypatch.setattr(M, "_kernels", lambda *a: calls.append(1) or kernels(*a))
    x = features(40, 5, torch.float64, offset=-1.0, seed=23) * scale  # in (-scale, scale)
    x = x.float()
    assert M.FP32_SAFE[0] < x.abs().max() <= M.FP32_SAFE[1]
    assert_moments(M._triton(x.to(device), exact_below=0), numpy_moments(x, None), m2_rtol=KERNEL_RTOL)
    assert calls == [1]
