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
import logging
import os
import shutil
from pathlib import Path

import numpy as np

from ..data.archive import Archive
from ..errors import UserError
from ..utils.files import file_id, read_csv, read_json, write_csv, write_json
from ..data.labels import FINDINGS, format_finding_labels

log = logging.getLogger(__name__)


def is_sample_folder(path: str | os.PathLike) -> bool:
    p = Path(path)
    return (p / "manifest.csv").is_file() and (p / "sample_config.json").is_file()


def _recorded_thresholds(folder: Path) -> dict[str, float] | None:
    """The sampler's decision thresholds, one per finding its classifier has (summary.json;
    older archives: the classifier's saved thresholds), or None when neither is there."""
    summary = folder / "summary.json"
    if summary.is_file():
        got = read_json(summary, "the sampler's summary").get("thresholds")
        if got:
            bad = got if not isinstance(got, dict) else next(
                ((f, v) for f, v in got.items() if isinstance(v, bool) or not isinstance(v, (int, float))
                 or not 0.0 <= v <= 1.0), None)
            if bad is not None:  # a bare TypeError, naming no file
                raise UserError(f"{summary}: damaged: its thresholds {'entry' if isinstance(got, dict) else 'are'} "
                                f"{bad!r}, not a probability per finding")
            return {f: float(v) for f, v in got.items()}
    clf = read_json(folder / "sample_config.json", "the sampling settings").get("classifier")
    if clf and Path(clf).is_dir():
        from ..nn.classifier import load_classifier
        model = load_classifier(clf)
        return {f: model.threshold(f) for f in model.findings}
    return None


def synthetic_labels(folder: str | os.PathLike) -> tuple[list[dict], list[str], np.ndarray]:
    """(manifest rows, findings, 0/1 labels (rows, findings)) of a `xrayforge sample` folder."""
    from ..sample.lco import parse_target
    folder = Path(folder)
    if not is_sample_folder(folder):
        raise FileNotFoundError(f"{folder}: not a folder written by `xrayforge sample` "
                                f"(needs manifest.csv and sample_config.json)")
    rows, columns = _manifest(folder)
    if not rows:
        raise UserError(f"{folder / 'manifest.csv'}: no images")
    findings = [c[2:] for c in columns if c.startswith("p_")]
    if not findings:
        raise UserError(f"{folder}: the images carry no classifier probabilities; sample with --classifier MODEL "
                        f"to get a labelled archive")
    recorded = _recorded_thresholds(folder)
    lost = [f for f in (recorded or {}) if f not in findings]
    if lost:  # never label a finding negative because its column went missing
        raise UserError(f"{folder / 'manifest.csv'}: missing column{'s' if len(lost) > 1 else ''} "
                        f"{', '.join('p_' + f for f in lost)} of the classifier it was sampled with")
    unknown = [f for f in findings if f not in FINDINGS]
    if unknown:
        raise ValueError(f"{folder}: findings {unknown} are not ChestX-ray14 findings; the evaluations compare "
                         f"against ChestX-ray14-labelled archives")
    if recorded is None:
        log.warning("%s: no decision thresholds recorded; labelling at probability 0.5", folder)
    elif any(f not in recorded for f in findings):  # a p_ column its classifier did not have: no threshold
        raise UserError(f"{folder}: no decision threshold recorded for "
                        f"{', '.join(f for f in findings if f not in recorded)} (its manifest has their p_ column, "
                        f"its classifier's thresholds do not): the archive was edited or mixes classifiers")
    thr = {f: (recorded or {}).get(f, 0.5) for f in findings}
    labels = np.zeros((len(rows), len(findings)), dtype=np.int8)
    for i, r in enumerate(rows, start=2):
        try:
            target = parse_target(r["target"], findings) if r.get("target") else {}
            for k, f in enumerate(findings):
                labels[i - 2, k] = target[f] if f in target else int(_probability(r[f"p_{f}"], f) >= thr[f])
        except (TypeError, ValueError) as exc:
            raise UserError(f"{folder / 'manifest.csv'}, line {i}: {exc}") from None
    return rows, findings, labels


def _probability(text, finding: str) -> float:
    """A manifest's p_<finding> cell as a probability; a NaN (a diverged classifier) or a value outside
    [0, 1] is an error, never a label."""
    p = float(text)
    if not 0.0 <= p <= 1.0:  # NaN fails this too
        raise ValueError(f"p_{finding} is {text!r}, not a probability in [0, 1]")
    return p


def sample_id(folder: str | os.PathLike) -> str:
    """What a sample folder holds, as far as its labelled images go: its manifest (files, targets,
    classifier probabilities, latents), the decision thresholds that turn those into labels, and the
    file format. Not the per-run parts of its summary and settings, which running `xrayforge sample`
    again rewrites without changing an image."""
    import hashlib
    import json
    folder = Path(folder)
    fmt = read_json(folder / "sample_config.json", "the sampling settings").get("format", "png8")
    what = json.dumps([file_id(folder / "manifest.csv", length=40), _recorded_thresholds(folder), fmt], sort_keys=True)
    return hashlib.sha1(what.encode()).hexdigest()


def archive_id(path: str | os.PathLike) -> str | None:
    """What a prepared archive holds: its manifest (every image's source, labels, split and checksum),
    wherever the archive now is; None where ``path`` is no archive."""
    manifest = Path(path) / "manifest.csv"
    return file_id(manifest, length=40) if (Path(path) / "archive.json").is_file() else None


def same_images(synthetic: str | os.PathLike, real: str | os.PathLike) -> str | None:
    """Why ``synthetic`` and ``real`` hold the same images (two prepared archives of one manifest, or two
    sample folders of one manifest and decision thresholds, a folder given twice included); None where
    they do not, or where that cannot be told without converting a sample folder."""
    a = archive_id(real)
    if a is not None:
        return "the same manifest" if a == archive_id(synthetic) else None
    if is_sample_folder(real) and is_sample_folder(synthetic) and sample_id(real) == sample_id(synthetic):
        return "the same sample folder: the same manifest.csv and decision thresholds"
    return None


def real_images_among(synthetic: Archive, real: Archive) -> np.ndarray:
    """Per image of ``real``: whether ``synthetic`` holds it too, prepared from the same source (a
    phantom, or a file named by its absolute path: the same images at another resolution included) or
    with the same stored pixels (the same full-size checksum at the same size and depth; an image of one
    grey level is no copy of anything). A real archive
    (or a part of it) given as --synthetic passed, unlike a copy of its manifest (``same_images``)."""
    def sources(arc: Archive) -> set:
        return {r["source"] for r in arc.records if (r.get("source") or "").startswith("phantom:")
                or Path(r.get("source") or "").is_absolute()}

    def checksums(arc: Archive) -> set:
        return {r["sha1"] for r in arc.records if r.get("sha1")}

    same_pixels = (synthetic.resolution, synthetic.dtype) == (real.resolution, real.dtype)
    theirs, pixels = sources(synthetic), checksums(synthetic) if same_pixels else set()
    by_source = np.array([r.get("source") in theirs for r in real.records], dtype=bool)
    by_pixels = np.flatnonzero(~by_source & np.array([(r.get("sha1") or None) in pixels for r in real.records],
                                                      dtype=bool))
    found = by_source.copy()
    if len(by_pixels):  # one grey level (a blank image, a collapsed generator's): the same pixels, no copy
        images = real.images(by_pixels, real.resolution)
        found[by_pixels] = np.ptp(images.reshape(len(by_pixels), -1), axis=1) > 0
    return found


def sample_as_archive(folder: str | os.PathLike, out: str | os.PathLike, progress: bool = True) -> Archive:
    """The sample folder as a prepared archive at ``out`` (made once; reused while the folder holds
    the same samples)."""
    from ..data.prepare import prepare
    from ..data.readers import read_radiograph
    folder, out = Path(folder), Path(out)
    made_from = out.with_name(out.name + ".source.json")
    recorded = read_json(made_from, "what a converted sample folder was made from").get("sample_id") \
        if made_from.is_file() else None
    if (out / "archive.json").is_file():
        arc = Archive(out)
        if arc.meta.get("source") != str(folder):
            raise FileExistsError(f"{out}: holds an archive of other images ({arc.meta.get('source')}); remove it")
        if made_from.is_file():
            if recorded != sample_id(folder):
                raise UserError(f"{folder}: holds other samples than when {out} was converted from it (its "
                                f"manifest.csv or decision thresholds changed), so this output folder's results "
                                f"would mix the two; use a new --out, or remove the whole of {out.parent}")
            return arc
        # converted by an older version, which kept no record of the samples: the image count is
        # all there is to compare
        present = sum(1 for r in _manifest(folder)[0] if (folder / r["file"]).is_file())
        if len(arc) == present:
            log.warning("%s: converted from %s by an older xrayforge, which cannot tell whether the folder still "
                        "holds the same samples; if it was re-sampled, use a new --out (or remove the whole of %s: "
                        "results made from the old samples are kept there)", out, folder, out.parent)
            return arc
        raise FileExistsError(f"{out}: holds an archive of other images ({arc.meta.get('source')}); remove it")
    made = sample_id(folder)
    partial = out.with_name(out.name + ".partial")
    if partial.exists() and recorded != made:
        # an unfinished conversion of other samples (or of unknown ones): prepare would resume it,
        # mixing its planned images and labels with these
        shutil.rmtree(partial)
    rows, findings, labels = synthetic_labels(folder)
    missing = [r["file"] for r in rows if not (folder / r["file"]).is_file()]
    if len(missing) == len(rows):
        raise UserError(f"{folder}: none of the {len(rows)} images in manifest.csv is there "
                        f"(first: {rows[0]['file']})")
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
    first = read_radiograph(next(folder / r["file"] for r in rows if r["file"] not in missing)).pixels
    if first.shape[0] != first.shape[1] or first.shape[0] & (first.shape[0] - 1):
        raise ValueError(f"{folder / rows[0]['file']}: synthetic images must be square with a power-of-two size, "
                         f"got {first.shape[1]}×{first.shape[0]}")
    fmt = read_json(folder / "sample_config.json", "the sampling settings").get("format", "png8")
    write_json(made_from, {"source": str(folder), "sample_id": made})
    prepare(str(folder), out, resolution=first.shape[0], labels=str(label_file), workers=1,
            bits=16 if fmt == "png16" else 8, progress=progress, labelled_only=True)
    if missing:  # a manifest row whose file is gone: left out, and said, never dropped silently
        skipped = read_csv(out / "skipped.csv", ("source", "reason"))[0]
        skipped += [{"source": str(folder / f), "reason": "listed in manifest.csv, but the file is missing"}
                    for f in missing]
        write_csv(out / "skipped.csv", ["source", "reason"], skipped)
        log.warning("%s: %d image(s) listed in manifest.csv are missing (first: %s); left out, listed in %s",
                    folder, len(missing), missing[0], out / "skipped.csv")
    return Archive(out)


def _converted_from(out: Path) -> str | None:
    """The sample folder that ``out`` holds (or began) a conversion of; None where it holds none."""
    made_from = out.with_name(out.name + ".source.json")
    if made_from.is_file():
        return read_json(made_from, "what a converted sample folder was made from").get("source")
    return Archive(out).meta.get("source") if (out / "archive.json").is_file() else None


def _manifest(folder: Path) -> tuple[list[dict], list[str]]:
    return read_csv(folder / "manifest.csv", ("file", "index", "target"), "the manifest of a sampled archive")


def labelled_findings(spec: str | os.PathLike, archive: Archive) -> list[str]:
    """The findings of ``archive`` (``open_labelled(spec)``) whose labels say something: for a sample
    folder, those its classifier gave probabilities for (the manifest's p_<finding> columns), as its
    converted archive, like every archive, has all the ChestX-ray14 findings, and a 0 for one the
    classifier never called means "not called", not "absent"; for a prepared archive, all of them."""
    p = Path(spec)
    if (p / "archive.json").is_file() or not is_sample_folder(p):
        return list(archive.findings)
    called = {c[2:] for c in _manifest(p)[1] if c.startswith("p_")}
    return [f for f in archive.findings if f in called]


def check_inputs(synthetic: str | os.PathLike, real: str | os.PathLike) -> None:
    """Refuse a --synthetic or --real that ``open_labelled`` cannot open (missing; no archive or sample
    folder), naming the option, before any work: neither --out claimed, nor the other side's sample
    folder converted (fid-findings converted the synthetic images before it looked at --real)."""
    for option, spec in (("--synthetic", synthetic), ("--real", real)):
        p = Path(spec)
        if (p / "archive.json").is_file() or is_sample_folder(p):
            continue
        if not p.exists():
            raise UserError(f"{option} {spec}: no such file or folder")
        raise UserError(f"{option} {spec}: expected a prepared archive (archive.json) or a folder written by "
                        f"`xrayforge sample` (manifest.csv with classifier probabilities)")


def open_labelled(spec: str | os.PathLike, work: str | os.PathLike, progress: bool = True) -> Archive:
    """An archive for ``spec``: a prepared archive as it is, a sample folder converted under ``work``."""
    p = Path(spec)
    if (p / "archive.json").is_file():
        return Archive(p)
    if is_sample_folder(p):
        out = Path(work) / f"{p.name}-archive"
        if _converted_from(out) not in (None, str(p)):  # another sample folder of this name (one of each side)
            import hashlib
            out = Path(work) / f"{p.name}-{hashlib.sha1(str(p).encode()).hexdigest()[:8]}-archive"
        return sample_as_archive(p, out, progress)
    if not p.exists():
        raise FileNotFoundError(f"{spec}: no such file or folder")
    raise ValueError(f"{spec}: expected a prepared archive (archive.json) or a folder written by `xrayforge sample` "
                     f"(manifest.csv with classifier probabilities)")
