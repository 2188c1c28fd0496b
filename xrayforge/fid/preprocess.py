"""FID preprocessing, fused: stored pixels -> bilinear 299×299 -> [-1, 1] -> network input.

pytorch-fid's pipeline is ToTensor (pixels / 255), ``F.interpolate(size=(299, 299),
mode="bilinear", align_corners=False)`` (no antialiasing), then ``2x - 1``, with grayscale
replicated to three channels. The kernel does all of it in one pass from uint8 / uint16 /
float images of any size, in (N, H, W) or (N, H, W, 3) layout. Gray images can stay one
channel: the Inception then folds the replication into its first convolution.

16-bit images (uint16 archives, 16-bit PNGs) are scaled by 65535, keeping their precision. That
is not what pytorch-fid gives for them: its loader's ``convert("RGB")`` clips every value above
255 to white. Their FID equals pytorch-fid's on 8-bit exports (value / 257, rounded) only up to
that rounding (at most half an 8-bit step per pixel).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..ops import _backend

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

SIZE = 299


def max_value(x: torch.Tensor) -> float:
    """The value that stands for white: 255 (uint8), 65535 (uint16, or int32 holding it), 1 (float)."""
    if x.dtype == torch.uint8:
        return 255.0
    if x.dtype in (torch.uint16, torch.int32):
        return 65535.0
    if not (x.is_floating_point() or x.dtype == torch.bool):
        # int64 (torch.tensor of Python ints, numpy's default integer), int16, int8: which value is white is
        # unknown, and taken as floats in [0, 1] their levels 0..255 gave inputs up to 509 without a word
        raise ValueError(f"images of dtype {x.dtype}: expected uint8 (white 255), uint16 or int32 (white 65535), "
                         f"or floating point in [0, 1]; convert them to one of these")
    return 1.0


def _as_nchw(images: torch.Tensor) -> torch.Tensor:
    """(N, H, W) -> (N, 1, H, W); (N, H, W, 3) -> (N, 3, H, W) (a view); (N, C, H, W) as is."""
    if images.dim() == 3:
        return images.unsqueeze(1)
    if images.dim() == 4 and images.shape[-1] == 3 and images.shape[1] != 3:
        return images.permute(0, 3, 1, 2)
    if images.dim() == 4 and images.shape[1] in (1, 3):
        return images
    # (N, H, W, 4) (RGBA) was read as (N, C, H, W) with C = H: "1 or 3 channels, got <the height>"
    raise ValueError(f"expected (N, H, W), (N, H, W, 3) or (N, C, H, W) images with C = 1 or 3, got shape "
                     f"{tuple(images.shape)}")


def reference(images: torch.Tensor, channels: int = 3, size: int = SIZE) -> torch.Tensor:
    """pytorch-fid's preprocessing in plain PyTorch (float32 out)."""
    x = _as_nchw(images).float() / max_value(images)
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = 2 * x - 1
    if x.shape[1] == 1 and channels == 3:
        x = x.expand(-1, 3, -1, -1)
    return x.contiguous()


if triton is not None:

    @triton.jit
    def _resize_kernel(src, dst, H, W, scale_h, scale_w, inv_max, sn, sc, sh, sw, dn, dc, C_in, C_rep,
                       OUT: tl.constexpr, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        nc = tl.program_id(1)
        n = (nc // C_in).to(tl.int64)
        c = nc % C_in
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        mask = offs < OUT * OUT
        oy = offs // OUT
        ox = offs % OUT
        # PyTorch's align_corners=False source index, clamped at 0
        sy = tl.maximum((oy.to(tl.float32) + 0.5) * scale_h - 0.5, 0.0)
        sx = tl.maximum((ox.to(tl.float32) + 0.5) * scale_w - 0.5, 0.0)
        y0 = sy.to(tl.int32)
        x0 = sx.to(tl.int32)
        ly = sy - y0.to(tl.float32)
        lx = sx - x0.to(tl.float32)
        y1 = tl.minimum(y0 + 1, H - 1)
        x1 = tl.minimum(x0 + 1, W - 1)
        base = src + n * sn + c * sc
        a = tl.load(base + y0 * sh + x0 * sw, mask=mask, other=0).to(tl.float32)
        b = tl.load(base + y0 * sh + x1 * sw, mask=mask, other=0).to(tl.float32)
        d0 = tl.load(base + y1 * sh + x0 * sw, mask=mask, other=0).to(tl.float32)
        d1 = tl.load(base + y1 * sh + x1 * sw, mask=mask, other=0).to(tl.float32)
        val = (1.0 - ly) * ((1.0 - lx) * a + lx * b) + ly * ((1.0 - lx) * d0 + lx * d1)
        val = val * (2.0 * inv_max) - 1.0
        out = val.to(dst.dtype.element_ty)
        for r in range(C_rep):  # gray replicated to three channels when asked
            tl.store(dst + n * dn + (c + r) * dc + offs, out, mask=mask)


def preprocess(images: torch.Tensor, channels: int = 1, dtype: torch.dtype = torch.float32,
               backend: str | None = None, size: int = SIZE) -> torch.Tensor:
    """Images -> (N, channels, 299, 299) network input in [-1, 1].

    ``channels=1`` keeps gray images single-channel (for the folded first convolution);
    ``channels=3`` replicates them as pytorch-fid does. RGB input gives 3 channels.
    """
    x = _as_nchw(images)
    n, c_in, h, w = x.shape
    c_out = 3 if (c_in == 3 or channels == 3) else 1
    impl = _backend.resolve_for_device("fid_preprocess", x.device, backend)
    if impl == "cuda":
        raise _backend.BackendUnavailableError("fid preprocess: there is no CUDA-extension kernel; use 'triton'")
    if impl == "torch" or n == 0:
        return reference(x, c_out, size).to(dtype)
    out = torch.empty((n, c_out, size, size), device=x.device, dtype=dtype)
    scale_h, scale_w = np.float32(h) / np.float32(size), np.float32(w) / np.float32(size)
    rep = 3 if (c_in == 1 and c_out == 3) else 1
    block = 1024
    grid = (triton.cdiv(size * size, block), n * c_in)
    _resize_kernel[grid](x, out, h, w, float(scale_h), float(scale_w), 1.0 / max_value(x), *x.stride(),
                         out.stride(0), out.stride(1), c_in, rep, OUT=size, BLOCK=block)
    return out
