"""A procedural chest radiograph phantom with labelled findings.

Deterministic by seed, at any resolution: soft-tissue body outline, lung fields with
vessel markings, heart and mediastinum, ribs, clavicles, diaphragm domes, and acquisition
variation (exposure, gamma, quantum noise). Findings from the ChestX-ray14 list that have
a visible analogue:

- Cardiomegaly: cardiothoracic ratio 0.53–0.64 (normal hearts 0.37–0.47; the tilted ellipses
  span a little less than the ratio drawn, 0.56–0.66 and 0.38–0.48);
- Effusion: fluid filling the base of a lung with a meniscus, blunting the costophrenic angle;
- Nodule (round opacity, 4–7 % of the image width) and Mass (11–16 %);
- Pneumothorax: a band along the edge of one lung without markings, edged by a pleural line;
- Consolidation (dense confluent opacity) and Infiltration (faint patchy opacity).

Brightness follows radiograph convention: air black, lungs dark, soft tissue grey, bone bright.
The demo, the tests and `xrayforge prepare phantom:N OUT` use it.
"""
from __future__ import annotations

import numpy as np

from .labels import FINDINGS

PHANTOM_FINDINGS = ("Cardiomegaly", "Effusion", "Nodule", "Mass", "Pneumothorax", "Consolidation", "Infiltration")
PREVALENCE = {"Cardiomegaly": 0.2, "Effusion": 0.2, "Nodule": 0.15, "Mass": 0.1, "Pneumothorax": 0.1,
              "Consolidation": 0.12, "Infiltration": 0.15}


def _smooth_noise(rng: np.random.Generator, n: int, cells: int) -> np.ndarray:
    """Band-limited noise in [-1, 1]: a coarse random grid, bilinearly upsampled to n × n."""
    grid = rng.standard_normal((cells + 1, cells + 1))
    t = np.linspace(0, cells, n)
    i = np.minimum(t.astype(int), cells - 1)
    f = t - i
    rows = grid[i] * (1 - f)[:, None] + grid[i + 1] * f[:, None]
    out = rows[:, i] * (1 - f)[None, :] + rows[:, i + 1] * f[None, :]
    return out / (np.abs(out).max() + 1e-9)


def _ellipse(u, v, cx, cy, rx, ry, angle=0.0):
    c, s = np.cos(angle), np.sin(angle)
    du, dv = u - cx, v - cy
    return ((du * c + dv * s) / rx) ** 2 + ((-du * s + dv * c) / ry) ** 2


def _soft(d, edge):
    """1 inside (d < 1), 0 outside, with a smooth edge of relative width ``edge``."""
    return np.clip((1.0 - d) / edge, 0.0, 1.0)


def sample_findings(rng: np.random.Generator, findings: dict | None = None) -> dict:
    """Draw which findings a phantom has; ``findings`` forces some of them (name -> bool)."""
    out = {name: bool(rng.random() < PREVALENCE[name]) for name in PHANTOM_FINDINGS}
    if out["Nodule"] and out["Mass"]:
        out["Nodule"] = False
    for name, present in (findings or {}).items():
        if name not in PHANTOM_FINDINGS:
            raise ValueError(f"the phantom has no {name!r}; it can draw {', '.join(PHANTOM_FINDINGS)}")
        out[name] = bool(present)
    return out


def render(resolution: int, seed: int, findings: dict | None = None) -> tuple[np.ndarray, dict]:
    """One phantom radiograph: (float32 image in [0, 1] of shape (R, R), {finding: bool})."""
    if resolution < 8:
        raise ValueError(f"phantom resolution must be at least 8, got {resolution}")
    rng = np.random.default_rng(seed)
    have = sample_findings(rng, findings)
    n = resolution
    t = (np.arange(n) + 0.5) / n * 2 - 1
    v, u = np.meshgrid(t, t, indexing="ij")  # v down, u right; patient's left is image right
    edge = 4.0 / n

    # anatomy parameters vary per patient
    body_w = rng.uniform(0.78, 0.9)
    lung_rx, lung_ry = rng.uniform(0.28, 0.33), rng.uniform(0.52, 0.6)
    lung_cy = rng.uniform(-0.08, 0.0)
    lung_cx = rng.uniform(0.33, 0.38)
    ctr = rng.uniform(0.56, 0.66) if have["Cardiomegaly"] else rng.uniform(0.38, 0.48)
    heart_rx = ctr * (lung_cx + lung_rx)  # the heart spans ctr of the thoracic width
    heart_cx, heart_cy = rng.uniform(0.06, 0.12), lung_cy + lung_ry * rng.uniform(0.28, 0.36)

    body = _soft(_ellipse(u, v, 0.0, 0.1, body_w, 1.15), edge * 8)
    img = 0.04 + 0.5 * body
    lungs = []
    for side in (-1, 1):
        lung = _soft(_ellipse(u, v, side * lung_cx, lung_cy, lung_rx, lung_ry, side * 0.08), edge * 3)
        dome = lung_cy + lung_ry * 0.75 - 0.12 * (1 - ((u - side * lung_cx) / lung_rx) ** 2)
        lung = lung * np.clip((dome - v) / (edge * 3), 0, 1)  # the diaphragm dome cuts the base
        lungs.append(lung)
    lung_mask = np.maximum(*lungs)
    markings = 0.06 * np.abs(_smooth_noise(rng, n, 24)) + 0.03 * _smooth_noise(rng, n, 60)
    img = img - lung_mask * (0.33 - markings)

    heart = _soft(_ellipse(u, v, heart_cx, heart_cy, heart_rx, lung_ry * 0.4, -0.35), edge * 4)
    mediastinum = _soft(np.maximum(np.abs(u - 0.01) / 0.1, np.abs(v - lung_cy + 0.2) / 0.6), edge * 3)
    img = np.maximum(img, (0.5 + 0.05 * heart) * np.maximum(heart, mediastinum) + img * (1 - np.maximum(heart, mediastinum)))

    # ribs: arcs across each lung, clavicles across the apices, a faint spine
    rib_phase = rng.uniform(0, 1)
    for side in (-1, 1):
        x = (u - side * lung_cx) * side
        arc = v + 0.18 * x ** 2 - 0.1 * x
        ribs = 0.5 + 0.5 * np.cos((arc - lung_cy + rib_phase * 0.2) / (lung_ry * 2 / 9) * 2 * np.pi)
        chest = _soft(_ellipse(u, v, side * lung_cx, lung_cy, lung_rx * 1.15, lung_ry * 1.0), edge * 4)
        img = img + (ribs > 0.8) * (0.07 * lungs[0 if side < 0 else 1] + 0.025 * chest)
        clav = np.abs(v - (lung_cy - lung_ry * 0.85 + 0.12 * side * (u - side * 0.3))) < 0.025
        img = img + 0.12 * clav * (np.abs(u - side * 0.3) < 0.28)
    img = img + 0.05 * _soft(np.abs(u) / 0.05, 0.3) * body

    findings_left = rng.random() < 0.5
    side = -1 if findings_left else 1
    if have["Effusion"]:
        level = lung_cy + lung_ry * rng.uniform(0.35, 0.6)
        meniscus = level - 0.15 * np.clip((u * side - lung_cx) / lung_rx + 0.3, 0, None) ** 2
        fluid = lungs[0 if side < 0 else 1] * np.clip((v - meniscus) / (edge * 3), 0, 1)
        img = img + 0.3 * fluid
    if have["Pneumothorax"]:
        lung = lungs[0 if side < 0 else 1]
        rim = _ellipse(u, v, side * lung_cx, lung_cy, lung_rx, lung_ry, side * 0.08)
        band = lung * (rim > rng.uniform(0.45, 0.65))
        img = img - band * (markings + 0.05)
        line = lung * (np.abs(rim - 0.55) < 0.02)
        img = img + 0.08 * line
    if have["Consolidation"] or have["Infiltration"]:
        lung = lungs[0 if rng.random() < 0.5 else 1]
        patches = _smooth_noise(rng, n, 10)
        if have["Consolidation"]:
            # the densest 2 % of the lung at least two-thirds opaque: a threshold fixed over the whole
            # image left one consolidation in ten outside its lung, labelled but not drawn
            inside = patches[lung > 0.5]
            level = min(0.35, np.quantile(inside, 0.98) - 0.1) if inside.size else 0.35
            img = img + 0.22 * lung * np.clip((patches - level) / 0.15, 0, 1)
        if have["Infiltration"]:
            patches2 = _smooth_noise(rng, n, 18)
            img = img + 0.08 * lung * np.clip((patches2 - 0.1) / 0.3, 0, 1)
    for name, (rmin, rmax) in (("Nodule", (0.04, 0.07)), ("Mass", (0.11, 0.16))):
        if have[name]:
            r = rng.uniform(rmin, rmax)  # radius in half-widths = diameter as a fraction of the width
            # a point well inside one lung, drawn in continuous coordinates (same at any resolution)
            lside = -1 if rng.random() < 0.5 else 1
            theta, rad = rng.uniform(0, 2 * np.pi), np.sqrt(rng.uniform(0, 1)) * 0.7
            cx = lside * lung_cx + lung_rx * rad * np.cos(theta)
            cy = lung_cy + lung_ry * 0.8 * rad * np.sin(theta) - 0.1 * lung_ry
            blob = _soft(_ellipse(u, v, cx, cy, r, r * rng.uniform(0.85, 1.15)), 0.35)
            img = img + 0.3 * blob

    # acquisition: exposure, gamma, quantum noise
    img = np.clip(img, 0, 1) * rng.uniform(0.85, 1.1) + rng.uniform(-0.04, 0.04)
    img = np.clip(img, 0, 1) ** rng.uniform(0.85, 1.2)
    img = img + rng.normal(0, 0.012, size=img.shape)
    return np.clip(img, 0, 1).astype(np.float32), have


def label_vector(have: dict) -> list[int]:
    """The 14-finding ChestX-ray14 vector of a phantom's findings."""
    return [int(have.get(name, False)) for name in FINDINGS]
