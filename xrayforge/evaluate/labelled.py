"""Labelled image sets for the evaluations: a prepared archive as it is, or a folder written by
`xrayforge sample` turned into one.

A sampled image's labels: the value its LCO target asked for, for every finding the target
names (the image was accepted only when the classifier agreed); for every other finding, the
classifier's probability in the manifest against the decision threshold the sampler used
(``summary.json``; older archives: the classifier's saved thresholds; else 0.5). Each synthetic
image is its own "patient", so patient-level splits treat them as independent.

The conversion runs `prepare` on the sample folder with a ChestX-ray14-style label file, so the
result is an ordinary archive (resumable, atomic) that the classifier and the FID code read.
"""
from __future__ import annotations

import csv
import json
import logging
import os
from pathlib import Path

import numpy as np

from ..data.archive import Archive
from ..data.labels import FINDINGS, format_finding_labels

log = logging.getLogger(__name__)


def is_sample_folder(path: str | os.PathLike) -> bool:
    p = Path(path)
    return (p / "manifest.csv").is_file() and (p / "sample_config.json").is_file()


def _thresholds(folder: Path, findings: list[str]) -> dict[str, float]:
    summary = folder / "summary.json"
    if summary.is_file():
        got = json.loads(summary.read_text()).get("thresholds")
        if got:
            return {f: float(got.get(f, 0.5)) for f in findings}
    clf = json.loads((folder / "sample_config.json").read_text()).get("classifier")
    if clf and Path(clf).is_dir():
        from ..nn.classifier import load_classifier
        model = load_classifier(clf)
        return {f: model.threshold(f) for f in findings}
    log.warning("%s: no decision thresholds recorded; labelling at probability 0.5", folder)
    return {f: 0.5 for f in findings}


def synthetic_labels(folder: str | os.PathLike) -> tuple[list[dict], list[str], np.ndarray]:
    """(manifest rows, findings, 0/1 labels (rows, findings)) of a `xrayforge sample` folder."""
    from ..sample.lco import parse_target
    folder = Path(folder)
    if not is_sample_folder(folder):
        raise FileNotFoundError(f"{folder}: not a folder written by `xrayforge sample` "
                                f"(needs manifest.csv and sample_config.json)")
    rows = list(_manifest_rows(folder))
    if not rows:
        raise ValueError(f"{folder / 'manifest.csv'}: no images")
    findings = [c[2:] for c in rows[0] if c.startswith("p_")]
    if not findings:
        raise ValueError(f"{folder}: the images carry no classifier probabilities; sample with --classifier MODEL "
                         f"to get a labelled archive")
    unknown = [f for f in findings if f not in FINDINGS]
    if unknown:
        raise ValueError(f"{folder}: findings {unknown} are not ChestX-ray14 findings; the evaluations compare "
                         f"against ChestX-ray14-labelled archives")
    thr = _thresholds(folder, findings)
    labels = np.zeros((len(rows), len(findings)), dtype=np.int8)
    for i, r in enumerate(rows):
        target = parse_target(r["target"], findings) if r.get("target") else {}
        for k, f in enumerate(findings):
            labels[i, k] = target[f] if f in target else int(float(r[f"p_{f}"]) >= thr[f])
    return rows, findings, labels


def sample_as_archive(folder: str | os.PathLike, out: str | os.PathLike, progress: bool = True) -> Archive:
    """The sample folder as a prepared archive at ``out`` (made once; reused when it exists)."""
    from ..data.prepare import prepare
    from ..data.readers import read_radiograph
    folder, out = Path(folder), Path(out)
    if (out / "archive.json").is_file():
        arc = Archive(out)
        if arc.meta.get("source") == str(folder) and len(arc) == sum(1 for _ in _manifest_rows(folder)):
            return arc
        raise FileExistsError(f"{out}: holds an archive of other images ({arc.meta.get('source')}); remove it")
    rows, findings, labels = synthetic_labels(folder)
    out.parent.mkdir(parents=True, exist_ok=True)
    label_file = out.with_name(out.name + ".labels.csv")
    with open(label_file, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["Image Index", "Finding Labels", "Patient ID"])
        for r, vec in zip(rows, labels):
            full = [0] * len(FINDINGS)
            for f, v in zip(findings, vec):
                full[FINDINGS.index(f)] = int(v)
            w.writerow([Path(r["file"]).name, format_finding_labels(full), f"synthetic-{r['index']}"])
    first = read_radiograph(folder / rows[0]["file"]).pixels
    if first.shape[0] != first.shape[1] or first.shape[0] & (first.shape[0] - 1):
        raise ValueError(f"{folder / rows[0]['file']}: synthetic images must be square with a power-of-two size, "
                         f"got {first.shape[1]}×{first.shape[0]}")
    fmt = json.loads((folder / "sample_config.json").read_text()).get("format", "png8")
    prepare(str(folder), out, resolution=first.shape[0], labels=str(label_file), workers=1,
            bits=16 if fmt == "png16" else 8, progress=progress)
    return Archive(out)


def _manifest_rows(folder: Path):
    with open(folder / "manifest.csv", newline="") as fh:
        yield from csv.DictReader(fh)


def open_labelled(spec: str | os.PathLike, work: str | os.PathLike, progress: bool = True) -> Archive:
    """An archive for ``spec``: a prepared archive as it is, a sample folder converted under ``work``."""
    p = Path(spec)
    if (p / "archive.json").is_file():
        return Archive(p)
    if is_sample_folder(p):
        return sample_as_archive(p, Path(work) / f"{p.name}-archive", progress)
    if not p.exists():
        raise FileNotFoundError(f"{spec}: no such file or folder")
    raise ValueError(f"{spec}: expected a prepared archive (archive.json) or a folder written by `xrayforge sample` "
                     f"(manifest.csv with classifier probabilities)")
