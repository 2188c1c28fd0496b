"""`xrayforge train ARCHIVE --out RUN`: progressive WGAN-GP training that never loses work.

One process per GPU (torchrun for several; gradients all-reduced after every backward, data
sharded by rank, rank 0 alone writes). Per tick: a JSONL log line, a sample grid from the
EMA generator on fixed latents, the loss curve, and (every few ticks, at the end, and on
SIGINT / SIGTERM) an atomic checkpoint. ``resume=True`` continues the same run exactly:
level, alpha, images seen, optimiser and EMA state, and the random number generators.

The GAN trains on the archive's rows outside its "test" split (the evaluations test on them;
``include_test`` trains on every row). A checkpoint's networks carry the level and fade-in α of
the last step taken, so that a checkpoint written during growth generates at the resolution it
had reached. While it trains, a process holds RUN/.lock (flock): a second training of the same
folder is refused.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import math
import os
import shutil
import signal
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from ..data.archive import Archive
from ..data.loader import BatchStream, Prefetcher, to_unit_range
from ..errors import UserError
from ..nn import Discriminator, Generator, NetworkConfig, load_networks, save_networks
from ..nn.networks import largest_group_size
from ..nn.checkpoint import (checkpoint_dirs, cut_short_dirs, damage, is_best_record, latest_intact,
                              names_a_checkpoint, nonfinite_weights, read_metadata)
from ..utils.files import claim_output, file_id, load_torch, read_json, read_jsonl, write_json, write_text_atomic
from ..utils.neighbours import PIXEL_SIZE, pixel_vectors, realism
from ..utils.images import faded_reals
from .losses import GP_METRICS
from .schedule import DEFAULT_BATCH, EVERY_RESOLUTION, ProgressiveSchedule
from .step import PGGANStep, StepConfig, ema_beta, make_adam

# the official constant EMA β = 0.999 per step at minibatch 16, as a half-life in thousands of images
OFFICIAL_EMA_KIMG = 16 * math.log(0.5) / math.log(0.999) / 1000

log = logging.getLogger(__name__)

# what torch's zip writer says when a write fails (a full disk, a quota): it names no file
_TORCH_WRITE_FAILED = ("file write failed", "unexpected pos", "iostream error")


# the settings that decide what a run trains (schedule, batch, optimiser, loss, EMA, data order): a resume goes
# on with the run's own (the networks' shape is checked against networks.json, the archive by its identity)
FIXED_ON_RESUME = ("start_resolution", "fade_images", "stable_images", "batch", "lr", "gp_metric", "amp",
                   "ema_kimg", "ema_rampup", "ema_beta", "mirror", "seed")


def _check_field_types(cfg) -> None:
    """Every field of ``cfg`` of its declared kind (a hand-edited train_config.json's ``"batch": "x"``
    stopped --resume with an AttributeError, ``"fade_images": "64"`` with a comparison of text and a
    number): numbers are numbers (not true / false), text is text, tables are tables of numbers."""
    import numbers
    kinds = {"int": numbers.Real, "float": numbers.Real, "str": str, "bool": (bool, numbers.Integral),
             "dict": dict, "list": (list, tuple)}
    for f in dataclasses.fields(cfg):
        value, declared = getattr(cfg, f.name), str(f.type).replace(" ", "").split("|")
        if value is None and "None" in declared:
            continue
        kind = kinds.get(declared[0])
        if kind is None:
            continue
        ok = isinstance(value, kind) and not (kind is numbers.Real and isinstance(value, bool))
        if ok and kind is dict:  # {resolution: batch or learning rate}
            ok = all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in value.values())
        if not ok:
            raise ValueError(f"{f.name} must be {'a table of numbers' if kind is dict else declared[0]}"
                             f"{' or null' if 'None' in declared else ''}, got {value!r}")


@dataclass
class TrainConfig:
    archive: str
    out: str
    resolution: int | None = None           # final resolution (default: the archive's)
    start_resolution: int = 4
    fade_images: int = 600_000
    stable_images: int = 600_000
    total_images: int | None = None          # official total_kimg: train on at the final resolution to this
    batch: dict = field(default_factory=dict)  # {resolution: per-GPU batch}; missing ones: DEFAULT_BATCH
    auto_batch: bool = False                 # find the largest batch that fits (CUDA)
    lr: float = 1e-3
    lr_by_resolution: dict = field(default_factory=dict)  # {resolution: lr} (official G_lrate_dict / D_lrate_dict)
    gp_metric: str = "full"                  # "full" (official) or "current": see train.losses.gp_norm_scale
    amp: str | None = None                   # "bf16" for bfloat16 autocast
    accumulation: int = 1
    checkpoint_min_res: int | None = None
    ema_kimg: float = OFFICIAL_EMA_KIMG      # G_ema half-life in thousands of images
    ema_rampup: float | None = 0.05          # half-life <= this × images seen; 0 / None: the official constant β
    ema_beta: float | None = None            # a constant per-step β instead (what runs before ema_kimg used)
    latent_dim: int = 512
    fmap_base: int = 8192
    fmap_max: int = 512
    mirror: bool = False                     # radiographs are not left-right symmetric
    include_test: bool = False               # train on the archive's "test" split too (the evaluations test on it)
    tick_images: int = 10_000
    checkpoint_ticks: int = 5
    keep_checkpoints: int = 3
    grid_size: int = 16
    seed: int = 0
    device: str | None = None
    max_images: int | None = None            # stop (with a checkpoint) after this many images
    max_seconds: float | None = None         # stop (with a checkpoint) after this much training time
    realism_images: int = 256                # per tick: realism / diversity of this many G_ema samples (0: off)
    metrics: list = field(default_factory=list)  # "fid", "prdc": measured every metrics_every ticks (needs measure=)
    metrics_every: int = 5                   # ticks between measurements (and at the end)
    metrics_features: str = "inception"      # the feature space of the metrics (see xrayforge.fid.features)
    metrics_images: int = 1000               # generated (and real) images per measurement

    def __post_init__(self):
        _check_field_types(self)
        for name in ("fade_images", "tick_images", "checkpoint_ticks", "keep_checkpoints", "accumulation",
                     "latent_dim", "stable_images"):
            low = 0 if name == "fade_images" else 1
            if getattr(self, name) < low:
                raise ValueError(f"{name} must be >= {low}, got {getattr(self, name)}")
        for name in ("total_images", "max_images"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1 (or unset), got {getattr(self, name)}")
        if self.max_seconds is not None and self.max_seconds <= 0:
            raise ValueError(f"max_seconds must be > 0, got {self.max_seconds}")
        if self.gp_metric not in GP_METRICS:
            raise ValueError(f"gp_metric must be one of {', '.join(GP_METRICS)}, got {self.gp_metric!r}")
        if not self.ema_kimg > 0 or (self.ema_rampup or 0) < 0:
            raise ValueError(f"ema_kimg must be > 0 and ema_rampup >= 0, got {self.ema_kimg}, {self.ema_rampup}")
        if self.ema_beta is not None and not 0.0 <= self.ema_beta < 1.0:
            raise ValueError(f"ema_beta must be in [0, 1), got {self.ema_beta}")
        for what, table in (("lr", {"": self.lr}), ("lr_by_resolution", self.lr_by_resolution)):
            for res, lr in table.items():
                if not lr > 0:
                    raise ValueError(f"{what}: learning rate {lr} (at {res or 'every'} px) must be > 0")
        for res in self.lr_by_resolution:
            if int(res) < 4 or int(res) & (int(res) - 1):
                raise ValueError(f"lr_by_resolution: {res} is not a resolution (a power of two >= 4)")
        for name in ("start_resolution", "resolution"):
            r = getattr(self, name)
            if r is not None and (r < 4 or r & (r - 1)):
                raise ValueError(f"{name} must be a power of two >= 4, got {r}")
        if self.checkpoint_min_res is not None and self.resolution is not None \
                and self.checkpoint_min_res > self.resolution:  # else accepted, and nothing checkpointed
            raise ValueError(f"checkpoint_min_res {self.checkpoint_min_res} is above the resolution "
                             f"{self.resolution}: no layer would be checkpointed")
        self.realism_images = max(0, int(self.realism_images))
        unknown = set(self.metrics) - {"fid", "prdc"}
        if unknown:
            raise ValueError(f"metrics: {sorted(unknown)} unknown; choose from fid, prdc")
        if self.metrics_every < 1 or self.metrics_images < 6:
            raise ValueError(f"metrics_every must be >= 1 and metrics_images >= 6, got {self.metrics_every} and "
                             f"{self.metrics_images}")
        if self.amp not in (None, "bf16", "bfloat16"):
            raise ValueError(f"amp must be 'bf16' (bfloat16 autocast) or None (fp32), got {self.amp!r}")

    @property
    def amp_dtype(self) -> torch.dtype | None:
        """The autocast dtype of a training step (the batch probe's too)."""
        return torch.bfloat16 if self.amp in ("bf16", "bfloat16") else None

    def as_dict(self):
        return dataclasses.asdict(self)

    def lr_at(self, resolution: int) -> float:
        return float(self.lr_by_resolution.get(resolution, self.lr_by_resolution.get(str(resolution), self.lr)))

    def batch_at(self, resolution: int, cuda: bool) -> int | None:
        """The per-GPU batch at ``resolution`` the options give (None: found by ``auto_batch``, on a GPU)."""
        given = self.batch.get(resolution, self.batch.get(str(resolution)))  # str keys: read back from JSON
        if given is not None:
            return int(given)
        if self.auto_batch and cuda:
            return None
        return DEFAULT_BATCH.get(resolution, 16)

    def trains_otherwise(self, other: "TrainConfig", resolutions, fields=None) -> list[str]:
        """'fade_images 300000 (the run's: 600000)' for each setting of ``FIXED_ON_RESUME`` (or of ``fields``)
        in which this config trains otherwise than ``other`` (the run's) at ``resolutions``: the batch and
        the learning rate are compared per resolution, the rest as values (an unset EMA ramp-up is 0)."""
        def value(cfg: "TrainConfig", name: str):
            if name == "batch":
                return ",".join(f"{r}:{cfg.batch_at(r, cuda=True) or 'auto'}" for r in resolutions)
            if name == "lr":
                return ",".join(f"{r}:{cfg.lr_at(r):g}" for r in resolutions)
            if name == "amp":
                return cfg.amp_dtype and "bf16"
            if name == "ema_rampup":
                return cfg.ema_rampup or 0
            return getattr(cfg, name)
        out = []
        for name in FIXED_ON_RESUME if fields is None else fields:
            mine, theirs = value(self, name), value(other, name)
            if mine != theirs:
                out.append(f"{name} {mine} (the run's: {theirs})")
        return out

    def ema_beta_at(self, batch: int, images_seen: int) -> float:
        """The EMA decay of the step that starts at ``images_seen`` with a global batch ``batch``."""
        if self.ema_beta is not None:
            return self.ema_beta
        return ema_beta(batch, self.ema_kimg * 1000, images_seen, self.ema_rampup)


def _log2(x: int) -> int:
    return int(math.log2(x))


class Interrupted(Exception):
    pass


def process_device(device: str | None) -> torch.device:
    """This process's device: ``device`` as given, with "cuda" (no index) or no device on a GPU
    machine meaning the GPU of this process (``LOCAL_RANK`` under torchrun, else 0)."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and dev.index is None:  # torch.cuda.set_device needs an index
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return dev


# run-folder locks this process holds (Trainer._lock): a child forked without exec (a DataLoader
# worker, say) shares each one and could hold it past this process, so in the child each lock's
# descriptor is pointed at /dev/null instead (dup2: the parent's lock is untouched, and the child's
# file object still closes a valid descriptor, never one reused for another file)
_LOCK_FDS: dict[int, tuple[int, int]] = {}  # descriptor -> (device, inode) of its lock file


def _close_inherited_locks() -> None:
    if not _LOCK_FDS:
        return
    try:
        nul = os.open(os.devnull, os.O_RDONLY)
    except OSError:
        return
    for fd, file in _LOCK_FDS.items():
        try:  # only a descriptor that is still that lock file: a number left behind may be reused
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) == file:
                os.dup2(nul, fd)
        except OSError:
            pass
    os.close(nul)
    _LOCK_FDS.clear()


os.register_at_fork(after_in_child=_close_inherited_locks)

_CONTROL_GROUP: list = [None, None]  # [the default group it was made for, the gloo group]


def _control_group():
    """A gloo group over every process of the default (NCCL) group, made once: new_group is a
    collective, and a trainer made again in the same process must not leak one each time. (The
    default group it belongs to is held, so that a later default group is never taken for it.)"""
    world = dist.group.WORLD
    if _CONTROL_GROUP[0] is not world:
        _CONTROL_GROUP[:] = [world, dist.new_group(backend="gloo")]
    return _CONTROL_GROUP[1]


class Trainer:
    """``measure``: for ``config.metrics``, a callable ``measure(generate, latent_dim, alpha=α) -> dict`` with
    a ``score(record)`` method (lower is better), e.g. ``xrayforge.fid.training.TrainingMetrics``
    (built by the command line: FID sits downstream of training, so this room does not import it)."""

    def __init__(self, config: TrainConfig, resume: bool = False, progress: bool = True, measure=None):
        self.progress, self.measure = progress, measure
        self.out = Path(config.out)
        self.rank, self.world = 0, 1
        self._control = None  # a CPU (gloo) process group for the processes' small agreements
        if dist.is_available() and dist.is_initialized():
            self.rank, self.world = dist.get_rank(), dist.get_world_size()
            if self.world > 1:
                # flags and random states travel on the host: with NCCL a gloo group, so that agreeing
                # on them never waits for the GPU's queued work (one per process group, made once)
                self._control = None if dist.get_backend() == "gloo" else _control_group()
        if config.metrics and measure is None and self.rank == 0:
            raise ValueError("metrics during training need a measure: pass measure=xrayforge.fid.training."
                             "TrainingMetrics(archive, run, metrics, features, images)")
        self.device = process_device(config.device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.archive = Archive(config.archive)
        final = config.resolution or self.archive.resolution
        if final > self.archive.resolution:
            raise ValueError(f"{config.archive} goes up to {self.archive.resolution} px; cannot train at {final}")
        # saved as resolved: a resumed run (or one pointed at another archive) builds the same networks
        self.cfg = config = dataclasses.replace(config, resolution=final)
        self.net_config = NetworkConfig(resolution=final, latent_dim=config.latent_dim, fmap_base=config.fmap_base,
                                        fmap_max=config.fmap_max, checkpoint_min_res=config.checkpoint_min_res)
        if config.start_resolution > final:
            raise ValueError(f"start resolution {config.start_resolution} is above the final resolution {final}")
        self.schedule = ProgressiveSchedule(_log2(config.start_resolution) - 2, _log2(final) - 2,
                                            config.fade_images, config.stable_images, config.total_images)
        self.total = min(self.schedule.total_images, config.max_images or self.schedule.total_images)
        self._check_batches()  # before anything is written
        self.train_rows = self._training_rows()
        if self.rank == 0:
            self._warn_about_a_small_archive()
        self.archive_identity = {"images": len(self.archive), "resolution": self.archive.resolution,
                                 "manifest_sha1": file_id(self.archive.path / "manifest.csv", length=40),
                                 "train_images": len(self.train_rows), "include_test": config.include_test}
        self.stream = BatchStream(self.archive, seed=config.seed, rank=self.rank, world=self.world,
                                  subset=self.train_rows)
        self.max_value = int(np.iinfo(self.archive.dtype).max)
        self.ckpt_dir = self.out / "checkpoints"
        self.log_path = self.out / "log.jsonl"
        # never into a folder of something else (an archive, another command's output)
        claim_output(self.out, "train", signatures=("train_config.json", "checkpoints", "log.jsonl"))
        for made, kind in ((self.ckpt_dir, "folder"), (self.log_path, "file")):  # said now, not after the first tick
            if made.exists() and made.is_dir() != (kind == "folder"):
                raise UserError(f"{made}: is {'a file' if kind == 'folder' else 'a folder'}, where the run keeps its "
                                f"{'checkpoints' if kind == 'folder' else 'log'} (a {kind}); move it away")
        self._stop_signal = None
        self._auto_batches: dict[int, int] = {}
        self._lock_file, self._holds_folder = None, False
        self._lock()
        try:
            self._build(resume)
            if self.rank == 0:  # after a resume's checkpoint is read: a total it has passed is refused, not warned of
                self._warn_about_options()
        except BaseException:
            self._unlock()
            raise

    def _configured_batch(self, res: int) -> int | None:
        """The per-GPU batch at ``res`` the options give (None: found by --auto-batch on a GPU)."""
        return self.cfg.batch_at(res, cuda=self.device.type == "cuda")

    def _check_batches(self) -> None:
        singles = []  # batches of 1, 5, 7, 11, ...: D's minibatch-stddev groups are single images
        for level in range(self.schedule.start_level, self.schedule.final_level + 1):
            res = self.net_config.resolution_at(level)
            b = self._configured_batch(res)
            if b is not None and b % self.cfg.accumulation:
                raise ValueError(f"batch {b} at {res} px is not divisible by accumulation {self.cfg.accumulation}")
            g = self.net_config.mbstd_group_size
            if b is not None and g > 1 and largest_group_size(b, g) < 2:
                singles.append(f"{b} at {res} px")
            if b is not None and not self._groups_fit(b):
                # D forms its minibatch-stddev groups in each micro-batch: smaller groups than the batch's
                # (what a batch of the micro-batch's size would see) are said; groups of 1 are refused
                group = largest_group_size(b, self.net_config.mbstd_group_size)
                micro = b // self.cfg.accumulation
                theirs = largest_group_size(micro, self.net_config.mbstd_group_size)
                what = (f"batch {b} at {res} px with accumulation {self.cfg.accumulation}: micro-batches of {micro} "
                        f"cannot hold the batch's minibatch-stddev groups of {group}")
                if theirs < 2:
                    raise ValueError(f"{what}; D would form groups of 1, whose statistic is a constant (no diversity "
                                     f"signal): choose a batch or an accumulation that leaves micro-batches divisible "
                                     f"by {group}, or at least by 2 (--resume takes --accumulation)")
                if self.rank == 0:
                    log.warning("%s: D sees groups of %d, as a batch of %d would (a micro-batch divisible by %d keeps "
                                "the batch's)", what, theirs, micro, group)
        if singles and self.rank == 0:  # their statistic is a constant: what accumulation is refused for above
            log.warning("batch %s: no group size from 2 to %d divides it, so D's minibatch-stddev groups are single "
                        "images and their statistic is a constant (no diversity signal: mode collapse goes unseen); "
                        "choose a batch divisible by one of 2 to %d", ", ".join(singles),
                        self.net_config.mbstd_group_size, self.net_config.mbstd_group_size)

    def _groups_fit(self, batch: int) -> bool:
        """D's minibatch-stddev groups (the largest size <= 4 dividing the batch) fit whole in a micro-batch:
        else accumulation changes D's statistic (smaller groups; a micro-batch of 7 from 14: none at all)."""
        return (batch // self.cfg.accumulation) % largest_group_size(batch, self.net_config.mbstd_group_size) == 0

    def _training_rows(self) -> np.ndarray:
        """Manifest positions the GAN trains on: those outside the "test" split and its patients, on which
        `evaluate tstr` and the other evaluations test (an archive without one: every row), or every row
        (include_test)."""
        if self.cfg.include_test:
            return self.archive.training_positions(True)
        rows, everything = self.archive.training_positions(), len(self.archive)
        if len(rows) == everything and self.rank == 0:
            log.warning("%s has no test split: the GAN trains on every patient, and an evaluation that holds patients "
                        "out of it (evaluate tstr) will test on patients the generator saw. Prepare it with the "
                        "data set's split lists (ChestX-ray14: train_val_list.txt, test_list.txt) to keep them apart",
                        self.archive.path)
        if len(rows) == 0 and everything:
            raise UserError(f"{self.archive.path}: every image is in the test split or of a patient in it, on which "
                            f"the evaluations test; nothing is left to train on (--include-test trains on them)")
        return rows

    def _warn_about_a_small_archive(self) -> None:
        """Fewer images to train on than a step's batch (all processes'): the stream runs through the
        images more than once per batch, so each batch holds copies (and D's minibatch statistic may
        compare an image with itself). Said, with the resolutions it happens at."""
        n = len(self.train_rows)
        short = []
        for level in range(self.schedule.start_level, self.schedule.final_level + 1):
            res = self.net_config.resolution_at(level)
            b = self._configured_batch(res)
            if b is not None and b * self.world > n:
                short.append(f"{b * self.world} at {res} px" if self.world == 1 else
                             f"{b * self.world} at {res} px ({b} per process × {self.world})")
        if short:
            log.warning("%s: %d image%s to train on, fewer than a step's batch (%s): every batch holds some images "
                        "more than once; use a larger archive (or a smaller --batch)", self.archive.path, n,
                        "" if n == 1 else "s", ", ".join(short))

    def _warn_about_options(self) -> None:
        """Said once, at the start: options that do not do what they seem to."""
        if self.cfg.auto_batch and self.device.type != "cuda":
            log.warning("--auto-batch finds the largest batch that fits GPU memory; on %s it does nothing: the batch "
                        "is --batch's, else the default (16 up to 128 px)", self.device)
        trained = [self.net_config.resolution_at(level)
                   for level in range(self.schedule.start_level, self.schedule.final_level + 1)]
        # `--batch N` (one batch for every resolution) is no table of entries
        tables = (("batch", {} if {int(r) for r in self.cfg.batch} == set(EVERY_RESOLUTION) else self.cfg.batch),
                  ("lr", self.cfg.lr_by_resolution))
        unused = [f"{name} {int(r)}:{v:g}" for name, table in tables for r, v in table.items()
                  if int(r) not in trained]
        if unused:  # else taken without a word: a typo (128:4 for a 64-px run) trained on the default
            log.warning("%s: %s: at a resolution this run never trains (%d to %d px), so not used", self.out,
                        ", ".join(unused), trained[0], trained[-1])
        end = self.schedule.at(self.schedule.total_images - 1)
        if end.level < self.schedule.final_level or end.fading:
            # the images until the final resolution is fully faded in (its stable phase not counted)
            growth = sum(n for _, n, _ in self.schedule.phases[:-1])
            log.warning("%s: --total-kimg %g ends the schedule at %d px%s, before the final %d px (growing to it takes "
                        "%g kimg): the run will end there, and its checkpoints generate %d-px images",
                        self.out, self.schedule.total_images / 1000, self.net_config.resolution_at(end.level),
                        f" while it fades in (α {end.alpha:.2f})" if end.fading else "",
                        self.net_config.resolution, growth / 1000, self.net_config.resolution_at(end.level))

    # ------------------------------------------------------------------ the run folder's lock
    def _lock(self) -> None:
        """Hold RUN/.lock (an exclusive flock) while this trainer works on the folder: a second training of
        the same folder at once would interleave the log and overwrite the checkpoints. The kernel releases
        it when the process ends, however it ends. Process 0 alone writes, so it alone locks (under
        torchrun every process is told the outcome)."""
        refused = None
        if self.rank == 0:
            import errno
            import fcntl
            fh = None
            try:
                fh = open(self.out / ".lock", "a+")
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if fh is not None and exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    fh.seek(0)
                    holder = fh.read().strip() or "a process"
                    refused = (f"{self.out}: another training is running in this folder ({holder} last took "
                               f"{self.out / '.lock'}); two at once would mix their logs and overwrite each other's "
                               "checkpoints: wait for it to end (or stop it), or choose another --out")
                else:  # a file system without flock (Lustre mounted noflock, some NFS / FUSE mounts)
                    log.warning("%s: cannot lock the run folder on this file system (%s); nothing stops a second "
                                "training of the same folder from running at once", self.out, exc.strerror or exc)
                if fh is not None:
                    fh.close()
            else:
                fh.seek(0)
                fh.truncate()
                fh.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
                fh.flush()
                self._lock_file = fh
                st = os.fstat(fh.fileno())
                _LOCK_FDS[fh.fileno()] = (st.st_dev, st.st_ino)
        refused = self._from_process_0(refused)
        if refused is not None:
            raise UserError(refused)
        self._holds_folder = True

    def _from_process_0(self, value):
        """Process 0's ``value`` on every process: what process 0 alone looked at (the run folder),
        told to the others under torchrun so that each raises the same error."""
        if self.world > 1:
            box = [value]
            dist.broadcast_object_list(box, 0, group=self._control)  # on the host: never behind GPU work
            value = box[0]
        return value

    @contextlib.contextmanager
    def _together(self):
        """Process 0's error in the block (what it met writing the run's files) raised on every
        process. Process 0 alone writes them: under torchrun the others went on to the next
        collective and waited there until the process group's timeout (30 minutes by default),
        while process 0 had already stopped. Every process enters the block at the same point; one
        process, no collective."""
        error = None
        try:
            yield
        except Exception as exc:  # noqa: BLE001 - told to the others, then raised as it is
            error = exc
        said = self._from_process_0(None if error is None else f"{type(error).__name__}: {error}") \
            if self.world > 1 else None
        if error is not None:
            raise error
        if said is not None:
            raise UserError(f"{self.out}: process 0 stopped the run: {said}")

    def close(self) -> None:
        """Let go of the run folder without training (train() does so when it ends)."""
        self._unlock()

    def __del__(self):  # a trainer dropped without train() or close() lets go of the folder too
        try:
            self._unlock()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def _unlock(self) -> None:
        self._holds_folder = False
        if self._lock_file is not None:
            _LOCK_FDS.pop(self._lock_file.fileno(), None)
            try:
                self._lock_file.close()  # closing the file releases the flock
            except OSError:
                pass
            self._lock_file = None

    # ------------------------------------------------------------------ set-up
    def _resumed_best(self, state: dict) -> dict | None:
        """The best checkpoint as of the one resumed from: the record its state.pt carries (written in the
        checkpoint's atomic write: a kill between the checkpoint and best.json loses no best), else (a
        checkpoint of an earlier version) best.json's; one naming a checkpoint that is gone (e.g. damaged
        and renamed damaged-*) or lies past this one is dropped. Process 0 brings best.json in line (the
        others neither measure nor rotate: none, and no read of a file process 0 may be rewriting)."""
        if self.rank != 0:
            return None
        path = self.ckpt_dir / "best.json"
        try:
            on_disk = read_json(path, "the best checkpoint's record") if path.is_file() else None
            if on_disk is not None and not is_best_record(on_disk):  # valid JSON, but not the record (a hand edit)
                raise UserError(f"{path}: not a best checkpoint's record")
        except UserError as exc:  # a damaged file is no reason to refuse the resume: written again (or removed)
            log.warning("%s; %s", exc, "the checkpoint's own record is used" if state.get("best") else "dropped")
            on_disk = False
        best = state["best"] if "best" in state else on_disk or None
        gone = best is not None and not names_a_checkpoint(self.ckpt_dir, best.get("checkpoint"))
        if best is not None and (gone or int(best.get("images", 0)) > self.images_seen):
            log.warning("%s: the best checkpoint, %s, is %s; the run has none until its next measurement",
                        self.ckpt_dir, best.get("checkpoint"), "gone" if gone else "past the one resumed from")
            best = None
        if best != on_disk:
            try:
                if best is None:
                    path.unlink(missing_ok=True)
                else:
                    write_text_atomic(path, json.dumps(best, indent=2))
            except OSError as exc:  # derived from state.pt, which is what a resume reads: written at the next best
                log.warning("%s: could not be brought in line with the checkpoint resumed from (%s)", path, exc)
        return best

    def _build(self, resume: bool):
        torch.manual_seed(self.cfg.seed)
        self.G = Generator(self.net_config).to(self.device, memory_format=self._memory_format)
        self.D = Discriminator(self.net_config).to(self.device, memory_format=self._memory_format)
        self.G_ema = copy.deepcopy(self.G).eval().requires_grad_(False)
        self.gen = torch.Generator(self.device).manual_seed(self.cfg.seed * 1000 + 7 + self.rank)
        self.images_seen, self.tick = 0, 0
        self.best: dict | None = None  # the best measured checkpoint so far (metrics during training)
        self.level = self.phase_index = None
        self.history: list[dict] = []
        state, saved_world = None, None
        self._resumed_path: Path | None = None
        if resume:
            path, nets, state = self._resume_from()
            self._resumed_path = path
            if isinstance(state.get("auto_batches"), dict):  # what --auto-batch's probe found: not probed anew
                self._auto_batches.update({int(k): int(v) for k, v in state["auto_batches"].items()})
            for name, net in (("G", self.G), ("D", self.D), ("G_ema", self.G_ema)):
                net.load_state_dict(nets[name].state_dict())
            self.images_seen, self.tick = int(state["images_seen"]), int(state["tick"])
            self._check_total_ahead(path, state)
            with self._together():  # process 0's error (a file it cannot write) raised on every process
                self.best = self._resumed_best(state)
            per_rank = state.get("rank_rng")
            saved_world = len(per_rank) if isinstance(per_rank, list) else None
            if isinstance(per_rank, list) and len(per_rank) == self.world:
                self._set_rng_state(per_rank[self.rank])  # each process its own streams: an exact continuation
            elif self.world == 1:
                if isinstance(per_rank, list) and len(per_rank) > 1:
                    log.warning("%s: saved by %d processes; one process continues process 0's random streams, so "
                                "the run goes on well but is not the exact continuation it would be with %d",
                                path.name, len(per_rank), len(per_rank))
                self._set_rng_state(state)
            else:
                # a checkpoint of another number of processes (or from before each one's streams were
                # kept): every process given process 0's state would draw the same latents and flips
                if self.rank == 0:
                    log.warning("%s: saved by %s; each of these %d processes continues from a stream of its own "
                                "(seeded by the run's seed, its rank and the images seen), so the run goes on "
                                "well but is not the exact continuation it would be with the same processes",
                                path.name, f"{len(per_rank)} processes" if isinstance(per_rank, list)
                                else "an earlier version that kept one process's random state", self.world)
                self.gen.manual_seed(self.cfg.seed * 1000 + 7 + self.rank + 1_000_003 * self.images_seen)
                torch.manual_seed(self.cfg.seed + 7919 * (self.rank + 1) + 1_000_003 * self.images_seen)
            if self.log_path.exists():
                # ticks logged after this checkpoint (a kill between a tick and the next checkpoint) are
                # done again, and a line torn by the kill is dropped: the log is rewritten without them
                logged, torn = read_jsonl(self.log_path)
                self.history = [h for h in logged if h.get("images", math.inf) <= self.images_seen]
                if self.rank == 0 and (len(self.history) != len(logged) or torn):
                    write_text_atomic(self.log_path, "".join(json.dumps(h) + "\n" for h in self.history))
        else:
            refused = None  # process 0 looks; under torchrun every process is told, and raises the same error
            if self.rank == 0:
                if checkpoint_dirs(self.ckpt_dir):
                    refused = (f"{self.out} already has checkpoints: pass --resume to continue it, "
                               "or choose a new --out")
                elif any(self.ckpt_dir.glob("damaged-ckpt-*")):
                    refused = (f"{self.out} holds only damaged checkpoints (damaged-ckpt-*), which a new start "
                               "would leave beside its own: move them away, or choose a new --out")
                else:
                    try:
                        self._set_aside_earlier_start()
                    except OSError as exc:  # said by every process, not left to wait in the next collective
                        refused = f"{self.out}: cannot set an earlier start's log aside: {exc}"
            refused = self._from_process_0(refused)
            if refused is not None:
                raise FileExistsError(refused)
        if self.world > 1:
            for net in (self.G, self.D, self.G_ema):
                for t in list(net.parameters()) + list(net.buffers()):
                    dist.broadcast(t.data, 0)
        self._enter_phase(self.schedule.at(self.images_seen), state)
        if saved_world not in (None, self.world) and self.rank == 0 and self.images_seen < self.total:
            # the batch is per process: another number of processes trains on another batch per step
            res = self.net_config.resolution_at(self.level)
            log.warning("%s: the run trained on %d process%s, and %d go%s on: each step's batch changes from %d to %d "
                        "images (%d per process at %d px; at every resolution × %g), so the optimiser takes %s steps "
                        "of a %s batch at the same learning rate (the EMA half-life, in images, is kept): the run goes "
                        "on, but not as the training it was; resume it with %d process%s to keep its batch",
                        path.name, saved_world, "" if saved_world == 1 else "es", self.world,
                        "es" if self.world == 1 else "", self.batch * saved_world, self.batch * self.world,
                        self.batch, res, self.world / saved_world, "more" if self.world < saved_world else "fewer",
                        "smaller" if self.world < saved_world else "larger", saved_world,
                        "" if saved_world == 1 else "es")
        # the level and fade-in α of the last step taken (what a checkpoint's networks generate at)
        taken = self.schedule.at(max(self.images_seen - 1, 0))
        self.last_step = (int(state.get("step_level", taken.level)) if state else taken.level,
                          float(state.get("step_alpha", taken.alpha)) if state else taken.alpha)
        g = torch.Generator().manual_seed(self.cfg.seed + 12345)
        self.grid_latents = torch.randn(self.cfg.grid_size, self.net_config.latent_dim, generator=g).to(self.device)
        n = min(self.cfg.realism_images, len(self.train_rows))
        self.realism_latents = torch.randn(n, self.net_config.latent_dim, generator=g).to(self.device)
        self.realism_rows = self.archive.random_positions(n, self.cfg.seed + 777, self.train_rows)  # what it trains on

    def _check_total_ahead(self, path: Path, state: dict) -> None:
        """A resume whose total (``--total-kimg``) the run had already passed before its last step: it would
        train nothing, warn that the run ends at a resolution it has left behind, and keep that total in
        train_config.json for every later resume. (A run that ended at its own total, its last batch
        running past it, is not refused: it had not passed the total when that batch began.)"""
        taken = self.schedule.at(max(self.images_seen - 1, 0)).level
        level = int(state.get("step_level", taken))
        res = self.net_config.resolution_at(level)
        batch = self._configured_batch(res) or self._auto_batches.get(level)
        per_rank = state.get("rank_rng")
        processes = len(per_rank) if isinstance(per_rank, list) and per_rank else 1
        total = self.schedule.total_images
        if batch is None or self.images_seen - int(batch) * processes < total:
            return
        raise UserError(f"{path}: the run has trained on {self.images_seen:,} images, past the total of "
                        f"{total:,} (--total-kimg {total / 1000:g}) these options give: there is nothing left to "
                        f"train. Give a --total-kimg above {self.images_seen / 1000:g} to train on, or leave it out")

    def _resume_from(self) -> tuple[Path, dict, dict]:
        """(checkpoint, networks, training state) of the newest checkpoint that loads. The ``latest``
        pointer is not trusted (a kill between a checkpoint's rename and the pointer's update leaves it
        behind); checkpoints newer than the one used failed to load: they are renamed damaged-* (out of
        rotation's way, kept for a look), and said."""
        failed = []
        for path in checkpoint_dirs(self.ckpt_dir):
            why = damage(path, files=("networks.pt", "state.pt"))
            if why is None:
                self._check_resumable(path, read_metadata(path))
                try:
                    nets = load_networks(path, map_location=self.device, warn_unfinished=False)
                    state = load_torch(path / "state.pt", "the training state")
                    missing = {"images_seen", "tick", "opt_g", "opt_d", "latent_rng", "torch_rng"} - set(state)
                    if missing:
                        raise UserError(f"{path / 'state.pt'}: not a training state (no {', '.join(sorted(missing))})")
                except (UserError, FileNotFoundError, KeyError, TypeError) as exc:
                    why = str(exc)
                else:
                    if failed:
                        log.warning("%s: %s; resuming from the older intact checkpoint %s",
                                    failed[0][0], failed[0][1], path.name)
                    later = [(n, q) for n, q in cut_short_dirs(self.ckpt_dir) if n > int(state["images_seen"])]
                    if later and self.rank == 0:  # a kill while it was written: the images since are redone
                        log.warning("%s: a checkpoint whose writing was cut short (the process ended while writing "
                                    "it); resuming from %s, %d images earlier", later[-1][1], path.name,
                                    later[-1][0] - int(state["images_seen"]))
                    if self.rank == 0:
                        for bad, _ in failed:
                            os.replace(bad, bad.with_name("damaged-" + bad.name))
                    return path, nets, state
            failed.append((path, why))
        if failed:
            raise UserError(f"{self.ckpt_dir}: no usable checkpoint; the newest one is damaged: {failed[0][1]}"
                            + (f" (and the {len(failed) - 1} older one{'s' if len(failed) > 2 else ''} too)"
                               if len(failed) > 1 else "")
                            + f"; nothing to resume from: start a new --out (or move {self.ckpt_dir} away and "
                              f"start this one again without --resume)")
        damaged = sorted(self.ckpt_dir.glob("damaged-ckpt-*"))
        if damaged:
            raise UserError(f"{self.ckpt_dir}: only damaged checkpoints are left ({', '.join(d.name for d in damaged[:3])}"
                            f"{' ...' if len(damaged) > 3 else ''}); nothing to resume from: start a new --out (or "
                            f"move them away and start this one again without --resume)")
        cut_short = cut_short_dirs(self.ckpt_dir)
        raise FileNotFoundError(f"{self.ckpt_dir}: no checkpoint to resume from" + (
            f" (the first, {cut_short[-1][1].name}, was cut short while it was written): start the run again without "
            "--resume" if cut_short else " (the run stopped before its first checkpoint was written, or its checkpoints "
            "were removed): start it again without --resume"))

    def _check_resumable(self, path: Path, meta: dict) -> None:
        """The checkpoint's networks are the ones these options build, and it trained on this archive."""
        saved = dict(meta["networks"].get("G", {}).get("config", {}))
        built = self.net_config.as_dict()
        ignored = {"checkpoint_min_res"}  # activation checkpointing: memory, not the network
        differ = [k for k in built if k not in ignored and k in saved and saved[k] != built[k]]
        if differ:
            raise UserError(f"{path}: the run's networks have " + ", ".join(f"{k} {saved[k]}" for k in differ)
                            + "; the options given build " + ", ".join(f"{k} {built[k]}" for k in differ)
                            + f" ({self.cfg.archive} at {self.archive.resolution} px): resume with the run's own "
                            "options and archive, or start a new run with another --out")
        # the rows it trained on: runs from before the test split was held out trained on every row
        run_config = (meta.get("extra") or {}).get("train_config") or {}
        self._check_same_training(path, run_config)
        theirs = bool(run_config.get("include_test", True)) if isinstance(run_config, dict) else True
        if theirs != bool(self.cfg.include_test):
            raise UserError(f"{path}: the run trained on {'every image' if theirs else 'the images outside the test split'}"
                            f" of its archive, and these options train on "
                            f"{'every image' if self.cfg.include_test else 'those outside the test split'}: resume with "
                            f"include_test={theirs} (--include-test{'' if theirs else ' left out'}), or start a new run")
        trained_on = (meta.get("extra") or {}).get("archive")
        if not isinstance(trained_on, dict):
            log.warning("%s: written before checkpoints recorded their archive: cannot check that %s is the one "
                        "this run trained on", path, self.cfg.archive)
            return
        keys = ("images", "resolution", "manifest_sha1")
        if any(trained_on.get(k) != self.archive_identity[k] for k in keys):
            def said(a):
                return f"{a.get('images')} images at {a.get('resolution')} px, manifest sha1 {str(a.get('manifest_sha1'))[:12]}"
            raise UserError(f"{self.cfg.archive}: not the archive this run trained on ({said(self.archive_identity)}; "
                            f"the run's: {said(trained_on)}): resume with the run's archive, or start a new run "
                            "with another --out")
        if "train_images" in trained_on and trained_on["train_images"] != self.archive_identity["train_images"]:
            # the same archive: the rows were chosen by an earlier rule (the test split's patients' other images)
            log.warning("%s: the run trained on %s of the archive's images, and this version trains on %d (it holds "
                        "out every image of a patient in the test split); the run goes on, but not as the exact "
                        "continuation it would be on the same images", path, trained_on["train_images"],
                        self.archive_identity["train_images"])

    def _check_same_training(self, path: Path, run_config) -> None:
        """The options train as the run did (``FIXED_ON_RESUME``): a resume through the Python API with
        another schedule, batch or learning rate would go on as another training without a word (the
        command line refuses such options before this). Settings the run's config did not record yet
        (an earlier version's) are not compared."""
        if not isinstance(run_config, dict):
            return
        known = {f.name for f in dataclasses.fields(TrainConfig)}
        try:
            theirs = TrainConfig(**{k: v for k, v in run_config.items() if k in known})
        except (TypeError, ValueError) as exc:
            log.warning("%s: cannot read the options the run recorded (%s): not compared with these", path, exc)
            return
        # the resolutions it trains at (a batch or learning rate below the start is never used)
        start = min(self.cfg.start_resolution, theirs.start_resolution)
        resolutions = [r for r in (4 << i for i in range(self.net_config.num_levels)) if r >= start]
        differ = self.cfg.trains_otherwise(theirs, resolutions, [k for k in FIXED_ON_RESUME if k in run_config])
        if differ:
            raise UserError(f"{path}: resuming goes on with the options the run trained with; these train otherwise: "
                            f"{'; '.join(differ)}. Resume with the run's options (TrainConfig(**saved_options(run)) "
                            f"keeps them), or start a new run with another out")

    def _set_aside_earlier_start(self) -> None:
        """A new run in a folder where an earlier start left a log but no checkpoint (killed before its
        first): its log and grids are moved aside (log-<time>.jsonl, grids-<time>/), not appended to."""
        if not self.log_path.exists():
            return
        stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(self.log_path.stat().st_mtime))
        suffix, i = stamp, 1
        while (self.out / f"log-{suffix}.jsonl").exists() or (self.out / f"grids-{suffix}").exists():
            suffix, i = f"{stamp}-{i}", i + 1
        os.replace(self.log_path, self.out / f"log-{suffix}.jsonl")
        grids = (self.out / "grids").is_dir()
        if grids:
            os.replace(self.out / "grids", self.out / f"grids-{suffix}")
        for stale in ("best.json", "latest"):  # they would name checkpoints that never were
            (self.ckpt_dir / stale).unlink(missing_ok=True)
        log.warning("%s: an earlier start left log.jsonl without a checkpoint; moved aside to log-%s.jsonl%s",
                    self.out, suffix, f" (and its grids to grids-{suffix}/)" if grids else "")

    def batch_for(self, level: int) -> int:
        res = self.net_config.resolution_at(level)
        given = self._configured_batch(res)
        if given is not None:
            return given
        if level not in self._auto_batches:
            self._auto_batches[level] = self._largest_batch(level)
        return self._auto_batches[level]

    def _largest_batch(self, level: int, limit: int = 512) -> int:
        """Largest power-of-two batch (a multiple of the accumulation) whose step fits in GPU
        memory, found on throwaway copies of the networks; agreed across ranks (the minimum)."""
        res = self.net_config.resolution_at(level)
        G, D = copy.deepcopy(self.G), copy.deepcopy(self.D)
        probe = PGGANStep(G, D, copy.deepcopy(self.G_ema), make_adam(G.parameters()), make_adam(D.parameters()),
                          StepConfig(gp_metric=self.cfg.gp_metric, amp_dtype=self.cfg.amp_dtype,
                                     accumulation=self.cfg.accumulation))
        fits, n = [], self.cfg.accumulation
        while n <= limit:
            try:
                probe(torch.zeros(n, self.net_config.image_channels, res, res, device=self.device), level, 1.0)
                torch.cuda.synchronize(self.device)
                fits.append(n)
                n *= 2
            except torch.cuda.OutOfMemoryError:
                break
            finally:
                torch.cuda.empty_cache()
        del G, D, probe
        torch.cuda.empty_cache()
        # the largest that fits in memory and keeps D's minibatch-stddev groups whole in a micro-batch;
        # else the largest whose micro-batches still form groups of 2 or more (said)
        g = self.net_config.mbstd_group_size
        whole = [b for b in fits if self._groups_fit(b)]
        usable = [b for b in fits if largest_group_size(b // self.cfg.accumulation, g) >= 2]
        best = whole[-1] if whole else usable[-1] if usable else fits[-1] if fits else self.cfg.accumulation
        if self.rank == 0 and not fits:
            log.warning("auto batch at %d px: even a batch of %d (the accumulation) ran out of GPU memory",
                        res, self.cfg.accumulation)
        elif self.rank == 0 and not whole:
            log.warning("auto batch at %d px: no batch that fits in memory leaves micro-batches (accumulation %d) "
                        "holding whole minibatch-stddev groups; batch %d, whose micro-batches form groups of %d%s",
                        res, self.cfg.accumulation, best, largest_group_size(best // self.cfg.accumulation, g),
                        "" if usable else " (a constant statistic: a smaller --accumulation would do better)")
        if self.world > 1:
            t = torch.tensor([best], device=self.device)
            dist.all_reduce(t, op=dist.ReduceOp.MIN)
            best = int(t.item())
        return best

    def _enter_phase(self, phase, state: dict | None = None):
        """A new phase (a fade-in or a stable phase): fresh Adam state, as the official code resets it
        when a fade starts and when it ends; unless restoring a checkpoint taken in this phase."""
        self.level, self.phase_index = phase.level, phase.index
        lr = self.cfg.lr_at(self.net_config.resolution_at(phase.level))
        self.opt_g, self.opt_d = make_adam(self.G.parameters(), lr), make_adam(self.D.parameters(), lr)
        if state is not None and state.get("phase", phase.index) == phase.index \
                and int(state["level"]) == phase.level:  # checkpoints before phases were saved: by level
            for name, opt in (("opt_g", self.opt_g), ("opt_d", self.opt_d)):
                try:
                    opt.load_state_dict(state[name])
                except (ValueError, KeyError, TypeError, RuntimeError) as exc:
                    where = self._resumed_path / "state.pt" if self._resumed_path is not None else "the training state"
                    raise UserError(f"{where}: its optimiser state {name} does not fit the networks' parameters "
                                    f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}): the "
                                    f"checkpoint is from another network or damaged") from exc
        self.step = PGGANStep(self.G, self.D, self.G_ema, self.opt_g, self.opt_d,
                              StepConfig(gp_metric=self.cfg.gp_metric, amp_dtype=self.cfg.amp_dtype,
                                         accumulation=self.cfg.accumulation),
                              grad_sync=self._allreduce if self.world > 1 else None)
        self.batch = self.batch_for(phase.level)
        if self.batch % self.cfg.accumulation:
            raise ValueError(f"batch {self.batch} at {self.net_config.resolution_at(phase.level)} px is not divisible "
                             f"by accumulation {self.cfg.accumulation}")

    def _allreduce(self, module: torch.nn.Module):
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.world
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    # ------------------------------------------------------------------ checkpoints
    def latest_checkpoint(self) -> Path | None:
        """The newest intact checkpoint (a damaged newest one is skipped, and said)."""
        return latest_intact(self.ckpt_dir, files=("networks.pt", "state.pt"))

    def save_checkpoint(self, best: dict | None = None) -> Path | None:
        """``best``: this tick's measured record, when it makes this checkpoint the best one (marked in its
        state.pt, part of its atomic write, and then in best.json)."""
        # the networks are saved at the level and α they were last trained at (the trainer passes both to
        # every call), so that sampling a checkpoint written during growth uses the path that was trained;
        # set on every process, so that their networks stay equal
        level, alpha = self.last_step
        for net in (self.G, self.D, self.G_ema):
            net.set_level(level, alpha)
        # every process's random streams (latents, flips), so that a resume continues each exactly
        ranks_rng = [self._rng_state()]
        if self.world > 1:
            ranks_rng = [None] * self.world
            dist.all_gather_object(ranks_rng, self._rng_state(), group=self._control)
        if self.rank != 0:
            return None
        name = f"ckpt-{self.images_seen:012d}"
        final = self.ckpt_dir / name
        tmp = self.ckpt_dir / (name + ".tmp")
        for _, cut_short in cut_short_dirs(self.ckpt_dir):  # this one's, and any a kill left at another count
            shutil.rmtree(cut_short, ignore_errors=True)
        state = {"images_seen": self.images_seen, "tick": self.tick, "level": self.level, "phase": self.phase_index,
                 "step_level": level, "step_alpha": alpha,
                 "opt_g": self.opt_g.state_dict(), "opt_d": self.opt_d.state_dict(),
                 "auto_batches": dict(self._auto_batches),  # a resume keeps the batches the probe found
                 "best": self._best_record(name, best) if best is not None else self.best,
                 **ranks_rng[0], "rank_rng": ranks_rng}
        try:
            tmp.mkdir(parents=True, exist_ok=True)
            torch.save(state, tmp / "state.pt")
            with open(tmp / "state.pt", "rb") as fh:
                os.fsync(fh.fileno())
            # networks.json last: it records both files' digests, which a resume checks
            save_networks(tmp, {"G": self.G, "D": self.D, "G_ema": self.G_ema},
                          extra={"images_seen": self.images_seen, "train_config": self.cfg.as_dict(),
                                 "archive": self.archive_identity}, files=("state.pt",))
        except (OSError, RuntimeError) as exc:
            # a full disk: torch's zip writer says "file write failed", "unexpected pos 704 vs 598" or
            # "basic_ios::clear: iostream error", and names no file; any other error is raised as it is
            if not (isinstance(exc, OSError) or any(m in str(exc) for m in _TORCH_WRITE_FAILED)):
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # the space it took, for the next try
            kept = checkpoint_dirs(self.ckpt_dir)
            raise UserError(f"{tmp}: cannot write the checkpoint at {self.images_seen} images ({exc}); is the disk "
                            f"full? " + (f"The run's last checkpoint, {kept[0].name}, is kept: free some space and "
                                         "continue with --resume" if kept else "The run has no checkpoint yet")
                            ) from exc
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)  # a directory rename: the checkpoint appears whole or not at all
        write_text_atomic(self.ckpt_dir / "latest", name)
        if best is not None:
            self.best = state["best"]
            write_text_atomic(self.ckpt_dir / "best.json", json.dumps(self.best, indent=2))
        # the run's own checkpoints (ckpt-<images>), oldest first: never a folder or file of another name (a
        # copy kept as ckpt-<images>.bak or -keep, which a name sort counted among those kept and then removed)
        kept = [q for q in checkpoint_dirs(self.ckpt_dir) if q.name[5:].isdigit()][::-1]
        for old in kept[:-self.cfg.keep_checkpoints]:
            if self.best is None or old.name != self.best.get("checkpoint"):  # the best one stays
                shutil.rmtree(old, ignore_errors=True)
        return final

    # ------------------------------------------------------------------ reporting
    @torch.no_grad()
    def measure_realism(self, level: int, alpha: float) -> dict:
        """Realism and diversity ratios (utils.neighbours.realism) of G_ema's samples from a fixed latent
        batch against a fixed set of real images, both at this level's resolution and fade-in α."""
        if len(self.realism_rows) < 2:
            return {}
        res = self.net_config.resolution_at(level)
        if res > PIXEL_SIZE:  # compared at PIXEL_SIZE: the archive's smaller copy is the area-reduced image
            # (and for res >= 2 × PIXEL_SIZE the fade-in blend reduces to it too)
            real = to_unit_range(torch.from_numpy(self.archive.images(self.realism_rows, PIXEL_SIZE)).to(self.device),
                                 self.max_value)
        else:
            real = self._real(torch.from_numpy(self.archive.images(self.realism_rows, res)).to(self.device),
                              alpha, mirror=False)
        fake = torch.cat([self.G_ema(z, level, alpha).float().clamp(-1, 1)
                          for z in self.realism_latents.split(max(self.batch, 1))])  # a training batch fits
        r = realism(pixel_vectors(fake * 0.5 + 0.5), pixel_vectors(real.float() * 0.5 + 0.5))
        return {"realism": r["realism"], "diversity": r["diversity"]}

    def _write_tick(self, record: dict, final: bool = False):
        if self.cfg.realism_images:
            record.update(self.measure_realism(record["level"], record["alpha"]))
        # every metrics_every whole ticks (a tick cut short by a stop is measured when it ends), and at the end
        whole = record["tick"] == self.tick
        if self.measure is not None and self.cfg.metrics and (whole and record["tick"] % self.cfg.metrics_every == 0
                                                              or final):
            level, alpha = record["level"], record["alpha"]
            with torch.no_grad():
                # the real side at the generated images' resolution and this α, blended as G's output is
                record.update(self.measure(lambda z: self.G_ema(z.to(self.device), level, alpha),
                                           self.net_config.latent_dim, alpha=alpha))
        self.history.append(record)
        with open(self.log_path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        from ..utils.images import save_grid
        from ..utils.plots import loss_curve
        with torch.no_grad():
            imgs = self.G_ema(self.grid_latents, record["level"], record["alpha"]).float()
        grid_dir = self.out / "grids"
        grid_dir.mkdir(exist_ok=True)
        path = grid_dir / f"grid-{self.images_seen:012d}.png"
        save_grid(imgs, path)
        shutil.copyfile(path, self.out / "grid-latest.png")
        loss_curve(self.history, self.out / "loss.png")

    # ------------------------------------------------------------------ loop
    @property
    def _memory_format(self) -> torch.memory_format:
        # channels_last on a GPU: cuDNN's bf16 convolutions and the fused epilogues are fastest in
        # it (the measured training-step figures use it); the CPU keeps the default layout
        return torch.channels_last if self.device.type == "cuda" else torch.contiguous_format

    def _real(self, batch_u: torch.Tensor, alpha: float, mirror: bool | None = None) -> torch.Tensor:
        x = to_unit_range(batch_u, self.max_value)
        if self.cfg.mirror if mirror is None else mirror:
            flip = torch.rand(x.shape[0], generator=self.gen, device=self.gen.device) < 0.5
            x = torch.where(flip.to(x.device).view(-1, 1, 1, 1), x.flip(3), x)
        x = faded_reals(x, alpha)  # fade-in: the real images are blended like the generator's output
        return x.contiguous(memory_format=self._memory_format)

    def _better(self, record: dict) -> bool:
        """Whether this tick's measurement beats the best so far (rank 0 measures). Only a
        generator at the final resolution, faded in, can be the best one to sample from."""
        if self.measure is None or self.rank != 0 or record["level"] != self.schedule.final_level \
                or record["alpha"] < 1.0:
            return False
        score = self.measure.score(record)
        if score is None or not math.isfinite(score):  # a NaN FID (a diverged G_ema) is no best, and would
            return False                                 # make every later one compare as not better
        if self.best is None or not math.isfinite(float(self.best.get("score", math.nan))):
            return True  # a first measurement
        # a score of another kind (an FID, 1 - coverage), feature space or sample size is not comparable with
        # the best's: the best starts anew with this measurement (the earlier one goes back into rotation)
        mine, theirs = ([r.get("metrics_features"), r.get("metrics_images"), "fid" in r] for r in (record, self.best))
        if mine != theirs:
            what = lambda r: (f"{'FID' if r[2] else '1 - coverage'} in {r[0]} features of {r[1]} images")  # noqa: E731
            log.warning("%s: the best checkpoint, %s, was chosen by %s; this run measures %s, not comparable: the best "
                        "starts anew with this measurement (%s goes back into rotation)", self.ckpt_dir / "best.json",
                        self.best.get("checkpoint"), what(theirs), what(mine), self.best.get("checkpoint"))
            return True
        return score < self.best["score"]

    def _best_record(self, checkpoint: str, record: dict) -> dict:
        """checkpoints/best.json's record: the best measured checkpoint (kept out of rotation). Plain
        Python values (a measure may give NumPy scalars): state.pt is loaded with weights_only=True."""
        kinds = {"fid": float, "precision": float, "recall": float, "density": float, "coverage": float,
                 "metrics_features": str, "metrics_images": int}
        return {"checkpoint": checkpoint, "score": float(self.measure.score(record)), "tick": int(record["tick"]),
                "images": int(record["images"]), **{k: kind(record[k]) for k, kind in kinds.items() if k in record}}

    def _on_signal(self, signum, frame):
        self._stop_signal = signum

    def _stop_if_diverged(self, record: dict) -> None:
        """A UserError, on every process, when a network's weights are no longer finite: Adam cannot bring a
        NaN back, so the run would go on training nothing, write checkpoints of NaN (rotating the good ones
        out) and grids of black images. Checked every tick, before the tick's checkpoint: every checkpoint
        written is finite."""
        bad = [f"{name}.{where}" for name, net in (("G", self.G), ("D", self.D), ("G_ema", self.G_ema))
               for where in [nonfinite_weights(net)] if where is not None]
        (diverged,) = self._agree(bool(bad))
        if not diverged:
            return
        kept = self.latest_checkpoint() if self.rank == 0 else None
        losses = ", ".join(f"{k} {record[k]:.4g}" for k in ("d_loss", "g_loss")
                           if isinstance(record.get(k), float))
        raise UserError(
            f"{self.out}: training diverged at {self.images_seen} images ({self._reached()}): "
            f"{', '.join(bad) or 'the networks of another process'} are no longer finite (NaN or "
            f"inf{'; ' + losses if losses else ''}); stopped without writing a checkpoint. "
            + (f"The last checkpoint, {kept.name}, is finite; " if kept is not None else "No checkpoint was written; ")
            + "a --resume goes on with the same settings and would likely diverge again: start a new --out with "
              "a lower --lr, a larger --batch, or without --amp")

    def _agree(self, *flags) -> list[int]:
        """Each flag as the largest any process has (a signal, the time budget and the best
        measurement reach the processes apart; they must stop and checkpoint at the same step)."""
        if self.world == 1:
            return [int(f) for f in flags]
        t = torch.tensor([int(f) for f in flags], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self._control)
        return t.tolist()

    def _rng_state(self) -> dict:
        state = {"latent_rng": self.gen.get_state(), "torch_rng": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        return state

    def _set_rng_state(self, state: dict) -> None:
        self.gen.set_state(state["latent_rng"])
        torch.set_rng_state(state["torch_rng"])
        if self.device.type == "cuda" and "cuda_rng" in state:
            torch.cuda.set_rng_state(state["cuda_rng"], self.device)

    def train(self) -> dict:
        """Run to the end of the schedule (or max_images); returns a summary."""
        if not self._holds_folder:  # trained before (or closed): the lock was let go
            self._lock()
        try:
            stop, total = self.cfg.max_images, self.schedule.total_images
            if self._resumed_path is not None and stop is not None and stop <= self.images_seen < total:
                # else the session trained nothing and was reported as "trained to N images" (exit status 0)
                raise UserError(f"{self._resumed_path}: the run has trained on {self.images_seen:,} images, already "
                                f"at or past the stop of {stop:,} (--max-kimg {stop / 1000:g}) given for this "
                                f"session: there is nothing to train. Give a --max-kimg above "
                                f"{self.images_seen / 1000:g}, or leave it out to train on to the run's total "
                                f"({total / 1000:g} kimg)")
            if self.rank == 0:
                self.out.mkdir(parents=True, exist_ok=True)
                write_json(self.out / "train_config.json", self.cfg.as_dict())  # atomic: a torn one would block --resume
            from tqdm import tqdm
            bar = tqdm(total=self.total, initial=min(self.images_seen, self.total), unit="img", dynamic_ncols=True,
                       disable=not self.progress or self.rank != 0, desc="train")
            prefetch = Prefetcher(self.stream, self.device)
        except BaseException:
            self._unlock()
            raise
        old_handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        global_batch = lambda level: self.batch_for(level) * self.world  # noqa: E731
        try:
            if self.images_seen < self.total:
                lv = self.schedule.at(self.images_seen).level
                prefetch.request(self.images_seen, self.batch_for(lv), self.net_config.resolution_at(lv))
            tick_start, tick_images, t0 = time.perf_counter(), 0, time.perf_counter()
            # the run's training time before this session (its last tick kept: the checkpoint's); a log
            # from before total_seconds has each session's seconds only
            before = float(self.history[-1].get("total_seconds", self.history[-1].get("seconds", 0.0))) \
                if self.history else 0.0
            last = {}
            next_tick = (self.images_seen // self.cfg.tick_images + 1) * self.cfg.tick_images
            while self.images_seen < self.total:
                phase = self.schedule.at(self.images_seen)
                if phase.index != self.phase_index:
                    self._enter_phase(phase)
                (start, b, res), batch_u = prefetch.get()
                if start != self.images_seen or b != self.batch:  # pragma: no cover - a bug, not bad input
                    raise RuntimeError(f"loader out of step: batch for {start} ({b}), at {self.images_seen}")
                nxt = self.images_seen + global_batch(self.level)
                if nxt < self.total:
                    lv = self.schedule.at(nxt).level
                    prefetch.request(nxt, self.batch_for(lv), self.net_config.resolution_at(lv))
                real = self._real(batch_u, phase.alpha)
                # a fade-in's α as a device tensor made by a fill (a host copy would wait for the GPU)
                alpha_t = torch.full((), phase.alpha, device=self.device) if phase.alpha < 1.0 else 1.0
                beta = self.cfg.ema_beta_at(global_batch(self.level), self.images_seen)
                last = self.step(real, self.level, alpha_t, self.gen, ema_beta=beta)
                self.last_step = (phase.level, phase.alpha)  # a batch may end past a phase boundary: its own phase's
                self.images_seen = nxt
                tick_images += global_batch(self.level)
                bar.update(min(nxt, self.total) - bar.n)
                out_of_time = self.cfg.max_seconds is not None and time.perf_counter() - t0 > self.cfg.max_seconds
                out_of_time, stop = self._agree(out_of_time, bool(self._stop_signal))
                stopping = bool(stop)  # the agreed value only: a signal arriving after the flags were read waits a step
                if stopping and not self._stop_signal:  # another process was signalled: stop here too
                    self._stop_signal = signal.SIGTERM
                done = self.images_seen >= self.total or bool(out_of_time)
                whole_tick = self.images_seen >= next_tick
                if whole_tick or done or stopping:
                    if self.device.type == "cuda":  # the tick's img/s counts its steps' GPU work, all of it
                        torch.cuda.synchronize(self.device)
                    now = time.perf_counter()
                    # self.tick counts whole ticks: a stop within one (a signal, the time or image budget) logs
                    # the part done under the tick's number, and the resumed run ends that tick under it too,
                    # so that a resumed run numbers its ticks (and checkpoints, measures) as an uninterrupted one
                    tick = self.tick + 1
                    if whole_tick:
                        self.tick = tick
                    # the level and α of the step just taken (a batch may end past a phase boundary)
                    record = {"tick": tick, "images": self.images_seen, "level": phase.level,
                              "resolution": self.net_config.resolution_at(phase.level),
                              "alpha": round(phase.alpha, 6), "lr": self.opt_g.param_groups[0]["lr"],
                              "ema_beta": beta, "batch": self.batch, "train_images": len(self.train_rows),
                              **{k: float(v) for k, v in last.items()},
                              "img_per_s": tick_images / max(now - tick_start, 1e-9),
                              "seconds": now - t0, "total_seconds": before + now - t0}
                    if self.device.type == "cuda":
                        record["mem_gib"] = torch.cuda.max_memory_allocated(self.device) / 2 ** 30
                    bar.set_postfix(res=record["resolution"], alpha=f"{record['alpha']:.2f}",
                                    d=f"{record['d_loss']:.3f}", g=f"{record['g_loss']:.3f}")
                    with self._together():  # a full disk, GPU memory for the grid or the metrics
                        if self.rank == 0:
                            self._write_tick(record, final=done)
                    if self.device.type == "cuda":  # each tick's mem_gib: its training steps, not the grid
                        torch.cuda.reset_peak_memory_stats(self.device)
                    self._stop_if_diverged(record)
                    (better,) = self._agree(self._better(record))  # rank 0 measures
                    if better or done or stopping or self.tick % self.cfg.checkpoint_ticks == 0:
                        with self._together():  # process 0's files: a full disk, a read-only folder
                            self.save_checkpoint(best=record if better else None)
                    tick_start, tick_images = time.perf_counter(), 0
                    next_tick = (self.images_seen // self.cfg.tick_images + 1) * self.cfg.tick_images
                if stopping:
                    raise Interrupted(f"stopped by signal {self._stop_signal} at {self.images_seen} images "
                                      f"({self._reached()}); a checkpoint was written: resume with --resume")
                if done:
                    break
        finally:
            prefetch.close()
            bar.close()
            for s, h in old_handlers.items():
                signal.signal(s, h)
            self._unlock()
        level, alpha = self.last_step
        final = level == self.schedule.final_level and alpha >= 1.0
        summary = {"images_seen": self.images_seen, "level": level, "alpha": alpha,
                   "resolution": self.net_config.resolution_at(level), "final_resolution": self.net_config.resolution,
                   "reached_final_resolution": final, "train_images": len(self.train_rows),
                   "include_test": self.cfg.include_test,
                   # process 0 wrote it; the others would race its writes and rotation
                   "checkpoint": str(self.latest_checkpoint()) if self.rank == 0 else None, "out": str(self.out),
                   "complete": self.images_seen >= self.total}
        if not final:
            if self.images_seen >= self.schedule.total_images:
                why = "--total-kimg ends the schedule before the final resolution"
            elif self.cfg.max_images is not None and self.images_seen >= self.cfg.max_images:
                why = "stopped by --max-kimg; --resume goes on"
            else:
                why = "stopped by the time limit; --resume goes on"
            summary["warning"] = (f"training ended at {self._reached()} after {self.images_seen:,} images ({why}): its "
                                  f"checkpoints generate {summary['resolution']}-px images")
            if self.rank == 0:
                log.warning("%s: %s", self.out, summary["warning"])
        return summary

    def _reached(self) -> str:
        """"8 px of 16 px (fading in, α 0.50)": where the last step trained."""
        level, alpha = self.last_step
        return (f"{self.net_config.resolution_at(level)} px of {self.net_config.resolution} px"
                + (f" (fading in, α {alpha:.2f})" if alpha < 1.0 else ""))


def saved_options(run: str | os.PathLike) -> dict:
    """The options a run in ``run`` was started with, to resume it: RUN/train_config.json, else (a damaged
    or missing one, said at WARNING) the copy its newest intact checkpoint recorded. A run saved before the
    resolution was (``resolution: null``) gets its checkpoint's, so that it resumes at its own size. The
    stops of the session that started it (``max_images``, ``max_seconds``) are left out: they are no options
    of the run (a resume with them trained nothing, or stopped at once)."""
    session = ("max_images", "max_seconds")
    return {k: v for k, v in _saved_options(Path(run)).items() if k not in session}


def _saved_options(run: Path) -> dict:
    """RUN/train_config.json, or its newest intact checkpoint's copy (see :func:`saved_options`)."""
    saved, damaged = run / "train_config.json", None
    options = None
    if saved.is_file():
        try:
            options = read_json(saved, "the run's saved options")
        except UserError as exc:
            damaged = exc
    if options is not None and options.get("resolution") is not None:
        return options
    try:
        ckpt = latest_intact(run / "checkpoints", files=("networks.pt", "state.pt"))
    except UserError:
        ckpt = None
    meta = read_metadata(ckpt) if ckpt is not None else {}
    recorded = (meta.get("extra") or {}).get("train_config")
    if options is None:
        if not isinstance(recorded, dict):
            if damaged is not None:
                raise damaged
            raise UserError(f"{run}: there is no run to resume here (no train_config.json and no checkpoint): start "
                            f"one with `xrayforge train ARCHIVE --out {run}`")
        log.warning("%s; resuming with the options its checkpoint %s recorded", damaged or f"{saved}: missing",
                    ckpt.name)
        options = dict(recorded)
    if options.get("resolution") is None and meta:
        options["resolution"] = meta["networks"].get("G", {}).get("config", {}).get("resolution")
    return options


def init_distributed() -> tuple[int, int]:
    """Join the torchrun process group when launched by torchrun; (rank, world size)."""
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        local = int(os.environ.get("LOCAL_RANK", 0))
        if torch.cuda.is_available() and local < torch.cuda.device_count():
            torch.cuda.set_device(local)  # "cuda" is then this process's GPU for every command, not GPU 0
        dist.init_process_group(backend)
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1
