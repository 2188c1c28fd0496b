"""Streaming feature moments, Fréchet statistics files, and the Fréchet distance.

Moments are kept as (n, mean, M2) in float64, where M2 is the sum of outer products of the
deviations from the mean. Each batch's moments come from ``ops.masked_moments`` (centred on the
batch's own mean; one call for all subsets of a batch, ``update_subsets``) and are merged with
Chan et al.'s pairwise update, so no raw sum of squares is ever formed: a large mean with a small spread
keeps its digits (float64 features at a mean 10^6 times their spread, one row per batch: the covariance
within 1e-10 relative of numpy's on the whole set; fp32 features hold only the digits fp32 gave them). Moments merge across batches, processes (``all_reduce``) and runs
(``FrechetStats.merge``).

The Fréchet distance is ``|mu1 - mu2|² + tr S1 + tr S2 - 2 tr sqrt(S1^½ S2 S1^½)``, computed in
float64 with two symmetric eigendecompositions; ``S1^½ S2 S1^½`` is symmetric positive
semi-definite and similar to ``S1 S2``, so its square root's trace equals the one that
pytorch-fid takes from scipy's (non-symmetric, fragile) sqrtm of ``S1 S2``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from ..ops import masked_moments
from ..utils.files import load_npz, remove_stale_temporaries, save_numpy


class NonFiniteFeatures(UserError):
    """Features with NaN or infinite values, refused before they reach the moments (one such value
    makes the mean and covariance NaN, and the distance NaN or a failed eigendecomposition).
    ``rows``: the batch rows that have them, for the caller to name the images."""

    def __init__(self, rows: list[int], total: int, names=None):
        self.rows, self.total = rows, total
        shown = [str(names[i]) if names is not None else f"row {i}" for i in rows[:5]]
        more = f" and {len(rows) - 5} more" if len(rows) > 5 else ""
        super().__init__(f"NaN or infinite features for {len(rows)} of {total} images in a batch "
                         f"({', '.join(shown)}{more}): the feature network gave no usable features for them")

    def named(self, names) -> "NonFiniteFeatures":
        """The same error naming the batch's images by ``names`` (one per row)."""
        return NonFiniteFeatures(self.rows, self.total, names)


def non_finite_rows(features: torch.Tensor) -> list[int]:
    """The rows of a (b, D) batch with a NaN or infinite value."""
    return (~torch.isfinite(features).all(1)).nonzero()[:, 0].tolist()


def refuse_non_finite(features: torch.Tensor) -> None:
    """Raise NonFiniteFeatures for a (b, D) batch with NaN or infinite values."""
    bad = non_finite_rows(features)
    if bad:
        raise NonFiniteFeatures(bad, len(features))


class StreamingMoments:
    def __init__(self, dim: int, device: str | torch.device = "cpu"):
        self.dim = dim
        self.n = 0
        self.mean = torch.zeros(dim, dtype=torch.float64, device=device)
        self.m2 = torch.zeros(dim, dim, dtype=torch.float64, device=device)

    def update(self, features: torch.Tensor) -> None:
        """Add a (b, dim) batch (any float dtype; accumulated in float64). NaN or infinite
        features are refused (NonFiniteFeatures, naming their rows) and nothing is added."""
        if features.dim() != 2 or features.shape[1] != self.dim:
            raise ValueError(f"expected features of shape (b, {self.dim}), got {tuple(features.shape)}")
        if features.shape[0] == 0:
            return
        refuse_non_finite(features)
        n, mean, m2 = masked_moments(features.to(self.mean.device))
        self._merge(int(n[0]), mean[0], m2[0])

    def _merge(self, nb: int, mb: torch.Tensor, m2b: torch.Tensor) -> None:
        n = self.n + nb
        delta = mb - self.mean
        self.m2 += m2b
        self.m2.addr_(delta, delta, alpha=self.n * nb / n)
        self.mean += delta * (nb / n)
        self.n = n

    def add_moments(self, n: int, mean: torch.Tensor, m2: torch.Tensor) -> None:
        """Merge a batch's own (count, mean, centred M2), as ``ops.masked_moments`` gives them."""
        if n:
            self._merge(n, mean.to(self.mean.device, torch.float64), m2.to(self.m2.device, torch.float64))

    def merge(self, other: "StreamingMoments") -> None:
        if other.n:
            self._merge(other.n, other.mean.to(self.mean.device), other.m2.to(self.m2.device))

    def all_reduce(self) -> None:
        """Merge the moments of every process of the default group (in rank order)."""
        import torch.distributed as dist
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        world = dist.get_world_size()
        packed = torch.cat([torch.tensor([float(self.n)], dtype=torch.float64, device=self.mean.device),
                            self.mean, self.m2.reshape(-1)])
        gathered = [torch.empty_like(packed) for _ in range(world)]
        dist.all_gather(gathered, packed)
        self.n = 0
        self.mean.zero_()
        self.m2.zero_()
        d = self.dim
        for g in gathered:
            nb = int(g[0].item())
            if nb:
                self._merge(nb, g[1:1 + d], g[1 + d:].view(d, d))

    def stats(self) -> "FrechetStats":
        if self.n < 2:
            raise ValueError(f"need at least 2 samples for a covariance, have {self.n}")
        # a copy: on the CPU .numpy() would share memory with the running mean, which moves on
        return FrechetStats(self.mean.cpu().numpy().copy(), (self.m2 / (self.n - 1)).cpu().numpy(), self.n)


def update_subsets(moments: list[StreamingMoments], features: torch.Tensor, masks: torch.Tensor) -> None:
    """Add the rows of a (b, D) batch selected by ``masks`` (K, b) bool to each of the K moments
    (one ``ops.masked_moments`` call for all of them: e.g. every image plus one subset per finding)."""
    if len(moments) != len(masks):
        raise ValueError(f"{len(moments)} moments for {len(masks)} masks")
    dims = {m.dim for m in moments}
    if features.dim() != 2 or dims != {features.shape[1]}:
        raise ValueError(f"expected features of shape (b, {'/'.join(map(str, sorted(dims)))}), "
                         f"got {tuple(features.shape)}")
    if features.shape[0] == 0:
        return
    refuse_non_finite(features)  # any row, in a subset or not: the feature network failed on it
    device = moments[0].mean.device
    n, mean, m2 = masked_moments(features.to(device), masks.to(device))
    for k, m in enumerate(moments):
        m.add_moments(int(n[k]), mean[k], m2[k])


def _text_field(f: dict, name: str, path) -> str | None:
    """A statistics file's text field (``feature_space``, ``mode``), or None where it has none: one
    str, also where it was stored as bytes (numpy's 'S' arrays) or as an array of one (str() of those
    read "b'fast'" or "['fast']", and no mode or feature space matched them)."""
    if name not in f:
        return None
    a = f[name]
    if a.dtype.kind not in "US" or a.size != 1:
        raise UserError(f"{path}: {name} is not one text value (it holds {a.dtype}, shape {a.shape})")
    value = a.reshape(()).item()
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            raise UserError(f"{path}: {name} is not text (bytes {value[:40]!r})") from None
    return value


@dataclass
class FrechetStats:
    """Mean and (unbiased, as numpy.cov) covariance of features; pytorch-fid's .npz layout, with
    the sample count ``n``, the feature space's name (``feature_space``; none: Inception) and the
    Inception's mode (``mode``: exact or fast; none: not recorded, e.g. pytorch-fid's files)."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int | None = None
    space: str | None = None
    mode: str | None = None

    @classmethod
    def from_features(cls, features: np.ndarray, space: str | None = None) -> "FrechetStats":
        """Mean and covariance of an (N, D) feature array, in float64."""
        f = np.asarray(features, dtype=np.float64)
        return cls(f.mean(0), np.cov(f, rowvar=False), len(f), space)

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        extra = {} if self.n is None else {"n": np.int64(self.n)}
        if self.space is not None:
            extra["feature_space"] = np.array(self.space)
        if self.mode is not None:
            extra["mode"] = np.array(self.mode)
        # a run killed while writing this file left its hidden temporary beside it, which nothing else clears
        remove_stale_temporaries(path.parent, recursive=False, of=path.name)
        return save_numpy(path, mu=self.mu, sigma=self.sigma, **extra)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "FrechetStats":
        """Statistics from an .npz file (``mu``, ``sigma``, optionally ``n``), checked: finite, of
        matching sizes, and a symmetric positive semi-definite covariance."""
        f = load_npz(path, ("mu", "sigma"), "a statistics file (mu, sigma)")
        for name in ("mu", "sigma", "n"):  # a complex array read as float64 loses its imaginary part unsaid
            if name in f and (f[name].dtype.kind not in "biuf" or f[name].dtype == bool):
                raise UserError(f"{path}: {name} is not real numbers (it holds {f[name].dtype})")
        try:
            mu, sigma = f["mu"].astype(np.float64), f["sigma"].astype(np.float64)
        except (TypeError, ValueError) as exc:
            raise UserError(f"{path}: mu, sigma or n is not numeric ({exc})") from None
        space, mode = (_text_field(f, name, path) for name in ("feature_space", "mode"))
        n = None
        if "n" in f:
            if f["n"].size != 1 or not float(f["n"].reshape(())).is_integer():
                raise UserError(f"{path}: n, the sample count, must be one whole number (it is {f['n'].tolist()})")
            n = int(f["n"].reshape(()))
        if mode not in (None, "exact", "fast"):
            raise UserError(f"{path}: mode {mode!r} is not an Inception mode (exact or fast)")
        if mu.size == 0:
            raise UserError(f"{path}: empty statistics (mu has no features)")
        if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
            raise UserError(f"{path}: mu {mu.shape} and sigma {sigma.shape} do not match")
        stats = cls(mu, sigma, n, space, mode)
        problem = stats.problem()
        if problem:
            raise UserError(f"{path}: {problem}; the statistics are damaged and no Fréchet distance can be taken")
        return stats

    def problem(self, tol: float = 1e-6) -> str | None:
        """What is wrong with these statistics (NaN / inf, an asymmetric or not positive
        semi-definite covariance beyond ``tol`` relative to its largest eigenvalue), or None."""
        non_finite = self.non_finite()
        if non_finite:
            return non_finite
        scale = max(float(np.abs(self.sigma).max()), 1e-300) if self.sigma.size else 1.0
        if np.abs(self.sigma - self.sigma.T).max() > tol * scale:
            return "sigma is not symmetric"
        if self.sigma.size:
            ev = np.linalg.eigvalsh((self.sigma + self.sigma.T) / 2)
            if ev[0] < -tol * max(abs(ev[-1]), 1e-300):
                return f"sigma is not positive semi-definite (eigenvalue {ev[0]:.3g}, largest {ev[-1]:.3g})"
        if self.n is not None and self.n < 2:
            return f"n = {self.n}: a covariance needs at least 2 samples"
        return None

    def non_finite(self) -> str | None:
        """How many values of mu or sigma are NaN or infinite, said, or None."""
        for name, a in (("mu", self.mu), ("sigma", self.sigma)):
            bad = int(np.size(a) - np.isfinite(a).sum())
            if bad:
                return f"{bad} value(s) of {name} are NaN or infinite"
        return None

    def merge(self, other: "FrechetStats") -> "FrechetStats":
        """Statistics of the union of two sample sets (both must know their n)."""
        if self.n is None or other.n is None:
            raise ValueError("merging statistics needs the sample counts (files from pytorch-fid do not have n)")
        a, b = (StreamingMoments(len(self.mu)) for _ in range(2))
        for m, s in ((a, self), (b, other)):
            m.n, m.mean = s.n, torch.from_numpy(s.mu.copy())
            m.m2 = torch.from_numpy(s.sigma * (s.n - 1))
        from .features import same_space
        same_space(self.space, other.space)
        a.merge(b)
        merged = a.stats()
        merged.space = self.space
        merged.mode = self.mode if self.mode == other.mode else None
        return merged


def _rank_at_most(vals: torch.Tensor, rank: int | None) -> torch.Tensor:
    """Ascending eigenvalues, clamped at 0, with those below the ``rank`` largest set to 0 where they
    are rounding: beyond a covariance's rank they are ±1e-18 or so, and their square roots (1e-9 each,
    summed over up to 2048 of them) would move the distance by 1e-6 relative. Only values under 1e-10
    of the largest are taken for rounding, so a wrongly recorded n cannot drop real ones."""
    vals = vals.clamp_min(0)
    if rank is not None and rank < len(vals) and len(vals):
        beyond = torch.arange(len(vals), device=vals.device) < len(vals) - max(rank, 0)
        vals[beyond & (vals < 1e-10 * vals[-1])] = 0
    return vals


def _sqrt_psd(m: torch.Tensor, rank: int | None = None) -> torch.Tensor:
    vals, vecs = torch.linalg.eigh(m)
    return (vecs * _rank_at_most(vals, rank).sqrt()) @ vecs.T


def frechet_distance(a: FrechetStats, b: FrechetStats, device: str | torch.device | None = None) -> float:
    """Fréchet distance between two Gaussians, float64, via symmetric eigendecompositions.
    Statistics of two different feature spaces are refused. A covariance of n samples has rank at
    most n - 1: with fewer samples than features (and n known) only that many eigenvalues count."""
    from .features import same_space
    same_space(a.space, b.space, "the first statistics", "the second")
    for which, s in (("the first", a), ("the second", b)):  # NaN: a NaN distance, or eigh failing unexplained
        non_finite = s.non_finite()
        if non_finite:
            raise UserError(f"{which} statistics: {non_finite}; no Fréchet distance can be taken")
    if a.mu.shape != b.mu.shape:
        raise ValueError(f"feature sizes differ: {a.mu.shape} vs {b.mu.shape}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    mu1, mu2 = (torch.as_tensor(s.mu, dtype=torch.float64, device=device) for s in (a, b))
    s1, s2 = (torch.as_tensor(s.sigma, dtype=torch.float64, device=device) for s in (a, b))
    s1, s2 = (s1 + s1.T) / 2, (s2 + s2.T) / 2
    rank1, rank2 = (s.n - 1 if s.n else None for s in (a, b))
    r1 = _sqrt_psd(s1, rank1)
    inner = r1 @ s2 @ r1
    ev = torch.linalg.eigvalsh((inner + inner.T) / 2)
    known = [r for r in (rank1, rank2) if r is not None]
    tr_covmean = _rank_at_most(ev, min(known) if known else None).sqrt().sum()
    d = (mu1 - mu2).square().sum() + torch.trace(s1) + torch.trace(s2) - 2 * tr_covmean
    return max(float(d), 0.0)  # a distance: rounding can leave -1e-13 for identical statistics
