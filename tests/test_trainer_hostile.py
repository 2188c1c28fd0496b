"""Hostile checks of the trainer: bad resumes and what they say."""
import pytest

from xrayforge.data.prepare import prepare
from xrayforge.train.trainer import TrainConfig, Trainer

TINY = dict(fade_images=64, stable_images=64, tick_images=32, latent_dim=8, fmap_base=32, fmap_max=8,
            batch={4: 8, 8: 8, 16: 8}, checkpoint_ticks=2, keep_checkpoints=2, realism_images=0, device="cpu")


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "phantom8"
    prepare("phantom:16", path, resolution=8, workers=1, progress=False)
    return path


def test_resuming_a_run_killed_before_its_first_checkpoint_says_to_start_it_again(archive, tmp_path):
    """A kill before the first checkpoint leaves train_config.json and a log, no checkpoint: --resume
    must say what to do (start again without --resume), not only that there is nothing."""
    run = tmp_path / "run"
    Trainer(TrainConfig(str(archive), str(run), **TINY), progress=False).close()
    (run / "log.jsonl").write_text('{"tick": 1, "images": 32}\n')
    with pytest.raises(FileNotFoundError, match=r"checkpoints: no checkpoint to resume from .*without --resume"):
        Trainer(TrainConfig(str(archive), str(run), **TINY), resume=True, progress=False)


def test_activation_checkpointing_above_the_resolution_is_refused(archive, tmp_path, capsys):
    """--checkpoint-min-res 16 with --resolution 8 was accepted and checkpointed nothing: the memory
    it was asked to save was not saved, without a word."""
    from xrayforge.cli import main as cli
    with pytest.raises(ValueError, match="checkpoint_min_res 16 is above the resolution 8: no layer would be"):
        TrainConfig(str(archive), str(tmp_path / "run"), resolution=8, checkpoint_min_res=16, **TINY)
    TrainConfig(str(archive), str(tmp_path / "run"), resolution=8, checkpoint_min_res=8, **TINY)
    assert cli(["train", str(archive), "--out", str(tmp_path / "run"), "--resolution", "8", "--checkpoint-min-res",
                "16", "--device", "cpu", "-q"]) != 0
    assert "no layer would be checkpointed" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
