"""`xrayforge evaluate memorisation --synthetic A --real B --out DIR`: does the generator copy
its training patients?

For every synthetic image, its nearest real training image in Inception feature space and in
pixel space (32×32 grey levels); for reference, every real image's nearest other real image.
A synthetic image closer to a real one than the ``percentile``-th percentile of the
real-to-real nearest-neighbour distances, in either space, is flagged. Distances are computed
in chunks on the accelerator, so the full distance matrix never exists (100k × 100k is fine).

A flag is a screen, not a verdict: a generator that copies nothing but samples the data's
distribution still has images under the thresholds, as new real images would (about
``percentile``% per space with many real images, more with few: ``chance_rate``). The summary
gives the number of flags that chance alone gives (``expected_by_chance``, a bound: the two
spaces' flags counted as if they never overlapped) and the binomial probability of at least
the observed number at that rate (``p_value``); ``more_than_chance`` is p < 0.01. Copies show
up as more flags than chance, at pixel or feature distances far below the real-to-real ones
(``closest_pairs.png``).

Writes memorisation.csv (one row per synthetic image), summary.json, distances.png (the two
distributions) and closest_pairs.png (the closest synthetic / real pairs side by side).
"""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..fid.preprocess import max_value
from .metrics import binomial_upper_tail
from ..utils.neighbours import nearest_neighbours, pixel_vectors
from ..utils.files import claim_output


def _grey(images: torch.Tensor) -> torch.Tensor:
    """Stored pixels (N, H, W[, 3]) -> grey levels in [0, 1], (N, H, W)."""
    x = images.float() / max_value(images)
    return x.mean(-1) if x.dim() == 4 and x.shape[-1] == 3 else x


def _unit(images: torch.Tensor, size: int) -> torch.Tensor:
    """Stored pixels -> grey levels in [0, 1], area-resized to (N, size, size) (the thumbnails)."""
    return F.interpolate(_grey(images).unsqueeze(1), size=(size, size), mode="area")[:, 0]


def collect(extractor, spec: str, limit: int | None = None, progress: bool = True):
    """(names, Inception features, pixel vectors, thumbnails 64×64) of a folder or an archive."""
    from tqdm import tqdm
    kind, total, batches = extractor.image_batches(spec, limit, shard=False)
    names, feats, pix, thumbs = [], [], [], []
    with tqdm(total=total, unit="img", desc=f"features {Path(spec).name}", disable=not progress) as bar:
        for images, good, skips in batches:
            bar.update(len(skips))
            if images is None:
                continue
            names += good
            feats.append(extractor.features(images).cpu())
            pix.append(pixel_vectors(_grey(images)))
            thumbs.append(_unit(images, 64))
            bar.update(len(good))
    if not names:
        raise ValueError(f"{spec}: no readable images")
    return names, torch.cat(feats), torch.cat(pix), torch.cat(thumbs)


def audit(synthetic: str, real: str, out: str | os.PathLike, extractor, percentile: float = 1.0,
          real_limit: int | None = None, progress: bool = True, pairs: int = 8) -> dict:
    out = claim_output(out, "evaluate memorisation", signatures=("memorisation.csv",))
    s_names, s_feat, s_pix, s_thumb = collect(extractor, synthetic, None, progress)
    r_names, r_feat, r_pix, r_thumb = collect(extractor, real, real_limit, progress)
    if len(r_names) < 2:
        raise ValueError(f"{real}: need at least 2 real images for a real-to-real reference")
    dev = extractor.device
    d_f, i_f = nearest_neighbours(s_feat, r_feat.to(dev))
    d_p, i_p = nearest_neighbours(s_pix, r_pix.to(dev))
    rr_f, _ = nearest_neighbours(r_feat, r_feat.to(dev), exclude_self=True)
    rr_p, _ = nearest_neighbours(r_pix, r_pix.to(dev), exclude_self=True)
    thr_f = float(np.percentile(rr_f.numpy(), percentile))
    thr_p = float(np.percentile(rr_p.numpy(), percentile))
    flagged = (d_f < thr_f) | (d_p < thr_p)
    chance = chance_rate(len(r_names), percentile)
    p_value = binomial_upper_tail(int(flagged.sum()), len(s_names), chance)
    rows = [{"synthetic": s_names[k], "nearest_real_inception": r_names[int(i_f[k])],
             "inception_distance": round(float(d_f[k]), 6), "nearest_real_pixels": r_names[int(i_p[k])],
             "pixel_distance": round(float(d_p[k]), 6), "flagged": int(flagged[k])} for k in range(len(s_names))]
    tmp = out / "memorisation.csv.tmp"
    with open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0].keys()))
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, out / "memorisation.csv")
    summary = {
        "evaluation": "memorisation", "synthetic": len(s_names), "real": len(r_names), "percentile": percentile,
        "threshold_inception": thr_f, "threshold_pixels": thr_p, "flagged": int(flagged.sum()),
        "flagged_fraction": float(flagged.float().mean()), "chance_rate": chance,
        "expected_by_chance": chance * len(s_names), "p_value": p_value, "more_than_chance": p_value < 0.01,
        "median_synthetic_to_real_inception": float(d_f.median()), "median_real_to_real_inception": float(rr_f.median()),
        "median_synthetic_to_real_pixels": float(d_p.median()), "median_real_to_real_pixels": float(rr_p.median()),
        "inception": extractor.describe_space(), "features": extractor.space_name}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    _plot_distributions(d_f, rr_f, d_p, rr_p, thr_f, thr_p, out / "distances.png")
    order = torch.argsort(d_f)[:pairs]
    _pairs_image(s_thumb[order], r_thumb[i_f[order]], out / "closest_pairs.png")
    return summary


def chance_rate(n_real: int, percentile: float) -> float:
    """How often an image drawn from the real distribution, copying nothing, is flagged. Each
    threshold is the k-th smallest of the n real-to-real distances, k = 1 + q (n - 1) for
    q = percentile / 100 (linear interpolation), and a new draw falls below the k-th smallest
    of n draws with probability k / (n + 1) on average; in either of the two spaces, at most
    twice that. (Not q itself: with 96 real images the 1st percentile lies next to the smallest
    distance, under which 1 in 97 new draws falls; and not the reals' own count under the
    threshold: mutual nearest neighbours tie, so the smallest distance occurs twice.)"""
    k = 1 + percentile / 100 * (n_real - 1)
    return min(1.0, 2 * k / (n_real + 1))


def chance_sentence(summary: dict) -> str:
    """The flags against what chance gives, in a sentence ('' for a summary written before the
    chance baseline existed)."""
    if "expected_by_chance" not in summary:
        return ""
    verdict = ("more than chance gives: look at the closest pairs" if summary["more_than_chance"]
               else "no more than chance gives")
    return (f"A generator that copies nothing would have up to {summary['expected_by_chance']:.1f} flagged by "
            f"chance (new real images would be, at a rate of {100 * summary['chance_rate']:.1f}%): "
            f"p = {summary['p_value']:.2g}, {verdict}.")


def _plot_distributions(d_f, rr_f, d_p, rr_p, thr_f, thr_p, path):
    from ..utils.plots import _pyplot, save_figure
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for ax, a, b, thr, title in ((axes[0], d_f, rr_f, thr_f, "Inception features"),
                                 (axes[1], d_p, rr_p, thr_p, "pixels (32×32)")):
        bins = np.linspace(0, float(max(a.max(), b.max())) * 1.05 + 1e-9, 40)
        ax.hist(b.numpy(), bins=bins, alpha=0.6, density=True, label="real → nearest other real")
        ax.hist(a.numpy(), bins=bins, alpha=0.6, density=True, label="synthetic → nearest real")
        ax.axvline(thr, color="red", lw=1, label="flag threshold")
        ax.set_title(title)
        ax.set_xlabel("distance")
        ax.legend(fontsize=7)
    save_figure(fig, path)


def _pairs_image(synth: torch.Tensor, real: torch.Tensor, path):
    from ..utils.images import grid, save_png
    both = torch.stack([synth, real], dim=1).reshape(-1, *synth.shape[1:])  # synthetic, then its real neighbour
    save_png(grid((both.clamp(0, 1) * 255).round().to(torch.uint8).numpy(), columns=2), path)
