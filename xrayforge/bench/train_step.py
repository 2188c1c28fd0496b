"""Benchmark of one full WGAN-GP PGGAN step: G forward, D on real and fake, gradient penalty
(double backward), drift, both Adam steps, EMA. The fast path (fused ops, fused resampling,
channels_last) and the baseline (the same networks, every op on the torch backend, plain
resampling) run in the same process at the same resolution, dtype and batch size.

Reports images/s, peak GPU memory, FLOPs per image (counted by torch's FlopCounterMode on the
actual step, so the figure is measured rather than assumed), TFLOP/s and MFU against the
device's dense bf16 peak.
"""
from __future__ import annotations

import argparse
import copy
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from .. import ops
from ..nn import Discriminator, Generator, NetworkConfig
from ..train import PGGANStep, StepConfig, make_adam
from . import device_info, environment, format_table, time_fn, write_results


def build(resolution: int, device, fast: bool, dtype_name: str, net_resolution: int = 1024, fmap_max: int = 512):
    """Networks of the ``net_resolution`` schedule, set to train at ``resolution``."""
    cfg = NetworkConfig(resolution=net_resolution, fmap_max=fmap_max,
                        fused_resample_min_res=128 if fast else 1 << 30)
    torch.manual_seed(0)
    G, D = Generator(cfg).to(device), Discriminator(cfg).to(device)
    if fast and device.type == "cuda":
        G, D = G.to(memory_format=torch.channels_last), D.to(memory_format=torch.channels_last)
    level = (resolution.bit_length() - 1) - 2
    G_ema = copy.deepcopy(G)
    step = PGGANStep(G, D, G_ema, make_adam(G.parameters()), make_adam(D.parameters()),
                     StepConfig(amp_dtype=torch.bfloat16 if dtype_name == "bfloat16" else None))
    return step, level, cfg


def _real(n, resolution, device, fast):
    x = torch.randn(n, 1, resolution, resolution, device=device)
    return x.contiguous(memory_format=torch.channels_last) if fast and device.type == "cuda" else x


class _FlopCounter(TorchDispatchMode):
    """Sums torch's per-op FLOP formulas over every aten op run (convolutions, their
    backward, matmuls). torch's FlopCounterMode also tracks modules, which breaks inside
    autograd.grad(create_graph=True); this counts the same formulas without that."""

    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.total += formula(*args, **kwargs, out_val=out)
        return out


def step_flops(step, level, resolution, device, fast) -> float:
    """FLOPs of one step per image, counted on a batch of 4."""
    counter = _FlopCounter()
    with counter:
        step(_real(4, resolution, device, fast), level, 1.0)
    return counter.total / 4


def largest_batch(step, level, resolution, device, fast, start=4, limit=1024) -> int:
    best, n = 0, start
    while n <= limit:
        try:
            step(_real(n, resolution, device, fast), level, 1.0)
            torch.cuda.synchronize(device)
            best, n = n, n * 2
        except torch.cuda.OutOfMemoryError:
            break
        finally:
            torch.cuda.empty_cache()
    return best


def run(resolutions=(64, 256, 512, 1024), dtypes=("float32", "bfloat16"), device=None, batch=None,
        net_resolution=1024, fmap_max=512) -> dict:
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    info = device_info(dev)
    rows = []
    for res in resolutions:
        for dtype_name in dtypes:
            per_mode = {}
            for mode in ("baseline", "fast"):
                fast = mode == "fast"
                ops.set_backend("auto" if fast else "torch")
                try:
                    step, level, _ = build(res, dev, fast, dtype_name, net_resolution, fmap_max)
                    if batch:
                        n = batch
                    elif dev.type == "cuda":
                        n = per_mode.get("baseline_batch") or largest_batch(step, level, res, dev, fast)
                    else:
                        n = 4
                    per_mode.setdefault("baseline_batch", n)  # same batch for both modes
                    flops = step_flops(step, level, res, dev, fast)
                    real = _real(n, res, dev, fast)
                    if dev.type == "cuda":
                        torch.cuda.reset_peak_memory_stats(dev)
                    ms = time_fn(lambda: step(real, level, 1.0), dev, warmup=2, reps=5,
                                 min_seconds=1.0 if dev.type == "cuda" else 0.0)
                    peak = torch.cuda.max_memory_allocated(dev) / 2 ** 30 if dev.type == "cuda" else None
                    img_s = n / (ms / 1e3)
                    tflops = flops * img_s / 1e12
                    row = {"resolution": res, "dtype": dtype_name, "mode": mode, "batch": n, "ms": ms,
                           "img_s": img_s, "peak_gib": peak, "gib_per_img": peak / n if peak else None,
                           "tflop_per_img": flops / 1e12, "tflops": tflops,
                           "mfu": tflops / info.bf16_tflops if info.bf16_tflops else None}
                except (RuntimeError, ValueError) as exc:
                    row = {"resolution": res, "dtype": dtype_name, "mode": mode, "error": str(exc).splitlines()[0]}
                finally:
                    ops.set_backend(None)
                    if dev.type == "cuda":
                        torch.cuda.empty_cache()
                per_mode[mode] = row
                rows.append(row)
            if "img_s" in per_mode["baseline"] and "img_s" in per_mode["fast"]:
                per_mode["fast"]["speedup"] = per_mode["fast"]["img_s"] / per_mode["baseline"]["img_s"]
    return {"benchmark": "train_step", "device": info.as_dict(), "environment": environment(),
            "network_resolution": net_resolution, "fmap_max": fmap_max, "rows": rows,
            "notes": "baseline = same networks, every op on the torch backend, plain resampling; "
                     "MFU against the dense bf16 peak; FLOPs counted by FlopCounterMode on the step"}


COLUMNS = [("resolution", "px"), ("dtype", "dtype"), ("mode", "mode"), ("batch", "batch"), ("img_s", "img/s"),
           ("speedup", "×baseline"), ("peak_gib", "peak GiB"), ("gib_per_img", "GiB/img"),
           ("tflop_per_img", "TFLOP/img"), ("tflops", "TFLOP/s"), ("mfu", "MFU"), ("error", "error")]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--resolutions", default=None, help="comma list (default 64,256,512,1024 on GPU; 16,32 on CPU)")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--batch", type=int, default=None, help="fixed batch (default: the largest that fits)")
    p.add_argument("--device", default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    on_gpu = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    res = tuple(int(r) for r in (args.resolutions or ("64,256,512,1024" if on_gpu else "16,32")).split(","))
    # on a CPU only a pipeline check: a small network (64 px, at most 64 channels)
    result = run(res, tuple(args.dtypes.split(",")), args.device, args.batch,
                 net_resolution=1024 if on_gpu else 64, fmap_max=512 if on_gpu else 64)
    print(f"device: {result['device']['name']}")
    print(format_table(result["rows"], COLUMNS))
    print(f"wrote {write_results('train_step', result, args.out)}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
