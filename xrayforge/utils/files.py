"""Reading the project's files with errors that name the file and the problem, writing them
atomically, and claiming output folders so that a command never writes into something it did
not make.

Every reader here turns the many ways a file can be damaged (missing, empty, truncated by a
crash or a full disk, not the kind of file expected) into one :class:`~xrayforge.errors.UserError`
that names the file. Every writer goes through :func:`atomic_write`: a reader (or a resumed run)
sees a file whole or not at all. ``claim_output`` marks a folder as the output of one command
(``.xrayforge.json``); a later run of the same command may continue in it, anything else is refused.
"""
from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import os
import pickle
import re
import socket
import stat
import uuid
from pathlib import Path

from ..errors import UserError

MARKER = ".xrayforge.json"
log = logging.getLogger(__name__)


def file_digest(path: str | os.PathLike, algorithm: str = "sha256") -> str:
    """The hex digest of a file's contents (read in blocks: any size)."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_id(*paths: str | os.PathLike, length: int = 12) -> str:
    """SHA-1 of a file's contents; of several, of their SHA-1s in order (a missing one counts as
    absent): what a result was made from, so that a later run can tell the same files from other
    ones at the same paths."""
    def one(path) -> str:
        try:
            return file_digest(path, "sha1")
        except FileNotFoundError:
            return "absent"
    if len(paths) == 1:
        return one(paths[0])[:length]
    return hashlib.sha1(" ".join(one(p) for p in paths).encode()).hexdigest()[:length]


def atomic_write(path: str | os.PathLike, write, fsync: bool = False) -> Path:
    """``write(tmp)`` to a temporary file beside ``path``, then rename it into place: a reader
    sees the old file or the new one, never half of one. The temporary name is hidden, unique
    to this writer (two processes writing one file do not share it), and ends with ``path``'s
    own suffix (numpy, Pillow and matplotlib choose the format from it); an interrupted or failed
    write removes it, and one a kill left in a command's output folder is removed when the command
    continues there (``remove_stale_temporaries``). An OSError names ``path`` (a full disk's names
    no file, a read-only folder's the temporary). ``fsync``: on disk before the rename (a power
    loss, not only a kill). A ``path`` that is a symbolic link is written through (the file it
    points to is replaced, the link stays); a file replaced keeps its permission bits."""
    asked = path = Path(path)
    if path.is_symlink():
        path = Path(os.path.realpath(path))
    tmp = path.with_name(_temporary_name(path.name))
    try:
        write(tmp)
        try:
            mode = os.stat(path).st_mode
        except FileNotFoundError:
            pass
        else:  # a new file gets the umask's permissions; one replaced keeps its own (a 0600 key stays 0600)
            try:
                os.chmod(tmp, stat.S_IMODE(mode) & 0o777)  # not setuid / setgid / sticky
            except OSError:  # a file system without permission bits (some network and FAT mounts)
                pass
        if fsync:
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:  # Ctrl-C, a full disk, a writer's error: nothing left beside the file
        try:
            tmp.unlink(missing_ok=True)
        except OSError:  # a read-only file system refuses even that: the writer's own error is the one to see
            pass
        if isinstance(exc, OSError) and exc.errno is not None and exc.filename in (None, str(tmp), tmp):
            # said of the file asked for (a rename's error names the temporary and the target); type,
            # errno and traceback kept
            exc.filename, exc.filename2 = str(asked), None
        raise
    return path


def _temporary_name(name: str) -> str:
    """``atomic_write``'s temporary for a file named ``name``: .NAME.<host>-<pid>-<8 hex>.tmp[.suffix].
    A name too long to carry whole (file names have at most 255 bytes) is shortened to its start,
    ``~`` and 8 hex of its SHA-1, which ``temporary_of`` then returns."""
    suffix = Path(name).suffix
    if len(suffix.encode()) > 32:  # not a format's suffix
        suffix = ""
    tail = f".{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp{suffix}"
    room = _NAME_MAX - len(tail.encode()) - 1
    if len(name.encode()) > room:
        start = name.encode()[:room - 9].decode("utf-8", "ignore")  # whole characters only
        name = f"{start}~{hashlib.sha1(name.encode()).hexdigest()[:8]}"
    return f".{name}{tail}"


_NAME_MAX = 255  # bytes in a file name on Linux's and macOS's file systems
# the writer's host in its temporaries' names: a pid means something only on its own host (a run
# folder on a shared file system may have writers on several nodes)
_HOST = re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:32] or "host"
# atomic_write's temporary: .NAME.<host>-<pid>-<8 hex>.tmp[.suffix]
_TEMPORARY = re.compile(r"\.(?P<name>.+)\.(?P<host>[A-Za-z0-9]{1,32})-(?P<pid>[0-9]{1,10})-[0-9a-f]{8}\.tmp(\.[^.]*)?")


def temporary_of(name: str) -> str | None:
    """The file name an ``atomic_write`` temporary named ``name`` was writing (a name too long to
    carry whole: its shortened form, see ``_temporary_name``), or None."""
    m = _TEMPORARY.fullmatch(name)
    return m["name"] if m else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):  # another user's process: alive; no such pid here: not ours to judge
        return True
    return True


def remove_stale_temporaries(folder: str | os.PathLike, recursive: bool = True, of: str | None = None) -> int:
    """Remove, in ``folder`` (and below it, ``recursive``), the temporaries of ``atomic_write`` that a
    writer on this host left and whose process is gone (a kill, a power loss: hidden, and never
    written over, they would pile up); ``of``: only those of the file of that name. A live writer's
    stay, and so do other hosts' (their pids cannot be checked from here). Returns how many went."""
    removed = 0
    for dirpath, dirnames, filenames in os.walk(folder):
        if not recursive:
            dirnames[:] = []
        for name in filenames:
            m = _TEMPORARY.fullmatch(name)
            if m and m["host"] == _HOST and int(m["pid"]) != os.getpid() and not _alive(int(m["pid"])) \
                    and (of is None or m["name"] == of):
                try:
                    os.unlink(os.path.join(dirpath, name))
                    removed += 1
                except OSError:
                    pass
    return removed


def save_numpy(path: str | os.PathLike, array=None, **arrays) -> Path:
    """``np.save(array)`` or, with keywords, ``np.savez(**arrays)``, atomically, at ``path`` exactly
    (numpy adds no .npy / .npz to a name without it)."""
    import numpy as np
    if (array is None) == (not arrays):
        raise TypeError("save_numpy: give one array, or arrays by name (not both, not neither)")

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            if array is not None:
                np.save(fh, array)
            else:
                np.savez(fh, **arrays)
    return atomic_write(path, write)


def write_text_atomic(path: str | os.PathLike, text: str, fsync: bool = False) -> Path:
    return atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"), fsync)


def write_bytes_atomic(path: str | os.PathLike, data: bytes, fsync: bool = False) -> Path:
    return atomic_write(path, lambda p: p.write_bytes(data), fsync)


def json_safe(obj):
    """NaN and ±inf -> None, recursively, so that strict JSON readers (browsers, jq) accept the file
    (Python's json writes them as the bare NaN / Infinity that JSON has not)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def write_json(path: str | os.PathLike, obj) -> Path:
    """``obj`` as JSON (NaN and ±inf written as null), atomically."""
    return write_text_atomic(path, json.dumps(json_safe(obj), indent=2))


def write_csv(path: str | os.PathLike, fields: list[str], rows: list[dict]) -> Path:
    """A CSV file with a header of ``fields``, atomically."""
    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)
    return atomic_write(path, write)


def _need_file(path: Path, what: str) -> None:
    if not path.exists():
        raise UserError(f"{path}: {what} not found")
    if path.is_dir():
        raise UserError(f"{path}: is a folder; expected {what}")
    if path.stat().st_size == 0:
        raise UserError(f"{path}: empty file (0 bytes); expected {what}")


def _damaged(path: Path, what: str, exc: BaseException) -> UserError:
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    reason = reason.split(". This is an internal")[0][:160]  # torch's zip reader adds a paragraph of advice
    return UserError(f"{path}: cannot read {what}: the file is truncated or damaged ({reason})")


def read_json(path: str | os.PathLike, what: str = "a JSON file", expect: type | None = dict):
    """The parsed JSON of ``path`` (by default it must be an object: a dict)."""
    path = Path(path)
    _need_file(path, what)
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not valid JSON ({exc}); the file is damaged or truncated") from None
    if expect is not None and not isinstance(obj, expect):
        raise UserError(f"{path}: holds a JSON {type(obj).__name__}, not {what}")
    return obj


def read_jsonl(path: str | os.PathLike) -> tuple[list[dict], int]:
    """(records, torn) of a JSON-lines log: a last line cut short by a crash is left out and
    counted in ``torn``; a damaged line before the last is an error."""
    path = Path(path)
    lines = [(i, line) for i, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1)
             if line.strip()]
    records, torn = [], 0
    for k, (i, line) in enumerate(lines):
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict):
                raise ValueError("not an object")
            records.append(rec)
        except ValueError as exc:
            if k == len(lines) - 1:
                torn = 1
            else:
                raise UserError(f"{path}, line {i}: not a JSON record ({exc}); the log is damaged") from None
    return records, torn


def _load(path, what: str, load):
    path = Path(path)
    _need_file(path, what)
    try:
        return load(path)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - zip, pickle, header, size and EOF errors all mean a damaged file
        raise _damaged(path, what, exc) from None


def load_torch(path: str | os.PathLike, what: str = "a torch file", map_location="cpu", advice: str = ""):
    """``torch.load(path, weights_only=True)`` with an error that names the file. A TorchScript archive
    (``torch.jit.save``; clean-fid's ``inception-2015-12-05.pt``) or a whole pickled model
    (``torch.save(model)``) is said to be one, not a truncated or damaged file; ``advice`` (what to give
    instead) follows that error."""
    import zipfile

    import torch

    def load(p: Path):
        with open(p, "rb") as fh:
            head = fh.read(8)
        # torch.save writes a zip archive (older versions a pickle): anything else is another kind of
        # file given in its place, not a damaged one
        if head and not head.startswith(b"PK") and head[:1] != b"\x80":
            kind = "text" if all(32 <= b < 127 or b in (9, 10, 13) for b in head) else "binary data"
            raise UserError(f"{p}: not {what}: it is not a PyTorch file (it begins with {kind} {head[:8]!r})")
        tail = f": {advice}" if advice else ""
        try:
            with zipfile.ZipFile(p) as z:
                scripted = any(n == "constants.pkl" or n.endswith("/constants.pkl") for n in z.namelist())
        except (zipfile.BadZipFile, OSError, ValueError):
            scripted = False  # an old pickle, or a damaged zip: torch.load says which
        if scripted:
            raise UserError(f"{p}: not {what}: it is a TorchScript archive (a whole scripted network), not a "
                            f"state dict{tail}")
        try:
            return torch.load(p, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as exc:
            if "Weights only load failed" not in str(exc):
                raise
        raise UserError(f"{p}: not {what}: it holds Python objects besides tensors (a whole model saved with "
                        f"torch.save(model)?), which xrayforge does not unpickle{tail}")
    return _load(path, what, load)


def state_problem(expected: dict, state) -> str | None:
    """What keeps ``state`` from loading into a network whose state dict is ``expected``, or None: the
    missing and unexpected keys and the wrong shapes, each counted with an example (torch's own error
    begins "Error(s) in loading state_dict for ...", which says none of that on its first line)."""
    import torch
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        keys = ", ".join(map(str, list(state)[:4])) if isinstance(state, dict) else type(state).__name__
        return f"not a state dict of tensors: it holds {keys}"
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} {tuple(state[k].shape)}, expected {tuple(v.shape)}" for k, v in expected.items()
              if k in state and state[k].shape != v.shape]
    said = [f"{len(keys)} {what}, e.g. {keys[0]}" for keys, what in
            ((missing, "missing keys"), (unexpected, "unexpected keys"), (shapes, "wrong shapes")) if keys]
    return "; ".join(said) or None


def load_state(module, state, what: str, hint: str = "") -> None:
    """``module.load_state_dict(state)`` (strict), or a UserError: ``what`` (the file and what it should
    hold), then in brackets what does not fit (``state_problem``), then ``hint``."""
    problem = state_problem(module.state_dict(), state)
    if problem is None:
        try:
            module.load_state_dict(state)
            return
        except RuntimeError as exc:
            problem = str(exc).strip().splitlines()[0]
    raise UserError(f"{what} ({problem}){hint}")


def load_npy(path: str | os.PathLike, what: str = "a .npy array", mmap_mode: str | None = None):
    import numpy as np
    return _load(path, what, lambda p: np.load(p, mmap_mode=mmap_mode, allow_pickle=False))


def load_npz(path: str | os.PathLike, keys, what: str = "a .npz file") -> dict:
    """{key: array} for ``keys`` from the .npz ``path`` (every key must be there)."""
    import numpy as np
    path = Path(path)
    _need_file(path, what)
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = [k for k in keys if k not in f.files]
            if missing:
                raise UserError(f"{path}: not {what}: no {', '.join(missing)} in it (it has {', '.join(f.files) or 'nothing'})")
            return {k: f[k] for k in f.files}
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise _damaged(path, what, exc) from None


def read_csv(path: str | os.PathLike, required=(), what: str = "a CSV file",
             numbered: bool = False) -> tuple[list, list[str]]:
    """(rows, columns) of a CSV file (UTF-8, with or without the byte-order mark spreadsheet
    programs write); every column in ``required`` must be there. ``numbered``: each row as
    (the line of the file it starts on, row): blank lines are left out and a quoted field may
    span lines, so a row's position does not tell its line."""
    path = Path(path)
    _need_file(path, what)
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh)  # csv.DictReader's rows, built here: it skips blank lines unseen, which hid lines
            header = next(reader, None) or []
            columns = [c.strip() for c in header]
            missing = [c for c in required if c not in columns]
            if missing:
                raise UserError(f"{path}: missing column{'s' if len(missing) > 1 else ''} {', '.join(missing)} "
                                f"(it has {', '.join(columns) or 'no header'}); expected {what}")
            rows, start = [], reader.line_num + 1
            for fields in reader:
                line, start = start, reader.line_num + 1
                row = dict(zip(columns, fields))
                if len(fields) > len(columns):  # fields past the header's, as DictReader's restkey
                    row[""] = fields[len(columns):]
                for c in columns[len(fields):]:  # a short row's missing fields, as DictReader's restval
                    row[c] = None
                # a line of spaces or bare commas (an editor's trailing line) holds no row; fields past the
                # header's come as a list, as on a line of more commas than it has
                if all(v is None or not (v.strip() if isinstance(v, str) else "".join(v).strip())
                       for v in row.values()):
                    continue
                # a row cut short (by an edit, or a write killed mid-line) lacks a column the reader needs:
                # None, which would read as empty (an image's findings as "No Finding"); a short row is
                # otherwise allowed (ChestX-ray14's header ends with a comma its rows do not have)
                short = [c for c in required if row.get(c) is None]
                if short:
                    raise UserError(f"{path}: line {line} is cut short: it has no {', '.join(short)} "
                                    f"(only {sum(v is not None for v in row.values())} of the header's "
                                    f"{len(columns)} fields); expected {what}")
                rows.append((line, row) if numbered else row)
    except (UnicodeDecodeError, csv.Error) as exc:
        raise UserError(f"{path}: not a readable CSV file ({exc})") from None
    return rows, columns


def check_new_file(path: str | os.PathLike, what: str = "the output file") -> Path:
    """``path`` can be written as a file: its folder exists and it is not itself a folder."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: is a folder; {what} must be a file path")
    if not path.parent.is_dir():
        if path.parent.exists():
            raise UserError(f"{path.parent}: is a file, not a folder (for {what} {path})")
        raise UserError(f"{path.parent}: no such folder (for {what} {path})")
    return path


def check_out_dir(out: str | os.PathLike, empty: bool = False) -> Path:
    """``out`` can be an output folder: not a file, and (``empty``) nothing in it but hidden files."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: is a file, not a folder; give a folder for the output")
    for parent in out.absolute().parents:  # a file on the way: mkdir failed later, after the work
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"{parent}: is a file, not a folder (on the way to the output folder {out})")
            break
    if empty and out.is_dir():
        entries = _visible(out)
        if entries:
            raise UserError(f"{out}: exists and is not empty (it holds {_listing(entries)}); choose a new folder")
    return out


def _visible(folder: Path) -> list[str]:
    """What a folder holds, less hidden files (.DS_Store, a marker, a marker left half written)."""
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))


def _listing(entries: list[str]) -> str:
    return ", ".join(entries[:4]) + (f" and {len(entries) - 4} more" if len(entries) > 4 else "")


def same_settings(path: str | os.PathLike, settings: dict, ignore=(), added: dict | None = None) -> None:
    """An output that holds ``path`` (its saved settings) may only be continued with the same
    settings (keys in ``ignore`` aside). ``added``: settings introduced after outputs were first
    written, with the value that an output saved without them was made with."""
    path = Path(path)
    if path.exists():
        saved = {**(added or {}), **read_json(path, "saved settings")}
        keys = sorted((set(saved) | set(settings)) - set(ignore))
        differ = [k for k in keys if saved.get(k) != settings.get(k)]
        if differ:
            what = "; ".join(f"{k}: saved {saved.get(k)!r}, now {settings.get(k)!r}" for k in differ[:5])
            raise UserError(f"{path.parent} holds an output made with other settings ({path}: {what}); "
                            "choose a new --out, or run with the saved settings to continue it")


def claim_output(out: str | os.PathLike, command: str, signatures=()) -> Path:
    """Create or reuse ``out`` as the output folder of ``xrayforge <command>``.

    An empty or new folder is created and marked. A folder marked by the same command (or
    holding one of ``signatures``, files the command wrote before markers existed) is reused,
    so an interrupted run continues. Anything else — a file, another command's output, a
    folder of the user's own files — is refused with what is there, and nothing is written.
    Under torchrun, process 0 decides and every process raises the same error.
    """
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        outcome = [None]
        if dist.get_rank() == 0:
            try:
                _claim(Path(out), command, signatures)
            except UserError as exc:
                outcome = [str(exc)]
        dist.broadcast_object_list(outcome, 0)
        if outcome[0] is not None:
            raise UserError(outcome[0])
        return Path(out)
    return _claim(Path(out), command, signatures)


def _claim(out: Path, command: str, signatures) -> Path:
    check_out_dir(out)
    marker = out / MARKER
    if out.is_dir():
        entries = _visible(out)
        if marker.is_file():
            owner = read_json(marker, "an xrayforge output marker").get("command")
            if owner == command:  # a run continued: what a killed one's writers left goes
                removed = remove_stale_temporaries(out)
                if removed:
                    log.info("%s: removed %d temporary file(s) an interrupted run left", out, removed)
                return out
            if entries:
                raise UserError(f"{out}: holds the output of `xrayforge {owner}`, not of `xrayforge {command}`; "
                                f"choose a new --out")
            # only the marker: a `xrayforge {owner}` that stopped (a late error) before writing anything;
            # it holds no output of that command, so it is an empty folder to claim
            log.info("%s: claimed by `xrayforge %s`, which wrote nothing there; now `xrayforge %s`'s", out, owner,
                     command)
        if entries and not any((out / s).exists() for s in signatures):
            raise UserError(f"{out}: is not empty and was not made by `xrayforge {command}` (it holds "
                            f"{_listing(entries)}); nothing was written: choose an empty or new --out")
    else:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise UserError(f"{out}: cannot create the folder (a part of the path is a file)") from None
        except OSError as exc:  # a read-only file system, no permission
            raise UserError(f"{out}: cannot create the output folder ({exc.strerror or exc}"
                            f"{f': {exc.filename}' if exc.filename else ''})") from None
    # a run killed while writing the marker left its temporary (and no marker, so nothing else of it was cleared)
    remove_stale_temporaries(out, recursive=False, of=MARKER)
    try:
        write_text_atomic(marker, json.dumps({"command": command}) + "\n")
    except OSError as exc:  # said of the folder, not of the hidden marker inside it
        raise UserError(f"{out}: cannot write in the output folder ({exc.strerror or exc})") from None
    return out
