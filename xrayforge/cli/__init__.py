"""The ``xrayforge`` command line. It parses arguments and calls each room's public API.

One module per command group, each with its parser beside its handlers (``add_parser(sub)`` and
``_cmd_*``): data (info, prepare), train, fid, sample, evaluate (classify, evaluate), demo, bench.
``build_parser`` assembles them in that order, the order of ``xrayforge --help``."""
from __future__ import annotations

import argparse
import logging

from .. import __version__
from . import bench, data, demo, evaluate, fid, sample, train

GROUPS = (data, train, fid, sample, evaluate, demo, bench)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xrayforge",
        description="Train progressive GANs on chest radiographs, sample labelled synthetic archives "
                    "with latent class optimisation, and measure them with fast, exact FID.")
    parser.add_argument("--version", action="version", version=f"xrayforge {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for group in GROUPS:
        group.add_parser(sub)
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

