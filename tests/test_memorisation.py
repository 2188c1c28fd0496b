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
from xrayforge.evaluate.memorisation import _halves, _patients, chance_sentence, design_effect, screen
from xrayforge.evaluate.metrics import fisher_greater
from xrayforge.fid.compute import FeatureExtractor
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
        assert rows[name]["flagged"] == "1" and float(rows[name]["pixel_distance"]) == 0  # a copy: exactly 0 apart
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


def _follow_ups(rng, patients, d=6, apart=0.05, scans=2):
    """``scans`` scans per patient: one point each, ``apart`` per coordinate from the patient's point
    (follow-ups), and the patient ids."""
    base = np.repeat(rng.standard_normal((patients, d)), scans, 0)
    return (torch.from_numpy(base + apart * rng.standard_normal(base.shape)),
            np.repeat(np.arange(patients), scans))


def _near_copies(rng, real, copies, new, off):
    """``copies`` training images ``off`` per coordinate away, then ``new`` images drawn as new patients are."""
    rows = rng.choice(len(real), copies, replace=False)
    d = real.shape[1]
    return torch.cat([real[rows] + off * torch.from_numpy(rng.standard_normal((copies, d))),
                      torch.from_numpy(rng.standard_normal((new, d)))])


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
    """Reals: 500 patients with two scans each, 0.005 apart per coordinate; a generator that reproduces 20
    of its 200 images from training images, 0.03 per coordinate off (further than a rescan, far nearer
    than another patient). Halves by image (patients unknown) take the threshold from each image's
    nearest other image, its follow-up, which the copies do not come as close as: missed. With the
    patients known, the threshold is each image's nearest other patient and the controls are new
    patients, as the synthetic images are: found. Copies nearer than a rescan (scans 0.05 apart,
    copies 0.02 off) are found too. Still calibrated under the null."""
    rng = np.random.default_rng(0)
    by_image, by_patient, nearer, null = [], [], [], []
    for t in range(10):
        real, pid = _follow_ups(rng, 500, apart=0.005)
        synth = _near_copies(rng, real, 20, 180, 0.03)
        by_image.append(screen([synth], [real], seed=t)["p_value"])
        by_patient.append(screen([synth], [real], seed=t, groups=pid)["p_value"])
        null.append(screen([torch.from_numpy(rng.standard_normal((200, 6)))], [real], seed=t, groups=pid)["p_value"])
        real, pid = _follow_ups(rng, 500, apart=0.05)
        nearer.append(screen([_near_copies(rng, real, 20, 180, 0.02)], [real], seed=t, groups=pid)["p_value"])
    assert np.mean(np.array(by_patient) < 0.05) >= 0.8 and np.median(by_patient) < 0.01  # 9/10, median 0.005
    assert np.mean(np.array(by_image) < 0.05) == 0  # every p = 1: no copy under a rescan's distance
    assert np.mean(np.array(nearer) < 0.05) >= 0.8
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
    the synthetic flags; real_flagged / all reals weighed the larger half more. A control is every
    image of the other half, and the reference half's threshold comes from its images' nearest
    images of another patient (each patient's scans here are one point twice or three times, and
    the nearest other scan would be at 0)."""
    rng = np.random.default_rng(3)
    sizes = [1, 2, 3, 2, 3, 1, 2, 3, 3, 2, 1, 3, 2, 3, 2, 1]
    groups = np.repeat([f"g{k}" for k in range(len(sizes))], sizes)
    real = torch.from_numpy(np.repeat(rng.standard_normal((len(sizes), 5)), sizes, 0))
    synth = torch.from_numpy(rng.standard_normal((30, 5)))
    out = screen([synth], [real], percentile=20.0, seed=1, groups=groups)
    a, b = _halves(len(real), groups, 1)
    patients = [len(set(groups[h])) for h in (a, b)]
    assert patients[0] != patients[1] and out["real_flagged"] is not None
    assert out["controls"] == len(real) and out["threshold_excludes"] == "same patient"  # every control image
    rates, synth_flags = [], []
    for ref, ctrl in ((a, b), (b, a)):
        nn = torch.cdist(real[ref], real[ref])
        nn[torch.from_numpy(groups[ref][:, None] == groups[ref][None, :])] = float("inf")
        thr = np.percentile(nn.min(1).values.numpy(), 20.0)
        ctrl_d = torch.cdist(real[ctrl], real[ref]).min(1).values.numpy()
        rates.append(float((ctrl_d < thr).sum()) / len(ctrl))
        synth_flags.append(int((torch.cdist(synth, real[ref]).min(1).values.numpy() < thr).sum()))
    assert out["expected_by_chance"] == pytest.approx(np.mean(rates) * 30)
    assert out["synthetic_flagged_half"] == pytest.approx(np.mean(synth_flags))


def test_threshold_is_the_nearest_other_patient_not_a_rescan():
    """An archive-like set: 80 patients, each with a near-duplicate rescan. Each real image's nearest
    other image is its rescan, so the threshold from it is near 0 and a synthetic image 0.05 from a
    training image (far closer than any new patient comes) passes; with the patients known the
    threshold is the percentile of each image's distance to its nearest image of another patient,
    as the masked distance matrix says, and the near-copies are flagged."""
    rng = np.random.default_rng(5)
    base = np.repeat(rng.standard_normal((80, 6)), 2, 0)
    real = torch.from_numpy(base + 1e-3 * rng.standard_normal(base.shape))
    pid = np.repeat([f"patient{k}" for k in range(80)], 2)
    near = real[::16] + 0.02 * torch.from_numpy(rng.standard_normal((10, 6)))  # 10 near-copies, about 0.05 away
    synth = torch.cat([near, torch.from_numpy(rng.standard_normal((30, 6)))])
    full = torch.cdist(real, real)
    rescan = full.clone().fill_diagonal_(float("inf")).min(1).values.numpy()
    full[torch.from_numpy(pid[:, None] == pid[None, :])] = float("inf")
    other = full.min(1).values.numpy()
    for q in (1.0, 10.0):
        got = screen([synth], [real], q, groups=pid)
        assert got["threshold_excludes"] == "same patient"
        np.testing.assert_allclose(got["real_nn"][0].numpy(), other, rtol=1e-6)
        assert got["threshold"][0] == pytest.approx(np.percentile(other, q), rel=1e-6)
        assert got["threshold"][0] > 0.2 and got["flagged"][:10].all()
        old = screen([synth], [real], q)  # without patient ids: the nearest other image, the rescan
        assert old["threshold_excludes"] == "self" and old["threshold"][0] == pytest.approx(np.percentile(rescan, q))
        assert old["threshold"][0] < 0.01 and not old["flagged"][:10].any()
    with pytest.raises(ValueError, match="one patient"):
        screen([synth], [real], groups=["p"] * len(real))


class _PixelFeatures(FeatureExtractor):
    """The extractor's image reading, with 8×8 grey levels for features (no network to build)."""
    space_name = "pixels-8"

    def __init__(self):  # what image_batches uses
        self.device, self.batch_size, self.workers, self.progress = torch.device("cpu"), 8, 0, False

    def describe_space(self):
        return "8×8 grey levels (a test's)"

    def features(self, images):
        images = torch.stack(images) if isinstance(images, list) else images
        return pixel_vectors(images.float() / 255.0, 8)


def test_audit_threshold_and_medians_skip_the_same_patients_rescans(tmp_path):
    """An archive of 8 patients with 2 scans each, the second the first with a few grey levels
    changed: the real-to-real distances of the threshold, the medians and the controls are by
    patient, and the summary says so; the same images as a folder (patients unknown) keep the
    nearest other image, the rescan."""
    folder, synth = tmp_path / "scans", tmp_path / "synth"
    folder.mkdir()
    synth.mkdir()
    rng = np.random.default_rng(0)
    for p in range(8):
        img = (render(16, p)[0] * 255).round().astype(np.uint8)
        rescan = img.copy()
        rescan[rng.integers(0, 16, 3), rng.integers(0, 16, 3)] ^= 1
        Image.fromarray(img).save(folder / f"{2 * p:03d}.png")
        Image.fromarray(rescan).save(folder / f"{2 * p + 1:03d}.png")
    for seed in range(100, 104):
        Image.fromarray((render(16, seed)[0] * 255).round().astype(np.uint8)).save(synth / f"new_{seed}.png")
    (tmp_path / "labels.csv").write_text("Image Index,Finding Labels,Patient ID\n" + "".join(
        f"{k:03d}.png,No Finding,{k // 2}\n" for k in range(16)))
    prepare(str(folder), tmp_path / "arc", resolution=16, labels=str(tmp_path / "labels.csv"), workers=1,
            progress=False)
    from xrayforge.evaluate.memorisation import audit
    by_patient = audit(str(synth), str(tmp_path / "arc"), tmp_path / "a", _PixelFeatures(), percentile=10.0,
                       progress=False)
    by_image = audit(str(synth), str(folder), tmp_path / "b", _PixelFeatures(), percentile=10.0, progress=False)
    assert by_patient["threshold_excludes"] == "same patient" and by_patient["halves_by"] == "patient"
    assert by_image["threshold_excludes"] == "self" and by_image["halves_by"] == "image"
    assert by_image["threshold_pixels"] < 0.05 and by_image["median_real_to_real_pixels"] < 0.05  # the rescans
    assert by_patient["threshold_pixels"] > 10 * by_image["threshold_pixels"] + 0.5
    assert by_patient["median_real_to_real_pixels"] > 10 * by_image["median_real_to_real_pixels"] + 0.5
    assert by_patient["controls"] == 16 and by_image["controls"] == 16  # every image, a patient's scans together
    assert by_patient["design_effect"] >= 1 and by_image["design_effect"] == 1
    saved = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert saved["threshold_excludes"] == "same patient" and saved["controls"] == 16
    assert "every image of each patient" in chance_sentence(saved) and "design effect" in chance_sentence(saved)


def test_halves_by_patient_stay_calibrated_and_find_copies_farther_than_a_rescan():
    """Reals: patients with two near scans each (0.005 per coordinate), or four. A generator that
    copies nothing (synthetic images drawn as new patients are) is flagged more than the controls
    (p < 0.05) in at most 5% of seeded trials, with the reference halves' thresholds from the
    nearest other patient and every control image counted, shrunk by the design effect: counting
    every scan as independent (a patient's scans are flagged together) made it 8% with two scans
    and about 20% with four; the design effect brings it to 1-2% (500 trials each). One that reproduces 10% of its images from training images, 0.03 per coordinate off
    (further than a rescan, much nearer than another patient), is found: thresholds at rescan
    distances missed every copy (p = 1)."""
    rng = np.random.default_rng(11)
    for scans, patients, trials in ((2, 100, 60), (4, 50, 40)):
        null = []
        for t in range(trials):
            real, pid = _follow_ups(rng, patients, apart=0.005, scans=scans)
            out = screen([torch.from_numpy(rng.standard_normal((200, 6)))], [real], 5.0, seed=t, groups=pid)
            assert out["controls"] == patients * scans and out["design_effect"] > 1
            null.append(out["p_value"])
        assert np.mean(np.array(null) < 0.05) <= 0.05, scans
    copies = []
    for t in range(20):
        real, pid = _follow_ups(rng, 500, apart=0.005)
        copies.append(screen([_near_copies(rng, real, 20, 180, 0.03)], [real], seed=t, groups=pid)["p_value"])
    assert np.mean(np.array(copies) < 0.05) >= 0.8 and np.median(copies) < 0.01


def test_design_effect_by_hand():
    """Rao & Scott's design effect: patients of 3, 1, 2 and 4 images with 2, 0, 2 and 0 flags: p = 4/10,
    the residuals f_i - p n_i 0.8, -0.4, 1.2, -1.6 (squares 4.8), v = 4/3 · 4.8 / 100, the binomial
    variance 0.4 · 0.6 / 10: d = 0.064 / 0.024 = 2.67."""
    flags = [1, 1, 0, 0, 1, 1, 0, 0, 0, 0]
    groups = ["a", "a", "a", "b", "c", "c", "d", "d", "d", "d"]
    assert design_effect(flags, groups) == pytest.approx(8 / 3)
    assert design_effect([1, 0, 1, 0], ["a", "b", "c", "d"]) == pytest.approx(4 / 3)  # one image each: K/(K-1)
    assert design_effect([1, 0, 0, 0, 0, 1], ["a", "a", "a", "b", "b", "b"]) == 1.0  # less spread than binomial
    assert design_effect([0, 0, 0], ["a", "a", "b"]) == 1.0 and design_effect([1, 1], ["a", "b"]) == 1.0  # p 0, 1
    assert design_effect([1, 0, 1], ["a", "a", "a"]) == 1.0  # one patient


def test_heterogeneous_patients_are_weighed_as_the_generator_samples():
    """A generator samples the images: patients with many scans (a dense region: inpatient
    follow-ups) weigh by their scans. With 150 single-scan patients and 15 ten-scan ones, a
    generator drawing new images from that image-weighted distribution (half of them of the
    ten-scan kind) is not flagged more than the controls in more than about 5% of trials
    (one image per control patient weighed the patients, and found 'copies' in 11-12%); the
    expected flags match the synthetic ones on average."""
    ps, synth, chance = [], [], []
    for seed in range(60):
        rng = np.random.default_rng(seed)
        a = rng.normal(0, 1.0, (150, 2))
        b = np.repeat(rng.normal(4, 0.6, (15, 2)), 10, 0) + rng.normal(0, 0.05, (150, 2))
        real = torch.from_numpy(np.vstack([a, b]))
        groups = [f"a{i}" for i in range(150)] + [f"b{i // 10}" for i in range(150)]
        kind_b = rng.random(300) < 0.5
        syn = np.where(kind_b[:, None], rng.normal(4, 0.6, (300, 2)) + rng.normal(0, 0.05, (300, 2)),
                       rng.normal(0, 1.0, (300, 2)))
        out = screen([torch.from_numpy(syn)], [real], 5.0, seed=seed, groups=groups)
        assert out["controls"] == 300
        ps.append(out["p_value"])
        synth.append(out["synthetic_flagged_half"])
        chance.append(out["expected_by_chance"])
    assert np.mean(np.array(ps) < 0.05) <= 0.1 and np.mean(np.array(ps) < 0.01) <= 0.05
    assert np.mean(synth) == pytest.approx(np.mean(chance), rel=0.2)


def test_the_reports_sentence_follows_the_thresholds_rule(tmp_path):
    """The report said 'their nearest other real image' also where the threshold came from another patient's."""
    import json
    from xrayforge.evaluate.report import _section
    base = {"evaluation": "memorisation", "flagged": 1, "synthetic": 10, "flagged_fraction": 0.1, "percentile": 1.0,
            "inception": "random", "p_value": None, "median_synthetic_to_real_inception": 1.0,
            "median_real_to_real_inception": 1.0, "median_synthetic_to_real_pixels": 1.0,
            "median_real_to_real_pixels": 1.0}
    for excludes, said in (("same patient", "their nearest real image of another patient"),
                           ("self", "their nearest other real image"), (None, "their nearest other real image")):
        (tmp_path / "summary.json").write_text(json.dumps({**base, "threshold_excludes": excludes}))
        assert said in "\n".join(_section("memorisation", tmp_path))


def test_an_exact_copy_is_flagged_where_the_threshold_is_zero():
    """With exact distances, reals that have an exact duplicate put the percentile at 0.0, and
    d < 0 flagged nothing: not even a pixel-exact copy."""
    g = torch.Generator().manual_seed(0)
    real = torch.rand(200, 16, generator=g)
    real[100:105] = real[:5]  # 5 of 200 reals duplicated: the 1st percentile of their distances is 0
    synth = torch.cat([real[50:51], torch.rand(9, 16, generator=g)])  # a copy of real 50, and 9 new
    got = screen([synth], [real], percentile=1.0)
    assert got["threshold"][0] == 0.0 and got["distance"][0][0] == 0
    assert got["flagged"].tolist() == [True] + [False] * 9


def test_the_design_effect_never_gives_a_smaller_p(monkeypatch):
    """Rounding the shrunk counts half to even could give a smaller p than the counts as they are
    (13/1000 against 3/1000 at d = 1.2: 0.0104 -> 0.0095)."""
    import xrayforge.evaluate.memorisation as memorisation
    g = torch.Generator().manual_seed(1)
    real = torch.rand(400, 8, generator=g, dtype=torch.float64)
    synth = torch.cat([real[:6] + 1e-6, torch.rand(60, 8, generator=g, dtype=torch.float64)])
    groups = [i // 2 for i in range(400)]
    p = {}
    for d in (1.0, 1.2, 2.0):
        monkeypatch.setattr(memorisation, "design_effect", lambda flags, ids, d=d: d)
        p[d] = screen([synth], [real], percentile=5.0, groups=groups)["p_value"]
    assert p[1.0] <= p[1.2] <= p[2.0]
    # the adjusted counts round towards a higher control rate: never fewer flags or more images
    assert fisher_greater(13, 1000, 3, 1000) <= fisher_greater(13, 1000, 3, 833)  # ceil(3/1.2), floor(1000/1.2)


def test_the_chance_sentence_says_how_an_older_summary_counted():
    base = {"p_value": 0.5, "more_than_chance": False, "synthetic_flagged_half": 1.0, "real_flagged": 2, "real": 150,
            "expected_by_chance": 1.0, "halves_by": "patient"}
    assert "design effect 1.50" in chance_sentence({**base, "controls": 150, "design_effect": 1.5})
    assert "one image of each patient" in chance_sentence({**base, "controls": 75})  # between the two versions
    older = chance_sentence(base)  # every image, unadjusted
    assert "one image" not in older and "design effect" not in older


def test_unreadable_images_are_listed_not_silently_left_out_of_the_audit(tmp_path):
    """A synthetic file that cannot be read is not audited (it may be a copy): the summary and the
    command list it, and where no image can be read the error says why."""
    from xrayforge.evaluate.memorisation import audit
    real, synth, bad = tmp_path / "real", tmp_path / "synth", tmp_path / "bad"
    for folder in (real, synth, bad):
        folder.mkdir()
    for seed in range(6):
        Image.fromarray((render(16, seed)[0] * 255).round().astype(np.uint8)).save(real / f"{seed}.png")
    for seed in range(100, 103):
        Image.fromarray((render(16, seed)[0] * 255).round().astype(np.uint8)).save(synth / f"{seed}.png")
    (synth / "broken.png").write_bytes(b"not a png")
    (bad / "broken.png").write_bytes(b"not a png")
    summary = audit(str(synth), str(real), tmp_path / "a", _PixelFeatures(), progress=False)
    assert summary["synthetic"] == 3
    assert [(s["side"], s["file"].split("/")[-1]) for s in summary["skipped"]] == [("synthetic", "broken.png")]
    assert json.loads((tmp_path / "a" / "summary.json").read_text())["skipped"] == summary["skipped"]
    with pytest.raises(ValueError, match=r"no readable images; skipped .*broken\.png: unreadable"):
        audit(str(bad), str(real), tmp_path / "b", _PixelFeatures(), progress=False)


def _phantom_folders(tmp_path, n_real: int = 6, n_synth: int = 3):
    """tmp_path/real and tmp_path/synth: folders of 16-px phantom PNGs (other seeds on each side)."""
    real, synth = tmp_path / "real", tmp_path / "synth"
    for folder, seeds in ((real, range(n_real)), (synth, range(100, 100 + n_synth))):
        folder.mkdir()
        for seed in seeds:
            Image.fromarray((render(16, seed)[0] * 255).round().astype(np.uint8)).save(folder / f"{seed}.png")
    return real, synth

def test_an_interrupted_rerun_leaves_no_summary_beside_another_runs_plots(tmp_path, monkeypatch):
    """summary.json marks a finished audit (the report shows its plots, the demo's resume skips the
    audit by it): it is written last, and a rerun removes the earlier one first. It used to be
    written before distances.png and closest_pairs.png, so an audit stopped while plotting was
    taken for done, beside missing plots or an earlier run's."""
    from xrayforge.evaluate import memorisation as mem
    real, synth = _phantom_folders(tmp_path)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(mem, "_pairs_image", killed)
    with pytest.raises(KeyboardInterrupt):  # a first run stopped while plotting
        mem.audit(str(synth), str(real), tmp_path / "a", _PixelFeatures(), progress=False)
    assert not (tmp_path / "a" / "summary.json").exists()
    monkeypatch.undo()
    mem.audit(str(synth), str(real), tmp_path / "a", _PixelFeatures(), progress=False)
    assert (tmp_path / "a" / "summary.json").is_file()
    monkeypatch.setattr(mem, "_plot_distributions", killed)
    with pytest.raises(KeyboardInterrupt):  # a rerun stopped while plotting: the earlier summary is gone
        mem.audit(str(synth), str(real), tmp_path / "a", _PixelFeatures(), percentile=50.0, progress=False)
    assert not (tmp_path / "a" / "summary.json").exists()


def test_too_small_a_real_limit_is_refused_by_its_option_before_any_work(tmp_path):
    """--real-limit 1 on an archive of 40 images said '<archive>: need at least 2 real images', as
    if the archive held fewer, and only after the synthetic images' features were computed."""
    from xrayforge.evaluate.memorisation import audit
    from xrayforge.errors import UserError
    with pytest.raises(UserError, match=r"--real-limit 1: .*at least 2 real images"):
        audit(str(tmp_path / "nowhere"), str(tmp_path / "nowhere"), tmp_path / "a", _PixelFeatures(),
              real_limit=1, progress=False)
    assert not (tmp_path / "a").exists()


def test_an_out_folder_inside_the_synthetic_folder_is_refused(tmp_path):
    """--out inside --synthetic (samples/audit): the synthetic folder is read with its subfolders,
    so a rerun audited the first run's distances.png and closest_pairs.png as synthetic images."""
    from xrayforge.evaluate.memorisation import audit
    from xrayforge.errors import UserError
    real, synth = _phantom_folders(tmp_path)
    for out, option in ((synth / "audit", "--synthetic"), (real / "a" / "b", "--real")):
        with pytest.raises(UserError, match=f"inside {option}"):
            audit(str(synth), str(real), out, _PixelFeatures(), progress=False)
            audit(str(synth), str(real), out, _PixelFeatures(), progress=False)  # the rerun
        assert not out.exists()
    assert audit(str(synth), str(real), tmp_path / "audit", _PixelFeatures(), progress=False)["synthetic"] == 3


def test_the_real_images_as_synthetic_are_refused_naming_both_options(tmp_path):
    """--synthetic and --real the same folder (or the same archive, wherever it is): every synthetic
    image was 0 from its own copy and the audit reported total memorisation."""
    import shutil
    from xrayforge.evaluate.memorisation import audit
    from xrayforge.errors import UserError
    real = tmp_path / "real"
    real.mkdir()
    for seed in range(6):
        Image.fromarray((render(16, seed)[0] * 255).round().astype(np.uint8)).save(real / f"{seed}.png")
    prepare(str(real), tmp_path / "arc", resolution=16, workers=1, progress=False)
    shutil.copytree(tmp_path / "arc", tmp_path / "arc_copy")
    for synth, ref in ((str(real), str(real) + "/"), (str(tmp_path / "real" / ".." / "real"), str(real)),
                       (str(tmp_path / "arc_copy"), str(tmp_path / "arc"))):
        with pytest.raises(UserError, match=r"--synthetic .* is --real "):
            audit(synth, ref, tmp_path / "a", _PixelFeatures(), progress=False)
        assert not (tmp_path / "a").exists()


def test_the_command_refuses_the_real_images_as_synthetic_before_looking_for_weights(tmp_path, monkeypatch, capsys):
    """Without Inception weights installed, `evaluate memorisation --synthetic R --real R` said only
    that the weights were not found: fetching them would have led to the refusal."""
    from xrayforge.cli import main as cli
    real, _ = _phantom_folders(tmp_path, 3, 0)
    monkeypatch.setenv("XRAYFORGE_INCEPTION", str(tmp_path / "no-such-weights.pth"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-hub"))
    assert cli(["evaluate", "memorisation", "--synthetic", str(real), "--real", str(real), "--out",
                str(tmp_path / "a"), "-q"]) == 1
    err = capsys.readouterr().err
    assert f"--synthetic {real} is --real {real}" in err and "weights" not in err.split("is --real")[0]
    assert not (tmp_path / "a").exists()


def test_real_limit_takes_that_many_of_a_folder_of_real_images_evenly_spread(tmp_path):
    """--real-limit was applied to an archive alone: on a folder of real images it was accepted and
    ignored (every image the reference, "real" the whole count)."""
    from xrayforge.evaluate.memorisation import audit
    real, synth = _phantom_folders(tmp_path, 10, 3)
    s = audit(str(synth), str(real), tmp_path / "a", _PixelFeatures(), percentile=50.0, real_limit=4, progress=False)
    every = sorted(str(p) for p in real.iterdir())
    kept = [every[i] for i in (0, 3, 6, 9)]  # evenly spread, as an archive's
    assert s["real"] == 4
    with open(tmp_path / "a" / "memorisation.csv", newline="") as fh:
        assert {r["nearest_real_pixels"] for r in csv.DictReader(fh)} <= set(kept)
    vec = pixel_vectors(torch.stack([torch.from_numpy(np.array(Image.open(p))) for p in kept]).float() / 255)
    nn = torch.cdist(vec.double(), vec.double()).fill_diagonal_(float("inf")).min(1).values.numpy()
    assert s["threshold_pixels"] == pytest.approx(np.percentile(nn, 50.0), rel=1e-5)
    assert s["median_real_to_real_pixels"] == pytest.approx(np.median(nn), rel=1e-5)


def test_non_finite_features_are_refused_naming_the_image(tmp_path):
    """A synthetic image whose features were NaN (a feature network that gives none for it) was
    audited at distance inf from a made-up nearest real image (the first) and never flagged."""
    from xrayforge.evaluate.memorisation import audit
    from xrayforge.errors import UserError
    real, synth = _phantom_folders(tmp_path, 6, 3)

    class NaNFor101(_PixelFeatures):
        def features(self, images):
            f = super().features(images)
            if len(f) == 3:  # the synthetic batch: 100, 101, 102
                f[1] = float("nan")
            return f
    with pytest.raises(UserError, match=r"synth: NaN or infinite features for 1 of 3 .*101\.png"):
        audit(str(synth), str(real), tmp_path / "a", NaNFor101(), progress=False)


def test_bad_inputs_are_refused_before_any_image_is_read_and_an_earlier_audit_is_kept(tmp_path):
    """A missing --real, a statistics file or a single image as --real, a checkpoint as --synthetic
    were said only after every synthetic image went through the feature network, and after --out
    was claimed and its earlier audit's summary.json removed."""
    from xrayforge.evaluate.memorisation import audit
    from xrayforge.errors import UserError
    real, synth = _phantom_folders(tmp_path, 6, 3)
    audit(str(synth), str(real), tmp_path / "a", _PixelFeatures(), progress=False)
    np.savez(tmp_path / "real.npz", mu=np.zeros(2), sigma=np.eye(2))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "networks.json").write_text("{}")
    calls = []

    class Counting(_PixelFeatures):
        def features(self, images):
            calls.append(len(images))
            return super().features(images)
    for s, r, said in ((synth, tmp_path / "nowhere", r"--real .*nowhere: no such file"),
                       (synth, tmp_path / "real.npz", r"--real .*real\.npz: a statistics file"),
                       (synth, real / "0.png", r"--real .*0\.png: 1 image;"),
                       (tmp_path / "run", real, r"--synthetic .*run: a generator checkpoint")):
        for out in (tmp_path / "a", tmp_path / "new"):
            with pytest.raises(UserError, match=said):
                audit(str(s), str(r), out, Counting(), progress=False)
    assert calls == [] and not (tmp_path / "new").exists() and (tmp_path / "a" / "summary.json").is_file()


def test_the_command_says_the_thresholds_rule(tmp_path, monkeypatch, capsys):
    """The command said "than 1% of real images are to each other" where the threshold was each real
    image's distance to its nearest image of another patient."""
    import xrayforge.fid.compute as compute
    folder, synth = _phantom_folders(tmp_path, 8, 2)
    (tmp_path / "labels.csv").write_text("Image Index,Finding Labels,Patient ID\n" + "".join(
        f"{k}.png,No Finding,{k // 2}\n" for k in range(8)))
    prepare(str(folder), tmp_path / "arc", resolution=16, labels=str(tmp_path / "labels.csv"), workers=1,
            progress=False)
    monkeypatch.setattr(compute, "FeatureExtractor", lambda *args, **kwargs: _PixelFeatures())
    for real, said in ((tmp_path / "arc", "their nearest real image of another patient"),
                       (folder, "their nearest other real image")):
        assert cli(["evaluate", "memorisation", "--synthetic", str(synth), "--real", str(real), "--out",
                    str(tmp_path / f"audit_{real.name}"), "-q"]) == 0
        out = capsys.readouterr().out
        assert f"real images are to {said});" in out and "each other" not in out


def test_closest_pairs_show_the_flagged_images_first_beside_the_image_they_were_flagged_against():
    """closest_pairs.png showed the synthetic images closest in feature space: one flagged in pixels
    alone (a copy the features do not tell) could be missing from the figure the summary points to."""
    from xrayforge.evaluate.memorisation import shown_pairs
    d_f, i_f = torch.tensor([0.5, 0.1, 0.2, 0.9, 0.04]), torch.tensor([7, 8, 9, 6, 5])
    d_p, i_p = torch.tensor([0.01, 0.5, 0.5, 0.3, 0.5]), torch.tensor([3, 3, 3, 2, 3])
    # image 4 is under the feature threshold (0.04 / 0.05 = 0.8 of it), image 0 under the pixels'
    # (0.01 / 0.1 = 0.1 of it), the most under: first, beside its nearest real image in pixels
    shown, real = shown_pairs((d_f, d_p), (i_f, i_p), (0.05, 0.1), pairs=3)
    assert shown.tolist() == [0, 4, 1] and real.tolist() == [3, 5, 8]
    # a threshold of 0 (duplicates among the reals) flags exact copies alone, the most under of all
    d_p[3] = 0.0
    shown, real = shown_pairs((d_f, d_p), (i_f, i_p), (0.05, 0.0), pairs=5)
    assert shown.tolist() == [3, 4, 1, 2, 0] and real.tolist() == [2, 5, 8, 9, 7]
