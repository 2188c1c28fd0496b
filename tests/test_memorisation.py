import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from xrayforge.cli import main as cli
from xrayforge.data.archive import Archive
from xrayforge.data.phantom import render
from xrayforge.data.prepare import prepare
from xrayforge.evaluate.memorisation import _halves, _patients, chance_sentence, screen
from xrayforge.evaluate.metrics import fisher_greater
from xrayforge.utils.neighbours import pixel_vectors


@pytest.mark.slow
def test_copied_training_images_are_flagged(tmp_path):
    prepare("phantom:30", tmp_path / "real", resolution=32, workers=1, progress=False)
    arc = Archive(tmp_path / "real")
    synth = tmp_path / "synth"
    synth.mkdir()
    copies = {3: "copy_a.png", 17: "copy_b.png"}
    for row, name in copies.items():  # a generator that memorised two patients
        Image.fromarray(arc.images([row], 32)[0]).save(synth / name)
    for seed in range(1000, 1010):  # and ten new ones
        img, _ = render(32, seed)
        Image.fromarray((img * 255).round().astype(np.uint8)).save(synth / f"new_{seed}.png")
    assert cli(["evaluate", "memorisation", "--synthetic", str(synth), "--real", str(tmp_path / "real"), "--out",
                str(tmp_path / "audit"), "--random-weights", "--workers", "0", "-q"]) == 0
    with open(tmp_path / "audit" / "memorisation.csv", newline="") as fh:
        rows = {r["synthetic"].split("/")[-1]: r for r in csv.DictReader(fh)}
    for row, name in copies.items():
        assert rows[name]["flagged"] == "1" and float(rows[name]["pixel_distance"]) < 1e-6
        assert rows[name]["nearest_real_pixels"] == arc.records[row]["source"]
    # the copies are the two closest pairs by far; new patients sit at real-to-real distances
    by_pixels = sorted(rows, key=lambda k: float(rows[k]["pixel_distance"]))
    assert set(by_pixels[:2]) == set(copies.values())
    new = [float(r["pixel_distance"]) for k, r in rows.items() if k.startswith("new_")]
    assert min(new) > 100 * max(float(rows[n]["pixel_distance"]) for n in copies.values()) + 0.1
    summary = json.loads((tmp_path / "audit" / "summary.json").read_text())
    assert summary["synthetic"] == 12 and summary["real"] == 30 and summary["flagged"] >= 2
    # the control group: the reals flagged against the other half (screen's arithmetic is tested below)
    assert 0 <= summary["real_flagged"] <= 30
    assert summary["expected_by_chance"] == pytest.approx(12 * summary["real_flagged"] / 30)
    assert 0 < summary["p_value"] <= 1 and summary["more_than_chance"] == (summary["p_value"] < 0.01)
    assert (tmp_path / "audit" / "distances.png").stat().st_size > 0
    assert (tmp_path / "audit" / "closest_pairs.png").stat().st_size > 0


def test_flags_are_weighed_against_chance_on_phantoms():
    """On phantom radiographs, in pixel space and a coarse 8×8 one: new patients (images the
    reference set does not hold) are flagged no more often than chance gives; a generator that
    reproduces half of its images from training patients is flagged far more often. (The test
    needs more than a few dozen reals: with 20 per half the 1st percentile is the smallest
    distance, which a new image beats in about 1 of 10 tries per space.)"""
    images = torch.from_numpy(np.stack([render(32, seed)[0] for seed in range(424)]))

    def spaces(x):
        return [pixel_vectors(x), pixel_vectors(x, 8)]
    real = spaces(images[:400])
    new = screen(spaces(images[400:]), real)
    copies = screen(spaces(torch.cat([images[0:400:34][:12], images[400:412]])), real)
    assert new["p_value"] >= 0.05 and new["real_flagged"] == copies["real_flagged"]  # the same reals
    assert copies["flagged"][:12].all() and copies["p_value"] < 0.01
    summary = {"real": 400, "real_flagged": new["real_flagged"], "expected_by_chance": 1.0,
               "synthetic_flagged_half": 0.5}
    assert "no more than chance" in chance_sentence(dict(summary, p_value=new["p_value"], more_than_chance=False))
    assert "more than chance gives" in chance_sentence(dict(summary, p_value=copies["p_value"], more_than_chance=True))
    assert chance_sentence({"flagged": 1, "synthetic": 2}) == ""  # a summary from before the baseline


def _spaces(rng, n):
    """Two correlated spaces of n points: 6-d Gaussian features, and a noisy nonlinear 4-d view."""
    f = torch.from_numpy(rng.standard_normal((n, 6)))
    return [f, torch.tanh(f[:, :4] * 1.5) + 0.3 * torch.from_numpy(rng.standard_normal((n, 4)))]


def test_screen_equals_the_rule_applied_by_hand():
    rng = np.random.default_rng(3)
    for n, m, q in ((25, 10, 1.0), (25, 7, 20.0), (41, 12, 7.5), (4, 3, 1.0)):
        real, synth = _spaces(rng, n), _spaces(rng, m)
        got = screen(synth, real, q, seed=5)

        def flags(queries, refs):  # the rule by hand, with whole distance matrices
            f = np.zeros(len(queries[0]), dtype=bool)
            for x, r in zip(queries, refs):
                rr = torch.cdist(r, r)
                rr.fill_diagonal_(float("inf"))
                f |= (torch.cdist(x, r).min(1).values < np.percentile(rr.min(1).values.numpy(), q)).numpy()
            return f
        assert (got["flagged"].numpy() == flags(synth, real)).all()
        perm = np.random.default_rng(5).permutation(n)
        halves = (perm[:n // 2], perm[n // 2:])
        controls, flagged_half, ps = 0, 0, []
        for ref, ctrl in (halves, halves[::-1]):
            refs = [x[ref] for x in real]
            c, f = flags([x[ctrl] for x in real], refs).sum(), flags(synth, refs).sum()
            controls, flagged_half = controls + c, flagged_half + f
            ps.append(fisher_greater(int(f), m, int(c), len(ctrl)))
        assert got["real_flagged"] == controls and got["p_value"] == pytest.approx(min(1, 2 * min(ps)))
        assert got["synthetic_flagged_half"] == pytest.approx(flagged_half / 2)
    assert screen(*(_spaces(rng, 3), _spaces(rng, 3)))["p_value"] is None  # too few reals to split


def test_screen_is_calibrated_under_the_null_and_finds_copies():
    """Simulated: synthetic images drawn like the reals are flagged no more often than the reals
    are against the same half of the reals (Fisher p < 0.05 in at most 5% of trials: exact, and
    conservative for discrete counts), with many synthetic images as with few; with 12 of 50
    synthetic images copies of real ones (a little noise added), p < 0.01 in nearly every trial."""
    rng = np.random.default_rng(0)
    null_p = [screen(_spaces(rng, 50), _spaces(rng, 200))["p_value"] for _ in range(300)]
    null_p += [screen(_spaces(rng, 1000), _spaces(rng, 100))["p_value"] for _ in range(40)]  # 10× more synthetic
    assert np.mean(np.array(null_p) < 0.05) <= 0.05
    copy_p = []
    for _ in range(20):
        real, synth = _spaces(rng, 1000), _spaces(rng, 50)
        rows = rng.choice(1000, 12, replace=False)
        copied = [torch.cat([r[rows] + 1e-3 * torch.from_numpy(rng.standard_normal(r[rows].shape)), s[12:]])
                  for r, s in zip(real, synth)]
        copy_p.append(screen(copied, real)["p_value"])
    assert np.mean(np.array(copy_p) < 0.01) >= 0.9


def test_fisher_greater_against_scipy():
    stats = pytest.importorskip("scipy.stats")
    for a, na, b, nb in ((0, 10, 3, 20), (4, 96, 2, 8000), (10, 20, 2, 40), (5, 5, 0, 5), (3, 100000, 1, 100000),
                         (1200, 100000, 1000, 100000), (2, 12, 1, 30)):
        want = stats.fisher_exact([[a, na - a], [b, nb - b]], alternative="greater")[1]
        assert fisher_greater(a, na, b, nb) == pytest.approx(want, rel=1e-9, abs=1e-300), (a, na, b, nb)
    assert fisher_greater(0, 5, 0, 5) == 1.0 and fisher_greater(5, 5, 0, 5) == pytest.approx(1 / 252)


def _follow_ups(rng, patients, d=6):
    """Two scans per patient: one point each, 0.05 apart per coordinate (a follow-up), and the patient ids."""
    base = np.repeat(rng.standard_normal((patients, d)), 2, 0)
    return torch.from_numpy(base + 0.05 * rng.standard_normal(base.shape)), np.repeat(np.arange(patients), 2)


def test_control_halves_keep_each_patient_together():
    rng = np.random.default_rng(0)
    groups = rng.integers(0, 30, 101)
    a, b = _halves(101, groups, 4)
    assert sorted(np.r_[a, b]) == list(range(101)) and not set(groups[a]) & set(groups[b])
    assert abs(len(a) - 50.5) <= np.bincount(groups).max()
    assert _halves(6, ["p"] * 5 + ["q"], 0) is None  # no split leaves 2 images a side
    real = [torch.from_numpy(rng.standard_normal((6, 3)))]
    assert screen(real, real, groups=["p"] * 5 + ["q"])["p_value"] is None


def test_screen_by_patient_finds_near_copies_that_follow_up_scans_hide():
    """Reals: 300 patients with two close scans each. Halves by image put half the controls beside their
    own follow-up in the reference, so they are flagged as often as near-copies of training patients are,
    and the test misses a generator that nearly copies 10 of its 100 images; halves by patient make the
    controls new patients, as the synthetic images are, and find it. Still calibrated under the null."""
    rng = np.random.default_rng(0)
    by_image, by_patient, null = [], [], []
    for t in range(10):
        real, pid = _follow_ups(rng, 300)
        rows = rng.choice(len(real), 10, replace=False)
        synth = torch.cat([real[rows] + 0.02 * torch.from_numpy(rng.standard_normal((10, 6))),
                           torch.from_numpy(rng.standard_normal((90, 6)))])
        by_image.append(screen([synth], [real], seed=t)["p_value"])
        by_patient.append(screen([synth], [real], seed=t, groups=pid)["p_value"])
        null.append(screen([torch.from_numpy(rng.standard_normal((100, 6)))], [real], seed=t, groups=pid)["p_value"])
    assert np.mean(np.array(by_patient) < 0.01) >= 0.8 and np.mean(np.array(by_image) < 0.01) <= 0.2  # 9/10, 0/10
    assert np.mean(np.array(null) < 0.05) <= 0.1


def test_audit_takes_patients_from_an_archive_and_not_from_a_folder(tmp_path):
    folder = tmp_path / "scans"
    folder.mkdir()
    for k in range(6):
        Image.fromarray((render(16, k)[0] * 255).round().astype(np.uint8)).save(folder / f"{k:03d}.png")
    (tmp_path / "labels.csv").write_text("Image Index,Finding Labels,Patient ID\n" + "".join(
        f"{k:03d}.png,No Finding,{k // 2}\n" for k in range(6)))
    prepare(str(folder), tmp_path / "arc", resolution=16, labels=str(tmp_path / "labels.csv"), workers=1,
            progress=False)
    arc = Archive(tmp_path / "arc")
    names = [r["source"] for r in arc.records]
    want = {n: str(int(n.rsplit("/", 1)[-1][:3]) // 2) for n in names}
    assert _patients(str(tmp_path / "arc"), names) == [want[n] for n in names]
    assert _patients(str(folder), names) is None
    # an archive whose images have no patient ids (prepared without labels): halves by image, said so
    prepare(str(folder), tmp_path / "bare", resolution=16, workers=1, progress=False)
    bare = [r["source"] for r in Archive(tmp_path / "bare").records]
    assert _patients(str(tmp_path / "bare"), bare) is None


def test_expected_by_chance_weighs_uneven_halves_as_the_synthetic_flags_are():
    """Patient halves can differ in size: the expected synthetic flags are the average over the two
    passes of (controls flagged / controls) × synthetic images, as synthetic_flagged_half averages
    the synthetic flags; real_flagged / all reals weighed the larger half more."""
    rng = np.random.default_rng(3)
    real = torch.from_numpy(rng.standard_normal((40, 5)))
    groups = [f"g{k // 3}" for k in range(39)] + ["solo"]  # patients of 3 scans and one of 1: no 20 / 20 split
    synth = torch.from_numpy(rng.standard_normal((30, 5)))
    out = screen([synth], [real], percentile=20.0, seed=1, groups=groups)
    from xrayforge.evaluate.memorisation import _halves
    a, b = _halves(40, groups, 1)
    assert len(a) != len(b) and out["real_flagged"] is not None
    rates = []
    for ref, ctrl in ((a, b), (b, a)):
        both = screen([torch.cat([synth, real[ctrl]])], [real[ref]], percentile=20.0)["flagged"]
        rates.append(float(both[30:].sum()) / len(ctrl))
    assert out["expected_by_chance"] == pytest.approx(np.mean(rates) * 30)
