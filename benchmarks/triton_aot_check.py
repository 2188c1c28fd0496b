#!/usr/bin/env python
"""Ahead-of-time compile every Triton kernel variant xrayforge can launch, for a Hopper GPU, without one.

The CPU interpreter (TRITON_INTERPRET=1) accepts code that the real compiler rejects, so this
script runs the real pipeline (ttir -> ttgir -> llir -> ptx -> ptxas -> cubin) for target
``cuda:90`` on every kernel specialisation the host code would launch:

* the host launch functions themselves are called on ``meta`` tensors (realistic shapes,
  dtypes and layouts, no memory), with the ``kernel[grid](...)`` call intercepted, so the
  block sizes, ``num_warps`` and constexprs are the ones the host code picks;
* the intercepted arguments are specialised by Triton's own JIT binder (pointer dtype and
  16-byte alignment, ints as i32 / i64 / divisible by 16 / the constant 1), exactly as a
  launch on a GPU would, and variants with the same compile key are compiled once.

Per variant it prints OK / FAIL, the registers, spill bytes and local memory (``n_spills``,
as Triton's driver reports it, is local bytes / 4) read from ptxas' ``-v`` log of that very
compile, and the shared memory. It also fails a variant that compiles but could not launch
(shared memory above the sm_90 limit, too many registers for its block), and reports a
host call that raises or picks a grid beyond CUDA's limits. Exit status 1 on any failure.

Registers and spills come from ptxas' log because CompiledKernel.n_regs / n_spills are only
filled in when a driver loads the cubin; they are the same numbers (n_spills = local bytes / 4).

    python benchmarks/triton_aot_check.py [-j JOBS] [-k SUBSTRING] [-v]
"""
from __future__ import annotations

import os
import sys

# The interpreter must be off *before* triton is imported, or triton.jit builds interpreted
# functions that never reach the compiler.
os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, without the warning

import argparse
import contextlib
import importlib
import io
import re
import shutil
import tempfile
import time
import traceback
from concurrent.futures import ProcessPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

ARCH = 90                       # H100 / H200
SM90_MAX_SHARED = 232448        # bytes per block with the opt-in carve-out (227 KiB)
REGS_PER_SM = 65536
MAX_GRID = (2**31 - 1, 65535, 65535)
FAKE_BASE = 1 << 40             # where the fake allocations live (256-byte aligned like CUDA's)

F32, BF16, F16, F64 = "float32", "bfloat16", "float16", "float64"


# --------------------------------------------------------------------------- capture
def _modules():
    import torch  # noqa: F401
    pn = importlib.import_module("xrayforge.ops.pixel_norm")
    mb = importlib.import_module("xrayforge.ops.minibatch_stddev")
    pp = importlib.import_module("xrayforge.fid.preprocess")
    return pn, mb, pp


class _Recorder:
    """Stands in for a JITFunction: ``kernel[grid](*args, **kwargs)`` records the call."""

    def __init__(self, name, calls):
        self.name, self.calls = name, calls

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.append((self.name, tuple(grid), args, kwargs))
        return launch


@contextlib.contextmanager
def _intercept(module, names, calls):
    saved = {n: getattr(module, n) for n in names}
    try:
        for n in names:
            setattr(module, n, _Recorder(n, calls))
        yield
    finally:
        for n, v in saved.items():
            setattr(module, n, v)


def _meta(shape, dtype, layout="nchw", offset=0):
    """A meta tensor of this shape/dtype/layout ('nchw', 'nhwc' = channels_last, 'nhwc3' =
    an (N, H, W, 3) array; offset: a view starting that many elements into its storage)."""
    import torch
    dt = getattr(torch, dtype)
    if layout == "nhwc" and len(shape) == 4:
        t = torch.empty(shape, dtype=dt, device="meta", memory_format=torch.channels_last)
    else:
        t = torch.empty(shape, dtype=dt, device="meta")
    if offset:
        flat = torch.empty(t.numel() + offset, dtype=dt, device="meta")
        t = flat.as_strided(t.shape, t.stride(), offset)
    return t


def _pixel_norm_cases():
    """(label, thunk) pairs: each thunk calls a host launch function on meta tensors."""
    pn = importlib.import_module("xrayforge.ops.pixel_norm")
    fwd, bwd = pn._epilogue_fwd._init_fn, pn._epilogue_bwd._init_fn
    shapes4 = [  # (N, C, H, W): the PGGAN generator / discriminator epilogues, plus edge cases
        (64, 512, 4, 4), (64, 512, 8, 8), (16, 256, 128, 128), (8, 64, 512, 512),
        (4, 32, 1024, 1024), (4, 16, 1024, 1024), (64, 512, 1, 1), (2, 3, 7, 7), (2, 1, 5, 5),
        (1, 1, 1, 1), (64, 100, 16, 16), (2, 16384, 4, 4),
        (2, 4096, 1024, 1024),  # per-sample stride 2^32: the i64 path
    ]
    shapes2 = [(64, 512), (1, 512), (3, 7), (1, 1), (64, 1), (100000, 512)]
    xs = []
    for s in shapes4:
        xs.append((s, "nchw"))
        if s[1] > 1 and s[2] * s[3] > 1:
            xs.append((s, "nhwc"))
    xs += [(s, "2d") for s in shapes2]
    # (x dtype, bias dtype): the bias may be float32 under a half-precision x
    dtypes = [(F32, F32), (BF16, BF16), (BF16, F32), (F16, F16), (F16, F32), (F64, F64), (F64, F32)]
    cases = []
    for shape, layout in xs:
        for xd, bd in dtypes:
            def x_(shape=shape, xd=xd, layout=layout):
                return _meta(shape, xd, layout)

            def b_(shape=shape, bd=bd):
                return _meta((shape[1],), bd)
            tag = f"pixel_norm x={shape} {layout} {xd} bias={bd}"
            if xd == bd:  # no-bias modes do not depend on the bias dtype
                cases.append((f"{tag} fwd pixel_norm",
                              lambda x_=x_: fwd(x_(), None, 0.0, 1e-8, False, True, "triton")))
                cases.append((f"{tag} bwd pixel_norm",
                              lambda x_=x_: bwd(x_(), x_(), None, 0.0, 1e-8, False, True, False, "triton")))
                cases.append((f"{tag} fwd bias_lrelu",
                              lambda x_=x_, b_=b_: fwd(x_(), b_(), 0.2, 0.0, True, False, "triton")))
                cases.append((f"{tag} bwd bias_lrelu",
                              lambda x_=x_: bwd(x_(), x_(), None, 0.2, 0.0, True, False, True, "triton")))
            else:
                cases.append((f"{tag} fwd bias_lrelu",
                              lambda x_=x_, b_=b_: fwd(x_(), b_(), 0.2, 0.0, True, False, "triton")))
            cases.append((f"{tag} fwd bias_lrelu_pixel_norm",
                          lambda x_=x_, b_=b_: fwd(x_(), b_(), 0.2, 1e-8, True, True, "triton")))
            cases.append((f"{tag} bwd bias_lrelu_pixel_norm",
                          lambda x_=x_, b_=b_: bwd(x_(), x_(), b_(), 0.2, 1e-8, True, True, True, "triton")))
    return pn, ["_epilogue_fwd_kernel", "_epilogue_bwd_kernel"], cases


def _mbstd_cases():
    mb = importlib.import_module("xrayforge.ops.minibatch_stddev")
    fwd, bwd = mb._mbstd_fwd._init_fn, mb._mbstd_bwd._init_fn
    shapes = [  # (N, C, H, W, group_size, num_channels)
        (64, 512, 4, 4, 4, 1), (16, 512, 4, 4, 4, 1), (4, 512, 4, 4, 4, 1), (3, 512, 4, 4, 4, 1),
        (2, 512, 4, 4, 4, 1), (1, 512, 4, 4, 4, 1), (64, 512, 4, 4, 4, 2), (64, 512, 4, 4, 8, 1),
        (64, 512, 4, 4, 64, 1), (64, 256, 8, 8, 4, 1), (8, 16, 1024, 1024, 4, 1), (12, 3, 5, 5, 4, 1),
        (8, 1, 1, 1, 4, 1), (6, 512, 4, 4, 3, 4),
        (4, 4096, 1024, 1024, 4, 1),  # per-sample stride 2^32: the i64 path
    ]
    cases = []
    for n, c, h, w, gs, nc in shapes:
        layouts = ["nchw"] + (["nhwc"] if c > 1 and h * w > 1 else [])
        for layout in layouts:
            for dt in (F32, BF16, F16, F64):
                def x_(layout=layout, dt=dt, shape=(n, c, h, w)):
                    return _meta(shape, dt, layout)

                def dout_like(kind, x_=x_, layout=layout, dt=dt, shape=(n, c + nc, h, w)):
                    import torch
                    if kind == "expanded":  # the gradient of out.sum(): every stride 0
                        return torch.empty((), dtype=getattr(torch, dt), device="meta").expand(shape)
                    return _meta(shape, dt, "nchw" if kind == "contiguous" else layout)
                tag = f"minibatch_stddev x={(n, c, h, w)} G={gs} F={nc} {layout} {dt}"
                cases.append((f"{tag} fwd", lambda x_=x_, gs=gs, nc=nc: fwd(x_(), gs, nc, "triton")))
                for kind in ("like_out", "contiguous", "expanded"):
                    cases.append((f"{tag} bwd dout={kind}",
                                  lambda x_=x_, gs=gs, nc=nc, kind=kind, d=dout_like:
                                  bwd(d(kind), x_(), gs, nc, "triton")))
    return mb, ["_mbstd_fwd_kernel", "_mbstd_bwd_kernel"], cases


def _preprocess_cases():
    pp = importlib.import_module("xrayforge.fid.preprocess")
    sizes = [(32, 32), (28, 28), (256, 256), (299, 299), (1024, 1024), (1, 1), (375, 500)]
    srcs = ["uint8", "uint16", "int32", F32, F64]
    outs = [F32, BF16, F16]
    cases = []
    for h, w in sizes:
        layouts = [("gray", (64, h, w), "nchw"), ("hw3", (64, h, w, 3), "nchw"),
                   ("nchw3", (64, 3, h, w), "nchw"), ("nchw1", (64, 1, h, w), "nchw"),
                   ("gray[1:]", (64, h, w), "slice"), ("hw3[1:]", (64, h, w, 3), "slice")]
        for lname, shape, mode in layouts:
            for sd in srcs:
                for od in outs:
                    for channels in (1, 3):
                        if channels == 3 and lname in ("hw3", "nchw3", "hw3[1:]"):
                            continue  # RGB input always gives 3 channels: same launch as channels=1
                        def img(shape=shape, sd=sd, mode=mode):
                            if mode == "slice":  # a batch cut from a larger array: unaligned base
                                return _meta(shape, sd, offset=shape[1] * shape[2] * (shape[3] if len(shape) == 4 else 1))
                            return _meta(shape, sd)
                        tag = f"fid.preprocess images={lname}{shape[1:]} {sd} -> {od} channels={channels}"
                        cases.append((tag, lambda img=img, od=od, channels=channels:
                                      pp.preprocess(img(), channels=channels, dtype=_torch_dtype(od),
                                                    backend="triton")))
    # another output size (the tests use small ones)
    for sd in ("uint8", F32):
        cases.append((f"fid.preprocess images=gray(256, 256) {sd} -> float32 size=64",
                      lambda sd=sd: pp.preprocess(_meta((8, 256, 256), sd), channels=3, backend="triton", size=64)))
    return pp, ["_resize_kernel"], cases


def _conv_eqlr_cases():
    """ops.conv2d_eqlr's forward at every conv layer of the 1024-px G and D, batch 16,
    channels_last, in bf16 / fp16 / fp32 (fp64 on a few), and in bf16 with each of the
    autotuner's candidate tiles; the fused epilogue backward of each."""
    C = importlib.import_module("xrayforge.ops.conv2d_eqlr")
    from xrayforge.bench.ops import conv_layer_shapes
    cases = []
    for i, s in enumerate(conv_layer_shapes(1024, 512)):
        for dt in (BF16, F16, F32) + ((F64,) if i % 8 == 0 else ()):
            for layout in ("nhwc", "nchw") if dt == BF16 else ("nhwc",):
                tag = (f"conv2d_eqlr {s['cin']}->{s['cout']} k{s['kernel']} {s['resample']} {s['activation']} "
                       f"@{s['size']} {dt} {layout}")

                def run(s=s, dt=dt, layout=layout):
                    x = _meta((16, s["cin"], s["size"], s["size"]), dt, layout)
                    w = _meta((s["cout"], s["cin"], s["kernel"], s["kernel"]), F32)
                    C._forward(x, w, _meta((s["cout"],), F32), 0.1, s["activation"], s["resample"])
                cases.append((tag, run))
                if dt == BF16 and layout == "nhwc":  # every tile configuration the autotuner may time
                    for cfg in C.candidates(s["cin"], s["cout"], s["activation"] == "lrelu_pn")[1:]:
                        def tuned(s=s, cfg=cfg):
                            x = _meta((16, s["cin"], s["size"], s["size"]), BF16, "nhwc")
                            w = _meta((s["cout"], s["cin"], s["kernel"], s["kernel"]), F32)
                            C._forward(x, w, _meta((s["cout"],), F32), 0.1, s["activation"], s["resample"], cfg)
                        cases.append((f"{tag} autotune candidate {cfg}", tuned))
                if s["activation"] == "linear":
                    continue

                def backward(s=s, dt=dt, layout=layout):  # the fused epilogue backward of that layer
                    o = s["size"] * 2 if s["resample"] == "up" else (s["size"] // 2 if s["resample"] else s["size"])
                    y = _meta((16, s["cout"], o, o), dt, layout)
                    r = _meta((16, 1, o, o), F64 if dt == F64 else F32)
                    C._epilogue_backward_fused(y, y, r if s["activation"] == "lrelu_pn" else None, s["activation"],
                                               True)
                cases.append((tag + " epilogue backward", backward))
    return C, ["_conv_kernel", "_conv_epilogue_bwd_kernel"], cases


def _knn_cases():
    K = importlib.import_module("xrayforge.ops.knn")
    cases = []
    for n, m, d in ((100000, 100000, 2048), (3000, 5000, 500), (7, 9, 3)):
        for dt, prec in ((F32, "tf32x3"), (F32, "ieee"), (F16, None), (BF16, None), (F64, None)):
            # the candidates the op searches for, k + EXTRA_CANDIDATES (at most MAX_K): k = 1 (memorisation with
            # and without its self, PRDC's coverage), precision / recall's radii (k = 3) and density's (k = 5)
            # without their self; K and EXCLUDE are constexprs, each pair its own kernel
            for k, excl in ((5, True), (5, False), (7, True), (9, True), (16, False)):
                if excl and n != m:
                    continue
                tag = f"knn {n}x{m}x{d} {dt} {prec} k={k} exclude={excl}"

                def run(n=n, m=m, d=d, dt=dt, prec=prec, k=k, excl=excl):
                    saved = K._search_scale  # reads the features' largest value (.item()): meta has none
                    K._search_scale = lambda q, r: 1.0
                    try:
                        K._triton(_meta((n, d), dt), _meta((n if excl else m, d), dt), k, excl, precision=prec)
                    finally:
                        K._search_scale = saved
                cases.append((tag, run))
    return K, ["_knn_kernel"], cases


def _moments_cases():
    import torch
    M = importlib.import_module("xrayforge.ops.moments")
    cases = []
    for n, d, k in ((50000, 2048, 1), (50000, 2048, 15), (256, 2048, 1), (6000, 300, 15), (5000, 64, 2)):
        for dt in (F32, BF16, F16):
            for prec in ("ieee", "tf32x3"):
                for gather in (False, True) if k == 1 else (True,):
                    tag = f"masked_moments {n}x{d} K={k} {dt} {prec} gather={gather}"

                    def run(n=n, d=d, k=k, dt=dt, prec=prec, gather=gather):
                        saved = M._subsets  # masks.nonzero() has no meta kernel: the index list stands in
                        M._subsets = lambda x, masks: (gather, _meta((n * k,), "int32"),
                                                       torch.empty(k + 1, dtype=torch.int64, device="meta"),
                                                       torch.empty(k, dtype=torch.int64, device="meta"))
                        try:
                            M._kernels(_meta((n, d), dt), None, prec, None, None, n)
                        finally:
                            M._subsets = saved
                    cases.append((tag, run))
    return M, ["_sums_kernel", "_gram_kernel"], cases


def _torch_dtype(name):
    import torch
    return getattr(torch, name)


@contextlib.contextmanager
def _triton_backend_on_meta():
    """preprocess asks _backend whether triton can run on the tensor's device; meta can't."""
    from xrayforge.ops import _backend
    saved = _backend.resolve_for_device
    _backend.resolve_for_device = lambda op, device, backend=None: "triton"
    try:
        yield
    finally:
        _backend.resolve_for_device = saved


def collect_launches(only=None):
    """Run every case's host code; return [(label, kernel_name, module_name, args, kwargs)]."""
    launches, errors = [], []
    for builder in (_pixel_norm_cases, _mbstd_cases, _preprocess_cases, _conv_eqlr_cases, _knn_cases,
                    _moments_cases):
        module, names, cases = builder()
        for label, thunk in cases:
            if only and not any(s in label for s in only):
                continue
            calls = []
            try:
                with _intercept(module, names, calls), _triton_backend_on_meta():
                    thunk()
            except Exception as exc:  # the host code itself refused (a bug worth seeing too)
                errors.append((label, f"host code raised {type(exc).__name__}: {exc}"))
                continue
            for name, grid, args, kwargs in calls:
                grid = tuple(grid) + (1,) * (3 - len(grid))
                if not (grid[0] <= MAX_GRID[0] and grid[1] <= MAX_GRID[1] and grid[2] <= MAX_GRID[2]):
                    errors.append((label, f"{name}: grid {grid} exceeds CUDA's limits {MAX_GRID}"))
                launches.append((label, name, module.__name__, grid, args, kwargs))
    return launches, errors


# --------------------------------------------------------------------------- specialise
class FakePointer:
    """What Triton's binder sees of a CUDA tensor: its dtype and address (for alignment)."""

    def __init__(self, t):
        self.dtype = t.dtype
        self._ptr = FAKE_BASE + t.storage_offset() * t.element_size()

    def data_ptr(self):
        return self._ptr

    @staticmethod
    def ptr_range():
        return 0


def _target():
    from triton.backends.compiler import GPUTarget
    return GPUTarget("cuda", ARCH, 32)


_binders = {}


def specialise(kernel, args, kwargs):
    """Triton's JIT path up to the compile call: (signature, constexprs, attrs, options)."""
    import torch
    from triton import knobs
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature
    if kernel not in _binders:
        backend = make_backend(_target())
        _binders[kernel] = (backend, create_function_from_signature(kernel.signature, kernel.params, backend))
    backend, binder = _binders[kernel]
    args = [FakePointer(a) if isinstance(a, torch.Tensor) else a for a in args]
    kwargs = {k: (FakePointer(v) if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
    # as JITFunction.run does before binding
    kwargs["debug"] = kwargs.get("debug", kernel.debug) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    kwargs["fpsan_homomorphic_casts"] = knobs.compilation.fpsan_homomorphic_casts
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    return signature, constexprs, attrs, options


def describe(kernel, signature, constexprs, attrs, options):
    """A compact, unambiguous name for a specialisation."""
    parts = []
    for i, p in enumerate(kernel.params):
        ty = signature[p.name]
        if p.is_constexpr:
            parts.append(f"{p.name}={constexprs[(i,)]}")
        elif ty == "constexpr":  # an int specialised to its value (1)
            parts.append(f"{p.name}=={constexprs[(i,)]}")
        else:
            aligned = any(a[0] == "tt.divisibility" for a in attrs.get((i,), []))
            parts.append(f"{p.name}:{ty}{'/16' if aligned and ty[0] in '*i' else ''}")
    parts.append(f"warps={options.num_warps}")
    return f"{kernel.__name__}[{' '.join(parts)}]"


def _key(signature, constexprs, attrs, options):
    return repr((sorted(signature.items()), sorted((k, repr(v)) for k, v in constexprs.items()),
                 sorted((k, repr(v)) for k, v in attrs.items()), sorted(options.__dict__.items())))


# --------------------------------------------------------------------------- compile
_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def _worker_init(cache_dir):
    os.environ["TRITON_CACHE_DIR"] = cache_dir
    from triton import knobs
    knobs.cache.dir = cache_dir
    knobs.compilation.always_compile = True   # always run ptxas, so its -v log is fresh
    knobs.nvidia.dump_ptxas_log = True        # ...and printed (captured below)


def compile_one(job):
    """Compile one specialisation to a cubin; returns a result dict (never raises)."""
    module_name, kernel_name, signature, constexprs, attrs, option_dict = job
    import triton
    from triton.compiler import ASTSource
    kernel = getattr(importlib.import_module(module_name), kernel_name)
    out = {"ok": False}
    log = io.StringIO()
    t0 = time.perf_counter()
    try:
        with contextlib.redirect_stdout(log):
            ck = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=_target(),
                                options=option_dict)
    except Exception as exc:  # noqa: BLE001 - every compiler error is a finding
        text = str(exc).strip() or type(exc).__name__
        lines = [ln for ln in text.splitlines() if ln.strip()]
        first = lines[0] if lines else ""
        last = lines[-1] if lines else ""
        # Triton's CompilationError starts with "at L:C:" and the source; the cause is last
        msg = first if first == last else f"{first} ... {last}"
        out.update(error=f"{type(exc).__name__}: {msg}", detail=traceback.format_exc() + "\n" + log.getvalue()[-4000:])
        out["seconds"] = time.perf_counter() - t0
        return out
    out["seconds"] = time.perf_counter() - t0
    cubin = ck.asm.get("cubin", b"")
    ptxas_log = log.getvalue()
    regs = _PTXAS_REGS.search(ptxas_log)
    spill = _PTXAS_SPILL.search(ptxas_log)
    if not cubin or not isinstance(cubin, (bytes, bytearray)):
        out["error"] = "no cubin produced"
        return out
    if regs is None or spill is None:
        out["error"] = "could not read ptxas -v output: " + ptxas_log[-300:]
        return out
    out.update(cubin_bytes=len(cubin), n_regs=int(regs.group(1)), stack=int(spill.group(1)),
               spill_stores=int(spill.group(2)), spill_loads=int(spill.group(3)),
               n_spills=int(spill.group(1)) // 4, shared=ck.metadata.shared, num_warps=ck.metadata.num_warps,
               ptx_version=getattr(ck.metadata, "ptx_version", None))
    # would it launch? (the checks CompiledKernel._init_handles makes, with sm_90's limits)
    threads = ck.metadata.num_warps * 32
    regs_per_block = ((out["n_regs"] + 7) // 8 * 8) * threads
    if ck.metadata.shared > SM90_MAX_SHARED:
        out["error"] = f"needs {ck.metadata.shared} B shared memory > {SM90_MAX_SHARED} B (OutOfResources at launch)"
    elif regs_per_block > REGS_PER_SM:
        out["error"] = f"{out['n_regs']} regs x {threads} threads > {REGS_PER_SM} (OutOfResources at launch)"
    else:
        out["ok"] = True
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-j", "--jobs", type=int, default=os.cpu_count() or 1, help="compiler processes")
    ap.add_argument("-k", action="append", default=None, help="only cases whose label contains this")
    ap.add_argument("-v", "--verbose", action="store_true", help="full error text and the cases behind each variant")
    args = ap.parse_args(argv)

    import triton
    from triton.runtime.jit import JITFunction
    pn, mb, pp = _modules()
    kernels = {"pixel_norm": [pn._epilogue_fwd_kernel, pn._epilogue_bwd_kernel, pn._inv_sqrt, pn._constant],
               "minibatch_stddev": [mb._mbstd_fwd_kernel, mb._mbstd_bwd_kernel, mb._mbstd_group_tile],
               "preprocess": [pp._resize_kernel]}
    for group, ks in kernels.items():
        for k in ks:
            if not isinstance(k, JITFunction):
                sys.exit(f"{group}: {k!r} is not a triton JITFunction (is TRITON_INTERPRET set?)")

    t0 = time.perf_counter()
    launches, host_errors = collect_launches(args.k)
    variants = {}  # compile key -> [description, job, labels]
    for label, name, module_name, grid, largs, lkwargs in launches:
        kernel = getattr(sys.modules[module_name], name)
        signature, constexprs, attrs, options = specialise(kernel, largs, lkwargs)
        key = (module_name, name, _key(signature, constexprs, attrs, options))
        if key not in variants:
            variants[key] = [describe(kernel, signature, constexprs, attrs, options),
                             (module_name, name, signature, constexprs, attrs, options.__dict__), []]
        variants[key][2].append(f"{label} grid={grid}")
    print(f"# triton {triton.__version__}, target cuda:{ARCH}; {len(launches)} launches "
          f"-> {len(variants)} distinct variants "
          f"(collected in {time.perf_counter() - t0:.1f}s)", flush=True)

    failures = len(host_errors)
    for label, err in host_errors:
        print(f"FAIL host {label}: {err}")

    cache_dir = tempfile.mkdtemp(prefix="xrayforge-aot-")
    results = []
    try:
        items = list(variants.values())
        jobs = [job for _, job, _ in items]
        if args.jobs > 1:
            with ProcessPoolExecutor(args.jobs, initializer=_worker_init, initargs=(cache_dir,)) as pool:
                stream = pool.map(compile_one, jobs)
                for (desc, _, labels), res in zip(items, stream):
                    results.append(_report(desc, labels, res, args.verbose))
        else:
            _worker_init(cache_dir)
            for desc, job, labels in items:
                results.append(_report(desc, labels, compile_one(job), args.verbose))
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)

    failures += sum(1 for _, r in results if not r["ok"])
    ok = [(d, r) for d, r in results if r["ok"]]
    print(f"\n# {len(results)} variants compiled to cubin for sm_{ARCH}: {len(ok)} OK, "
          f"{len(results) - len(ok)} FAIL; {len(host_errors)} host errors; {time.perf_counter() - t0:.0f}s")
    if ok:
        print("# heaviest by registers:")
        for d, r in sorted(ok, key=lambda x: (-x[1]["n_regs"], -x[1]["stack"]))[:5]:
            print(f"#   regs={r['n_regs']} spills={r['spill_stores']}/{r['spill_loads']}B stack={r['stack']}B {d}")
        spilling = [(d, r) for d, r in ok if r["spill_stores"] or r["spill_loads"] or r["stack"]]
        print(f"# variants that spill / use local memory: {len(spilling)}")
        for d, r in sorted(spilling, key=lambda x: -x[1]["spill_stores"])[:10]:
            print(f"#   spills={r['spill_stores']}/{r['spill_loads']}B stack={r['stack']}B regs={r['n_regs']} {d}")
    return 1 if failures else 0


def _report(desc, labels, res, verbose):
    if res["ok"]:
        print(f"OK   {desc}  regs={res['n_regs']} n_spills={res['n_spills']} "
              f"(spill st/ld {res['spill_stores']}/{res['spill_loads']} B, stack {res['stack']} B) "
              f"smem={res['shared']} cubin={res['cubin_bytes']}B {res['seconds']:.1f}s", flush=True)
    else:
        print(f"FAIL {desc}  {res['error']}  (e.g. {labels[0]})", flush=True)
        if verbose and "detail" in res:
            print(res["detail"])
    if verbose:
        for lb in labels:
            print(f"       <- {lb}")
    return desc, res


if __name__ == "__main__":
    sys.exit(main())
