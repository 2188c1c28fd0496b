"""The progressive schedule: which level, fade-in alpha and batch size at a given image count."""
from __future__ import annotations

from dataclasses import dataclass

DEFAULT_BATCH = {4: 16, 8: 16, 16: 16, 32: 16, 64: 16, 128: 16, 256: 14, 512: 6, 1024: 3}
# the resolutions `--batch N` (one batch for every resolution) sets: 4 to 8192 px
EVERY_RESOLUTION = tuple(4 << i for i in range(12))


@dataclass(frozen=True)
class Phase:
    level: int
    alpha: float
    phase_start: int      # images seen when this phase began
    phase_end: int        # images seen when it ends
    fading: bool
    index: int = 0        # position in the schedule (the optimisers are reset when it changes)


class ProgressiveSchedule:
    """The first level trains stable only; every later level fades in, then trains stable.

    ``total_images`` (the official ``total_kimg``): the final stable phase goes on until this many
    images in all; a total shorter than the growth phases ends the schedule there.
    """

    def __init__(self, start_level: int, final_level: int, fade_images: int, stable_images: int,
                 total_images: int | None = None):
        if final_level < start_level:
            raise ValueError(f"final level {final_level} is below the start level {start_level}")
        if fade_images < 0 or stable_images < 1:
            raise ValueError("fade_images must be >= 0 and stable_images >= 1")
        if total_images is not None and total_images < 1:
            raise ValueError(f"total_images must be >= 1, got {total_images}")
        self.start_level, self.final_level = start_level, final_level
        self.fade_images, self.stable_images = fade_images, stable_images
        self.phases: list[tuple[int, int, bool]] = [(start_level, stable_images, False)]
        for level in range(start_level + 1, final_level + 1):
            if fade_images:
                self.phases.append((level, fade_images, True))
            self.phases.append((level, stable_images, False))
        growth = sum(n for _, n, _ in self.phases)
        if total_images is not None and total_images > growth:
            level, n, fading = self.phases[-1]
            self.phases[-1] = (level, n + total_images - growth, fading)
        self.total_images = growth if total_images is None else total_images

    def at(self, images: int) -> Phase:
        start = 0
        for i, (level, n, fading) in enumerate(self.phases):
            if images < start + n:
                alpha = (images - start) / n if fading else 1.0
                return Phase(level, alpha, start, start + n, fading, i)
            start += n
        level, n, _ = self.phases[-1]
        return Phase(level, 1.0, start - n, start, False, len(self.phases) - 1)
