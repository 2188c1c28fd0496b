"""Plots written as PNG files (matplotlib, no display)."""
from __future__ import annotations

import os


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def loss_curve(history: list[dict], path: str | os.PathLike) -> None:
    """Discriminator / generator losses and the gradient penalty against images seen."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    x = [h["images"] / 1000 for h in history]
    for key in ("d_loss", "g_loss"):
        axes[0].plot(x, [h.get(key) for h in history], label=key)
    axes[1].plot(x, [h.get("gp") for h in history], label="gradient penalty", color="C2")
    for ax in axes:
        ax.set_xlabel("thousands of images")
        ax.legend()
        ax.grid(alpha=0.3)
    levels = sorted({(h["resolution"], h["images"] / 1000) for h in history}, key=lambda t: t[1])
    seen = set()
    for res, k in levels:
        if res not in seen:
            seen.add(res)
            for ax in axes:
                ax.axvline(k, color="grey", lw=0.5)
    save_figure(fig, path)


def save_figure(fig, path: str | os.PathLike, dpi: int = 100) -> None:
    """Lay out, write atomically as PNG, and close a matplotlib figure."""
    fig.tight_layout()
    tmp = f"{path}.tmp.png"
    fig.savefig(tmp, dpi=dpi)
    _pyplot().close(fig)
    os.replace(tmp, path)
