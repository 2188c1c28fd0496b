"""`xrayforge fid`."""
from __future__ import annotations

import argparse
import math
import sys

from . import _args


def _cmd_fid(args: argparse.Namespace) -> int:
    import json

    from ..fid.compute import FeatureExtractor, compute_fid
    from ..train.trainer import init_distributed

    from pathlib import Path

    from ..errors import UserError
    from ..fid.stats import FrechetStats
    from ..utils.files import check_new_file

    if args.b is None and not args.save_stats:
        print("xrayforge fid: error: give two inputs, or one with --save-stats", file=sys.stderr)
        return 2
    if args.save_stats:  # before the work, not after it; and only statistics are ever overwritten
        check_new_file(args.save_stats, "--save-stats")
        if Path(args.save_stats).suffix != ".npz":
            raise UserError(f"{args.save_stats}: --save-stats writes a .npz statistics file (e.g. stats.npz)")
        if Path(args.save_stats).exists():
            FrechetStats.load(args.save_stats)  # an existing file must be statistics, or it is not replaced
    from ..fid.compute import describe, refuse_single_file
    kinds = set()
    for x in (args.a, args.b):  # a missing input is said before the weights are looked for
        if x is not None:
            kinds.add(kind := describe(x))
            refuse_single_file(x, kind)
            if kind == "stats" and not Path(x).is_file():
                raise FileNotFoundError(f"{x}: no such statistics file")
            if kind == "checkpoint" and not args.n:  # before the weights, and before the other input is read
                raise UserError(f"{x} is a generator checkpoint: give the number of images with --n")
    if args.n and "checkpoint" not in kinds:
        raise UserError(f"--n {args.n}: the number of images to generate from a checkpoint input, and neither "
                        f"input is one (folders and archives are used whole)")
    rank, _ = init_distributed()
    common = dict(inception=args.inception, random_weights=args.random_weights, mode=args.mode,
                  device=args.device, batch_size=args.batch, workers=args.workers,
                  progress=not args.quiet and rank == 0, features=args.features)
    if args.b is None:
        stats = FeatureExtractor(**common).compute(args.a, args.n, args.seed).stats
        if rank == 0:
            stats.save(args.save_stats)
            print(f"wrote {args.save_stats} ({stats.n} images)")
        return 0
    try:  # B failing after A was read keeps A's statistics (in --save-stats, else here): the note says where
        result = compute_fid(args.a, args.b, args.n, args.kid, args.bootstrap, args.keep_features, args.seed,
                             args.save_stats, prdc=args.prdc, keep_a_dir=".", **common)
    except KeyboardInterrupt as exc:
        if not getattr(exc, "__notes__", None):
            raise
        print(f"\nxrayforge fid: interrupted; {'; '.join(exc.__notes__)}", file=sys.stderr)
        return 130
    except Exception as exc:
        if not getattr(exc, "__notes__", None):
            raise
        from . import describe as one_line  # the error's own line, then the note: one line, as every error
        raise UserError(f"{one_line(exc)}; {'; '.join(exc.__notes__)}") from exc
    if rank != 0:
        return 0
    for item in result["skipped"][:20]:
        print(f"skipped {item['file']}: {item['reason']}", file=sys.stderr)
    if len(result["skipped"]) > 20:
        print(f"... and {len(result['skipped']) - 20} more skipped", file=sys.stderr)
    if args.json:
        from ..utils.files import json_safe
        print(json.dumps(json_safe(result)))
        return 0
    space = "" if result["features"] == "inception" else f", features {result['features']}"
    mode = f", {result['mode']} mode" if result["features"].startswith("inception") else ""  # the others have one
    line = f"FID {result['fid']:.4f}  (n_a={result['n_a']}, n_b={result['n_b']}{mode}{space})"
    if "fid_ci95" in result:
        line += f"  95% CI [{result['fid_ci95'][0]:.4f}, {result['fid_ci95'][1]:.4f}]"
    if "kid" in result:
        line += f"  KID {result['kid']:.6f} " + (f"± {result['kid_std']:.6f}" if not math.isnan(result["kid_std"])
                                                  else "(each side's kept features fit in one subset of 1000: no spread)")
    print(line)
    if "precision" in result:
        print(f"precision {result['precision']:.4f}  recall {result['recall']:.4f}  (k=3)   "
              f"density {result['density']:.4f}  coverage {result['coverage']:.4f}  (k=5)   A = real, B = generated")
    if args.random_weights and result["inception"].startswith("random"):
        print("note: random Inception weights — a pipeline check, not comparable with published FIDs")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "fid", help="Fréchet Inception Distance between two image sets",
        description="FID compatible with pytorch-fid. A and B are each a folder of images (PNG, JPEG, TIFF, DICOM; "
                    "recursive), a prepared archive, a .npz statistics file (mu, sigma), or a generator "
                    "checkpoint / run folder with --n (images generated on the fly, never written). Weights "
                    "pt_inception-2015-12-05-6726825d.pth come from --inception, XRAYFORGE_INCEPTION or the torch "
                    "hub checkpoint cache; they are never downloaded, and two .npz files need none. 16-bit images are "
                    "scaled by 65535 (pytorch-fid clips them at 255). Both inputs are checked before either is "
                    "read, and one given twice is read once. When B fails after A was read (a damaged B, Ctrl-C), "
                    "A's statistics are kept, in --save-stats or else ./fid-stats-NAME-HASH.npz, and the error "
                    "says how to rerun with them. Several GPUs: torchrun ... -m xrayforge fid.")
    p.add_argument("a", help="the first (real) side: folder, archive, .npz statistics or checkpoint / run folder")
    p.add_argument("b", nargs="?", help="the second (generated) side, of the same kinds; left out with --save-stats: "
                                        "only A's statistics are written")
    p.add_argument("--n", "--images", dest="n", type=_args.positive_int, default=None,
                   help="images to generate from a checkpoint input (required for one; folders and archives are used "
                        "whole); under torchrun write --images (torchrun takes --n for its own --nnodes/--nproc...)")
    p.add_argument("--inception", default=None, help="path of pt_inception-2015-12-05-6726825d.pth")
    p.add_argument("--random-weights", action="store_true",
                   help="random Inception weights: checks the pipeline; the number is not a comparable FID")
    p.add_argument("--mode", choices=("exact", "fast"), default=None,  # None: exact, and two .npz files' own
                   help="Inception only: exact: fp32 as pytorch-fid (default); fast: bf16 + channels_last, not pytorch-fid's "
                        "number (0.005 from exact on 2,000 phantoms with random weights; python "
                        "benchmarks/fid.py --inception W measures it with real ones)")
    p.add_argument("--batch", type=_args.positive_int, default=64, help="images per network batch (default 64)")
    p.add_argument("--workers", type=_args.nonneg_int, default=4, help="decode processes (default 4)")
    p.add_argument("--device", type=_args.device, default=None, help="cuda, cuda:N or cpu (default: cuda when available)")
    p.add_argument("--seed", type=_args.seed, default=0,
                   help="latent seed for checkpoint inputs (B uses SEED + 1, so that a checkpoint against itself "
                        "compares two different sets of images)")
    p.add_argument("--kid", type=_args.nonneg_int, default=0, metavar="SUBSETS",
                   help="also KID over this many random subsets of up to 1000 of the kept features a side")
    p.add_argument("--bootstrap", type=_args.nonneg_int, default=0, metavar="ROUNDS",
                   help="also a 95%% bootstrap interval over ROUNDS resamples (at least 2; 100 or more for one worth "
                        "the name), of the FID of the kept features (--keep-features a side: with more images than "
                        "that it lies above the FID printed, which uses every image)")
    p.add_argument("--keep-features", type=_args.positive_int, default=10000,
                   help="features kept per side for --kid, --bootstrap and --prdc (a uniform sample; default 10000)")
    p.add_argument("--save-stats", default=None,
                   help="write A's statistics to this .npz (as soon as they are computed: a failure of B keeps "
                        "them)")
    p.add_argument("--features", default=None, metavar="SPACE",  # None: inception, and two .npz files' own
                   help="the feature space: inception (default; the literature's FID), classifier:MODEL (the "
                        "penultimate features of a `xrayforge classify train` model) or densenet121:FILE (a "
                        "DenseNet-121 state dict, torchvision keys: e.g. torchxrayvision's chest X-ray weights, the "
                        "FXD-style distance); recorded in --save-stats files and --json, and statistics of "
                        "different spaces are never compared")
    p.add_argument("--prdc", action="store_true",
                   help="also improved precision / recall (k=3) and density / coverage (k=5), with A the real side: "
                        "fidelity and diversity separately (on up to --keep-features features a side)")
    p.add_argument("--json", action="store_true", help="print one JSON object (fid, n_a, n_b, mode, ...)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_fid)
