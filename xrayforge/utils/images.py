"""Image grids and conversions between network outputs and stored pixels."""
from __future__ import annotations

import math
import os

import numpy as np
import torch

from .files import write_bytes_atomic


def faded_reals(x: torch.Tensor, alpha: float) -> torch.Tensor:
    """Real images (N, C, H, W) blended as the generator's output is during a fade-in (the official
    PGGAN): lerp(the 2×2 means nearest-upsampled back, the images, α); the images themselves at α = 1."""
    if alpha >= 1.0:
        return x
    import torch.nn.functional as F
    low = F.interpolate(F.avg_pool2d(x, 2), scale_factor=2.0, mode="nearest")
    return torch.lerp(low, x, float(alpha))


def levels(images: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """Network output in [-1, 1] -> the integer levels 0 .. 2^bits - 1 a file stores (clipped, rounded),
    as float32 on the images' device: what ``to_uint`` writes, for a caller that stays on the GPU."""
    top = float((1 << bits) - 1)
    return ((images.detach().float() + 1.0) / 2.0).clamp_(0.0, 1.0).mul_(top).round_()


def as_stored(images: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """Network output in [-1, 1] -> the same images as a file of ``bits`` per pixel holds them, back in
    [-1, 1] (float32, on the images' device): what a classifier sees when it reads the written file."""
    return levels(images, bits).div_(float((1 << bits) - 1)).mul_(2).sub_(1)


def to_uint(images: torch.Tensor, bits: int = 8) -> np.ndarray:
    """Network output (N, C, H, W) in [-1, 1] -> uint8/uint16 (N, H, W) or (N, H, W, C)."""
    x = levels(images.cpu(), bits).numpy().astype(np.uint8 if bits == 8 else np.uint16)
    return x[:, 0] if x.shape[1] == 1 else x.transpose(0, 2, 3, 1)


def grid(images: np.ndarray, columns: int | None = None, pad: int = 2) -> np.ndarray:
    """Tile (N, H, W[, C]) images into one image."""
    n, h, w = images.shape[:3]
    columns = columns or int(math.ceil(math.sqrt(n)))
    rows = int(math.ceil(n / columns))
    out = np.zeros((rows * (h + pad) + pad, columns * (w + pad) + pad) + images.shape[3:], dtype=images.dtype)
    for i in range(n):
        r, c = divmod(i, columns)
        out[pad + r * (h + pad):pad + r * (h + pad) + h, pad + c * (w + pad):pad + c * (w + pad) + w] = images[i]
    return out


def png_bytes(array: np.ndarray) -> bytes:
    """``save_png``'s file, in memory."""
    import io

    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def save_png(array: np.ndarray, path: str | os.PathLike) -> None:
    """8- or 16-bit grayscale, or 8-bit RGB, PNG (written atomically)."""
    write_bytes_atomic(path, png_bytes(array))  # uint16 2-D arrays become 16-bit grayscale (I;16)


def save_grid(images: torch.Tensor, path: str | os.PathLike, columns: int | None = None) -> None:
    save_png(grid(to_uint(images, 8), columns), path)
