"""Every command against broken input: one line naming the file or value, a non-zero exit, no
traceback, nothing of the user's overwritten, and no silent wrong result.

The table ``CASES`` is run by ``test_bad_input``: each case builds its broken input from a small
world of real outputs (a phantom archive, a trained run, a classifier, a sampled archive, a
reader-study pack, statistics files), runs one command in-process, and checks

- the exit status (2: an option rejected when the command line is parsed; 1: everything else),
- that standard error is exactly one line, ``xrayforge <command>: error: ...``, naming the file
  or value (``expect``), and neither a traceback nor the "unexpected error" of a bug,
- that the files named in ``keep`` are byte-identical afterwards (the destroys-data cases).

``test_count_by_kind`` prints how many cases each kind has (the issue note quotes it).
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch

from xrayforge.cli import main as cli
from xrayforge.data.labels import FINDINGS
from xrayforge.fid.stats import FrechetStats
from xrayforge.nn.classifier import ChestClassifier, ClassifierConfig

TINY_TRAIN = ["--resolution", "8", "--fade-kimg", "0.032", "--stable-kimg", "0.032", "--batch", "16",
              "--tick-kimg", "0.016", "--latent-dim", "16", "--fmap-base", "64", "--fmap-max", "16",
              "--realism-images", "0", "--checkpoint-ticks", "1", "--keep", "8", "--device", "cpu", "-q"]


def run(argv, capsys, env=None):
    """(exit status, stdout, stderr) of ``xrayforge argv`` run in this process."""
    old = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    try:
        try:
            rc = cli([str(a) for a in argv])
        except SystemExit as exc:
            rc = exc.code
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Small real outputs of every command, made once; cases copy what they break."""
    w = tmp_path_factory.mktemp("world")

    def ok(argv):
        rc = cli([str(a) for a in argv])
        assert rc == 0, argv

    ok(["prepare", "phantom:48", w / "arc", "--resolution", "16", "--workers", "1", "-q"])
    ok(["train", w / "arc", "--out", w / "run", *TINY_TRAIN])
    torch.manual_seed(0)
    clf = ChestClassifier(ClassifierConfig(input_size=16, width=8))
    clf.config.thresholds = {f: 0.5 for f in FINDINGS}
    clf.save(w / "clf")
    ok(["sample", w / "run", "--out", w / "samples", "--n", "6", "--classifier", w / "clf", "--shard-size", "3",
        "--device", "cpu", "-q"])
    ok(["evaluate", "reader-study", "make", "--real", w / "arc", "--synthetic", w / "samples", "--n", "4",
        "--size", "16", "--out", w / "pack"])
    rng = np.random.default_rng(0)
    f = rng.standard_normal((40, 8))
    FrechetStats.from_features(f).save(w / "a.npz")
    FrechetStats.from_features(f + 0.5).save(w / "b.npz")
    (w / "plain").mkdir()
    (w / "plain" / "notes.txt").write_text("the user's own notes\n")
    (w / "afile.txt").write_text("a file\n")
    return w


def digest(path: Path) -> dict:
    """{relative path: sha1} of a file or of every file under a folder."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p.relative_to(path.parent)): hashlib.sha1(p.read_bytes()).hexdigest() for p in files}


def copy(src: Path, dst: Path) -> Path:
    (shutil.copytree if src.is_dir() else shutil.copyfile)(src, dst)
    return dst


def truncate(path: Path, keep: float = 0.5) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])
    return path


def latest_ckpt(run_dir: Path) -> Path:
    ck = run_dir / "checkpoints"
    return ck / (ck / "latest").read_text().strip()


def rewrite_csv(path: Path, drop=(), edit: Callable | None = None, bom: bool = False) -> Path:
    with open(path, newline="", encoding="utf-8-sig") as fh:
        rows = list(csv.DictReader(fh))
    fields = [k for k in rows[0] if k not in drop]
    if edit:
        rows = edit(rows)
    with open(path, "w", newline="", encoding="utf-8-sig" if bom else "utf-8") as fh:
        wr = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
        wr.writeheader()
        wr.writerows(rows)
    return path


@dataclass
class Case:
    id: str
    kind: str
    argv: Callable                     # (world, tmp) -> argv list
    expect: Callable | str             # the file or value the message names: a string or (world, tmp) -> string
    rc: int = 1
    setup: Callable | None = None      # (world, tmp) -> None: make the broken input
    keep: Callable | None = None       # (world, tmp) -> [paths] that must be byte-identical afterwards
    env: dict = field(default_factory=dict)


def _numeric(cmd, option, value, extra=()):
    """A numeric option of 0 or below, refused when parsed."""
    return Case(f"{'-'.join(cmd)}{option}={value}", "numeric option <= 0",
                lambda w, t: [*cmd, *extra_args(cmd, w, t), option, value, *extra], f"argument {option}", rc=2)


def extra_args(cmd, w, t):
    """The positional and required arguments of each command, valid, for the numeric cases."""
    return {
        ("prepare",): ["phantom:4", t / "new"],
        ("train",): [w / "arc", "--out", t / "r"],
        ("fid",): [w / "a.npz", w / "b.npz"],
        ("sample",): [w / "run", "--out", t / "s", "--n", "2"],
        ("classify", "train"): [w / "arc", "--out", t / "m"],
        ("evaluate", "memorisation"): ["--synthetic", w / "samples", "--real", w / "arc", "--out", t / "o"],
        ("evaluate", "reader-study", "make"): ["--real", w / "arc", "--synthetic", w / "samples", "--out", t / "p"],
        ("evaluate", "tstr"): ["--synthetic", w / "samples", "--real", w / "arc", "--out", t / "o"],
        ("evaluate", "fid-findings"): ["--synthetic", w / "samples", "--real", w / "arc", "--out", t / "o"],
        ("evaluate", "diversity"): [w / "run", "--classifier", w / "clf", "--real", w / "arc", "--out", t / "o"],
        ("demo",): ["--out", t / "d"],
        ("bench",): [],
    }[tuple(cmd)]


NUMERIC = [
    (("prepare",), "--resolution", "48"), (("prepare",), "--resolution", "0"), (("prepare",), "--workers", "0"),
    (("train",), "--batch", "0"), (("train",), "--batch", "256:-2"), (("train",), "--tick-kimg", "0"),
    (("train",), "--tick-kimg", "-1"), (("train",), "--latent-dim", "0"), (("train",), "--accumulation", "0"),
    (("train",), "--max-kimg", "0"), (("train",), "--max-kimg", "-1"), (("train",), "--start-resolution", "48"),
    (("train",), "--stable-kimg", "0"), (("train",), "--fade-kimg", "-5"), (("train",), "--keep", "0"),
    (("train",), "--checkpoint-ticks", "0"), (("train",), "--lr", "-0.001"), (("train",), "--lr", "1024:0"),
    (("train",), "--ema-kimg", "0"), (("train",), "--ema-beta", "1.5"), (("train",), "--fmap-base", "0"),
    (("train",), "--realism-images", "-1"), (("train",), "--total-kimg", "0"), (("train",), "--resolution", "100"),
    (("fid",), "--batch", "0"), (("fid",), "--n", "0"), (("fid",), "--bootstrap", "-1"), (("fid",), "--kid", "-3"),
    (("fid",), "--keep-features", "0"), (("fid",), "--workers", "-1"),
    (("sample",), "--shard-size", "0"), (("sample",), "--batch", "0"), (("sample",), "--steps", "0"),
    (("sample",), "--lr", "0"), (("sample",), "--lr", "1e39"), (("sample",), "--truncation", "-1"),
    (("sample",), "--n", "-4"),
    (("classify", "train"), "--input-size", "0"), (("classify", "train"), "--width", "0"),
    (("classify", "train"), "--epochs", "0"), (("classify", "train"), "--batch", "-1"),
    (("classify", "train"), "--val-fraction", "1.5"), (("classify", "train"), "--lr", "0"),
    (("evaluate", "memorisation"), "--percentile", "200"), (("evaluate", "memorisation"), "--real-limit", "0"),
    (("evaluate", "memorisation"), "--batch", "0"),
    (("evaluate", "reader-study", "make"), "--n", "0"), (("evaluate", "reader-study", "make"), "--size", "-16"),
    (("evaluate", "tstr"), "--bootstrap", "0"), (("evaluate", "tstr"), "--budget", "0"),
    (("evaluate", "tstr"), "--test-fraction", "0"), (("evaluate", "tstr"), "--input-size", "-1"),
    (("evaluate", "fid-findings"), "--counts", "50,0"), (("evaluate", "fid-findings"), "--min-images", "0"),
    (("evaluate", "fid-findings"), "--counts", "a,b"),
    (("evaluate", "diversity"), "--n", "0"), (("evaluate", "diversity"), "--per-grid", "0"),
    (("evaluate", "diversity"), "--ratio", "-1"), (("evaluate", "diversity"), "--real-limit", "-5"),
    (("demo",), "--minutes", "0"), (("demo",), "--minutes", "nan"),
    (("train",), "--seed", "-1"), (("sample",), "--seed", str(2 ** 70)), (("fid",), "--seed", "x"),
    (("train",), "--max-kimg", "0.0001"), (("train",), "--tick-kimg", "0.0004"),
    (("train",), "--metrics-images", "3"), (("train",), "--metrics", "fid,,prdc"),
    (("evaluate", "reader-study", "make"), "--n", "7"), (("sample",), "--truncation", "0.001"),
    (("evaluate", "diversity"), "--truncation", "1e-30"), (("classify", "train"), "--batch", "1"),
]

DEVICE_COMMANDS = [("train",), ("fid",), ("sample",), ("classify", "train"), ("evaluate", "memorisation"),
                   ("evaluate", "tstr"), ("evaluate", "fid-findings"), ("evaluate", "diversity"), ("demo",),
                   ("bench",)]


def _device(cmd, value):
    return Case(f"{'-'.join(cmd)}--device={value}", "device", lambda w, t: [*cmd, *extra_args(cmd, w, t),
                                                                         "--device", value], repr(value), rc=2)


def _write_nan_stats(w, t):
    FrechetStats(np.array([np.nan, 0.0]), np.eye(2), 10).save(t / "nan.npz")


def _write_inf_stats(w, t):
    FrechetStats(np.array([0.0, 1.0]), np.array([[np.inf, 0], [0, 1.0]]), 10).save(t / "inf.npz")


def _write_non_psd(w, t):
    FrechetStats(np.zeros(2), np.array([[1.0, 3.0], [3.0, 1.0]]), 10).save(t / "npsd.npz")


def _write_asym(w, t):
    FrechetStats(np.zeros(2), np.array([[1.0, 0.5], [0.0, 1.0]]), 10).save(t / "asym.npz")


def _archive_without(column):
    def setup(w, t):
        copy(w / "arc", t / "arc")
        rewrite_csv(t / "arc" / "manifest.csv", drop=(column,))
    return setup


def _samples_without(column):
    def setup(w, t):
        copy(w / "samples", t / "samples")
        rewrite_csv(t / "samples" / "manifest.csv", drop=(column,))
    return setup


def _broken_run(what):
    """A copy of the run with its latest checkpoint's ``what`` damaged (every checkpoint's, with 'all:')."""
    def setup(w, t):
        copy(w / "run", t / "run")
        targets = sorted((t / "run" / "checkpoints").glob("ckpt-*")) if what.startswith("all:") \
            else [latest_ckpt(t / "run")]
        for ck in targets:
            name = what.split(":")[-1]
            if name == "networks.json-missing":
                (ck / "networks.json").unlink()
            elif name.endswith("-zero"):
                (ck / name[:-5]).write_bytes(b"")
            else:
                truncate(ck / name)
    return setup


def _ckpt(w, t):
    return latest_ckpt(t / "run")


def _two_blank_readers(w, t):
    """Two answer files with the reader box left empty, both called answers.csv: two readers."""
    key = list(csv.DictReader(open(w / "pack.key.csv", newline="")))
    for d, answer in (("r1", "real"), ("r2", "synthetic")):
        (t / d).mkdir()
        with open(t / d / "answers.csv", "w", newline="") as fh:
            wr = csv.DictWriter(fh, ["reader", "image", "answer", "confidence"])
            wr.writeheader()
            wr.writerows({"reader": "", "image": k["image"], "answer": answer, "confidence": 3} for k in key)


def _same_reader_twice(w, t):
    key = list(csv.DictReader(open(w / "pack.key.csv", newline="")))
    for name in ("a.csv", "b.csv"):
        with open(t / name, "w", newline="") as fh:
            wr = csv.DictWriter(fh, ["reader", "image", "answer", "confidence"])
            wr.writeheader()
            wr.writerows({"reader": "dr-x", "image": k["image"], "answer": "real", "confidence": 3} for k in key)


def _answers(w, t, rows, name="ans.csv", fields=("reader", "image", "answer", "confidence")):
    with open(t / name, "w", newline="") as fh:
        wr = csv.DictWriter(fh, list(fields), extrasaction="ignore")
        wr.writeheader()
        wr.writerows(rows)


def _key_rows(w):
    return list(csv.DictReader(open(w / "pack.key.csv", newline="")))


def _unreadable_synthetic(w, t):
    """A sample folder whose images are mostly not images: too few for a balanced pack."""
    copy(w / "samples", t / "samples")
    for p in sorted((t / "samples").rglob("*.png"))[1:]:
        p.write_bytes(b"not a png")


def _torn_json(path_fn):
    def setup(w, t):
        p = path_fn(w, t)
        p.write_text(p.read_text()[:len(p.read_text()) // 2])
    return setup


CASES: list[Case] = [_numeric(c, o, v) for c, o, v in NUMERIC]
CASES += [_device(c, v) for c in DEVICE_COMMANDS for v in ("foo", "cuda:7")]
CASES += [
    # ---------------------------------------------------------------- output paths
    # 10^13 latents: a first layer of ~10^16 bytes, past any address space, so it fails even where memory overcommits
    Case("train-out-of-cpu-memory", "unclear message",
         lambda w, t: ["train", w / "arc", "--out", t / "r", *TINY_TRAIN, "--latent-dim", "10000000000000"],
         "out of memory ("),
    Case("sample-out-is-file", "out path", lambda w, t: ["sample", w / "run", "--out", w / "afile.txt", "--n", "2",
                                                         "--device", "cpu", "-q"], "afile.txt", keep=lambda w, t: [w / "afile.txt"]),
    Case("train-out-is-file", "out path", lambda w, t: ["train", w / "arc", "--out", w / "afile.txt", *TINY_TRAIN],
         "afile.txt", keep=lambda w, t: [w / "afile.txt"]),
    Case("prepare-out-is-file", "out path", lambda w, t: ["prepare", "phantom:4", w / "afile.txt", "--resolution", "8",
                                                          "-q"], "afile.txt", keep=lambda w, t: [w / "afile.txt"]),
    Case("classify-out-is-file", "out path", lambda w, t: ["classify", "train", w / "arc", "--out", w / "afile.txt",
                                                           "--input-size", "16", "--width", "8", "--epochs", "1", "-q"],
         "afile.txt", keep=lambda w, t: [w / "afile.txt"]),
    Case("tstr-out-is-file", "out path", lambda w, t: ["evaluate", "tstr", "--synthetic", w / "samples", "--real",
                                                       w / "arc", "--out", w / "afile.txt", "-q"], "afile.txt",
         keep=lambda w, t: [w / "afile.txt"]),
    Case("memorisation-out-under-file", "out path",
         lambda w, t: ["evaluate", "memorisation", "--synthetic", w / "samples", "--real", w / "arc", "--out",
                       w / "afile.txt" / "sub", "--random-weights", "-q"], "afile.txt"),
    Case("report-out-is-dir", "out path", lambda w, t: ["evaluate", "report", w / "run", "--out", t], str),
    Case("report-out-under-file", "out path",
         lambda w, t: ["evaluate", "report", w / "run", "--out", w / "afile.txt" / "r.html"], "afile.txt"),
    Case("fid-save-stats-is-dir", "out path", lambda w, t: ["fid", w / "a.npz", "--save-stats", t], str),
    Case("fid-save-stats-missing-folder", "out path",
         lambda w, t: ["fid", w / "samples", "--save-stats", t / "nowhere" / "s.npz", "--random-weights", "-q"],
         "nowhere"),
    Case("reader-make-key-is-dir", "out path",
         lambda w, t: ["evaluate", "reader-study", "make", "--real", w / "arc", "--synthetic", w / "samples",
                       "--n", "4", "--size", "16", "--out", t / "p", "--key", t], str),
    Case("reader-make-out-is-file", "out path",
         lambda w, t: ["evaluate", "reader-study", "make", "--real", w / "arc", "--synthetic", w / "samples",
                       "--n", "4", "--size", "16", "--out", w / "afile.txt", "--key", t / "k.csv"], "afile.txt"),
    Case("reader-score-out-is-file", "out path",
         lambda w, t: ["evaluate", "reader-study", "score", w / "pack", w / "pack.key.csv", t / "ans.csv",
                       "--out", w / "afile.txt"], "afile.txt",
         setup=lambda w, t: _answers(w, t, [{"reader": "x", "image": r["image"], "answer": "real"}
                                            for r in _key_rows(w)])),
    # ---------------------------------------------------------------- destroys data (must be refused)
    Case("sample-into-prepared-archive", "destroys data",
         lambda w, t: ["sample", w / "run", "--out", t / "arc", "--n", "2", "--device", "cpu", "-q"], "arc",
         setup=lambda w, t: copy(w / "arc", t / "arc"), keep=lambda w, t: [t / "arc"]),
    Case("sample-into-users-folder", "destroys data",
         lambda w, t: ["sample", w / "run", "--out", w / "plain", "--n", "2", "--device", "cpu", "-q"], "notes.txt",
         keep=lambda w, t: [w / "plain"]),
    Case("tstr-into-users-folder", "destroys data",
         lambda w, t: ["evaluate", "tstr", "--synthetic", w / "samples", "--real", w / "arc", "--out", w / "plain",
                       "--input-size", "16", "--epochs", "1", "-q"], "notes.txt", keep=lambda w, t: [w / "plain"]),
    Case("classify-into-users-folder", "destroys data",
         lambda w, t: ["classify", "train", w / "arc", "--out", w / "plain", "--input-size", "16", "--width", "8",
                       "--epochs", "1", "-q"], "notes.txt", keep=lambda w, t: [w / "plain"]),
    Case("fid-n-without-checkpoint", "silently ignored",
         lambda w, t: ["fid", w / "arc", w / "samples", "--n", "5", "--random-weights", "-q"],
         "neither input is one"),
    Case("fid-prdc-too-few-kept", "unclear message", lambda w, t: ["fid", w / "arc", w / "samples", "--prdc",
                                                            "--keep-features", "5", "--random-weights", "-q"],
         "--prdc needs more than 5"),
    Case("report-of-a-sample-folder", "silently ignored",
         lambda w, t: ["evaluate", "report", w / "run", "--out", t / "r.html", "--evaluations", w / "samples"],
         "not the summary of an `xrayforge evaluate` command"),
    Case("classify-over-a-trained-classifier", "destroys data",
         lambda w, t: ["classify", "train", w / "arc", "--out", w / "clf", "--input-size", "16", "--width", "8",
                       "--epochs", "1", "-q"], "already holds a trained classifier", keep=lambda w, t: [w / "clf"]),
    Case("classify-into-sample-folder", "destroys data",
         lambda w, t: ["classify", "train", w / "arc", "--out", w / "samples", "--input-size", "16", "--width", "8",
                       "--epochs", "1", "-q"], "xrayforge sample", keep=lambda w, t: [w / "samples"]),
    Case("train-into-archive", "destroys data",
         lambda w, t: ["train", t / "arc", "--out", t / "arc", *TINY_TRAIN], "arc",
         setup=lambda w, t: copy(w / "arc", t / "arc"), keep=lambda w, t: [t / "arc"]),
    Case("memorisation-into-run", "destroys data",
         lambda w, t: ["evaluate", "memorisation", "--synthetic", w / "samples", "--real", w / "arc", "--out",
                       w / "run", "--random-weights", "-q"], "xrayforge train", keep=lambda w, t: [w / "run"]),
    Case("fid-findings-into-users-folder", "destroys data",
         lambda w, t: ["evaluate", "fid-findings", "--synthetic", w / "samples", "--real", w / "arc", "--out",
                       w / "plain", "--random-weights", "-q"], "notes.txt", keep=lambda w, t: [w / "plain"]),
    Case("diversity-into-users-folder", "destroys data",
         lambda w, t: ["evaluate", "diversity", w / "run", "--classifier", w / "clf", "--real", w / "arc", "--out",
                       w / "plain", "--n", "4", "-q"], "notes.txt", keep=lambda w, t: [w / "plain"]),
    Case("reader-score-into-pack", "destroys data",
         lambda w, t: ["evaluate", "reader-study", "score", w / "pack", w / "pack.key.csv", t / "ans.csv",
                       "--out", w / "pack"], "pack",
         setup=lambda w, t: _answers(w, t, [{"reader": "x", "image": r["image"], "answer": "real"}
                                            for r in _key_rows(w)]), keep=lambda w, t: [w / "pack"]),
    Case("reader-make-existing-key", "destroys data",
         lambda w, t: ["evaluate", "reader-study", "make", "--real", w / "arc", "--synthetic", w / "samples", "--n",
                       "4", "--size", "16", "--out", t / "pack2", "--key", w / "pack.key.csv"], "pack.key.csv",
         keep=lambda w, t: [w / "pack.key.csv"]),
    Case("prepare-into-users-folder", "destroys data",
         lambda w, t: ["prepare", "phantom:4", w / "plain", "--resolution", "8", "-q"], "plain",
         keep=lambda w, t: [w / "plain"]),
    Case("demo-into-users-folder", "destroys data", lambda w, t: ["demo", "--out", w / "plain", "-q"], "notes.txt",
         keep=lambda w, t: [w / "plain"]),
    # ---------------------------------------------------------------- manifests missing a column
    Case("train-archive-no-row", "missing column", lambda w, t: ["train", t / "arc", "--out", t / "r", *TINY_TRAIN],
         "row", setup=_archive_without("row")),
    Case("classify-archive-no-finding", "missing column",
         lambda w, t: ["classify", "train", t / "arc", "--out", t / "m", "-q"], "Effusion",
         setup=_archive_without("Effusion")),
    Case("fid-archive-no-split", "missing column",
         lambda w, t: ["fid", t / "arc", w / "samples", "--random-weights", "-q"], "split",
         setup=_archive_without("split")),
    Case("memorisation-archive-no-patient", "missing column",
         lambda w, t: ["evaluate", "memorisation", "--synthetic", w / "samples", "--real", t / "arc", "--out",
                       t / "o", "--random-weights", "-q"], "patient_id", setup=_archive_without("patient_id")),
    Case("reader-make-archive-no-source", "missing column",
         lambda w, t: ["evaluate", "reader-study", "make", "--real", t / "arc", "--synthetic", w / "samples", "--n",
                       "4", "--out", t / "p"], "source", setup=_archive_without("source")),
    Case("diversity-archive-no-row", "missing column",
         lambda w, t: ["evaluate", "diversity", w / "run", "--classifier", w / "clf", "--real", t / "arc", "--out",
                       t / "o", "--n", "4", "-q"], "row", setup=_archive_without("row")),
    Case("tstr-samples-no-p-column", "missing column",
         lambda w, t: ["evaluate", "tstr", "--synthetic", t / "samples", "--real", w / "arc", "--out", t / "o",
                       "--input-size", "16", "--epochs", "1", "-q"], "p_Effusion",
         setup=_samples_without("p_Effusion")),
    Case("fid-findings-samples-no-file", "missing column",
         lambda w, t: ["evaluate", "fid-findings", "--synthetic", t / "samples", "--real", w / "arc", "--out",
                       t / "o", "--random-weights", "-q"], "file", setup=_samples_without("file")),
    Case("tstr-samples-no-target", "missing column",
         lambda w, t: ["evaluate", "tstr", "--synthetic", t / "samples", "--real", w / "arc", "--out", t / "o",
                       "-q"], "target", setup=_samples_without("target")),
    Case("prepare-labels-no-findings", "missing column",
         lambda w, t: ["prepare", t / "imgs", t / "new", "--labels", t / "labels.csv", "--resolution", "8", "-q"],
         "Finding Labels", setup=lambda w, t: (copy(w / "samples" / "shard-00000", t / "imgs"),
                                               (t / "labels.csv").write_text("Image Index,Patient ID\nx.png,1\n"))),
    Case("reader-score-key-no-truth", "missing column",
         lambda w, t: ["evaluate", "reader-study", "score", w / "pack", t / "key.csv", t / "ans.csv"], "truth",
         setup=lambda w, t: (rewrite_csv(copy(w / "pack.key.csv", t / "key.csv"), drop=("truth",)),
                             _answers(w, t, [{"reader": "x", "image": r["image"], "answer": "real"}
                                             for r in _key_rows(w)]))),
    Case("reader-score-answers-no-answer", "missing column",
         lambda w, t: ["evaluate", "reader-study", "score", w / "pack", w / "pack.key.csv", t / "ans.csv"], "answer",
         setup=lambda w, t: _answers(w, t, [{"reader": "x", "image": r["image"]} for r in _key_rows(w)],
                                     fields=("reader", "image"))),
    # ---------------------------------------------------------------- truncated / empty binary files
    Case("sample-ckpt-networks-pt-truncated", "truncated file",
         lambda w, t: ["sample", _ckpt(w, t), "--out", t / "s", "--n", "2", "--device", "cpu", "-q"], "networks.pt",
         setup=_broken_run("networks.pt")),
    Case("fid-ckpt-networks-pt-empty", "truncated file",
         lambda w, t: ["fid", _ckpt(w, t), w / "samples", "--n", "4", "--random-weights", "-q"], "networks.pt",
         setup=_broken_run("networks.pt-zero")),
    Case("sample-run-every-ckpt-truncated", "truncated file",
         lambda w, t: ["sample", t / "run", "--out", t / "s", "--n", "2", "--device", "cpu", "-q"], "networks.pt",
         setup=_broken_run("all:networks.pt")),
    Case("resume-every-state-truncated", "truncated file",
         lambda w, t: ["train", "--out", t / "run", "--resume", "--max-kimg", "1", "-q"], "state.pt",
         setup=_broken_run("all:state.pt")),
    Case("sample-classifier-pt-empty", "truncated file",
         lambda w, t: ["sample", w / "run", "--out", t / "s", "--n", "2", "--classifier", t / "clf", "--device",
                       "cpu", "-q"], "classifier.pt",
         setup=lambda w, t: (copy(w / "clf", t / "clf"), (t / "clf" / "classifier.pt").write_bytes(b""))),
    Case("diversity-classifier-pt-truncated", "truncated file",
         lambda w, t: ["evaluate", "diversity", w / "run", "--classifier", t / "clf", "--real", w / "arc", "--out",
                       t / "o", "--n", "4", "-q"], "classifier.pt",
         setup=lambda w, t: truncate(copy(w / "clf", t / "clf") / "classifier.pt")),
    Case("fid-npz-truncated", "truncated file", lambda w, t: ["fid", t / "a.npz", w / "b.npz"], "a.npz",
         setup=lambda w, t: truncate(copy(w / "a.npz", t / "a.npz"))),
    Case("fid-npz-empty", "truncated file", lambda w, t: ["fid", w / "a.npz", t / "b.npz"], "b.npz",
         setup=lambda w, t: (t / "b.npz").write_bytes(b"")),
    Case("fid-npz-not-stats", "truncated file", lambda w, t: ["fid", t / "x.npz", w / "b.npz"], "x.npz",
         setup=lambda w, t: np.savez(t / "x.npz", other=np.zeros(3))),
    Case("train-images-npy-truncated", "truncated file",
         lambda w, t: ["train", t / "arc", "--out", t / "r", *TINY_TRAIN], "images_8.npy",
         setup=lambda w, t: truncate(copy(w / "arc", t / "arc") / "images_8.npy")),
    Case("fid-archive-npy-empty", "truncated file",
         lambda w, t: ["fid", t / "arc", w / "samples", "--random-weights", "-q"], "images_16.npy",
         setup=lambda w, t: (copy(w / "arc", t / "arc"), (t / "arc" / "images_16.npy").write_bytes(b""))),
    Case("classify-archive-npy-truncated", "truncated file",
         lambda w, t: ["classify", "train", t / "arc", "--out", t / "m", "--input-size", "16", "--width", "8",
                       "--epochs", "1", "-q"], "images_16.npy",
         setup=lambda w, t: truncate(copy(w / "arc", t / "arc") / "images_16.npy")),
    Case("fid-inception-weights-empty", "truncated file",
         lambda w, t: ["fid", w / "samples", w / "samples", "--inception", t / "w.pth", "-q"], "w.pth",
         setup=lambda w, t: (t / "w.pth").write_bytes(b"")),
    Case("fid-inception-weights-not-torch", "truncated file",
         lambda w, t: ["fid", w / "samples", w / "samples", "--inception", t / "w.pth", "-q"], "w.pth",
         setup=lambda w, t: (t / "w.pth").write_bytes(b"PK\x03\x04 not really a zip")),
    Case("classify-init-weights-truncated", "truncated file",
         lambda w, t: ["classify", "train", w / "arc", "--out", t / "m", "--init-weights", t / "i.pt", "-q"], "i.pt",
         setup=lambda w, t: truncate(copy(w / "clf" / "classifier.pt", t / "i.pt"))),
    Case("classify-init-weights-json", "unclear message",
         lambda w, t: ["classify", "train", w / "arc", "--out", t / "m", "--init-weights", t / "i.json", "-q"],
         "i.json: not torchvision-layout weights (--init-weights): it is not a PyTorch file (it begins with text",
         setup=lambda w, t: (t / "i.json").write_text('{"weights": 1}')),
    # ---------------------------------------------------------------- corrupt JSON
    Case("train-archive-json-torn", "corrupt JSON",
         lambda w, t: ["train", t / "arc", "--out", t / "r", *TINY_TRAIN], "archive.json",
         setup=lambda w, t: (copy(w / "arc", t / "arc"), _torn_json(lambda w, t: t / "arc" / "archive.json")(w, t))),
    Case("sample-networks-json-torn", "corrupt JSON",
         lambda w, t: ["sample", _ckpt(w, t), "--out", t / "s", "--n", "2", "--device", "cpu", "-q"],
         "networks.json", setup=lambda w, t: (copy(w / "run", t / "run"),
                                              _torn_json(lambda w, t: latest_ckpt(t / "run") / "networks.json")(w, t))),
    Case("sample-classifier-json-torn", "corrupt JSON",
         lambda w, t: ["sample", w / "run", "--out", t / "s", "--n", "2", "--classifier", t / "clf", "--device",
                       "cpu", "-q"], "classifier.json",
         setup=lambda w, t: (copy(w / "clf", t / "clf"), _torn_json(lambda w, t: t / "clf" / "classifier.json")(w, t))),
    Case("sample-resume-config-torn", "corrupt JSON",
         lambda w, t: ["sample", w / "run", "--out", t / "samples", "--n", "6", "--classifier", w / "clf",
                       "--shard-size", "3", "--device", "cpu", "-q"], "sample_config.json",
         setup=lambda w, t: (copy(w / "samples", t / "samples"),
                             _torn_json(lambda w, t: t / "samples" / "sample_config.json")(w, t))),
    Case("report-summary-torn", "corrupt JSON",
         lambda w, t: ["evaluate", "report", w / "run", "--out", t / "r.html", "--evaluations", t / "ev"],
         "summary.json", setup=lambda w, t: (t / "ev").mkdir() or (t / "ev" / "summary.json").write_text('{"evaluation": ')),
    Case("tstr-samples-summary-torn", "corrupt JSON",
         lambda w, t: ["evaluate", "tstr", "--synthetic", t / "samples", "--real", w / "arc", "--out", t / "o",
                       "-q"], "summary.json",
         setup=lambda w, t: (copy(w / "samples", t / "samples"),
                             _torn_json(lambda w, t: t / "samples" / "summary.json")(w, t))),
    Case("resume-log-damaged-mid-file", "corrupt JSON",
         lambda w, t: ["train", "--out", t / "run", "--resume", "--max-kimg", "1", "-q"], "log.jsonl",
         setup=lambda w, t: (copy(w / "run", t / "run"), (t / "run" / "log.jsonl").write_text(
             "{broken\n" + (w / "run" / "log.jsonl").read_text()))),
    Case("demo-state-torn", "corrupt JSON", lambda w, t: ["demo", "--out", t / "d", "-q"], "demo_state.json",
         setup=lambda w, t: (t / "d").mkdir() or (t / "d" / "demo_state.json").write_text("{")),
    # ---------------------------------------------------------------- the backend variable
    Case("train-backend-cuda", "backend variable", lambda w, t: ["train", w / "arc", "--out", t / "r", *TINY_TRAIN],
         "XRAYFORGE_BACKEND=cuda", env={"XRAYFORGE_BACKEND": "cuda"}),
    Case("sample-backend-cuda", "backend variable",
         lambda w, t: ["sample", w / "run", "--out", t / "s", "--n", "2", "-q"], "XRAYFORGE_BACKEND=cuda",
         env={"XRAYFORGE_BACKEND": "cuda"}),
    Case("fid-backend-unknown", "backend variable", lambda w, t: ["fid", w / "a.npz", w / "b.npz"],
         "XRAYFORGE_BACKEND='gpu'", env={"XRAYFORGE_BACKEND": "gpu"}),
    Case("demo-backend-triton-on-cpu", "backend variable", lambda w, t: ["demo", "--out", t / "d", "-q"],
         "XRAYFORGE_BACKEND=triton", env={"XRAYFORGE_BACKEND": "triton", "TRITON_INTERPRET": "0"}),
    # ---------------------------------------------------------------- silent wrong results, now refused
    Case("fid-nan-mean", "silent wrong result", lambda w, t: ["fid", t / "nan.npz", w / "a.npz"], "nan.npz",
         setup=_write_nan_stats),
    Case("fid-inf-sigma", "silent wrong result", lambda w, t: ["fid", w / "a.npz", t / "inf.npz"], "inf.npz",
         setup=_write_inf_stats),
    Case("fid-not-psd", "silent wrong result", lambda w, t: ["fid", t / "npsd.npz", t / "npsd.npz"],
         "positive semi-definite", setup=_write_non_psd),
    Case("fid-asymmetric", "silent wrong result", lambda w, t: ["fid", t / "asym.npz", t / "asym.npz"],
         "not symmetric", setup=_write_asym),
    Case("fid-different-spaces", "silent wrong result", lambda w, t: ["fid", w / "a.npz", t / "c.npz"],
         "different feature spaces",
         setup=lambda w, t: FrechetStats.from_features(np.random.default_rng(1).standard_normal((9, 3))).save(t / "c.npz")),
    Case("reader-same-name-two-files", "silent wrong result",
         lambda w, t: ["evaluate", "reader-study", "score", w / "pack", w / "pack.key.csv", t / "a.csv", t / "b.csv"],
         "dr-x", setup=_same_reader_twice),
    Case("reader-answer-not-in-study", "silent wrong result",
         lambda w, t: ["evaluate", "reader-study", "score", w / "pack", w / "pack.key.csv", t / "ans.csv"],
         "nope.png", setup=lambda w, t: _answers(w, t, [{"reader": "x", "image": "nope.png", "answer": "real"}])),
    Case("reader-several-readers-one-file", "silent wrong result",
         lambda w, t: ["evaluate", "reader-study", "score", w / "pack", w / "pack.key.csv", t / "ans.csv"],
         "ans.csv", setup=lambda w, t: _answers(w, t, [{"reader": r, "image": k["image"], "answer": "real"}
                                                       for r, k in zip(("a", "b"), _key_rows(w))])),
    Case("reader-make-unbalanced", "silent wrong result",
         lambda w, t: ["evaluate", "reader-study", "make", "--real", w / "arc", "--synthetic", t / "samples", "--n",
                       "4", "--size", "16", "--out", t / "p"], "only 1 of the 2 synthetic",
         setup=_unreadable_synthetic),
    Case("tstr-manifest-p-column-gone", "silent wrong result",
         lambda w, t: ["evaluate", "tstr", "--synthetic", t / "samples", "--real", w / "arc", "--out", t / "o",
                       "--input-size", "16", "--epochs", "1", "-q"], "p_Cardiomegaly",
         setup=_samples_without("p_Cardiomegaly")),
    Case("lco-target-unknown-finding", "silent wrong result",
         lambda w, t: ["sample", w / "run", "--out", t / "s", "--n", "2", "--classifier", w / "clf", "--lco",
                       "Cardiomegally=1", "--device", "cpu", "-q"], "Cardiomegally"),
    Case("reader-same-file-twice", "silent wrong result",
         lambda w, t: ["evaluate", "reader-study", "score", w / "pack", w / "pack.key.csv", t / "ans.csv",
                       t / "." / "ans.csv"], "given twice",
         setup=lambda w, t: _answers(w, t, [{"reader": "", "image": r["image"], "answer": "real"}
                                            for r in _key_rows(w)])),
    Case("sample-marker-not-an-object", "corrupt JSON",
         lambda w, t: ["sample", w / "run", "--out", t / "s", "--n", "2", "--device", "cpu", "-q"], ".xrayforge.json",
         setup=lambda w, t: (t / "s").mkdir() or (t / "s" / ".xrayforge.json").write_text("[1]")),
    Case("fid-save-stats-not-npz", "out path", lambda w, t: ["fid", w / "a.npz", "--save-stats", t / "s.csv"],
         "s.csv"),
    Case("fid-save-stats-over-users-file", "destroys data",
         lambda w, t: ["fid", w / "a.npz", "--save-stats", t / "mine.npz"], "mine.npz",
         setup=lambda w, t: np.savez(t / "mine.npz", weights=np.arange(3)), keep=lambda w, t: [t / "mine.npz"]),
    Case("bench-json-missing-folder", "out path",
         lambda w, t: ["bench", "--suites", "ops", "--json", t / "nowhere" / "b.json"], "nowhere"),
    Case("report-over-a-manifest", "destroys data",
         lambda w, t: ["evaluate", "report", w / "run", "--out", t / "arc" / "manifest.csv"], "manifest.csv",
         setup=lambda w, t: copy(w / "arc", t / "arc"), keep=lambda w, t: [t / "arc"]),
    Case("train-metrics-more-than-the-archive", "silent wrong result",
         lambda w, t: ["train", w / "arc", "--out", t / "r", *TINY_TRAIN, "--metrics", "fid", "--metrics-images",
                       "100", "--features", f"classifier:{w / 'clf'}"], "only 38 images outside its test split"),
    Case("sample-other-settings", "silent wrong result",
         lambda w, t: ["sample", w / "run", "--out", w / "samples", "--n", "9", "--classifier", w / "clf",
                       "--shard-size", "3", "--device", "cpu", "-q"], "other settings",
         keep=lambda w, t: [w / "samples"]),
]


def _expect(case, w, t):
    return case.expect(t) if case.expect is str else (case.expect(w, t) if callable(case.expect) else case.expect)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case, world, tmp_path, capsys):
    if case.setup:
        case.setup(world, tmp_path)
    keep = case.keep(world, tmp_path) if case.keep else []
    before = [digest(p) for p in keep]
    capsys.readouterr()
    rc, out, err = run(case.argv(world, tmp_path), capsys, case.env)
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == case.rc, (rc, err)
    assert "Traceback" not in err and "unexpected error" not in err, err
    assert len(lines) == 1, err
    assert lines[0].startswith("xrayforge ") and ": error: " in lines[0], lines[0]
    assert _expect(case, world, tmp_path) in lines[0], lines[0]
    assert [digest(p) for p in keep] == before, "the user's files changed"


def test_count_by_kind():
    by_kind = Counter(c.kind for c in CASES)
    print("\n" + "\n".join(f"{k}: {n}" for k, n in sorted(by_kind.items())) + f"\ntotal: {len(CASES)}")
    assert len({c.id for c in CASES}) == len(CASES)
    assert set(by_kind) == {"numeric option <= 0", "device", "out path", "destroys data", "missing column",
                            "truncated file", "corrupt JSON", "backend variable", "silent wrong result",
                            "silently ignored", "unclear message"}


# ------------------------------------------------------------------------------ where the right answer is to go on
def test_a_damaged_latest_checkpoint_falls_back_to_the_older_one_and_says_so(world, tmp_path, capsys, caplog):
    _broken_run("state.pt")(world, tmp_path)
    saved = tmp_path / "run" / "train_config.json"  # keeping one checkpoint must not rotate away the good one
    saved.write_text(json.dumps({**json.loads(saved.read_text()), "keep_checkpoints": 1}))
    bad = latest_ckpt(tmp_path / "run")
    older = sorted((tmp_path / "run" / "checkpoints").glob("ckpt-*"))[-2]
    rc, out, err = run(["train", "--out", tmp_path / "run", "--resume", "-q"], capsys)
    assert rc == 0, err
    said = [r for r in caplog.records if r.levelname == "WARNING"]  # on stderr as "WARNING xrayforge...: ..."
    assert len(said) == 1 and bad.name in said[0].getMessage() and older.name in said[0].getMessage()
    assert "truncated" in said[0].getMessage() and "Traceback" not in err
    # the run went on from the older checkpoint to the end: a new latest replaces the damaged one
    assert latest_ckpt(tmp_path / "run").name == bad.name
    assert (latest_ckpt(tmp_path / "run") / "state.pt").stat().st_size > 0
    assert (tmp_path / "run" / "checkpoints" / f"damaged-{bad.name}").is_dir()  # kept aside for a look
    rc, out, err = run(["train", "--out", tmp_path / "run", "--resume", "--max-kimg", "1", "-q"], capsys)
    assert rc == 0, err


def test_hidden_files_do_not_make_a_folder_foreign(world, tmp_path, capsys):
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / ".DS_Store").write_bytes(b"\0")
    (tmp_path / "s" / ".xrayforge.json.tmp").write_text("{")  # a marker write cut short
    rc, out, err = run(["sample", world / "run", "--out", tmp_path / "s", "--n", "2", "--device", "cpu", "-q"], capsys)
    assert rc == 0, err


def test_a_finished_archive_re_summarises_after_its_checkpoint_is_gone(world, tmp_path, capsys):
    copy(world / "run", tmp_path / "run")
    argv = ["sample", tmp_path / "run", "--out", tmp_path / "s", "--n", "4", "--device", "cpu", "-q"]
    assert run(argv, capsys)[0] == 0
    first = json.loads((tmp_path / "s" / "summary.json").read_text())
    shutil.rmtree(tmp_path / "run" / "checkpoints")
    (tmp_path / "run" / "checkpoints").mkdir()
    rc, out, err = run(argv, capsys)
    assert rc == 0 and "was complete" in out, err
    again = json.loads((tmp_path / "s" / "summary.json").read_text())
    assert again["images"] == first["images"] == 4 and again["checkpoint"] == first["checkpoint"]


def test_sample_from_a_run_whose_latest_checkpoint_lost_its_metadata_says_which_it_used(world, tmp_path, capsys,
                                                                                     caplog):
    _broken_run("networks.json-missing")(world, tmp_path)
    bad = latest_ckpt(tmp_path / "run")
    rc, out, err = run(["sample", tmp_path / "run", "--out", tmp_path / "s", "--n", "2", "--device", "cpu", "-q"],
                       capsys)
    assert rc == 0, err
    used = json.loads((tmp_path / "s" / "summary.json").read_text())["checkpoint"]
    assert Path(used).name != bad.name and bad.name in caplog.text and Path(used).name in caplog.text


def test_a_log_torn_by_a_kill_is_repaired_on_resume_and_read_by_report(world, tmp_path, capsys):
    copy(world / "run", tmp_path / "run")
    log = tmp_path / "run" / "log.jsonl"
    ticks = [json.loads(line) for line in log.read_text().splitlines()]
    ckpts = sorted((tmp_path / "run" / "checkpoints").glob("ckpt-*"))
    # killed after two more ticks were logged past a checkpoint, the second tick's line half written:
    # the checkpoints after the third tick never happened
    for ck in ckpts:
        if int(ck.name.split("-")[1]) > ticks[2]["images"]:
            shutil.rmtree(ck)
    (tmp_path / "run" / "checkpoints" / "latest").write_text(f"ckpt-{ticks[2]['images']:012d}")
    log.write_text(log.read_text() + '{"tick": 99, "ima')
    rc, out, err = run(["evaluate", "report", tmp_path / "run", "--out", tmp_path / "r.html"], capsys)
    assert rc == 0, err
    assert "cut short" in (tmp_path / "r.md").read_text()
    rc, out, err = run(["train", "--out", tmp_path / "run", "--resume", "-q"], capsys)
    assert rc == 0, err
    again = [json.loads(line) for line in log.read_text().splitlines()]  # every line whole
    images = [t["images"] for t in again]
    assert images == sorted(set(images)), "a tick logged twice"
    assert images == [t["images"] for t in ticks], "the resumed run logs the same ticks"
    assert [t["tick"] for t in again] == list(range(1, len(again) + 1))


def test_readers_who_left_their_name_empty_stay_apart_and_bom_files_read(world, tmp_path, capsys):
    _two_blank_readers(world, tmp_path)
    rewrite_csv(tmp_path / "r2" / "answers.csv", bom=True)  # as a spreadsheet program saves it
    assert (tmp_path / "r2" / "answers.csv").read_bytes().startswith(b"\xef\xbb\xbf")
    rc, out, err = run(["evaluate", "reader-study", "score", world / "pack", world / "pack.key.csv",
                        tmp_path / "r1" / "answers.csv", tmp_path / "r2" / "answers.csv", "--json"], capsys)
    assert rc == 0, err
    result = json.loads(out)
    n = len(_key_rows(world))
    assert len(result["readers"]) == 2 and result["pooled"]["answers"] == 2 * n
    # one said "real" to everything, the other "synthetic": half right each
    assert sorted(r["accuracy"] for r in result["readers"].values()) == [0.5, 0.5]


def test_tstr_input_with_a_missing_image_lists_it_in_skipped_csv(world, tmp_path, caplog):
    from xrayforge.evaluate.labelled import sample_as_archive
    copy(world / "samples", tmp_path / "samples")
    gone = sorted((tmp_path / "samples").rglob("*.png"))[0]
    gone.unlink()
    arc = sample_as_archive(tmp_path / "samples", tmp_path / "conv", progress=False)
    assert len(arc) == 5
    skipped = list(csv.DictReader(open(tmp_path / "conv" / "skipped.csv", newline="")))
    assert [Path(r["source"]).name for r in skipped] == [gone.name] and "missing" in skipped[0]["reason"]
    assert "missing" in caplog.text


def test_a_converted_sample_folder_is_not_reused_once_it_was_resampled(world, tmp_path, caplog):
    """The evaluations convert a sample folder once; re-sampling into the same folder must not leave
    them measuring the old images (the image count alone cannot tell)."""
    from xrayforge.errors import UserError
    from xrayforge.evaluate.labelled import sample_as_archive
    copy(world / "samples", tmp_path / "samples")
    first = sample_as_archive(tmp_path / "samples", tmp_path / "conv", progress=False)
    # `xrayforge sample` run again on the finished folder rewrites its summary's per-run figures and
    # its settings' paths, and changes no image: still the same samples
    summary = json.loads((tmp_path / "samples" / "summary.json").read_text())
    (tmp_path / "samples" / "summary.json").write_text(json.dumps({**summary, "images_this_run": 0,
                                                                  "images_per_second": None}))
    config = json.loads((tmp_path / "samples" / "sample_config.json").read_text())
    (tmp_path / "samples" / "sample_config.json").write_text(json.dumps({**config, "run": config["run"] + "/"}))
    again = sample_as_archive(tmp_path / "samples", tmp_path / "conv", progress=False)
    assert len(again) == len(first) == 6 and again.labels.tolist() == first.labels.tolist()
    manifest = tmp_path / "samples" / "manifest.csv"
    text = manifest.read_text()
    manifest.write_text(text.replace(",0.", ",0.9", 1))  # another sample: its probabilities differ
    with pytest.raises(UserError, match="holds other samples than when"):
        sample_as_archive(tmp_path / "samples", tmp_path / "conv", progress=False)
    # a conversion made before the record existed: the count is compared, with a warning
    manifest.write_text(text)
    (tmp_path / "conv.source.json").unlink()
    assert len(sample_as_archive(tmp_path / "samples", tmp_path / "conv", progress=False)) == 6
    assert "older xrayforge" in caplog.text


def test_tstr_refuses_to_continue_on_a_resampled_folder(world, tmp_path):
    """Its finished models are kept in --out: after the folder is sampled again they belong to other
    images, even once the converted copy is removed."""
    copy(world / "samples", tmp_path / "samples")
    manifest = tmp_path / "samples" / "manifest.csv"
    rows = list(csv.DictReader(open(manifest, newline="")))
    more = []
    for k in range(1, 3):  # 18 images: enough for a training budget
        for r in rows:
            name = f"{Path(r['file']).stem}-{k}.png"
            shutil.copyfile(tmp_path / "samples" / r["file"], tmp_path / "samples" / Path(r["file"]).parent / name)
            more.append({**r, "file": str(Path(r["file"]).parent / name), "index": int(r["index"]) + 100 * k})
    with open(manifest, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows + more)
    from xrayforge.errors import UserError
    from xrayforge.evaluate.tstr import TSTRConfig, run_tstr
    cfg = TSTRConfig(synthetic=str(tmp_path / "samples"), real=str(world / "arc"), out=str(tmp_path / "t"),
                     input_size=16, width=8, epochs=1, val_fraction=0.4, bootstrap=10)
    run_tstr(cfg, progress=False)
    manifest.write_text(manifest.read_text().replace(",0.", ",0.9", 1))
    for converted in (tmp_path / "t").glob("samples-archive*"):
        shutil.rmtree(converted) if converted.is_dir() else converted.unlink()
    with pytest.raises(UserError, match="synthetic_id"):
        run_tstr(cfg, progress=False)


@pytest.mark.parametrize("damage", ["torn", "not-object"])
def test_resume_with_a_damaged_train_config_takes_the_checkpoints_copy(world, tmp_path, capsys, caplog, damage):
    """train_config.json torn by a crash (or not an object): the run's options are also in every
    checkpoint, so the resume goes on from there and says so."""
    copy(world / "run", tmp_path / "run")
    config = tmp_path / "run" / "train_config.json"
    if damage == "torn":
        _torn_json(lambda w, t: config)(world, tmp_path)
    else:
        config.write_text("[1, 2]")
    rc, out, err = run(["train", "--out", tmp_path / "run", "--resume", "-q"], capsys)
    assert rc == 0, err
    assert "train_config.json" in caplog.text and "checkpoint" in caplog.text


def test_debug_shows_the_traceback(world, tmp_path, capsys):
    with pytest.raises(ValueError, match="nan.npz"):
        _write_nan_stats(world, tmp_path)
        cli(["--debug", "fid", str(tmp_path / "nan.npz"), str(world / "a.npz")])
    with pytest.raises(ValueError, match="nan.npz"):  # after the command too, where the messages suggest it
        cli(["fid", str(tmp_path / "nan.npz"), str(world / "a.npz"), "--debug"])
    rc, out, err = run(["fid", tmp_path / "nan.npz", world / "a.npz"], capsys, env={"XRAYFORGE_DEBUG": "0"})
    assert rc == 1 and "Traceback" not in err


def test_a_real_process_prints_one_line_and_no_traceback(world, tmp_path):
    """Out of process, as a user runs it: the exit status and the whole of standard error."""
    truncate(copy(world / "a.npz", tmp_path / "a.npz"))
    proc = subprocess.run([sys.executable, "-m", "xrayforge", "fid", str(tmp_path / "a.npz"), str(world / "b.npz")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "a.npz" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "xrayforge", "--debug", "fid", str(tmp_path / "a.npz"),
                           str(world / "b.npz")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" in proc.stderr


def test_info_says_what_a_forced_backend_does_on_each_device(monkeypatch, capsys):
    import torch
    monkeypatch.setenv("XRAYFORGE_BACKEND", "cuda")
    assert cli(["info"]) == 0
    out = capsys.readouterr().out
    assert "cpu (CPU): default backend 'cuda' (XRAYFORGE_BACKEND)" in out
    assert "pixel_norm" in out and "cuda -> unavailable" in out and "auto -> torch" not in out
    monkeypatch.setenv("XRAYFORGE_BACKEND", "torch")
    assert cli(["info"]) == 0
    assert "torch -> torch" in capsys.readouterr().out or torch.cuda.is_available()


def test_sample_json_prints_one_json_object(world, tmp_path, capsys):
    """`sample --json` printed the text summary before the JSON: a pipe into jq failed."""
    assert cli(["sample", str(world / "run"), "--out", str(tmp_path / "s"), "--n", "2", "--device", "cpu", "-q",
                "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["images"] == 2
