"""Fidelity and diversity separately: improved precision and recall (Kynkäänniemi et al.,
NeurIPS 2019) and density and coverage (Naeem et al., ICML 2020), on feature arrays.

Each real (or generated) point carries a ball whose radius is the distance to its k-th nearest
neighbour in its own set, itself excluded. A point is inside a ball when its distance to the
centre is <= the radius (Kynkäänniemi et al.'s convention; the ``prdc`` package uses <, which
gives the same numbers unless points coincide, e.g. duplicated images with radius 0).

- precision: the fraction of generated points inside at least one real ball (fidelity: do the
  samples look like data?); recall: the fraction of real points inside at least one generated
  ball (diversity: is the data's variety produced?). k = 3.
- density: the mean number of real balls a generated point is inside, over k (about 1 when the
  samples are distributed like the data; above 1 where they crowd dense regions); coverage: the
  fraction of real points whose ball holds at least one generated point (which real modes are
  reached; robust to outliers among the samples). k = 5.

The k-nearest-neighbour radii and the nearest generated point of each real point come from
:func:`xrayforge.ops.knn` (a fused distance + top-k kernel on a GPU); ball memberships are
counted in chunks of float64 distances, so no N × M matrix is ever held. Radii, and the
distances near a radius, are then taken once more from the two points' differences (float64,
summed by numpy: one pair, the same bits however it was found), so that a generated point that
coincides with a real one lies on the balls' boundaries exactly as the definition says (a
memorising generator, or the real set against itself: density (k + 1) / k), where the rounding
of two different computations of one distance decided before.
"""
from __future__ import annotations

import numpy as np
import torch

from ..errors import UserError
from ..ops.knn import MAX_K, knn


def _features(x, name: str) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x)) if not isinstance(x, torch.Tensor) else x
    if t.dim() != 2 or not t.is_floating_point():
        raise UserError(f"{name}: expected a floating-point (N, D) feature array, got {tuple(t.shape)} {t.dtype}")
    if not torch.isfinite(t).all():
        raise UserError(f"{name}: features with NaN or inf")
    return t


def pair_distances(a: torch.Tensor, b: torch.Tensor, rows_a: torch.Tensor | None = None,
                   rows_b: torch.Tensor | None = None, chunk: int = 8192) -> torch.Tensor:
    """Distance of each row pair (a[rows_a[i]], b[rows_b[i]]) (default rows: 0, 1, ...; float64, on
    a's device), from the differences, summed by numpy: the same bits for the same two points in
    either order and in any batch. The rows are gathered a chunk at a time (never a copy of every pair)."""
    n = len(rows_a) if rows_a is not None else len(rows_b) if rows_b is not None else len(a)
    out = np.empty(n)
    for s in range(0, n, chunk):
        part = slice(s, min(s + chunk, n))
        a_, b_ = ((t[rows[part].to(t.device)] if rows is not None else t[part]).detach().cpu().double().numpy()
                  for t, rows in ((a, rows_a), (b, rows_b)))
        out[part] = np.sqrt(np.square(a_ - b_).sum(1))
    return torch.from_numpy(out).to(a.device)


def radii(x: torch.Tensor, k: int, backend: str | None = None) -> torch.Tensor:
    """Distance of each row to its k-th nearest other row (float64)."""
    return pair_distances(x, x, rows_b=knn(x, x, k, exclude_self=True, backend=backend)[1][:, k - 1])


def ball_counts(points: torch.Tensor, centres: torch.Tensor, radius: torch.Tensor,
                chunk_p: int = 2048, chunk_c: int = 16384) -> torch.Tensor:
    """For each point, how many of the balls (centres, radius) it is inside (distance <= radius)."""
    dev = centres.device
    c_sq = centres.double().square().sum(1)
    rad = radius.to(dev).double()
    r2 = rad.square()
    out = torch.zeros(len(points), dtype=torch.long, device=dev)
    for ps in range(0, len(points), chunk_p):
        p = points[ps:ps + chunk_p].to(dev).double()
        p_sq = p.square().sum(1, keepdim=True)
        for cs in range(0, len(centres), chunk_c):
            c = centres[cs:cs + chunk_c].double()
            scale = p_sq + c_sq[cs:cs + chunk_c][None, :]
            gap = torch.addmm(scale, p, c.T, alpha=-2).clamp_min_(0).sub_(r2[cs:cs + chunk_c][None, :])
            inside = gap <= 0
            near = gap.abs_() <= scale.mul_(1e-9)  # the expansion's rounding could decide these: measured again
            if near.any():
                i, j = near.nonzero(as_tuple=True)
                inside[i, j] = pair_distances(p, c, i, j) <= rad[cs + j]
            out[ps:ps + len(p)] += inside.sum(1)
    return out


def _pair(real, fake, k: int):
    real, fake = _features(real, "real features"), _features(fake, "generated features")
    if real.shape[1] != fake.shape[1]:
        raise UserError(f"real features have {real.shape[1]} dimensions and generated ones {fake.shape[1]}: "
                        f"they come from different feature spaces")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= MAX_K:  # not said of knn
        raise UserError(f"k must be an integer in 1 .. {MAX_K} (the nearest-neighbour search's limit), got {k!r}")
    if len(real) <= k or len(fake) <= k:
        raise UserError(f"k = {k} needs more than {k} real and generated points, got {len(real)} and {len(fake)}")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    return real.to(dev), fake.to(dev)


def precision_recall(real, fake, k: int = 3, backend: str | None = None) -> dict:
    """Improved precision and recall of ``fake`` (M, D) against ``real`` (N, D) (numpy or torch)."""
    real, fake = _pair(real, fake, k)
    r_real, r_fake = radii(real, k, backend), radii(fake, k, backend)
    return {"precision": float((ball_counts(fake, real, r_real) > 0).double().mean()),
            "recall": float((ball_counts(real, fake, r_fake) > 0).double().mean()), "k": k}


def density_coverage(real, fake, k: int = 5, backend: str | None = None) -> dict:
    """Density and coverage of ``fake`` (M, D) against ``real`` (N, D) (numpy or torch)."""
    real, fake = _pair(real, fake, k)
    r_real = radii(real, k, backend)
    nearest_fake = pair_distances(real, fake, rows_b=knn(real, fake, 1, backend=backend)[1][:, 0])
    return {"density": float(ball_counts(fake, real, r_real).double().sum() / (k * len(fake))),
            "coverage": float((nearest_fake <= r_real.to(nearest_fake.device)).double().mean()), "k": k}


def prdc(real, fake, k_pr: int = 3, k_dc: int = 5, backend: str | None = None) -> dict:
    """precision, recall (k_pr) and density, coverage (k_dc) in one dict."""
    pr, dc = precision_recall(real, fake, k_pr, backend), density_coverage(real, fake, k_dc, backend)
    return {"precision": pr["precision"], "recall": pr["recall"], "density": dc["density"],
            "coverage": dc["coverage"], "k_precision_recall": k_pr, "k_density_coverage": k_dc}
