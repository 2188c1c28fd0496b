import math

import pytest
import torch
import torch.nn.functional as F

from xrayforge.nn import EqualizedConv2d, EqualizedLinear, downsample_conv_kernel, upsample_conv_kernel


def test_equalized_linear_formula_by_hand():
    layer = EqualizedLinear(4, 2, gain=math.sqrt(2), activation="linear")
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 0.0, -1.0, 2.0], [0.5, 0.5, 0.5, 0.5]]))
        layer.bias.copy_(torch.tensor([0.1, -0.2]))
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    scale = math.sqrt(2) / math.sqrt(4)  # gain / sqrt(fan_in); the bias is not scaled
    expected = torch.tensor([[(1 - 3 + 8) * scale + 0.1, 5.0 * scale - 0.2]])
    torch.testing.assert_close(layer(x), expected)


def test_equalized_linear_lrelu_epilogue():
    layer = EqualizedLinear(2, 2, gain=1.0, activation="lrelu")
    with torch.no_grad():
        layer.weight.copy_(torch.eye(2))
        layer.bias.copy_(torch.tensor([0.0, -1.0]))
    y = layer(torch.tensor([[2.0, 0.0]]) * math.sqrt(2))  # scale 1/sqrt(2): linear part [2, 0]
    torch.testing.assert_close(y, torch.tensor([[2.0, -0.2]]))


def test_equalized_conv_formula_by_hand():
    conv = EqualizedConv2d(2, 1, 3, gain=math.sqrt(2), activation="linear")
    with torch.no_grad():
        conv.weight.fill_(1.0)
        conv.bias.fill_(0.5)
    x = torch.ones(1, 2, 3, 3)
    y = conv(x)
    scale = math.sqrt(2) / math.sqrt(2 * 9)
    assert y[0, 0, 1, 1].item() == pytest.approx(18 * scale + 0.5)   # centre sees all 18 inputs
    assert y[0, 0, 0, 0].item() == pytest.approx(8 * scale + 0.5)    # corner sees 2 × 4 (zero padding)


def test_initial_weights_are_standard_normal_and_biases_zero():
    conv = EqualizedConv2d(64, 64, 3)
    assert abs(conv.weight.std().item() - 1.0) < 0.02 and conv.bias.abs().max() == 0


def test_pixel_norm_epilogue_normalises():
    conv = EqualizedConv2d(3, 8, 3, activation="lrelu_pn")
    y = conv(torch.randn(2, 3, 5, 5))
    torch.testing.assert_close(y.square().mean(1), torch.ones(2, 5, 5), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("size", [4, 6, 9])
def test_fused_resampling_kernels_equal_the_plain_forms(dtype, tol, size):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, size, size, generator=g, dtype=dtype)
    w = torch.randn(5, 3, 3, 3, generator=g, dtype=dtype)
    up = F.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest"), w, padding=1)
    torch.testing.assert_close(F.conv_transpose2d(x, upsample_conv_kernel(w), stride=2, padding=1), up,
                               rtol=tol, atol=tol)
    if size % 2 == 0:
        down = F.avg_pool2d(F.conv2d(x, w, padding=1), 2)
        torch.testing.assert_close(F.conv2d(x, downsample_conv_kernel(w), stride=2, padding=1), down,
                                   rtol=tol, atol=tol)


@pytest.mark.parametrize("resample", ["up", "down"])
@pytest.mark.parametrize("activation", ["linear", "lrelu", "lrelu_pn"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fused_and_plain_layers_agree_with_gradients(resample, activation, dtype):
    torch.manual_seed(0)
    plain = EqualizedConv2d(6, 5, 3, activation=activation, resample=resample, fused=False)
    fused = EqualizedConv2d(6, 5, 3, activation=activation, resample=resample, fused=True)
    fused.load_state_dict(plain.state_dict())
    with torch.no_grad():
        plain.bias.normal_()
        fused.bias.copy_(plain.bias)
    x = torch.randn(2, 6, 8, 8, requires_grad=True)
    exact = plain.double()(x.double())
    plain.float()
    outs = []
    for layer in (plain, fused):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            y = layer(x)
        (gx,) = torch.autograd.grad(y.float().square().sum(), x)
        outs.append((y.float(), gx))
    tol = 1e-5 if dtype == torch.float32 else 0.1
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=tol, atol=tol)
    torch.testing.assert_close(outs[0][1], outs[1][1], rtol=tol, atol=tol * 10)
    torch.testing.assert_close(outs[1][0].double(), exact, rtol=tol, atol=tol)


def test_bad_layer_arguments():
    with pytest.raises(ValueError, match="activation"):
        EqualizedConv2d(1, 1, 3, activation="relu")
    with pytest.raises(ValueError, match="resample"):
        EqualizedConv2d(1, 1, 3, resample="sideways")
    with pytest.raises(ValueError, match="3×3"):
        EqualizedConv2d(1, 1, 1, resample="up")


def test_conv_gradfix_gives_the_same_gradient_penalty_gradients():
    """EqualizedConv2d through ops.conv2d (forced on, as on a GPU) and through PyTorch's autograd:
    the same WGAN-GP parameter gradients, for plain, fused-down and fused-up layers."""
    from xrayforge.nn.layers import set_conv_gradfix
    torch.manual_seed(0)
    layers = torch.nn.Sequential(EqualizedConv2d(2, 4, 3, activation="lrelu"),
                                 EqualizedConv2d(4, 4, 3, activation="lrelu", resample="down", fused=True),
                                 EqualizedConv2d(4, 3, 3, resample="up", fused=True)).double()
    x = torch.randn(2, 2, 8, 8, dtype=torch.float64, requires_grad=True)

    def grads(mode):
        set_conv_gradfix(layers, mode)
        (gx,) = torch.autograd.grad(layers(x).sum(), x, create_graph=True)
        # the last bias does not change the input gradient: unused by the penalty
        return torch.autograd.grad((gx.flatten(1).norm(dim=1) - 1).square().mean(), list(layers.parameters()),
                                   allow_unused=True)

    for ours, ref in zip(grads(True), grads(False)):
        assert (ours is None) == (ref is None)
        if ref is not None:
            torch.testing.assert_close(ours, ref)
    with pytest.raises(ValueError, match="expected True, False or 'cuda'"):
        set_conv_gradfix(layers, "yes")
