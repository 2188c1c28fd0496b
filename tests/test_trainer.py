import json
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as tmp_mp

from xrayforge.data.prepare import prepare
from xrayforge.nn import load_networks
from xrayforge.train.schedule import ProgressiveSchedule
from xrayforge.train.trainer import TrainConfig, Trainer

TINY = dict(fade_images=64, stable_images=64, tick_images=32, latent_dim=8, fmap_base=32, fmap_max=8,
            batch={4: 8, 8: 8, 16: 8}, checkpoint_ticks=2, keep_checkpoints=2)


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "phantom16"
    prepare("phantom:48", path, resolution=16, workers=1, progress=False)
    return path


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
