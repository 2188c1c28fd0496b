"""Backend selection shared by every op: ``auto | cuda | triton | torch``.

The backend comes from the op's ``backend=`` argument, else from :func:`set_backend`, else
from ``XRAYFORGE_BACKEND``, else ``auto``. An explicit backend that cannot run raises
:class:`BackendUnavailableError` saying why; ``auto`` picks the fastest backend that can
run on the tensor's device and logs once, at WARNING, when it has to fall back.

Besides being unavailable on a device, a fused kernel may be unable to take a particular input:
a hard limit of the kernel for that shape (the channels one program holds, the blocks a launch
grid holds). Each op works those out from the shape before it resolves and passes them as
``refused``; ``auto`` passes such a kernel by like an unavailable one, and a backend named
explicitly raises, before anything launches.
"""
from __future__ import annotations

import contextlib
import importlib
import logging
import os

import torch

from ..errors import UserError

log = logging.getLogger("xrayforge.ops")

BACKENDS = ("auto", "cuda", "triton", "torch")

# The fused backends `auto` may pick on a CUDA device, fastest first, per op. A backend
# enters this table only after its `gpu`-marked tests have passed on a real GPU, and leaves it
# when its kernel changes until they pass again; until then it is reachable by naming it
# (backend="triton" / "cuda") and auto uses the torch reference.
# Validated by benchmarks/gpu_check.sh on an NVIDIA H200 (torch 2.11, Triton 3.6, CUDA 13.0),
# 2026-11-26, commits f780027 and b353db3, a1c7351 and e9cf508 (the last GPU window): every
# gpu-marked test of these pairs passed (results in benchmarks/results/gpu_check-*-2026-11-26.json).
# Order: Triton first for the channel epilogues, because the whole WGAN-GP step (channels_last
# activations) ran faster with them than with the extension's kernels at every size measured
# (1024 px, batch 16: 89.9 vs 70.4 img/s).
# Out until the next GPU window passes its tests: ops.knn's Triton kernel, whose NaN handling changed
# after e9cf508 (edf7385, 9466ae0; never run on a GPU); before: ("triton",) (at 67eaa81 with tf32x3
# 1.8x faster than the float64 torch path at 100k x 100k x 2048). Partly out: see GPU_PENDING_DTYPES.
# ops.masked_moments' Triton kernels are not here: slower than Hopper's float64 matmuls (10.4 vs
# 8.8 ms at 50k x 2048). For minibatch stddev (4 × 4 px, a negligible share of the step) the
# extension's kernel had the better median in the op benchmark (1.08× eager vs 0.70×).
# Out until the next GPU window passes its tests: the extension's pixel-norm kernels ("cuda" for
# pixel_norm and bias_lrelu_pixel_norm), whose compensated sum of squares changed (csrc/common.cuh:
# an infinite sum gave NaN in every channel of the pixel, where the reference gives 0 in its finite
# ones); before: ("triton", "cuda") for both. Under auto they served float64 (Triton's is pending)
# and more than 16384 channels, which go to torch meanwhile.
GPU_VALIDATED: dict[str, tuple[str, ...]] = {
    "pixel_norm": ("triton",),
    "bias_lrelu_pixel_norm": ("triton",),
    "bias_lrelu": ("triton",),
    "minibatch_stddev": ("cuda", "triton"),
    "fid_preprocess": ("triton",),
    "knn": (),
}

# {(op, backend): dtypes} whose specialisation of a validated kernel changed after its GPU tests
# passed: auto passes it by for those dtypes (the next validated backend, else torch) until the
# next GPU window passes them. The Triton channel epilogues' float64 specialisation (d0f18c2: the
# slope and eps as float32 hi + lo parts added in float64); their fp32 / bf16 / fp16 ones take
# the same constants as before (hi alone: what Triton made of the float) and are the tested code.
GPU_PENDING_DTYPES: dict[tuple[str, str], tuple[torch.dtype, ...]] = {
    ("pixel_norm", "triton"): (torch.float64,),
    ("bias_lrelu_pixel_norm", "triton"): (torch.float64,),
    ("bias_lrelu", "triton"): (torch.float64,),
}


_candidates_override: tuple[str, ...] | None = None


def auto_order_cuda(op: str) -> tuple[str, ...]:
    if _candidates_override is not None:
        return _candidates_override + ("torch",)
    return GPU_VALIDATED.get(op, ()) + ("torch",)


@contextlib.contextmanager
def auto_candidates(order: tuple[str, ...]):
    """Within the block, ``auto`` on a CUDA device tries these fused backends, in this order,
    for every op (then torch, with the usual logged fallback), validated or not. For the
    benchmarks and the GPU check, which must measure kernels before they can be validated."""
    global _candidates_override
    for name in order:
        if name not in ("cuda", "triton"):
            raise ValueError(f"auto candidates are fused backends ('cuda', 'triton'), got {name!r}")
    previous, _candidates_override = _candidates_override, tuple(order)
    try:
        yield
    finally:
        _candidates_override = previous


_selected: str | None = None
_warned: set[tuple[str, ...]] = set()

# CUDA's limits on a launch grid, in blocks along x, y and z (any GPU since compute capability
# 3.0); a Triton launch on a GPU has the same ones (the interpreter has none).
MAX_GRID = (2**31 - 1, 65535, 65535)


def grid_excess(grid: tuple[int, ...]) -> str | None:
    """In words, the first dimension of a launch grid (blocks along x, y, z) that is past CUDA's
    limits (MAX_GRID); None when the launch fits."""
    for axis, blocks, limit in zip("xyz", grid, MAX_GRID):
        if blocks > limit:
            return f"{blocks} blocks along grid.{axis}, above CUDA's limit of {limit}"
    return None


class BackendUnavailableError(UserError, RuntimeError):
    """Raised when a backend is asked for by name and cannot run here (a user-facing error:
    the name came from the caller or from XRAYFORGE_BACKEND)."""


def _check_name(name: str) -> str:
    if isinstance(name, str):
        name = name.strip().lower()  # as XRAYFORGE_BACKEND is read
    if name not in BACKENDS:
        raise UserError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return name


def set_backend(name: str | None) -> None:
    """Set the process-wide default backend (``None`` returns to ``XRAYFORGE_BACKEND``/auto)."""
    global _selected
    _selected = None if name is None else _check_name(name)


def get_backend() -> str:
    """The backend used when an op is called without ``backend=``."""
    if _selected is not None:
        return _selected
    env = os.environ.get("XRAYFORGE_BACKEND", "auto").strip().lower() or "auto"
    if env not in BACKENDS:
        raise UserError(f"XRAYFORGE_BACKEND={env!r} is not one of {', '.join(BACKENDS)}")
    return env


def _interpret_set() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# triton.jit picks the interpreter when a kernel is defined, i.e. when the op modules are
# imported (just after this one): setting TRITON_INTERPRET later leaves compiled kernels
_INTERPRET_AT_IMPORT = _interpret_set()


def triton_interpreter_active() -> bool:
    return _INTERPRET_AT_IMPORT and _interpret_set()


def _triton_reason(device: torch.device) -> str | None:
    try:
        importlib.import_module("triton")
    except ImportError as exc:  # pragma: no cover - triton is a declared dependency
        return f"Triton is not installed ({exc})"
    if device.type == "cuda" or triton_interpreter_active():
        return None
    if _interpret_set():
        return (f"Triton kernels need a CUDA tensor (got one on {device.type}); TRITON_INTERPRET=1 was set after "
                "xrayforge.ops was imported, when the kernels were already compiled for a GPU: set it before")
    return (f"Triton kernels need a CUDA tensor (got one on {device.type}); "
            "set TRITON_INTERPRET=1 to run them in the CPU interpreter")


def cuda_extension():
    """The compiled extension ``xrayforge._C``, or raise ImportError saying why it is missing."""
    try:
        return importlib.import_module("xrayforge._C")
    except ImportError as exc:
        raise ImportError(
            "the CUDA extension xrayforge._C is not built (" + str(exc) + "); reinstall with nvcc "
            "and pybind11 present, e.g. XRAYFORGE_BUILD_CUDA=1 pip install --no-build-isolation -e ."
        ) from exc


def _cuda_reason(device: torch.device, op: str) -> str | None:
    try:
        ext = cuda_extension()
    except ImportError as exc:
        return str(exc)
    if op not in getattr(ext, "OPS", ()):
        return f"the CUDA extension has no kernel for {op}"
    if device.type != "cuda":
        return f"CUDA kernels need a CUDA tensor (got one on {device.type})"
    return None


def unavailable_reason(name: str, op: str, device: torch.device) -> str | None:
    """Why backend ``name`` cannot run ``op`` on ``device``; ``None`` when it can."""
    if name == "torch":
        return None
    if name == "triton":
        return _triton_reason(device)
    if name == "cuda":
        return _cuda_reason(device, op)
    raise ValueError(f"unknown backend {name!r}")


def available_backends(op: str, device: torch.device | str) -> list[str]:
    device = torch.device(device)
    return [b for b in BACKENDS[1:] if unavailable_reason(b, op, device) is None]


def resolve(op: str, x: torch.Tensor, backend: str | None = None,
            refused: tuple[tuple[str, str], ...] = ()) -> str:
    """The concrete backend (``cuda``, ``triton`` or ``torch``) that runs ``op`` on ``x``;
    ``refused``: the fused kernels that cannot take ``x``, as for :func:`resolve_for_device`."""
    return resolve_for_device(op, x.device, backend, x.dtype, tuple(refused))


# torch.compile evaluates the choice once while tracing and keeps the answer as a constant
@torch.compiler.assume_constant_result
def resolve_for_device(op: str, device: torch.device, backend: str | None = None,
                       dtype: torch.dtype | None = None, refused: tuple[tuple[str, str], ...] = ()) -> str:
    """The backend for ``op`` on ``device``; with ``dtype``, auto also passes by a backend whose
    kernel for that dtype is pending (GPU_PENDING_DTYPES).

    ``refused``: ``(backend, why)`` pairs, the fused backends whose kernels cannot take the input
    at hand (a hard limit of the kernel for its shape, which the op works out). ``auto`` passes
    them by as it passes by an unavailable backend: the next candidate runs, and the fallback is
    logged once. A backend named explicitly raises BackendUnavailableError with the reason."""
    limits: dict[str, str] = {}
    for candidate, why in refused:  # one backend may be refused for several reasons
        limits[candidate] = f"{limits[candidate]}; {why}" if candidate in limits else why
    name = _check_name(backend) if backend is not None else get_backend()
    if name != "auto":
        why = unavailable_reason(name, op, device)
        if why is not None:
            raise BackendUnavailableError(f"{op}: backend {name!r} is not available: {why}")
        if name in limits:
            raise BackendUnavailableError(f"{op}: backend {name!r} cannot take this input: {limits[name]}")
        return name
    if device.type != "cuda":
        return "torch"  # the reference is the fast path off the GPU
    reasons = []
    limited = False
    for candidate in auto_order_cuda(op):
        pending = _candidates_override is None and dtype in GPU_PENDING_DTYPES.get((op, candidate), ())
        why = f"its {dtype} kernel has not passed on a GPU since it changed" if pending else \
            unavailable_reason(candidate, op, device)
        if why is None and candidate in limits:
            why, limited = f"cannot take this input: {limits[candidate]}", True
        if why is None:
            # said once per op and backend, and once more for an input a kernel cannot take: a
            # fallback for one reason does not silence a fallback for the other
            key = (op, candidate, "input") if limited else (op, candidate)
            if reasons and key not in _warned:
                _warned.add(key)
                log.warning("%s: auto backend fell back to %r (%s)", op, candidate, "; ".join(reasons))
            return candidate
        reasons.append(f"{candidate}: {why}")
    raise BackendUnavailableError(f"{op}: no backend available: {'; '.join(reasons)}")  # pragma: no cover
