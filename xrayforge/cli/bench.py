"""`xrayforge bench`."""
from __future__ import annotations

import argparse
import os
import sys

from . import _args


def _cmd_bench(args: argparse.Namespace) -> int:
    from ..bench.suite import SUITES, is_bench_json, print_tables, run_suite, save_json

    # "ops, data" is two suites, and one named twice runs once
    suites = list(dict.fromkeys(s.strip() for s in args.suites.split(","))) if args.suites else list(SUITES)
    unknown = set(suites) - set(SUITES)
    if unknown:
        print(f"xrayforge bench: error: unknown benchmark(s) {sorted(unknown)}; choose from {', '.join(SUITES)}",
              file=sys.stderr)
        return 2
    if args.json:  # before the benchmarks, not after them
        from ..utils.files import check_new_file
        check_new_file(args.json, "--json")
        if os.path.lexists(args.json) and not is_bench_json(args.json):  # a README, a script's results: kept
            print(f"xrayforge bench: error: {args.json}: exists and is not the JSON of an earlier `xrayforge bench "
                  f"--json`; it would be replaced. Choose another --json file", file=sys.stderr)
            return 1
    results = run_suite(suites, args.device, args.quick, progress=not args.quiet)
    print_tables(results)
    if args.json:
        save_json(results, args.json)
        print(f"\nwrote {args.json}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench", help="run the benchmark suite and print the README's table",
        description="Fused ops against eager PyTorch, the WGAN-GP training step against the unfused baseline, "
                    "FID against the pytorch-fid-equivalent pipeline, the data pipeline and sampling, at the sizes "
                    "that fit the device (full sizes on a GPU, small ones on a CPU).")
    p.add_argument("--suites", default=None, help="comma list of ops,train_step,fid,data,sampling (default: all)")
    p.add_argument("--quick", action="store_true", help="small sizes even on a GPU")
    p.add_argument("--device", type=_args.device, default=None, help="cuda, cuda:N or cpu (default: cuda when available)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write every row as JSON to FILE (replacing one an earlier run wrote, never another file)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_bench)
