"""The paper's Figure 2: the learned per-layer merge weights, one panel per direction.

Per strategy one figure of 20 panels (a)-(t) (n(n-1) for n languages), in the order of
:func:`modlora.data.directions` (source-major: en->fr, en->de, ..., zh->ja), each plotting w_in and
w_out against the layer, numbered 1..L as in the paper. The y range always covers the paper's
0.3-0.7 band (wider when a weight leaves it). :func:`figure2_data` is the figure's content as
JSON-ready data; :func:`plot_figure2` draws exactly that data.
"""

from __future__ import annotations

import math
import string
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from .fileio import atomic_write, atomic_write_json

if TYPE_CHECKING:  # matplotlib is optional
    from matplotlib.figure import Figure

PAPER_BAND = (0.3, 0.7)


def figure2_data(weights: Mapping[tuple[str, str], Sequence[tuple[float, float]]],
                 directions: Sequence[tuple[str, str]], strategy: str) -> dict:
    """Panels (a), (b), ... of the directions in order: layers 1..L with w_in and w_out per layer."""
    if not 0 < len(directions) <= len(string.ascii_lowercase):
        raise ValueError(f"{len(directions)} directions: a figure has panels (a) to (z)")
    panels = []
    for letter, (src, tgt) in zip(string.ascii_lowercase, directions, strict=False):
        if (src, tgt) not in weights:
            raise ValueError(f"no learned weights for {src}->{tgt} ({strategy})")
        w = weights[(src, tgt)]
        panels.append({"panel": f"({letter})", "src": src, "tgt": tgt, "layers": list(range(1, len(w) + 1)),
                       "w_in": [float(a) for a, _ in w], "w_out": [float(b) for _, b in w]})
    values = [v for p in panels for v in (*p["w_in"], *p["w_out"])]
    low, high = min([PAPER_BAND[0], *values]), max([PAPER_BAND[1], *values])
    pad = 0.05
    return {"strategy": strategy, "ylim": [max(0.0, low - pad), min(1.0, high + pad)], "panels": panels}


def plot_figure2(data: dict, path: str | Path | None = None) -> Figure | None:
    """Draw :func:`figure2_data`'s panels on a grid (4 columns); write a PNG to ``path`` if given.
    Returns the matplotlib figure (its axes carry the data, for tests), or None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        return None
    panels = data["panels"]
    cols = min(4, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.4 * rows), squeeze=False, sharey=True)
    for ax, p in zip(axes.flat, panels, strict=False):  # the grid may have spare cells
        ax.plot(p["layers"], p["w_in"], marker=".", label="w_in")
        ax.plot(p["layers"], p["w_out"], marker=".", label="w_out")
        ax.axhline(0.5, color="gray", lw=0.5)
        ax.set_title(f"{p['panel']} {p['src']}→{p['tgt']}", fontsize=9)
        ax.set_ylim(*data["ylim"])
        ax.set_xlim(0.5, len(p["layers"]) + 0.5)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    axes.flat[0].legend(fontsize=8)
    fig.supxlabel("layer")
    fig.supylabel("weight (softmax)")
    fig.suptitle(f"Learned merge weights, strategy {data['strategy']!r}")
    fig.tight_layout()
    if path is not None:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    return fig


def write_figure2(data: dict, json_path: str | Path, png_path: str | Path) -> bool:
    """The figure's data as JSON and, with matplotlib, as a PNG; returns whether the PNG was drawn
    (if not, a PNG of earlier weights is removed: it would contradict the JSON)."""
    atomic_write_json(json_path, data)
    fig = plot_figure2(data, png_path)
    if fig is None:
        Path(png_path).unlink(missing_ok=True)
        return False
    import matplotlib.pyplot as plt

    plt.close(fig)
    return True
