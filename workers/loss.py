"""The step's objective: which targets carry a loss, the global normaliser, and what one
group of a plan hands `Transformer.forward_backward`.

Every objective's step loss is a sum of per-group terms divided by ONE global count N
(docs/objectives.md):

    pretrain   sum over every prediction of -log p             N = sum over the batch of (L - 1)
    sft        sum over loss targets of -log p                 N = loss targets of the batch
    grpo       sum over loss targets of the clipped surrogate  N = loss targets (token), or
               (+ k3 KL), token i's term x 1/|o_i| (sequence)    sequences with a loss target
    dpo        sum over pairs of the label-smoothed sigmoid    N = pairs of the batch
               loss of the pair's margin

N comes from the batch's per-sample records (`BatchMeta`: loss-target counts and pairs,
scheduler.dataset_meta), never from what a rank happens to hold, so every rank knows it
before its first micro-batch, for any plan. The per-group terms are exact sums over what
the group holds: a masked target is IGNORE_INDEX (it adds 0); a ring member's zigzag shard
carries exactly its targets' terms; a per-sequence weight (1/|o_i|) comes from the whole
sample's record, not the shard; a DPO pair sits in one group and its ring members add their
partial log-probs (parallelism.ring_sum) before the pair's loss, which one member reports.
So the gradient is the single-device gradient under any plan: packed, rings in any order,
uneven micro-batch counts, any memory scheme, fully masked sequences included.

Legend: T tokens (this rank's part of a group), S sequences of the group, P pairs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, Literal

import numpy as np
import torch

from parallelism import CommStats, ring_sum, zigzag_shard
from scheduler.dataset_meta import DatasetStructure
from scheduler.objective import ClipRange, DpoObjective, GrpoObjective
from scheduler.objective import Objective as ObjectiveSpec
from scheduler.plan import RingGroup, StepPlan
from workers.model import next_token_targets
from workers.objectives import DPO, GRPO, IGNORE_INDEX, NextTokenCE, Objective
from workers.sample import SampleData

__all__ = ["OBJECTIVE_TYPES", "BatchMeta", "GroupInputs", "ObjectiveConfig",
           "global_normalizer", "group_inputs"]

OBJECTIVE_TYPES = ("pretrain", "sft", "dpo", "grpo")
# Sample kinds each objective trains on (scheduler.dataset_meta.KINDS).
OBJECTIVE_KINDS = {"pretrain": ("pretrain", "sft", "chat"), "sft": ("pretrain", "sft", "chat"),
                   "dpo": ("dpo",), "grpo": ("grpo",)}


@dataclass(frozen=True, kw_only=True)
class ObjectiveConfig:
    """A job's objective and its parameters (the job spec's `objective:`)."""

    type: Literal["pretrain", "sft", "dpo", "grpo"] = "pretrain"
    beta: float = 0.1  # dpo: inverse temperature of the implicit reward
    label_smoothing: float = 0.0  # dpo: assumed share of flipped preferences, [0, 0.5)
    clip_low: float = 0.2  # grpo: the ratio is clipped to [1 - clip_low, 1 + clip_high]
    clip_high: float = 0.2
    kl_coef: float = 0.0  # grpo: weight of the k3 KL to the stored reference log-probs
    loss_normalization: Literal["token", "sequence"] = "token"  # grpo: N per token or sequence

    def __post_init__(self) -> None:
        checks = [("type", self.type in OBJECTIVE_TYPES, f"one of {', '.join(OBJECTIVE_TYPES)}"),
                  ("beta", self.beta > 0, "> 0"),
                  ("label_smoothing", 0 <= self.label_smoothing < 0.5, "in [0, 0.5)"),
                  ("clip_low", 0 <= self.clip_low < 1, "in [0, 1)"),
                  ("clip_high", self.clip_high >= 0, ">= 0"),
                  ("kl_coef", self.kl_coef >= 0, ">= 0"),
                  ("loss_normalization", self.loss_normalization in ("token", "sequence"),
                   "token or sequence")]
        for name, ok, valid in checks:
            if not ok:
                raise ValueError(f"objective.{name}={getattr(self, name)!r} is not valid "
                                 f"(must be {valid})")

    @classmethod
    def from_config(cls, objective: ObjectiveSpec | None) -> ObjectiveConfig:
        """From the worker config's `objective` (scheduler.objective, as the job spec
        has it); None: pretrain."""
        if isinstance(objective, DpoObjective):
            return cls(type="dpo", beta=objective.beta,
                       label_smoothing=objective.label_smoothing)
        if isinstance(objective, GrpoObjective):
            clip = objective.clip_range
            low, high = (clip.low, clip.high) if isinstance(clip, ClipRange) else (clip, clip)
            return cls(type="grpo", clip_low=float(low), clip_high=float(high),
                       kl_coef=objective.kl_coef,
                       loss_normalization=objective.loss_normalization)
        return cls(type=objective.type if objective is not None else "pretrain")

    @property
    def masked(self) -> bool:
        """Whether the loss mask decides the targets (every objective but pretrain)."""
        return self.type != "pretrain"

    @property
    def per_sequence(self) -> bool:
        """Whether N counts sequences or pairs rather than tokens."""
        return self.type == "dpo" or (self.type == "grpo"
                                      and self.loss_normalization == "sequence")


@dataclass(frozen=True, kw_only=True)
class BatchMeta:
    """What every rank knows of the whole global batch before its first micro-batch: the
    per-sample records, indexed by plan id (no tokens)."""

    num_loss_tokens: tuple[int, ...]  # loss targets of each plan id's sample
    pairs: tuple[tuple[int, int], ...] = ()  # DPO (chosen, rejected) plan ids

    @classmethod
    def from_structure(cls, structure: DatasetStructure,
                       sample_ids: Sequence[int] | np.ndarray) -> BatchMeta:
        """From a dataset's records (scheduler.dataset.read_structure) and a batch."""
        ids = np.asarray(sample_ids, dtype=np.int64)
        return cls(num_loss_tokens=tuple(int(n) for n in structure.num_loss_tokens[ids]),
                   pairs=tuple(structure.batch_pairs(ids)))

    @classmethod
    def from_samples(cls, samples: Mapping[int, torch.Tensor | SampleData]) -> BatchMeta:
        """From every sample of a batch (plan ids 0..n-1), e.g. one process holding all;
        each must be SampleData (bare tokens carry no records)."""
        n = len(samples)
        records = {i: s for i, s in samples.items() if isinstance(s, SampleData)}
        if sorted(samples) != list(range(n)) or len(records) != n:
            raise ValueError("BatchMeta.from_samples needs SampleData for every plan id "
                             f"0..{n - 1}; got ids {sorted(samples)[:10]}")
        by_pair: dict[int, dict[str, int]] = {}
        for i, s in records.items():
            if s.meta.pair_id is not None:
                pair, role = _pair_role(s, i)
                by_pair.setdefault(pair, {})[role] = i
        pairs = sorted((p["chosen"], p["rejected"]) for p in by_pair.values()
                       if len(p) == 2)
        if 2 * len(pairs) != sum(len(p) for p in by_pair.values()):
            raise ValueError("samples: a DPO sequence is in the batch without its partner")
        return cls(num_loss_tokens=tuple(s.meta.num_loss_tokens for _, s in
                                         sorted(records.items())), pairs=tuple(pairs))


def global_normalizer(plan: StepPlan, objective: ObjectiveConfig,
                      batch: BatchMeta | None) -> int:
    """N, the count the step's summed loss is divided by (see the module docstring)."""
    if objective.type == "pretrain":
        return sum(s.length - 1 for _, g in plan.groups() for s in g.sequences)
    if batch is None:
        raise ValueError(f"objective {objective.type!r} normalises by the batch's records: "
                         "pass batch= (workers.loss.BatchMeta) or every sample of the plan")
    ids = plan.sequence_ids()
    if len(batch.num_loss_tokens) != len(ids) or ids != list(range(len(ids))):
        raise ValueError(f"batch: {len(batch.num_loss_tokens)} records for a plan of "
                         f"{len(ids)} sequences (ids 0..n-1 expected)")
    if objective.type == "dpo":
        return len(batch.pairs)
    if objective.per_sequence:
        return sum(1 for n in batch.num_loss_tokens if n > 0)
    return sum(batch.num_loss_tokens)


@dataclass(frozen=True, kw_only=True)
class GroupInputs:
    """This rank's part of one group, as forward_backward takes it."""

    ids_T: torch.Tensor  # token ids (a zigzag shard on a ring)
    cu_seqlens: torch.Tensor  # int32 [S + 1] of ids_T
    position_ids: torch.Tensor | None  # global positions on a ring; None when packed
    targets_T: torch.Tensor  # next-token ids, IGNORE_INDEX where no loss is taken
    objective: Objective  # the head's objective with its per-group tensors
    count: int  # this rank's share of N (summed over ranks it is N)
    reports_loss: bool  # False where another ring member reports the same (DPO) loss


def group_inputs(g: RingGroup, samples: Mapping[int, torch.Tensor | SampleData], rank: int,
                 objective: ObjectiveConfig, *, device: torch.device | str = "cpu",
                 comm_stats: CommStats | None = None) -> GroupInputs:
    """Tokens, masked targets and the objective of `rank`'s part of group `g`."""
    tokens, data = _group_samples(g, samples, objective)
    lengths = torch.tensor([0] + [len(t) for t in tokens], dtype=torch.int64)
    cu = torch.cumsum(lengths, 0).to(torch.int32)
    ids = torch.cat(tokens).to(dtype=torch.long)
    targets = next_token_targets(ids, cu)
    if objective.masked:
        targets[~torch.cat([d.target_mask() for d in data])] = IGNORE_INDEX
    per_token = _per_token_columns(data, objective)
    pos, d, j = None, g.ring_size, g.ranks.index(rank)
    if d > 1:
        targets = zigzag_shard(targets, cu, d, j)[0]
        per_token = {k: zigzag_shard(v, cu, d, j)[0] for k, v in per_token.items()}
        ids, cu, pos = zigzag_shard(ids, cu, d, j)
    head = _head_objective(g, data, objective, per_token, rank, comm_stats)
    count = int((targets != IGNORE_INDEX).sum())
    if objective.per_sequence:  # counted once per group, by its first ring member
        count = 0 if j else (len(head.chosen) if isinstance(head, DPO) else
                             sum(1 for x in data if x.meta.num_loss_tokens > 0))
    move = partial(torch.Tensor.to, device=device)
    return GroupInputs(ids_T=move(ids), cu_seqlens=move(cu),
                       position_ids=None if pos is None else move(pos),
                       targets_T=move(targets), objective=_on(head, device), count=count,
                       reports_loss=objective.type != "dpo" or j == 0)


def _group_samples(g: RingGroup, samples: Mapping[int, torch.Tensor | SampleData],
                   objective: ObjectiveConfig) -> tuple[list[torch.Tensor], list[SampleData]]:
    """The group's token tensors, and for a masked objective its samples, each checked
    (`_sample`; for pretrain none: only tokens are read)."""
    if not objective.masked:
        return [x.tokens if isinstance(x, SampleData) else x
                for x in (samples[s.id] for s in g.sequences)], []
    data = [_sample(samples[s.id], s.id, objective) for s in g.sequences]
    return [d.tokens for d in data], data


def _sample(x: torch.Tensor | SampleData, plan_id: int,
            objective: ObjectiveConfig) -> SampleData:
    """A sample checked against a masked objective: SampleData of a kind it trains on."""
    if not isinstance(x, SampleData):
        raise ValueError(f"samples[{plan_id}]: objective {objective.type!r} needs the loss "
                         "mask and metadata (workers.sample.SampleData), got bare tokens")
    if x.meta.kind not in OBJECTIVE_KINDS[objective.type]:
        raise ValueError(f"samples[{plan_id}]: a {x.meta.kind} sample cannot train with "
                         f"objective {objective.type!r} (valid kinds: "
                         f"{', '.join(OBJECTIVE_KINDS[objective.type])})")
    n = int(x.loss_mask[1:].sum())
    if n != x.meta.num_loss_tokens:
        raise ValueError(f"samples[{plan_id}]: its mask has {n} loss targets but its record "
                         f"says {x.meta.num_loss_tokens}: the dataset is inconsistent")
    return x


def _per_token_columns(data: Sequence[SampleData], objective: ObjectiveConfig
                       ) -> dict[str, torch.Tensor]:
    """Target-aligned stored log-probs the objective reads (packed over the group)."""
    if objective.type != "grpo":
        return {}
    out = {}
    for name in ("old_logps", "ref_logps"):
        have = [getattr(d, name) is not None for d in data]
        if name == "ref_logps" and not objective.kl_coef:
            continue
        if not all(have):
            if name == "old_logps" and not any(have):
                continue  # on-policy
            raise ValueError(f"samples: {name} is stored for {sum(have)} of the group's "
                             f"{len(have)} sequences; a GRPO batch needs it for all or none")
        out[name] = torch.cat([SampleData.to_targets(getattr(d, name)) for d in data])
    return out


def _head_objective(g: RingGroup, data: Sequence[SampleData], objective: ObjectiveConfig,
                    per_token: dict[str, torch.Tensor], rank: int,
                    comm_stats: CommStats | None) -> Objective:
    if objective.type in ("pretrain", "sft"):
        return NextTokenCE()
    if objective.type == "grpo":
        counts = torch.tensor([d.meta.num_loss_tokens for d in data], dtype=torch.float64)
        weights = torch.where(counts > 0, 1.0 / counts.clamp(min=1), torch.zeros_like(counts))
        return GRPO(advantages=torch.tensor([_advantage(d, s.id) for d, s in
                                             zip(data, g.sequences, strict=True)],
                                            dtype=torch.float64),
                    old_logps=per_token.get("old_logps"), ref_logps=per_token.get("ref_logps"),
                    clip_low=objective.clip_low, clip_high=objective.clip_high,
                    kl_coef=objective.kl_coef,
                    sequence_weights=weights if objective.per_sequence else None)
    chosen, rejected, refs = _group_pairs(g, data)
    summed = None if g.ring_size == 1 else partial(ring_sum, ring=list(g.ranks),
                                                     channel="dpo", stats=comm_stats)
    return DPO(chosen=torch.tensor(chosen, dtype=torch.long),
               rejected=torch.tensor(rejected, dtype=torch.long),
               ref_chosen_logps=refs[chosen], ref_rejected_logps=refs[rejected],
               beta=objective.beta, label_smoothing=objective.label_smoothing,
               ring_sum=summed)


def _advantage(d: SampleData, plan_id: int) -> float:
    a = d.meta.advantage
    if a is None or not math.isfinite(a):
        raise ValueError(f"samples[{plan_id}]: GRPO sample without a finite advantage ({a})")
    return a


def _group_pairs(g: RingGroup, data: Sequence[SampleData]):
    """(chosen, rejected) indices within the group and each sequence's reference log-prob
    (the masked sum of its stored ref_logps)."""
    where: dict[int, dict[str, int]] = {}
    for k, (d, s) in enumerate(zip(data, g.sequences, strict=True)):
        pair, role = _pair_role(d, s.id)
        where.setdefault(pair, {})[role] = k
    broken = [p for p, roles in where.items() if len(roles) != 2]
    if broken:
        ids = [s.id for s in g.sequences]
        raise ValueError(f"group of ranks {g.ranks} holds plan ids {ids}: DPO pair "
                         f"{broken[0]} is not whole in it (a pair runs in one group)")
    stored = [d.ref_logps for d in data]
    missing = [s.id for r, s in zip(stored, g.sequences, strict=True) if r is None]
    if missing:
        raise ValueError(f"samples {missing[:5]}: DPO needs the reference log-probs column "
                         "(ringmaster data ref-logps DATA --model DIR)")
    refs = torch.stack([(SampleData.to_targets(r) * d.target_mask()).sum()
                        for r, d in zip(stored, data, strict=True) if r is not None]).double()
    order = sorted(where.values(), key=lambda r: r["chosen"])
    return [r["chosen"] for r in order], [r["rejected"] for r in order], refs


def _pair_role(d: SampleData, plan_id: int) -> tuple[int, str]:
    """A DPO sample's (pair id, role); a clear error for a record that lacks them."""
    pair, role = d.meta.pair_id, d.meta.role
    if pair is None or role not in ("chosen", "rejected"):
        raise ValueError(f"samples[{plan_id}]: a DPO sample needs a pair_id and the role "
                         f"chosen or rejected (got pair_id={pair}, role={role!r})")
    return pair, role


def _on(head: Objective, device) -> Objective:
    """The objective with its tensors on `device`."""
    if isinstance(head, NextTokenCE):
        return head
    moved: dict[str, Any] = {k: v.to(device) for k, v in vars(head).items()
                             if isinstance(v, torch.Tensor)}  # fields of DPO or of GRPO
    return replace(head, **moved)
