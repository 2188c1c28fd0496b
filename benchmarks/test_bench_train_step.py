"""CPU-sized PGGAN step for pytest-benchmark (timings recorded, never asserted)."""
import torch

from xrayforge.bench.train_step import _real, build


def test_train_step_16px_cpu(benchmark):
    step, level, _ = build(16, torch.device("cpu"), True, "float32", net_resolution=64, fmap_max=32)
    real = _real(4, 16, torch.device("cpu"), True)
    benchmark(lambda: step(real, level, 1.0))
