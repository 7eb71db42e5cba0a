"""DPO pairs as planning units: both sequences of a pair in one group, by construction.

A DPO pair's loss couples its two sequences (the margin of their log-probabilities,
Rafailov et al. 2023, Eq. 7). When both run in one group (one rank, or one ring), the
loss needs no pass or collective beyond that group's own ring (docs/objectives.md). The
planner gets this without any pair logic of its own: before sharding, every pair becomes
one *unit* sequence, planned like any other sequence; afterwards each unit expands back
into its two sequences, in the group the unit got, with the unit's ring size and offload.

The unit's length is chosen so that whatever the planner decides for it stays valid for
the two real sequences:

- a pair that fits one rank (l1 + l2 <= capacity_tokens) is a unit of exactly l1 + l2
  tokens: packed, the two hold exactly that; on a ring of d >= 2 ranks a member holds at
  most ceil(l1 / d) + ceil(l2 / d) <= (l1 + l2) / d + 2 - 2/d <= capacity_tokens tokens
  of them (for capacity_tokens >= 2), so the plain memory rule still holds.
- a pair that needs a ring is a unit of L + 2 (D - 1) tokens, L = l1 + l2, with D the
  smallest ring such that ceil((L + 2 (D - 1)) / C) <= D, i.e. D = ceil((L - 2) / (C - 2))
  (C = capacity_tokens >= 3): on any ring d >= D a member
  holds at most (L + 2 (d - 1)) / d <= (L + 2 (D - 1)) / D tokens of the pair (zigzag's
  uneven chunks of two sequences, exactly bounded), which the sharding's token rule
  (unit length / d, after offload) already covers.

The balance scheduler times a unit as one sequence of the unit's length: an upper bound of
the pair's attention work (l1^2 + l2^2 <= (l1 + l2)^2). The plan's predictions are
simulated afterwards with the real sequences, so they describe what runs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TypeVar

from scheduler.errors import InfeasibleBatchError
from scheduler.sharding import Shard

__all__ = ["InfeasiblePairError", "PairUnits", "check_pairs"]


class InfeasiblePairError(InfeasibleBatchError):
    """A DPO pair whose two sequences cannot fit one group (all ranks, full offload)."""

    def __init__(self, pair: tuple[int, int], lengths: tuple[int, int], max_length: int):
        self.seq_id, self.length, self.max_length, self.pair = pair[0], sum(lengths), \
            max_length, pair
        Exception.__init__(
            self, f"DPO pair (chosen id {pair[0]}, rejected id {pair[1]}) of {lengths[0]} + "
            f"{lengths[1]} tokens cannot fit: both sequences of a pair run in one group "
            f"(docs/objectives.md), and the most one group of this cluster holds (all ranks, "
            f"full offload) is {max_length} tokens")

Group = TypeVar("Group")


def check_pairs(pairs: Sequence[Sequence[int]], num_sequences: int) -> list[tuple[int, int]]:
    """`pairs` as (chosen, rejected) plan ids; ValueError for ids out of range or reused."""
    out, used = [], set()
    for k, pair in enumerate(pairs):
        if len(pair) != 2:
            raise ValueError(f"pairs[{k}]={list(pair)}: a pair is (chosen id, rejected id)")
        a, b = int(pair[0]), int(pair[1])
        for i in (a, b):
            if not 0 <= i < num_sequences:
                raise ValueError(f"pairs[{k}]=({a}, {b}): id {i} is outside the batch "
                                 f"(valid 0..{num_sequences - 1})")
            if i in used:
                raise ValueError(f"pairs[{k}]=({a}, {b}): sequence {i} is in two pairs")
            used.add(i)
        if a == b:
            raise ValueError(f"pairs[{k}]=({a}, {b}): a pair needs two different sequences")
        out.append((a, b))
    return out


def unit_length(l1: int, l2: int, capacity_tokens: int) -> int:
    """Tokens the planner sees for a pair of l1 and l2 tokens (see the module docstring)."""
    total = l1 + l2
    if total <= capacity_tokens or capacity_tokens < 3:
        return total
    # The smallest D with ceil((L + 2 (D - 1)) / C) <= D, i.e. D (C - 2) >= L - 2.
    d = math.ceil((total - 2) / (capacity_tokens - 2))
    return total + 2 * (d - 1)


@dataclass(frozen=True)
class PairUnits:
    """A batch with its DPO pairs folded into units (unit i = the i-th unit's sequences)."""

    members: tuple[tuple[int, ...], ...]  # plan ids of each unit: one sequence, or a pair
    lengths: tuple[int, ...]  # each plan id's real length

    @classmethod
    def of(cls, lengths: Sequence[int], pairs: Sequence[Sequence[int]]) -> PairUnits:
        """Units in plan-id order of their first member; a pair's chosen sequence first."""
        lengths = tuple(int(n) for n in lengths)
        partner = {a: b for a, b in check_pairs(pairs, len(lengths))}
        inside = set(partner) | set(partner.values())
        members = [(i, partner[i]) if i in partner else (i,)
                   for i in range(len(lengths)) if i in partner or i not in inside]
        members.sort(key=min)
        return cls(members=tuple(members), lengths=lengths)

    def unit_lengths(self, capacity_tokens: int) -> list[int]:
        """What the planner plans: each single sequence as is, each pair as one unit."""
        return [self.lengths[m[0]] if len(m) == 1 else
                unit_length(self.lengths[m[0]], self.lengths[m[1]], capacity_tokens)
                for m in self.members]

    def infeasible(self, exc: InfeasibleBatchError) -> InfeasibleBatchError:
        """`exc` (about a unit) restated about the batch's own sequence ids."""
        m = self.members[exc.seq_id]
        if len(m) == 1:
            return InfeasibleBatchError(m[0], exc.length, exc.max_length)
        return InfeasiblePairError((m[0], m[1]), (self.lengths[m[0]], self.lengths[m[1]]),
                                   exc.max_length)

    def expand(self, micro_batches: Sequence[Sequence[tuple[tuple[int, ...], Sequence[Shard]]]]
               ) -> list[list[tuple[tuple[int, ...], tuple[Shard, ...]]]]:
        """The planner's groups over units -> the same groups over the real sequences
        (each member with its unit's ring size and offload ratio)."""
        return [[(ranks, tuple(replace(sh, seq_id=i, length=self.lengths[i])
                               for sh in shards for i in self.members[sh.seq_id]))
                 for ranks, shards in mb] for mb in micro_batches]
