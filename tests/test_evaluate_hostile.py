"""Hostile-use cases of `xrayforge classify` and `xrayforge evaluate`: odd inputs and options, re-runs,
damaged outputs of earlier runs."""
import json
import math

import numpy as np
import pytest
from PIL import Image

from xrayforge.errors import UserError
from xrayforge.evaluate.report import write_report


def _memorisation_folder(folder, **changes):
    folder.mkdir(parents=True)
    summary = {"evaluation": "memorisation", "synthetic": 4, "real": 8, "percentile": 1.0, "flagged": 0,
               "flagged_fraction": 0.0, "real_flagged": None, "synthetic_flagged_half": None, "p_value": None,
               "expected_by_chance": None, "more_than_chance": None, "median_synthetic_to_real_inception": 1.0,
               "median_real_to_real_inception": 1.0, "median_synthetic_to_real_pixels": 1.0,
               "median_real_to_real_pixels": 1.0, "inception": "test", "features": "inception", **changes}
    (folder / "summary.json").write_text(json.dumps({k: v for k, v in summary.items() if v is not ...}))
    for name in ("distances.png", "closest_pairs.png"):
        Image.fromarray(np.zeros((4, 4), np.uint8)).save(folder / name)
    return folder


def test_report_says_which_image_of_an_evaluation_is_missing(tmp_path):
    mem = _memorisation_folder(tmp_path / "mem")
    (mem / "closest_pairs.png").unlink()
    info = write_report(tmp_path / "r.html", None, [mem])
    assert "memorisation" in info["evaluations"]
    assert "(missing image: " in (tmp_path / "r.html").read_text()


def test_report_refuses_an_incomplete_or_unknown_summary_naming_it(tmp_path):
    mem = _memorisation_folder(tmp_path / "mem", flagged=...)
    with pytest.raises(UserError, match=r"mem/summary.json: .*flagged"):
        write_report(tmp_path / "r.html", None, [mem])
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "summary.json").write_text(json.dumps({"evaluation": "bogus"}))
    with pytest.raises(UserError, match=r"odd/summary.json: .*'bogus'"):
        write_report(tmp_path / "r.html", None, [odd])
    assert not (tmp_path / "r.html").exists()


def test_diversity_refuses_a_truncation_that_would_never_finish(tmp_path):
    """Components are redrawn until they lie within ±T: at T = 1e-30 that is for ever (sample refuses
    below 0.01; diversity hung)."""
    from xrayforge.evaluate.diversity import diversity
    with pytest.raises(ValueError, match="--truncation must be at least 0.01"):
        diversity("run", "clf", "real", tmp_path / "d", n=2, truncation=1e-30, progress=False)
    assert not (tmp_path / "d").exists()


@pytest.fixture(scope="module")
def small_archive(tmp_path_factory):
    from xrayforge.data.prepare import prepare
    root = tmp_path_factory.mktemp("hostile")
    prepare("phantom:60", root / "real", resolution=16, workers=1, progress=False)
    return root / "real"


def _train(archive, out, **settings):
    from xrayforge.evaluate.classifier import ClassifierTrainConfig, train_classifier
    return train_classifier(ClassifierTrainConfig(archive=str(archive), out=str(out), input_size=16, width=4,
                                                  val_fraction=0.3, **{"epochs": 1, **settings}), progress=False)


def test_classify_train_refuses_a_batch_it_cannot_train_on(small_archive, tmp_path):
    """Batch norm cannot train on one image, so every batch of 1 was skipped: --batch 1 trained
    nothing (loss NaN) and saved the untrained model as if trained."""
    with pytest.raises(ValueError, match="--batch 1"):
        _train(small_archive, tmp_path / "c", batch=1)
    assert not (tmp_path / "c" / "classifier.json").exists()


def test_a_diverged_classifier_is_refused_not_saved_with_nan_thresholds(small_archive, tmp_path):
    with pytest.raises(ValueError, match="diverged.*--lr"):
        _train(small_archive, tmp_path / "c", lr=1e6, epochs=2)
    assert not (tmp_path / "c" / "classifier.json").exists()


def test_classify_train_prints_the_aurocs_of_the_model_it_keeps(small_archive, tmp_path, monkeypatch, capsys):
    """The headline is the best epoch's mean AUROC; the per-finding lines under it were the last
    epoch's, whichever epoch was kept."""
    from xrayforge.cli import main as cli
    from xrayforge.evaluate import classifier as clf_mod
    real_fit = clf_mod.fit

    def fit(*a, **k):  # the first epoch is the best one, the second worse
        r = real_fit(*a, **k)
        r.history = [{"epoch": 1, "loss": 1.0, "mean_auroc": 0.9, "auroc": {"Mass": 0.9}},
                     {"epoch": 2, "loss": 0.5, "mean_auroc": 0.2, "auroc": {"Mass": 0.2}}]
        r.best_mean_auroc, r.best_epoch = 0.9, 1
        return r
    monkeypatch.setattr(clf_mod, "fit", fit)
    assert cli(["classify", "train", str(small_archive), "--out", str(tmp_path / "c"), "--input-size", "16",
                "--width", "4", "--epochs", "2", "--val-fraction", "0.3", "-q"]) == 0
    out = capsys.readouterr().out
    assert "best mean validation AUROC 0.900" in out and "(epoch 1 of 2;" in out
    assert "AUROC 0.900" in out.split("\n", 1)[1] and "0.200" not in out


def test_a_learning_rate_past_any_use_is_refused_when_parsed(capsys):
    from xrayforge.cli import main as cli
    for command in (["classify", "train", "a", "--out", "/nonexistent/m"],
                    ["evaluate", "tstr", "--synthetic", "s", "--real", "r", "--out", "/nonexistent/o"]):
        with pytest.raises(SystemExit, match="2"):  # was an 'unexpected error' (float overflow) in the optimiser
            cli(command + ["--lr", "1e300"])
        assert "--lr: 1e+300 must be greater than 0 and at most 1" in capsys.readouterr().err


def test_tstr_refuses_to_continue_once_the_real_archive_was_prepared_again(small_archive, tmp_path):
    """The finished models' test-set probabilities are kept in --out, one per test image of the real
    archive as it was: an archive prepared again at the same path made the rerun fail with an
    IndexError (other count) or score old probabilities against new labels (same count)."""
    import shutil

    from synthetic_factory import write_sample_folder
    from xrayforge.data.prepare import prepare
    from xrayforge.evaluate.tstr import TSTRConfig, run_tstr
    real = tmp_path / "real"
    shutil.copytree(small_archive, real)
    write_sample_folder(tmp_path / "s", range(1000, 1040), resolution=16)
    cfg = TSTRConfig(str(tmp_path / "s"), str(real), str(tmp_path / "t"), input_size=16, width=4, epochs=1,
                     val_fraction=0.3, bootstrap=10)
    run_tstr(cfg, progress=False)
    run_tstr(cfg, progress=False)  # the same inputs: continued
    shutil.rmtree(real)
    prepare("phantom:90", real, resolution=16, workers=1, progress=False)
    with pytest.raises(UserError, match="real_archive_id"):
        run_tstr(cfg, progress=False)


def test_tstr_refuses_models_tested_on_another_test_set(small_archive, tmp_path):
    """Models finished by an earlier version, which held out only the test split's rows (not the
    other images of its patients), were tested on a smaller set: their saved probabilities are
    refused by name (an IndexError before)."""
    import numpy as np

    from synthetic_factory import write_sample_folder
    from xrayforge.evaluate.tstr import TSTRConfig, run_tstr
    write_sample_folder(tmp_path / "s", range(1000, 1040), resolution=16)
    cfg = TSTRConfig(str(tmp_path / "s"), str(small_archive), str(tmp_path / "t"), input_size=16, width=4, epochs=1,
                     val_fraction=0.3, bootstrap=10)
    run_tstr(cfg, progress=False)
    probs = next((tmp_path / "t" / "models").glob("*/test_probabilities.npy"))
    np.save(probs, np.load(probs)[:-1])  # as tested on one image fewer
    with pytest.raises(UserError, match="test_probabilities.npy: probabilities of .* the test set is now"):
        run_tstr(cfg, progress=False)


def test_diversity_against_an_unlabelled_archive_says_n_a_for_its_labels(tmp_path):
    """An archive prepared without a label file has every label 0: its label prevalences are
    unknown, not 0% (the predicted ones still compare)."""
    import torch

    from xrayforge.data.prepare import prepare
    from xrayforge.evaluate.diversity import diversity
    from xrayforge.nn import Generator, NetworkConfig, save_networks
    from xrayforge.nn.classifier import ChestClassifier, ClassifierConfig
    (tmp_path / "pngs").mkdir()
    rng = np.random.default_rng(0)
    for k in range(6):
        Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(tmp_path / "pngs" / f"{k}.png")
    prepare(str(tmp_path / "pngs"), tmp_path / "real", resolution=16, workers=1, progress=False)
    torch.manual_seed(0)
    save_networks(tmp_path / "gen", {"G_ema": Generator(NetworkConfig(resolution=16, latent_dim=8, fmap_base=32,
                                                                        fmap_max=8)).eval()})
    ChestClassifier(ClassifierConfig(input_size=16, width=4)).save(tmp_path / "clf")
    s = diversity(str(tmp_path / "gen"), str(tmp_path / "clf"), str(tmp_path / "real"), tmp_path / "d", n=8,
                  device="cpu", progress=False)
    assert all(math.isnan(r["real_label_prevalence"]) for r in s["findings"])
    assert all(math.isnan(p["real_label_prevalence"]) for p in s["pairs"])
    table = [line for line in (tmp_path / "d" / "diversity.md").read_text().splitlines()
             if line.startswith("| ") and line.count("|") == 6][1:]  # the findings table's rows
    assert table and all(line.split(" | ")[1] == "n/a" for line in table)


def test_memorisation_medians_are_medians_of_an_even_count(tmp_path):
    """torch's median of an even count is the lower middle value, not the median the summary and
    the report name."""
    from xrayforge.evaluate.memorisation import audit
    from xrayforge.fid.compute import FeatureExtractor
    from xrayforge.nn.classifier import ChestClassifier, ClassifierConfig
    rng = np.random.default_rng(1)
    for side, count in (("synth", 4), ("real", 6)):
        (tmp_path / side).mkdir()
        for k in range(count):
            Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(tmp_path / side / f"{k}.png")
    ChestClassifier(ClassifierConfig(input_size=16, width=4)).save(tmp_path / "clf")
    ex = FeatureExtractor(device="cpu", batch_size=8, workers=0, progress=False, features=f"classifier:{tmp_path / 'clf'}")
    s = audit(str(tmp_path / "synth"), str(tmp_path / "real"), tmp_path / "m", ex, progress=False)
    with open(tmp_path / "m" / "memorisation.csv", newline="") as fh:
        rows = list(__import__("csv").DictReader(fh))
    for space in ("pixel", "inception"):
        got = s[f"median_synthetic_to_real_{'pixels' if space == 'pixel' else space}"]
        assert got == pytest.approx(np.median([float(r[f"{space}_distance"]) for r in rows]), abs=2e-6)


def test_tstr_validation_split_is_checked_before_training_and_can_be_changed(small_archive, tmp_path):
    """A small --budget leaves a validation split empty: that was found only after the earlier sets'
    models were trained and the settings saved (so the advice, 'change --val-fraction', was then
    refused in that --out), and `evaluate tstr` had no --val-fraction to change."""
    from synthetic_factory import write_sample_folder
    from xrayforge.cli import main as cli
    write_sample_folder(tmp_path / "s", range(1000, 1040), resolution=16)
    common = ["evaluate", "tstr", "--synthetic", str(tmp_path / "s"), "--real", str(small_archive), "--out",
              str(tmp_path / "t"), "--input-size", "16", "--width", "4", "--epochs", "1", "--bootstrap", "10",
              "--budget", "8", "-q"]
    assert cli(common) == 1
    assert not (tmp_path / "t" / "models").exists() and not (tmp_path / "t" / "tstr_config.json").exists()
    assert cli(common + ["--val-fraction", "0.5"]) == 0
    assert json.loads((tmp_path / "t" / "summary.json").read_text())["budget"] == 8


def test_reader_study_refuses_the_same_images_as_real_and_synthetic(tmp_path):
    """One folder given as both sides made a pack whose key called some images synthetic that are
    real (and could show one image twice with both truths)."""
    from xrayforge.evaluate.reader_study import make
    (tmp_path / "imgs").mkdir()
    for k in range(4):
        Image.fromarray(np.full((8, 8), 40 * k, np.uint8)).save(tmp_path / "imgs" / f"{k}.png")
    with pytest.raises(UserError, match="same"):
        make(str(tmp_path / "imgs"), str(tmp_path / "imgs" / "."), 4, tmp_path / "pack", size=8)
    assert not (tmp_path / "pack").exists() and not (tmp_path / "pack.key.csv").exists()


def test_two_sample_folders_of_one_name_can_be_compared(small_archive, tmp_path):
    """--synthetic a/samples --real b/samples: both were converted to OUT/samples-archive, and the
    second was refused as 'other images; remove it', which removing could not help."""
    from synthetic_factory import write_sample_folder
    from xrayforge.evaluate.fid_findings import fid_by_finding
    from test_evaluate_suite import PixelFeatures
    write_sample_folder(tmp_path / "a" / "samples", range(1000, 1030), resolution=16)
    write_sample_folder(tmp_path / "b" / "samples", range(2000, 2030), resolution=16)
    s = fid_by_finding(str(tmp_path / "a" / "samples"), str(tmp_path / "b" / "samples"), tmp_path / "f", PixelFeatures(),
                       counts=[10], progress=False)
    assert s["rows"][0]["synthetic_images"] == 30 and s["rows"][0]["real_images"] == 30 and s["rows"][0]["fid"] > 0
    again = fid_by_finding(str(tmp_path / "a" / "samples"), str(tmp_path / "b" / "samples"), tmp_path / "f",
                           PixelFeatures(), counts=[10], progress=False)  # each conversion reused
    assert again["rows"][0]["fid"] == s["rows"][0]["fid"]


def test_diversity_ratio_must_be_a_fraction(tmp_path, capsys):
    """--ratio 2 was taken: 'under-produced below 2x the real prevalence', and over-produced above
    half of it, so the ratio test no longer applied to either flag."""
    from xrayforge.cli import main as cli
    with pytest.raises(SystemExit, match="2"):
        cli(["evaluate", "diversity", str(tmp_path / "run"), "--classifier", str(tmp_path / "c"), "--real",
             str(tmp_path / "r"), "--out", str(tmp_path / "o"), "--ratio", "2"])
    assert "--ratio: 2.0 must be between 0 and 1" in capsys.readouterr().err


def test_tstr_refuses_an_unlabelled_real_archive_before_converting_the_samples(tmp_path):
    from synthetic_factory import write_sample_folder
    from xrayforge.data.prepare import prepare
    from xrayforge.evaluate.tstr import TSTRConfig, run_tstr
    (tmp_path / "pngs").mkdir()
    rng = np.random.default_rng(0)
    for k in range(6):
        Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(tmp_path / "pngs" / f"{k}.png")
    prepare(str(tmp_path / "pngs"), tmp_path / "real", resolution=16, workers=1, progress=False)
    write_sample_folder(tmp_path / "samples", range(20))
    with pytest.raises(ValueError, match="no finding labels"):
        run_tstr(TSTRConfig(str(tmp_path / "samples"), str(tmp_path / "real"), str(tmp_path / "t")), progress=False)
    assert not list((tmp_path / "t").glob("*-archive"))


@pytest.mark.parametrize("value", ["nan", "1.7", "-0.2"])
def test_a_probability_that_is_none_is_refused_naming_the_manifest_line(tmp_path, value):
    """A NaN (a diverged classifier) would have labelled the image negative, and 1.7 positive."""
    import csv
    from synthetic_factory import write_sample_folder
    from xrayforge.evaluate.labelled import synthetic_labels
    write_sample_folder(tmp_path / "s", range(3))
    with open(tmp_path / "s" / "manifest.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    rows[1]["p_Cardiomegaly"] = value
    with open(tmp_path / "s" / "manifest.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    with pytest.raises(UserError, match=r"manifest\.csv, line 3: p_Cardiomegaly is '" + value):
        synthetic_labels(tmp_path / "s")


def test_diversity_refuses_a_generator_that_makes_nan(tmp_path):
    """NaN is never above a threshold: every finding was reported 'never produced', without a word."""
    import torch
    from xrayforge.data.labels import FINDINGS
    from xrayforge.data.prepare import prepare
    from xrayforge.evaluate.diversity import diversity
    from xrayforge.nn import Generator, NetworkConfig, save_networks
    from xrayforge.nn.classifier import ChestClassifier, ClassifierConfig
    prepare("phantom:12", tmp_path / "real", resolution=32, workers=1, progress=False)
    torch.manual_seed(0)
    G = Generator(NetworkConfig(resolution=32, latent_dim=16, fmap_base=64, fmap_max=16)).eval()
    with torch.no_grad():
        next(G.parameters()).fill_(float("nan"))
    save_networks(tmp_path / "gen", {"G_ema": G})
    clf = ChestClassifier(ClassifierConfig(input_size=32, width=8))
    clf.config.thresholds = {f: 0.5 for f in FINDINGS}
    clf.save(tmp_path / "clf")
    # refused as the checkpoint is read (load_networks), before any image is made
    with pytest.raises(UserError, match=f"{tmp_path / 'gen' / 'networks.pt'}: the weights of G_ema are not finite"):
        diversity(str(tmp_path / "gen"), str(tmp_path / "clf"), str(tmp_path / "real"), tmp_path / "d", n=4, batch=4,
                  device="cpu", progress=False)


def test_fid_infinity_is_fitted_only_where_fid_is_linear_in_one_over_n(small_archive, tmp_path):
    """FID is linear in 1/n only well above the feature dimension D; the points at small n have the
    most leverage on the line, so fitting every count of the curve (50, 100, ... with D = 2048) gave an
    intercept further from the truth than the FID of every image. Simulated Gaussian features with
    exact real moments (the truth known): D = 256, counts 50 .. 10240."""
    from synthetic_factory import write_sample_folder
    from test_evaluate_suite import PixelFeatures
    from xrayforge.evaluate.fid_findings import DEFAULT_COUNTS, fid_by_finding, fid_infinity
    from xrayforge.fid.stats import FrechetStats, frechet_distance
    # the evaluation fits the counts of at least 2 x its features' dimension (16 here), against a hand fit
    write_sample_folder(tmp_path / "s", range(1000, 1160), resolution=16)
    s = fid_by_finding(str(tmp_path / "s"), str(small_archive), tmp_path / "f", PixelFeatures(),
                       counts=[8, 12, 20, 40, 80], progress=False)
    curve = {c["n"]: c["fid"] for c in s["curve"]}
    assert sorted(curve) == [8, 12, 20, 40, 80, 160]
    used = np.array([40, 80, 160])
    slope, intercept = np.polyfit(1.0 / used, [curve[n] for n in used], 1)
    assert s["fid_infinity"] == pytest.approx(intercept, rel=1e-9)
    assert s["fid_infinity_counts"] == [40, 80, 160]
    assert "fitted to n = 40, 80, 160" in (tmp_path / "f" / "fid_findings.md").read_text()
    s = fid_by_finding(str(tmp_path / "s"), str(small_archive), tmp_path / "g", PixelFeatures(),
                       counts=[8, 12, 20, 40], progress=False)  # two counts of at least 32 images: no line
    assert math.isnan(s["fid_infinity"]) and s["fid_infinity_counts"] == [40, 160]
    assert "needs FIDs at 3 or more counts of at least 32" in (tmp_path / "g" / "fid_findings.md").read_text()

    # why: simulated features, the truth known
    d, n_all = 256, 10240
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(d, d)) / np.sqrt(d), rng.normal(size=(d, d)) / np.sqrt(d)
    real = FrechetStats(np.zeros(d), a @ a.T + 0.1 * np.eye(d))
    cov = b @ b.T + 0.1 * np.eye(d)
    mu = rng.normal(size=d) * 0.1
    truth = frechet_distance(FrechetStats(mu, cov), real)
    x = mu + rng.normal(size=(n_all, d)) @ np.linalg.cholesky(cov).T
    counts = sorted({c for c in DEFAULT_COUNTS if c < n_all} | {n_all})
    fids = [frechet_distance(FrechetStats(x[:c].mean(0), np.cov(x[:c], rowvar=False)), real) for c in counts]
    assert abs(fid_infinity(counts, fids) - truth) > 2 * abs(fids[-1] - truth)  # every count: worse than none
    assert abs(fid_infinity(counts, fids, 2 * d) - truth) < 0.1 * abs(fids[-1] - truth)

def test_findings_the_synthetic_images_classifier_never_called_are_not_measured(small_archive, tmp_path):
    """A sample folder whose classifier calls 2 findings is converted to an archive of all 14, the
    other 12 labelled 0 for every image: TSTR trained the synthetic and mixed models to call none of
    them and reported their AUROCs (in the mean too), and fid-findings gave them n/a 'too few images'."""
    from synthetic_factory import write_sample_folder
    from test_evaluate_suite import PixelFeatures
    from xrayforge.data.labels import FINDINGS
    from xrayforge.evaluate.fid_findings import fid_by_finding
    from xrayforge.evaluate.tstr import TSTRConfig, run_tstr
    called = ["Cardiomegaly", "Effusion"]
    others = [f for f in FINDINGS if f not in called]
    write_sample_folder(tmp_path / "s", range(1000, 1040), resolution=16, findings=called)
    cfg = TSTRConfig(str(tmp_path / "s"), str(small_archive), str(tmp_path / "t"), input_size=16, width=4, epochs=1,
                     val_fraction=0.3, bootstrap=10)
    s = run_tstr(cfg, progress=False)
    assert s["findings"] == called and s["findings_not_labelled"] == others
    assert {r["finding"] for r in s["rows"]} == set(called)
    assert "Not measured (the synthetic images' classifier does not call them" in (tmp_path / "t" / "tstr.md").read_text()
    # an output whose models were trained for other findings (as an earlier version did) is not continued
    meta_path = tmp_path / "t" / "models" / "real" / "classifier.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "findings": list(FINDINGS)}))
    with pytest.raises(UserError, match="choose a new --out"):
        run_tstr(cfg, progress=False)
    f = fid_by_finding(str(tmp_path / "s"), str(small_archive), tmp_path / "f", PixelFeatures(), counts=[10],
                       progress=False)
    assert [r["finding"] for r in f["rows"]] == ["all", *called] and f["findings_not_labelled"] == others


def test_tstr_plot_draws_an_interval_that_does_not_hold_the_auroc(tmp_path):
    """A patient-level percentile interval need not hold the AUROC: patients with one negative and one
    slightly higher positive image, whose level differs by patient (AUROC 1/2 + 1/(2G)); a resample
    repeats patients, whose own pairs are wins, so every resample but one scores higher. The plot
    drew it as error bars, which matplotlib refuses below the bar: run_tstr failed at its last step,
    and again on every rerun (the models were done)."""
    from xrayforge.evaluate.metrics import auroc, bootstrap_auroc
    from xrayforge.evaluate.tstr import plot
    g = 10
    level = np.arange(g, dtype=float)
    y, scores, patients = np.r_[np.zeros(g), np.ones(g)], np.r_[level, level + 0.5], np.r_[np.arange(g), np.arange(g)]
    a = auroc(y, scores)
    lo, hi = bootstrap_auroc(y, scores, patients, rounds=200, seed=0)
    assert a == pytest.approx(0.55) and lo > a
    row = {"finding": "Mass", "auroc": a, "ci95_low": lo, "ci95_high": hi}
    summary = {"findings": ["Mass"], "training_sets": {"real": {}, "synthetic": {}},
               "rows": [{**row, "training_set": "real"}, {**row, "training_set": "synthetic"}]}
    plot(summary, tmp_path / "tstr.png")
    assert (tmp_path / "tstr.png").stat().st_size > 0


def test_tstr_refuses_the_real_archive_as_the_synthetic_set(small_archive, tmp_path):
    """Every image of the 'synthetic' archive is trained on: given the real archive (or a copy of it),
    the real test images were trained on and their AUROCs inflated."""
    import shutil

    from xrayforge.evaluate.tstr import TSTRConfig, run_tstr
    shutil.copytree(small_archive, tmp_path / "copy")
    for k, synthetic in enumerate((small_archive, tmp_path / "copy")):
        cfg = TSTRConfig(str(synthetic), str(small_archive), str(tmp_path / f"t{k}"), input_size=16, width=4,
                         epochs=1, val_fraction=0.3, bootstrap=10)
        with pytest.raises(UserError, match="is the real archive"):
            run_tstr(cfg, progress=False)
        assert not (tmp_path / f"t{k}").exists()


def test_without_a_validation_auroc_the_last_epoch_is_kept_not_the_first(small_archive):
    """Validation images with no finding in both classes give no AUROC in any epoch: nothing tells
    the epochs apart, and the first epoch's weights were kept whatever --epochs said."""
    import numpy as np
    from xrayforge.data.archive import Archive
    from xrayforge.evaluate.classifier import ClassifierTraining, LabelledImages, fit
    arc = Archive(small_archive)
    images = LabelledImages([(arc, np.arange(len(arc)))])
    val = np.flatnonzero(images.labels.sum(1) == 0)[:4]  # all negative for every finding: AUROC undefined
    train = np.setdiff1d(np.arange(len(arc)), val)
    assert len(val) == 4
    result = fit(images, train, val, ClassifierTraining(input_size=16, width=4, epochs=3, batch=8, device="cpu"),
                 progress=False)
    assert all(np.isnan(h["mean_auroc"]) for h in result.history)
    assert result.best_epoch == 3


def test_tstr_gives_no_auroc_for_a_finding_a_training_set_never_has(small_archive, tmp_path):
    """Synthetic images of which none has a finding (a generator that never makes it): the classifier
    trained on them learnt nothing of it, and its AUROC (noise) was reported and averaged into the
    synthetic mean beside the other sets' means over other findings."""
    import csv as _csv
    import math
    from synthetic_factory import write_sample_folder
    from xrayforge.evaluate.tstr import TSTRConfig, run_tstr
    write_sample_folder(tmp_path / "s", range(1000, 1040), resolution=16, findings=["Cardiomegaly", "Effusion"])
    manifest = tmp_path / "s" / "manifest.csv"
    with open(manifest, newline="") as fh:
        rows = list(_csv.DictReader(fh))
    for r in rows:
        r["p_Cardiomegaly"] = 0.1  # never called
    with open(manifest, "w", newline="") as fh:
        w = _csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    s = run_tstr(TSTRConfig(str(tmp_path / "s"), str(small_archive), str(tmp_path / "t"), input_size=16, width=4,
                            epochs=1, val_fraction=0.3, bootstrap=10), progress=False)
    by = {(r["training_set"], r["finding"]): r for r in s["rows"]}
    synth = by[("synthetic", "Cardiomegaly")]
    assert synth["train_positives"] == 0 and math.isnan(synth["auroc"]) and math.isnan(synth["ci95_low"])
    assert not math.isnan(by[("real", "Cardiomegaly")]["auroc"])
    assert s["mean_over"] == ["Effusion"]
    for name, info in s["training_sets"].items():  # every mean over the same findings
        assert info["mean_auroc"] == pytest.approx(by[(name, "Effusion")]["auroc"])
    md = (tmp_path / "t" / "tstr.md").read_text()
    assert "n/a (0 of" in md and "the means are over the findings every set has both ways: Effusion" in md


def test_classify_train_killed_before_its_record_is_trained_again_not_refused(small_archive, tmp_path, monkeypatch):
    """The model (classifier.json) was saved before training.json: a kill between the two left a
    folder that a rerun refused as 'already holds a trained classifier', with no record of what it
    was trained on. The record is written first, and classifier.json, the finished mark, last."""
    import xrayforge.evaluate.classifier as clf_mod
    write = clf_mod.write_text_atomic

    def killed(path, text):  # the process ends as training.json is written
        if str(path).endswith("training.json"):
            raise KeyboardInterrupt
        write(path, text)
    monkeypatch.setattr(clf_mod, "write_text_atomic", killed)
    with pytest.raises(KeyboardInterrupt):
        _train(small_archive, tmp_path / "c")
    assert not (tmp_path / "c" / "classifier.json").exists()
    monkeypatch.undo()
    summary = _train(small_archive, tmp_path / "c")
    assert (tmp_path / "c" / "classifier.json").is_file()
    assert clf_mod.recorded_training(tmp_path / "c")["trained_images"] == summary["training_data"]["trained_images"]
    with pytest.raises(ValueError, match="already holds a trained classifier"):
        _train(small_archive, tmp_path / "c")


def test_tstr_gives_no_auroc_for_a_finding_whose_only_images_were_held_for_validation(small_archive, tmp_path,
                                                                                       monkeypatch):
    """A rare finding of which the synthetic training set's only image fell to its validation split: the
    model was fitted to no image with it, yet the set counted as having it (positives were counted over
    the validation images too), and the AUROC of a model that never saw the finding was reported."""
    import csv as _csv
    import math
    from synthetic_factory import write_sample_folder
    import xrayforge.evaluate.tstr as tstr_mod
    write_sample_folder(tmp_path / "s", range(1000, 1040), resolution=16, findings=["Cardiomegaly", "Effusion"])
    manifest = tmp_path / "s" / "manifest.csv"
    with open(manifest, newline="") as fh:
        rows = list(_csv.DictReader(fh))
    for r in rows:
        r["p_Cardiomegaly"] = 0.9 if r["index"] == "5" else 0.1  # one synthetic image has it
    with open(manifest, "w", newline="") as fh:
        w = _csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    split = tstr_mod.patient_split

    def that_image_validates(ids, fraction, salt):  # a sampled image is its own patient, "synthetic-<index>"
        mask = split(ids, fraction, salt)
        if salt.startswith("tstr-val"):
            mask |= np.array([pid == "synthetic-5" for pid in ids])
        return mask
    monkeypatch.setattr(tstr_mod, "patient_split", that_image_validates)
    s = tstr_mod.run_tstr(tstr_mod.TSTRConfig(str(tmp_path / "s"), str(small_archive), str(tmp_path / "t"),
                                              input_size=16, width=4, epochs=1, val_fraction=0.3, bootstrap=10),
                          progress=False)
    by = {(r["training_set"], r["finding"]): r for r in s["rows"]}
    synth = by[("synthetic", "Cardiomegaly")]
    assert synth["train_positives"] == 0 and math.isnan(synth["auroc"])
    assert synth["train_images"] < s["training_sets"]["synthetic"]["images"]  # the images fitted to
    assert s["mean_over"] == ["Effusion"]


def test_classify_train_refuses_images_on_which_every_finding_is_constant(small_archive, tmp_path):
    """Training images that all have Mass and nothing else (an archive of one finding's images): no
    finding is there both ways, every validation AUROC is undefined, and a model that learnt nothing was
    saved with 'best mean validation AUROC nan' for LCO and the evaluations to use."""
    from xrayforge.data.archive import Archive
    arc = Archive(small_archive)
    only_mass = np.zeros(len(arc.findings), dtype=arc.labels.dtype)
    only_mass[arc.findings.index("Mass")] = 1
    pool = np.flatnonzero((arc.labels == only_mass).all(1))
    assert len(pool) >= 4
    with pytest.raises(ValueError, match=r"no finding is both present and absent .*\(Mass: \d+\)"):
        _train(small_archive, tmp_path / "c", subset=list(pool))
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("damage", [lambda p: p[:, :1], lambda p: p[:, 0]])
def test_tstr_refuses_saved_probabilities_of_another_shape_naming_the_file(small_archive, tmp_path, damage):
    """A finished model's test_probabilities.npy of fewer columns than findings (or one column only, as
    a 1-d array): the rerun stopped with an IndexError, 'an unexpected error', naming no file."""
    from synthetic_factory import write_sample_folder
    from xrayforge.evaluate.tstr import TSTRConfig, run_tstr
    write_sample_folder(tmp_path / "s", range(1000, 1040), resolution=16, findings=["Cardiomegaly", "Effusion"])
    cfg = TSTRConfig(str(tmp_path / "s"), str(small_archive), str(tmp_path / "t"), input_size=16, width=4, epochs=1,
                     val_fraction=0.3, bootstrap=10)
    run_tstr(cfg, progress=False)
    probs = tmp_path / "t" / "models" / "real" / "test_probabilities.npy"
    np.save(probs, damage(np.load(probs)))
    with pytest.raises(UserError, match=r"models/real/test_probabilities.npy: an array of shape .* remove "):
        run_tstr(cfg, progress=False)


def test_classify_train_writes_training_json_that_strict_readers_accept(small_archive, tmp_path, monkeypatch):
    """Validation images with no finding both ways: no validation AUROC, and training.json held the bare
    word NaN (best_mean_auroc, each epoch's mean_auroc), which is no JSON to jq or a browser."""
    import xrayforge.evaluate.classifier as clf_mod
    from xrayforge.data.archive import Archive
    arc = Archive(small_archive)
    healthy = set(np.flatnonzero(arc.labels.sum(1) == 0)[:4].tolist())
    monkeypatch.setattr(clf_mod, "patient_split", lambda ids, fraction, salt: np.array([i in healthy for i in
                                                                                       range(len(ids))]))
    _train(small_archive, tmp_path / "c", subset=list(range(len(arc))))

    def refuse(word):
        raise ValueError(f"not JSON: {word}")
    record = json.loads((tmp_path / "c" / "training.json").read_text(), parse_constant=refuse)
    assert record["best_mean_auroc"] is None and record["history"][0]["mean_auroc"] is None


def test_the_same_sample_folder_as_synthetic_and_real_is_refused(small_archive, tmp_path):
    """--synthetic S --real S with S a sample folder (or a copy of it): both sides were converted to one
    archive and every FID was 0, a perfect generator; TSTR trained on its own test images."""
    import shutil

    from synthetic_factory import write_sample_folder
    from test_evaluate_suite import PixelFeatures
    from xrayforge.evaluate.fid_findings import fid_by_finding
    from xrayforge.evaluate.tstr import TSTRConfig, run_tstr
    write_sample_folder(tmp_path / "s", range(1000, 1020), resolution=16)
    shutil.copytree(tmp_path / "s", tmp_path / "copy")
    for k, real in enumerate((tmp_path / "s", tmp_path / "copy")):
        with pytest.raises(UserError, match="is the real archive.*same sample folder"):
            fid_by_finding(str(tmp_path / "s"), str(real), tmp_path / f"f{k}", PixelFeatures(), progress=False)
        with pytest.raises(UserError, match="is the real archive.*same sample folder"):
            run_tstr(TSTRConfig(str(tmp_path / "s"), str(real), str(tmp_path / f"t{k}"), input_size=16, width=4,
                                epochs=1), progress=False)
        assert not (tmp_path / f"f{k}").exists() and not (tmp_path / f"t{k}").exists()
    write_sample_folder(tmp_path / "other", range(2000, 2020), resolution=16)  # other samples: compared
    s = fid_by_finding(str(tmp_path / "s"), str(tmp_path / "other"), tmp_path / "g", PixelFeatures(), counts=[10],
                       progress=False)
    assert s["rows"][0]["fid"] > 0


def test_fid_findings_names_the_side_with_too_few_images(small_archive, tmp_path):
    from synthetic_factory import write_sample_folder
    from test_evaluate_suite import PixelFeatures
    from xrayforge.evaluate.fid_findings import fid_by_finding
    write_sample_folder(tmp_path / "s", range(1000, 1012), resolution=16)
    with pytest.raises(UserError, match=r"--real .*real: 1 image \(--real-limit 1\); FID needs at least 2"):
        fid_by_finding(str(tmp_path / "s"), str(small_archive), tmp_path / "f", PixelFeatures(), real_limit=1,
                       progress=False)
    write_sample_folder(tmp_path / "one", range(1000, 1001), resolution=16)
    with pytest.raises(UserError, match=r"--synthetic .*one: 1 image; FID needs at least 2"):
        fid_by_finding(str(tmp_path / "one"), str(small_archive), tmp_path / "g", PixelFeatures(), progress=False)


def test_fid_findings_and_tstr_refuse_a_bad_input_before_any_work(small_archive, tmp_path):
    """A missing --real, or one that is no archive, was found by fid-findings only after it had claimed
    --out and converted the whole synthetic sample folder (minutes for a large one), and was said as a
    bare FileNotFoundError / ValueError naming no option; so was an --real-limit under 2. tstr claimed --out."""
    from synthetic_factory import write_sample_folder
    from test_evaluate_suite import PixelFeatures
    from xrayforge.evaluate.fid_findings import fid_by_finding
    from xrayforge.evaluate.tstr import TSTRConfig, run_tstr
    write_sample_folder(tmp_path / "s", range(1000, 1012), resolution=16)
    (tmp_path / "notes.txt").write_text("not images")
    for real, said in ((tmp_path / "missing", "no such file or folder"), (tmp_path / "notes.txt", "expected a prepared")):
        with pytest.raises(UserError, match=rf"--real .*{real.name}: {said}"):
            fid_by_finding(str(tmp_path / "s"), str(real), tmp_path / "f", PixelFeatures(), progress=False)
        with pytest.raises(UserError, match=rf"--real .*{real.name}: {said}"):
            run_tstr(TSTRConfig(str(tmp_path / "s"), str(real), str(tmp_path / "t")), progress=False)
    with pytest.raises(UserError, match=r"--synthetic .*missing: no such file or folder"):
        run_tstr(TSTRConfig(str(tmp_path / "missing"), str(small_archive), str(tmp_path / "t")), progress=False)
    with pytest.raises(UserError, match=r"--real .*: 1 image \(--real-limit 1\)"):
        fid_by_finding(str(tmp_path / "s"), str(small_archive), tmp_path / "f", PixelFeatures(), real_limit=1,
                       progress=False)
    assert not (tmp_path / "f").exists() and not (tmp_path / "t").exists()


def test_fid_findings_says_the_image_floor_it_applied(small_archive, tmp_path):
    """--min-images 1: a finding of one image still has no FID (no covariance), and the note said
    "fewer than 1 images" of it."""
    from synthetic_factory import write_sample_folder
    from test_evaluate_suite import PixelFeatures
    from xrayforge.evaluate.fid_findings import fid_by_finding
    write_sample_folder(tmp_path / "s", range(1000, 1030), resolution=16)
    s = fid_by_finding(str(tmp_path / "s"), str(small_archive), tmp_path / "f", PixelFeatures(), counts=[10],
                       min_images=1, progress=False)
    one = [r for r in s["rows"] if min(r["synthetic_images"], r["real_images"]) == 1]
    assert one and all(math.isnan(r["fid"]) for r in one)
    assert s["min_images"] == 2 and "n/a: fewer than 2 images" in (tmp_path / "f" / "fid_findings.md").read_text()


def test_tstr_too_few_real_images_names_the_split_that_made_them(tmp_path):
    """An archive with a 'test' split ignores --test-fraction, which the message told the user to raise."""
    from synthetic_factory import write_sample_folder
    from xrayforge.data.archive import Archive
    from xrayforge.data.prepare import prepare
    from xrayforge.evaluate.tstr import TSTRConfig, run_tstr
    prepare("phantom:5", tmp_path / "real", resolution=8, workers=1, progress=False)
    assert Archive(tmp_path / "real").held_out().sum() == 1  # one test image: too few, whatever --test-fraction
    write_sample_folder(tmp_path / "s", range(1000, 1020), resolution=8)
    with pytest.raises(ValueError, match=r"split by its 'test' split .*--test-fraction applies only to an archive "
                                         r"without one"):
        run_tstr(TSTRConfig(str(tmp_path / "s"), str(tmp_path / "real"), str(tmp_path / "t"), input_size=8, width=4,
                            epochs=1), progress=False)


def test_tstr_too_small_a_default_budget_says_where_it_came_from(small_archive, tmp_path):
    """No --budget given: the budget is the smaller side, and the message spoke of "a budget" alone."""
    from synthetic_factory import write_sample_folder
    from xrayforge.evaluate.tstr import TSTRConfig, run_tstr
    write_sample_folder(tmp_path / "s", range(1000, 1006), resolution=16)
    with pytest.raises(ValueError, match=r"the smaller of the 6 synthetic images of .*s and the \d+ real training "
                                         r"images"):
        run_tstr(TSTRConfig(str(tmp_path / "s"), str(small_archive), str(tmp_path / "t"), input_size=16, width=4,
                            epochs=1), progress=False)


def test_fid_findings_says_a_synthetic_archive_has_no_labels(small_archive, tmp_path, caplog):
    """Generated images prepared without a label file as --synthetic: every finding read "n/a: fewer than
    10 images", as if the generator made none, where the archive has no labels at all."""
    import logging

    from test_evaluate_suite import PixelFeatures
    from xrayforge.data.archive import Archive
    from xrayforge.data.prepare import prepare
    from xrayforge.evaluate.fid_findings import fid_by_finding
    real = Archive(small_archive)
    (tmp_path / "pngs").mkdir()
    for k in range(20):
        Image.fromarray(real.images(np.array([k]), real.resolution)[0]).save(tmp_path / "pngs" / f"{k}.png")
    prepare(str(tmp_path / "pngs"), tmp_path / "unlabelled", resolution=16, workers=1, progress=False)
    with caplog.at_level(logging.WARNING, logger="xrayforge.evaluate.fid_findings"):
        s = fid_by_finding(str(tmp_path / "unlabelled"), str(small_archive), tmp_path / "f", PixelFeatures(),
                           counts=[10], progress=False)
    assert "unlabelled was prepared without finding labels" in caplog.text
    assert s["real_labelled"] and not s["synthetic_labelled"] and math.isfinite(s["rows"][0]["fid"])
    assert "The synthetic archive was prepared without finding labels" in (tmp_path / "f" / "fid_findings.md").read_text()


def test_tstr_continues_with_the_same_folders_spelt_otherwise(small_archive, tmp_path, monkeypatch):
    """A stopped run continued with --synthetic samples/ (as a shell completes it) or the absolute path was
    refused as made "with other settings", its models trained again only in a new --out."""
    from synthetic_factory import write_sample_folder
    from xrayforge.evaluate.tstr import TSTRConfig, run_tstr
    write_sample_folder(tmp_path / "samples", range(1000, 1030), resolution=16)
    monkeypatch.chdir(tmp_path)

    def run(synthetic, real):
        return run_tstr(TSTRConfig(synthetic, real, "t", input_size=16, width=4, epochs=1, batch=8, val_fraction=0.3,
                                   bootstrap=10), progress=False)

    first = run("samples", str(small_archive))
    stamp = (tmp_path / "t" / "models" / "synthetic" / "classifier.pt").stat().st_mtime_ns
    for synthetic, real in (("samples/", str(small_archive) + "/"), (str(tmp_path / "samples"), str(small_archive))):
        again = run(synthetic, real)
        assert again["rows"][0]["train_images"] == first["rows"][0]["train_images"]
    assert (tmp_path / "t" / "models" / "synthetic" / "classifier.pt").stat().st_mtime_ns == stamp
    with pytest.raises(UserError, match="other settings"):  # another folder still is
        write_sample_folder(tmp_path / "more", range(1000, 1030), resolution=16)
        run("more", str(small_archive))


def test_tstr_measures_a_finished_run_again_with_other_bootstrap_resamples(small_archive, tmp_path):
    """--bootstrap only resamples the saved test-set probabilities, yet a finished run asked for more
    resamples was refused as made "with other settings": a new --out, and all three models trained again."""
    from synthetic_factory import write_sample_folder
    from xrayforge.evaluate.tstr import TSTRConfig, run_tstr
    write_sample_folder(tmp_path / "s", range(1000, 1030), resolution=16)

    def run(bootstrap):
        return run_tstr(TSTRConfig(str(tmp_path / "s"), str(small_archive), str(tmp_path / "t"), input_size=16,
                                   width=4, epochs=1, batch=8, val_fraction=0.3, bootstrap=bootstrap), progress=False)

    first = run(10)
    stamp = (tmp_path / "t" / "models" / "synthetic" / "classifier.pt").stat().st_mtime_ns
    again = run(40)
    assert (tmp_path / "t" / "models" / "synthetic" / "classifier.pt").stat().st_mtime_ns == stamp
    assert again["bootstrap"] == 40 and "(40 resamples)" in (tmp_path / "t" / "tstr.md").read_text()
    assert [r["auroc"] for r in again["rows"] if math.isfinite(r["auroc"])] == \
        [r["auroc"] for r in first["rows"] if math.isfinite(r["auroc"])]
    with pytest.raises(UserError, match="other settings"):  # a setting of the models still is
        run_tstr(TSTRConfig(str(tmp_path / "s"), str(small_archive), str(tmp_path / "t"), input_size=16, width=4,
                            epochs=2, batch=8, val_fraction=0.3, bootstrap=40), progress=False)


def test_real_images_given_as_the_synthetic_set_are_found(small_archive, tmp_path, caplog):
    """The real images prepared again (another resolution, more of them) passed as --synthetic, as only a
    copy of the real manifest was caught: tstr trained its "synthetic" models on the real test images it
    then tested them on, and fid-findings compared images with themselves, silently."""
    import logging

    from synthetic_factory import write_sample_folder
    from test_evaluate_suite import PixelFeatures
    from xrayforge.data.archive import Archive
    from xrayforge.data.prepare import prepare
    from xrayforge.evaluate.fid_findings import fid_by_finding
    from xrayforge.evaluate.tstr import TSTRConfig, run_tstr
    prepare("phantom:70", tmp_path / "again", resolution=8, workers=1, progress=False)  # every real image, at 8 px
    test = Archive(small_archive).held_out().sum()
    with pytest.raises(UserError, match=rf"--synthetic .*again: holds {test} of the {test} real test images of --real "
                                        rf".*\(first: phantom:\d+\)"):
        run_tstr(TSTRConfig(str(tmp_path / "again"), str(small_archive), str(tmp_path / "t"), input_size=8, width=4,
                            epochs=1), progress=False)
    assert not (tmp_path / "t" / "models").exists()
    with caplog.at_level(logging.WARNING, logger="xrayforge.evaluate.fid_findings"):
        s = fid_by_finding(str(tmp_path / "again"), str(small_archive), tmp_path / "f", PixelFeatures(), counts=[10],
                           progress=False)
    assert s["real_images_among_synthetic"] == 60 and "holds 60 of the 60 images of --real" in caplog.text
    write_sample_folder(tmp_path / "s", range(1000, 1012), resolution=16)  # a generator's images: none
    s = fid_by_finding(str(tmp_path / "s"), str(small_archive), tmp_path / "g", PixelFeatures(), counts=[10],
                       progress=False)
    assert s["real_images_among_synthetic"] == 0


@pytest.mark.parametrize("thresholds", [{"Cardiomegaly": None}, {"Cardiomegaly": "0.5"}, {"Cardiomegaly": 1.5},
                                        ["Cardiomegaly"]])
def test_a_damaged_threshold_in_the_samplers_summary_is_refused_naming_it(tmp_path, thresholds):
    """A null or text threshold in summary.json (hand-edited) gave a bare TypeError or ValueError that
    named no file."""
    import json
    from synthetic_factory import write_sample_folder
    from xrayforge.evaluate.labelled import synthetic_labels
    write_sample_folder(tmp_path / "s", range(3))
    (tmp_path / "s" / "summary.json").write_text(json.dumps({"thresholds": thresholds}))
    with pytest.raises(UserError, match=r"summary\.json: damaged: its thresholds .*not a probability per finding"):
        synthetic_labels(tmp_path / "s")


def test_a_finding_without_a_recorded_threshold_is_refused_not_labelled_at_one_half(tmp_path):
    """A p_ column whose finding has no recorded threshold (an edited archive, or one mixing classifiers)
    was labelled at probability 0.5 without a word, while the others used their own thresholds."""
    from synthetic_factory import write_sample_folder
    from xrayforge.data.labels import FINDINGS
    from xrayforge.evaluate.labelled import synthetic_labels
    write_sample_folder(tmp_path / "s", range(3), thresholds={f: 0.3 for f in FINDINGS if f != "Mass"})
    with pytest.raises(UserError, match=r"no decision threshold recorded for Mass \(its manifest has their p_ column"):
        synthetic_labels(tmp_path / "s")


def test_an_image_of_one_grey_level_is_no_copy_of_a_real_image(tmp_path):
    """A blank image on both sides (a blank real scan; a collapsed generator's output) has the same
    checksum: it made tstr refuse a generator's samples as holding a real test image."""
    from PIL import Image
    from xrayforge.data.archive import Archive
    from xrayforge.data.phantom import render
    from xrayforge.data.prepare import prepare
    from xrayforge.evaluate.labelled import real_images_among
    scan = (render(16, 3)[0] * 255).round().astype(np.uint8)
    for side in ("real", "synth"):
        (tmp_path / side).mkdir()
        Image.fromarray(np.zeros((16, 16), np.uint8)).save(tmp_path / side / "blank.png")
        Image.fromarray(scan).save(tmp_path / side / "scan.png")  # a real image among the synthetic: found
        prepare(str(tmp_path / side), tmp_path / f"{side}_arc", resolution=16, workers=1, progress=False)
    real = Archive(tmp_path / "real_arc")
    found = dict(zip((r["source"] for r in real.records), real_images_among(Archive(tmp_path / "synth_arc"), real)))
    assert {k.rsplit("/", 1)[-1]: bool(v) for k, v in found.items()} == {"blank.png": False, "scan.png": True}


def test_tstr_says_when_its_test_patients_were_chosen_from_an_archive_without_a_test_split():
    """A real archive without a "test" split: TSTR's test patients are chosen by --test-fraction, and a
    generator trained on that archive (every image of it) saw them; the report said nothing of it."""
    from xrayforge.evaluate.tstr import TRAINING_SETS, format_markdown
    rows = [{"training_set": s, "finding": "Mass", "auroc": 0.7, "ci95_low": 0.6, "ci95_high": 0.8, "train_images": 10,
             "train_positives": 4, "test_images": 8, "test_positives": 3} for s in TRAINING_SETS]
    summary = {"training_sets": {s: {"mean_auroc": 0.7} for s in TRAINING_SETS}, "rows": rows, "findings": ["Mass"],
               "test_images": 8, "test_patients": 8, "budget": 10, "bootstrap": 100, "mean_over": ["Mass"]}
    said = "The real archive has no 'test' split: its test patients are 0.2 of its patients, chosen here."
    assert said not in format_markdown({**summary, "test_split": "archive"})
    assert said not in format_markdown(summary)  # a summary written before the split was recorded
    assert said in format_markdown({**summary, "test_split": "patients (0.2)"})
