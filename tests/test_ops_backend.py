import logging

import pytest
import torch

from xrayforge import ops
from xrayforge.ops import _backend


@pytest.fixture(autouse=True)
def _reset_backend(monkeypatch):
    monkeypatch.delenv("XRAYFORGE_BACKEND", raising=False)
    ops.set_backend(None)
    _backend._warned.clear()
    yield
    ops.set_backend(None)
    _backend._warned.clear()  # the fallbacks these tests pretend are not said once and for all


def test_default_is_auto_and_auto_uses_torch_on_cpu():
    assert ops.get_backend() == "auto"
    assert _backend.resolve("pixel_norm", torch.zeros(1, 2)) == "torch"


def test_set_backend_and_environment(monkeypatch):
    monkeypatch.setenv("XRAYFORGE_BACKEND", "torch")
    assert ops.get_backend() == "torch"
    ops.set_backend("auto")
    assert ops.get_backend() == "auto"  # set_backend wins over the environment
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        ops.set_backend("fast")
    ops.set_backend(None)
    monkeypatch.setenv("XRAYFORGE_BACKEND", "cudnn")
    with pytest.raises(ValueError, match="XRAYFORGE_BACKEND='cudnn'"):
        ops.get_backend()


def test_explicit_backend_unavailable_says_why():
    x = torch.randn(2, 3)
    with pytest.raises(ops.BackendUnavailableError, match="backend 'cuda' is not available: .*CUDA"):
        ops.pixel_norm(x, backend="cuda")
    with pytest.raises(ValueError, match="unknown backend"):
        ops.pixel_norm(x, backend="cudnn")


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ops.BackendUnavailableError, match="TRITON_INTERPRET=1"):
        ops.minibatch_stddev(torch.randn(4, 2, 4, 4), backend="triton")


def test_interpreter_asked_for_after_import_says_so(monkeypatch):
    # triton.jit chose compiled kernels when the ops were imported: a CPU tensor then failed
    # inside Triton with '0 active drivers ([]). There should only be one.'
    monkeypatch.setattr(_backend, "_INTERPRET_AT_IMPORT", False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not _backend.triton_interpreter_active()
    with pytest.raises(ops.BackendUnavailableError, match="TRITON_INTERPRET=1 was set after xrayforge.ops"):
        ops.pixel_norm(torch.randn(2, 3), backend="triton")


def test_set_backend_applies_to_calls(monkeypatch):
    ops.set_backend("cuda")
    with pytest.raises(ops.BackendUnavailableError):
        ops.pixel_norm(torch.randn(2, 3))
    ops.set_backend("torch")
    ops.pixel_norm(torch.randn(2, 3))


def test_auto_fallback_on_gpu_is_logged_once(monkeypatch, caplog):
    # Pretend Triton was validated on GPUs but cannot run here: auto falls back to torch, once loudly.
    monkeypatch.setitem(_backend.GPU_VALIDATED, "pixel_norm", ("triton",))
    real = _backend.unavailable_reason
    monkeypatch.setattr(_backend, "unavailable_reason",
                        lambda name, op, device: "pretend it is missing" if name == "triton" else real(name, op, device))
    with caplog.at_level(logging.WARNING, logger="xrayforge.ops"):
        for _ in range(3):
            assert _backend.resolve_for_device("pixel_norm", torch.device("cuda"), "auto") == "torch"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "'torch'" in warnings[0].getMessage() and "pretend it is missing" in warnings[0].getMessage()


def test_auto_on_gpu_picks_only_validated_kernels(monkeypatch):
    monkeypatch.setattr(_backend, "unavailable_reason", lambda name, op, device: None)
    for op, validated in _backend.GPU_VALIDATED.items():
        chosen = _backend.resolve_for_device(op, torch.device("cuda"), "auto")
        assert chosen in validated + ("torch",), op


def test_auto_passes_by_a_dtype_whose_kernel_changed_since_its_gpu_tests(monkeypatch, caplog):
    """GPU_PENDING_DTYPES: the Triton epilogues' float64 specialisation changed after their GPU
    window (d0f18c2), their fp32 / bf16 / fp16 ones did not: auto keeps Triton for those and runs
    float64 on the next validated backend (else the reference), saying so once; a named backend is
    obeyed. Decided inside resolve_for_device, which torch.compile keeps as a constant."""
    monkeypatch.setattr(_backend, "unavailable_reason", lambda name, op, device: None)
    for op in ("pixel_norm", "bias_lrelu_pixel_norm"):  # the mechanism, whatever the table holds today
        monkeypatch.setitem(_backend.GPU_VALIDATED, op, ("triton", "cuda"))
    cuda = torch.device("cuda")
    pick = lambda op, dtype, backend="auto": _backend.resolve_for_device(op, cuda, backend, dtype)  # noqa: E731
    with caplog.at_level(logging.WARNING, logger="xrayforge.ops"):
        assert pick("pixel_norm", torch.float32) == pick("pixel_norm", torch.bfloat16) == "triton"
        assert pick("pixel_norm", torch.float64) == "cuda"  # GPU_VALIDATED: ("triton", "cuda")
        assert pick("bias_lrelu", torch.float64) == "torch"  # ("triton",): nothing validated after it
    assert "float64 kernel has not passed on a GPU" in caplog.text
    assert pick("pixel_norm", torch.float64, "triton") == "triton"  # named: run as asked
    assert _backend.resolve_for_device("pixel_norm", cuda, "auto") == "triton"  # no dtype: the device's choice
    monkeypatch.setattr(_backend, "unavailable_reason", lambda name, op, device: "not built" if name == "cuda" else None)
    assert pick("bias_lrelu_pixel_norm", torch.float64) == "torch"
    with _backend.auto_candidates(("triton",)):  # the benchmarks measure the kernels themselves
        assert pick("pixel_norm", torch.float64) == "triton"


def test_a_kernel_that_cannot_take_the_input_is_passed_by_under_auto_and_refused_by_name(monkeypatch, caplog):
    """``refused``: (backend, why) pairs an op works out from the input's shape (a kernel's hard
    limit). auto takes the next candidate that can, saying so once; a named backend raises the why."""
    monkeypatch.setattr(_backend, "unavailable_reason", lambda name, op, device: None)
    monkeypatch.setitem(_backend.GPU_VALIDATED, "pixel_norm", ("triton", "cuda"))
    cuda = torch.device("cuda")
    wide = (("triton", "at most 16384 channels, got 20000"),)
    with caplog.at_level(logging.WARNING, logger="xrayforge.ops"):
        for _ in range(2):
            assert _backend.resolve_for_device("pixel_norm", cuda, "auto", torch.float32, wide) == "cuda"
        assert _backend.resolve_for_device("pixel_norm", cuda, "auto", torch.float32) == "triton"
        both = wide + (("cuda", "grid.y"), ("cuda", "bias"))
        assert _backend.resolve_for_device("pixel_norm", cuda, "auto", torch.float32, both) == "torch"
    said = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(said) == 2, said
    assert "fell back to 'cuda'" in said[0] and "triton: cannot take this input: at most 16384" in said[0]
    assert "fell back to 'torch'" in said[1] and "cuda: cannot take this input: grid.y; bias" in said[1]
    with pytest.raises(ops.BackendUnavailableError,
                       match="pixel_norm: backend 'triton' cannot take this input: at most 16384 channels, got 20000"):
        _backend.resolve_for_device("pixel_norm", cuda, "triton", torch.float32, wide)
    assert _backend.resolve_for_device("pixel_norm", cuda, "cuda", torch.float32, wide) == "cuda"
    assert _backend.resolve_for_device("pixel_norm", torch.device("cpu"), "auto", torch.float32, wide) == "torch"


def test_a_fallback_past_a_kernel_limit_is_said_even_after_another_fallback_to_the_same_backend(monkeypatch, caplog):
    # float64 went to torch first (pending kernels, said once); a later input past Triton's limit
    # falls back to torch too, for another reason, which must not go unsaid
    monkeypatch.setattr(_backend, "unavailable_reason", lambda name, op, device: "not built" if name == "cuda" else None)
    cuda = torch.device("cuda")
    with caplog.at_level(logging.WARNING, logger="xrayforge.ops"):
        assert _backend.resolve_for_device("bias_lrelu", cuda, "auto", torch.float64) == "torch"
        assert _backend.resolve_for_device("bias_lrelu", cuda, "auto", torch.float32,
                                           (("triton", "at most 16384 channels"),)) == "torch"
    said = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(said) == 2 and "at most 16384 channels" in said[1], said


def test_grid_excess_names_the_dimension_and_cuda_s_limit():
    assert _backend.grid_excess((2**31 - 1, 65535, 65535)) is None
    assert _backend.grid_excess((1, 65536)) == "65536 blocks along grid.y, above CUDA's limit of 65535"
    assert _backend.grid_excess((2**31, 1)) == f"{2**31} blocks along grid.x, above CUDA's limit of {2**31 - 1}"
    assert "grid.z" in _backend.grid_excess((1, 1, 70000))


def test_available_backends_on_cpu():
    names = ops.available_backends("pixel_norm", "cpu")
    assert "torch" in names and "cuda" not in names


def test_auto_candidates_override_the_validated_order_inside_the_block_only(monkeypatch):
    monkeypatch.setattr(_backend, "unavailable_reason",
                        lambda name, op, device: "not built" if name == "cuda" and op == "bias_lrelu" else None)
    cuda = torch.device("cuda")
    with _backend.auto_candidates(("cuda", "triton")):
        assert _backend.resolve_for_device("pixel_norm", cuda, "auto") == "cuda"
        assert _backend.resolve_for_device("bias_lrelu", cuda, "auto") == "triton"  # the next candidate
    assert _backend.resolve_for_device("pixel_norm", cuda, "auto") == _backend.GPU_VALIDATED["pixel_norm"][0]
    with pytest.raises(ValueError, match="fused backends"):
        with _backend.auto_candidates(("torch",)):
            pass


def test_backend_names_are_read_as_the_environment_is():
    x = torch.zeros(1, 4, 2, 2)
    assert _backend.resolve("pixel_norm", x, " AUTO ") == _backend.resolve("pixel_norm", x, "auto") == "torch"
    assert _backend.resolve("pixel_norm", x, "Torch") == "torch"
    ops.set_backend("TORCH")
    try:
        assert ops.get_backend() == "torch"
    finally:
        ops.set_backend(None)
