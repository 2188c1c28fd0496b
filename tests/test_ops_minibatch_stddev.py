import importlib
import logging
import math

import pytest
import torch

from xrayforge import ops
from xrayforge.ops import _backend

import conftest
from conftest import assert_as_accurate_as_eager, kernel_params

mbstd = importlib.import_module("xrayforge.ops.minibatch_stddev")  # the module; the package exports the function


# ---------------------------------------------------------------- the formula itself
def test_hand_computed_strided_groups():
    # N=4, group size 2 -> M=2 groups; sample i is in group i % 2: {0, 2} and {1, 3}.
    x = torch.tensor([0.0, 10.0, 2.0, 10.0]).view(4, 1, 1, 1)
    out = mbstd.reference(x, group_size=2)
    # group {0, 2}: values 0, 2 -> biased var 1 -> sqrt(1 + 1e-8); group {1, 3}: var 0 -> 1e-4
    expected = torch.tensor([math.sqrt(1 + 1e-8), 1e-4, math.sqrt(1 + 1e-8), 1e-4])
    torch.testing.assert_close(out[:, 1, 0, 0], expected)
    torch.testing.assert_close(out[:, :1], x)  # the input passes through unchanged


def test_hand_computed_mean_over_channels_and_pixels():
    # one group of 2: per-element stddev over the pair, averaged over C, H, W.
    a = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    b = torch.tensor([[1.0, 4.0], [3.0, 0.0]])
    x = torch.stack([a, b]).view(2, 1, 2, 2).repeat(1, 2, 1, 1)
    x[:, 1] *= 3  # second channel: three times the spread
    sd = torch.sqrt(((a - b) / 2).square() + 1e-8)  # biased: |a - b| / 2
    expected = (sd.mean() + torch.sqrt((3 * (a - b) / 2).square() + 1e-8).mean()) / 2
    out = mbstd.reference(x)
    assert out.shape == (2, 3, 2, 2)
    torch.testing.assert_close(out[:, 2], expected.expand(2, 2, 2))


def test_num_channels_splits_the_statistic():
    x = torch.randn(4, 6, 3, 3)
    out = mbstd.reference(x, num_channels=2)
    assert out.shape == (4, 8, 3, 3)
    first = mbstd.reference(x[:, :3])[:, 3]
    second = mbstd.reference(x[:, 3:])[:, 3]
    torch.testing.assert_close(out[:, 6], first)
    torch.testing.assert_close(out[:, 7], second)


def test_group_size_is_capped_by_the_batch():
    x = torch.randn(3, 2, 2, 2)  # group size 4 > N=3 -> one group of 3
    out = mbstd.reference(x, group_size=4)
    sd = (x.var(dim=0, unbiased=False) + 1e-8).sqrt().mean()
    torch.testing.assert_close(out[:, 2], sd.expand(3, 2, 2))


# ---------------------------------------------------------------- kernels against the reference
SHAPES = [((1, 3, 4, 4), 4, 1), ((8, 6, 3, 5), 4, 1), ((6, 4, 2, 3), 2, 2), ((12, 512, 4, 4), 4, 1),
          ((4, 5, 1, 1), 4, 1), ((9, 7, 4, 4), 3, 1)]


@pytest.mark.parametrize("kb", kernel_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("case", SHAPES, ids=str)
def test_kernel_matches_reference(kb, dtype, layout, case):
    backend, device = kb
    shape, gs, nc = case
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g) * 3 + 1
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":
        x = torch.randn(shape[:3] + (shape[3] * 2,), generator=g)[..., ::2]
    x = x.to(device=device, dtype=dtype)
    dout = torch.randn((shape[0], shape[1] + nc) + shape[2:], generator=g).to(device=device, dtype=dtype)

    def run(b, x_):
        x_ = x_.detach().requires_grad_(True)
        y = ops.minibatch_stddev(x_, gs, nc, backend=b)
        (dx,) = torch.autograd.grad(y, x_, dout.to(y.dtype))
        return y, dx

    ours, eager, exact = run(backend, x), run("torch", x), run("torch", x.double())
    assert ours[0].shape == exact[0].shape and ours[0].dtype == dtype
    for o, e, ex in zip(ours, eager, exact):
        assert_as_accurate_as_eager(o, e, ex, dtype, scale=max(ex.abs().max().item(), dout.abs().max().item()))


@pytest.mark.parametrize("kb", [pytest.param(("torch", "cpu"), id="torch")] + kernel_params())
@pytest.mark.parametrize("case", [((4, 3, 2, 2), 4, 1), ((6, 4, 2, 1), 3, 2), ((1, 2, 2, 2), 4, 1)], ids=str)
def test_gradcheck_and_gradgradcheck(kb, case):
    backend, device = kb
    fast = backend == "triton" and device == "cpu"  # the interpreter is slow; random projections suffice
    shape, gs, nc = case
    x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).to(device)
    x.requires_grad_(True)
    fn = lambda x_: ops.minibatch_stddev(x_, gs, nc, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x,), fast_mode=fast)
    assert torch.autograd.gradgradcheck(fn, (x,), fast_mode=fast)


@pytest.mark.parametrize("kb", kernel_params())
def test_wgan_gp_style_double_backward_matches_reference(kb):
    """The penalty's gradient w.r.t. a weight in front of the op, fused vs reference."""
    backend, device = kb
    g = torch.Generator().manual_seed(3)
    x = torch.randn(8, 4, 3, 3, generator=g, dtype=torch.float64).to(device).requires_grad_(True)
    w = torch.randn(4, generator=g, dtype=torch.float64).to(device).requires_grad_(True)

    def penalty(b):
        score = (ops.minibatch_stddev(x * w.view(1, -1, 1, 1), backend=b) ** 2).sum()
        (gx,) = torch.autograd.grad(score, x, create_graph=True)
        return torch.autograd.grad(gx.square().sum(), w)[0]

    torch.testing.assert_close(penalty(backend), penalty("torch"))


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_bad_input(backend):
    with pytest.raises(ValueError, match="batch size 6 is not divisible by the group size 4"):
        ops.minibatch_stddev(torch.randn(6, 3, 4, 4), backend=backend)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\).*\(6, 3\)"):
        ops.minibatch_stddev(torch.randn(6, 3), backend=backend)
    with pytest.raises(TypeError, match="torch.int32"):
        ops.minibatch_stddev(torch.ones(4, 3, 2, 2, dtype=torch.int32), backend=backend)
    with pytest.raises(ValueError, match="3 channels cannot be split into 2"):
        ops.minibatch_stddev(torch.randn(4, 3, 2, 2), num_channels=2, backend=backend)
    with pytest.raises(ValueError, match="empty"):
        ops.minibatch_stddev(torch.randn(0, 3, 2, 2), backend=backend)


@pytest.mark.parametrize("backend", ["torch"] + [p.values[0][0] for p in kernel_params()])
@pytest.mark.parametrize("shape", [(4, 0, 2, 2), (4, 3, 0, 2), (4, 3, 2, 0)], ids=str)
def test_samples_without_features_are_refused(backend, shape):
    # the reference failed in a reshape ("-1 ... is ambiguous") and the kernels returned NaN maps
    with pytest.raises(ValueError, match="hold no features"):
        ops.minibatch_stddev(torch.randn(shape), backend=backend)


# ---------------------------------------------------------------- limits of the fused kernels
def pretend_gpu(monkeypatch, available):
    """conftest's, with nothing launched on the CUDA extension (the CPU cannot run it)."""
    conftest.pretend_gpu(monkeypatch, available, launch_cuda=False)


def test_launch_grids_of_the_fused_kernels():
    # csrc/minibatch_stddev.cu's backward launches (ceil(K / 256), M * F): M * F blocks along grid.y,
    # at most 65535; Triton's kernels launch (K blocks, M * F) forward and backward
    for shape, group, slices in (((65536, 1, 1, 1), 1, 1), ((4, 65536, 2, 2), 4, 65536),
                                 ((4 * 32768, 4, 4, 4), 4, 2)):
        refused = dict(mbstd._refusals(torch.empty(shape), group, slices))
        assert sorted(refused) == ["cuda", "triton"], shape
        assert "65536 blocks along grid.y, above CUDA's limit of 65535" in refused["cuda"]
        assert "its backward" in refused["cuda"] and str(shape) in refused["cuda"]
    assert mbstd._refusals(torch.empty(65535, 1, 1, 1), 1, 1) == ()
    assert mbstd._refusals(torch.empty(4 * 65535, 1, 2, 2), 4, 1) == ()


def test_named_cuda_past_the_grid_limit_raises_before_launching(monkeypatch):
    pretend_gpu(monkeypatch, available=("cuda", "triton"))
    x = torch.randn(65536, 1, 1, 1, requires_grad=True)
    with pytest.raises(ops.BackendUnavailableError,
                       match=r"backend 'cuda' cannot take this input: its backward would launch 65536 blocks along "
                             r"grid.y, above CUDA's limit of 65535 .*x of shape \(65536, 1, 1, 1\), group size 1"):
        ops.minibatch_stddev(x, group_size=1, backend="cuda")
    with pytest.raises(ops.BackendUnavailableError, match="backend 'triton' cannot take this input: .*65535"):
        ops.minibatch_stddev(x, group_size=1, backend="triton")


def test_auto_falls_back_past_the_grid_limit(monkeypatch, caplog):
    pretend_gpu(monkeypatch, available=("cuda", "triton"))
    x = torch.randn(65536, 1, 1, 1, requires_grad=True)
    with caplog.at_level(logging.WARNING, logger="xrayforge.ops"):
        for _ in range(2):
            y = ops.minibatch_stddev(x, group_size=1)
    torch.testing.assert_close(y, mbstd.reference(x, 1))
    said = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(said) == 1 and "fell back to 'torch'" in said[0] and "limit of 65535" in said[0], said
    # one pair fewer fits: auto keeps the extension's kernel (chosen, not launched here)
    fits = torch.empty(65535, 1, 1, 1)
    assert _backend.resolve("minibatch_stddev", fits, "auto", mbstd._refusals(fits, 1, 1)) == "cuda"


@pytest.mark.parametrize("kb", kernel_params())
def test_torch_compile_traces_the_custom_ops(kb):
    backend, device = kb
    torch._dynamo.reset()
    fn = lambda x: ops.minibatch_stddev(x, backend=backend).square().sum()  # noqa: E731
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    x = torch.randn(8, 5, 4, 4, device=device, requires_grad=True)
    torch.testing.assert_close(compiled(x), fn(x))
    torch.testing.assert_close(torch.autograd.grad(compiled(x), x)[0], torch.autograd.grad(fn(x), x)[0])


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_full_size_on_gpu(backend, dtype):
    if backend == "cuda" and "cuda" not in ops.available_backends("minibatch_stddev", "cuda"):
        pytest.skip("CUDA extension not built")
    x = torch.randn(64, 512, 4, 4, device="cuda", dtype=dtype)
    dout = torch.randn(64, 513, 4, 4, device="cuda", dtype=dtype)
    for xl in (x, x.contiguous(memory_format=torch.channels_last)):
        res = []
        for b, xx in ((backend, xl), ("torch", xl), ("torch", xl.double())):
            xx = xx.detach().requires_grad_(True)
            y = ops.minibatch_stddev(xx, backend=b)
            res.append((y, torch.autograd.grad(y, xx, dout.to(y.dtype))[0]))
        for o, e, ex in zip(*res):
            assert_as_accurate_as_eager(o, e, ex, dtype, scale=max(ex.abs().max().item(), dout.abs().max().item()))


def test_the_limit_checks_do_not_recompile_per_batch_size():
    """The launch-limit check formatted the group count into its message on every call, which fixed
    the batch size in a torch.compile graph: a recompile per batch size, eager past the eighth."""
    import torch._dynamo as dynamo
    from torch._dynamo.utils import counters
    from xrayforge.ops.pixel_norm import pixel_norm
    dynamo.reset()
    counters.clear()
    f = torch.compile(lambda x: pixel_norm(ops.minibatch_stddev(x)) * 2, backend="eager")
    for n in range(4, 52, 4):
        f(torch.randn(n, 8, 4, 4))
    assert counters["stats"]["unique_graphs"] <= 2  # the first shape, then one dynamic graph
    dynamo.reset()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_reference_computes_half_inputs_in_float32_as_the_official_code(dtype):
    """The official code casts to float32 for the statistic (the kernels accumulate in float32);
    the torch path computed it in bf16, about 4% high on a batch nearly collapsed to one image
    (a variance that small is what the statistic is there to show D)."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(1, 8, 4, 4, generator=g) * 3
    x = (base + 0.01 * torch.randn(8, 8, 4, 4, generator=g)).to(dtype)
    got = mbstd.reference(x)[:, -1].double()
    exact = mbstd.reference(x.double())[:, -1]
    assert got.dtype == torch.float64 and mbstd.reference(x).dtype == dtype
    rel = ((got - exact).abs() / exact).max().item()
    assert rel < 2 ** -7, rel  # one rounding of the result to the half type, nothing more


@pytest.mark.parametrize("backend", ["torch"] + [p.values[0][0] for p in kernel_params()])
@pytest.mark.parametrize("kwargs", [dict(group_size=2.0), dict(group_size=2.5), dict(group_size="2"),
                                    dict(group_size=True), dict(group_size=None), dict(num_channels=1.0)], ids=str)
def test_a_group_size_or_slice_count_that_is_no_integer_is_refused(backend, kwargs):
    # 2.0 failed inside Triton's next_power_of_2 on every backend, 2.5 was "not dividing" the batch,
    # and True ran as a group of 1 on the kernels but failed in the reference's reshape
    name = next(iter(kwargs))
    with pytest.raises(TypeError, match=f"minibatch_stddev: {name} must be an integer"):
        ops.minibatch_stddev(torch.randn(4, 3, 2, 2), backend=backend, **kwargs)


def test_integer_like_group_sizes_are_taken():
    import numpy as np
    x = torch.randn(4, 4, 2, 2, dtype=torch.float64)
    want = mbstd.reference(x, 2, 2)
    torch.testing.assert_close(ops.minibatch_stddev(x, np.int64(2), torch.tensor(2), backend="torch"), want)


@pytest.mark.skipif(not _backend.triton_interpreter_active(), reason="records the interpreter's memory accesses")
def test_offsets_within_a_sample_past_int32_are_not_wrapped(monkeypatch):
    """A sample of more than 2^31 elements ((4, 4096, 1024, 1024)): the int32 offset c * stride_c
    of channel 2048 wrapped, and the kernels read and wrote 2^32 elements before the sample (a fault
    or silent corruption on a GPU). The launch functions take the int64 form for such a sample; here
    the kernels run with three channels 2^30 apart, their loads and stores recorded, not performed."""
    from test_ops_pixel_norm import assert_accessed_exactly, recorded_accesses
    meta = lambda *s: torch.empty(s, device="meta").contiguous(memory_format=torch.channels_last)  # noqa: E731
    for shape, wide in (((4, 4096, 1024, 1024), True), ((64, 512, 4, 4), False), ((8, 16, 1024, 1024), False)):
        n, c, h, w = shape
        x = meta(*shape)
        _, block_k = mbstd._blocks(4, c * h * w)
        assert mbstd._sample_i64(c * h * w, block_k, x, meta(n, c + 1, h, w)) == wide, shape
        assert mbstd._sample_i64(c * h * w, block_k, x.contiguous(), meta(n, c + 1, h, w).contiguous()) == wide
    assert mbstd._sample_i64(2**31 - 16, 32, meta(4, 1, 1, 1))  # the element index alone, rounded to blocks
    sc = 2**30
    strides = (1, sc, 1, 1)  # (N, C, H, W) = (4, 3, 1, 1): one group of 4, channels 2^30 apart
    for i64, stray in ((True, False), (False, True)):  # the int32 form wraps: what the host now avoids
        seen = recorded_accesses(monkeypatch)
        x, out, dout, dx = torch.zeros(4, 3, 1, 1), torch.zeros(4, 4, 1, 1), torch.zeros(4, 4, 1, 1), torch.zeros(4, 3)
        partial, coef = torch.zeros(1, 1), torch.zeros(1)
        mbstd._mbstd_fwd_kernel[(1, 1)](x, out, partial, 4, 1, 1, 3, 1, 1, *strides, *strides,
                                        ACC_F64=False, I64=i64, BLOCK_G=4, BLOCK_K=16)
        mbstd._mbstd_bwd_kernel[(1, 1)](x, dout, coef, dx, 4, 1, 1, 3, 1, 1, *strides, *strides,
                                        ACC_F64=False, I64=i64, BLOCK_G=4, BLOCK_K=16)
        offsets = {g + ch * sc for g in range(4) for ch in range(3)}
        if stray:
            with pytest.raises(AssertionError, match="outside the tensors"):
                assert_accessed_exactly(seen, (x, out, dout, dx), offsets, small=(partial, coef))
        else:
            assert_accessed_exactly(seen, (x, out, dout, dx), offsets, small=(partial, coef))
