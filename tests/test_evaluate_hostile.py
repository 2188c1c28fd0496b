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
