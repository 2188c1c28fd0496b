"""`xrayforge train`."""
from __future__ import annotations

import argparse
import sys

from ..errors import UserError
from . import _args


def _parse_batch(text: str) -> dict:
    """'16' (every resolution) or '256:14,512:6' (per resolution)."""
    try:
        if ":" not in text:
            from ..train.schedule import EVERY_RESOLUTION
            return {r: _args.positive_int(text) for r in EVERY_RESOLUTION}
        out = {}
        for item in text.split(","):
            res, n = item.split(":")
            res = _args.power_of_two(res)
            if res in out:  # the later one was taken without a word
                raise argparse.ArgumentTypeError(f"{text!r}: {res} px is given twice")
            out[res] = _args.positive_int(n)
        return out
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected N or RES:N,... (e.g. 16 or 256:14,512:6)") from None


def _parse_lr(text: str) -> tuple[float, dict]:
    """'0.001' (every resolution), '1024:0.0015' or '0.001,512:0.002,1024:0.0015' -> (base, {res: lr})."""
    base, table = 1e-3, {}
    items = [t.strip() for t in text.split(",")]
    try:
        if not all(items):  # '' or ',' is no learning rate, not the default one
            raise ValueError
        if sum(":" not in item for item in items) > 1:  # the last one was taken without a word
            raise argparse.ArgumentTypeError("more than one base LR (one without RES:)")
        for item in items:
            if ":" in item:
                res, lr = item.split(":")
                res = _args.power_of_two(res)
                if res in table:
                    raise argparse.ArgumentTypeError(f"{res} px is given twice")
                table[res] = _args.learning_rate(lr)
            else:
                base = _args.learning_rate(item)
    except argparse.ArgumentTypeError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: {exc} (expected LR or RES:LR,..., e.g. 0.001,1024:0.0015)") \
            from None
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected LR or RES:LR,... (e.g. 0.001,1024:0.0015)") from None
    return base, table


def _metrics(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",")]
    if not names or set(names) - {"fid", "prdc"}:
        raise argparse.ArgumentTypeError(f"{text!r}: a comma list of fid, prdc")
    return names


def _kimg(value: float | None) -> int | None:
    return None if value is None else int(round(value * 1000))


# --resume continues a run with the options it was started with. These may change when it resumes (how
# long its last phase is, where it runs, what it logs and measures, how many checkpoints it keeps,
# activation checkpointing) ({dest: TrainConfig field}); so may --max-kimg (a stop for this session) and
# --inception, and ARCHIVE may name the run's archive where it has moved.
_TAKEN_ON_RESUME = {"total_kimg": "total_images", "device": "device", "tick_kimg": "tick_images",
                    "checkpoint_ticks": "checkpoint_ticks", "keep": "keep_checkpoints",
                    "checkpoint_min_res": "checkpoint_min_res", "realism_images": "realism_images",
                    "metrics": "metrics", "metrics_every": "metrics_every", "metrics_images": "metrics_images",
                    "features": "metrics_features",
                    # memory only: micro-batches of the batch's strided minibatch-stddev groups step as the batch
                    "accumulation": "accumulation"}
RESUME_TAKES = ("--max-kimg", *("--" + d.replace("_", "-") for d in _TAKEN_ON_RESUME), "--inception")
# the options that set what is trained (data, network, schedule, optimiser, loss): given with --resume, they
# must equal the run's ({dest: TrainConfig field}; the batch and learning rate are compared per resolution)
_FIXED_ON_RESUME = {"resolution": "resolution", "start_resolution": "start_resolution", "fade_kimg": "fade_images",
                    "stable_kimg": "stable_images", "batch": "batch", "auto_batch": "auto_batch",
                    "amp": "amp", "lr": "lr", "gp_metric": "gp_metric",
                    "ema_kimg": "ema_kimg", "ema_rampup": "ema_rampup", "ema_beta": "ema_beta",
                    "latent_dim": "latent_dim", "fmap_base": "fmap_base", "fmap_max": "fmap_max", "mirror": "mirror",
                    "seed": "seed", "include_test": "include_test"}


def _options(args: argparse.Namespace) -> dict:
    """TrainConfig's fields from the command line (all but archive and out)."""
    lr, lr_table = args.lr
    metric_options = {"metrics": args.metrics, "metrics_every": args.metrics_every,
                      "metrics_features": args.features, "metrics_images": args.metrics_images}
    return dict(resolution=args.resolution, start_resolution=args.start_resolution, fade_images=_kimg(args.fade_kimg),
                stable_images=_kimg(args.stable_kimg), total_images=_kimg(args.total_kimg), batch=args.batch,
                auto_batch=args.auto_batch, lr=lr, lr_by_resolution=lr_table, gp_metric=args.gp_metric, amp=args.amp,
                accumulation=args.accumulation, checkpoint_min_res=args.checkpoint_min_res,
                ema_rampup=args.ema_rampup, ema_beta=args.ema_beta, latent_dim=args.latent_dim,
                fmap_base=args.fmap_base, fmap_max=args.fmap_max, mirror=args.mirror, include_test=args.include_test,
                tick_images=_kimg(args.tick_kimg), checkpoint_ticks=args.checkpoint_ticks, keep_checkpoints=args.keep,
                seed=args.seed, device=args.device, max_images=_kimg(args.max_kimg),
                realism_images=args.realism_images, **{k: v for k, v in metric_options.items() if v is not None},
                **({} if args.ema_kimg is None else {"ema_kimg": args.ema_kimg}))


def _shown(dest: str, cfg, resolutions: list[int]) -> str:
    """An option's value in ``cfg`` as the command line writes it."""

    def per_resolution(value_at) -> str:
        values = [v if isinstance(v, str) else f"{v:g}" for v in map(value_at, resolutions)]
        return values[0] if len(set(values)) == 1 else ",".join(f"{r}:{v}" for r, v in zip(resolutions, values))
    if dest == "batch":  # a resolution --auto-batch sizes is "auto" (on a GPU its probe's batch, kept in the run)
        return per_resolution(lambda r: cfg.batch_at(r, cuda=True) or "auto")
    if dest == "lr":
        return per_resolution(cfg.lr_at)
    value = getattr(cfg, _FIXED_ON_RESUME[dest])
    if dest.endswith("_kimg") and dest != "ema_kimg":
        return f"{value / 1000:g}"
    if isinstance(value, bool):
        return "on" if value else "off"
    return "unset" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def _changed_on_resume(args: argparse.Namespace, saved, resolutions: list[int]) -> list[str]:
    """'--lr 0.5 (the run's: 0.001)' for each option given that would change what the run trains."""
    from ..train.trainer import TrainConfig
    given = getattr(args, "given_options", {})
    asked = TrainConfig(archive=saved.archive, out=saved.out, **_options(args))
    out = []
    for dest, option in given.items():
        if dest in _FIXED_ON_RESUME and _shown(dest, asked, resolutions) != _shown(dest, saved, resolutions):
            out.append(f"{option} {_shown(dest, asked, resolutions)} (the run's: {_shown(dest, saved, resolutions)})")
    return out


def _resumed_config(args: argparse.Namespace):
    """The saved run's TrainConfig with what --resume takes from the command line applied."""
    from pathlib import Path

    from ..train.trainer import TrainConfig, saved_options
    cfg = saved_options(args.out)
    # the run folder is where it is now: a copied or moved run resumes in itself, never in the
    # folder it was copied from (whose path the saved config holds)
    cfg["out"] = args.out
    cfg.setdefault("gp_metric", "current")  # runs from before --gp-metric penalised current-size images
    cfg.setdefault("include_test", True)  # runs from before the test split was held out trained on every row
    if args.archive is not None:  # the archive moved (the trainer checks that it is the same archive)
        cfg["archive"] = str(Path(args.archive).resolve())
    elif not (Path(str(cfg.get("archive", ""))) / "archive.json").is_file():
        raise UserError(f"{cfg.get('archive')}: the run's archive is no longer there (moved or deleted?); give "
                        f"where it is now: xrayforge train ARCHIVE --out {args.out} --resume")
    saved = TrainConfig(**cfg)
    final = saved.resolution or 4
    resolutions = [4 << i for i in range(final.bit_length() - 2) if 4 << i >= saved.start_resolution]
    changed = _changed_on_resume(args, saved, resolutions)
    if changed:
        raise _Refused(f"{args.out}: --resume continues the run with the options it was started with; given "
                       f"otherwise: {'; '.join(changed)}. Leave them out (a resumed run takes only ARCHIVE, "
                       f"{', '.join(RESUME_TAKES)} from the command line), or start a new run with another --out")
    given = getattr(args, "given_options", {})
    asked = _options(args)
    cfg["max_images"] = asked["max_images"]  # a stop for this session only: a plain --resume goes on
    cfg.update({field: asked[field] for dest, field in _TAKEN_ON_RESUME.items() if dest in given})
    return TrainConfig(**cfg)


# options that set how --metrics measures: nothing without it
_WITH_METRICS = ("metrics_every", "metrics_images", "features", "inception")


class _Refused(ValueError):
    """Options that cannot be used (exit status 2)."""


def _cmd_train(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..train.trainer import Interrupted, TrainConfig, Trainer, init_distributed

    rank, _ = init_distributed()
    if args.resume:
        try:
            cfg = _resumed_config(args)
        except _Refused as exc:
            print(f"xrayforge train: error: {exc}", file=sys.stderr)
            return 2
        except (TypeError, ValueError) as exc:
            if isinstance(exc, UserError):
                raise
            print(f"xrayforge train: error: {Path(args.out) / 'train_config.json'}: {exc}", file=sys.stderr)
            return 1
    else:
        if args.archive is None:
            print("xrayforge train: error: ARCHIVE is required for a new run", file=sys.stderr)
            return 2
        if args.ema_beta is not None and args.ema_kimg is not None:
            print("xrayforge train: error: give --ema-kimg (a half-life) or --ema-beta (a constant beta), not both",
                  file=sys.stderr)
            return 2
        if args.ema_beta is not None and "ema_rampup" in getattr(args, "given_options", {}):
            # a constant beta has no half-life to ramp up: --ema-rampup was accepted and ignored
            print("xrayforge train: error: --ema-rampup ramps up --ema-kimg's half-life; --ema-beta is a constant "
                  "beta with no ramp-up: give one of them", file=sys.stderr)
            return 2
        try:
            cfg = TrainConfig(archive=str(Path(args.archive).resolve()), out=args.out, **_options(args))
        except ValueError as exc:
            print(f"xrayforge train: error: {exc}", file=sys.stderr)
            return 2
    idle = [option for dest, option in getattr(args, "given_options", {}).items() if dest in _WITH_METRICS]
    if idle and not cfg.metrics:  # they would be ignored without a word
        print(f"xrayforge train: error: {', '.join(sorted(idle))}: only with --metrics, and "
              f"{'the run measures nothing' if args.resume else 'none was given'}; add --metrics fid (or prdc), or "
              f"leave {'it' if len(idle) == 1 else 'them'} out", file=sys.stderr)
        return 2
    measure = None
    if cfg.metrics and rank == 0:  # FID sits downstream of training: built here, handed to the trainer;
        # process 0 alone measures, on its own GPU
        from ..fid.training import TrainingMetrics
        from ..train.trainer import process_device
        measure = TrainingMetrics(cfg.archive, cfg.out, cfg.metrics, cfg.metrics_features, cfg.metrics_images,
                                  device=str(process_device(cfg.device)), seed=cfg.seed, inception=args.inception,
                                  include_test=cfg.include_test)
    try:
        summary = Trainer(cfg, resume=args.resume, progress=not args.quiet, measure=measure).train()
    except Interrupted as exc:
        print(f"xrayforge train: {exc}", file=sys.stderr)
        return 130
    if rank == 0:  # once, and after process 0 wrote the last checkpoint
        print(f"trained to {summary['images_seen']} images at {summary['resolution']} px of "
              f"{summary['final_resolution']} px, on {summary['train_images']} archive images; checkpoint "
              f"{summary['checkpoint']}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train", help="train a progressive GAN on an archive",
        description="Progressive WGAN-GP training (PGGAN) on a prepared archive. Writes RUN/log.jsonl, "
                    "RUN/grids/*.png, RUN/loss.png and atomic checkpoints in RUN/checkpoints; Ctrl-C checkpoints "
                    "and stops; --resume continues exactly. Trains on the archive's images outside its test split. "
                    "One training per run folder at a time (RUN/.lock). Several GPUs: torchrun --nproc-per-node N "
                    "-m xrayforge train ...")
    _args.record_given(p)
    p.add_argument("archive", nargs="?", help="archive made by `xrayforge prepare` (with --resume: only to point the "
                                              "run at its archive where it has moved; another archive is refused)")
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its newest intact checkpoint, with the options it was started "
                        f"with; from the command line it takes only ARCHIVE, {', '.join(RESUME_TAKES)}; any other "
                        "option given must equal the run's, or it is refused")
    p.add_argument("--resolution", type=_args.power_of_two, default=None, help="final resolution (default: the archive's)")
    p.add_argument("--start-resolution", type=_args.power_of_two, default=4,
                   help="the first resolution trained, with no fade-in (default 4, the official)")
    p.add_argument("--fade-kimg", type=_args.nonneg_kimg, default=600, help="thousands of images per fade-in (default 600)")
    p.add_argument("--stable-kimg", type=_args.kimg, default=600, help="thousands of images per stable phase (default 600)")
    p.add_argument("--total-kimg", type=_args.kimg, default=None,
                   help="train on at the final resolution until this many thousand images in all (the official "
                        "total_kimg, e.g. 12000); default: stop after one stable phase at the final resolution")
    p.add_argument("--max-kimg", type=_args.kimg, default=None,
                   help="stop (with a checkpoint) after this many thousand images in all; --resume goes on (a stop "
                        "for this session only)")
    p.add_argument("--batch", type=_parse_batch, default={}, help="per-GPU batch: N, or RES:N,... (default 16 up to 128 px, 14, 6, 3)")
    p.add_argument("--auto-batch", action="store_true",
                   help="per GPU, at each resolution --batch leaves unset, the largest power of two (up to 512) whose "
                        "step fits GPU memory (CUDA only; elsewhere it does nothing, and says so)")
    p.add_argument("--accumulation", type=_args.positive_int, default=1,
                   help="split each batch into N micro-batches: the batch's step in less memory, up to its random "
                        "draws (each micro-batch draws its own latents and penalty mixes, so not bit for bit; N must "
                        "divide --batch; micro-batches that split D's minibatch-stddev groups are warned about; "
                        "default 1)")
    p.add_argument("--amp", choices=("bf16",), default=None, help="bfloat16 mixed precision")
    p.add_argument("--checkpoint-min-res", type=_args.power_of_two, default=None, help="activation checkpointing at and above this size")
    p.add_argument("--lr", type=_parse_lr, default=(1e-3, {}),
                   help="Adam learning rate (at most 1): LR, or per resolution RES:LR,... with an optional base LR first "
                        "(the official G_lrate_dict, e.g. 0.001,1024:0.0015; default 0.001)")
    p.add_argument("--gp-metric", choices=("full", "current"), default="full",
                   help="the gradient penalty's pixel grid below the final resolution: full (default; the official "
                        "code's, whose D sees images upscaled to full size: |grad| / 2^lod) or current (the images as "
                        "they are)")
    p.add_argument("--ema-kimg", type=_args.positive_float, default=None,
                   help="G_ema half-life in thousands of images (default 11.08: the official beta 0.999 per step "
                        "at batch 16)")
    p.add_argument("--ema-rampup", type=_args.nonneg_float, default=0.05,
                   help="the half-life is at most this fraction of the images seen so far, so that early G_ema "
                        "follows G (default 0.05, as NVIDIA's later code; 0: a constant half-life)")
    p.add_argument("--ema-beta", type=_args.ema_beta, default=None,
                   help="a constant per-step EMA beta instead of --ema-kimg and --ema-rampup: 0.999 is the official PGGAN's at any "
                        "batch (the default half-life equals it at a global batch of 16)")
    p.add_argument("--realism-images", type=_args.nonneg_int, default=256,
                   help="per tick, the realism and diversity ratios of this many G_ema samples against as many "
                        "real images (nearest-neighbour pixel distances; 0: off)")
    p.add_argument("--metrics", type=_metrics, default=None, metavar="fid,prdc",
                   help="measure G_ema during training: FID and/or precision, recall, density, coverage against the "
                        "archive's real images (their features computed once per run); logged in log.jsonl, plotted "
                        "in loss.png, and the best checkpoint is kept and named in checkpoints/best.json")
    p.add_argument("--metrics-every", type=_args.positive_int, default=None, metavar="TICKS",
                   help="with --metrics: ticks between measurements (default 5; and at the end)")
    p.add_argument("--metrics-images", type=_args.at_least_6, default=None,
                   help="with --metrics: generated and real images per measurement (default 1000; the official FID "
                        "uses 50000)")
    p.add_argument("--features", default=None, metavar="SPACE",
                   help="feature space of --metrics: inception (default), classifier:MODEL or densenet121:FILE "
                        "(with --resume, the --metrics options given replace the run's)")
    p.add_argument("--inception", default=None, help="with --metrics: FID Inception weights (see xrayforge fid --help)")
    p.add_argument("--latent-dim", type=_args.positive_int, default=512, help="length of G's latent z (default 512)")
    p.add_argument("--fmap-base", type=_args.positive_int, default=8192,
                   help="channels at R px: min(2 x FMAP_BASE / R, FMAP_MAX); default 8192 (16 channels at 1024 px)")
    p.add_argument("--fmap-max", type=_args.positive_int, default=512, help="most channels of any layer (default 512)")
    p.add_argument("--mirror", action="store_true", help="random left-right flips (off: radiographs are not symmetric)")
    p.add_argument("--include-test", action="store_true",
                   help="train on the archive's test split too (default: left out, as `evaluate tstr` and the other "
                        "evaluations test on it; an archive without one trains on every image)")
    p.add_argument("--tick-kimg", type=_args.kimg, default=10, help="thousands of images per log tick (default 10)")
    p.add_argument("--checkpoint-ticks", type=_args.positive_int, default=5, help="ticks between checkpoints (default 5)")
    p.add_argument("--keep", type=_args.positive_int, default=3, help="checkpoints to keep (default 3)")
    p.add_argument("--seed", type=_args.seed, default=0,
                   help="seed of the weights, the image order and the latents (default 0)")
    p.add_argument("--device", type=_args.device, default=None, help="cuda, cuda:N or cpu (default: cuda when available)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_train)
