"""`xrayforge demo`: the whole pipeline on the built-in chest phantom, sized to a time budget.

Stages (each is skipped when a previous run already finished it, so Ctrl-C followed by the
same command continues): build a phantom archive, train a small PGGAN, train the phantom
classifier, sample unconditional images and an LCO-labelled archive for a few target
combinations, compute FID (real Inception weights when present, else random weights, labelled
as a pipeline check), run the evaluation suite (train on synthetic / test on real, FID per
finding, disease diversity, memorisation audit) into run/evaluations/, and write report.html
(and report.md) with `xrayforge evaluate report`. Everything goes under --out.
"""
from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import torch

DEMO_TARGETS = ["Cardiomegaly=1", "Cardiomegaly=1,Effusion=1", "Cardiomegaly=0,Mass=1"]

# What the demo's small, short CPU runs change from the official PGGAN settings (train.TrainConfig's
# defaults), and why; everything else (WGAN-GP λ 10 in the full-resolution metric, drift, Adam
# betas, pixel norm, minibatch stddev, equalized lr, fade-ins) is the official network and loss.
CPU_RECIPE = {
    "fmap_base / fmap_max / latent_dim": ("256 / 64 / 64 (64→16 channels)", "8192 / 512 / 512",
                                          "a network a 2-core CPU trains at 70–450 img/s"),
    "images per fade-in and per stable phase": ("2,500", "600,000", "minutes, not days"),
    "learning rate": ("0.002", "0.001", "fewer, larger steps for a small network"),
    "EMA": ("half-life ramped up (≤ 15% of the images seen)", "β = 0.999 per step",
            "a constant β would still hold the random initial weights; 15% rather than NVIDIA's 5% "
            "smooths the short phases"),
}


def gan_config(archive, out, resolution: int, phase_images: int, total_images: int | None = None, **overrides):
    """The demo's CPU recipe for a PGGAN on phantoms (CPU_RECIPE); the tests and the LCO benchmark
    use it at other sizes. ``total_images`` lengthens the final stable phase."""
    from .train.trainer import TrainConfig
    levels = int(math.log2(resolution)) - 1
    kwargs = dict(fade_images=phase_images, stable_images=phase_images, total_images=total_images,
                  tick_images=max(phase_images // 2, 16), latent_dim=64, fmap_base=256, fmap_max=64, lr=0.002,
                  batch={4 << i: 16 for i in range(levels)}, ema_rampup=0.15, checkpoint_ticks=4,
                  realism_images=256)
    kwargs.update(overrides)
    return TrainConfig(str(archive), str(out), **kwargs)


def plan(minutes: float, device: torch.device) -> dict:
    """Sizes for the budget: resolution, archive size, network width, samples."""
    gpu = device.type == "cuda"
    if gpu:
        return {"resolution": 256, "images": 20000, "latent": 256, "fmap_base": 4096, "fmap_max": 256,
                "batch": 32, "clf_size": 128, "clf_width": 32, "clf_epochs": 10, "samples": 1000, "lco_n": 64,
                "fid_real": 5000, "labelled_n": 5000, "diversity_n": 5000, "tstr_epochs": 10, "train_share": 0.5}
    # on a CPU the FID Inception (about 6 GFLOP per image at 299 px) dominates the evaluations
    # (FID and the memorisation audit each pass the samples and as many real images through it)
    small = minutes < 3
    fid_n = 16 if minutes < 0.5 else (24 if minutes < 1 else (64 if small else 100))
    return {"resolution": 32 if small else 64, "images": 600 if small else 3000, "latent": 64 if small else 128,
            "fmap_base": 256 if small else 1024, "fmap_max": 32 if small else 64, "batch": 16,
            "clf_size": 32 if small else 64, "clf_width": 16,
            "clf_epochs": 4 if minutes < 1 else 6,
            "samples": fid_n, "lco_n": 4 if small else 16, "fid_real": fid_n,
            "labelled_n": 300 if small else 500, "diversity_n": 200 if small else 500,
            "tstr_epochs": 4 if small else 6, "train_share": 0.35}


def demo_markdown(results: dict) -> str:
    """The demo's own results (data, classifier, LCO, FID), placed before the evaluation report."""
    lines = [f"Data: {results['archive']['images']} chest phantoms at {results['archive']['resolution']} px.", "",
             "## Classifier", f"Best mean validation AUROC {results['classifier']['best_mean_auroc']:.3f}.", ""]
    lines += [f"- {k}: {v:.3f}" for k, v in results["classifier"]["auroc"].items()]
    lines += ["", "## LCO-labelled samples", "| target | accepted | rejected | acceptance | mean steps |", "|---|---|---|---|---|"]
    for key, t in results["lco"].items():
        if "error" in t:
            lines.append(f"| {key} | — | — | {t['error']} | — |")
        else:
            lines.append(f"| {key} | {t['accepted']} | {t['rejected']} | {t['acceptance_rate'] or 0:.1%} | "
                         f"{t['mean_steps'] or 0:.1f} |")
    fid = results["fid"]
    lines += ["", "## FID of the unconditional samples",
              f"FID {fid['fid']:.3f} between {fid['n_a']} real phantoms and {fid['n_b']} samples ({fid['inception']}).", ""]
    return "\n".join(lines)


def run_demo(out: str = "xrayforge-demo", device: str | None = None, minutes: float = 5.0,
             inception: str | None = None, progress: bool = True) -> dict:
    from .data.archive import Archive
    from .data.prepare import prepare
    from .evaluate.classifier import ClassifierTrainConfig, train_classifier
    from .evaluate.diversity import diversity
    from .evaluate.fid_findings import fid_by_finding
    from .evaluate.memorisation import audit
    from .evaluate.report import write_report
    from .evaluate.tstr import TSTRConfig, run_tstr
    from .fid.compute import FeatureExtractor
    from .fid.inception import find_weights
    from .sample.writer import SampleConfig, sample_archive
    from .train.trainer import TrainConfig, Trainer

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    p = plan(minutes, dev)
    budget = minutes * 60
    state_path = out / "demo_state.json"
    results = json.loads(state_path.read_text()) if state_path.exists() else {}

    def save_state():
        state_path.write_text(json.dumps(results, indent=2))

    clock = {"t": time.perf_counter()}
    results.setdefault("seconds", {})

    def say(msg):
        if progress:
            print(f"[demo] {msg}", flush=True)

    def lap(stage):
        now = time.perf_counter()
        results["seconds"][stage] = results["seconds"].get(stage, 0.0) + now - clock["t"]
        clock["t"] = now

    # 1. data
    archive = out / "phantom"
    if not (archive / "archive.json").exists():
        say(f"building {p['images']} chest phantoms at {p['resolution']} px")
        prepare(f"phantom:{p['images']}", archive, resolution=p["resolution"], progress=progress)
    results["archive"] = {"path": str(archive), "images": len(Archive(archive)), "resolution": p["resolution"]}
    lap("data")
    save_state()

    # 2. the GAN, sized so that the schedule fits its share of the budget
    run = out / "run"
    if not results.get("train", {}).get("complete"):
        levels = int(math.log2(p["resolution"])) - 1
        phases = 1 + 2 * (levels - 1)
        rate = 60.0 if dev.type == "cpu" else 600.0          # images/s at the top level, roughly
        per_phase = max(p["batch"] * 4, int(rate * budget * 0.9 * p["train_share"] / phases) // p["batch"] * p["batch"])
        cfg = TrainConfig(str(archive), str(run), fade_images=per_phase, stable_images=per_phase,
                          tick_images=max(per_phase // 2, p["batch"]), latent_dim=p["latent"],
                          fmap_base=p["fmap_base"], fmap_max=p["fmap_max"],
                          batch={4 << i: p["batch"] for i in range(levels)}, device=str(dev),
                          max_seconds=budget * p["train_share"], checkpoint_ticks=2)
        resume = (run / "checkpoints").is_dir() and any((run / "checkpoints").glob("ckpt-*"))
        say(f"training a PGGAN to {p['resolution']} px ({per_phase} images per phase)" +
            (" — resuming" if resume else ""))
        t0 = time.perf_counter()
        summary = Trainer(cfg, resume=resume, progress=progress).train()
        results["train"] = {**summary, "seconds": time.perf_counter() - t0, "complete": True}
        lap("train")
        save_state()

    # 3. the classifier
    clf = out / "classifier"
    if "classifier" not in results:
        say("training the phantom classifier")
        s = train_classifier(ClassifierTrainConfig(str(archive), str(clf), input_size=p["clf_size"],
                                                   width=p["clf_width"], epochs=p["clf_epochs"], lr=3e-3,
                                                   device=str(dev)), progress=progress)
        results["classifier"] = {"path": str(clf), "best_mean_auroc": s["best_mean_auroc"],
                                 "auroc": s["history"][-1]["auroc"]}
        lap("classifier")
        save_state()

    # 4. samples: unconditional (for FID) and LCO-labelled
    samples = out / "samples"
    say(f"sampling {p['samples']} images")
    sample_archive(SampleConfig(str(run), str(samples / "unconditional"), n=p["samples"], classifier=str(clf),
                                device=str(dev)), progress=progress)
    results.setdefault("lco", {})
    for i, target in enumerate(DEMO_TARGETS):
        if target in results["lco"]:
            continue
        say(f"LCO: {p['lco_n']} images with {target}")
        folder = samples / f"lco-{i}"
        try:
            s = sample_archive(SampleConfig(str(run), str(folder), n=p["lco_n"], classifier=str(clf), targets=[target],
                                            steps=60, lr=0.1, max_attempts=60, device=str(dev)), progress=progress)
            results["lco"][target] = {**s["targets"][target], "folder": str(folder)}
        except RuntimeError as exc:  # a combination this small generator cannot reach in the step limit
            shutil.rmtree(folder, ignore_errors=True)
            results["lco"][target] = {"error": str(exc).split(";")[0]}
        save_state()
    lap("sampling")

    # 5. FID: all samples, per finding and against sample count; its "all" row is the demo's FID
    try:
        weights = str(find_weights(inception))
        random_weights = False
    except FileNotFoundError:
        weights, random_weights = None, True
        say("FID Inception weights not found: computing FID with random weights (a pipeline check, "
            "not a comparable FID)")
    evals = run / "evaluations"  # where `xrayforge evaluate report` finds the evaluations
    feature_kwargs = {"inception": weights, "random_weights": random_weights, "device": str(dev), "workers": 0,
                      "batch_size": 32, "progress": progress}
    fid_summary = evals / "fid-findings" / "summary.json"
    if not fid_summary.is_file() or json.loads(fid_summary.read_text())["inception"].startswith("random") \
            != random_weights:
        say("computing FID (all samples, per finding, against sample count)")
        fid_by_finding(str(samples / "unconditional"), str(archive), evals / "fid-findings",
                       FeatureExtractor(**feature_kwargs), real_limit=p["fid_real"], min_images=4, progress=progress)
    fs = json.loads(fid_summary.read_text())
    every = fs["rows"][0]
    results["fid"] = {"fid": every["fid"], "n_a": every["real_images"], "n_b": every["synthetic_images"],
                      "inception": fs["inception"], "mode": fs["mode"]}
    lap("fid")
    save_state()

    # 6. the rest of the evaluation suite
    if not (evals / "tstr" / "summary.json").is_file():
        say(f"train on synthetic, test on real ({p['labelled_n']} classifier-labelled samples)")
        sample_archive(SampleConfig(str(run), str(samples / "labelled"), n=p["labelled_n"], seed=1, classifier=str(clf),
                                    device=str(dev)), progress=progress)
        run_tstr(TSTRConfig(str(samples / "labelled"), str(archive), str(evals / "tstr"), input_size=p["clf_size"],
                            width=p["clf_width"], epochs=p["tstr_epochs"], lr=3e-3, bootstrap=200, device=str(dev)),
                 progress=progress)
    if not (evals / "diversity" / "summary.json").is_file():
        say(f"disease diversity of {p['diversity_n']} samples")
        diversity(str(run), str(clf), str(archive), evals / "diversity", n=p["diversity_n"], real_limit=1000,
                  device=str(dev), progress=progress)
    if not (evals / "memorisation" / "summary.json").is_file():
        say("memorisation audit")
        audit(str(samples / "unconditional"), str(archive), evals / "memorisation", FeatureExtractor(**feature_kwargs),
              real_limit=p["fid_real"], progress=progress)
    lap("evaluations")
    report = write_report(out / "report.html", run, title="xrayforge demo report", preamble=demo_markdown(results))
    page = Path(report["html"])
    results["report"] = str(page)
    save_state()
    where = {
        "archive": archive, "training run (log.jsonl, loss.png, grids/, checkpoints/)": run, "classifier": clf,
        "unconditional samples": samples / "unconditional", "LCO-labelled samples": samples,
        "evaluations (TSTR, FID per finding, diversity, memorisation)": run / "evaluations",
        "report": page, "all figures (JSON)": state_path}
    if progress:
        print("\nxrayforge demo finished. Results:")
        for what, path in where.items():
            print(f"  {what:58s} {path}")
        print(f"  FID {results['fid']['fid']:.3f} ({results['fid']['inception']})")
    return results
