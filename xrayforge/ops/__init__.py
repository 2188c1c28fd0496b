"""Fused PGGAN ops. Each has a torch reference, Triton kernels and (some) CUDA kernels;
``conv2d`` is cuDNN's convolution with higher-order gradients that stay on its fast kernels;
``conv2d_eqlr`` the equalized-lr convolution with resampling and epilogue fused (Triton);
``knn`` and ``masked_moments`` serve the metrics (not differentiable).

Pick the backend per call (``backend=``), per process (:func:`set_backend`) or with the
``XRAYFORGE_BACKEND`` environment variable: ``auto`` (default), ``cuda``, ``triton``, ``torch``.
"""
from ._backend import (BACKENDS, BackendUnavailableError, available_backends, get_backend,
                       set_backend)
from .bias_lrelu import bias_lrelu
from .knn import knn
from .conv2d import conv2d
from .conv2d_eqlr import conv2d_eqlr
from .minibatch_stddev import minibatch_stddev
from .moments import masked_moments
from .pixel_norm import bias_lrelu_pixel_norm, pixel_norm

__all__ = ["BACKENDS", "BackendUnavailableError", "available_backends", "get_backend", "set_backend",
           "pixel_norm", "bias_lrelu_pixel_norm", "bias_lrelu", "minibatch_stddev", "conv2d", "conv2d_eqlr",
           "knn", "masked_moments"]
