"""`xrayforge evaluate memorisation --synthetic A --real B --out DIR`: does the generator copy
its training patients?

For every synthetic image, its nearest real training image in Inception feature space and in
pixel space (32×32 grey levels); for reference, every real image's nearest real image of another
patient where the patients are known (an archive whose patients have several images: a
synthetic image is a new patient to the training set, and how close a patient's own follow-up
scan comes says nothing about how close a new patient comes; with rescans in the reference the
threshold would be a rescan's distance, and copies a little less close than that would pass),
else (a folder, or an archive of one image a patient) its nearest other real image. A synthetic
image closer to a real one than the ``percentile``-th percentile of those real-to-real
nearest-neighbour distances, in either space, is flagged; ``threshold_excludes`` in the summary
says which rule ("same patient" or "self"), which also holds for the real-to-real medians and
distances.png. Distances are computed in chunks on the accelerator, so the full distance matrix
never exists (100k × 100k is fine; ``utils.neighbours.nearest_other_group`` for the patients).

A flag is a screen, not a verdict: a generator that copies nothing but samples the data's
distribution still has images under the thresholds, as new real images would (about
``percentile`` % of them in each space, up to twice that in either; more with a small reference:
the 1st percentile of 30 distances is near their smallest). So the real images are also the control group (``screen``): with half
of them as the reference, the other half and the synthetic images go through the same rule,
each half in turn. Halves by patient for an archive, so that a control is a new patient as a
synthetic image is (the reference half's threshold, as the whole set's, from its images' nearest
images of another patient), and every image of each control patient counts (a generator samples
the images' distribution, in which a patient with ten scans weighs ten times a patient with one);
a patient's scans are flagged together, not independently, so the control counts are shrunk by
their design effect (Rao & Scott 1992) before the test; by image for a folder. The summary gives
the control images (``controls``) and those flagged (``real_flagged``), the design effect
(``design_effect``, on average over the passes; 1 for a folder), the synthetic images flagged
that way (``synthetic_flagged_half``, on average), the synthetic flags expected at the controls'
rate (``expected_by_chance``) and a one-sided Fisher test of the two rates (``p_value``);
``more_than_chance`` is p < 0.01. Copies show up as more flags than the reals get, at pixel or
feature distances far below the real-to-real ones (``closest_pairs.png``).

Writes memorisation.csv (one row per synthetic image), summary.json (with the images that
could not be read, ``skipped``: not audited), distances.png (the two
distributions) and closest_pairs.png (synthetic / real pairs side by side: the flagged ones first,
beside the real image they were flagged against, then the closest in feature space).
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import UserError
from ..fid.preprocess import max_value
from ..fid.stats import NonFiniteFeatures, non_finite_rows
from .metrics import fisher_greater
from ..utils.neighbours import group_codes, nearest_neighbours, pixel_vectors
from ..utils.files import claim_output, write_csv, write_text_atomic


def _grey(images: torch.Tensor) -> torch.Tensor:
    """Stored pixels (N, H, W[, 3]) -> grey levels in [0, 1], (N, H, W)."""
    x = images.float() / max_value(images)
    return x.mean(-1) if x.dim() == 4 and x.shape[-1] == 3 else x


def _unit(images: torch.Tensor, size: int) -> torch.Tensor:
    """Stored pixels -> grey levels in [0, 1], area-resized to (N, size, size) (the thumbnails)."""
    return F.interpolate(_grey(images).unsqueeze(1), size=(size, size), mode="area")[:, 0]


def _each(images, fn) -> torch.Tensor:
    """``fn`` of a batch, or of each image of a list of images of different sizes, concatenated."""
    return torch.cat([fn(t.unsqueeze(0)) for t in images]) if isinstance(images, list) else fn(images)


def collect(extractor, spec: str, limit: int | None = None, progress: bool = True, skipped: list | None = None):
    """(names, Inception features, pixel vectors, thumbnails 64×64) of a folder or an archive (``limit``:
    that many, evenly spread); the (file, reason) of each image that could not be read go to ``skipped``.
    Features with a NaN or inf are refused, naming the images, as the FID refuses them."""
    from tqdm import tqdm
    kind, total, batches = extractor.image_batches(spec, limit, shard=False)
    names, feats, pix, thumbs, skips_all = [], [], [], [], []
    with tqdm(total=total, unit="img", desc=f"features {Path(spec).name}", disable=not progress) as bar:
        for images, good, skips in batches:
            bar.update(len(skips))
            skips_all += skips
            if images is None:
                continue
            names += good
            f = extractor.features(images).cpu()
            bad = non_finite_rows(f)
            if bad:  # a NaN distance is never a neighbour: such an image passed unflagged at distance inf
                raise UserError(f"{spec}: {NonFiniteFeatures(bad, len(f), good)}")
            feats.append(f)
            pix.append(_each(images, lambda x: pixel_vectors(_grey(x))))
            thumbs.append(_each(images, lambda x: _unit(x, 64)))
            bar.update(len(good))
    if skipped is not None:
        skipped += skips_all
    if not names:  # said with why, as the FID says it
        why = "".join(f"; skipped {f}: {r}" for f, r in skips_all[:3]) + (
            f"; ... and {len(skips_all) - 3} more skipped" if len(skips_all) > 3 else "")
        raise ValueError(f"{spec}: no readable images{why}")
    return names, torch.cat(feats), torch.cat(pix), torch.cat(thumbs)


def _flags(queries: list[torch.Tensor], refs: list[torch.Tensor], percentile: float, groups=None):
    """Per space the queries' nearest-reference (distance, index), the references' distance to
    their nearest other reference (of another group: ``groups``, the references' patient ids,
    None: any other), and its ``percentile`` (the threshold); and the flags: under the threshold
    in any space."""
    out, flagged = [], torch.zeros(len(queries[0]), dtype=torch.bool)
    for q, r in zip(queries, refs):
        d, i = nearest_neighbours(q, r)
        nn = (nearest_neighbours(r, r, exclude_self=True) if groups is None
              else nearest_neighbours(r, r, groups=groups))[0]
        thr = float(np.percentile(nn.numpy(), percentile))
        flagged |= _under(d, thr)
        out.append((d, i, nn, thr))
    return out, flagged


def _under(d: torch.Tensor, thr: float) -> torch.Tensor:
    """Under the threshold: closer than ``thr``, or, where the threshold is 0 (at least the
    percentile of the reals have an exact duplicate), an exact copy (never under 0 otherwise)."""
    return d < thr if thr > 0 else d <= 0


def _halves(n: int, groups, seed: int):
    """Two halves of n real images (seeded), whole groups (patients) on one side: each half holds
    at least 2 images, and with groups at least 2 groups (each reference image then has an image
    of another patient in its half); None where the groups allow no such split."""
    rng = np.random.default_rng(seed)
    if groups is None:
        perm = rng.permutation(n)
        return perm[:n // 2], perm[n // 2:]
    keys = group_codes(groups)
    order = rng.permutation(keys.max() + 1)
    place = np.empty_like(order)
    place[order] = np.arange(len(order))
    images = np.argsort(place[keys], kind="stable")  # the groups in shuffled order, each group's images together
    cuts = np.cumsum(np.bincount(keys)[order])[1:-2]  # the group boundaries in ``images``, 2+ groups a side
    cuts = cuts[(cuts >= 2) & (cuts <= n - 2)]
    if not len(cuts):
        return None
    cut = int(cuts[np.argmin(np.abs(cuts - n / 2))])
    return images[:cut], images[cut:]


def screen(synthetic: list[torch.Tensor], real: list[torch.Tensor], percentile: float = 1.0, seed: int = 0,
           groups=None) -> dict:
    """The audit's statistics in any number of spaces (one (M, D) synthetic and one (N, D) real
    tensor per space; the reals on the device to compute on). ``groups``: the reals' patient ids,
    or None where they are unknown (each image its own patient).

    The flags: a synthetic image under the ``percentile`` of the real-to-real nearest-neighbour
    distances in any space, against all N reals (``distance``, ``index``, ``real_nn``,
    ``threshold`` per space). A real image's neighbour there is its nearest real image of another
    patient (``threshold_excludes``: "same patient"), or without groups its nearest other real
    image ("self"): a synthetic image is a new patient to the reals, and a patient's own rescan,
    much closer than any other patient, would make the threshold "as close as a rescan".
    ValueError where all reals are one patient.

    The test: the reals are split in two halves (seeded), a patient's images in one half, so that
    a control is a new patient to the reference, as a synthetic image is (a control whose
    follow-up scan is in the reference would be flagged more often than a new patient, and hide
    copies); with one half as the reference (its threshold from its own images by the same rule),
    the other half's images and the synthetic ones go through the same rule against it. Every
    control image counts, as the synthetic images sample the images (one image a patient would
    weigh the patients instead, and where patients with many scans differ from those with one,
    as inpatient follow-ups do, the two rates differ with no copying: p < 0.05 in 11-12% of such
    null trials). A patient's scans are flagged together, though, so the control count varies
    more than a binomial one (counted as independent, p < 0.05 in 8% of null trials with two near
    scans a patient, 20% with four): the control counts are divided by their design effect
    (``design_effect``, Rao & Scott 1992) before the one-sided Fisher test of the two counts (the
    synthetic images, independent draws, as they are). The design effect is the larger of the
    control flags' and the reference half's own flags' (each reference image under the threshold
    by its nearest image of another patient: about ``percentile`` % of them, clustered as the
    controls'): with few control flags, none of them in a multi-scan patient, the controls' own
    estimate is 1 and the test far too liberal (p < 0.05 in 14% of null trials with four near
    scans). Approximate, not exact: measured at the 5th percentile over 500 null trials each,
    p < 0.05 (p < 0.01) in 1.2% (0.4%) with two near scans a patient, 1.6% (0.2%) with four, and
    6% (3%) where 30 ten-scan patients differ from 300 one-scan ones (which patients fall in the
    reference half shifts both rates a little, which no variance adjustment removes). Each half is
    the reference once (copies of either half are seen) and the smaller p, doubled, is the
    ``p_value``. ``controls``: the
    control images counted (each real image once over the two passes); ``real_flagged``: those
    flagged; ``design_effect``: the two passes' design effects, averaged (1 without groups);
    ``synthetic_flagged_half``: the synthetic images flagged against a half, on average over the
    two; ``expected_by_chance``: as many at each pass's control rate (flagged control images over
    control images), averaged alike. None of the test's fields for fewer than 4 reals (or groups
    that cannot be split into halves of at least 2 images and 2 patients)."""
    n, m = len(real[0]), len(synthetic[0])
    ids = groups
    if groups is not None:
        if len(groups) != n:
            raise ValueError(f"screen: {len(groups)} group ids for {n} real images")
        groups = group_codes(groups)
        if n and groups.max() == 0:
            raise ValueError(f"screen: all {n} real images are of one patient: no real image has a real image of "
                             f"another patient to set the threshold")
    per_space, flagged = _flags(synthetic, real, percentile, groups)
    out = {"distance": [t[0] for t in per_space], "index": [t[1] for t in per_space],
           "real_nn": [t[2] for t in per_space], "threshold": [t[3] for t in per_space], "flagged": flagged,
           "threshold_excludes": "self" if groups is None else "same patient",
           "real_flagged": None, "controls": None, "design_effect": None, "synthetic_flagged_half": None,
           "expected_by_chance": None, "p_value": None}
    split = _halves(n, ids, seed) if n >= 4 else None  # from the ids as given: the same seeded split as before
    if split is None:
        return out
    dev = real[0].device
    controls, synth, chance, p_values, n_controls, effects = 0, 0, 0.0, [], 0, []
    for ref_np, ctrl_np in (split, split[::-1]):  # one pass per reference: its threshold serves both groups
        ref, ctrl = torch.from_numpy(ref_np).to(dev), torch.from_numpy(ctrl_np).to(dev)
        n_controls += len(ctrl)
        spaces, both = _flags([torch.cat([s.to(r.device), r[ctrl]]) for s, r in zip(synthetic, real)],
                              [r[ref] for r in real], percentile, None if groups is None else groups[ref_np])
        s_flags, c_flags = both[:m], both[m:].cpu().numpy()
        hits = int(c_flags.sum())
        controls, synth = controls + hits, synth + int(s_flags.sum())
        chance += hits / len(ctrl) * m / 2  # at this pass's control rate, as synth is averaged
        d = 1.0
        if groups is not None:  # the reference's own flags (under its threshold, ~percentile %) as a floor
            own = np.logical_or.reduce([_under(t[2], t[3]).cpu().numpy() for t in spaces])
            d = max(design_effect(c_flags, groups[ctrl_np]), design_effect(own, groups[ref_np]))
        effects.append(d)
        # the counts shrunk by d, rounded towards a higher control rate (flags up, images down), and never a
        # smaller p than the counts as they are: a design effect can only weaken the evidence
        p_values.append(max(fisher_greater(int(s_flags.sum()), m, math.ceil(hits / d), max(1, math.floor(len(ctrl) / d))),
                            fisher_greater(int(s_flags.sum()), m, hits, len(ctrl))))
    out.update(real_flagged=controls, controls=n_controls, design_effect=float(np.mean(effects)),
               synthetic_flagged_half=synth / 2, expected_by_chance=chance, p_value=min(1.0, 2 * min(p_values)))
    return out


def design_effect(flags, groups) -> float:
    """The design effect of a flag rate over clustered images (Rao & Scott 1992): ``flags`` one
    boolean per image, ``groups`` its cluster (patient). With f_i and n_i the flags and images of
    each of the K clusters and p = Σf / Σn, the cluster-robust variance of p,
    K / (K - 1) · Σ(f_i - p n_i)² / (Σn)², over the binomial one, p (1 - p) / Σn; at least 1, and 1
    where p is 0 or 1 or there are fewer than 2 clusters."""
    flags = np.asarray(flags, dtype=np.float64)
    keys = group_codes(np.asarray(groups))
    f, n = np.bincount(keys, weights=flags), np.bincount(keys).astype(np.float64)
    f, n = f[n > 0], n[n > 0]
    k, total = len(n), float(n.sum())
    p = float(f.sum()) / total if total else 0.0
    if k < 2 or p <= 0.0 or p >= 1.0:
        return 1.0
    v = k / (k - 1) * float(((f - p * n) ** 2).sum()) / total ** 2
    return max(1.0, v / (p * (1 - p) / total))


def check_inputs(synthetic: str, real: str, out: str | os.PathLike, real_limit: int | None = None) -> None:
    """What ``audit`` refuses before any work, the feature extractor's weights included (the command
    line calls it before it loads them): a --real-limit under 2, an input that is missing or no
    folder of images or archive (statistics, a checkpoint), fewer than 2 real image files, the real
    images as --synthetic, an --out inside an image folder that is read. (Each was said only after
    the synthetic images' features, and an earlier audit's summary.json in --out removed.)"""
    if real_limit is not None and real_limit < 2:  # before any work: the real-to-real reference needs 2
        raise UserError(f"--real-limit {real_limit}: the real-to-real reference needs at least 2 real images")
    from itertools import islice

    from ..data.archive import Archive
    from ..data.readers import iter_images
    from ..fid.compute import describe
    for option, spec in (("--synthetic", synthetic), ("--real", real)):
        try:
            kind = describe(spec)
        except FileNotFoundError:
            raise UserError(f"{option} {spec}: no such file or folder") from None
        if kind == "stats":
            raise UserError(f"{option} {spec}: a statistics file holds no images; expected a folder of images "
                            f"or an archive")
        if kind == "checkpoint":
            raise UserError(f"{option} {spec}: a generator checkpoint; expected a folder of images or an archive "
                            f"(write its images with `xrayforge sample` first)")
    found = len(Archive(real)) if describe(real) == "archive" else len(list(islice(iter_images(real), 2)))
    if found < 2:
        raise UserError(f"--real {real}: {found} image{'s' * (found != 1)}; the real-to-real reference needs at "
                        f"least 2 real images")
    from .labelled import archive_id
    real_id = archive_id(real)
    if Path(synthetic).resolve() == Path(real).resolve() or (real_id is not None and real_id == archive_id(synthetic)):
        # every synthetic image would be 0 from its own copy: total memorisation
        raise UserError(f"--synthetic {synthetic} is --real {real} (the same "
                        f"{'manifest' if real_id is not None else 'folder'}): every synthetic image would be at "
                        f"distance 0 from its own copy among the real images, as if the generator had memorised "
                        f"them all; give the generator's samples as --synthetic")
    for option, spec in (("--synthetic", synthetic), ("--real", real)):  # a folder's images are read recursively
        where = Path(spec).resolve()
        if where.is_dir() and not (where / "archive.json").is_file() and where in (Path(out).resolve(),
                                                                                   *Path(out).resolve().parents):
            raise UserError(f"--out {out}: is inside {option} {spec}, whose subfolders' images are read too: "
                            f"the audit's own plots would be read as {option[2:]} images on a rerun; choose an --out "
                            f"outside it")


def audit(synthetic: str, real: str, out: str | os.PathLike, extractor, percentile: float = 1.0,
          real_limit: int | None = None, progress: bool = True, pairs: int = 8) -> dict:
    check_inputs(synthetic, real, out, real_limit)
    out = claim_output(out, "evaluate memorisation", signatures=("memorisation.csv",))
    # summary.json last, and an earlier run's gone first: where it exists, the rest is complete and of its run
    # (the report shows its plots, and the demo's resume takes the audit for done by it)
    (out / "summary.json").unlink(missing_ok=True)
    s_skipped, r_skipped = [], []
    s_names, s_feat, s_pix, s_thumb = collect(extractor, synthetic, None, progress, s_skipped)
    r_names, r_feat, r_pix, r_thumb = collect(extractor, real, real_limit, progress, r_skipped)
    if len(r_names) < 2:
        raise ValueError(f"{real}: need at least 2 real images for a real-to-real reference, got {len(r_names)}"
                         + "".join(f"; skipped {f}: {r}" for f, r in r_skipped[:3])
                         + (f"; ... and {len(r_skipped) - 3} more skipped" if len(r_skipped) > 3 else ""))
    dev = extractor.device
    groups = _patients(real, r_names)
    if groups is not None and len(set(groups)) < 2:
        raise UserError(f"{real}: all {len(r_names)} real images are of one patient: the real-to-real reference "
                        f"needs images of at least 2 patients")
    sc = screen([s_feat, s_pix], [r_feat.to(dev), r_pix.to(dev)], percentile, groups=groups)
    (d_f, d_p), (i_f, i_p), (nn_f, nn_p), (thr_f, thr_p) = sc["distance"], sc["index"], sc["real_nn"], sc["threshold"]
    flagged, real_flagged, p_value = sc["flagged"], sc["real_flagged"], sc["p_value"]
    half = sc["synthetic_flagged_half"]
    rows = [{"synthetic": s_names[k], "nearest_real_inception": r_names[int(i_f[k])],
             "inception_distance": round(float(d_f[k]), 6), "nearest_real_pixels": r_names[int(i_p[k])],
             "pixel_distance": round(float(d_p[k]), 6), "flagged": int(flagged[k])} for k in range(len(s_names))]
    write_csv(out / "memorisation.csv", list(rows[0].keys()), rows)
    summary = {
        "evaluation": "memorisation", "synthetic": len(s_names), "synthetic_source": str(synthetic), "real": len(r_names), "percentile": percentile,
        "threshold_inception": thr_f, "threshold_pixels": thr_p, "flagged": int(flagged.sum()),
        "flagged_fraction": float(flagged.float().mean()), "controls": sc["controls"],
        "real_flagged": real_flagged, "design_effect": sc["design_effect"], "synthetic_flagged_half": half,
        "expected_by_chance": sc["expected_by_chance"],  # the synthetic flags (per half, on average) at the controls' rate
        "p_value": p_value, "more_than_chance": None if p_value is None else p_value < 0.01,
        "halves_by": "image" if groups is None else "patient",
        # the real-to-real nearest neighbour of the threshold and the medians: another patient's, or any other image
        "threshold_excludes": sc["threshold_excludes"],
        # numpy's median: torch's is the lower middle value of an even count
        "median_synthetic_to_real_inception": float(np.median(d_f.numpy())),
        "median_real_to_real_inception": float(np.median(nn_f.numpy())),
        "median_synthetic_to_real_pixels": float(np.median(d_p.numpy())),
        "median_real_to_real_pixels": float(np.median(nn_p.numpy())),
        "inception": extractor.describe_space(), "features": extractor.space_name,
        # images that could not be read, so were not audited (an unread synthetic image may be a copy)
        "skipped": [{"side": side, "file": f, "reason": r} for side, skips in (("synthetic", s_skipped),
                                                                               ("real", r_skipped)) for f, r in skips]}
    _plot_distributions(d_f, nn_f, d_p, nn_p, thr_f, thr_p, out / "distances.png",
                        "real → nearest other real" if groups is None else "real → nearest real of another patient",
                        features_title=space_title(summary))
    shown, neighbour = shown_pairs((d_f, d_p), (i_f, i_p), (thr_f, thr_p), pairs)
    _pairs_image(s_thumb[shown], r_thumb[neighbour], out / "closest_pairs.png")
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=2))
    return summary


def shown_pairs(distances, indices, thresholds, pairs: int = 8):
    """(synthetic, real) indices of the ``pairs`` pairs closest_pairs.png shows: the flagged synthetic
    images first, most under a threshold first (distance over threshold, the lower of the spaces),
    each beside the real image of the space it is most under (the pixels' where only they flag it:
    the feature space's nearest image may be another); then the others by feature distance (the
    first space), beside their nearest real image there. (The figure showed the closest in
    feature space alone, so a copy flagged in pixels could be missing from it.)"""
    d = torch.stack([x.double() for x in distances])  # (spaces, M)
    under = torch.stack([_under(x, t) for x, t in zip(distances, thresholds)])
    scale = torch.tensor([t if t > 0 else 1.0 for t in thresholds], dtype=torch.float64)[:, None]
    # a space's rank of the image: its distance over the threshold where it is under it, else none
    rank = torch.where(under, d / scale, torch.full_like(d, float("inf")))
    best, space = rank.min(0)
    flagged = torch.isfinite(best)
    first = flagged.nonzero().flatten()[torch.argsort(best[flagged], stable=True)]
    rest = (~flagged).nonzero().flatten()[torch.argsort(d[0][~flagged], stable=True)]
    shown = torch.cat([first, rest])[:pairs]
    space = torch.where(flagged, space, torch.zeros_like(space))[shown]
    neighbour = torch.stack([i.long() for i in indices])[space, shown]
    return shown, neighbour


def _patients(real: str, names: list[str]) -> list[str] | None:
    """The patient id of each real image (named by its manifest source) of an archive (an image
    without one is its own patient); None for a folder, whose patients are unknown, and for an
    archive where no patient has two images (halves by image then, as the summary says)."""
    from ..fid.compute import describe
    if describe(real) != "archive":
        return None
    from ..data.archive import Archive
    arc = Archive(real)
    of = {r["source"]: p for r, p in zip(arc.records, arc.patient_ids)}
    ids = [of.get(name) or f"image:{name}" for name in names]
    return ids if len(set(ids)) < len(ids) else None  # one image a patient: halves by image, and said so


def chance_sentence(summary: dict) -> str:
    """The flags against the real images' own rate, in a sentence ('' for a summary without it)."""
    if summary.get("p_value") is None:
        return ""
    effect = summary.get("design_effect")
    # summaries written before the design effect: with "controls", one image of each control patient
    # counted; without, every image, unadjusted
    per_patient = ("" if summary.get("halves_by") != "patient" else
                   ("; one image of each patient" if "controls" in summary else "") if effect is None else
                   f"; every image of each patient, a patient's scans counted together: design effect {effect:.2f}")
    verdict = ("more than chance gives: look at the closest pairs" if summary["more_than_chance"]
               else "no more than chance gives")
    return (f"Against half of the real images as reference (each half in turn), "
            f"{summary['synthetic_flagged_half']:.1f} synthetic images are flagged on average, where the other "
            f"half's real images ({summary['real_flagged']} of {summary.get('controls') or summary['real']} "
            f"flagged{per_patient}) give "
            f"{summary['expected_by_chance']:.1f} for a generator that copies nothing: Fisher p = "
            f"{summary['p_value']:.2g}, {verdict}.")


def space_title(summary: dict) -> str:
    """What the audit's feature space is called in its table and plot: "Inception features", or the
    other space's (``--features``: a classifier's, a DenseNet's), whose distances the summary keeps
    under the same ``*_inception`` keys."""
    space = str(summary.get("features") or "inception")
    return "Inception features" if space.startswith("inception") else f"{space.split('@')[0].split(':')[0]} features"


def _plot_distributions(d_f, rr_f, d_p, rr_p, thr_f, thr_p, path, real_label="real → nearest other real",
                        features_title="Inception features"):
    from ..utils.plots import _pyplot, save_figure
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for ax, a, b, thr, title in ((axes[0], d_f, rr_f, thr_f, features_title),
                                 (axes[1], d_p, rr_p, thr_p, "pixels (32×32)")):
        bins = np.linspace(0, float(max(a.max(), b.max())) * 1.05 + 1e-9, 40)
        ax.hist(b.numpy(), bins=bins, alpha=0.6, density=True, label=real_label)
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
