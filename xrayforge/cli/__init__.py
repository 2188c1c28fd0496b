"""The ``xrayforge`` command line. It parses arguments and calls each room's public API."""
from __future__ import annotations

import argparse
import logging
import sys

from .. import __version__


def _cmd_info(args: argparse.Namespace) -> int:
    import torch

    from .. import ops
    from ..ops import _backend

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


def _cmd_prepare(args: argparse.Namespace) -> int:
    from ..data.prepare import NoUsableImages, prepare

    try:
        res = prepare(args.src, args.out, resolution=args.resolution, labels=args.labels, workers=args.workers,
                      square=args.square, bits=args.bits, progress=not args.quiet)
    except (NoUsableImages, FileNotFoundError, FileExistsError, ValueError) as exc:
        print(f"xrayforge prepare: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"xrayforge prepare: I/O error: {exc}", file=sys.stderr)
        return 1
    print(f"{res.path}: {res.included} images, {res.skipped} skipped "
          f"(reasons in {res.path / 'skipped.csv'})")
    return 0


def _parse_batch(text: str | None) -> dict:
    """'16' (every resolution) or '256:14,512:6' (per resolution)."""
    if not text:
        return {}
    if ":" not in text:
        return {r: int(text) for r in (4 << i for i in range(12))}
    out = {}
    for item in text.split(","):
        res, n = item.split(":")
        out[int(res)] = int(n)
    return out


def _cmd_train(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from ..train.trainer import Interrupted, TrainConfig, Trainer, init_distributed

    init_distributed()
    saved = Path(args.out) / "train_config.json"
    if args.resume and saved.is_file():
        cfg = TrainConfig(**json.loads(saved.read_text()))
        if args.max_kimg is not None:
            cfg.max_images = int(args.max_kimg * 1000)
        if args.device:
            cfg.device = args.device
    else:
        if args.archive is None:
            print("xrayforge train: error: ARCHIVE is required for a new run", file=sys.stderr)
            return 2
        cfg = TrainConfig(
            archive=args.archive, out=args.out, resolution=args.resolution, start_resolution=args.start_resolution,
            fade_images=int(args.fade_kimg * 1000), stable_images=int(args.stable_kimg * 1000),
            batch=_parse_batch(args.batch), auto_batch=args.auto_batch, lr=args.lr, amp=args.amp,
            accumulation=args.accumulation, checkpoint_min_res=args.checkpoint_min_res, ema_beta=args.ema_beta,
            latent_dim=args.latent_dim, fmap_base=args.fmap_base, fmap_max=args.fmap_max, mirror=args.mirror,
            tick_images=int(args.tick_kimg * 1000), checkpoint_ticks=args.checkpoint_ticks,
            keep_checkpoints=args.keep, seed=args.seed, device=args.device,
            max_images=int(args.max_kimg * 1000) if args.max_kimg is not None else None)
    try:
        summary = Trainer(cfg, resume=args.resume, progress=not args.quiet).train()
    except Interrupted as exc:
        print(f"xrayforge train: {exc}", file=sys.stderr)
        return 130
    except (FileNotFoundError, FileExistsError, ValueError) as exc:
        print(f"xrayforge train: error: {exc}", file=sys.stderr)
        return 1
    print(f"trained to {summary['images_seen']} images; checkpoint {summary['checkpoint']}")
    return 0


def _cmd_fid(args: argparse.Namespace) -> int:
    import json

    from ..fid.compute import FeatureExtractor, compute_fid
    from ..train.trainer import init_distributed

    rank, _ = init_distributed()
    if args.b is None and not args.save_stats:
        print("xrayforge fid: error: give two inputs, or one with --save-stats", file=sys.stderr)
        return 2
    common = dict(inception=args.inception, random_weights=args.random_weights, mode=args.mode,
                  device=args.device, batch_size=args.batch, workers=args.workers,
                  progress=not args.quiet and rank == 0)
    try:
        if args.b is None:
            stats = FeatureExtractor(**common).compute(args.a, args.n, args.seed).stats
            if rank == 0:
                stats.save(args.save_stats)
                print(f"wrote {args.save_stats} ({stats.n} images)")
            return 0
        result = compute_fid(args.a, args.b, args.n, args.kid, args.bootstrap, args.keep_features, args.seed,
                             args.save_stats, **common)
    except (FileNotFoundError, ValueError) as exc:
        print(f"xrayforge fid: error: {exc}", file=sys.stderr)
        return 1
    if rank != 0:
        return 0
    for item in result["skipped"][:20]:
        print(f"skipped {item['file']}: {item['reason']}", file=sys.stderr)
    if len(result["skipped"]) > 20:
        print(f"... and {len(result['skipped']) - 20} more skipped", file=sys.stderr)
    if args.json:
        print(json.dumps(result))
        return 0
    line = f"FID {result['fid']:.4f}  (n_a={result['n_a']}, n_b={result['n_b']}, {args.mode} mode)"
    if "fid_ci95" in result:
        line += f"  95% CI [{result['fid_ci95'][0]:.4f}, {result['fid_ci95'][1]:.4f}]"
    if "kid" in result:
        line += f"  KID {result['kid']:.6f} ± {result['kid_std']:.6f}"
    print(line)
    if args.random_weights and result["inception"].startswith("random"):
        print("note: random Inception weights — a pipeline check, not comparable with published FIDs")
    return 0


def _cmd_sample(args: argparse.Namespace) -> int:
    import json

    from ..sample.writer import SampleConfig, sample_archive
    from ..train.trainer import init_distributed

    rank, _ = init_distributed()
    cfg = SampleConfig(run=args.run, out=args.out, n=args.n, seed=args.seed, format=args.format, batch=args.batch,
                       truncation=args.truncation, amp=args.amp, targets=args.lco or [], classifier=args.classifier,
                       steps=args.steps, lr=args.lr, prior_weight=args.prior_weight, shard_size=args.shard_size,
                       device=args.device)
    try:
        summary = sample_archive(cfg, progress=not args.quiet)
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        print(f"xrayforge sample: error: {exc}", file=sys.stderr)
        return 1
    if rank != 0:
        return 0
    print(f"{summary['out']}: {summary['images']} images ({summary['format']}); manifest.csv, summary.json")
    for key, t in summary["targets"].items():
        rate = t["acceptance_rate"]
        print(f"  {key}: {t['accepted']} accepted, {t['rejected']} rejected"
              f" (acceptance {rate:.1%}, mean {t['mean_steps'] or 0:.1f} steps, "
              f"mean target probability {t['mean_target_probability'] or 0:.3f})" if rate is not None else
              f"  {key}: nothing new sampled in this run")
    if summary["images_per_second"]:
        print(f"  {summary['images_per_second']:.1f} images/s")
    if args.json:
        print(json.dumps(summary))
    return 0


CLASSIFIER_TRAINING = ("arch", "input_size", "width", "epochs", "batch", "lr", "seed", "device")


def _add_classifier_training(q: argparse.ArgumentParser) -> None:
    """The options of how a classifier is trained (`classify train`, `evaluate tstr`)."""
    q.add_argument("--arch", choices=("resnet18", "resnet34", "resnet50", "densenet121"), default="resnet18")
    q.add_argument("--input-size", type=int, default=256)
    q.add_argument("--width", type=int, default=64, help="base width (64 = torchvision's)")
    q.add_argument("--epochs", type=int, default=10)
    q.add_argument("--batch", type=int, default=32)
    q.add_argument("--lr", type=float, default=1e-3)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--device", default=None)


def _classifier_training(args: argparse.Namespace) -> dict:
    return {k: getattr(args, k) for k in CLASSIFIER_TRAINING}


def _cmd_classify_train(args: argparse.Namespace) -> int:
    from ..evaluate.classifier import ClassifierTrainConfig, train_classifier

    cfg = ClassifierTrainConfig(archive=args.archive, out=args.out, val_fraction=args.val_fraction,
                                init_weights=args.init_weights, **_classifier_training(args))
    try:
        summary = train_classifier(cfg, progress=not args.quiet)
    except (FileNotFoundError, ValueError) as exc:
        print(f"xrayforge classify train: error: {exc}", file=sys.stderr)
        return 1
    last = summary["history"][-1]
    print(f"{summary['model']}: best mean validation AUROC {summary['best_mean_auroc']:.3f} "
          f"({summary['val_images']} images of {summary['val_patients']} patients)")
    for finding, value in last["auroc"].items():
        print(f"  {finding:20s} AUROC {value:.3f}")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from ..bench.suite import SUITES, print_tables, run_suite, save_json

    suites = args.suites.split(",") if args.suites else list(SUITES)
    unknown = set(suites) - set(SUITES)
    if unknown:
        print(f"xrayforge bench: error: unknown benchmark(s) {sorted(unknown)}; choose from {', '.join(SUITES)}",
              file=sys.stderr)
        return 2
    results = run_suite(suites, args.device, args.quick, progress=not args.quiet)
    print_tables(results)
    if args.json:
        save_json(results, args.json)
        print(f"\nwrote {args.json}")
    return 0


def _cmd_memorisation(args: argparse.Namespace) -> int:
    from ..evaluate.memorisation import audit
    from ..fid.compute import FeatureExtractor

    try:
        ex = FeatureExtractor(args.inception, args.random_weights, "exact", args.device, args.batch, args.workers,
                              progress=not args.quiet)
        summary = audit(args.synthetic, args.real, args.out, ex, args.percentile, args.real_limit,
                        progress=not args.quiet)
    except (FileNotFoundError, ValueError) as exc:
        print(f"xrayforge evaluate memorisation: error: {exc}", file=sys.stderr)
        return 1
    print(f"{args.out}: {summary['flagged']} of {summary['synthetic']} synthetic images flagged "
          f"(closer to a real image than {summary['percentile']}% of real images are to each other); "
          f"median nearest-real distance {summary['median_synthetic_to_real_inception']:.3f} vs real-to-real "
          f"{summary['median_real_to_real_inception']:.3f} (Inception, {summary['inception']})")
    return 0


def _cmd_reader_make(args: argparse.Namespace) -> int:
    from ..evaluate.reader_study import make

    try:
        info = make(args.real, args.synthetic, args.n, args.out, args.key, args.size, args.seed)
    except (FileNotFoundError, FileExistsError, ValueError) as exc:
        print(f"xrayforge evaluate reader-study make: error: {exc}", file=sys.stderr)
        return 1
    print(f"pack {info['pack']} ({info['images']} images; open index.html in a browser); "
          f"answer key {info['key']} — keep it away from the readers")
    return 0


def _cmd_reader_score(args: argparse.Namespace) -> int:
    import json

    from ..evaluate.reader_study import format_markdown, score

    try:
        result = score(args.pack, args.key, args.answers)
    except (FileNotFoundError, ValueError) as exc:
        print(f"xrayforge evaluate reader-study score: error: {exc}", file=sys.stderr)
        return 1
    if args.out:
        from pathlib import Path

        from ..data.archive import write_json
        Path(args.out).mkdir(parents=True, exist_ok=True)
        write_json(Path(args.out) / "summary.json", {"evaluation": "reader-study", "pack": args.pack, "result": result})
    print(json.dumps(result, indent=2) if args.json else format_markdown(result))
    return 0


def _extractor(args: argparse.Namespace):
    from ..fid.compute import FeatureExtractor
    return FeatureExtractor(args.inception, args.random_weights, args.mode, args.device, args.batch, 0,
                            progress=not args.quiet)


def _cmd_tstr(args: argparse.Namespace) -> int:
    from ..evaluate.tstr import TSTRConfig, format_markdown, run_tstr

    cfg = TSTRConfig(args.synthetic, args.real, args.out, budget=args.budget, test_fraction=args.test_fraction,
                     bootstrap=args.bootstrap, **_classifier_training(args))
    try:
        summary = run_tstr(cfg, progress=not args.quiet)
    except (FileNotFoundError, FileExistsError, ValueError) as exc:
        print(f"xrayforge evaluate tstr: error: {exc}", file=sys.stderr)
        return 1
    print(format_markdown(summary))
    print(f"written to {args.out}: tstr.csv, tstr.md, tstr.png, summary.json, models/")
    return 0


def _cmd_fid_findings(args: argparse.Namespace) -> int:
    from ..evaluate.fid_findings import fid_by_finding, format_markdown

    counts = [int(c) for c in args.counts.split(",")] if args.counts else None
    try:
        summary = fid_by_finding(args.synthetic, args.real, args.out, _extractor(args), counts, args.seed,
                                 args.real_limit, args.min_images, progress=not args.quiet)
    except (FileNotFoundError, FileExistsError, ValueError) as exc:
        print(f"xrayforge evaluate fid-findings: error: {exc}", file=sys.stderr)
        return 1
    print(format_markdown(summary))
    print(f"written to {args.out}: fid_findings.csv, fid_vs_n.csv, fid_findings.md, fid_findings.png, summary.json")
    return 0


def _cmd_diversity(args: argparse.Namespace) -> int:
    from ..evaluate.diversity import diversity, format_markdown

    try:
        summary = diversity(args.run, args.classifier, args.real, args.out, args.n, args.seed, args.batch,
                            args.truncation, args.real_limit, args.per_grid, args.ratio, args.device,
                            progress=not args.quiet)
    except (FileNotFoundError, FileExistsError, ValueError) as exc:
        print(f"xrayforge evaluate diversity: error: {exc}", file=sys.stderr)
        return 1
    print(format_markdown(summary))
    print(f"written to {args.out}: findings.csv, pairs.csv, cooccurrence.png, grids/, diversity.md, summary.json")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from ..evaluate.report import write_report

    try:
        info = write_report(args.out, args.run, args.evaluations or (), title=args.title)
    except (FileNotFoundError, ValueError) as exc:
        print(f"xrayforge evaluate report: error: {exc}", file=sys.stderr)
        return 1
    found = ", ".join(info["evaluations"]) or "none"
    print(f"{info['html']} (and {info['markdown']}); evaluations included: {found}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from ..demo import run_demo

    try:
        run_demo(args.out, args.device, args.minutes, args.inception, progress=not args.quiet)
    except KeyboardInterrupt:
        print(f"\ninterrupted: run the same command again to continue ({args.out})", file=sys.stderr)
        return 130
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

    p = sub.add_parser(
        "prepare", help="turn radiographs (DICOM, PNG, JPEG) or the phantom into a packed archive",
        description="Read every radiograph under SRC (recursively; DICOM with or without a suffix, PNG, JPEG) or "
                    "generate phantom:N chest phantoms, make them square, resize, and write the packed "
                    "multi-resolution archive OUT (images_<R>.npy for R = 4 .. resolution, manifest.csv, "
                    "skipped.csv, archive.json). Interrupted runs resume when run again.")
    p.add_argument("src", help="folder, file, or phantom:N")
    p.add_argument("out", help="archive folder to create")
    p.add_argument("--resolution", type=int, default=1024, help="largest resolution, a power of two (default 1024)")
    p.add_argument("--labels", default=None, help="ChestX-ray14 Data_Entry_2017.csv (default: found in SRC or its parent)")
    p.add_argument("--square", choices=("crop", "pad"), default="crop",
                   help="centre-crop to a square (default) or pad with black to keep the whole field")
    p.add_argument("--bits", type=int, choices=(8, 16), default=8, help="stored bit depth (default 8)")
    p.add_argument("--workers", type=int, default=None, help="decode processes (default: all cores)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_prepare)

    p = sub.add_parser(
        "train", help="train a progressive GAN on an archive",
        description="Progressive WGAN-GP training (PGGAN) on a prepared archive. Writes RUN/log.jsonl, "
                    "RUN/grids/*.png, RUN/loss.png and atomic checkpoints in RUN/checkpoints; Ctrl-C checkpoints "
                    "and stops; --resume continues exactly. Several GPUs: torchrun --nproc-per-node N -m "
                    "xrayforge train ...")
    p.add_argument("archive", nargs="?", help="archive made by `xrayforge prepare` (not needed with --resume)")
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    p.add_argument("--resolution", type=int, default=None, help="final resolution (default: the archive's)")
    p.add_argument("--start-resolution", type=int, default=4)
    p.add_argument("--fade-kimg", type=float, default=600, help="thousands of images per fade-in (default 600)")
    p.add_argument("--stable-kimg", type=float, default=600, help="thousands of images per stable phase (default 600)")
    p.add_argument("--max-kimg", type=float, default=None, help="stop after this many thousand images")
    p.add_argument("--batch", default=None, help="per-GPU batch: N, or RES:N,... (default 16 up to 128 px, 14, 6, 3)")
    p.add_argument("--auto-batch", action="store_true", help="use the largest batch that fits GPU memory")
    p.add_argument("--accumulation", type=int, default=1, help="micro-batches per optimiser step")
    p.add_argument("--amp", choices=("bf16",), default=None, help="bfloat16 mixed precision")
    p.add_argument("--checkpoint-min-res", type=int, default=None, help="activation checkpointing at and above this size")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--ema-beta", type=float, default=0.999)
    p.add_argument("--latent-dim", type=int, default=512)
    p.add_argument("--fmap-base", type=int, default=8192)
    p.add_argument("--fmap-max", type=int, default=512)
    p.add_argument("--mirror", action="store_true", help="random left-right flips (off: radiographs are not symmetric)")
    p.add_argument("--tick-kimg", type=float, default=10, help="thousands of images per log tick (default 10)")
    p.add_argument("--checkpoint-ticks", type=int, default=5, help="ticks between checkpoints (default 5)")
    p.add_argument("--keep", type=int, default=3, help="checkpoints to keep (default 3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cuda, cuda:1 or cpu (default: cuda when available)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser(
        "fid", help="Fréchet Inception Distance between two image sets",
        description="FID compatible with pytorch-fid. A and B are each a folder of images (PNG, JPEG, DICOM; "
                    "recursive), a prepared archive, a .npz statistics file (mu, sigma), or a generator "
                    "checkpoint / run folder with --n (images generated on the fly, never written). Weights "
                    "pt_inception-2015-12-05-6726825d.pth come from --inception, XRAYFORGE_INCEPTION or the torch "
                    "hub checkpoint cache; they are never downloaded, and two .npz files need none. Several GPUs: "
                    "torchrun ... -m xrayforge fid.")
    p.add_argument("a")
    p.add_argument("b", nargs="?")
    p.add_argument("--n", type=int, default=None, help="images to generate from a checkpoint input")
    p.add_argument("--inception", default=None, help="path of pt_inception-2015-12-05-6726825d.pth")
    p.add_argument("--random-weights", action="store_true",
                   help="random Inception weights: checks the pipeline; the number is not a comparable FID")
    p.add_argument("--mode", choices=("exact", "fast"), default="exact",
                   help="exact: fp32 as pytorch-fid (default); fast: bf16 + channels_last")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--workers", type=int, default=4, help="decode processes (default 4)")
    p.add_argument("--device", default=None)
    p.add_argument("--seed", type=int, default=0, help="latent seed for checkpoint inputs")
    p.add_argument("--kid", type=int, default=0, metavar="SUBSETS", help="also compute KID over this many subsets")
    p.add_argument("--bootstrap", type=int, default=0, metavar="ROUNDS",
                   help="also give a 95%% bootstrap interval for the FID")
    p.add_argument("--keep-features", type=int, default=10000,
                   help="features kept per side for --kid / --bootstrap (a uniform sample; default 10000)")
    p.add_argument("--save-stats", default=None, help="write A's statistics to this .npz")
    p.add_argument("--json", action="store_true", help="print one JSON object (fid, n_a, n_b, mode, ...)")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=_cmd_fid)

    p = sub.add_parser(
        "sample", help="sample a labelled synthetic archive (optionally steered by LCO)",
        description="Generate images from the EMA generator of RUN (a run folder or checkpoint) into DIR as PNG "
                    "(8/16-bit) or DICOM Secondary Capture, with manifest.csv (file, seed, index, target, "
                    "classifier probabilities, latents). With --lco and --classifier, latent class optimisation "
                    "steers each image to the wanted findings, e.g. --lco 'Cardiomegaly=1,Effusion=1,Nodule=0' "
                    "(repeat --lco for several targets; --n images each). Written in shards: an interrupted run "
                    "resumes when run again with the same arguments.")
    p.add_argument("run")
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=int, required=True, help="images (per LCO target)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--format", choices=("png8", "png16", "dicom"), default="png8")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--truncation", type=float, default=None, help="redraw latent components beyond ±T")
    p.add_argument("--amp", choices=("bf16",), default=None)
    p.add_argument("--lco", action="append", default=None, metavar="TARGET", help="NAME=1|0,... (repeatable)")
    p.add_argument("--classifier", default=None, help="classifier folder (from `xrayforge classify train`)")
    p.add_argument("--steps", type=int, default=100, help="LCO step limit per sample (default 100)")
    p.add_argument("--lr", type=float, default=0.05, help="LCO Adam learning rate on z (default 0.05)")
    p.add_argument("--prior-weight", type=float, default=1.0)
    p.add_argument("--shard-size", type=int, default=1000)
    p.add_argument("--device", default=None)
    p.add_argument("--json", action="store_true")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=_cmd_sample)

    p = sub.add_parser("classify", help="chest radiograph classifier",
                       description="Train the multi-label chest radiograph classifier used by LCO and the evaluations.")
    csub = p.add_subparsers(dest="classify_command", metavar="ACTION")
    q = csub.add_parser("train", help="train on a labelled archive",
                        description="Train a multi-label classifier (ResNet or DenseNet-121, torchvision state-dict "
                                    "keys) on a labelled archive (ChestX-ray14 or the phantom), with a patient-level "
                                    "validation split and per-finding AUROC. Images of the archive's 'test' split "
                                    "are never used.")
    q.add_argument("archive")
    q.add_argument("--out", required=True, help="model folder")
    _add_classifier_training(q)
    q.add_argument("--val-fraction", type=float, default=0.1)
    q.add_argument("--init-weights", default=None, help="torchvision-layout weights to start from")
    q.add_argument("-q", "--quiet", action="store_true")
    q.set_defaults(func=_cmd_classify_train)
    p.set_defaults(func=lambda a: (p.print_help(), 2)[1])

    p = sub.add_parser("evaluate", help="evaluations of a generator: TSTR, FID per finding, diversity, memorisation, "
                                        "reader study, report",
                       description="Evaluations of synthetic archives against real ones.")
    esub = p.add_subparsers(dest="evaluate_command", metavar="EVALUATION")
    q = esub.add_parser(
        "memorisation", help="does the generator copy its training images?",
        description="For every synthetic image, its nearest real training image in Inception feature space and in "
                    "32×32 pixel space, against real-to-real nearest-neighbour distances; flags pairs closer than "
                    "the --percentile of those; writes memorisation.csv, summary.json, distances.png and "
                    "closest_pairs.png. Distances are computed in chunks, never as a whole matrix.")
    q.add_argument("--synthetic", required=True, help="folder of synthetic images (e.g. from `xrayforge sample`)")
    q.add_argument("--real", required=True, help="the training archive (or a folder of real images)")
    q.add_argument("--out", required=True)
    q.add_argument("--percentile", type=float, default=1.0, help="flag threshold percentile (default 1)")
    q.add_argument("--real-limit", type=int, default=None, help="use this many real images, evenly spread")
    q.add_argument("--inception", default=None)
    q.add_argument("--random-weights", action="store_true", help="random Inception weights (pipeline check)")
    q.add_argument("--batch", type=int, default=64)
    q.add_argument("--workers", type=int, default=4)
    q.add_argument("--device", default=None)
    q.add_argument("-q", "--quiet", action="store_true")
    q.set_defaults(func=_cmd_memorisation)
    rs = esub.add_parser("reader-study", help="blinded real-vs-synthetic reader study",
                         description="Make a blinded pack for radiologists, then score their exported answers.")
    rsub = rs.add_subparsers(dest="reader_command", metavar="ACTION")
    q = rsub.add_parser("make", help="write a blinded pack and its answer key",
                        description="A balanced random mix of real and synthetic images, re-encoded as 8-bit PNG at "
                                    "one size with random names, and a self-contained index.html for the readers "
                                    "(window/level, zoom, real/synthetic, confidence 1-5, progress kept across "
                                    "reloads, CSV export). The key goes beside the pack, never inside.")
    q.add_argument("--real", required=True, help="archive or folder of real images")
    q.add_argument("--synthetic", required=True, help="folder (e.g. from `xrayforge sample`) or archive")
    q.add_argument("--n", type=int, default=100, help="images in the pack, half of each (default 100)")
    q.add_argument("--out", required=True, help="pack folder")
    q.add_argument("--key", default=None, help="answer key CSV (default: <out>.key.csv)")
    q.add_argument("--size", type=int, default=1024, help="image size in the pack (default 1024)")
    q.add_argument("--seed", type=int, default=0)
    q.set_defaults(func=_cmd_reader_make)
    q = rsub.add_parser("score", help="score the readers' answers",
                        description="Per-reader and pooled accuracy, sensitivity and specificity for 'synthetic', "
                                    "binomial test against chance, Fleiss' kappa, synthetic images called real.")
    q.add_argument("pack")
    q.add_argument("key")
    q.add_argument("answers", nargs="+", help="CSV files exported from the pack's page")
    q.add_argument("--json", action="store_true")
    q.add_argument("--out", default=None, help="also write the result to OUT/summary.json (for `evaluate report`)")
    q.set_defaults(func=_cmd_reader_score)
    rs.set_defaults(func=lambda a: (rs.print_help(), 2)[1])

    q = esub.add_parser(
        "tstr", help="train on synthetic, test on real",
        description="Train the classifier on N synthetic images, on N real training images and on N/2 of each, and "
                    "test all three on the same held-out real images (the real archive's 'test' split, else a "
                    "patient-level split): per-finding AUROC with patient-level bootstrap 95%% intervals. Writes "
                    "tstr.csv, tstr.md, tstr.png, summary.json and the models; a stopped run continues.")
    q.add_argument("--synthetic", required=True,
                   help="labelled synthetic images: a `xrayforge sample` folder sampled with --classifier (labels: "
                        "the LCO target, else the classifier's call) or a prepared archive")
    q.add_argument("--real", required=True, help="a labelled real archive (from `xrayforge prepare`)")
    q.add_argument("--out", required=True)
    q.add_argument("--budget", type=int, default=None,
                   help="images per training set (default: the smaller of the synthetic set and the real training set)")
    _add_classifier_training(q)
    q.add_argument("--test-fraction", type=float, default=0.2,
                   help="fraction of real patients held out when the archive has no 'test' split (default 0.2)")
    q.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the intervals (default 1000)")
    q.add_argument("-q", "--quiet", action="store_true")
    q.set_defaults(func=_cmd_tstr)

    q = esub.add_parser(
        "fid-findings", help="FID per finding, and FID against sample count",
        description="FID of the synthetic images with each finding (LCO target or classifier call) against the real "
                    "images with it, and FID of growing random subsets of the synthetic images against all real ones "
                    "(its bias at small n, and its extrapolation to infinitely many images). Writes "
                    "fid_findings.csv, fid_vs_n.csv, fid_findings.md, fid_findings.png and summary.json.")
    q.add_argument("--synthetic", required=True, help="a `xrayforge sample` folder sampled with --classifier, or an archive")
    q.add_argument("--real", required=True, help="a labelled real archive")
    q.add_argument("--out", required=True)
    q.add_argument("--counts", default=None, help="comma list of synthetic image counts for the curve "
                                                  "(default 50,100,200,500,1000,... up to all)")
    q.add_argument("--min-images", type=int, default=10,
                   help="no FID for a finding with fewer images than this on either side (default 10)")
    q.add_argument("--real-limit", type=int, default=None, help="use this many real images, chosen at random")
    q.add_argument("--mode", choices=("exact", "fast"), default="exact")
    q.add_argument("--inception", default=None)
    q.add_argument("--random-weights", action="store_true", help="random Inception weights (pipeline check)")
    q.add_argument("--batch", type=int, default=64)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--device", default=None)
    q.add_argument("-q", "--quiet", action="store_true")
    q.set_defaults(func=_cmd_fid_findings)

    q = esub.add_parser(
        "diversity", help="which findings the generator produces, and how often",
        description="Generate N unconditional images (not written), classify them, and compare the predicted "
                    "prevalence of each finding and each pair with the real archive's (the classifier's calls on "
                    "real images, and the real labels); flags under- and over-produced findings; writes per-finding "
                    "sample grids, findings.csv, pairs.csv, cooccurrence.png, diversity.md and summary.json.")
    q.add_argument("run", help="a training run folder or checkpoint")
    q.add_argument("--classifier", required=True, help="classifier folder (from `xrayforge classify train`)")
    q.add_argument("--real", required=True, help="the labelled real archive")
    q.add_argument("--n", type=int, default=10000, help="images to generate (default 10000)")
    q.add_argument("--out", required=True)
    q.add_argument("--real-limit", type=int, default=5000, help="real images to classify, evenly spread (default 5000)")
    q.add_argument("--per-grid", type=int, default=16, help="images per finding grid (default 16)")
    q.add_argument("--ratio", type=float, default=0.5,
                   help="under-produced below this fraction of the real prevalence (default 0.5)")
    q.add_argument("--truncation", type=float, default=None)
    q.add_argument("--batch", type=int, default=64)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--device", default=None)
    q.add_argument("-q", "--quiet", action="store_true")
    q.set_defaults(func=_cmd_diversity)

    q = esub.add_parser(
        "report", help="one HTML page with the training run and every evaluation",
        description="Training curves and samples of RUN, and every evaluation found in RUN/evaluations/* or given "
                    "with --evaluations (FID per finding, TSTR, diversity with per-finding grids, memorisation, "
                    "reader study), in one self-contained HTML page (images embedded) and a Markdown copy.")
    q.add_argument("run", help="the training run folder")
    q.add_argument("--out", required=True, help="the HTML file to write")
    q.add_argument("--evaluations", nargs="*", default=None, metavar="DIR",
                   help="--out folders of `xrayforge evaluate` commands (default: RUN/evaluations/*)")
    q.add_argument("--title", default="xrayforge report")
    q.set_defaults(func=_cmd_report)
    p.set_defaults(func=lambda a: (p.print_help(), 2)[1])

    p = sub.add_parser(
        "demo", help="the whole pipeline on the built-in chest phantom (minutes on a CPU)",
        description="Build a phantom archive, train a small PGGAN, train the phantom classifier, sample an "
                    "LCO-labelled archive, compute FID and write a report, sized to --minutes. No data or weights "
                    "needed (without the FID Inception weights the FID is a pipeline check, and says so). "
                    "Ctrl-C, then the same command, continues.")
    p.add_argument("--out", default="xrayforge-demo", help="output folder (default ./xrayforge-demo)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--minutes", type=float, default=5.0, help="time budget (default 5)")
    p.add_argument("--inception", default=None, help="FID Inception weights, if you have them")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser(
        "bench", help="run the benchmark suite and print the README's table",
        description="Fused ops against eager PyTorch, the WGAN-GP training step against the unfused baseline, "
                    "FID against the pytorch-fid-equivalent pipeline, the data pipeline and sampling, at the sizes "
                    "that fit the device (full sizes on a GPU, small ones on a CPU).")
    p.add_argument("--suites", default=None, help="comma list of ops,train_step,fid,data,sampling (default: all)")
    p.add_argument("--quick", action="store_true", help="small sizes even on a GPU")
    p.add_argument("--device", default=None)
    p.add_argument("--json", default=None, metavar="FILE", help="also write every row as JSON")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=_cmd_bench)
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
