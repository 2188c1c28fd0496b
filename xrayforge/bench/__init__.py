"""Benchmark plumbing shared by every suite: timing, device limits, JSON results.

Suites (``xrayforge.bench.ops``, ...) time the fast path and the eager baseline in the same
process on the same inputs and report the ratio and the fraction of the hardware limit.
``benchmarks/<name>.py`` are thin scripts over them; ``xrayforge bench`` runs them all.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..utils.files import json_safe, write_text_atomic

# Published peak figures: HBM bandwidth (GB/s) and dense bf16 / fp32 (non-tensor) TFLOP/s.
# Matched by substring of torch.cuda.get_device_name(); the first match wins.
DEVICE_LIMITS = [
    ("H200", 4800.0, 989.0, 67.0),
    ("H100 PCIe", 2000.0, 756.0, 51.0),
    ("H100", 3350.0, 989.0, 67.0),
    ("A100-SXM4-80GB", 2039.0, 312.0, 19.5),
    ("A100", 1555.0, 312.0, 19.5),
    ("L40S", 864.0, 362.0, 91.6),
    ("RTX 4090", 1008.0, 165.0, 82.6),
]


@dataclass
class DeviceInfo:
    name: str
    hbm_gbps: float | None
    bf16_tflops: float | None
    fp32_tflops: float | None

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def device_info(device: torch.device) -> DeviceInfo:
    if device.type != "cuda":
        return DeviceInfo(platform.processor() or platform.machine() or "cpu", None, None, None)
    name = torch.cuda.get_device_name(device)
    for key, bw, bf16, fp32 in DEVICE_LIMITS:
        if key in name:
            return DeviceInfo(name, bw, bf16, fp32)
    return DeviceInfo(name, None, None, None)


def commit() -> dict:
    """The commit the benchmarked code is at (``XRAYFORGE_COMMIT`` where the tree is no git checkout) and
    whether the checkout had uncommitted changes (None: unknown)."""
    if os.environ.get("XRAYFORGE_COMMIT"):
        return {"commit": os.environ["XRAYFORGE_COMMIT"], "dirty": None}
    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, cwd=root)
        if head.returncode:
            return {"commit": None, "dirty": None}
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                text=True, timeout=10, cwd=root)
        return {"commit": head.stdout.strip() or None,
                "dirty": bool(status.stdout.strip()) if not status.returncode else None}
    except (OSError, subprocess.TimeoutExpired):
        return {"commit": None, "dirty": None}


def environment() -> dict:
    env = {"torch": torch.__version__, "python": platform.python_version(),
           "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), **commit()}
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if torch.cuda.is_available():
        env["cuda"] = torch.version.cuda
    return env


def time_fn(fn: Callable[[], object], device: torch.device, warmup: int = 3, reps: int = 20,
            min_seconds: float = 0.2) -> float:
    """Median wall time of ``fn()`` in milliseconds (CUDA events on a GPU)."""
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start_all = time.perf_counter()
        while len(times) < reps or (time.perf_counter() - start_all < min_seconds and len(times) < 10 * reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        start_all = time.perf_counter()
        while len(times) < reps or (time.perf_counter() - start_all < min_seconds and len(times) < 10 * reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


class PhaseTimer:
    """Time named parts of a piece of work: ``with timer.phase("G forward"): ...``.

    On a GPU each phase is bracketed by CUDA events (no host synchronisation inside the
    work); :meth:`totals` synchronises once and returns milliseconds per phase, summed over
    every time the phase ran since :meth:`reset`. On a CPU it uses the wall clock.
    """

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.reset()

    def reset(self) -> None:
        self._marks: list[tuple[str, object, object]] = []

    @contextlib.contextmanager
    def phase(self, name: str):
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            try:
                yield
            finally:
                end.record()
        else:
            start = time.perf_counter()
            try:
                yield
            finally:
                end = time.perf_counter()
        self._marks.append((name, start, end))

    def totals(self) -> dict[str, float]:
        out: dict[str, float] = {}
        if self.device.type == "cuda" and self._marks:
            torch.cuda.synchronize(self.device)
        for name, start, end in self._marks:
            ms = start.elapsed_time(end) if self.device.type == "cuda" else (end - start) * 1e3
            out[name] = out.get(name, 0.0) + ms
        return out


def error_summary(exc: BaseException) -> str:
    """A failed benchmark row's error: the exception's type and the first line of its message."""
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def json_text(payload) -> str:
    """``payload`` as strict JSON: a NaN or infinite float (a speed-up without its baseline, a ratio over
    zero) is written as null, not as the bare ``NaN`` / ``Infinity`` that JSON parsers other than Python's
    refuse; anything else JSON has no type for is written as its str()."""
    return json.dumps(json_safe(payload), indent=2, default=str, allow_nan=False)


def results_dir(value: str) -> str:
    """argparse type of the suites' ``--out``: a folder that can be made, checked when parsed (a file
    given there failed only when the results were written, after the whole benchmark)."""
    import argparse
    from ..errors import UserError
    from ..utils.files import check_out_dir
    try:
        check_out_dir(value)
    except UserError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value


def write_results(name: str, payload: dict, out_dir: str | os.PathLike | None = None) -> Path:
    """Write ``benchmarks/results/<name>-<device>-<date>.json`` (or into ``out_dir``); a second run
    on the same day and device gets ``-2``, ``-3``, ... rather than replacing the earlier results."""
    out = Path(out_dir) if out_dir else Path.cwd() / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    dev = payload.get("device", {}).get("name", "cpu")
    slug = "".join(ch if ch.isalnum() else "-" for ch in dev).strip("-").lower() or "cpu"
    stem = f"{name}-{slug}-{_dt.date.today().isoformat()}"
    path, n = out / f"{stem}.json", 1
    while path.exists():
        n += 1
        path = out / f"{stem}-{n}.json"
    write_text_atomic(path, json_text(payload))
    return path


def format_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """A Markdown table of ``rows`` with (key, header) columns; floats to 3 significant digits."""
    def cell(v):
        if isinstance(v, float):
            return f"{v:.3g}"
        return "" if v is None else str(v)
    lines = ["| " + " | ".join(h for _, h in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(k)) for k, _ in columns) + " |" for r in rows]
    return "\n".join(lines)
