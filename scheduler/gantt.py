"""Gantt chart of a simulated plan: ranks down, time across, one colour per group.

matplotlib is imported inside `draw_gantt` (Agg backend, no display) so the planner and
the controller never pay for it unless a chart is asked for. All rectangles go into one
PolyCollection, which keeps a 12,288-rank chart to a few seconds.
"""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

from scheduler.plan import StepPlan
from scheduler.simulator import SimResult


def gantt_rectangles(plan: StepPlan, sim: SimResult) -> list[tuple[int, float, float, int]]:
    """(rank, start_s, end_s, group_number) for every rank of every group."""
    out = []
    for k, g in enumerate(sim.timeline):
        for r in g.ranks:
            out.append((r, g.start_s, g.end_s, k))
    return out


def draw_gantt(plan: StepPlan, sim: SimResult, path: str | Path | BinaryIO, *,
               title: str | None = None, dpi: int = 100) -> str | Path | BinaryIO:
    """Write a PNG of the plan's timeline to `path` (a path or a binary file) and return it.

    Uses a bare `Figure` (no pyplot state), so it is safe in a threaded server.
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.collections import PolyCollection
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    cmap = matplotlib.colormaps["tab20"]
    polys, colours = [], []
    for rank, start, end, k in gantt_rectangles(plan, sim):
        polys.append([(start, rank - 0.4), (end, rank - 0.4), (end, rank + 0.4),
                      (start, rank + 0.4)])
        colours.append(cmap(k % 20))
    fig = Figure(figsize=(10, min(12.0, 2.0 + 0.25 * plan.world_size)))
    ax = fig.add_subplot()
    ax.add_collection(PolyCollection(polys, facecolors=colours, edgecolors="black",
                                     linewidths=0.3 if plan.world_size <= 64 else 0.0))
    ax.axvline(sim.lower_bound_s, color="black", linestyle="--", linewidth=1,
               label=f"lower bound {sim.lower_bound_s:.3g} s")
    ax.set_xlim(0, max(sim.makespan_s, sim.lower_bound_s) * 1.02 or 1.0)
    ax.set_ylim(plan.world_size - 0.5, -0.5)
    ax.set_xlabel("time (s, predicted)")
    ax.set_ylabel("rank")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(title or f"{plan.world_size} ranks, makespan {sim.makespan_s:.3g} s "
                 f"({sim.ratio:.3f} x bound)")
    ax.legend(loc="lower right")
    fig.savefig(path, format="png", dpi=dpi, bbox_inches="tight")
    return path
