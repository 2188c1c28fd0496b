"""Network checkpoints: tensors in a torch file loadable with ``weights_only=True``, the
architecture and progressive state in JSON beside it. Nothing pickled is code.

Layout of a checkpoint folder (or the two files named by ``path`` + suffix):
``networks.pt``   {"G": state_dict, "D": state_dict, "G_ema": state_dict, ...}
``networks.json`` {"format": "xrayforge-networks", "version": 1,
                   "networks": {"G": {"class": "Generator", "config": {...}, "level": 8, "alpha": 1.0}, ...}}
Writes are atomic: each file goes to a temporary name and is renamed into place.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .networks import Discriminator, Generator, NetworkConfig

FORMAT = "xrayforge-networks"
VERSION = 1
CLASSES = {"Generator": Generator, "Discriminator": Discriminator}


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def save_networks(folder: str | os.PathLike, networks: dict, extra: dict | None = None) -> Path:
    """Save {"G": Generator, "D": Discriminator, ...} to ``folder/networks.{pt,json}``."""
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
    _atomic_write(folder / "networks.pt", lambda p: torch.save(tensors, p))
    _atomic_write(folder / "networks.json", lambda p: p.write_text(json.dumps(meta, indent=2)))
    return folder


def find_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint folder (holding networks.json) from itself or from a training run folder
    (its checkpoints/latest, else its newest complete checkpoint)."""
    p = Path(path)
    if (p / "networks.json").is_file():
        return p
    ck = p / "checkpoints"
    pointer = ck / "latest"
    if pointer.is_file() and (ck / pointer.read_text().strip() / "networks.json").is_file():
        return ck / pointer.read_text().strip()
    found = sorted(q for q in ck.glob("ckpt-*") if (q / "networks.json").is_file()) if ck.is_dir() else []
    if not found:
        raise FileNotFoundError(f"{path}: not a checkpoint, nor a run folder with checkpoints")
    return found[-1]


def read_metadata(folder: str | os.PathLike) -> dict:
    path = Path(folder) / "networks.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no networks.json here; is {folder} an xrayforge checkpoint folder?")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: format is {meta.get('format')!r}, expected {FORMAT!r}")
    if meta.get("version", 0) > VERSION:
        raise ValueError(f"{path}: version {meta['version']} is newer than this xrayforge understands ({VERSION})")
    return meta


def load_networks(folder: str | os.PathLike, names=None, map_location="cpu") -> dict:
    """Load the networks saved by :func:`save_networks` (all, or those in ``names``)."""
    folder = Path(folder)
    meta = read_metadata(folder)
    weights_path = folder / "networks.pt"
    if not weights_path.is_file():
        raise FileNotFoundError(f"{weights_path}: missing (networks.json is there, the weights are not)")
    tensors = torch.load(weights_path, map_location=map_location, weights_only=True)
    out = {}
    for name, info in meta["networks"].items():
        if names is not None and name not in names:
            continue
        if name not in tensors:
            raise KeyError(f"{weights_path}: no weights for {name!r}")
        net = CLASSES[info["class"]](NetworkConfig(**info["config"]))
        net.load_state_dict(tensors[name])
        if isinstance(map_location, (str, torch.device)):
            net = net.to(map_location)  # load_state_dict copied into the CPU parameters: move them
        net.set_level(info["level"], info["alpha"])
        out[name] = net
    if names is not None and set(names) - set(out):
        raise KeyError(f"{folder}: no network named {sorted(set(names) - set(out))}; it has {sorted(meta['networks'])}")
    return out
