"""Nearest neighbours in chunks, the pixel space of the audits, and the realism ratio.

The realism ratio says whether generated images look like the data without any trained
network: the median distance from each sample to its nearest real image, over the median
distance from each real image to its nearest other real image (1: as close to the data as the
data is to itself; an untrained generator is several times that; far below 1: copies). The
diversity ratio is the same for the samples among themselves (below 1: the samples are more
alike than real images are, e.g. a collapsed mode). Distances are Euclidean on grey levels in
[0, 1] at ``PIXEL_SIZE`` px (smaller images are enlarged by pixel replication, so that any two
sets compare).

``nearest_neighbours(x, x, groups=ids)`` is each row's nearest row of another group (another
patient: a patient's own follow-up scans are not the reference for how close a new patient
comes), in chunks, as the search without groups.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

PIXEL_SIZE = 32


def nearest_neighbours(queries: torch.Tensor, refs: torch.Tensor, exclude_self: bool = False,
                       backend: str | None = None, groups=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Euclidean distance to, and index of, each query's nearest reference (``ops.knn`` with
    k = 1 on the references' device: the distance matrix never exists), as float32 / int64 on
    the CPU. ``exclude_self``: queries and refs are the same set; a row's own index is skipped.

    ``groups`` (one id per row, e.g. each image's patient): queries and refs are the same set, and
    a row's neighbour is the nearest row of another group, so its own row and its group's other
    rows (a patient's follow-up scans) are skipped (``nearest_other_group``; ``backend`` is
    ``ops.knn``'s, for the search without groups). ValueError where all rows are one group."""
    if groups is not None:
        if len(queries) != len(refs):
            raise ValueError(f"nearest_neighbours: groups need the same set twice, got {len(queries)} and "
                             f"{len(refs)} rows")
        return nearest_other_group(refs, groups)
    from ..ops.knn import knn
    d, i = knn(queries.to(refs.device), refs, 1, exclude_self=exclude_self, backend=backend)
    return d[:, 0].float().cpu(), i[:, 0].cpu()


def group_codes(groups) -> np.ndarray:
    """Group ids (any hashable values, compared as strings) -> int64 codes 0 .. G-1."""
    return np.unique(np.asarray(groups, dtype=object).astype(str), return_inverse=True)[1].reshape(-1).astype(np.int64)


def nearest_other_group(x: torch.Tensor, groups, chunk_q: int = 2048,
                        chunk_r: int = 16384) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's Euclidean distance to, and index of, its nearest row of another group (float32 /
    int64 on the CPU): ``ops.knn``'s torch search with a group mask (float64 ``|q|² + |r|² - 2 q·r``
    on chunk_q × chunk_r blocks on ``x``'s device, a block's same-group entries +inf: the N × N
    matrix never exists), its candidates then re-ranked by their exact distances, as ``ops.knn``
    does. A NaN distance is never a neighbour, as in ``ops.knn``. ValueError where a row has no
    row of another group (all rows are one group)."""
    from ..ops.knn import EXTRA_CANDIDATES, _exact, reference
    if x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"nearest_other_group: expected (N, D) floating-point features, got {x.dtype} "
                         f"{tuple(x.shape)}")
    n = len(x)
    if len(groups) != n:
        raise ValueError(f"nearest_other_group: {len(groups)} group ids for {n} rows")
    codes = group_codes(groups)
    if n == 0 or codes.max() == 0:
        raise ValueError(f"nearest_other_group: all {n} rows are of one group, so none has a neighbour in "
                         f"another group")
    d, i = reference(x, x, min(1 + EXTRA_CANDIDATES, n), chunk_q=chunk_q, chunk_r=chunk_r,
                     groups=torch.from_numpy(codes).to(x.device))
    d, i = _exact(x, x, d, i, 1)
    return d[:, 0].float().cpu(), i[:, 0].cpu()


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
    # numpy's median: torch's is the lower middle value of an even count
    fr = float(np.median(nearest_neighbours(fake, real)[0].numpy()))
    rr = float(np.median(nearest_neighbours(real, real, exclude_self=True)[0].numpy()))
    ff = float(np.median(nearest_neighbours(fake, fake, exclude_self=True)[0].numpy()))
    rr = max(rr, 1e-12)
    return {"realism": fr / rr, "diversity": ff / rr, "fake_to_real": fr, "real_to_real": rr, "fake_to_fake": ff}
