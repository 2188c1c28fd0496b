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


def _checked(kind, ok, says: str, name: str):
    """An argparse type: ``kind`` of the text, refused unless ``ok(value)``."""
    def parse(text: str):
        value = _number(kind, text)
        try:
            good = ok(value)
        except OverflowError:  # e.g. a kimg so large that its images overflow a float
            raise argparse.ArgumentTypeError(f"{text!r} is too large") from None
        if not good:
            raise argparse.ArgumentTypeError(f"{value} {says}")
        return value
    parse.__name__ = name
    return parse


positive_int = _checked(int, lambda v: v >= 1, "must be at least 1", "positive_int")
nonneg_int = _checked(int, lambda v: v >= 0, "must be 0 or more", "nonneg_int")
positive_float = _checked(float, lambda v: v > 0, "must be greater than 0", "positive_float")
nonneg_float = _checked(float, lambda v: v >= 0, "must be 0 or more", "nonneg_float")
fraction = _checked(float, lambda v: 0 < v < 1, "must be between 0 and 1 (exclusive)", "fraction")
# Adam's step size: beyond 1 training only diverges, and past float32's range the optimiser itself fails
learning_rate = _checked(float, lambda v: 0 < v <= 1, "must be greater than 0 and at most 1", "learning_rate")
percentile = _checked(float, lambda v: 0 < v <= 100, "must be a percentile in (0, 100]", "percentile")
seed = _checked(int, lambda v: 0 <= v < 2 ** 32, "is not a seed (0 .. 2^32 - 1)", "seed")
even_int = _checked(int, lambda v: v >= 2 and v % 2 == 0, "must be an even number, at least 2", "even_int")
batch_of_2 = _checked(int, lambda v: v >= 2, "must be at least 2 (batch norm needs two images)", "batch_of_2")
# nn.latents.MIN_TRUNCATION, which importing here would bring torch into every --help
truncation = _checked(float, lambda v: v >= 0.01, "must be at least 0.01 (smaller redraws for ever)", "truncation")
at_least_6 = _checked(int, lambda v: v >= 6, "must be at least 6 (density / coverage use k = 5 neighbours)",
                      "at_least_6")
kimg = _checked(float, lambda v: round(v * 1000) >= 1, "thousand images is less than one image", "kimg")
nonneg_kimg = _checked(float, lambda v: round(v * 1000) >= 0, "must be 0 or more", "nonneg_kimg")  # 0: none


power_of_two = _checked(int, lambda v: v >= 4 and not v & (v - 1), "is not a resolution (a power of two >= 4)",
                        "power_of_two")
ema_beta = _checked(float, lambda v: 0 <= v < 1, "must be in [0, 1)", "ema_beta")


def record_given(parser: argparse.ArgumentParser) -> None:
    """Options added to ``parser`` after this call record, when the command line gives them, their
    option string in ``args.given_options`` ({dest: "--option"}): a default cannot be told from the same
    value typed out otherwise (``train --resume`` refuses options that differ from the run's)."""
    for name, base in list(parser._registries["action"].items()):
        if isinstance(base, type) and issubclass(base, argparse.Action) and name not in ("help", "version", "parsers"):
            parser.register("action", name, _recording(base))


def _recording(base: type) -> type:
    class Recording(base):
        def __call__(self, parser, namespace, values, option_string=None):
            if option_string is not None:
                given = dict(getattr(namespace, "given_options", None) or {})
                given[self.dest] = option_string
                namespace.given_options = given
            super().__call__(parser, namespace, values, option_string)
    Recording.__name__ = base.__name__
    return Recording


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

