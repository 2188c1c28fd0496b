"""The ``xrayforge`` command line. It parses arguments and calls each room's public API."""
from __future__ import annotations

import argparse
import logging
import sys

from . import __version__


def _cmd_info(args: argparse.Namespace) -> int:
    import torch

    from . import ops
    from .ops import _backend

    print(f"xrayforge {__version__}, torch {torch.__version__}")
    try:
        import triton
        print(f"triton {triton.__version__}" + (" (interpreter mode)" if _backend.triton_interpreter_active() else ""))
    except ImportError:
        print("triton: not installed")
    try:
        _backend.cuda_extension()
        print("CUDA extension xrayforge._C: built")
    except ImportError as exc:
        print(f"CUDA extension: {exc}")
    devices = ["cpu"] + ([f"cuda:{i}" for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else [])
    for dev in devices:
        name = torch.cuda.get_device_name(dev) if dev.startswith("cuda") else "CPU"
        print(f"{dev} ({name}): default backend {ops.get_backend()!r}")
        for op in _backend.GPU_VALIDATED:
            x = torch.empty(0, device=dev)
            print(f"  {op:24s} available {', '.join(ops.available_backends(op, dev))}; "
                  f"auto -> {_backend.resolve(op, x, 'auto')}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xrayforge",
        description="Train progressive GANs on chest radiographs, sample labelled synthetic archives "
                    "with latent class optimisation, and measure them with fast, exact FID.")
    parser.add_argument("--version", action="version", version=f"xrayforge {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("info", help="show versions, the CUDA extension and the backend each op uses",
                       description="Show versions, whether the CUDA extension is built, and which backend "
                                   "each fused op would use on each device.")
    p.set_defaults(func=_cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return args.func(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
