"""CPU-sized cases of benchmarks/ops.py for pytest-benchmark: `python -m pytest benchmarks/`.

Timings are recorded, never asserted. The full-size cases are `python benchmarks/ops.py`.
"""
import pytest
import torch

from xrayforge.bench.ops import CPU_SHAPES, _make_call


@pytest.mark.parametrize("op", list(CPU_SHAPES))
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
def test_op_eager_reference(benchmark, op, backward):
    shape = CPU_SHAPES[op][0]
    benchmark(_make_call(op, shape, torch.float32, torch.device("cpu"), "torch", backward))
