"""`xrayforge demo`."""
from __future__ import annotations

import argparse
import sys

from . import _args


def _cmd_demo(args: argparse.Namespace) -> int:
    from ..demo import finished_text, run_demo
    from ..train.trainer import Interrupted

    try:
        results = run_demo(args.out, args.device, args.minutes, args.inception, progress=not args.quiet)
    except (KeyboardInterrupt, Interrupted):  # Ctrl-C during training stops the trainer with a checkpoint
        print(f"\ninterrupted: run the same command again to continue ({args.out})", file=sys.stderr)
        return 130
    if args.quiet:  # no progress, but the results are the point of running it
        print(finished_text(results))
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo", help="the whole pipeline on the built-in chest phantom (minutes on a CPU)",
        description="Build a phantom archive, train a small PGGAN, train the phantom classifier, sample an "
                    "LCO-labelled archive, compute FID and write a report, sized to --minutes. No data or weights "
                    "needed (without the FID Inception weights, FID is in the phantom classifier's features). "
                    "Ctrl-C, then the same command, continues.")
    p.add_argument("--out", default="xrayforge-demo", help="output folder (default ./xrayforge-demo)")
    p.add_argument("--device", type=_args.device, default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--minutes", type=_args.positive_float, default=5.0, help="time budget (default 5; under 3 only a pipeline check)")
    p.add_argument("--inception", default=None,
                   help="FID Inception weights, if you have them (default: XRAYFORGE_INCEPTION or the torch hub "
                        "cache; none there: FID in the phantom classifier's features)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars or stage messages (the results are still printed)")
    p.set_defaults(func=_cmd_demo)
