import csv
import json

import numpy as np
import pytest
from PIL import Image

from xrayforge.cli import main as cli
from xrayforge.data.archive import Archive
from xrayforge.data.phantom import render
from xrayforge.data.prepare import prepare


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
    assert (tmp_path / "audit" / "distances.png").stat().st_size > 0
    assert (tmp_path / "audit" / "closest_pairs.png").stat().st_size > 0
