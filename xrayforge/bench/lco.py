"""LCO against rejection sampling on the same generator and classifier, and sampling speed.

LCO only means something on a generator that has learned the data: with ``--real`` the
generator's realism ratio (utils.neighbours) is measured first, and a generator above
``--max-realism`` (default 1.6) is refused. ``--demo DIR`` takes the run, classifier and
phantom archive of an `xrayforge demo` folder (whose CPU recipe reaches about 1.1).

Targets are given, or ``auto``: the classifier labels ``--census`` of the generator's own
samples, and the combinations (2–4 present findings) whose frequency there is nearest 1%, 0.1%
and 0.01% (``--rarities``) are taken, each seen at least ``--min-hits`` times (default 10): rare
for this generator, not just in the data.

For each target: its frequency in the census; LCO's hit rate, accepted images per second, mean
steps, and how far it moves z (the cosine between start and end latents: the generator
pixel-normalises z, so an image depends on z's direction alone and the cosine is what measures
the move; log N(z; 0, I) before and after is kept for comparison with older results); rejection
sampling's hit rate and accepted images per second given the same wall time, and its expected
rate (images/s × census frequency, which a rare combination needs: in LCO's few seconds rejection
finds none); the ratios; and with ``--real`` the realism ratio and
FID of the accepted images. Then plain sampling images/s into PNG files (encoding in threads).
`python benchmarks/lco.py --demo xrayforge-demo --targets auto`
`python benchmarks/lco.py RUN CLASSIFIER --real ARCHIVE --targets "Cardiomegaly=1,Effusion=1"`
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time

import torch

from ..nn import load_networks
from ..nn.classifier import load_classifier
from ..sample.lco import format_target, optimise, parse_target, screen_starts, target_tensors
from ..nn.latents import latents_for
from ..sample.writer import SampleConfig, find_generator, rejection_sample, sample_archive
from . import device_info, environment, format_table, results_dir, write_results


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


def _unit_pixels(images: torch.Tensor) -> torch.Tensor:
    """Generated images in [-1, 1] -> the pixel vectors of utils.neighbours (as saved: clamped)."""
    from ..utils.neighbours import pixel_vectors
    return pixel_vectors((images.float().clamp(-1, 1) + 1) / 2)


def _real_pixels(archive, n: int, seed: int = 0) -> torch.Tensor:
    from ..utils.neighbours import pixel_vectors
    rows = archive.random_positions(n, seed)
    return pixel_vectors(torch.from_numpy(archive.as_float(archive.images(rows, archive.resolution))))


def generator_realism(G, archive, n: int = 256, seed: int = 4321) -> dict:
    """Realism / diversity ratios of ``n`` samples of G against ``n`` real images of ``archive``."""
    from ..utils.neighbours import realism
    dev = next(G.parameters()).device
    with torch.no_grad():
        fake = torch.cat([G(latents_for(seed, range(i, min(i + 64, n)), G.config.latent_dim).to(dev)).cpu()
                          for i in range(0, n, 64)])
    return realism(_unit_pixels(fake), _real_pixels(archive, n))


def census(G, classifier, n: int, seed: int = 2024, batch: int = 256) -> tuple[torch.Tensor, float]:
    """(N, F) bool: which findings the classifier calls present in n samples of G; and images/s."""
    dev = next(G.parameters()).device
    thr = torch.tensor([float(classifier.threshold(f)) for f in classifier.findings], device=dev)
    out, t0 = [], time.perf_counter()
    with torch.no_grad():
        for i in range(0, n, batch):
            z = latents_for(seed, range(i, min(i + batch, n)), G.config.latent_dim).to(dev)
            out.append((torch.sigmoid(classifier(G(z)).float()) >= thr).cpu())
    return torch.cat(out), n / (time.perf_counter() - t0)


def auto_targets(present: torch.Tensor, findings, wanted=(1e-2, 1e-3, 1e-4), min_hits: int = 1,
                 sizes=(2, 3)) -> list[tuple[str, float]]:
    """Combinations of ``sizes`` present findings whose census frequency is nearest each wanted one
    (log scale; below 1%, and seen at least ``min_hits`` times, so that the frequency is measured:
    a combination seen 10 times has its frequency known to about ±30%)."""
    import itertools
    import math
    if min_hits < 1:
        raise ValueError(f"min_hits must be at least 1, got {min_hits}")
    freq = {}
    active = [i for i in range(present.shape[1]) if present[:, i].sum() >= min_hits]
    for k in sizes:
        for combo in itertools.combinations(active, k):
            hits = int(present[:, list(combo)].all(1).sum())
            if hits >= min_hits and hits <= 0.01 * len(present):
                freq[",".join(f"{findings[i]}=1" for i in combo)] = hits / len(present)
    chosen = []
    for w in wanted:
        best = min((t for t in freq if t not in [c for c, _ in chosen]),
                   key=lambda t: abs(math.log(freq[t] / w)), default=None)
        if best is not None:
            chosen.append((best, freq[best]))
    return chosen


def lco_speed(G, classifier, batch: int, steps: int, amp_dtype=None, seed: int = 0) -> dict:
    """LCO optimisation throughput: ``steps`` full steps (G forward, classifier forward, backward
    through both, Adam on z) on ``batch`` latents. The target asks for p >= 2 on every finding,
    which no sample can reach, so every latent stays active and each step costs the most it can."""
    dev = next(G.parameters()).device
    n_find = len(classifier.findings)
    z0 = latents_for(seed, range(batch), G.config.latent_dim).to(dev)
    ones = torch.ones(batch, n_find)
    # warm-up at the timed batch: kernels specialise (and compile) on their shapes
    optimise(G, classifier, z0, ones, ones, 2 * ones, 1, amp_dtype=amp_dtype)
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
        inception: str | None = None, census_n: int = 50000, max_realism: float | None = 1.6,
        fid: bool = True, starts: tuple[int, ...] = (1,), archive_n: int = 0,
        rarities: tuple[float, ...] = (1e-2, 1e-3, 1e-4), min_hits: int = 1) -> dict:
    """``real``: a labelled archive; then the generator's realism is checked against ``max_realism``
    and the realism and FID of LCO's and rejection's accepted images against the real images with
    each combination are reported (random Inception weights unless given). ``targets == ["auto"]``:
    chosen from a census of ``census_n`` samples, one per wanted frequency in ``rarities``, each
    seen at least ``min_hits`` times (see ``auto_targets``). ``starts``: one row per
    target and per number of screened starting draws (sample.lco.screen_starts; 1 = none).
    ``archive_n``: also time ``xrayforge sample`` writing that many LCO images of each target (PNG,
    the same steps, lr and batch: a pool that refills as latents finish) for each number of starts."""
    if any(s < 1 for s in starts):
        raise ValueError(f"--starts must be positive integers, got {list(starts)}")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    amp_dtype = torch.bfloat16 if amp == "bf16" else None
    G = load_networks(find_generator(run_dir), names=["G_ema"], map_location=dev)["G_ema"].eval().requires_grad_(False)
    C = load_classifier(classifier).to(dev).requires_grad_(False)
    extractor = archive = None
    if real:
        from ..data.archive import Archive
        from ..fid.compute import FeatureExtractor
        archive = Archive(real)
        if fid:
            extractor = FeatureExtractor(inception, inception is None, device=str(dev), progress=False)
    from ..utils.neighbours import realism
    gen_realism = generator_realism(G, archive) if archive is not None else None
    if gen_realism is not None and max_realism and gen_realism["realism"] > max_realism:
        raise ValueError(f"{run_dir}: the generator's realism ratio is {gen_realism['realism']:.2f} (> {max_realism}): "
                         "its samples do not look like the data yet, and LCO on such a generator measures nothing. "
                         "Train it longer (`xrayforge demo` reaches about 1.1 on the phantoms), or pass "
                         "--max-realism 0 to measure it anyway")
    present, census_rate = census(G, C, census_n) if census_n else (None, None)
    if targets == ["auto"]:
        if present is None:
            raise ValueError("--targets auto needs a census (--census N > 0)")
        targets = [t for t, _ in auto_targets(present, C.findings, rarities, min_hits, sizes=(2, 3, 4))]
        if not targets:
            raise ValueError(f"no combination of 2-4 findings is rarer than 1% yet seen {min_hits} or more times "
                             f"in {census_n} samples: a larger --census finds rarer ones")
    real_pix = _real_pixels(archive, 256) if archive is not None else None
    rows = []
    warm = latents_for(0, range(2), G.config.latent_dim).to(dev)  # first calls pay one-off set-up costs
    v0, m0, t0_ = target_tensors(parse_target(targets[0], C.findings), C.findings, C.threshold)
    optimise(G, C, warm, v0.expand(2, -1), m0.expand(2, -1), t0_.expand(2, -1), 1, lr, amp_dtype=amp_dtype)
    # rejection sampling's generation rate (G + classifier forward at its batch), measured over at least
    # a second: a few dozen images give rates that differ 2× from run to run on a busy CPU
    probe_n = 1024
    while True:
        probe = rejection_sample(G, C, parse_target(targets[0], C.findings), seed=99, n=probe_n, device=dev,
                                 amp=amp_dtype)
        if probe["seconds"] >= 1.0 or probe_n >= 1 << 20:
            break
        probe_n = int(probe_n * min(8.0, 1.2 / max(probe["seconds"], 1e-3)))
    gen_rate = probe["generated"] / probe["seconds"]
    for text in targets:
        target = parse_target(text, C.findings)
        values, mask, thr = target_tensors(target, C.findings, C.threshold)
        freq = None
        if present is not None:
            values_b, mask_b = values.bool(), mask.bool()
            freq = ((present == values_b) | ~mask_b).all(1).float().mean().item()
        expected = gen_rate * freq if freq is not None else None
        for s_count in starts:
            t0 = time.perf_counter()  # drawing the latents is timed, as rejection sampling's draws are
            candidates = latents_for(1234, range(n * s_count), G.config.latent_dim).to(dev).view(n, s_count, -1)
            chosen = screen_starts(G, C, candidates, values.expand(n, -1), mask.expand(n, -1),
                                   amp_dtype=amp_dtype, batch=n, thresholds=thr.expand(n, -1))
            z0 = candidates[torch.arange(n, device=dev), chosen]
            res = optimise(G, C, z0, values.expand(n, -1), mask.expand(n, -1), thr.expand(n, -1), steps, lr,
                           amp_dtype=amp_dtype)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            lco_s = time.perf_counter() - t0
            acc = int(res.accepted.sum())
            lco_rate = acc / lco_s
            # rejection sampling with the same wall time
            rej = rejection_sample(G, C, target, seed=7, n=max(1, int(gen_rate * lco_s)), device=dev, amp=amp_dtype,
                                   keep_images=bool(real))
            rows.append({"target": format_target(target), "starts": s_count, "census_frequency": freq,
                         "lco_hit_rate": acc / n, "lco_accepted_s": lco_rate,
                         "lco_mean_steps": float(res.steps[res.accepted].float().mean()) if acc else None,
                         "lco_forward_per_accepted": ((n * s_count if s_count > 1 else 0) + res.evaluations
                                                      + 2 * int(res.steps.sum())) / acc if acc else None,
                         "log_prior_before": float(res.log_prior_start.mean()),
                         "log_prior_after": float(res.log_prior_end.mean()),
                         "cosine_start_end": float(res.cosine_moved.mean()),
                         "rejection_generated": rej["generated"], "rejection_hit_rate": rej["hit_rate"],
                         "rejection_accepted_s": rej["accepted_per_second"],
                         "lco_speedup": lco_rate / rej["accepted_per_second"] if rej["accepted"] else None,
                         "rejection_expected_accepted_s": expected,
                         "lco_speedup_expected": lco_rate / expected if expected else None})
            if archive is not None:
                for who, imgs in (("lco", res.images[res.accepted].cpu()), ("rejection", rej["images"])):
                    rows[-1][f"{who}_realism"] = realism(_unit_pixels(imgs), real_pix)["realism"] \
                        if len(imgs) >= 2 else None
            if extractor is not None:
                rows[-1]["lco_fid_vs_real"] = _fid_vs_real(extractor, archive, target, res.images[res.accepted].cpu())
                rows[-1]["rejection_fid_vs_real"] = _fid_vs_real(extractor, archive, target, rej["images"])
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        sample_archive(SampleConfig(run_dir, tmp, n=sample_n, batch=64, amp=amp, device=str(dev)), progress=False)
        sampling = sample_n / (time.perf_counter() - t0)
    archive_rows = []
    expected_by_target = {r["target"]: r["rejection_expected_accepted_s"] for r in rows}
    for text in (targets if archive_n else ()):  # `xrayforge sample --lco` itself: a refilled pool
        key = format_target(parse_target(text, C.findings))
        for s_count in starts:
            with tempfile.TemporaryDirectory() as tmp:
                t0 = time.perf_counter()
                summary = sample_archive(SampleConfig(run_dir, tmp, n=archive_n, batch=n, amp=amp, device=str(dev),
                                                      classifier=classifier, targets=[text], steps=steps, lr=lr,
                                                      starts=s_count), progress=False)
                seconds = time.perf_counter() - t0
            t = summary["targets"][key]
            expected = expected_by_target.get(key)
            archive_rows.append({"target": key, "starts": s_count, "images": archive_n, "seconds": seconds,
                                 "images_per_second": archive_n / seconds, "acceptance_rate": t["acceptance_rate"],
                                 "mean_steps": t["mean_steps"],
                                 "speedup_expected": archive_n / seconds / expected if expected else None})
    return {"benchmark": "lco", "device": device_info(dev).as_dict(), "environment": environment(),
            "generator_resolution": G.current_resolution, "generator_realism": gen_realism,
            "census": {"samples": census_n, "images_per_second": census_rate}, "lco_batch": n, "steps": steps, "lr": lr,
            "generation_images_per_second": gen_rate,
            "rows": rows,
            "sampling_png_images_per_second": sampling, "lco_archive": archive_rows,
            "fid_weights": None if extractor is None else (inception or "random (pipeline check)"),
            "notes": "starts: LCO from the best of that many draws per sample (screen_starts; its forward passes "
                     "are in LCO's time); lco_forward_per_accepted: G + classifier forward passes per accepted "
                     "image, a backward counted as two (rejection needs 1 / frequency); "
                     "rejection sampling is given LCO's wall time; lco_speedup = accepted/s ratio (None when "
                     "rejection found nothing in that time); lco_speedup_expected: against rejection's generation "
                     "rate × the combination's census frequency (None when the census saw none); *_realism: "
                     "realism ratio of the accepted images against 256 real ones; *_fid_vs_real: FID of the "
                     "accepted images against the real images with that combination (None where fewer than 2 "
                     "exist)"}


COLUMNS = [("target", "target"), ("census_frequency", "frequency"), ("starts", "starts"),
           ("lco_hit_rate", "LCO hit rate"), ("lco_accepted_s", "LCO acc/s"),
           ("lco_forward_per_accepted", "forwards/accepted"),
           ("lco_mean_steps", "steps"), ("log_prior_before", "log p(z) before"), ("log_prior_after", "after"),
           ("cosine_start_end", "cos(z0, z)"), ("rejection_hit_rate", "rejection hit rate"),
           ("rejection_accepted_s", "rejection acc/s"), ("lco_speedup", "LCO ×"),
           ("rejection_expected_accepted_s", "rejection acc/s expected"), ("lco_speedup_expected", "LCO × expected"),
           ("lco_realism", "LCO realism"), ("rejection_realism", "rejection realism"),
           ("lco_fid_vs_real", "LCO FID"), ("rejection_fid_vs_real", "rejection FID")]


def parser() -> argparse.ArgumentParser:
    from ..cli._args import device as device_arg  # a GPU asked for where none is: a usage error
    from ..cli._args import fraction, learning_rate, nonneg_float, nonneg_int, positive_int
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", nargs="?", help="training run folder (or use --demo)")
    p.add_argument("classifier", nargs="?", help="classifier folder (or use --demo)")
    p.add_argument("--demo", default=None, help="an `xrayforge demo` output folder: its run, classifier and archive")
    p.add_argument("--targets", nargs="+", required=True, help="LCO targets like Cardiomegaly=1,Effusion=1, or auto")
    p.add_argument("--census", type=nonneg_int, default=50000,
                   help="samples the classifier labels to measure each target's frequency (0: none)")
    p.add_argument("--rarities", type=fraction, nargs="+", default=[1e-2, 1e-3, 1e-4],
                   help="with --targets auto: the census frequencies wanted, one target nearest each "
                        "(default 1e-2 1e-3 1e-4)")
    p.add_argument("--min-hits", type=positive_int, default=10,
                   help="with --targets auto: a combination counts only if the census saw it this often "
                        "(default 10: its frequency known to about ±30%%; 1 in 10,000 needs --census 100000+)")
    p.add_argument("--max-realism", type=nonneg_float, default=1.6,
                   help="refuse a generator whose realism ratio is above this (needs --real; 0: no check)")
    p.add_argument("--n", type=positive_int, default=64, help="latents LCO optimises per target (default 64)")
    p.add_argument("--steps", type=positive_int, default=40, help="LCO steps per latent (default 40)")
    p.add_argument("--lr", type=learning_rate, default=0.1,
                   help="LCO Adam lr (default 0.1: on the demo's generator 2-3× the accepted/s of 0.05 with 100 steps)")
    p.add_argument("--starts", type=positive_int, nargs="+", default=[1],
                   help="LCO from the best of S draws per sample, one row per S given (default 1: no screening)")
    p.add_argument("--archive-n", type=nonneg_int, default=0,
                   help="also write an LCO archive of this many images of each target per --starts value "
                        "and report images/s (default 0: no)")
    p.add_argument("--amp", choices=("bf16",), default=None, help="bf16 autocast (default: float32)")
    p.add_argument("--sample-n", type=positive_int, default=256,
                   help="images of the plain sampling-to-PNG timing (default 256)")
    p.add_argument("--real", default=None, help="labelled archive: FID of accepted images vs real ones per target")
    p.add_argument("--inception", default=None, help="FID Inception weights (default: random, a pipeline check)")
    p.add_argument("--no-fid", action="store_true", help="with --real: the realism ratios only, no FID (faster on a CPU)")
    p.add_argument("--device", type=device_arg, default=None, help="cuda, cuda:N or cpu (default: cuda when available)")
    p.add_argument("--out", type=results_dir, default=None, help="results folder (default benchmarks/results)")
    return p


def main(argv=None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.demo:
        from pathlib import Path
        demo = Path(args.demo)
        args.run, args.classifier = args.run or str(demo / "run"), args.classifier or str(demo / "classifier")
        args.real = args.real or str(demo / "phantom")
    if not args.run or not args.classifier:
        p.error("give RUN and CLASSIFIER, or --demo DIR")
    try:
        result = run(args.run, args.classifier, args.targets, args.n, args.steps, args.lr, args.device, args.amp,
                     args.sample_n, args.real, args.inception, args.census, args.max_realism, not args.no_fid,
                     tuple(args.starts), args.archive_n, tuple(args.rarities), args.min_hits)
    except (ValueError, FileNotFoundError) as exc:
        print(f"lco benchmark: error: {exc}", file=sys.stderr)
        return 2
    if result["generator_realism"]:
        print(f"generator realism ratio {result['generator_realism']['realism']:.2f}, diversity "
              f"{result['generator_realism']['diversity']:.2f}")
    print(format_table(result["rows"], COLUMNS))
    for row in result["lco_archive"]:
        versus = f", {row['speedup_expected']:.1f}× rejection (expected)" if row["speedup_expected"] else ""
        print(f"LCO archive, {row['target']}, starts {row['starts']}: {row['images_per_second']:.1f} images/s, "
              f"acceptance {row['acceptance_rate']:.0%}, mean {row['mean_steps']:.1f} steps{versus}")
    print(f"sampling to PNG: {result['sampling_png_images_per_second']:.1f} images/s "
          f"at {result['generator_resolution']} px")
    print(f"wrote {write_results('lco', result, args.out)}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
