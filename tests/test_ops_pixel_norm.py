import importlib
import logging
import math

import pytest
import torch

from xrayforge import ops
from xrayforge.ops import _backend
from xrayforge.ops.pixel_norm import reference_bias_lrelu

from conftest import assert_as_accurate_as_eager, kernel_params, pretend_gpu

pn = importlib.import_module("xrayforge.ops.pixel_norm")  # the module; the package exports the function

SHAPES = [(1, 1), (5, 3), (1, 7, 5, 3), (3, 13, 4, 1), (2, 16, 6, 6), (2, 512, 4, 4)]
LAYOUTS = ["contiguous", "channels_last", "strided"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def make(shape, layout, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    if layout == "strided":  # every other channel of a wider tensor: not dense in any layout
        wide = torch.randn((shape[0], shape[1] * 2) + tuple(shape[2:]), generator=g)
        x = wide[:, ::2]
    else:
        x = torch.randn(shape, generator=g)
        if layout == "channels_last" and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
    return x.to(device=device, dtype=dtype)


# ---------------------------------------------------------------- the formula itself
def test_reference_on_hand_computed_values():
    x = torch.tensor([[3.0, 4.0]])
    expected = torch.tensor([[3.0, 4.0]]) / math.sqrt(12.5 + 1e-8)
    torch.testing.assert_close(pn.reference(x), expected)
    # bias + leaky ReLU first: a = [-0.5, 1] -> [-0.1, 1] -> mean square 0.505
    y = pn.reference_bias_lrelu(torch.tensor([[-1.0, 2.0]]), torch.tensor([0.5, -1.0]))
    torch.testing.assert_close(y, torch.tensor([[-0.1, 1.0]]) / math.sqrt(0.505 + 1e-8))


def test_reference_normalises_over_channels_only():
    x = torch.randn(2, 6, 3, 4, dtype=torch.float64)
    y = pn.reference(x)
    torch.testing.assert_close(y.square().mean(dim=1), torch.ones(2, 3, 4, dtype=torch.float64), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kb", kernel_params())
def test_kernels_on_hand_computed_values(kb):
    backend, device = kb
    x = torch.tensor([[3.0, 4.0], [0.0, -2.0]], device=device)
    # root mean square over channels: sqrt(12.5) and sqrt(2)
    expected = torch.tensor([[3.0 / math.sqrt(12.5), 4.0 / math.sqrt(12.5)], [0.0, -math.sqrt(2.0)]])
    torch.testing.assert_close(ops.pixel_norm(x, eps=0.0, backend=backend).cpu(), expected)
    y = ops.bias_lrelu_pixel_norm(torch.tensor([[-1.0, 2.0]], device=device), torch.tensor([0.5, -1.0], device=device),
                                  backend=backend)
    torch.testing.assert_close(y.cpu(), torch.tensor([[-0.1, 1.0]]) / math.sqrt(0.505 + 1e-8))


# ---------------------------------------------------------------- kernels against the reference
@pytest.mark.parametrize("kb", kernel_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("with_bias", [False, True], ids=["pixel_norm", "bias_lrelu_pixel_norm"])
def test_kernel_matches_reference(kb, dtype, layout, shape, with_bias):
    backend, device = kb
    if layout == "channels_last" and len(shape) == 2:
        pytest.skip("no channels_last for 2-D tensors")
    x = make(shape, layout, dtype, device)
    dy = make(shape, "contiguous", dtype, device, seed=1)
    bias = torch.randn(shape[1], generator=torch.Generator().manual_seed(2)).to(device)  # fp32, as in autocast

    def run(fn_backend, x_, b_):
        x_ = x_.detach().requires_grad_(True)
        b_ = b_.detach().requires_grad_(True)
        if with_bias:
            y = ops.bias_lrelu_pixel_norm(x_, b_, backend=fn_backend)
            dx, db = torch.autograd.grad(y, (x_, b_), dy.to(y.dtype))
        else:
            y = ops.pixel_norm(x_, backend=fn_backend)
            (dx,), db = torch.autograd.grad(y, (x_,), dy.to(y.dtype)), None
        return y, dx, db

    ours = run(backend, x, bias)
    eager = run("torch", x, bias)
    exact = run("torch", x.double(), bias.double())
    assert ours[0].dtype == dtype and ours[0].shape == x.shape
    if layout != "strided":
        assert ours[0].stride() == x.stride(), "the output keeps the input's layout"
    # dx = r*dy - h*r^3*mean(dy*h) is a difference of terms of size r*|dy|; db sums dx over pixels
    h = exact[0] if not with_bias else torch.nn.functional.leaky_relu(
        x.double() + bias.double().view((1, -1) + (1,) * (x.dim() - 2)), 0.2)
    term = (dy.double().abs() * torch.rsqrt(h.square().mean(1, keepdim=True) + 1e-8))
    scales = [None, term.max().item(), term.sum(dim=[d for d in range(x.dim()) if d != 1]).max().item()]
    for o, e, ex, sc in zip(ours, eager, exact, scales):
        if o is not None:
            assert_as_accurate_as_eager(o, e, ex, dtype, scale=sc)


# ---------------------------------------------------------------- gradients in float64
@pytest.mark.parametrize("kb", [pytest.param(("torch", "cpu"), id="torch")] + kernel_params())
@pytest.mark.parametrize("shape", [(3, 4), (2, 3, 2, 3)], ids=str)
def test_gradcheck_and_gradgradcheck(kb, shape):
    backend, device = kb
    fast = backend == "triton" and device == "cpu"  # the interpreter is slow; random projections suffice
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g, dtype=torch.float64).to(device).requires_grad_(True)
    b = torch.randn(shape[1], generator=g, dtype=torch.float64).to(device).requires_grad_(True)
    pn_fn = lambda x_: ops.pixel_norm(x_, backend=backend)  # noqa: E731
    ep_fn = lambda x_, b_: ops.bias_lrelu_pixel_norm(x_, b_, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(pn_fn, (x,), fast_mode=fast)
    assert torch.autograd.gradgradcheck(pn_fn, (x,), fast_mode=fast)
    assert torch.autograd.gradcheck(ep_fn, (x, b), fast_mode=fast)
    assert torch.autograd.gradgradcheck(ep_fn, (x, b), fast_mode=fast)


@pytest.mark.parametrize("kb", kernel_params())
def test_float64_keeps_float64_constants(kb):
    """Triton types a float argument as float32 (0.2 would be 0.2 + 3e-9): in float64 the slope
    and eps keep their float64 values, forward and backward (an H200 showed 1.5e-8 errors)."""
    backend, device = kb
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 3, 4, generator=g, dtype=torch.float64).to(device).requires_grad_(True)
    b = torch.randn(5, generator=g, dtype=torch.float64).to(device).requires_grad_(True)
    dy = torch.randn(2, 5, 3, 4, generator=g, dtype=torch.float64).to(device)
    for slope in (0.2, 0.1):
        got = ops.bias_lrelu_pixel_norm(x, b, slope=slope, eps=1e-3, backend=backend)
        ref = reference_bias_lrelu(x, b, slope, 1e-3)
        torch.testing.assert_close(got, ref, rtol=1e-13, atol=1e-13)
        for gg, gr in zip(torch.autograd.grad(got, (x, b), dy), torch.autograd.grad(ref, (x, b), dy)):
            torch.testing.assert_close(gg, gr, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_bad_input(backend):
    with pytest.raises(ValueError, match=r"\(N, C\) or \(N, C, H, W\).*\(2, 3, 4\)"):
        ops.pixel_norm(torch.randn(2, 3, 4), backend=backend)
    with pytest.raises(TypeError, match="torch.int64"):
        ops.pixel_norm(torch.ones(2, 3, dtype=torch.long), backend=backend)
    with pytest.raises(TypeError, match="torch.Tensor"):
        ops.pixel_norm([[1.0, 2.0]], backend=backend)
    with pytest.raises(ValueError, match=r"bias must have shape \(3,\)"):
        ops.bias_lrelu_pixel_norm(torch.randn(2, 3, 4, 4), torch.zeros(4), backend=backend)


@pytest.mark.parametrize("kb", kernel_params())
def test_empty_batch(kb):
    backend, device = kb
    x = torch.randn(0, 4, 3, 3, device=device)
    assert ops.pixel_norm(x, backend=backend).shape == x.shape


# ---------------------------------------------------------------- torch.compile
@pytest.mark.parametrize("kb", kernel_params())
def test_torch_compile_traces_the_custom_ops(kb):
    backend, device = kb
    torch._dynamo.reset()

    def block(x, b):
        return ops.pixel_norm(ops.bias_lrelu_pixel_norm(x, b, backend=backend), backend=backend).sum()

    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    x = torch.randn(2, 5, 3, 3, device=device, requires_grad=True)
    b = torch.randn(5, device=device, requires_grad=True)
    out = compiled(x, b)
    gx, gb = torch.autograd.grad(out, (x, b))
    ex, eb = torch.autograd.grad(block(x, b), (x, b))
    torch.testing.assert_close(out, block(x, b))
    torch.testing.assert_close(gx, ex)
    torch.testing.assert_close(gb, eb)


# ---------------------------------------------------------------- full size on the GPU
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("shape", [(8, 16, 1024, 1024), (16, 64, 256, 256), (64, 512, 4, 4)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_full_size_on_gpu(backend, shape, dtype):
    if backend == "cuda" and "cuda" not in ops.available_backends("pixel_norm", "cuda"):
        pytest.skip("CUDA extension not built")
    x = torch.randn(shape, device="cuda", dtype=dtype)
    bias = torch.randn(shape[1], device="cuda")
    for layout_x in (x, x.contiguous(memory_format=torch.channels_last)):
        for fn, args in ((ops.pixel_norm, ()), (ops.bias_lrelu_pixel_norm, (bias,))):
            ours = fn(layout_x, *args, backend=backend)
            eager = fn(layout_x, *args, backend="torch")
            exact = fn(layout_x.double(), *(a.double() for a in args), backend="torch")
            assert_as_accurate_as_eager(ours, eager, exact, dtype)


@pytest.mark.parametrize("kb", kernel_params())
def test_double_backward_with_output_dependent_grad_matches_reference(kb):
    """d/dw |d(sum y^2)/dx|^2 — the incoming gradient depends on the output, as in WGAN-GP."""
    backend, device = kb
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 4, 2, 3, generator=g, dtype=torch.float64).to(device).requires_grad_(True)
    w = torch.randn(4, generator=g, dtype=torch.float64).to(device).requires_grad_(True)
    b = torch.randn(4, generator=g, dtype=torch.float64).to(device).requires_grad_(True)

    def penalty(be):
        y = ops.bias_lrelu_pixel_norm(x * w.view(1, -1, 1, 1), b, backend=be)
        y = ops.pixel_norm(y * w.view(1, -1, 1, 1), backend=be)
        (gx,) = torch.autograd.grad((y ** 3).sum(), x, create_graph=True)
        return torch.autograd.grad(gx.square().sum(), (w, b))

    for ours, ref in zip(penalty(backend), penalty("torch")):
        torch.testing.assert_close(ours, ref)


@pytest.mark.parametrize("kb", kernel_params())
def test_size_one_width_with_any_stride(kb):
    # a transposed (N, C, 1, W) view is contiguous but its size-1 W has stride W, not 1:
    # the pixels step by H's stride (they were read at W's and ran past the tensor)
    backend, device = kb
    x = torch.randn(2, 3, 1, 5, device=device).transpose(2, 3)
    assert x.is_contiguous() and x.stride(3) != 1
    bias = torch.randn(3, device=device)
    torch.testing.assert_close(ops.pixel_norm(x, backend=backend), pn.reference(x))
    torch.testing.assert_close(ops.bias_lrelu_pixel_norm(x, bias, backend=backend), reference_bias_lrelu(x, bias))
    torch.testing.assert_close(ops.bias_lrelu(x, bias, backend=backend),
                               torch.nn.functional.leaky_relu(x + bias[:, None, None], 0.2))
    xg = x.detach().clone().transpose(2, 3).contiguous().transpose(2, 3).requires_grad_()
    dy = torch.randn(2, 3, 5, 1, device=device)
    (g,) = torch.autograd.grad(ops.pixel_norm(xg, backend=backend), xg, dy)
    (g_ref,) = torch.autograd.grad(pn.reference(xg), xg, dy)
    torch.testing.assert_close(g, g_ref)


@pytest.mark.parametrize("kb", kernel_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["nchw", "channels_last"])
def test_infinite_and_nan_values_give_what_the_reference_gives(kb, dtype, layout):
    """A pixel holding an infinity: its mean square is inf, so the reference gives NaN in that
    channel and (-)0 in the others; a NaN makes the whole pixel NaN. csrc's one-thread-per-pixel
    kernel (NCHW) sums the squares with Neumaier compensation, whose (v - t) + sum is inf - inf
    for an infinite term: NaN in every channel, forward and backward (fix in csrc/common.cuh,
    CompensatedSum::add: no compensation once the running sum is not finite)."""
    backend, device = kb
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 5, 3, 3, generator=g, dtype=dtype)
    x[0, 2, 0, 0], x[0, 4, 1, 2], x[1, 0, 2, 1] = float("inf"), -float("inf"), float("nan")
    b = torch.randn(5, generator=g, dtype=dtype).to(device)
    dy = torch.randn(2, 5, 3, 3, generator=g, dtype=dtype).to(device)
    x = x.to(device).contiguous(memory_format=layout)
    for fn, ref, args in ((ops.pixel_norm, pn.reference, ()), (ops.bias_lrelu_pixel_norm, reference_bias_lrelu, (b,))):
        xg = x.clone().requires_grad_(True)
        y, r = fn(xg, *args, backend=backend), ref(xg, *args)
        assert r[0, :, 0, 0].isnan().sum() == 1 and r[0, :, 1, 2].isnan().sum() == 1  # the reference's semantics
        torch.testing.assert_close(y, r, equal_nan=True)
        torch.testing.assert_close(torch.autograd.grad(y, xg, dy)[0], torch.autograd.grad(r, xg, dy)[0], equal_nan=True)


@pytest.mark.parametrize("kb", kernel_params())
@pytest.mark.parametrize("shape", [(2, 0, 3, 3), (3, 0)], ids=str)
def test_zero_channels_forward_and_backward(kb, shape):
    # the backward sized its Triton blocks by 4096 // next_power_of_2(0): ZeroDivisionError
    backend, device = kb
    x = torch.randn(shape, device=device, requires_grad=True)
    b = torch.zeros(0, device=device, requires_grad=True)
    for fn, args in ((ops.pixel_norm, ()), (ops.bias_lrelu_pixel_norm, (b,)), (ops.bias_lrelu, (b,))):
        y = fn(x, *args, backend=backend)
        grads = torch.autograd.grad(y.sum(), (x,) + args)
        assert y.shape == x.shape and [g.shape for g in grads] == [t.shape for t in (x,) + args]


@pytest.mark.parametrize("kb", kernel_params())
def test_launches_run_under_the_tensors_device_guard(kb, monkeypatch):
    # Triton and the extension launch on the current device: a tensor on another GPU than the
    # current one needs its device made current around the launch (knn and moments did it)
    import contextlib
    mbstd = importlib.import_module("xrayforge.ops.minibatch_stddev")
    backend, device = kb
    guarded = []

    def guard(t):
        guarded.append(t.device)
        return contextlib.nullcontext()

    monkeypatch.setattr(pn, "device_guard", guard)
    monkeypatch.setattr(mbstd, "device_guard", guard)
    x = torch.randn(4, 3, 2, 2, device=device, requires_grad=True)
    b = torch.randn(3, device=device, requires_grad=True)
    for y in (ops.pixel_norm(x, backend=backend), ops.bias_lrelu_pixel_norm(x, b, backend=backend),
              ops.minibatch_stddev(x, backend=backend)):
        torch.autograd.grad(y.square().sum(), x)
    assert guarded == [x.device] * 6  # three forward and three backward launches


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_a_tensor_on_another_gpu_than_the_current_one(backend):
    if "cuda" not in ops.available_backends("pixel_norm", "cuda") and backend == "cuda":
        pytest.skip("CUDA extension not built")
    assert torch.cuda.current_device() == 0
    x = torch.randn(8, 16, 5, 5, device="cuda:1", requires_grad=True)
    b = torch.randn(16, device="cuda:1", requires_grad=True)
    for fn, args, ref in ((ops.pixel_norm, (), pn.reference), (ops.bias_lrelu_pixel_norm, (b,), reference_bias_lrelu),
                          (ops.minibatch_stddev, (), None)):
        y = fn(x, *args, backend=backend)
        r = fn(x, *args, backend="torch") if ref is None else ref(x, *args)
        torch.testing.assert_close(y, r)
        torch.testing.assert_close(torch.autograd.grad(y.square().sum(), x)[0],
                                   torch.autograd.grad(r.square().sum(), x)[0])


# ---------------------------------------------------------------- limits of the fused kernels
def test_auto_falls_back_past_the_triton_channel_limit(monkeypatch, caplog):
    # a pixel's channels live in one Triton program's registers, at most MAX_TRITON_CHANNELS: auto
    # chose Triton on a GPU and the kernel refused the input; now it takes the next backend that can
    pretend_gpu(monkeypatch, available=("triton",))
    x, b = torch.randn(2, pn.MAX_TRITON_CHANNELS + 1), torch.randn(pn.MAX_TRITON_CHANNELS + 1)
    with caplog.at_level(logging.WARNING, logger="xrayforge.ops"):
        for _ in range(2):
            torch.testing.assert_close(ops.pixel_norm(x), pn.reference(x))
            torch.testing.assert_close(ops.bias_lrelu_pixel_norm(x, b), reference_bias_lrelu(x, b))
            torch.testing.assert_close(ops.bias_lrelu(x, b), torch.nn.functional.leaky_relu(x + b, 0.2))
    said = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(said) == 3, said  # once per op
    assert all("fell back to 'torch'" in m and "at most 16384 channels, got 16385" in m for m in said), said


def test_auto_takes_cuda_past_the_triton_channel_limit_where_it_can(monkeypatch):
    from xrayforge.ops import _backend
    pretend_gpu(monkeypatch, available=("triton", "cuda"))
    for op in ("pixel_norm", "bias_lrelu_pixel_norm"):  # the mechanism, whatever the table holds today
        monkeypatch.setitem(_backend.GPU_VALIDATED, op, ("triton", "cuda"))
    wide, narrow = torch.randn(2, pn.MAX_TRITON_CHANNELS + 1), torch.randn(2, 512)
    pick = lambda op, x, bias_grad: _backend.resolve(op, x, "auto", pn._epilogue_refusals(x, bias_grad))  # noqa: E731
    assert pick("pixel_norm", narrow, False) == "triton"
    assert pick("pixel_norm", wide, False) == "cuda"  # GPU_VALIDATED: ("triton", "cuda")
    assert pick("bias_lrelu_pixel_norm", wide, True) == "torch"  # cuda's bias gradient takes at most 1024
    assert pick("bias_lrelu", wide, True) == "torch"  # ("triton",): no other fused kernel


@pytest.mark.parametrize("kb", [p for p in kernel_params() if p.values[0][0] == "triton"])
def test_named_triton_past_the_channel_limit_says_the_limit(kb):
    _, device = kb
    x = torch.randn(2, pn.MAX_TRITON_CHANNELS + 1, device=device)
    b = torch.randn(pn.MAX_TRITON_CHANNELS + 1, device=device)
    for fn, args in ((ops.pixel_norm, ()), (ops.bias_lrelu_pixel_norm, (b,)), (ops.bias_lrelu, (b,))):
        with pytest.raises(ops.BackendUnavailableError,
                           match="backend 'triton' cannot take this input: .*at most 16384 channels, got 16385"):
            fn(x, *args, backend="triton")


def test_a_batch_past_the_launch_grid_is_refused_by_both_kernels(monkeypatch, caplog):
    # both kernels launch one row of blocks per sample of a 4-D input, along grid.y (at most 65535):
    # csrc refused a larger batch at launch time (under auto too), Triton's launch would fail on a GPU
    refused = dict(pn._epilogue_refusals(torch.empty(65536, 2, 1, 1), bias_grad=False))
    assert sorted(refused) == ["cuda", "triton"]
    assert all("65536 blocks along grid.y, above CUDA's limit of 65535" in why and "(65536, 2, 1, 1)" in why
               for why in refused.values())
    assert pn._epilogue_refusals(torch.empty(65535, 2, 1, 1), bias_grad=False) == ()
    assert pn._epilogue_refusals(torch.empty(65536, 2), bias_grad=False) == ()  # (N, C): one row of pixels
    assert pn._epilogue_refusals(torch.empty(65536, 0, 1, 1), bias_grad=False) == ()  # nothing launches
    pretend_gpu(monkeypatch, available=("triton", "cuda"))
    x = torch.randn(65536, 2, 1, 1)
    with caplog.at_level(logging.WARNING, logger="xrayforge.ops"):
        torch.testing.assert_close(ops.pixel_norm(x), pn.reference(x))
    assert "fell back to 'torch'" in caplog.text and "grid.y" in caplog.text
    with pytest.raises(ops.BackendUnavailableError, match="backend 'cuda' cannot take this input: .*grid.y"):
        ops.pixel_norm(x, backend="cuda")


def test_cuda_bias_gradient_channel_limit_is_checked_in_the_forward(monkeypatch):
    # csrc's backward refuses a bias gradient over 1024 channels: the forward ran and the backward
    # failed; now a named 'cuda' is refused up front and auto takes the next backend that can
    from xrayforge.ops import _backend
    pretend_gpu(monkeypatch, available=("cuda",))
    x, b = torch.randn(2, 1025), torch.randn(1025)
    with pytest.raises(ops.BackendUnavailableError, match="at most 1024 channels, got 1025"):
        ops.bias_lrelu_pixel_norm(x, b, backend="cuda")
    with _backend.auto_candidates(("cuda",)):
        torch.testing.assert_close(ops.bias_lrelu_pixel_norm(x, b, backend="auto"), reference_bias_lrelu(x, b))


@pytest.mark.parametrize("backend", ["torch"] + [p.values[0][0] for p in kernel_params()])
@pytest.mark.parametrize("op,kwargs,name", [
    ("pixel_norm", {"eps": "1e-8"}, "eps"), ("pixel_norm", {"eps": None}, "eps"),
    ("bias_lrelu_pixel_norm", {"slope": "0.2"}, "slope"), ("bias_lrelu_pixel_norm", {"eps": None}, "eps"),
    ("bias_lrelu_pixel_norm", {"slope": True}, "slope"),
], ids=str)
def test_an_eps_or_slope_that_is_no_number_is_refused(backend, op, kwargs, name):
    # a string ran on the fused backends (float("1e-8")) and failed inside the reference's arithmetic;
    # None failed deep inside either
    x = torch.randn(2, 3)
    args = (x,) if op == "pixel_norm" else (x, torch.zeros(3))
    with pytest.raises(TypeError, match=f"{op}: {name} must be a real number"):
        getattr(ops, op)(*args, backend=backend, **kwargs)


def test_numeric_eps_and_slope_of_any_kind_are_taken():
    import numpy as np
    x, b = torch.randn(2, 3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    want = reference_bias_lrelu(x, b, 0.25, 1e-3)
    for slope, eps in ((np.float32(0.25), np.float64(1e-3)), (torch.tensor(0.25), torch.tensor(1e-3))):
        torch.testing.assert_close(ops.bias_lrelu_pixel_norm(x, b, slope=slope, eps=eps, backend="torch"), want)


# ---------------------------------------------------------------- 64-bit offsets
def recorded_accesses(monkeypatch):
    """Run interpreted kernels without touching memory: every load and store records the addresses
    of its unmasked lanes (loads return their ``other``), so a launch may be given strides far past
    the tensors it holds. The returned set of addresses fills as the kernels run."""
    import numpy as np
    import triton.runtime.interpreter as interp
    seen = set()

    class Memory:
        @staticmethod
        def load(ptrs, mask, other, dtype):
            seen.update(ptrs[mask].astype(np.uint64).tolist())
            return np.broadcast_to(np.asarray(other, dtype=dtype), ptrs.shape).copy()

        @staticmethod
        def store(ptrs, value, mask):
            seen.update(ptrs[mask].astype(np.uint64).tolist())

    monkeypatch.setattr(interp, "_interpreter", Memory)
    return seen


def assert_accessed_exactly(seen, tensors, offsets, small=()):
    """Every recorded address is one of ``offsets`` (elements) into one of ``tensors``, or among the
    first 16 elements of a tensor of ``small``, and each offset was reached in each of ``tensors``."""
    want = {t.data_ptr() + o * t.element_size() for t in tensors for o in offsets}
    want_small = {t.data_ptr() + i * t.element_size() for t in small for i in range(16)}
    stray = sorted(seen - want - want_small)
    assert not stray, f"{len(stray)} accesses outside the tensors, e.g. {[hex(a) for a in stray[:3]]}"
    assert want <= seen, "offsets never reached"


@pytest.mark.skipif(not _backend.triton_interpreter_active(), reason="records the interpreter's memory accesses")
@pytest.mark.parametrize("bias", [False, True], ids=["pixel_norm", "bias_lrelu_pixel_norm"])
def test_channel_offsets_past_int32_are_not_wrapped(monkeypatch, bias):
    """A sample of more than 2^31 elements (N, 4096, 1024, 1024): channel c sits c * H * W elements
    in. The int32 product c * stride_c wrapped, so channel 2048 was read and written 2^32 elements
    before its sample (a fault or silent corruption on a GPU). Three channels 2^30 apart stand in
    for it; the kernels' loads and stores are recorded, not performed."""
    x = torch.zeros(1, 3, 1, 1)
    b = torch.zeros(3) if bias else None
    sc = 2**30
    monkeypatch.setattr(pn, "channel_view", lambda t: (1, 3, 1, 0, sc, 1))
    seen = recorded_accesses(monkeypatch)
    y = pn._epilogue_fwd(x, b, 0.2, 1e-8, bias, True, "triton")
    dy = torch.zeros_like(x)
    dx, _ = pn._epilogue_bwd(dy, x, b, 0.2, 1e-8, bias, True, False, "triton")
    assert_accessed_exactly(seen, (x, y, dy, dx), (0, sc, 2 * sc), small=(b,) if bias else ())
    assert not pn._channel_i64(2048, 2**20) and pn._channel_i64(2049, 2**20)
    # the backward's bias-gradient partial sums, (rows, C): one row per block of pixels of each sample
    assert not pn._channel_i64(4096, 1, 2**19) and pn._channel_i64(4096, 1, 2**19 + 1)
