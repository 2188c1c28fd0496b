"""Nearest neighbours in chunks, the pixel space of the audits, and the realism ratio.

The realism ratio says whether generated images look like the data without any trained
network: the median distance from each sample to its nearest real image, over the median
distance from each real image to its nearest other real image (1: as close to the data as the
data is to itself; an untrained generator is several times that; far below 1: copies). The
diversity ratio is the same for the samples among themselves (below 1: the samples are more
alike than real images are, e.g. a collapsed mode). Distances are Euclidean on grey levels in
[0, 1] at ``PIXEL_SIZE`` px (smaller images are enlarged by pixel replication, so that any two
sets compare).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

PIXEL_SIZE = 32


def nearest_neighbours(queries: torch.Tensor, refs: torch.Tensor, exclude_self: bool = False,
                       chunk_q: int = 2048, chunk_r: int = 16384) -> tuple[torch.Tensor, torch.Tensor]:
    """Euclidean distance to, and index of, each query's nearest reference, chunk by chunk
    (float64 on the references' device; the full distance matrix never exists).

    ``exclude_self``: queries and refs are the same set; a row's own index is skipped.
    """
    dev = refs.device
    best_d = torch.full((len(queries),), float("inf"), device=dev, dtype=torch.float64)
    best_i = torch.zeros(len(queries), dtype=torch.long, device=dev)
    ref_sq = refs.double().square().sum(1)
    for qs in range(0, len(queries), chunk_q):
        q = queries[qs:qs + chunk_q].to(dev).double()
        q_sq = q.square().sum(1, keepdim=True)
        for rs in range(0, len(refs), chunk_r):
            r = refs[rs:rs + chunk_r].double()
            d2 = (q_sq + ref_sq[rs:rs + chunk_r][None, :] - 2 * q @ r.T).clamp_min_(0)
            if exclude_self:
                rows = torch.arange(qs, qs + len(q), device=dev)
                cols = rows - rs
                ok = (cols >= 0) & (cols < len(r))
                d2[ok.nonzero().squeeze(1), cols[ok]] = float("inf")
            d, i = d2.min(dim=1)
            better = d < best_d[qs:qs + len(q)]
            best_d[qs:qs + len(q)] = torch.where(better, d, best_d[qs:qs + len(q)])
            best_i[qs:qs + len(q)] = torch.where(better, i + rs, best_i[qs:qs + len(q)])
    return best_d.sqrt().float().cpu(), best_i.cpu()


def pixel_vectors(images: torch.Tensor, size: int = PIXEL_SIZE) -> torch.Tensor:
    """Grey levels in [0, 1], (N, H, W) or (N, C, H, W) -> (N, size²) float32 vectors: channels
    averaged, area-resized to size × size (an image smaller than that: each pixel replicated)."""
    x = images.float()
    if x.dim() == 3:
        x = x.unsqueeze(1)
    x = x.mean(1, keepdim=True)
    return F.interpolate(x, size=(size, size), mode="area").flatten(1)


def realism(fake: torch.Tensor, real: torch.Tensor) -> dict:
    """Realism and diversity ratios of pixel vectors ``fake`` (N, P) against ``real`` (M, P), M >= 2,
    with the medians they come from."""
    if len(real) < 2 or len(fake) < 2:
        raise ValueError(f"realism needs at least 2 real and 2 generated images, got {len(real)} and {len(fake)}")
    fr = nearest_neighbours(fake, real)[0].median().item()
    rr = nearest_neighbours(real, real, exclude_self=True)[0].median().item()
    ff = nearest_neighbours(fake, fake, exclude_self=True)[0].median().item()
    rr = max(rr, 1e-12)
    return {"realism": fr / rr, "diversity": ff / rr, "fake_to_real": fr, "real_to_real": rr, "fake_to_fake": ff}
