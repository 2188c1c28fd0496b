"""FID benchmark: the pytorch-fid-equivalent pipeline (eager fp32 Inception, numpy float64
covariance, scipy sqrtm) against ours (fused preprocessing, exact and fast modes, float64
streaming moments, eigh Fréchet), in the same run on the same data. Reports Inception images/s,
end-to-end images/s over a memory-mapped archive and over a folder of 8-bit PNGs, the time to
accumulate the moments of N × 2048 features, the Fréchet time, and the fast mode's FID
deviation from the exact mode. Random Inception weights unless --inception is given (timings
do not depend on the weights; the fast-mode deviation does, so give real weights for it)."""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ..data.prepare import prepare
from ..fid.compute import FeatureExtractor
from ..fid.preprocess import reference as reference_preprocess
from ..fid.stats import FrechetStats, StreamingMoments, frechet_distance
from . import device_info, environment, format_table, time_fn, write_results


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def run(n_images: int, size: int, batch: int, moment_n: int, inception: str | None, device: str | None,
        workers: int) -> dict:
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    random_weights = inception is None
    rows, extra = [], {}
    exact = FeatureExtractor(inception, random_weights, "exact", str(dev), batch, workers, progress=False)
    fast = FeatureExtractor(inception, random_weights, "fast", str(dev), batch, workers, progress=False)
    u8 = torch.randint(0, 256, (batch, size, size), dtype=torch.uint8).to(dev)

    def baseline():  # pytorch-fid: float RGB in [0, 1], F.interpolate, 2x - 1, fp32 network
        with torch.no_grad():
            x = reference_preprocess(u8, channels=3)
            return exact.model(x)

    for name, fn in (("pytorch-fid equivalent (fp32, 3 channels)", baseline),
                     ("ours exact (fused preprocessing, gray folded)", lambda: exact.features(u8)),
                     ("ours fast (bf16, channels_last)", lambda: fast.features(u8))):
        ms = time_fn(fn, dev, warmup=2, reps=5)
        rows.append({"stage": "inception", "variant": name, "batch": batch, "img_s": batch / (ms / 1e3)})

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        prepare(f"phantom:{n_images}", tmp / "arch", resolution=size, workers=workers or None, progress=False)
        folder = tmp / "png"
        folder.mkdir()
        from ..data.archive import Archive
        from PIL import Image
        arc = Archive(tmp / "arch")
        for i in range(len(arc)):
            Image.fromarray(arc.images([i], size)[0]).save(folder / f"{i:06d}.png")
        results = {}
        for src in ("arch", "png"):
            for mode, ex in (("exact", exact), ("fast", fast)):
                _sync(dev)
                t0 = time.perf_counter()
                results[(src, mode)] = ex.compute(str(tmp / src)).stats
                _sync(dev)
                dt = time.perf_counter() - t0
                rows.append({"stage": "end to end", "variant": f"{'archive (memmap)' if src == 'arch' else 'PNG folder'}"
                             f", {mode}", "batch": batch, "img_s": n_images / dt})
        # fast-mode deviation: FID between two halves of the archive, fast vs exact
        half = n_images // 2
        feats = {}
        for mode, ex in (("exact", exact), ("fast", fast)):
            f = torch.cat([ex.features(torch.from_numpy(arc.images(list(range(i, min(i + batch, n_images))), size)))
                           for i in range(0, n_images, batch)]).double().cpu().numpy()
            feats[mode] = f
        fids = {m: frechet_distance(FrechetStats(f[:half].mean(0), np.cov(f[:half], rowvar=False)),
                                    FrechetStats(f[half:].mean(0), np.cov(f[half:], rowvar=False)), dev)
                for m, f in feats.items()}
        extra["fast_mode_fid"] = fids["fast"]
        extra["exact_mode_fid"] = fids["exact"]
        extra["fast_mode_relative_deviation"] = abs(fids["fast"] - fids["exact"]) / max(abs(fids["exact"]), 1e-12)

    feats = torch.randn(moment_n, 2048, device=dev) + 3.0
    chunk = 1000

    def ours_moments():
        m = StreamingMoments(2048, dev)
        for i in range(0, moment_n, chunk):
            m.update(feats[i:i + chunk])
        return m

    ms = time_fn(ours_moments, dev, warmup=1, reps=3)
    rows.append({"stage": f"moments {moment_n}×2048", "variant": "ours (float64, streaming, on device)", "ms": ms})
    host = feats.cpu().double().numpy()
    t0 = time.perf_counter()
    np.cov(host, rowvar=False)
    rows.append({"stage": f"moments {moment_n}×2048", "variant": "numpy float64 cov",
                 "ms": (time.perf_counter() - t0) * 1e3})
    a = ours_moments().stats()
    b = FrechetStats(a.mu + 0.1, a.sigma * 1.1 + np.eye(2048) * 0.01, a.n)
    ms = time_fn(lambda: frechet_distance(a, b, dev), dev, warmup=1, reps=3)
    rows.append({"stage": "Fréchet distance 2048", "variant": "ours (float64 eigh)", "ms": ms})
    import scipy.linalg
    t0 = time.perf_counter()
    covmean, _ = scipy.linalg.sqrtm(a.sigma @ b.sigma, disp=False)
    rows.append({"stage": "Fréchet distance 2048", "variant": "scipy sqrtm", "ms": (time.perf_counter() - t0) * 1e3})
    ref = ((a.mu - b.mu) ** 2).sum() + np.trace(a.sigma) + np.trace(b.sigma) - 2 * np.trace(covmean.real)
    extra["frechet_relative_difference_vs_scipy"] = abs(frechet_distance(a, b, dev) - ref) / abs(ref)
    return {"benchmark": "fid", "device": device_info(dev).as_dict(), "environment": environment(),
            "images": n_images, "size": size, "weights": "random" if random_weights else str(inception),
            "rows": rows, **extra}


COLUMNS = [("stage", "stage"), ("variant", "variant"), ("batch", "batch"), ("img_s", "img/s"), ("ms", "ms")]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    on_gpu = torch.cuda.is_available()
    p.add_argument("--n", type=int, default=2048 if on_gpu else 32, help="images for the end-to-end runs")
    p.add_argument("--size", type=int, default=1024 if on_gpu else 64)
    p.add_argument("--batch", type=int, default=256 if on_gpu else 8)
    p.add_argument("--moment-n", type=int, default=50000 if on_gpu else 5000)
    p.add_argument("--inception", default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--workers", type=int, default=8 if on_gpu else 0)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    result = run(args.n, args.size, args.batch, args.moment_n, args.inception, args.device, args.workers)
    print(f"device: {result['device']['name']}")
    print(format_table(result["rows"], COLUMNS))
    print(f"fast-mode FID deviation from exact: {result['fast_mode_relative_deviation']:.3%}; "
          f"Fréchet vs scipy: {result['frechet_relative_difference_vs_scipy']:.2e} relative")
    print(f"wrote {write_results('fid', result, args.out)}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
