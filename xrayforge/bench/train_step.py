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
import contextlib
import copy
import gc
import sys

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from .. import ops
from ..ops import _backend
from ..ops._backend import auto_candidates
from ..nn import Discriminator, Generator, NetworkConfig
from ..nn.layers import set_conv_gradfix
from ..train import PGGANStep, StepConfig, make_adam
from . import PhaseTimer, device_info, environment, error_summary, format_table, results_dir, time_fn, write_results


# How each mode runs the same networks. backend: the ops' backend ("auto" with candidates: the
# fused backends auto tries, validated or not: the extension's kernel where it has one, else
# Triton's); fused: fused up/down-sampling convolutions at >= 128 px and channels_last tensors;
# gradfix: convolutions through ops.conv2d, whose double backward stays on cuDNN's fast kernels
# (False: PyTorch's own convolution autograd). "fast" is what `auto` gives a user today.
MODES = {
    "baseline": dict(backend="torch", candidates=None, fused=False, gradfix=False),
    "fast": dict(backend="auto", candidates=None, fused=True, gradfix=True),
    "torch-fused": dict(backend="torch", candidates=None, fused=True, gradfix=False),
    "torch-gradfix": dict(backend="torch", candidates=None, fused=True, gradfix=True),
    "triton": dict(backend="triton", candidates=None, fused=True, gradfix=True),
    "cuda": dict(backend="auto", candidates=("cuda", "triton"), fused=True, gradfix=True),
}
# the step's precision by the rows' dtype name: float32, or bfloat16 autocast (float16 would need a
# gradient scaler, which the step has not)
AMP_DTYPES = {"float32": None, "bfloat16": torch.bfloat16}


def build(resolution: int, device, fast: bool, dtype_name: str, net_resolution: int = 1024, fmap_max: int = 512,
          gradfix: bool | None = None):
    """Networks of the ``net_resolution`` schedule, set to train at ``resolution``
    (``gradfix``: see MODES; default: as ``fast``)."""
    if dtype_name not in AMP_DTYPES:  # a row labelled float16 must not time float32
        raise ValueError(f"dtype {dtype_name!r}: choose from {', '.join(AMP_DTYPES)}")
    cfg = NetworkConfig(resolution=net_resolution, fmap_max=fmap_max,
                        fused_resample_min_res=128 if fast else 1 << 30)
    torch.manual_seed(0)
    G, D = Generator(cfg).to(device), Discriminator(cfg).to(device)
    gradfix = fast if gradfix is None else gradfix  # True / False on every device, to compare
    set_conv_gradfix(G, gradfix), set_conv_gradfix(D, gradfix)
    if fast and device.type == "cuda":
        G, D = G.to(memory_format=torch.channels_last), D.to(memory_format=torch.channels_last)
    level = (resolution.bit_length() - 1) - 2
    G_ema = copy.deepcopy(G)
    step = PGGANStep(G, D, G_ema, make_adam(G.parameters()), make_adam(D.parameters()),
                     StepConfig(amp_dtype=AMP_DTYPES[dtype_name]))
    return step, level, cfg


@contextlib.contextmanager
def mode_backend(mode: str):
    """The ops' backend for ``mode`` (see MODES), restored afterwards."""
    spec = MODES[mode]
    ops.set_backend(spec["backend"])
    try:
        with (auto_candidates(spec["candidates"]) if spec["candidates"] else contextlib.nullcontext()):
            yield
    finally:
        ops.set_backend(None)


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


@contextlib.contextmanager
def _count_fused_convs(counter: _FlopCounter):
    """While ``counter`` counts, add the forward FLOPs of each ops.conv2d_eqlr call that runs the
    Triton kernel (the per-layer table's layers): a kernel launch is no aten op, so the dispatch
    mode misses it. Its taps per output pixel: k² (none), 16 (down: the 4×4 stride-2 form), 4
    (up: 2×2 per parity class) — what the strided cuDNN form of the same layer is counted at.
    Its backward runs aten convolutions, which are counted."""
    original = ops.conv2d_eqlr

    def counted(x, weight, bias=None, *, scale, activation="linear", resample=None, backend=None):
        y = original(x, weight, bias, scale=scale, activation=activation, resample=resample, backend=backend)
        if _backend.resolve("conv2d_eqlr", x, backend) == "triton":
            taps = {None: weight.shape[2] ** 2, "down": 16, "up": 4}[resample]
            counter.total += 2 * y.numel() * weight.shape[1] * taps
        return y
    ops.conv2d_eqlr = counted  # EqualizedConv2d calls it as ops.conv2d_eqlr
    try:
        yield
    finally:
        ops.conv2d_eqlr = original


def step_flops(step, level, resolution, device, fast) -> float:
    """FLOPs of one step per image, counted on a batch of 4."""
    counter = _FlopCounter()
    with counter, _count_fused_convs(counter):
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


def _measure(mode, res, n, dtype_name, dev, net_resolution, fmap_max, reps, warmup, phase_steps, flops_cache):
    fast = MODES[mode]["fused"]
    with mode_backend(mode):
        step, level, _ = build(res, dev, fast, dtype_name, net_resolution, fmap_max, MODES[mode]["gradfix"])
        if (res, mode) not in flops_cache:
            flops_cache[(res, mode)] = step_flops(step, level, res, dev, fast)
        flops = flops_cache[(res, mode)]
        real = _real(n, res, dev, fast)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        ms = time_fn(lambda: step(real, level, 1.0), dev, warmup=warmup, reps=reps,
                     min_seconds=1.0 if dev.type == "cuda" else 0.0)
        peak = torch.cuda.max_memory_allocated(dev) / 2 ** 30 if dev.type == "cuda" else None
        phases = None
        if phase_steps:
            timer = step.phase_timer = PhaseTimer(dev)
            for _ in range(phase_steps):
                step(real, level, 1.0)
            phases = {k: v / phase_steps for k, v in timer.totals().items()}
    img_s = n / (ms / 1e3)
    return {"ms": ms, "img_s": img_s, "peak_gib": peak, "gib_per_img": peak / n if peak else None,
            "tflop_per_img": flops / 1e12, "tflops": flops * img_s / 1e12, "phases_ms": phases}


def profile_step(resolution: int, batch: int, mode: str = "triton", device=None, dtype_name: str = "bfloat16",
                 net_resolution: int = 1024, fmap_max: int = 512, row_limit: int = 25) -> str:
    """torch.profiler tables of one step (after two warm-up steps): the operators and kernels
    that take the most device time, then the same grouped by input shape (which layer)."""
    from torch.profiler import ProfilerActivity, profile
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    fused = MODES[mode]["fused"]
    with mode_backend(mode):
        step, level, _ = build(resolution, dev, fused, dtype_name, net_resolution, fmap_max, MODES[mode]["gradfix"])
        real = _real(batch, resolution, dev, fused)
        for _ in range(2):
            step(real, level, 1.0)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        with profile(activities=activities, record_shapes=True) as prof:
            step(real, level, 1.0)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
    key = "self_device_time_total" if dev.type == "cuda" else "self_cpu_time_total"
    head = f"# one step: {resolution} px, batch {batch}, {dtype_name}, mode {mode}, on {device_info(dev).name}\n"
    return (head + prof.key_averages().table(sort_by=key, row_limit=row_limit) + "\n\n# by input shape\n"
            + prof.key_averages(group_by_input_shape=True).table(sort_by=key, row_limit=row_limit))


def run(resolutions=(64, 256, 512, 1024), dtypes=("float32", "bfloat16"), device=None, batch=None,
        net_resolution=1024, fmap_max=512, modes=("baseline", "fast"), batches=None, phases: bool = False,
        reps: int = 5, warmup: int = 2, on_row=None) -> dict:
    """One row per resolution × dtype × batch × mode. ``batches``: fixed batch sizes to run
    (default: ``batch``, else the largest batch that fits the baseline, found by doubling);
    ``phases``: add the time of each phase of the step (CUDA events over two more steps);
    ``on_row(row)``: called as each row is finished (partial results survive a kill)."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    info = device_info(dev)
    rows, flops_cache = [], {}
    for res in resolutions:
        for dtype_name in dtypes:
            for fixed in (batches or (batch,)):
                per_mode = {}
                for mode in modes:
                    row = {"resolution": res, "dtype": dtype_name, "mode": mode}
                    try:
                        if fixed:
                            n = fixed
                        elif dev.type != "cuda":
                            n = 4
                        elif "batch" in per_mode:
                            n = per_mode["batch"]  # the same batch for every mode
                        else:
                            with mode_backend(mode):
                                step, level, _ = build(res, dev, MODES[mode]["fused"], dtype_name,
                                                       net_resolution, fmap_max, MODES[mode]["gradfix"])
                                n = largest_batch(step, level, res, dev, MODES[mode]["fused"])
                            del step
                        per_mode["batch"] = row["batch"] = n
                        row.update(_measure(mode, res, n, dtype_name, dev, net_resolution, fmap_max, reps, warmup,
                                            2 if phases else 0, flops_cache))
                        row["mfu"] = row["tflops"] / info.bf16_tflops if info.bf16_tflops else None
                    except Exception as exc:  # noqa: BLE001 - a failed row (OOM, a kernel error) must not end the run
                        row["error"] = error_summary(exc)
                    finally:
                        gc.collect()
                        if dev.type == "cuda":
                            torch.cuda.empty_cache()
                    if "img_s" in row and "img_s" in per_mode.get("baseline", {}):
                        row["speedup"] = row["img_s"] / per_mode["baseline"]["img_s"]
                    per_mode[mode] = row
                    rows.append(row)
                    if on_row is not None:
                        on_row(row)
    return {"benchmark": "train_step", "device": info.as_dict(), "environment": environment(),
            "network_resolution": net_resolution, "fmap_max": fmap_max, "rows": rows,
            "settings": {"resolutions": list(resolutions), "dtypes": list(dtypes), "batch": batch,
                         "batches": list(batches) if batches else None, "modes": list(modes), "phases": phases,
                         "reps": reps, "warmup": warmup, "cudnn_benchmark": torch.backends.cudnn.benchmark},
            "notes": "baseline = same networks, every op on the torch backend, plain resampling, PyTorch's "
                     "convolution autograd; torch-fused adds fused resampling and channels_last; torch-gradfix "
                     "adds ops.conv2d (double backward on cuDNN's weight-gradient kernels); fast = that with "
                     "the auto backend (GPU-validated kernels); triton / cuda = that with those kernels (cuda "
                     "first, Triton where the extension has none); MFU against the dense bf16 peak; FLOPs "
                     "counted by FlopCounterMode on the step of each mode (fused resampling does fewer FLOPs; "
                     "ops.conv2d_eqlr's Triton forward, no aten op, added at its taps)",
            "modes": MODES}


def trainer_loop(resolution: int = 64, batch: int = 16, ticks: int = 3, tick_images: int = 1024, device=None,
                 amp: str | None = None, latent_dim: int = 128, fmap_base: int = 2048, fmap_max: int = 128,
                 archive_images: int = 512, steps: int = 30, warmup: int = 3, max_seconds: float | None = None) -> dict:
    """The trainer's whole loop (prefetching loader, real-image preparation, step, EMA, progress)
    against its bare step on the same networks, at one resolution in a stable phase, on a phantom
    archive. Defaults: the demo's GPU network and precision (``xrayforge demo --device cuda``:
    fp32) at 64 px, where a step is short and whatever the loop adds shows. ``loop_img_s``: the
    ticks after the first (which compiles kernels), as the trainer logs them (each tick's time
    excludes the previous tick's grid and checkpoint); ``step_img_s``: ``trainer.step`` alone on
    the trainer's own networks, optimisers and generator, ``steps`` of them back to back as the
    loop runs them. ``max_seconds`` bounds the training part (the trainer stops on it)."""
    import json
    import tempfile
    import time
    from pathlib import Path

    from ..data.archive import Archive
    from ..data.prepare import prepare
    from ..train.trainer import TrainConfig, Trainer
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    with tempfile.TemporaryDirectory(prefix="xrayforge-loop-") as tmp:
        arch = Path(tmp) / "phantom"
        prepare(f"phantom:{archive_images}", arch, resolution=resolution, progress=False, workers=1)
        cfg = TrainConfig(str(arch), str(Path(tmp) / "run"), start_resolution=resolution, fade_images=0,
                          stable_images=ticks * tick_images, tick_images=tick_images, batch={resolution: batch},
                          latent_dim=latent_dim, fmap_base=fmap_base, fmap_max=fmap_max, amp=amp, device=str(dev),
                          realism_images=0, checkpoint_ticks=10 ** 6, grid_size=4, max_seconds=max_seconds)
        trainer = Trainer(cfg, progress=False)
        trainer.train()
        log = [json.loads(line) for line in (Path(tmp) / "run" / "log.jsonl").read_text().splitlines()]
        loop = [r["img_per_s"] for r in log[1:]] or [log[-1]["img_per_s"]]
        rows = np.sort(np.random.default_rng(0).choice(archive_images, batch, replace=False))
        real_u = torch.from_numpy(Archive(arch).images(rows, resolution)).to(dev)
        real = trainer._real(real_u, 1.0)  # as the loop prepares its batches

        def step():
            return trainer.step(real, trainer.level, 1.0, trainer.gen, ema_beta=0.999)

        for _ in range(warmup):
            step()
        sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            out = step()
        float(out["d_loss"])  # the last step's result, as a tick reads it
        sync()
        ms = (time.perf_counter() - t0) / steps * 1e3
    step_img_s = batch / (ms / 1e3)
    loop_img_s = float(np.median(loop))
    return {"resolution": resolution, "batch": batch, "amp": amp or "fp32",
            "network": f"latent {latent_dim}, fmap_base {fmap_base}, fmap_max {fmap_max}",
            "loop_img_s": loop_img_s, "loop_img_s_ticks": loop, "loop_images": log[-1]["images"],
            "step_img_s": step_img_s, "step_ms": ms, "loop_share_of_step": loop_img_s / step_img_s,
            "loop_overhead_ms_per_step": batch / loop_img_s * 1e3 - ms}


COLUMNS = [("resolution", "px"), ("dtype", "dtype"), ("mode", "mode"), ("batch", "batch"), ("img_s", "img/s"),
           ("speedup", "×baseline"), ("peak_gib", "peak GiB"), ("gib_per_img", "GiB/img"),
           ("tflop_per_img", "TFLOP/img"), ("tflops", "TFLOP/s"), ("mfu", "MFU"), ("error", "error")]


def parser() -> argparse.ArgumentParser:
    from ..cli._args import device as device_arg  # a GPU asked for where none is: a usage error
    from ..cli._args import positive_int
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--resolutions", default=None, help="comma list of powers of two, at most the network's "
                   "(default 64,256,512,1024 on GPU; 16,32 on CPU, with a 64-px network)")
    p.add_argument("--dtypes", default="float32,bfloat16", help=f"comma list from {', '.join(AMP_DTYPES)}")
    p.add_argument("--batch", type=positive_int, default=None, help="fixed batch (default: the largest that fits)")
    p.add_argument("--batches", default=None, help="comma list of fixed batches, each run (overrides --batch)")
    p.add_argument("--modes", default="baseline,fast", help=f"comma list from {', '.join(MODES)}")
    p.add_argument("--phases", action="store_true", help="also time each phase of the step (CUDA events)")
    p.add_argument("--profile", action="store_true",
                   help="print torch.profiler tables of one step of the first resolution, batch and mode instead")
    p.add_argument("--cudnn-benchmark", action="store_true", help="let cuDNN time its algorithms (off by default, "
                   "as in the trainer)")
    p.add_argument("--device", type=device_arg, default=None, help="cuda, cuda:N or cpu (default: cuda when available)")
    p.add_argument("--out", type=results_dir, default=None, help="results folder (default benchmarks/results)")
    return p


def main(argv=None) -> int:
    from ..cli._args import positive_int, power_of_two
    p = parser()
    args = p.parse_args(argv)
    on_gpu = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    net_resolution = 1024 if on_gpu else 64
    try:
        res = tuple(power_of_two(r.strip()) for r in (args.resolutions or ("64,256,512,1024" if on_gpu else "16,32"))
                    .split(","))
    except argparse.ArgumentTypeError as exc:  # else a ValueError, or a level the network has not
        p.error(f"argument --resolutions: {exc}")
    if max(res) > net_resolution:
        p.error(f"argument --resolutions: {max(res)} is above the network's {net_resolution} px on this device")
    # on a CPU only a pipeline check: a small network (64 px, at most 64 channels)
    modes = tuple(args.modes.split(","))
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        p.error(f"unknown mode(s) {', '.join(unknown)}; choose from {', '.join(MODES)}")
    bad = [d for d in args.dtypes.split(",") if d not in AMP_DTYPES]
    if bad:
        p.error(f"unknown dtype(s) {', '.join(bad)}; choose from {', '.join(AMP_DTYPES)}")
    try:
        batches = tuple(positive_int(b) for b in args.batches.split(",")) if args.batches else None
    except argparse.ArgumentTypeError as exc:  # 0 would silently mean "the largest that fits"
        p.error(f"argument --batches: {exc}")
    if args.profile:
        batch = batches[0] if batches else (args.batch or 4)
        print(profile_step(res[0], batch, modes[0], args.device, args.dtypes.split(",")[0],
                           net_resolution=net_resolution, fmap_max=512 if on_gpu else 64))
        return 0
    result = run(res, tuple(args.dtypes.split(",")), args.device, args.batch,
                 net_resolution=net_resolution, fmap_max=512 if on_gpu else 64, modes=modes,
                 batches=batches,
                 phases=args.phases)
    print(f"device: {result['device']['name']}")
    print(format_table(result["rows"], COLUMNS))
    print(f"wrote {write_results('train_step', result, args.out)}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
