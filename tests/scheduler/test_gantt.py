"""The Gantt chart reads: one colour per ring size (legend), groups outlined, the legend
and the bound never on top of a bar."""

from __future__ import annotations

from collections import defaultdict

import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg

from scheduler.gantt import gantt_figure, rank_runs, size_colours
from scheduler.planner import plan_batch
from scheduler.simulator import simulate
from scheduler.specs import cluster_preset, model_preset


@pytest.fixture(scope="module")
def chart():
    cluster, model = cluster_preset("cpu", num_ranks=8), model_preset("tiny")
    lengths = [900, 700, 400, 300, 250, 120, 100, 90, 60, 40, 30, 20, 10]
    plan = plan_batch(lengths, cluster, model, capacity_tokens=256, time_limit_s=0.5, seed=1)
    sim = simulate(plan, cluster, model)
    fig = gantt_figure(plan, sim)
    FigureCanvasAgg(fig).draw()  # lay out: window extents are final
    return plan, sim, fig


def test_every_ring_size_has_one_colour_of_its_own(chart):
    plan, sim, fig = chart
    fills = fig.axes[0].collections[0]
    colours = [tuple(c) for c in fills.get_facecolors()]
    by_size = defaultdict(set)
    bars = [len(g.ranks) for g in sim.timeline for _ in g.ranks]
    for size, c in zip(bars, colours, strict=True):
        by_size[size].add(c)
    assert len(by_size) >= 3, by_size.keys()  # the batch needs several ring sizes
    assert all(len(c) == 1 for c in by_size.values())
    assert len({next(iter(c)) for c in by_size.values()}) == len(by_size)


def test_the_legend_names_each_size_and_the_bound_outside_the_bars(chart):
    plan, sim, fig = chart
    ax = fig.axes[0]
    legend = ax.get_legend()
    texts = [t.get_text() for t in legend.get_texts()]
    sizes = sorted({len(g.ranks) for g in sim.timeline})
    assert texts[:-1] == [t for t in texts if t.startswith("ring of ")]
    assert [int(t.split()[2].rstrip(":")) for t in texts[:-1]] == sizes
    assert texts[-1].startswith("lower bound ")
    renderer = fig.canvas.get_renderer()
    assert legend.get_window_extent(renderer).x0 >= ax.get_window_extent(renderer).x1


def test_groups_are_outlined_run_by_run(chart):
    plan, sim, fig = chart
    outlines = fig.axes[0].collections[1]
    assert len(outlines.get_paths()) == sum(len(rank_runs(g.ranks)) for g in sim.timeline)
    assert rank_runs([5, 0, 1, 3, 2, 7]) == [(0, 3), (5, 5), (7, 7)]


def test_many_sizes_still_get_distinct_colours():
    colours = size_colours(range(1, 65))
    assert len(set(colours.values())) == 64
    assert size_colours([64, 1])[64] != size_colours([64, 1])[1]
