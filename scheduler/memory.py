"""MEMO memory planner, level 1: static offsets for tensors with known lifetimes.

MEMO (Zhao et al., arXiv 2407.12117, Sec. 4.3) removes fragmentation by giving every
activation an address planned ahead from the allocation trace. Each tensor i is a
rectangle: a fixed span of op indices [first_i, last_i] (inclusive) on the time axis and
[x_i, x_i + s_i) on the address axis. The MIP of MEMO's Eq. (10)-(12),

    minimise  P
    s.t.      x_i + s_i <= P                                   for every i
              x_i + s_i <= x_j  or  x_j + s_j <= x_i           for every pair i, j whose
                                                                lifetimes intersect,

is solved here with OR-tools CP-SAT, whose NoOverlap2D constraint is exactly the pairwise
disjunction (time intervals fixed, address intervals variable). The solver runs under a
time budget and is warm-started with a hint from a best-fit heuristic, so a valid plan
always comes back even when the budget is too short to improve it. The lower bound is the
maximum number of bytes live at any op (no placement can do better); `gap` is measured
against it (or against the solver's own bound, whichever is higher).

Level 2 (whole layers as blocks) lives in scheduler/memory_model.py. Torch-free: this runs
in the controller's planning process.
"""

from __future__ import annotations

import itertools
import math
import operator
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import reduce

STATUS_OPTIMAL = "optimal"      # peak equals a proven lower bound
STATUS_FEASIBLE = "feasible"    # valid plan, optimality not proven within the budget
STATUS_HEURISTIC = "heuristic"  # the solver could not improve or verify the warm start


@dataclass(frozen=True, kw_only=True)
class MemoryPlan:
    """Byte offsets for a set of tensors whose lifetimes are op-index intervals."""

    offsets: tuple[int, ...]                  # address of tensor i, bytes from the arena base
    sizes: tuple[int, ...]                    # bytes of tensor i as planned (after alignment)
    lifetimes: tuple[tuple[int, int], ...]    # (first_op, last_op) of tensor i, inclusive
    peak_bytes: int                           # max over i of offsets[i] + sizes[i]
    lower_bound_bytes: int                    # best proven bound on the optimal peak
    max_live_bytes: int                       # bytes live at the busiest op (a lower bound)
    status: str                               # STATUS_OPTIMAL, STATUS_FEASIBLE or STATUS_HEURISTIC
    gap: float                                # (peak - lower_bound) / peak, 0 when optimal
    heuristic_peak_bytes: int                 # peak of the best-fit warm start
    solve_time_s: float                       # wall time of the whole call

    @property
    def num_tensors(self) -> int:
        return len(self.sizes)

    def overlapping_pairs(self) -> list[tuple[int, int]]:
        """Pairs of tensors that are live together and share an address (empty if valid)."""
        return _overlapping_pairs(self.offsets, self.sizes, self.lifetimes)


def plan_offsets(
    sizes: Sequence[int],
    lifetimes: Sequence[tuple[int, int]],
    *,
    time_limit_s: float = 5.0,
    alignment: int = 1,
    num_workers: int = 1,
    ceilings: Mapping[int, int] | None = None,
    links: Mapping[int, tuple[int, int]] | None = None,
) -> MemoryPlan:
    """Offsets minimising the peak for tensors live over `lifetimes[i] = (first_op, last_op)`.

    Sizes are rounded up to `alignment` bytes and offsets are multiples of it (512 matches
    the CUDA caching allocator; the arena needs at least the element size). The best-fit
    plan is returned as is when it already meets the max-live bound, otherwise CP-SAT
    improves it for up to `time_limit_s` seconds using `num_workers` threads.

    Optional side constraints (used by the bi-level plan, scheduler/memory_model.py):
    `ceilings[i] = c` keeps tensor i below address c (offset + size <= c); `links[j] =
    (i, d)` puts tensor j exactly d bytes above tensor i (pieces of one block). Both must be
    multiples of `alignment`; a tensor that is linked cannot be an anchor itself.
    """
    start = time.perf_counter()
    sizes_b, spans = _validate(sizes, lifetimes, time_limit_s, alignment, num_workers)
    sizes_b = [_round_up(s, alignment) for s in sizes_b]
    ceilings, links = _validate_constraints(ceilings, links, sizes_b, spans, alignment)
    unit = _unit(sizes_b + list(ceilings.values()) + [d for _, d in links.values()], alignment)
    units = [s // unit for s in sizes_b]
    ceil_u = {i: c // unit for i, c in ceilings.items()}
    links_u = {j: (i, d // unit) for j, (i, d) in links.items()}
    lower = max_live_bytes(units, spans)
    offsets = best_fit_offsets(units, spans, ceilings=ceil_u, links=links_u)
    heuristic_peak = _peak(offsets, units)
    bound, status = heuristic_peak, STATUS_OPTIMAL
    if heuristic_peak > lower:
        offsets, bound, status = _solve_cp_sat(
            units, spans, offsets, lower, time_limit_s=time_limit_s, num_workers=num_workers,
            ceilings=ceil_u, links=links_u)
    peak = _peak(offsets, units)
    bound = max(bound, lower)
    return MemoryPlan(
        offsets=tuple(o * unit for o in offsets), sizes=tuple(sizes_b), lifetimes=tuple(spans),
        peak_bytes=peak * unit, lower_bound_bytes=bound * unit, max_live_bytes=lower * unit,
        status=STATUS_OPTIMAL if peak == bound else status,
        gap=0.0 if peak == 0 else (peak - bound) / peak,
        heuristic_peak_bytes=heuristic_peak * unit,
        solve_time_s=time.perf_counter() - start,
    )


def max_live_bytes(sizes: Sequence[int], lifetimes: Sequence[tuple[int, int]]) -> int:
    """Bytes live at the busiest op: sweep over lifetime starts and ends."""
    delta: dict[int, int] = {}
    for size, (first, last) in zip(sizes, lifetimes, strict=True):
        delta[first] = delta.get(first, 0) + size
        delta[last + 1] = delta.get(last + 1, 0) - size
    live = best = 0
    for op in sorted(delta):
        live += delta[op]
        best = max(best, live)
    return best


def best_fit_offsets(sizes: Sequence[int], lifetimes: Sequence[tuple[int, int]], *,
                     ceilings: Mapping[int, int] | None = None,
                     links: Mapping[int, tuple[int, int]] | None = None) -> list[int]:
    """Greedy best-fit placement (Pisarchyk & Lee, arXiv 2001.03288, "greedy by size").

    Tensors are placed in several orders (largest first, longest-lived first, earliest
    first); each goes into the smallest gap between already placed, time-overlapping
    tensors that holds it, else on top. The order with the lowest peak wins. Tensors
    with a ceiling go first; a linked group is placed as one piece at its lowest base
    where every member fits.
    """
    ceilings, groups = dict(ceilings or {}), _groups(len(sizes), links or {})

    def extent(u: int) -> tuple[int, int, int, int]:
        members = groups[u]
        return (0 if any(m in ceilings for m, _ in members) else 1,
                -max(d + sizes[m] for m, d in members),
                min(lifetimes[m][0] for m, _ in members),
                max(lifetimes[m][1] for m, _ in members))

    keys = {u: extent(u) for u in groups}
    orders = [
        sorted(groups, key=lambda u: (keys[u][0], keys[u][1], keys[u][2], u)),
        sorted(groups, key=lambda u: (keys[u][0], keys[u][2] - keys[u][3], keys[u][1], u)),
        sorted(groups, key=lambda u: (keys[u][0], keys[u][2], keys[u][1], u)),
    ]
    best: list[int] | None = None
    for order in orders:
        offsets = _place_in_order(order, groups, sizes, lifetimes, ceilings)
        if offsets is not None and (best is None or _peak(offsets, sizes) < _peak(best, sizes)):
            best = offsets
    if best is None:
        raise ValueError(f"ceilings={ceilings} cannot all be met by any placement tried; "
                         "give each constrained tensor room below its ceiling")
    return best


def _groups(n: int, links: Mapping[int, tuple[int, int]]) -> dict[int, list[tuple[int, int]]]:
    """anchor -> [(member, delta)] with (anchor, 0) first; unlinked tensors alone."""
    groups: dict[int, list[tuple[int, int]]] = {i: [(i, 0)] for i in range(n) if i not in links}
    for j, (i, d) in sorted(links.items()):
        groups[i].append((j, d))
    return groups


def _place_in_order(order: list[int], groups: dict[int, list[tuple[int, int]]],
                    sizes: Sequence[int], lifetimes: Sequence[tuple[int, int]],
                    ceilings: dict[int, int]) -> list[int] | None:
    offsets = [0] * len(sizes)
    placed: list[int] = []
    for u in order:
        members = groups[u]
        if len(members) == 1:
            busy = _busy(u, placed, offsets, sizes, lifetimes)
            base = _best_gap(busy, sizes[u], ceilings.get(u)) if sizes[u] else 0
        else:
            base = _lowest_base(members, placed, offsets, sizes, lifetimes, ceilings)
        if base is None:
            return None
        for m, d in members:
            offsets[m] = base + d
            if sizes[m]:
                placed.append(m)
    return offsets


def _busy(i: int, placed: list[int], offsets: list[int], sizes: Sequence[int],
          lifetimes: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """Address ranges of placed tensors live at some op of tensor i, sorted."""
    first, last = lifetimes[i]
    return sorted((offsets[j], offsets[j] + sizes[j]) for j in placed
                  if lifetimes[j][0] <= last and first <= lifetimes[j][1])


def _best_gap(busy: list[tuple[int, int]], size: int, ceiling: int | None = None) -> int | None:
    """Start of the smallest free gap of at least `size` (ending at or below `ceiling`)
    below the top of `busy` (sorted), else the top; None if nothing fits the ceiling."""
    limit = math.inf if ceiling is None else ceiling
    best_start, best_len, top = -1, math.inf, 0
    for lo, hi in busy:
        gap = lo - top
        if size <= gap < best_len and top + size <= limit:
            best_start, best_len = top, gap
        top = max(top, hi)
    if best_start >= 0:
        return best_start
    return top if top + size <= limit else None


def _lowest_base(members: list[tuple[int, int]], placed: list[int], offsets: list[int],
                 sizes: Sequence[int], lifetimes: Sequence[tuple[int, int]],
                 ceilings: dict[int, int]) -> int | None:
    """Lowest base at which every member (at base + delta) is free and under its ceiling."""
    busy = {m: _busy(m, placed, offsets, sizes, lifetimes) for m, _ in members if sizes[m]}
    candidates = {0} | {hi - d for m, d in members if m in busy for _, hi in busy[m] if hi >= d}
    for base in sorted(candidates):
        if all(_is_free(busy[m], base + d, sizes[m])
               and base + d + sizes[m] <= ceilings.get(m, math.inf)
               for m, d in members if m in busy):
            return base
    return None


def _is_free(busy: list[tuple[int, int]], lo: int, size: int) -> bool:
    return all(hi <= lo or b_lo >= lo + size for b_lo, hi in busy)


def _solve_cp_sat(sizes: list[int], lifetimes: list[tuple[int, int]], hint: list[int],
                  lower: int, *, time_limit_s: float, num_workers: int,
                  ceilings: dict[int, int], links: dict[int, tuple[int, int]]
                  ) -> tuple[list[int], int, str]:
    """CP-SAT over NoOverlap2D; returns (offsets, proven lower bound, status)."""
    from ortools.sat.python import cp_model

    upper = _peak(hint, sizes)
    model = cp_model.CpModel()
    peak = model.new_int_var(lower, upper, "peak")
    offsets, time_ivs, mem_ivs = [], [], []
    for i, (size, (first, last)) in enumerate(zip(sizes, lifetimes, strict=True)):
        x = model.new_int_var(0, max(0, min(upper, ceilings.get(i, upper)) - size), f"x{i}")
        offsets.append(x)
        model.add_hint(x, hint[i])
        if size == 0:
            continue
        model.add(x + size <= peak)
        time_ivs.append(model.new_fixed_size_interval_var(first, last - first + 1, f"t{i}"))
        mem_ivs.append(model.new_fixed_size_interval_var(x, size, f"m{i}"))
    model.add_no_overlap_2d(time_ivs, mem_ivs)
    for j, (i, d) in links.items():
        model.add(offsets[j] == offsets[i] + d)
    model.add_hint(peak, upper)
    model.minimize(peak)
    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = time_limit_s
    solver.parameters.num_workers = num_workers
    code = solver.solve(model)
    # ortools' stubs type solve()'s status and the status constants apart
    if code not in (cp_model.OPTIMAL, cp_model.FEASIBLE):  # type: ignore[comparison-overlap]
        return hint, lower, STATUS_HEURISTIC
    found = [solver.value(x) for x in offsets]
    if _peak(found, sizes) > upper:  # never worse than the warm start
        found = hint
    # ortools' stubs type solve()'s status and the status constants apart
    optimal = code == cp_model.OPTIMAL  # type: ignore[comparison-overlap]
    status = STATUS_OPTIMAL if optimal else STATUS_FEASIBLE
    return found, max(lower, int(math.ceil(solver.best_objective_bound))), status


def _overlapping_pairs(offsets: Sequence[int], sizes: Sequence[int],
                       lifetimes: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    bad = []
    order = sorted(range(len(sizes)), key=lambda i: lifetimes[i][0])
    for a, i in enumerate(order):
        for j in order[a + 1:]:
            if lifetimes[j][0] > lifetimes[i][1]:
                break
            if sizes[i] and sizes[j] and offsets[i] < offsets[j] + sizes[j] \
                    and offsets[j] < offsets[i] + sizes[i]:
                bad.append((min(i, j), max(i, j)))
    return bad


def _peak(offsets: Sequence[int], sizes: Sequence[int]) -> int:
    return max((o + s for o, s in zip(offsets, sizes, strict=True) if s), default=0)


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _unit(sizes: list[int], alignment: int) -> int:
    """Largest common divisor of the sizes that keeps offsets aligned: shrinks the domain."""
    # Every size is already a multiple of `alignment`, so their gcd is too.
    return max(alignment, reduce(math.gcd, sizes, 0))


def _validate(sizes: Sequence[int], lifetimes: Sequence[tuple[int, int]], time_limit_s: float,
              alignment: int, num_workers: int) -> tuple[list[int], list[tuple[int, int]]]:
    if len(sizes) != len(lifetimes):
        raise ValueError(f"sizes has {len(sizes)} entries but lifetimes has {len(lifetimes)}; "
                         "give one (first_op, last_op) per tensor")
    if not time_limit_s > 0:
        raise ValueError(f"time_limit_s={time_limit_s!r} must be > 0 seconds")
    if not isinstance(alignment, int) or alignment < 1:
        raise ValueError(f"alignment={alignment!r} must be a positive integer number of bytes")
    if not isinstance(num_workers, int) or num_workers < 1:
        raise ValueError(f"num_workers={num_workers!r} must be a positive integer")
    out_sizes, out_spans = [], []
    for i, (given, span) in enumerate(zip(sizes, lifetimes, strict=True)):
        size = _as_int(given)
        if size is None or size < 0:
            raise ValueError(f"sizes[{i}]={sizes[i]!r} must be a non-negative integer (bytes)")
        try:
            first, last = span
        except (TypeError, ValueError):
            raise ValueError(
                f"lifetimes[{i}]={span!r} must be a (first_op, last_op) pair") from None
        first_op, last_op = _as_int(first), _as_int(last)
        if first_op is None or last_op is None or not 0 <= first_op <= last_op:
            raise ValueError(f"lifetimes[{i}]={span!r} must satisfy 0 <= first_op <= last_op "
                             "(integers, inclusive)")
        out_sizes.append(int(size))
        out_spans.append((int(first_op), int(last_op)))
    return out_sizes, out_spans


def _validate_constraints(ceilings, links, sizes: list[int], spans: list[tuple[int, int]],
                          alignment: int) -> tuple[dict[int, int], dict[int, tuple[int, int]]]:
    n = len(sizes)
    out_c: dict[int, int] = {}
    for given_i, given_c in (ceilings or {}).items():
        i, c = _as_int(given_i), _as_int(given_c)
        if i is None or not 0 <= i < n or c is None or c < sizes[i] or c % alignment:
            raise ValueError(f"ceilings[{i}]={c!r} must name a tensor 0..{n - 1} and be a "
                             f"multiple of alignment={alignment} at least its size")
        out_c[i] = c
    out_l: dict[int, tuple[int, int]] = {}
    for given_j, (given_i, given_d) in (links or {}).items():
        j, i, d = _as_int(given_j), _as_int(given_i), _as_int(given_d)
        if i is None or j is None or d is None or not (0 <= i < n and 0 <= j < n) or i == j \
                or d < 0 or d % alignment:
            raise ValueError(f"links[{j}]=({i}, {d}) must link two different tensors "
                             f"0..{n - 1} with a delta >= 0 that is a multiple of "
                             f"alignment={alignment}")
        out_l[j] = (i, d)
    anchors_linked = sorted(set(i for i, _ in out_l.values()) & set(out_l))
    if anchors_linked:
        raise ValueError(f"links: tensor(s) {anchors_linked} are both linked and anchors; "
                         "link every piece to one anchor")
    for members in _groups(n, out_l).values():
        for (a, da), (b, db) in itertools.combinations(members, 2):
            if sizes[a] and sizes[b] and spans[a][0] <= spans[b][1] and spans[b][0] <= spans[a][1] \
                    and da < db + sizes[b] and db < da + sizes[a]:
                raise ValueError(f"links put tensors {a} and {b} at overlapping addresses "
                                 "while both are live; give them disjoint deltas")
    return out_c, out_l


def _as_int(value) -> int | None:
    """`value` as an int if it is an integer type (numpy ints included, bools excluded)."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None
