"""Damaged archives, writes on a read-only file system and the phantom's heart: each said clearly
(naming the file or folder), never read as other data."""
import csv
import errno
import json
import os
import pathlib
import shutil

import numpy as np
import pytest

from xrayforge.data import phantom
from xrayforge.data.archive import Archive
from xrayforge.data.prepare import prepare
from xrayforge.errors import UserError
from xrayforge.utils.files import atomic_write, claim_output, write_text_atomic


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "phantom8"
    prepare("phantom:6", path, resolution=8, workers=1, progress=False)
    return path


def _edit_meta(**changes):
    def edit(folder):
        meta = json.loads((folder / "archive.json").read_text())
        meta.update(changes)
        (folder / "archive.json").write_text(json.dumps(meta))
    return edit


def _edit_manifest(change):
    def edit(folder):
        with open(folder / "manifest.csv", newline="") as fh:
            rows = list(csv.DictReader(fh))
        fields = list(rows[0])
        rows = change(rows)
        with open(folder / "manifest.csv", "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)
    return edit


def _float_arrays(folder):
    for r in (4, 8):
        a = np.load(folder / f"images_{r}.npy").astype(np.float32) / 255
        a[0, 0, 0] = np.nan
        np.save(folder / f"images_{r}.npy", a)
    _edit_meta(dtype="float32")(folder)


def _twice(rows):
    rows[3]["row"] = rows[2]["row"]
    return rows


def _label(rows):
    rows[1]["Mass"] = "7"
    return rows


DAMAGE = {  # what was done -> (file named, what the error says)
    # a bare TypeError ("'>' not supported between instances of 'str' and 'int'")
    "version as text": (_edit_meta(version="2"), "archive.json", "version '2' is not a whole number"),
    "version null": (_edit_meta(version=None), "archive.json", "version None is not a whole number"),
    # read as images: as_float failed with "Invalid integer data type 'f'", NaN unchecked
    "float arrays": (_float_arrays, "archive.json", "dtype float32 is not uint8 or uint16"),
    # no error: a.resolution said 32 with no 32-px array
    "resolution edited": (_edit_meta(resolution=32), "archive.json", "not the pyramid 4 .. 32"),
    # read silently: the manifest cut at a line (2 of 6 images), a row listed twice, a label of 7
    "manifest cut": (_edit_manifest(lambda rows: rows[:2]), "manifest.csv", "lists 2 images, but archive.json says 6"),
    "row twice": (_edit_manifest(_twice), "manifest.csv", "row 2 is listed more than once"),
    "label 7": (_edit_manifest(_label), "manifest.csv", "row 1: Mass is 7, not 0 or 1"),
    # past int8: a bare OverflowError
    "label 300": (_edit_manifest(lambda rows: [{**r, "Mass": "300"} for r in rows]), "manifest.csv", "not 0 or 1"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_archive_is_refused_naming_the_file(archive, tmp_path, damage):
    edit, name, said = DAMAGE[damage]
    copy = tmp_path / "copy"
    shutil.copytree(archive, copy)
    edit(copy)
    with pytest.raises(UserError) as info:
        Archive(copy)
    assert str(info.value).startswith(str(copy / name)) and said in str(info.value), info.value


def test_the_undamaged_archive_still_reads(archive):
    arc = Archive(archive)
    assert len(arc) == 6 and arc.images(np.arange(6), 8).shape == (6, 8, 8)


def _read_only(monkeypatch, folder):
    """Writes, removals and new folders under ``folder`` fail as on a read-only file system (mount -o ro)."""
    real_open, real_unlink, real_mkdir = open, pathlib.Path.unlink, os.mkdir

    def refuse(path):
        if str(path).startswith(str(folder)):
            raise OSError(errno.EROFS, "Read-only file system", str(path))

    def ro_open(path, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+"):
            refuse(path)
        return real_open(path, mode, *args, **kwargs)

    def ro_unlink(self, missing_ok=False):
        refuse(self)
        return real_unlink(self, missing_ok)

    def ro_mkdir(path, *args, **kwargs):
        refuse(path)
        return real_mkdir(path, *args, **kwargs)
    monkeypatch.setattr("builtins.open", ro_open)
    monkeypatch.setattr("io.open", ro_open)
    monkeypatch.setattr(pathlib.Path, "unlink", ro_unlink)
    monkeypatch.setattr(os, "mkdir", ro_mkdir)


def test_a_read_only_folder_is_named_with_the_problem_not_the_hidden_temporary(tmp_path, monkeypatch):
    """On a read-only file system removing the failed temporary fails too, and that second error (naming
    ..xrayforge.json.<host>-<pid>-<hex>.tmp.json) replaced the first: claim_output said
    '..xrayforge.json….tmp.json: Read-only file system'."""
    out = tmp_path / "ro"
    out.mkdir()
    _read_only(monkeypatch, out)
    with pytest.raises(OSError) as info:
        write_text_atomic(out / "summary.json", "x")
    assert info.value.errno == errno.EROFS and info.value.filename == str(out / "summary.json"), info.value
    with pytest.raises(OSError) as info:
        atomic_write(out / "grid.png", lambda tmp: tmp.write_bytes(b"x"))
    assert info.value.filename == str(out / "grid.png"), info.value
    with pytest.raises(UserError) as info:
        claim_output(out, "sample")
    assert str(info.value) == f"{out}: cannot write in the output folder (Read-only file system)"
    with pytest.raises(UserError) as info:
        claim_output(out / "new" / "sub", "sample")
    assert str(info.value).startswith(f"{out / 'new' / 'sub'}: cannot create the output folder (Read-only file system")
    monkeypatch.undo()
    assert sorted(os.listdir(out)) == []


def _heart_and_thorax(seed, cardiomegaly, monkeypatch):
    """The drawn heart's and lungs' ellipses (recorded as render draws them), measured on a fine grid:
    (heart width) / (width between the lungs' outer edges)."""
    calls = []
    real = phantom._ellipse

    def record(u, v, cx, cy, rx, ry, angle=0.0):
        calls.append((cx, cy, rx, ry, angle))
        return real(u, v, cx, cy, rx, ry, angle)
    monkeypatch.setattr(phantom, "_ellipse", record)
    phantom.render(8, seed, {"Cardiomegaly": cardiomegaly})
    monkeypatch.undo()
    # fine across (the widths), coarse down: the widest point of an ellipse is flat in v
    v, u = np.meshgrid(np.linspace(-1, 1, 201), np.linspace(-1, 1, 2001), indexing="ij")

    def span(args):
        inside = u[real(u, v, *args) < 1]
        return inside.min(), inside.max()
    lungs = [span(c) for c in calls[1:3]]  # after the body outline: the right and the left lung
    heart = span(calls[3])
    return (heart[1] - heart[0]) / (max(h for _, h in lungs) - min(lo for lo, _ in lungs))


def test_the_phantoms_cardiothoracic_ratio_is_what_the_docstring_says(monkeypatch):
    """The docstring said 'above 0.55' for Cardiomegaly: the ellipses are tilted, and one heart
    labelled so in seven spanned 0.535–0.55 of the thorax. It now gives what is drawn (measured
    over 2,000 seeds: 0.535–0.631, normal 0.372–0.468), and the two never overlap."""
    import re
    doc = phantom.__doc__
    big_lo, big_hi, lo, hi = map(float, re.search(r"Cardiomegaly: cardiothoracic ratio ([\d.]+)–([\d.]+) \(normal "
                                                  r"hearts ([\d.]+)–([\d.]+)", doc).groups())
    big = [_heart_and_thorax(seed, True, monkeypatch) for seed in range(40)]
    normal = [_heart_and_thorax(seed, False, monkeypatch) for seed in range(40)]
    assert big_lo < min(big) and max(big) < big_hi, (min(big), max(big))
    assert lo < min(normal) and max(normal) < hi, (min(normal), max(normal))
    assert hi < big_lo


@pytest.mark.parametrize("findings, said", [(None, "findings None is not a list of finding names"),
                                            ("Mass", "findings 'Mass' is not a list of finding names"),
                                            ([1, 2], "findings [1, 2] is not a list of finding names")])
def test_findings_that_are_not_a_list_of_names_are_refused(archive, tmp_path, findings, said):
    """null was a bare TypeError ("'NoneType' object is not iterable"), "Mass" was read as the findings
    M, a, s, s (said as columns missing from manifest.csv), [1, 2] a bare TypeError from the join."""
    copy = tmp_path / "copy"
    shutil.copytree(archive, copy)
    _edit_meta(findings=findings)(copy)
    with pytest.raises(UserError) as info:
        Archive(copy)
    assert str(info.value).startswith(str(copy / "archive.json")) and said in str(info.value), info.value


def test_a_pickled_archive_carries_no_images_and_maps_them_again(archive):
    """A DataLoader worker started by spawn or forkserver (macOS; Linux from Python 3.14) is sent the
    dataset pickled: an Archive whose arrays were opened carried every image (np.memmap pickles its
    contents), and the worker read a writable in-memory copy."""
    import pickle
    arc = Archive(archive)
    bare = len(pickle.dumps(arc))
    arc.images([0], 8), arc.images([0], 4)
    assert len(pickle.dumps(arc)) == bare
    copy = pickle.loads(pickle.dumps(arc))
    np.testing.assert_array_equal(copy.images(np.arange(6), 8), arc.images(np.arange(6), 8))
    assert isinstance(copy.array(8), np.memmap) and not copy.array(8).flags.writeable


def test_images_of_no_positions_and_of_a_position_past_the_end(archive):
    """[] was refused by numpy ("arrays used as indices must be of integer (or boolean) type"); a position
    past the end was numpy's "index 6 is out of bounds for axis 0 with size 6", naming no archive."""
    import re
    arc = Archive(archive)
    assert arc.images([], 8).shape == (0, 8, 8) and arc.images([], 4).dtype == np.uint8
    for bad in ([0, 6], [-7]):
        with pytest.raises(IndexError, match="^" + re.escape(f"{archive}: no image at position {bad[-1]}; it has 6 images")):
            arc.images(bad, 8)
    np.testing.assert_array_equal(arc.images([-1], 8), arc.images([5], 8))  # from the end, as a list reads
