import importlib

import pytest
import torch

from xrayforge import ops

from conftest import assert_as_accurate_as_eager, kernel_params

bl = importlib.import_module("xrayforge.ops.bias_lrelu")

triton_params = [p for p in kernel_params() if p.values[0][0] == "triton"]


def make(shape, layout, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    if layout == "strided":
        x = torch.randn((shape[0], shape[1] * 2) + tuple(shape[2:]), generator=g)[:, ::2]
    else:
        x = torch.randn(shape, generator=g)
        if layout == "channels_last" and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
    return x.to(device=device, dtype=dtype)


def test_reference_hand_computed():
    y = bl.reference(torch.tensor([[-1.0, 2.0], [3.0, -4.0]]), torch.tensor([0.5, 1.0]))
    torch.testing.assert_close(y, torch.tensor([[-0.1, 3.0], [3.5, -0.6]]))


@pytest.mark.parametrize("kb", triton_params)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("shape", [(1, 1), (5, 3), (1, 7, 5, 3), (2, 16, 6, 6), (3, 512, 4, 4)], ids=str)
def test_kernel_matches_reference(kb, dtype, layout, shape):
    backend, device = kb
    if layout == "channels_last" and len(shape) == 2:
        pytest.skip("no channels_last for 2-D tensors")
    x = make(shape, layout, dtype, device)
    dy = make(shape, "contiguous", dtype, device, seed=1)
    bias = torch.randn(shape[1], generator=torch.Generator().manual_seed(2)).to(device)

    def run(b, x_, bias_):
        x_, bias_ = x_.detach().requires_grad_(True), bias_.detach().requires_grad_(True)
        y = ops.bias_lrelu(x_, bias_, backend=b)
        return (y,) + torch.autograd.grad(y, (x_, bias_), dy.to(y.dtype))

    ours, eager, exact = run(backend, x, bias), run("torch", x, bias), run("torch", x.double(), bias.double())
    assert ours[0].dtype == dtype and ours[2].dtype == bias.dtype
    db_scale = dy.double().abs().sum(dim=[d for d in range(x.dim()) if d != 1]).max().item()
    for o, e, ex, sc in zip(ours, eager, exact, (None, None, db_scale)):
        assert_as_accurate_as_eager(o, e, ex, dtype, scale=sc)


@pytest.mark.parametrize("kb", [pytest.param(("torch", "cpu"), id="torch")] + triton_params)
def test_gradcheck_to_third_order(kb):
    backend, device = kb
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 2, 3, generator=g, dtype=torch.float64).to(device).requires_grad_(True)
    b = torch.randn(3, generator=g, dtype=torch.float64).to(device).requires_grad_(True)
    fn = lambda x_, b_: ops.bias_lrelu(x_, b_, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, b))
    assert torch.autograd.gradgradcheck(fn, (x, b))
    # third order: the backward of the backward is the same masked map again
    y = fn(x, b)
    (gx,) = torch.autograd.grad((y ** 3).sum(), x, create_graph=True)
    (ggx,) = torch.autograd.grad((gx ** 2).sum(), x, create_graph=True)
    (g3,) = torch.autograd.grad(ggx.sum(), b)
    yr = bl.reference(x, b)
    (gxr,) = torch.autograd.grad((yr ** 3).sum(), x, create_graph=True)
    (ggxr,) = torch.autograd.grad((gxr ** 2).sum(), x, create_graph=True)
    torch.testing.assert_close(g3, torch.autograd.grad(ggxr.sum(), b)[0])


@pytest.mark.parametrize("kb", triton_params)
def test_wgan_gp_double_backward_matches_reference(kb):
    backend, device = kb
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, 3, 3, 3, generator=g, dtype=torch.float64).to(device).requires_grad_(True)
    w = torch.randn(3, generator=g, dtype=torch.float64).to(device).requires_grad_(True)
    b = torch.randn(3, generator=g, dtype=torch.float64).to(device).requires_grad_(True)

    def penalty(be):
        y = ops.bias_lrelu(x * w.view(1, -1, 1, 1), b, backend=be)
        (gx,) = torch.autograd.grad((y ** 2).sum(), x, create_graph=True)
        return torch.autograd.grad(gx.square().sum(), (w, b))

    for ours, ref in zip(penalty(backend), penalty("torch")):
        torch.testing.assert_close(ours, ref)


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_bad_input(backend):
    with pytest.raises(ValueError, match=r"bias must have shape \(3,\)"):
        ops.bias_lrelu(torch.randn(2, 3, 4, 4), torch.zeros(2), backend=backend)
    with pytest.raises(ValueError, match="slope must be positive"):
        ops.bias_lrelu(torch.randn(2, 3), torch.zeros(3), slope=0.0, backend=backend)
    with pytest.raises(TypeError, match="torch.int64"):
        ops.bias_lrelu(torch.ones(2, 3, dtype=torch.long), torch.zeros(3), backend=backend)
    with pytest.raises(ops.BackendUnavailableError, match="no kernel for bias_lrelu|not built"):
        ops.bias_lrelu(torch.randn(2, 3), torch.zeros(3), backend="cuda")


@pytest.mark.parametrize("kb", triton_params)
def test_bias_on_another_device_is_refused(kb):
    # the fused kernel takes the bias's raw pointer: one on another device was read as garbage
    backend, device = kb
    with pytest.raises(ValueError, match="bias is on meta"):
        ops.bias_lrelu(torch.randn(2, 3, 4, 4, device=device), torch.zeros(3, device="meta"), backend=backend)


@pytest.mark.parametrize("backend", ["torch"] + [p.values[0][0] for p in kernel_params()])
def test_a_slope_that_is_no_positive_number_is_refused(backend):
    x, b = torch.randn(2, 3), torch.zeros(3)
    # '<=' between a str (or None) and an int, from inside the check
    for slope in ("0.2", None, True):
        with pytest.raises(TypeError, match="bias_lrelu: slope must be a real number"):
            ops.bias_lrelu(x, b, slope=slope, backend=backend)
    with pytest.raises(ValueError, match="slope must be positive"):  # NaN > 0 is false: it was taken
        ops.bias_lrelu(x, b, slope=float("nan"), backend=backend)
