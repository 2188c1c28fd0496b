"""Metrics during training (train --metrics): what is logged equals the same measurement made
afterwards on the saved G_ema; the real side is computed once per run; the best checkpoint is
kept out of rotation and named in checkpoints/best.json; a resumed run keeps it."""
import json
import math

import pytest
import torch

from xrayforge.cli import main as cli
from xrayforge.fid.training import TrainingMetrics
from xrayforge.nn import load_networks
from xrayforge.nn.classifier import ChestClassifier, ClassifierConfig
from xrayforge.train.trainer import TrainConfig, Trainer

TINY = ["--resolution", "8", "--fade-kimg", "0.032", "--stable-kimg", "0.032", "--batch", "16", "--tick-kimg",
        "0.016", "--latent-dim", "16", "--fmap-base", "64", "--fmap-max", "16", "--realism-images", "0",
        "--checkpoint-ticks", "3", "--keep", "1", "--device", "cpu", "-q"]


@pytest.fixture(scope="module")
def world(metrics_world):
    return metrics_world


def test_logged_metrics_equal_a_measurement_of_the_saved_generator(world, tmp_path, capsys):
    run = tmp_path / "run"
    assert cli(["train", str(world / "arc"), "--out", str(run), *TINY, "--metrics", "fid,prdc", "--metrics-every",
                "2", "--metrics-images", "20", "--features", f"classifier:{world / 'clf'}"]) == 0
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    measured = [t for t in log if "fid" in t]
    assert [t["tick"] for t in measured] == [2, 4, 6]  # every 2 ticks, and the last
    for t in measured:
        assert t["fid"] >= 0 and all(0 <= t[k] <= 1 for k in ("precision", "recall", "coverage"))
        assert t["metrics_features"].startswith("classifier@") and t["metrics_images"] == 20
    # the same measurement, made afterwards on the final checkpoint's G_ema
    last = sorted((run / "checkpoints").glob("ckpt-*"))[-1]
    G = load_networks(last, names=["G_ema"])["G_ema"].eval()
    again = TrainingMetrics(world / "arc", run, ["fid", "prdc"], f"classifier:{world / 'clf'}", 20)
    got = again(lambda z: G(z, G.level, G.alpha), 16)
    for k in ("fid", "precision", "recall", "density", "coverage"):
        assert got[k] == pytest.approx(measured[-1][k], rel=1e-5, abs=1e-9), k
    # the real side: once per run and resolution measured faded in (4 px at tick 2, the final 8 px; the
    # 16-px archive's own size is never generated), a fade-in's (tick 4) each time
    assert sorted(p.name.rsplit("-", 1)[1] for p in (run / "metrics").glob("real-*.npz")) == ["4px.npz", "8px.npz"]
    best = json.loads((run / "checkpoints" / "best.json").read_text())
    # only a faded-in generator at the final resolution can be the best one (ticks 2 and 4: 4 px, fading)
    final = [t for t in measured if t["resolution"] == 8 and t["alpha"] == 1.0]
    assert [t["tick"] for t in final] == [6] and best["fid"] == final[0]["fid"] and best["tick"] == 6
    assert (run / "checkpoints" / best["checkpoint"]).is_dir()  # kept although --keep 1
    assert "Best checkpoint" in _report(run, tmp_path)


def _report(run, tmp_path):
    assert cli(["evaluate", "report", str(run), "--out", str(tmp_path / "r.html")]) == 0
    return (tmp_path / "r.md").read_text()


def test_a_resumed_run_keeps_its_best_checkpoint(world, tmp_path):
    cfg = TrainConfig(str(world / "arc"), str(tmp_path / "run"), resolution=8, fade_images=32, stable_images=32,
                      tick_images=16, latent_dim=16, fmap_base=64, fmap_max=16, batch={4: 16, 8: 16},
                      realism_images=0, checkpoint_ticks=1, keep_checkpoints=1, metrics=["prdc"], metrics_every=1,
                      metrics_images=12, metrics_features=f"classifier:{world / 'clf'}", max_images=80)
    measure = TrainingMetrics(cfg.archive, cfg.out, cfg.metrics, cfg.metrics_features, 12)
    Trainer(cfg, progress=False, measure=measure).train()
    best = json.loads((tmp_path / "run" / "checkpoints" / "best.json").read_text())
    assert best["score"] == pytest.approx(1 - best["coverage"])  # prdc alone: the best by coverage
    cfg.max_images = None
    t = Trainer(cfg, resume=True, progress=False, measure=measure)
    assert t.best == best
    t.train()
    kept = {p.name for p in (tmp_path / "run" / "checkpoints").glob("ckpt-*")}
    now = json.loads((tmp_path / "run" / "checkpoints" / "best.json").read_text())
    assert now["checkpoint"] in kept and now["score"] <= best["score"]
    # measured in another feature space (or on another number of images), the old best is not comparable
    other = ChestClassifier(ClassifierConfig(input_size=16, width=4))
    other.save(tmp_path / "clf2")
    cfg.metrics_features, cfg.total_images = f"classifier:{tmp_path / 'clf2'}", 128
    t = Trainer(cfg, resume=True, progress=False,
                measure=TrainingMetrics(cfg.archive, cfg.out, cfg.metrics, cfg.metrics_features, 12))
    t.train()
    moved = json.loads((tmp_path / "run" / "checkpoints" / "best.json").read_text())
    assert moved["metrics_features"] != now["metrics_features"] and moved["images"] > now["images"]
    now = moved
    # best.json naming a checkpoint that is gone is not trusted: the resumed checkpoint's own record is
    (tmp_path / "run" / "checkpoints" / "best.json").write_text(json.dumps({**now, "checkpoint": "ckpt-gone"}))
    assert Trainer(cfg, resume=True, progress=False, measure=measure).best == now
    assert json.loads((tmp_path / "run" / "checkpoints" / "best.json").read_text()) == now


def test_metrics_need_a_measure_and_valid_names(world, tmp_path):
    with pytest.raises(ValueError, match="need a measure"):
        Trainer(TrainConfig(str(world / "arc"), str(tmp_path / "r"), metrics=["fid"]), progress=False)
    with pytest.raises(ValueError, match="unknown"):
        TrainConfig(str(world / "arc"), str(tmp_path / "r"), metrics=["is"])
    with pytest.raises(SystemExit):
        cli(["train", str(world / "arc"), "--out", str(tmp_path / "r"), "--metrics", "fid,is"])
    with pytest.raises(ValueError, match="at least 6"):
        TrainingMetrics(world / "arc", tmp_path / "r", ["prdc"], f"classifier:{world / 'clf'}", 4)


def test_metrics_options_without_metrics_are_refused_not_ignored(world, tmp_path, capsys):
    """--metrics-every, --metrics-images, --features and --inception set how --metrics measures; given
    without it they were ignored without a word, on a new run and on a resumed run that measures nothing."""
    rc = cli(["train", str(world / "arc"), "--out", str(tmp_path / "new"), *TINY, "--metrics-images", "64",
              "--features", f"classifier:{world / 'clf'}"])
    err = capsys.readouterr().err
    assert rc == 2 and "--features, --metrics-images: only with --metrics, and none was given" in err, err
    assert not (tmp_path / "new").exists()
    run = tmp_path / "run"
    assert cli(["train", str(world / "arc"), "--out", str(run), *TINY, "--max-kimg", "0.016"]) == 0
    rc = cli(["train", "--out", str(run), "--resume", "--metrics-every", "2", "-q"])
    err = capsys.readouterr().err
    assert rc == 2 and "--metrics-every: only with --metrics, and the run measures nothing" in err, err
    assert json.loads((run / "train_config.json").read_text())["max_images"] == 16  # untouched


@pytest.mark.parametrize("include_test", [False, True])
def test_the_real_side_is_drawn_from_the_images_the_gan_trains_on(world, tmp_path, include_test):
    """The best checkpoint is chosen by these metrics: their real images stay outside the test split,
    on which the evaluations test (unless the GAN trains on it too)."""
    m = TrainingMetrics(world / "arc", tmp_path / "run", ["prdc"], f"classifier:{world / 'clf'}", 30,
                        include_test=include_test)
    splits = m.archive.splits
    assert "test" in splits and len(set(splits)) > 1
    drawn = []
    real_images = m.archive.images

    def spy(rows, resolution):
        drawn.extend(int(r) for r in rows)
        return real_images(rows, resolution)
    m.archive.images = spy
    m._real()
    assert len(drawn) == len(set(drawn)) == 30
    held_out = {i for i, s in enumerate(splits) if s == "test"}
    assert (len(held_out & set(drawn)) > 0) == include_test
    outside = len(splits) - len(held_out)
    if not include_test:
        with pytest.raises(Exception, match="outside its test split"):
            TrainingMetrics(world / "arc", tmp_path / "r2", ["prdc"], f"classifier:{world / 'clf'}", outside + 1)


def test_a_cache_drawn_from_every_row_by_an_earlier_version_is_drawn_again(world, tmp_path, caplog):
    """A run begun before the test split was left out cached real features drawn from every row;
    resumed, its measurements would go on choosing the best checkpoint partly on the test split."""
    import numpy as np
    m = TrainingMetrics(world / "arc", tmp_path / "run", ["prdc"], f"classifier:{world / 'clf'}", 30)
    stats, features = m._real()
    cache = np.load(m.cache)
    old = {k: cache[k] for k in cache.files if k != "drawn_from"}
    np.savez(m.cache, **{**old, "features": np.zeros_like(features)})  # as the earlier version saved it
    again = TrainingMetrics(world / "arc", tmp_path / "run", ["prdc"], f"classifier:{world / 'clf'}", 30)
    with caplog.at_level("WARNING"):
        _, drawn_again = again._real()
    assert "drawn from every row of the archive; they are drawn again" in caplog.text
    np.testing.assert_array_equal(drawn_again, features)
    assert str(np.load(m.cache)["drawn_from"]) == "outside the test split's patients"
    # one drawn from outside the test split's rows (an earlier version: its patients' other images in)
    np.savez(m.cache, **{**old, "drawn_from": np.array("outside the test split")})
    caplog.clear()
    with caplog.at_level("WARNING"):
        TrainingMetrics(world / "arc", tmp_path / "run", ["prdc"], f"classifier:{world / 'clf'}", 30)._real()
    assert "drawn from outside the test split of the archive; they are drawn again" in caplog.text


@pytest.mark.parametrize("alpha", [1.0, 0.25])
def test_the_real_side_is_compared_at_the_generated_resolution_and_alpha(world, tmp_path, alpha):
    """A run trained at 8 px on a 16-px archive (or a tick during growth) was measured against the
    16-px real images: a generator reproducing the real 8-px images exactly scored FID > 0. Faded
    in, the real images are blended as the generator's output (and the trainer's real batch) are."""
    import torch.nn.functional as F
    m = TrainingMetrics(world / "arc", tmp_path / "run", ["fid", "prdc"], f"classifier:{world / 'clf'}", 30,
                        batch_size=8)
    rows = m.archive.random_positions(30, m.seed + 31, m.rows)
    x = torch.from_numpy(m.archive.as_float(m.archive.images(rows, 8)))[:, None]
    if alpha < 1:
        x = torch.lerp(F.interpolate(F.avg_pool2d(x, 2), scale_factor=2.0, mode="nearest"), x, alpha)
    reals, at = x * 2 - 1, [0]

    def copies(z):  # the real images themselves, in order (FID and PRDC do not depend on the order)
        out = reals[at[0]:at[0] + len(z)]
        at[0] += len(z)
        return out
    got = m(copies, 16, **({"alpha": alpha} if alpha < 1 else {}))  # α = 1: the default
    assert got["fid"] == pytest.approx(0, abs=1e-3)
    assert got["precision"] == got["recall"] == got["coverage"] == 1.0


def test_a_diverged_generator_is_measured_as_nan_not_an_error(world, tmp_path, caplog):
    """NaN samples (a diverged G_ema) gave NaN features: the distance then failed (eigh, or a refusal of
    NaN statistics) and stopped training at a tick, where the trainer expects a NaN measurement."""
    m = TrainingMetrics(world / "arc", tmp_path / "run", ["fid", "prdc"], f"classifier:{world / 'clf'}", 12,
                        batch_size=4)
    with caplog.at_level("WARNING"):
        got = m(lambda z: torch.full((len(z), 1, 8, 8), float("nan")), 16)
    assert all(math.isnan(got[k]) for k in ("fid", "precision", "recall", "density", "coverage")), got
    assert "gave NaN or infinite features for 12 of 12 images" in caplog.text
    assert TrainingMetrics.score(got) != TrainingMetrics.score(got)  # NaN: never the best (below)


def test_a_nan_measurement_is_never_the_best_nor_blocks_a_later_one():
    """score < NaN is False: a first measurement with a NaN FID (a diverged G_ema) became the best and
    no later finite FID could replace it."""
    from types import SimpleNamespace
    t = SimpleNamespace(measure=SimpleNamespace(score=TrainingMetrics.score), rank=0,
                        schedule=SimpleNamespace(final_level=1), best=None)
    rec = {"level": 1, "alpha": 1.0, "metrics_features": "inception", "metrics_images": 20}
    assert not Trainer._better(t, {**rec, "fid": float("nan")})
    assert Trainer._better(t, {**rec, "fid": 50.0})
    t.best = {"score": float("nan"), "metrics_features": "inception", "metrics_images": 20}  # an earlier version's
    assert Trainer._better(t, {**rec, "fid": 50.0})
    t.best = {"score": 40.0, "fid": 40.0, "metrics_features": "inception", "metrics_images": 20}
    assert not Trainer._better(t, {**rec, "fid": 50.0}) and not Trainer._better(t, {**rec, "fid": 40.0})
    assert Trainer._better(t, {**rec, "fid": 39.0})
