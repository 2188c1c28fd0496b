"""CPU-sized FID pieces for pytest-benchmark (timings recorded, never asserted)."""
import numpy as np
import torch

from xrayforge.fid.stats import FrechetStats, StreamingMoments, frechet_distance


def test_streaming_moments_5000x512(benchmark):
    feats = torch.randn(5000, 512, dtype=torch.float64)

    def run():
        m = StreamingMoments(512)
        for chunk in feats.split(500):
            m.update(chunk)
        return m

    benchmark(run)


def test_frechet_512(benchmark):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2000, 512))
    a = FrechetStats(x.mean(0), np.cov(x, rowvar=False))
    b = FrechetStats(a.mu + 0.1, a.sigma * 1.1)
    benchmark(lambda: frechet_distance(a, b, "cpu"))
