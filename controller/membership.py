"""The worlds of one job attempt: who trains now, who is lost, who joins, when to give up.

A job attempt starts with `num_ranks` ranks (slots). Under `failure.mode: replan`
(docs/elastic.md) a lost rank does not end the attempt: the survivors form a new *world*
(an epoch number, the member ranks in process-group rank order, a fresh rendezvous prefix)
and re-plan the same batch on fewer ranks; a replacement process of a lost rank (Ray
restarts its actor) registers with a new *incarnation* and joins at the next step
boundary. `Membership` is that bookkeeping, and nothing else: no gRPC, no Redis, no
clock. controller.worker_service drives it under the attempt's condition variable and
persists `snapshot()` so a restarted controller carries on.

When a world cannot be re-formed the answer is a `Fallback` (the attempt ends and the job
restarts from its last checkpoint, today's path), with the reason for the job's events:
replan is off, more than `failure.max_lost_ranks` ranks are missing, no rank is left, or
the optimizer state cannot be rebuilt from the survivors: under the distributed optimizer
with shard mirrors, a shard's owner and its mirror (the next rank of the layout) are both
lost; without mirrors (or under zero1), a lost rank's shard needs a checkpoint. The
caller adds the planner's verdict (the batch does not fit the survivors).
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass, field, replace
from typing import Literal

__all__ = ["Fallback", "Membership", "MembershipPolicy", "WorldRecord"]

SlotState = Literal["absent", "member", "waiting", "lost"]


@dataclass(frozen=True, kw_only=True)
class MembershipPolicy:
    """What the job spec says about losing ranks (controller.spec.FailurePolicy)."""

    num_ranks: int  # the job's full world
    replan: bool  # failure.mode == "replan"
    max_lost_ranks: int  # the most ranks the world may be short of
    sharding: str  # resolved training.optimizer_sharding
    shard_mirror: bool  # resolved: distributed shards mirrored on the next rank


@dataclass(frozen=True, kw_only=True)
class WorldRecord:
    """One world of the attempt."""

    epoch: int
    members: tuple[int, ...]  # ranks in process-group rank order
    joining: tuple[int, ...] = ()  # members that hold no state yet
    reason: str = ""  # why it formed ("start", "rank 2 lost: ...", "rank 1 rejoined")
    boundary: int | None = None  # a join: the step it starts at (the old world runs before)
    start_step: int | None = None  # the step its members formed it at
    formed: tuple[int, ...] = ()  # members that have formed it

    @property
    def store_prefix(self) -> str:
        return f"world{self.epoch}"

    @property
    def size(self) -> int:
        return len(self.members)

    @functools.cached_property
    def complete(self) -> bool:
        """Every member formed it (read on every plan-stream wake-up: computed once per
        record, which is immutable: forming makes a new one)."""
        return set(self.formed) == set(self.members)


@dataclass(frozen=True, kw_only=True)
class Fallback:
    """Re-planning cannot work: end the attempt (restart from the checkpoint)."""

    reason: str


@dataclass(kw_only=True)
class Membership:
    """See the module docstring. Ranks are slots 0..num_ranks-1."""

    policy: MembershipPolicy
    incarnations: dict[int, int] = field(default_factory=dict)  # slot -> current process
    states: dict[int, SlotState] = field(default_factory=dict)
    next_incarnation: int = 1
    world: WorldRecord | None = None
    layout: tuple[int, ...] = ()  # members of the newest complete world: where state is

    def __post_init__(self) -> None:
        for r in range(self.policy.num_ranks):
            self.states.setdefault(r, "absent")

    # ----------------------------------------------------------------- processes
    def register(self, slot: int) -> int:
        """A process of `slot` registered: its new incarnation (older ones are fenced)."""
        inc = self.next_incarnation
        self.next_incarnation += 1
        self.incarnations[slot] = inc
        self.states[slot] = "waiting" if self.world is not None else "absent"
        if self.world is None and all(s in self.incarnations for s in range(
                self.policy.num_ranks)):
            members = tuple(range(self.policy.num_ranks))
            self.world = WorldRecord(epoch=0, members=members, joining=members,
                                     reason="start")
            for s in members:
                self.states[s] = "member"
        return inc

    def current(self, slot: int, incarnation: int) -> bool:
        """The call comes from the slot's current, unfenced process."""
        return (self.incarnations.get(slot) == incarnation
                and self.states.get(slot) in ("member", "waiting", "absent"))

    def members(self) -> tuple[int, ...]:
        return self.world.members if self.world is not None else ()

    def waiting(self) -> list[int]:
        return sorted(s for s, st in self.states.items() if st == "waiting")

    # ----------------------------------------------------------------- losing ranks
    def lose(self, slots: list[int], reason: str, *, checkpoint: bool
             ) -> WorldRecord | Fallback | None:
        """`slots` are lost (process died, stalled, fenced). The world without them, a
        Fallback, or None when none of them was a member (a waiting joiner lost).
        `checkpoint`: the job has one (where unmirrored shards come back from)."""
        gone = [s for s in slots if self.states.get(s) in ("member", "waiting")]
        for s in gone:
            self.states[s] = "lost"
        lost_members = [s for s in gone if s in self.members()]
        if not lost_members:
            return None
        assert self.world is not None, "members exist only in a formed world"
        survivors = tuple(s for s in self.world.members if s not in lost_members)
        why = self._cannot_replan(survivors, checkpoint)
        if why:
            return Fallback(reason=why)
        joining = tuple(s for s in survivors if s not in self.layout)
        self.world = WorldRecord(epoch=self.world.epoch + 1, members=survivors,
                                 joining=joining, reason=reason)
        return self.world

    def _cannot_replan(self, survivors: tuple[int, ...], checkpoint: bool) -> str:
        p = self.policy
        if not p.replan:
            return "failure.mode is 'restart'"
        if not survivors:
            return "no rank is left"
        short = p.num_ranks - len(survivors)
        if short > p.max_lost_ranks:
            return (f"{short} of {p.num_ranks} ranks are missing, more than "
                    f"failure.max_lost_ranks={p.max_lost_ranks}")
        # The members' state is in the newest complete world's layout, or in the current
        # one's if its forming got far enough somewhere: both must survive.
        for layout in {self.layout or self.members(), self.members()}:
            why = self.state_lost(layout, set(survivors), checkpoint)
            if why:
                return why
        return ""

    def state_lost(self, layout: tuple[int, ...], alive: set[int], checkpoint: bool) -> str:
        """Why optimizer state laid out over `layout` cannot be rebuilt from `alive`."""
        held = [s for s in layout if s in alive]
        if not held:
            return "no rank holding optimizer state is left"
        lost = [s for s in layout if s not in alive]
        if not lost or self.policy.sharding == "none":
            return ""  # "none": every rank holds all of it
        if self.policy.shard_mirror and len(layout) > 1:
            for q, owner in enumerate(layout):
                mirror = layout[(q + 1) % len(layout)]
                if owner in lost and mirror in lost:
                    return (f"the optimizer shard of rank {owner} and its mirror on rank "
                            f"{mirror} are both lost")
            return ""
        if not checkpoint:
            return (f"the optimizer shard of rank {lost[0]} has no mirror and there is no "
                    "checkpoint to read it from")
        return ""

    # ----------------------------------------------------------------- joining
    def plan_join(self, boundary: int) -> WorldRecord | None:
        """If replacements wait and the world is complete: a world with them from
        `boundary` on (the first step not yet sent to any member)."""
        ready = [s for s in self.waiting() if s not in self.members()]
        if not ready or self.world is None or not self.world.complete:
            return None
        members = tuple(sorted((*self.world.members, *ready)))
        self.world = WorldRecord(epoch=self.world.epoch + 1, members=members,
                                 joining=tuple(ready), reason=f"rank(s) {ready} rejoined",
                                 boundary=boundary)
        for s in ready:
            self.states[s] = "member"
        return self.world

    def formed(self, slot: int, epoch: int, step: int) -> bool:
        """`slot` formed world `epoch` at `step`; True when that completes the world."""
        w = self.world
        if w is None or epoch != w.epoch or slot not in w.members or slot in w.formed:
            return False
        start = w.start_step if w.start_step is not None else step
        if start != step:
            raise ValueError(f"rank {slot} formed world {epoch} at step {step}, the others at "
                             f"{start}")
        self.world = replace(w, formed=(*w.formed, slot), start_step=start)
        if self.world.complete:
            self.layout = self.world.members
            return True
        return False

    # ----------------------------------------------------------------- persistence
    def snapshot(self) -> dict:
        return {"incarnations": {str(k): v for k, v in self.incarnations.items()},
                "states": {str(k): v for k, v in self.states.items()},
                "next_incarnation": self.next_incarnation, "layout": list(self.layout),
                "world": asdict(self.world) if self.world is not None else None}

    @classmethod
    def restore(cls, policy: MembershipPolicy, data: dict) -> Membership:
        w = data.get("world")
        world = None if w is None else WorldRecord(
            **{**w, "members": tuple(w["members"]), "joining": tuple(w["joining"]),
               "formed": tuple(w["formed"])})
        return cls(policy=policy, world=world, layout=tuple(data.get("layout", ())),
                   incarnations={int(k): v for k, v in data["incarnations"].items()},
                   states={int(k): v for k, v in data["states"].items()},
                   next_incarnation=data["next_incarnation"])
