"""The StepPlan: the one object that travels controller -> workers for each global batch.

JSON form (version 1) is the one in DESIGN.md; `StepPlan.model_validate_json` and
`model_dump_json` round-trip it. `StepPlan.violations()` checks every rule of the format
and reports all of them at once; `StepPlan.check()` raises PlanValidationError with that
list. The memory rule: the tokens a rank holds in one micro-batch after offload,
sum(length * (1 - offload_ratio)) / ring_size over its group's sequences, fit
`capacity_tokens`.
"""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import BaseModel, ConfigDict, Field

from scheduler.errors import PlanValidationError

PLAN_VERSION = 1


class _PlanModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SeqSlice(_PlanModel):
    """One sequence of the batch as a group holds it."""

    id: int = Field(ge=0, description="Index into the batch's list of sequence lengths.")
    length: int = Field(ge=1, description="Tokens in the sequence.")
    offload_ratio: float = Field(
        default=0.0, ge=0.0, le=1.0,
        description="Share of this sequence's activations sent to host memory (ByteScale Eq. 3).")


class RingGroup(_PlanModel):
    """Ranks that run the same sequences together: a ring if several, a packed rank if one."""

    ranks: list[int] = Field(min_length=1, description="World ranks in ring order.")
    sequences: list[SeqSlice] = Field(min_length=1, description="Sequences the group runs.")

    @property
    def ring_size(self) -> int:
        return len(self.ranks)

    @property
    def num_tokens(self) -> int:
        return sum(s.length for s in self.sequences)

    def tokens_per_rank(self) -> float:
        """Tokens each member holds after offload (zigzag splits every sequence evenly)."""
        kept = sum(s.length * (1.0 - s.offload_ratio) for s in self.sequences)
        return kept / len(self.ranks)


class MicroBatch(_PlanModel):
    """Groups that run concurrently on disjoint ranks."""

    groups: list[RingGroup] = Field(min_length=1, description="Groups on disjoint ranks.")


class Predicted(_PlanModel):
    """What the planner's cost model expects of this plan."""

    makespan_s: float = Field(ge=0.0, description="Predicted step time (slowest rank), seconds.")
    lower_bound_s: float = Field(ge=0.0, description="Perfect-balance lower bound, seconds.")
    per_rank_busy_s: list[float] = Field(description="Predicted busy time of each rank, seconds.")


class StepPlan(_PlanModel):
    """The plan of one global batch (see DESIGN.md, "The plan")."""

    version: int = Field(default=PLAN_VERSION, description="Plan format version (1).")
    world_size: int = Field(ge=1, description="Ranks in the job.")
    capacity_tokens: int = Field(ge=1, description="Tokens one rank may hold per micro-batch.")
    micro_batches: list[MicroBatch] = Field(description="Micro-batches, run in order.")
    predicted: Predicted | None = Field(default=None, description="Planner's predictions.")

    def groups(self):
        """(micro_batch_index, group) for every group of the plan."""
        for m, mb in enumerate(self.micro_batches):
            for g in mb.groups:
                yield m, g

    def micro_batches_of(self, rank: int) -> list[tuple[int, RingGroup]]:
        """The (micro_batch_index, group) pairs `rank` takes part in, in order."""
        return [(m, g) for m, g in self.groups() if rank in g.ranks]

    def groups_by_size(self) -> dict[int, int]:
        """Ring size -> number of groups of that size, smallest first."""
        sizes: dict[int, int] = {}
        for _, g in self.groups():
            sizes[g.ring_size] = sizes.get(g.ring_size, 0) + 1
        return dict(sorted(sizes.items()))

    def sequence_ids(self) -> list[int]:
        return sorted(s.id for _, g in self.groups() for s in g.sequences)

    def violations(self, lengths: Sequence[int] | None = None) -> list[str]:
        """Every rule of the format this plan breaks (empty when valid).

        With `lengths` (the batch's sequence lengths) it also checks that the ids are
        exactly 0..len(lengths)-1 and that each length matches.
        """
        out: list[str] = []
        if self.version != PLAN_VERSION:
            out.append(f"version: {self.version} is not supported (valid: {PLAN_VERSION})")
        if not self.micro_batches:
            out.append("micro_batches: empty; a plan runs at least one micro-batch")
        seen: dict[int, str] = {}
        for m, mb in enumerate(self.micro_batches):
            used: dict[int, int] = {}
            for gi, g in enumerate(mb.groups):
                where = f"micro_batches[{m}].groups[{gi}]"
                out += _group_violations(g, where, self.world_size, self.capacity_tokens)
                for r in set(g.ranks):
                    if r in used:
                        out.append(f"{where}.ranks: rank {r} is also in group {used[r]} "
                                   f"of the same micro-batch (groups must use disjoint ranks)")
                    used[r] = gi
                for si, s in enumerate(g.sequences):
                    if s.id in seen:
                        out.append(f"{where}.sequences[{si}].id: {s.id} already appears at "
                                   f"{seen[s.id]} (each id appears exactly once)")
                    else:
                        seen[s.id] = f"{where}.sequences[{si}]"
                    if lengths is not None and 0 <= s.id < len(lengths) \
                            and lengths[s.id] != s.length:
                        out.append(f"{where}.sequences[{si}].length: {s.length} but the batch "
                                   f"says sequence {s.id} has length {lengths[s.id]}")
        if lengths is not None:
            extra = sorted(i for i in seen if i >= len(lengths))
            missing = sorted(set(range(len(lengths))) - set(seen))
            if extra:
                out.append(f"sequences: ids {extra[:10]} are outside the batch "
                           f"(valid 0..{len(lengths) - 1})")
            if missing:
                out.append(f"sequences: ids {missing[:10]}{'...' if len(missing) > 10 else ''} "
                           f"of the batch are missing from the plan")
        if self.predicted is not None and len(self.predicted.per_rank_busy_s) != self.world_size:
            out.append(f"predicted.per_rank_busy_s: {len(self.predicted.per_rank_busy_s)} "
                       f"entries, expected world_size={self.world_size}")
        return out

    def check(self, lengths: Sequence[int] | None = None) -> StepPlan:
        """Raise PlanValidationError listing every violation; return self when valid."""
        found = self.violations(lengths)
        if found:
            raise PlanValidationError(found)
        return self


def _group_violations(g: RingGroup, where: str, world_size: int, capacity: int) -> list[str]:
    out = []
    bad = [r for r in g.ranks if not 0 <= r < world_size]
    if bad:
        out.append(f"{where}.ranks: {bad} out of range (valid 0..{world_size - 1})")
    if len(set(g.ranks)) != len(g.ranks):
        out.append(f"{where}.ranks: {g.ranks} repeats a rank")
    held = g.tokens_per_rank()
    if held > capacity * (1 + 1e-9):
        out.append(f"{where}: each of its {len(g.ranks)} rank(s) holds {held:.0f} tokens after "
                   f"offload, over capacity_tokens={capacity}")
    return out
