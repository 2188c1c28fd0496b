"""The packed multi-resolution archive written by `xrayforge prepare`.

Layout of an archive folder::

    archive.json      {"format": "xrayforge-archive", "version": 1, "resolution": 1024,
                       "resolutions": [4, ..., 1024], "dtype": "uint8", "count": N, "capacity": M,
                       "square": "crop", "findings": [...], "source": "..."}
    images_<R>.npy    (M, R, R) uint8/uint16, one per resolution, memory-mapped (np.load mmap_mode="r")
    manifest.csv      one row per included image: row (its index in the arrays), source, patient_id,
                      study_id, split, finding_labels, the 14 finding columns, sha1 of the full-size pixels
    skipped.csv       one row per file left out: source, reason

Rows are written in the order of the candidate files; ``capacity`` rows are allocated and the
rows of skipped files stay unused (the manifest lists the used ones). Every lower resolution
is a 2×2 box filter of the one above it.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..utils.files import load_npy, read_csv, read_json
from .labels import FINDINGS

FORMAT = "xrayforge-archive"
VERSION = 1
MANIFEST_FIELDS = ["row", "source", "patient_id", "study_id", "split", "finding_labels", *FINDINGS, "sha1"]


def pyramid_resolutions(resolution: int) -> list[int]:
    if resolution < 4 or resolution & (resolution - 1):
        raise ValueError(f"resolution must be a power of two >= 4, got {resolution}")
    out, r = [], 4
    while r <= resolution:
        out.append(r)
        r *= 2
    return out


def box_pyramid(img: np.ndarray) -> dict[int, np.ndarray]:
    """{R: image at R} for R = size, size/2, ..., 4 by repeated 2×2 averaging (float64); ``img``
    is square with a power-of-two side >= 4 (another size has no exact 2×2 pyramid)."""
    if img.ndim != 2 or img.shape[0] != img.shape[1]:
        raise ValueError(f"box_pyramid needs a square image, got shape {img.shape}")
    pyramid_resolutions(img.shape[0])  # raises for a side that is not a power of two >= 4
    out = {img.shape[0]: img}
    cur = img.astype(np.float64)
    while cur.shape[0] > 4:
        cur = 0.25 * (cur[0::2, 0::2] + cur[1::2, 0::2] + cur[0::2, 1::2] + cur[1::2, 1::2])
        out[cur.shape[0]] = cur
    return out


def quantize(x: np.ndarray, dtype: np.dtype) -> np.ndarray:
    top = np.iinfo(dtype).max
    return np.clip(np.rint(np.asarray(x, dtype=np.float64) * top), 0, top).astype(dtype)


class Archive:
    """Read access to a prepared archive (memory-mapped)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        meta_path = self.path / "archive.json"
        if not meta_path.is_file():
            hint = " (an interrupted prepare leaves OUT.partial; run prepare again to finish it)" \
                if Path(str(self.path) + ".partial").exists() else ""
            raise FileNotFoundError(f"{self.path}: not an xrayforge archive (no archive.json){hint}")
        self.meta = read_json(meta_path, "archive metadata")
        if self.meta.get("format") != FORMAT:
            raise UserError(f"{meta_path}: format {self.meta.get('format')!r} is not {FORMAT!r}")
        version = self.meta.get("version", 0)
        if type(version) is not int:  # "2" or null compared with an int raised a bare TypeError
            raise UserError(f"{meta_path}: damaged archive metadata (version {version!r} is not a whole number)")
        if version > VERSION:
            raise UserError(f"{meta_path}: archive version {version} is newer than this xrayforge")
        try:
            self.resolutions = [int(r) for r in self.meta["resolutions"]]
            self.resolution = int(self.meta["resolution"])
            dtype = np.dtype(self.meta["dtype"])
            if self.resolutions != pyramid_resolutions(self.resolution):
                raise ValueError(f"resolutions {self.resolutions} are not the pyramid 4 .. {self.resolution}")
            if dtype not in (np.uint8, np.uint16):  # a float array read as images: NaN and values past 1 unchecked
                raise ValueError(f"dtype {dtype} is not uint8 or uint16")
            findings = self.meta.get("findings", FINDINGS)
            # null was a bare TypeError, and a single name (a string) was read as one finding per letter
            if not isinstance(findings, list) or not all(isinstance(f, str) and f for f in findings):
                raise ValueError(f"findings {findings!r} is not a list of finding names")
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(f"{meta_path}: damaged archive metadata ({type(exc).__name__}: {exc})") from None
        self.findings = list(findings)
        self.records, _ = read_csv(self.path / "manifest.csv", ["row", "source", "patient_id", "split", *self.findings],
                                   "an archive manifest")
        try:
            self.rows = np.array([int(r["row"]) for r in self.records], dtype=np.int64)
            self.labels = np.array([[int(r[f]) for f in self.findings] for r in self.records], dtype=np.int8
                                   ).reshape(len(self.records), len(self.findings))
        except (TypeError, ValueError, OverflowError) as exc:  # OverflowError: a label past int8 (300)
            raise UserError(f"{self.path / 'manifest.csv'}: a row or label that is not an integer, or not 0 or 1 "
                            f"({exc})") from None
        manifest = self.path / "manifest.csv"
        if len(self.rows) and self.rows.min() < 0:  # numpy would read it from the end of the arrays
            raise UserError(f"{manifest}: row {self.rows.min()} is negative")
        # a manifest cut at a line, rows listed twice or labels other than 0 / 1 read as other data, silently
        if isinstance(self.meta.get("count"), int) and self.meta["count"] != len(self.records):
            raise UserError(f"{manifest}: lists {len(self.records)} images, but {meta_path.name} says "
                            f"{self.meta['count']}; the archive is damaged (prepare it again)")
        rows, counts = np.unique(self.rows, return_counts=True)
        if (counts > 1).any():
            raise UserError(f"{manifest}: row {rows[counts > 1][0]} is listed more than once")
        if self.labels.size and not np.isin(self.labels, (0, 1)).all():
            i, j = np.argwhere(~np.isin(self.labels, (0, 1)))[0]
            raise UserError(f"{manifest}: row {self.rows[i]}: {self.findings[j]} is {self.labels[i, j]}, not 0 or 1")
        self.patient_ids = [r["patient_id"] for r in self.records]
        self.splits = [r["split"] for r in self.records]
        self._arrays: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.records)

    def __getstate__(self) -> dict:
        # without the open memory maps: a pickled np.memmap carries every image (a DataLoader worker
        # started by spawn or forkserver, the default on macOS and from Python 3.14 on Linux, was sent
        # the whole archive, as a writable in-memory copy); the worker maps the files again when it reads
        return {**self.__dict__, "_arrays": {}}

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.meta["dtype"])

    def array(self, resolution: int) -> np.ndarray:
        """The (capacity, R, R) memory-mapped array at ``resolution`` (index it with ``rows``)."""
        if resolution not in self.resolutions:
            raise ValueError(f"{self.path}: no {resolution}-px images; it has {self.resolutions}")
        if resolution not in self._arrays:
            path = self.path / f"images_{resolution}.npy"
            arr = load_npy(path, f"the archive's {resolution}-px images", mmap_mode="r")
            if arr.ndim != 3 or arr.shape[1:] != (resolution, resolution) or arr.dtype != self.dtype \
                    or (len(self.rows) and arr.shape[0] <= self.rows.max()):
                raise UserError(f"{path}: holds {arr.dtype} {arr.shape}; the manifest needs {self.dtype} rows up to "
                                f"{self.rows.max() if len(self.rows) else 0} of {resolution}×{resolution}")
            self._arrays[resolution] = arr
        return self._arrays[resolution]

    def images(self, indices, resolution: int) -> np.ndarray:
        """Images ``indices`` (positions in the manifest) at ``resolution``, as a new array."""
        idx = np.asarray(indices)
        if idx.size == 0:  # [] is a float array to numpy, which it refuses as an index
            idx = idx.astype(np.int64)
        elif idx.dtype != bool and (idx.max() >= len(self) or idx.min() < -len(self)):
            bad = idx.max() if idx.max() >= len(self) else idx.min()
            raise IndexError(f"{self.path}: no image at position {bad}; it has {len(self)} images")
        return self.array(resolution)[self.rows[idx]]

    def random_positions(self, n: int, seed: int, among: np.ndarray | None = None) -> np.ndarray:
        """min(n, len(among)) distinct manifest positions of ``among`` (default: every position) drawn
        with ``seed``, sorted (sequential reads)."""
        among = np.arange(len(self)) if among is None else np.asarray(among)
        return np.sort(among[np.random.default_rng(seed).choice(len(among), min(n, len(among)), replace=False)])

    def held_out(self) -> np.ndarray:
        """A boolean per manifest position: held out for testing (``held_out_rows``)."""
        return held_out_rows(self.splits, self.patient_ids)

    def training_positions(self, include_test: bool = False) -> np.ndarray:
        """Manifest positions a GAN trains on: those not ``held_out`` (the "test" split and its patients'
        other images), on which `evaluate tstr` and the other evaluations test (every position of an
        archive without one), or every position (``include_test``)."""
        every = np.arange(len(self))
        return every if include_test else every[~self.held_out()]

    def as_float(self, images: np.ndarray) -> np.ndarray:
        """Stored integers -> float32 in [0, 1]."""
        return images.astype(np.float32) / float(np.iinfo(self.dtype).max)


def held_out_rows(splits, patient_ids) -> np.ndarray:
    """A boolean per row: held out for testing. The rows of the "test" split, and every other row of a
    patient who has one (an empty patient id is no patient): split lists that are not patient-wise (the
    official ChestX-ray14 lists are) would otherwise put one patient's radiographs on both sides."""
    test = np.array([s == "test" for s in splits], dtype=bool)
    patients = {p for p, t in zip(patient_ids, test) if t and p}
    return test | np.array([bool(p) and p in patients for p in patient_ids], dtype=bool)
