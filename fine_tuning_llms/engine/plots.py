"""PNG plots shared by the tasks (matplotlib, Agg backend, written atomically)."""
from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path

from .artefacts import atomic_write_bytes


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display needed, and no fonts fetched from anywhere
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path) -> Path:
    plt = _pyplot()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def line_plot(path: str | Path, panels: Sequence[Mapping], *, title: str = "") -> Path:
    """One row of panels; each panel: {"title", "xlabel", "ylabel", "series": {name: (xs, ys)}, "logy"?}."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.6), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        for name, (xs, ys) in panel["series"].items():
            style = panel.get("styles", {}).get(name, {})
            ax.plot(list(xs), list(ys), label=name, **style)
        ax.set_title(panel.get("title", ""))
        ax.set_xlabel(panel.get("xlabel", ""))
        ax.set_ylabel(panel.get("ylabel", ""))
        if panel.get("logy"):
            ax.set_yscale("log")
        if len(panel["series"]) > 1:
            ax.legend()
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def histogram(path: str | Path, values: Sequence[float], *, title: str, xlabel: str,
              bins: int = 30, vline: float | None = None, vline_label: str = "") -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.hist(list(values), bins=bins, color="#4C72B0", alpha=0.85)
    if vline is not None:
        ax.axvline(vline, color="#C44E52", linestyle="--", label=vline_label)
        ax.legend()
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("count")
    ax.grid(alpha=0.3)
    return save_figure(fig, path)
