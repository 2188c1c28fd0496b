"""`evaluate diversity` and `evaluate report`: their numbers recomputed by hand, and what an
interrupted run, a hostile evaluation folder and unequal sample sizes do to them."""
import base64
import json

import numpy as np
import pytest
import torch
from PIL import Image

from xrayforge.data.labels import FINDINGS
from xrayforge.errors import UserError
from xrayforge.data.prepare import prepare
from xrayforge.evaluate import diversity as div
from xrayforge.evaluate.diversity import combinations, diversity, prevalence_rows
from xrayforge.evaluate.metrics import wilson_interval
from xrayforge.evaluate.report import write_report
from xrayforge.nn import Generator, NetworkConfig, latents_for, save_networks
from xrayforge.nn.classifier import ChestClassifier, ClassifierConfig
from xrayforge.utils.images import grid, levels

N, BATCH = 48, 20  # a batch that does not divide N


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A real phantom archive, an untrained generator whose raw output overshoots [-1, 1] (as a
    PGGAN's linear toRGB does), and a classifier whose per-finding thresholds are the medians of
    its probabilities on the samples as `sample` stores them (clamped, 8-bit)."""
    root = tmp_path_factory.mktemp("divrep")
    prepare("phantom:120", root / "real", resolution=32, workers=1, progress=False)
    torch.manual_seed(0)
    G = Generator(NetworkConfig(resolution=32, latent_dim=16, fmap_base=64, fmap_max=16)).eval()
    save_networks(root / "gen", {"G_ema": G})
    clf = ChestClassifier(ClassifierConfig(input_size=32, width=8)).eval()
    raw, stored, images = [], [], []
    with torch.no_grad():
        for start in range(0, N, BATCH):
            x = G(latents_for(0, range(start, min(start + BATCH, N)), 16)).float()
            s = levels(x, 8) / 255 * 2 - 1
            raw.append(torch.sigmoid(clf(x)).numpy())
            stored.append(torch.sigmoid(clf(s)).numpy())
            images.append(s)
    raw, stored, images = np.concatenate(raw), np.concatenate(stored), torch.cat(images)
    clf.config.thresholds = {f: float(t) for f, t in zip(FINDINGS, np.median(stored, 0))}
    clf.save(root / "clf")
    return {"root": root, "raw": raw, "stored": stored, "images": images,
            "thr": np.array([clf.config.thresholds[f] for f in FINDINGS])}


def _run(world, out, **kw):
    r = world["root"]
    return diversity(str(r / "gen"), str(r / "clf"), str(r / "real"), out, n=N, batch=BATCH, device="cpu",
                     progress=False, **kw)


def test_prevalences_pairs_and_grids_are_of_the_pixels_sample_stores(world, tmp_path):
    """The classifier sees the samples as a file holds them (clamped to [-1, 1], 8-bit), as it sees
    real images: on the generator's raw output, which overshoots that range, its calls differed."""
    called, raw_called = world["stored"] >= world["thr"], world["raw"] >= world["thr"]
    assert (called.sum(0) != raw_called.sum(0)).any()  # the two readings differ here
    s = _run(world, tmp_path / "d", per_grid=3)
    rows = {r["finding"]: r for r in s["findings"]}
    for k, f in enumerate(FINDINGS):  # each finding at its own threshold, counted, not averaged
        assert rows[f]["synthetic_predicted_prevalence"] == called[:, k].mean()
        assert (rows[f]["synthetic_ci95_low"], rows[f]["synthetic_ci95_high"]) == wilson_interval(called[:, k].sum(), N)
    for p in s["pairs"]:
        a, b = FINDINGS.index(p["finding_a"]), FINDINGS.index(p["finding_b"])
        assert p["synthetic_predicted_prevalence"] == pytest.approx((called[:, a] & called[:, b]).mean(), abs=1e-12)
    co = np.load(tmp_path / "d" / "cooccurrence.npz")
    assert np.array_equal(co["synthetic"], co["synthetic"].T)
    assert np.allclose(np.diag(co["synthetic"]), called.mean(0))
    # each grid: the called samples of highest probability, most confident first
    for k, f in enumerate(FINDINGS):
        chosen = np.flatnonzero(called[:, k])
        chosen = chosen[np.argsort(-world["stored"][chosen, k], kind="mergesort")][:3]
        expected = grid(div._thumbs(world["images"][torch.from_numpy(chosen)]), columns=len(chosen))
        assert np.array_equal(np.array(Image.open(tmp_path / "d" / s["grids"][f])), expected), f


def test_flags_never_switch_on_as_the_real_prevalence_moves_away():
    """Over-produced must not appear as the real prevalence rises, nor under-produced as it falls:
    a synthetic 3% (of 10,000) was over-produced against 1 real hit in 100 but not against 0."""
    def flags(synth_hits, real_hits, n_synth=10000, n_real=100):
        s, r = np.zeros((n_synth, 1), bool), np.zeros((n_real, 1), bool)
        s[:synth_hits], r[:real_hits] = True, True
        row = prevalence_rows(["A"], s, r, r)[0]
        return row["over_produced"], row["under_produced"]

    over = [flags(300, k)[0] for k in range(12)]
    assert over == sorted(over, reverse=True) and over[1] == 0  # 1 of 100: the real may be 5.4%
    under = [flags(10, k)[1] for k in range(12)]
    assert under == sorted(under) and under[1] == 0 and under[-1] == 1
    assert flags(3000, 1)[0] == 1 and flags(0, 30)[1] == 1  # the evidence is there: flagged


def test_distinct_combinations_compare_at_one_size(world, tmp_path):
    """More images show more rare combinations: 20,000 samples against 5,000 real images of the same
    distribution gave 257 against 144, as if the generator were more varied."""
    y = np.array([[1, 0], [1, 0], [1, 0], [0, 1]])
    assert combinations(y, 2)["distinct_in_size"] == pytest.approx(1.5)  # the rare one: 1 - C(3,2)/C(4,2)
    assert combinations(y, 4)["distinct_in_size"] == pytest.approx(2)
    rng = np.random.default_rng(0)
    p = np.array([.10, .12, .045, .04, .05, .03, .025, .05, .02, .02, .015, .03, .012, .002])
    many, few = rng.random((20000, 14)) < p, rng.random((5000, 14)) < p
    a, b = combinations(many, 5000), combinations(few, 5000)
    assert a["distinct"] > 1.5 * b["distinct"]  # at their own sizes
    assert a["distinct_in_size"] == pytest.approx(b["distinct_in_size"], rel=0.1)
    s = _run(world, tmp_path / "d", real_limit=30)
    c = s["combinations"]
    assert c["common_size"] == 30 and c["real_predicted"]["distinct_in_size"] == c["real_predicted"]["distinct"]
    assert "expected in 30 images of each" in (tmp_path / "d" / "diversity.md").read_text()


def test_an_interrupted_diversity_leaves_no_summary(world, tmp_path, monkeypatch):
    """summary.json marks a finished evaluation (the report and the demo's resume go by it): it is
    written last, and a rerun removes the earlier one first. It used to be written before
    diversity.md, and a rerun's first files were set beside the earlier run's summary."""
    run = tmp_path / "run"
    d = run / "evaluations" / "diversity"
    real_write = div.write_text_atomic

    def killed(path, text):
        if str(path).endswith("diversity.md"):
            raise KeyboardInterrupt
        return real_write(path, text)

    monkeypatch.setattr(div, "write_text_atomic", killed)
    with pytest.raises(KeyboardInterrupt):
        _run(world, d)
    assert not (d / "summary.json").exists()
    write_report(tmp_path / "r.html", run)  # not taken for a finished evaluation
    assert "No results found for: fid-findings, tstr, diversity" in (tmp_path / "r.md").read_text()
    monkeypatch.setattr(div, "write_text_atomic", real_write)
    _run(world, d)
    assert (d / "summary.json").is_file()

    def plot_killed(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(div, "plot_cooccurrence", plot_killed)
    with pytest.raises(KeyboardInterrupt):
        _run(world, d, seed=1)  # findings.csv already this run's
    assert not (d / "summary.json").exists()


def test_the_summary_says_which_samples(world, tmp_path):
    """Truncated latents make less varied samples: the summary and the table say so, and name the
    checkpoint they came from."""
    s = _run(world, tmp_path / "d", truncation=0.7)
    assert s["truncation"] == 0.7 and s["checkpoint"] == str(world["root"] / "gen")
    assert json.loads((tmp_path / "d" / "summary.json").read_text())["truncation"] == 0.7
    assert "latents truncated at ±0.7" in (tmp_path / "d" / "diversity.md").read_text()
    assert _run(world, tmp_path / "e")["truncation"] is None
    assert "truncated" not in (tmp_path / "e" / "diversity.md").read_text()


def test_the_report_embeds_no_file_but_its_images(tmp_path):
    """A line of an evaluation's text that looks like an image (here from a reader's name, which a
    reader writes) put any file the report's user can read into the page that gets mailed."""
    secret = tmp_path / "secret.txt"
    secret.write_text("TOPSECRET key material")
    reader = tmp_path / "reader"
    reader.mkdir()
    rates = {"answers": 4, "accuracy": 0.5, "sensitivity_synthetic": 0.5, "specificity_synthetic": 0.5,
             "synthetic_called_real": 0.5, "binomial_p": 1.0}
    (reader / "summary.json").write_text(json.dumps({"evaluation": "reader-study", "result": {
        "readers": {f"r1\n![x]({secret})\nr2": rates, "r3\n![no link)": rates}, "pooled": rates, "images": 4, "fleiss_kappa": None,
        "kappa_images": 4}}))
    out = tmp_path / "site" / "report.html"
    write_report(out, None, [reader])
    page = out.read_text()
    assert base64.b64encode(secret.read_bytes()).decode() not in page
    assert "not a PNG image, left out" in page
    # the images a report does embed still are
    d = tmp_path / "div"
    (d / "grids").mkdir(parents=True)
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(d / "grids" / "Mass.png")
    (d / "cooccurrence.png").write_bytes((d / "grids" / "Mass.png").read_bytes())
    (d / "diversity.md").write_text("text\n")
    (d / "summary.json").write_text(json.dumps({"evaluation": "diversity", "grids": {
        "Mass": "grids/Mass.png", "Nodule": "../secret.txt"}}))
    write_report(out, None, [d])
    page = out.read_text()
    assert page.count("data:image/png;base64") == 2 and base64.b64encode(secret.read_bytes()).decode() not in page


def test_a_colour_generator_is_refused_before_any_work(world, tmp_path):
    """The classifier takes grey images (`sample --classifier` refuses a colour generator): diversity
    failed in the classifier's first convolution with an error nobody foresaw."""
    torch.manual_seed(0)
    save_networks(tmp_path / "rgb", {"G_ema": Generator(NetworkConfig(resolution=32, latent_dim=16, fmap_base=64,
                                                                      fmap_max=16, image_channels=3)).eval()})
    r = world["root"]
    with pytest.raises(UserError, match="3-channel images, and the classifier .* takes grey"):
        diversity(str(tmp_path / "rgb"), str(r / "clf"), str(r / "real"), tmp_path / "d", n=4, device="cpu",
                  progress=False)


def test_two_evaluations_of_one_kind_are_not_shown_as_one_without_a_word(tmp_path, caplog):
    """The report has one section per kind: of RUN/evaluations/diversity and .../diversity-t07 it
    showed one, and said nothing of the other."""
    run = tmp_path / "run"
    for name in ("diversity", "diversity-t07"):
        d = run / "evaluations" / name
        d.mkdir(parents=True)
        (d / "summary.json").write_text(json.dumps({"evaluation": "diversity"}))
        (d / "diversity.md").write_text(f"table of {name}\n")
    with caplog.at_level("WARNING", logger="xrayforge.evaluate.report"):
        write_report(tmp_path / "r.html", run)
    assert "diversity and " in caplog.text and "diversity-t07 are both diversity evaluations" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="xrayforge.evaluate.report"):  # the same folder named again: one
        write_report(tmp_path / "r.html", None, [run / "evaluations" / "diversity", run / "evaluations" / "diversity"])
    assert "both" not in caplog.text


def test_samples_are_quantised_at_the_real_archives_bit_depth(world, tmp_path, monkeypatch):
    """A 16-bit archive's real images have 16-bit levels: the samples are classified at 16 bits
    there, not at 8 (and at 8 for an 8-bit archive)."""
    prepare("phantom:120", tmp_path / "real16", resolution=32, bits=16, workers=1, progress=False)
    seen = []
    real_as_stored = div.as_stored

    def spy(images, bits=8):
        seen.append(bits)
        return real_as_stored(images, bits)
    monkeypatch.setattr(div, "as_stored", spy)
    r = world["root"]
    diversity(str(r / "gen"), str(r / "clf"), str(tmp_path / "real16"), tmp_path / "d16", n=N, batch=BATCH,
              device="cpu", progress=False)
    assert seen and set(seen) == {16}
    seen.clear()
    _run(world, tmp_path / "d8")
    assert seen and set(seen) == {8}


def test_the_memorisation_section_names_the_feature_space_it_used(tmp_path):
    """An audit in a classifier's features was reported as "Inception" (its distances are kept under
    the *_inception keys of summary.json, which older reports read)."""
    from xrayforge.evaluate.report import _section as evaluation_markdown
    folder = tmp_path / "memorisation"
    folder.mkdir()
    summary = {"evaluation": "memorisation", "flagged": 0, "synthetic": 8, "flagged_fraction": 0.0, "percentile": 1.0,
               "threshold_excludes": "self", "inception": "classifier c (resnet18, 32 px)",
               "features": "classifier@0123456789ab", "median_synthetic_to_real_inception": 5.0,
               "median_real_to_real_inception": 4.0, "median_synthetic_to_real_pixels": 3.0,
               "median_real_to_real_pixels": 2.0, "p_value": None}
    (folder / "summary.json").write_text(json.dumps(summary))
    md = "\n".join(evaluation_markdown("memorisation", folder))
    assert "Inception" not in md and "| classifier features | 5 |" in md
    summary["features"] = "inception"
    (folder / "summary.json").write_text(json.dumps(summary))
    assert "| Inception features |" in "\n".join(evaluation_markdown("memorisation", folder))


def test_the_training_section_counts_a_tick_stopped_and_resumed_once(tmp_path):
    """A stop within a tick logs the part done and the resumed run the rest, both under the tick's number:
    the report counted log lines, one tick more per stop."""
    run = tmp_path / "run"
    run.mkdir()
    lines = [(1, 32), (2, 48), (2, 64), (3, 96)]
    (run / "log.jsonl").write_text("".join(json.dumps({"tick": t, "images": i, "resolution": 8, "alpha": 1.0,
                                                       "total_seconds": 10.0 * t}) + "\n" for t, i in lines))
    write_report(tmp_path / "r.html", run)
    assert "96 images seen in 30 s over 3 ticks" in (tmp_path / "r.md").read_text()


def test_a_rerun_leaves_no_grid_or_pairs_of_the_earlier_run(world, tmp_path):
    """A rerun into the same --out (a continued or repeated evaluation) holds only its own files:
    the grid of a finding the rerun never calls, and the pairs of an earlier classifier with more
    findings, used to stay in grids/ and pairs.csv beside the rerun's summary."""
    d = tmp_path / "div"
    first = _run(world, d)
    assert len(first["grids"]) == len(FINDINGS) and (d / "pairs.csv").is_file()
    r = world["root"]
    again = diversity(str(r / "gen"), str(r / "clf"), str(r / "real"), d, n=1, batch=BATCH, device="cpu",
                      progress=False)  # one sample: called positive for about half the findings
    assert 0 < len(again["grids"]) < len(FINDINGS)
    assert sorted(p.name for p in (d / "grids").iterdir()) == sorted(f"{f}.png" for f in again["grids"])
    torch.manual_seed(0)
    one = ChestClassifier(ClassifierConfig(input_size=32, width=8, findings=[FINDINGS[0]])).eval()
    one.save(tmp_path / "clf1")
    third = diversity(str(r / "gen"), str(tmp_path / "clf1"), str(r / "real"), d, n=4, batch=BATCH, device="cpu",
                      progress=False)
    assert third["pairs"] == [] and not (d / "pairs.csv").exists()
    assert sorted(p.name for p in (d / "grids").iterdir()) == sorted(f"{f}.png" for f in third["grids"])


def _run_with(tmp_path, kind, summary, files=None):
    run = tmp_path / "run"
    d = run / "evaluations" / kind
    d.mkdir(parents=True)
    (run / "log.jsonl").write_text(json.dumps({"tick": 1, "images": 64, "resolution": 8, "alpha": 1.0}) + "\n")
    (d / "summary.json").write_text(json.dumps({"evaluation": kind, **summary}))
    for name, text in (files or {}).items():
        (d / name).write_text(text)
    return run


@pytest.mark.parametrize("kind, summary, files", [
    ("diversity", {"grids": ["Mass.png"]}, {"diversity.md": "table\n"}),  # a list where a dict is
    ("diversity", {"grids": {"Mass": None}}, {"diversity.md": "table\n"}),
    ("memorisation", {"flagged": 1, "synthetic": 4, "flagged_fraction": None, "percentile": 1.0,
                      "inception": "x", "median_synthetic_to_real_inception": 1.0,
                      "median_real_to_real_inception": 1.0, "median_synthetic_to_real_pixels": 1.0,
                      "median_real_to_real_pixels": 1.0}, {}),
    ("reader-study", {"result": {"readers": ["r1"], "images": 4, "pooled": {}}}, {}),
])
def test_a_summary_with_a_value_of_the_wrong_type_is_named_not_an_unexpected_error(tmp_path, kind, summary, files):
    """A hand-edited or damaged summary (null, a list where an object is) stopped the report with
    'TypeError: ... (an unexpected error; ... please report it)'; now it names the file."""
    run = _run_with(tmp_path, kind, summary, files)
    with pytest.raises(UserError, match=f"evaluations/{kind}/summary.json: a value of the wrong type"):
        write_report(tmp_path / "r.html", run)
    assert not (tmp_path / "r.html").exists()


def test_an_evaluation_whose_table_is_missing_is_named_incomplete(tmp_path):
    """summary.json there, tstr.md gone: the report said only 'tstr.md: No such file or directory'."""
    run = _run_with(tmp_path, "tstr", {})
    with pytest.raises(UserError, match=r"tstr\.md: missing; the tstr evaluation in .*tstr is incomplete"):
        write_report(tmp_path / "r.html", run)


def test_a_folder_that_is_not_a_run_is_refused_naming_the_run_in_it(tmp_path):
    """The demo's --out (or an archive) given as RUN gave a report of nothing, every evaluation listed
    as not evaluated, and exit status 0."""
    from xrayforge.cli import main as cli
    run = _run_with(tmp_path / "demo", "tstr", {}, {"tstr.md": "t\n"})
    with pytest.raises(UserError, match=f"not a training run folder .*the run in it is {run}"):
        write_report(tmp_path / "r.html", tmp_path / "demo")
    assert cli(["evaluate", "report", str(tmp_path / "demo"), "--out", str(tmp_path / "r.html")]) == 1
    assert not (tmp_path / "r.html").exists()


def test_a_log_line_with_a_count_that_is_no_number_gives_n_a(tmp_path):
    """'Cannot specify ',' with 's'.' was the whole error for a log line whose images was text."""
    run = _run_with(tmp_path, "tstr", {}, {"tstr.md": "t\n"})
    with open(run / "log.jsonl", "a") as fh:
        fh.write(json.dumps({"tick": 2, "images": "many", "resolution": 8, "alpha": 1.0}) + "\n")
    write_report(tmp_path / "r.html", run)
    assert "n/a images seen" in (tmp_path / "r.md").read_text()


def test_an_evaluation_of_an_older_checkpoint_than_the_runs_newest_is_said_to_be(tmp_path, caplog):
    """The report showed evaluations of samples of ckpt-100 as the run's results after it had trained on
    to ckpt-200 (a resumed run, the demo's continued training): now each section names the checkpoint
    its samples came from, and one older than the newest (and not the best) is said to be out of date."""
    import logging
    samples = tmp_path / "samples"
    samples.mkdir()
    run = _run_with(tmp_path, "tstr", {"synthetic": str(samples)}, {"tstr.md": "t\n"})
    old, new = (run / "checkpoints" / f"ckpt-{n:012d}" for n in (100, 200))
    old.mkdir(parents=True)
    (samples / "sample_config.json").write_text(json.dumps({"checkpoint": str(old)}))
    write_report(tmp_path / "r.html", run)  # its newest: current, nothing said
    md = (tmp_path / "r.md").read_text()
    assert f"Synthetic images: samples of the checkpoint {old}." in md and "trained on since" not in md
    new.mkdir()
    with caplog.at_level(logging.WARNING):
        write_report(tmp_path / "r.html", run)
    md = (tmp_path / "r.md").read_text()
    assert f"its newest checkpoint is {new.name}, so this is an evaluation of an earlier generator" in md
    assert f"an evaluation of {old.name}, and the run's newest checkpoint is {new.name}" in caplog.text
    # the run's best checkpoint is a choice, not a stale result
    (run / "checkpoints" / "best.json").write_text(json.dumps({"checkpoint": old.name, "images": 100, "score": 3.0}))
    write_report(tmp_path / "r.html", run)
    assert "trained on since" not in (tmp_path / "r.md").read_text()
    # the samples of an archive that `sample` did not write (no sample_config.json): nothing claimed
    (samples / "sample_config.json").unlink()
    write_report(tmp_path / "r.html", run)
    assert "Synthetic images:" not in (tmp_path / "r.md").read_text()


def test_a_sample_folders_uncalled_findings_have_no_real_label_prevalence(world, tmp_path):
    """A sample folder as --real labels only the findings its classifier called (its p_ columns); its
    converted archive holds a 0 for every other one, which means "not called", not "absent": those
    were reported as a real label prevalence of 0% (and 0 in every pair with them)."""
    from synthetic_factory import write_sample_folder
    truth = write_sample_folder(tmp_path / "samples", range(100, 140), findings=FINDINGS[:3])
    r = world["root"]
    s = diversity(str(r / "gen"), str(r / "clf"), str(tmp_path / "samples"), tmp_path / "d", n=8, batch=BATCH,
                  device="cpu", progress=False)
    labels = {row["finding"]: row["real_label_prevalence"] for row in s["findings"]}
    assert [labels[f] for f in FINDINGS[:3]] == pytest.approx(truth.mean(0))
    assert all(np.isnan(labels[f]) for f in FINDINGS[3:])
    pairs = {(p["finding_a"], p["finding_b"]): p["real_label_prevalence"] for p in s["pairs"]}
    assert pairs[FINDINGS[0], FINDINGS[1]] == pytest.approx((truth[:, 0] * truth[:, 1]).mean())
    assert np.isnan(pairs[FINDINGS[0], FINDINGS[3]])
    saved = json.loads((tmp_path / "d" / "summary.json").read_text())
    assert saved["findings"][3]["real_label_prevalence"] is None
    row = next(line for line in (tmp_path / "d" / "diversity.md").read_text().splitlines()
               if line.startswith(f"| {FINDINGS[3]} |"))
    assert row.split("|")[2].strip() == "n/a"
