"""Features and FID from folders, archives, statistics files and generator checkpoints.

Decoding runs in DataLoader workers, batches are pinned and copied without blocking, and the
GPU preprocesses (fused kernel), runs the Inception and accumulates float64 moments while the
workers decode the next batches. Under torchrun each process takes every world-th image and
the moments are merged at the end. Images that cannot be read are listed and skipped.

``compute_fid`` checks both inputs before it reads either (a typo in B, an empty folder, a
checkpoint without ``n``, statistics of another feature size are said at once, not after A's
images went through the network), reads an input given twice once, and when B fails after A's
moments are computed, keeps them in a statistics file that ``fid`` takes as an input.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import re
import shlex
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..data.archive import Archive
from ..data.readers import SkipImage, find_images, iter_images, one_per_file, read_radiograph
from ..errors import UserError
from .features import DEFAULT, feature_space, same_space
from .stats import FrechetStats, NonFiniteFeatures, StreamingMoments, frechet_distance

log = logging.getLogger(__name__)


@dataclass
class FeatureResult:
    stats: FrechetStats
    features: np.ndarray | None = None      # a uniform sample of the features (for KID / bootstrap)
    skipped: list = field(default_factory=list)
    kind: str = ""


def _rank_world() -> tuple[int, int]:
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _FileDataset(torch.utils.data.Dataset):
    def __init__(self, files):
        self.files = files

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        try:
            return i, torch.from_numpy(read_radiograph(self.files[i]).pixels), None
        except SkipImage as exc:
            return i, None, str(exc)


def stored_pixels(arr: np.ndarray) -> torch.Tensor:
    """Archive pixels as a tensor the preprocessing takes (uint16, which torch barely supports, as int32)."""
    return torch.from_numpy(arr.astype(np.int32) if arr.dtype == np.uint16 else arr)


def stored_grey(u8: torch.Tensor) -> torch.Tensor:
    """8-bit generator images (N, C, H, W) -> (N, H, W) uint8 as a folder of `sample`'s PNGs is read:
    a colour generator's RGB files become Pillow's luminance (``convert("L")``, in its integer
    arithmetic), not their first (red) channel."""
    if u8.shape[1] != 3:
        return u8[:, 0]
    r, g, b = u8.to(torch.int32).unbind(1)
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).to(torch.uint8)


class _ArchiveDataset(torch.utils.data.Dataset):
    def __init__(self, archive: Archive, positions):
        self.archive, self.positions = archive, positions

    def __len__(self):
        return len(self.positions)

    def __getitem__(self, i):
        return i, stored_pixels(self.archive.images([self.positions[i]], self.archive.resolution)[0]), None


def _collate(items):
    """In the decode worker: (indices of the readable images, the images, [(index, reason)] of the
    others). The images travel in one tensor a batch (stacked, or for images of different sizes
    flattened into one buffer with their shapes), not one a image: each tensor a worker returns holds
    a file descriptor until the main process takes it, and batch × workers × 2 prefetched of them
    (512 × 2 × 2, or 64 × 16 × 2) pass the usual limit of 1024 open files ("Too many open files")."""
    good = [(i, t) for i, t, _ in items if t is not None]
    skips = [(i, err) for i, t, err in items if t is None]
    tensors = [t for _, t in good]
    if not tensors:
        images = None
    elif len({(tuple(t.shape), t.dtype) for t in tensors}) == 1:
        images = torch.stack(tensors)
    elif len({t.dtype for t in tensors}) == 1:
        images = (torch.cat([t.reshape(-1) for t in tensors]), [tuple(t.shape) for t in tensors])
    else:
        images = tensors
    return [i for i, _ in good], images, skips


def _unpack(images) -> torch.Tensor | list:
    """A batch as ``_collate`` packed it -> one tensor (one size) or a list of images (several)."""
    if isinstance(images, tuple):
        flat, shapes = images
        sizes = [int(np.prod(s)) for s in shapes]
        return [part.view(s) for part, s in zip(flat.split(sizes), shapes)]
    return images


def describe(spec: str) -> str:
    """What kind of input ``spec`` is: stats, archive, checkpoint or folder."""
    p = Path(spec)
    if p.suffix == ".npz":
        return "stats"
    if (p / "archive.json").is_file():
        return "archive"
    if (p / "networks.json").is_file() or (p / "checkpoints").is_dir():
        return "checkpoint"
    if p.is_dir() or p.is_file():
        return "folder"
    raise FileNotFoundError(f"{spec}: no such file or folder")


def _candidates(root: str | os.PathLike, most: int = 2) -> int:
    """How many files ``find_images(root)`` would list, counted to ``most`` (never listing them all)."""
    found = 0
    for _ in iter_images(root):
        found += 1
        if found >= most:
            break
    return found


def refuse_single_file(spec: str, kind: str) -> None:
    """A single file other than statistics (``describe`` calls it a folder) is no input: one image
    has no covariance."""
    if kind == "folder" and Path(spec).is_file():
        raise ValueError(f"{spec}: a single file, not a folder of images, an archive, a checkpoint or a .npz "
                         f"statistics file (an FID needs at least 2 images)")


def check_input(spec: str, n: int | None = None) -> tuple[str, str]:
    """(kind, what to read) of an input, after the checks that cost little, so that a bad B is said
    before A's images go through the network (minutes to hours), not after: a folder with no image
    files (or none that can be listed), an archive whose metadata, manifest or image array is
    damaged, a checkpoint without the number of images ``n``, a damaged checkpoint, or a run with
    no usable one (a checkpoint's weights are hashed once more: a second, against the minutes its
    images take). What to read: ``spec``, or for a training run the checkpoint chosen now (its
    newest intact one: the same one for the whole command, and checked once). A single file other
    than statistics is refused (one image has no covariance). Statistics files are only named
    here: their caller loads (and so checks) them."""
    kind = describe(spec)
    refuse_single_file(spec, kind)
    if kind == "folder":
        found = _candidates(spec)
        if not found:
            raise FileNotFoundError(f"{spec}: no image files")
        if found < 2:  # said before the other input is read, not after
            raise UserError(f"{spec}: one image file; a covariance (an FID) needs at least 2 images")
    if kind == "archive":
        arc = Archive(spec)
        arc.array(arc.resolution)
        if len(arc) < 2:
            raise UserError(f"{spec}: an archive of {len(arc)} image(s); a covariance (an FID) needs at least 2")
    if kind == "checkpoint":
        if not n:
            raise ValueError(f"{spec} is a generator checkpoint: give the number of images with --n")
        if n < 2:
            raise UserError(f"--n {n}: a covariance (an FID) needs at least 2 images of {spec}")
        from ..nn.checkpoint import damage, find_checkpoint
        folder = find_checkpoint(spec)  # a run's newest intact checkpoint (checked there)
        if (Path(spec) / "networks.json").is_file():  # a checkpoint folder itself: checked here
            problem = damage(folder)
            if problem:
                raise UserError(problem)
        return kind, str(folder)
    return kind, spec


def _same_source(a: str, b: str) -> bool:
    """Whether two inputs name the same file or folder (``imgs`` and ``./imgs/``, a link and its target)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _sample_keys(names, seed: int) -> np.ndarray:
    """A uniform key in [0, 1) per image, from its name (its file, archive source or latent index)
    and the seed alone: the features kept for KID, bootstrap intervals and precision / recall are
    the images with the smallest keys, a uniform sample whatever the order or the number of
    processes that read them."""
    import hashlib
    return np.array([int.from_bytes(hashlib.blake2b(f"{seed}:{n}".encode(), digest_size=8).digest(), "little")
                     / 2.0 ** 64 for n in names], dtype=np.float64)


def _smallest(pool: np.ndarray, keys: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k rows of smallest key, in key order."""
    order = np.argsort(keys, kind="stable")[:k]
    return pool[order], keys[order]


def _gather_kept(pool, keys, skipped: list, k: int):
    """Under torchrun: the k features of smallest key over every process, and every process's
    skipped files."""
    import torch.distributed as dist
    world = _rank_world()[1]
    if world > 1:
        got = [None] * world
        dist.all_gather_object(got, (pool, keys, skipped))
        skipped = [s for _, _, sk in got for s in sk]
        if pool is not None:
            pool, keys = np.concatenate([g[0] for g in got]), np.concatenate([g[1] for g in got])
    if pool is None:
        return None, skipped
    return _smallest(pool, keys, k)[0], skipped


def _evenly(items: list, limit: int | None) -> list:
    """``limit`` of ``items``, evenly spread over them, in their order (all where ``limit`` is None or
    not below their count): an archive's or a folder's images under a limit."""
    if limit is None or limit >= len(items):
        return items
    return [items[i] for i in sorted({int(i) for i in np.linspace(0, len(items) - 1, limit)})]


class FeatureExtractor:
    """Features of a feature space (``fid.features``: Inception by default) -> streaming moments,
    for any kind of input. Statistics it makes carry the space's name."""

    def __init__(self, inception: str | None = None, random_weights: bool = False, mode: str | None = "exact",
                 device: str | None = None, batch_size: int = 64, workers: int = 4, progress: bool = True,
                 keep_features: int = 0, seed: int = 0, features: str | None = None):
        mode = mode or "exact"  # None: not asked for (the command line's default)
        if mode not in ("exact", "fast"):
            raise ValueError(f"mode must be 'exact' or 'fast', got {mode!r}")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.mode, self.batch_size, self.workers, self.progress = mode, batch_size, workers, progress
        self.keep_features, self.seed = keep_features, seed
        self.random_weights = random_weights
        self.space = feature_space(features, inception, random_weights, mode, self.device)
        self.dim = self.space.dim

    @property
    def model(self):  # the Inception network (the benchmark times it alone)
        return self.space.model

    @property
    def space_name(self) -> str:
        return self.space.name

    def describe_space(self) -> str:
        """What the distances were measured in, for reports."""
        if self.space.name == "inception-random":
            return "random weights: a pipeline check, not a comparable FID"
        if self.space.name == "inception":
            return "pt_inception-2015-12-05 (pytorch-fid compatible)"
        return self.space.source

    def features(self, images) -> torch.Tensor:
        """Stored pixels (N, H, W[, 3]) (uint8/uint16/int32 or float in [0, 1]) -> (N, dim) float32; or
        a list of images (H, W[, 3]) of different sizes: each made the network's input alone (the same
        size for all), then one batch through the network."""
        if isinstance(images, list):  # grey and colour images may give inputs of other channels: one run each
            inputs = [self.space.inputs(t.unsqueeze(0)) for t in images]
            groups: dict[tuple, list[int]] = {}
            for i, x in enumerate(inputs):
                groups.setdefault(tuple(x.shape[1:]), []).append(i)
            if len(groups) == 1:
                return self.space.embed(torch.cat(inputs))
            out = [None] * len(inputs)
            for idx in groups.values():
                for i, f in zip(idx, self.space.embed(torch.cat([inputs[i] for i in idx]))):
                    out[i] = f
            return torch.stack(out)
        return self.space(images)

    def _bar(self, total, desc):
        from tqdm import tqdm
        return tqdm(total=total, unit="img", desc=desc, disable=not self.progress, dynamic_ncols=True)

    def _consume(self, batches, total: int, desc: str, kind: str, source: str = "") -> FeatureResult:
        """``source``: the input, named in the error when too few of its images could be read."""
        moments = StreamingMoments(self.dim, self.device)
        keep, keys, seen = [], [], 0
        skipped = []
        with self._bar(total, desc) as bar:
            for images, names, skips in batches:
                skipped.extend(skips)
                bar.update(len(skips))
                if images is None or len(images) == 0:
                    continue
                feats = self.features(images)
                try:
                    moments.update(feats)
                except NonFiniteFeatures as exc:  # said with the input and the images' names, not batch rows
                    raise UserError(f"{source or desc}: {exc.named(names)}") from None
                if self.keep_features:  # the images of smallest key: a uniform sample, bounded in memory
                    keep.append(feats.cpu().numpy())
                    keys.append(_sample_keys(names, self.seed))
                    seen += len(feats)
                    if seen > 2 * self.keep_features:
                        pool, pool_keys = _smallest(np.concatenate(keep), np.concatenate(keys), self.keep_features)
                        keep, keys, seen = [pool], [pool_keys], len(pool)
                bar.update(len(images))
        moments.all_reduce()
        features = None
        if self.keep_features:
            pool = np.concatenate(keep) if keep else np.zeros((0, self.dim), np.float32)
            pool_keys = np.concatenate(keys) if keys else np.zeros(0)
            features, skipped = _gather_kept(pool, pool_keys, skipped, self.keep_features)
            if len(features) == 0:
                features = None
        else:
            skipped = _gather_kept(None, None, skipped, 0)[1]
        if moments.n < 2:  # said with the input and why its images were skipped, not as a bare count
            why = "".join(f"; skipped {f}: {r}" for f, r in skipped[:3]) + (
                f"; ... and {len(skipped) - 3} more skipped" if len(skipped) > 3 else "")
            raise UserError(f"{source or desc}: {moments.n} readable image(s) ({len(skipped)} skipped): a covariance "
                            f"needs at least 2{why}")
        stats = moments.stats()
        stats.space = self.space.name
        stats.mode = self.mode if self.space.name.startswith("inception") else None  # the others have one mode
        return FeatureResult(stats, features, skipped, kind)

    def _loader(self, dataset):
        # no more decode processes than cores (more only thrash, and torch warns about them)
        return torch.utils.data.DataLoader(dataset, batch_size=self.batch_size,
                                           num_workers=min(self.workers, os.cpu_count() or 1),
                                           collate_fn=_collate, pin_memory=self.device.type == "cuda",
                                           persistent_workers=False)

    @staticmethod
    def _batches_from(loader, names):
        """(images, their names, skipped (name, reason) pairs) per batch."""
        for good, images, skipped in loader:
            skips = [(str(names[i]), err) for i, err in skipped]
            if images is None:
                yield None, [], skips
                continue
            # mixed sizes: a list, each image preprocessed alone, then one batch through the network
            # (its input has one size whatever the images')
            yield _unpack(images), [str(names[i]) for i in good], skips

    def image_batches(self, spec: str, limit: int | None = None, shard: bool = True):
        """(kind, image count, batches) of a folder or an archive (``limit``: that many of its images,
        evenly spread); this process's share under torchrun when ``shard``. Archive images are named
        by their manifest source."""
        rank, world = _rank_world() if shard else (0, 1)
        kind = describe(spec)
        linked = []
        if kind == "folder":
            # a file reached by two links is one image: counted twice it would weigh double
            every, linked = one_per_file(find_images(spec))
            if not every:
                raise FileNotFoundError(f"{spec}: no image files")
            # a process may have none when there are fewer images than processes
            names = _evenly(every, limit)[rank::world]
            dataset = _FileDataset(names)
        elif kind == "archive":
            arc = Archive(spec)
            arc.array(arc.resolution)  # a damaged array is said here, not from inside a decode worker
            positions = _evenly(list(range(len(arc))), limit)[rank::world]
            dataset = _ArchiveDataset(arc, positions)
            names = [arc.records[p]["source"] for p in positions]
        else:
            raise ValueError(f"{spec}: expected a folder of images or an archive, got a {kind}")
        batches = self._batches_from(self._loader(dataset), names)
        linked = [(o["source"], o["reason"]) for o in linked] if rank == 0 else []
        if linked:  # listed with the skipped files, by the first process alone
            batches = itertools.chain([(None, [], linked)], batches)
        return kind, len(names) + len(linked), batches

    def from_folder(self, path: str) -> FeatureResult:
        kind, total, batches = self.image_batches(path)
        return self._consume(batches, total, f"features {Path(path).name}", kind, str(path))

    def from_archive(self, path: str, limit: int | None = None) -> FeatureResult:
        """Features of the archive's images (``limit``: that many, evenly spread over it)."""
        kind, total, batches = self.image_batches(path, limit)
        return self._consume(batches, total, f"features {Path(path).name}", kind, str(path))

    def from_checkpoint(self, path: str, n: int, seed: int = 0, truncation: float | None = None) -> FeatureResult:
        """Features of n images from the EMA generator, made on the fly (never written);
        quantised to 8 bits like the PNGs `xrayforge sample` would write."""
        from ..nn import find_checkpoint, latents_for, load_networks
        rank, world = _rank_world()
        folder = find_checkpoint(path)
        G = load_networks(folder, names=["G_ema"], map_location=self.device)["G_ema"].eval()
        indices = list(range(n))[rank::world]

        def batches():
            for start in range(0, len(indices), self.batch_size):
                idx = indices[start:start + self.batch_size]
                z = latents_for(seed, idx, G.config.latent_dim, truncation).to(self.device)
                # "fast" makes the images in bf16 too (the features are bf16 then in any case)
                with torch.no_grad(), torch.autocast(self.device.type, dtype=torch.bfloat16,
                                                     enabled=self.mode == "fast"):
                    img = G(z).float()
                u8 = ((img + 1) * 127.5).round_().clamp_(0, 255).to(torch.uint8)
                yield stored_grey(u8), [f"latent {seed}:{i}" for i in idx], []

        return self._consume(batches(), len(indices), f"generate {folder.name}", "checkpoint", str(path))

    def compute(self, spec: str, n: int | None = None, seed: int = 0, limit: int | None = None) -> FeatureResult:
        """``n``: images to generate from a checkpoint; ``limit``: images to use from an archive."""
        kind = describe(spec)
        if kind == "stats":
            return FeatureResult(FrechetStats.load(spec), kind="stats")
        if kind == "archive":
            return self.from_archive(spec, limit)
        if kind == "checkpoint":
            if not n:
                raise ValueError(f"{spec} is a generator checkpoint: give the number of images with --n")
            return self.from_checkpoint(spec, n, seed)
        return self.from_folder(spec)


# --------------------------------------------------------------------------- KID and bootstrap
def kid(fa: np.ndarray, fb: np.ndarray, subsets: int = 100, subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
    """Kernel Inception Distance (unbiased MMD², cubic polynomial kernel): mean and std over subsets
    (std NaN when both sets fit in one subset: each subset is then the whole of both). A negative
    value is kept as it is: the estimate is unbiased, and two like sets give a little below 0."""
    if subsets < 1:
        raise ValueError(f"--kid {subsets}: KID needs at least 1 subset")
    m = min(subset_size, len(fa), len(fb))
    if m < 2:
        raise ValueError("KID needs at least 2 images on each side")
    rng = np.random.default_rng(seed)
    d = fa.shape[1]
    vals = []
    for _ in range(subsets):
        x = fa[rng.choice(len(fa), m, replace=False)].astype(np.float64)
        y = fb[rng.choice(len(fb), m, replace=False)].astype(np.float64)
        kxx, kyy, kxy = ((x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3)
        mmd = ((kxx.sum() - np.trace(kxx)) + (kyy.sum() - np.trace(kyy))) / (m * (m - 1)) - 2 * kxy.mean()
        vals.append(mmd)
    if m == len(fa) == len(fb):  # every subset is both whole sets: one value, and no spread to report
        return float(vals[0]), float("nan")
    return float(np.mean(vals)), float(np.std(vals))


def bootstrap_fid(fa: np.ndarray, fb: np.ndarray, rounds: int = 100, seed: int = 0,
                  device: str | None = None) -> tuple[float, float]:
    """95% bootstrap interval of the FID of two feature sets: each side's rows resampled with
    replacement ``rounds`` times (at least 2), the 2.5 and 97.5 percentiles of the resamples' FIDs,
    moved down by their mean excess over the FID of the sets themselves (clamped at 0). A resample
    repeats about a third of its rows, and fewer distinct rows raise an FID (its bias at small
    counts): unmoved, the interval lay above the FID it was for (at 5 images a feature dimension,
    the default 10,000 for Inception's 2048, by several times its own width)."""
    if rounds < 2:
        raise ValueError(f"--bootstrap {rounds}: a bootstrap interval needs at least 2 resamples (100 or more "
                         f"for a 95% interval worth the name)")
    point = frechet_distance(FrechetStats.from_features(fa), FrechetStats.from_features(fb), device)
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(rounds):
        a = fa[rng.integers(0, len(fa), len(fa))].astype(np.float64)
        b = fb[rng.integers(0, len(fb), len(fb))].astype(np.float64)
        vals.append(frechet_distance(FrechetStats.from_features(a), FrechetStats.from_features(b), device))
    excess = float(np.mean(vals)) - point
    lo, hi = np.percentile(vals, [2.5, 97.5]) - excess
    return max(float(lo), 0.0), max(float(hi), 0.0)


def compute_fid(a: str, b: str, n: int | None = None, kid_subsets: int = 0, bootstrap: int = 0,
                keep_features: int = 10000, seed: int = 0, save_stats: str | None = None, limit: int | None = None,
                prdc: bool = False, keep_a_dir: str | os.PathLike | None = None, **extractor_kwargs) -> dict:
    """FID (and optionally KID, a bootstrap interval, and precision / recall / density / coverage)
    between inputs ``a`` and ``b`` (``a`` the real side for ``prdc``), in the feature space
    ``features=`` (default Inception).

    Returns a dict with ``fid``, ``n_a``, ``n_b``, ``mode``, ``features`` (the space's name),
    ``inception`` (what the space is), ``skipped`` (unreadable files, each once: ``file``,
    ``reason`` and ``inputs``, the sides it was in, ``["a"]``, ``["b"]`` or both) and, when asked,
    ``kid``, ``kid_std``, ``fid_ci95``, ``precision``, ``recall``, ``density``, ``coverage`` (on
    up to ``keep_features`` features a side, a uniform sample).

    When both ``a`` and ``b`` are statistics files (.npz with mu and sigma) the distance is taken
    from them directly: no Inception network is built and no weights are looked for; they are
    compared in the feature space and mode they record, and ``features=``, ``random_weights=`` or
    ``mode=`` that ask for others are refused.

    Both inputs are checked (``check_input``) before either is read, and one folder or archive
    given on both sides is read once (its features would be the same twice: B's seed only moves
    a checkpoint's latents). When B fails after A's moments were computed (a damaged or
    unreadable B, Ctrl-C), A's statistics are kept for a rerun: in ``save_stats`` when given
    (written as soon as they are known), else in ``keep_a_dir`` (``fid-stats-<A>-<hash>.npz``;
    the system's temporary folder where ``keep_a_dir`` is inside an input or cannot be written;
    None: not kept), and a note on the error (``exc.__notes__``) says where and how to reuse
    them. Not with KID, bootstrap or --prdc: they need A's images, not its statistics.
    """
    if kid_subsets < 0:
        raise ValueError(f"--kid {kid_subsets}: the number of KID subsets must be 0 (no KID) or more")
    if bootstrap < 0 or bootstrap == 1:  # said before any image is read, not after both were
        raise ValueError(f"--bootstrap {bootstrap}: a bootstrap interval needs at least 2 resamples (0: none)")
    need = kid_subsets or bootstrap or prdc
    if prdc and keep_features <= 5:
        raise ValueError(f"--keep-features {keep_features}: --prdc needs more than 5 features a side (its density "
                         f"and coverage take 5 nearest neighbours)")
    if (kid_subsets or bootstrap) and keep_features < 2:  # one feature a side: a NaN covariance, eigh fails
        raise ValueError(f"--keep-features {keep_features}: KID and bootstrap intervals need at least 2 features "
                         f"a side")
    kinds = {spec: describe(spec) for spec in (a, b)}  # a missing input, either side: said before anything is read
    if save_stats and kinds[b] == "stats" and _same_source(save_stats, b):  # A's statistics would replace B's file
        raise UserError(f"--save-stats {save_stats} is B ({b}): writing A's statistics there would replace B's; "
                        f"give another path")
    if kinds[a] == kinds[b] == "stats":
        return _fid_of_stats_files(a, b, need, save_stats, extractor_kwargs)
    files = {spec: FeatureResult(FrechetStats.load(spec), kind="stats") for spec in (a, b) if kinds[spec] == "stats"}
    if need and files:  # said before any image is read
        raise ValueError(f"KID, bootstrap intervals and --prdc need images on both sides, not statistics files "
                         f"({', '.join(files)})")
    read = {spec: check_input(spec, n)[1] for spec in (a, b) if kinds[spec] != "stats"}  # before the weights too
    ex = FeatureExtractor(keep_features=keep_features if need else 0, **extractor_kwargs)
    # a statistics file of another feature space is said before any image is read (the extracted
    # side is in the extractor's space by construction)
    for spec, r in files.items():
        same_space(r.stats.space, ex.space_name, spec, "this command's features (--features, default inception)")
        if len(r.stats.mu) != ex.dim:  # e.g. pytorch-fid --dims 768: no space recorded, Inception's name taken
            raise UserError(f"{spec} holds statistics of {len(r.stats.mu)}-d features and this command's features "
                            f"({ex.space_name}) are {ex.dim}-d: they come from different feature spaces and cannot "
                            f"be compared")
        if r.stats.mode not in (None, ex.mode) and ex.space_name.startswith("inception"):
            log.warning("%s holds statistics of --mode %s, the other side is measured in --mode %s: fast and exact "
                        "features differ (about 0.005 FID on phantoms), so this FID mixes the two", spec,
                        r.stats.mode, ex.mode)

    def enough(spec: str, r: FeatureResult) -> None:
        """Said as soon as one side is read, not after the other's: too few images for what is asked."""
        if r.features is None:
            raise ValueError(f"{spec}: no features kept for KID, bootstrap intervals or --prdc")
        have = len(r.features)
        if prdc and have <= 5:
            raise ValueError(f"{spec}: {have} readable images; --prdc needs more than 5 a side (its density and "
                             f"coverage take 5 nearest neighbours)")
        if kid_subsets and have < 2:
            raise ValueError(f"{spec}: {have} readable image(s); KID needs at least 2 a side")

    ra = files.get(a) or ex.compute(read[a], n, seed, limit)
    saved = None
    if save_stats and _rank_world()[0] == 0:
        saved = ra.stats.save(save_stats)
    if need:
        enough(a, ra)
    if kinds[a] == kinds[b] and kinds[a] in ("folder", "archive") and _same_source(a, b):
        rb = ra  # the same images, read the same way (the limit is both sides'): the same features
    else:
        try:
            rb = files.get(b) or ex.compute(read[b], n, seed + 1, limit)
        except (Exception, KeyboardInterrupt) as exc:
            if ra.kind != "stats" and not need and _rank_world()[0] == 0:
                _keep_for_rerun(exc, a, b, kinds, ra.stats, saved, keep_a_dir,
                                [os.path.realpath(read[a]), ex.space_name, ex.mode, extractor_kwargs.get("inception"),
                                 (n, seed) if kinds[a] == "checkpoint" else None,
                                 limit if kinds[a] == "archive" else None])
            raise
        if need:
            enough(b, rb)
    _warn_few((a, ra.stats), (b, rb.stats))
    result = {"fid": frechet_distance(ra.stats, rb.stats, ex.device), "n_a": ra.stats.n, "n_b": rb.stats.n,
              "mode": ex.mode, "features": ex.space_name, "inception": ex.describe_space(),
              "skipped": _skipped_once(("a", ra.skipped), ("b", rb.skipped))}
    if prdc:
        from .prdc import prdc as prdc_of
        result.update(prdc_of(ra.features, rb.features))
    if kid_subsets:
        result["kid"], result["kid_std"] = kid(ra.features, rb.features, kid_subsets)
    if bootstrap:
        result["fid_ci95"] = list(bootstrap_fid(ra.features, rb.features, bootstrap, device=ex.device))
    return result


def _skipped_once(*sides) -> list[dict]:
    """The unreadable files of (side, [(file, reason)]) pairs, each once, with the sides it was in:
    one folder on both sides, or two that overlap, list a file once (it was listed once a side)."""
    out, seen = [], {}
    for side, skipped in sides:
        for f, reason in skipped:
            # the file's own path with its folder resolved (a link is not its target: a link to an unreadable
            # file is listed as a link, and the file with its own reason)
            key = os.path.join(os.path.realpath(os.path.dirname(os.path.abspath(f))), os.path.basename(f))
            if key in seen:
                if side not in seen[key]["inputs"]:
                    seen[key]["inputs"].append(side)
                continue
            seen[key] = {"file": f, "reason": reason, "inputs": [side]}
            out.append(seen[key])
    return out


def _inside(folder: Path, spec: str) -> bool:
    """Whether ``folder`` is the input ``spec`` (a folder) or below it."""
    try:
        Path(folder).resolve().relative_to(Path(spec).resolve())
    except (ValueError, OSError):
        return False
    return Path(spec).is_dir()


def _keep_for_rerun(exc: BaseException, a: str, b: str, kinds: dict, stats: FrechetStats, saved: Path | None,
                    folder: str | os.PathLike | None, identity: list) -> None:
    """B failed after A's statistics were computed: keep them (``saved``: already written by
    --save-stats; else a new file in ``folder``, or in the temporary folder where ``folder`` is
    inside an input or cannot be written), and add a note to ``exc`` saying where and how to use
    them. The file's name carries a hash of what made the statistics (A's real path, the feature
    space, mode, weights, a checkpoint's n and seed, an archive's limit): a rerun that fails again
    replaces its own file, never another A's, and nothing but a statistics file is replaced.
    Keeping them never hides B's error: a failure to write is said at WARNING."""
    if saved is None:
        if folder is None:
            return
        digest = hashlib.blake2b(json.dumps(identity, default=str).encode(), digest_size=4).hexdigest()
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(os.path.abspath(a)).name)[:60].strip("._") or "input"
        name = f"fid-stats-{stem}-{digest}.npz"
        places = [Path(folder)] if not any(_inside(Path(folder), s) for s in (a, b) if kinds[s] != "stats") else []
        places.append(Path(tempfile.gettempdir()))
        why = []
        for place in places:
            path = place / name
            try:
                if path.exists():
                    FrechetStats.load(path)  # only statistics are ever replaced
                saved = stats.save(path)
                break
            except Exception as err:  # noqa: BLE001 - B's error is the one to say; this one only at WARNING
                why.append(f"{path}: {err}")
        if saved is None:
            log.warning("%s's statistics could not be kept for a rerun (%s)", a, "; ".join(why))
            return
    rest = " with the same options" + (" but without --n" if kinds[a] == "checkpoint" and kinds[b] != "checkpoint"
                                       else "")
    note = (f"{a}'s statistics were saved to {saved}: run `xrayforge fid {shlex.quote(str(saved))} "
            f"{shlex.quote(b)}`{rest} to skip computing them again")
    if hasattr(exc, "add_note"):
        exc.add_note(note)
    else:  # Python 3.10: the same attribute, which the command line reads
        exc.__notes__ = [*getattr(exc, "__notes__", []), note]


def _space_asked(extractor_kwargs: dict) -> tuple[str, str] | None:
    """(the option, the name of the feature space it asks for) where ``features=`` or
    ``random_weights=`` is given, else None; Inception's name without its weights (two statistics
    files need none), another space's by building it (a bad --features is said as such)."""
    spec, random = extractor_kwargs.get("features"), extractor_kwargs.get("random_weights", False)
    if spec is None and not random:
        return None
    option = " ".join(filter(None, [spec and f"--features {spec}", random and "--random-weights"]))
    if (spec or DEFAULT) == DEFAULT:
        return option, "inception-random" if random else DEFAULT
    return option, feature_space(spec, None, random, "exact", "cpu").name


def _fid_of_stats_files(a: str, b: str, need, save_stats: str | None, extractor_kwargs: dict) -> dict:
    """compute_fid for two statistics files: the same result dict, without the network. They are
    compared in the feature space and mode they record (none: Inception, exact): a --features,
    --random-weights or --mode that asks for another is refused, not left unused."""
    asked_mode = extractor_kwargs.get("mode")
    if asked_mode not in (None, "exact", "fast"):
        raise ValueError(f"mode must be 'exact' or 'fast', got {asked_mode!r}")
    if need:
        raise ValueError("KID, bootstrap intervals and --prdc need images on both sides, not statistics files")
    asked_space = _space_asked(extractor_kwargs)
    sa, sb = FrechetStats.load(a), FrechetStats.load(b)
    same_space(sa.space, sb.space, a, b)
    if asked_space and asked_space[1] != (sa.space or DEFAULT):
        raise UserError(f"{asked_space[0]} asks for the feature space {asked_space[1]}, and {a} and {b} hold "
                        f"statistics of {sa.space or DEFAULT}: statistics files are compared in the space they "
                        f"were computed in; leave the option out, or compute them again with it")
    recorded = {m for m in (sa.mode, sb.mode) if m}
    if asked_mode and recorded - {asked_mode}:
        spec, other = (a, sa.mode) if sa.mode and sa.mode != asked_mode else (b, sb.mode)
        raise UserError(f"--mode {asked_mode}: {spec} holds statistics of --mode {other}; statistics files are "
                        f"compared as they were computed: leave --mode out")
    if asked_mode == "fast" and not recorded:  # unrecorded is taken as exact (pytorch-fid's files are)
        raise UserError(f"--mode fast: {a} and {b} record no mode (taken as exact, as pytorch-fid's), and --mode "
                        f"applies to images read through Inception, not to statistics already computed: leave it out")
    mode = asked_mode or "exact"
    if recorded:  # what the files were measured in
        mode = sa.mode if sa.mode == sb.mode else f"{sa.mode or 'unrecorded'} / {sb.mode or 'unrecorded'}"
    if sa.mode and sb.mode:
        if sa.mode != sb.mode:
            log.warning("%s holds statistics of --mode %s and %s of --mode %s: this FID mixes the two", a, sa.mode,
                        b, sb.mode)
    if sa.mu.shape != sb.mu.shape:
        raise ValueError(f"{a} holds statistics of {sa.mu.shape[0]}-d features and {b} of {sb.mu.shape[0]}-d ones: "
                         f"they come from different feature spaces and cannot be compared")
    if save_stats and _rank_world()[0] == 0:
        sa.save(save_stats)
    _warn_few((a, sa), (b, sb))
    return {"fid": frechet_distance(sa, sb, extractor_kwargs.get("device")), "n_a": sa.n, "n_b": sb.n,
            "mode": mode, "features": sa.space or "inception",
            "inception": "not used: both inputs are statistics files", "skipped": []}


def _warn_few(*sides) -> None:
    """Say when an input has fewer images than feature dimensions: its covariance is singular."""
    said = []
    for spec, stats in dict(sides).items():  # the same input on both sides (one spec, or one read): said once
        if any(stats is s for s in said):
            continue
        said.append(stats)
        dim = len(stats.mu)
        if stats.n is not None and stats.n <= dim and _rank_world()[0] == 0:
            log.warning("%s: %d images for %d feature dimensions: a singular covariance, and an FID far above its "
                        "value for many images (compare FIDs of equal image counts; published ones use 50,000)",
                        spec, stats.n, dim)
