"""Argument types shared by the commands: every number and device is checked when the command
line is parsed, before any work starts, and a bad one is a one-line usage error (exit 2)."""
from __future__ import annotations

import argparse
import math


def _number(kind, text: str):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def positive_int(text: str) -> int:
    value = _number(int, text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def nonneg_int(text: str) -> int:
    value = _number(int, text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} must be 0 or more")
    return value


def positive_float(text: str) -> float:
    value = _number(float, text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{value} must be greater than 0")
    return value


def nonneg_float(text: str) -> float:
    value = _number(float, text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} must be 0 or more")
    return value


def fraction(text: str) -> float:
    """Strictly between 0 and 1."""
    value = _number(float, text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be between 0 and 1 (exclusive)")
    return value


def percentile(text: str) -> float:
    value = _number(float, text)
    if not 0 < value <= 100:
        raise argparse.ArgumentTypeError(f"{value} must be a percentile in (0, 100]")
    return value


def power_of_two(text: str) -> int:
    value = _number(int, text)
    if value < 4 or value & (value - 1):
        raise argparse.ArgumentTypeError(f"{value} is not a resolution (a power of two >= 4)")
    return value


def device(text: str) -> str:
    """cpu, cuda, cuda:N (N below the number of GPUs), or mps where torch has it."""
    import torch
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device (cpu, cuda or cuda:N)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text!r}: no CUDA GPU is available on this machine (use cpu)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text!r}: this machine has {torch.cuda.device_count()} GPU(s)")
    elif dev.type not in ("cpu", "mps"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device (cpu, cuda or cuda:N)")
    elif dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise argparse.ArgumentTypeError(f"{text!r}: MPS is not available on this machine")
    return text
