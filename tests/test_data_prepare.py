import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import xrayforge.data.prepare as prep
import xrayforge.data.readers as readers
from xrayforge.cli import main as cli
from xrayforge.data.archive import Archive, box_pyramid, quantize
from xrayforge.data.labels import FINDINGS
from xrayforge.data.phantom import PHANTOM_FINDINGS, label_vector, render
from xrayforge.data.prepare import NoUsableImages, prepare
from xrayforge.data.readers import SkipImage
from xrayforge.errors import UserError

from dicom_factory import write_bare_image, write_image, write_png, write_rt_plan


def read_csv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_phantom_is_deterministic_and_labelled():
    a, have_a = render(32, 7)
    b, have_b = render(32, 7)
    np.testing.assert_array_equal(a, b)
    assert have_a == have_b and set(have_a) == set(PHANTOM_FINDINGS)
    assert a.dtype == np.float32 and a.shape == (32, 32) and 0 <= a.min() and a.max() <= 1
    big, have_big = render(128, 7)
    assert have_big == have_a  # the same patient at any resolution
    forced, have = render(32, 7, {"Cardiomegaly": True, "Mass": False})
    assert have["Cardiomegaly"] and not have["Mass"]
    with pytest.raises(ValueError, match="no 'Hernia'"):
        render(32, 1, {"Hernia": True})


def test_phantom_findings_change_the_image():
    plain, _ = render(64, 3, {name: False for name in PHANTOM_FINDINGS})
    for name in PHANTOM_FINDINGS:
        img, _ = render(64, 3, {**{n: False for n in PHANTOM_FINDINGS}, name: True})
        assert np.abs(img - plain).mean() > 1e-3, name


def test_phantom_archive_round_trip(tmp_path):
    res = prepare("phantom:12", tmp_path / "arch", resolution=32, workers=2, progress=False)
    assert (res.included, res.skipped) == (12, 0)
    arc = Archive(tmp_path / "arch")
    assert len(arc) == 12 and arc.resolutions == [4, 8, 16, 32] and arc.dtype == np.uint8
    for i in (0, 5, 11):
        img, have = render(32, i)
        levels = box_pyramid(img)
        for r in arc.resolutions:
            np.testing.assert_array_equal(arc.images([i], r)[0], quantize(levels[r], np.uint8))
        assert list(arc.labels[i]) == label_vector(have)
    assert {s for s in arc.splits} == {"train", "test"}
    assert not (tmp_path / "arch.partial").exists()


def test_sixteen_bit_archive(tmp_path):
    prepare("phantom:2", tmp_path / "arch", resolution=8, bits=16, workers=1, progress=False)
    arc = Archive(tmp_path / "arch")
    assert arc.dtype == np.uint16
    np.testing.assert_array_equal(arc.images([1], 8)[0], quantize(render(8, 1)[0], np.uint16))


def make_chestxray14(root):
    images = root / "images"
    images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = ["00000001_000.png", "00000001_001.png", "00000002_000.png"]
    for n in names:
        Image.fromarray(rng.integers(0, 255, (20, 30), dtype=np.uint8)).save(images / n)
    with open(root / "Data_Entry_2017.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age"])
        w.writerow([names[0], "Cardiomegaly|Effusion", 0, 1, 50])
        w.writerow([names[1], "No Finding", 1, 1, 51])
        w.writerow([names[2], "Hernia", 0, 2, 60])
    (root / "train_val_list.txt").write_text(f"{names[0]}\n{names[1]}\n")
    (root / "test_list.txt").write_text(f"{names[2]}\n")
    return names


def test_folder_with_labels_and_bad_files(tmp_path):
    src = tmp_path / "cxr14"
    names = make_chestxray14(src)
    write_image(src / "images" / "extra.dcm", np.full((16, 16), 2048, dtype=np.uint16))
    write_rt_plan(src / "images" / "plan.dcm")
    (src / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 10)
    (src / "images" / "truncated.dcm").write_bytes((src / "images" / "extra.dcm").read_bytes()[:300])
    assert cli(["prepare", str(src), str(tmp_path / "out"), "--resolution", "16", "--workers", "2", "-q"]) == 0
    manifest = read_csv(tmp_path / "out" / "manifest.csv")
    by_name = {m["source"].split("/")[-1]: m for m in manifest}
    assert set(by_name) == set(names) | {"extra.dcm"}
    assert by_name[names[0]]["finding_labels"] == "Cardiomegaly|Effusion"
    assert by_name[names[0]]["Cardiomegaly"] == "1" and by_name[names[0]]["Mass"] == "0"
    assert by_name[names[2]]["Hernia"] == "1" and by_name[names[2]]["split"] == "test"
    assert by_name[names[0]]["patient_id"] == by_name[names[1]]["patient_id"] == "1"
    assert by_name["extra.dcm"]["patient_id"] == "P001"
    skipped = {s["source"].split("/")[-1]: s["reason"] for s in read_csv(tmp_path / "out" / "skipped.csv")}
    assert set(skipped) == {"plan.dcm", "broken.png", "truncated.dcm"}
    assert "no pixel data" in skipped["plan.dcm"]
    arc = Archive(tmp_path / "out")
    assert len(arc) == 4 and arc.labels.shape == (4, len(FINDINGS))


def test_square_crop_and_pad(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    img = np.zeros((8, 16), dtype=np.uint8)
    img[:, :4] = 255  # a bright left quarter: gone after a centre crop, kept (scaled) with padding
    Image.fromarray(img).save(src / "wide.png")
    prepare(str(src), tmp_path / "crop", resolution=8, workers=1, progress=False)
    prepare(str(src), tmp_path / "pad", resolution=8, square="pad", workers=1, progress=False)
    crop, pad = Archive(tmp_path / "crop").images([0], 8)[0], Archive(tmp_path / "pad").images([0], 8)[0]
    assert crop.max() == 0
    assert pad[0].max() == 0 and pad[3, 0] == 255 and pad[3, 4] == 0


def test_nothing_usable_is_an_error(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.png").write_text("x")
    assert cli(["prepare", str(src), str(tmp_path / "out"), "-q"]) == 1
    assert "none of the 1 files could be used" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert cli(["prepare", str(tmp_path / "empty"), str(tmp_path / "out4"), "-q"]) == 1
    assert "no image files found" in capsys.readouterr().err
    with pytest.raises(NoUsableImages):
        prepare(str(tmp_path / "src"), tmp_path / "out2", workers=1, progress=False)
    assert cli(["prepare", str(tmp_path / "missing"), str(tmp_path / "out3"), "-q"]) == 1


def test_existing_archive_is_not_overwritten(tmp_path, caplog):
    """Another prepare into a finished archive is refused; the same command again (a kill after the archive
    was finished, a script run twice) has nothing to do and says so: it was an error, and a user told to
    run an interrupted command again could delete a complete archive."""
    from xrayforge.cli import main as cli
    prepare("phantom:2", tmp_path / "a", resolution=8, workers=1, progress=False)
    before = sorted((p.name, p.stat().st_mtime_ns) for p in (tmp_path / "a").iterdir())
    with pytest.raises(FileExistsError, match=r"already a prepared archive, made with other settings .*'src': "
                                              r"'phantom:2', 'resolution': 8"):
        prepare("phantom:3", tmp_path / "a", resolution=8, workers=1, progress=False)
    with pytest.raises(FileExistsError, match="already a prepared archive"):
        prepare("phantom:2", tmp_path / "a", resolution=16, workers=1, progress=False)
    res = prepare("phantom:2", tmp_path / "a", resolution=8, workers=1, progress=False)
    assert (res.included, res.skipped) == (2, 0)
    assert "already prepared from phantom:2 with these settings (2 images); nothing done" in caplog.text
    assert cli(["prepare", "phantom:2", str(tmp_path / "a"), "--resolution", "8", "-q"]) == 0
    assert sorted((p.name, p.stat().st_mtime_ns) for p in (tmp_path / "a").iterdir()) == before


def test_killed_prepare_resumes_to_the_same_archive(tmp_path):
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "xrayforge", "prepare", "phantom:300", str(out), "--resolution", "64",
           "--workers", "1", "-q"]
    proc = subprocess.Popen(cmd)
    progress = tmp_path / "killed.partial" / "progress.jsonl"
    deadline = time.time() + 60
    while time.time() < deadline and (not progress.exists() or len(progress.read_text().splitlines()) < 20):
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    done_before = len(progress.read_text().splitlines())
    assert 20 <= done_before < 300, "the run should have been killed part-way"
    assert not out.exists()
    assert subprocess.run(cmd).returncode == 0
    prepare("phantom:300", tmp_path / "whole", resolution=64, workers=2, progress=False)
    assert_same_archive(out, tmp_path / "whole", files=False)


def assert_same_archive(out, whole, files=True):
    """``out`` holds the archive ``whole`` holds: the same files, records and pixels (none all black)."""
    if files:
        assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in whole.iterdir())
    a, b = Archive(out), Archive(whole)
    assert a.records == b.records
    for r in a.resolutions:
        assert a.array(r).max() > 0
        np.testing.assert_array_equal(a.array(r), b.array(r))


class Killed(BaseException):
    """The process dies here (a BaseException: nothing in prepare catches it)."""


def _kill_at_task(monkeypatch, n: int):
    """prepare's worker dies at image task ``n``; returns the real worker (to restore)."""
    real = prep._process

    def killed(task):
        if task[0] == n:
            raise Killed
        return real(task)
    monkeypatch.setattr(prep, "_process", killed)
    return real


def test_a_progress_line_cut_by_a_crash_does_not_swallow_the_next_record(tmp_path, monkeypatch):
    """A kill that cut progress.jsonl's last line: the resumed run appended its first record to the
    cut line, which left that record unreadable as well (its image was done again at every resume)."""
    real = _kill_at_task(monkeypatch, 4)
    with pytest.raises(Killed):
        prepare("phantom:8", tmp_path / "out", resolution=8, workers=1, progress=False)
    progress = tmp_path / "out.partial" / "progress.jsonl"
    lines = progress.read_text().splitlines()
    assert len(lines) == 4
    cut = lines[3][:10]
    progress.write_text("\n".join(lines[:3]) + "\n" + cut)  # the crash cut the 4th record short
    monkeypatch.setattr(prep, "_process", real)
    _kill_at_task(monkeypatch, 6)
    with pytest.raises(Killed):
        prepare("phantom:8", tmp_path / "out", resolution=8, workers=1, progress=False)
    kept = progress.read_text().splitlines()
    assert kept[3] == cut
    assert sorted(json.loads(line)["i"] for line in kept[:3] + kept[4:]) == [0, 1, 2, 3, 4, 5]
    monkeypatch.undo()
    prepare("phantom:8", tmp_path / "out", resolution=8, workers=1, progress=False)
    prepare("phantom:8", tmp_path / "whole", resolution=8, workers=1, progress=False)
    assert_same_archive(tmp_path / "out", tmp_path / "whole")


# the finishing sequence, in order: (function, the file it acts on)
FINISH_STEPS = [((prep, "write_csv"), "skipped.csv"), ((prep, "write_csv"), "manifest.csv"),
                ((prep, "write_json"), "archive.json"), ((Path, "unlink"), "progress.jsonl"),
                ((Path, "unlink"), "plan.json")]
# then, into a new OUT, one rename; into an empty folder made for it, a move per file, archive.json last
FINISH_INTO = {"new": [((os, "replace"), "out.partial")],
               "made": [((os, "replace"), "images_8.npy"), ((os, "replace"), "archive.json"),
                        ((Path, "rmdir"), "out.partial")]}


@pytest.mark.parametrize("when", ["before", "after"])
@pytest.mark.parametrize("into,step", [(into, k) for into, steps in FINISH_INTO.items()
                                       for k in range(len(FINISH_STEPS) + len(steps))])
def test_prepare_killed_while_finishing_ends_with_the_same_archive(tmp_path, monkeypatch, into, step, when):
    prepare("phantom:6", tmp_path / "whole", resolution=16, workers=1, progress=False)
    (owner, attr), name = (FINISH_STEPS + FINISH_INTO[into])[step]
    armed = []
    real = getattr(owner, attr)

    def killer(target, *args, **kwargs):
        hit = bool(armed) and Path(target).name == name
        if hit and when == "before":
            raise Killed
        result = real(target, *args, **kwargs)
        if hit and when == "after":
            raise Killed
        return result
    monkeypatch.setattr(owner, attr, killer)
    write_csv = prep.write_csv

    def arm(path, *args):  # skipped.csv is the first file the finishing sequence writes
        armed.append(path.name == "skipped.csv" or armed)
        return write_csv(path, *args)
    monkeypatch.setattr(prep, "write_csv", arm)
    out = tmp_path / "out"
    if into == "made":
        out.mkdir()  # an empty folder made for the archive: it stays, the archive moves into it
    with pytest.raises(Killed):
        prepare("phantom:6", out, resolution=16, workers=1, progress=False)
    monkeypatch.undo()
    # running again finishes, or (the archive is whole) says there is nothing to do, and tidies up
    res = prepare("phantom:6", out, resolution=16, workers=1, progress=False)
    assert (res.included, res.skipped) == (6, 0)
    assert not (tmp_path / "out.partial").exists()
    assert_same_archive(out, tmp_path / "whole")


def test_prepare_into_the_current_folder(tmp_path, monkeypatch):
    here = tmp_path / "here"
    here.mkdir()
    folder = here.stat().st_ino
    monkeypatch.chdir(here)
    assert cli(["prepare", "phantom:3", ".", "--resolution", "8", "--workers", "1", "-q"]) == 0
    assert len(Archive(here)) == 3 and not (tmp_path / "here.partial").exists()
    # the same folder, not a new one in its place: a shell in it sees the archive, not a deleted folder
    assert here.stat().st_ino == folder and Path("archive.json").is_file()


@pytest.mark.parametrize("args", [["phantom:3", "--resolution", "4"], ["phantom:x"], ["phantom:0"],
                                  ["SRC", "--labels", "missing.csv"], ["missing-src"]])
def test_a_refused_prepare_creates_nothing(tmp_path, monkeypatch, capsys, args):
    src = tmp_path / "src"
    src.mkdir()
    Image.fromarray(np.full((8, 8), 100, dtype=np.uint8)).save(src / "a.png")
    monkeypatch.chdir(tmp_path)
    args = [str(src) if a == "SRC" else a for a in args]
    assert cli(["prepare", args[0], "arch", *args[1:], "--workers", "1", "-q"]) == 1
    assert "error" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
    with pytest.raises(ValueError, match="workers"):
        prepare("phantom:3", tmp_path / "arch", resolution=8, workers=0, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


# prepare with a decoder that kills its process on phantom:5: SIGKILL as the OOM killer would, SIGSEGV as a
# decoder bug would, on every run
DYING_WORKER = """
import os, signal, sys
import xrayforge.data.prepare as prep
import xrayforge.data.readers as readers
from xrayforge.cli import main
real = prep._process
def dying(task):
    if task[1]["source"] == "phantom:5":
        os.kill(os.getpid(), getattr(signal, os.environ["DIE_BY"]))
    return real(task)
prep._process = dying
sys.exit(main(sys.argv[1:]))
"""


def run_dying(args, signame):
    return subprocess.run([sys.executable, "-c", DYING_WORKER, *args], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, DIE_BY=signame))


def test_a_dead_worker_stops_prepare_with_a_message_and_the_rerun_resumes(tmp_path):
    args = ["prepare", "phantom:40", str(tmp_path / "out"), "--resolution", "16", "--workers", "2", "-q"]
    run = run_dying(args, "SIGKILL")
    assert run.returncode == 1, run.stderr
    err = run.stderr.strip().splitlines()
    assert len(err) == 1 and "worker was killed (SIGKILL" in err[0] and "lack of memory" in err[0], run.stderr
    assert "while reading phantom:5;" in err[0] and "--workers (now 2)" in err[0] and "resume" in err[0], run.stderr
    assert not (tmp_path / "out").exists() and (tmp_path / "out.partial" / "plan.json").exists()
    assert cli(args) == 0  # a one-off death (the memory was wanted elsewhere): phantom:5 is read alone, and kept
    prepare("phantom:40", tmp_path / "whole", resolution=16, workers=1, progress=False)
    assert_same_archive(tmp_path / "out", tmp_path / "whole", files=False)


def test_a_file_that_crashes_the_decoder_every_time_is_left_out_on_the_rerun(tmp_path):
    args = ["prepare", "phantom:40", str(tmp_path / "out"), "--resolution", "16", "--workers", "2", "-q"]
    run = run_dying(args, "SIGSEGV")
    assert run.returncode == 1, run.stderr
    err = run.stderr.strip().splitlines()
    assert len(err) == 1 and "worker crashed (SIGSEGV" in err[0] and "while reading phantom:5;" in err[0], run.stderr
    assert "--workers" not in err[0] and "read alone first, and left out (skipped.csv)" in err[0], run.stderr
    run = run_dying(args, "SIGSEGV")  # the same file crashes the decoder again: left out, and the run finishes
    assert run.returncode == 0, run.stderr
    assert "phantom:5: left out: the decode process crashed (SIGSEGV) on it twice" in run.stderr, run.stderr
    assert "39 images, 1 skipped" in run.stdout
    skipped = read_csv(tmp_path / "out" / "skipped.csv")
    assert [s["source"] for s in skipped] == ["phantom:5"] and "twice" in skipped[0]["reason"]
    prepare("phantom:40", tmp_path / "whole", resolution=16, workers=1, progress=False)
    a, b = Archive(tmp_path / "out"), Archive(tmp_path / "whole")
    assert a.records == [r for r in b.records if r["source"] != "phantom:5"]
    for r in a.resolutions:
        np.testing.assert_array_equal(a.array(r)[a.rows], b.array(r)[a.rows])  # the same rows of one plan


# prepare with a decoder stuck on phantom:0 (for ten minutes); with SLOW_SIGINT the main process takes
# Ctrl-C two seconds late (as when busy), so that a worker that took it itself has spoken by then
HANGING_WORKER = """
import os, signal, sys, time
import xrayforge.data.prepare as prep
import xrayforge.data.readers as readers
from xrayforge.cli import main
real = prep._process
def stuck(task):
    if task[0] == 0:
        time.sleep(600)
    return real(task)
prep._process = stuck
MAIN = os.getpid()
def slow(signum, frame):
    if os.getpid() == MAIN:
        time.sleep(2)
    raise KeyboardInterrupt
if os.environ.get("SLOW_SIGINT"):
    signal.signal(signal.SIGINT, slow)
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture
def start_hanging(tmp_path):
    """Start prepare phantom:8 with two workers; returns once one is stuck and the other has done the
    rest (idle). Whatever a test leaves running is killed afterwards: its whole process group."""
    started = []

    def start(**env):
        cmd = [sys.executable, "-c", HANGING_WORKER, "prepare", "phantom:8", str(tmp_path / "out"), "--resolution",
               "16", "--workers", "2", "-q"]
        # a terminal's process group, with the default SIGINT handler (not inherited as ignored)
        proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, start_new_session=True,
                                env=dict(os.environ, **env),
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        started.append(proc)
        progress = tmp_path / "out.partial" / "progress.jsonl"
        deadline = time.time() + 60
        while time.time() < deadline and proc.poll() is None and \
                (not progress.exists() or len(progress.read_text().splitlines()) < 7):
            time.sleep(0.05)
        assert proc.poll() is None and len(progress.read_text().splitlines()) == 7, "phantom:1 to 7 should be done"
        time.sleep(0.3)  # the worker that did them is back waiting for a task
        return proc
    yield start
    for proc in started:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        proc.stderr.close()


def interrupted_within(proc, seconds):
    try:
        _, err = proc.communicate(timeout=seconds)
    except subprocess.TimeoutExpired:
        pytest.fail(f"prepare still ran {seconds} s after Ctrl-C")
    assert proc.returncode == 130 and err.strip().splitlines() == ["xrayforge prepare: interrupted"], err


def test_ctrl_c_stops_a_decoder_stuck_on_a_file(tmp_path, start_hanging):
    proc = start_hanging()
    os.kill(proc.pid, signal.SIGINT)  # to the main process alone: it must stop the workers itself
    interrupted_within(proc, 30)
    # what was recorded stays; phantom:0 is done by the next run
    assert len((tmp_path / "out.partial" / "progress.jsonl").read_text().splitlines()) == 7


def test_ctrl_c_in_a_multi_worker_prepare_says_one_line(start_hanging):
    proc = start_hanging(SLOW_SIGINT="1")
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: every process of the group, the idle worker too
    interrupted_within(proc, 30)


def process_state(pid):
    """'R', 'S', ... ('Z' a zombie) from /proc, or None once gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


def children(pid):
    kids = []
    for p in Path("/proc").iterdir():
        try:
            if p.name.isdigit() and int((p / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(p.name))
        except OSError:
            continue
    return kids


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="workers die with their parent on Linux only")
def test_workers_die_with_a_killed_prepare(start_hanging):
    proc = start_hanging()
    workers = children(proc.pid)
    assert len(workers) == 2
    proc.kill()  # kill -9: no clean-up of any kind in the main process
    proc.wait()  # (not communicate: workers left alive would hold its stderr open)
    deadline = time.time() + 20
    while time.time() < deadline and any(process_state(w) not in (None, "Z") for w in workers):
        time.sleep(0.05)
    assert all(process_state(w) in (None, "Z") for w in workers), "the workers outlived the prepare that started them"


def test_dicom_without_a_known_suffix_is_prepared_and_unknown_files_are_listed(tmp_path):
    src = tmp_path / "src"
    (src / "series").mkdir(parents=True)
    write_image(src / "series" / "1.2.840.113619.2.55.3.604688", np.full((16, 16), 2048, dtype=np.uint16))
    write_image(src / "series" / "scan.IMA", np.full((16, 16), 1024, dtype=np.uint16))
    (src / "series" / "export.bin").write_bytes(b"\x01\x02" * 200)
    (src / "notes.txt").write_text("reading notes")
    (src / "index.json").write_text("{}")
    res = prepare(str(src), tmp_path / "out", resolution=8, workers=1, progress=False)
    assert (res.included, res.skipped) == (2, 1)
    manifest = read_csv(tmp_path / "out" / "manifest.csv")
    assert sorted(m["source"].split("/")[-1] for m in manifest) == ["1.2.840.113619.2.55.3.604688", "scan.IMA"]
    skipped = read_csv(tmp_path / "out" / "skipped.csv")
    assert [s["source"].split("/")[-1] for s in skipped] == ["export.bin"]
    assert "neither DICOM nor" in skipped[0]["reason"]


def test_twelve_bit_data_in_sixteen_bit_pngs_is_warned_about_once(tmp_path, caplog):
    src = tmp_path / "src"
    src.mkdir()
    ramp = np.linspace(0, 1, 64).reshape(8, 8)
    for name in ("a", "b", "c"):
        Image.fromarray((ramp * 4095).astype(np.uint16)).save(src / f"{name}.png")
    Image.fromarray((ramp * 65535).astype(np.uint16)).save(src / "full.png")
    with caplog.at_level("WARNING", logger="xrayforge.data.prepare"):
        prepare(str(src), tmp_path / "out", resolution=8, workers=2, progress=False)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "(12-bit data?): 3, e.g." in warnings[0] and "--bits 16" in warnings[0], warnings
    assert "full.png" not in warnings[0]
    caplog.clear()
    with caplog.at_level("WARNING", logger="xrayforge.data.prepare"):
        prepare(str(src / "full.png"), tmp_path / "out2", resolution=8, workers=1, progress=False)
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


def test_images_smaller_than_the_resolution_are_said_to_be_enlarged(tmp_path, caplog):
    """An 8-px image in a 16-px archive was enlarged without a word; the archive then holds less
    detail than its resolution says. Said once, with the sizes, after --square."""
    src = tmp_path / "src"
    src.mkdir()
    Image.fromarray(np.full((8, 8), 90, dtype=np.uint8)).save(src / "small.png")
    Image.fromarray(np.full((12, 40), 90, dtype=np.uint8)).save(src / "wide.png")  # cropped to 12 px
    Image.fromarray(np.full((16, 16), 90, dtype=np.uint8)).save(src / "exact.png")
    with caplog.at_level("WARNING", logger="xrayforge.data.prepare"):
        prepare(str(src), tmp_path / "out", resolution=16, workers=1, progress=False)
    warnings = [r.getMessage() for r in caplog.records if "enlarged" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].startswith("2 images are smaller than 16 px (after --square crop)")
    assert "small.png (8 px)" in warnings[0] and "wide.png (12 px)" in warnings[0] and "exact.png" not in warnings[0]
    caplog.clear()
    with caplog.at_level("WARNING", logger="xrayforge.data.prepare"):  # padded to 40 px: no longer small
        prepare(str(src / "wide.png"), tmp_path / "pad", resolution=16, square="pad", workers=1, progress=False)
    assert not [r for r in caplog.records if "enlarged" in r.getMessage()]


def test_dicom_for_processing_images_are_said(tmp_path, caplog):
    """DX 'FOR PROCESSING' images are the detector's raw data, not what radiologists read: they went
    into the archive like the others without a word."""
    src = tmp_path / "dx"
    src.mkdir()
    write_image(src / "raw.dcm", np.full((16, 16), 900, dtype=np.uint16), PresentationIntentType="FOR PROCESSING")
    write_image(src / "shown.dcm", np.full((16, 16), 900, dtype=np.uint16), PresentationIntentType="FOR PRESENTATION")
    with caplog.at_level("WARNING", logger="xrayforge.data.prepare"):
        res = prepare(str(src), tmp_path / "out", resolution=16, workers=1, progress=False)
    assert res.included == 2
    said = [r.getMessage() for r in caplog.records if "FOR PROCESSING" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith("1 DICOM images") and "raw.dcm" in said[0] and "shown" not in said[0]


def test_label_file_of_the_current_nih_download_is_found(tmp_path, caplog):
    src = tmp_path / "cxr14"
    names = make_chestxray14(src)
    (src / "Data_Entry_2017.csv").rename(src / "Data_Entry_2017_v2020.csv")
    res = prepare(str(src), tmp_path / "out", resolution=8, workers=1, progress=False)
    by_name = {m["source"].split("/")[-1]: m for m in read_csv(tmp_path / "out" / "manifest.csv")}
    assert by_name[names[0]]["finding_labels"] == "Cardiomegaly|Effusion" and by_name[names[2]]["split"] == "test"
    assert res.label_match["file"] == str(src / "Data_Entry_2017_v2020.csv") and res.label_match["matched"] == 3
    (src / "Data_Entry_2017_v2020.csv").unlink()  # split lists, but no label file: said, not silent
    with caplog.at_level("WARNING", logger="xrayforge.data.prepare"):
        res = prepare(str(src), tmp_path / "out2", resolution=8, workers=1, progress=False)
    assert res.label_match is None
    assert any("train_val_list.txt" in r.getMessage() and "--labels" in r.getMessage() for r in caplog.records)


def test_images_and_label_rows_that_do_not_match_are_counted_and_said(tmp_path, caplog, capsys):
    src = tmp_path / "cxr14"
    names = make_chestxray14(src)
    Image.fromarray(np.full((8, 8), 90, dtype=np.uint8)).save(src / "images" / "mine.png")
    with open(src / "Data_Entry_2017.csv", "a", newline="") as fh:
        csv.writer(fh).writerow(["00000009_000.png", "Mass", 0, 9, 40])  # no such image on disk
    with caplog.at_level("WARNING", logger="xrayforge.data.prepare"):
        res = prepare(str(src), tmp_path / "out", resolution=8, workers=1, progress=False)
    assert res.included == 4
    assert res.label_match == {"file": str(src / "Data_Entry_2017.csv"), "matched": 3, "unlisted": 1,
                               "unlisted_left_out": False, "rows_without_image": 1, "unlisted_patients_from_names": 0}
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 1 and "1 of 4 image files" in warned[0] and "mine.png" in warned[0]
    assert cli(["prepare", str(src), str(tmp_path / "cli"), "--resolution", "8", "--workers", "1", "-q"]) == 0
    assert "3 image files matched a row; 1 not in it (all-zero labels); 1 rows without an image file" \
        in capsys.readouterr().out
    assert cli(["prepare", str(src), str(tmp_path / "only"), "--resolution", "8", "--labelled-only", "-q"]) == 0
    assert sorted(m["source"].split("/")[-1] for m in read_csv(tmp_path / "only" / "manifest.csv")) == sorted(names)
    assert "1 not in it (left out)" in capsys.readouterr().out


def test_duplicate_label_rows_are_refused_only_when_they_differ_in_what_prepare_uses(tmp_path):
    src = tmp_path / "cxr14"
    names = make_chestxray14(src)
    with open(src / "Data_Entry_2017.csv", "a", newline="") as fh:
        w = csv.writer(fh)
        w.writerow([names[0], "Cardiomegaly|Effusion", 0, 1, 50])  # line 5: the same as line 2
        w.writerow([names[0], "Effusion|Cardiomegaly", 3, 1, 52])  # line 6: the same findings, another age
    assert prepare(str(src), tmp_path / "out", resolution=8, workers=1, progress=False).included == 3
    for k, (row, field, values) in enumerate([
            ([names[0], "Hernia", 0, 1, 50], "Finding Labels", "line 2: 'Cardiomegaly|Effusion', line 7: 'Hernia'"),
            ([names[0], "Effusion|Cardiomegaly", 0, 7, 50], "Patient ID", "line 2: '1', line 7: '7'")]):
        lines = (src / "Data_Entry_2017.csv").read_text().splitlines(keepends=True)[:6]
        with open(src / "Data_Entry_2017.csv", "w", newline="") as fh:
            fh.writelines(lines)
            csv.writer(fh).writerow(row)  # line 7
        with pytest.raises(UserError, match=f"Data_Entry_2017.csv: image 00000001_000.png has two rows with different "
                                            f"{field} \\({values}\\); keep the right one"):
            prepare(str(src), tmp_path / f"out{k}", resolution=8, workers=1, progress=False)
        assert not (tmp_path / f"out{k}.partial").exists()


def test_an_image_in_both_split_lists_is_refused(tmp_path):
    src = tmp_path / "cxr14"
    names = make_chestxray14(src)
    (src / "test_list.txt").write_text(f"{names[2]}\n{names[0]}\n")
    with pytest.raises(UserError, match=f"{names[0]}: listed in both .*train_val_list.txt and .*test_list.txt"):
        prepare(str(src), tmp_path / "out", resolution=8, workers=1, progress=False)


def test_two_labelled_images_of_one_name_are_refused(tmp_path):
    src = tmp_path / "cxr14"
    names = make_chestxray14(src)
    (src / "copy").mkdir()
    shutil.copy(src / "images" / names[1], src / "copy" / names[1])
    with pytest.raises(UserError, match=f"{src / 'copy' / names[1]} and {src / 'images' / names[1]}: two images "
                                        f"named {names[1]}"):
        prepare(str(src), tmp_path / "out", resolution=8, workers=1, progress=False)
    (src / "copy" / names[1]).rename(src / "copy" / "other.png")  # a name the label file does not have: no question
    assert prepare(str(src), tmp_path / "out", resolution=8, workers=1, progress=False).included == 4


def test_labels_beside_the_current_folder_are_found(tmp_path, monkeypatch):
    src = tmp_path / "cxr14"
    names = make_chestxray14(src)
    monkeypatch.chdir(src / "images")  # prepare . : the label file is in the parent of the current folder
    res = prepare(".", tmp_path / "out", resolution=8, workers=1, progress=False)
    assert res.label_match["matched"] == 3 and res.label_match["file"] == str(src / "Data_Entry_2017.csv")
    by_name = {m["source"].split("/")[-1]: m for m in read_csv(tmp_path / "out" / "manifest.csv")}
    assert by_name[names[0]]["finding_labels"] == "Cardiomegaly|Effusion" and by_name[names[2]]["split"] == "test"


def test_files_that_are_no_images_are_neither_unlabelled_images_nor_rows(tmp_path, caplog):
    src = tmp_path / "cxr14"
    make_chestxray14(src)
    Image.fromarray(np.full((8, 8), 90, dtype=np.uint8)).save(src / "images" / "mine.png")
    (src / "images" / "export.bin").write_bytes(b"\xd0\xcf\x11\xe0" + b"\x00" * 300)
    (src / "images" / "upload.part").write_bytes(b"\x89PN")  # an image cut short is still not one
    (src / "images" / "BMW.notes").write_text("BMW 320d service history\n" * 8)
    with caplog.at_level("WARNING", logger="xrayforge.data.prepare"):
        res = prepare(str(src), tmp_path / "out", resolution=8, workers=1, progress=False)
    assert (res.included, res.skipped) == (4, 3)
    assert res.label_match["unlisted"] == 1 and res.label_match["matched"] == 3
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 1 and "1 of 4 image files" in warned[0] and "mine.png" in warned[0]
    skipped = {s["source"].split("/")[-1]: s["reason"] for s in read_csv(tmp_path / "out" / "skipped.csv")}
    assert set(skipped) == {"export.bin", "upload.part", "BMW.notes"}
    assert all("neither DICOM nor" in reason for reason in skipped.values())
    assert json.loads((tmp_path / "out" / "archive.json").read_text())["capacity"] == 4  # no rows for them


def test_a_dicom_export_reusing_file_names_across_patients_is_prepared(tmp_path):
    src = tmp_path / "export"
    for k in range(3):  # PAT000/STUDY1/SERIES1/IM-0001-0001.dcm, ...: the same names in every patient's folder
        series = src / f"PAT{k:03d}" / "STUDY1" / "SERIES1"
        series.mkdir(parents=True)
        write_image(series / "IM-0001-0001.dcm", np.full((16, 16), 100 + 500 * k, dtype=np.uint16), PatientID=f"PAT{k}")
        write_image(series / "IM-0001-0002", np.full((16, 16), 2100 + 500 * k, dtype=np.uint16), PatientID=f"PAT{k}")
    write_rt_plan(src / "DICOMDIR")  # a DICOM object without pixel data, as the index of an export is
    (src / "README").write_text("exported by the PACS")
    res = prepare(str(src), tmp_path / "out", resolution=8, workers=2, progress=False)
    assert (res.included, res.skipped, res.label_match) == (6, 2, None)
    manifest = read_csv(tmp_path / "out" / "manifest.csv")
    assert sorted(m["patient_id"] for m in manifest) == ["PAT0", "PAT0", "PAT1", "PAT1", "PAT2", "PAT2"]
    assert len({m["sha1"] for m in manifest}) == 6


def test_damaged_arrays_of_an_unfinished_prepare_are_said_as_such(tmp_path, monkeypatch):
    _kill_at_task(monkeypatch, 3)
    with pytest.raises(Killed):
        prepare("phantom:8", tmp_path / "out", resolution=8, workers=1, progress=False)
    monkeypatch.undo()
    os.truncate(tmp_path / "out.partial" / "images_4.npy", 100)
    with pytest.raises(UserError, match=r"images_4.npy: cannot read the unfinished 4-px images: the file is truncated "
                                        r"or damaged .*; delete .*out.partial to start again"):
        prepare("phantom:8", tmp_path / "out", resolution=8, workers=2, progress=False)


def test_a_partial_archive_finished_by_an_older_version_is_finished(tmp_path):
    prepare("phantom:4", tmp_path / "whole", resolution=8, workers=1, progress=False)
    shutil.copytree(tmp_path / "whole", tmp_path / "out.partial")
    meta = json.loads((tmp_path / "out.partial" / "archive.json").read_text())
    del meta["settings"], meta["label_match"]  # what it wrote, then stopped just before the rename
    (tmp_path / "out.partial" / "archive.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match=r"out.partial: a finished archive of phantom:4 \(8 px, uint8, square by crop\) "
                                        r"that an older xrayforge .* rename it to out; .* delete it"):
        prepare("phantom:4", tmp_path / "out", resolution=16, workers=1, progress=False)
    res = prepare("phantom:4", tmp_path / "out", resolution=8, workers=1, progress=False)
    assert (res.included, res.skipped) == (4, 0) and not (tmp_path / "out.partial").exists()
    assert Archive(tmp_path / "out").records == Archive(tmp_path / "whole").records


@pytest.mark.parametrize("killed", [False, True])
def test_prepare_into_an_empty_mount_point_copies_across_file_systems(tmp_path, monkeypatch, killed):
    """OUT.partial sits on the parent's file system; an empty OUT that is a mount point is another,
    where a rename fails with EXDEV: the files are copied in (a kill during the copy leaves OUT
    no archive, and running again finishes)."""
    import errno
    prepare("phantom:6", tmp_path / "whole", resolution=16, workers=1, progress=False)
    out = tmp_path / "out"
    out.mkdir()
    real_replace, real_copy = os.replace, prep.shutil.copyfile

    def replace(src, dst):
        if Path(src).parent.name == "out.partial" and Path(dst).parent == out:
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        return real_replace(src, dst)

    def copy(src, dst):
        if killed and Path(src).name == "archive.json":
            Path(dst).write_text("{")  # torn, under its hidden name
            raise Killed
        return real_copy(src, dst)
    monkeypatch.setattr(prep.os, "replace", replace)
    monkeypatch.setattr(prep.shutil, "copyfile", copy)
    if killed:
        with pytest.raises(Killed):
            prepare("phantom:6", out, resolution=16, workers=1, progress=False)
        assert not (out / "archive.json").exists()
        monkeypatch.setattr(prep.shutil, "copyfile", real_copy)
    res = prepare("phantom:6", out, resolution=16, workers=1, progress=False)
    assert (res.included, res.skipped) == (6, 0)
    assert not (tmp_path / "out.partial").exists()
    assert_same_archive(out, tmp_path / "whole")


def test_undecodable_dicoms_are_skipped_with_a_one_line_reason_that_the_error_repeats(tmp_path, capsys):
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEG2000Lossless

    from dicom_factory import base_dataset

    src = tmp_path / "src"
    src.mkdir()
    for name in ("a.dcm", "b.dcm"):
        ds = base_dataset(ts=JPEG2000Lossless)
        ds.Rows = ds.Columns = 8
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + b"garbage" * 10])  # no decoder, or a broken stream
        ds["PixelData"].VR = "OB"
        ds.save_as(src / name, enforce_file_format=True)
    (src / "c.png").write_text("x")
    assert cli(["prepare", str(src), str(tmp_path / "out"), "--resolution", "8", "--workers", "1", "-q"]) == 1
    err = capsys.readouterr().err
    assert "none of the 3 files could be used" in err and "a.dcm: pixel data could not be decoded (transfer syntax " \
        "JPEG 2000" in err and len(err.strip().splitlines()) == 1, err
    skipped = read_csv(tmp_path / "out.partial" / "skipped.csv")
    assert len(skipped) == 3 and not any("\n" in s["reason"] or "\t" in s["reason"] for s in skipped), skipped


def test_nih_layout_with_its_real_header_and_linked_image_folders(tmp_path):
    # the NIH download: Data_Entry_2017.csv (its header ends in a comma, as does every row), the split
    # lists, and images_001/images ... images_012/images, here one of them linked from another disk
    src, disk = tmp_path / "cxr14", tmp_path / "disk2"
    names = ["00000001_000.png", "00000001_001.png", "00000003_000.png"]
    (src / "images_001" / "images").mkdir(parents=True)
    (disk / "images_002" / "images").mkdir(parents=True)
    (src / "images_002").symlink_to(disk / "images_002")
    for folder, name in zip(("images_001", "images_001", "images_002"), names):
        Image.fromarray(np.full((16, 16), 100, dtype=np.uint8)).convert("RGBA").save(src / folder / "images" / name)
    (src / "Data_Entry_2017.csv").write_text(
        "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
        "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],\n"
        f"{names[0]},Cardiomegaly,0,1,58,M,PA,2682,2749,0.143,0.143,\n"
        f"{names[1]},Cardiomegaly|Emphysema,1,1,58,M,PA,2894,2729,0.143,0.143,\n"
        f"{names[2]},Pleural_Thickening|Hernia,0,3,81,F,PA,2582,2991,0.143,0.143,\n"
        "00000004_000.png,No Finding,0,4,82,M,AP,2500,2048,0.168,0.168,\n")
    (src / "train_val_list.txt").write_text(f"{names[0]}\n{names[1]}\n00000004_000.png\n")
    (src / "test_list.txt").write_text(f"{names[2]}\n")
    res = prepare(str(src), tmp_path / "out", resolution=8, workers=1, progress=False)
    assert (res.included, res.skipped) == (3, 0)
    assert {k: res.label_match[k] for k in ("matched", "unlisted", "rows_without_image")} == \
        {"matched": 3, "unlisted": 0, "rows_without_image": 1}
    by_name = {m["source"].split("/")[-1]: m for m in read_csv(tmp_path / "out" / "manifest.csv")}
    assert by_name[names[2]]["split"] == "test" and by_name[names[2]]["patient_id"] == "3"
    assert by_name[names[2]]["Pleural_Thickening"] == by_name[names[2]]["Hernia"] == "1"
    assert by_name[names[1]]["finding_labels"] == "Cardiomegaly|Emphysema"
    assert (Archive(tmp_path / "out").images([0], 8)[0] == 100).all()  # RGBA grey: its luminance


def test_split_lists_that_are_not_patient_wise_hold_out_the_test_patients_other_images(tmp_path, caplog):
    """Custom split lists that put one patient on both sides: prepare says so, and training (and the
    classifier, and TSTR's test set) hold out every image of a patient in the test split, so that the
    evaluations never test on a patient the GAN or the classifier saw."""
    from xrayforge.evaluate.tstr import real_test_split
    src = tmp_path / "cxr"
    src.mkdir()
    names = ["00000001_000.png", "00000001_001.png", "00000002_000.png", "00000003_000.png"]
    for name in names:
        Image.fromarray(np.full((16, 16), 100, dtype=np.uint8)).save(src / name)
    (src / "Data_Entry_2017.csv").write_text(
        "Image Index,Finding Labels,Follow-up #,Patient ID\n" +
        "".join(f"{n},No Finding,0,{int(n[:8])}\n" for n in names))
    (src / "train_val_list.txt").write_text(f"{names[1]}\n{names[2]}\n")  # patient 1 on both sides
    (src / "test_list.txt").write_text(f"{names[0]}\n")                   # patient 3: in neither list
    with caplog.at_level("WARNING", logger="xrayforge.data.prepare"):
        prepare(str(src), tmp_path / "out", resolution=8, workers=1, progress=False)
    assert "1 patients have images in the test split and outside it (e.g. 1)" in caplog.text
    arc = Archive(tmp_path / "out")
    by_name = {Path(r["source"]).name: i for i, r in enumerate(arc.records)}
    held = arc.held_out()
    assert [bool(held[by_name[n]]) for n in names] == [True, True, False, False]
    assert sorted(arc.training_positions().tolist()) == sorted([by_name[names[2]], by_name[names[3]]])
    train, test = real_test_split(arc, 0.2, 0)
    assert sorted(test.tolist()) == sorted([by_name[names[0]], by_name[names[1]]])


def test_an_unlisted_chestxray14_image_takes_its_patient_from_its_name_and_is_held_out_with_them(tmp_path):
    """An image file the label file does not list got no patient, so a test-split patient's unlisted
    follow-up was trained on. ChestX-ray14 names carry the patient (00000002_001.png: patient 2);
    where the label file's rows follow that rule, an unlisted image takes its patient from its name."""
    src = tmp_path / "cxr14"
    make_chestxray14(src)  # patient 2 (00000002_000.png) is in the test list
    for name in ("00000002_001.png", "00000001_007.png", "scan.png"):
        Image.fromarray(np.full((20, 30), 90, dtype=np.uint8)).save(src / "images" / name)
    res = prepare(str(src), tmp_path / "out", resolution=8, workers=1, progress=False)
    assert res.label_match["unlisted"] == 3 and res.label_match["unlisted_patients_from_names"] == 2
    arc = Archive(tmp_path / "out")
    by_name = {m["source"].split("/")[-1]: m for m in read_csv(tmp_path / "out" / "manifest.csv")}
    assert by_name["00000002_001.png"]["patient_id"] == "2" and by_name["00000001_007.png"]["patient_id"] == "1"
    assert by_name["scan.png"]["patient_id"] == ""
    held = {n for n in by_name if arc.held_out()[int(by_name[n]["row"])]}
    assert held == {"00000002_000.png", "00000002_001.png"}  # the test patient's unlisted image too
    # rows whose Patient ID is not the number in the name: no patient is guessed from a name
    src2 = tmp_path / "other"
    make_chestxray14(src2)
    text = (src2 / "Data_Entry_2017.csv").read_text().replace(",0,2,60", ",0,P-7,60")
    (src2 / "Data_Entry_2017.csv").write_text(text)
    Image.fromarray(np.full((20, 30), 90, dtype=np.uint8)).save(src2 / "images" / "00000002_001.png")
    res = prepare(str(src2), tmp_path / "out2", resolution=8, workers=1, progress=False)
    assert res.label_match["unlisted_patients_from_names"] == 0
    rows = {m["source"].split("/")[-1]: m for m in read_csv(tmp_path / "out2" / "manifest.csv")}
    assert rows["00000002_001.png"]["patient_id"] == ""


def test_spaces_around_a_label_files_names_and_patients_are_not_part_of_them(tmp_path):
    """A label file edited by hand or re-exported with a space after its commas: a name with a space
    matched no image (its findings lost: all-zero labels) and a patient with one was not the patient
    its images' names say (a test patient's unlisted follow-up trained on)."""
    src = tmp_path / "cxr14"
    names = make_chestxray14(src)
    text = (src / "Data_Entry_2017.csv").read_text()
    text = text.replace(f"{names[2]},Hernia,0,2,", f" {names[2]} , Hernia,0, 2 ,")
    (src / "Data_Entry_2017.csv").write_text(text)
    Image.fromarray(np.full((20, 30), 90, dtype=np.uint8)).save(src / "images" / "00000002_001.png")
    res = prepare(str(src), tmp_path / "out", resolution=8, workers=1, progress=False)
    assert (res.label_match["matched"], res.label_match["unlisted"], res.label_match["rows_without_image"]) == (3, 1, 0)
    by_name = {m["source"].split("/")[-1]: m for m in read_csv(tmp_path / "out" / "manifest.csv")}
    assert by_name[names[2]]["Hernia"] == "1" and by_name[names[2]]["split"] == "test"
    assert by_name[names[2]]["patient_id"] == by_name["00000002_001.png"]["patient_id"] == "2"
    arc = Archive(tmp_path / "out")
    assert {n for n in by_name if arc.held_out()[int(by_name[n]["row"])]} == {names[2], "00000002_001.png"}


def test_dicom_without_preamble_and_sixteen_bit_colour_png_are_prepared(tmp_path):
    """A folder as a PACS export leaves it: DICOM data sets written without the PS3.10 header (no
    suffix, or .dcm) are found and read, a 16-bit colour PNG keeps its low bytes in a 16-bit
    archive, and a random file and a text file named .dcm are skipped with their reasons."""
    src = tmp_path / "src"
    src.mkdir()
    stored = (np.arange(64, dtype=np.uint16) * 64).reshape(8, 8)
    write_image(src / "with_header.dcm", stored)
    write_bare_image(src / "IM0001", stored, implicit=True)
    write_bare_image(src / "b.dcm", stored, implicit=False)
    values = (0x1200 + 4 * np.arange(64, dtype=np.uint16)).reshape(8, 8)  # one high byte: one grey at 8 bits
    write_png(src / "c.png", np.repeat(values[..., None], 3, axis=-1))
    (src / "noise").write_bytes(np.random.default_rng(0).integers(0, 256, 300, dtype=np.uint8).tobytes())
    (src / "notes.dcm").write_text("not an image\n")
    res = prepare(str(src), tmp_path / "out", resolution=8, bits=16, workers=1, progress=False)
    assert (res.included, res.skipped) == (4, 2)
    arc = Archive(tmp_path / "out")
    by_name = {Path(r["source"]).name: i for i, r in enumerate(arc.records)}
    np.testing.assert_array_equal(arc.images([by_name["c.png"]], 8)[0], values)
    reference = arc.images([by_name["with_header.dcm"]], 8)[0]
    assert len(np.unique(reference)) == 64
    for name in ("IM0001", "b.dcm"):
        np.testing.assert_array_equal(arc.images([by_name[name]], 8)[0], reference)
    skipped = {Path(r["source"]).name: r["reason"] for r in read_csv(tmp_path / "out" / "skipped.csv")}
    assert skipped["noise"].startswith("unsupported file type (no suffix): neither DICOM nor")
    assert skipped["notes.dcm"].startswith("not a DICOM file (no 'DICM' prefix after the 128-byte preamble") and \
        "no data element of group 0002 or 0008" in skipped["notes.dcm"]


def test_every_skip_reason_is_one_line_in_skipped_csv_and_on_the_console(tmp_path, monkeypatch, capsys):
    """A reason in several lines (pydicom's "no decoder" lists each plugin on a line of its own) was
    made one line only where prepare wrote a decode failure to skipped.csv: a file that was no image
    kept its lines, in skipped.csv and in the error that says no image could be used."""
    real_kind, real_read = prep.reader_kind, prep.read_radiograph

    def kind(path):
        if Path(path).name == "b.scan":
            raise SkipImage("cannot read file:\n  permission\tdenied")
        return real_kind(path)

    def read(path):
        name = Path(path).name
        if name == "c.png":
            raise SkipImage("pixel data could not be decoded:\n  gdcm: missing\n  pylibjpeg: missing\n")
        if name == "d.png":
            raise RuntimeError("decoder broke:\nline two")
        return real_read(path)
    monkeypatch.setattr(prep, "reader_kind", kind)
    monkeypatch.setattr(prep, "read_radiograph", read)
    src = tmp_path / "src"
    src.mkdir()
    for name in ("a.png", "c.png", "d.png"):
        Image.fromarray(np.full((8, 8), 100, dtype=np.uint8)).save(src / name)
    (src / "b.scan").write_bytes(b"\x00" * 10)
    res = prepare(str(src), tmp_path / "out", resolution=8, workers=1, progress=False)
    assert (res.included, res.skipped) == (1, 3)
    skipped = {Path(r["source"]).name: r["reason"] for r in read_csv(tmp_path / "out" / "skipped.csv")}
    assert skipped == {"b.scan": "cannot read file: permission denied",
                       "c.png": "pixel data could not be decoded: gdcm: missing pylibjpeg: missing",
                       "d.png": "unexpected error while reading (RuntimeError: decoder broke: line two)"}
    only = tmp_path / "only"
    only.mkdir()
    (only / "b.scan").write_bytes(b"\x00" * 10)
    assert cli(["prepare", str(only), str(tmp_path / "out2"), "--resolution", "8", "--workers", "1", "-q"]) == 1
    err = capsys.readouterr().err
    assert "b.scan (cannot read file: permission denied)" in err and len(err.strip().splitlines()) == 1, err


def test_sixteen_bit_colour_read_at_8_bits_is_counted_once(tmp_path, monkeypatch, caplog):
    """Where the low bytes of 16-bit colour images cannot be decoded (a Pillow whose raw modes are
    others), they are read at 8 bits, and prepare says how many, as it does of 12-bit data."""
    monkeypatch.setattr(readers, "_said_8_bits", False, raising=False)
    monkeypatch.setattr(readers, "_SIXTEEN_BIT_COLOUR", re.compile("(?!)"), raising=False)
    src = tmp_path / "src"
    src.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.png"):
        write_png(src / name, rng.integers(0, 65536, (8, 8, 3), dtype=np.uint16))
    write_png(src / "eight.png", rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), bit_depth=8)
    with caplog.at_level("WARNING", logger="xrayforge.data.prepare"):
        res = prepare(str(src), tmp_path / "out", resolution=8, workers=1, progress=False)
    assert res.included == 3
    said = [r.getMessage() for r in caplog.records if r.name == "xrayforge.data.prepare"]
    assert len(said) == 1 and said[0].startswith("2 image files have 16 bits per sample (colour, or grey + alpha) "
                                                 "but were read at 8 bits") and "eight.png" not in said[0], said


def _area_average(x, size):
    """The hand reference: output pixel (i, j) the mean of the source square [i·s, (i+1)·s) ×
    [j·s, (j+1)·s), s = N / size, each source pixel weighted by the area of it inside."""
    n = x.shape[0]
    weights = np.zeros((size, n))
    for i in range(size):
        a, b = i * n / size, (i + 1) * n / size
        for j in range(n):
            weights[i, j] = max(0.0, min(b, j + 1) - max(a, j)) * size / n
    return weights @ x @ weights.T


@pytest.mark.parametrize("side", [20, 13, 32])
def test_downsampling_is_the_area_average_at_every_level(tmp_path, side):
    """A source of a side that the resolution does not divide is averaged over the area each output
    pixel covers, at every level of the archive: Pillow's BOX filter gave each source pixel wholly to
    one output pixel (2 or 3 pixels averaged by turns at 20 -> 8), moving a one-pixel line by half a
    source pixel and doubling its contrast in one column (85 where 51 and 51)."""
    src = tmp_path / "src"
    src.mkdir()
    img = np.random.default_rng(side).integers(0, 256, (side, side)).astype(np.uint8)
    img[:, 2] = 255
    img[:, :2] = img[:, 3:5] = 0
    Image.fromarray(img).save(src / "a.png")
    prepare(str(src), tmp_path / "out", resolution=8, workers=1, progress=False)
    arc = Archive(tmp_path / "out")
    level = _area_average(img / 255.0, 8)
    for r in (8, 4):  # rounded to the nearest level (a tie either way: the sums' order differs)
        assert np.abs(arc.images([0], r)[0] - level * 255).max() <= 0.5 + 1e-4
        level = 0.25 * (level[0::2, 0::2] + level[1::2, 0::2] + level[0::2, 1::2] + level[1::2, 1::2])
    if side == 20:  # by hand: column 2 of 20 falls half in output column 0, half in column 1
        assert (arc.images([0], 8)[0][:, :2] == 51).all()  # 255 · 0.5 / 2.5


def test_a_file_linked_twice_is_one_image_under_the_label_files_name(tmp_path):
    """A test-split image also reached by a link of another name (a folder of links gathered beside
    the images) was two rows: the link, in no split list and of no patient, was trained on. A file
    reached by links is one image, under the name the label file gives it; the links are said in
    skipped.csv. Without a label file, the first found is kept."""
    src = tmp_path / "cxr14"
    names = make_chestxray14(src)
    (src / "a_links").mkdir()
    (src / "a_links" / "scan.png").symlink_to(src / "images" / names[2])  # found before images/
    (src / "images" / "same.png").symlink_to(src / "images" / names[2])
    res = prepare(str(src), tmp_path / "out", resolution=8, workers=1, progress=False)
    manifest = read_csv(tmp_path / "out" / "manifest.csv")
    assert sorted(Path(m["source"]).name for m in manifest) == sorted(names)
    assert res.label_match["unlisted"] == 0
    arc = Archive(tmp_path / "out")
    assert len(arc) == 3 and arc.held_out().sum() == 1
    skipped = {Path(s["source"]).name: s["reason"] for s in read_csv(tmp_path / "out" / "skipped.csv")}
    assert set(skipped) == {"scan.png", "same.png"} and names[2] in skipped["scan.png"]
    plain = tmp_path / "plain"
    plain.mkdir()
    Image.fromarray(np.full((8, 8), 7, dtype=np.uint8)).save(plain / "b.png")
    (plain / "a.png").symlink_to(plain / "b.png")
    prepare(str(plain), tmp_path / "out2", resolution=8, workers=1, progress=False)
    assert [Path(m["source"]).name for m in read_csv(tmp_path / "out2" / "manifest.csv")] == ["a.png"]


def test_split_lists_saved_with_a_byte_order_mark_keep_their_first_name(tmp_path):
    """A test_list.txt saved by a Windows editor (a UTF-8 byte-order mark, CRLF line ends): its first
    name kept the mark and matched no image, so that test image was in no split and trained on."""
    src = tmp_path / "cxr14"
    names = make_chestxray14(src)
    (src / "test_list.txt").write_bytes(f"\ufeff{names[2]}\r\n".encode("utf-8"))
    (src / "train_val_list.txt").write_bytes(f"\ufeff{names[0]}\r\n{names[1]}\r\n".encode("utf-8"))
    prepare(str(src), tmp_path / "out", resolution=8, workers=1, progress=False)
    arc = Archive(tmp_path / "out")
    splits = {Path(r["source"]).name: r["split"] for r in arc.records}
    assert splits == {names[0]: "train", names[1]: "train", names[2]: "test"}
    assert sorted(Path(arc.records[i]["source"]).name for i in arc.training_positions()) == names[:2]


def _killed_prepare(tmp_path, monkeypatch, at):
    """A prepare of 8 PNG files (20 px, shrunk to 16) killed at ``at``: "image" (the fourth image
    read) or "finish" (archive.json written, plan.json not yet removed); out.partial's plan.json and
    archive.json (where written) with the "resize" setting dropped, as an older xrayforge wrote them."""
    import json
    from PIL import Image
    src = tmp_path / "src"
    src.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (20, 20), dtype=np.uint8)).save(src / f"{i}.png")
    if at == "image":
        real, seen = prep._process, []

        def dying(task):
            seen.append(task)
            if len(seen) == 4:
                raise Killed
            return real(task)
        monkeypatch.setattr(prep, "_process", dying)
    else:
        real_unlink = Path.unlink

        def dying(path, *a, **k):
            if path.name == "plan.json":
                raise Killed
            return real_unlink(path, *a, **k)
        monkeypatch.setattr(Path, "unlink", dying)
    with pytest.raises(Killed):
        prepare(str(src), tmp_path / "out", resolution=16, workers=1, progress=False)
    monkeypatch.undo()
    for name in ("plan.json", "archive.json"):
        f = tmp_path / "out.partial" / name
        if f.is_file():
            saved = json.loads(f.read_text())
            assert saved["settings"].pop("resize") == "area"
            f.write_text(json.dumps(saved))
    return src


def test_an_unfinished_prepare_of_the_box_filter_is_not_continued_with_area_averages(tmp_path, monkeypatch):
    """Images are shrunk by exact area averages since an xrayforge whose Pillow BOX filter gave a
    pattern at ratios that are not integers: a prepare that one began (its plan without "resize") is
    not finished the other way, one archive made two ways; one it finished (killed while tidying
    up, its plan still there) is taken as it was made."""
    src = _killed_prepare(tmp_path / "a", monkeypatch, "image")
    with pytest.raises(ValueError, match="holds an unfinished prepare with other settings"):
        prepare(str(src), tmp_path / "a" / "out", resolution=16, workers=1, progress=False)
    src = _killed_prepare(tmp_path / "b", monkeypatch, "finish")
    assert (tmp_path / "b" / "out.partial" / "plan.json").is_file()
    prepare(str(src), tmp_path / "b" / "out", resolution=16, workers=1, progress=False)  # moved into place
    assert len(Archive(tmp_path / "b" / "out")) == 8 and not (tmp_path / "b" / "out.partial").exists()


def test_an_output_folder_that_cannot_be_written_is_said_first_and_a_failed_move_keeps_the_archive(tmp_path,
                                                                                                monkeypatch):
    """The archive is made in OUT.partial and moved into OUT at the end: a read-only OUT failed only
    then, naming a hidden temporary (OUT/.images_4.npy.moving: Read-only file system). OUT is checked
    before the work, and a move that fails says where the whole archive is; a rerun moves it."""
    import errno
    out = tmp_path / "out"
    out.mkdir()
    real_access = os.access
    monkeypatch.setattr(prep.os, "access", lambda p, mode: Path(p) != out and real_access(p, mode))
    with pytest.raises(prep.UserError, match=r"out: cannot write in the output folder \(read-only, or no permission\)"):
        prepare("phantom:6", out, resolution=8, workers=1, progress=False)
    assert not (tmp_path / "out.partial").exists()
    monkeypatch.undo()
    move = prep._move

    def read_only(src, dst):
        raise OSError(errno.EROFS, "Read-only file system", str(dst.with_name(f".{dst.name}.moving")))
    monkeypatch.setattr(prep, "_move", read_only)
    with pytest.raises(prep.UserError, match=r"out: cannot move the finished archive into it \(Read-only file "
                                             r"system\); it is whole in .*out.partial"):
        prepare("phantom:6", out, resolution=8, workers=1, progress=False)
    monkeypatch.setattr(prep, "_move", move)
    prepare("phantom:6", out, resolution=8, workers=1, progress=False)
    assert len(Archive(out)) == 6 and not (tmp_path / "out.partial").exists()


@pytest.mark.parametrize("labels,said", [
    ("", "line 4, image 00000002_000.png: empty Finding Labels"),
    ("  ", "line 4, image 00000002_000.png: empty Finding Labels"),
    ("Hernia|No Finding", "line 4, image 00000002_000.png: Finding Labels 'Hernia|No Finding' has 'No Finding' "
                          "together with findings"),
    ("hernia", "line 4, image 00000002_000.png: unknown finding 'hernia'")])
def test_a_label_row_that_would_drop_or_invent_a_finding_is_refused_with_its_line(tmp_path, labels, said):
    """An empty Finding Labels was read as 'No Finding' (a lost finding said nowhere), and 'No Finding'
    beside a finding as the finding alone; the lines said were the row's index, wrong after a blank line."""
    src = tmp_path / "cxr14"
    names = make_chestxray14(src)
    (src / "Data_Entry_2017.csv").write_text(  # a blank line before names[2]'s row: it is on line 4
        "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age\n"
        f"{names[0]},Cardiomegaly|Effusion,0,1,50\n\n{names[2]},{labels},0,2,60\n{names[1]},No Finding,1,1,51\n")
    with pytest.raises(UserError, match=re.escape(f"Data_Entry_2017.csv: {said}")):
        prepare(str(src), tmp_path / "out", resolution=8, workers=1, progress=False)
    assert not (tmp_path / "out.partial").exists()


def test_a_duplicate_label_row_after_a_blank_line_is_said_at_its_own_line(tmp_path):
    src = tmp_path / "cxr14"
    names = make_chestxray14(src)
    with open(src / "Data_Entry_2017.csv", "a", newline="") as fh:
        fh.write("\n,,,,\n")  # lines 5 and 6: no rows
        csv.writer(fh).writerow([names[0], "Hernia", 0, 1, 50])  # line 7
    with pytest.raises(UserError, match=re.escape("line 2: 'Cardiomegaly|Effusion', line 7: 'Hernia'")):
        prepare(str(src), tmp_path / "out", resolution=8, workers=1, progress=False)


@pytest.mark.parametrize("edit", ["Data_Entry_2017.csv", "test_list.txt", "test_list.txt removed"])
def test_an_unfinished_prepare_whose_label_files_changed_is_not_finished_with_the_old_labels(tmp_path, monkeypatch,
                                                                                             edit):
    """The plan holds each image's labels and split: resumed after the label file or a split list was
    edited, the archive had the old labels, and no word said so."""
    src = tmp_path / "cxr14"
    names = make_chestxray14(src)
    process = _kill_at_task(monkeypatch, 1)
    with pytest.raises(Killed):
        prepare(str(src), tmp_path / "out", resolution=8, workers=1, progress=False)
    monkeypatch.setattr(prep, "_process", process)
    path = src / edit.split()[0]
    before = path.read_bytes()
    if edit.endswith("removed"):
        path.unlink()
    else:
        path.write_bytes(before.replace(b"Hernia", b"Mass") if edit.endswith(".csv") else b"")
    with pytest.raises(UserError, match=re.escape(f"{path}: changed since the unfinished prepare in "
                                                  f"{tmp_path / 'out.partial'} began")):
        prepare(str(src), tmp_path / "out", resolution=8, workers=1, progress=False)
    path.write_bytes(before)  # restored: the prepare finishes, with the labels it began with
    prepare(str(src), tmp_path / "out", resolution=8, workers=1, progress=False)
    by_name = {m["source"].split("/")[-1]: m for m in read_csv(tmp_path / "out" / "manifest.csv")}
    assert by_name[names[2]]["Hernia"] == "1" and by_name[names[2]]["split"] == "test"


@pytest.mark.parametrize("name", ["plan.json", "skipped.csv", "manifest.csv", "archive.json"])
def test_a_prepare_killed_while_writing_a_file_leaves_no_temporary_in_the_archive(tmp_path, name):
    """A kill (SIGKILL: no clean-up runs) while a file of OUT.partial was being written leaves
    atomic_write's hidden temporary there; the run that finished moved it into the archive, a
    half-written copy beside the real file, never removed."""
    prepare("phantom:6", tmp_path / "whole", resolution=16, workers=1, progress=False)
    out = tmp_path / "out"
    code = ("import os, sys\n"
            "from xrayforge.data.prepare import prepare\n"
            "real = os.replace\n"
            "def replace(src, dst):\n"
            "    if os.path.basename(dst) == sys.argv[2]:\n"
            "        os._exit(9)  # the temporary is whole or not: died before it was renamed\n"
            "    return real(src, dst)\n"
            "os.replace = replace\n"
            "prepare('phantom:6', sys.argv[1], resolution=16, workers=1, progress=False)\n")
    killed = subprocess.run([sys.executable, "-c", code, str(out), name], capture_output=True, text=True)
    assert killed.returncode == 9, killed.stderr
    left = [p.name for p in (tmp_path / "out.partial").iterdir() if p.name.startswith(f".{name}.")]
    assert len(left) == 1  # what the kill left
    res = prepare("phantom:6", out, resolution=16, workers=1, progress=False)
    assert (res.included, res.skipped) == (6, 0)
    assert not (tmp_path / "out.partial").exists()
    assert_same_archive(out, tmp_path / "whole")  # the same files: no hidden temporary among them
