"""Hang localisation: from every rank's last position and the step's plan, whom the ranks
wait on.

When progress stops, every member of a stalled ring stops too (they block on its KV
exchange), and so does every other rank once it reaches the step's gradient collectives.
Heartbeats carry each rank's place in its step (parallelism/progress.py): micro-batch,
the group it is in, layer, forward/backward, ring hop, and whether it is blocked on a
ring exchange. The plan says which ranks must meet in which group at which micro-batch,
so the wait-for graph follows:

- a rank blocked on a ring exchange in micro-batch m waits on the members of its group
  that have not reached the same point (an earlier micro-batch of their own, not started,
  or an earlier layer / direction / hop of m), or that reached it but are not blocked
  (still computing);
- a rank in the step's collectives (gradient reduction, the optimizer's norm) waits on
  every rank that has not reached them;
- a rank that is computing, or has not started the step's micro-batches, waits on nobody.

The culprits are the ranks someone waits on that wait on nobody themselves. If every
member of a ring is blocked at the same point, no member is behind: the ring itself is
reported (a communication hang). Pure functions over plain values; no I/O.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace

from opentelemetry import propagate

from scheduler.plan import StepPlan

COLLECTIVE_PHASES = ("reduce", "optimizer")
_PHASE_ORDER = {"forward": 0, "head": 1, "backward": 2, "after": 3}


@dataclass(frozen=True, kw_only=True)
class RankPosition:
    """What a rank's last heartbeat said (controller/rpc StepPosition)."""

    rank: int
    step: int
    micro_batch: int = -1
    ring: tuple[int, ...] = ()
    layer: int = -1
    phase: str = "start"
    ring_hop: int = -1
    waiting: bool = False

    @property
    def in_collectives(self) -> bool:
        return self.phase in COLLECTIVE_PHASES


@dataclass(frozen=True, kw_only=True)
class Culprit:
    """A rank the others wait on, where it is, and who waits on it."""

    rank: int
    position: RankPosition
    ring: tuple[int, ...]  # the group its waiters wait in (its own group when it is in one)
    micro_batch: int  # the micro-batch of that group
    ring_waiters: tuple[int, ...]  # members of that group blocked on it
    collective_waiters: tuple[int, ...]  # ranks waiting for it in the step's collectives


@dataclass(frozen=True, kw_only=True)
class HangReport:
    """Where a stalled step stands (see the module docstring)."""

    step: int
    culprits: tuple[Culprit, ...] = ()
    stuck_rings: tuple[tuple[int, ...], ...] = ()  # rings whose members all wait together
    message: str = ""
    others: dict[int, str] = field(default_factory=dict)  # rank -> where it waits

    @property
    def culprit_ranks(self) -> tuple[int, ...]:
        return tuple(c.rank for c in self.culprits)


def localise(plan: StepPlan | None, positions: Mapping[int, RankPosition],
             world_size: int, *, silent: Collection[int] = ()) -> HangReport:
    """The culprits of a stalled step (`plan`: the plan of the earliest step any rank is
    in; None when the controller no longer has it). A rank without a position has not
    begun the step; a `silent` rank (no heartbeat lately) waits on nobody, whatever its
    last position said."""
    step = min((p.step for p in positions.values() if p.step >= 0), default=-1)
    pos = {r: positions.get(r, RankPosition(rank=r, step=step)) for r in range(world_size)}
    for r in silent:  # its last word may be stale: its peers wait on it, not with it
        if r in pos:
            pos[r] = replace(pos[r], waiting=False)
    groups = _groups_of(plan, world_size)
    edges = {r: [] if r in silent else _waits_on(r, pos, groups, step) for r in pos}
    culprit_ranks = sorted({q for r, qs in edges.items() for q, _ in qs} - {
        r for r, qs in edges.items() if qs})
    culprits = tuple(_culprit(q, pos, edges, groups) for q in culprit_ranks)
    stuck = _stuck_rings(pos, groups, edges)
    report = HangReport(step=step, culprits=culprits, stuck_rings=stuck)
    return HangReport(step=step, culprits=culprits, stuck_rings=stuck,
                      message=describe(report, pos), others=_where_others_wait(pos, edges))


def _groups_of(plan: StepPlan | None, world_size: int) -> dict[int, list[tuple[int, tuple]]]:
    """rank -> [(micro_batch, group ranks)] of the plan, in order."""
    out: dict[int, list[tuple[int, tuple]]] = {r: [] for r in range(world_size)}
    if plan is None:
        return out
    for m, g in plan.groups():
        for r in g.ranks:
            if r in out:
                out[r].append((m, tuple(g.ranks)))
    return out


def _point(p: RankPosition) -> tuple:
    """Order of positions inside one micro-batch (all members go through the same)."""
    phase = _PHASE_ORDER.get(p.phase, -1)
    layer = p.layer if p.phase != "backward" else -p.layer
    return (phase, layer, p.ring_hop)


def _reached(q: RankPosition, m: int, step: int) -> bool:
    """Whether q has got to (or past) micro-batch m of `step`."""
    if q.step > step or q.in_collectives or (q.step == step and q.phase == "done"):
        return True
    if q.step < step or q.micro_batch < 0:
        return False
    return q.micro_batch >= m


def _waits_on(r: int, pos: Mapping[int, RankPosition], groups, step: int
              ) -> list[tuple[int, str]]:
    """[(rank, "ring" | "collective")] that rank r waits on."""
    p = pos[r]
    if p.step != step:
        return []
    if p.in_collectives:
        return [(q, "collective") for q, x in pos.items() if q != r and x.step == step
                and not x.in_collectives and x.phase != "done"]
    if not p.waiting or p.micro_batch < 0:
        return []
    ring = next((g for m, g in groups[r] if m == p.micro_batch), p.ring)
    out = []
    for q in ring:
        if q == r or q not in pos:
            continue
        x = pos[q]
        if not _reached(x, p.micro_batch, step):
            out.append((q, "ring"))
        elif x.step == step and x.micro_batch == p.micro_batch and not x.in_collectives and (
                _point(x) < _point(p) or (_point(x) == _point(p) and not x.waiting)):
            out.append((q, "ring"))
    return out


def _culprit(q: int, pos, edges, groups) -> Culprit:
    ring_waiters = sorted(r for r, qs in edges.items() if (q, "ring") in qs)
    collective = sorted(r for r, qs in edges.items() if (q, "collective") in qs)
    p = pos[q]
    if ring_waiters:
        m = pos[ring_waiters[0]].micro_batch
        ring = next((g for mm, g in groups[q] if mm == m), pos[ring_waiters[0]].ring)
    else:
        m, ring = p.micro_batch, p.ring
    return Culprit(rank=q, position=p, ring=tuple(ring), micro_batch=m,
                   ring_waiters=tuple(ring_waiters), collective_waiters=tuple(collective))


def _stuck_rings(pos, groups, edges) -> tuple[tuple[int, ...], ...]:
    """Rings of two or more whose members are all blocked at the same point, behind nobody."""
    seen = set()
    for r, p in pos.items():
        if not p.waiting or edges[r] or len(p.ring) < 2 or p.ring in seen:
            continue
        members = [pos.get(q) for q in p.ring]
        if all(x is not None and x.waiting and x.micro_batch == p.micro_batch
               and _point(x) == _point(p) and not edges[x.rank] for x in members):
            seen.add(p.ring)
    return tuple(sorted(seen))


def _where_others_wait(pos, edges) -> dict[int, str]:
    out = {}
    for r, qs in edges.items():
        kinds = {k for _, k in qs}
        if "collective" in kinds:
            out[r] = "in the step's collectives"
        elif "ring" in kinds:
            out[r] = f"on its ring in micro-batch {pos[r].micro_batch}"
    return out


def where(p: RankPosition) -> str:
    """'layer 12 backward', 'the loss head', 'the start of the step', ..."""
    if p.micro_batch < 0:
        return f"the start of step {p.step}, before its first micro-batch" if p.step >= 0 \
            else "registration, before its first step"
    if p.in_collectives:
        return "the step's collectives"
    if p.phase == "head":
        return "the loss head"
    if p.phase == "after":
        return "the end of the micro-batch"
    text = f"layer {p.layer} {p.phase}" if p.layer >= 0 else p.phase
    return text + (f", ring hop {p.ring_hop}" if p.ring_hop >= 0 else "")


def _wait(ranks: Sequence[int]) -> str:
    return "waits" if len(ranks) == 1 else "wait"


def ranks_text(ranks: Sequence[int]) -> str:
    """'rank 3', 'ranks 2 and 7', 'ranks 1, 2 and 7'."""
    ranks = list(ranks)
    if len(ranks) == 1:
        return f"rank {ranks[0]}"
    return "ranks " + ", ".join(map(str, ranks[:-1])) + f" and {ranks[-1]}"


def describe(report: HangReport, pos: Mapping[int, RankPosition]) -> str:
    """One sentence per culprit (and stuck ring), as job events and logs show it."""
    parts = []
    for c in report.culprits:
        p = c.position
        if p.micro_batch >= 0 and not p.in_collectives:
            ring = c.ring if p.micro_batch == c.micro_batch else p.ring
            kind = f"ring {list(ring)}" if len(ring) > 1 else "packed"
            text = f"rank {c.rank} stalled in micro-batch {p.micro_batch}, {kind}, {where(p)}"
        else:
            text = f"rank {c.rank} stalled at {where(p)}"
        if c.ring_waiters:
            text += f"; {ranks_text(c.ring_waiters)} {_wait(c.ring_waiters)} on it"
            if p.micro_batch != c.micro_batch:
                text += f" in micro-batch {c.micro_batch}, ring {list(c.ring)}"
        if c.collective_waiters:
            text += (f"; {ranks_text(c.collective_waiters)} {_wait(c.collective_waiters)} in "
                     "the step's collectives")
        parts.append(text)
    for ring in report.stuck_rings:
        p = pos[ring[0]]
        parts.append(f"ring {list(ring)} is stuck in micro-batch {p.micro_batch}, {where(p)}, "
                     "every member blocked on its exchange (a communication hang)")
    if not parts:
        computing = sorted(r for r, p in pos.items() if p.step == report.step
                           and not p.waiting and not p.in_collectives)
        parts.append(f"no rank waits on another at step {report.step}; "
                     + (f"{ranks_text(computing)} made no progress in compute"
                        if computing else "the positions do not say more"))
    return "; ".join(parts)


def position_of(rank: int, msg) -> RankPosition:
    """A RankPosition from a heartbeat's StepPosition message."""
    return RankPosition(rank=rank, step=int(msg.step), micro_batch=int(msg.micro_batch),
                        ring=tuple(int(r) for r in msg.ring), layer=int(msg.layer),
                        phase=msg.phase or "start", ring_hop=int(msg.ring_hop),
                        waiting=bool(msg.waiting))


def hang_span(tracer, job, report: HangReport) -> None:
    """Record `report` as a `job.hang` span of `job`'s trace (parent: its trace_parent)."""
    parent = propagate.extract({"traceparent": job.trace_parent} if job.trace_parent
                               else {})
    with tracer.start_as_current_span("job.hang", context=parent) as span:
        span.set_attributes({
            "ringmaster.job_id": job.id, "ringmaster.attempt": job.attempt,
            "ringmaster.step": report.step, "hang.message": report.message,
            "hang.stalled_ranks": list(report.culprit_ranks),
            "hang.waiting_ranks": sorted({r for c in report.culprits
                                          for r in c.ring_waiters + c.collective_waiters}),
            "hang.stuck_rings": [str(list(r)) for r in report.stuck_rings]})
        if report.culprits:
            c = report.culprits[0]
            span.set_attributes({
                "hang.ring": list(c.ring), "hang.micro_batch": c.position.micro_batch,
                "hang.layer": c.position.layer, "hang.phase": c.position.phase,
                "hang.ring_hop": c.position.ring_hop})


