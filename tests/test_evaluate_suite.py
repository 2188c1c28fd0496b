"""The evaluation suite: AUROC and its bootstrap interval, labelled synthetic archives, TSTR, FID per
finding and against sample count, disease diversity, and the report."""
import csv
import json
import math
import shutil
from itertools import product

import numpy as np
import pytest
import torch
from PIL import Image

from synthetic_factory import write_sample_folder
from xrayforge.cli import main as cli
from xrayforge.data.archive import Archive
from xrayforge.utils.files import json_safe
from xrayforge.data.labels import FINDINGS
from xrayforge.data.prepare import prepare
from xrayforge.evaluate.diversity import combinations, cooccurrence, diversity, prevalence_rows
from xrayforge.evaluate.fid_findings import fid_by_finding, fid_infinity
from xrayforge.evaluate.labelled import open_labelled, synthetic_labels
from xrayforge.evaluate.metrics import auroc, bootstrap_auroc, patient_split, wilson_interval
from xrayforge.errors import UserError
from xrayforge.evaluate.report import REPORT_MARK, write_report
from xrayforge.evaluate.tstr import TSTRConfig, run_tstr
from xrayforge.fid.stats import FrechetStats, frechet_distance
from xrayforge.nn import Generator, NetworkConfig, save_networks
from xrayforge.nn.classifier import ChestClassifier, ClassifierConfig, load_classifier
from xrayforge.nn import latents_for
from xrayforge.utils.images import levels


# --------------------------------------------------------------------------- metrics
def test_auroc_equals_the_pairwise_definition_with_ties():
    rng = np.random.default_rng(0)
    y = rng.random(60) < 0.3
    s = rng.integers(0, 6, 60).astype(float)  # many ties
    pairs = [(a > b) + 0.5 * (a == b) for a, b in product(s[y], s[~y])]
    assert auroc(y, s) == pytest.approx(np.mean(pairs), abs=1e-12)
    assert math.isnan(auroc(np.ones(5), np.arange(5)))


def test_wilson_interval_against_published_values():
    # Newcombe (1998), table I: 0/10 -> 0 to 0.2775; 15/148 -> 0.0624 to 0.1605
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson_interval(15, 148) == pytest.approx((0.0624, 0.1605), abs=1e-4)
    assert all(math.isnan(v) for v in wilson_interval(0, 0))


@pytest.mark.parametrize("grouped", [False, True], ids=["images", "patients"])
def test_bootstrap_intervals_cover_the_true_auroc(grouped):
    """Binormal scores with a known AUROC, Φ(d/√2); with patients (two correlated images each) the
    resampling must be by patient. About 95% of the intervals must hold the truth."""
    from statistics import NormalDist
    d, sims, covered = 1.0, 200, 0
    truth = NormalDist().cdf(d / math.sqrt(2))
    rng = np.random.default_rng(1)
    for k in range(sims):
        if grouped:
            patients = 80
            y_p = rng.random(patients) < 0.3
            u = rng.normal(0, math.sqrt(0.6), patients)  # the patient effect shared by both images
            y = np.repeat(y_p, 2)
            s = d * y + np.repeat(u, 2) + rng.normal(0, math.sqrt(0.4), 2 * patients)
            groups = np.repeat(np.arange(patients), 2)
        else:
            y = rng.random(160) < 0.3
            s = d * y + rng.normal(0, 1, 160)
            groups = None
        lo, hi = bootstrap_auroc(y, s, groups, rounds=300, seed=k)
        covered += lo <= truth <= hi
    assert 0.88 <= covered / sims <= 0.99, covered / sims


def test_bootstrap_needs_both_classes():
    assert all(math.isnan(v) for v in bootstrap_auroc(np.zeros(5), np.arange(5)))


# --------------------------------------------------------------------------- labelled synthetic archives
def test_synthetic_labels_follow_the_target_then_the_classifier(tmp_path):
    truth = write_sample_folder(tmp_path / "s", range(20), target="Cardiomegaly=1,Nodule=0",
                                thresholds={**{f: 0.5 for f in FINDINGS}, "Effusion": 0.95})
    rows, findings, labels = synthetic_labels(tmp_path / "s")
    assert findings == list(FINDINGS) and len(rows) == 20
    c, n, e, m = (findings.index(f) for f in ("Cardiomegaly", "Nodule", "Effusion", "Mass"))
    assert (labels[:, c] == 1).all() and (labels[:, n] == 0).all()  # what the target asked for
    assert (labels[:, e] == 0).all()                                   # 0.9 < its threshold 0.95
    assert (labels[:, m] == truth[:, m]).all()                         # the classifier's call


def test_sample_folder_becomes_an_archive_once(tmp_path):
    truth = write_sample_folder(tmp_path / "s", range(12))
    arc = open_labelled(tmp_path / "s", tmp_path / "work", progress=False)
    assert len(arc) == 12 and arc.resolution == 32
    assert (arc.labels == truth).all()
    assert len(set(arc.patient_ids)) == 12  # every synthetic image is its own patient
    png = np.asarray(Image.open(tmp_path / "s" / "shard-00000" / "00000005.png"))
    assert np.array_equal(arc.images([5], 32)[0], png)
    again = open_labelled(tmp_path / "s", tmp_path / "work", progress=False)  # reused, not rebuilt
    assert again.path == arc.path


def test_unlabelled_or_foreign_inputs_are_refused(tmp_path):
    write_sample_folder(tmp_path / "s", range(3))
    with open(tmp_path / "s" / "manifest.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    keep = [k for k in rows[0] if not k.startswith("p_")]
    with open(tmp_path / "s" / "manifest.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keep, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    with pytest.raises(ValueError, match="--classifier"):
        synthetic_labels(tmp_path / "s")
    (tmp_path / "plain").mkdir()
    with pytest.raises(ValueError, match="xrayforge sample"):
        open_labelled(tmp_path / "plain", tmp_path / "w")
    with pytest.raises(FileNotFoundError):
        open_labelled(tmp_path / "nowhere", tmp_path / "w")


# --------------------------------------------------------------------------- TSTR
@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantoms")
    prepare("phantom:400", root / "real", resolution=32, workers=1, progress=False)
    write_sample_folder(root / "faithful", range(10000, 10300))
    write_sample_folder(root / "mislabelled", range(10000, 10300), invert_labels=True)
    return root


@pytest.mark.slow
def test_tstr_tells_a_faithful_generator_from_a_mislabelled_one(phantoms, tmp_path):
    def run(name):
        return run_tstr(TSTRConfig(str(phantoms / name), str(phantoms / "real"), str(tmp_path / name), input_size=32,
                                   width=16, epochs=6, lr=3e-3, bootstrap=200), progress=False)

    good, bad = run("faithful"), run("mislabelled")
    auc = {name: {(r["training_set"], r["finding"]): r for r in s["rows"]} for name, s in
           (("good", good), ("bad", bad))}
    # the phantom's heart size is learnt from faithful synthetic images, and its opposite from images
    # whose labels say the opposite. (Shuffled labels are no test: a model fitted to noise on 300
    # images still ranks by the heart, the phantoms' largest variation, giving AUROCs of 0.43-0.78.)
    assert auc["good"][("synthetic", "Cardiomegaly")]["auroc"] > 0.85
    assert auc["bad"][("synthetic", "Cardiomegaly")]["auroc"] < 0.3
    # the real-trained model is the same in both runs (same images, same seed)
    assert auc["good"][("real", "Cardiomegaly")]["auroc"] == auc["bad"][("real", "Cardiomegaly")]["auroc"]
    for r in good["rows"]:
        if not math.isnan(r["auroc"]):
            assert r["ci95_low"] <= r["auroc"] <= r["ci95_high"]
    assert good["budget"] == 300 and good["training_sets"]["real+synthetic"]["synthetic_images"] == 150
    out = tmp_path / "faithful"
    assert (out / "tstr.csv").is_file() and (out / "tstr.png").is_file() and "Cardiomegaly" in (out / "tstr.md").read_text()
    assert json.loads((out / "summary.json").read_text())["evaluation"] == "tstr"
    # the test images never overlap the real training images (patient level)
    real = Archive(phantoms / "real")
    test_patients = {real.patient_ids[i] for i, s in enumerate(real.splits) if s == "test"}
    assert good["test_images"] == len(test_patients)
    # a second run reuses every trained model
    stamp = (out / "models" / "real" / "classifier.pt").stat().st_mtime_ns
    again = run("faithful")
    assert (out / "models" / "real" / "classifier.pt").stat().st_mtime_ns == stamp
    assert json_safe(again["rows"]) == json_safe(good["rows"])  # NaN == NaN


def test_tstr_refuses_bad_settings(phantoms, tmp_path):
    cfg = TSTRConfig(str(phantoms / "faithful"), str(phantoms / "real"), str(tmp_path / "t"), budget=10 ** 6)
    with pytest.raises(ValueError, match="budget"):
        run_tstr(cfg, progress=False)
    assert cli(["evaluate", "tstr", "--synthetic", str(tmp_path / "missing"), "--real", str(phantoms / "real"),
                "--out", str(tmp_path / "t2"), "-q"]) == 1


# --------------------------------------------------------------------------- FID per finding
class PixelFeatures:
    """A stand-in for the Inception: 16 features (4×4 block means) so that FIDs are cheap and exact."""
    dim, device, batch_size, random_weights, mode, space_name = 16, torch.device("cpu"), 7, True, "exact", "pixels"

    def describe_space(self):
        return "4×4 block means (a test stand-in)"

    def features(self, pixels):
        x = pixels.float().reshape(len(pixels), 1, *pixels.shape[-2:]) / 255
        return torch.nn.functional.adaptive_avg_pool2d(x, 4).flatten(1)


def _features(arc):
    return PixelFeatures().features(torch.from_numpy(arc.images(np.arange(len(arc)), arc.resolution))).double().numpy()


def _fid(a, b):
    return frechet_distance(FrechetStats(a.mean(0), np.cov(a, rowvar=False)), FrechetStats(b.mean(0), np.cov(b, rowvar=False)))


def test_fid_per_finding_and_against_n_equal_direct_computation(phantoms, tmp_path):
    s = fid_by_finding(str(phantoms / "faithful"), str(phantoms / "real"), tmp_path / "f", PixelFeatures(),
                       counts=[20, 60, 150], seed=3, min_images=10, progress=False, prdc=True)
    synth = open_labelled(phantoms / "faithful", tmp_path / "f", progress=False)
    real = Archive(phantoms / "real")
    fs, fr = _features(synth), _features(real)
    rows = {r["finding"]: r for r in s["rows"]}
    assert rows["all"]["fid"] == pytest.approx(_fid(fs, fr), rel=1e-6)
    for f in ("Cardiomegaly", "Effusion", "Mass"):
        k = FINDINGS.index(f)
        a, b = fs[synth.labels[:, k] == 1], fr[real.labels[:, k] == 1]
        assert rows[f]["synthetic_images"] == len(a) and rows[f]["real_images"] == len(b)
        assert rows[f]["fid"] == pytest.approx(_fid(a, b), rel=1e-6)
    assert math.isnan(rows["Hernia"]["fid"]) and rows["Hernia"]["real_images"] == 0  # no such images
    # precision / recall / density / coverage: real = A, synthetic = B, for all images and per finding
    from xrayforge.fid.prdc import prdc
    for f, sm, rm in (("all", slice(None), slice(None)),
                      ("Cardiomegaly", synth.labels[:, 1] == 1, real.labels[:, 1] == 1)):
        want = prdc(fr[rm], fs[sm])
        for m in ("precision", "recall", "density", "coverage"):
            assert rows[f][m] == pytest.approx(want[m], abs=1e-9), (f, m)
    assert math.isnan(rows["Hernia"]["precision"])
    assert "| precision |" in (tmp_path / "f" / "fid_findings.md").read_text()
    # the real-vs-real reference: one half of the patients against the other
    half = patient_split(real.patient_ids, 0.5, salt="fid-halves3")
    assert rows["all"]["real_halves_fid"] == pytest.approx(_fid(fr[half], fr[~half]), rel=1e-6)
    k = FINDINGS.index("Effusion")
    has = real.labels[:, k] == 1
    assert rows["Effusion"]["real_halves_fid"] == pytest.approx(_fid(fr[has & half], fr[has & ~half]), rel=1e-6)
    order = np.random.default_rng(3).permutation(len(synth))  # the curve's nested random subsets
    assert [c["n"] for c in s["curve"]] == [20, 60, 150, 300]
    for c in s["curve"]:
        assert c["fid"] == pytest.approx(_fid(fs[order[:c["n"]]], fr), rel=1e-6)
    assert s["curve"][0]["fid"] > s["curve"][-1]["fid"]  # the small-n bias
    for name in ("fid_findings.csv", "fid_vs_n.csv", "fid_findings.md", "fid_findings.png", "summary.json"):
        assert (tmp_path / "f" / name).is_file()


def test_fid_infinity_recovers_the_intercept():
    n = np.array([100, 200, 500, 1000, 5000])
    assert fid_infinity(n, 7.5 + 300.0 / n) == pytest.approx(7.5)
    assert math.isnan(fid_infinity([10, 20], [1.0, 2.0]))


def test_fid_findings_cli(phantoms, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("xrayforge.cli.evaluate._extractor", lambda args: PixelFeatures())
    assert cli(["evaluate", "fid-findings", "--synthetic", str(phantoms / "faithful"), "--real", str(phantoms / "real"),
                "--out", str(tmp_path / "f"), "--counts", "50", "-q"]) == 0
    assert "| Cardiomegaly |" in capsys.readouterr().out
    assert cli(["evaluate", "fid-findings", "--synthetic", str(tmp_path), "--real", str(phantoms / "real"),
                "--out", str(tmp_path / "g"), "-q"]) == 1
    assert "xrayforge sample" in capsys.readouterr().err


# --------------------------------------------------------------------------- diversity
def test_prevalence_flags_need_evidence():
    n = 1000
    synth = np.zeros((n, 3), dtype=bool)
    synth[:600, 2] = True                          # C: 60% vs 10% real -> over-produced
    synth[:300, 1] = True                          # B: as common as in the real images
    real = np.zeros((n, 3), dtype=bool)
    real[:300, 0] = real[:300, 1] = True           # A: 30% real, never produced -> under-produced
    real[:100, 2] = True
    rows = {r["finding"]: r for r in prevalence_rows(["A", "B", "C"], synth, real, real)}
    assert rows["A"]["under_produced"] == 1 and rows["A"]["ratio"] == 0
    assert rows["B"]["under_produced"] == rows["B"]["over_produced"] == 0
    assert rows["C"]["over_produced"] == 1 and rows["C"]["ratio"] == pytest.approx(6.0)
    few = prevalence_rows(["A"], np.zeros((5, 1), dtype=bool), real[:, :1], real[:, :1])[0]
    assert few["under_produced"] == 0  # 0 of 5 does not show that a 30% finding is missing
    # a finding never called on the 1000 real images: 10% of the synthetic ones is over-produced,
    # 1 in 1000 is not evidence of it (the real prevalence may be as high as about 0.4%)
    never = np.zeros((n, 1), dtype=bool)
    often, once = never.copy(), never.copy()
    often[:100], once[:1] = True, True
    assert prevalence_rows(["D"], often, never, never)[0]["over_produced"] == 1
    assert prevalence_rows(["D"], once, never, never)[0]["over_produced"] == 0
    assert prevalence_rows(["D"], never, never, never)[0]["over_produced"] == 0


def test_cooccurrence_and_combinations_by_hand():
    y = np.array([[1, 1, 0], [1, 0, 0], [0, 0, 0], [1, 1, 0]])
    co = cooccurrence(y)
    assert co[0, 0] == 0.75 and co[0, 1] == 0.5 and co[1, 2] == 0 and np.allclose(co, co.T)
    c = combinations(y)
    assert c["distinct"] == 3 and c["entropy_bits"] == pytest.approx(1.5)


@pytest.fixture(scope="module")
def generator_and_classifier(phantoms):
    torch.manual_seed(0)
    G = Generator(NetworkConfig(resolution=32, latent_dim=16, fmap_base=64, fmap_max=16)).eval()
    save_networks(phantoms / "gen", {"G_ema": G})
    clf = ChestClassifier(ClassifierConfig(input_size=32, width=8))
    clf.config.thresholds = {f: 0.5 for f in FINDINGS}
    clf.save(phantoms / "clf")
    return phantoms / "gen", phantoms / "clf"


def test_diversity_counts_what_the_classifier_calls(phantoms, generator_and_classifier, tmp_path):
    gen, clf_path = generator_and_classifier
    s = diversity(str(gen), str(clf_path), str(phantoms / "real"), tmp_path / "d", n=50, batch=16, real_limit=100,
                  per_grid=4, device="cpu", progress=False)
    # the same images, generated and classified independently
    from xrayforge.nn import load_networks
    G = load_networks(gen, names=["G_ema"])["G_ema"].eval()
    clf = load_classifier(clf_path).eval()
    with torch.no_grad():
        # as `sample` would store them: clamped and quantised to 8 bits
        probs = torch.sigmoid(clf(levels(G(latents_for(0, range(50), 16)), 8) / 255 * 2 - 1)).numpy()
    called = probs >= 0.5
    rows = {r["finding"]: r for r in s["findings"]}
    for k, f in enumerate(FINDINGS):
        assert rows[f]["synthetic_predicted_prevalence"] == pytest.approx(called[:, k].mean())
    real = Archive(phantoms / "real")
    every = np.unique(np.linspace(0, len(real) - 1, 100).round().astype(int))
    assert rows["Cardiomegaly"]["real_label_prevalence"] == pytest.approx(real.labels[every, 1].mean())
    co = np.load(tmp_path / "d" / "cooccurrence.npz")
    assert np.allclose(co["synthetic"], cooccurrence(called))
    for f, rel in s["grids"].items():  # a grid for every finding called at least once
        assert called[:, FINDINGS.index(f)].any() and (tmp_path / "d" / rel).is_file()
    assert set(s["grids"]) == {f for k, f in enumerate(FINDINGS) if called[:, k].any()}
    for name in ("findings.csv", "pairs.csv", "cooccurrence.png", "diversity.md", "summary.json"):
        assert (tmp_path / "d" / name).is_file()


def test_diversity_cli_errors(phantoms, generator_and_classifier, tmp_path, capsys):
    gen, clf = generator_and_classifier
    assert cli(["evaluate", "diversity", str(gen), "--classifier", str(clf), "--real", str(tmp_path / "none"),
                "--n", "4", "--out", str(tmp_path / "d"), "-q"]) == 1
    assert "no such file" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="2"):  # refused when the command line is parsed
        cli(["evaluate", "diversity", str(gen), "--classifier", str(clf), "--real", str(phantoms / "real"),
             "--n", "0", "--out", str(tmp_path / "d"), "-q"])
    assert "--n: 0 must be at least 1" in capsys.readouterr().err


@pytest.fixture(scope="module")
def trained_classifier(phantoms):
    """A classifier trained by `classify train` on phantoms/real (one epoch: what it learnt does not
    matter here, only which images it was fitted to), and which of the archive's images it never saw:
    the test split (phantom i with i % 5 == 0) and its validation patients."""
    from xrayforge.evaluate.classifier import ClassifierTrainConfig, train_classifier
    out = phantoms / "trained-clf"
    s = train_classifier(ClassifierTrainConfig(str(phantoms / "real"), str(out), input_size=32, width=8, epochs=1,
                                               val_fraction=0.2, device="cpu"), progress=False)
    real = Archive(phantoms / "real")
    pool = np.flatnonzero([sp != "test" for sp in real.splits])
    val = pool[patient_split([real.patient_ids[p] for p in pool], 0.2, salt="val0")]
    held = np.union1d(np.flatnonzero([sp == "test" for sp in real.splits]), val)
    assert len(held) == len(real) - s["train_images"] and len(held) >= 100
    return out, held


def test_diversity_leaves_out_the_classifiers_training_images(phantoms, generator_and_classifier, trained_classifier,
                                                             tmp_path, capsys):
    """The real reference is the part of the classifier's training archive that it did not train on:
    its predictions on its training images are more confident (overfit), the synthetic images are unseen."""
    gen, _ = generator_and_classifier
    clf, held = trained_classifier
    real = Archive(phantoms / "real")
    recorded = json.loads((clf / "training.json").read_text())["training_data"]
    assert recorded["trained_images"] == len(real) - len(held) and recorded["pool"] == "training_positions"

    def labels_of(s):
        return np.array([r["real_label_prevalence"] for r in s["findings"]])

    s = diversity(str(gen), str(clf), str(phantoms / "real"), tmp_path / "all", n=8, real_limit=None, device="cpu",
                  progress=False)
    assert np.allclose(labels_of(s), real.labels[held].mean(0))  # exactly the held-out images
    assert s["real_images"] == s["real_available"] == len(held) and s["real_excluded"] == len(real) - len(held)
    assert s["real_reference"] == "held out from the classifier"
    assert "held out from the classifier" in (tmp_path / "all" / "diversity.md").read_text()
    # --real-limit spreads over the held-out images only
    s = diversity(str(gen), str(clf), str(phantoms / "real"), tmp_path / "some", n=8, real_limit=50, device="cpu",
                  progress=False)
    some = held[np.unique(np.linspace(0, len(held) - 1, 50).round().astype(int))]
    assert s["real_images"] == 50 and s["real_available"] == len(held)
    assert np.allclose(labels_of(s), real.labels[some].mean(0))
    # the archive is known by its manifest, not its path
    shutil.copytree(phantoms / "real", tmp_path / "moved")
    s = diversity(str(gen), str(clf), str(tmp_path / "moved"), tmp_path / "moved-d", n=8, real_limit=None,
                  device="cpu", progress=False)
    assert s["real_reference"] == "held out from the classifier" and s["real_images"] == len(held)
    # asked for: every image, said so
    assert cli(["evaluate", "diversity", str(gen), "--classifier", str(clf), "--real", str(phantoms / "real"),
                "--n", "4", "--real-limit", "1000", "--include-training-images", "--out", str(tmp_path / "inc"),
                "-q"]) == 0
    s = json.loads((tmp_path / "inc" / "summary.json").read_text())
    assert s["real_reference"] == "includes the classifier's training images" and s["real_images"] == len(real)
    assert "Real reference: includes the classifier's training images" in capsys.readouterr().out


def test_diversity_against_another_archive_uses_every_image(phantoms, generator_and_classifier, trained_classifier,
                                                             tmp_path, caplog):
    gen, _ = generator_and_classifier
    clf, _ = trained_classifier
    # a sample folder: an archive the classifier never saw
    s = diversity(str(gen), str(clf), str(phantoms / "faithful"), tmp_path / "d", n=8, real_limit=None, device="cpu",
                  progress=False)
    assert s["real_reference"] == "not the classifier's training archive" and s["real_images"] == 300
    assert s["real_excluded"] == 0 and str(phantoms / "real") in s["real_reference_note"]
    assert "not the classifier's training archive" in (tmp_path / "d" / "diversity.md").read_text()
    # other phantoms are the same phantoms (phantom:i is one image): which it trained on cannot be told
    prepare("phantom:120", tmp_path / "fewer", resolution=32, workers=1, progress=False)
    caplog.clear()
    s = diversity(str(gen), str(clf), str(tmp_path / "fewer"), tmp_path / "e", n=8, real_limit=None, device="cpu",
                  progress=False)
    assert s["real_reference"] == "unknown" and s["real_images"] == 120
    assert "cannot be told" in caplog.text


def test_diversity_with_a_classifier_that_records_no_training_data(phantoms, generator_and_classifier,
                                                                    trained_classifier, tmp_path, caplog):
    """A classifier trained before training.json recorded its images (or trained elsewhere): every
    real image, with a warning and the summary saying that the reference is unknown."""
    gen, _ = generator_and_classifier
    clf, _ = trained_classifier
    old = tmp_path / "old-clf"
    shutil.copytree(clf, old)
    record = json.loads((old / "training.json").read_text())
    record.pop("training_data", None)
    (old / "training.json").write_text(json.dumps(record))
    caplog.clear()
    s = diversity(str(gen), str(old), str(phantoms / "real"), tmp_path / "d", n=8, real_limit=None, device="cpu",
                  progress=False)
    assert s["real_reference"] == "unknown" and s["real_images"] == 400 and s["real_excluded"] == 0
    assert "records no training data" in caplog.text and str(old) in caplog.text
    assert "Real reference: unknown" in (tmp_path / "d" / "diversity.md").read_text()
    (old / "training.json").unlink()  # no training.json at all: the same
    s = diversity(str(gen), str(old), str(phantoms / "real"), tmp_path / "e", n=8, real_limit=None, device="cpu",
                  progress=False)
    assert s["real_reference"] == "unknown" and s["real_images"] == 400
    record["training_data"] = {"archive_id": "0" * 40, "archive_images": 400, "trained_on": "not base64!"}
    (old / "training.json").write_text(json.dumps(record))
    with pytest.raises(UserError, match=r"training\.json: damaged training_data"):
        diversity(str(gen), str(old), str(phantoms / "real"), tmp_path / "f", n=8, device="cpu", progress=False)


def test_diversity_refuses_too_few_held_out_images(phantoms, generator_and_classifier, tmp_path):
    """A classifier trained on nearly the whole archive leaves too few unseen images to compare with."""
    from xrayforge.evaluate.classifier import ClassifierTrainConfig, train_classifier
    gen, _ = generator_and_classifier
    s = train_classifier(ClassifierTrainConfig(str(phantoms / "real"), str(tmp_path / "clf"), input_size=32, width=8,
                                               epochs=1, val_fraction=0.1, subset=list(range(400)), device="cpu"),
                         progress=False)
    with pytest.raises(UserError, match=rf"only {s['val_images']} of its 400 images .* at least 100"):
        diversity(str(gen), str(tmp_path / "clf"), str(phantoms / "real"), tmp_path / "d", n=8, device="cpu",
                  progress=False)


# --------------------------------------------------------------------------- report
def test_report_gathers_every_evaluation(phantoms, generator_and_classifier, tmp_path):
    gen, clf = generator_and_classifier
    run = tmp_path / "run"
    (run / "evaluations").mkdir(parents=True)
    ticks = [{"tick": 1, "images": 800, "resolution": 32, "alpha": 1.0, "d_loss": -1.0, "g_loss": 2.0, "gp": 0.1,
              "seconds": 12.0}]
    (run / "log.jsonl").write_text("\n".join(json.dumps(t) for t in ticks) + "\n")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(run / "grid-latest.png")
    diversity(str(gen), str(clf), str(phantoms / "real"), run / "evaluations" / "diversity", n=20, real_limit=40,
              device="cpu", progress=False)
    fid_by_finding(str(phantoms / "faithful"), str(phantoms / "real"), tmp_path / "fid", PixelFeatures(),
                   counts=[50], progress=False)
    reader = tmp_path / "reader"
    reader.mkdir()
    rates = {"answers": 10, "accuracy": 0.6, "sensitivity_synthetic": 0.6, "specificity_synthetic": 0.6,
             "synthetic_called_real": 0.4, "binomial_p": 0.75}
    (reader / "summary.json").write_text(json.dumps({"evaluation": "reader-study", "result": {
        "readers": {"r1": rates}, "pooled": rates, "images": 10, "fleiss_kappa": None, "kappa_images": 10}}))
    out = tmp_path / "site" / "report.html"
    info = write_report(out, run, [tmp_path / "fid", reader])
    assert set(info["evaluations"]) == {"diversity", "fid-findings", "reader-study"}
    page = out.read_text()
    for text in ("Training", "800 images seen", "FID", "Disease diversity", "Samples per finding", "Reader study",
                 "Not evaluated", "tstr, memorisation"):
        assert text in page, text
    assert page.count("data:image/png;base64") >= 4 and "missing image" not in page
    md = (tmp_path / "site" / "report.md").read_text()
    assert "](../run/grid-latest.png)" in md  # image links work from the Markdown file's folder
    with pytest.raises(FileNotFoundError, match="summary.json"):
        write_report(out, run, [tmp_path])
    assert cli(["evaluate", "report", str(tmp_path / "nope"), "--out", str(out)]) == 1


def test_report_says_n_a_for_undefined_rates_and_replaces_only_its_own_files(tmp_path, capsys):
    """A diverged run (losses logged as null) and a reader who saw only synthetic images (rates
    undefined) still give a report; the report never replaces a file it did not write."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "log.jsonl").write_text(json.dumps({"tick": 1, "images": 64, "resolution": 8, "alpha": 1.0,
                                               "d_loss": None, "g_loss": None, "gp": None, "seconds": 3.0}) + "\n")
    reader = tmp_path / "reader"
    reader.mkdir()
    rates = {"answers": 4, "accuracy": 0.5, "sensitivity_synthetic": 0.5, "specificity_synthetic": None,
             "synthetic_called_real": 0.5, "binomial_p": 1.0}
    (reader / "summary.json").write_text(json.dumps({"evaluation": "reader-study", "result": {
        "readers": {"r1": rates}, "pooled": rates, "images": 4, "fleiss_kappa": None, "kappa_images": 4}}))
    out = tmp_path / "site" / "report.html"
    write_report(out, run, [reader])
    page = out.read_text()
    assert "D n/a, G n/a, gradient penalty n/a" in page and "| r1 | 4 | 0.500 | 0.500 | n/a |" in \
        (tmp_path / "site" / "report.md").read_text()
    write_report(out, run, [reader])  # its own report: replaced
    for name in ("report.md", "report.html"):
        (tmp_path / "site" / name).write_text("my notes\n")
        with pytest.raises(UserError, match=f"{name}: exists and is not a report"):
            write_report(out, run, [reader])
        assert (tmp_path / "site" / name).read_text() == "my notes\n"
        (tmp_path / "site" / name).unlink()
    # reports written before the mark existed are known by their style sheet
    write_report(out, run, [reader])
    for name in ("report.md", "report.html"):
        path = tmp_path / "site" / name
        path.write_text(path.read_text().replace(REPORT_MARK + "\n", "").replace(REPORT_MARK, ""))
    write_report(out, run, [reader])
    # ... but a user's own notes beside an older report are not a report's Markdown copy
    (tmp_path / "site" / "report.html").write_text((tmp_path / "site" / "report.html").read_text()
                                                   .replace(REPORT_MARK, ""))
    (tmp_path / "site" / "report.md").write_text("# my notes\n\nabout the run\n")
    with pytest.raises(UserError, match="report.md: exists and is not a report"):
        write_report(out, run, [reader])


def test_report_escapes_every_line_but_its_own_mark(tmp_path):
    """A reader's name (from an answer file a reader hands in) that looks like an HTML comment must
    not become live markup."""
    reader = tmp_path / "reader"
    reader.mkdir()
    rates = {"answers": 4, "accuracy": 0.5, "sensitivity_synthetic": 0.5, "specificity_synthetic": 0.5,
             "synthetic_called_real": 0.5, "binomial_p": 1.0}
    evil = "<!--> <img src=x onerror=alert(1)> -->"
    (reader / "summary.json").write_text(json.dumps({"evaluation": "reader-study", "result": {
        "readers": {f"r1\n{evil}": rates}, "pooled": rates, "images": 4, "fleiss_kappa": None, "kappa_images": 4}}))
    out = tmp_path / "report.html"
    write_report(out, None, [reader])
    page = out.read_text()
    assert "<img src=x" not in page and "&lt;img src=x onerror" in page
    assert page.count(REPORT_MARK) == 1 and (tmp_path / "report.md").read_text().startswith(REPORT_MARK + "\n")


def test_fid_findings_says_what_it_cannot_measure(phantoms, tmp_path, caplog):
    """Counts outside 2 .. the synthetic images are said, not dropped quietly; against a real archive
    prepared without labels the per-finding n/a is put down to that, not to too few images."""
    import logging
    with caplog.at_level(logging.WARNING, logger="xrayforge.evaluate.fid_findings"):
        s = fid_by_finding(str(phantoms / "faithful"), str(phantoms / "real"), tmp_path / "f", PixelFeatures(),
                           counts=[1, 20, 600], progress=False)
    assert [c["n"] for c in s["curve"]] == [20, 300]
    assert "--counts 1, 600: left out of the FID curve (it takes 2 .. 300" in caplog.text
    assert s["real_labelled"] and "without finding labels" not in (tmp_path / "f" / "fid_findings.md").read_text()
    (tmp_path / "pngs").mkdir()
    real = Archive(phantoms / "real")
    for k in range(40):
        Image.fromarray(real.images(np.array([k]), real.resolution)[0]).save(tmp_path / "pngs" / f"{k}.png")
    prepare(str(tmp_path / "pngs"), tmp_path / "unlabelled", resolution=32, workers=1, progress=False)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="xrayforge.evaluate.fid_findings"):
        s = fid_by_finding(str(phantoms / "faithful"), str(tmp_path / "unlabelled"), tmp_path / "g", PixelFeatures(),
                           progress=False)
    assert "prepared without finding labels" in caplog.text and not s["real_labelled"]
    assert math.isfinite(s["rows"][0]["fid"]) and all(math.isnan(r["fid"]) for r in s["rows"][1:])
    assert "prepared without finding labels" in (tmp_path / "g" / "fid_findings.md").read_text()


def test_auroc_of_nan_scores_is_nan_not_a_number_from_their_sort_order():
    """A NaN score sorted last, as the highest: auroc gave 0.75 for all-NaN scores and 1.0 for one NaN
    on a positive; its callers take NaN as "not measured". The bootstrap gives no interval either."""
    y = np.array([0, 1, 0, 1, 1, 0])
    for s in (np.full(6, np.nan), np.array([0.1, np.nan, 0.2, 0.9, 0.8, 0.3])):
        assert math.isnan(auroc(y, s))
        assert all(math.isnan(v) for v in bootstrap_auroc(y, s, rounds=10))
