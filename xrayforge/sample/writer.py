"""`xrayforge sample RUN --n N --out DIR`: a labelled synthetic archive, written in shards.

Image k of an unconditional archive is G(latent_for(seed, k)). With LCO targets, image slot k
belongs to target ``k % T``; each (shard, target) draws its starting latents from its own
stream, so every image can be regenerated from the manifest (seed, latent_seed, latent_index)
and the stored final latent. A shard is complete when its CSV exists (written last,
atomically); a crashed run redoes only incomplete shards, so the archive ends with exactly
the asked number of images, each index once. The manifest's probabilities ``p_<finding>`` are
the classifier's on the written pixels (clamped to [-1, 1] and quantised to the format's bits, as a
reader of the files gets them), and an LCO image is accepted only when those meet its target too.

Layout: DIR/shard-00000/00000000.png ..., DIR/shard-00000.csv, DIR/shard-00000.latents.npy,
DIR/shard-00000.json (the shard's LCO rejections), then DIR/manifest.csv (all shards) and
DIR/summary.json, which describes the whole archive however many runs wrote it.

The checkpoint is pinned in DIR/sample_config.json when the archive is started: a run that
continues it samples from that checkpoint even when training has written newer ones since
(said at WARNING), and refuses when that checkpoint is gone, so an archive never mixes generators.
"""
from __future__ import annotations

import concurrent.futures as cf
import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from ..nn import find_checkpoint, load_networks
from ..utils.files import (atomic_write, claim_output, file_id, read_csv, read_json, same_settings, save_numpy,
                           write_csv, write_text_atomic)
from ..utils.images import as_stored, save_png, to_uint
from .lco import (LCOPool, fixed_networks, format_target, log_prior, parse_target, satisfied, screen_starts,
                  target_tensors)
from ..nn.latents import check_truncation, latents_for

FORMATS = ("png8", "png16", "dicom")
log = logging.getLogger(__name__)


class LCOUnreachable(UserError, RuntimeError):
    """LCO could not reach a target within the allowed attempts."""


@dataclass
class SampleConfig:
    run: str
    out: str
    n: int
    seed: int = 0
    format: str = "png8"
    batch: int = 32
    truncation: float | None = None
    amp: str | None = None
    targets: list = field(default_factory=list)     # LCO target strings; empty = unconditional
    classifier: str | None = None
    steps: int = 100
    lr: float = 0.05
    prior_weight: float = 1.0
    starts: int = 16                # LCO starts from the best of this many draws per image (sample.lco.screen_starts)
    shard_size: int = 1000
    max_attempts: int = 1000        # LCO attempts allowed per wanted image before the target is declared unreachable
    give_up_after: int = 300        # ... or after this many attempts without an image, while the archive
                                    # holds none of the target (0: never)
    device: str | None = None
    encode_threads: int = 4


def stored_probabilities(classifier, images: torch.Tensor, bits: int, device=None) -> torch.Tensor:
    """The classifier's probabilities of ``images`` (in [-1, 1]) as a file of ``bits`` per pixel
    holds them: clamped to [-1, 1] and quantised as ``to_uint`` does, run on ``device`` (default: the
    images'), in float32."""
    stored = as_stored(images, bits)  # on the images' device: no round trip through the host
    with torch.no_grad():
        return torch.sigmoid(classifier(stored.to(device or images.device)).float())


def find_generator(run: str | os.PathLike) -> Path:
    """The checkpoint folder to sample from (a checkpoint, or a run folder's latest)."""
    return find_checkpoint(run)


def write_dicom(path: Path, pixels: np.ndarray, comment: str) -> None:
    """A DICOM Secondary Capture image that says it is synthetic and carries no patient identity."""
    import datetime

    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    from .. import __version__

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    now = datetime.datetime.now()
    ds.ContentDate, ds.ContentTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    ds.Modality, ds.ConversionType = "OT", "SYN"
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "", "", "", ""
    ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName, ds.StudyDate, ds.StudyTime = "", "", "", "", ""
    ds.SeriesNumber, ds.InstanceNumber = 1, 1
    ds.SeriesDescription = "SYNTHETIC IMAGE - xrayforge generator, not a patient"
    ds.ImageComments = comment
    ds.BurnedInAnnotation = "NO"
    # for a PACS or a de-identification check: no patient's data in it, and what made it
    ds.PatientIdentityRemoved, ds.DeidentificationMethod = "YES", "synthetic image, generated: no patient"
    ds.Manufacturer, ds.SoftwareVersions = "xrayforge", __version__
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    bits = 8 if pixels.dtype == np.uint8 else 16
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits, bits - 1, 0
    ds.PixelData = pixels.tobytes()
    atomic_write(path, lambda p: ds.save_as(p, enforce_file_format=True))


def _checkpoint_id(folder: Path) -> str:
    """A checkpoint by its contents (its names are image counts, which runs of one schedule share)."""
    return file_id(folder / "networks.pt", length=16)


# the most images one archive holds (already petabytes of 1024-px PNGs)
MAX_IMAGES = 10 ** 9

# LCO's starting-latent streams begin here, apart from the seeds a user gives (unconditional
# archives, FID and diversity of a checkpoint draw image k from latent_for(seed, k)): from 1 up
# instead, an LCO archive of --seed 0 started from the latents of an unconditional --seed 1, and the
# two were correlated. Exact in float64 (a manifest read as numbers) for seeds below 8e9.
LCO_STREAMS = 1 << 40


def _lco_seed(seed: int, shard: int, target: int, n_targets: int, apart: bool = True) -> int:
    """Seed of the starting-latent stream of one (shard, target); ``apart=False``: as archives
    begun before the streams were set apart (kept by them: their rest is made as they began)."""
    return (LCO_STREAMS if apart else 0) + seed * 1_000_003 + shard * n_targets + target + 1


def _archive_size(cfg: SampleConfig) -> int:
    """The images of the whole archive: --n, for each LCO target where there are targets."""
    return cfg.n * max(1, len(cfg.targets))


# below this validation AUROC a target finding is said to be one the classifier calls about at chance
NEAR_CHANCE_AUROC = 0.6


def _validation_auroc(folder) -> dict[str, float]:
    """{finding: validation AUROC} of a classifier at the epoch it kept, from the training.json that
    `classify train` writes beside it; {} where there is none (a classifier trained elsewhere) or it
    cannot be read (it only feeds a warning)."""
    path = Path(folder) / "training.json"
    if not path.is_file():
        return {}
    try:
        record = read_json(path, "the classifier's training record")
        kept = next(h for h in record["history"] if h["epoch"] == record["best_epoch"])
        return {f: float(v) for f, v in kept["auroc"].items()
                if isinstance(v, (int, float)) and not isinstance(v, bool)}
    except (UserError, KeyError, TypeError, ValueError, AttributeError, StopIteration):
        return {}


class ArchiveSampler:
    def __init__(self, cfg: SampleConfig, progress: bool = True):
        if cfg.format not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, got {cfg.format!r}")
        if cfg.n < 1:
            raise ValueError(f"--n must be at least 1, got {cfg.n}")
        if _archive_size(cfg) > MAX_IMAGES:  # the shard list alone would fill the memory first
            raise ValueError(f"--n {cfg.n}{f' for each of {len(cfg.targets)} targets' if cfg.targets else ''}: "
                             f"at most {MAX_IMAGES:,} images in one archive")
        if cfg.starts < 1:
            raise ValueError(f"--starts must be at least 1, got {cfg.starts}")
        self.cfg, self.progress = cfg, progress
        self.device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.out = Path(cfg.out)
        self.settings_path = self.out / "sample_config.json"
        self.ckpt = self._checkpoint()
        self._G = None  # loaded when a shard is to be made (a finished archive only re-summarises)
        self.classifier = None
        if cfg.classifier:
            from ..nn.classifier import load_classifier
            self.classifier = load_classifier(cfg.classifier).to(self.device).eval().requires_grad_(False)
        if cfg.targets and self.classifier is None:
            raise ValueError("LCO targets need --classifier MODEL")
        self._check_channels()
        self.findings = self.classifier.findings if self.classifier is not None else []
        self.targets = [parse_target(t, self.findings) for t in cfg.targets]
        seen = {}
        for text, t in zip(cfg.targets, self.targets):
            same = frozenset(t.items())  # in whatever order the findings are named
            if same in seen:  # --n is per target: two of one would silently double it
                raise ValueError(f"--lco {text!r} is the same target as --lco {seen[same]!r}")
            seen[same] = text
        known = getattr(getattr(self.classifier, "config", self.classifier), "thresholds", None) or {}
        for t in self.targets:
            blind = [f for f, v in t.items() if v == 1 and f not in known]
            if blind:
                log.warning("the classifier %s has no decision threshold for %s (none of its validation images "
                            "had the finding, so it may never have learnt it): LCO aims at p >= 0.5 there, which "
                            "it may not reach", cfg.classifier, ", ".join(blind))
        auroc = _validation_auroc(cfg.classifier) if self.targets else {}
        guessed = sorted({f for t in self.targets for f in t if auroc.get(f, 1.0) < NEAR_CHANCE_AUROC},
                         key=self.findings.index)
        if guessed:  # LCO steers by the classifier's gradient: where it cannot tell the finding, by noise
            log.warning("the classifier %s tells %s from its absence at about chance on its validation images "
                        "(AUROC %s): LCO can hardly steer towards a target there, and its labels there are guesses",
                        cfg.classifier, ", ".join(guessed), ", ".join(f"{auroc[f]:.2f}" for f in guessed))
        check_truncation(cfg.truncation, "--truncation")
        self.amp = torch.bfloat16 if cfg.amp in ("bf16", "bfloat16") else None
        self.rejected = {format_target(t): 0 for t in self.targets}  # LCO attempts given up, this run
        self.bar = None  # the progress bar while run() writes shards (LCO says its attempts there)
        self.streams_apart = True  # run() keeps an archive begun before LCO_STREAMS on its old streams
        self.reached = {format_target(t): False for t in self.targets}  # the archive holds an image of it

    def _check_channels(self) -> None:
        """Refuse, before anything is written, what a colour (multi-channel) generator's images cannot
        be: 16-bit PNG (Pillow writes no 16-bit colour PNG), DICOM (written here as one grey channel),
        or the input of a classifier of grey images. Else its first shard would fail once made."""
        if (self.cfg.format == "png8" and self.classifier is None) or not (self.ckpt / "networks.json").is_file() \
                or self._complete():  # a finished archive is only re-summarised
            return
        from ..nn.checkpoint import read_metadata
        info = read_metadata(self.ckpt)["networks"].get("G_ema", {})
        channels = int(info.get("config", {}).get("image_channels", 1))
        if channels == 1:
            return
        why = (f"--format {self.cfg.format} writes one grey channel (png8 writes colour)" if self.cfg.format != "png8"
               else f"the classifier {self.cfg.classifier} takes grey (one-channel) images")
        raise UserError(f"{self.ckpt}: its generator makes {channels}-channel images, and {why}")

    @property
    def G(self):
        if self._G is None:
            self._G = load_networks(self.ckpt, names=["G_ema"], map_location=self.device)["G_ema"].eval()
            self._G.requires_grad_(False)
        return self._G

    def _shards(self) -> list[range]:
        total = _archive_size(self.cfg)
        S = self.cfg.shard_size
        return [range(s * S, min((s + 1) * S, total)) for s in range((total + S - 1) // S)]

    def _complete(self) -> bool:
        return all((self.out / f"shard-{s:05d}.csv").is_file() for s in range(len(self._shards())))

    def _begun(self) -> bool:
        """Whether any shard is finished: before that, the archive's saved settings and pinned
        checkpoint bind nothing (a run that failed at its first batch, out of GPU memory, is run
        again with another --batch, or with another --steps after an unreachable target)."""
        return any(self.out.glob("shard-*.csv"))

    def _settings(self) -> dict:
        out = {k: v for k, v in asdict(self.cfg).items()
               if k not in ("device", "encode_threads", "out", "max_attempts", "give_up_after")}
        if not self.cfg.targets:
            out["starts"] = 1  # no LCO: the number of starting draws changes nothing
        else:  # LCO accepts an image met as stored, and takes another step for one met only as G gave it
            out["lco_accepts_as_stored"] = True
            out["lco_streams_apart"] = True  # LCO_STREAMS (archives before: not)
            if self.cfg.truncation is not None:  # LCO keeps truncated latents truncated (archives before: not)
                out["lco_keeps_truncation"] = True
        # the classifier by its contents: another model at the same path would label and steer the
        # rest of the archive differently
        out["classifier_id"] = file_id(Path(self.cfg.classifier) / "classifier.pt",
                                       Path(self.cfg.classifier) / "classifier.json", length=16) \
            if self.cfg.classifier else None
        return out

    def _checkpoint(self) -> Path:
        """The generator's checkpoint: the one this archive was started from, else the run's newest
        (chosen by process 0 under torchrun, so that every process samples from the same one)."""
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            chosen = [None]
            if dist.get_rank() == 0:
                try:
                    chosen = [str(self._choose_checkpoint())]
                except (UserError, FileNotFoundError) as exc:
                    chosen = [exc]
            dist.broadcast_object_list(chosen, 0)
            if isinstance(chosen[0], Exception):
                raise UserError(str(chosen[0]))
            return Path(chosen[0])
        return self._choose_checkpoint()

    def _choose_checkpoint(self) -> Path:
        saved = read_json(self.settings_path, "the archive's sampling settings") if self.settings_path.is_file() else None
        if saved is None or "checkpoint" not in saved or not self._begun():
            return find_generator(self.cfg.run)
        pinned = Path(saved["checkpoint"])
        want = saved.get("checkpoint_id")  # its contents (archives since checkpoint ids were kept)
        found_by_id = False
        if not (pinned / "networks.json").is_file() and want:  # the run moved: the same checkpoint in it
            for there in (Path(self.cfg.run), Path(self.cfg.run) / "checkpoints" / pinned.name):
                if there.name == pinned.name and (there / "networks.json").is_file() and _checkpoint_id(there) == want:
                    pinned, found_by_id = there, True
                    break
        if not (pinned / "networks.json").is_file() and not self._complete():
            raise UserError(f"{self.out} was started from the checkpoint {pinned}, which is gone (rotated away?)"
                            + (f" and is not in {self.cfg.run}" if want else "")
                            + "; continuing it with another would mix generators in one archive: choose a new --out")
        if want and not found_by_id and (pinned / "networks.json").is_file() and _checkpoint_id(pinned) != want \
                and not self._complete():
            raise UserError(f"{self.out} was started from the checkpoint {pinned}, which now holds other weights "
                            f"(a run started again in its folder?); continuing would mix generators in one "
                            f"archive: choose a new --out")
        try:
            newest = find_generator(self.cfg.run).resolve()
        except (FileNotFoundError, ValueError):
            newest = None
        if newest != pinned.resolve() and not self._complete():  # a complete archive is only re-summarised
            log.warning("%s was started from %s; finishing it with that checkpoint, not %s (a new --out samples "
                        "from the newer one)", self.out, pinned, newest or self.cfg.run)
        return pinned

    # ------------------------------------------------------------------ one shard
    def _generate(self, z: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
            return self.G(z.to(self.device)).float()

    def _probs(self, images: torch.Tensor) -> torch.Tensor | None:
        """The classifier's probabilities of ``images`` as the files hold them, on the device: the
        manifest describes the written pixels."""
        if self.classifier is None:
            return None
        return stored_probabilities(self.classifier, images, self._bits, self.device)

    @property
    def _bits(self) -> int:
        """Bits per pixel of the written files (DICOM: 8)."""
        return 16 if self.cfg.format == "png16" else 8

    def _unconditional_shard(self, s: int, slots: range):
        rows, latents, pixels = [], [], []
        for start in range(0, len(slots), self.cfg.batch):
            idx = list(slots[start:start + self.cfg.batch])
            z = latents_for(self.cfg.seed, idx, self.G.config.latent_dim, self.cfg.truncation)
            img = self._generate(z)
            probs = self._probs(img)
            probs = probs.cpu() if probs is not None else None  # one copy per batch, not one per value
            for j, k in enumerate(idx):
                rows.append({"index": k, "seed": self.cfg.seed, "latent_seed": self.cfg.seed, "latent_index": k,
                             "target": "", "lco_steps": 0,
                             # unrounded: a 6-digit rounding could carry p across its threshold
                             **({f"p_{f}": float(probs[j, q]) for q, f in enumerate(self.findings)}
                                if probs is not None else {})})
            latents.append(z.cpu())
            pixels.append(to_uint(img, self._bits))  # a shard is held as the files' integers, not as floats
        return rows, torch.cat(latents), np.concatenate(pixels)

    def _lco_shard(self, s: int, slots: range):
        """A shard's LCO images. Attempts finish out of order (accepted ones early, rejected ones after
        --steps), so each target is settled in attempt order: its images are its first accepted
        attempts, and its rejections are the attempts before the last of those that failed; an attempt
        can only be dropped unfinished once enough earlier ones are accepted. What a shard holds thus
        depends only on which attempts succeed, not on when."""
        T = len(self.targets)
        slots_of = {t: [k for k in slots if k % T == t] for t in range(T)}
        need = {t: len(slots_of[t]) for t in range(T)}
        got: dict[int, list] = {t: [] for t in range(T)}
        outcome: dict[int, dict] = {t: {} for t in range(T)}   # attempt -> None (rejected) or the image's data
        settled = {t: 0 for t in range(T)}                      # attempts before this one are settled
        next_attempt = {t: 0 for t in range(T)}
        # (values, mask, thresholds) of each target, built once for all its attempts
        aims = {t: target_tensors(self.targets[t], self.findings, self.classifier.threshold) for t in range(T)}
        S = self.cfg.starts  # attempt a of a target draws latents a*S .. a*S + S - 1 of its seed
        limit = {t: self.cfg.max_attempts * need[t] for t in range(T)}
        shown = [time.monotonic()]

        def is_open(t: int) -> bool:
            return len(got[t]) < need[t]

        def wanted(t: int, a: int) -> bool:
            """Whether attempt a of target t could still fill one of its images."""
            if not is_open(t):
                return False
            earlier = len(got[t]) + sum(1 for b, o in outcome[t].items() if settled[t] <= b < a and o is not None)
            return earlier < need[t]

        def hungry(t: int) -> bool:  # more attempts could help: open, and not enough accepted ones yet
            accepted = len(got[t]) + sum(1 for o in outcome[t].values() if o is not None)
            return is_open(t) and accepted < need[t] and next_attempt[t] < limit[t]

        def settle(t: int) -> None:
            while settled[t] in outcome[t] and is_open(t):
                o = outcome[t].pop(settled[t])
                if o is None:
                    self.rejected[format_target(self.targets[t])] += 1
                else:
                    got[t].append(o)
                settled[t] += 1
            if not is_open(t):
                outcome[t].clear()
            elif (not got[t] and self.cfg.give_up_after and settled[t] >= self.cfg.give_up_after
                  and s == t // self.cfg.shard_size and not self.reached[format_target(self.targets[t])]):
                # not one image in this many attempts, and none in the archive: at the LCO hit rates of a
                # reachable target (tens of percent) that does not happen; rather than run --max-attempts
                # per image, stop. Only in the target's first shard (the one holding its first slot, t): one
                # process meets its later shards after that one, and under torchrun another process may
                # still be making it, so a later shard would give up where one process goes on
                raise LCOUnreachable(
                    f"LCO target {format_target(self.targets[t])!r}: no image reached its target in the first "
                    f"{settled[t]} attempts (shard {s}), and the archive has none; {raise_steps()}, check "
                    f"that the classifier can see these findings (its thresholds: "
                    f"{self.cfg.classifier}/classifier.json), or let it try longer (--give-up-after)")
            show()

        def raise_steps() -> str:
            """The advice to raise --steps or --lr: an archive with a finished shard is continued only with
            the settings it was begun with, so there they take a new --out."""
            if not self._begun():
                return "raise --steps or --lr"
            return (f"raise --steps or --lr with a new --out ({self.out} has finished shards, and is continued only "
                    f"with the --steps and --lr it was begun with)")

        def show(final: bool = False) -> None:
            """Each target's counts on the progress bar: every half second while the shard works (a long
            shard shows it is working), and once more when it is done, else the bar keeps a stale line."""
            if self.bar is None or not (final or time.monotonic() - shown[0] > 0.5):
                return
            shown[0] = time.monotonic()
            self.bar.set_postfix_str(", ".join(
                f"{format_target(self.targets[u])}: {len(got[u])}/{need[u]} of {settled[u]} tried" for u in range(T)))

        def attempts():
            """Blocks of about --batch attempts over the targets that need more, their starts screened
            together; keyed (target, attempt, latent seed, latent index of the start)."""
            while True:
                open_targets = [t for t in range(T) if hungry(t)]
                if not open_targets:
                    return
                per = max(1, self.cfg.batch // len(open_targets))
                batch_t, batch_a, batch_seed = [], [], []
                for t in open_targets:
                    for _ in range(min(per, limit[t] - next_attempt[t])):
                        batch_t.append(t)
                        batch_a.append(next_attempt[t])
                        batch_seed.append(_lco_seed(self.cfg.seed, s, t, T, self.streams_apart))
                        next_attempt[t] += 1
                candidates = torch.stack([latents_for(sd, range(a * S, (a + 1) * S), self.G.config.latent_dim,
                                                      self.cfg.truncation)
                                          for sd, a in zip(batch_seed, batch_a)]).to(self.device)
                values, mask, thresholds = (torch.stack([aims[t][i] for t in batch_t]).to(self.device)
                                            for i in range(3))
                chosen = screen_starts(self.G, self.classifier, candidates, values, mask, self.cfg.prior_weight,
                                       self.amp, batch=self.cfg.batch, thresholds=thresholds,
                                       truncation=self.cfg.truncation).tolist()
                for j, (t, sd, a, c) in enumerate(zip(batch_t, batch_seed, batch_a, chosen)):
                    yield (t, a, sd, a * S + c), candidates[j, c], values[j], mask[j], thresholds[j]

        # the pool refills as latents finish, so every evaluation runs a full batch while attempts last;
        # each accepted image goes to the host at once (a shard's worth stays there until it is written)
        # an image is accepted only if it meets its target as the file will hold it (clamped and quantised),
        # not only as G gave it: one that does not takes another step
        lco = LCOPool(self.G, self.classifier, self.cfg.batch, self.cfg.steps, self.cfg.lr, self.cfg.prior_weight,
                      self.amp, truncation=self.cfg.truncation, written=self._probs)
        for smp in lco.run(attempts(), keep=lambda key: wanted(key[0], key[1])):
            t, a, sd, index = smp.key
            if not is_open(t):
                continue
            outcome[t][a] = (sd, index, smp.steps, smp.probs.tolist(), smp.z.to("cpu", copy=True),
                             to_uint(smp.image[None], self._bits)[0]) if smp.accepted else None
            settle(t)
        show(final=True)
        for t in range(T):
            if is_open(t):
                raise LCOUnreachable(
                    f"LCO target {format_target(self.targets[t])!r}: only {len(got[t])} of {need[t]} images reached "
                    f"after {next_attempt[t]} attempts in shard {s}; {raise_steps()}, or check that the "
                    f"classifier can see these findings (its thresholds: {self.cfg.classifier}/classifier.json)")
        rows, latents, pixels = [], [], []
        for t in range(T):
            for k, (sd, a, steps, probs, z, image) in zip(slots_of[t], got[t]):
                rows.append({"index": k, "seed": self.cfg.seed, "latent_seed": sd, "latent_index": a,
                             "target": format_target(self.targets[t]), "lco_steps": steps,
                             **{f"p_{f}": probs[q] for q, f in enumerate(self.findings)}})  # unrounded
                latents.append(z)
                pixels.append(image)
        order = np.argsort([r["index"] for r in rows])
        return [rows[i] for i in order], torch.stack(latents)[order], np.stack(pixels)[order]

    def _write_shard(self, s: int, slots: range, pool) -> None:
        folder = self.out / f"shard-{s:05d}"
        shutil.rmtree(folder, ignore_errors=True)  # an incomplete earlier attempt
        folder.mkdir(parents=True)
        # pixels as the files hold them (1000 8-bit images at 1024 px: 1 GB; as floats, quantised at once, 12.6 GB)
        rows, latents, pixels = (self._lco_shard if self.targets else self._unconditional_shard)(s, slots)
        futures = []
        for r, row in enumerate(rows):
            suffix = "dcm" if self.cfg.format == "dicom" else "png"
            path = folder / f"{row['index']:08d}.{suffix}"
            row["file"] = f"{folder.name}/{path.name}"
            row["latent_file"], row["latent_row"] = f"{folder.name}.latents.npy", r
            if self.cfg.format == "dicom":
                comment = f"Synthetic image {row['index']} (seed {row['seed']}); target {row['target'] or 'none'}"
                futures.append(pool.submit(write_dicom, path, pixels[r], comment))
            else:
                futures.append(pool.submit(save_png, pixels[r], path))
        for f in futures:
            f.result()
        for row in rows:
            if row["target"]:
                self.reached[row["target"]] = True
        save_numpy(self.out / f"{folder.name}.latents.npy", latents.numpy())
        write_text_atomic(self.out / f"{folder.name}.json", json.dumps({"rejected": self.rejected}))
        self.rejected = dict.fromkeys(self.rejected, 0)
        fields = ["file", "index", "seed", "latent_seed", "latent_index", "target", "lco_steps", "latent_file",
                  "latent_row"] + [f"p_{f}" for f in self.findings]
        write_csv(self.out / f"{folder.name}.csv", fields, rows)  # the shard is complete from here on

    # ------------------------------------------------------------------ the whole archive
    def run(self) -> dict:
        """Write every missing shard (under torchrun, process r writes shards r, r + world, ...),
        then (process 0) the merged manifest and the summary."""
        import torch.distributed as dist
        distributed = dist.is_available() and dist.is_initialized()
        rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
        settings = self._settings()
        # never into a prepared archive or a folder of the user's own files
        claim_output(self.out, "sample", signatures=("sample_config.json",))
        settings_path = self.settings_path
        saved = read_json(settings_path, "the archive's sampling settings") if settings_path.is_file() else {}
        begun = self._begun()  # every process decides before the barrier below, after which shards are written
        if saved and not begun:  # nothing was made with them: begun again with these (rank 0 rewrites the file)
            log.info("%s: no shard was finished: the archive is begun again with these settings", self.out)
            saved = {}
        if saved.get("classifier_id", settings["classifier_id"]) != settings["classifier_id"]:
            if not self.cfg.classifier or not saved.get("classifier_id"):
                was = f"--classifier {saved['classifier']}" if saved.get("classifier") else "no --classifier"
                now = f"--classifier {self.cfg.classifier}" if self.cfg.classifier else "none"
                raise UserError(f"{self.out} was sampled with {was}, now {now}: its images would be labelled "
                                f"inconsistently; choose a new --out, or continue with {was}")
            raise UserError(f"{self.out} was sampled with another classifier than the one at "
                            f"{self.cfg.classifier or '(none)'} (saved: {saved.get('classifier') or '(none)'}; the "
                            f"files differ): the rest of the archive would be steered and labelled by another "
                            f"model; choose a new --out, or continue with the classifier it was begun with")
        # the generator is the pinned checkpoint, known by its contents, and the classifier by its
        # contents, whatever paths name them now (a run moved, a path spelt differently); archives
        # from before those were kept compare the paths. Archives begun before --starts existed
        # were made with one draw per attempt.
        ignore = ["checkpoint", "checkpoint_id"]
        ignore += ["run"] if saved.get("checkpoint_id") else []
        if not self.cfg.targets:  # unused without LCO; the batch moves no image by more than float rounding
            ignore += ["steps", "lr", "prior_weight", "batch"]
        ignore += ["classifier"] if "classifier_id" in saved else ["classifier_id"]
        if saved and "lco_keeps_truncation" in settings and not saved.get("lco_keeps_truncation") \
                and saved.get("targets") == settings["targets"] and saved.get("truncation") == settings["truncation"]:
            raise UserError(f"{self.out} was begun by an earlier xrayforge whose LCO let truncated latents leave "
                            f"±{self.cfg.truncation} (this one keeps them within it): the rest of the archive would be "
                            f"made otherwise, so it cannot be continued; choose a new --out")
        if saved and "lco_accepts_as_stored" in settings and "lco_accepts_as_stored" not in saved \
                and saved.get("targets") == settings["targets"] and rank == 0 and not self._complete():
            log.warning("%s was begun by an earlier xrayforge whose LCO rejected an image met as G gave it but not as "
                        "stored (this one takes another step): its shards so far hold other attempts and count "
                        "rejections otherwise than the rest will; every image meets its target as stored either "
                        "way", self.out)
        if saved and "lco_streams_apart" in settings and "lco_streams_apart" not in saved:
            # begun before LCO_STREAMS: its rest is drawn from the streams it began with, so that it is
            # the archive an uninterrupted run would have made
            settings.pop("lco_streams_apart")
            self.streams_apart = False
        # an LCO archive from before the rule was kept is continued (said above); unconditional ones have no rule
        added = {"starts": 1, **({"lco_accepts_as_stored": True} if "lco_accepts_as_stored" in settings else {})}
        if begun:
            same_settings(settings_path, settings, ignore=tuple(ignore), added=added)
        if distributed:
            dist.barrier()
        if rank == 0:
            write_text_atomic(settings_path, json.dumps({
                **settings, "checkpoint": str(self.ckpt.resolve()),
                "checkpoint_id": saved.get("checkpoint_id") or _checkpoint_id(self.ckpt)}, indent=2))
        shards = self._shards()
        total = shards[-1].stop
        from tqdm import tqdm
        done = [s for s in range(len(shards)) if (self.out / f"shard-{s:05d}.csv").is_file()]
        for s in done:
            for row in read_csv(self.out / f"shard-{s:05d}.csv", ("file", "target"), "a shard of the sampled archive")[0]:
                if row["target"] in self.reached:
                    self.reached[row["target"]] = True
        t0 = time.perf_counter()
        made = 0
        with cf.ThreadPoolExecutor(self.cfg.encode_threads) as pool, \
                tqdm(total=total, initial=sum(len(shards[s]) for s in done), unit="img", desc="sample",
                     disable=not self.progress or rank != 0, dynamic_ncols=True) as bar:
            self.bar = bar if self.progress and rank == 0 else None
            for s, slots in enumerate(shards):
                if s in done or s % world != rank:
                    continue
                self._write_shard(s, slots, pool)
                made += len(slots)
                bar.update(len(slots) * world)
        elapsed = time.perf_counter() - t0
        if distributed:  # wait for every shard; add up what the processes made
            made_t = torch.tensor([float(made)], dtype=torch.float64,
                                  device=self.device if dist.get_backend() == "nccl" else "cpu")
            dist.all_reduce(made_t)
            made = int(made_t.item())
            dist.barrier()
            if rank != 0:
                return {"out": str(self.out), "rank": rank}
        rows, rejected, counted = [], {}, True
        for s in range(len(shards)):
            rows.extend(read_csv(self.out / f"shard-{s:05d}.csv", ("file", "index", "target", "lco_steps"),
                                 "a shard of the sampled archive")[0])
            part = self.out / f"shard-{s:05d}.json"
            counted &= part.is_file()  # shards written before rejections were kept: the total is unknown
            for key, n in (read_json(part, "a shard's LCO counts").get("rejected", {}) if part.is_file() else {}).items():
                rejected[key] = rejected.get(key, 0) + int(n)
        write_csv(self.out / "manifest.csv", list(rows[0].keys()), rows)
        summary = {"out": str(self.out), "images": len(rows), "checkpoint": str(self.ckpt), "format": self.cfg.format,
                   # this run's own speed (None when it had nothing left to sample)
                   "images_this_run": made,
                   "images_per_second": made / elapsed if elapsed > 0 and made else None, "targets": {},
                   # the decision thresholds that turn the manifest's p_<finding> columns into labels
                   "thresholds": {f: self.classifier.threshold(f) for f in self.findings}}
        for t in self.targets:  # the whole archive, from its manifest and every shard's rejections
            key = format_target(t)
            mine = [r for r in rows if r["target"] == key]
            acc, rej = len(mine), rejected.get(key, 0) if counted else None
            summary["targets"][key] = {
                "accepted": acc, "rejected": rej,
                "acceptance_rate": acc / (acc + rej) if rej is not None and acc + rej else None,
                "mean_steps": float(np.mean([int(r["lco_steps"]) for r in mine])) if mine else None,
                # the classifier's mean probability of what the target asks (1 - p for a finding asked absent)
                "mean_target_probability": float(np.mean([np.mean([float(r[f"p_{f}"]) if v else 1 - float(r[f"p_{f}"])
                                                                   for f, v in t.items()]) for r in mine]))
                if mine else None}
        write_text_atomic(self.out / "summary.json", json.dumps(summary, indent=2))
        return summary


def sample_archive(cfg: SampleConfig, progress: bool = True) -> dict:
    return ArchiveSampler(cfg, progress).run()


def rejection_sample(G, classifier, target: dict, seed: int, n: int, batch: int = 64, device=None, amp=None,
                     keep_images: bool = False) -> dict:
    """The baseline: generate n images, classify, keep those that meet the target."""
    device = device or next(G.parameters()).device
    values, mask, thr = target_tensors(target, classifier.findings, classifier.threshold)
    hits, t0, kept = 0, time.perf_counter(), []
    for start in range(0, n, batch):
        idx = list(range(start, min(start + batch, n)))
        z = latents_for(seed, idx, G.config.latent_dim).to(device)
        with torch.no_grad(), torch.autocast(device.type, dtype=amp, enabled=amp is not None), \
                fixed_networks(G, classifier):  # not the training-mode batch norm of a caller's networks
            images = G(z)
            probs = torch.sigmoid(classifier(images).float())
        ok = satisfied(probs, values.to(device), mask.to(device), thr.to(device))
        hits += int(ok.sum())
        if keep_images:
            kept.append(images[ok].float().cpu())
    dt = time.perf_counter() - t0
    out = {"generated": n, "accepted": hits, "hit_rate": hits / n, "seconds": dt, "accepted_per_second": hits / dt}
    if keep_images:
        out["images"] = torch.cat(kept) if kept else torch.empty(0)
    return out


__all__ = ["SampleConfig", "sample_archive", "rejection_sample", "write_dicom", "find_generator", "log_prior",
           "stored_probabilities"]
