"""`xrayforge prepare SRC OUT`: radiographs -> the packed multi-resolution archive.

SRC is a folder (walked recursively; PNG, JPEG, TIFF, DICOM with or without a suffix or the
PS3.10 preamble), a single file, or ``phantom:N`` for N images of the built-in chest phantom.
Images are made square by centre crop (default; ``square="pad"`` pads with black instead,
keeping the whole field), resized to the target resolution with a box (area) filter, and
box-filtered down to 4 px.

Labels: ``labels`` names a ChestX-ray14 ``Data_Entry_2017.csv`` (or NIH's newer
``Data_Entry_2017_v2020.csv``; either is found automatically in SRC or its parent); its
``train_val_list.txt`` / ``test_list.txt`` beside it give the split. Images are matched to rows
by file name, so an image with two different rows, an image in both lists, or two labelled
images of one name are refused; images the file does not list get all-zero labels, with a
warning (``labelled_only`` leaves them out).

The run is resumable and atomic: everything is written under ``OUT.partial`` (a plan, the
preallocated arrays, a progress log appended as each image finishes) and renamed to OUT when
complete; running the same command again after a crash continues where it stopped. A file
that cannot be used never stops the run: it goes to skipped.csv with the reason.
"""
from __future__ import annotations

import errno
import hashlib
import itertools
import json
import logging
import multiprocessing as mp
import os
import re
import shutil
import signal
import sys
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..utils.files import (check_out_dir, load_npy, read_csv, read_json, remove_stale_temporaries, write_csv,
                           write_json)
from .archive import FORMAT, MANIFEST_FIELDS, VERSION, box_pyramid, held_out_rows, pyramid_resolutions, quantize
from .labels import FINDINGS, format_finding_labels, parse_finding_labels
from .readers import SkipImage, find_images, one_per_file, read_radiograph, reader_kind


PHANTOM_MIN_RESOLUTION = 8  # phantom.render draws nothing smaller
TWELVE_BITS = 4095  # a 16-bit file whose values stay at or below this holds 12-bit data, said once per run
log = logging.getLogger(__name__)


class NoUsableImages(UserError, RuntimeError):
    """Raised when a prepare run found nothing it could use."""


@dataclass
class PrepareResult:
    path: Path
    included: int
    skipped: int
    label_match: dict | None = None  # how the files matched the label file (plan_candidates)


# --------------------------------------------------------------------------- candidates
LABEL_FILES = ("Data_Entry_2017.csv", "Data_Entry_2017_v2020.csv")  # NIH's first release, and its download now
SPLIT_FILES = (("train", "train_val_list.txt"), ("test", "test_list.txt"))


def _load_chestxray14(labels_csv: Path) -> tuple[dict, dict]:
    """{image file name: (patient id, finding labels)} and {file name: split}; an image with two
    rows that differ in what prepare uses (the findings, the patient), or in both split lists, is
    refused (the split comes from the lists, one per name)."""
    rows = read_csv(labels_csv, ("Image Index", "Finding Labels"), "a ChestX-ray14 label file", numbered=True)[0]
    entries, lines, used, first = {}, {}, {}, {}
    for line, row in rows:
        # without the spaces around a field that a hand-edited or re-exported file may have (the split lists'
        # names have none): a name with one matched no file, and a patient with one was another patient
        name = (row["Image Index"] or "").strip()
        patient, labels = (row.get("Patient ID", "") or "").strip(), row["Finding Labels"] or ""
        where = f"{labels_csv}: line {line}, image {name}"
        # an empty field is no label ChestX-ray14 writes: read as 'No Finding' it would drop a finding without a
        # word ('No Finding' beside a finding, which would invent one, the parser refuses)
        if not labels.replace("|", "").strip():
            raise UserError(f"{where}: empty Finding Labels (ChestX-ray14 writes 'No Finding' for an image without "
                            f"findings); fill it in or remove the row")
        try:
            vec = parse_finding_labels(labels)
        except ValueError as exc:
            raise UserError(f"{where}: {exc}") from None
        uses = {"Finding Labels": vec, "Patient ID": patient}  # all prepare takes from a row (Patient Age may differ)
        if name in lines:
            field = next((f for f in uses if uses[f] != used[name][f]), None)
            if field:
                raise UserError(f"{labels_csv}: image {name} has two rows with different {field} (line {lines[name]}: "
                                f"{first[name][field]!r}, line {line}: {row[field]!r}); keep the right one")
            continue
        lines[name], used[name], first[name] = line, uses, row
        entries[name] = (patient, labels)
    splits, lists = {}, [labels_csv.parent / list_name for _, list_name in SPLIT_FILES]
    for (split, _), p in zip(SPLIT_FILES, lists):
        if p.is_file():
            # utf-8-sig: a list saved by a Windows editor starts with a byte-order mark, which would
            # otherwise be part of its first name (an image of the test split matched to no split)
            for name in p.read_text(encoding="utf-8-sig").split():
                if splits.setdefault(name, split) != split:
                    raise UserError(f"{name}: listed in both {lists[0]} and {lists[1]}; an image belongs to one split")
    return entries, splits


def _label_files(labels_csv: str) -> dict:
    """{file: SHA-1 of its contents, or None where it is missing} of a label file and the split lists
    beside it: what the plan of an unfinished prepare took its labels and splits from."""
    files = [Path(labels_csv), *(Path(labels_csv).parent / name for _, name in SPLIT_FILES)]
    return {str(f): hashlib.sha1(f.read_bytes()).hexdigest() if f.is_file() else None for f in files}


def _find_labels(src: Path) -> Path | None:
    """The ChestX-ray14 label file in SRC or its parent (the newer release if both are there)."""
    folders = (src, (src.resolve() if src.name in ("", "..") else src).parent)  # the parent of '.' is not '.'
    for folder in folders:
        found = [folder / name for name in LABEL_FILES if (folder / name).is_file()]
        if len(found) > 1:
            log.warning(f"{folder}: holds both {found[0].name} and {found[1].name}; using {found[1].name} "
                        f"(give --labels to choose)")
        if found:
            return found[-1]
    lists = [folder / name for folder in folders for _, name in SPLIT_FILES if (folder / name).is_file()]
    if lists:
        log.warning(f"{lists[0]}: a ChestX-ray14 split list, but no {' or '.join(LABEL_FILES)} in {src} or its "
                    f"parent: the images get no labels and no split; give the label file with --labels")
    return None


def _nih_patient(name: str) -> str | None:
    """The patient a ChestX-ray14 file name carries (``00000003_001.png``: patient 3, follow-up 1)."""
    m = re.fullmatch(r"(\d{8})_\d{3}\.png", name)
    return str(int(m.group(1))) if m else None


def _patients_by_name(entries: dict) -> bool:
    """Whether the label file's rows name their patients as ChestX-ray14's file names do (every row
    with such a name has that Patient ID, and there is one): then an image the file does not list
    takes its patient from its name, and is held out with that patient's test images."""
    named = [(n, p) for n, (p, _) in entries.items() if _nih_patient(n) is not None]
    return bool(named) and all(_nih_patient(n) == p for n, p in named)


def _match_labels(files: list[Path], labels_csv: Path, labelled_only: bool) -> tuple[list[dict], dict, list[dict]]:
    """The candidates among ``files`` with what ``labels_csv`` says of each (matched by file name),
    a summary of the match, and a skipped.csv row for each file that links to another one."""
    entries, splits = _load_chestxray14(labels_csv)
    own = {labels_csv.name, *(name for _, name in SPLIT_FILES)}
    files, linked = one_per_file([f for f in files if f.name not in own], entries.keys() | splits.keys(),
                                  "skipped.csv")
    seen = {}
    for f in files:
        if f.name in entries or f.name in splits:
            other = seen.setdefault(f.name, f)
            if other is not f:
                raise UserError(f"{other} and {f}: two images named {f.name}, and {labels_csv} names images by file "
                                f"name alone, so which one its row is of cannot be told; remove or rename one")
    unlisted = [f for f in files if f.name not in entries]
    names = {f.name for f in files}
    summary = {"file": str(labels_csv), "matched": len(files) - len(unlisted), "unlisted": len(unlisted),
               "unlisted_left_out": labelled_only, "rows_without_image": sum(1 for n in entries if n not in names)}
    log.info(f"{labels_csv}: {summary['matched']} image files matched a row, {len(unlisted)} not in it, "
             f"{summary['rows_without_image']} rows without an image file")
    if unlisted:
        examples = ", ".join(str(f) for f in unlisted[:3]) + (", ..." if len(unlisted) > 3 else "")
        if labelled_only:
            log.info(f"{len(unlisted)} image files not in {labels_csv} are left out (labelled only): {examples}")
        else:
            log.warning(f"{len(unlisted)} of {len(files)} image files are not in {labels_csv} and get all-zero "
                        f"labels (as if 'No Finding'): {examples}; --labelled-only leaves them out")
    by_name = bool(unlisted) and not labelled_only and _patients_by_name(entries)
    named = sum(1 for f in unlisted if _nih_patient(f.name)) if by_name else 0
    summary["unlisted_patients_from_names"] = named
    if named:
        log.info(f"{named} of the {len(unlisted)} image files not in {labels_csv} take their patient from their "
                 f"ChestX-ray14 file name (as its rows do)")
    out = []
    for f in files:
        if labelled_only and f.name not in entries:
            continue
        patient, finding = entries.get(f.name, ((by_name and _nih_patient(f.name)) or "", None))
        out.append({"source": str(f), "patient_id": patient, "finding_labels": finding, "split": splits.get(f.name, "")})
    return out, summary, linked


def phantom_split(index: int) -> str:
    return "test" if index % 5 == 0 else "train"


def _images_among(files: list[Path]) -> tuple[list[Path], list[dict]]:
    """The files that are images by their suffix, or by their content where the suffix is an unknown
    one (only those are opened), and a skipped.csv row for each of the others: they are no
    candidates, so that they neither count as image files in the label match nor take a row."""
    images, others = [], []
    for f in files:
        try:
            reader_kind(f)
            images.append(f)
        except SkipImage as exc:
            others.append({"source": str(f), "reason": str(exc)})
    return images, others


def plan_candidates(src: str, labels: str | None = None,
                    labelled_only: bool = False) -> tuple[list[dict], dict | None, list[dict]]:
    """The files to read (or phantoms to draw), with what the label file says of each; a summary
    of how the files matched the label file (None without one); and the files found that are not
    images, or links to an image read already (``one_per_file``), as skipped.csv rows.
    ``labelled_only``: files the label file does not list are not candidates."""
    if src.startswith("phantom:"):
        try:
            n = int(src.split(":", 1)[1])
        except ValueError:
            raise ValueError(f"phantom source must be phantom:N with an integer N, got {src!r}") from None
        if n < 1:
            raise ValueError(f"phantom:N needs N >= 1, got {n}")
        return [{"source": f"phantom:{i}", "seed": i, "patient_id": f"phantom-{i:07d}", "split": phantom_split(i)}
                for i in range(n)], None, []
    root = Path(src)
    files, not_images = _images_among(find_images(root))
    labels_csv = Path(labels) if labels else (_find_labels(root) if root.is_dir() else None)
    if labels_csv is not None:
        candidates, label_match, linked = _match_labels(files, labels_csv, labelled_only)
        return candidates, label_match, not_images + linked
    if labelled_only:
        raise UserError(f"{src}: only labelled images were asked for, but there is no label file (give --labels)")
    files, linked = one_per_file(files, listed_in="skipped.csv")
    return ([{"source": str(f), "patient_id": "", "finding_labels": None, "split": ""} for f in files], None,
            not_images + linked)


# --------------------------------------------------------------------------- worker
_W: dict = {}


def _open_arrays(folder: Path, resolutions: list[int], dtype: str, count: int) -> dict:
    """{resolution: the preallocated array of an unfinished prepare}, open for writing."""
    arrays = {}
    for r in resolutions:
        path = folder / f"images_{r}.npy"
        try:
            arr = load_npy(path, f"the unfinished {r}-px images", mmap_mode="r+")
        except UserError as exc:
            raise UserError(f"{exc}; delete {folder} to start again") from None
        if arr.shape != (count, r, r) or arr.dtype != np.dtype(dtype):
            raise UserError(f"{path}: holds {arr.dtype} images of shape {arr.shape}, not the {dtype} {(count, r, r)} "
                            f"of its plan; delete {folder} to start again")
        arrays[r] = arr
    return arrays


def _init_worker(folder: str, resolutions: list[int], dtype: str, count: int):
    _W["arrays"] = _open_arrays(Path(folder), resolutions, dtype, count)
    _W["resolution"], _W["dtype"] = max(resolutions), np.dtype(dtype)


def square_image(x: np.ndarray, how: str) -> np.ndarray:
    h, w = x.shape
    if h == w:
        return x
    if how == "crop":
        s = min(h, w)
        top, left = (h - s) // 2, (w - s) // 2
        return x[top:top + s, left:left + s]
    s = max(h, w)
    out = np.zeros((s, s), dtype=x.dtype)
    top, left = (s - h) // 2, (s - w) // 2
    out[top:top + h, left:left + w] = x
    return out


def _area_average_rows(x: np.ndarray, size: int) -> np.ndarray:
    """``x`` (N, ...) float64 -> (size, ...), size < N: output row i is the mean of ``x`` over rows
    [i·N/size, (i+1)·N/size), a row cut by an edge weighted by the part of it inside (edges exact:
    row whole + part / size)."""
    n = x.shape[0]
    whole, part = np.divmod(np.arange(size + 1) * n, size)
    part = (part / size).reshape(-1, *[1] * (x.ndim - 1))
    sums = np.add.reduceat(x, whole[:-1], axis=0)  # rows whole[i] .. whole[i + 1] - 1 (increasing: size < n)
    cut = x[np.minimum(whole, n - 1)] * part  # the part of each edge's row before the edge (0 at the last)
    return (sums - cut[:-1] + cut[1:]) * (size / n)


def resize(x: np.ndarray, size: int) -> np.ndarray:
    """Area average down (each output pixel the mean of the source area it covers, fractions of
    pixels included: Pillow's BOX gives each source pixel wholly to one output pixel, which for a
    ratio that is not an integer averages 1-2 or 2-3 pixels by turns, a pattern in the noise and
    edges moved by up to half a source pixel), bilinear up; square float in, float64 out."""
    if x.shape[0] == size:
        return x.astype(np.float64)
    if x.shape[0] > size:
        return _area_average_rows(_area_average_rows(x.astype(np.float64), size).T, size).T
    from PIL import Image
    im = Image.fromarray(x.astype(np.float32), mode="F")
    return np.asarray(im.resize((size, size), Image.Resampling.BILINEAR), dtype=np.float64)


def _process(task: tuple[int, dict, str]) -> dict:
    i, cand, square = task
    res, dtype = _W["resolution"], _W["dtype"]
    meta = {"i": i}
    try:
        if "seed" in cand:
            from .phantom import label_vector, render
            img, have = render(res, cand["seed"])
            meta["finding_labels"] = format_finding_labels(label_vector(have))
        else:
            rad = read_radiograph(cand["source"])
            if min(rad.pixels.shape) < 4:
                raise SkipImage(f"image is only {rad.pixels.shape[1]}×{rad.pixels.shape[0]} pixels")
            sq = square_image(rad.pixels, square)
            if sq.shape[0] < res:  # enlarged: said at the end
                meta["enlarged_from"] = int(sq.shape[0])
            img = resize(sq, res)
            if rad.meta.get("max", TWELVE_BITS + 1) <= TWELVE_BITS:
                meta["twelve_bits"] = True
            if rad.meta.get("for_processing"):
                meta["for_processing"] = True
            if rad.meta.get("read_at_8_bits"):
                meta["read_at_8_bits"] = True
            meta["patient_id"] = cand.get("patient_id") or rad.patient_id
            meta["study_id"] = rad.study_id
    except SkipImage as exc:  # its reason is on one line, as skipped.csv and the console want it
        return {"i": i, "ok": False, "reason": str(exc)}
    except Exception as exc:  # a decoder bug or a file we did not foresee must not stop the run
        if "seed" in cand:
            raise
        skip = SkipImage(f"unexpected error while reading ({type(exc).__name__}: {exc})")
        return {"i": i, "ok": False, "reason": str(skip)}
    levels = box_pyramid(np.clip(img, 0.0, 1.0))
    for r, arr in _W["arrays"].items():
        q = quantize(levels[r], dtype)
        arr[i] = q
        if r == res:
            meta["sha1"] = hashlib.sha1(q.tobytes()).hexdigest()
    return {"ok": True, **meta}


def _die_with_parent(parent: int) -> None:
    """Have the kernel kill this worker when the process that started it ends, however it ends
    (kill -9 included), so that no worker goes on decoding for nobody. Linux only (elsewhere
    nothing is done). The signal comes when the thread that forked the worker ends: prepare's
    caller, which waits for the workers."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent was gone before prctl: no signal will come
        os._exit(1)


def _init_pool_worker(parent: int, slots, *args):
    _die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: one line, not a traceback each
    with slots.get_lock():  # claim a (pid, task) pair: where the parent sees what this worker is decoding
        k = list(slots[::2]).index(0) * 2
        slots[k], slots[k + 1] = os.getpid(), -1
    _W["doing"] = (slots.get_obj(), k + 1)  # no lock: a worker killed holding one would block the parent
    _init_worker(*args)


def _process_in_pool(task: tuple[int, dict, str]) -> dict:
    slots, k = _W["doing"]
    slots[k] = task[0]
    try:
        return _process(task)
    finally:
        slots[k] = -1


@dataclass
class _Death:
    """A decode worker that died by itself: its exit code (-N: killed by signal N) and the tasks it
    was decoding."""
    exitcode: int | None
    tasks: list[int]


def _how_it_died(code: int | None) -> str:
    if code == -signal.SIGKILL:
        return "was killed (SIGKILL: most likely by the system, for lack of memory)"
    if code is not None and code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"crashed ({name})"
    return f"stopped (exit status {code})"


def _death(processes: dict, slots) -> _Death:
    """The worker that died in a broken pool, told from the others by its exit code (the executor
    stops the others with SIGTERM), and what it was decoding; failing that, every task in flight."""
    doing = {slots[k]: slots[k + 1] for k in range(0, len(slots), 2) if slots[k] and slots[k + 1] >= 0}
    codes = {pid: p.exitcode for pid, p in processes.items()}
    dead = [pid for pid, code in codes.items() if code != -signal.SIGTERM] or list(doing)
    return _Death(next((codes.get(pid) for pid in dead), None), sorted(doing[pid] for pid in dead if pid in doing))


def _decode_in_pool(todo: list, workers: int, initargs: tuple, record) -> _Death | None:
    """``record`` the result of each task as it finishes, decoded by ``workers`` processes; a few
    tasks per worker are queued at a time, so that results are recorded as they come. Returns None
    once every task is recorded, or the death of a worker (the OOM killer, a decoder crash), which
    stops the others."""
    ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
    slots = ctx.Array("q", 2 * workers)  # per worker: its pid, and the task it is decoding (-1: none)
    tasks = iter(todo)
    pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_pool_worker,
                               initargs=(os.getpid(), slots, *initargs))
    try:
        pending = {pool.submit(_process_in_pool, t) for t in itertools.islice(tasks, 4 * workers)}
        while pending:
            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
            for fut in finished:  # record every success before a failure stops the run
                if fut.exception() is None:
                    record(fut.result())
                    pending.update(pool.submit(_process_in_pool, t) for t in itertools.islice(tasks, 1))
            for fut in finished:
                fut.result()
    except BrokenProcessPool:
        processes = dict(pool._processes or {})
        pool.shutdown(wait=True)  # the executor stops the other workers and reaps them all: every exit code is in
        return _death(processes, slots.get_obj())
    except BaseException:
        # Ctrl-C (which the workers ignore) or an error: stop the workers now, not after their tasks,
        # which may never end (a decoder stuck on a file). No public API does that in Python 3.11;
        # the tasks they were doing are not recorded, so the next run does them again.
        for p in list((pool._processes or {}).values()):
            p.kill()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return None


def _decode_suspects(suspects: list[int], candidates: list[dict], square: str, initargs: tuple, record) -> None:
    """The files in flight in a worker that died, each decoded alone in a process of its own: one
    that kills its process again is left out, with the reason, so that the run can finish."""
    for i in suspects:
        death = _decode_in_pool([(i, candidates[i], square)], 1, initargs, record)
        if death is not None:
            reason = f"the decode process {_how_it_died(death.exitcode)} on it twice, the second time decoding it alone"
            log.warning(f"{candidates[i]['source']}: left out: {reason}")
            record({"i": i, "ok": False, "reason": reason})


def _read_progress(path: Path) -> dict[int, dict]:
    done = {}
    if path.exists():
        with open(path) as fh:
            for line in fh:
                try:
                    rec = json.loads(line)
                    done[int(rec["i"])] = rec
                except (ValueError, KeyError, TypeError):
                    continue  # a line cut short by the crash: that image is simply redone
    return done


def _end_last_line(path: Path) -> None:
    """A line cut short by a crash is ended, so that the next record starts a line of its own (appended
    to the cut one, it was unreadable too: that image was done again at every later resume)."""
    if path.exists() and path.stat().st_size:
        with open(path, "rb+") as fh:
            fh.seek(-1, os.SEEK_END)
            if fh.read(1) != b"\n":
                fh.write(b"\n")


def _as_made(made: dict | None, settings: dict) -> dict | None:
    """A finished archive's recorded settings ``made`` to compare with ``settings``: one finished before
    the resize was recorded was made by the area resize too."""
    return {"resize": "area", **made} if isinstance(made, dict) and "resize" in settings else made


def prepare(src: str, out: str | os.PathLike, resolution: int = 1024, labels: str | None = None,
            workers: int | None = None, square: str = "crop", bits: int = 8, progress: bool = True,
            labelled_only: bool = False) -> PrepareResult:
    """Build (or finish building) the archive OUT from SRC; see the module docstring.
    ``labelled_only``: leave out the files that the label file does not list."""
    if square not in ("crop", "pad"):
        raise ValueError(f"square must be 'crop' or 'pad', got {square!r}")
    if bits not in (8, 16):
        raise ValueError(f"bits must be 8 or 16, got {bits}")
    if workers is not None and workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    resolutions = pyramid_resolutions(resolution)
    if str(src).startswith("phantom:") and resolution < PHANTOM_MIN_RESOLUTION:
        raise UserError(f"{src}: the phantom needs a resolution of at least {PHANTOM_MIN_RESOLUTION}, got {resolution}")
    out = Path(out)
    if out.name in ("", ".."):  # '.', '..', 'a/..': no name to put '.partial' after
        out = out.resolve()
    partial = out.with_name(out.name + ".partial")
    if partial.is_dir():  # a killed run's half-written plan / skipped / manifest / archive.json: else moved into OUT
        remove_stale_temporaries(partial)
    dtype = "uint8" if bits == 8 else "uint16"
    # "resize": images shrunk by exact area averages (before: Pillow's BOX; an unfinished prepare of an
    # older xrayforge is not continued with the other one, a finished one is as it was made)
    # (phantoms are drawn at the resolution: never resized)
    settings = {"src": str(src), "resolution": resolution, "square": square, "dtype": dtype, "labels": labels,
                **({"labelled_only": True} if labelled_only else {}),
                **({} if str(src).startswith("phantom:") else {"resize": "area"})}
    if (out / "archive.json").exists():
        if partial.is_dir() and not any(partial.iterdir()):
            partial.rmdir()  # what _finish leaves when killed before its last step
        done = read_json(out / "archive.json", "the metadata of a prepared archive")
        made = _as_made(done.get("settings"), settings)
        if made != settings or not isinstance(done.get("count"), int):
            raise FileExistsError(f"{out}: already a prepared archive" + (
                f", made with other settings {made}" if isinstance(made, dict) else "")
                + "; remove it or choose another OUT")
        # the same command again (a kill after the archive was finished, a script run twice): nothing to do
        log.warning("%s: already prepared from %s with these settings (%d images); nothing done (remove it to "
                    "prepare it again)", out, src, done["count"])
        skipped = read_csv(out / "skipped.csv", ("source", "reason"), "the list of skipped files")[0] \
            if (out / "skipped.csv").is_file() else []
        return PrepareResult(out, done["count"], len(skipped), done.get("label_match"))
    plan_path, progress_path, meta_path = partial / "plan.json", partial / "progress.jsonl", partial / "archive.json"
    suspects_path = partial / "suspects.json"
    # before the work, not after it; a finished archive that a killed run had begun to move into OUT is moved on
    check_out_dir(out, empty=not meta_path.exists())
    if out.is_dir() and not os.access(out, os.W_OK | os.X_OK):  # found now, not once the work is done
        raise UserError(f"{out}: cannot write in the output folder (read-only, or no permission)")
    plan = read_json(plan_path, "the plan of an unfinished prepare") if plan_path.exists() else None
    meta = read_json(meta_path, "the metadata of a finished prepare") if meta_path.exists() else None
    saved = plan["settings"] if plan is not None else meta.get("settings") if meta is not None else settings
    if meta is not None:  # finished (its plan may be left): as made
        saved = _as_made(saved, settings)
    if saved is None:  # finished by an older xrayforge, killed just before the rename; it kept fewer settings
        kept = {k: meta.get(k) for k in ("source", "resolution", "dtype", "square")}
        if kept != {"source": str(src), "resolution": resolution, "dtype": dtype, "square": square}:
            raise UserError(f"{partial}: a finished archive of {kept['source']} ({kept['resolution']} px, "
                            f"{kept['dtype']}, square by {kept['square']}) that an older xrayforge stopped just "
                            f"before renaming it; to use it, rename it to {out.name}; to prepare {src} with these "
                            f"settings, delete it")
        saved = settings
    if saved != settings:
        raise ValueError(f"{partial} holds an unfinished prepare with other settings {saved}; delete it to start again")
    if meta is not None:  # killed while finishing: every image is in place, only the clean-up and moves are left
        _finish(partial, out, meta["resolutions"])
        skipped = read_csv(out / "skipped.csv", ("source", "reason"), "the list of skipped files")[0]
        return PrepareResult(out, meta["count"], len(skipped), meta.get("label_match"))
    if plan is not None:
        candidates, label_match, not_images = plan["candidates"], plan.get("label_match"), plan.get("not_images", [])
        # the plan holds each image's labels and split as the files said then: an edited label file or split
        # list would otherwise be ignored without a word (a plan of an older xrayforge kept no record)
        now = _label_files(label_match["file"]) if plan.get("label_files") else {}
        changed = [f for f, digest in plan.get("label_files", {}).items() if digest != now.get(f)]
        if changed:
            raise UserError(f"{', '.join(changed)}: changed since the unfinished prepare in {partial} began, which "
                            f"took its labels and splits from them; delete {partial} to prepare with them as they "
                            f"are now, or restore them to finish it")
    else:
        candidates, label_match, not_images = plan_candidates(str(src), labels, labelled_only)
        if not candidates:
            others = (f"; {len(not_images)} other files are not images, e.g. {not_images[0]['source']} "
                      f"({not_images[0]['reason']})") if not_images else ""
            raise NoUsableImages(f"{src}: no image files found{others}")
        partial.mkdir(parents=True, exist_ok=True)
        for stale in (progress_path, suspects_path):  # a run whose plan is gone: they are not of these arrays
            stale.unlink(missing_ok=True)
        for r in resolutions:
            np.lib.format.open_memmap(partial / f"images_{r}.npy", mode="w+", dtype=dtype,
                                      shape=(len(candidates), r, r))
        write_json(plan_path, {"settings": settings, "candidates": candidates, "label_match": label_match,
                               "not_images": not_images,
                               **({"label_files": _label_files(label_match["file"])} if label_match else {})})
    done = _read_progress(progress_path)
    _end_last_line(progress_path)

    from tqdm import tqdm
    bar = tqdm(total=len(candidates), initial=len(done), unit="img", desc=f"prepare {out.name}",
               disable=not progress, dynamic_ncols=True)
    initargs = (str(partial), resolutions, dtype, len(candidates))
    _init_worker(*initargs)  # here first: damaged arrays are said as such, before any worker starts
    try:
        with open(progress_path, "a") as progress_log:
            def record(res):
                progress_log.write(json.dumps(res) + "\n")
                progress_log.flush()
                done[res["i"]] = res
                bar.update(1)

            if suspects_path.exists():  # a worker died on one of these last time: each is tried alone first
                suspects = read_json(suspects_path, "the files in flight when a decode worker died")["tasks"]
                _decode_suspects([i for i in suspects if i not in done], candidates, square, initargs, record)
                suspects_path.unlink()
            todo = [(i, c, square) for i, c in enumerate(candidates) if i not in done]
            workers = workers or min(len(todo), os.cpu_count() or 1) or 1
            if todo and workers > 1:
                death = _decode_in_pool(todo, workers, initargs, record)
                if death is not None:
                    write_json(suspects_path, {"exitcode": death.exitcode, "tasks": death.tasks})
                    raise UserError(_death_message(death, [candidates[i]["source"] for i in death.tasks], workers))
            else:
                for task in todo:
                    record(_process(task))
    finally:
        _W.clear()
    bar.close()

    twelve_bit = [cand["source"] for i, cand in enumerate(candidates) if done[i].get("twelve_bits")]
    if twelve_bit:
        log.warning(f"16-bit image files with no value above {TWELVE_BITS} (12-bit data?): {len(twelve_bit)}, e.g. "
                    f"{', '.join(twelve_bit[:3])}; scaled by 65535 they are dark" +
                    (", and at --bits 8 keep at most 16 grey levels: prepare them with --bits 16" if bits == 8 else ""))
    raw = [cand["source"] for i, cand in enumerate(candidates) if done[i].get("for_processing")]
    if raw:
        log.warning(f"{len(raw)} DICOM images are 'FOR PROCESSING' (Presentation Intent Type: the detector's "
                    f"raw data, which a vendor's processing turns into the image radiologists read), e.g. "
                    f"{', '.join(raw[:3])}: they are in the archive as stored, and look unlike 'FOR PRESENTATION' "
                    f"radiographs; leave them out of the source if the archive should hold only those")
    eight = [cand["source"] for i, cand in enumerate(candidates) if done[i].get("read_at_8_bits")]
    if eight:
        log.warning(f"{len(eight)} image files have 16 bits per sample (colour, or grey + alpha) but were read at "
                    f"8 bits (Pillow gave only each sample's high byte), e.g. {', '.join(eight[:3])}; to keep their "
                    f"precision, convert them to 16-bit greyscale PNG or TIFF first")
    enlarged = [(cand["source"], done[i]["enlarged_from"]) for i, cand in enumerate(candidates)
                if done[i].get("enlarged_from")]
    if enlarged:
        log.warning(f"{len(enlarged)} images are smaller than {resolution} px (after --square {square}) and were "
                    f"enlarged (bilinear), e.g. " + ", ".join(f"{s} ({n} px)" for s, n in enlarged[:3]) +
                    f": they hold no detail at {resolution} px; a smaller --resolution keeps the archive true to them")
    manifest, skipped = [], list(not_images)
    for i, cand in enumerate(candidates):
        rec = done[i]
        if not rec["ok"]:
            skipped.append({"source": cand["source"], "reason": rec["reason"]})
            continue
        finding = rec.get("finding_labels") or cand.get("finding_labels") or ""
        vec = parse_finding_labels(finding) if finding else [0] * len(FINDINGS)
        row = {"row": i, "source": cand["source"], "patient_id": rec.get("patient_id") or cand.get("patient_id", ""),
               "study_id": rec.get("study_id", ""), "split": cand.get("split", ""),
               "finding_labels": finding, "sha1": rec["sha1"]}
        row.update({f: v for f, v in zip(FINDINGS, vec)})
        manifest.append(row)
    write_csv(partial / "skipped.csv", ["source", "reason"], skipped)
    held = held_out_rows([r["split"] for r in manifest], [r["patient_id"] for r in manifest])
    straddle = sorted({r["patient_id"] for r, h in zip(manifest, held) if h and r["split"] not in ("test", "")})
    if straddle:  # the split lists are not patient-wise: Archive.held_out keeps such patients out of training
        log.warning(f"{len(straddle)} patients have images in the test split and outside it (e.g. "
                    f"{', '.join(straddle[:3])}): the split lists are not patient-wise; training holds out every "
                    f"image of a patient in the test split")
    no_split_held = sum(1 for r, h in zip(manifest, held) if h and r["split"] == "")
    if no_split_held:  # in no split list (ChestX-ray14's lists are patient-wise, but an image may be missing from them)
        log.info(f"{no_split_held} images in no split list are of patients in the test split: held out with them")
    if not manifest:
        example = skipped[len(not_images) if len(skipped) > len(not_images) else 0]  # an image file's, if any
        raise NoUsableImages(f"{src}: none of the {len(candidates) + len(not_images)} files could be used; "
                             f"reasons in {partial / 'skipped.csv'}, e.g. {example['source']}: {example['reason']}")
    write_csv(partial / "manifest.csv", MANIFEST_FIELDS, manifest)
    # archive.json marks the work as done; the plan and progress go only after it, so that a run
    # killed at any point below finishes the archive when run again and never plans anew over a
    # progress log of finished images
    write_json(meta_path, {
        "format": FORMAT, "version": VERSION, "resolution": resolution, "resolutions": resolutions, "dtype": dtype,
        "count": len(manifest), "capacity": len(candidates), "square": square, "findings": list(FINDINGS),
        "source": str(src), "labelled": any(r["finding_labels"] for r in manifest), "settings": settings,
        "label_match": label_match})
    _finish(partial, out, resolutions)
    return PrepareResult(out, len(manifest), len(skipped), label_match)


def _death_message(death: _Death, files: list[str], workers: int) -> str:
    """One line: how the worker died, what it was reading, and what running again does."""
    named = ", ".join(files[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else "")
    them = "that file" if len(files) == 1 else "those files"
    return (f"a decode worker {_how_it_died(death.exitcode)}" + (f" while reading {named}" if files else "") +
            (f"; try fewer --workers (now {workers})" if death.exitcode == -signal.SIGKILL else "") +
            "; run the same command again to resume where it stopped" +
            (f": {them} will be read alone first, and left out (skipped.csv) if the worker dies again"
             if files else ""))


def _finish(partial: Path, out: Path, resolutions: list[int]) -> None:
    """The last steps of a prepare whose archive.json is written; each may be repeated."""
    (partial / "progress.jsonl").unlink(missing_ok=True)
    (partial / "plan.json").unlink(missing_ok=True)
    if not out.exists():
        os.replace(partial, out)
        return
    # an empty folder made for the archive (hidden files such as .DS_Store aside), perhaps a shell's
    # current folder: it stays, and the archive moves into it, archive.json last so that OUT is an
    # archive only once whole; a run killed half-way moves the rest when run again
    ours = {f"images_{r}.npy" for r in resolutions} | {"manifest.csv", "skipped.csv"}
    if any(not p.name.startswith(".") and p.name not in ours for p in out.iterdir()):
        raise FileExistsError(f"{out}: exists and is not empty; the finished archive is in {partial}")
    moved = []
    for p in sorted(partial.iterdir(), key=lambda p: p.name == "archive.json"):
        try:
            _move(p, out / p.name)
        except OSError as exc:  # said of OUT and where the archive is, not of a hidden temporary
            where = (f"it is whole in {partial}" if not moved else
                     f"{', '.join(moved)} moved already, the rest is in {partial}")
            raise UserError(f"{out}: cannot move the finished archive into it ({exc.strerror or exc}); {where}: make "
                            f"room or fix the permissions, and run prepare again to move it") from None
        moved.append(p.name)
    partial.rmdir()


def _move(src: Path, dst: Path) -> None:
    """os.replace, or, when OUT is another file system than its parent (a mount point, where
    OUT.partial is not), a copy under a hidden name in OUT renamed into place, then the original
    removed: dst is whole or absent at any moment, and a run killed half-way copies again."""
    try:
        os.replace(src, dst)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        tmp = dst.with_name(f".{dst.name}.moving")
        try:
            shutil.copyfile(src, tmp)
            with open(tmp, "rb") as fh:  # on disk before the original goes (a power loss, not only a kill)
                os.fsync(fh.fileno())
            os.replace(tmp, dst)
        except OSError:  # a full disk: the part copied goes, not left taking the room
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass
            raise
        src.unlink()


def remove_partial(out: str | os.PathLike) -> None:
    shutil.rmtree(Path(str(out) + ".partial"), ignore_errors=True)
