"""Metrics shared by the evaluations: AUROC, bootstrap intervals, patient-level splits."""
from __future__ import annotations

import hashlib

import numpy as np


def auroc(labels, scores) -> float:
    """Area under the ROC curve (Mann-Whitney U with average ranks for ties); NaN when a
    class is absent."""
    y = np.asarray(labels).astype(bool)
    s = np.asarray(scores, dtype=np.float64)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s), dtype=np.float64)
    sorted_s = s[order]
    i = 0
    while i < len(s):  # average ranks over ties
        j = i
        while j + 1 < len(s) and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def youden_threshold(labels, probs) -> float:
    """The probability threshold that maximises sensitivity + specificity - 1."""
    y = np.asarray(labels).astype(bool)
    p = np.asarray(probs, dtype=np.float64)
    if y.all() or not y.any():
        return 0.5
    best, best_t = -1.0, 0.5
    for t in np.unique(p):
        pred = p >= t
        j = pred[y].mean() + (~pred[~y]).mean() - 1
        if j > best:
            best, best_t = j, float(t)
    return best_t


def patient_split(patient_ids, fraction: float = 0.1, salt: str = "val") -> np.ndarray:
    """A boolean mask choosing about ``fraction`` of the patients (all their images together),
    by a hash of the patient id: stable across runs and machines."""
    out = np.zeros(len(patient_ids), dtype=bool)
    for i, pid in enumerate(patient_ids):
        key = pid if pid else f"image-{i}"
        h = int(hashlib.sha1(f"{salt}:{key}".encode()).hexdigest()[:8], 16)
        out[i] = (h % 10000) < fraction * 10000
    return out
