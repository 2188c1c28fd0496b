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
    import xrayforge.utils.images as images
    real_save, saved = images.save_png, []

    def dies_on_the_fourth(array, path):
        saved.append(path)
        if len(saved) == 4:
            raise _Killed
        return real_save(array, path)
    monkeypatch.setattr(images, "save_png", dies_on_the_fourth)
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
