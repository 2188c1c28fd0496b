"""`xrayforge sample`."""
from __future__ import annotations

import argparse

from . import _args


def _cmd_sample(args: argparse.Namespace) -> int:
    import json

    from ..sample.writer import SampleConfig, sample_archive
    from ..train.trainer import init_distributed

    rank, _ = init_distributed()
    cfg = SampleConfig(run=args.run, out=args.out, n=args.n, seed=args.seed, format=args.format, batch=args.batch,
                       truncation=args.truncation, amp=args.amp, targets=args.lco or [], classifier=args.classifier,
                       steps=args.steps, lr=args.lr, prior_weight=args.prior_weight, starts=args.starts,
                       shard_size=args.shard_size, give_up_after=args.give_up_after,
                       device=args.device)
    summary = sample_archive(cfg, progress=not args.quiet)
    if rank != 0:
        return 0
    if args.json:  # one JSON object on stdout, nothing else (a pipe into jq)
        print(json.dumps(summary))
        return 0
    print(f"{summary['out']}: {summary['images']} images ({summary['format']}); manifest.csv, summary.json")
    for key, t in summary["targets"].items():
        line = f"  {key}: {t['accepted']} accepted"
        if t["rejected"] is not None and t["acceptance_rate"] is not None:
            line += f", {t['rejected']} rejected (acceptance {t['acceptance_rate']:.1%})"
        if t["accepted"]:
            line += (f"; mean {t['mean_steps']:.1f} LCO steps, mean target probability "
                     f"{t['mean_target_probability']:.3f}")
        print(line)
    if summary["images_per_second"]:
        print(f"  {summary['images_this_run']} images in this run, {summary['images_per_second']:.1f} images/s")
    else:
        print("  nothing left to sample: the archive was complete")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sample", help="sample a labelled synthetic archive (optionally steered by LCO)",
        description="Generate images from the EMA generator of RUN (a run folder or checkpoint) into DIR as PNG "
                    "(8/16-bit) or DICOM Secondary Capture, with manifest.csv (file, seed, index, target, "
                    "classifier probabilities, latents). With --lco and --classifier, latent class optimisation "
                    "steers each image to the wanted findings, e.g. --lco 'Cardiomegaly=1,Effusion=1,Nodule=0' "
                    "(repeat --lco for several targets; --n images each; a target whose first --give-up-after attempts "
                    "give no image, while the archive has none of it, is declared unreachable and the run stops). Written in shards: an interrupted run "
                    "resumes when run again with the same arguments; it keeps the checkpoint it started from "
                    "(RUN may have moved), and refuses a classifier whose files changed since.")
    p.add_argument("run", help="a training run folder (its newest checkpoint) or a checkpoint folder")
    p.add_argument("--out", required=True, metavar="DIR", help="the archive's folder (created, or continued)")
    p.add_argument("--n", "--images", dest="n", type=_args.positive_int, required=True,
                   help="images (per LCO target); under torchrun write --images (torchrun takes --n for its own "
                        "--nnodes/--nproc...)")
    p.add_argument("--seed", type=_args.seed, default=0, help="latent seed (an unconditional image i's z depends on (seed, i) alone; default 0)")
    p.add_argument("--format", choices=("png8", "png16", "dicom"), default="png8",
                   help="8- or 16-bit PNG, or 8-bit DICOM Secondary Capture (default png8)")
    p.add_argument("--batch", type=_args.positive_int, default=32,
                   help="images per generator batch, and latents in the LCO pool (default 32)")
    p.add_argument("--truncation", type=_args.truncation, default=None, help="redraw latent components beyond ±T (at least 0.01); LCO keeps its latents within ±T")
    p.add_argument("--amp", choices=("bf16",), default=None, help="bfloat16 mixed precision for the generator and LCO's classifier passes")
    p.add_argument("--lco", action="append", default=None, metavar="TARGET",
                   help="NAME=1|0,... : 1 asks p >= the classifier's threshold for NAME, 0 below it (repeatable)")
    p.add_argument("--classifier", default=None,
                   help="classifier folder (from `xrayforge classify train`): steers --lco, and labels every image "
                        "with its probabilities in manifest.csv (also without --lco)")
    p.add_argument("--steps", type=_args.positive_int, default=100,
                   help="LCO steps per attempt before it counts as a rejection (default 100)")
    p.add_argument("--lr", type=_args.learning_rate, default=0.05,
                   help="LCO Adam learning rate on z (default 0.05; at most 1)")
    p.add_argument("--prior-weight", type=_args.nonneg_float, default=1.0,
                   help="weight of the latent prior in the LCO objective: higher keeps z typical (more realistic "
                        "images, fewer hits; default 1)")
    p.add_argument("--starts", type=_args.positive_int, default=16,
                   help="LCO starts each image from the best of S draws of z for its target (S forward passes of G "
                        "and the classifier, no backward: fewer LCO steps and less movement of z; default 16, "
                        "1 = the first draw)")
    p.add_argument("--give-up-after", type=_args.nonneg_int, default=300, metavar="ATTEMPTS",
                   help="declare an LCO target unreachable when this many attempts in a shard give no image and "
                        "the archive holds none of it (default 300; 0: only the limit of 1000 attempts per image in a shard; "
                        "may change when resuming)")
    p.add_argument("--shard-size", type=_args.positive_int, default=1000, help="images per shard (default 1000)")
    p.add_argument("--device", type=_args.device, default=None, help="cuda, cuda:N or cpu (default: cuda when available)")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object, and nothing else")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_sample)
