"""2-D convolution whose gradients of every order are convolutions and weight gradients.

WGAN-GP differentiates the discriminator's input gradient once more, so every convolution of
D meets a double backward. PyTorch's own double backward of a convolution computes one of its
weight terms as a forward convolution of the activations with the incoming gradient as the
kernel: at 1024 px that is a 16-channel convolution with a 1024 × 1024 kernel, which cuDNN runs
as one huge implicit GEMM. Measured on an H200 (bf16, batch 16), four such calls took 0.85 s of
a 1.17 s training step, where the proper weight-gradient kernel takes about 2 ms.

Here the gradient with respect to the input is the transposed convolution, and the gradient
with respect to the weight is ``aten.convolution_backward`` asking for the weight alone; each of
them is again an autograd Function of the same kind, so any order of gradient stays on cuDNN's
forward, data-gradient and weight-gradient kernels (the scheme of StyleGAN2-ADA's
conv2d_gradfix). Values and gradients are those of ``F.conv2d`` / ``F.conv_transpose2d``
(``reference``); under autocast the inputs are cast as autocast would cast them.

A custom Function's backward cannot see which of its inputs the caller asked gradients for, so
the gradient penalty's ``autograd.grad(D(x), x)`` would also build every layer's weight
gradient and throw it away; :func:`no_weight_gradients` says they are not wanted (as in
StyleGAN2-ADA). Gradients taken later, with the flag off, are complete.
"""
from __future__ import annotations

import contextlib
import operator

import torch
import torch.nn.functional as F

from ._common import check_int

_weight_gradients_disabled = False


@contextlib.contextmanager
def no_weight_gradients(disable: bool = True):
    """Within the block, backward passes through ops.conv2d skip the weight and bias gradients
    (for gradients taken with respect to the inputs only)."""
    global _weight_gradients_disabled
    previous, _weight_gradients_disabled = _weight_gradients_disabled, bool(disable)
    try:
        yield
    finally:
        _weight_gradients_disabled = previous


def reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, stride: int = 1,
              padding: int = 0, transposed: bool = False, output_padding: int = 0) -> torch.Tensor:
    if transposed:
        return F.conv_transpose2d(x, weight, bias, stride, padding, output_padding)
    return F.conv2d(x, weight, bias, stride, padding)


def _input_grad_padding(in_size, out_size, weight_size, stride, padding, transposed) -> tuple[int, int]:
    """output_padding of the opposite convolution that maps the output back to the input's size."""
    if transposed:
        return (0, 0)  # a strided convolution's output size is the transposed one's input size
    return tuple(in_size[i] - ((out_size[i] - 1) * stride - 2 * padding + weight_size[i]) for i in range(2))


class _Conv2d(torch.autograd.Function):
    """One convolution; config = (stride, padding, transposed, output_padding as a pair)."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, transposed, output_padding):
        ctx.save_for_backward(x, weight)
        ctx.cfg = (stride, padding, transposed, output_padding)
        ctx.has_bias = bias is not None
        if transposed:
            return F.conv_transpose2d(x, weight, bias, stride, padding, output_padding)
        return F.conv2d(x, weight, bias, stride, padding)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        stride, padding, transposed, output_padding = ctx.cfg
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = _input_grad(grad_out, weight, x.shape, ctx.cfg)
        if ctx.needs_input_grad[1] and not _weight_gradients_disabled:
            grad_w = _Conv2dWeightGrad.apply(grad_out, x, weight, stride, padding, transposed, output_padding)
        if ctx.has_bias and ctx.needs_input_grad[2] and not _weight_gradients_disabled:
            acc = torch.promote_types(grad_out.dtype, torch.float32)  # bf16 gradients summed in float32
            grad_b = grad_out.sum((0, 2, 3), dtype=acc).to(grad_out.dtype)
        return grad_x, grad_w, grad_b, None, None, None, None


class _Conv2dWeightGrad(torch.autograd.Function):
    """(grad_out, x) -> the weight gradient of one convolution, itself differentiable."""

    @staticmethod
    def forward(ctx, grad_out, x, weight, stride, padding, transposed, output_padding):
        # ``weight`` gives the shape and dtype only; no gradient flows to it
        ctx.save_for_backward(grad_out, x)
        ctx.cfg = (stride, padding, transposed, output_padding)
        _, grad_w, _ = torch.ops.aten.convolution_backward(
            grad_out, x, weight, None, [stride, stride], [padding, padding], [1, 1], transposed,
            list(output_padding), 1, [False, True, False])
        return grad_w

    @staticmethod
    def backward(ctx, grad_grad_w):
        grad_out, x = ctx.saved_tensors
        stride, padding, transposed, output_padding = ctx.cfg
        d_grad_out = d_x = None
        # grad_w = d/dw <grad_out, conv(x, w)> is bilinear in (grad_out, x)
        if ctx.needs_input_grad[0]:
            d_grad_out = _Conv2d.apply(x, grad_grad_w, None, stride, padding, transposed, output_padding)
        if ctx.needs_input_grad[1]:
            d_x = _input_grad(grad_out, grad_grad_w, x.shape, ctx.cfg)
        return d_grad_out, d_x, None, None, None, None, None


def _input_grad(grad_out, weight, x_shape, cfg):
    """The gradient of conv(x, weight) with respect to x: the opposite (transposed or strided)
    convolution of grad_out, with the output padding that gives back x's size."""
    stride, padding, transposed, _ = cfg
    op = _input_grad_padding(x_shape[2:], grad_out.shape[2:], weight.shape[2:], stride, padding, transposed)
    return _Conv2d.apply(grad_out, weight, None, stride, padding, not transposed, op)


def conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, stride: int = 1,
           padding: int = 0, transposed: bool = False, output_padding: int = 0) -> torch.Tensor:
    """``F.conv2d`` (or ``F.conv_transpose2d`` with ``transposed=True``; weight (in, out, kh, kw))
    with square stride and padding, no dilation or groups, whose gradients of every order are
    convolutions and weight gradients (see the module docstring)."""
    if x.dim() != 4 or weight.dim() != 4:
        raise ValueError(f"conv2d: expected 4-D input and weight, got {tuple(x.shape)} and {tuple(weight.shape)}")
    for name, v in (("stride", stride), ("padding", padding), ("output_padding", output_padding)):
        # int() took stride=1.5 as 1 (a silently different convolution) and failed on (2, 2) unclearly
        check_int("conv2d", name, v, "one integer (square, for both sides)")
    cin = weight.shape[0] if transposed else weight.shape[1]
    if x.shape[1] != cin:
        raise ValueError(f"conv2d: input has {x.shape[1]} channels, the weight {tuple(weight.shape)} expects {cin}")
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type) and torch.float64 not in (x.dtype, weight.dtype):
        # cast as autocast casts a convolution (float64 stays as it is), then run with it off, so
        # that the saved tensors and the backward's convolutions all have one dtype
        dtype = torch.get_autocast_dtype(device_type)
        x, weight = x.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
        with torch.autocast(device_type, enabled=False):
            return _conv2d(x, weight, bias, stride, padding, transposed, output_padding)
    return _conv2d(x, weight, bias, stride, padding, transposed, output_padding)


def _conv2d(x, weight, bias, stride, padding, transposed, output_padding):
    op = (operator.index(output_padding),) * 2 if transposed else (0, 0)
    return _Conv2d.apply(x, weight, bias, operator.index(stride), operator.index(padding), bool(transposed), op)
