"""Test set-up: Triton kernels run in the CPU interpreter when there is no GPU.

TRITON_INTERPRET must be set before any kernel is defined, i.e. before xrayforge.ops is
imported, which is why it happens here at collection time.
"""
import math
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

from xrayforge.ops import _backend  # noqa: E402

# under pytest-xdist (-n N) the workers share the cores: each takes its share of torch's threads
# (else N workers × every core's threads oversubscribe them, and OpenMP's spinning slows all); the
# processes a test starts take as many, so that a run in one and its resume in the other compare exactly
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    _threads = max(1, torch.get_num_threads() // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    torch.set_num_threads(_threads)
    os.environ["OMP_NUM_THREADS"] = str(_threads)


def _has_extension() -> bool:
    try:
        _backend.cuda_extension()
        return True
    except ImportError:
        return False


def kernel_params():
    """(backend, device) pairs to test: the fused backends wherever they can run here."""
    params = []
    if _backend.triton_interpreter_active():
        params.append(pytest.param(("triton", "cpu"), id="triton-cpu"))
    if HAS_CUDA:
        params.append(pytest.param(("triton", "cuda"), id="triton-cuda", marks=pytest.mark.gpu))
        if _has_extension():
            params.append(pytest.param(("cuda", "cuda"), id="cuda-cuda", marks=pytest.mark.gpu))
    return params


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_as_accurate_as_eager(ours: torch.Tensor, eager: torch.Tensor, exact: torch.Tensor, dtype,
                                scale: float | None = None) -> None:
    """The op contract's tolerance: our error against float64 is at most twice eager PyTorch's
    at the same precision, plus one unit in the last place of ``scale`` so that an exactly
    rounded eager result does not demand bit-identical output. ``scale`` is the size of the
    terms the result is made of (default: the result's largest value); pass it where the
    result is a difference of larger terms, as in a gradient that nearly cancels."""
    if scale is None:
        scale = exact.abs().max().item() if exact.numel() else 0.0
    ulp = torch.finfo(dtype).eps * scale
    assert torch.isfinite(ours).all() or not torch.isfinite(exact).all(), "non-finite values"
    err, err_eager = max_err(ours, exact), max_err(eager, exact)
    if math.isnan(err_eager):  # eager overflowed (e.g. 1e-8 underflows in float16): any finite error beats it
        err_eager = math.inf
    assert err <= 2 * err_eager + ulp, f"error {err:.3g} vs eager {err_eager:.3g} (ulp {ulp:.3g})"


def pretend_gpu(monkeypatch, available, launch_cuda: bool = True):
    """``auto`` chooses as it would on a GPU for these CPU tensors, with ``available`` the fused
    backends that count as usable there (the kernels still run here: Triton in the interpreter;
    ``launch_cuda=False``: the CUDA extension fails the test if anything launches it). The
    said-once fallbacks start afresh and are forgotten afterwards."""
    real = _backend.resolve_for_device
    monkeypatch.setattr(_backend, "resolve_for_device", lambda op, device, *args: real(op, torch.device("cuda"), *args))
    monkeypatch.setattr(_backend, "unavailable_reason",
                        lambda name, op, device: None if name in available + ("torch",) else "pretend it is missing")
    monkeypatch.setattr(_backend, "_warned", set())
    if not launch_cuda:
        def no_launch():
            raise AssertionError("the CUDA extension was called")
        monkeypatch.setattr(_backend, "cuda_extension", no_launch)


@pytest.fixture(scope="session")
def learned_gan(tmp_path_factory):
    """A 16-px phantom PGGAN trained with the demo's CPU recipe until it has learned (about a minute):
    (archive, run). Tests that need a generator whose samples look like the data use it."""
    from xrayforge.data.prepare import prepare
    from xrayforge.demo import gan_config
    from xrayforge.train.trainer import Trainer
    root = tmp_path_factory.mktemp("learned")
    prepare("phantom:4000", root / "data", resolution=16, workers=1, progress=False)
    Trainer(gan_config(root / "data", root / "run", resolution=16, phase_images=2000, total_images=12000,
                       device="cpu"), progress=False).train()
    return root / "data", root / "run"


@pytest.fixture(scope="module")
def metrics_world(tmp_path_factory):
    """For measuring during training: a 48-image phantom archive at 16 px (``arc``) and a small
    untrained classifier (``clf``) whose features are a fast space."""
    from xrayforge.data.prepare import prepare
    from xrayforge.nn.classifier import ChestClassifier, ClassifierConfig
    w = tmp_path_factory.mktemp("metrics")
    prepare("phantom:48", w / "arc", resolution=16, workers=1, progress=False)
    torch.manual_seed(0)
    ChestClassifier(ClassifierConfig(input_size=16, width=8)).save(w / "clf")
    return w
