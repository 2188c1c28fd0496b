"""Plots written as PNG files (matplotlib, no display)."""
from __future__ import annotations

import os

from .files import atomic_write


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def loss_curve(history: list[dict], path: str | os.PathLike) -> None:
    """Discriminator / generator losses, the gradient penalty and (where the log has them) the
    realism and diversity ratios, and the metrics measured during training (FID; precision,
    recall, density, coverage), against images seen."""
    plt = _pyplot()
    realism = [h for h in history if "realism" in h]
    measured = [h for h in history if "fid" in h or "precision" in h]
    panels = 2 + bool(realism) + bool(measured)
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 3.5))
    x = [h["images"] / 1000 for h in history]
    for key in ("d_loss", "g_loss"):
        axes[0].plot(x, [h.get(key) for h in history], label=key)
    axes[1].plot(x, [h.get("gp") for h in history], label="gradient penalty", color="C2")
    if realism:
        xr = [h["images"] / 1000 for h in realism]
        axes[2].plot(xr, [h["realism"] for h in realism], label="realism (samples→real / real→real)", color="C3")
        axes[2].plot(xr, [h["diversity"] for h in realism], label="diversity (samples→samples / real→real)",
                     color="C4")
        axes[2].axhline(1.0, color="grey", lw=0.8, ls="--")
        axes[2].set_yscale("log")
        axes[2].set_title("nearest-neighbour pixel distance ratios (1 = like the data)", fontsize=9)
    if measured:
        ax = axes[-1]
        xm = [h["images"] / 1000 for h in measured]
        has_fid, has_prdc = any("fid" in h for h in measured), any("precision" in h for h in measured)
        if has_fid:
            ax.plot(xm, [h.get("fid") for h in measured], "o-", label="FID", color="C5")
            ax.set_yscale("log")
            ax.set_ylabel("FID (log scale)")
        twin = ax.twinx() if has_fid and has_prdc else ax
        for k, key in enumerate(("precision", "recall", "density", "coverage") if has_prdc else ()):
            twin.plot(xm, [h.get(key) for h in measured], ".--", label=key, color=f"C{6 + k}")
        if twin is not ax:  # the twin is drawn over ax: ax's legend goes to its other corner
            twin.set_ylabel("precision, recall, density, coverage")
            twin.legend(fontsize=7, loc="upper right")
            ax.legend(fontsize=7, loc="upper left")
        ax.set_title(f"metrics in {measured[-1].get('metrics_features', 'inception')} features", fontsize=9)
    for ax in axes:
        ax.set_xlabel("thousands of images")
        if ax.get_legend() is None:
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
    try:
        atomic_write(path, lambda p: fig.savefig(p, dpi=dpi, format="png"))
    finally:
        _pyplot().close(fig)
