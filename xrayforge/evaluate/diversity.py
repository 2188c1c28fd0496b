"""`xrayforge evaluate diversity RUN --classifier MODEL --real ARCHIVE --n N --out DIR`: which
findings does the generator produce, how often, and in which combinations?

N unconditional images are generated (never written) and classified; their predicted finding
prevalences, and the prevalences of every pair of findings, are set against the real archive's.
The fair comparison is with the classifier's predictions on real images (its errors hit both
sides alike); the real labels' prevalences are listed beside them. A finding is under-produced
when its synthetic prevalence is below ``ratio`` × the real one and the Wilson 95% interval of
the synthetic prevalence lies wholly below the real one (over-produced: the mirror image; for a
finding the classifier never calls on the real images, when that interval lies wholly above the
real prevalence's own Wilson interval).

Outputs: findings.csv, pairs.csv, cooccurrence.png (real, synthetic, and their log2 ratio),
grids/<finding>.png (the synthetic images most confidently called positive), diversity.md,
summary.json.
"""
from __future__ import annotations

import os

import numpy as np
import torch

from ..errors import UserError
from ..utils.files import save_numpy, write_csv, write_json, write_text_atomic
from ..nn import find_checkpoint, latents_for, load_networks
from ..nn.classifier import load_classifier
from ..nn.latents import check_truncation
from ..utils.images import grid, save_png, to_uint
from ._format import csv_row, is_number, number
from .classifier import LabelledImages, predict
from .labelled import open_labelled
from .metrics import wilson_interval
from ..utils.files import claim_output

THUMB = 128


def cooccurrence(labels: np.ndarray) -> np.ndarray:
    """(F, F) fraction of images with both findings i and j (the diagonal: each finding's prevalence)."""
    y = labels.astype(np.float64)
    return (y.T @ y) / max(len(y), 1)


def combinations(labels: np.ndarray) -> dict:
    """How many distinct finding combinations occur, and the entropy of their distribution (bits)."""
    if not len(labels):
        return {"distinct": 0, "entropy_bits": 0.0}
    _, counts = np.unique(labels.astype(np.int8), axis=0, return_counts=True)
    p = counts / counts.sum()
    return {"distinct": int(len(counts)), "entropy_bits": float(max(0.0, -(p * np.log2(p)).sum()))}


def prevalence_rows(findings, synth_pred: np.ndarray, real_pred: np.ndarray, real_true: np.ndarray,
                    ratio: float = 0.5) -> list[dict]:
    """Per finding: prevalences (real labels, real and synthetic predictions), the Wilson 95%
    interval of the synthetic one, their ratio, and the under-/over-produced flags."""
    rows = []
    for k, f in enumerate(findings):
        s, r = float(synth_pred[:, k].mean()), float(real_pred[:, k].mean())
        lo, hi = wilson_interval(int(synth_pred[:, k].sum()), len(synth_pred))
        rel = s / r if r > 0 else float("nan")
        rows.append({"finding": f, "real_label_prevalence": float(real_true[:, k].mean()),
                     "real_predicted_prevalence": r, "synthetic_predicted_prevalence": s, "synthetic_ci95_low": lo,
                     "synthetic_ci95_high": hi, "ratio": rel,
                     "under_produced": int(r > 0 and rel < ratio and hi < r),
                     # a finding the classifier never calls on the real images: over-produced once the
                     # synthetic interval lies above the real one's (0 hits cannot rule out a rare finding)
                     "over_produced": int(rel > 1 / ratio and lo > r if r > 0 else
                                          lo > wilson_interval(0, len(real_pred))[1])})
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


def diversity(run: str, classifier: str, real: str, out: str | os.PathLike, n: int = 10000, seed: int = 0,
              batch: int = 64, truncation: float | None = None, real_limit: int | None = 5000, per_grid: int = 16,
              ratio: float = 0.5, device: str | None = None, progress: bool = True) -> dict:
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
    cols = [model.findings.index(f) for f in findings]
    thr = np.array([model.threshold(f) for f in findings])
    G = load_networks(find_checkpoint(run), names=["G_ema"], map_location=dev)["G_ema"].eval().requires_grad_(False)

    from tqdm import tqdm
    synth_probs, tops = [], {f: _TopK(per_grid) for f in findings}
    for start in tqdm(range(0, n, batch), desc="generate and classify", unit="batch", disable=not progress,
                      dynamic_ncols=True):
        z = latents_for(seed, range(start, min(start + batch, n)), G.config.latent_dim, truncation).to(dev)
        with torch.no_grad():
            images = G(z).float()
            p = torch.sigmoid(model(images).float()).cpu().numpy()[:, cols]
        if not np.isfinite(p).all():  # NaN is never >= a threshold: every finding would be 'never produced'
            who = f"{run}: the generator's images" if not torch.isfinite(images).all() else \
                f"{classifier}: the classifier's probabilities"
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

    every = np.arange(len(real_arc))
    if real_limit is not None and real_limit < len(every):  # that many, evenly spread over the archive
        every = np.unique(np.linspace(0, len(real_arc) - 1, real_limit).round().astype(np.int64))
    real_set = LabelledImages([(real_arc, every)], findings)
    real_probs = predict(model, real_set, np.arange(len(real_set)), dev, batch)[:, cols]
    if not np.isfinite(real_probs).all():
        raise UserError(f"{classifier}: the classifier's probabilities on the real images of {real} are not finite "
                        f"(NaN or inf): a diverged model?")
    real_pred = real_probs >= thr
    real_true = real_arc.labels[every][:, [real_arc.findings.index(f) for f in findings]].astype(np.float64)
    if not real_arc.meta.get("labelled", True):  # prepared without a label file: its labels are unknown, not 0
        real_true[:] = np.nan

    rows = prevalence_rows(findings, synth_pred, real_pred, real_true, ratio)
    co_s, co_r, co_t = cooccurrence(synth_pred), cooccurrence(real_pred), cooccurrence(real_true)
    pairs = []
    for i in range(len(findings)):
        for j in range(i + 1, len(findings)):
            pairs.append({"finding_a": findings[i], "finding_b": findings[j], "real_label_prevalence": co_t[i, j],
                          "real_predicted_prevalence": co_r[i, j], "synthetic_predicted_prevalence": co_s[i, j],
                          "ratio": co_s[i, j] / co_r[i, j] if co_r[i, j] > 0 else float("nan")})
    (out / "grids").mkdir(exist_ok=True)
    grids = {}
    for f, top in tops.items():
        if len(top.scores):
            path = out / "grids" / f"{f}.png"
            save_png(grid(top.images, columns=min(8, len(top.images))), path)
            grids[f] = str(path.relative_to(out))
    summary = {"evaluation": "diversity", "run": str(run), "classifier": str(classifier), "real": str(real),
               "synthetic_images": int(n), "real_images": int(len(real_set)), "seed": seed, "ratio": ratio,
               "findings": rows, "pairs": pairs, "grids": grids,
               "combinations": {"synthetic": combinations(synth_pred), "real_predicted": combinations(real_pred)},
               "under_produced": [r["finding"] for r in rows if r["under_produced"]],
               "over_produced": [r["finding"] for r in rows if r["over_produced"]],
               "never_produced": [r["finding"] for r in rows if r["real_predicted_prevalence"] > 0
                                  and r["synthetic_predicted_prevalence"] == 0]}
    write_csv(out / "findings.csv", list(rows[0]), [csv_row(r) for r in rows])
    if pairs:
        write_csv(out / "pairs.csv", list(pairs[0]), [csv_row(p) for p in pairs])
    save_numpy(out / "cooccurrence.npz", findings=np.array(findings), synthetic=co_s, real_predicted=co_r,
               real_labels=co_t)
    plot_cooccurrence(findings, co_r, co_s, out / "cooccurrence.png")
    write_json(out / "summary.json", summary)
    write_text_atomic(out / "diversity.md", format_markdown(summary))
    return summary


def format_markdown(summary: dict) -> str:
    lines = [f"Findings the classifier calls in {summary['synthetic_images']} unconditional samples, against "
             f"{summary['real_images']} real images (prevalence, %; synthetic with its Wilson 95% interval).", "",
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
              f"({c['real_predicted']['entropy_bits']:.2f} bits)."]
    top = sorted((p for p in summary["pairs"] if (p["real_predicted_prevalence"] or 0) > 0),
                 key=lambda p: -p["real_predicted_prevalence"])[:10]
    if top:
        lines += ["", "Most common pairs in the real images (prevalence, %):", "",
                  "| pair | real (predicted) | synthetic (predicted) |", "|---|---|---|"]
        lines += [f"| {p['finding_a']} + {p['finding_b']} | {number(_pct(p['real_predicted_prevalence']), 2)} | "
                  f"{number(_pct(p['synthetic_predicted_prevalence']), 2)} |" for p in top]
    return "\n".join(lines) + "\n"


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
