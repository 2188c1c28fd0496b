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
from ..ops import _backend
from ..fid.compute import FeatureExtractor
from ..fid.features import conv_tf32_allowed, ieee_fp32
from ..fid.preprocess import SIZE, preprocess
from ..fid.preprocess import reference as reference_preprocess
from ..fid.stats import FrechetStats, StreamingMoments, frechet_distance
from . import device_info, environment, error_summary, format_table, results_dir, time_fn, write_results


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def inception_rows(exact: FeatureExtractor, fast: FeatureExtractor, u8: torch.Tensor, warmup: int = 2,
                   reps: int = 5) -> list[dict]:
    """Inception images/s from stored uint8 gray images already on the device: pytorch-fid's
    pipeline (float RGB, F.interpolate, fp32 network) and ours in exact and fast mode."""
    dev, batch = exact.device, u8.shape[0]
    pre = _backend.resolve_for_device("fid_preprocess", dev)

    def baseline():  # pytorch-fid: float RGB in [0, 1], F.interpolate, 2x - 1, fp32 network
        with torch.no_grad():
            return exact.model(reference_preprocess(u8, channels=3))

    def baseline_ieee():  # the same in IEEE float32: the arithmetic of ours exact
        with ieee_fp32():
            return baseline()

    # PyTorch's default lets cuDNN run float32 convolutions as TF32 on a GPU: pytorch-fid as a user
    # runs it, but not the float32 its label said nor the arithmetic of ours exact (IEEE float32)
    tf32 = dev.type == "cuda" and conv_tf32_allowed()
    default_name = "pytorch-fid equivalent (" + ("fp32 with cuDNN TF32 convolutions, PyTorch's default"
                                                 if tf32 else "fp32") + ", 3 channels)"
    ieee_name = "pytorch-fid equivalent (IEEE fp32, 3 channels)"
    variants = [(default_name, baseline, None)]
    if tf32:
        variants.append((ieee_name, baseline_ieee, None))
    # each of ours against the baseline of its own arithmetic: exact against IEEE fp32, fast (bf16)
    # against pytorch-fid as PyTorch runs it by default
    variants += [(f"ours exact (fp32, gray folded; preprocessing: {pre})", lambda: exact.features(u8),
                  ieee_name if tf32 else default_name),
                 (f"ours fast (bf16, channels_last; preprocessing: {pre})", lambda: fast.features(u8), default_name)]
    rows, times = [], {}
    for name, fn, against in variants:
        try:
            ms = time_fn(fn, dev, warmup=warmup, reps=reps, min_seconds=0.0)
            times[name] = ms
            row = {"stage": "inception", "variant": name, "batch": batch, "img_s": batch / (ms / 1e3), "ms": ms}
            if against is not None and against in times:
                row.update(speedup=times[against] / ms, baseline=against)
            rows.append(row)
        except Exception as exc:  # noqa: BLE001 - recorded; the run goes on
            rows.append({"stage": "inception", "variant": name, "batch": batch, "error": error_summary(exc)})
    return rows


def preprocess_bytes(n: int, channels: int, h: int, w: int, elsize: int, size: int = SIZE,
                     out_channels: int = 1, out_elsize: int = 4, sector: int = 32) -> int:
    """Minimum bytes of preprocessing ``n`` × ``channels`` × h × w stored pixels to size × size:
    bilinear resampling (align_corners=False, pytorch-fid's) reads only the source rows and
    columns its taps land on — when shrinking 1024 -> 299, 598 of the 1024 rows — so the pixels
    read are those rows, at the granularity of the device's memory transactions (``sector``
    bytes) along them; plus the float output written once."""
    def taps(src: int) -> np.ndarray:  # the source indices a side's taps read (the kernel's formula)
        scale = np.float32(src) / np.float32(size)
        s = np.maximum((np.arange(size, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5),
                       np.float32(0.0))
        i0 = s.astype(np.int64)
        return np.unique(np.concatenate([i0, np.minimum(i0 + 1, src - 1)]))
    rows = len(taps(h))
    row_bytes = min(len(np.unique(taps(w) * elsize // sector)) * sector, w * elsize)
    return n * channels * rows * row_bytes + n * out_channels * size * size * out_elsize


def preprocess_rows(u8: torch.Tensor, backends=("torch", "triton"), warmup: int = 2, reps: int = 10) -> list[dict]:
    """The fused preprocessing kernel against its torch form, on the same stored images:
    time, GB/s (read the stored pixels the bilinear taps land on, write the 299 × 299 float32
    input: preprocess_bytes) and max difference."""
    dev = u8.device
    n = u8.shape[0]
    nbytes = preprocess_bytes(n, 1, u8.shape[-2], u8.shape[-1], u8.element_size())
    ref = reference_preprocess(u8, channels=1)
    rows, base = [], None
    for backend in backends:
        row = {"stage": "preprocess", "variant": backend, "batch": n}
        try:
            ms = time_fn(lambda: preprocess(u8, channels=1, backend=backend), dev, warmup=warmup, reps=reps,
                         min_seconds=0.0)
            out = preprocess(u8, channels=1, backend=backend)
            base = ms if backend == "torch" else base
            row.update(ms=ms, img_s=n / (ms / 1e3), gbps=nbytes / ms / 1e6,
                       max_abs_diff=(out.double() - ref.double()).abs().max().item(),
                       speedup=(base / ms) if base else None)
        except Exception as exc:  # noqa: BLE001
            row["error"] = error_summary(exc)
        rows.append(row)
    return rows


def moments_rows(moment_n: int, dev: torch.device, dim: int = 2048, chunk: int = 1000, numpy_baseline: bool = True):
    """Streaming float64 moments of ``moment_n`` × ``dim`` features on the device, against
    numpy's float64 covariance of the same features. Returns (rows, the moments)."""
    feats = torch.randn(moment_n, dim, device=dev) + 3.0

    def ours():
        m = StreamingMoments(dim, dev)
        for i in range(0, moment_n, chunk):
            m.update(feats[i:i + chunk])
        return m

    ms = time_fn(ours, dev, warmup=1, reps=3)
    rows = [{"stage": f"moments {moment_n}×{dim}", "variant": "ours (float64, streaming, on device)", "ms": ms}]
    m = ours()
    if numpy_baseline:
        host = feats.cpu().double().numpy()
        t0 = time.perf_counter()
        cov = np.cov(host, rowvar=False)
        rows.append({"stage": f"moments {moment_n}×{dim}", "variant": "numpy float64 cov",
                     "ms": (time.perf_counter() - t0) * 1e3})
        rows[0].update(speedup=rows[1]["ms"] / ms, baseline=rows[1]["variant"])
        ours_cov = m.stats().sigma
        rows[0]["max_rel_diff_vs_numpy"] = float(np.abs(ours_cov - cov).max() / np.abs(cov).max())
    return rows, m


# ChestX-ray14's finding prevalences (NIH release): the subsets of FID per finding
CXR14_PREVALENCE = (0.177, 0.119, 0.103, 0.056, 0.052, 0.047, 0.042, 0.030, 0.025, 0.022, 0.021, 0.015, 0.013, 0.002)


# the float64 loop, then the Triton kernels at each tl.dot precision
MOMENT_VARIANTS = (("torch", None), ("triton", "ieee"), ("triton", "tf32x3"))


def masked_moments_rows(n: int, dim: int, dev: torch.device, variants=MOMENT_VARIANTS,
                        warmup: int = 1, reps: int = 3, exact_below: int | None = None) -> list[dict]:
    """``ops.masked_moments`` on n × dim fp32 features with K = 1 (every row: the streaming FID)
    and K = 15 (every row plus ChestX-ray14's 14 findings at their prevalences: FID per finding),
    per variant: the torch loop of float64 matmuls (one per subset, what FID did before) and the
    Triton kernels at each tl.dot precision (the public path: subsets under ``exact_below`` rows,
    default ops.moments.EXACT_BELOW, in float64; 0 times the kernels alone). Reports ms, TFLOP/s
    of the Grams (2 · Σn · dim²), the K = 15 / K = 1 time ratio, and the largest m2 / mean
    deviation from the float64 loop."""
    from ..ops import moments as M
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(n, dim, device=dev, generator=g) + 3.0
    rates = torch.tensor((1.0,) + CXR14_PREVALENCE, device=dev)
    masks15 = torch.rand(len(rates), n, device=dev, generator=g) < rates[:, None]
    rows, k1_ms = [], {}
    for masks, k in ((None, 1), (masks15, 15)):
        rows_total = n if masks is None else int(masks.sum())
        ref = M.reference(x, masks)
        loop_ms = None
        for backend, precision in variants:
            name = "torch float64 loop" if backend == "torch" else f"triton {precision}"
            row = {"stage": f"masked moments {n}×{dim}, K={k}", "variant": name, "rows": rows_total}
            try:
                fn = (lambda: M.reference(x, masks)) if backend == "torch" else \
                    (lambda: M._triton(x, masks, precision=precision, exact_below=exact_below))
                ms = time_fn(fn, dev, warmup=warmup, reps=reps, min_seconds=0.0)
                row.update(ms=ms, tflops=2.0 * rows_total * dim * dim / ms / 1e9)
                if backend == "torch":
                    loop_ms = ms
                elif loop_ms is not None:  # against the float64 loop of the same K, this run
                    row.update(speedup=loop_ms / ms, baseline="torch float64 loop")
                if k == 1:
                    k1_ms[name] = ms
                elif name in k1_ms:
                    row["k15_over_k1"] = ms / k1_ms[name]
                if backend != "torch":
                    got = fn()
                    row["max_rel_err_m2"] = float(max(((got[2][j] - ref[2][j]).abs().max()
                                                       / ref[2][j].abs().max().clamp_min(1e-300)).item()
                                                      for j in range(k) if ref[0][j] > 1))
                    row["max_rel_err_mean"] = float(((got[1] - ref[1]).abs().max() / ref[1].abs().max()).item())
                    del got
            except Exception as exc:  # noqa: BLE001 - a row says why it failed
                row["error"] = error_summary(exc)
            rows.append(row)
        del ref
    return rows


def frechet_rows(a: FrechetStats, dev: torch.device, scipy_baseline: bool = True) -> tuple[list[dict], dict]:
    """Our float64 eigh Fréchet distance against scipy's sqrtm (pytorch-fid's) on the same pair."""
    d = a.mu.shape[0]
    b = FrechetStats(a.mu + 0.1, a.sigma * 1.1 + np.eye(d) * 0.01, a.n)
    ms = time_fn(lambda: frechet_distance(a, b, dev), dev, warmup=1, reps=3)
    rows = [{"stage": f"Fréchet distance {d}", "variant": "ours (float64 eigh)", "ms": ms}]
    extra = {}
    if scipy_baseline:
        import scipy.linalg
        t0 = time.perf_counter()
        covmean = scipy.linalg.sqrtm(a.sigma @ b.sigma)  # newer scipy has no disp=
        rows.append({"stage": f"Fréchet distance {d}", "variant": "scipy sqrtm",
                     "ms": (time.perf_counter() - t0) * 1e3})
        rows[0].update(speedup=rows[1]["ms"] / ms, baseline=rows[1]["variant"])
        ref = ((a.mu - b.mu) ** 2).sum() + np.trace(a.sigma) + np.trace(b.sigma) - 2 * np.trace(covmean.real)
        extra["frechet_relative_difference_vs_scipy"] = abs(frechet_distance(a, b, dev) - ref) / abs(ref)
    return rows, extra


def _features(ex: FeatureExtractor, images: torch.Tensor, batch: int) -> np.ndarray:
    """Features of stored images, ``batch`` at a time, as a float64 array."""
    return torch.cat([ex.features(images[i:i + batch]) for i in range(0, len(images), batch)]).double().cpu().numpy()


def fast_mode_accuracy(exact: FeatureExtractor, fast: FeatureExtractor, images: torch.Tensor,
                       batch: int) -> dict:
    """How far fast mode is from exact mode on the same images: the FID between the fast and
    the exact features, the median and largest relative error of a feature vector, and (for
    scale) the FID between two halves of the images in exact mode."""
    e, f = _features(exact, images, batch), _features(fast, images, batch)
    rel = np.linalg.norm(f - e, axis=1) / np.maximum(np.linalg.norm(e, axis=1), 1e-12)
    half = len(e) // 2
    stats = FrechetStats.from_features
    return {"images": len(e), "fid_fast_vs_exact": frechet_distance(stats(e), stats(f), exact.device),
            "fid_exact_half_vs_half": frechet_distance(stats(e[:half]), stats(e[half:]), exact.device),
            "feature_relative_error_median": float(np.median(rel)), "feature_relative_error_max": float(rel.max())}


def run(n_images: int, size: int, batch: int, moment_n: int, inception: str | None, device: str | None,
        workers: int) -> dict:
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    random_weights = inception is None
    extra = {}
    exact = FeatureExtractor(inception, random_weights, "exact", str(dev), batch, workers, progress=False)
    fast = FeatureExtractor(inception, random_weights, "fast", str(dev), batch, workers, progress=False)
    u8 = torch.randint(0, 256, (batch, size, size), dtype=torch.uint8).to(dev)
    rows = inception_rows(exact, fast, u8)

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
        for src in ("arch", "png"):
            for mode, ex in (("exact", exact), ("fast", fast)):
                _sync(dev)
                t0 = time.perf_counter()
                ex.compute(str(tmp / src))
                _sync(dev)
                dt = time.perf_counter() - t0
                rows.append({"stage": "end to end", "variant": f"{'archive (memmap)' if src == 'arch' else 'PNG folder'}"
                             f", {mode}", "batch": batch, "img_s": n_images / dt})
        # fast-mode deviation: FID between two halves of the archive, fast vs exact
        images = torch.from_numpy(arc.images(list(range(n_images)), size))
        half = n_images // 2
        fids = {}
        for mode, ex in (("exact", exact), ("fast", fast)):
            f = _features(ex, images, batch)
            fids[mode] = frechet_distance(FrechetStats.from_features(f[:half]), FrechetStats.from_features(f[half:]),
                                          dev)
        extra["fast_mode_fid"] = fids["fast"]
        extra["exact_mode_fid"] = fids["exact"]
        extra["fast_mode_relative_deviation"] = abs(fids["fast"] - fids["exact"]) / max(abs(fids["exact"]), 1e-12)

    m_rows, moments = moments_rows(moment_n, dev)
    f_rows, f_extra = frechet_rows(moments.stats(), dev)
    rows += m_rows + f_rows
    triton_here = dev.type == "cuda" or _backend.triton_interpreter_active()
    rows += masked_moments_rows(moment_n, 2048, dev, variants=MOMENT_VARIANTS if triton_here else MOMENT_VARIANTS[:1])
    extra.update(f_extra)
    return {"benchmark": "fid", "device": device_info(dev).as_dict(), "environment": environment(),
            "images": n_images, "size": size, "weights": "random" if random_weights else str(inception),
            "settings": {"n_images": n_images, "size": size, "batch": batch, "moment_n": moment_n,
                         "workers": workers},
            "rows": rows, **extra}


COLUMNS = [("stage", "stage"), ("variant", "variant"), ("batch", "batch"), ("img_s", "img/s"), ("ms", "ms"),
           ("speedup", "×baseline"), ("baseline", "baseline"), ("error", "error")]


def knn_rows(n: int, dim: int, dev: torch.device, k: int = 3,
             variants=(("torch", None), ("triton", "ieee"), ("triton", "tf32x3")), check: int = 2000,
             prdc_backend: str | None = "triton") -> list[dict]:
    """The k-nearest-neighbour radii of n × dim features (k-th neighbour, itself excluded: what
    precision / recall use) with each backend's search of ``ops.knn`` (the Triton kernel at each
    tl.dot precision; without the op's exact recompute, which is the same for both), one timed call each, TFLOP/s of the distance products, and the agreement with
    the torch reference on the first ``check`` rows; then a whole precision / recall / density /
    coverage of n real against n generated features."""
    from ..fid.prdc import prdc
    from ..ops.knn import EXTRA_CANDIDATES, MAX_K
    from ..ops.knn import _triton as knn_triton
    from ..ops.knn import reference as knn_reference
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(n, dim, device=dev, generator=g)
    flops = 2.0 * n * n * dim
    # the candidates ops.knn's search selects (as ops.knn works it out): the kernel's merge passes
    # grow with them, so a search for k alone times less than the op does
    wide = min(k + EXTRA_CANDIDATES, MAX_K, n - 1)
    rows, ref = [], None
    for backend, precision in variants:
        row = {"stage": f"kNN radii {n}×{n}×{dim}, k={k}",
               "variant": f"ops.knn backend {backend}" + (f" ({precision})" if precision else "")}

        def radii(a, backend=backend, precision=precision):
            # the searches alone, alike (ops.knn adds the same exact recompute of the candidates to
            # both); the k nearest of the candidates
            if backend == "triton":
                d, i = knn_triton(a, a, wide, True, precision=precision)
            else:
                d, i = knn_reference(a, a, wide, exclude_self=True)
            return d[:, :k], i[:, :k]
        try:
            radii(x[:256])  # compile outside the timing
            _sync(dev)
            t0 = time.perf_counter()
            d, i = radii(x)
            _sync(dev)
            s = time.perf_counter() - t0
            row.update(ms=s * 1e3, tflops=flops / s / 1e12)
            if ref is None:
                ref = (d[:check].cpu(), i[:check].cpu())
            else:
                row["same_neighbours"] = float((i[:check].cpu() == ref[1]).all(1).double().mean())
                row["max_rel_diff"] = float(((d[:check].cpu() - ref[0]).abs() / ref[0].clamp_min(1e-12)).max())
        except Exception as exc:  # noqa: BLE001 - a row says why it failed
            row["error"] = error_summary(exc)
        rows.append(row)
    if prdc_backend:
        row = {"stage": f"precision/recall/density/coverage {n} vs {n}×{dim}", "variant": f"knn {prdc_backend}"}
        try:
            fake = torch.randn(n, dim, device=dev, generator=g) * 1.1 + 0.05
            prdc(x[:64], fake[:64], backend=prdc_backend)  # compile outside the timing
            _sync(dev)
            t0 = time.perf_counter()
            got = prdc(x, fake, backend=prdc_backend)
            _sync(dev)
            row.update(ms=(time.perf_counter() - t0) * 1e3, **{m: got[m] for m in ("precision", "recall",
                                                                                   "density", "coverage")})
        except Exception as exc:  # noqa: BLE001
            row["error"] = error_summary(exc)
        rows.append(row)
    return rows


def parser() -> argparse.ArgumentParser:
    from ..cli._args import device as device_arg  # a GPU asked for where none is: a usage error
    from ..cli._args import _checked, nonneg_int, positive_int
    # the fast-mode deviation is a FID between two halves of the images: each needs two for a covariance
    at_least_4 = _checked(int, lambda v: v >= 4, "must be at least 4 (two halves of at least 2 images)", "at_least_4")
    p = argparse.ArgumentParser(description=__doc__)
    on_gpu = torch.cuda.is_available()
    p.add_argument("--n", type=at_least_4, default=2048 if on_gpu else 32,
                   help="phantom images for the end-to-end runs and the fast-mode deviation (default 2048 on a GPU, "
                        "32 on a CPU)")
    p.add_argument("--size", type=positive_int, default=1024 if on_gpu else 64,
                   help="stored image side in px (default 1024 on a GPU, 64 on a CPU)")
    p.add_argument("--batch", type=positive_int, default=256 if on_gpu else 8,
                   help="images per Inception batch (default 256 on a GPU, 8 on a CPU)")
    p.add_argument("--moment-n", type=positive_int, default=50000 if on_gpu else 5000,
                   help="feature rows of the moment and Fréchet timings (default 50000 on a GPU, 5000 on a CPU)")
    p.add_argument("--inception", default=None,
                   help="FID Inception weights (default: random; timings do not depend on them, the fast-mode "
                        "deviation does)")
    p.add_argument("--device", type=device_arg, default=None, help="cuda, cuda:N or cpu (default: cuda when available)")
    p.add_argument("--workers", type=nonneg_int, default=8 if on_gpu else 0,
                   help="loader processes (default 8 on a GPU, 0 on a CPU: in the main process)")
    p.add_argument("--out", type=results_dir, default=None, help="results folder (default benchmarks/results)")
    return p


def main(argv=None) -> int:
    p = parser()
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

