"""The best measured checkpoint (train --metrics): marked as part of the checkpoint's atomic write,
kept in line with the checkpoints on resume, and chosen among comparable measurements only."""
import json
from types import SimpleNamespace

import pytest

import xrayforge.train.trainer as trainer_module
from xrayforge.cli import main as cli
from xrayforge.fid.training import TrainingMetrics
from xrayforge.train.trainer import TrainConfig, Trainer


@pytest.fixture(scope="module")
def world(metrics_world):
    return metrics_world


def _config(world, out, **kw):
    # ticks of 16 images: 4 px at 16 and 32, the fade to 8 px at 48 and 64, 8 px faded in from 80
    return TrainConfig(str(world / "arc"), str(out), **{
        **dict(resolution=8, fade_images=32, stable_images=32, tick_images=16, latent_dim=16, fmap_base=64,
               fmap_max=16, batch={4: 16, 8: 16}, realism_images=0, checkpoint_ticks=1, keep_checkpoints=1,
               metrics=["prdc"], metrics_every=1, metrics_images=12, metrics_features=f"classifier:{world / 'clf'}",
               max_images=80), **kw})


def _measure(cfg):
    return TrainingMetrics(cfg.archive, cfg.out, cfg.metrics, cfg.metrics_features, cfg.metrics_images)


def test_a_kill_between_the_checkpoint_and_best_json_loses_no_best(world, tmp_path, monkeypatch):
    """best.json was written after the checkpoint's rename: a kill between the two left the best
    checkpoint unmarked, and a resume (keeping one checkpoint) rotated it away as any other."""
    cfg = _config(world, tmp_path / "run")
    real_write = trainer_module.write_text_atomic

    def killed_at_best(path, text, *a, **k):
        if str(path).endswith("best.json"):
            raise KeyboardInterrupt("killed")
        return real_write(path, text, *a, **k)
    monkeypatch.setattr(trainer_module, "write_text_atomic", killed_at_best)
    with pytest.raises(KeyboardInterrupt):
        Trainer(cfg, progress=False, measure=_measure(cfg)).train()
    monkeypatch.setattr(trainer_module, "write_text_atomic", real_write)
    ck = tmp_path / "run" / "checkpoints"
    assert not (ck / "best.json").exists() and (ck / "ckpt-000000000080").is_dir()
    t = Trainer(cfg, resume=True, progress=False, measure=_measure(cfg))
    assert t.best is not None and t.best["checkpoint"] == "ckpt-000000000080" and t.best["tick"] == 5
    assert json.loads((ck / "best.json").read_text()) == t.best  # written again on resume


def test_a_best_json_naming_a_damaged_checkpoint_is_removed_on_resume(world, tmp_path, caplog):
    """The best (newest) checkpoint damaged: a resume from the older one renamed it damaged-* and dropped
    the best in memory, but left best.json naming it: `evaluate report` showed a checkpoint that is gone."""
    cfg = _config(world, tmp_path / "run", keep_checkpoints=2)
    Trainer(cfg, progress=False, measure=_measure(cfg)).train()
    ck = tmp_path / "run" / "checkpoints"
    assert json.loads((ck / "best.json").read_text())["checkpoint"] == "ckpt-000000000080"
    (ck / "ckpt-000000000080" / "networks.pt").write_bytes(b"torn")
    with caplog.at_level("WARNING"):
        t = Trainer(cfg, resume=True, progress=False, measure=_measure(cfg))
    assert t.images_seen == 64 and t.best is None
    assert not (ck / "best.json").exists()
    assert cli(["evaluate", "report", str(tmp_path / "run"), "--out", str(tmp_path / "r.html")]) == 0
    assert "Best checkpoint" not in (tmp_path / "r.md").read_text()


def test_report_says_where_best_json_names_a_checkpoint_that_is_gone(world, tmp_path):
    """Before any resume has brought best.json in line, the report named a checkpoint that was gone."""
    cfg = _config(world, tmp_path / "run", keep_checkpoints=2)
    Trainer(cfg, progress=False, measure=_measure(cfg)).train()
    ck = tmp_path / "run" / "checkpoints"
    report = ["evaluate", "report", str(tmp_path / "run"), "--out", str(tmp_path / "r.html")]
    assert cli(report) == 0
    text = (tmp_path / "r.md").read_text()
    assert "Best checkpoint: ckpt-000000000080" in text and "no longer in" not in text
    (ck / "ckpt-000000000080").rename(ck / "damaged-ckpt-000000000080")
    assert cli(report) == 0
    text = (tmp_path / "r.md").read_text()
    assert "Best checkpoint: ckpt-000000000080" in text and f"It is no longer in {ck}" in text
    # a record naming a path elsewhere that happens to be a folder is no checkpoint of this run
    record = json.loads((ck / "best.json").read_text())
    (ck / "best.json").write_text(json.dumps({**record, "checkpoint": "../checkpoints"}))
    assert cli(report) == 0
    assert f"It is no longer in {ck}" in (tmp_path / "r.md").read_text()
    # damaged (torn, or valid JSON but not the record): said, and the report stands (it stopped with an error)
    for damaged in ('{"checkpoint": "ckpt-0', json.dumps({**record, "images": "many"}), "[1, 2]"):
        (ck / "best.json").write_text(damaged)
        assert cli(report) == 0
        text = (tmp_path / "r.md").read_text()
        assert "Best checkpoint" not in text and "best.json" in text and "`train --resume` writes it again" in text
        assert "## Training" in text
    # a record whose measurement is not a number (a hand edit): shown as n/a (formatting it stopped the report)
    (ck / "best.json").write_text(json.dumps({**record, "fid": "abc", "precision": None}))
    assert cli(report) == 0
    assert "fid n/a, precision n/a" in (tmp_path / "r.md").read_text()


def test_scores_of_another_kind_are_not_compared(caplog, tmp_path):
    """Resumed with --metrics fid after --metrics prdc (or the reverse) in the same feature space, an FID
    was compared with 1 - coverage: an FID of 1 never beat a coverage of 0.5, and the best stuck."""
    t = SimpleNamespace(measure=SimpleNamespace(score=TrainingMetrics.score), rank=0, ckpt_dir=tmp_path,
                        schedule=SimpleNamespace(final_level=1), best=None)
    rec = {"level": 1, "alpha": 1.0, "metrics_features": "inception", "metrics_images": 20}
    t.best = {"checkpoint": "ckpt-1", "score": 0.5, "coverage": 0.5, "metrics_features": "inception",
              "metrics_images": 20}
    with caplog.at_level("WARNING"):
        assert Trainer._better(t, {**rec, "fid": 1.0, "coverage": 0.9})
    assert "1 - coverage in inception" in caplog.text and "starts anew" in caplog.text
    t.best = {"checkpoint": "ckpt-1", "score": 45.0, "fid": 45.0, "coverage": 0.1, "metrics_features": "inception",
              "metrics_images": 20}
    assert Trainer._better(t, {**rec, "coverage": 0.0})  # not compared: a new best, not a "better" 1 - 0 < 45
    assert not Trainer._better(t, {**rec, "fid": 46.0, "coverage": 0.9})  # comparable: worse
    assert Trainer._better(t, {**rec, "fid": 44.0, "coverage": 0.0})
    for bad in (float("inf"), float("-inf"), float("nan")):
        assert not Trainer._better(t, {**rec, "fid": bad})


@pytest.mark.parametrize("text, said", [('{"checkpoint": "ckpt-0000', "not valid JSON"),
                                        ('{"checkpoint": "ckpt-x", "images": null}', "not a best checkpoint's record")])
def test_a_damaged_best_json_does_not_block_the_resume(text, said, world, tmp_path, caplog, monkeypatch):
    """A damaged best.json (a hand edit, a disk error) refused --resume with 'not valid JSON' (and
    one of valid JSON with a field of another type stopped it with a bare TypeError); the checkpoint
    carries its own record, and best.json is written again from it. Where that cannot be written
    (a full disk) the resume goes on, said."""
    cfg = _config(world, tmp_path / "run")
    Trainer(cfg, progress=False, measure=_measure(cfg)).train()
    path = tmp_path / "run" / "checkpoints" / "best.json"
    best = json.loads(path.read_text())
    path.write_text(text)
    with caplog.at_level("WARNING"):
        t = Trainer(cfg, resume=True, progress=False, measure=_measure(cfg))
    assert t.best == best and json.loads(path.read_text()) == best
    assert said in caplog.text
    t.close()
    path.write_text(text)

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(trainer_module, "write_text_atomic", full)
    with caplog.at_level("WARNING"):
        t = Trainer(cfg, resume=True, progress=False, measure=_measure(cfg))
    assert t.best == best and "could not be brought in line" in caplog.text
    t.close()


def _tiny_checkpoint(folder):
    from xrayforge.nn import Generator, NetworkConfig, save_networks
    return save_networks(folder, {"G": Generator(NetworkConfig(resolution=8, latent_dim=8, channels=[8, 4]))})


@pytest.mark.parametrize("edit, said", [
    (lambda m: m["networks"]["G"]["config"].update(style_mixing=0.9), r"networks.json: cannot build G from it "
                                                                        r"\(TypeError: .*style_mixing"),
    (lambda m: m["networks"]["G"].update({"class": "Mapping"}), r"networks.json: cannot build G from it \(KeyError"),
    (lambda m: m["networks"]["G"].pop("level"), r"networks.json: cannot build G from it \(KeyError: 'level'"),
    (lambda m: m.update(version="1"), r"networks.json: damaged: its version is '1', not a number"),
    (lambda m: m.pop("networks"), r"networks.json: damaged: it names no networks"),
])
def test_a_networks_json_this_xrayforge_cannot_build_from_is_said_of_the_file(tmp_path, edit, said):
    """A setting of a newer xrayforge, or a hand edit, raised a bare TypeError / KeyError (the command line's
    'unexpected error', no file named) from load_networks, and from damage() on a version that is no number."""
    from xrayforge.errors import UserError
    from xrayforge.nn import find_checkpoint, load_networks
    folder = _tiny_checkpoint(tmp_path / "ck")
    meta = json.loads((folder / "networks.json").read_text())
    edit(meta)
    (folder / "networks.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match=said):
        load_networks(find_checkpoint(folder))


def test_find_checkpoint_takes_a_checkpoint_file_and_names_a_cut_short_one(tmp_path):
    """networks.pt of a checkpoint was 'not a checkpoint'; a run whose only checkpoint was cut short while it
    was written was 'not ... a run folder with checkpoints'."""
    import shutil

    from xrayforge.nn import find_checkpoint
    folder = _tiny_checkpoint(tmp_path / "ck")
    assert find_checkpoint(folder / "networks.pt") == folder
    assert find_checkpoint(folder / "networks.json") == folder
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    shutil.copytree(folder, tmp_path / "run" / "checkpoints" / "ckpt-000000000100.tmp")
    with pytest.raises(FileNotFoundError, match=r"run: a run folder without a usable checkpoint: its only one, "
                                                r"ckpt-000000000100.tmp, was cut short"):
        find_checkpoint(tmp_path / "run")


def test_load_networks_takes_one_name_as_a_string(tmp_path):
    """names="G_ema" was taken letter by letter: G loaded too ("G" is in "G_ema"), then an error naming
    the letters '_', 'a', 'e', 'm' as networks it does not have."""
    from xrayforge.nn import Discriminator, Generator, NetworkConfig, load_networks, save_networks
    config = NetworkConfig(resolution=8, latent_dim=8, channels=[8, 4])
    save_networks(tmp_path / "ck", {"G": Generator(config), "D": Discriminator(config), "G_ema": Generator(config)})
    assert set(load_networks(tmp_path / "ck", names="G_ema")) == {"G_ema"}
