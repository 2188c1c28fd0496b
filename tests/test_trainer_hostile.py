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


def test_checkpoint_rotation_leaves_a_users_copies_alone(archive, tmp_path):
    """Rotation sorted every ckpt-* by name: a copy the user kept beside the checkpoints
    (ckpt-<images>-keep, ckpt-<images>.bak) counted among those kept, pushing one of the run's own out,
    and was removed in turn once it fell out of the window."""
    import shutil
    run = tmp_path / "run"
    Trainer(TrainConfig(str(archive), str(run), **TINY, max_images=64), progress=False).train()
    ck = run / "checkpoints"
    assert [p.name for p in sorted(ck.glob("ckpt-*"))] == ["ckpt-000000000064"]
    for copy in ("ckpt-000000000064-keep", "ckpt-000000000064.bak"):
        shutil.copytree(ck / "ckpt-000000000064", ck / copy)
    Trainer(TrainConfig(str(archive), str(run), **TINY), resume=True, progress=False).train()
    assert (ck / "ckpt-000000000064-keep" / "networks.pt").is_file()
    assert (ck / "ckpt-000000000064.bak" / "networks.pt").is_file()
    # the run's own, as many as keep_checkpoints (2): the newest
    assert sorted(p.name for p in ck.glob("ckpt-*") if p.name[5:].isdigit()) == ["ckpt-000000000128",
                                                                                 "ckpt-000000000192"]


def test_a_resume_past_its_total_is_refused(archive, tmp_path):
    """--resume --total-kimg below the images a run had trained on trained nothing, warned that the run
    would end at a resolution it had left behind, and kept that total in train_config.json, so that
    every later plain --resume did nothing as well."""
    import json
    from xrayforge.cli import main as cli
    from xrayforge.errors import UserError
    run = tmp_path / "run"
    Trainer(TrainConfig(str(archive), str(run), **TINY, max_images=160), progress=False).train()
    with pytest.raises(UserError, match=r"trained on 160 images, past the total of 100 .*nothing left to train"):
        Trainer(TrainConfig(str(archive), str(run), **TINY, total_images=100), resume=True, progress=False)
    saved = (run / "train_config.json").read_text()
    assert cli(["train", "--out", str(run), "--resume", "--total-kimg", "0.1", "-q"]) == 1
    assert (run / "train_config.json").read_text() == saved
    assert json.loads(saved)["total_images"] is None
    # a total the last batch ran past (the run ended at it) is no refusal: nothing is left, and it says so
    Trainer(TrainConfig(str(archive), str(run), **TINY, total_images=155), resume=True, progress=False).close()
    summary = Trainer(TrainConfig(str(archive), str(run), **TINY), resume=True, progress=False).train()
    assert summary["images_seen"] == 192 and summary["complete"]


def test_a_learning_rate_or_batch_given_twice_is_refused():
    """--lr 8:0.1,8:0.2, --lr 0.001,0.002 and --batch 8:4,8:8 took the last value without a word."""
    import argparse
    from xrayforge.cli.train import _parse_batch, _parse_lr
    for text, says in (("8:0.1,8:0.2", "8 px is given twice"), ("0.001,0.002", "more than one base LR"),
                       ("0.002,8:0.1,0.001", "more than one base LR")):
        with pytest.raises(argparse.ArgumentTypeError, match=says):
            _parse_lr(text)
    with pytest.raises(argparse.ArgumentTypeError, match="8 px is given twice"):
        _parse_batch("8:4,16:8,8:8")
    assert _parse_lr("0.002,8:0.1,16:0.2") == (0.002, {8: 0.1, 16: 0.2})
    assert _parse_batch("8:4,16:8") == {8: 4, 16: 8}


def test_a_batch_whose_minibatch_stddev_groups_are_single_images_is_warned_about(archive, tmp_path, caplog):
    """A batch of 5 (or 1, 7, ...): no group size from 2 to 4 divides it, so D's minibatch-stddev
    statistic is that of single images, a constant. Accumulation that does this is refused; the batch
    itself was taken without a word."""
    import logging
    with caplog.at_level(logging.WARNING):
        Trainer(TrainConfig(str(archive), str(tmp_path / "run"), **{**TINY, "batch": {4: 5, 8: 6}}),
                progress=False).close()
    said = [r.getMessage() for r in caplog.records if "single images" in r.getMessage()]
    assert len(said) == 1 and "batch 5 at 4 px:" in said[0], said
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        Trainer(TrainConfig(str(archive), str(tmp_path / "run2"), **TINY), progress=False).close()
    assert not [r for r in caplog.records if "single images" in r.getMessage()]


@pytest.mark.parametrize("edit", [{"batch": "x"}, {"fade_images": "64"}, {"batch": {"8": "four"}}, {"mirror": "no"}])
def test_a_hand_edited_train_config_of_the_wrong_type_is_refused_naming_it(archive, tmp_path, capsys, edit):
    """A value of another kind in train_config.json stopped --resume with 'an unexpected error'
    (AttributeError: 'str' object has no attribute 'get') or a comparison of text and a number."""
    import json
    from xrayforge.cli import main as cli
    run = tmp_path / "run"
    Trainer(TrainConfig(str(archive), str(run), **TINY, max_images=64), progress=False).train()
    saved = json.loads((run / "train_config.json").read_text())
    (run / "train_config.json").write_text(json.dumps({**saved, **edit}))
    capsys.readouterr()
    assert cli(["train", "--out", str(run), "--resume", "-q"]) == 1
    err = capsys.readouterr().err
    name = next(iter(edit))
    assert "train_config.json" in err and name in err and "unexpected" not in err and "Traceback" not in err


def test_a_run_whose_every_checkpoint_is_damaged_says_how_to_go_on(archive, tmp_path):
    """Every checkpoint damaged: the resume named only the newest, and a new start in the folder is refused
    for its checkpoints: the message now says that all are damaged and to move them away."""
    from xrayforge.errors import UserError
    from xrayforge.nn.checkpoint import checkpoint_dirs
    run = tmp_path / "run"
    Trainer(TrainConfig(str(archive), str(run), **TINY, max_images=160), progress=False).train()
    ckpts = checkpoint_dirs(run / "checkpoints")
    assert len(ckpts) == 2
    for c in ckpts:
        (c / "state.pt").write_bytes(b"torn")
    with pytest.raises(UserError, match=r"no usable checkpoint.*\(and the 1 older one too\); nothing to resume from: "
                                        r"start a new --out \(or move .*checkpoints away"):
        Trainer(TrainConfig(str(archive), str(run), **TINY), resume=True, progress=False)


def test_a_checkpoints_file_in_the_run_folder_is_refused_before_training(archive, tmp_path):
    """RUN/checkpoints as a file was found only when the first checkpoint was written, after a tick of
    training, and blamed on a full disk."""
    from xrayforge.errors import UserError
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoints").write_text("not a folder")
    with pytest.raises(UserError, match=r"checkpoints: is a file, where the run keeps its checkpoints"):
        Trainer(TrainConfig(str(archive), str(run), **TINY, max_images=64), progress=False)
    assert not (run / "log.jsonl").exists()



def test_a_diverged_run_stops_without_writing_a_checkpoint_of_nan(archive, tmp_path, monkeypatch):
    """A run whose weights went NaN (a diverged WGAN-GP) trained on: Adam cannot bring a NaN back, so it
    wrote checkpoints of NaN (rotating the good ones out) and grids of black images until its total. It
    stops at the tick, before the tick's checkpoint, saying where it diverged and which checkpoint is kept;
    a checkpoint of non-finite weights is refused when loaded (sampling it wrote black files)."""
    import torch

    from xrayforge.errors import UserError
    from xrayforge.nn import load_networks, save_networks
    run = tmp_path / "run"
    trainer = Trainer(TrainConfig(str(archive), str(run), **TINY, max_images=192), progress=False)
    from xrayforge.train import trainer as module
    step = module.PGGANStep.__call__

    def poisoned(self, *args, **kwargs):  # the 9th batch (72 images) leaves a NaN in G's weights
        out = step(self, *args, **kwargs)
        if trainer.images_seen == 64:
            with torch.no_grad():
                trainer.G.dense.weight[0, 0] = float("nan")
        return out
    monkeypatch.setattr(module.PGGANStep, "__call__", poisoned)
    with pytest.raises(UserError, match=r"training diverged at 96 images .*: G\.dense_bias, .* no longer finite "
                                        r"\(NaN or inf; d_loss nan.*"
                                        r"The last checkpoint, ckpt-000000000064, is finite"):
        trainer.train()
    assert sorted(p.name for p in (run / "checkpoints").glob("ckpt-*")) == ["ckpt-000000000064"]
    load_networks(run / "checkpoints" / "ckpt-000000000064")  # finite: loads
    with torch.no_grad():
        trainer.G_ema.dense_bias[0] = float("inf")
    save_networks(tmp_path / "bad", {"G_ema": trainer.G_ema})
    with pytest.raises(UserError, match=r"networks.pt: the weights of G_ema are not finite "
                                        r"\(NaN or inf in dense_bias\).*use an "
                                        r"earlier one"):
        load_networks(tmp_path / "bad")


def test_ema_rampup_with_a_constant_ema_beta_is_refused(archive, tmp_path, capsys):
    """--ema-beta 0.9 --ema-rampup 0.3 trained with the constant beta: the ramp-up asked for was accepted and
    ignored without a word (--ema-kimg with --ema-beta is refused for the same reason)."""
    from xrayforge.cli import main as cli
    assert cli(["train", str(archive), "--out", str(tmp_path / "run"), "--ema-beta", "0.9", "--ema-rampup", "0.3",
                "--latent-dim", "8", "--fmap-base", "32", "--fmap-max", "8", "--batch", "8", "--max-kimg", "0.008",
                "--realism-images", "0", "--device", "cpu", "-q"]) == 2
    assert "--ema-beta is a constant beta with no ramp-up" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_batch_given_to_the_resume_of_an_auto_batch_run_is_refused(archive, tmp_path, capsys):
    """A run with --auto-batch (its batches found by the probe) resumed with --batch 16: the command line
    compared 16 with the default batch, found them equal and went on with the probe's batches, --batch
    ignored; --batch 8 was refused as differing from "the run's: 16", a batch the run never had."""
    from xrayforge.cli import main as cli
    run = tmp_path / "run"
    Trainer(TrainConfig(str(archive), str(run), **{**TINY, "batch": {}}, auto_batch=True, max_images=32),
            progress=False).train()
    capsys.readouterr()
    for given in ("16", "8"):
        assert cli(["train", "--out", str(run), "--resume", "--batch", given, "--max-kimg", "0.048", "-q"]) == 2
        assert f"--batch {given} (the run's: auto)" in capsys.readouterr().err
    assert sorted(p.name for p in (run / "checkpoints").glob("ckpt-*")) == ["ckpt-000000000032"]


def test_per_resolution_entries_at_resolutions_never_trained_are_said(archive, tmp_path, caplog):
    """--batch 4:8,8:8,32:4 or --lr 0.001,16:0.002 on a run to 8 px: the entries for 32 and 16 px were
    taken and never used, without a word (a typo such as 128:4 for a 64-px run trained on the default)."""
    import logging
    from xrayforge.cli.train import _parse_batch
    with caplog.at_level(logging.WARNING):
        Trainer(TrainConfig(str(archive), str(tmp_path / "run"), **{**TINY, "batch": {4: 8, 8: 8, 32: 4}},
                            lr_by_resolution={16: 0.002, 8: 0.003}), progress=False).close()
    said = [r.getMessage() for r in caplog.records if "never trains" in r.getMessage()]
    assert len(said) == 1 and "batch 32:4, lr 16:0.002: at a resolution this run never trains (4 to 8 px)" in said[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # `--batch 8`: one batch for every resolution, no table
        Trainer(TrainConfig(str(archive), str(tmp_path / "run2"), **{**TINY, "batch": _parse_batch("8")},
                            start_resolution=8), progress=False).close()
    assert not [r for r in caplog.records if "never trains" in r.getMessage()]


def test_a_resume_at_its_session_stop_is_refused(archive, tmp_path, capsys):
    """--resume --max-kimg at or below the images a run has seen trained nothing and printed "trained to
    64 images ..." with exit status 0, as if this session had trained."""
    from xrayforge.cli import main as cli
    from xrayforge.errors import UserError
    run = tmp_path / "run"
    Trainer(TrainConfig(str(archive), str(run), **TINY, max_images=64), progress=False).train()
    log = (run / "log.jsonl").read_text()
    saved = (run / "train_config.json").read_text()
    trainer = Trainer(TrainConfig(str(archive), str(run), **TINY, max_images=64), resume=True, progress=False)
    with pytest.raises(UserError, match=r"trained on 64 images, already at or past the stop of 64 .*nothing to train"):
        trainer.train()  # (made, the trainer shows the run's state: only training nothing is refused)
    assert (run / "train_config.json").read_text() == saved
    capsys.readouterr()
    assert cli(["train", "--out", str(run), "--resume", "--max-kimg", "0.032", "-q"]) == 1
    assert "Give a --max-kimg above 0.064" in capsys.readouterr().err
    assert (run / "log.jsonl").read_text() == log
    from xrayforge.train.trainer import saved_options  # the run's options, not its first session's stop
    assert "max_images" not in saved_options(run)
    Trainer(TrainConfig(**saved_options(run)), resume=True, progress=False).close()
