"""Balance scheduler, improvement part: large-neighbourhood search with OR-tools CP-SAT.

A full CP-SAT model over thousands of sequences x thousands of ranks does not solve in time
on a small machine, so we improve the greedy schedule (`scheduler.balance`) a few ranks at
a time: take the most loaded ranks and some lightly loaded ones, free every short sequence
they hold and let CP-SAT re-assign them, minimising the largest finish time

    minimise M  s.t.  M >= base_r + sum_i p_i x_ir + c n_r,   n_r C >= sum_i tokens_i x_ir,
                      sum_r x_ir = 1,

where base_r is when rank r's rings end, p_i the time of sequence i on one rank, c the
per-micro-batch overhead and n_r the number of packs (micro-batches) of rank r (with rank
speeds v_r, p_i and c take 1/v_r as long on rank r; with per-rank capacities C is C_r).
The new
assignment is kept only if, re-packed exactly (best-fit decreasing), it lowers the
neighbourhood's largest finish time, so the step makespan never increases. When the whole
problem is small enough it is one neighbourhood and CP-SAT solves it exactly.

Deterministic for a seed: neighbourhoods come from a seeded generator, CP-SAT runs one
worker with that seed and a *deterministic* time limit, and the search stops on a budget of
deterministic time derived from `time_limit_s`. Wall-clock time is only a safety net (at
`WALL_GUARD` x the limit) for a machine much slower than expected.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
from ortools.sat.python import cp_model

from scheduler.balance import Schedule, held_tokens, item_time
from scheduler.cost import CostModel

DET_PER_SECOND = 0.2  # CP-SAT deterministic time per second of limit (~5x slower here)
DET_PER_SOLVE = 0.05  # cap per neighbourhood
WALL_GUARD = 5.0  # stop between rounds past this multiple of the limit (safety net only)
SOLVE_WALL_CAP_S = 60.0  # per-solve safety net; the deterministic limit binds long before
NEIGHBOURHOOD_RANKS = 12
MAX_ITEMS = 240  # free at most this many sequences per neighbourhood
MAX_STALE = 12  # stop after this many neighbourhoods in a row without improvement
SCALE = 200_000  # integer resolution of a neighbourhood's times


def improve(schedule: Schedule, cost: CostModel, *, time_limit_s: float, seed: int,
            neighbourhood_ranks: int = NEIGHBOURHOOD_RANKS) -> Schedule:
    """Run LNS rounds on `schedule` (in place) until the budget or no progress; return it."""
    if time_limit_s <= 0:
        return schedule
    rng = np.random.default_rng(seed)
    loads = schedule.loads(cost)
    budget, spent, stale = time_limit_s * DET_PER_SECOND, 0.0, 0
    deadline = time.perf_counter() + WALL_GUARD * time_limit_s + 1.0
    while spent < budget and stale < MAX_STALE and time.perf_counter() < deadline:
        hood = neighbourhood(schedule, loads, rng, neighbourhood_ranks)
        if hood is None:
            break
        det_limit = min(DET_PER_SOLVE, budget - spent)
        assignment, det, proved = solve_neighbourhood(schedule, hood, cost, seed=seed,
                                                      det_limit=det_limit)
        spent += det
        improved = assignment is not None and apply_if_better(schedule, hood, assignment,
                                                              loads, cost)
        stale = 0 if improved else stale + 1
        if proved and len(hood) == schedule.world_size:
            break  # the whole problem was one neighbourhood and CP-SAT proved it optimal
    return schedule


def neighbourhood(schedule: Schedule, loads: np.ndarray, rng: np.random.Generator,
                  k: int) -> list[int] | None:
    """The most loaded ranks plus lightly loaded ones (seeded), or None if nothing helps."""
    N = schedule.world_size
    if N <= k:
        hood = list(range(N))
    else:
        order = np.argsort(-loads, kind="stable")
        top = [int(r) for r in order[: k // 2]]
        light = order[-max(k, N // 4):]
        pick = rng.choice(light, size=k - len(top), replace=False)
        hood = sorted(set(top) | {int(r) for r in pick})
    top_rank = int(np.argmax(loads))
    if not schedule.items[top_rank] or loads[hood].max() <= schedule.base_s[hood].max():
        return None  # the bottleneck is a ring: moving short sequences cannot shorten it
    return hood


def solve_neighbourhood(schedule: Schedule, hood: Sequence[int], cost: CostModel, *,
                        seed: int, det_limit: float):
    """CP-SAT re-assignment of the neighbourhood's short sequences.

    Returns (item lists per hood rank or None, deterministic time used, whether CP-SAT
    proved the whole neighbourhood optimal).
    """
    items = [sh for r in hood for sh in schedule.items[r]]
    if not items:
        return None, 0.0, False
    whole = len(items) <= MAX_ITEMS
    if not whole:  # keep the largest; the rest stay where they are
        items = sorted(items, key=lambda sh: (-sh.length, sh.seq_id))[:MAX_ITEMS]
    keep = {sh.seq_id for sh in items}
    fixed = {r: [sh for sh in schedule.items[r] if sh.seq_id not in keep] for r in hood}
    times = [item_time(sh, cost) for sh in items]
    base = [schedule.load_of(r, fixed[r], cost) for r in hood]
    speed = [schedule.speed(r) for r in hood]
    slowest = min(speed)
    unit = (max(base) + (sum(times) + cost.c * len(hood)) / slowest) / SCALE or 1.0
    p = [[max(0, round(t / (v * unit))) for v in speed] for t in times]
    b = [round(x / unit) for x in base]
    c = [round(cost.c / (v * unit)) for v in speed]
    tok = [held_tokens(sh) for sh in items]

    m = cp_model.CpModel()
    x = [[m.new_bool_var(f"x{i}_{j}") for j in range(len(hood))] for i in range(len(items))]
    for row in x:
        m.add_exactly_one(row)
    horizon = max(b) + sum(max(row) for row in p) + max(c) * (len(items) + 1)
    M = m.new_int_var(0, horizon, "makespan")
    where = {sh.seq_id: j for j, r in enumerate(hood) for sh in schedule.items[r]}
    for j in range(len(hood)):
        n = m.new_int_var(0, len(items), f"packs{j}")
        fixed_tok = sum(held_tokens(sh) for sh in fixed[hood[j]])
        cap = schedule.capacity(hood[j])
        m.add(n * cap >= fixed_tok + sum(tok[i] * x[i][j] for i in range(len(items))))
        m.add(M >= b[j] + sum(p[i][j] * x[i][j] for i in range(len(items))) + c[j] * n)
    for i, sh in enumerate(items):
        for j in range(len(hood)):
            m.add_hint(x[i][j], int(where[sh.seq_id] == j))
    m.minimize(M)
    solver = cp_model.CpSolver()
    solver.parameters.num_workers = 1
    solver.parameters.random_seed = int(seed) % (2**31)
    solver.parameters.linearization_level = 0  # faster first solutions on these models
    solver.parameters.max_deterministic_time = max(det_limit, 1e-3)
    solver.parameters.max_time_in_seconds = SOLVE_WALL_CAP_S
    status = solver.solve(m)
    det = float(solver.response_proto.deterministic_time)
    # ortools' stubs type solve()'s status and the status constants apart
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):  # type: ignore[comparison-overlap]
        return None, det, False
    new = [list(fixed[r]) for r in hood]
    for i, sh in enumerate(items):
        j = next(j for j in range(len(hood)) if solver.boolean_value(x[i][j]))
        new[j].append(sh)
    # ortools' stubs type solve()'s status and the status constants apart
    optimal = status == cp_model.OPTIMAL  # type: ignore[comparison-overlap]
    return new, det, whole and optimal


def apply_if_better(schedule: Schedule, hood: Sequence[int], assignment, loads: np.ndarray,
                    cost: CostModel) -> bool:
    """Keep the new assignment if, exactly re-packed, it lowers the hood's largest load."""
    new_loads = [schedule.load_of(r, a, cost) for r, a in zip(hood, assignment, strict=True)]
    old_max = float(loads[list(hood)].max())
    if max(new_loads) >= old_max * (1 - 1e-9):
        return False
    for r, a, load in zip(hood, assignment, new_loads, strict=True):
        schedule.items[r] = a
        loads[r] = load
    return True
