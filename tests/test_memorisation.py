import csv
import json

import numpy as np
import pytest
from PIL import Image

from xrayforge.cli import main as cli
from xrayforge.data.archive import Archive
from xrayforge.data.phantom import render
from xrayforge.data.prepare import prepare
from xrayforge.evaluate.memorisation import chance_sentence
from xrayforge.evaluate.metrics import binomial_upper_tail


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
    # the chance baseline: the 1st percentile of 30 distances is the 1.29th smallest: 1.29 / 31 per space
    assert summary["chance_rate"] == pytest.approx(2 * 1.29 / 31)
    assert summary["expected_by_chance"] == pytest.approx(12 * summary["chance_rate"])
    assert summary["p_value"] == pytest.approx(binomial_upper_tail(summary["flagged"], 12, summary["chance_rate"]))
    assert (tmp_path / "audit" / "distances.png").stat().st_size > 0
    assert (tmp_path / "audit" / "closest_pairs.png").stat().st_size > 0


@pytest.mark.slow
def test_flags_are_weighed_against_chance(tmp_path):
    """New patients (images the reference set does not hold, from the same pipeline) are flagged
    no more often than chance gives; a generator that reproduces ten of its training patients
    is flagged far more often."""
    prepare("phantom:60", tmp_path / "all", resolution=32, workers=1, progress=False)
    arc = Archive(tmp_path / "all")

    def folder(name, rows):
        (tmp_path / name).mkdir()
        for row in rows:
            Image.fromarray(arc.images([row], 32)[0]).save(tmp_path / name / f"{row:03d}.png")
    folder("real", range(40))
    folder("new", range(40, 60))
    folder("copies", list(range(0, 30, 3)) + list(range(40, 50)))
    summaries = {}
    for case in ("new", "copies"):
        assert cli(["evaluate", "memorisation", "--synthetic", str(tmp_path / case), "--real", str(tmp_path / "real"),
                    "--out", str(tmp_path / f"audit-{case}"), "--random-weights", "--workers", "0", "-q"]) == 0
        summaries[case] = json.loads((tmp_path / f"audit-{case}" / "summary.json").read_text())
    new, copies = summaries["new"], summaries["copies"]
    assert new["real"] == 40 and new["chance_rate"] == pytest.approx(2 * 1.39 / 41)
    assert not new["more_than_chance"] and new["p_value"] >= 0.05
    assert copies["more_than_chance"] and copies["flagged"] >= 10 and copies["p_value"] < 1e-6
    assert "no more than chance" in chance_sentence(new) and "more than chance gives" in chance_sentence(copies)
    assert chance_sentence({"flagged": 1, "synthetic": 2}) == ""  # a summary from before the baseline


def test_binomial_upper_tail_against_scipy():
    stats = pytest.importorskip("scipy.stats")
    for k, n, p in ((0, 10, 0.3), (1, 10, 0.3), (4, 96, 0.0208), (10, 20, 0.05), (96, 96, 0.5), (3, 100000, 1e-5),
                    (1200, 100000, 0.01)):
        assert binomial_upper_tail(k, n, p) == pytest.approx(stats.binom.sf(k - 1, n, p), rel=1e-9, abs=1e-300)
    assert binomial_upper_tail(3, 2, 0.5) == 0.0 and binomial_upper_tail(1, 5, 0.0) == 0.0
    assert binomial_upper_tail(5, 5, 1.0) == 1.0 and binomial_upper_tail(0, 0, 0.3) == 1.0
