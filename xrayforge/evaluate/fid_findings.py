"""`xrayforge evaluate fid-findings --synthetic S --real R --out DIR`: FID per finding, and FID
against the number of synthetic images.

Per finding: the synthetic images labelled with it (targeted at it by LCO, or called positive by
the classifier) against the real images that have it. Every image's Inception features are
computed once and streamed into float64 moments: one set for all images and one per finding.

FID is biased upwards at small n (the covariance estimate adds spread), so a per-finding FID
from a few hundred images is not comparable with an FID from 50k. The curve of FID against the
number of synthetic images (random subsets, nested: moments snapshot as the shuffled stream
passes each count) shows the size of that bias, and so does each finding's real-vs-real FID:
the real images split in two halves by patient, one half against the other; ``fid_infinity`` is the intercept of a
least-squares line through FID against 1/n (Chong & Forsyth 2020), the FID of infinitely many
images. FID is linear in 1/n only once n is well above the feature dimension D (below it the
covariance estimate is singular and FID bends away from the line; Chong & Forsyth fit n from
5,000 to 50,000 for D = 2048), so the line is fitted to the counts of at least 2·D images alone:
the points at small n have the most leverage on a line in 1/n, and with them the intercept missed
the truth by more than the FID of every image did (simulated Gaussian features, D = 1024: +165 on
a true 441, against +9).

Outputs: fid_findings.csv, fid_vs_n.csv, fid_findings.md, fid_findings.png, summary.json.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from ..utils.files import write_csv, write_json, write_text_atomic
from ..fid.compute import stored_pixels
from ..fid.stats import NonFiniteFeatures, StreamingMoments, frechet_distance, update_subsets
from ._format import csv_row, is_number, number
from .labelled import check_inputs, labelled_findings, open_labelled, real_images_among, same_images
from .metrics import patient_split
from ..utils.files import claim_output

log = logging.getLogger(__name__)

# 7000: three counts of at least 2 × 2048 (the fit of FID∞, see the module docs) in a set of 10,000
DEFAULT_COUNTS = (50, 100, 200, 500, 1000, 2000, 5000, 7000, 10000, 20000, 50000, 100000, 200000, 500000)


def _stream(extractor, archive, order: np.ndarray, labels: np.ndarray, cuts, desc: str, progress: bool,
            kept: list | None = None):
    """Moments over all of ``order`` and per label column; at each count in ``cuts``, a snapshot
    of the all-image moments (FrechetStats) as {count: stats}. ``kept``: a list that receives
    (features on the CPU, their label rows) per batch (for precision / recall / density / coverage)."""
    from tqdm import tqdm
    dim = extractor.dim
    total = StreamingMoments(dim, extractor.device)
    per = [StreamingMoments(dim, extractor.device) for _ in range(labels.shape[1])]
    snaps = {}
    bounds = sorted({0, len(order), *[c for c in cuts if 0 < c < len(order)],
                     *range(0, len(order), extractor.batch_size)})
    with tqdm(total=len(order), unit="img", desc=desc, disable=not progress, dynamic_ncols=True) as bar:
        for a, b in zip(bounds[:-1], bounds[1:]):
            pos = order[a:b]
            sort = np.argsort(pos, kind="mergesort")  # sorted reads from the memory map
            feats = extractor.features(stored_pixels(archive.images(pos[sort], archive.resolution)))
            if kept is not None:
                kept.append((feats.float().cpu(), labels[pos[sort]].astype(bool)))
            lab = torch.from_numpy(labels[pos[sort]].astype(bool)).to(feats.device)
            # every image and one subset per finding, in one pass over the batch
            try:
                update_subsets([total] + per, feats, torch.cat([torch.ones_like(lab[:, :1]), lab], 1).T)
            except NonFiniteFeatures as exc:  # named by the archive's sources, not batch rows
                raise UserError(f"{archive.path}: {exc.named([archive.records[p]['source'] for p in pos[sort]])}") \
                    from None
            if b in cuts:
                snaps[b] = total.stats()
            bar.update(len(pos))
    return total, per, snaps


def _merged(a: StreamingMoments, b: StreamingMoments) -> StreamingMoments:
    out = StreamingMoments(a.dim, a.mean.device)
    out.merge(a)
    out.merge(b)
    return out


def fid_infinity(counts, fids, min_count: int = 0) -> float:
    """Intercept of the least-squares line FID = a + b / n through the points of at least ``min_count``
    images (NaN with fewer than 3 of them)."""
    n = np.asarray(counts, dtype=np.float64)
    f = np.asarray(fids, dtype=np.float64)
    n, f = n[n >= min_count], f[n >= min_count]
    if len(n) < 3:
        return float("nan")
    A = np.stack([np.ones_like(n), 1.0 / n], axis=1)
    return float(np.linalg.lstsq(A, f, rcond=None)[0][0])


def _kept(parts: list) -> tuple[torch.Tensor, np.ndarray]:
    return torch.cat([f for f, _ in parts]), np.concatenate([lab for _, lab in parts])


def fid_by_finding(synthetic: str, real: str, out: str | os.PathLike, extractor, counts=None, seed: int = 0,
                   real_limit: int | None = None, min_images: int = 10, progress: bool = True,
                   prdc: bool = False) -> dict:
    """See the module docstring. A finding with fewer than ``min_images`` images on either side
    gets no FID (n/a): so few images give a number dominated by its bias. ``prdc``: also
    precision / recall (k = 3) and density / coverage (k = 5) for all images and per finding
    (every image's features are then kept in memory)."""
    check_inputs(synthetic, real)
    if real_limit is not None and real_limit < 2:  # said before any work, as when the real side has 1 image
        raise UserError(f"--real {real}: {real_limit} image{'s' * (real_limit != 1)} (--real-limit {real_limit}); "
                        f"FID needs at least 2 on each side")
    same = same_images(synthetic, real)
    if same:  # every FID would be 0: a perfect generator
        raise UserError(f"--synthetic {synthetic} is the real archive --real {real} ({same}): its FIDs "
                        f"against itself would be 0, as if the synthetic images were the real ones")
    out = claim_output(out, "evaluate fid-findings", signatures=("fid_findings.csv",))
    synth = open_labelled(synthetic, out, progress)
    real_arc = open_labelled(real, out, progress)
    shared = np.flatnonzero(real_images_among(synth, real_arc))
    if len(shared):  # each lowers every FID it is in: a measure of the generator no more
        log.warning("--synthetic %s holds %d of the %d images of --real %s (first: %s): the FIDs are lowered by "
                    "comparing those images with themselves", synthetic, len(shared), len(real_arc), real,
                    real_arc.records[shared[0]]["source"])
    real_labelled = bool(real_arc.meta.get("labelled", True))
    synthetic_labelled = bool(synth.meta.get("labelled", True))
    for spec, labelled in ((real, real_labelled), (synthetic, synthetic_labelled)):
        if not labelled:  # its labels are unknown, not 0: the all-images row and the curve alone mean something
            log.warning("%s was prepared without finding labels: no FID per finding, only of all images", spec)
    # a sample folder's classifier may call fewer findings than the archives name: no image "has" the others
    known = labelled_findings(real, real_arc), labelled_findings(synthetic, synth)
    findings = [f for f in real_arc.findings if f in known[0] and f in known[1]]
    not_labelled = [f for f in real_arc.findings if f in synth.findings and f not in findings]
    s_lab = synth.labels[:, [synth.findings.index(f) for f in findings]]
    r_lab = real_arc.labels[:, [real_arc.findings.index(f) for f in findings]]
    rng = np.random.default_rng(seed)
    s_order = rng.permutation(len(synth))
    r_order = np.arange(len(real_arc))
    if real_limit is not None and real_limit < len(r_order):
        r_order = np.sort(rng.choice(r_order, real_limit, replace=False))
    for option, spec, n in (("--synthetic", synthetic, len(s_order)), ("--real", real, len(r_order))):
        if n < 2:
            limited = f" (--real-limit {real_limit})" if option == "--real" and n < len(real_arc) else ""
            raise UserError(f"{option} {spec}: {n} image{'s' * (n != 1)}{limited}; FID needs at least 2 on each side")
    if counts:  # asked for: say which cannot be had (the defaults above the synthetic count go quietly)
        beyond = sorted({int(c) for c in counts if not 2 <= c <= len(s_order)})
        if beyond:
            log.warning("--counts %s: left out of the FID curve (it takes 2 .. %d, the synthetic images)",
                        ", ".join(map(str, beyond)), len(s_order))
    counts = sorted({int(c) for c in (counts or DEFAULT_COUNTS) if 2 <= c < len(s_order)} | {len(s_order)})
    # the real images in two halves by patient: together they are the real side; against each
    # other they give the FID of two real samples of a finding, the floor a generator can reach
    half = patient_split([real_arc.patient_ids[i] or f"image-{i}" for i in r_order], 0.5, salt=f"fid-halves{seed}")
    r_kept, s_kept = ([], []) if prdc else (None, None)
    halves = [_stream(extractor, real_arc, r_order[m], r_lab, set(), f"features {Path(real).name} ({k + 1}/2)",
                      progress, r_kept) for k, m in enumerate((half, ~half))]
    r_all, r_per = _merged(halves[0][0], halves[1][0]), [_merged(a, b) for a, b in zip(halves[0][1], halves[1][1])]
    s_all, s_per, snaps = _stream(extractor, synth, s_order, s_lab, set(counts), f"features {Path(synthetic).name}",
                                  progress, s_kept)
    real_stats = r_all.stats()
    dev = extractor.device
    curve = [{"n": c, "fid": frechet_distance(snaps[c], real_stats, dev)} for c in counts]
    floor = max(2, min_images)  # one image has no covariance: the summary says the floor applied

    def fid_of(a: StreamingMoments, b: StreamingMoments) -> float:
        return frechet_distance(a.stats(), b.stats(), dev) if min(a.n, b.n) >= floor else float("nan")

    rows = [{"finding": "all", "fid": curve[-1]["fid"], "synthetic_images": s_all.n, "real_images": r_all.n,
             "real_halves_fid": fid_of(halves[0][0], halves[1][0])}]
    for k, (f, sm, rm) in enumerate(zip(findings, s_per, r_per)):
        rows.append({"finding": f, "fid": fid_of(sm, rm), "synthetic_images": sm.n, "real_images": rm.n,
                     "real_halves_fid": fid_of(halves[0][1][k], halves[1][1][k])})
    if prdc:
        from ..fid.prdc import prdc as prdc_of
        (rf, rl), (sf, sl) = _kept(r_kept), _kept(s_kept)
        floor_prdc = max(floor, 6)  # density / coverage need more than k = 5 points a side
        for k, row in enumerate(rows):
            rm, sm = (np.ones(len(rl), bool), np.ones(len(sl), bool)) if k == 0 else (rl[:, k - 1], sl[:, k - 1])
            got = prdc_of(rf[torch.from_numpy(rm)], sf[torch.from_numpy(sm)]) \
                if min(rm.sum(), sm.sum()) >= floor_prdc else {}
            row.update({m: got.get(m, float("nan")) for m in ("precision", "recall", "density", "coverage")})
    fit_from = 2 * extractor.dim  # FID is linear in 1/n well above the feature dimension only (module docs)
    inf = fid_infinity([c["n"] for c in curve], [c["fid"] for c in curve], fit_from)
    summary = {"evaluation": "fid-findings", "synthetic": str(synthetic), "real": str(real),
               "inception": extractor.describe_space(), "features": extractor.space_name, "mode": extractor.mode,
               "min_images": floor, "rows": rows, "curve": curve, "fid_infinity": inf,
               "fid_infinity_counts": [c["n"] for c in curve if c["n"] >= fit_from], "fid_infinity_min_count": fit_from,
               "real_labelled": real_labelled, "synthetic_labelled": synthetic_labelled,
               "findings_not_labelled": not_labelled, "real_images_among_synthetic": len(shared)}
    write_csv(out / "fid_findings.csv", list(rows[0]), [csv_row(r) for r in rows])
    write_csv(out / "fid_vs_n.csv", ["n", "fid"], [csv_row(c) for c in curve])
    write_json(out / "summary.json", summary)
    write_text_atomic(out / "fid_findings.md", format_markdown(summary))
    plot(summary, out / "fid_findings.png")
    return summary


def format_markdown(summary: dict) -> str:
    extra = [m for m in ("precision", "recall", "density", "coverage") if m in summary["rows"][0]]
    lines = [f"FID of the synthetic images with a finding against the real images with it (features: "
             f"{summary.get('features', 'inception')}, {summary['inception']}; {summary['mode']} mode). Small n inflates "
             f"FID; compare a row only with rows of similar n, or with the curve below. Real vs real: the FID between "
             f"two halves (by patient) of the real images with the finding — what two real samples of about that size "
             f"give." + (" Precision (fidelity) and recall (diversity), k = 3; density and coverage, k = 5."
                         if extra else ""), "",
             "| finding | FID | synthetic images | real images | real vs real (halves) |" + "".join(f" {m} |" for m in extra),
             "|---|---|---|---|---|" + "---|" * len(extra)]
    for r in summary["rows"]:
        if r["finding"] != "all" and r["synthetic_images"] == 0 and r["real_images"] == 0:
            continue
        lines.append(f"| {r['finding']} | {number(r['fid'], None)} | {r['synthetic_images']} | {r['real_images']} | "
                     f"{number(r.get('real_halves_fid'), None)} |" + "".join(f" {number(r[m], None)} |" for m in extra))
    lines += ["", "FID of all real images against n synthetic images:", "", "| n | FID |", "|---|---|"]
    lines += [f"| {c['n']} | {number(c['fid'], None)} |" for c in summary["curve"]]
    fitted = summary.get("fid_infinity_counts")
    lines += ["", f"Extrapolated to infinitely many images (FID against 1/n): {number(summary['fid_infinity'], None)}" +
              ("." if fitted is None else
               f" (fitted to n = {', '.join(map(str, fitted))}: the counts of at least "
               f"{summary['fid_infinity_min_count']} images, twice the feature dimension, where FID is linear in 1/n)."
               if len(fitted) >= 3 else
               f" (it needs FIDs at 3 or more counts of at least {summary['fid_infinity_min_count']} synthetic images, "
               f"twice the feature dimension; below that FID is not linear in 1/n: give such --counts)."),
              f"n/a: fewer than {summary['min_images']} images with the finding on one side (precision, recall, "
              f"density and coverage: fewer than {max(summary['min_images'], 6)}, as their 5 nearest neighbours need)." +
              "".join(f" The {side} archive was prepared without finding labels, so no {side} image counts as "
                      f"having one: only the FID of all images is measured." for side in ("real", "synthetic")
                      if not summary.get(f"{side}_labelled", True))]
    if summary.get("findings_not_labelled"):
        lines += [f"Not measured (the synthetic images' classifier does not call them, so they have no labels): "
                  f"{', '.join(summary['findings_not_labelled'])}."]
    return "\n".join(lines) + "\n"


def plot(summary: dict, path) -> None:
    from ..utils.plots import _pyplot, save_figure
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    rows = [r for r in summary["rows"] if is_number(r["fid"])]
    x = np.arange(len(rows))
    axes[0].bar(x - 0.2, [r["fid"] for r in rows], 0.4, label="synthetic vs real")
    axes[0].bar(x + 0.2, [r["real_halves_fid"] if is_number(r.get("real_halves_fid")) else 0 for r in rows], 0.4,
                label="real vs real (halves)", color="grey")
    axes[0].legend(fontsize=7)
    axes[0].set_xticks(range(len(rows)))
    axes[0].set_xticklabels([f"{r['finding']}\n(n={r['synthetic_images']})" for r in rows], rotation=45, ha="right",
                            fontsize=7)
    axes[0].set_ylabel("FID")
    axes[0].set_title("per finding")
    n = [c["n"] for c in summary["curve"]]
    axes[1].plot(n, [c["fid"] for c in summary["curve"]], "o-", label="FID(n)")
    inf = summary["fid_infinity"]
    if is_number(inf):
        axes[1].axhline(inf, color="grey", ls="--", lw=1, label=f"FID∞ ≈ {inf:.2f}")
    axes[1].set_xscale("log")
    axes[1].set_xlabel("synthetic images")
    axes[1].set_ylabel("FID against all real images")
    axes[1].set_title("FID against sample count")
    axes[1].legend()
    save_figure(fig, path)
