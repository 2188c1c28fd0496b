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

import numpy as np
import torch
import torch.nn.functional as F

PIXEL_SIZE = 32


def nearest_neighbours(queries: torch.Tensor, refs: torch.Tensor, exclude_self: bool = False,
                       backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Euclidean distance to, and index of, each query's nearest reference (``ops.knn`` with
    k = 1 on the references' device: the distance matrix never exists), as float32 / int64 on
    the CPU. ``exclude_self``: queries and refs are the same set; a row's own index is skipped."""
    from ..ops.knn import knn
    d, i = knn(queries.to(refs.device), refs, 1, exclude_self=exclude_self, backend=backend)
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
