"""ops.conv2d: the same values and gradients of every order as F.conv2d / F.conv_transpose2d,
in every configuration the PGGAN layers use, and a WGAN-GP style double backward."""
import importlib

import pytest
import torch
import torch.nn.functional as F

from xrayforge.ops.conv2d import conv2d, no_weight_gradients, reference

from conftest import assert_as_accurate_as_eager

# (input shape, weight shape, stride, padding, transposed): 3×3, 1×1 (toRGB / fromRGB), the fused
# down convolution (4×4, stride 2) and the fused up convolution (transposed 4×4, stride 2); odd sizes
CONFIGS = [((2, 3, 7, 6), (5, 3, 3, 3), 1, 1, False),
           ((1, 4, 5, 5), (2, 4, 1, 1), 1, 0, False),
           ((2, 3, 8, 6), (4, 3, 4, 4), 2, 1, False),
           ((2, 3, 7, 5), (4, 3, 4, 4), 2, 1, False),
           ((2, 3, 4, 3), (3, 5, 4, 4), 2, 1, True)]
IDS = ["3x3", "1x1", "down", "down-odd", "up"]


def _inputs(xs, ws, dtype=torch.float64, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(xs, generator=g, dtype=dtype).requires_grad_(True)
    w = torch.randn(ws, generator=g, dtype=dtype).requires_grad_(True)
    b = torch.randn(ws[0], generator=g, dtype=dtype).requires_grad_(True) if bias else None
    return x, w, b


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_gradcheck_and_gradgradcheck(cfg):
    xs, ws, stride, pad, transposed = cfg
    x, w, _ = _inputs(xs, ws)
    fn = lambda x, w: conv2d(x, w, None, stride, pad, transposed)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w))
    assert torch.autograd.gradgradcheck(fn, (x, w))


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_values_and_gradients_of_three_orders_match_pytorch(cfg, layout):
    xs, ws, stride, pad, transposed = cfg
    x, w, b = _inputs(xs, ws, bias=not transposed)
    if layout == "channels_last":
        x = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_(True)

    def orders(fn):
        y = fn(x, w, b, stride, pad, transposed)
        (gx,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)   # as the gradient penalty
        inputs = (w, b) if b is not None else (w,)
        second = torch.autograd.grad(gx.square().sum() + y.sum(), (x,) + inputs, create_graph=True)
        third = torch.autograd.grad(sum(s.square().sum() for s in second), (x,) + inputs)
        return [y, gx, *second, *third]

    for ours, ref in zip(orders(conv2d), orders(reference)):
        torch.testing.assert_close(ours, ref)


def test_wgan_gp_penalty_through_a_layer_matches_pytorch():
    """d/dθ of (|∇x D(x)| - 1)² with D = lrelu(conv) (the shape of D's first layers), float32."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 2, 9, 9, generator=g).requires_grad_(True)
    w1 = torch.randn(4, 2, 3, 3, generator=g).requires_grad_(True)
    w2 = torch.randn(6, 4, 4, 4, generator=g).requires_grad_(True)

    def grads(conv, skip_weights=False):
        h = F.leaky_relu(conv(x, w1, None, 1, 1, False), 0.2)
        score = conv(h, w2, None, 2, 1, False).sum()
        with no_weight_gradients(skip_weights):
            (gx,) = torch.autograd.grad(score, x, create_graph=True)
        penalty = (gx.flatten(1).norm(dim=1) - 1).square().mean()
        return torch.autograd.grad(penalty, (w1, w2))

    ref = grads(reference)
    for skip in (False, True):  # skipping the unwanted weight gradients changes nothing
        for ours, r in zip(grads(conv2d, skip), ref):
            torch.testing.assert_close(ours, r, rtol=1e-5, atol=1e-5)


def test_no_weight_gradients_skips_them_in_the_penalty(monkeypatch):
    mod = importlib.import_module("xrayforge.ops.conv2d")
    calls = []
    real = mod._Conv2dWeightGrad.forward
    monkeypatch.setattr(mod._Conv2dWeightGrad, "forward", staticmethod(lambda *a: calls.append(1) or real(*a)))
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, requires_grad=True)
    y = conv2d(x, w, None, 1, 1)
    with no_weight_gradients():
        (gx,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    assert calls == []
    gx.square().sum().backward()
    assert calls and w.grad is not None and torch.isfinite(w.grad).all()


def test_transposed_with_output_padding_and_bias_to_second_order():
    # PyTorch's own third-order gradient fails here, so gradcheck of the first two orders instead
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 2, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 3, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, generator=g, dtype=torch.float64, requires_grad=True)
    fn = lambda x, w, b: conv2d(x, w, b, 2, 1, True, 1)  # noqa: E731
    torch.testing.assert_close(fn(x, w, b), F.conv_transpose2d(x, w, b, 2, 1, 1))
    assert torch.autograd.gradcheck(fn, (x, w, b))
    assert torch.autograd.gradgradcheck(fn, (x, w, b))


def test_float64_is_not_cast_under_autocast():
    x, w = torch.randn(1, 2, 5, 5, dtype=torch.float64), torch.randn(3, 2, 3, 3, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert conv2d(x, w, None, 1, 1).dtype == F.conv2d(x, w, None, 1, 1).dtype == torch.float64


def test_autocast_casts_like_a_convolution():
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = conv2d(x, w, None, 1, 1)
        y_ref = F.conv2d(x, w, None, 1, 1)
    assert y.dtype == y_ref.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), y_ref.float())
    (gx,) = torch.autograd.grad(y.float().square().sum(), x, create_graph=True)
    gw = torch.autograd.grad(gx.square().sum(), w)[0]
    assert gx.dtype == torch.float32 and gw.dtype == torch.float32 and torch.isfinite(gw).all()


def test_bad_inputs_say_what_is_wrong():
    with pytest.raises(ValueError, match="4-D"):
        conv2d(torch.randn(3, 6, 6), torch.randn(4, 3, 3, 3))
    with pytest.raises(ValueError, match="input has 2 channels"):
        conv2d(torch.randn(1, 2, 6, 6), torch.randn(4, 3, 3, 3))


@pytest.mark.gpu
@pytest.mark.parametrize("transposed", [False, True], ids=["down", "up"])
def test_bf16_wgan_gp_gradients_on_gpu_are_as_accurate_as_pytorch(transposed):
    """The GPU path in bf16 under autocast, at a 1024-px D layer's channel count (16), against
    F.conv2d's own double backward, both measured against float64 (the op contract)."""
    g = torch.Generator(device="cuda").manual_seed(0)
    shape = (4, 16, 64, 64) if not transposed else (4, 16, 32, 32)
    x0 = torch.randn(shape, device="cuda", generator=g).contiguous(memory_format=torch.channels_last)
    w0 = torch.randn((32, 16, 4, 4) if not transposed else (16, 32, 4, 4), device="cuda", generator=g)

    def grads(conv, dtype=None):
        x = (x0.double() if dtype is None else x0).detach().requires_grad_(True)
        w = (w0.double() if dtype is None else w0).detach().requires_grad_(True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype is not None):
            y = conv(x, w, None, 2, 1, transposed)
            (gx,) = torch.autograd.grad(y.float().sum() if dtype else y.sum(), x, create_graph=True)
            loss = (gx.flatten(1).norm(dim=1) - 1).square().mean()
        return torch.autograd.grad(loss, w)[0]

    exact = grads(reference)
    assert_as_accurate_as_eager(grads(conv2d, torch.bfloat16), grads(reference, torch.bfloat16), exact,
                                torch.bfloat16)


@pytest.mark.parametrize("kwargs,name", [({"stride": 1.5}, "stride"), ({"stride": (2, 2)}, "stride"),
                                         ({"padding": 1.0}, "padding"), ({"padding": None}, "padding"),
                                         ({"transposed": True, "output_padding": 0.5}, "output_padding")], ids=str)
def test_stride_and_padding_that_are_no_integer_are_refused(kwargs, name):
    # int() took stride 1.5 as 1 and padding 1.0 as 1 (silently), and (2, 2) failed inside int()
    x = torch.randn(1, 2, 5, 5, dtype=torch.float64)
    w = torch.randn(2, 3, 3, 3, dtype=torch.float64) if kwargs.get("transposed") else torch.randn(3, 2, 3, 3,
                                                                                                 dtype=torch.float64)
    with pytest.raises(TypeError, match=f"conv2d: {name} must be one integer"):
        conv2d(x, w, **kwargs)


def test_integer_like_strides_are_taken():
    import numpy as np
    x, w = torch.randn(1, 2, 5, 5, dtype=torch.float64), torch.randn(3, 2, 3, 3, dtype=torch.float64)
    torch.testing.assert_close(conv2d(x, w, stride=np.int64(2), padding=torch.tensor(1)),
                               reference(x, w, stride=2, padding=1))
