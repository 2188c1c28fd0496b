"""`xrayforge demo`: the whole pipeline on the built-in chest phantom, sized to a time budget.

Stages (each is skipped when a previous run already finished it, so Ctrl-C followed by the
same command continues): build a phantom archive, train a small PGGAN, train the phantom
classifier, sample unconditional images and an LCO-labelled archive for a few target
combinations, compute FID (real Inception weights when present, else in the phantom classifier's
features), run the evaluation suite (train on synthetic / test on real, FID per
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

from .errors import UserError
from .utils.files import claim_output, read_json, write_text_atomic

DEMO_TARGETS = ["Cardiomegaly=1", "Cardiomegaly=1,Effusion=1", "Cardiomegaly=0,Mass=1"]

# What the demo's small, short CPU runs change from the official PGGAN settings, and why (the EMA
# ramp-up is also train.TrainConfig's default); everything else (WGAN-GP λ 10 in the full-resolution metric, drift, Adam
# betas, pixel norm, minibatch stddev, equalized lr, fade-ins) is the official network and loss.
CPU_RECIPE = {
    "fmap_base / fmap_max / latent_dim": ("256 / 64 / 64 (64→16 channels)", "8192 / 512 / 512",
                                          "a network a 2-core CPU trains at 70–450 img/s"),
    "images per fade-in and per stable phase": ("2,500", "600,000", "minutes, not days"),
    "images in all": ("3,700 per minute of budget (the final stable phase goes on to it)",
                      "12–15 million (total_kimg)", "minutes, not days"),
    "learning rate": ("0.002", "0.001", "fewer, larger steps for a small network"),
    "EMA": ("half-life ramped up (≤ 5% of the images seen, as NVIDIA's later code)", "β = 0.999 per step",
            "a constant β would still hold the random initial weights"),
}


# The GPU plan's growth phases assume this training rate and take GPU_GROWTH_SHARE of the
# training time at it; the final stable phase then trains at 256 px until the budget ends. An H200
# ran this network at 130–300 img/s at batch 16 (165 on average with the per-tick metrics): with
# an assumed 250 img/s and a 45% share (the same phase lengths within 5%) growth ended at 124 s of
# 182, then realism 1.46 and diversity 0.80 at 256 px.
GPU_ASSUMED_IMG_S = 165
GPU_GROWTH_SHARE = 0.65


def gan_config(archive, out, resolution: int, phase_images: int, total_images: int | None = None, **overrides):
    """The demo's CPU recipe for a PGGAN on phantoms (CPU_RECIPE); the tests and the LCO benchmark
    use it at other sizes. ``total_images`` lengthens the final stable phase."""
    from .train.trainer import TrainConfig
    levels = int(math.log2(resolution)) - 1
    kwargs = dict(fade_images=phase_images, stable_images=phase_images, total_images=total_images,
                  tick_images=max(phase_images // 2, 16), latent_dim=64, fmap_base=256, fmap_max=64, lr=0.002,
                  batch={4 << i: 16 for i in range(levels)}, checkpoint_ticks=4, realism_images=256)
    kwargs.update(overrides)
    return TrainConfig(str(archive), str(out), **kwargs)


def gpu_config(archive, run, p: dict, budget: float, dev: torch.device):
    """The GPU plan's training config and its recipe rows: the growth phases sized to take
    GPU_GROWTH_SHARE of the training time at GPU_ASSUMED_IMG_S, the final stable phase long
    enough that the time budget, not the image count, ends it."""
    levels = int(math.log2(p["resolution"])) - 1
    train_seconds = budget * p["train_share"]
    per_phase = max(p["batch"] * 8, int(GPU_ASSUMED_IMG_S * train_seconds * GPU_GROWTH_SHARE / (2 * levels - 1))
                    // p["batch"] * p["batch"])
    total = per_phase * (2 * levels - 1) + int(4 * GPU_ASSUMED_IMG_S * train_seconds)
    cfg = gan_config(archive, run, p["resolution"], per_phase, total, device=str(dev), latent_dim=p["latent"],
                     tick_images=per_phase,
                     fmap_base=p["fmap_base"], fmap_max=p["fmap_max"], lr=p["lr"],
                     batch={4 << i: p["batch"] for i in range(levels)}, realism_images=p.get("realism_images", 256))
    recipe = {
        "fmap_base / fmap_max / latent_dim": (f"{p['fmap_base']} / {p['fmap_max']} / {p['latent']}",
                                              "8192 / 512 / 512", "minutes on one GPU"),
        "images per fade-in and per stable phase": (
            f"{per_phase:,} ({GPU_GROWTH_SHARE:.0%} of the training time at an assumed {GPU_ASSUMED_IMG_S} img/s)",
            "600,000", "minutes, not days"),
        "images in all": ("the growth phases, then 256 px until the time budget ends", "12–15 million (total_kimg)",
                          "minutes, not days"),
        "learning rate": (f"{p['lr']:g}", "0.001", CPU_RECIPE["learning rate"][2]),
        "batch": (f"{p['batch']} at every resolution", "16 (official: per-resolution)", "the CPU recipe's"),
        "training time": (f"{p['train_share']:.0%} of --minutes (less if the stages before it ran over)",
                          "until total_kimg", "a time budget"),
        "EMA": CPU_RECIPE["EMA"]}
    return cfg, recipe


def plan(minutes: float, device: torch.device) -> dict:
    """Sizes for the budget: resolution, archive size, training length, network width, samples.

    On a CPU most of the budget goes to training (CPU_RECIPE): at 5 minutes, 32 px and about 20k
    images, which is what it takes for the samples to look like the phantoms; the evaluations
    run on a few hundred images (the FID Inception, about 6 GFLOP per image, dominates them).
    """
    if device.type == "cuda":
        # the CPU recipe's batch and learning rate (an H200 run at batch 32 and lr 0.001 collapsed to
        # near-identical samples) and its channels scaled to 256 px: 128 channels to 32 px, 16 at 256 px
        return {"recipe": "gpu", "resolution": 256, "images": 20000, "latent": 128, "fmap_base": 2048,
                "fmap_max": 128,
                "batch": 16, "lr": 2e-3, "phase_images": None, "total_images": None, "clf_size": 128,
                "clf_width": 32, "clf_epochs": 4, "samples": 1000, "lco_n": 64, "fid_real": 5000,
                "labelled_n": 2500, "diversity_n": 2000, "tstr_epochs": 5, "train_share": 0.6, "fid_counts": None,
                "audit_real": 5000,
                "fid_min_images": 10,
                # what follows training took about 60 s on an H200 (sampling, FID, TSTR, diversity,
                # audit, report): training stops early enough to leave it that
                "after_train_seconds": 60}
    if minutes < 3:  # a pipeline check: every stage runs, nothing has time to learn
        fid_n = 16 if minutes < 0.5 else (24 if minutes < 1 else 64)
        return {"recipe": "cpu", "resolution": 32, "images": 600,
                "phase_images": max(64, int(minutes * 400) // 16 * 16),
                "total_images": None, "clf_size": 32, "clf_width": 16, "clf_epochs": 4 if minutes < 1 else 6,
                "samples": fid_n, "lco_n": 4, "fid_real": fid_n, "audit_real": fid_n, "labelled_n": 300,
                "diversity_n": 200,
                "tstr_epochs": 4, "train_share": 0.35, "fid_counts": None, "fid_min_images": 4,
                "realism_images": 32}
    return {"recipe": "cpu", "resolution": 32, "images": 8000, "phase_images": 2500,
            "total_images": int(3700 * minutes),
            "clf_size": 32, "clf_width": 16, "clf_epochs": 3, "samples": 96, "lco_n": 8, "fid_real": 96,
            "audit_real": None,  # the memorisation audit against every archive image (about 10 s)
            "labelled_n": 400, "diversity_n": 400, "tstr_epochs": 3, "train_share": 0.6,
            # each 2048-d Fréchet distance takes seconds on a CPU: no curve over sample counts, and FID per
            # finding only where a finding has 40 images on each side
            "fid_counts": [96], "fid_min_images": 40}


def sample_realism(samples: Path, archive: Path, figure: Path, show: int = 8, include_test: bool = False) -> dict:
    """Realism and diversity ratios (utils.neighbours.realism) of the image files in ``samples``
    against as many real images of ``archive`` (of those the GAN trained on: outside the test split
    unless ``include_test``), and a figure of real images (top row) above generated ones (bottom
    row) at the same size."""
    import numpy as np

    from .data.archive import Archive
    from .data.readers import find_images, read_radiograph
    from .utils.images import grid, save_png
    from .utils.neighbours import pixel_vectors, realism

    files = sorted(find_images(samples))
    fake = torch.from_numpy(np.stack([read_radiograph(f).pixels for f in files]))
    arc = Archive(archive)
    rows = arc.random_positions(len(files), 0, arc.training_positions(include_test))
    real = torch.from_numpy(arc.as_float(arc.images(rows, arc.resolution)))
    r = realism(pixel_vectors(fake), pixel_vectors(real))
    both = torch.cat([real[:show], fake[:show]]) if fake.shape[-1] == real.shape[-1] else fake[:show]
    zoom = max(1, 128 // both.shape[-1])  # small images drawn larger (nearest: every pixel as it is)
    both = both.repeat_interleave(zoom, -1).repeat_interleave(zoom, -2)
    save_png(grid((both.clamp(0, 1) * 255).round().to(torch.uint8).numpy(), columns=show), figure)
    return {**r, "samples": len(files), "real": len(rows), "figure": str(figure)}


def training_reach(summary: dict, resolution: int) -> dict:
    """The resolution training reached and, if the time budget ended it before its schedule did
    (the trainer's ``complete``) and before the final resolution was fully faded in, a sentence
    that says so. A run cut in its final stable phase (``total_images`` is a ceiling, the budget
    the limit) is not cut short: ``budget_note`` says how far it went."""
    reached = 4 << int(summary.get("level") or 0)
    complete = bool(summary.get("complete", True))
    alpha = float(summary.get("alpha", 1.0))
    images = summary.get("images_seen", 0)
    early = note = None
    if not complete and (reached < resolution or alpha < 1.0):
        where = f"{reached} px of {resolution} px" + (f" (fading in, α = {alpha:.2f})" if alpha < 1.0 else "")
        early = (f"training stopped at {where}, after {images:,} images: the --minutes budget ran out before "
                 "the schedule's end (give more minutes to train further)")
    elif not complete:
        note = (f"training reached {resolution} px and trained on there until the --minutes budget ended, "
                f"after {images:,} images in all")
    return {"resolution_reached": reached, "schedule_complete": complete, "stopped_early": early,
            "budget_note": note}


def demo_markdown(results: dict) -> str:
    """The demo's own results (recipe, data, realism, classifier, LCO, FID), placed before the
    evaluation report."""
    lines = [f"Data: {results['archive']['images']} chest phantoms at {results['archive']['resolution']} px"
             + (f"; the GAN trained on the {results['train']['train_images']} outside the test split, on which the "
                f"evaluations test." if (results.get("train") or {}).get("train_images") else "."), ""]
    if results.get("recipe"):
        lines += ["## Training recipe: what the demo changes from the official PGGAN",
                  "| setting | demo | official | why |", "|---|---|---|---|"]
        lines += [f"| {k} | {v[0]} | {v[1]} | {v[2]} |" for k, v in results["recipe"].items()]
        lines += [""]
    if (results.get("train") or {}).get("stopped_early"):
        lines += [f"**Note:** {results['train']['stopped_early']}.", ""]
    elif (results.get("train") or {}).get("budget_note"):
        note = results["train"]["budget_note"]
        lines += [f"{note[0].upper()}{note[1:]}.", ""]
    r = results.get("realism")
    if r:
        lines += ["## Generated images beside real ones",
                  f"Top row: real phantoms; bottom row: unconditional samples of the trained generator. "
                  f"Realism ratio {r['realism']:.2f} (the samples' median distance to their nearest real image "
                  f"over the real images' median distance to their nearest other real image, in pixels; 1 = as "
                  f"close to the data as the data is to itself), diversity ratio {r['diversity']:.2f} (the same "
                  f"among the samples), over {r['samples']} samples and {r['real']} real images.", "",
                  f"![real (top) and generated (bottom)]({r['figure']})", ""]
    lines += ["## Classifier", f"Best mean validation AUROC {results['classifier']['best_mean_auroc']:.3f}.", ""]
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
              f"FID {fid['fid']:.3f} between {fid['n_a']} real phantoms and {fid['n_b']} samples (features "
              f"{fid.get('features', 'inception')}: {fid['inception']})."]
    if fid.get("precision") is not None:
        lines.append(f"Precision {fid['precision']:.3f} and recall {fid['recall']:.3f} (k = 3: fidelity and "
                     f"diversity); density {fid['density']:.3f} and coverage {fid['coverage']:.3f} (k = 5).")
    lines.append("")
    return "\n".join(lines)


def finished_text(results: dict) -> str:
    """What the demo made and its headline figures: printed at the end, also under `--quiet`."""
    mem = results["memorisation"]
    lines = ["xrayforge demo finished. Results:"]
    lines += [f"  {what:58s} {path}" for what, path in results["outputs"].items()]
    lines.append(f"  FID {results['fid']['fid']:.3f} ({results['fid']['inception']})")
    lines.append(f"  realism ratio {results['realism']['realism']:.2f}, diversity {results['realism']['diversity']:.2f} "
                 f"(1 = as close to the data as the data is to itself); memorisation audit: "
                 f"{mem['flagged']} of {mem['synthetic']} samples flagged"
                 + (f" (against half of the reals: {mem['synthetic_flagged_half']:.1f}, where chance gives "
                    f"{mem['expected_by_chance']:.1f}; Fisher p = {mem['p_value']:.2g})"
                    if mem.get("synthetic_flagged_half") is not None else ""))
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
    from .fid.training import TrainingMetrics
    from .sample.writer import SampleConfig, sample_archive
    from .train.trainer import Trainer

    if inception:  # a weights file named and not there is said before minutes of work, not taken for none
        find_weights(inception)
    out = claim_output(out, "demo", signatures=("demo_state.json", "phantom", "phantom.partial", "run"))
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    p = plan(minutes, dev)
    budget = minutes * 60
    state_path = out / "demo_state.json"
    results = read_json(state_path, "the demo's progress") if state_path.exists() else {}
    # the stages are sized by --minutes and the device: a continued demo with others would mix two plans
    options = {"minutes": minutes, "device": dev.type}
    if not results:  # a new demo: its options are kept before any work, so that a kill in the first stage is covered
        results["options"] = options
    begun = results.get("options", options)  # a demo begun before they were kept is not checked
    if begun != options:
        raise UserError(f"{state_path}: this demo was begun with --minutes {begun['minutes']:g} on the "
                        f"{begun['device']}, not --minutes {minutes:g} on the {dev.type}: its stages are sized by "
                        f"them; run it again with those to continue it, or choose a new --out")

    def save_state():
        write_text_atomic(state_path, json.dumps(results, indent=2))  # a torn one would block the resume

    if not state_path.exists():
        save_state()

    started = time.perf_counter()
    clock = {"t": started}
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
    results.setdefault("recipe", {})  # the GPU plan's is written when its training starts
    if p["recipe"] == "cpu":
        results["recipe"] = dict(CPU_RECIPE, **{
            "images per fade-in and per stable phase": (f"{p['phase_images']:,}",) + CPU_RECIPE[
                "images per fade-in and per stable phase"][1:],
            "images in all": (f"{p['total_images']:,}" if p["total_images"] else "the growth phases only",)
            + CPU_RECIPE["images in all"][1:]})
    lap("data")
    save_state()

    # 2. the classifier first: its features measure the GAN while it trains (no Inception weights needed)
    clf = out / "classifier"
    if "classifier" not in results or not (clf / "classifier.json").is_file():
        say("training the phantom classifier")
        if clf.exists():  # a run stopped before it recorded this step: its classifier is remade
            shutil.rmtree(clf)
        if "classifier" in results:  # it was deleted: what it labelled and measured goes with it
            for made in (out / "samples", out / "run" / "evaluations"):
                shutil.rmtree(made, ignore_errors=True)
            for key in ("lco", "realism", "fid", "tstr", "diversity", "memorisation"):
                results.pop(key, None)
        s = train_classifier(ClassifierTrainConfig(str(archive), str(clf), input_size=p["clf_size"],
                                                   width=p["clf_width"], epochs=p["clf_epochs"], lr=3e-3,
                                                   device=str(dev)), progress=progress)
        results["classifier"] = {"path": str(clf), "best_mean_auroc": s["best_mean_auroc"],
                                 # the kept epoch's (the best), not the last one's
                                 "auroc": s["history"][s.get("best_epoch", len(s["history"])) - 1]["auroc"]}
        lap("classifier")
        save_state()

    # 3. the GAN, sized so that the schedule fits its share of the budget, measured in the classifier's features
    run = out / "run"
    done = results.get("train", {})  # "trained": this stage ran to its end (a state from before it: "complete")
    trained = done.get("trained", "trained" not in done and done.get("complete"))
    if trained and not ((run / "checkpoints").is_dir() and any((run / "checkpoints").glob("ckpt-*"))):
        # its checkpoints were deleted: the GAN is trained again, and what it generated goes with it (samples of
        # a generator that is gone, evaluations of them), not a report of ghosts nor a stop at sampling
        say(f"{run}: its checkpoints are gone; training the GAN again")
        for made in (run, out / "samples"):
            shutil.rmtree(made, ignore_errors=True)
        for key in ("train", "lco", "realism", "fid", "tstr", "diversity", "memorisation"):
            results.pop(key, None)
        save_state()  # a kill while it trains again must not leave the state saying it is trained
        trained = False
    if not trained:
        if p["recipe"] == "gpu":  # a wider network, to 256 px
            cfg, results["recipe"] = gpu_config(archive, run, p, budget, dev)
        else:
            cfg = gan_config(archive, run, p["resolution"], p["phase_images"], p["total_images"], device=str(dev),
                             realism_images=p.get("realism_images", 256))
        cfg.max_seconds = budget * p["train_share"]
        if "after_train_seconds" in p:  # the GPU plan: less whatever the stages before it overran
            left = budget - (time.perf_counter() - started) - p["after_train_seconds"]
            cfg.max_seconds = max(0.2 * budget, min(cfg.max_seconds, left))
        cfg.checkpoint_ticks = 2
        cfg.metrics, cfg.metrics_every, cfg.metrics_images = ["fid", "prdc"], 2, p["samples"]
        cfg.metrics_features = f"classifier:{clf}"
        per_phase = cfg.stable_images
        resume = (run / "checkpoints").is_dir() and any((run / "checkpoints").glob("ckpt-*"))
        if resume:  # the rows it trained on (a run begun before the test split was held out: every row)
            from .train.trainer import saved_options
            cfg.include_test = bool(saved_options(run).get("include_test", True))
        measure = TrainingMetrics(archive, run, cfg.metrics, cfg.metrics_features, cfg.metrics_images,
                                  device=str(dev), seed=cfg.seed, include_test=cfg.include_test)
        say(f"training a PGGAN to {p['resolution']} px ({per_phase} images per phase)" +
            (" — resuming" if resume else ""))
        t0 = time.perf_counter()
        trainer = Trainer(cfg, resume=resume, progress=progress, measure=measure)
        if trainer.history:  # resumed after Ctrl-C: the budget is for the training in all, not for each session
            last = trainer.history[-1]  # a log from before total_seconds: that session's seconds, as the trainer
            spent = float(last.get("total_seconds", last.get("seconds", 0.0)))
            trainer.cfg.max_seconds = max(trainer.cfg.max_seconds - spent, 1e-3)
        summary = trainer.train()
        # "complete" stays the trainer's (the whole schedule trained), as in its summary
        results["train"] = {**summary, "seconds": time.perf_counter() - t0, "trained": True,
                            **training_reach(summary, p["resolution"])}
        if results["train"]["stopped_early"] or results["train"].get("budget_note"):
            say(results["train"]["stopped_early"] or results["train"]["budget_note"])
        lap("train")
        save_state()

    # 4. samples: unconditional (for FID) and LCO-labelled
    samples = out / "samples"
    say(f"sampling {p['samples']} images")
    sample_archive(SampleConfig(str(run), str(samples / "unconditional"), n=p["samples"], classifier=str(clf),
                                device=str(dev)), progress=progress)
    results.setdefault("lco", {})
    for i, target in enumerate(DEMO_TARGETS):
        done = results["lco"].get(target)
        if done and ("error" in done or (Path(done["folder"]) / "summary.json").is_file()):
            continue  # made (or found unreachable); a deleted folder is made again
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

    results["realism"] = sample_realism(samples / "unconditional", archive, out / "real_vs_generated.png",
                                        include_test=bool(results["train"].get("include_test", True)))
    say(f"realism ratio of the samples {results['realism']['realism']:.2f}, diversity "
        f"{results['realism']['diversity']:.2f} (1 = like the real images)")
    save_state()

    # 5. FID (with precision / recall / density / coverage): all samples, per finding and against
    # sample count; its "all" row is the demo's FID. In Inception's features when its weights are
    # there, else in the phantom classifier's (a distance that means something without a download)
    try:
        feature_kwargs = {"inception": str(find_weights(inception)), "features": "inception"}
    except FileNotFoundError:
        if inception:  # named, and not there: a mistyped path must not pass as "no weights"
            raise
        feature_kwargs = {"features": f"classifier:{clf}"}
        say("FID Inception weights not found: FID in the phantom classifier's features instead")
    feature_kwargs.update(device=str(dev), workers=0, batch_size=32, progress=progress)
    extractor = FeatureExtractor(**feature_kwargs)
    evals = run / "evaluations"  # where `xrayforge evaluate report` finds the evaluations
    fid_summary = evals / "fid-findings" / "summary.json"
    if not fid_summary.is_file() or read_json(fid_summary).get("features") != extractor.space_name:
        say(f"computing FID, precision / recall / density / coverage ({extractor.space_name} features)")
        fid_by_finding(str(samples / "unconditional"), str(archive), evals / "fid-findings", extractor,
                       counts=p["fid_counts"], real_limit=p["fid_real"], min_images=p["fid_min_images"],
                       progress=progress, prdc=True)
    fs = read_json(fid_summary)
    every = fs["rows"][0]
    results["fid"] = {"fid": every["fid"], "n_a": every["real_images"], "n_b": every["synthetic_images"],
                      "inception": fs["inception"], "features": fs["features"], "mode": fs["mode"],
                      **{k: every.get(k) for k in ("precision", "recall", "density", "coverage")}}
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
        audit(str(samples / "unconditional"), str(archive), evals / "memorisation", extractor,
              real_limit=p["audit_real"], progress=progress)
    mem = read_json(evals / "memorisation" / "summary.json")
    keep = ("flagged", "synthetic", "real", "controls", "real_flagged", "synthetic_flagged_half", "expected_by_chance",
            "p_value", "more_than_chance", "threshold_excludes")
    results["memorisation"] = {k: mem[k] for k in keep if k in mem}
    lap("evaluations")
    report = write_report(out / "report.html", run, title="xrayforge demo report", preamble=demo_markdown(results))
    page = Path(report["html"])
    results["report"] = str(page)
    results["outputs"] = {
        "archive": str(archive), "training run (log.jsonl, loss.png, grids/, checkpoints/)": str(run),
        "classifier": str(clf), "unconditional samples": str(samples / "unconditional"),
        "LCO-labelled samples": str(samples),
        "evaluations (TSTR, FID per finding, diversity, memorisation)": str(run / "evaluations"),
        "report": str(page), "all figures (JSON)": str(state_path)}
    save_state()
    if progress:
        print("\n" + finished_text(results))
    return results
