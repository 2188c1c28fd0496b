"""`xrayforge classify` and `xrayforge evaluate` (memorisation, reader-study, tstr, fid-findings,
diversity, report)."""
from __future__ import annotations

import argparse
import math
import sys

from . import _args


CLASSIFIER_TRAINING = ("arch", "input_size", "width", "epochs", "batch", "lr", "seed", "device")


def _add_classifier_training(q: argparse.ArgumentParser) -> None:
    """The options of how a classifier is trained (`classify train`, `evaluate tstr`)."""
    q.add_argument("--arch", choices=("resnet18", "resnet34", "resnet50", "densenet121"), default="resnet18",
                   help="network (torchvision layouts; default resnet18)")
    q.add_argument("--input-size", type=_args.positive_int, default=256,
                   help="image side in pixels the classifier sees (default 256)")
    q.add_argument("--width", type=_args.positive_int, default=64, help="base width (64 = torchvision's)")
    q.add_argument("--epochs", type=_args.positive_int, default=10,
                   help="passes over the training images; the epoch of best mean validation AUROC is kept (default 10)")
    q.add_argument("--batch", type=_args.batch_of_2, default=32, help="images per step, at least 2 (default 32)")
    q.add_argument("--lr", type=_args.learning_rate, default=1e-3,
                   help="peak AdamW learning rate of a one-cycle schedule (default 0.001)")
    q.add_argument("--seed", type=_args.seed, default=0,
                   help="seed of the weights, the image order and the validation split (default 0)")
    q.add_argument("--device", type=_args.device, default=None, help="cuda, cuda:N or cpu (default: cuda when available)")


def _add_features(q: argparse.ArgumentParser) -> None:
    q.add_argument("--features", default="inception", metavar="SPACE",
                   help="feature space: inception (default), classifier:MODEL or densenet121:FILE (see xrayforge fid "
                        "--help)")


def _classifier_training(args: argparse.Namespace) -> dict:
    return {k: getattr(args, k) for k in CLASSIFIER_TRAINING}


def _cmd_classify_train(args: argparse.Namespace) -> int:
    from ..evaluate.classifier import ClassifierTrainConfig, train_classifier

    cfg = ClassifierTrainConfig(archive=args.archive, out=args.out, val_fraction=args.val_fraction,
                                init_weights=args.init_weights, **_classifier_training(args))
    summary = train_classifier(cfg, progress=not args.quiet)
    kept = next(h for h in summary["history"] if h["epoch"] == summary["best_epoch"])  # the model saved
    where = f"{summary['val_images']} images of {summary['val_patients']} patients"
    if math.isnan(summary["best_mean_auroc"]):  # not a bare "nan": why, and what was kept
        print(f"{summary['model']}: no validation AUROC: no finding is both present and absent among the {where} "
              f"held out for validation, so the last epoch ({kept['epoch']}) is kept and every decision threshold is "
              f"the default 0.5 (a larger --val-fraction holds out more)")
    else:
        print(f"{summary['model']}: best mean validation AUROC {summary['best_mean_auroc']:.3f} (epoch {kept['epoch']} "
              f"of {len(summary['history'])}; {where})")
    for finding, value in kept["auroc"].items():
        print(f"  {finding:20s} AUROC {value:.3f}")
    # a finding without an AUROC is said, not left out of the list: its threshold is the default 0.5
    positives = summary.get("val_positives", {})
    for why, which in (("no validation image has it", [f for f, n in positives.items() if n == 0]),
                       ("every validation image has it",
                        [f for f, n in positives.items() if n and n == summary["val_images"]])):
        which = [f for f in which if f not in kept["auroc"]]
        if which:
            print(f"  AUROC undefined ({why}; decision threshold 0.5): {', '.join(which)}")
    return 0


def _cmd_memorisation(args: argparse.Namespace) -> int:
    from ..evaluate.memorisation import audit, chance_sentence, check_inputs
    from ..fid.compute import FeatureExtractor

    check_inputs(args.synthetic, args.real, args.out, args.real_limit)  # before the weights are looked for
    ex = FeatureExtractor(args.inception, args.random_weights, "exact", args.device, args.batch, args.workers,
                          progress=not args.quiet, features=args.features)
    summary = audit(args.synthetic, args.real, args.out, ex, args.percentile, args.real_limit,
                    progress=not args.quiet)
    for item in summary["skipped"][:20]:  # not audited: said, as `xrayforge fid` says it
        print(f"skipped {item['side']} {item['file']}: {item['reason']}", file=sys.stderr)
    if len(summary["skipped"]) > 20:
        print(f"... and {len(summary['skipped']) - 20} more skipped", file=sys.stderr)
    nearest = ("their nearest real image of another patient" if summary["threshold_excludes"] == "same patient"
               else "their nearest other real image")  # as the report says it
    print(f"{args.out}: {summary['flagged']} of {summary['synthetic']} synthetic images flagged "
          f"(closer to a real image than {summary['percentile']}% of real images are to {nearest}); "
          f"median nearest-real distance {summary['median_synthetic_to_real_inception']:.3f} vs real-to-real "
          f"{summary['median_real_to_real_inception']:.3f} (features {summary['features']}: {summary['inception']})")
    if chance_sentence(summary):
        print(chance_sentence(summary))
    return 0


def _cmd_reader_make(args: argparse.Namespace) -> int:
    from ..evaluate.reader_study import make

    info = make(args.real, args.synthetic, args.n, args.out, args.key, args.size, args.seed)
    print(f"pack {info['pack']} ({info['images']} images; open index.html in a browser); "
          f"answer key {info['key']} — keep it away from the readers")
    return 0


def _cmd_reader_score(args: argparse.Namespace) -> int:
    import json

    from ..evaluate.reader_study import format_markdown, score

    result = score(args.pack, args.key, args.answers, args.permutations, args.seed)
    if args.out:
        from ..utils.files import claim_output, write_json
        out = claim_output(args.out, "evaluate reader-study score")
        write_json(out / "summary.json", {"evaluation": "reader-study", "pack": args.pack, "result": result})
    from ..utils.files import json_safe
    print(json.dumps(json_safe(result), indent=2) if args.json else format_markdown(result))
    return 0


def _extractor(args: argparse.Namespace):
    from ..fid.compute import FeatureExtractor
    return FeatureExtractor(args.inception, args.random_weights, args.mode, args.device, args.batch, 0,
                            progress=not args.quiet, features=args.features)


def _cmd_tstr(args: argparse.Namespace) -> int:
    from ..evaluate.tstr import TSTRConfig, format_markdown, run_tstr

    cfg = TSTRConfig(args.synthetic, args.real, args.out, budget=args.budget, test_fraction=args.test_fraction,
                     val_fraction=args.val_fraction, bootstrap=args.bootstrap, **_classifier_training(args))
    summary = run_tstr(cfg, progress=not args.quiet)
    print(format_markdown(summary))
    print(f"written to {args.out}: tstr.csv, tstr.md, tstr.png, summary.json, models/")
    return 0


def _counts(text: str) -> list[int]:
    try:
        return [_args.positive_int(c) for c in text.split(",")]
    except argparse.ArgumentTypeError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a comma list of image counts ({exc})") from None


def _cmd_fid_findings(args: argparse.Namespace) -> int:
    from ..evaluate.fid_findings import fid_by_finding, format_markdown
    from ..evaluate.labelled import check_inputs

    check_inputs(args.synthetic, args.real)  # before the feature extractor's weights are loaded
    counts = args.counts
    summary = fid_by_finding(args.synthetic, args.real, args.out, _extractor(args), counts, args.seed,
                             args.real_limit, args.min_images, progress=not args.quiet, prdc=args.prdc)
    print(format_markdown(summary))
    print(f"written to {args.out}: fid_findings.csv, fid_vs_n.csv, fid_findings.md, fid_findings.png, summary.json")
    return 0


def _cmd_diversity(args: argparse.Namespace) -> int:
    from ..evaluate.diversity import diversity, format_markdown

    summary = diversity(args.run, args.classifier, args.real, args.out, args.n, args.seed, args.batch,
                        args.truncation, args.real_limit, args.per_grid, args.ratio, args.device,
                        progress=not args.quiet, include_training=args.include_training_images)
    print(format_markdown(summary))
    print(f"written to {args.out}: findings.csv, pairs.csv, cooccurrence.png, grids/, diversity.md, summary.json")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from ..evaluate.report import write_report

    info = write_report(args.out, args.run, args.evaluations or (), title=args.title)
    found = ", ".join(info["evaluations"]) or "none"
    print(f"{info['html']} (and {info['markdown']}); evaluations included: {found}")
    return 0


def _print_help(parser: argparse.ArgumentParser):
    """The handler of a command given without its action: its own help, exit status 2."""
    return lambda args: (parser.print_help(), 2)[1]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("classify", help="chest radiograph classifier",
                       description="Train the multi-label chest radiograph classifier used by LCO and the evaluations.")
    csub = p.add_subparsers(dest="classify_command", metavar="ACTION")
    q = csub.add_parser("train", help="train on a labelled archive",
                        description="Train a multi-label classifier (ResNet or DenseNet-121, torchvision state-dict "
                                    "keys) on a labelled archive (ChestX-ray14 or the phantom), with a patient-level "
                                    "validation split and per-finding AUROC. Images of the archive's 'test' split "
                                    "are never used.")
    q.add_argument("archive", help="a labelled archive (from `xrayforge prepare`)")
    q.add_argument("--out", required=True, help="model folder")
    _add_classifier_training(q)
    q.add_argument("--val-fraction", type=_args.fraction, default=0.1,
                   help="fraction of patients held out for validation (default 0.1)")
    q.add_argument("--init-weights", default=None,
                   help="weights to start from (default: none, trained from scratch): torchvision's (ImageNet ResNet / DenseNet-121, current or older "
                        "keys) or a CheXNet-style DenseNet-121 checkpoint; every weight of the body must fit "
                        "(a 3-channel first convolution is summed to grey; a head of another size starts anew)")
    q.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    q.set_defaults(func=_cmd_classify_train)
    p.set_defaults(func=_print_help(p))

    p = sub.add_parser("evaluate", help="evaluations of a generator: TSTR, FID per finding, diversity, memorisation, "
                                        "reader study, report",
                       description="Evaluations of synthetic archives against real ones.")
    esub = p.add_subparsers(dest="evaluate_command", metavar="EVALUATION")
    q = esub.add_parser(
        "memorisation", help="does the generator copy its training images?",
        description="For every synthetic image, its nearest real training image in a feature space (Inception, or "
                    "--features) and in "
                    "32×32 pixel space, against real-to-real nearest-neighbour distances; flags pairs closer than "
                    "the --percentile of those; writes memorisation.csv, summary.json, distances.png and "
                    "closest_pairs.png. Half of the real images, put through the same rule against the other half "
                    "alongside the synthetic ones, are the control group: the summary tests the synthetic flag "
                    "rate against theirs (one-sided Fisher test, each half the reference once; in an archive whose "
                    "patients have several images, the control counts shrunk by their design effect: approximate, "
                    "see the module docs for its measured error rates). Distances "
                    "are computed in chunks, never as a whole matrix.")
    q.add_argument("--synthetic", required=True, help="folder of synthetic images (e.g. from `xrayforge sample`)")
    q.add_argument("--real", required=True, help="the training archive (or a folder of real images); every image "
                                                  "is a reference, the test split's too")
    q.add_argument("--out", required=True, help="output folder (created)")
    q.add_argument("--percentile", type=_args.percentile, default=1.0, help="flag threshold percentile (default 1)")
    q.add_argument("--real-limit", type=_args.positive_int, default=None, help="use this many real images, evenly spread")
    q.add_argument("--inception", default=None, help="FID Inception weights (see xrayforge fid --help)")
    q.add_argument("--random-weights", action="store_true", help="random Inception weights (pipeline check)")
    _add_features(q)
    q.add_argument("--batch", type=_args.positive_int, default=64, help="images per network batch (default 64)")
    q.add_argument("--workers", type=_args.nonneg_int, default=4, help="decode processes (default 4)")
    q.add_argument("--device", type=_args.device, default=None, help="cuda, cuda:N or cpu (default: cuda when available)")
    q.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    q.set_defaults(func=_cmd_memorisation)
    rs = esub.add_parser("reader-study", help="blinded real-vs-synthetic reader study",
                         description="Make a blinded pack for radiologists, then score their exported answers.")
    rsub = rs.add_subparsers(dest="reader_command", metavar="ACTION")
    q = rsub.add_parser("make", help="write a blinded pack and its answer key",
                        description="A balanced random mix of real and synthetic images, re-encoded as 8-bit PNG at "
                                    "one size with random names, and a self-contained index.html for the readers "
                                    "(window/level, zoom, real/synthetic, confidence 1-5, progress kept across "
                                    "reloads, CSV export). Non-square images are padded to square with black, "
                                    "never stretched. The key goes beside the pack, never inside.")
    q.add_argument("--real", required=True, help="archive or folder of real images")
    q.add_argument("--synthetic", required=True, help="folder (e.g. from `xrayforge sample`) or archive")
    q.add_argument("--n", type=_args.even_int, default=100,
                   help="images in the pack, half real and half synthetic: an even number (default 100)")
    q.add_argument("--out", required=True, help="pack folder")
    q.add_argument("--key", default=None, help="answer key CSV (default: <out>.key.csv)")
    q.add_argument("--size", type=_args.positive_int, default=1024, help="image size in the pack (default 1024)")
    q.add_argument("--seed", type=_args.seed, default=0,
                   help="which images are chosen (default 0); their order and names also depend on the images")
    q.set_defaults(func=_cmd_reader_make)
    q = rsub.add_parser("score", help="score the readers' answers",
                        description="Per-reader and pooled accuracy, sensitivity and specificity for 'synthetic', "
                                    "binomial and label-permutation tests against chance (pooled over readers, read "
                                    "the permutation p: the binomial counts answers about one image as independent "
                                    "and is too small), Fleiss' kappa, synthetic images called real.")
    q.add_argument("pack", help="the pack folder readers were given")
    q.add_argument("key", help="its answer key CSV (written by `make`, beside the pack)")
    q.add_argument("answers", nargs="+", help="CSV files exported from the pack's page")
    q.add_argument("--permutations", type=_args.positive_int, default=10000,
                   help="permutations of the key for the permutation test (default 10000: the smallest p is 1/10001; one near 1e-3 is known to about ±30%%)")
    q.add_argument("--seed", type=_args.seed, default=0,
                   help="the permutations' seed (default 0): the same answers and seed give the same p-values")
    q.add_argument("--json", action="store_true", help="print the result as JSON")
    q.add_argument("--out", default=None, help="also write the result to OUT/summary.json (for `evaluate report`)")
    q.set_defaults(func=_cmd_reader_score)
    rs.set_defaults(func=_print_help(rs))

    q = esub.add_parser(
        "tstr", help="train on synthetic, test on real",
        description="Train the classifier on N synthetic images, on N real training images and on N/2 of each, and "
                    "test all three on the same held-out real images (the real archive's 'test' split, else a "
                    "patient-level split): per-finding AUROC with patient-level bootstrap 95% intervals. Writes "
                    "tstr.csv, tstr.md, tstr.png, summary.json and the models; a stopped run continues.")
    q.add_argument("--synthetic", required=True,
                   help="labelled synthetic images: a `xrayforge sample` folder sampled with --classifier (labels: "
                        "the LCO target, else the classifier's call) or a prepared archive")
    q.add_argument("--real", required=True, help="a labelled real archive (from `xrayforge prepare`)")
    q.add_argument("--out", required=True, help="output folder (created)")
    q.add_argument("--budget", type=_args.positive_int, default=None,
                   help="images per training set (default: the smaller of the synthetic set and the real training set)")
    _add_classifier_training(q)
    q.add_argument("--val-fraction", type=_args.fraction, default=0.1,
                   help="fraction of each training set's patients held out for validation (default 0.1)")
    q.add_argument("--test-fraction", type=_args.fraction, default=0.2,
                   help="fraction of real patients held out when the archive has no 'test' split (default 0.2)")
    q.add_argument("--bootstrap", type=_args.positive_int, default=1000, help="bootstrap resamples for the intervals (default 1000)")
    q.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    q.set_defaults(func=_cmd_tstr)

    q = esub.add_parser(
        "fid-findings", help="FID per finding, and FID against sample count",
        description="FID of the synthetic images with each finding (LCO target or classifier call) against the real "
                    "images with it, and FID of growing random subsets of the synthetic images against all real ones "
                    "(its bias at small n, and its extrapolation to infinitely many images). Writes "
                    "fid_findings.csv, fid_vs_n.csv, fid_findings.md, fid_findings.png and summary.json.")
    q.add_argument("--synthetic", required=True, help="a `xrayforge sample` folder sampled with --classifier, or an archive")
    q.add_argument("--real", required=True, help="a labelled real archive")
    q.add_argument("--out", required=True, help="output folder (created)")
    q.add_argument("--counts", type=_counts, default=None, help="comma list of synthetic image counts for the curve "
                                                  "(default 50,100,200,500,1000,... up to all); the extrapolation to "
                                                  "infinitely many images is fitted to those of at least twice the "
                                                  "feature dimension (4096 for Inception), and needs 3 of them")
    q.add_argument("--min-images", type=_args.positive_int, default=10,
                   help="no FID for a finding with fewer images than this on either side (default 10)")
    q.add_argument("--real-limit", type=_args.positive_int, default=None, help="use this many real images, chosen at random")
    q.add_argument("--mode", choices=("exact", "fast"), default="exact",
                   help="Inception only: exact (fp32, pytorch-fid's number; default) or fast (bf16; see xrayforge "
                        "fid --help)")
    q.add_argument("--inception", default=None, help="FID Inception weights (see xrayforge fid --help)")
    q.add_argument("--random-weights", action="store_true", help="random Inception weights (pipeline check)")
    _add_features(q)
    q.add_argument("--prdc", action="store_true",
                   help="also precision / recall (k=3) and density / coverage (k=5), for all images and per finding")
    q.add_argument("--batch", type=_args.positive_int, default=64, help="images per network batch (default 64)")
    q.add_argument("--seed", type=_args.seed, default=0,
                   help="seed of the subsets of the curve, of --real-limit's choice and of the real halves (default 0)")
    q.add_argument("--device", type=_args.device, default=None, help="cuda, cuda:N or cpu (default: cuda when available)")
    q.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    q.set_defaults(func=_cmd_fid_findings)

    q = esub.add_parser(
        "diversity", help="which findings the generator produces, and how often",
        description="Generate N unconditional images (not written), classify them, and compare the predicted "
                    "prevalence of each finding and each pair with the real archive's (the classifier's calls on "
                    "real images, and the real labels); flags under- and over-produced findings; writes per-finding "
                    "sample grids, findings.csv, pairs.csv, cooccurrence.png, diversity.md and summary.json. Where "
                    "--real is the classifier's training archive (its training.json says), the real images are only "
                    "those of patients it did not train on: it is more confident on its training images than on "
                    "unseen ones, such as the synthetic images.")
    q.add_argument("run", help="a training run folder or checkpoint")
    q.add_argument("--classifier", required=True, help="classifier folder (from `xrayforge classify train`)")
    q.add_argument("--real", required=True, help="the labelled real archive (or a `xrayforge sample` folder sampled "
                                                 "with --classifier: its findings the classifier did not call are n/a)")
    q.add_argument("--include-training-images", action="store_true",
                   help="compare with every image of --real, those the classifier trained on included (biased; "
                        "default: where --real is its training archive, only the images of patients it did not "
                        "train on)")
    q.add_argument("--n", type=_args.positive_int, default=10000, help="images to generate (default 10000)")
    q.add_argument("--out", required=True, help="output folder (created)")
    q.add_argument("--real-limit", type=_args.positive_int, default=5000, help="real images to classify, evenly spread (default 5000)")
    q.add_argument("--per-grid", type=_args.positive_int, default=16, help="images per finding grid (default 16)")
    q.add_argument("--ratio", type=_args.fraction, default=0.5,
                   help="under-produced: the samples' predicted prevalence below RATIO x the classifier's "
                        "prevalence on the real images, and the two 95%% intervals apart; over-produced: above "
                        "1/RATIO x (default 0.5)")
    q.add_argument("--truncation", type=_args.truncation, default=None,
                   help="redraw latent components beyond ±T (at least 0.01)")
    q.add_argument("--batch", type=_args.positive_int, default=64, help="images per network batch (default 64)")
    q.add_argument("--seed", type=_args.seed, default=0, help="latent seed of the generated images (default 0)")
    q.add_argument("--device", type=_args.device, default=None, help="cuda, cuda:N or cpu (default: cuda when available)")
    q.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    q.set_defaults(func=_cmd_diversity)

    q = esub.add_parser(
        "report", help="one HTML page with the training run and every evaluation",
        description="Training curves and samples of RUN, and every evaluation found in RUN/evaluations/* or given "
                    "with --evaluations (FID per finding, TSTR, diversity with per-finding grids, memorisation, "
                    "reader study), in one self-contained HTML page (images embedded) and a Markdown copy.")
    q.add_argument("run", help="the training run folder")
    q.add_argument("--out", required=True, help="the HTML file to write")
    q.add_argument("--evaluations", nargs="*", default=None, metavar="DIR",
                   help="more --out folders of `xrayforge evaluate` commands, added to RUN/evaluations/*; one "
                        "per evaluation kind (a later one replaces an earlier one of its kind)")
    q.add_argument("--title", default="xrayforge report", help="the page's title (default 'xrayforge report')")
    q.set_defaults(func=_cmd_report)
    p.set_defaults(func=_print_help(p))
