"""``rf-inspect --plot``: a heads x sites heat map of the pattern the ARM chose most for each head.

For a person to see at a glance how a model's heads split into spatial, temporal and textural
ones, layer by layer. Not a benchmark plot; it needs the statistics of ``--run``.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rf_compile.cli.inspection import Inspection

# Figure size in pixels (FIG_INCHES * DPI): fixed, so that a map is always the same size.
FIG_INCHES = (12.0, 7.0)
DPI = 100
# Categories of a cell: the dominant pattern, or no sparse call at all (dense warm-up only).
CATEGORIES = ("dense only", "spatial", "temporal", "textural")
COLORS = ("#d9d9d9", "#1f77b4", "#ff7f0e", "#2ca02c")
# Cells get their share of the dominant pattern written in them while they are this large.
ANNOTATE_MAX_CELLS = 400


def dominant_patterns(head_stats: list[dict]) -> list[tuple[int, float]]:
    """Per head: (index into CATEGORIES, share of the calls that chose it)."""
    cells = []
    for head in head_stats:
        counts = [head[name] for name in CATEGORIES[1:]]
        total = sum(counts)
        if total == 0:
            cells.append((0, 0.0))
            continue
        best = max(range(len(counts)), key=counts.__getitem__)
        cells.append((best + 1, counts[best] / total))
    return cells


def _short_names(names: list[str]) -> list[str]:
    """Site names without the trailing non-numeric parts they all share (``.attn1``)."""
    parts = [name.split(".") for name in names]
    common = 0
    while (
        all(len(p) > common + 1 for p in parts)
        and len({p[-1 - common] for p in parts}) == 1
        and not parts[0][-1 - common].isdigit()
    ):
        common += 1
    return [".".join(p[: len(p) - common]) for p in parts]


def plot_patterns(result: Inspection, path: str | os.PathLike) -> None:
    """Write the heat map of ``result`` (which must hold ``--run`` statistics) to ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import BoundaryNorm, ListedColormap
    from matplotlib.patches import Patch

    sites = [(name, stats) for name, stats in (result.stats or {}).items() if stats["heads"]]
    heads = max((len(stats["heads"]) for _, stats in sites), default=0)
    grid = [[0] * len(sites) for _ in range(heads)]
    shares = [[0.0] * len(sites) for _ in range(heads)]
    for column, (_, stats) in enumerate(sites):
        for row, (category, share) in enumerate(dominant_patterns(stats["heads"])):
            grid[row][column], shares[row][column] = category, share

    annotate = 0 < heads * len(sites) <= ANNOTATE_MAX_CELLS
    fig, ax = plt.subplots(figsize=FIG_INCHES, dpi=DPI)
    if sites:
        cmap = ListedColormap(COLORS)
        norm = BoundaryNorm([i - 0.5 for i in range(len(COLORS) + 1)], cmap.N)
        ax.imshow(grid, cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")
        if annotate:
            for row in range(heads):
                for column in range(len(sites)):
                    if grid[row][column]:
                        ax.text(column, row, f"{shares[row][column]:.0%}", ha="center", va="center", fontsize=10)
        _ticks(ax, _short_names([name for name, _ in sites]), heads)
    else:
        ax.text(0.5, 0.5, "no sparse attention calls were measured", ha="center", va="center", fontsize=14)
        ax.set_axis_off()
    ax.set_xlabel("attention site (in graph order)")
    ax.set_ylabel("head")
    config = ", ".join(f"{key}={value}" for key, value in result.options.items() if key != "report")
    ax.set_title(
        f"{result.target.label}: dominant RainFusion pattern per head\n"
        f"{len(sites)} sparse sites, {heads} heads, {result.steps} steps"
        + (f"; {config}" if config else "")
        + ("\n(cell text: share of the head's sparse calls that chose this pattern)" if annotate else ""),
        fontsize=12,
    )
    legend = [Patch(facecolor=color, edgecolor="black", label=label) for label, color in zip(CATEGORIES, COLORS)]
    ax.legend(handles=legend, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="pattern", frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI, format="png")
    plt.close(fig)


def _ticks(ax, labels: list[str], heads: int) -> None:
    """At most ~40 labelled sites and ~32 labelled heads, so that labels never overlap; cell borders."""
    step = max(1, -(-len(labels) // 40))
    ax.set_xticks(range(0, len(labels), step))
    crowded = sum(len(label) for label in labels[::step]) > 120
    ax.set_xticklabels(labels[::step], rotation=90 if crowded else 0, fontsize=8)
    head_step = max(1, -(-heads // 32))
    ax.set_yticks(range(0, heads, head_step))
    ax.tick_params(axis="y", labelsize=8)
    ax.set_xticks([x - 0.5 for x in range(1, len(labels))], minor=True)
    ax.set_yticks([y - 0.5 for y in range(1, heads)], minor=True)
    ax.grid(which="minor", color="white", linewidth=1.5 if len(labels) * heads <= ANNOTATE_MAX_CELLS else 0.5)
    ax.tick_params(which="minor", length=0)
