"""Worker-side data: global batches of a token dataset and the tokens of their samples.

The batch order itself is scheduler.batching's (torch-free, so the controller forms the
same batches from lengths alone): a seeded permutation per epoch packed to a token budget,
named by a `BatchPosition`. This module adds what workers need on top: a stream object
whose position a checkpoint stores, and reading the tokens of a batch's samples as torch
tensors keyed the way a StepPlan names them (plan id i = the i-th sample of the batch).

Objectives (docs/data.md): `read_sample_data` gives each plan id its tokens with the loss
mask, the sample's metadata (kind, DPO pair and role, GRPO group, reward, advantage) and
the stored per-token reference / old log-probs; `SampleData.target_*` shift those to the
step's target positions (target t predicts token t + 1, as next_token_targets does).
`batch_loss_tokens` is the batch's global loss-token count from the sample records alone,
and `batch_pairs` the (chosen, rejected) plan ids the planner must keep in one group.
BatchStream moves a DPO pair as one unit (scheduler.batching `units`), so a pair never
spans two global batches.

Memory: the dataset is memory-mapped; `read_samples` copies only the samples asked for, so
a rank reads just the sequences its micro-batches hold.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from scheduler.batching import BatchPosition, epoch_batches
from scheduler.dataset import TokenDataset
from scheduler.errors import DatasetError
from scheduler.plan import StepPlan
from workers.loss import BatchMeta, ObjectiveConfig
from workers.sample import SampleData
from workers.train import StepInput

__all__ = ["BatchPosition", "BatchStream", "DatasetPlanSource", "GlobalBatch", "SampleData",
           "batch_loss_tokens", "batch_pairs", "open_dataset", "read_plan_samples",
           "read_sample_data", "read_samples", "sequence_ids_of_rank"]


@dataclass(frozen=True, kw_only=True)
class GlobalBatch:
    """One global batch: which dataset samples it holds, in plan-id order."""

    position: BatchPosition  # where the batch sits in the stream
    sample_ids: np.ndarray  # int64[n]: dataset index of plan id i
    lengths: np.ndarray  # int64[n]: tokens of plan id i (what the planner is given)

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum())


def open_dataset(dataset: TokenDataset | str | Path) -> TokenDataset:
    """A TokenDataset from itself, a `.bin`/`.idx` prefix or a directory holding `data.*`."""
    return dataset if isinstance(dataset, TokenDataset) else TokenDataset(dataset)


class BatchStream:
    """Endless deterministic global batches: the same (seed, budget) gives the same batches.

    `position` is the next batch to produce; storing it and passing it back as `start`
    resumes the stream exactly (what a checkpoint records).
    """

    def __init__(self, dataset: TokenDataset | str | Path, *, tokens_per_batch: int, seed: int,
                 start: BatchPosition = BatchPosition()):
        if tokens_per_batch < 1:
            raise ValueError(f"tokens_per_batch={tokens_per_batch} must be >= 1")
        if start.epoch < 0 or start.index < 0:
            raise ValueError(f"start={start} must have epoch >= 0 and index >= 0")
        self.dataset = open_dataset(dataset)
        self.tokens_per_batch = tokens_per_batch
        self.seed = seed
        self._lengths = self.dataset.lengths
        self._units = self.dataset.structure.units()  # DPO pairs move together
        self._epoch = -1
        self._batches: list[np.ndarray] = []
        self.position = start

    def _epoch_batches(self, epoch: int) -> list[np.ndarray]:
        if epoch != self._epoch:  # one permutation per epoch, computed once
            self._batches = epoch_batches(self._lengths, tokens_per_batch=self.tokens_per_batch,
                                          seed=self.seed, epoch=epoch, units=self._units)
            self._epoch = epoch
        return self._batches

    def next_batch(self) -> GlobalBatch:
        """The batch at `position`; advances `position` past it."""
        pos = self.position
        batches = self._epoch_batches(pos.epoch)
        if pos.index >= len(batches):  # a position saved at an epoch's end rolls over
            pos = BatchPosition(epoch=pos.epoch + 1, index=0)
            batches = self._epoch_batches(pos.epoch)
        ids = batches[pos.index]
        self.position = BatchPosition(epoch=pos.epoch, index=pos.index + 1)
        return GlobalBatch(position=pos, sample_ids=ids, lengths=self._lengths[ids])

    def __iter__(self):
        while True:
            yield self.next_batch()


def read_samples(dataset: TokenDataset | str | Path, batch: GlobalBatch,
                 ids: Iterable[int] | None = None) -> dict[int, torch.Tensor]:
    """Plan id -> LongTensor of that sample's tokens, for `ids` (default: the whole batch)."""
    dataset = open_dataset(dataset)
    n = len(batch.sample_ids)
    wanted = range(n) if ids is None else ids
    out: dict[int, torch.Tensor] = {}
    for i in wanted:
        if not 0 <= i < n:
            raise ValueError(f"ids: plan id {i} is outside the batch (valid 0..{n - 1})")
        tokens = np.asarray(dataset[int(batch.sample_ids[i])], dtype=np.int64)
        out[int(i)] = torch.from_numpy(tokens)
    return out


def read_plan_samples(dataset: TokenDataset, sample_ids, ids: Iterable[int], *,
                      vocab_size: int) -> dict[int, torch.Tensor]:
    """Plan id -> LongTensor of dataset sample `sample_ids[i]`, for `ids`; a DatasetError
    (the job's data is bad: the job fails, no retry) for a token id the model's embedding
    does not have, rather than an index error deep inside the step."""
    out: dict[int, torch.Tensor] = {}
    for i in ids:
        sample = int(sample_ids[i])
        tokens = dataset[sample]
        top = int(tokens.max()) if tokens.size else -1
        if top >= vocab_size:
            raise DatasetError(f"dataset {dataset.prefix}: sample {sample} holds token id "
                               f"{top}, but the model's vocab_size is {vocab_size} (valid "
                               f"ids 0..{vocab_size - 1})")
        out[int(i)] = torch.from_numpy(tokens.astype(np.int64))
    return out


def read_sample_data(dataset: TokenDataset | str | Path, batch: GlobalBatch,
                     ids: Iterable[int] | None = None) -> dict[int, SampleData]:
    """Plan id -> SampleData for `ids` (default: the whole batch); copies only those."""
    dataset = open_dataset(dataset)
    n = len(batch.sample_ids)
    out: dict[int, SampleData] = {}
    for i in range(n) if ids is None else ids:
        if not 0 <= i < n:
            raise ValueError(f"ids: plan id {i} is outside the batch (valid 0..{n - 1})")
        s = dataset.sample(int(batch.sample_ids[i]))
        logps = [None if v is None else torch.from_numpy(np.array(v, dtype=np.float64))
                 for v in (s.ref_logps, s.old_logps)]
        out[int(i)] = SampleData(
            tokens=torch.from_numpy(np.array(s.tokens, dtype=np.int64)),
            loss_mask=torch.from_numpy(np.array(s.loss_mask, dtype=bool)), meta=s.meta,
            ref_logps=logps[0], old_logps=logps[1])
    return out


def batch_loss_tokens(dataset: TokenDataset | str | Path, batch: GlobalBatch) -> int:
    """Loss predictions of the whole batch (every rank knows it without reading tokens)."""
    return int(open_dataset(dataset).structure.num_loss_tokens[batch.sample_ids].sum())


def batch_pairs(dataset: TokenDataset | str | Path, batch: GlobalBatch) -> list[tuple[int, int]]:
    """(chosen, rejected) plan ids of the batch's DPO pairs; raises if one is split."""
    return open_dataset(dataset).structure.batch_pairs(batch.sample_ids)


def sequence_ids_of_rank(plan: StepPlan, rank: int) -> list[int]:
    """Plan ids of every sequence `rank` holds a part of (what it must read)."""
    return sorted({s.id for _, g in plan.micro_batches_of(rank) for s in g.sequences})


class DatasetPlanSource:
    """A workers.train.PlanSource over a token dataset, for runs without a controller.

    At a data position it forms the global batch, plans it with `planner(lengths)` on rank
    0 of `group` only (a planner with a time limit need not return the same plan twice, and
    every rank must run the same one), broadcasts the plan, and reads this rank's samples.
    A batch with DPO pairs is planned with `planner(lengths, pairs=...)` (scheduler.plan_batch
    takes them) and its plan must keep every pair in one group. With a masked `objective`
    (all but pretrain) the samples are SampleData and the step input carries the batch's
    records (workers.loss.BatchMeta). `rank=None` reads every sample of the batch: a driver
    feeding a WorkerGroup, which is outside the process group and sends each actor its part.
    """

    def __init__(self, dataset: TokenDataset | str | Path, *, tokens_per_batch: int,
                 seed: int, planner: Callable[..., StepPlan], rank: int | None = 0,
                 group=None, objective: ObjectiveConfig | None = None):
        self.stream = BatchStream(dataset, tokens_per_batch=tokens_per_batch, seed=seed)
        self.planner, self.rank, self.group = planner, rank, group
        self.objective = objective or ObjectiveConfig()

    def _plan(self, lengths: np.ndarray, pairs: list[tuple[int, int]]) -> StepPlan:
        distributed = self.rank is not None and dist.is_available() \
            and dist.is_initialized() and dist.get_world_size(self.group) > 1
        text: list[str | None] = [None]
        if not distributed or dist.get_rank(self.group) == 0:
            plan = self.planner(lengths, pairs=pairs) if pairs else self.planner(lengths)
            text = [plan.check([int(n) for n in lengths], pairs).model_dump_json()]
        if distributed:
            dist.broadcast_object_list(text, group_src=0, group=self.group)
        assert text[0] is not None, "rank 0 planned, and broadcast its plan"
        return StepPlan.model_validate(json.loads(text[0]))

    def __call__(self, position: BatchPosition) -> StepInput:
        self.stream.position = position
        batch = self.stream.next_batch()
        dataset = self.stream.dataset
        meta = BatchMeta.from_structure(dataset.structure, batch.sample_ids)
        plan = self._plan(batch.lengths, list(meta.pairs))
        ids = None if self.rank is None else sequence_ids_of_rank(plan, self.rank)
        if not self.objective.masked:
            return StepInput(plan=plan, samples=read_samples(dataset, batch, ids),
                             next_position=self.stream.position)
        return StepInput(plan=plan, samples=read_sample_data(dataset, batch, ids),
                         next_position=self.stream.position, batch=meta)
