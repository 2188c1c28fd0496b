import json
from pathlib import Path

import pytest

from xrayforge.cli import main as cli


@pytest.mark.slow
def test_demo_end_to_end_with_a_tiny_budget(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli(["demo", "--out", str(out), "--minutes", "0.3", "--device", "cpu", "-q"]) == 0
    state = json.loads((out / "demo_state.json").read_text())
    printed = capsys.readouterr().out  # -q: no progress, but the results are printed
    assert "xrayforge demo finished" in printed and f"FID {state['fid']['fid']:.3f}" in printed
    assert str(out / "report.html") in printed and "[demo]" not in printed
    assert (out / "phantom" / "archive.json").is_file()
    run = out / "run"
    assert (run / "log.jsonl").is_file() and (run / "loss.png").is_file() and (run / "grid-latest.png").is_file()
    assert any((run / "checkpoints").glob("ckpt-*"))
    # the stage ran to its end; "complete" is the trainer's (the whole schedule), which the budget cuts here
    assert state["train"]["trained"] and state["train"]["complete"] is state["train"]["schedule_complete"]
    assert (out / "classifier" / "classifier.pt").is_file() and state["classifier"]["best_mean_auroc"] > 0.5
    trained = json.loads((out / "classifier" / "training.json").read_text())  # the kept epoch's AUROCs, not the last's
    assert state["classifier"]["auroc"] == trained["history"][trained["best_epoch"] - 1]["auroc"]
    assert (out / "samples" / "unconditional" / "manifest.csv").is_file()
    assert set(state["lco"]) == {"Cardiomegaly=1", "Cardiomegaly=1,Effusion=1", "Cardiomegaly=0,Mass=1"}
    for target, info in state["lco"].items():
        assert "error" in info or (out / "samples").glob("lco-*/manifest.csv"), target
    # no Inception weights in CI: the distances are in the phantom classifier's features
    assert state["fid"]["fid"] >= 0 and state["fid"]["features"].startswith("classifier@")
    assert 0 <= state["fid"]["precision"] <= 1 and 0 <= state["fid"]["coverage"] <= 1
    measured = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if '"fid"' in line]
    assert measured and all(m["metrics_features"] == state["fid"]["features"] for m in measured)
    final = [m for m in measured if m["resolution"] == state["archive"]["resolution"] and m["alpha"] == 1.0]
    if final:  # the best checkpoint is one at the final resolution, faded in (a tiny budget may not get there)
        best = json.loads((run / "checkpoints" / "best.json").read_text())
        assert best["fid"] == min(m["fid"] for m in final)
    report = (out / "report.html").read_text()
    assert "FID" in report and "data:image/png;base64" in report
    assert (out / "report.md").is_file()
    for kind in ("tstr", "fid-findings", "diversity", "memorisation"):  # the evaluation suite ran
        assert json.loads((run / "evaluations" / kind / "summary.json").read_text())["evaluation"] == kind
    assert state["realism"]["realism"] > 0 and 0 < state["realism"]["diversity"]
    assert (out / "real_vs_generated.png").stat().st_size > 0
    assert "learning rate" in state["recipe"] and state["memorisation"]["synthetic"] == state["fid"]["n_b"]
    mem = state["memorisation"]  # the flags beside what chance gives a generator that copies nothing
    assert mem["expected_by_chance"] >= 0 and 0 <= mem["p_value"] <= 1
    assert "for a generator that copies nothing: Fisher p" in report
    for section in ("Train on synthetic, test on real", "Disease diversity", "Memorisation audit", "Training",
                    "Generated images beside real ones", "what the demo changes from the official PGGAN",
                    "realism ratio"):
        assert section in report, section
    # a second run finds every stage done and only recomputes the cheap end of the pipeline
    assert cli(["demo", "--out", str(out), "--minutes", "0.3", "--device", "cpu", "-q"]) == 0
    again = json.loads((out / "demo_state.json").read_text())
    assert again["train"]["images_seen"] == state["train"]["images_seen"]
    # a stage's output deleted: the next run makes it again (and what depended on it), not a report of ghosts
    import shutil
    shutil.rmtree(out / "classifier")
    assert cli(["demo", "--out", str(out), "--minutes", "0.3", "--device", "cpu", "-q"]) == 0
    third = json.loads((out / "demo_state.json").read_text())
    assert (out / "classifier" / "classifier.json").is_file()
    assert third["train"]["images_seen"] == state["train"]["images_seen"]  # the GAN is kept
    for target, info in third["lco"].items():
        assert "error" in info or (Path(info["folder"]) / "summary.json").is_file(), target
    assert json.loads((run / "evaluations" / "tstr" / "summary.json").read_text())["evaluation"] == "tstr"


def test_every_help_works(capsys):
    for args in (["--help"], ["info", "--help"], ["prepare", "--help"], ["train", "--help"], ["fid", "--help"],
                 ["sample", "--help"], ["classify", "--help"], ["classify", "train", "--help"], ["demo", "--help"],
                 ["evaluate", "--help"], ["evaluate", "tstr", "--help"], ["evaluate", "fid-findings", "--help"],
                 ["evaluate", "diversity", "--help"], ["evaluate", "report", "--help"],
                 ["evaluate", "memorisation", "--help"], ["evaluate", "reader-study", "score", "--help"]):
        with pytest.raises(SystemExit) as exc:
            cli(args)
        assert exc.value.code == 0
        assert "usage: xrayforge" in capsys.readouterr().out


def test_bench_prints_the_table(tmp_path, capsys):
    assert cli(["bench", "--suites", "sampling", "--quick", "--json", str(tmp_path / "b.json"), "-q"]) == 0
    out = capsys.readouterr().out
    assert "### sampling" in out and "img/s" in out
    assert json.loads((tmp_path / "b.json").read_text())["sampling"]["rows"]
    assert cli(["bench", "--suites", "nonsense", "-q"]) == 2


def test_demo_plan_and_recipe_say_what_differs_from_the_official_settings():
    import dataclasses

    import torch

    from xrayforge.demo import CPU_RECIPE, gan_config, plan
    from xrayforge.train.trainer import TrainConfig
    cpu = plan(5.0, torch.device("cpu"))
    assert cpu["resolution"] == 32 and cpu["total_images"] >= 18000 and cpu["train_share"] >= 0.5
    assert plan(5.0, torch.device("cuda"))["resolution"] == 256
    cfg, official = gan_config("a", "b", 32, 2500, 18500), TrainConfig("a", "b")
    changed = {f.name for f in dataclasses.fields(TrainConfig) if getattr(cfg, f.name) != getattr(official, f.name)}
    # what CPU_RECIPE names (sizes, phase lengths, lr), bookkeeping (ticks), and a batch of 16 written out
    assert changed <= {"fmap_base", "fmap_max", "latent_dim", "fade_images", "stable_images", "total_images", "lr",
                       "batch", "tick_images", "checkpoint_ticks"}, changed
    assert set(cfg.batch.values()) == {16} and "learning rate" in CPU_RECIPE and "EMA" in CPU_RECIPE
    assert (cfg.gp_metric, cfg.ema_kimg, cfg.ema_rampup, cfg.ema_beta) == (
        official.gp_metric, official.ema_kimg, official.ema_rampup, None)


def test_the_demo_says_when_its_time_budget_cut_training_short():
    from xrayforge.demo import demo_markdown, training_reach
    cut = training_reach({"images_seen": 52128, "level": 5, "complete": False}, 256)
    assert cut["resolution_reached"] == 128 and not cut["schedule_complete"]
    assert "stopped at 128 px of 256 px, after 52,128 images" in cut["stopped_early"]
    done = training_reach({"images_seen": 9000, "level": 3, "complete": True}, 32)
    assert done == {"resolution_reached": 32, "schedule_complete": True, "stopped_early": None, "budget_note": None}
    fading = training_reach({"images_seen": 9000, "level": 6, "alpha": 0.5, "complete": False}, 256)
    assert "stopped at 256 px of 256 px (fading in, α = 0.50)" in fading["stopped_early"]
    # cut in the final stable phase: the schedule's total is a ceiling there, not a goal
    final = training_reach({"images_seen": 90000, "level": 6, "alpha": 1.0, "complete": False}, 256)
    assert final["stopped_early"] is None and "reached 256 px and trained on there" in final["budget_note"]
    results = {"archive": {"images": 10, "resolution": 256}, "train": cut,
               "classifier": {"best_mean_auroc": 0.9, "auroc": {}}, "lco": {},
               "fid": {"fid": 1.0, "n_a": 2, "n_b": 2, "inception": "x"}}
    assert "**Note:** training stopped at 128 px of 256 px" in demo_markdown(results)
    assert "**Note:**" not in demo_markdown(dict(results, train=done))
    assert "Training reached 256 px and trained on there" in demo_markdown(dict(results, train=final))


def test_gpu_plan_reaches_the_final_resolution_within_its_share_of_the_time():
    import torch

    from xrayforge.demo import GPU_ASSUMED_IMG_S, GPU_GROWTH_SHARE, gpu_config, plan
    from xrayforge.train.schedule import ProgressiveSchedule
    p = plan(5.0, torch.device("cuda"))
    cfg, recipe = gpu_config("a", "b", p, 300.0, torch.device("cuda"))
    train_seconds = 300.0 * p["train_share"]
    sched = ProgressiveSchedule(0, 6, cfg.fade_images, cfg.stable_images, cfg.total_images)
    growth = sum(n for _, n, _ in sched.phases[:-1]) + cfg.stable_images  # to the end of the first 256-px stable phase
    assert growth / GPU_ASSUMED_IMG_S <= GPU_GROWTH_SHARE * train_seconds * 1.01
    assert cfg.stable_images >= 8 * p["batch"] and cfg.stable_images % p["batch"] == 0
    # time, not the image count, ends training: the final stable phase outlasts the budget
    assert sched.total_images / GPU_ASSUMED_IMG_S > 2 * train_seconds
    assert sched.at(cfg.total_images - 1).level == 6 and cfg.tick_images == cfg.stable_images
    assert "at an assumed" in recipe["images per fade-in and per stable phase"][0]


@pytest.mark.slow
def test_the_gpu_recipe_runs_end_to_end(tmp_path, monkeypatch):
    """The GPU plan's code path (gpu_config, time-bounded final phase, its recipe in the report),
    at toy sizes on the CPU, so a GPU window never finds it broken."""
    import torch

    import xrayforge.demo as demo
    tiny = dict(demo.plan(0.3, torch.device("cpu")), recipe="gpu", resolution=16, latent=16, fmap_base=64,
                fmap_max=16, batch=8, lr=2e-3, samples=16, realism_images=16)
    monkeypatch.setattr(demo, "plan", lambda minutes, device: tiny)
    monkeypatch.setattr(demo, "GPU_ASSUMED_IMG_S", 20)
    state = demo.run_demo(out=str(tmp_path / "demo"), device="cpu", minutes=0.3, progress=False)
    assert state["recipe"]["batch"][0] == "8 at every resolution"
    cfg = json.loads((tmp_path / "demo" / "run" / "train_config.json").read_text())
    assert cfg["tick_images"] == cfg["stable_images"] and cfg["realism_images"] == 16  # gpu_config's run
    assert cfg["total_images"] > 5 * cfg["stable_images"]  # a final phase that the time budget ends
    assert state["train"]["images_seen"] > 0
    assert "minutes on one GPU" in (tmp_path / "demo" / "report.md").read_text()


def test_a_named_inception_file_that_is_not_there_is_refused_before_any_work(tmp_path, capsys):
    from xrayforge.cli import main as cli
    assert cli(["demo", "--out", str(tmp_path / "d"), "--inception", str(tmp_path / "missing.pth"), "-q"]) == 1
    assert "not found" in capsys.readouterr().err and not (tmp_path / "d").exists()


def test_a_demo_resumed_after_ctrl_c_trains_for_what_is_left_of_its_budget(tmp_path, monkeypatch):
    """The training stage's time budget is for its training in all: a run stopped by Ctrl-C and
    continued gets what is left of it, not the whole budget again (which trained on past the plan)."""
    from xrayforge.demo import run_demo
    from xrayforge.train.trainer import Interrupted, Trainer

    real_train, budgets = Trainer.train, []

    def train(self):
        budgets.append((self.cfg.max_seconds, self.history[-1]["total_seconds"] if self.history else 0.0))
        if len(budgets) == 1:  # the first session trains 2 s, then Ctrl-C (after its checkpoint)
            self.cfg.max_seconds = 2.0
            real_train(self)
            raise Interrupted("stopped by signal 2")
        raise Interrupted("stopped by signal 2")

    monkeypatch.setattr(Trainer, "train", train)
    for _ in range(2):
        with pytest.raises(Interrupted):
            run_demo(out=str(tmp_path / "demo"), device="cpu", minutes=0.3, progress=False)
    (whole, _), (left, trained) = budgets
    assert trained >= 2.0 and left == pytest.approx(whole - trained)


def test_a_demo_continued_with_another_budget_is_refused_naming_it(tmp_path, monkeypatch, capsys):
    """Each stage is sized by --minutes (and the device): continuing with others mixed two plans in one
    demo (a classifier and a schedule of one, samples of the other) or failed in a later stage."""
    import xrayforge.data.prepare

    def no_work(*args, **kwargs):
        raise AssertionError("the demo began work")

    monkeypatch.setattr(xrayforge.data.prepare, "prepare", no_work)
    out = tmp_path / "demo"
    out.mkdir()
    (out / "demo_state.json").write_text(json.dumps({"options": {"minutes": 0.3, "device": "cpu"}}))
    assert cli(["demo", "--out", str(out), "--minutes", "1", "--device", "cpu", "-q"]) == 1
    err = capsys.readouterr().err
    assert "begun with --minutes 0.3 on the cpu, not --minutes 1" in err and "demo_state.json" in err


def test_a_demo_stopped_in_its_first_stage_keeps_its_options(tmp_path, monkeypatch, capsys):
    """The options were written with the first stage's results: a demo stopped while it built its
    phantoms, continued with another --minutes, was not refused."""
    import xrayforge.data.prepare

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(xrayforge.data.prepare, "prepare", stopped)
    out = tmp_path / "demo"
    assert cli(["demo", "--out", str(out), "--minutes", "0.3", "--device", "cpu", "-q"]) == 130  # Ctrl-C
    assert json.loads((out / "demo_state.json").read_text())["options"] == {"minutes": 0.3, "device": "cpu"}
    assert cli(["demo", "--out", str(out), "--minutes", "1", "--device", "cpu", "-q"]) == 1
    assert "begun with --minutes 0.3 on the cpu" in capsys.readouterr().err


@pytest.mark.slow
def test_a_demo_whose_run_was_deleted_trains_it_again(tmp_path, monkeypatch):
    """A trained stage whose run folder (its checkpoints) was deleted: the next run stopped at sampling
    with `run: not a checkpoint, nor a run folder with checkpoints`, the state still saying trained."""
    import shutil

    import xrayforge.sample.writer
    from xrayforge.demo import run_demo
    from xrayforge.train.trainer import Interrupted, Trainer

    class Stop(Exception):
        pass

    def stop(*args, **kwargs):
        raise Stop

    out = tmp_path / "demo"
    monkeypatch.setattr(xrayforge.sample.writer, "sample_archive", stop)
    with pytest.raises(Stop):  # data, classifier and the GAN made; stopped at sampling
        run_demo(out=str(out), device="cpu", minutes=0.1, progress=False)
    assert json.loads((out / "demo_state.json").read_text())["train"]["trained"]
    (out / "samples").mkdir()
    (out / "samples" / "stale.txt").write_text("of the deleted generator")
    shutil.rmtree(out / "run")
    trained = []

    def train(self):
        trained.append(self.cfg.out)
        raise Interrupted("stopped by signal 2")

    monkeypatch.setattr(Trainer, "train", train)
    with pytest.raises(Interrupted):
        run_demo(out=str(out), device="cpu", minutes=0.1, progress=False)
    assert trained == [str(out / "run")] and not (out / "samples").exists()
    assert "train" not in json.loads((out / "demo_state.json").read_text())
