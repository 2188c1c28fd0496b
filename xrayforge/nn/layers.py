"""Equalized-learning-rate layers with fused epilogues and fused resampling.

Weights are stored N(0, 1) and multiplied at run time by ``gain / sqrt(fan_in)`` (Karras et
al. 2018, section 4.1); biases are not scaled. Each layer ends in one of three epilogues:
``linear`` (bias only), ``lrelu`` (bias + leaky ReLU 0.2: the discriminator) or ``lrelu_pn``
(bias + leaky ReLU + pixel norm: the generator), run by the fused ops of ``xrayforge.ops``.

Resampling convolutions: nearest ×2 upsampling followed by a 3×3 convolution equals one
stride-2 transposed convolution whose 4×4 kernel is the 3×3 kernel padded by one and summed
over its four shifts; a 3×3 convolution followed by 2×2 average pooling equals one stride-2
convolution with the same 4×4 kernel × 0.25. The fused forms read and write a quarter of
the pixels the plain forms do (the official PGGAN fuses at every resolution ≥ 8; ≥ 128 px is StyleGAN's rule).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import ops
from ..ops.conv2d import reference as conv2d_reference
from ..ops.conv2d_eqlr import LAYER_TABLE, downsample_conv_kernel, layer_backend, upsample_conv_kernel

SQRT2 = math.sqrt(2.0)
ACTIVATIONS = ("linear", "lrelu", "lrelu_pn")
LRELU_SLOPE = 0.2


def apply_epilogue(y: torch.Tensor, bias: torch.Tensor | None, activation: str) -> torch.Tensor:
    """Bias, then the activation, over the channel dimension 1 of y."""
    if activation == "lrelu_pn":
        return ops.bias_lrelu_pixel_norm(y, bias, LRELU_SLOPE)
    if activation == "lrelu":
        return ops.bias_lrelu(y, bias, LRELU_SLOPE)
    if bias is None:
        return y
    return y + bias.to(y.dtype).view((1, -1) + (1,) * (y.dim() - 2))


class EqualizedLinear(nn.Module):
    """Dense layer with equalized learning rate and a fused epilogue.

    ``bias_per_feature=False`` leaves the bias out so that a caller can apply a per-channel
    bias after reshaping (the generator's first layer).
    """

    def __init__(self, in_features: int, out_features: int, gain: float = SQRT2, activation: str = "linear",
                 bias: bool = True):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        self.in_features, self.out_features, self.activation, self.gain = in_features, out_features, activation, gain
        self.weight = nn.Parameter(torch.randn(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.scale = gain / math.sqrt(in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight * self.scale
        if self.activation == "linear":
            return F.linear(x, w, self.bias)
        return apply_epilogue(F.linear(x, w), self.bias, self.activation)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, gain={self.gain:.4g}, activation={self.activation}"


class EqualizedConv2d(nn.Module):
    """Convolution with equalized learning rate, optional ×2 resampling and a fused epilogue.

    ``resample``: None, ``"up"`` (nearest ×2 before the conv) or ``"down"`` (2×2 average after
    it, before bias and activation). ``fused`` chooses the single strided (transposed)
    convolution for resampling; both forms compute the same function.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, gain: float = SQRT2,
                 activation: str = "linear", resample: str | None = None, fused: bool = False):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        if resample not in (None, "up", "down"):
            raise ValueError(f"resample must be None, 'up' or 'down', got {resample!r}")
        if resample is not None and kernel_size != 3:
            raise ValueError("resampling convolutions are 3×3")
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel_size
        self.activation, self.resample, self.fused, self.gain = activation, resample, fused, gain
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.scale = gain / math.sqrt(in_channels * kernel_size * kernel_size)

    # ops.conv2d: the same convolution, with higher-order gradients that stay on cuDNN's fast
    # kernels (the discriminator's gradient penalty). "cuda": on CUDA tensors (on the CPU PyTorch's
    # own autograd is as fast or faster at the demo's sizes: 0-12% measured), True: everywhere,
    # False: PyTorch's own autograd (the benchmarks' baseline)
    gradfix: bool | str = "cuda"

    def _conv(self, x, w, bias=None, stride=1, padding=0, transposed=False):
        if self.gradfix is True or (self.gradfix == "cuda" and x.is_cuda):
            return ops.conv2d(x, w, bias, stride, padding, transposed)
        return conv2d_reference(x, w, bias, stride, padding, transposed)

    # ops.conv2d_eqlr (the fused Triton kernel): None asks the measured per-layer table
    # (ops.conv2d_eqlr.layer_backend; no entry: cuDNN and a separate epilogue, below); "cudnn"
    # forces that path; a backend name ("triton", "torch", "auto") forces ops.conv2d_eqlr with it
    eqlr_backend: str | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        backend = self.eqlr_backend
        if backend is None and LAYER_TABLE and x.is_cuda and ops.get_backend() in ("auto", "triton"):
            # the table is consulted only where the fused kernels may run (XRAYFORGE_BACKEND=torch
            # and the benchmarks' baselines mean plain PyTorch), keyed by the dtype the
            # convolution computes in: autocast's for float32 input under autocast
            dtype = x.dtype
            if dtype == torch.float32 and torch.is_autocast_enabled(x.device.type):
                dtype = torch.get_autocast_dtype(x.device.type)
            size = x.shape[-1] * 2 if self.resample == "up" else (x.shape[-1] // 2 if self.resample else x.shape[-1])
            backend = layer_backend(self.in_channels, self.out_channels, self.kernel_size, self.resample,
                                    self.activation, size, dtype)
        if backend is not None and backend != "cudnn":
            return ops.conv2d_eqlr(x, self.weight, self.bias, scale=self.scale, activation=self.activation,
                                   resample=self.resample, backend=backend)
        w = self.weight * self.scale
        pad = self.kernel_size // 2
        if self.resample == "up":
            if self.fused:
                y = self._conv(x, upsample_conv_kernel(w), stride=2, padding=1, transposed=True)
            else:
                y = self._conv(F.interpolate(x, scale_factor=2.0, mode="nearest"), w, padding=pad)
        elif self.resample == "down":
            if self.fused:
                y = self._conv(x, downsample_conv_kernel(w), stride=2, padding=1)
            else:
                y = F.avg_pool2d(self._conv(x, w, padding=pad), 2)
        elif self.activation == "linear":
            return self._conv(x, w, self.bias, padding=pad)  # cuDNN adds the bias itself
        else:
            y = self._conv(x, w, padding=pad)
        return apply_epilogue(y, self.bias, self.activation)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, gain={self.gain:.4g}, "
                f"activation={self.activation}, resample={self.resample}, fused={self.fused}")


def set_conv_gradfix(module: nn.Module, enabled: bool | str) -> nn.Module:
    """Every EqualizedConv2d in ``module`` uses ops.conv2d (``True``; ``"cuda"``, the default: on
    CUDA tensors only) or PyTorch's own convolution autograd (``False``: the benchmarks' baseline)."""
    if enabled not in (True, False, "cuda"):
        raise ValueError(f"set_conv_gradfix: expected True, False or 'cuda', got {enabled!r}")
    for m in module.modules():
        if isinstance(m, EqualizedConv2d):
            m.gradfix = enabled
    return module
