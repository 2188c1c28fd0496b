"""Metrics during training: FID and precision / recall / density / coverage of G_ema's samples
against the archive's real images, in any feature space.

The trainer does not import this room (FID sits downstream of training): the command line (and
the demo) builds a ``TrainingMetrics`` from the run's settings and hands it to
``Trainer(..., measure=...)``. The real images' statistics and features are computed once per
run (and resolution) and kept in ``RUN/metrics/real-<space>-<n>[-<R>px].npz``; each measurement
generates the same latents (a fixed seed) at the tick's level and fade-in α, and compares them with
the real images at that resolution and α.
"""
from __future__ import annotations

import logging
import math
import os
import re
from pathlib import Path

import numpy as np
import torch

from ..data.archive import Archive
from ..errors import UserError
from ..utils.files import load_npz, save_numpy
from ..utils.images import faded_reals
from .compute import FeatureExtractor
from .stats import FrechetStats, frechet_distance, non_finite_rows

METRICS = ("fid", "prdc")
log = logging.getLogger(__name__)


class TrainingMetrics:
    def __init__(self, archive: str | os.PathLike, run: str | os.PathLike, metrics=("fid",),
                 features: str = "inception", images: int = 1000, device: str | torch.device | None = None,
                 batch_size: int = 64, seed: int = 0, inception: str | None = None, include_test: bool = False):
        unknown = set(metrics) - set(METRICS)
        if unknown or not metrics:
            raise UserError(f"--metrics {','.join(metrics)}: choose from {', '.join(METRICS)}")
        if images < 6:
            raise UserError(f"metrics need at least 6 images a side (density / coverage use k = 5), got {images}")
        self.metrics, self.images, self.seed = tuple(metrics), int(images), seed
        self.archive = Archive(archive)
        # the real side is drawn from the images the GAN trains on: the test split (and its patients'
        # other images), on which the evaluations test, stays out of the choice of the best checkpoint too
        self.rows = self.archive.training_positions(include_test)
        self.drawn_from = "every row" if len(self.rows) == len(self.archive) else "outside the test split's patients"
        if self.images > len(self.rows):
            raise UserError(f"--metrics-images {self.images}: {archive} has only {len(self.rows)} images "
                            f"{'' if self.drawn_from == 'every row' else 'outside its test split and its patients '}"
                            f"(as many real images as generated ones are compared)")
        self.extractor = FeatureExtractor(inception, False, "exact", device, batch_size, 0, progress=False,
                                          features=features)
        self.space = self.extractor.space_name
        safe = re.sub(r"[^A-Za-z0-9@._-]", "_", self.space)
        self.cache = Path(run) / "metrics" / f"real-{safe}-{self.images}.npz"
        self._reals: dict = {}  # (resolution, α) -> the real side, from the first measurement at it

    def _cache(self, resolution: int) -> Path:
        """The real side's file at ``resolution`` (the archive's own: the name runs had before)."""
        if resolution == self.archive.resolution:
            return self.cache
        return self.cache.with_name(f"{self.cache.stem}-{resolution}px.npz")

    def _real(self, resolution: int | None = None, alpha: float = 1.0) -> tuple[FrechetStats, np.ndarray]:
        """The real side (a uniform sample of the images the GAN trains on) at ``resolution`` (the
        archive's copy at that size, default its own) and fade-in ``alpha`` (blended with their 2x
        smaller copy as the generator's output is), computed once per run and resolution (a fade-in's
        α changes at every measurement: computed each time, not kept)."""
        resolution = int(resolution or self.archive.resolution)
        key = (resolution, float(alpha))
        if key in self._reals:
            return self._reals[key]
        cache = self._cache(resolution) if alpha >= 1.0 else None
        if cache is not None and cache.is_file():
            f = load_npz(cache, ("mu", "sigma", "n", "features"), "the run's cached real features")
            drawn = str(f["drawn_from"]) if "drawn_from" in f else "every row"  # before the test split was left out
            if drawn == self.drawn_from:
                self._reals[key] = FrechetStats(f["mu"], f["sigma"], int(f["n"]), self.space), f["features"]
                return self._reals[key]
            log.warning("%s: the run's real images were drawn from %s of the archive; they are drawn again from "
                        "those %s, so measurements logged before this one compare with other real images",
                        cache, drawn, self.drawn_from)
        if resolution not in self.archive.resolutions:
            raise UserError(f"{self.archive.path}: no {resolution}-px images to measure the generator's against; "
                            f"it has {self.archive.resolutions}")
        # not FeatureExtractor.from_archive: under torchrun it shards and all-reduces, and process 0
        # alone measures here
        rows = self.archive.random_positions(self.images, self.seed + 31, self.rows)
        feats = []
        for i in range(0, len(rows), self.extractor.batch_size):
            x = torch.from_numpy(self.archive.as_float(self.archive.images(rows[i:i + self.extractor.batch_size],
                                                                          resolution)))
            x = faded_reals(x[:, None], alpha)[:, 0]  # the trainer's fade-in blend (and G's of its output)
            feats.append(self.extractor.features(x).cpu())
        features = torch.cat(feats).numpy()
        stats = FrechetStats.from_features(features, self.space)
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            save_numpy(cache, mu=stats.mu, sigma=stats.sigma, n=np.int64(stats.n), features=features,
                       feature_space=np.array(self.space), drawn_from=np.array(self.drawn_from))
        self._reals = {k: v for k, v in self._reals.items() if k[1] >= 1.0}  # one fade-in α in memory at most
        self._reals[key] = stats, features
        return stats, features

    @torch.no_grad()
    def __call__(self, generate, latent_dim: int, alpha: float = 1.0) -> dict:
        """``generate(z)`` -> images in [-1, 1], (N, 1, R, R), for latents ``z`` (N, latent_dim);
        the latents come from a fixed seed, so successive measurements see the same latents. The real
        images are compared at the generated images' resolution R (a run trained below the archive's,
        a tick during growth) and fade-in ``alpha`` (the generator's)."""
        g = torch.Generator().manual_seed(self.seed + 4242)
        feats, resolution = [], None
        for start in range(0, self.images, self.extractor.batch_size):
            z = torch.randn(min(self.extractor.batch_size, self.images - start), latent_dim, generator=g)
            x = generate(z).float().clamp(-1, 1)
            resolution = resolution or int(x.shape[-1])
            feats.append(self.extractor.features((x[:, 0] + 1) / 2).float().cpu())
        fake = torch.cat(feats)
        self.real_stats, self.real_features = self._real(resolution, alpha)
        out = {"metrics_features": self.space, "metrics_images": self.images}
        bad = len(non_finite_rows(fake))
        if bad:  # a diverged G_ema (NaN weights): the tick is logged with NaN metrics and training goes on
            log.warning("G_ema's samples gave NaN or infinite features for %d of %d images (the generator has "
                        "diverged): this measurement is NaN", bad, len(fake))
        if "fid" in self.metrics:
            out["fid"] = math.nan if bad else frechet_distance(
                self.real_stats, FrechetStats.from_features(fake.numpy(), self.space), self.extractor.device)
        if "prdc" in self.metrics:
            from .prdc import prdc
            got = dict.fromkeys(("precision", "recall", "density", "coverage"), math.nan) if bad \
                else prdc(self.real_features, fake)
            out.update({k: got[k] for k in ("precision", "recall", "density", "coverage")})
        return out


    @staticmethod
    def score(record: dict) -> float | None:
        """How good a measured tick is, lower is better: its FID, else 1 - coverage; None unmeasured."""
        if "fid" in record:
            return float(record["fid"])
        if "coverage" in record:
            return 1.0 - float(record["coverage"])
        return None
