"""The progressive schedule: which level, fade-in alpha and batch size at a given image count."""
from __future__ import annotations

from dataclasses import dataclass

DEFAULT_BATCH = {4: 16, 8: 16, 16: 16, 32: 16, 64: 16, 128: 16, 256: 14, 512: 6, 1024: 3}


@dataclass(frozen=True)
class Phase:
    level: int
    alpha: float
    phase_start: int      # images seen when this phase began
    phase_end: int        # images seen when it ends
    fading: bool


class ProgressiveSchedule:
    """The first level trains stable only; every later level fades in, then trains stable."""

    def __init__(self, start_level: int, final_level: int, fade_images: int, stable_images: int):
        if final_level < start_level:
            raise ValueError(f"final level {final_level} is below the start level {start_level}")
        if fade_images < 0 or stable_images < 1:
            raise ValueError("fade_images must be >= 0 and stable_images >= 1")
        self.start_level, self.final_level = start_level, final_level
        self.fade_images, self.stable_images = fade_images, stable_images
        self.phases: list[tuple[int, int, bool]] = [(start_level, stable_images, False)]
        for level in range(start_level + 1, final_level + 1):
            if fade_images:
                self.phases.append((level, fade_images, True))
            self.phases.append((level, stable_images, False))

    @property
    def total_images(self) -> int:
        return sum(n for _, n, _ in self.phases)

    def at(self, images: int) -> Phase:
        start = 0
        for level, n, fading in self.phases:
            if images < start + n:
                alpha = (images - start) / n if fading else 1.0
                return Phase(level, alpha, start, start + n, fading)
            start += n
        level, n, _ = self.phases[-1]
        return Phase(level, 1.0, start - n, start, False)
