"""`xrayforge evaluate tstr --synthetic S --real R --out DIR`: train on synthetic, test on real.

The classifier is trained three times with the same image budget N: on N synthetic images, on
N real training images, and on N/2 of each; every model is tested on the same held-out real
images (the real archive's "test" split, or a patient-level split when it has none), with
per-finding AUROC and a patient-level bootstrap 95% interval. A synthetic set that teaches as
much as real images do is one whose findings look like real findings.

Outputs: tstr.csv (one row per training set and finding), tstr.md, tstr.png, summary.json,
models/<set>/ (each trained model, with its test-set probabilities). A run that stops
continues with the models still missing.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..utils.files import (claim_output, load_npy, read_json, same_settings, save_numpy, write_csv, write_json,
                           write_text_atomic)
from .classifier import ClassifierTraining, LabelledImages, fit, predict
from .labelled import (archive_id, check_inputs, is_sample_folder, labelled_findings, open_labelled, real_images_among,
                       same_images, sample_id)
from ._format import csv_row, is_number, number
from .metrics import auroc, bootstrap_auroc, patient_split

TRAINING_SETS = ("real", "synthetic", "real+synthetic")


@dataclass
class TSTRConfig(ClassifierTraining):
    synthetic: str
    real: str
    out: str
    budget: int | None = None          # images per training set (default: as many as both sides allow)
    test_fraction: float = 0.2         # of the real patients, when the real archive has no "test" split
    bootstrap: int = 1000


def real_test_split(archive, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(training positions, test positions) of the real archive: its "test" split (with its patients'
    other images), else a patient-level split of about ``fraction`` of the patients."""
    test = archive.held_out()
    if not test.any():
        test = patient_split([p or f"image-{i}" for i, p in enumerate(archive.patient_ids)], fraction,
                             salt=f"tstr-test{seed}")
    return np.flatnonzero(~test), np.flatnonzero(test)


def _choose(positions: np.ndarray, k: int, rng) -> np.ndarray:
    return np.sort(rng.choice(positions, k, replace=False)) if k < len(positions) else np.sort(positions)


def run_tstr(cfg: TSTRConfig, progress: bool = True) -> dict:
    check_inputs(cfg.synthetic, cfg.real)  # before --out is claimed
    real_id, synthetic_id = archive_id(cfg.real), archive_id(cfg.synthetic)
    same = same_images(cfg.synthetic, cfg.real)
    if same:  # every "synthetic" image is trained on, test images too
        raise UserError(f"--synthetic {cfg.synthetic} is the real archive --real {cfg.real} ({same}): "
                        f"the synthetic training set would hold the real test images")
    out = claim_output(cfg.out, "evaluate tstr", signatures=("tstr_config.json",))
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("device", "out")}
    # the synthetic images themselves: a folder sampled again under the same name must not meet the
    # models trained on its earlier samples (outputs from before this was kept cannot be checked)
    settings["synthetic_id"] = sample_id(cfg.synthetic) if is_sample_folder(cfg.synthetic) else None
    # and so must prepared archives prepared again at the same path: the models' test-set probabilities
    # are kept per test image of the real archive
    settings["real_archive_id"], settings["synthetic_archive_id"] = real_id, synthetic_id
    settings_path = out / "tstr_config.json"
    if settings_path.is_file():  # the same folder spelt otherwise (samp/, ./samp, its absolute path) continues
        saved = read_json(settings_path, "saved settings")
        for key in ("synthetic", "real"):
            if isinstance(saved.get(key), str) and Path(saved[key]).resolve() == Path(settings[key]).resolve():
                settings[key] = saved[key]
    # --bootstrap only resamples the saved test-set probabilities: a finished run measured again with more
    # resamples keeps its models (refused, it needed a new --out and all three models trained again)
    same_settings(settings_path, settings, ignore=("bootstrap",),
                  added={k: settings[k] for k in ("synthetic_id", "real_archive_id", "synthetic_archive_id")})
    real = open_labelled(cfg.real, out, progress)
    if real.labels.sum() == 0:  # before a sample folder is converted for nothing
        raise ValueError(f"{cfg.real}: the real archive has no finding labels")
    synth = open_labelled(cfg.synthetic, out, progress)
    if synth.labels.sum() == 0:
        raise ValueError(f"{cfg.synthetic}: no synthetic image has a finding (all labels are 0)")
    # a sample folder's classifier may call fewer findings than the archives name: its images' 0 for the
    # others is no label, and would teach the synthetic-trained models that none of them has the finding
    known = labelled_findings(cfg.real, real), labelled_findings(cfg.synthetic, synth)
    findings = [f for f in real.findings if f in known[0] and f in known[1]]
    not_labelled = [f for f in real.findings if f in synth.findings and f not in findings]
    if not findings:
        raise ValueError(f"{cfg.synthetic} and {cfg.real} have no finding labelled on both sides")
    real_train, real_test = real_test_split(real, cfg.test_fraction, cfg.seed)
    if len(real_test) < 2 or len(real_train) < 4:
        how = ("its 'test' split (with its patients' other images; --test-fraction applies only to an archive "
               "without one)" if real.held_out().any() else f"--test-fraction {cfg.test_fraction} of its patients")
        raise ValueError(f"{cfg.real}: {len(real_train)} training and {len(real_test)} test images, split by {how}; "
                         f"too few (at least 4 and 2) to train and test on")
    leaked = np.flatnonzero(real_images_among(synth, real)[real_test])
    if len(leaked):  # the synthetic-trained models would be tested on images they were fitted to
        raise UserError(f"--synthetic {cfg.synthetic}: holds {len(leaked)} of the {len(real_test)} real test images of "
                        f"--real {cfg.real} (first: {real.records[real_test[leaked[0]]]['source']}), so the models "
                        f"trained on it would be tested on their own training images; give the generator's samples, "
                        f"or a real archive without them")
    synth_all = np.arange(len(synth))
    budget = cfg.budget or min(len(real_train), len(synth_all))
    if budget > len(real_train) or budget > len(synth_all):
        raise ValueError(f"--budget {budget} is more than the {len(real_train)} real training images or the "
                         f"{len(synth_all)} synthetic images")
    if budget < 8:
        raise ValueError(f"--budget {budget} is too small to train a classifier (at least 8 images)" if cfg.budget else
                         f"a budget of {budget} images (the smaller of the {len(synth_all)} synthetic images of "
                         f"{cfg.synthetic} and the {len(real_train)} real training images of {cfg.real}) is too small "
                         f"to train a classifier (at least 8)")
    rng = np.random.default_rng(cfg.seed)
    half = budget // 2
    plans = {"real": [(real, _choose(real_train, budget, rng))],
             "synthetic": [(synth, _choose(synth_all, budget, rng))],
             "real+synthetic": [(real, _choose(real_train, half, rng)), (synth, _choose(synth_all, budget - half, rng))]}
    trains = {name: LabelledImages(plans[name], findings) for name in TRAINING_SETS}
    vals = {name: patient_split(t.patient_ids, cfg.val_fraction, salt=f"tstr-val{cfg.seed}") for name, t in trains.items()}
    for name, val in vals.items():  # every set's, before anything is trained or saved
        if val.all() or not val.any():
            raise ValueError(f"the validation split of the {name} training set ({budget} images) left one side "
                             f"empty; change --val-fraction (now {cfg.val_fraction}) or raise --budget")
    write_text_atomic(settings_path, json.dumps(settings, indent=2))
    test = LabelledImages([(real, real_test)], findings)
    test_patients = np.array(test.patient_ids)
    rows, per_set = [], {}
    for name in TRAINING_SETS:
        folder = out / "models" / name.replace("+", "_")
        probs_path = folder / "test_probabilities.npy"
        train, val = trains[name], vals[name]
        if probs_path.is_file():  # done by an earlier run
            probs = load_npy(probs_path, "the test-set probabilities of a finished model")
            trained_for = read_json(folder / "classifier.json", "a finished model's settings").get("findings")
            if trained_for != findings:  # its probability columns are other findings than these
                raise UserError(f"{folder}: a model of the findings {trained_for}, and the findings labelled on both "
                                f"sides are {findings} (an earlier version also used the findings the synthetic "
                                f"images' classifier never called); choose a new --out")
            if probs.ndim != 2 or probs.shape[1] != len(findings):  # damaged, or written by hand
                raise UserError(f"{probs_path}: an array of shape {probs.shape}, where one column per finding "
                                f"({len(findings)}) was saved; remove {folder} to train that model again")
            if len(probs) != len(test):  # an earlier version held out only the test split's rows
                raise UserError(f"{probs_path}: probabilities of {len(probs)} test images, and the test set is now "
                                f"{len(test)} (every image of a patient in the real archive's test split); the "
                                f"models were tested on another set: choose a new --out")
        else:
            result = fit(train, np.flatnonzero(~val), np.flatnonzero(val), cfg, progress=progress,
                         desc=f"tstr {name}")
            probs = predict(result.model, test, np.arange(len(test)), next(result.model.parameters()).device)
            result.model.cpu().save(folder)
            write_json(folder / "training.json", {"history": result.history,
                                                  "best_mean_validation_auroc": result.best_mean_auroc})
            save_numpy(probs_path, probs)  # the model counts as done from here on
        fitted = train.labels[~val]  # the images the weights were fitted to: not the validation images
        for k, f in enumerate(findings):
            y = test.labels[:, k]
            positives = int(fitted[:, k].sum())
            # a classifier shown no image with the finding (or none without) learnt nothing of it: its
            # AUROC is noise, not a measurement (a generator that never makes the finding gives this; so
            # does a rare finding whose few images all fell to the validation split)
            a = auroc(y, probs[:, k]) if 0 < positives < len(fitted) else float("nan")
            lo, hi = bootstrap_auroc(y, probs[:, k], test_patients, cfg.bootstrap, cfg.seed + k) \
                if not math.isnan(a) else (float("nan"), float("nan"))
            rows.append({"training_set": name, "finding": f, "auroc": a, "ci95_low": lo, "ci95_high": hi,
                         "train_images": len(fitted), "train_positives": positives,
                         "test_images": len(test), "test_positives": int(y.sum())})
        per_set[name] = {"images": len(train), "synthetic_images": int(sum(len(p) for a, p in plans[name] if a is synth))}
    # the means over the same findings for every training set: those each one could be measured on
    measured = [f for f in findings if all(not math.isnan(r["auroc"]) for r in rows if r["finding"] == f)]
    for name in TRAINING_SETS:
        aucs = [r["auroc"] for r in rows if r["training_set"] == name and r["finding"] in measured]
        per_set[name]["mean_auroc"] = float(np.mean(aucs)) if aucs else float("nan")
    write_csv(out / "tstr.csv", list(rows[0]), [csv_row(r) for r in rows])
    summary = {"evaluation": "tstr", "synthetic": str(cfg.synthetic), "real": str(cfg.real), "budget": budget,
               "test_images": len(test), "test_patients": len(set(test.patient_ids)), "findings": findings,
               "findings_not_labelled": not_labelled, "mean_over": measured,
               "bootstrap": cfg.bootstrap, "training_sets": per_set, "rows": rows,
               # where the real archive has no "test" split, the test patients are chosen here: a generator
               # trained on that archive (`xrayforge train` trains on every image then) has seen them
               "test_split": "archive" if real.held_out().any() else f"patients ({cfg.test_fraction:g})"}
    write_json(out / "summary.json", summary)
    write_text_atomic(out / "tstr.md", format_markdown(summary))
    plot(summary, out / "tstr.png")
    return summary


def format_markdown(summary: dict) -> str:
    sets = list(summary["training_sets"])
    by = {(r["training_set"], r["finding"]): r for r in summary["rows"]}
    lines = [f"Per-finding AUROC on {summary['test_images']} real test images ({summary['test_patients']} patients), "
             f"each classifier trained on {summary['budget']} images; 95% patient-level bootstrap intervals "
             f"({summary['bootstrap']} resamples).", "",
             "| finding | test positives | " + " | ".join(sets) + " |", "|---|---|" + "---|" * len(sets)]
    absent = [f for f in summary["findings"] if by[(sets[0], f)]["test_positives"] in (0, by[(sets[0], f)]["test_images"])]
    for f in summary["findings"]:
        if f in absent:
            continue
        cells = []
        for s in sets:
            r = by[(s, f)]
            unlearnt = r["train_positives"] in (0, r["train_images"])
            cells.append(f"n/a ({r['train_positives']} of {r['train_images']} training images have it)" if unlearnt
                         else "n/a" if number(r["auroc"]) == "n/a" else
                         f"{number(r['auroc'])} ({number(r['ci95_low'])}–{number(r['ci95_high'])})")
        lines.append(f"| {f} | {by[(sets[0], f)]['test_positives']} | " + " | ".join(cells) + " |")
    lines.append("| **mean** | | " + " | ".join(number(summary["training_sets"][s]["mean_auroc"]) for s in sets) + " |")
    if absent:
        lines += ["", f"No AUROC (the test images do not have both classes): {', '.join(absent)}."]
    over = summary.get("mean_over")
    if over is not None and len(over) < len(summary["findings"]) - len(absent):
        lines += ["", f"A training set none (or all) of whose images have a finding cannot learn it: no AUROC there, "
                      f"and the means are over the findings every set has both ways: {', '.join(over) or 'none'}."]
    if summary.get("findings_not_labelled"):
        lines += ["", f"Not measured (the synthetic images' classifier does not call them, so they have no labels): "
                      f"{', '.join(summary['findings_not_labelled'])}."]
    if str(summary.get("test_split", "archive")).startswith("patients"):
        fraction = summary["test_split"][len("patients ("):-1]
        lines += ["", f"The real archive has no 'test' split: its test patients are {fraction} of its patients, "
                      f"chosen here. A generator trained on this archive saw them (`xrayforge train` trains on "
                      f"every image of an archive without a test split), which can flatter the synthetic sets' "
                      f"AUROCs; prepare the real archive with a test split to keep them unseen."]
    return "\n".join(lines) + "\n"


def plot(summary: dict, path) -> None:
    from ..utils.plots import _pyplot, save_figure
    plt = _pyplot()
    findings = [f for f in summary["findings"]
                if any(r["finding"] == f and is_number(r["auroc"])
                       for r in summary["rows"])]
    sets = list(summary["training_sets"])
    by = {(r["training_set"], r["finding"]): r for r in summary["rows"]}
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(findings) + 2), 4))
    width = 0.8 / len(sets)
    x = np.arange(len(findings))
    for j, s in enumerate(sets):
        vals = np.array([by[(s, f)]["auroc"] for f in findings], dtype=float)
        lo = np.array([by[(s, f)]["ci95_low"] for f in findings], dtype=float)
        hi = np.array([by[(s, f)]["ci95_high"] for f in findings], dtype=float)
        at = x + (j - (len(sets) - 1) / 2) * width
        ax.bar(at, vals, width, label=s)
        # the interval as it is: a patient-level percentile interval need not hold the AUROC itself (a
        # resample's repeated patients weigh their own pairs more), which error bars (yerr) cannot draw
        ax.vlines(at, lo, hi, color="black", lw=1)
        ax.hlines(np.r_[lo, hi], np.r_[at, at] - width / 6, np.r_[at, at] + width / 6, color="black", lw=1)
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.set_xticks(x)
    ax.set_xticklabels(findings, rotation=30, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("AUROC on real test images")
    ax.legend(title="trained on", fontsize=8)
    save_figure(fig, path)
