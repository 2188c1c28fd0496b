import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as tmp_mp

from xrayforge.data.archive import Archive
from synthetic_factory import rewrite_checkpoint_file
from xrayforge.data.prepare import prepare
from xrayforge.nn import load_networks
from xrayforge.train.schedule import ProgressiveSchedule
from xrayforge.train.trainer import TrainConfig, Trainer, process_device

TINY = dict(fade_images=64, stable_images=64, tick_images=32, latent_dim=8, fmap_base=32, fmap_max=8,
            batch={4: 8, 8: 8, 16: 8}, checkpoint_ticks=2, keep_checkpoints=2)


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "phantom16"
    prepare("phantom:48", path, resolution=16, workers=1, progress=False)
    return path


def test_process_device_gives_cuda_an_index(monkeypatch):
    # torch.cuda.set_device refuses a bare "cuda" (the demo and `train --device cuda` crashed on a GPU)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert process_device("cuda") == torch.device("cuda", 0)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert process_device("cuda") == torch.device("cuda", 3)
    assert process_device("cuda:1") == torch.device("cuda", 1)
    assert process_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert process_device(None) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert process_device(None) == torch.device("cuda", 3)


def test_schedule():
    s = ProgressiveSchedule(0, 2, fade_images=10, stable_images=20)
    assert s.total_images == 20 + 30 + 30
    assert (s.at(0).level, s.at(0).alpha) == (0, 1.0)
    assert (s.at(20).level, s.at(20).alpha, s.at(20).fading) == (1, 0.0, True)
    assert s.at(25).alpha == pytest.approx(0.5)
    assert (s.at(30).level, s.at(30).alpha, s.at(30).fading) == (1, 1.0, False)
    assert s.at(79).level == 2 and s.at(10 ** 9).level == 2
    with pytest.raises(ValueError):
        ProgressiveSchedule(2, 1, 10, 10)


def test_accumulation_that_splits_the_minibatch_stddev_groups_is_said_or_refused(archive, tmp_path, caplog):
    """Batch 8 forms minibatch-stddev groups of 4: micro-batches of 2 (accumulation 4) give D groups of
    2, another statistic, which is said (memory may leave no choice); micro-batches of 1 (accumulation
    8) would give groups of 1, a constant statistic, and are refused before anything is written."""
    with caplog.at_level("WARNING"):
        Trainer(TrainConfig(str(archive), str(tmp_path / "run"), **TINY, accumulation=4, device="cpu"),
                progress=False).close()
    assert "micro-batches of 2 cannot hold the batch's minibatch-stddev groups of 4" in caplog.text
    assert "D sees groups of 2" in caplog.text
    with pytest.raises(ValueError, match="micro-batches of 1 cannot hold .* groups of 1, whose statistic is a const"):
        Trainer(TrainConfig(str(archive), str(tmp_path / "run8"), **TINY, accumulation=8, device="cpu"), progress=False)
    assert not (tmp_path / "run8").exists()


def weights(run):
    nets = load_networks(next(iter(sorted((run / "checkpoints").glob("ckpt-*"))[-1:])))
    return {name: net.state_dict() for name, net in nets.items()}


def assert_same_weights(a, b):
    for name in a:
        for k in a[name]:
            torch.testing.assert_close(a[name][k], b[name][k], rtol=1e-5, atol=1e-6, msg=f"{name}.{k}")


def test_end_to_end_artifacts(archive, tmp_path):
    summary = Trainer(TrainConfig(str(archive), str(tmp_path / "run"), **TINY), progress=False).train()
    run = tmp_path / "run"
    assert summary["images_seen"] == 64 + 2 * 128 and summary["level"] == 2
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["resolution"] for r in log][0] == 4 and log[-1]["resolution"] == 16
    assert all(k in log[-1] for k in ("d_loss", "g_loss", "gp", "img_per_s", "alpha", "level", "images"))
    assert any(0 < r["alpha"] < 1 for r in log)
    assert (run / "loss.png").stat().st_size > 0 and (run / "grid-latest.png").stat().st_size > 0
    ckpts = sorted((run / "checkpoints").glob("ckpt-*"))
    assert len(ckpts) == 2 and ckpts[-1].name.endswith("320")
    nets = load_networks(ckpts[-1])
    assert nets["G"].level == 2 and nets["G_ema"](torch.randn(2, 8)).shape == (2, 1, 16, 16)
    with pytest.raises(FileExistsError, match="--resume"):
        Trainer(TrainConfig(str(archive), str(run), **TINY), progress=False)


def test_stop_and_resume_equals_an_uninterrupted_run(archive, tmp_path):
    Trainer(TrainConfig(str(archive), str(tmp_path / "a"), **TINY), progress=False).train()
    first = Trainer(TrainConfig(str(archive), str(tmp_path / "b"), max_images=136, **TINY), progress=False).train()
    assert first["images_seen"] == 136
    resumed = Trainer(TrainConfig(str(archive), str(tmp_path / "b"), **TINY), resume=True, progress=False).train()
    assert resumed["images_seen"] == 320
    assert_same_weights(weights(tmp_path / "a"), weights(tmp_path / "b"))


def test_sigterm_checkpoints_and_resume_matches(archive, tmp_path):
    run = tmp_path / "killed"
    args = [sys.executable, "-m", "xrayforge", "train", str(archive), "--out", str(run), "--fade-kimg", "0.128",
            "--stable-kimg", "0.128", "--tick-kimg", "0.016", "--checkpoint-ticks", "1000", "--latent-dim", "8",
            "--fmap-base", "32", "--fmap-max", "8", "--batch", "8", "--keep", "2", "-q"]
    proc = subprocess.Popen(args)
    log = run / "log.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not log.exists() or len(log.read_text().splitlines()) < 6):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 130
    stopped = [json.loads(line) for line in log.read_text().splitlines()][-1]["images"]
    assert 0 < stopped < 640
    assert (run / "checkpoints" / f"ckpt-{stopped:012d}").is_dir()
    assert subprocess.run([sys.executable, "-m", "xrayforge", "train", "--out", str(run), "--resume", "-q"]).returncode == 0
    cfg = dict(TINY, fade_images=128, stable_images=128, tick_images=16, batch={4: 8, 8: 8, 16: 8})
    Trainer(TrainConfig(str(archive), str(tmp_path / "whole"), **cfg), progress=False).train()
    assert_same_weights(weights(tmp_path / "whole"), weights(run))


@pytest.mark.parametrize("stop", ["sigint", "max_images", "max_seconds"])
def test_a_run_stopped_within_a_tick_numbers_its_ticks_as_an_uninterrupted_one_when_resumed(archive, tmp_path,
                                                                                            monkeypatch, stop):
    """A stop within a tick (Ctrl-C, --max-kimg, --max-seconds) logs the part of the tick done and checkpoints;
    the resumed run numbered every later tick one ahead of the uninterrupted run's (tick 3 at 64 images, not
    2), and so checkpointed (every checkpoint_ticks) and measured at other images. The part is logged under
    the tick's own number, and the resumed run ends that tick under it (and measures it, if it is due)."""
    from xrayforge.train.trainer import Interrupted
    cfg = dict(TINY, resolution=8, realism_images=0, keep_checkpoints=10, device="cpu", metrics=["fid"],
               metrics_every=2)

    class Measure:  # a constant FID: which ticks are measured is what is compared
        def __call__(self, generate, latent_dim, alpha):
            return {"fid": 1.0}

        def score(self, record):
            return record.get("fid")

    def ticks(run, measured=False):
        return [(r["tick"], r["images"]) for r in map(json.loads, (run / "log.jsonl").read_text().splitlines())
                if "fid" in r or not measured]

    def checkpoints(run):
        return sorted(p.name for p in (run / "checkpoints").glob("ckpt-*"))
    Trainer(TrainConfig(str(archive), str(tmp_path / "whole"), **cfg), progress=False, measure=Measure()).train()
    whole = ticks(tmp_path / "whole")
    assert whole == [(1, 32), (2, 64), (3, 96), (4, 128), (5, 160), (6, 192)]
    assert ticks(tmp_path / "whole", measured=True) == [(2, 64), (4, 128), (6, 192)]
    run = tmp_path / "stopped"
    if stop == "sigint":  # Ctrl-C after the 5th step read its flags: the 6th stops (48 images, within tick 2)
        steps, agree = [0], Trainer._agree

        def signalled(self, *flags):
            steps[0] += len(flags) == 2  # the step's flags (a tick's agreement has one)
            if steps[0] == 5 and len(flags) == 2:
                signal.raise_signal(signal.SIGINT)
            return agree(self, *flags)
        monkeypatch.setattr(Trainer, "_agree", signalled)
        with pytest.raises(Interrupted, match="at 48 images"):
            Trainer(TrainConfig(str(archive), str(run), **cfg), progress=False, measure=Measure()).train()
        monkeypatch.setattr(Trainer, "_agree", agree)
        cut = 48
    else:  # a budget that ends within tick 1 (max_seconds: after the first step) or tick 2 (40 images)
        budget = dict(max_images=40) if stop == "max_images" else dict(max_seconds=1e-9)
        cut = Trainer(TrainConfig(str(archive), str(run), **cfg, **budget), progress=False,
                      measure=Measure()).train()["images_seen"]
        assert cut == (40 if stop == "max_images" else 8)
    Trainer(TrainConfig(str(archive), str(run), **cfg), resume=True, progress=False, measure=Measure()).train()
    logged = ticks(run)
    assert (cut // 32 + 1, cut) in logged, logged  # the part of the tick done before the stop, under its number
    assert [t for t in logged if t[1] != cut] == whole, logged
    assert checkpoints(run) == sorted(checkpoints(tmp_path / "whole") + [f"ckpt-{cut:012d}"])
    # a budget's end is measured (the end of that session); Ctrl-C's part of a tick is not (its tick, when it ends)
    assert ticks(run, measured=True) == sorted(ticks(tmp_path / "whole", measured=True)
                                               + ([] if stop == "sigint" else [(cut // 32 + 1, cut)]), key=lambda t: t[1])


def _rank_main(rank, world, archive, out, init_file, result_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        trainer = Trainer(TrainConfig(str(archive), str(out), **dict(TINY, batch={4: 4, 8: 4, 16: 4})),
                          progress=False)
        summary = trainer.train()
        torch.save({"images": summary["images_seen"], "G": trainer.G.state_dict(), "D": trainer.D.state_dict()},
                   f"{result_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _rank_stop_and_resume(rank, world, archive, out, init_file, result_dir):
    """Two processes: the whole run in out/whole; in out/parts, stopped at 136 images, then resumed."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        cfg = dict(TINY, batch={4: 4, 8: 4, 16: 4})
        Trainer(TrainConfig(str(archive), str(out / "whole"), **cfg), progress=False).train()
        Trainer(TrainConfig(str(archive), str(out / "parts"), max_images=136, **cfg), progress=False).train()
        Trainer(TrainConfig(str(archive), str(out / "parts"), **cfg), resume=True, progress=False).train()
    finally:
        dist.destroy_process_group()


def test_a_two_process_run_resumes_exactly(archive, tmp_path):
    """Each process's random streams (its latents and flips) are in the checkpoint: a resumed
    two-process run equals the uninterrupted one (with process 0's alone, both drew the same latents)."""
    tmp_mp.spawn(_rank_stop_and_resume, args=(2, archive, tmp_path, tmp_path / "pg", tmp_path), nprocs=2)
    assert_same_weights(weights(tmp_path / "whole"), weights(tmp_path / "parts"))
    (ckpt,) = [c for c in (tmp_path / "parts" / "checkpoints").glob("ckpt-*") if c.name.endswith("000320")]
    state = torch.load(ckpt / "state.pt", weights_only=False)
    assert len(state["rank_rng"]) == 2 and not torch.equal(state["rank_rng"][0]["latent_rng"],
                                                           state["rank_rng"][1]["latent_rng"])


def _rank_signalled(rank, world, archive, out, init_file, result_dir):
    """Process 1 alone gets SIGTERM, while it is in the step's agreement (as one process of a job is
    signalled before another): both must stop at the same step, with one checkpoint, not hang."""
    import datetime
    import os
    from xrayforge.train.trainer import Interrupted
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    real, calls = Trainer._agree, {"n": 0}

    def agree(self, *flags):
        calls["n"] += 1
        if rank == 1 and calls["n"] == 3 and len(flags) == 2:  # step 3: no tick there
            os.kill(os.getpid(), signal.SIGTERM)  # lands after this process read its flags
        return real(self, *flags)
    Trainer._agree = agree
    try:
        try:
            Trainer(TrainConfig(str(archive), str(out), **dict(TINY, batch={4: 4, 8: 4, 16: 4})), progress=False).train()
            outcome = "finished"
        except Interrupted as exc:
            outcome = str(exc).split(" images")[0]
        (result_dir / f"rank{rank}.txt").write_text(outcome)
    finally:
        dist.destroy_process_group()


def test_a_signal_to_one_process_stops_every_process_at_the_same_step(archive, tmp_path):
    tmp_mp.spawn(_rank_signalled, args=(2, archive, tmp_path / "run", tmp_path / "pg", tmp_path), nprocs=2)
    said = [(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)]
    assert said[0] == said[1] and said[0].startswith("stopped by signal"), said
    assert [c.name for c in (tmp_path / "run" / "checkpoints").glob("ckpt-*")] == \
        [f"ckpt-{int(said[0].rsplit(' ', 1)[1]):012d}"]


def test_two_process_gloo_run(archive, tmp_path):
    tmp_mp.spawn(_rank_main, args=(2, archive, tmp_path / "ddp", tmp_path / "pg", tmp_path), nprocs=2)
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert r0["images"] == r1["images"] == 64 + 2 * 128  # global images: 2 ranks × batch 4 per step
    for net in ("G", "D"):
        for k in r0[net]:
            assert torch.equal(r0[net][k], r1[net][k]), f"{net}.{k} differs between ranks"
    assert (tmp_path / "ddp" / "log.jsonl").exists()


def test_a_half_written_checkpoint_is_ignored(archive, tmp_path):
    cfg = TrainConfig(str(archive), str(tmp_path / "r"), max_images=64, **TINY)
    Trainer(cfg, progress=False).train()
    ckpts = tmp_path / "r" / "checkpoints"
    good = (ckpts / "latest").read_text()
    # what a kill during the next write leaves behind: a .tmp folder, and a pointer not yet moved
    broken = ckpts / "ckpt-000000000099.tmp"
    broken.mkdir()
    (broken / "networks.pt").write_bytes(b"partial")
    trainer = Trainer(TrainConfig(str(archive), str(tmp_path / "r"), **TINY), resume=True, progress=False)
    assert trainer.latest_checkpoint().name == good and trainer.images_seen == 64


def test_schedule_total_images_extends_or_cuts_the_final_phase():
    s = ProgressiveSchedule(0, 2, fade_images=10, stable_images=20, total_images=200)
    assert s.total_images == 200 and s.at(199).level == 2 and s.at(199).index == 4
    assert [s.at(i).index for i in (0, 20, 30, 50, 60)] == [0, 1, 2, 3, 4]
    cut = ProgressiveSchedule(0, 2, fade_images=10, stable_images=20, total_images=25)
    assert cut.total_images == 25 and cut.at(24).level == 1
    with pytest.raises(ValueError, match="total_images"):
        ProgressiveSchedule(0, 2, 10, 20, total_images=0)


def test_ema_half_life_and_rampup():
    from xrayforge.train.step import ema_beta
    from xrayforge.train.trainer import OFFICIAL_EMA_KIMG
    assert ema_beta(16, OFFICIAL_EMA_KIMG * 1000) == pytest.approx(0.999, abs=1e-12)
    assert TrainConfig("a", "b", ema_rampup=0).ema_beta_at(16, 123) == pytest.approx(0.999, abs=1e-12)
    cfg = TrainConfig("a", "b")  # default: ramped, so a short run's G_ema follows G
    assert cfg.ema_beta_at(16, 0) == 0.0
    betas = [cfg.ema_beta_at(16, n) for n in (160, 1600, 16000, 10 ** 6, 10 ** 7)]
    assert betas == sorted(betas) and betas[0] == 0.25 and betas[-1] == pytest.approx(0.999, abs=1e-12)
    assert TrainConfig("a", "b", ema_beta=0.99).ema_beta_at(16, 0) == 0.99  # old runs' constant β


@pytest.mark.parametrize("bad", [dict(max_images=0), dict(max_images=-1000), dict(total_images=0),
                                 dict(start_resolution=48), dict(gp_metric="half"), dict(ema_kimg=0),
                                 dict(lr_by_resolution={16: -1.0}), dict(tick_images=0)])
def test_bad_train_config_is_refused(bad):
    with pytest.raises(ValueError):
        TrainConfig("a", "b", **bad)


def test_full_metric_penalty_equals_the_official_upscaled_input():
    """gp_metric "full": the penalty on current-size images equals the one the official code measures on
    the same images nearest-upscaled to the final size, with a D that pools them back down first."""
    import torch.nn.functional as F
    from xrayforge.nn import Discriminator, NetworkConfig
    from xrayforge.train.losses import gp_norm_scale, gradient_penalty
    torch.manual_seed(0)
    D = Discriminator(NetworkConfig(resolution=32, latent_dim=8, fmap_base=32, fmap_max=8)).double()
    level, final = 1, 3                                  # 8 px images in a 32-px network: lod 2
    real, fake = torch.randn(4, 1, 8, 8).double(), torch.randn(4, 1, 8, 8).double()
    ours = gradient_penalty(D, real, fake, level, 1.0, torch.Generator().manual_seed(1),
                            gp_norm_scale("full", level, final))

    def D_full(x, lv, a):
        return D(F.avg_pool2d(x, 4), lv, a)
    up = lambda x: F.interpolate(x, scale_factor=4, mode="nearest")  # noqa: E731
    official = gradient_penalty(D_full, up(real), up(fake), level, 1.0, torch.Generator().manual_seed(1))
    torch.testing.assert_close(ours, official, rtol=1e-10, atol=1e-12)
    assert gp_norm_scale("current", level, final) == 1.0 and gp_norm_scale("full", final, final) == 1.0


def test_optimisers_reset_per_phase_and_ticks_log_the_step_taken(archive, tmp_path, monkeypatch):
    entered = []
    original = Trainer._enter_phase

    def spy(self, phase, state=None):
        entered.append(phase.index)
        return original(self, phase, state)
    monkeypatch.setattr(Trainer, "_enter_phase", spy)
    cfg = dict(TINY, tick_images=24, lr_by_resolution={16: 0.002})  # ticks that do not fall on phase ends
    trainer = Trainer(TrainConfig(str(archive), str(tmp_path / "run"), **cfg), progress=False)
    trainer.train()
    assert entered == [0, 1, 2, 3, 4]  # a fresh Adam when each fade starts and when it ends
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    for r in log:  # the level and α of the step that ended the tick
        step = trainer.schedule.at(r["images"] - 8)
        assert (r["level"], r["alpha"]) == (step.level, pytest.approx(step.alpha, abs=1e-6))
        assert r["lr"] == (0.002 if r["resolution"] == 16 else 1e-3)
        assert r["realism"] > 0 and r["diversity"] > 0
    assert log[0]["ema_beta"] < log[-1]["ema_beta"] < 0.999


def test_cli_train_options(archive, tmp_path, capsys):
    from xrayforge.cli import main
    base = ["train", str(archive), "--latent-dim", "8", "--fmap-base", "32", "--fmap-max", "8", "-q"]
    with pytest.raises(SystemExit, match="2"):  # refused when the command line is parsed
        main(base + ["--out", str(tmp_path / "a"), "--max-kimg", "0"])
    assert "--max-kimg: 0.0 thousand images is less than one image" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="2"):
        main(base + ["--out", str(tmp_path / "b"), "--start-resolution", "48"])
    assert "power of two" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(base + ["--out", str(tmp_path / "c"), "--lr", "16:fast"])
    assert "RES:LR" in capsys.readouterr().err
    assert main(base + ["--out", str(tmp_path / "d"), "--start-resolution", "16", "--stable-kimg", "0.016",
                        "--total-kimg", "0.032", "--lr", "0.002,16:0.003", "--gp-metric", "current",
                        "--ema-kimg", "1", "--ema-rampup", "0", "--batch", "8", "--tick-kimg", "0.016"]) == 0
    saved = json.loads((tmp_path / "d" / "train_config.json").read_text())
    assert (saved["total_images"], saved["lr"], saved["lr_by_resolution"], saved["gp_metric"], saved["ema_kimg"],
            saved["ema_rampup"]) == (32, 0.002, {"16": 0.003}, "current", 1.0, 0.0)
    log = [json.loads(line) for line in (tmp_path / "d" / "log.jsonl").read_text().splitlines()]
    assert log[-1]["images"] == 32 and log[-1]["lr"] == 0.003
    assert log[-1]["ema_beta"] == pytest.approx(0.5 ** (8 / 1000))


def test_resuming_a_copied_run_writes_only_the_copy(archive, tmp_path, monkeypatch):
    """A run folder is self-contained and relocatable: resuming a copy (from another working
    directory) trains in the copy and leaves the original byte for byte as it was."""
    import hashlib
    import shutil

    from xrayforge.cli import main

    def snapshot(root):
        return {str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest()
                for p in sorted(root.rglob("*")) if p.is_file()}
    a, b = tmp_path / "runA", tmp_path / "elsewhere" / "runB"
    args = ["train", str(archive), "--out", str(a), "--latent-dim", "8", "--fmap-base", "32", "--fmap-max", "8",
            "--batch", "8", "--fade-kimg", "0.064", "--stable-kimg", "0.064", "--tick-kimg", "0.032",
            "--checkpoint-ticks", "1", "--keep", "1", "--max-kimg", "0.064", "-q"]
    assert main(args) == 0
    shutil.copytree(a, b)
    before = snapshot(a)
    monkeypatch.chdir(b.parent)  # saved paths must not depend on the working directory
    assert main(["train", "--out", "runB", "--resume", "--max-kimg", "0.192", "-q"]) == 0
    assert snapshot(a) == before
    log = [json.loads(line) for line in (b / "log.jsonl").read_text().splitlines()]
    assert log[-1]["images"] == 192 and len({r["tick"] for r in log}) == len(log)
    assert json.loads((b / "train_config.json").read_text())["out"] == "runB"


def test_a_batch_that_crosses_a_phase_boundary_is_logged_with_its_own_phase(archive, tmp_path):
    # phases of 60 images and batches of 8: steps start at 56, 112, ... and end past the boundaries
    cfg = dict(TINY, fade_images=60, stable_images=60, tick_images=20)
    trainer = Trainer(TrainConfig(str(archive), str(tmp_path / "run"), **cfg), progress=False)
    trainer.train()
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    crossing = [r for r in log if trainer.schedule.at(r["images"] - 8).index != trainer.schedule.at(r["images"] - 1).index]
    assert crossing, "no tick ended on a step that crossed a phase boundary"
    for r in log:
        step = trainer.schedule.at(r["images"] - 8)
        assert (r["level"], r["alpha"]) == (step.level, pytest.approx(step.alpha, abs=1e-6))


def test_resuming_a_run_from_before_the_new_options_keeps_what_it_trained_with(archive, tmp_path):
    from xrayforge.cli import main
    run = tmp_path / "old"
    assert main(["train", str(archive), "--out", str(run), "--latent-dim", "8", "--fmap-base", "32", "--fmap-max", "8",
                 "--batch", "8", "--fade-kimg", "0.064", "--stable-kimg", "0.064", "--tick-kimg", "0.032",
                 "--max-kimg", "0.064", "-q"]) == 0
    saved = json.loads((run / "train_config.json").read_text())
    for key in ("gp_metric", "ema_kimg", "ema_rampup", "total_images", "lr_by_resolution", "realism_images"):
        saved.pop(key)  # a train_config.json written before these options existed
    saved["ema_beta"] = 0.999
    (run / "train_config.json").write_text(json.dumps(saved))
    for meta_path in run.glob("checkpoints/ckpt-*/networks.json"):  # and the copy its checkpoints recorded
        meta = json.loads(meta_path.read_text())
        meta["extra"]["train_config"] = saved
        meta_path.write_text(json.dumps(meta))
    assert main(["train", "--out", str(run), "--resume", "--max-kimg", "0.128", "-q"]) == 0
    now = json.loads((run / "train_config.json").read_text())
    assert (now["gp_metric"], now["ema_beta"]) == ("current", 0.999)  # its penalty and constant β go on
    assert json.loads((run / "log.jsonl").read_text().splitlines()[-1])["ema_beta"] == 0.999
    assert main(["train", "--out", str(run), "--resume", "-q"]) == 0  # no --max-kimg: on to the end
    assert json.loads((run / "log.jsonl").read_text().splitlines()[-1])["images"] == 64 + 2 * 128


def test_the_prefetch_thread_is_stopped_and_joined(archive):
    """A loader thread still inside numpy / torch when the interpreter exits can abort the process
    ("terminate called without an active exception", exit 134, after the result was printed)."""
    from xrayforge.data.archive import Archive
    from xrayforge.data.loader import BatchStream, Prefetcher
    p = Prefetcher(BatchStream(Archive(archive)), torch.device("cpu"), depth=1)
    for i in range(5):  # more batches than the queue holds: the thread waits to hand one over
        p.request(i * 4, 4, 16)
    time.sleep(0.3)
    assert p._thread.is_alive()
    p.close()
    assert not p._thread.is_alive()


def test_training_leaves_no_thread_behind(archive, tmp_path):
    import threading
    before = set(threading.enumerate())
    Trainer(TrainConfig(str(archive), str(tmp_path / "run"), resolution=8, realism_images=0, max_images=32, **TINY),
            progress=False).train()
    assert set(threading.enumerate()) <= before


# ------------------------------------------------------------------ checkpoints during growth (level, α)
def test_a_checkpoint_written_during_growth_generates_at_the_level_it_trained(archive, tmp_path, caplog):
    """Its networks carry the level and fade-in α of the last step: sampling it gives the 8-px images that
    were trained, not the untrained 16-px blocks (and says that the run had not reached 16 px)."""
    import logging
    trainer = Trainer(TrainConfig(str(archive), str(tmp_path / "run"), max_images=96, **TINY), progress=False)
    summary = trainer.train()
    step = trainer.schedule.at(96 - 8)  # the last step: in the 8-px fade-in
    assert (step.level, step.fading) == (1, True)
    assert (summary["level"], summary["alpha"], summary["resolution"]) == (1, step.alpha, 8)
    assert not summary["reached_final_resolution"] and "8 px of 16 px" in summary["warning"]
    ckpt = tmp_path / "run" / "checkpoints" / "ckpt-000000000096"
    meta = json.loads((ckpt / "networks.json").read_text())
    for name in ("G", "D", "G_ema"):
        assert (meta["networks"][name]["level"], meta["networks"][name]["alpha"]) == (1, pytest.approx(step.alpha))
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        G = load_networks(ckpt, names=["G_ema"])["G_ema"]
    assert "8 px of 16 px" in caplog.text and "final resolution" in caplog.text
    z = torch.randn(3, 8)
    with torch.no_grad():
        torch.testing.assert_close(G(z), trainer.G_ema(z, 1, step.alpha))
    assert G(z).shape == (3, 1, 8, 8)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        load_networks(ckpt, warn_unfinished=False)
    assert "final resolution" not in caplog.text


def test_a_total_below_the_growth_phases_is_said_at_the_start_and_the_end(archive, tmp_path, caplog):
    import logging
    with caplog.at_level(logging.WARNING):
        trainer = Trainer(TrainConfig(str(archive), str(tmp_path / "run"), total_images=160, **TINY), progress=False)
    assert "--total-kimg 0.16 ends the schedule at 8 px" in caplog.text and "before the final 16 px" in caplog.text
    summary = trainer.train()
    assert summary["complete"] and not summary["reached_final_resolution"]
    assert "--total-kimg ends the schedule before the final resolution" in summary["warning"]
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        Trainer(TrainConfig(str(archive), str(tmp_path / "whole"), total_images=400, **TINY), progress=False)
    assert "--total-kimg" not in caplog.text


# ------------------------------------------------------------------ resuming: the same run, the same archive
def _cli(argv, capsys):
    from xrayforge.cli import main
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as exc:
        rc = exc.code
    out, err = capsys.readouterr()
    return rc, out, err


CLI_TINY = ["--fade-kimg", "0.064", "--stable-kimg", "0.064", "--tick-kimg", "0.032", "--latent-dim", "8",
            "--fmap-base", "32", "--fmap-max", "8", "--batch", "8", "--realism-images", "8", "--device", "cpu", "-q"]


def test_a_resumed_runs_log_and_report_count_the_training_time_of_every_session(archive, tmp_path, capsys):
    """log.jsonl's seconds restart with each session (--max-kimg's budget is per session); the report
    took the last line's, so a resumed run said '0 s'. total_seconds goes on from the checkpoint's tick."""
    from xrayforge.evaluate.report import write_report
    run = tmp_path / "run"
    assert _cli(["train", archive, "--out", run, *CLI_TINY, "--max-kimg", "0.064"], capsys)[0] == 0
    first = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()][-1]
    assert first["total_seconds"] == first["seconds"] > 0
    assert _cli(["train", "--out", run, "--resume", "--max-kimg", "0.128"], capsys)[0] == 0
    ticks = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    last = ticks[-1]
    assert last["images"] == 128 and last["total_seconds"] == pytest.approx(first["seconds"] + last["seconds"])
    write_report(tmp_path / "r.html", run)
    assert f"128 images seen in {last['total_seconds']:.0f} s" in (tmp_path / "r.md").read_text()


def test_resuming_with_another_archive_is_refused_in_one_line(archive, tmp_path, capsys):
    run = tmp_path / "run"
    assert _cli(["train", archive, "--out", run, *CLI_TINY, "--max-kimg", "0.064"], capsys)[0] == 0
    assert json.loads((run / "train_config.json").read_text())["resolution"] == 16  # resolved, not null
    big = tmp_path / "phantom32"
    prepare("phantom:48", big, resolution=32, workers=1, progress=False)
    rc, out, err = _cli(["train", big, "--out", run, "--resume"], capsys)
    assert rc == 1 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "not the archive this run trained on" in err and "32 px" in err and "16 px" in err
    # a run saved before the resolution was: its checkpoint's size, then the same refusal (was a state_dict dump)
    saved = json.loads((run / "train_config.json").read_text())
    (run / "train_config.json").write_text(json.dumps({**saved, "resolution": None}))
    rc, out, err = _cli(["train", big, "--out", run, "--resume"], capsys)
    assert rc == 1 and len(err.strip().splitlines()) == 1 and "not the archive this run trained on" in err
    # other images at the same size: refused too
    other = tmp_path / "other16"
    prepare("phantom:40", other, resolution=16, workers=1, progress=False)
    rc, out, err = _cli(["train", other, "--out", run, "--resume"], capsys)
    assert rc == 1 and "not the archive this run trained on" in err and "40 images" in err
    # the same archive, moved: fine
    import shutil
    moved = tmp_path / "moved"
    shutil.copytree(archive, moved)
    assert _cli(["train", moved, "--out", run, "--resume", "--max-kimg", "0.096"], capsys)[0] == 0


def test_resuming_when_the_archive_moved_says_to_give_its_new_path(archive, tmp_path, capsys):
    """Without ARCHIVE, --resume reads the archive where the run saw it; moved, that said only
    'not an xrayforge archive (no archive.json)'."""
    import shutil
    mine, run = tmp_path / "arc", tmp_path / "run"
    shutil.copytree(archive, mine)
    assert _cli(["train", mine, "--out", run, *CLI_TINY, "--max-kimg", "0.064"], capsys)[0] == 0
    mine.rename(tmp_path / "elsewhere")
    rc, out, err = _cli(["train", "--out", run, "--resume"], capsys)
    assert rc == 1 and len(err.strip().splitlines()) == 1, err
    assert f"{mine}: the run's archive is no longer there" in err and f"ARCHIVE --out {run} --resume" in err
    assert _cli(["train", tmp_path / "elsewhere", "--out", run, "--resume", "--max-kimg", "0.096"], capsys)[0] == 0


def test_resuming_with_other_networks_names_both(archive, tmp_path):
    from xrayforge.errors import UserError
    Trainer(TrainConfig(str(archive), str(tmp_path / "r"), max_images=32, **TINY), progress=False).train()
    with pytest.raises(UserError, match=r"networks have latent_dim 8; the options given build latent_dim 16"):
        Trainer(TrainConfig(str(archive), str(tmp_path / "r"), **dict(TINY, latent_dim=16)), resume=True,
                progress=False)
    with pytest.raises(UserError, match=r"resolution 16; the options given build resolution 8"):
        Trainer(TrainConfig(str(archive), str(tmp_path / "r"), resolution=8, **TINY), resume=True, progress=False)


def test_resume_refuses_options_that_change_the_run_and_takes_the_others(archive, tmp_path, capsys):
    run = tmp_path / "run"
    assert _cli(["train", archive, "--out", run, *CLI_TINY, "--max-kimg", "0.064"], capsys)[0] == 0
    rc, out, err = _cli(["train", "--out", run, "--resume", "--lr", "0.5", "--batch", "4", "--mirror", "-q"], capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "--lr 0.5 (the run's: 0.001)" in err and "--batch 4 (the run's: 8)" in err and "--mirror on" in err
    assert not (run / "checkpoints" / "ckpt-000000000096").exists()
    # options equal to the run's are fine; the changeable ones are applied
    assert _cli(["train", "--out", run, "--resume", "--batch", "8", "--latent-dim", "8", "--keep", "1",
                 "--tick-kimg", "0.016", "--max-kimg", "0.096", "-q"], capsys)[0] == 0
    saved = json.loads((run / "train_config.json").read_text())
    assert (saved["keep_checkpoints"], saved["tick_images"], saved["lr"], saved["mirror"]) == (1, 16, 0.001, False)
    assert [p.name for p in (run / "checkpoints").glob("ckpt-*")] == ["ckpt-000000000096"]
    # a run an earlier version began with micro-batches that split D's groups (batch 8, accumulation 4) is
    # refused, and --resume takes the accumulation that mends it (memory only: the step is the batch's)
    for path in (run / "train_config.json", run / "checkpoints" / "ckpt-000000000096" / "train_config.json"):
        if path.exists():
            path.write_text(json.dumps({**json.loads(path.read_text()), "accumulation": 8}))
    rc, out, err = _cli(["train", "--out", run, "--resume", "--max-kimg", "0.112", "-q"], capsys)
    assert rc != 0 and "micro-batches of 1 cannot hold" in err and "--resume takes --accumulation" in err
    assert _cli(["train", "--out", run, "--resume", "--accumulation", "2", "--max-kimg", "0.112", "-q"], capsys)[0] == 0
    assert json.loads((run / "train_config.json").read_text())["accumulation"] == 2


# ------------------------------------------------------------------ the run folder: one training at a time
def test_a_second_training_of_the_same_folder_is_refused_until_the_first_ends(archive, tmp_path):
    import os
    from xrayforge.errors import UserError
    run = tmp_path / "run"
    first = Trainer(TrainConfig(str(archive), str(run), max_images=32, **TINY), progress=False)
    with pytest.raises(UserError, match=f"another training is running in this folder \\(pid {os.getpid()}"):
        Trainer(TrainConfig(str(archive), str(run), max_images=64, **TINY), resume=True, progress=False)
    first.train()  # the lock goes when training ends
    Trainer(TrainConfig(str(archive), str(run), max_images=64, **TINY), resume=True, progress=False).train()
    # a process killed outright lets go of it too
    code = (f"from xrayforge.train.trainer import TrainConfig, Trainer\n"
            f"t = Trainer(TrainConfig({str(archive)!r}, {str(run)!r}, **{TINY!r}), resume=True, progress=False)\n"
            f"print('ready', flush=True)\nimport time; time.sleep(120)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        with pytest.raises(UserError, match="another training"):
            Trainer(TrainConfig(str(archive), str(run), **TINY), resume=True, progress=False)
    finally:
        proc.kill()
        proc.wait(timeout=60)
    Trainer(TrainConfig(str(archive), str(run), **TINY), resume=True, progress=False)


def test_a_new_start_after_a_crash_before_any_checkpoint_sets_the_old_log_aside(archive, tmp_path):
    import shutil
    run = tmp_path / "run"
    Trainer(TrainConfig(str(archive), str(run), max_images=96, **TINY), progress=False).train()
    shutil.rmtree(run / "checkpoints")  # what a kill before the first checkpoint leaves: a log, grids, no checkpoint
    old = (run / "log.jsonl").read_text()
    Trainer(TrainConfig(str(archive), str(run), max_images=64, **TINY), progress=False).train()
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["tick"] for r in log] == [1, 2] and [r["images"] for r in log] == [32, 64]
    (aside,) = run.glob("log-*.jsonl")
    assert aside.read_text() == old
    (grids,) = run.glob("grids-*")
    assert sorted(p.name for p in grids.iterdir())[-1] == "grid-000000000096.png"
    assert sorted(p.name for p in (run / "grids").iterdir())[-1] == "grid-000000000064.png"


def test_a_stale_latest_pointer_resumes_from_the_newest_intact_checkpoint(archive, tmp_path, caplog):
    """A kill between a checkpoint's rename and the pointer's update: the newer checkpoint is whole and is
    resumed from; nothing intact is renamed damaged-*. One that fails to load is set aside and said."""
    import logging
    from xrayforge.nn.checkpoint import find_checkpoint
    run = tmp_path / "run"
    Trainer(TrainConfig(str(archive), str(run), max_images=128, **TINY), progress=False).train()
    ckpts = run / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("ckpt-*")) == ["ckpt-000000000064", "ckpt-000000000128"]
    (ckpts / "latest").write_text("ckpt-000000000064")
    assert find_checkpoint(run).name == "ckpt-000000000128"
    trainer = Trainer(TrainConfig(str(archive), str(run), **TINY), resume=True, progress=False)
    assert trainer.images_seen == 128 and not list(ckpts.glob("damaged-*"))
    trainer.close()
    # a checkpoint whose files are whole but whose state is not a training state: it fails to load
    rewrite_checkpoint_file(ckpts / "ckpt-000000000128", "state.pt", {"something": 1})
    with caplog.at_level(logging.WARNING):
        trainer = Trainer(TrainConfig(str(archive), str(run), **TINY), resume=True, progress=False)
    assert trainer.images_seen == 64 and "not a training state" in caplog.text
    assert (ckpts / "damaged-ckpt-000000000128").is_dir()


def test_a_torn_train_config_falls_back_to_the_checkpoints_copy(archive, tmp_path, capsys, caplog):
    import logging
    run = tmp_path / "run"
    assert _cli(["train", archive, "--out", run, *CLI_TINY, "--max-kimg", "0.064"], capsys)[0] == 0
    whole = (run / "train_config.json").read_text()
    (run / "train_config.json").write_text(whole[:len(whole) // 2])
    with caplog.at_level(logging.WARNING):
        rc, out, err = _cli(["train", "--out", run, "--resume", "--max-kimg", "0.096"], capsys)
    assert rc == 0, err
    assert "train_config.json" in caplog.text and "ckpt-000000000064" in caplog.text
    assert json.loads((run / "train_config.json").read_text()) == {**json.loads(whole), "max_images": 96}
    assert not [p for p in run.iterdir() if ".tmp" in p.name]  # atomic_write's hidden temporaries too


def test_train_command_line_refusals_come_before_anything_is_written(archive, tmp_path, capsys, caplog):
    import logging
    rc, out, err = _cli(["train", "--out", tmp_path / "nothing", "--resume"], capsys)
    assert rc == 1 and "there is no run to resume here" in err and "ARCHIVE is required" not in err
    assert not (tmp_path / "nothing").exists()
    rc, out, err = _cli(["train", archive, "--out", tmp_path / "acc", *CLI_TINY, "--accumulation", "3"], capsys)
    assert rc == 1 and "not divisible by accumulation 3" in err
    assert not (tmp_path / "acc").exists()
    rc, out, err = _cli(["train", archive, "--out", tmp_path / "big", *CLI_TINY, "--max-kimg", "1e308"], capsys)
    assert rc == 2 and "argument --max-kimg: '1e308' is too large" in err and "Traceback" not in err
    with caplog.at_level(logging.WARNING):
        rc, out, err = _cli(["train", archive, "--out", tmp_path / "auto", *CLI_TINY, "--auto-batch",
                             "--max-kimg", "0.032"], capsys)
    assert rc == 0 and "--auto-batch" in caplog.text and "does nothing" in caplog.text


# ------------------------------------------------------------------ the test split is left out
def test_the_gan_trains_outside_the_test_split(archive, tmp_path):
    from xrayforge.data.archive import Archive
    splits = Archive(archive).splits
    test = {i for i, s in enumerate(splits) if s == "test"}
    assert 0 < len(test) < len(splits)
    trainer = Trainer(TrainConfig(str(archive), str(tmp_path / "run"), max_images=32, **TINY), progress=False)
    seen = set(trainer.stream.positions(0, 50 * len(splits)).tolist())
    assert seen == set(range(len(splits))) - test
    assert set(trainer.realism_rows.tolist()) <= seen
    summary = trainer.train()
    assert summary["train_images"] == len(splits) - len(test)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert {r["train_images"] for r in log} == {len(splits) - len(test)}
    every = Trainer(TrainConfig(str(archive), str(tmp_path / "all"), include_test=True, **TINY), progress=False)
    assert set(every.stream.positions(0, 50 * len(splits)).tolist()) == set(range(len(splits)))
    from xrayforge.demo import demo_markdown  # the demo follows the default and says so
    results = {"archive": {"images": len(splits), "resolution": 16}, "train": summary,
               "classifier": {"best_mean_auroc": 0.9, "auroc": {}}, "lco": {},
               "fid": {"fid": 1.0, "n_a": 2, "n_b": 2, "inception": "x"}}
    assert f"the GAN trained on the {len(splits) - len(test)} outside the test split" in demo_markdown(results)


def test_a_file_system_without_flock_trains_with_a_warning(archive, tmp_path, monkeypatch, caplog):
    """Only a lock held elsewhere refuses a training; flock unsupported (Lustre noflock, some NFS and
    FUSE mounts: ENOSYS, ENOLCK, EOPNOTSUPP) is said and the run goes on."""
    import errno
    import fcntl
    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")
    monkeypatch.setattr(fcntl, "flock", no_flock)
    Trainer(TrainConfig(str(archive), str(tmp_path / "run"), max_images=32, **TINY), progress=False).train()
    assert "cannot lock the run folder on this file system (No locks available)" in caplog.text


def test_a_resume_keeps_the_rows_the_run_trained_on(archive, tmp_path):
    """include_test changes what the GAN trains on: a resume with the other value is refused, and a
    run from before the test split was held out (no include_test saved) counts as every row."""
    import json
    from xrayforge.errors import UserError
    run = tmp_path / "run"
    Trainer(TrainConfig(str(archive), str(run), max_images=32, **TINY), progress=False).train()
    with pytest.raises(UserError, match="the run trained on the images outside the test split"):
        Trainer(TrainConfig(str(archive), str(run), max_images=64, include_test=True, **TINY), resume=True,
                progress=False)
    (ckpt,) = (run / "checkpoints").glob("ckpt-*")
    meta = json.loads((ckpt / "networks.json").read_text())
    del meta["extra"]["train_config"]["include_test"]
    (ckpt / "networks.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="the run trained on every image"):
        Trainer(TrainConfig(str(archive), str(run), max_images=64, **TINY), resume=True, progress=False)
    Trainer(TrainConfig(str(archive), str(run), max_images=64, include_test=True, **TINY), resume=True,
            progress=False).close()


def test_a_resume_on_rows_chosen_by_another_rule_is_said(archive, tmp_path, caplog, monkeypatch):
    """The same archive, but the rows a GAN trains on chosen otherwise (an earlier version held out
    only the test split's rows, not its patients' other images): the run goes on, and says it is not
    the exact continuation."""
    run = tmp_path / "run"
    Trainer(TrainConfig(str(archive), str(run), max_images=32, **TINY), progress=False).train()
    Trainer(TrainConfig(str(archive), str(run), max_images=64, **TINY), resume=True, progress=False).close()
    assert "not as the exact continuation" not in caplog.text
    held = Archive.held_out
    monkeypatch.setattr(Archive, "held_out", lambda self: held(self) | (np.arange(len(self)) == 1))
    Trainer(TrainConfig(str(archive), str(run), max_images=64, **TINY), resume=True, progress=False).close()
    assert "this version trains on" in caplog.text and "not as the exact continuation" in caplog.text


def test_damaged_checkpoints_alone_are_said_as_such(archive, tmp_path):
    from xrayforge.errors import UserError
    run = tmp_path / "run"
    Trainer(TrainConfig(str(archive), str(run), max_images=32, **TINY), progress=False).train()
    for c in (run / "checkpoints").glob("ckpt-*"):
        c.rename(c.with_name("damaged-" + c.name))
    with pytest.raises(UserError, match="only damaged checkpoints are left"):
        Trainer(TrainConfig(str(archive), str(run), **TINY), resume=True, progress=False)
    with pytest.raises(FileExistsError, match="holds only damaged checkpoints"):
        Trainer(TrainConfig(str(archive), str(run), **TINY), progress=False)


def test_an_archive_without_a_test_split_is_warned_about(tmp_path, caplog):
    import json
    prepare("phantom:40", tmp_path / "arc", resolution=8, workers=1, progress=False)
    manifest = tmp_path / "arc" / "manifest.csv"
    manifest.write_text(manifest.read_text().replace(",test,", ",train,"))
    assert "test" not in json.dumps(Archive(str(tmp_path / "arc")).splits)
    Trainer(TrainConfig(str(tmp_path / "arc"), str(tmp_path / "run"), max_images=16, **TINY), progress=False).close()
    assert "has no test split: the GAN trains on every patient" in caplog.text


def test_a_forked_child_lets_go_of_the_lock_and_of_nothing_else(archive, tmp_path):
    """A child forked without exec (a DataLoader worker) must not keep the run folder locked after
    the parent lets go; and a descriptor number the lock file once had, reused for another file,
    must be left alone in the child."""
    import fcntl
    import os
    from xrayforge.train import trainer as T
    t = Trainer(TrainConfig(str(archive), str(tmp_path / "run"), **TINY), progress=False)
    other = open(tmp_path / "other.txt", "w+")
    other.write("payload")
    other.flush()
    T._LOCK_FDS[other.fileno()] = (0, 0)  # a stale entry: that number is now another file
    to_child, from_child = os.pipe(), os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: reads the other file, then waits while the parent lets go of the lock
        os.lseek(other.fileno(), 0, os.SEEK_SET)
        os.write(from_child[1], os.read(other.fileno(), 7))
        os.read(to_child[0], 1)
        os._exit(0)
    try:
        assert os.read(from_child[0], 100) == b"payload"
        t.close()
        with open(tmp_path / "run" / ".lock") as probe:  # free although the child is still alive
            fcntl.flock(probe.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.write(to_child[1], b"x")
        os.waitpid(pid, 0)
        T._LOCK_FDS.pop(other.fileno(), None)
        other.close()


def test_auto_batch_keeps_the_minibatch_stddev_groups_and_the_steps_precision(archive, tmp_path, monkeypatch, caplog):
    """The memory probe (GPU only; its OOM faked here) picks the largest power-of-two batch whose
    micro-batches hold whole minibatch-stddev groups, and probes with the step's own precision."""
    import xrayforge.train.trainer as T
    cfg = TrainConfig(str(archive), str(tmp_path / "run"), **TINY, accumulation=4, device="cpu")
    cfg.batch = {}
    trainer = Trainer(cfg, progress=False)
    seen, amps = [], []
    real_call = T.PGGANStep.__call__

    def probe(self, real, level, alpha, *args, **kwargs):
        amps.append(self.config.amp_dtype)
        if real.shape[0] > memory:
            raise torch.cuda.OutOfMemoryError("faked")
        seen.append(real.shape[0])
        return real_call(self, real, level, alpha, *args, **kwargs)
    monkeypatch.setattr(T.PGGANStep, "__call__", probe)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda *a: None)
    memory = 64
    assert trainer._largest_batch(0) == 64 and seen == [4, 8, 16, 32, 64]  # 64 / 4 = 16: groups of 4 whole
    memory, seen[:] = 8, []
    with caplog.at_level("WARNING"):  # 4 -> micro-batches of 1, 8 -> of 2: neither holds a group of 4
        assert trainer._largest_batch(0) == 8
    assert "no batch that fits in memory" in caplog.text and "form groups of 2" in caplog.text
    memory, seen[:] = 2, []
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert trainer._largest_batch(0) == 4
    assert "even a batch of 4 (the accumulation) ran out of GPU memory" in caplog.text
    assert set(amps) == {None}
    trainer.close()
    bf = Trainer(TrainConfig(str(archive), str(tmp_path / "run2"), **{**TINY, "batch": {}}, accumulation=1,
                             device="cpu", amp="bf16"), progress=False)
    memory, amps[:] = 4, []
    bf._largest_batch(0)
    assert set(amps) == {torch.bfloat16}
    bf.close()
    with pytest.raises(ValueError, match="amp must be 'bf16'"):
        TrainConfig(str(archive), str(tmp_path / "run3"), **TINY, amp="fp16")


def _rank_new_start_over_checkpoints(rank, world, archive, out, init_file, result_dir):
    import datetime
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=30))
    try:
        try:
            Trainer(TrainConfig(str(archive), str(out), **dict(TINY, batch={4: 4, 8: 4, 16: 4})), progress=False)
            outcome = "started"
        except FileExistsError as exc:
            outcome = str(exc)
        (result_dir / f"rank{rank}.txt").write_text(outcome)
    finally:
        dist.destroy_process_group()


def test_a_refused_new_start_is_refused_by_every_process(archive, tmp_path):
    """Process 0 alone looks at the folder; the others used to wait in the next collective until
    torchrun (or the process group's timeout) stopped them: now each raises the same error."""
    Trainer(TrainConfig(str(archive), str(tmp_path / "run"), **dict(TINY, max_images=32)), progress=False).train()
    t0 = time.time()
    tmp_mp.spawn(_rank_new_start_over_checkpoints, args=(2, archive, tmp_path / "run", tmp_path / "pg", tmp_path),
                 nprocs=2)
    said = [(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)]
    assert said[0] == said[1] and "already has checkpoints" in said[0], said
    assert time.time() - t0 < 25  # not a process group's timeout


def _rank_disk_full(rank, world, archive, out, init_file, result_dir, where):
    import datetime
    import errno
    import xrayforge.train.trainer as trainer_module
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    real = trainer_module.write_text_atomic

    def full_disk(path, *args, **kwargs):  # the checkpoint is whole; its pointer cannot be written
        if rank == 0 and str(path).endswith("latest"):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, *args, **kwargs)
    real_save = torch.save

    def full_disk_in_torch(obj, f, *args, **kwargs):  # torch's own ENOSPC error, which names no file
        return real_save(obj, "/dev/full" if str(f).endswith("state.pt") else f, *args, **kwargs)
    if where == "latest":
        trainer_module.write_text_atomic = full_disk
    else:
        trainer_module.torch.save = full_disk_in_torch
    try:
        try:
            Trainer(TrainConfig(str(archive), str(out), **dict(TINY, batch={4: 4, 8: 4, 16: 4})), progress=False).train()
            outcome = "finished"
        except (OSError, trainer_module.UserError) as exc:
            outcome = f"{type(exc).__name__}: {exc}"
        (result_dir / f"rank{rank}.txt").write_text(outcome)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("where", ["latest", "state.pt"])
def test_process_0_failing_to_write_stops_every_process(archive, tmp_path, where):
    """A full disk at the checkpoint's pointer (or its rename, best.json, the log) raised on process 0
    alone; the others waited in the next collective until the process group's timeout (30 minutes by
    default). Now every process raises, at once."""
    import os
    if where == "state.pt" and not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full here")
    tmp_mp.spawn(_rank_disk_full, args=(2, archive, tmp_path / "run", tmp_path / "pg", tmp_path, where), nprocs=2)
    said = [(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)]
    if where == "latest":
        assert said[0].startswith("OSError: [Errno 28] No space left on device") and "latest" in said[0], said
        told = "process 0 stopped the run: OSError: [Errno 28]"
    else:
        assert said[0].startswith("UserError: ") and "is the disk full?" in said[0], said
        told = "process 0 stopped the run: UserError: "
    # said by process 0 through the broadcast: a process left waiting would have met the group's timeout
    assert said[1].startswith("UserError: ") and told in said[1], said


def test_an_archive_smaller_than_a_batch_is_said(tmp_path, caplog):
    """4 images to train on and batches of 8: every batch repeats images, which is said (was silent)."""
    prepare("phantom:6", tmp_path / "six", resolution=16, workers=1, progress=False)
    assert len(Archive(tmp_path / "six").training_positions()) == 4
    with caplog.at_level("WARNING"):
        Trainer(TrainConfig(str(tmp_path / "six"), str(tmp_path / "run"), **dict(TINY, batch={4: 8, 8: 4, 16: 2})),
                progress=False).close()
    assert "4 images to train on, fewer than a step's batch (8 at 4 px)" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        Trainer(TrainConfig(str(tmp_path / "six"), str(tmp_path / "run2"), **dict(TINY, batch={4: 4, 8: 4, 16: 2})),
                progress=False).close()
    assert "fewer than a step's batch" not in caplog.text


def test_resuming_on_another_number_of_processes_says_the_batch_changes(archive, tmp_path, caplog):
    """The batch is per process: a run of 2 processes resumed by 1 steps on half the batch. Said with the
    numbers (was: only that the random streams are not continued exactly)."""
    run = tmp_path / "run"
    Trainer(TrainConfig(str(archive), str(run), max_images=64, **TINY), progress=False).train()
    state_file = run / "checkpoints" / "ckpt-000000000064" / "state.pt"
    state = torch.load(state_file, weights_only=False)
    state["rank_rng"] = [state["rank_rng"][0]] * 2  # as a checkpoint of two processes
    rewrite_checkpoint_file(state_file.parent, "state.pt", state)
    with caplog.at_level("WARNING"):
        Trainer(TrainConfig(str(archive), str(run), **TINY), resume=True, progress=False).close()
    assert "the run trained on 2 processes, and 1 goes on: each step's batch changes from 16 to 8 images" in caplog.text
    assert "resume it with 2 processes" in caplog.text


def test_a_checkpoint_cut_short_is_said_and_cleared_away(archive, tmp_path, caplog):
    """A kill while a checkpoint is written (SIGKILL after a grace period, during the SIGTERM checkpoint)
    leaves ckpt-N.tmp at a count the run may never write again: the resume says that work is redone,
    and the next checkpoint clears it away (it stayed for good, a whole checkpoint's size)."""
    run = tmp_path / "run"
    Trainer(TrainConfig(str(archive), str(run), max_images=64, **TINY), progress=False).train()
    cut = run / "checkpoints" / "ckpt-000000000100.tmp"
    cut.mkdir()
    (cut / "networks.pt").write_bytes(b"PK\x03\x04partial")
    with caplog.at_level("WARNING"):
        trainer = Trainer(TrainConfig(str(archive), str(run), max_images=128, **TINY), resume=True, progress=False)
    assert trainer.images_seen == 64
    assert "ckpt-000000000100.tmp: a checkpoint whose writing was cut short" in caplog.text
    assert "resuming from ckpt-000000000064, 36 images earlier" in caplog.text
    trainer.train()
    assert not cut.exists() and (run / "checkpoints" / "ckpt-000000000128").is_dir()
    first = tmp_path / "first"  # killed while its first checkpoint was written: said, with what to do
    Trainer(TrainConfig(str(archive), str(first), **TINY), progress=False).close()
    (first / "checkpoints" / "ckpt-000000000032.tmp").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"the first, ckpt-000000000032.tmp, was cut short .* without --resume"):
        Trainer(TrainConfig(str(archive), str(first), **TINY), resume=True, progress=False)


@pytest.mark.parametrize("how", ["message", "dev-full"])
def test_a_checkpoint_that_cannot_be_written_names_it_and_the_intact_one(archive, tmp_path, monkeypatch, how):
    """A full disk: torch.save says only "file write failed", or (torch's own ENOSPC path, writing to
    /dev/full) "unexpected pos 64 vs 0", and names no file; the error names the checkpoint, says that
    the last one is intact, and frees the half-written one's space."""
    import os
    import xrayforge.train.trainer as trainer_module
    from xrayforge.errors import UserError
    if how == "dev-full" and not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full here")
    run = tmp_path / "run"
    Trainer(TrainConfig(str(archive), str(run), max_images=64, **TINY), progress=False).train()
    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        if str(f).endswith("state.pt"):
            if how == "dev-full":  # every write fails with ENOSPC, inside torch's zip writer
                return real_save(obj, "/dev/full", *args, **kwargs)
            raise RuntimeError("[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed writing "
                               "file data/0: file write failed")
        return real_save(obj, f, *args, **kwargs)
    monkeypatch.setattr(trainer_module.torch, "save", full_disk)
    with pytest.raises(UserError, match=r"ckpt-000000000128.tmp: cannot write the checkpoint at 128 images \(.*\); "
                                        r"is the disk full\? The run's last checkpoint, ckpt-000000000064, is kept"):
        Trainer(TrainConfig(str(archive), str(run), max_images=128, **TINY), resume=True, progress=False).train()
    assert sorted(p.name for p in (run / "checkpoints").glob("ckpt-*")) == ["ckpt-000000000064"]


def test_another_error_while_checkpointing_is_not_called_a_full_disk(archive, tmp_path, monkeypatch):
    """Only torch's write failures are a full disk; a CUDA error surfacing at the copy to the host (or
    any other RuntimeError) is raised as it is, not hidden behind "is the disk full?"."""
    import xrayforge.train.trainer as trainer_module
    real_save = torch.save

    def cuda_error(obj, f, *args, **kwargs):
        if str(f).endswith("state.pt"):
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return real_save(obj, f, *args, **kwargs)
    monkeypatch.setattr(trainer_module.torch, "save", cuda_error)
    with pytest.raises(RuntimeError, match="illegal memory access") as info:
        Trainer(TrainConfig(str(archive), str(tmp_path / "run"), max_images=64, **TINY), progress=False).train()
    assert "disk" not in str(info.value)


def _flip_a_byte_inside(path):
    """Flip one bit in the middle of a torch file: its zip directory stays whole, so that torch (which
    checks no CRC) loads it; only the recorded digest tells."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def test_a_checkpoint_changed_on_disk_is_found_by_its_digest_and_the_older_one_used(archive, tmp_path, caplog):
    """A flipped bit inside state.pt or networks.pt loaded silently (torch's zip reader checks no CRC):
    the resume and find_checkpoint now skip it, naming the file, and use the older intact checkpoint."""
    from xrayforge.nn.checkpoint import damage, find_checkpoint, load_networks
    from xrayforge.errors import UserError
    run = tmp_path / "run"
    Trainer(TrainConfig(str(archive), str(run), max_images=128, **TINY), progress=False).train()
    ckpts = run / "checkpoints"
    newest = ckpts / "ckpt-000000000128"
    assert damage(newest, ("networks.pt", "state.pt")) is None
    torch.load(newest / "state.pt", weights_only=True)  # loads before the flip ...
    _flip_a_byte_inside(newest / "state.pt")
    assert damage(newest, ("networks.pt",)) is None  # ... networks.pt is intact
    assert "state.pt: damaged: its contents changed after it was written" in damage(newest, ("networks.pt", "state.pt"))
    with caplog.at_level("WARNING"):
        trainer = Trainer(TrainConfig(str(archive), str(run), **TINY), resume=True, progress=False)
    assert trainer.images_seen == 64 and "ckpt-000000000128/state.pt: damaged" in caplog.text
    trainer.close()
    assert (ckpts / "damaged-ckpt-000000000128").is_dir()
    # networks.pt: sampling's find_checkpoint skips it too, and loading the folder itself is refused
    other = tmp_path / "other"
    Trainer(TrainConfig(str(archive), str(other), max_images=128, **TINY), progress=False).train()
    newest = other / "checkpoints" / "ckpt-000000000128"
    _flip_a_byte_inside(newest / "networks.pt")
    with caplog.at_level("WARNING"):
        assert find_checkpoint(other).name == "ckpt-000000000064"
    assert "networks.pt: damaged" in caplog.text
    with pytest.raises(UserError, match="networks.pt: damaged: its contents changed"):
        load_networks(newest)


def test_an_optimiser_state_that_does_not_fit_names_the_file(archive, tmp_path):
    from xrayforge.errors import UserError
    run = tmp_path / "run"
    Trainer(TrainConfig(str(archive), str(run), max_images=96, **TINY), progress=False).train()
    ckpt = run / "checkpoints" / "ckpt-000000000096"  # inside a phase: its Adam state is restored
    state = torch.load(ckpt / "state.pt", weights_only=False)
    state["opt_g"]["param_groups"][0]["params"] = state["opt_g"]["param_groups"][0]["params"][:-1]
    rewrite_checkpoint_file(ckpt, "state.pt", state)
    with pytest.raises(UserError, match=r"ckpt-000000000096/state.pt: its optimiser state opt_g does not fit the "
                                        r"networks' parameters \(.*\): the checkpoint is from another network"):
        Trainer(TrainConfig(str(archive), str(run), **TINY), resume=True, progress=False)


def test_resuming_through_the_api_with_another_schedule_is_refused(archive, tmp_path):
    """The command line refused options that train otherwise on --resume; the Trainer API took them and
    went on as another training without a word."""
    from xrayforge.errors import UserError
    from xrayforge.train.trainer import FIXED_ON_RESUME, saved_options
    run = tmp_path / "run"
    Trainer(TrainConfig(str(archive), str(run), max_images=64, **TINY), progress=False).train()
    changed = {"fade_images": 32, "batch": {4: 8, 8: 4, 16: 8}, "lr": 2e-3, "ema_rampup": 0.2, "seed": 3}
    for name, value in changed.items():
        with pytest.raises(UserError, match=rf"these train otherwise: {name} .*\(the run's: "):
            Trainer(TrainConfig(str(archive), str(run), **{**TINY, name: value}), resume=True, progress=False)
    # what leaves the training as it was: the same options written otherwise, the stop, the saved options
    same = {**TINY, "batch": {"4": 8, "8": 8, "16": 8}, "lr_by_resolution": {"8": 1e-3}, "ema_rampup": 0.05,
            "max_images": 96, "amp": None}
    Trainer(TrainConfig(str(archive), str(run), **same), resume=True, progress=False).close()
    Trainer(TrainConfig(**saved_options(run)), resume=True, progress=False).close()
    # a run that starts at 8 px: a batch or learning rate at 4 px, never trained, is not compared
    later = tmp_path / "later"
    Trainer(TrainConfig(str(archive), str(later), max_images=32, **{**TINY, "start_resolution": 8}),
            progress=False).train()
    Trainer(TrainConfig(str(archive), str(later), start_resolution=8, lr_by_resolution={4: 5e-3},
                        **{**TINY, "batch": {4: 2, 8: 8, 16: 8}}), resume=True, progress=False).close()
    from xrayforge.cli.train import _FIXED_ON_RESUME  # the command line refuses the same settings first
    assert set(FIXED_ON_RESUME) <= set(_FIXED_ON_RESUME.values())


def test_the_batches_auto_batch_found_are_kept_in_the_checkpoint(archive, tmp_path):
    """A resume probed the largest batch anew (other GPU memory free, another batch: another training)."""
    run = tmp_path / "run"
    trainer = Trainer(TrainConfig(str(archive), str(run), max_images=64, **TINY), progress=False)
    trainer._auto_batches[2] = 4  # as the probe at 16 px would have found on a GPU
    trainer.train()
    assert torch.load(run / "checkpoints" / "ckpt-000000000064" / "state.pt", weights_only=True)["auto_batches"] == {2: 4}
    resumed = Trainer(TrainConfig(str(archive), str(run), **TINY), resume=True, progress=False)
    assert resumed._auto_batches == {2: 4}
    resumed.close()
