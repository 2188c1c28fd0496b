"""utils.files' writers: every file the project writes goes through atomic_write."""
import json
import os
import threading

import numpy as np
import pytest

from xrayforge.errors import UserError
from xrayforge.fid.stats import FrechetStats
from xrayforge.utils.files import (atomic_write, read_csv, save_numpy, write_csv, write_json,
                                   write_text_atomic)
from xrayforge.utils.images import save_png


def _all(folder):
    return sorted(os.listdir(folder))  # hidden names included


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "summary.json"
    write_text_atomic(path, "old")

    def half(tmp):
        tmp.write_text("half of the new")
        raise OSError("disk full")
    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, half)
    assert path.read_text() == "old" and _all(tmp_path) == ["summary.json"]

    def interrupted(tmp):
        tmp.write_text("half")
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, interrupted)
    assert path.read_text() == "old" and _all(tmp_path) == ["summary.json"]


def test_each_writer_has_its_own_hidden_temporary_with_the_files_suffix(tmp_path):
    """Two processes (or threads) writing one file never write into the same temporary: the old
    fixed NAME.tmp let one rename the other's half-written file into place."""
    path = tmp_path / "grid.png"
    seen, barrier = [], threading.Barrier(2)

    def write(tmp):
        seen.append(tmp)
        barrier.wait(timeout=10)  # both temporaries exist at once
        tmp.write_bytes(b"x")
    threads = [threading.Thread(target=atomic_write, args=(path, write)) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(seen) == 2 and seen[0] != seen[1]
    assert all(t.name.startswith(".grid.png.") and t.suffix == ".png" and t.parent == tmp_path for t in seen)
    from xrayforge.utils.files import _TEMPORARY
    assert all(_TEMPORARY.fullmatch(t.name) for t in seen)  # what remove_stale_temporaries looks for
    assert _all(tmp_path) == ["grid.png"]


def test_numpy_files_are_written_at_the_exact_path(tmp_path):
    """np.save / np.savez add .npy / .npz to a name without it; the path asked for is the one written."""
    save_numpy(tmp_path / "probs", np.arange(3.0))
    assert _all(tmp_path) == ["probs"]
    assert np.load(tmp_path / "probs").tolist() == [0.0, 1.0, 2.0]
    stats = FrechetStats(np.zeros(2), np.eye(2), n=5, space="x")
    stats.save(tmp_path / "stats")
    assert "stats" in _all(tmp_path) and FrechetStats.load(tmp_path / "stats").n == 5
    save_numpy(tmp_path / "m.npz", a=np.ones(2), b=np.zeros(1))
    with np.load(tmp_path / "m.npz") as z:
        assert sorted(z.files) == ["a", "b"]
    assert _all(tmp_path) == ["m.npz", "probs", "stats"]
    for args, kwargs in (((np.ones(1),), {"a": np.ones(1)}), ((), {})):  # one array, or arrays by name
        with pytest.raises(TypeError, match="one array, or arrays by name"):
            save_numpy(tmp_path / "x.npz", *args, **kwargs)


def test_json_csv_and_png_writers_round_trip(tmp_path):
    write_json(tmp_path / "a.json", {"x": float("nan"), "y": [1, 2]})
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": None, "y": [1, 2]}
    write_csv(tmp_path / "b.csv", ["k", "v"], [{"k": "é", "v": 1}])
    rows, fields = read_csv(tmp_path / "b.csv")
    assert fields == ["k", "v"] and rows == [{"k": "é", "v": "1"}]
    save_png(np.full((3, 4), 7, np.uint8), tmp_path / "c.png")
    from PIL import Image
    with Image.open(tmp_path / "c.png") as im:
        assert im.format == "PNG" and im.size == (4, 3)
    assert _all(tmp_path) == ["a.json", "b.csv", "c.png"]


def _dead_pid() -> int:
    import subprocess
    import sys
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_temporaries_a_killed_writer_left_are_removed_when_its_folder_is_claimed_again(tmp_path):
    """A kill leaves atomic_write's hidden, uniquely named temporary, which no later write replaces:
    they piled up (a 10 MB feature cache each). Claiming the folder for the same command again (a
    resume) removes those whose writer is gone; a live writer's stays."""
    from xrayforge.utils.files import claim_output, remove_stale_temporaries
    out = claim_output(tmp_path / "run", "train")
    (out / "sub").mkdir()
    from xrayforge.utils.files import _HOST
    dead, live = _dead_pid(), os.getppid()
    stale = [out / f".cache.npz.{_HOST}-{dead}-0123abcd.tmp.npz", out / "sub" / f".latest.{_HOST}-{dead}-89abcdef.tmp",
             out / "sub" / f".a.png.{_HOST}-{dead}-00000000.tmp.png"]
    kept = [out / f".cache.npz.{_HOST}-{live}-0123abcd.tmp.npz", out / "cache.npz", out / "sub" / ".hidden.tmp",
            out / f".cache.npz.othernode-{dead}-0123abcd.tmp.npz",  # another host's writer: its pid means nothing here
            out / f".x.{_HOST}-99999999999999999999-0123abcd.tmp"]  # not a pid of this system (was an OverflowError)
    for p in stale + kept:
        p.write_bytes(b"x")
    assert claim_output(out, "train") == out
    assert [p for p in stale if p.exists()] == [] and all(p.exists() for p in kept)
    assert remove_stale_temporaries(out) == 0


def test_a_write_error_names_the_file_asked_for(tmp_path):
    """A full disk's error named no file, a read-only folder's the hidden temporary: both now name
    the file being written, with the same errno and type."""
    import errno
    path = tmp_path / "summary.json"

    def full(tmp):
        raise OSError(errno.ENOSPC, "No space left on device")

    def denied(tmp):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp))
    for writer, kind, code in ((full, OSError, errno.ENOSPC), (denied, PermissionError, errno.EACCES)):
        with pytest.raises(kind) as caught:
            atomic_write(path, writer)
        assert caught.value.errno == code and caught.value.filename == str(path), caught.value
    assert _all(tmp_path) == []


def test_a_long_name_gets_a_shortened_temporary_that_is_still_recognised(tmp_path):
    """The temporary adds about 40 bytes: a 230-byte name used to fail with ENAMETOOLONG."""
    from xrayforge.utils.files import _TEMPORARY, remove_stale_temporaries, temporary_of
    name = "é" * 110 + "-grid.png"  # 229 bytes in UTF-8
    seen = []

    def write(tmp):
        seen.append(tmp)
        assert len(tmp.name.encode()) <= 255 and tmp.suffix == ".png"
        assert _TEMPORARY.fullmatch(tmp.name) and temporary_of(tmp.name).startswith("é" * 50)
        tmp.write_text("x")
    atomic_write(tmp_path / name, write)
    assert (tmp_path / name).read_text() == "x" and _all(tmp_path) == [name]
    # a killed writer's long temporary (a pid of as many digits that is not running) is found and removed
    from xrayforge.utils.files import _alive
    gone = next(p for p in range(10 ** len(str(os.getpid())) - 1, 0, -1) if not _alive(p))
    stale = seen[0].name.replace(f"-{os.getpid()}-", f"-{gone}-")
    (tmp_path / stale).write_text("half")
    assert remove_stale_temporaries(tmp_path) == 1 and _all(tmp_path) == [name]


def test_a_symlink_is_written_through_and_a_replaced_file_keeps_its_permissions(tmp_path):
    target = tmp_path / "real" / "key.csv"
    target.parent.mkdir()
    target.write_text("old")
    os.chmod(target, 0o600)
    link = tmp_path / "key.csv"
    link.symlink_to(target)
    write_text_atomic(link, "new")
    assert link.is_symlink() and target.read_text() == "new"
    assert (target.stat().st_mode & 0o777) == 0o600
    assert _all(tmp_path) == ["key.csv", "real"] and _all(target.parent) == ["key.csv"]
    fresh = tmp_path / "fresh.txt"
    write_text_atomic(fresh, "x")  # a new file: the umask's permissions, as open() gives
    umask = os.umask(0)
    os.umask(umask)
    assert (fresh.stat().st_mode & 0o777) == 0o666 & ~umask


def test_errors_through_a_symlink_name_the_path_asked_for(tmp_path):
    """A link into a folder that is gone, or to a folder: the error named the link's target or the
    hidden temporary, not the file the caller asked to write."""
    dangling = tmp_path / "summary.json"
    dangling.symlink_to(tmp_path / "gone" / "target.json")
    with pytest.raises(FileNotFoundError) as info:
        write_text_atomic(dangling, "x")
    assert info.value.filename == str(dangling)
    (tmp_path / "folder").mkdir()
    to_folder = tmp_path / "report.md"
    to_folder.symlink_to(tmp_path / "folder")
    with pytest.raises(OSError) as info:
        write_text_atomic(to_folder, "x")
    assert info.value.filename == str(to_folder)
    assert _all(tmp_path / "folder") == [] and sorted(_all(tmp_path)) == ["folder", "report.md", "summary.json"]


def test_a_replaced_file_keeps_its_permission_bits_but_not_setuid(tmp_path):
    path = tmp_path / "run.sh"
    path.write_text("old")
    os.chmod(path, 0o4755)
    write_text_atomic(path, "new")
    assert (path.stat().st_mode & 0o7777) == 0o755


def test_a_row_cut_short_before_a_needed_column_is_refused_naming_its_line(tmp_path):
    """A short row gave None for the columns it lacked, which callers read as empty: a ChestX-ray14
    row cut after its image name was an image with no finding."""
    good = tmp_path / "labels.csv"
    # ChestX-ray14's own header ends with a comma its rows lack: short rows are fine where nothing needed is cut
    good.write_text("Image Index,Finding Labels,Patient ID,\na.png,Effusion,1\nb.png,\"No Finding\",2\n")
    rows, columns = read_csv(good, ("Image Index", "Finding Labels"))
    assert [r["Finding Labels"] for r in rows] == ["Effusion", "No Finding"] and columns[-1] == ""
    cut = tmp_path / "cut.csv"
    cut.write_text("Image Index,Finding Labels,Patient ID\na.png,Effusion,1\n\"b\nc.png\",Mass,2\nd.png\n")
    with pytest.raises(UserError, match=r"cut\.csv: line 5 is cut short: it has no Finding Labels"):
        read_csv(cut, ("Image Index", "Finding Labels"))
    assert len(read_csv(cut, ("Image Index",))[0]) == 3  # what this reader needs is there


def test_lines_of_spaces_or_bare_commas_are_not_rows(tmp_path):
    """A line of spaces at the end of a hand-edited label file was refused as a row cut short;
    a line of bare commas was an image with an empty name."""
    path = tmp_path / "labels.csv"
    path.write_text("Image Index,Finding Labels,Patient ID\na.png,Effusion,1\n   \n,,\n\t\nb.png,Mass,2\n \n")
    rows, _ = read_csv(path, ("Image Index", "Finding Labels"))
    assert [r["Image Index"] for r in rows] == ["a.png", "b.png"]


def test_as_stored_is_what_a_written_file_reads_back_as():
    """The classifier of `sample` and of `evaluate diversity` sees the pixels a file of 8 or 16 bits holds."""
    import torch

    from xrayforge.utils.images import as_stored, to_uint
    x = torch.cat([torch.linspace(-1.2, 1.2, 997), torch.tensor([float("inf"), -float("inf")])]).view(1, 1, 1, -1)
    for bits in (8, 16):
        back = torch.from_numpy(to_uint(x, bits).astype(np.float64)) / ((1 << bits) - 1) * 2 - 1
        torch.testing.assert_close(as_stored(x, bits).double()[:, 0], back, rtol=0, atol=2 ** -23)  # float32 rounding
        assert as_stored(x, bits).min() == -1 and as_stored(x, bits).max() == 1


def test_a_line_of_more_bare_commas_than_the_header_has_is_no_row(tmp_path):
    """Fields past the header's come as a list: a line of bare commas longer than the header (a
    spreadsheet's blank row over a wider sheet) stopped the reader with an AttributeError."""
    path = tmp_path / "labels.csv"
    path.write_text("Image Index,Finding Labels,\na.png,Effusion\n,,,,\n , ,\t, ,\nb.png,Mass,,extra\n")
    rows, _ = read_csv(path, ("Image Index", "Finding Labels"))
    assert [r["Image Index"] for r in rows] == ["a.png", "b.png"]


def test_a_folder_another_command_claimed_and_wrote_nothing_in_is_claimed_again(tmp_path):
    """A command that claimed --out and then failed on a late user error (too few readable real
    images) leaves its marker alone there: another command given that --out was refused as if the
    folder 'holds the output of' the first, which wrote nothing. A folder with output of the first
    is still refused, and so is one with the user's own files."""
    from xrayforge.errors import UserError
    from xrayforge.utils.files import MARKER, claim_output
    out = claim_output(tmp_path / "out", "evaluate memorisation")
    assert claim_output(out, "evaluate fid-findings") == out  # the marker alone: nothing of the first
    assert json.loads((out / MARKER).read_text())["command"] == "evaluate fid-findings"
    assert claim_output(out, "evaluate fid-findings") == out
    (out / "fid_findings.csv").write_text("finding,fid\n")
    with pytest.raises(UserError, match="holds the output of `xrayforge evaluate fid-findings`"):
        claim_output(out, "evaluate memorisation")
    assert json.loads((out / MARKER).read_text())["command"] == "evaluate fid-findings"


def test_saving_statistics_clears_the_temporary_a_killed_save_left(tmp_path):
    """`fid --save-stats` killed while it wrote left a hidden half-written .npz beside the file, which no
    later run removed (it writes into no output folder of its own that a continued command tidies)."""
    import numpy as np
    from xrayforge.fid.stats import FrechetStats
    from xrayforge.utils.files import _HOST
    dead = _dead_pid()
    stale = tmp_path / f".stats.npz.{_HOST}-{dead}-0123abcd.tmp.npz"
    other = tmp_path / f".other.npz.{_HOST}-{dead}-0123abcd.tmp.npz"  # another file's: not this save's to clear
    stale.write_bytes(b"PK half")
    other.write_bytes(b"PK half")
    FrechetStats(np.zeros(3), np.eye(3), 5).save(tmp_path / "stats.npz")
    assert not stale.exists() and other.exists()
    assert FrechetStats.load(tmp_path / "stats.npz").n == 5


def test_read_csv_numbers_each_row_by_the_line_it_starts_on(tmp_path):
    """Blank lines (csv.DictReader skipped them unseen), lines of spaces or bare commas and a quoted
    field over two lines move later rows down: errors name the line of the file, not the row count."""
    f = tmp_path / "t.csv"
    f.write_text('a,b\n\n1,"x\ny"\n,\n2,3\n\n  \n4,5,6\n7\n')
    rows, columns = read_csv(f, numbered=True)
    assert columns == ["a", "b"]
    assert [(line, row["a"]) for line, row in rows] == [(3, "1"), (6, "2"), (9, "4"), (10, "7")]
    assert rows[0][1]["b"] == "x\ny" and rows[2][1][""] == ["6"] and rows[3][1]["b"] is None
    assert [r["a"] for r in read_csv(f)[0]] == ["1", "2", "4", "7"]  # unnumbered: the rows alone, as before
    with pytest.raises(UserError, match=r"t\.csv: line 10 is cut short: it has no b"):
        read_csv(f, ("a", "b"))
