"""`xrayforge evaluate diversity RUN --classifier MODEL --real ARCHIVE --n N --out DIR`: which
findings does the generator produce, how often, and in which combinations?

N unconditional images are generated (never written) and classified as `sample` would store them
(clamped to [-1, 1] and quantised to the real archive's 8 or 16 bits, the pixels a real image has:
the generator's raw output overshoots that range, which the classifier never saw); their predicted
finding prevalences, and the prevalences of every pair of findings, are set against the real
archive's.
The fair comparison is with the classifier's predictions on real images (its errors hit both
sides alike); the real labels' prevalences are listed beside them (n/a where the labels are
unknown: an archive prepared without labels, or a sample folder's findings its classifier did not
call, which its converted archive holds as 0). A finding is under-produced when its synthetic
prevalence is below ``ratio`` × the real one and the Wilson 95% interval of the synthetic
prevalence lies wholly below the real prevalence's own Wilson interval (over-produced: the mirror
image). Both are estimates: 0 real hits in 100 do not rule out a rare
finding, nor does 1 in 100 pin it at 1% (against the real point alone, a synthetic 3% would be
over-produced against 1 real hit in 100 and not against 0).

The real reference is only the real images the classifier did not train on. On the images it was
fitted to a classifier is more confident, and closer to their labels, than on unseen ones, and the
synthetic images are unseen: set against its training images, the synthetic prevalences would
differ by its overfitting as well as by the generator. Where the real archive is the classifier's
training archive (its training.json names it by the SHA-1 of the manifest, ``training_data``),
the images of the patients it was fitted to are left out (its validation patients and the
archive's "test" split remain); another archive, or a sample folder, is used whole. Where that
cannot be told (a classifier without the record: older, or trained elsewhere), every image is
used, with a warning. ``summary.json`` says which (``real_reference``), with the counts.

Outputs: findings.csv, pairs.csv, cooccurrence.png (real, synthetic, and their log2 ratio),
grids/<finding>.png (the synthetic images most confidently called positive), diversity.md,
summary.json.
"""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from ..utils.files import save_numpy, write_csv, write_json, write_text_atomic
from ..nn import find_checkpoint, latents_for, load_networks
from ..nn.classifier import load_classifier
from ..nn.latents import check_truncation
from ..utils.images import as_stored, grid, save_png, to_uint
from ._format import csv_row, is_number, number
from .classifier import LabelledImages, held_out_positions, predict, recorded_training
from .labelled import archive_id, labelled_findings, open_labelled
from .metrics import _log_comb, wilson_interval
from ..utils.files import claim_output

log = logging.getLogger(__name__)

THUMB = 128
MIN_HELD_OUT = 100  # fewer real images the classifier did not train on cannot give a prevalence worth comparing

# summary.json's "real_reference"
HELD_OUT = "held out from the classifier"
INCLUDES_TRAINING = "includes the classifier's training images"
OTHER_ARCHIVE = "not the classifier's training archive"
UNKNOWN = "unknown"


def cooccurrence(labels: np.ndarray) -> np.ndarray:
    """(F, F) fraction of images with both findings i and j (the diagonal: each finding's prevalence)."""
    y = labels.astype(np.float64)
    return (y.T @ y) / max(len(y), 1)


def combinations(labels: np.ndarray, size: int | None = None) -> dict:
    """How many distinct finding combinations occur, and the entropy of their distribution (bits);
    with ``size`` (at most len(labels)), also ``distinct_in_size``: the expected number among ``size``
    of the images drawn without replacement (rarefaction). More images show more of the rare
    combinations, so sets of different sizes compare only at one size."""
    if not len(labels):
        return {"distinct": 0, "entropy_bits": 0.0, **({"distinct_in_size": 0.0} if size is not None else {})}
    _, counts = np.unique(labels.astype(np.int8), axis=0, return_counts=True)
    p = counts / counts.sum()
    out = {"distinct": int(len(counts)), "entropy_bits": float(max(0.0, -(p * np.log2(p)).sum()))}
    if size is not None:
        n = len(labels)
        if not 0 <= size <= n:
            raise ValueError(f"size {size}: not between 0 and the {n} images")
        # P(a combination seen k times is missed by `size` draws) = C(n - k, size) / C(n, size)
        missed = [math.exp(_log_comb(n - k, size) - _log_comb(n, size)) if n - k >= size else 0.0
                  for k in counts.tolist()]
        out["distinct_in_size"] = float(len(counts) - sum(missed))
    return out


def prevalence_rows(findings, synth_pred: np.ndarray, real_pred: np.ndarray, real_true: np.ndarray,
                    ratio: float = 0.5) -> list[dict]:
    """Per finding: prevalences (real labels, real and synthetic predictions), the Wilson 95%
    interval of the synthetic one, their ratio, and the under-/over-produced flags."""
    rows = []
    for k, f in enumerate(findings):
        s, r = float(synth_pred[:, k].mean()), float(real_pred[:, k].mean())
        lo, hi = wilson_interval(int(synth_pred[:, k].sum()), len(synth_pred))
        rel = s / r if r > 0 else float("nan")
        # the real prevalence is an estimate too: a flag needs the two intervals apart
        real_lo, real_hi = wilson_interval(int(real_pred[:, k].sum()), len(real_pred))
        rows.append({"finding": f, "real_label_prevalence": float(real_true[:, k].mean()),
                     "real_predicted_prevalence": r, "synthetic_predicted_prevalence": s, "synthetic_ci95_low": lo,
                     "synthetic_ci95_high": hi, "ratio": rel,
                     "under_produced": int(r > 0 and rel < ratio and hi < real_lo),
                     "over_produced": int((r == 0 or rel > 1 / ratio) and lo > real_hi)})
    return rows


class _TopK:
    """The k images with the highest probability of one finding among those called positive."""

    def __init__(self, k: int):
        self.k, self.scores, self.images = k, np.zeros(0), np.zeros((0, THUMB, THUMB), dtype=np.uint8)

    def add(self, scores: np.ndarray, images: np.ndarray) -> None:
        s = np.concatenate([self.scores, scores])
        im = np.concatenate([self.images, images])
        keep = np.argsort(-s, kind="mergesort")[:self.k]
        self.scores, self.images = s[keep], im[keep]


def _thumbs(images: torch.Tensor) -> np.ndarray:
    x = images[:, :1].float()
    if x.shape[-1] != THUMB:
        x = torch.nn.functional.interpolate(x, size=(THUMB, THUMB), mode="bilinear", align_corners=False,
                                            antialias=x.shape[-1] > THUMB)
    return to_uint(x, 8)


def real_reference(classifier: str | os.PathLike, real_arc, real: str, include_training: bool = False) -> dict:
    """Which images of ``real_arc`` (the archive of ``--real``) the classifier's calls on real images
    are taken from: ``positions`` (manifest positions), ``real_reference`` (HELD_OUT, INCLUDES_TRAINING,
    OTHER_ARCHIVE or UNKNOWN), ``excluded`` (the classifier's training images left out) and ``note``
    (a sentence for diversity.md). Only images of patients the classifier was not fitted to, where
    its training record names this archive (``include_training``: every image, said so)."""
    every = np.arange(len(real_arc))
    record = recorded_training(classifier)
    if record is None:
        log.warning("%s: records no training data (no training_data in training.json: trained by an older "
                    "xrayforge, by `evaluate tstr`, or elsewhere), so the real reference cannot leave out the images "
                    "it trained on; all %d images of %s are used, and the comparison is biased where they are among "
                    "them (a classifier is more confident on its training images)", classifier, len(real_arc), real)
        return {"positions": every, "real_reference": UNKNOWN, "excluded": 0,
                "note": "the classifier records no training data (training.json), so these may include images it "
                        "trained on, on which it is more confident than on the synthetic images"}
    if archive_id(real_arc.path) != record["archive_id"]:
        same_place = bool(record.get("archive")) and Path(record["archive"]).resolve() == Path(real_arc.path).resolve()
        source, theirs = str(real_arc.meta.get("source") or ""), str(record.get("source") or "")
        # phantom:N is phantoms 0 to N-1: two phantom archives share their first images
        same_source = bool(source) and (source == theirs or source.startswith("phantom:") and
                                         theirs.startswith("phantom:"))
        if same_place or same_source:  # most likely some of the same images, prepared again or resumed
            log.warning("%s: %s, but its manifest is not the one the classifier %s trained on (%s); which of its "
                        "images the classifier trained on cannot be told, so all %d are used, and the comparison is "
                        "biased where they are among them", real,
                        "the classifier's training archive" if same_place else
                        f"prepared from {source}, as the classifier's training archive was from {theirs}", classifier,
                        record.get("archive"), len(real_arc))
            return {"positions": every, "real_reference": UNKNOWN, "excluded": 0,
                    "note": f"prepared {'at the place' if same_place else 'from the source'} of the classifier's "
                            f"training archive but not that archive, so these may include images it trained on"}
        return {"positions": every, "real_reference": OTHER_ARCHIVE, "excluded": 0,
                "note": f"the classifier trained on {record.get('archive')}, another archive"}
    if include_training:
        trained = int(record["trained_on"].sum())
        log.warning("%s: all %d images, the %d the classifier %s trained on included (--include-training-images): "
                    "it is more confident on those than on the synthetic images", real, len(real_arc), trained,
                    classifier)
        return {"positions": every, "real_reference": INCLUDES_TRAINING, "excluded": 0,
                "note": f"the classifier's training archive with its {trained} training images "
                        f"(--include-training-images), on which it is more confident than on the synthetic images"}
    held = held_out_positions(real_arc, record["trained_on"])
    if len(held) < MIN_HELD_OUT:
        raise UserError(f"{real}: only {len(held)} of its {len(real_arc)} images are of patients the classifier "
                        f"{classifier} did not train on ({int(record['trained_on'].sum())} images trained on, with "
                        f"their patients' other images); at least {MIN_HELD_OUT} are needed for real prevalences worth "
                        f"comparing. Give another --real archive, or --include-training-images to compare against the "
                        f"training images as well (biased)")
    test = int(real_arc.held_out()[held].sum())
    others = "images outside its training subset and its validation patients" if record.get("pool") == "subset" \
        else "its validation patients"
    return {"positions": held, "real_reference": HELD_OUT, "excluded": int(len(real_arc) - len(held)),
            "note": f"the {len(held)} images of the {len(real_arc)} in its training archive whose patients it did not "
                    f"train on ({test} of the archive's test split, {len(held) - test} of {others})"}


def diversity(run: str, classifier: str, real: str, out: str | os.PathLike, n: int = 10000, seed: int = 0,
              batch: int = 64, truncation: float | None = None, real_limit: int | None = 5000, per_grid: int = 16,
              ratio: float = 0.5, device: str | None = None, progress: bool = True,
              include_training: bool = False) -> dict:
    if n < 1:
        raise ValueError(f"--n must be at least 1, got {n}")
    check_truncation(truncation, "--truncation")  # before any work, as `sample` does
    out = claim_output(out, "evaluate diversity", signatures=("findings.csv",))
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = load_classifier(classifier).to(dev).eval().requires_grad_(False)
    real_arc = open_labelled(real, out, progress)
    findings = [f for f in model.findings if f in real_arc.findings]
    if not findings:
        raise ValueError(f"the classifier's findings {model.findings} are not labelled in {real}")
    reference = real_reference(classifier, real_arc, real, include_training)  # before the generator's work
    cols = [model.findings.index(f) for f in findings]
    thr = np.array([model.threshold(f) for f in findings])
    checkpoint = find_checkpoint(run)
    G = load_networks(checkpoint, names=["G_ema"], map_location=dev)["G_ema"].eval().requires_grad_(False)
    if G.config.image_channels != 1:  # as `sample --classifier` refuses it, before any work
        raise UserError(f"{checkpoint}: its generator makes {G.config.image_channels}-channel images, and the "
                        f"classifier {classifier} takes grey (one-channel) images")

    bits = 8 * real_arc.dtype.itemsize  # quantised as the real images are (8 or 16 bits)
    from tqdm import tqdm
    synth_probs, tops = [], {f: _TopK(per_grid) for f in findings}
    for start in tqdm(range(0, n, batch), desc="generate and classify", unit="batch", disable=not progress,
                      dynamic_ncols=True):
        z = latents_for(seed, range(start, min(start + batch, n)), G.config.latent_dim, truncation).to(dev)
        with torch.no_grad():
            images = G(z).float()
            finite = bool(torch.isfinite(images).all())  # before clamping, which would make inf look fine
            images = as_stored(images, bits)  # the pixels `sample` writes and real images have
            p = torch.sigmoid(model(images).float()).cpu().numpy()[:, cols]
        if not (finite and np.isfinite(p).all()):  # NaN is never >= a threshold: every finding 'never produced'
            who = f"{run}: the generator's images" if not finite else f"{classifier}: the classifier's probabilities"
            raise UserError(f"{who} are not finite (NaN or inf; from sample {start} on): a diverged checkpoint?")
        synth_probs.append(p)
        positive = p >= thr
        if positive.any():
            thumbs = _thumbs(images[torch.from_numpy(positive.any(1)).to(dev)].cpu())
            rows = np.flatnonzero(positive.any(1))
            for k, f in enumerate(findings):
                sel = positive[rows, k]
                if sel.any():
                    tops[f].add(p[rows[sel], k], thumbs[sel])
    synth_probs = np.concatenate(synth_probs)
    synth_pred = synth_probs >= thr

    every = reference["positions"]
    if real_limit is not None and real_limit < len(every):  # that many, evenly spread over the reference
        every = every[np.unique(np.linspace(0, len(every) - 1, real_limit).round().astype(np.int64))]
    real_set = LabelledImages([(real_arc, every)], findings)
    real_probs = predict(model, real_set, np.arange(len(real_set)), dev, batch)[:, cols]
    if not np.isfinite(real_probs).all():
        raise UserError(f"{classifier}: the classifier's probabilities on the real images of {real} are not finite "
                        f"(NaN or inf): a diverged model?")
    real_pred = real_probs >= thr
    real_true = real_arc.labels[every][:, [real_arc.findings.index(f) for f in findings]].astype(np.float64)
    if not real_arc.meta.get("labelled", True):  # prepared without a label file: its labels are unknown, not 0
        real_true[:] = np.nan
    known = labelled_findings(real, real_arc)  # a sample folder's: only the findings its classifier called
    real_true[:, [k for k, f in enumerate(findings) if f not in known]] = np.nan

    rows = prevalence_rows(findings, synth_pred, real_pred, real_true, ratio)
    co_s, co_r, co_t = cooccurrence(synth_pred), cooccurrence(real_pred), cooccurrence(real_true)
    pairs = []
    for i in range(len(findings)):
        for j in range(i + 1, len(findings)):
            pairs.append({"finding_a": findings[i], "finding_b": findings[j], "real_label_prevalence": co_t[i, j],
                          "real_predicted_prevalence": co_r[i, j], "synthetic_predicted_prevalence": co_s[i, j],
                          "ratio": co_s[i, j] / co_r[i, j] if co_r[i, j] > 0 else float("nan")})
    # summary.json last, and an earlier run's gone first: where it exists, the rest is complete and of its run
    (out / "summary.json").unlink(missing_ok=True)
    (out / "grids").mkdir(exist_ok=True)
    grids = {}
    for f, top in tops.items():
        if len(top.scores):
            path = out / "grids" / f"{f}.png"
            save_png(grid(top.images, columns=min(8, len(top.images))), path)
            grids[f] = str(path.relative_to(out))
    for stale in (out / "grids").glob("*.png"):  # an earlier run's grid of a finding this run never called
        if str(stale.relative_to(out)) not in grids.values():
            stale.unlink()
    common = min(len(synth_pred), len(real_pred))  # distinct combinations compare only at one size
    summary = {"evaluation": "diversity", "run": str(run), "classifier": str(classifier), "real": str(real),
               "synthetic_images": int(n), "real_images": int(len(real_set)),
               "real_reference": reference["real_reference"], "real_reference_note": reference["note"],
               "real_available": int(len(reference["positions"])), "real_excluded": reference["excluded"],
               "checkpoint": str(checkpoint), "seed": seed, "truncation": truncation, "ratio": ratio,
               "findings": rows, "pairs": pairs, "grids": grids,
               "combinations": {"synthetic": combinations(synth_pred, common), "real_predicted":
                                combinations(real_pred, common), "common_size": common},
               "under_produced": [r["finding"] for r in rows if r["under_produced"]],
               "over_produced": [r["finding"] for r in rows if r["over_produced"]],
               "never_produced": [r["finding"] for r in rows if r["real_predicted_prevalence"] > 0
                                  and r["synthetic_predicted_prevalence"] == 0]}
    write_csv(out / "findings.csv", list(rows[0]), [csv_row(r) for r in rows])
    if pairs:
        write_csv(out / "pairs.csv", list(pairs[0]), [csv_row(p) for p in pairs])
    else:  # one finding: no pairs, and an earlier run's pairs.csv is not this run's
        (out / "pairs.csv").unlink(missing_ok=True)
    save_numpy(out / "cooccurrence.npz", findings=np.array(findings), synthetic=co_s, real_predicted=co_r,
               real_labels=co_t)
    plot_cooccurrence(findings, co_r, co_s, out / "cooccurrence.png")
    write_text_atomic(out / "diversity.md", format_markdown(summary))
    write_json(out / "summary.json", summary)
    return summary


def format_markdown(summary: dict) -> str:
    truncated = f" (latents truncated at ±{summary['truncation']:g})" \
        if summary.get("truncation") is not None else ""
    lines = [f"Findings the classifier calls in {summary['synthetic_images']} unconditional samples{truncated}, "
             f"against {summary['real_images']} real images (prevalence, %; synthetic with its Wilson 95% "
             f"interval).", "",
             *([_reference_sentence(summary), ""] if "real_reference" in summary else []),
             "| finding | real (labels) | real (predicted) | synthetic (predicted) | synthetic / real |",
             "|---|---|---|---|---|"]
    unseen = [r["finding"] for r in summary["findings"]
              if not any(is_number(r[k]) and r[k] for k in ("real_label_prevalence", "real_predicted_prevalence",
                                                             "synthetic_predicted_prevalence"))]
    for r in summary["findings"]:
        if r["finding"] in unseen:
            continue
        mark = " ▼" if r["under_produced"] else (" ▲" if r["over_produced"] else "")
        lines.append(f"| {r['finding']} | {number(_pct(r['real_label_prevalence']), 1)} | "
                     f"{number(_pct(r['real_predicted_prevalence']), 1)} | "
                     f"{number(_pct(r['synthetic_predicted_prevalence']), 1)} "
                     f"({number(_pct(r['synthetic_ci95_low']), 1)}–{number(_pct(r['synthetic_ci95_high']), 1)}) | "
                     f"{number(r['ratio'], 2)}{mark} |")
    c = summary["combinations"]
    lines += ["", f"Under-produced (▼): {', '.join(summary['under_produced']) or 'none'}; over-produced (▲): "
              f"{', '.join(summary['over_produced']) or 'none'}; never produced: "
              f"{', '.join(summary['never_produced']) or 'none'}." +
              (f" Seen on neither side: {', '.join(unseen)}." if unseen else ""),
              f"Distinct finding combinations: {c['synthetic']['distinct']} in the samples (entropy "
              f"{c['synthetic']['entropy_bits']:.2f} bits) vs {c['real_predicted']['distinct']} in the real images "
              f"({c['real_predicted']['entropy_bits']:.2f} bits)" +
              (f"; expected in {c['common_size']} images of each (more images show more rare combinations): "
               f"{c['synthetic']['distinct_in_size']:.1f} vs {c['real_predicted']['distinct_in_size']:.1f}."
               if "common_size" in c else ".")]
    top = sorted((p for p in summary["pairs"] if (p["real_predicted_prevalence"] or 0) > 0),
                 key=lambda p: -p["real_predicted_prevalence"])[:10]
    if top:
        lines += ["", "Most common pairs in the real images (prevalence, %):", "",
                  "| pair | real (predicted) | synthetic (predicted) |", "|---|---|---|"]
        lines += [f"| {p['finding_a']} + {p['finding_b']} | {number(_pct(p['real_predicted_prevalence']), 2)} | "
                  f"{number(_pct(p['synthetic_predicted_prevalence']), 2)} |" for p in top]
    return "\n".join(lines) + "\n"


def _reference_sentence(summary: dict) -> str:
    """What the real images are, against the classifier's training data (older summaries: none)."""
    available = summary.get("real_available", summary["real_images"])
    used = f"{summary['real_images']} of them used, evenly spread" if summary["real_images"] < available else \
        f"all {available} used"
    return f"Real reference: {summary['real_reference']}: {summary.get('real_reference_note', '')}; {used}."


def _pct(v):
    return 100 * v if is_number(v) else None


def plot_cooccurrence(findings, real: np.ndarray, synth: np.ndarray, path) -> None:
    from ..utils.plots import _pyplot, save_figure
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(16, 5))
    top = max(real.max(), synth.max(), 1e-9)
    with np.errstate(divide="ignore", invalid="ignore"):
        log_ratio = np.clip(np.log2(synth / real), -2, 2)  # never produced: -2; NaN (blank): neither side has it
    for ax, m, title, cmap, lim in ((axes[0], real, "real (predicted)", "viridis", (0, top)),
                                    (axes[1], synth, "synthetic (predicted)", "viridis", (0, top)),
                                    (axes[2], log_ratio, "log2(synthetic / real), clipped to ±2", "coolwarm", (-2, 2))):
        im = ax.imshow(m, cmap=cmap, vmin=lim[0], vmax=lim[1])
        ax.set_xticks(range(len(findings)))
        ax.set_yticks(range(len(findings)))
        ax.set_xticklabels(findings, rotation=60, ha="right", fontsize=7)
        ax.set_yticklabels(findings, fontsize=7)
        ax.set_title(title)
        fig.colorbar(im, ax=ax, fraction=0.046)
    save_figure(fig, path)
