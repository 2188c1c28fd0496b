"""Benchmark of the fused ops against the eager reference, at the PGGAN's real shapes.

For each op, shape, dtype and backend: forward and forward+backward time, effective memory
bandwidth (bytes that must move at least once, divided by time), the fraction of the
device's HBM bandwidth, and the speed-up over eager PyTorch measured in the same run.
"""
from __future__ import annotations

import argparse
import sys

import torch

from .. import ops
from . import device_info, environment, format_table, time_fn, write_results

GPU_SHAPES = {
    "pixel_norm": [(8, 16, 1024, 1024), (8, 32, 512, 512), (8, 64, 256, 256), (64, 512, 32, 32),
                   (64, 512, 16, 16), (64, 512, 8, 8), (64, 512, 4, 4), (64, 512)],
    "bias_lrelu_pixel_norm": [(8, 16, 1024, 1024), (8, 32, 512, 512), (8, 64, 256, 256),
                              (64, 512, 32, 32), (64, 512, 4, 4)],
    "minibatch_stddev": [(64, 512, 4, 4), (256, 512, 4, 4)],
}
CPU_SHAPES = {
    "pixel_norm": [(4, 16, 128, 128), (16, 512, 8, 8)],
    "bias_lrelu_pixel_norm": [(4, 16, 128, 128), (16, 512, 8, 8)],
    "minibatch_stddev": [(16, 512, 4, 4)],
}


def _traffic(op: str, shape, elsize: int) -> tuple[int, int]:
    """Minimum bytes moved by (forward, forward+backward)."""
    n = 1
    for s in shape:
        n *= s
    if op == "minibatch_stddev":
        extra = n // shape[1]  # the appended channel
        fwd = (2 * n + extra) * elsize                   # read x, write x and the statistic map
        return fwd, fwd + (3 * n + extra) * elsize       # bwd: read x, dout; write dx
    return 2 * n * elsize, 5 * n * elsize                # fwd: x -> y; bwd: x, dy -> dx


def _make_call(op: str, shape, dtype, device, backend: str, backward: bool):
    x = torch.randn(shape, device=device, dtype=dtype, requires_grad=backward)
    bias = torch.randn(shape[1], device=device, requires_grad=backward)
    fn = {"pixel_norm": lambda: ops.pixel_norm(x, backend=backend),
          "bias_lrelu_pixel_norm": lambda: ops.bias_lrelu_pixel_norm(x, bias, backend=backend),
          "minibatch_stddev": lambda: ops.minibatch_stddev(x, backend=backend)}[op]
    if not backward:
        def call():
            with torch.no_grad():
                return fn()
        return call
    y0 = fn()
    dy = torch.randn_like(y0)
    inputs = (x, bias) if op == "bias_lrelu_pixel_norm" else (x,)
    return lambda: torch.autograd.grad(fn(), inputs, dy)


def run(device: str | None = None, dtypes=("float32", "bfloat16"), backends=None, quick: bool = False) -> dict:
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    info = device_info(dev)
    shapes = CPU_SHAPES if (dev.type != "cuda" or quick) else GPU_SHAPES
    rows = []
    for op, op_shapes in shapes.items():
        names = backends or ops.available_backends(op, dev)
        for dtype_name in dtypes:
            dtype = getattr(torch, dtype_name)
            elsize = torch.empty(0, dtype=dtype).element_size()
            for shape in op_shapes:
                fwd_bytes, fb_bytes = _traffic(op, shape, elsize)
                base = {}
                for backend in ["torch"] + [b for b in names if b != "torch"]:
                    row = {"op": op, "shape": list(shape), "dtype": dtype_name, "backend": backend}
                    for phase, nbytes, backward in (("fwd", fwd_bytes, False), ("fwd+bwd", fb_bytes, True)):
                        try:
                            ms = time_fn(_make_call(op, shape, dtype, dev, backend, backward), dev)
                        except (RuntimeError, ValueError) as exc:  # e.g. out of memory at this shape
                            row[f"{phase}_error"] = str(exc).splitlines()[0]
                            continue
                        gbps = nbytes / ms / 1e6
                        row[f"{phase}_ms"] = ms
                        row[f"{phase}_gbps"] = gbps
                        row[f"{phase}_hbm_frac"] = gbps / info.hbm_gbps if info.hbm_gbps else None
                        if backend == "torch":
                            base[phase] = ms
                        row[f"{phase}_speedup"] = base.get(phase, float("nan")) / ms
                    rows.append(row)
                    if dev.type == "cuda":
                        torch.cuda.empty_cache()
    return {"benchmark": "ops", "device": info.as_dict(), "environment": environment(), "rows": rows,
            "notes": "bytes = minimum traffic (fwd: read x + write y; bwd adds read x, dy + write dx); "
                     "speedup = eager torch time / this backend's time, same run"}


COLUMNS = [("op", "op"), ("shape", "shape"), ("dtype", "dtype"), ("backend", "backend"),
           ("fwd_ms", "fwd ms"), ("fwd_gbps", "fwd GB/s"), ("fwd_hbm_frac", "fwd HBM frac"),
           ("fwd_speedup", "fwd ×eager"), ("fwd+bwd_ms", "fwd+bwd ms"), ("fwd+bwd_gbps", "fwd+bwd GB/s"),
           ("fwd+bwd_speedup", "fwd+bwd ×eager")]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--backends", default=None, help="comma list; default: every available backend")
    p.add_argument("--quick", action="store_true", help="small shapes only")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = p.parse_args(argv)
    result = run(args.device, tuple(args.dtypes.split(",")),
                 args.backends.split(",") if args.backends else None, args.quick)
    print(f"device: {result['device']['name']}")
    print(format_table(result["rows"], COLUMNS))
    print(f"wrote {write_results('ops', result, args.out)}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
