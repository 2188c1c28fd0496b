"""Benchmark of the fused ops against the eager reference, at the PGGAN's real shapes.

For each op, shape, dtype and backend: forward and forward+backward time, effective memory
bandwidth (bytes that must move at least once, divided by time), the fraction of the
device's HBM bandwidth, and the speed-up over eager PyTorch measured in the same run.
"""
from __future__ import annotations

import argparse
import importlib
import sys

import torch

from .. import ops
from . import device_info, environment, error_summary, format_table, results_dir, time_fn, write_results

GPU_SHAPES = {
    "pixel_norm": [(8, 16, 1024, 1024), (8, 32, 512, 512), (8, 64, 256, 256), (64, 512, 32, 32),
                   (64, 512, 16, 16), (64, 512, 8, 8), (64, 512, 4, 4), (64, 512)],
    "bias_lrelu_pixel_norm": [(8, 16, 1024, 1024), (8, 32, 512, 512), (8, 64, 256, 256),
                              (64, 512, 32, 32), (64, 512, 4, 4)],
    "bias_lrelu": [(8, 16, 1024, 1024), (8, 64, 256, 256), (64, 512, 32, 32), (64, 512, 4, 4)],
    "minibatch_stddev": [(64, 512, 4, 4), (256, 512, 4, 4)],
}
CPU_SHAPES = {
    "pixel_norm": [(4, 16, 128, 128), (16, 512, 8, 8)],
    "bias_lrelu_pixel_norm": [(4, 16, 128, 128), (16, 512, 8, 8)],
    "bias_lrelu": [(4, 16, 128, 128)],
    "minibatch_stddev": [(16, 512, 4, 4)],
}
# the headline case: pixel norm over a 1024-px layer of a batch of 8 (eager PyTorch ~1 TB/s on an H100)
TARGET_SHAPE = (8, 16, 1024, 1024)


def pggan_shapes(resolution: int = 1024, batch: int = 16, fmap_max: int = 512,
                 target: bool = True) -> dict[str, list[tuple]]:
    """The shapes each op sees in a ``resolution``-px PGGAN at ``batch``: G's conv epilogue
    (bias + leaky ReLU + pixel norm) and D's (bias + leaky ReLU) at every layer's channels ×
    resolution, pixel norm on the latent, minibatch stddev at 4 px; plus TARGET_SHAPE first
    (``target=False`` leaves it out)."""
    from ..nn import NetworkConfig
    cfg = NetworkConfig(resolution=resolution, fmap_max=fmap_max)
    layers = [(batch, cfg.channels_at(level), cfg.resolution_at(level), cfg.resolution_at(level))
              for level in range(cfg.num_levels)]
    return {"pixel_norm": ([TARGET_SHAPE] if target else []) + [(batch, cfg.latent_dim)] + layers,
            "bias_lrelu_pixel_norm": list(layers),
            "bias_lrelu": list(layers),
            "minibatch_stddev": [(batch, cfg.channels_at(0), 4, 4), (4 * batch, cfg.channels_at(0), 4, 4)]}


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _traffic(op: str, shape, elsize: int) -> tuple[int, int]:
    """Minimum bytes moved by (forward, forward+backward)."""
    n = _numel(shape)
    if op == "minibatch_stddev":
        extra = n // shape[1]  # the appended channel
        fwd = (2 * n + extra) * elsize                   # read x, write x and the statistic map
        return fwd, fwd + (3 * n + extra) * elsize       # bwd: read x, dout; write dx
    return 2 * n * elsize, 5 * n * elsize                # fwd: x -> y; bwd: x, dy -> dx


def _call(op: str, x, bias, backend: str):
    if op == "pixel_norm":
        return ops.pixel_norm(x, backend=backend)
    if op == "bias_lrelu_pixel_norm":
        return ops.bias_lrelu_pixel_norm(x, bias, backend=backend)
    if op == "bias_lrelu":
        return ops.bias_lrelu(x, bias, backend=backend)
    if op == "minibatch_stddev":
        return ops.minibatch_stddev(x, backend=backend)
    raise ValueError(f"unknown op {op!r}")


def _inputs(op: str, shape, dtype, device, requires_grad: bool = False, seed: int = 0):
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(shape, device=device, dtype=dtype, generator=g).requires_grad_(requires_grad)
    bias = torch.randn(shape[1], device=device, generator=g).requires_grad_(requires_grad)
    return x, bias


_BIAS_OPS = ("bias_lrelu_pixel_norm", "bias_lrelu")


def _make_call(op: str, shape, dtype, device, backend: str, backward: bool):
    x, bias = _inputs(op, shape, dtype, device, requires_grad=backward)
    if not backward:
        def call():
            with torch.no_grad():
                return _call(op, x, bias, backend)
        return call
    dy = torch.randn_like(_call(op, x, bias, backend))
    inputs = (x, bias) if op in _BIAS_OPS else (x,)
    return lambda: torch.autograd.grad(_call(op, x, bias, backend), inputs, dy)


def max_error(op: str, shape, dtype, device, backend: str) -> float:
    """Largest absolute forward error of ``backend`` at ``dtype`` against float64 eager PyTorch."""
    return _forward_error(op, shape, dtype, device, backend)[0]


def _forward_error(op: str, shape, dtype, device, backend: str) -> tuple[float, float]:
    """(largest absolute forward error against float64 eager PyTorch, largest |exact output|)."""
    with torch.no_grad():
        x, bias = _inputs(op, shape, dtype, device, seed=1)
        exact = _call(op, x.double(), bias.double(), "torch")
        ours = _call(op, x, bias, backend)
        if not exact.numel():
            return 0.0, 0.0
        return (ours.double() - exact).abs().max().item(), exact.abs().max().item()


def grad_errors(op: str, shape, dtype, device, backend: str) -> tuple[float, float]:
    """Gradient errors of ``backend`` at ``dtype`` against float64 eager PyTorch, for one output
    gradient, over each input's gradient (x, and the bias for the bias ops: what the fwd+bwd timing
    computes): (the largest max |ours - exact| / max |exact|, the largest relative L2 error
    ||ours - exact|| / ||exact||). The second is the one a wrong backward cannot hide in: at a leaky ReLU's kink a
    low-precision pre-activation rounded to the other side takes the other slope, so eager bf16's largest
    error is already 0.3-0.6 of the scale at the quick shapes, and twice that passed a backward 50% off;
    its L2 error is ~0.03."""
    x, bias = _inputs(op, shape, dtype, device, requires_grad=True, seed=1)
    xd, bd = x.detach().double().requires_grad_(), bias.detach().double().requires_grad_()
    inputs, inputs_d = ((x, bias), (xd, bd)) if op in _BIAS_OPS else ((x,), (xd,))
    exact_out = _call(op, xd, bd, "torch")
    g = torch.Generator(device=device).manual_seed(2)
    dy = torch.randn(exact_out.shape, device=device, dtype=dtype, generator=g)
    exact = torch.autograd.grad(exact_out, inputs_d, dy.double())
    ours = torch.autograd.grad(_call(op, x, bias, backend), inputs, dy)
    pairs = [(o.double(), e) for o, e in zip(ours, exact) if e.numel()]
    return (max(((o - e).abs().max() / e.abs().max().clamp_min(1e-300)).item() for o, e in pairs),
            max(((o - e).norm() / e.norm().clamp_min(1e-300)).item() for o, e in pairs))


def tolerance_floor(dtype) -> float:
    """Relative error that no correct kernel at ``dtype`` needs to reach (a rounding of the output
    to ``dtype`` (bf16: 2^-7 of the scale), and accumulation-order differences of large reductions in
    float32): below what a wrong result gives (a pixel norm over C - 1 instead of C channels at C = 32
    is 1.6% off)."""
    return max(torch.finfo(dtype).eps, 1e-4)


def matches_reference(err: float, ref_err: float | None, floor: float) -> bool:
    """A fast path's error against float64 is acceptable: at most twice the eager reference's own
    error at the same dtype (DESIGN's rule), or ``floor`` (the tolerance floor times the output's
    scale) where that is larger (an eager path exact by chance, or not measured). Not their sum:
    in bf16 that let a pixel norm over C - 1 channels (1.6% off at C = 32) pass."""
    return bool(err <= max(2 * (ref_err or 0.0), floor))


def run(device: str | None = None, dtypes=("float32", "bfloat16"), backends=None, quick: bool = False,
        shapes: dict | None = None, copy_gbps: float | None = None, min_seconds: float = 0.2,
        reps: int = 20, warmup: int = 3, on_row=None) -> dict:
    """One row per op × shape × dtype × backend. ``shapes``: {op: [shape, ...]} (default the
    PGGAN's on a GPU, small ones on a CPU); ``copy_gbps``: measured device-to-device copy
    bandwidth, the reference of the ``*_copy_frac`` columns; ``on_row(row)``: called as each
    row is finished."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    info = device_info(dev)
    if shapes is None:
        shapes = CPU_SHAPES if (dev.type != "cuda" or quick) else GPU_SHAPES
    rows = []
    for op, op_shapes in shapes.items():
        names = backends or ops.available_backends(op, dev)
        for dtype_name in dtypes:
            dtype = getattr(torch, dtype_name)
            elsize = torch.empty(0, dtype=dtype).element_size()
            for shape in op_shapes:
                fwd_bytes, fb_bytes = _traffic(op, shape, elsize)
                base, ref_err = {}, {}
                floor = tolerance_floor(dtype)
                for backend in ["torch"] + [b for b in names if b != "torch"]:
                    row = {"op": op, "shape": list(shape), "dtype": dtype_name, "backend": backend}
                    try:
                        row["max_err"], scale = _forward_error(op, shape, dtype, dev, backend)
                    except Exception as exc:  # noqa: BLE001 - recorded; the run goes on
                        row["error"] = error_summary(exc)
                    if "error" not in row:
                        try:  # a failed backward is recorded, and its fwd+bwd timing fails beside it
                            row["max_grad_err"], row["grad_l2_err"] = grad_errors(op, shape, dtype, dev, backend)
                        except Exception as exc:  # noqa: BLE001
                            row["grad_error"] = error_summary(exc)
                        if backend == "torch":  # the reference: its own errors are the yardstick
                            ref_err = {"fwd": row["max_err"], "grad": row.get("max_grad_err"),
                                       "grad_l2": row.get("grad_l2_err")}
                        else:  # a fast path whose numbers are wrong says so beside its timings
                            row["matches_reference"] = (
                                matches_reference(row["max_err"], ref_err.get("fwd"), floor * max(scale, 1.0))
                                and ("max_grad_err" not in row
                                     or (matches_reference(row["max_grad_err"], ref_err.get("grad"), floor)
                                         and matches_reference(row["grad_l2_err"], ref_err.get("grad_l2"),
                                                               floor))))
                    for phase, nbytes, backward in (("fwd", fwd_bytes, False), ("fwd+bwd", fb_bytes, True)):
                        if "error" in row:
                            break
                        try:
                            ms = time_fn(_make_call(op, shape, dtype, dev, backend, backward), dev,
                                         warmup=warmup, reps=reps, min_seconds=min_seconds)
                        except Exception as exc:  # noqa: BLE001 - e.g. out of memory at this shape
                            row[f"{phase}_error"] = error_summary(exc)
                            continue
                        gbps = nbytes / ms / 1e6
                        row[f"{phase}_ms"] = ms
                        row[f"{phase}_gbps"] = gbps
                        row[f"{phase}_hbm_frac"] = gbps / info.hbm_gbps if info.hbm_gbps else None
                        row[f"{phase}_copy_frac"] = gbps / copy_gbps if copy_gbps else None
                        if backend == "torch":
                            base[phase] = ms
                        # eager's time / this one's (None where eager's failed: no NaN in the JSON)
                        row[f"{phase}_speedup"] = base[phase] / ms if phase in base else None
                    rows.append(row)
                    if on_row is not None:
                        on_row(row)
                    if dev.type == "cuda":
                        torch.cuda.empty_cache()
    return {"benchmark": "ops", "device": info.as_dict(), "environment": environment(), "rows": rows,
            "copy_gbps": copy_gbps,
            "settings": {"dtypes": list(dtypes), "backends": list(backends) if backends else None, "quick": quick,
                         "shapes": {op: [list(s) for s in v] for op, v in shapes.items()}, "reps": reps,
                         "warmup": warmup, "min_seconds": min_seconds},
            "notes": "bytes = minimum traffic (fwd: read x + write y; bwd adds read x, dy + write dx); "
                     "speedup = eager torch time / this backend's time, same run; hbm_frac against the "
                     "datasheet bandwidth, copy_frac against the measured device-to-device copy; max_err = "
                     "largest forward error against float64 eager PyTorch; max_grad_err = largest relative "
                     "error of the input (and bias) gradients against float64, grad_l2_err their largest relative "
                     "L2 error; matches_reference (fast paths) = every error within 2x eager's own at that dtype, "
                     "or max(eps, 1e-4) relative where that is larger: False means the row's "
                     "timings are of a path that gives wrong numbers; speedup None: eager's timing failed"}


# --------------------------------------------------------------------------- conv2d_eqlr
def conv_layer_shapes(resolution: int = 1024, fmap_max: int = 512) -> list[dict]:
    """Every distinct EqualizedConv2d of a ``resolution``-px G and D at their final level, in
    the order a training step meets them: in / out channels, kernel, resample, activation,
    input size, and whether the layer uses the fused strided resampling form (as in training)."""
    from ..nn import Discriminator, EqualizedConv2d, Generator, NetworkConfig
    cfg = NetworkConfig(resolution=resolution, fmap_max=fmap_max, fused_resample_min_res=128)
    with torch.device("meta"):  # shapes only: nothing is allocated or computed
        G, D = Generator(cfg), Discriminator(cfg)
    seen: dict[tuple, bool] = {}

    def hook(m, inputs, _):
        seen.setdefault((m.in_channels, m.out_channels, m.kernel_size, m.resample, m.activation,
                         inputs[0].shape[-1]), m.fused)
    handles = [m.register_forward_hook(hook) for net in (G, D) for m in net.modules()
               if isinstance(m, EqualizedConv2d)]
    level = cfg.num_levels - 1
    with torch.no_grad():
        D(G(torch.zeros(2, cfg.latent_dim, device="meta"), level=level, alpha=1.0), level=level, alpha=1.0)
    for h in handles:
        h.remove()
    return [dict(cin=k[0], cout=k[1], kernel=k[2], resample=k[3], activation=k[4], size=k[5], fused=f)
            for k, f in seen.items()]


def _conv_costs(s: dict, batch: int, elsize: int, weight_elsize: int = 4) -> tuple[float, int, int]:
    """(forward FLOPs of the plain convolution, forward bytes, forward+backward bytes): the
    activations at ``elsize`` and the float32 weight (``weight_elsize``), each moved once. At
    4-16 px the weight is most of the traffic (512→512 3×3: 9.4 MB against 0.5 MB of activations
    at batch 16, bf16)."""
    conv_px = (2 * s["size"]) ** 2 if s["resample"] == "up" else s["size"] ** 2
    out_px = conv_px // 4 if s["resample"] == "down" else conv_px
    flops = 2.0 * batch * conv_px * s["cout"] * s["cin"] * s["kernel"] ** 2
    bx, by = batch * s["cin"] * s["size"] ** 2 * elsize, batch * s["cout"] * out_px * elsize
    bw = s["cin"] * s["cout"] * s["kernel"] ** 2 * weight_elsize
    # fwd: read x, w, write y; f+b also reads x, y, dy and w and writes dx and dw
    return flops, bx + by + bw, 3 * bx + 3 * by + 3 * bw


# (variant, EqualizedConv2d.eqlr_backend, ops.conv2d_eqlr.EPILOGUE_BACKWARD, ops.conv2d_eqlr.AUTOTUNE)
# per layer, in order; the autotuned variant runs after every layer's others (CONV_PASSES): its
# compiles (up to six tile configurations per layer) are what a stage cut at its cap should lose
CONV_VARIANTS = (("cudnn + epilogue", "cudnn", "torch", False), ("fused triton", "triton", "torch", False),
                 ("fused triton, Triton epilogue backward", "triton", "triton", False),
                 ("fused triton, autotuned tiles", "triton", "torch", True))
CONV_PASSES = (tuple(v for v in CONV_VARIANTS if not v[3]), tuple(v for v in CONV_VARIANTS if v[3]))


def conv_rows(device: str | None = None, resolution: int = 1024, fmap_max: int = 512, batch: int = 16,
              dtype: str = "bfloat16", layers: list[dict] | None = None, reps: int = 20, warmup: int = 3,
              min_seconds: float = 0.2, on_row=None) -> list[dict]:
    """Per distinct conv layer of the ``resolution``-px G and D: the layer as training runs it
    (cuDNN on channels_last, fused strided resampling at >= 128 px, the epilogue op after it)
    against ops.conv2d_eqlr's Triton kernel, forward and forward + backward (input and weight
    gradients), and for D's layers the gradient penalty's pattern (input gradient with
    create_graph, then its gradient: "gp"), at ``batch`` in ``dtype`` (autocast, as training),
    with TFLOP/s of the plain convolution (3× for f+b, 6× for gp, nominal) and its fraction of
    the device's dense peak for ``dtype``, GB/s of minimum traffic (activations and weight) and its
    fraction of HBM bandwidth, the speed-up, and the fused forward's largest deviation from float64 on the first
    image next to cuDNN's, with the largest relative error of the batch's input / weight / bias
    gradients (``max_grad_err``) and, for the fused variants, ``matches_reference``: both within twice
    cuDNN's own plus the tolerance floor (False: the row times a path that gives wrong numbers, and
    layer_table leaves it out). Rows carry their layer's index in ``layers``; the autotuned
    variant's rows come after every layer's others (CONV_PASSES)."""
    from ..nn import EqualizedConv2d
    from ..ops.conv2d import no_weight_gradients
    from ..ops.conv2d_eqlr import reference as eqlr_reference
    eqlr = importlib.import_module("xrayforge.ops.conv2d_eqlr")
    defaults = eqlr.EPILOGUE_BACKWARD, eqlr.AUTOTUNE
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    info = device_info(dev)
    dt = getattr(torch, dtype)
    peak = info.fp32_tflops if dt == torch.float32 else info.bf16_tflops
    amp = dev.type == "cuda" and dt != torch.float32
    elsize = torch.empty(0, dtype=dt).element_size()
    rows = []
    layers = layers if layers is not None else conv_layer_shapes(resolution, fmap_max)
    base: dict[tuple[int, str], float] = {}
    ref_err: dict[int, tuple[float, float]] = {}  # cuDNN's forward and gradient errors per layer
    floor = tolerance_floor(dt)
    for variants in CONV_PASSES:
        for i, s in enumerate(layers):
            torch.manual_seed(0)
            layer = EqualizedConv2d(s["cin"], s["cout"], s["kernel"], activation=s["activation"],
                                    resample=s["resample"], fused=s["fused"]).to(dev)
            with torch.no_grad():
                layer.bias.normal_(0, 0.5)
            fmt = torch.channels_last if dev.type == "cuda" else torch.contiguous_format
            layer = layer.to(memory_format=fmt)
            x = torch.randn(batch, s["cin"], s["size"], s["size"], device=dev).to(dt).contiguous(memory_format=fmt)
            flops, fwd_bytes, fb_bytes = _conv_costs(s, batch, elsize, layer.weight.element_size())
            shape = (f"{s['cin']}→{s['cout']} {s['kernel']}×{s['kernel']}"
                     f"{' ' + s['resample'] if s['resample'] else ''} {s['activation']} @{s['size']}px")
            # one output gradient for every variant; float64: the output on the first image, and the
            # input / weight / bias gradients of the whole batch (the shapes the timed calls run, so no
            # extra kernel is compiled or tuned for the check)
            try:
                xd = x.double().requires_grad_()
                params_d = [p.detach().double().requires_grad_() for p in (layer.weight, layer.bias)]
                exact = eqlr_reference(xd, *params_d, scale=layer.scale, activation=s["activation"],
                                       resample=s["resample"])
                dy = torch.randn(tuple(exact.shape), device=dev).to(dt).contiguous(memory_format=fmt)
                exact_grads = torch.autograd.grad(exact, [xd] + params_d, dy.double())
                exact = exact[:1].detach().clone()  # not a view keeping the whole batch alive
                del xd, params_d
            except Exception as exc:  # noqa: BLE001 - the check itself failed (out of memory): said, next layer
                why = f"float64 reference: {error_summary(exc)}"
                for variant, *_ in variants:
                    rows.append({"op": "conv2d_eqlr", "layer": i, "shape": shape, "batch": batch, "dtype": dtype,
                                 "variant": variant, "error": why})
                    if on_row is not None:
                        on_row(rows[-1])
                exact = exact_grads = None
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            for variant, backend, epilogue_backward, autotune in variants:
                layer.eqlr_backend = backend
                eqlr.EPILOGUE_BACKWARD, eqlr.AUTOTUNE = epilogue_backward, autotune
                tuned_before = set(eqlr.tuned_blocks())
                row = {"op": "conv2d_eqlr", "layer": i, "shape": shape, "batch": batch, "dtype": dtype,
                       "variant": variant}
                try:
                    with torch.autocast(dev.type, dt, enabled=amp):
                        with torch.no_grad():  # the whole batch: the shape the autotuner tunes for
                            got = layer(x)[:1]
                        row["max_err"] = (got.double() - exact).abs().max().item()
                        xg = x.detach().requires_grad_()
                        grads = torch.autograd.grad(layer(xg), (xg, layer.weight, layer.bias), dy)
                        row["max_grad_err"] = max(((g.double() - e).abs().max() / e.abs().max().clamp_min(1e-300))
                                                  .item() for g, e in zip(grads, exact_grads))
                        del grads
                        if backend == "cudnn":  # the layer as training runs it: the yardstick
                            ref_err[i] = (row["max_err"], row["max_grad_err"])
                        else:  # a fused path whose numbers are wrong says so beside its timings
                            ref = ref_err.get(i, (None, None))
                            row["matches_reference"] = (
                                matches_reference(row["max_err"], ref[0], floor * max(exact.abs().max().item(), 1.0))
                                and matches_reference(row["max_grad_err"], ref[1], floor))

                        def fwd():
                            with torch.no_grad():
                                return layer(xg)

                        def fwd_bwd():  # every gradient a training step takes: input, weight, bias
                            return torch.autograd.grad(layer(xg), (xg, layer.weight, layer.bias), dy)

                        def penalty():  # WGAN-GP through a D layer: the input gradient, then its own gradient
                            with no_weight_gradients():
                                gx, = torch.autograd.grad(layer(xg), xg, dy, create_graph=True)
                            return torch.autograd.grad(gx.float().square().sum(), (xg, layer.weight, layer.bias))
                        phases = [("fwd", fwd, fwd_bytes, flops), ("fwd+bwd", fwd_bwd, fb_bytes, 3 * flops)]
                        if s["activation"] == "lrelu":  # the discriminator's layers meet the gradient penalty
                            phases.append(("gp", penalty, 2 * fb_bytes, 6 * flops))
                        for phase, fn, nbytes, fl in phases:
                            ms = time_fn(fn, dev, warmup=warmup, reps=reps, min_seconds=min_seconds)
                            tflops, gbps = fl / ms / 1e9, nbytes / ms / 1e6
                            row.update({f"{phase}_ms": ms, f"{phase}_tflops": tflops, f"{phase}_gbps": gbps,
                                        f"{phase}_peak_frac": tflops / peak if peak else None,
                                        f"{phase}_hbm_frac": gbps / info.hbm_gbps if info.hbm_gbps else None})
                            if backend == "cudnn":
                                base[(i, phase)] = ms
                            row[f"{phase}_speedup"] = base[(i, phase)] / ms if (i, phase) in base else None
                except Exception as exc:  # noqa: BLE001 - recorded; the run goes on
                    row["error"] = error_summary(exc)
                finally:
                    eqlr.EPILOGUE_BACKWARD, eqlr.AUTOTUNE = defaults
                if autotune:  # the tiles the autotuner chose for this layer (timed in the warm-up calls)
                    row["tuned_blocks"] = [list(v) for k, v in eqlr.tuned_blocks().items() if k not in tuned_before]
                rows.append(row)
                if on_row is not None:
                    on_row(row)
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def layer_table(rows: list[dict], layers: list[dict], dtype: str = "bfloat16", fused: int = 1) -> dict:
    """ops.conv2d_eqlr.LAYER_TABLE entries from conv_rows' results (rows of CONV_VARIANTS by their
    ``layer`` index into ``layers``; the rows measured so far): the layers whose fused kernel
    (variant ``fused``: 1 with the torch epilogue backward, 2 with the Triton one, 3 with autotuned
    tiles) cost less than cuDNN + the epilogue over what a training step asks of them — forward +
    backward, plus the gradient penalty for D's layers."""
    by = {(r["layer"], r["variant"]): r for r in rows}
    table = {}
    for i, s in enumerate(layers):
        pair = (by.get((i, CONV_VARIANTS[0][0])), by.get((i, CONV_VARIANTS[fused][0])))
        if any(r is None or "error" in r or r.get("matches_reference") is False for r in pair):
            continue  # failed, or fast at giving wrong numbers
        need = ("fwd+bwd_ms", "gp_ms") if s["activation"] == "lrelu" else ("fwd+bwd_ms",)
        if not all(k in r for r in pair for k in need):
            continue
        if sum(pair[1][k] for k in need) < sum(pair[0][k] for k in need):
            size = s["size"] * 2 if s["resample"] == "up" else (s["size"] // 2 if s["resample"] else s["size"])
            table[(s["cin"], s["cout"], s["kernel"], s["resample"], s["activation"], size, dtype)] = "triton"
    return table


COLUMNS = [("op", "op"), ("shape", "shape"), ("dtype", "dtype"), ("backend", "backend"), ("max_err", "max err"),
           ("max_grad_err", "grad rel err"), ("matches_reference", "matches float64"),
           ("fwd_ms", "fwd ms"), ("fwd_gbps", "fwd GB/s"), ("fwd_hbm_frac", "fwd HBM frac"),
           ("fwd_speedup", "fwd ×eager"), ("fwd+bwd_ms", "fwd+bwd ms"), ("fwd+bwd_gbps", "fwd+bwd GB/s"),
           ("fwd+bwd_speedup", "fwd+bwd ×eager"), ("error", "error")]


# the dtypes the ops take (floating point); float64 runs the Triton channel epilogues too (their ACC_F64 path)
DTYPES = ("float32", "bfloat16", "float16", "float64")


def parser() -> argparse.ArgumentParser:
    from ..cli._args import device as device_arg  # a GPU asked for where none is: a usage error
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--device", type=device_arg, default=None, help="cuda, cuda:N or cpu (default: cuda when available)")
    p.add_argument("--dtypes", default="float32,bfloat16",
                   help=f"comma list from {', '.join(DTYPES)} (default float32,bfloat16)")
    p.add_argument("--backends", default=None,
                   help=f"comma list from {', '.join(ops.BACKENDS)}; eager torch always runs, as the baseline "
                        "(default: every backend available on the device)")
    p.add_argument("--quick", action="store_true", help="small shapes only, even on a GPU")
    p.add_argument("--out", type=results_dir, default=None, help="results folder (default benchmarks/results)")
    return p


def main(argv=None) -> int:
    p = parser()
    args = p.parse_args(argv)
    dtypes = tuple(d.strip() for d in args.dtypes.split(","))
    bad = [d for d in dtypes if d not in DTYPES]
    if bad:  # else an AttributeError from torch, or every row an error
        p.error(f"argument --dtypes: unknown dtype(s) {', '.join(bad)}; choose from {', '.join(DTYPES)}")
    backends = tuple(b.strip() for b in args.backends.split(",")) if args.backends else None
    bad = [b for b in backends or () if b not in ops.BACKENDS]
    if bad:  # else a table of empty rows: the error column is not printed
        p.error(f"argument --backends: unknown backend(s) {', '.join(bad)}; choose from {', '.join(ops.BACKENDS)}")
    result = run(args.device, dtypes, backends, args.quick)
    print(f"device: {result['device']['name']}")
    print(format_table(result["rows"], COLUMNS))
    print(f"wrote {write_results('ops', result, args.out)}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
