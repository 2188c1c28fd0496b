"""Sampling throughput: images/s from a generator into 8-bit PNG files (encoding in threads,
so the accelerator is not starved), at the largest resolution that suits the device. The
weights are random: speed does not depend on them."""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from ..nn import Discriminator, Generator, NetworkConfig, save_networks
from ..sample.writer import SampleConfig, sample_archive
from . import device_info, environment


def run(resolution: int | None = None, n: int | None = None, batch: int | None = None, device: str | None = None,
        amp: str | None = None, fmap_max: int | None = None) -> dict:
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = dev.type == "cuda"
    resolution = resolution or (1024 if gpu else 64)
    n, batch = n or (512 if gpu else 32), batch or (32 if gpu else 8)
    amp = amp if amp is not None else ("bf16" if gpu else None)
    cfg = NetworkConfig(resolution=resolution, fmap_max=fmap_max or (512 if gpu else 64))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ck = save_networks(Path(tmp) / "ck", {"G_ema": Generator(cfg), "D": Discriminator(cfg)})
        # one batch untimed first: kernel compiles and library loads are paid once per process, and
        # the first timed row (1 thread) paid them alone
        sample_archive(SampleConfig(str(ck), str(Path(tmp) / "warm-up"), n=batch, batch=batch, amp=amp,
                                    device=str(dev)), progress=False)
        for threads in (1, 8):
            out = Path(tmp) / f"out{threads}"
            t0 = time.perf_counter()
            sample_archive(SampleConfig(str(ck), str(out), n=n, batch=batch, amp=amp, device=str(dev),
                                        encode_threads=threads, shard_size=max(n // 4, 1)), progress=False)
            rows.append({"resolution": resolution, "amp": amp or "fp32", "batch": batch, "encode_threads": threads,
                         "img_s": n / (time.perf_counter() - t0)})
    return {"benchmark": "sampling", "device": device_info(dev).as_dict(), "environment": environment(), "rows": rows}


COLUMNS = [("resolution", "px"), ("amp", "precision"), ("batch", "batch"), ("encode_threads", "PNG threads"),
           ("img_s", "img/s")]
