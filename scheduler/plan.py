"""The StepPlan: the one object that travels controller -> workers for each global batch.

JSON form: docs/plan-format.md. `StepPlan.model_validate_json` and `model_dump_json`
round-trip it. `StepPlan.violations()` checks every rule of the format and reports all of
them at once; `StepPlan.check()` raises PlanValidationError with that list.

Version 2 (what the planner writes) names each group's memory scheme (`RingGroup.memory`:
plain autograd, layer-wise StreamBP with its chunk, or MEMO token-wise offload at ratio
alpha) and the workers run exactly that; its memory rule: a plain group's members hold at
most `capacity_tokens` tokens each (zigzag: exactly as parallelism/zigzag.py cuts them),
and every group's predicted peak fits the plan's device budget (`PlanMemory`). Version 1
(no `memory`; absent `version` means 1) still reads; `group_memory` spells out what the
workers did with it: offload at the token-weighted mean of the sequences' offload_ratio
when that is > 0, else layer-wise StreamBP for a packed group whose rough activation
estimate exceeds V1_ACTIVATION_BUDGET_BYTES, else plain; its memory rule is
sum(length * (1 - offload_ratio)) / ring_size <= capacity_tokens.

DPO pairs (`StepPlan.pairs`, optional in either version): the (chosen, rejected) ids of a
batch's preference pairs. Both sequences of a pair run in one group (one rank, or one
ring), so the pair's loss needs no extra pass or collective across groups; a plan that
splits a pair is a violation. `violations(pairs=...)` checks a plan against the pairs of
the batch it is meant for, whether or not the plan lists them itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from scheduler.errors import PlanValidationError
from scheduler.work import Scheme
from scheduler.zigzag import max_local_tokens

PLAN_VERSION = 2  # what the planner writes
SUPPORTED_VERSIONS = (1, 2)
# Version 1's rule for layer-wise StreamBP (what workers/step.py decided by itself before
# plans named the scheme): a packed micro-batch whose layers' activations, estimated as
# (8 h + 3 F) x max(dtype bytes, 2) bytes per token per layer, exceed this.
V1_ACTIVATION_BUDGET_BYTES = 8 * 1024**3


class _PlanModel(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # Optional fields left unset (a version-1 plan has no memory settings) stay out of the
    # JSON form, so a version-1 plan round-trips unchanged.
    def model_dump(self, **kwargs):
        kwargs.setdefault("exclude_none", True)
        return super().model_dump(**kwargs)

    def model_dump_json(self, **kwargs):
        kwargs.setdefault("exclude_none", True)
        return super().model_dump_json(**kwargs)


class SeqSlice(_PlanModel):
    """One sequence of the batch as a group holds it."""

    id: int = Field(ge=0, description="Index into the batch's list of sequence lengths.")
    length: int = Field(ge=1, description="Tokens in the sequence.")
    offload_ratio: float = Field(
        default=0.0, ge=0.0, le=1.0,
        description="Share of this sequence's activations sent to host memory (ByteScale Eq. 3).")


class GroupMemory(_PlanModel):
    """How a group's members keep their activations (version 2)."""

    scheme: Literal["plain", "streambp", "offload"] = Field(
        default="plain", description="plain: autograd keeps every activation on the device; "
        "streambp: layer-wise StreamBP (keeps layer inputs, recomputes each layer in query "
        "chunks; packed groups only); offload: MEMO token-wise swap/recompute.")
    offload_ratio: float = Field(
        default=0.0, ge=0.0, le=1.0,
        description="offload: share alpha of the tokens whose saved activations go to host "
        "(the rest is recomputed in backward; every layer but the last also swaps its input, "
        "attention output and lse); streambp: share of the kept layer inputs on host.")
    chunk_tokens: int | None = Field(
        default=None, ge=1, description="streambp: tokens per query chunk (and per streamed "
        "head chunk).")

    def as_scheme(self) -> Scheme:
        """The scheme as the cost and memory models take it (scheduler.work.Scheme)."""
        return Scheme(name=self.scheme, offload_ratio=self.offload_ratio,
                      chunk_tokens=self.chunk_tokens)

    def violations(self, where: str, ring_size: int) -> list[str]:
        out = []
        if self.scheme == "streambp":
            if self.chunk_tokens is None:
                out.append(f"{where}.memory.chunk_tokens: streambp needs a chunk size >= 1")
            if ring_size > 1:
                out.append(f"{where}.memory.scheme: streambp runs on packed groups only (a "
                           f"ring of {ring_size} uses offload or plain; docs/streambp.md)")
        elif self.chunk_tokens is not None:
            out.append(f"{where}.memory.chunk_tokens: {self.chunk_tokens} is only valid with "
                       f"scheme streambp (got {self.scheme})")
        if self.scheme == "plain" and self.offload_ratio:
            out.append(f"{where}.memory.offload_ratio: {self.offload_ratio} with scheme plain "
                       "(valid: 0)")
        return out


class RingGroup(_PlanModel):
    """Ranks that run the same sequences together: a ring if several, a packed rank if one."""

    ranks: list[int] = Field(min_length=1, description="World ranks in ring order.")
    sequences: list[SeqSlice] = Field(min_length=1, description="Sequences the group runs.")
    memory: GroupMemory | None = Field(
        default=None, description="Memory scheme of every member (version 2; required there).")

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

    def max_local_tokens(self) -> int:
        """Tokens the member holding the most holds (zigzag's uneven chunks, exactly)."""
        return max_local_tokens([s.length for s in self.sequences], len(self.ranks))


def group_memory(g: RingGroup, model) -> GroupMemory:
    """The memory scheme `g`'s members run: its `memory` (version 2), or version 1's rule
    made explicit (see the module docstring); `model` is the ModelSpec being trained."""
    if g.memory is not None:
        return g.memory
    ratio = sum(s.length * s.offload_ratio for s in g.sequences) / g.num_tokens
    if ratio > 0:
        return GroupMemory(scheme="offload", offload_ratio=ratio)
    if g.ring_size > 1:
        return GroupMemory()
    width = max(model.dtype_bytes, 2)
    per_token = (8 * model.hidden_size + 3 * model.ffn_hidden_size) * width * model.num_layers
    tokens = g.num_tokens
    if tokens * per_token <= V1_ACTIVATION_BUDGET_BYTES:
        return GroupMemory()
    kept = tokens * model.hidden_size * width * model.num_layers  # StreamBP keeps layer inputs
    room = max(V1_ACTIVATION_BUDGET_BYTES - kept, per_token)
    return GroupMemory(scheme="streambp", chunk_tokens=max(1, room // per_token))


class MicroBatch(_PlanModel):
    """Groups that run concurrently on disjoint ranks."""

    groups: list[RingGroup] = Field(min_length=1, description="Groups on disjoint ranks.")


class GroupPredicted(_PlanModel):
    """What the cost and memory models expect of one group (one entry per ring position)."""

    micro_batch: int = Field(ge=0, description="Index in micro_batches.")
    group: int = Field(ge=0, description="Index in that micro-batch's groups.")
    seconds: float = Field(ge=0.0, description="Predicted per-rank time of the group.")
    flops_per_rank: list[int] = Field(description="Matmul FLOPs of each member (ring order).")
    bytes_sent_per_rank: list[int] = Field(description="Ring bytes each member sends.")
    peak_bytes_per_rank: list[int] = Field(
        description="Predicted device peak of each member: model states + activations.")
    host_bytes_per_rank: list[int] = Field(description="Bytes each member parks in host memory.")


class Predicted(_PlanModel):
    """What the planner's cost model expects of this plan."""

    makespan_s: float = Field(ge=0.0, description="Predicted step time (slowest rank), seconds.")
    lower_bound_s: float = Field(ge=0.0, description="Perfect-balance lower bound, seconds.")
    per_rank_busy_s: list[float] = Field(description="Predicted busy time of each rank, seconds.")
    step_overhead_s: float | None = Field(
        default=None, ge=0.0, description="Per-step collectives and optimizer update after the "
        "last micro-batch (included in makespan_s).")
    groups: list[GroupPredicted] | None = Field(
        default=None, description="Per-group predictions, in plan order (version 2).")
    rank_speeds: list[float] | None = Field(
        default=None, description="Speed of each rank the prediction assumed, relative to the "
        "cost model's reference rank (node pools, measured stragglers); absent: all 1.")


class PlanMemory(_PlanModel):
    """The memory settings the plan was made for (version 2)."""

    precision: Literal["bf16-mixed", "fp32", "fp64"] = Field(
        description="Training precision (scheduler/model_states.py).")
    optimizer_sharding: Literal["none", "zero1", "distributed"] = Field(
        description="Optimizer-state sharding over the world.")
    model_state_bytes: int = Field(ge=0, description="Model-state bytes of the largest rank.")
    shard_mirror: bool = Field(
        default=False, description="Each rank also holds the previous rank's optimizer "
        "shard (distributed; docs/elastic.md): counted in model_state_bytes.")
    device_budget_bytes: int = Field(ge=1, description="Device bytes a rank may use (with "
                                     "per-rank budgets: the smallest).")
    device_budget_bytes_per_rank: list[int] | None = Field(
        default=None, description="Each rank's own device budget (node pools with different "
        "memory); absent: every rank has device_budget_bytes.")


class StepPlan(_PlanModel):
    """The plan of one global batch (docs/plan-format.md)."""

    version: int = Field(default=1, description="Plan format version: 2 (memory schemes), "
                         "or 1 (absent means 1).")
    world_size: int = Field(ge=1, description="Ranks in the job.")
    capacity_tokens: int = Field(ge=1, description="Tokens one rank may hold per micro-batch "
                                 "(version 2: under the plain scheme; with per-rank "
                                 "capacities: the smallest).")
    rank_capacity_tokens: list[int] | None = Field(
        default=None, description="Each rank's own capacity (version 2; node pools with "
        "different memory); absent: every rank has capacity_tokens.")
    micro_batches: list[MicroBatch] = Field(description="Micro-batches, run in order.")
    memory: PlanMemory | None = Field(default=None, description="Memory settings (version 2).")
    pairs: list[tuple[int, int]] | None = Field(
        default=None, description="DPO pairs of the batch as (chosen id, rejected id): both "
        "sequences of a pair run in one group.")
    predicted: Predicted | None = Field(default=None, description="Planner's predictions.")

    def groups(self):
        """(micro_batch_index, group) for every group of the plan."""
        for m, mb in enumerate(self.micro_batches):
            for g in mb.groups:
                yield m, g

    def micro_batches_of(self, rank: int) -> list[tuple[int, RingGroup]]:
        """The (micro_batch_index, group) pairs `rank` takes part in, in order."""
        return [(m, g) for m, g in self.groups() if rank in g.ranks]

    def by_rank(self) -> dict[int, list[tuple[int, RingGroup]]]:
        """`micro_batches_of` of every rank that has a group, in one pass over the plan
        (what a loop over all ranks takes: one call per rank would scan it N times)."""
        index: dict[int, list[tuple[int, RingGroup]]] = {}
        for m, g in self.groups():
            for r in dict.fromkeys(g.ranks):
                index.setdefault(r, []).append((m, g))
        return index

    def groups_by_size(self) -> dict[int, int]:
        """Ring size -> number of groups of that size, smallest first."""
        sizes: dict[int, int] = {}
        for _, g in self.groups():
            sizes[g.ring_size] = sizes.get(g.ring_size, 0) + 1
        return dict(sorted(sizes.items()))

    def sequence_ids(self) -> list[int]:
        return sorted(s.id for _, g in self.groups() for s in g.sequences)

    def violations(self, lengths: Sequence[int] | None = None,
                   pairs: Sequence[tuple[int, int]] | None = None) -> list[str]:
        """Every rule of the format this plan breaks (empty when valid).

        With `lengths` (the batch's sequence lengths) it also checks that the ids are
        exactly 0..len(lengths)-1 and that each length matches. `pairs` (the batch's DPO
        pairs, as plan ids) must each run in one group, as must the plan's own `pairs`.
        """
        out: list[str] = []
        if self.version not in SUPPORTED_VERSIONS:
            out.append(f"version: {self.version} is not supported (valid: "
                       f"{', '.join(map(str, SUPPORTED_VERSIONS))})")
        if self.version == 1 and self.memory is not None:
            out.append("memory: plan-level memory settings need version 2")
        out += self._per_rank_violations()
        capacities = self.capacities()
        if not self.micro_batches:
            out.append("micro_batches: empty; a plan runs at least one micro-batch")
        seen: dict[int, str] = {}
        for m, mb in enumerate(self.micro_batches):
            used: dict[int, int] = {}
            for gi, g in enumerate(mb.groups):
                where = f"micro_batches[{m}].groups[{gi}]"
                out += _group_violations(g, where, self.world_size, capacities,
                                         self.version)
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
        out += self._predicted_memory_violations()
        out += self._pair_violations(seen, pairs)
        return out

    def _pair_violations(self, seen: dict[int, str],
                         pairs: Sequence[tuple[int, int]] | None) -> list[str]:
        """Both sequences of every pair (the plan's own and `pairs`) in one group."""
        out = []
        listed: list[tuple[str, tuple[int, ...]]] = [("pairs", p) for p in self.pairs or []]
        listed += [("batch pair", tuple(p)) for p in pairs or []]
        for what, (a, b) in listed:
            if a == b:
                out.append(f"{what} ({a}, {b}): a pair needs two different sequences")
                continue
            wa, wb = (seen.get(i, "").rsplit(".sequences", 1)[0] for i in (a, b))
            if not wa or not wb:
                missing = [i for i, w in ((a, wa), (b, wb)) if not w]
                out.append(f"{what} ({a}, {b}): sequence id(s) {missing} are not in the plan")
            elif wa != wb:
                out.append(f"{what} ({a}, {b}): split across {wa} and {wb} (a DPO pair runs "
                           "in one group: one rank or one ring)")
        return out

    def capacities(self) -> list[int]:
        """Each rank's capacity under the plain scheme (`rank_capacity_tokens`, or
        `capacity_tokens` for every rank)."""
        if self.rank_capacity_tokens is not None and \
                len(self.rank_capacity_tokens) == self.world_size:
            return list(self.rank_capacity_tokens)
        return [self.capacity_tokens] * self.world_size

    def _per_rank_violations(self) -> list[str]:
        out = []
        lists: list[tuple[str, Sequence[float] | None, float | None]] = [
            ("rank_capacity_tokens", self.rank_capacity_tokens, self.capacity_tokens)]
        if self.memory is not None:
            lists.append(("memory.device_budget_bytes_per_rank",
                          self.memory.device_budget_bytes_per_rank,
                          self.memory.device_budget_bytes))
        if self.predicted is not None and self.predicted.rank_speeds is not None:
            lists.append(("predicted.rank_speeds", self.predicted.rank_speeds, None))
        for name, values, smallest in lists:
            if values is None:
                continue
            if self.version != 2 and name != "predicted.rank_speeds":
                out.append(f"{name}: per-rank figures need version 2")
            if len(values) != self.world_size:
                out.append(f"{name}: {len(values)} entries, expected world_size="
                           f"{self.world_size}")
            elif smallest is not None and min(values) != smallest:
                out.append(f"{name}: the smallest entry is {min(values)}, but the plan-wide "
                           f"figure is {smallest} (it must be the smallest)")
            elif smallest is None and not all(v > 0 for v in values):
                out.append(f"{name}: every speed must be > 0")
        return out

    def _budgets(self) -> list[int] | None:
        if self.memory is None:
            return None
        per_rank = self.memory.device_budget_bytes_per_rank
        if per_rank is not None and len(per_rank) == self.world_size:
            return list(per_rank)
        return [self.memory.device_budget_bytes] * self.world_size

    def _predicted_memory_violations(self) -> list[str]:
        if self.predicted is None or self.predicted.groups is None:
            return []
        out, groups = [], list(self.groups())
        if len(self.predicted.groups) != len(groups):
            return [f"predicted.groups: {len(self.predicted.groups)} entries, the plan has "
                    f"{len(groups)} groups"]
        budgets = self._budgets()
        for k, (p, (_, g)) in enumerate(zip(self.predicted.groups, groups, strict=True)):
            if budgets is None or not p.peak_bytes_per_rank:
                continue
            for rank, peak in zip(g.ranks, p.peak_bytes_per_rank, strict=False):
                if 0 <= rank < self.world_size and peak > budgets[rank]:
                    out.append(f"predicted.groups[{k}]: rank {rank} peaks at {peak} bytes, over "
                               f"its device budget of {budgets[rank]} bytes")
                    break
        return out

    def check(self, lengths: Sequence[int] | None = None,
              pairs: Sequence[tuple[int, int]] | None = None) -> StepPlan:
        """Raise PlanValidationError listing every violation; return self when valid."""
        found = self.violations(lengths, pairs)
        if found:
            raise PlanValidationError(found)
        return self


def _group_violations(g: RingGroup, where: str, world_size: int, capacities: list[int],
                      version: int) -> list[str]:
    out = []
    bad = [r for r in g.ranks if not 0 <= r < world_size]
    if bad:
        out.append(f"{where}.ranks: {bad} out of range (valid 0..{world_size - 1})")
    capacity = min((capacities[r] for r in g.ranks if 0 <= r < world_size),
                   default=min(capacities))
    if len(set(g.ranks)) != len(g.ranks):
        out.append(f"{where}.ranks: {g.ranks} repeats a rank")
    if version != 2:
        if g.memory is not None:
            out.append(f"{where}.memory: a group's memory scheme needs version 2")
        held = g.tokens_per_rank()
        if held > capacity * (1 + 1e-9):
            out.append(f"{where}: each of its {len(g.ranks)} rank(s) holds {held:.0f} tokens "
                       f"after offload, over capacity_tokens={capacity}")
        return out
    if g.memory is None:
        return out + [f"{where}.memory: missing; version 2 names every group's memory scheme"]
    out += g.memory.violations(where, g.ring_size)
    ratios = [si for si, s in enumerate(g.sequences) if s.offload_ratio]
    if ratios:
        out.append(f"{where}.sequences{ratios[:5]}.offload_ratio: must be 0 in version 2 "
                   "(offload is the group's memory scheme)")
    if g.memory.scheme == "plain":
        out += _plain_capacity_violations(g, where, world_size, capacities)
    return out


def _plain_capacity_violations(g: RingGroup, where: str, world_size: int,
                               capacities: list[int]) -> list[str]:
    """A plain group's members each hold at most their own capacity (zigzag, exactly)."""
    from scheduler.zigzag import all_local_tokens

    lengths = [s.length for s in g.sequences]
    held = all_local_tokens(lengths, g.ring_size) if g.ring_size > 1 else [sum(lengths)]
    for rank, tokens in zip(g.ranks, held, strict=True):
        cap = capacities[rank] if 0 <= rank < world_size else min(capacities)
        if tokens > cap:
            word = "capacity_tokens" if len(set(capacities)) == 1 else \
                f"rank_capacity_tokens[{rank}]"
            return [f"{where}: a member holds {tokens} tokens under scheme plain, over "
                    f"{word}={cap}"]
    return []
