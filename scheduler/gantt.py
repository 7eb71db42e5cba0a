"""Gantt chart of a simulated plan: ranks down, time across, one colour per ring size.

Every group run is a bar on each of its ranks, filled with its ring size's colour (the
same size, the same colour, whichever micro-batch it sits in; sizes in increasing order
take tab10, then tab20, then evenly spaced viridis colours, so no two sizes share one),
and outlined in black around each run of adjacent ranks it holds, so two groups of the
same size that touch stay apart. The predicted lower bound is a dashed vertical line. The
legend (ring sizes with their group counts, the bound) sits outside the axes, to the
right: it never covers a bar. `plan --png`, the preview's `gantt=true` and the demo all
draw this chart.

matplotlib is imported inside `gantt_figure` (Agg backend, no display) so the planner and
the controller never pay for it unless a chart is asked for. All rectangles go into two
PolyCollections (fills, outlines), which keeps a 12,288-rank chart to a few seconds.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import BinaryIO

from scheduler.plan import StepPlan
from scheduler.simulator import SimResult

BAR_HALF_HEIGHT = 0.4  # of a rank's row (rows are 1 apart)


def gantt_rectangles(plan: StepPlan, sim: SimResult) -> list[tuple[int, float, float, int]]:
    """(rank, start_s, end_s, group_number) for every rank of every group."""
    out = []
    for k, g in enumerate(sim.timeline):
        for r in g.ranks:
            out.append((r, g.start_s, g.end_s, k))
    return out


def rank_runs(ranks) -> list[tuple[int, int]]:
    """Maximal runs of adjacent ranks, as (first, last), of a group's ranks."""
    runs: list[list[int]] = []
    for r in sorted(ranks):
        if runs and r == runs[-1][1] + 1:
            runs[-1][1] = r
        else:
            runs.append([r, r])
    return [(a, b) for a, b in runs]


def size_colours(sizes) -> dict[int, tuple]:
    """A distinct colour for every ring size, in increasing order of size."""
    import matplotlib

    ordered = sorted(set(sizes))
    n = len(ordered)
    if n <= 10:
        cmap = matplotlib.colormaps["tab10"]
        return {d: cmap(i) for i, d in enumerate(ordered)}
    if n <= 20:
        cmap = matplotlib.colormaps["tab20"]
        return {d: cmap(i) for i, d in enumerate(ordered)}
    cmap = matplotlib.colormaps["viridis"]
    return {d: cmap(i / (n - 1)) for i, d in enumerate(ordered)}


def _box(start: float, end: float, first: int, last: int) -> list[tuple[float, float]]:
    lo, hi = first - BAR_HALF_HEIGHT, last + BAR_HALF_HEIGHT
    return [(start, lo), (end, lo), (end, hi), (start, hi)]


def gantt_figure(plan: StepPlan, sim: SimResult, *, title: str | None = None):
    """The chart as a bare matplotlib `Figure` (no pyplot state: safe in a server)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.artist import Artist
    from matplotlib.collections import PolyCollection
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch
    from matplotlib.ticker import MaxNLocator

    sizes = Counter(len(g.ranks) for g in sim.timeline)
    colour = size_colours(sizes)
    fills: list[list[tuple[float, float]]] = []
    fill_colours: list[tuple] = []
    outlines: list[list[tuple[float, float]]] = []
    for g in sim.timeline:
        for r in g.ranks:
            fills.append(_box(g.start_s, g.end_s, r, r))
            fill_colours.append(colour[len(g.ranks)])
        outlines.extend(_box(g.start_s, g.end_s, a, b) for a, b in rank_runs(g.ranks))
    fig = Figure(figsize=(10, min(12.0, 2.0 + 0.25 * plan.world_size)))
    ax = fig.add_subplot()
    ax.add_collection(PolyCollection(fills, facecolors=fill_colours, edgecolors="none"))
    ax.add_collection(PolyCollection(outlines, facecolors="none", edgecolors="black",
                                     linewidths=0.8 if plan.world_size <= 64 else 0.2))
    ax.axvline(sim.lower_bound_s, color="black", linestyle="--", linewidth=1)
    ax.set_xlim(0, max(sim.makespan_s, sim.lower_bound_s) * 1.02 or 1.0)
    ax.set_ylim(plan.world_size - 0.5, -0.5)
    ax.set_xlabel("time (s, predicted)")
    ax.set_ylabel("rank")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(title or f"{plan.world_size} ranks, makespan {sim.makespan_s:.3g} s "
                 f"({sim.ratio:.3f} x bound)")
    handles: list[Artist] = [Patch(facecolor=colour[d], edgecolor="black", linewidth=0.8,
                     label=f"ring of {d}{' (packed)' if d == 1 else ''}: {sizes[d]} "
                           f"group{'s' if sizes[d] != 1 else ''}") for d in sorted(sizes)]
    handles.append(Line2D([], [], color="black", linestyle="--", linewidth=1,
                          label=f"lower bound {sim.lower_bound_s:.3g} s"))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0),
              borderaxespad=0.0, fontsize="small", title="ring size",
              ncol=1 if len(handles) <= 24 else 2)
    return fig


def draw_gantt(plan: StepPlan, sim: SimResult, path: str | Path | BinaryIO, *,
               title: str | None = None, dpi: int = 100) -> str | Path | BinaryIO:
    """Write a PNG of the plan's timeline to `path` (a path or a binary file) and return it."""
    gantt_figure(plan, sim, title=title).savefig(path, format="png", dpi=dpi,
                                                 bbox_inches="tight")
    return path
