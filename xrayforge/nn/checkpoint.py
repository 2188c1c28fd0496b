"""Network checkpoints: tensors in a torch file loadable with ``weights_only=True``, the
architecture and progressive state in JSON beside it. Nothing pickled is code.

Layout of a checkpoint folder (or the two files named by ``path`` + suffix):
``networks.pt``   {"G": state_dict, "D": state_dict, "G_ema": state_dict, ...}
``networks.json`` {"format": "xrayforge-networks", "version": 1,
                   "networks": {"G": {"class": "Generator", "config": {...}, "level": 8, "alpha": 1.0}, ...}}
``networks.json`` also records the SHA-256 of ``networks.pt`` (and of any other file of the folder named
when it is saved: a training checkpoint's ``state.pt``), which :func:`damage` checks: a file changed
after it was written (a flipped bit on disk, a copy cut short and padded) is told from an intact one,
where torch's zip reader checks no CRC and would load it. Checkpoints written before this have no
digests, and are checked as before.
``level`` and ``alpha`` are the progressive state the networks were saved at (a training checkpoint:
the level and fade-in α of its last step); :func:`load_networks` restores them, so that a generator
saved during growth makes images at the resolution it had reached (with a warning).
Writes are atomic: each file goes to a temporary name and is renamed into place.
"""
from __future__ import annotations

import json
import logging
import os
import zipfile
from pathlib import Path

import torch

from ..errors import UserError
from ..utils.files import atomic_write, file_digest, load_state, load_torch, read_json, write_text_atomic
from .networks import Discriminator, Generator, NetworkConfig

FORMAT = "xrayforge-networks"
VERSION = 1
CLASSES = {"Generator": Generator, "Discriminator": Discriminator}


def save_networks(folder: str | os.PathLike, networks: dict, extra: dict | None = None, files=()) -> Path:
    """Save {"G": Generator, "D": Discriminator, ...} to ``folder/networks.{pt,json}``; ``files``:
    the names of other files already written in ``folder`` whose digests networks.json records too."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"format": FORMAT, "version": VERSION, "networks": {}, "extra": extra or {}}
    tensors = {}
    for name, net in networks.items():
        cls = type(net).__name__
        if cls not in CLASSES:
            raise TypeError(f"save_networks: {name} is a {cls}; expected one of {sorted(CLASSES)}")
        tensors[name] = {k: v.detach().cpu() for k, v in net.state_dict().items()}
        meta["networks"][name] = {"class": cls, "config": net.config.as_dict(), "level": net.level,
                                  "alpha": float(net.alpha)}
    atomic_write(folder / "networks.pt", lambda p: torch.save(tensors, p), fsync=True)
    # read back from what was written: at 1024 px about 2 GB/s, a fraction of a second a checkpoint
    meta["sha256"] = {name: file_digest(folder / name) for name in ("networks.pt", *files)}
    write_text_atomic(folder / "networks.json", json.dumps(meta, indent=2), fsync=True)
    return folder


log = logging.getLogger(__name__)


def damage(folder: Path, files=("networks.pt",)) -> str | None:
    """Why the checkpoint ``folder`` cannot be used (a missing, unreadable, truncated or changed
    file), or None. The JSON is parsed, each torch file's zip directory (written last) is checked,
    and its contents against the SHA-256 networks.json recorded (where it did)."""
    try:
        meta = read_metadata(folder)
    except (UserError, FileNotFoundError) as exc:
        return str(exc)
    for name in files:
        f = folder / name
        if not f.is_file():
            return f"{f}: missing"
        if not zipfile.is_zipfile(f):
            return f"{f}: truncated or damaged ({f.stat().st_size} bytes, no complete zip directory)"
        why = _changed(folder, name, meta)
        if why is not None:
            return why
    return None


def _changed(folder: Path, name: str, meta: dict) -> str | None:
    """Why the file ``name`` of a checkpoint is not what networks.json (``meta``) recorded it to be
    (another SHA-256, or unreadable), or None (the same, or no digest recorded: an older checkpoint)."""
    digests = meta.get("sha256")
    if not isinstance(digests, dict) or name not in digests:
        return None
    f = folder / name
    try:
        digest = file_digest(f)
    except OSError as exc:
        return f"{f}: cannot be read ({exc.strerror or exc})"
    if digest != digests[name]:
        return (f"{f}: damaged: its contents changed after it was written (SHA-256 {digest[:12]}…, "
                f"networks.json recorded {str(digests[name])[:12]}…)")
    return None


def checkpoint_dirs(ckpt_dir: str | os.PathLike) -> list[Path]:
    """A run's checkpoints (``ckpt-<images>``), newest (most images) first; half-written ones
    (``.tmp``) left out."""
    ck = Path(ckpt_dir)
    found = [q for q in ck.glob("ckpt-*") if q.is_dir() and not q.name.endswith(".tmp")] if ck.is_dir() else []
    return sorted(found, key=lambda q: (int(q.name[5:]) if q.name[5:].isdigit() else -1, q.name), reverse=True)


def is_best_record(record) -> bool:
    """Whether ``record`` (checkpoints/best.json's) has the fields of a best checkpoint's record with
    usable types."""
    return isinstance(record, dict) and isinstance(record.get("checkpoint"), str) \
        and isinstance(record.get("images"), int) and isinstance(record.get("score"), (int, float))


def names_a_checkpoint(ckpt_dir: str | os.PathLike, name) -> bool:
    """Whether ``name`` (a best checkpoint's record's) is one of the checkpoints in ``ckpt_dir``: a
    ``ckpt-<images>`` folder there, not one damaged and renamed, removed, or a path elsewhere."""
    return isinstance(name, str) and any(q.name == name for q in checkpoint_dirs(ckpt_dir))


def cut_short_dirs(ckpt_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(images, folder) of a run's checkpoints whose writing was cut short (``ckpt-<images>.tmp``:
    a kill while it was written), fewest images first."""
    ck = Path(ckpt_dir)
    found = [(int(q.name[5:-4]), q) for q in ck.glob("ckpt-*.tmp") if q.name[5:-4].isdigit()] if ck.is_dir() else []
    return sorted(found)


def latest_intact(ckpt_dir: str | os.PathLike, files=("networks.pt",)) -> Path | None:
    """The newest usable checkpoint in a run's ``checkpoints`` folder (the most images: ``ckpt-<images>``),
    or None. Skipping a damaged one is said at WARNING. The ``latest`` pointer is not consulted: a kill
    between a checkpoint's rename and the pointer's update leaves it naming an older one."""
    ck = Path(ckpt_dir)
    skipped = []
    for q in checkpoint_dirs(ck):
        why = damage(q, files)
        if why is None:
            if skipped:
                log.warning("%s: %s; using the older intact checkpoint %s", skipped[0][0], skipped[0][1], q.name)
            return q
        skipped.append((q, why))
    if skipped:
        raise UserError(f"{ck}: no usable checkpoint; the newest one is damaged: {skipped[0][1]}")
    return None


def find_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint folder (holding networks.json) from itself or from a training run folder
    (its newest intact checkpoint by image count; a damaged newer one is said at WARNING)."""
    p = Path(path)
    if (p / "networks.json").is_file():
        return p
    if p.is_file() and p.name in ("networks.pt", "networks.json") and (p.parent / "networks.json").is_file():
        return p.parent  # a file of a checkpoint: its folder
    if not p.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint or run folder")
    found = latest_intact(p / "checkpoints")
    if found is None:
        cut_short = cut_short_dirs(p / "checkpoints")
        if cut_short:
            raise FileNotFoundError(f"{path}: a run folder without a usable checkpoint: its only one, "
                                    f"{cut_short[-1][1].name}, was cut short while it was written")
        raise FileNotFoundError(f"{path}: not a checkpoint, nor a run folder with checkpoints")
    return found


def read_metadata(folder: str | os.PathLike) -> dict:
    path = Path(folder) / "networks.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no networks.json here; is {folder} an xrayforge checkpoint folder?")
    meta = read_json(path, "checkpoint metadata (networks.json)")
    if meta.get("format") != FORMAT:
        raise UserError(f"{path}: format is {meta.get('format')!r}, expected {FORMAT!r}")
    version = meta.get("version", 0)
    if not isinstance(version, int):
        raise UserError(f"{path}: damaged: its version is {version!r}, not a number")
    if not isinstance(meta.get("networks"), dict):
        raise UserError(f"{path}: damaged: it names no networks (no \"networks\" table)")
    if version > VERSION:
        raise ValueError(f"{path}: version {meta['version']} is newer than this xrayforge understands ({VERSION})")
    return meta


def nonfinite_weights(net: torch.nn.Module) -> str | None:
    """The name of ``net``'s first parameter or buffer holding a NaN or an infinity (a diverged
    training's), or None. One host sync for the whole network."""
    tensors = [(n, t) for n, t in (*net.named_parameters(), *net.named_buffers()) if t.is_floating_point()]
    if not tensors:
        return None
    finite = torch.stack([t.detach().isfinite().all() for _, t in tensors]).cpu()
    bad = (~finite).nonzero()
    return tensors[int(bad[0])][0] if len(bad) else None


def load_networks(folder: str | os.PathLike, names=None, map_location="cpu", warn_unfinished: bool = True) -> dict:
    """Load the networks saved by :func:`save_networks` (all, or those in ``names``), each at the level and
    fade-in α it was saved at. A generator below its final resolution (a checkpoint written while the run
    was still growing) is said at WARNING unless ``warn_unfinished`` is False (resuming its training)."""
    folder = Path(folder)
    if isinstance(names, str):  # one name: not its letters ("G" is in "G_ema")
        names = [names]
    meta = read_metadata(folder)
    weights_path = folder / "networks.pt"
    if not weights_path.is_file():
        raise FileNotFoundError(f"{weights_path}: missing (networks.json is there, the weights are not)")
    why = _changed(folder, "networks.pt", meta)
    if why is not None:
        raise UserError(why)
    tensors = load_torch(weights_path, "network weights", map_location=map_location)
    out = {}
    for name, info in meta["networks"].items():
        if names is not None and name not in names:
            continue
        if name not in tensors:
            raise UserError(f"{weights_path}: no weights for {name!r}")
        try:  # a networks.json of another xrayforge (a setting this one does not have), or edited
            net = CLASSES[info["class"]](NetworkConfig(**info["config"]))
            net.set_level(info["level"], info["alpha"])
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(f"{folder / 'networks.json'}: cannot build {name} from it ({type(exc).__name__}: {exc}); "
                            f"was it written by another version of xrayforge?") from exc
        load_state(net, tensors[name], f"{weights_path}: the weights of {name} do not fit the network in "
                                       f"networks.json")
        bad = nonfinite_weights(net)
        if bad is not None:  # its images would be NaN, written as black files, or LCO targets never met
            raise UserError(f"{weights_path}: the weights of {name} are not finite (NaN or inf in {bad}): the "
                            f"training had diverged when this checkpoint was written; use an earlier one")
        if isinstance(map_location, (str, torch.device)):
            net = net.to(map_location)  # load_state_dict copied into the CPU parameters: move them
        net.set_level(info["level"], info["alpha"])
        alpha = float(info["alpha"])
        if warn_unfinished and isinstance(net, Generator):
            if net.level < net.config.num_levels - 1:
                log.warning("%s: %s was saved before training reached its final resolution: it is at %d px of %d px%s, "
                            "and its images are %d px", folder, name, net.current_resolution, net.config.resolution,
                            f" (fading in, α {alpha:.2f})" if alpha < 1 else "", net.current_resolution)
            elif alpha < 1:
                log.warning("%s: %s was saved while its final resolution, %d px, was still fading in (α %.2f): its "
                            "images are partly upsampled from %d px", folder, name, net.current_resolution, alpha,
                            net.current_resolution // 2)
        out[name] = net
    if names is not None and set(names) - set(out):
        raise UserError(f"{folder}: no network named {sorted(set(names) - set(out))}; it has {sorted(meta['networks'])}")
    return out
