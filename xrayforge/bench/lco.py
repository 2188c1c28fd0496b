"""LCO against rejection sampling on the same generator and classifier, and sampling speed.

For each target: LCO's hit rate, accepted images per second, mean steps, and how far it moves
z (log N(z; 0, I) before and after, and the cosine between start and end latents); rejection
sampling's hit rate and accepted images per second, given the same wall time; the ratio of
accepted images per second. Then plain sampling images/s into PNG files (encoding in threads).
`python benchmarks/lco.py RUN CLASSIFIER --targets "Cardiomegaly=1" "Cardiomegaly=1,Effusion=1"`
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time

import torch

from ..nn import load_networks
from ..nn.classifier import load_classifier
from ..sample.lco import format_target, optimise, parse_target, target_tensors
from ..nn.latents import latents_for
from ..sample.writer import SampleConfig, find_generator, rejection_sample, sample_archive
from . import device_info, environment, format_table, write_results


def _fid_vs_real(extractor, archive, target: dict, images: torch.Tensor) -> float | None:
    """FID of generated images against the real archive images that carry ``target``."""
    import numpy as np

    from ..fid.stats import FrechetStats, frechet_distance
    cols = [archive.findings.index(f) for f in target]
    want = np.array([target[f] for f in target])
    pos = np.nonzero((archive.labels[:, cols] == want).all(axis=1))[0]
    if len(pos) < 2 or len(images) < 2:
        return None

    def stats(feats):
        return FrechetStats.from_features(feats.double().cpu().numpy())

    real = torch.cat([extractor.features(torch.from_numpy(archive.images(pos[i:i + 64], archive.resolution)))
                      for i in range(0, len(pos), 64)])
    fake_u8 = ((images[:, 0] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    fake = torch.cat([extractor.features(fake_u8[i:i + 64]) for i in range(0, len(fake_u8), 64)])
    return frechet_distance(stats(real), stats(fake), extractor.device)


def lco_speed(G, classifier, batch: int, steps: int, amp_dtype=None, seed: int = 0) -> dict:
    """LCO optimisation throughput: ``steps`` full steps (G forward, classifier forward, backward
    through both, Adam on z) on ``batch`` latents. The target asks for p >= 2 on every finding,
    which no sample can reach, so every latent stays active and each step costs the most it can."""
    dev = next(G.parameters()).device
    n_find = len(classifier.findings)
    z0 = latents_for(seed, range(batch), G.config.latent_dim).to(dev)
    ones = torch.ones(batch, n_find)
    optimise(G, classifier, z0[:2], ones[:2], ones[:2], 2 * ones[:2], 1, amp_dtype=amp_dtype)  # warm-up
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    t0 = time.perf_counter()
    res = optimise(G, classifier, z0, ones, ones, 2 * ones, steps, amp_dtype=amp_dtype)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    seconds = time.perf_counter() - t0
    if int(res.steps.min()) != steps:
        raise RuntimeError("an unreachable LCO target was reached: the timing is not of full steps")
    return {"batch": batch, "steps": steps, "seconds": seconds, "steps_s": steps / seconds,
            "latent_steps_s": batch * steps / seconds}


def run(run_dir: str, classifier: str, targets: list[str], n: int = 64, steps: int = 100, lr: float = 0.05,
        device: str | None = None, amp: str | None = None, sample_n: int = 256, real: str | None = None,
        inception: str | None = None) -> dict:
    """``real``: a labelled archive; then the FID of LCO's and rejection's accepted images against
    the real images with each combination is reported (random Inception weights unless given)."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    amp_dtype = torch.bfloat16 if amp == "bf16" else None
    G = load_networks(find_generator(run_dir), names=["G_ema"], map_location=dev)["G_ema"].eval().requires_grad_(False)
    C = load_classifier(classifier).to(dev).requires_grad_(False)
    extractor = archive = None
    if real:
        from ..data.archive import Archive
        from ..fid.compute import FeatureExtractor
        archive = Archive(real)
        extractor = FeatureExtractor(inception, inception is None, device=str(dev), progress=False)
    rows = []
    warm = latents_for(0, range(2), G.config.latent_dim).to(dev)  # first calls pay one-off set-up costs
    v0, m0, t0_ = target_tensors(parse_target(targets[0], C.findings), C.findings, C.threshold)
    optimise(G, C, warm, v0.expand(2, -1), m0.expand(2, -1), t0_.expand(2, -1), 1, lr, amp_dtype=amp_dtype)
    for text in targets:
        target = parse_target(text, C.findings)
        values, mask, thr = target_tensors(target, C.findings, C.threshold)
        z0 = latents_for(1234, range(n), G.config.latent_dim).to(dev)
        t0 = time.perf_counter()
        res = optimise(G, C, z0, values.expand(n, -1), mask.expand(n, -1), thr.expand(n, -1), steps, lr,
                       amp_dtype=amp_dtype)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        lco_s = time.perf_counter() - t0
        acc = int(res.accepted.sum())
        # rejection sampling with the same wall time: count how many it generates in lco_s
        probe = rejection_sample(G, C, target, seed=99, n=min(256, max(32, n)), device=dev, amp=amp_dtype)
        budget = max(1, int(probe["generated"] / probe["seconds"] * lco_s))
        rej = rejection_sample(G, C, target, seed=7, n=budget, device=dev, amp=amp_dtype, keep_images=bool(real))
        lco_rate = acc / lco_s
        rows.append({"target": format_target(target), "lco_hit_rate": acc / n, "lco_accepted_s": lco_rate,
                     "lco_mean_steps": float(res.steps[res.accepted].float().mean()) if acc else None,
                     "log_prior_before": float(res.log_prior_start.mean()),
                     "log_prior_after": float(res.log_prior_end.mean()),
                     "cosine_start_end": float(res.cosine_moved.mean()),
                     "rejection_generated": rej["generated"], "rejection_hit_rate": rej["hit_rate"],
                     "rejection_accepted_s": rej["accepted_per_second"],
                     "lco_speedup": lco_rate / rej["accepted_per_second"] if rej["accepted"] else None})
        if archive is not None:
            rows[-1]["lco_fid_vs_real"] = _fid_vs_real(extractor, archive, target, res.images[res.accepted].cpu())
            rows[-1]["rejection_fid_vs_real"] = _fid_vs_real(extractor, archive, target, rej["images"])
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        sample_archive(SampleConfig(run_dir, tmp, n=sample_n, batch=64, amp=amp, device=str(dev)), progress=False)
        sampling = sample_n / (time.perf_counter() - t0)
    return {"benchmark": "lco", "device": device_info(dev).as_dict(), "environment": environment(),
            "generator_resolution": G.current_resolution, "lco_batch": n, "steps": steps, "rows": rows,
            "sampling_png_images_per_second": sampling,
            "fid_weights": None if not real else (inception or "random (pipeline check)"),
            "notes": "rejection sampling is given LCO's wall time; lco_speedup = accepted/s ratio (None when "
                     "rejection found nothing in that time); *_fid_vs_real: FID of the accepted images against "
                     "the real images with that combination (None where fewer than 2 exist)"}


COLUMNS = [("target", "target"), ("lco_hit_rate", "LCO hit rate"), ("lco_accepted_s", "LCO acc/s"),
           ("lco_mean_steps", "steps"), ("log_prior_before", "log p(z) before"), ("log_prior_after", "after"),
           ("cosine_start_end", "cos(z0, z)"), ("rejection_hit_rate", "rejection hit rate"),
           ("rejection_accepted_s", "rejection acc/s"), ("lco_speedup", "LCO ×"),
           ("lco_fid_vs_real", "LCO FID"), ("rejection_fid_vs_real", "rejection FID")]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run")
    p.add_argument("classifier")
    p.add_argument("--targets", nargs="+", required=True)
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--amp", choices=("bf16",), default=None)
    p.add_argument("--sample-n", type=int, default=256)
    p.add_argument("--real", default=None, help="labelled archive: FID of accepted images vs real ones per target")
    p.add_argument("--inception", default=None, help="FID Inception weights (default: random, a pipeline check)")
    p.add_argument("--device", default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    result = run(args.run, args.classifier, args.targets, args.n, args.steps, args.lr, args.device, args.amp,
                 args.sample_n, args.real, args.inception)
    print(format_table(result["rows"], COLUMNS))
    print(f"sampling to PNG: {result['sampling_png_images_per_second']:.1f} images/s "
          f"at {result['generator_resolution']} px")
    print(f"wrote {write_results('lco', result, args.out)}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
