"""Metrics shared by the evaluations: AUROC and its bootstrap interval, proportion intervals,
patient-level splits."""
from __future__ import annotations

import hashlib
import math

import numpy as np


def auroc(labels, scores) -> float:
    """Area under the ROC curve (Mann-Whitney U with average ranks for ties); NaN when a
    class is absent or a score is NaN (it has no rank: sorting would put it last, as the highest)."""
    y = np.asarray(labels).astype(bool)
    s = np.asarray(scores, dtype=np.float64)
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0 or np.isnan(s).any():
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    sorted_s = s[order]
    # tie groups: the average of ranks first..last (1-based) for every member of a group
    starts = np.flatnonzero(np.r_[True, sorted_s[1:] != sorted_s[:-1]])
    ends = np.r_[starts[1:], len(s)]
    group_rank = (starts + ends + 1) / 2.0
    ranks = np.empty(len(s), dtype=np.float64)
    ranks[order] = np.repeat(group_rank, ends - starts)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def bootstrap_auroc(labels, scores, groups=None, rounds: int = 1000, seed: int = 0,
                    level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of the AUROC over bootstrap resamples of the test set.

    ``groups`` (e.g. patient ids): whole groups are resampled, so a patient's images stay
    together and the interval is not too narrow when patients have several images.
    Resamples in which a class is absent are drawn again (they have no AUROC). NaN scores: no
    interval (NaN, NaN), as ``auroc`` has none."""
    y = np.asarray(labels).astype(bool)
    s = np.asarray(scores, dtype=np.float64)
    if y.all() or not y.any() or np.isnan(s).any():
        return float("nan"), float("nan")
    keys = np.arange(len(y)) if groups is None else np.unique(np.asarray(groups), return_inverse=True)[1]
    members = np.argsort(keys, kind="mergesort")
    counts = np.bincount(keys)
    offsets = np.r_[0, np.cumsum(counts)[:-1]]
    rng = np.random.default_rng(seed)
    values, tries = [], 0
    while len(values) < rounds:
        tries += 1
        if tries > 20 * rounds:
            raise ValueError("bootstrap resamples keep missing a class: too few positives or negatives")
        pick = rng.integers(0, len(counts), len(counts))
        if groups is None:
            idx = pick
        else:  # the members of every picked group, without a Python loop over groups
            c = counts[pick]
            start = np.repeat(offsets[pick] - np.r_[0, np.cumsum(c)[:-1]], c)
            idx = members[start + np.arange(c.sum())]
        v = auroc(y[idx], s[idx])
        if not np.isnan(v):
            values.append(v)
    lo, hi = np.percentile(values, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    return float(lo), float(hi)


def wilson_interval(successes: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson score interval of a proportion (95% by default); (nan, nan) for n = 0."""
    if n == 0:
        return float("nan"), float("nan")
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))


def _log_comb(n: int, k: int) -> float:
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)


def log_binomial_pmf(k: int, n: int, p: float) -> float:
    """log P(X = k) for X ~ Binomial(n, p), 0 < p < 1 (lgamma: no overflow for any n)."""
    return _log_comb(n, k) + k * math.log(p) + (n - k) * math.log1p(-p)


def fisher_greater(hits_a: int, n_a: int, hits_b: int, n_b: int) -> float:
    """One-sided Fisher exact test that group a's hit rate exceeds group b's: P(X >= hits_a) for
    X hypergeometric (n_a draws from n_a + n_b items of which hits_a + hits_b are hits). Terms
    summed in log space with the largest factored out."""
    total, hits = n_a + n_b, hits_a + hits_b
    lo, hi = max(hits_a, hits - n_b, 0), min(n_a, hits)
    if hits_a <= max(0, hits - n_b):
        return 1.0
    if lo > hi:
        return 0.0
    logs = [_log_comb(hits, x) + _log_comb(total - hits, n_a - x) - _log_comb(total, n_a) for x in range(lo, hi + 1)]
    top = max(logs)
    return float(min(1.0, math.exp(top) * sum(math.exp(v - top) for v in logs)))


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


def label_permutation_p(labels, called_positive, called_negative, rounds: int = 10000,
                        seed: int = 0) -> np.ndarray:
    """Two-sided Monte Carlo label-permutation p-values of answers' agreement with the truth, one
    per column of answers.

    ``labels``: (N,) booleans, the truth of N items. ``called_positive`` / ``called_negative``:
    (N,) or (N, k) counts of answers "positive" / "negative" about each item, one column per set of
    answers scored together — one reader's (0 or 1 per item), or several readers' pooled (an item
    counted once per reader who answered it). A column's statistic is its number of correct answers.
    Under the null hypothesis that the answers do not depend on the truth, every assignment of the
    labels to the items (with the same number of each) is equally likely; the labels are permuted
    across the items ``rounds`` times, each permutation shared by all columns, so answers about one
    item move together. That is why this test, unlike a binomial test of the pooled answers, holds
    its level when answers are correlated: several readers answer about the same items (an image
    that looks synthetic is called so by all of them) and a reader's bias ties their answers, so
    pooled answers are far from independent and a binomial test of them rejects too often.

    Two-sided: b counts the permutations whose correct count lies at least as far from its mean
    under the null (exact: the negative answers plus N⁺/N of the positive-minus-negative ones) as
    the observed count; p = (b + 1) / (rounds + 1), a valid p-value for any number of rounds and
    never 0 (10000 rounds: the smallest is 1/10001, and one near 1e-3 is known to about ±30%). Seeded: the same inputs and seed give the
    same p-values. The distances are compared as integers (times N), so ties are exact."""
    y = np.asarray(labels).astype(bool).ravel()
    pos = np.asarray(called_positive, dtype=np.float64)
    neg = np.asarray(called_negative, dtype=np.float64)
    if pos.ndim == 1:
        pos, neg = pos[:, None], neg[:, None]
    if pos.shape != neg.shape or pos.ndim != 2 or pos.shape[0] != len(y):
        raise ValueError(f"label_permutation_p: {len(y)} labels need (N, k) answer counts of N = {len(y)} rows "
                         f"alike, got {pos.shape} and {neg.shape}")
    if rounds < 1:
        raise ValueError(f"label_permutation_p: rounds must be >= 1, got {rounds}")
    n_items, n_pos = len(y), int(y.sum())
    diff = pos - neg  # correct answers = neg.sum(0) + y @ diff: only y @ diff varies with the labels
    total = diff.sum(0)

    def distance(truth):  # N × |correct - its null mean|: integers, exact in float64 (< 2 ** 53)
        return np.abs(n_items * (truth @ diff) - n_pos * total)

    observed = distance(y.astype(np.float64))
    rng = np.random.default_rng(seed)
    chunk = max(1, min(rounds, 4_000_000 // max(n_items, 1)))  # at most ~32 MB of permuted labels at once
    beyond, done = np.zeros(diff.shape[1], dtype=np.int64), 0
    while done < rounds:
        c = min(chunk, rounds - done)
        permuted = rng.permuted(np.tile(y.astype(np.float64), (c, 1)), axis=1)
        beyond += (distance(permuted) >= observed - 0.5).sum(0)  # integers: 0.5 only absorbs float rounding
        done += c
    return (beyond + 1) / (rounds + 1)
