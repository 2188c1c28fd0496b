"""Minibatches from a prepared archive: deterministic, resumable, sharded, prefetched.

The images form one endless stream: position s is image ``perm_e[s % n]`` of epoch
``e = s // n``, with ``perm_e`` a permutation seeded by (seed, e). A global batch covers
``world * batch`` consecutive positions and rank r takes its r-th slice, so where a run is in
the stream is just the number of images it has seen: resuming needs no loader state.
A background thread gathers rows from the memory map and pins them for a non-blocking copy.
"""
from __future__ import annotations

import queue
import threading

import numpy as np
import torch

from .archive import Archive


class BatchStream:
    def __init__(self, archive: Archive, seed: int = 0, rank: int = 0, world: int = 1,
                 subset: np.ndarray | None = None):
        if not 0 <= rank < world:  # another rank's share, or none, would be read without a word
            raise ValueError(f"rank {rank} is not one of the {world} processes (0 .. {world - 1})")
        self.archive, self.seed, self.rank, self.world = archive, seed, rank, world
        self.subset = np.arange(len(archive)) if subset is None else np.asarray(subset)
        if self.subset.dtype == bool:  # a mask (archive.held_out()'s kind): its positions, not 0 and 1
            if self.subset.shape != (len(archive),):
                raise ValueError(f"{archive.path}: a subset mask of shape {self.subset.shape} for {len(archive)} images")
            self.subset = np.flatnonzero(self.subset)
        elif self.subset.ndim != 1 or (self.subset.size and (not np.issubdtype(self.subset.dtype, np.integer)
                                                             or self.subset.min() < 0
                                                             or self.subset.max() >= len(archive))):
            raise ValueError(f"{archive.path}: subset must be positions 0 .. {len(archive) - 1} (or a mask of "
                             f"{len(archive)} booleans), got {self.subset.dtype} values of shape {self.subset.shape}")
        if len(self.subset) == 0:
            raise ValueError(f"{archive.path}: no images to train on")
        self._perm_cache: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perm_cache:
            self._perm_cache = {epoch: np.random.default_rng((self.seed, epoch)).permutation(len(self.subset))}
        return self._perm_cache[epoch]

    def positions(self, start: int, count: int) -> np.ndarray:
        """Archive positions of stream positions start .. start + count - 1."""
        n = len(self.subset)
        s = np.arange(start, start + count)
        out = np.empty(count, dtype=np.int64)
        for epoch in np.unique(s // n):
            m = s // n == epoch
            out[m] = self.subset[self._perm(int(epoch))[s[m] % n]]
        return out

    def rank_positions(self, global_start: int, batch: int) -> np.ndarray:
        """This rank's share of the global batch that starts at stream position global_start."""
        return self.positions(global_start + self.rank * batch, batch)

    def load(self, global_start: int, batch: int, resolution: int) -> np.ndarray:
        return self.archive.images(np.sort(self.rank_positions(global_start, batch)), resolution)


class Prefetcher:
    """Loads the batches of a known schedule ahead of time in a thread (pinned on CUDA)."""

    def __init__(self, stream: BatchStream, device: torch.device, depth: int = 3):
        self.stream, self.device = stream, device
        self.pin = device.type == "cuda"
        self._q: queue.Queue = queue.Queue(maxsize=depth)
        self._requests: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, daemon=True)
        self._thread.start()

    def _work(self):
        while True:
            req = self._requests.get()
            if req is None or self._stop.is_set():
                return
            try:
                arr = self.stream.load(*req)
                t = torch.from_numpy(arr)
                if self.pin:
                    t = t.pin_memory()
                self._q.put((req, t, None))
            except BaseException as exc:  # handed to the consumer, never lost in the thread (get() would wait forever)
                self._q.put((req, None, exc))

    def request(self, global_start: int, batch: int, resolution: int) -> None:
        self._requests.put((global_start, batch, resolution))

    def get(self) -> tuple[tuple, torch.Tensor]:
        req, t, exc = self._q.get()
        if exc is not None:
            raise exc
        return req, t.to(self.device, non_blocking=True)

    def close(self):
        """Stop the thread and wait for it: a thread still inside torch when the interpreter exits
        can abort the process ("terminate called without an active exception")."""
        self._stop.set()
        self._requests.put(None)
        while self._thread.is_alive():
            try:  # unblock a put() on a full queue
                self._q.get_nowait()
            except queue.Empty:
                pass
            self._thread.join(timeout=0.05)


def to_unit_range(batch: torch.Tensor, max_value: int) -> torch.Tensor:
    """Stored integers (N, R, R) -> float32 (N, 1, R, R) in [-1, 1]."""
    return batch.unsqueeze(1).float().mul_(2.0 / max_value).sub_(1.0)
