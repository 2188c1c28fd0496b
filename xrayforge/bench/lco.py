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
from ..sample.sampler import latents_for
from ..sample.writer import SampleConfig, find_generator, rejection_sample, sample_archive
from . import device_info, environment, format_table, write_results


def run(run_dir: str, classifier: str, targets: list[str], n: int = 64, steps: int = 100, lr: float = 0.05,
        device: str | None = None, amp: str | None = None, sample_n: int = 256) -> dict:
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    amp_dtype = torch.bfloat16 if amp == "bf16" else None
    G = load_networks(find_generator(run_dir), names=["G_ema"], map_location=dev)["G_ema"].eval().requires_grad_(False)
    C = load_classifier(classifier).to(dev).requires_grad_(False)
    rows = []
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
        rej = rejection_sample(G, C, target, seed=7, n=budget, device=dev, amp=amp_dtype)
        lco_rate = acc / lco_s
        rows.append({"target": format_target(target), "lco_hit_rate": acc / n, "lco_accepted_s": lco_rate,
                     "lco_mean_steps": float(res.steps[res.accepted].float().mean()) if acc else None,
                     "log_prior_before": float(res.log_prior_start.mean()),
                     "log_prior_after": float(res.log_prior_end.mean()),
                     "cosine_start_end": float(res.cosine_moved.mean()),
                     "rejection_generated": rej["generated"], "rejection_hit_rate": rej["hit_rate"],
                     "rejection_accepted_s": rej["accepted_per_second"],
                     "lco_speedup": lco_rate / rej["accepted_per_second"] if rej["accepted"] else None})
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        sample_archive(SampleConfig(run_dir, tmp, n=sample_n, batch=64, amp=amp, device=str(dev)), progress=False)
        sampling = sample_n / (time.perf_counter() - t0)
    return {"benchmark": "lco", "device": device_info(dev).as_dict(), "environment": environment(),
            "generator_resolution": G.current_resolution, "lco_batch": n, "steps": steps, "rows": rows,
            "sampling_png_images_per_second": sampling,
            "notes": "rejection sampling is given LCO's wall time; lco_speedup = accepted/s ratio (None when "
                     "rejection found nothing in that time)"}


COLUMNS = [("target", "target"), ("lco_hit_rate", "LCO hit rate"), ("lco_accepted_s", "LCO acc/s"),
           ("lco_mean_steps", "steps"), ("log_prior_before", "log p(z) before"), ("log_prior_after", "after"),
           ("cosine_start_end", "cos(z0, z)"), ("rejection_hit_rate", "rejection hit rate"),
           ("rejection_accepted_s", "rejection acc/s"), ("lco_speedup", "LCO ×")]


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
    p.add_argument("--device", default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    result = run(args.run, args.classifier, args.targets, args.n, args.steps, args.lr, args.device, args.amp,
                 args.sample_n)
    print(format_table(result["rows"], COLUMNS))
    print(f"sampling to PNG: {result['sampling_png_images_per_second']:.1f} images/s "
          f"at {result['generator_resolution']} px")
    print(f"wrote {write_results('lco', result, args.out)}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
