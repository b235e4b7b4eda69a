"""What every benchmark figure shares: one colour per peer, one per backend, the machine footer.

A peer keeps its colour in every figure (layer overhead, model throughput, the accuracy study,
the scaling projection); the backend a peer runs over is told apart by hatching (bars) or
line style, never by colour.
"""
from __future__ import annotations

import textwrap
from typing import Any, Dict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)

from .machine import stamp_line  # noqa: E402

PEER_COLORS: Dict[str, str] = {
    "BatchNorm": "#7f7f7f",               # the floor: plain, unsynchronized
    "syncbn": "#1f77b4",
    "syncbn debug=True": "#17becf",
    "naive": "#d62728",
    "torch.nn.SyncBatchNorm": "#9467bd",
    "GroupNorm": "#8c564b",
    "BatchNorm, global batch": "#000000",  # the accuracy study's target
}
# The accuracy study's arms are the peers above under other names.
ARM_PEERS = {"local": "BatchNorm", "sync": "syncbn", "group": "GroupNorm",
             "full": "BatchNorm, global batch"}
BACKEND_COLORS: Dict[str, str] = {"none": "#bcbd22", "gloo": "#ff7f0e", "mpi": "#2ca02c"}
BACKEND_HATCHES: Dict[str, str] = {"none": "", "gloo": "//", "mpi": ".."}
BACKEND_LINESTYLES: Dict[str, str] = {"none": ":", "gloo": "-", "mpi": "--"}
COMPUTE_COLOR, COMMUNICATION_COLOR = "#1f77b4", "#ff9896"
DPI = 90


def legend_outside(ax: Any, **kwargs: Any) -> None:
    """The legend to the right of the axes, where it cannot cover data."""
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0,
              fontsize=kwargs.pop("fontsize", 8), **kwargs)


def save_figure(fig: Any, path: str, stamp: Dict[str, str]) -> str:
    """Write ``fig`` to ``path`` with the machine stamp as a wrapped footer; the saved area
    grows to hold the footer and outside legends, so nothing is cut off."""
    fig.tight_layout()
    footer = "\n".join(textwrap.wrap(stamp_line(stamp), 110))
    fig.text(0.0, -0.02, footer, fontsize=7, color="0.35", ha="left", va="top",
             transform=fig.transFigure)
    fig.savefig(path, dpi=DPI, bbox_inches="tight", pad_inches=0.15)
    plt.close(fig)
    return path
