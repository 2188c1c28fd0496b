"""Equalized-learning-rate convolution with fused resampling and a fused epilogue.

``conv2d_eqlr(x, weight, bias, scale=..., activation=..., resample=...)`` computes
``epilogue(conv(resample(x), weight * scale) + bias)`` with the semantics of
``xrayforge.nn.layers.EqualizedConv2d``: ``resample="up"`` is nearest ×2 before a 3×3
convolution, ``"down"`` a 2×2 average after it (before bias and activation); ``activation`` is
``linear``, ``lrelu`` (slope 0.2) or ``lrelu_pn`` (then pixel norm over all output channels,
eps 1e-8). Kernels of any odd size without resampling (1×1 for toRGB / fromRGB), 3×3 with it.

- ``reference``: the unfused plain-PyTorch composition (interpolate, F.conv2d, avg_pool2d,
  leaky_relu, pixel norm): the specification and the CPU path.
- Triton: an implicit GEMM over output pixels × output channels with fp32 accumulation (bf16 /
  fp16 products on tensor cores; fp32 products in IEEE fp32, not TF32: cuDNN keeps small fp32
  convolutions exact even where TF32 is allowed, and an H200 run showed TF32 products 1000×
  less accurate than eager there; float64 in float64), the equalized-lr scale folded
  into the weight taps, and the resampling folded into the taps as well, so neither an
  upsampled nor a pre-pooling tensor exists:
    * down: conv + 2×2 average = one stride-2 convolution with the 4×4 kernel summed from the
      3×3 one (× 0.25): 16 taps per output pixel instead of 4 × 9;
    * up: nearest ×2 + conv = per output parity class (even / odd row and column) a 2×2-tap
      convolution of the half-resolution input with row and column sums of the 3×3 kernel:
      4 taps per output pixel instead of 9; each program computes one parity class.
  The epilogue (bias, leaky ReLU, pixel norm) runs on the accumulator: for pixel norm one tile
  holds all output channels of its pixels (at most 512).
- Backward (an autograd Function): the epilogue's backward from the saved output (and, for
  pixel norm, the saved per-pixel inverse norm), then cuDNN's data and weight gradients of the
  equivalent strided convolution, and the weight gradient mapped back through the tap
  transform. With ``create_graph`` (the gradient penalty) the backward differentiates the
  same function built from ``ops.conv2d`` (cuDNN with gradients of every order) instead, so
  double backward works; ``ops.conv2d.no_weight_gradients`` is honoured.

Which layers use the Triton path is decided per layer shape from measured data
(``LAYER_TABLE``; shapes not in it keep cuDNN). The tiles are
fixed per layer kind (``_blocks``) unless ``AUTOTUNE`` is on: then the first launch of a layer
shape on a GPU times the configurations ``candidates`` declares for Hopper and keeps the
fastest (off by default until a GPU window has measured what it gains).
"""
from __future__ import annotations

import importlib
import math
import numbers

import torch
import torch.nn.functional as F

from . import _backend
from ._common import accumulation_dtype, channel_view, device_guard, like_layout
from ..errors import UserError

_conv2d = importlib.import_module(".conv2d", __package__)  # the module (the package exports its function)

try:
    import triton
    import triton.language as tl

    from .pixel_norm import _epilogue_refusals, _inv_sqrt, _triton_blocks
except ImportError:  # pragma: no cover - triton is a declared dependency
    triton = None

ACTIVATIONS = ("linear", "lrelu", "lrelu_pn")
RESAMPLES = (None, "up", "down")
SLOPE = 0.2
EPS = 1e-8
MAX_PN_CHANNELS = 512  # pixel norm needs every output channel of a pixel in one tile

# (in channels, out channels, kernel, resample, activation, output size, dtype) -> "triton" for
# the layer shapes where the fused kernel measured faster than cuDNN + a separate epilogue over
# what a training step asks of the layer: forward + backward, and for the discriminator's layers
# also the gradient penalty's double backward (bench.ops.conv_rows / layer_table, the GPU
# window's conv stage). EqualizedConv2d consults it under backend auto, so it holds only kernels
# whose gpu tests have passed (ops._backend.GPU_VALIDATED's rule). Empty: in the one GPU window
# that ran the kernel (H200, e9cf508; benchmarks/results/gpu_check-conv-nvidia-h200-2026-11-26.json)
# 21 of its gpu tests failed, and the kernel has changed since (37da2a8: IEEE products and sqrt);
# that window measured it faster at 15 of the 1024-px networks' 36 bf16 layer shapes (the entries
# 37da2a8 put here), which may return once its gpu tests pass.
LAYER_TABLE: dict[tuple, str] = {}


def layer_backend(cin: int, cout: int, kernel: int, resample: str | None, activation: str, size: int,
                  dtype: torch.dtype) -> str | None:
    """The backend the measured table gives a layer of this shape, or None (keep cuDNN)."""
    return LAYER_TABLE.get((cin, cout, kernel, resample, activation, size, str(dtype).replace("torch.", "")))


# --------------------------------------------------------------------------- kernel transforms
def summed_4x4(w: torch.Tensor) -> torch.Tensor:
    """The 3×3 kernel padded to 5×5 and summed over its four 4×4 windows: [w0, w0+w1, w1+w2, w2]."""
    w = F.pad(w, (1, 1, 1, 1))
    return w[..., 1:, 1:] + w[..., :-1, 1:] + w[..., 1:, :-1] + w[..., :-1, :-1]


def upsample_conv_kernel(w: torch.Tensor) -> torch.Tensor:
    """Kernel of ``conv_transpose2d(x, K, stride=2, padding=1)`` == ``conv2d(up2(x), w, padding=1)``.

    ``w`` is (out, in, 3, 3); K is (in, out, 4, 4). Transposed convolution scatters with the
    kernel flipped relative to conv2d's gather, hence the flip.
    """
    return summed_4x4(w).flip(2, 3).transpose(0, 1)


def downsample_conv_kernel(w: torch.Tensor) -> torch.Tensor:
    """Kernel of ``conv2d(x, K, stride=2, padding=1)`` == ``avg_pool2d(conv2d(x, w, padding=1), 2)``."""
    return summed_4x4(w) * 0.25


# rows (or columns) of the 3×3 kernel that fall on each of the two input taps of an output of
# parity p after nearest ×2 upsampling: even outputs read x[i-1] (w0) and x[i] (w1 + w2), odd
# ones x[i] (w0 + w1) and x[i+1] (w2)
_UP_SUMS = {(0, 0): (0,), (0, 1): (1, 2), (1, 0): (0, 1), (1, 1): (2,)}


def _up_taps_1d(w: torch.Tensor, dim: int) -> torch.Tensor:
    """Along ``dim`` (size 3): a new leading (parity 2, tap 2) pair of axes of summed rows."""
    parts = [[sum(w.select(dim, i) for i in _UP_SUMS[(p, a)]) for a in (0, 1)] for p in (0, 1)]
    return torch.stack([torch.stack(pa) for pa in parts])


def taps(w: torch.Tensor, resample: str | None) -> torch.Tensor:
    """The weight as the kernel reads it: (classes, taps, in, out). ``w`` (out, in, k, k) is
    already scaled. One class except for "up" (four output parity classes of 2×2 taps)."""
    cout, cin = w.shape[:2]
    if resample is None:
        return w.permute(2, 3, 1, 0).reshape(1, -1, cin, cout)
    if resample == "down":
        return downsample_conv_kernel(w).permute(2, 3, 1, 0).reshape(1, 16, cin, cout)
    rows = _up_taps_1d(w, 2)  # (py, a, out, in, 3 columns)
    both = _up_taps_1d(rows, 4)  # (px, b, py, a, out, in)
    return both.permute(2, 0, 3, 1, 5, 4).reshape(4, 4, cin, cout)  # class py*2+px, tap a*2+b


# --------------------------------------------------------------------------- checks, reference
def _check(x, weight, bias, scale, activation, resample) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise UserError(f"conv2d_eqlr: expected (N, C, H, W) input, got shape "
                        f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 4 or weight.shape[2] != weight.shape[3] \
            or weight.shape[2] % 2 == 0:
        raise UserError(f"conv2d_eqlr: expected an (out, in, k, k) weight with odd k, got shape "
                        f"{tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__}")
    if not x.is_floating_point() or not weight.is_floating_point():
        raise UserError(f"conv2d_eqlr: expected floating-point input and weight, got {x.dtype} and {weight.dtype}")
    if weight.shape[1] != x.shape[1]:
        raise UserError(f"conv2d_eqlr: the weight takes {weight.shape[1]} input channels, the input has {x.shape[1]}")
    # no channels in or out, or no pixels: the reference failed inside F.conv2d or the bias add, and the
    # Triton path in a reshape or, for an empty image, returned an empty result the reference refuses
    if weight.shape[0] == 0 or weight.shape[1] == 0:
        raise UserError(f"conv2d_eqlr: the weight has no {'output' if weight.shape[0] == 0 else 'input'} channels "
                        f"(shape {tuple(weight.shape)})")
    if x.shape[2] == 0 or x.shape[3] == 0:
        raise UserError(f"conv2d_eqlr: the input's images are {x.shape[2]}×{x.shape[3]}: no pixels")
    if bias is not None and (not isinstance(bias, torch.Tensor) or bias.dim() != 1 or bias.shape[0] != weight.shape[0]):
        raise UserError(f"conv2d_eqlr: expected a bias of shape ({weight.shape[0]},), got "
                        f"{tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__}")
    if bias is not None and not bias.is_floating_point():  # a complex bias was a KeyError inside Triton
        raise UserError(f"conv2d_eqlr: expected a floating-point bias, got {bias.dtype}")
    for name, t in (("weight", weight), ("bias", bias)):  # the Triton kernel reads their raw pointers
        if t is not None and t.device != x.device:
            raise UserError(f"conv2d_eqlr: the input is on {x.device} but the {name} is on {t.device}")
    if activation not in ACTIVATIONS:
        raise UserError(f"conv2d_eqlr: activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
    if resample not in RESAMPLES:
        raise UserError(f"conv2d_eqlr: resample must be None, 'up' or 'down', got {resample!r}")
    if resample is not None and weight.shape[2] != 3:
        raise UserError(f"conv2d_eqlr: resampling convolutions are 3×3, got a {weight.shape[2]}×{weight.shape[3]} "
                        "kernel")
    if resample == "down" and min(x.shape[2:]) < 2:
        raise UserError(f"conv2d_eqlr: cannot downsample a {x.shape[2]}×{x.shape[3]} input")
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):  # NumPy scalars are numbers.Real
        raise UserError(f"conv2d_eqlr: scale must be a Python or NumPy number (a constant of the layer), got "
                        f"{type(scale).__name__}")
    if not math.isfinite(float(scale)):
        raise UserError(f"conv2d_eqlr: scale must be a finite number, got {scale!r}")


def reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *, scale: float,
              activation: str = "linear", resample: str | None = None) -> torch.Tensor:
    """The unfused composition in plain PyTorch, in x's dtype."""
    _check(x, weight, bias, scale, activation, resample)
    w = (weight * scale).to(x.dtype)
    if resample == "up":
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
    y = F.conv2d(x, w, padding=weight.shape[2] // 2)
    if resample == "down":
        y = F.avg_pool2d(y, 2)
    return _epilogue(y, bias, activation)


def _epilogue(y, bias, activation):
    """Bias, leaky ReLU, pixel norm: the unfused epilogue, in y's dtype."""
    if bias is not None:
        y = y + bias.to(y.dtype).view(1, -1, 1, 1)
    if activation != "linear":
        y = F.leaky_relu(y, SLOPE)
    if activation == "lrelu_pn":
        y = y * torch.rsqrt(y.square().mean(dim=1, keepdim=True) + EPS)
    return y


def _strided_form(x, weight, scale, resample):
    """The same convolution as one (transposed) strided ops.conv2d call: the form whose
    gradients cuDNN computes, differentiable to any order."""
    w = weight * scale
    if resample == "up":
        return _conv2d.conv2d(x, upsample_conv_kernel(w).to(x.dtype), None, 2, 1, True)
    if resample == "down":
        return _conv2d.conv2d(x, downsample_conv_kernel(w).to(x.dtype), None, 2, 1)
    return _conv2d.conv2d(x, w.to(x.dtype), None, 1, weight.shape[2] // 2)


def _differentiable(x, weight, bias, scale, activation, resample):
    return _epilogue(_strided_form(x, weight, scale, resample), bias, activation)


# --------------------------------------------------------------------------- Triton
if triton is not None:
    @triton.jit
    def _conv_kernel(x_ptr, w_ptr, b_ptr, y_ptr, r_ptr, H, W, CIN, COUT, OH, OW, PIX,
                     sxn, sxc, sxh, sxw, syn, syc, syh, syw,
                     MODE: tl.constexpr, KT: tl.constexpr, KW: tl.constexpr, PAD: tl.constexpr,
                     HAS_BIAS: tl.constexpr, ACT: tl.constexpr, F64: tl.constexpr,
                     UPCAST: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        # MODE 0: plain KW×KW conv; 1: down (4×4 taps, stride 2); 2: up (2×2 taps per parity class)
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        cls = tl.program_id(2)
        pix = pid_m * BM + tl.arange(0, BM)
        pmask = pix < PIX
        if MODE == 2:  # pixels of the half-resolution grid; this program's parity class
            n = pix // (H * W)
            rem = pix % (H * W)
            i = rem // W
            j = rem % W
            py = cls // 2
            px = cls % 2
            oy = 2 * i + py
            ox = 2 * j + px
            by = i - 1 + py
            bx = j - 1 + px
        else:
            n = pix // (OH * OW)
            rem = pix % (OH * OW)
            oy = rem // OW
            ox = rem % OW
            if MODE == 1:
                by = 2 * oy - 1
                bx = 2 * ox - 1
            else:
                by = oy - PAD
                bx = ox - PAD
        co = pid_n * BN + tl.arange(0, BN)
        cmask = co < COUT
        acc_t = tl.float64 if F64 else tl.float32
        acc = tl.zeros((BM, BN), acc_t)
        w_cls = w_ptr + cls.to(tl.int64) * KT * CIN * COUT
        for t in range(KT):  # taps: a loop, not unrolled (16 unrolled taps of 128-pixel gathers spill)
            iy = by + t // KW
            ix = bx + t % KW
            valid = pmask & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
            row = x_ptr + n.to(tl.int64) * sxn + iy.to(tl.int64) * sxh + ix.to(tl.int64) * sxw
            for c0 in range(0, CIN, BK):
                ci = c0 + tl.arange(0, BK)
                kmask = ci < CIN
                a = tl.load(row[:, None] + ci[None, :].to(tl.int64) * sxc, mask=valid[:, None] & kmask[None, :],
                            other=0.0)
                b = tl.load(w_cls + (t * CIN + ci[:, None]).to(tl.int64) * COUT + co[None, :],
                            mask=kmask[:, None] & cmask[None, :], other=0.0)
                if UPCAST:  # the interpreter's bf16 dot is wrong: products of the same values in fp32
                    a = a.to(tl.float32)
                    b = b.to(tl.float32)
                if F64:
                    acc += tl.dot(a, b, input_precision="ieee")
                else:  # fp32 operands: IEEE products, not TF32 (see the module docstring)
                    acc = tl.dot(a, b, acc, input_precision="ieee")
        if HAS_BIAS:
            acc += tl.load(b_ptr + co, mask=cmask, other=0.0).to(acc_t)[None, :]
        if ACT >= 1:  # a float literal takes the tensor's dtype: 0.2 is float64's 0.2 in float64
            acc = tl.where(acc > 0, acc, acc * 0.2)
        opix = n.to(tl.int64) * OH * OW + oy.to(tl.int64) * OW + ox
        if ACT == 2:  # the tile holds every channel: channels past COUT are zero
            r = _inv_sqrt(tl.sum(acc * acc, axis=1) / COUT + 1e-8, F64)  # IEEE-rounded, as pixel_norm's
            acc = acc * r[:, None]
            tl.store(r_ptr + opix, r.to(r_ptr.dtype.element_ty), mask=pmask)
        out = y_ptr + n.to(tl.int64) * syn + oy.to(tl.int64) * syh + ox.to(tl.int64) * syw
        tl.store(out[:, None] + co[None, :].to(tl.int64) * syc, acc.to(y_ptr.dtype.element_ty),
                 mask=pmask[:, None] & cmask[None, :])


if triton is not None:
    @triton.jit
    def _conv_epilogue_bwd_kernel(y_ptr, dy_ptr, r_ptr, dz_ptr, db_ptr, C, P, stride_b, stride_c, stride_p,
                                  SLOPE: tl.constexpr, ACT: tl.constexpr, BIAS_GRAD: tl.constexpr,
                                  ACC_F64: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
        """dz (the gradient at conv + bias) from the layer's output y, its gradient dy and, for
        pixel norm, the saved inverse norm r (N, 1, OH, OW): with y = h r, r = (mean_c h^2 + eps)^-1/2,
        dh = r (dy - y mean_c(dy y)); then the leaky ReLU's slope where y <= 0 (y and its input
        share their sign). Per-block bias-gradient partial sums in the accumulation dtype."""
        acc_t = tl.float64 if ACC_F64 else tl.float32
        pid_p = tl.program_id(0)
        pid_b = tl.program_id(1)
        offs_c = tl.arange(0, BLOCK_C)
        offs_p = pid_p.to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
        pmask = offs_p < P
        mask = pmask[:, None] & (offs_c[None, :] < C)
        # int64 channel offsets: an int32 c * stride_c wraps past 2^31 (pixel_norm._channel_i64)
        offs = pid_b.to(tl.int64) * stride_b + offs_p[:, None] * stride_p + offs_c[None, :].to(tl.int64) * stride_c
        y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(acc_t)
        g = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(acc_t)
        if ACT == 2:
            r = tl.load(r_ptr + pid_b.to(tl.int64) * P + offs_p, mask=pmask, other=0.0).to(acc_t)
            proj = tl.sum(g * y, axis=1) / C
            g = r[:, None] * (g - y * proj[:, None])
        g = tl.where(y > 0, g, g * SLOPE)
        if BIAS_GRAD:  # int64: the partial sums may hold as many elements as the output
            row = pid_b.to(tl.int64) * tl.num_programs(0) + pid_p
            tl.store(db_ptr + row * C + offs_c, tl.sum(g, axis=0).to(db_ptr.dtype.element_ty), mask=offs_c < C)
        tl.store(dz_ptr + offs, g.to(dz_ptr.dtype.element_ty), mask=mask)


def _k_step(cin: int) -> int:
    """BK for tensor-core tiles: the input channels rounded up to 16 or 32, else 64."""
    return 16 if cin <= 16 else (32 if cin <= 32 else 64)


def _blocks(cin: int, cout: int, pn: bool, interp: bool, fma: bool = False) -> tuple[int, int, int, int, int]:
    """(BM pixels, BN channels, BK input channels, warps, pipeline stages). Pixel norm puts all
    output channels in one tile: the accumulator stays at 16k fp32 values (64 per thread) and
    the weight tile of a 512-channel layer (BK × 512) fits two stages of Hopper's shared memory.
    ``fma``: IEEE fp32 / float64 products (no tensor cores) hold their operands in registers:
    half the accumulator and BK = 16, which compiles for sm_90 without spilling."""
    if interp:
        bn = max(16, triton.next_power_of_2(cout)) if pn else 16
        return 16, bn, 16, 4, 1
    if fma:
        bn = max(16, triton.next_power_of_2(cout)) if pn else (16 if cout <= 16 else 64)
        return max(16, min(64, 8192 // bn)), bn, 16, 8, 2
    bk = _k_step(cin)
    if pn:
        bn = max(16, triton.next_power_of_2(cout))
        if bn >= 256:
            return max(16, 16384 // bn), bn, min(bk, 32), 8, 2
        return min(128, 16384 // bn), bn, bk, 8, 3
    bn = 16 if cout <= 16 else (64 if cout <= 64 else 128)
    return 64, bn, bk, 8 if bn == 128 else 4, 3


# The autotuner: off until a GPU window has measured it (ops.conv2d_eqlr.AUTOTUNE = True, or the
# GPU window's conv stage, which times it beside the fixed tiles of _blocks). When on, the first
# launch of each layer shape on a GPU times every configuration of ``candidates`` and keeps the
# fastest for that shape (``tuned_blocks``); a configuration that fails to compile or launch is
# skipped. The interpreter has one configuration, so it runs that one untimed.
AUTOTUNE = False
MAX_CANDIDATES = 6
SMEM_BUDGET = 160 * 1024  # bytes of staged A + B tiles a candidate may use (sm_90 has 227 KiB per block)
_TUNED: dict[tuple, tuple[int, int, int, int, int]] = {}


def candidates(cin: int, cout: int, pn: bool, interp: bool = False, fma: bool = False,
               elsize: int = 2) -> list[tuple[int, int, int, int, int]]:
    """The (BM, BN, BK, warps, stages) tile configurations declared for Hopper (sm_90) that the
    autotuner times for a layer: ``_blocks``' fixed choice first, then up to
    ``MAX_CANDIDATES - 1`` others — other pixel-tile heights (and 64-channel tiles where the
    default has 128), a smaller K step, one more and one fewer pipeline stage. Pixel norm keeps
    every output channel in one tile (BN = COUT rounded up to a power of two). Every candidate
    keeps the fp32 accumulator at ≤ 64 values per thread and its pipelined A and B tiles within
    ``SMEM_BUDGET``, and every candidate of the 1024-px networks' layers compiles for sm_90
    without register spills. Tensor-core dtypes only (bf16 / fp16): the fp32 / float64 FMA path
    and the interpreter have their one configuration."""
    default = _blocks(cin, cout, pn, interp, fma)
    if interp or fma:
        return [default]
    bk_max = _k_step(cin)
    if pn:
        bn = max(16, triton.next_power_of_2(cout))
        tiles = list(dict.fromkeys((max(16, min(256, v)), bn) for v in (16384 // bn, 8192 // bn, 32768 // bn)))
        stages0 = 2 if bn >= 256 else 3
    else:
        bn = 16 if cout <= 16 else (32 if cout <= 32 else (64 if cout <= 64 else 128))
        tiles = [(64, bn), (128, bn), (256, bn) if bn <= 32 else (32, bn)] + ([(128, 64)] if bn == 128 else [])
        stages0 = 3
    tried = [(bm, bn, bk_max, stages0) for bm, bn in tiles]
    tried += [(bm, bn, 16 if bk_max <= 32 else 32, stages0) for bm, bn in tiles[:2]]
    tried += [(tiles[0][0], tiles[0][1], bk_max, st) for st in (stages0 + 1, stages0 - 1) if st >= 2]
    out = [default]
    for bm, bn, bk, stages in tried:
        warps = 4 if bm * bn <= 4096 else 8
        cfg = (bm, bn, bk, warps, stages)
        if (len(out) < MAX_CANDIDATES and cfg not in out and bm * bn <= 2048 * warps
                and stages * (bm * bk + bk * bn) * elsize <= SMEM_BUDGET
                # these spilled registers on sm_90 (benchmarks/triton_aot_check.py): a 128 × 128 tile
                # over unaligned input channels (D's 513), and 16-pixel pixel-norm tiles with BK = 64
                and not (cin % 16 and bm * bn > 1024 * warps) and not (pn and bm == 16 and bk == 64)):
            out.append(cfg)
    return out


def tuned_blocks() -> dict[tuple, tuple[int, int, int, int, int]]:
    """The autotuner's choices so far: (N, CIN, H, W, COUT, kernel, resample, activation, dtype,
    channels_last, device) -> (BM, BN, BK, warps, stages)."""
    return dict(_TUNED)


def _config_errors() -> tuple[type, ...]:
    """Triton's exceptions for a configuration that does not compile or fit the device."""
    names = (("triton.runtime.errors", "TritonError"), ("triton.runtime.errors", "OutOfResources"),
             ("triton.runtime.errors", "PTXASError"), ("triton.compiler.errors", "CompilationError"))
    found = []
    for module, name in names:
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            continue
    return tuple(found)


def _autotune(key, configs, launch, timer=None):
    """The fastest of ``configs`` for ``launch(cfg)`` by ``timer(fn) -> ms`` (triton's
    do_bench, median, by default), cached under ``key``. A configuration that Triton cannot
    compile or launch (its compiler and resource errors) is skipped, and if none can, the first
    such error is raised; any other error (out of memory, a CUDA fault) propagates at once.
    The choice follows measured times, so two runs may pick different tiles, whose different
    summation order (BK) changes low-order bits of the output."""
    if key in _TUNED:
        return _TUNED[key]
    if len(configs) == 1:
        _TUNED[key] = configs[0]
        return configs[0]
    if timer is None:
        from triton.testing import do_bench

        def timer(fn):
            return do_bench(fn, warmup=5, rep=25, return_mode="median")
    best, best_ms, first_error = None, float("inf"), None
    for cfg in configs:
        try:
            ms = timer(lambda cfg=cfg: launch(cfg))
        except _config_errors() as exc:  # this configuration cannot run here: the others may
            first_error = first_error or exc
            continue
        if ms < best_ms:
            best, best_ms = cfg, ms
    if best is None:
        raise first_error
    _TUNED[key] = best
    return best


def _forward(x, weight, bias, scale, activation, resample, blocks=None):
    """(y, per-pixel inverse pixel norm (N, 1, OH, OW; fp32, float64 for float64 input) or None)
    by the Triton kernel."""
    n, cin, h, w = x.shape
    cout, k = weight.shape[0], weight.shape[2]
    pn = activation == "lrelu_pn"
    if pn and cout > MAX_PN_CHANNELS:
        raise UserError(f"conv2d_eqlr: the Triton kernel's pixel norm takes at most {MAX_PN_CHANNELS} output "
                        f"channels, got {cout}")
    wt = taps(weight.detach().to(torch.float64 if x.dtype == torch.float64 else torch.float32) * scale,
              resample).to(x.dtype).contiguous()
    if resample == "up":
        oh, ow, mode, kw, classes, pix = 2 * h, 2 * w, 2, 2, 4, n * h * w
    elif resample == "down":
        oh, ow, mode, kw, classes, pix = h // 2, w // 2, 1, 4, 1, n * (h // 2) * (w // 2)
    else:
        oh, ow, mode, kw, classes, pix = h, w, 0, k, 1, n * h * w
    fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous() \
        else torch.contiguous_format
    y = torch.empty(n, cout, oh, ow, dtype=x.dtype, device=x.device, memory_format=fmt)
    r = torch.empty(n, 1, oh, ow, dtype=torch.promote_types(x.dtype, torch.float32), device=x.device) if pn else y
    interp = _backend.triton_interpreter_active()
    fma = x.dtype in (torch.float32, torch.float64)
    b = bias.detach().contiguous() if bias is not None else wt
    def launch(cfg):
        bm, bn, bk, warps, stages = cfg
        grid = (triton.cdiv(pix, bm), triton.cdiv(cout, bn), classes)
        with device_guard(x):  # a fresh guard per use: torch.cuda.device keeps one saved index
            _conv_kernel[grid](x, wt, b, y, r, h, w, cin, cout, oh, ow, pix, *x.stride(), *y.stride(),
                               MODE=mode, KT=wt.shape[1], KW=kw, PAD=k // 2, HAS_BIAS=bias is not None,
                               ACT=ACTIVATIONS.index(activation),
                               F64=x.dtype == torch.float64, UPCAST=interp and x.dtype == torch.bfloat16,
                               BM=bm, BN=bn, BK=bk, num_warps=warps, num_stages=stages)
    if blocks is None:
        if AUTOTUNE:  # every timed launch writes the same y and r; the chosen one runs again below
            key = (n, cin, h, w, cout, k, resample, activation, str(x.dtype).replace("torch.", ""),
                   fmt == torch.channels_last, str(x.device))
            with device_guard(x):  # do_bench's events and synchronisation on x's device
                blocks = _autotune(key, candidates(cin, cout, pn, interp, fma, x.element_size()), launch)
        else:
            blocks = _blocks(cin, cout, pn, interp, fma)
    launch(blocks)
    return y, (r if pn else None)


# The epilogue's backward in the first-order backward: "torch" (a few elementwise passes, what the
# H200 measured in LAYER_TABLE) or "triton" (_conv_epilogue_bwd_kernel: one pass that reads y, dy and r
# and writes dz in the layer's dtype with the bias gradient's partial sums; tested in the
# interpreter, not yet on a GPU: the GPU window's conv stage times both before it becomes the default)
EPILOGUE_BACKWARD = "torch"


def _epilogue_backward(gy, y, r, activation):
    """Gradient at the convolution's output (bias included) from the layer's output gradient."""
    acc = torch.promote_types(gy.dtype, torch.float32)
    g, yy = gy.to(acc), y.to(acc)
    if activation == "lrelu_pn":  # y = a * r, r = (mean_c a^2 + eps)^-1/2
        g = r.to(acc) * (g - yy * (g * yy).mean(dim=1, keepdim=True))
    if activation != "linear":  # a > 0 exactly where y > 0
        g = torch.where(yy > 0, g, g * SLOPE)
    return g


def _epilogue_backward_fused(gy, y, r, activation, bias_grad):
    """(dz in y's dtype, the bias gradient in the accumulation dtype or None) by one Triton pass;
    for ``lrelu`` and ``lrelu_pn`` (``linear`` has no epilogue to differentiate)."""
    gy = like_layout(gy, y)
    b, c, p, sb, sc, sp = channel_view(y)
    block_c, block_p, warps = _triton_blocks(c, p)
    grid = (triton.cdiv(p, block_p), b)
    dz = torch.empty_like(y)
    partial = torch.empty((grid[0] * grid[1] if bias_grad else 0, c), dtype=accumulation_dtype(y), device=y.device)
    if y.numel():
        with device_guard(y):
            _conv_epilogue_bwd_kernel[grid](y, gy, r if r is not None else y, dz, partial, c, p, sb, sc, sp,
                                            SLOPE=SLOPE, ACT=ACTIVATIONS.index(activation), BIAS_GRAD=bias_grad,
                                            ACC_F64=y.dtype == torch.float64, BLOCK_C=block_c, BLOCK_P=block_p,
                                            num_warps=warps)
    return dz, (partial.sum(0) if bias_grad else None)


class _ConvEqlrFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, scale, activation, resample):
        y, r = _forward(x, weight, bias, scale, activation, resample)
        ctx.save_for_backward(x, weight, bias, y, r)
        ctx.cfg = (scale, activation, resample)
        return y

    @staticmethod
    def backward(ctx, gy):
        x, weight, bias, y, r = ctx.saved_tensors
        scale, activation, resample = ctx.cfg
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        if _conv2d._weight_gradients_disabled:
            need_w = need_b = False
        wanted = [t for t, need in ((x, need_x), (weight, need_w), (bias, need_b)) if need]
        if not wanted:
            return None, None, None, None, None, None
        if torch.is_grad_enabled():  # create_graph: differentiate a differentiable form of the same function
            with torch.enable_grad():
                out = _differentiable(x, weight, bias, scale, activation, resample)
                got = iter(torch.autograd.grad(out, wanted, gy, create_graph=True))
        else:
            db = None
            # the fused epilogue backward has pixel_norm's Triton limits (channels per program, the
            # launch grid): an output past them takes the torch epilogue backward, the same function
            if EPILOGUE_BACKWARD == "triton" and activation != "linear" and not any(
                    name == "triton" for name, _ in _epilogue_refusals(y, bias_grad=need_b)):
                dz, db = _epilogue_backward_fused(gy, y, r, activation, need_b)
            else:
                dz = _epilogue_backward(gy, y, r, activation)
            got = iter(_first_order(x, weight, dz, scale, resample, need_x, need_w, need_b, bias, db))
        grads = [next(got) if need else None for need in (need_x, need_w, need_b)]
        return grads[0], grads[1], grads[2], None, None, None


def _first_order(x, weight, dz, scale, resample, need_x, need_w, need_b, bias, db=None):
    """Input, weight and bias gradients (those asked for, in that order) from the gradient at
    the convolution's output: cuDNN's data and weight gradients of the strided form (``db``:
    the bias gradient where the epilogue's backward summed it already)."""
    with torch.enable_grad():
        wv = weight.detach().requires_grad_(True)
        w = wv * scale
        if resample == "up":
            kern, stride, pad, transposed = upsample_conv_kernel(w), 2, 1, True
        elif resample == "down":
            kern, stride, pad, transposed = downsample_conv_kernel(w), 2, 1, False
        else:
            kern, stride, pad, transposed = w, 1, weight.shape[2] // 2, False
    g = dz.to(x.dtype)
    gx, gk, _ = torch.ops.aten.convolution_backward(
        g, x, kern.detach().to(x.dtype), None, (stride, stride), (pad, pad), (1, 1), transposed, (0, 0), 1,
        (need_x, need_w, False))
    out = []
    if need_x:
        out.append(gx)
    if need_w:
        out.append(torch.autograd.grad(kern, wv, gk.to(kern.dtype))[0].to(weight.dtype))
    if need_b:
        out.append((db if db is not None else dz.sum(dim=(0, 2, 3))).to(bias.dtype))
    return out


def _refusals(weight: torch.Tensor, activation: str) -> tuple[tuple[str, str], ...]:
    """``(backend, why)`` for the Triton kernel when it cannot take this layer (see
    _backend.resolve_for_device): its pixel norm holds every output channel of a pixel in one
    tile. (Its launch grid, (pixels / BM, COUT / BN, 1 or 4) with BM, BN >= 16, stays inside
    CUDA's limits below 2^35 output pixels and 2^20 output channels.)"""
    cout = weight.shape[0]
    if activation == "lrelu_pn" and cout > MAX_PN_CHANNELS:
        return (("triton", f"its pixel norm holds every output channel of a pixel in one tile, at most "
                           f"{MAX_PN_CHANNELS} output channels, got {cout}"),)
    return ()


# --------------------------------------------------------------------------- public
def conv2d_eqlr(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *, scale: float,
                activation: str = "linear", resample: str | None = None, backend: str | None = None) -> torch.Tensor:
    """``epilogue(conv(resample(x), weight * scale) + bias)``; see the module docstring.

    The Triton kernel's pixel norm takes at most MAX_PN_CHANNELS output channels: a wider layer
    goes to the unfused path under ``auto`` (logged once), and a named 'triton' raises.
    """
    _check(x, weight, bias, scale, activation, resample)
    impl = _backend.resolve("conv2d_eqlr", x, backend, _refusals(weight, activation))
    if impl == "triton":
        if torch.is_autocast_enabled(x.device.type) and x.dtype != torch.float64:  # as autocast casts a conv's input
            x = x.to(torch.get_autocast_dtype(x.device.type))
        return _ConvEqlrFunction.apply(x, weight, bias, float(scale), activation, resample)
    if x.is_cuda:  # the same function through ops.conv2d: cuDNN gradients of every order (the GP's double backward)
        return _differentiable(x, weight, bias, float(scale), activation, resample)
    return reference(x, weight, bias, scale=scale, activation=activation, resample=resample)
