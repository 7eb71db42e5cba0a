"""Global batches from sample lengths: a deterministic token-budget packing.

Torch-free: the controller forms batches from the dataset's lengths alone and sends their
ids; workers read the tokens of exactly those ids. Order is a seeded permutation per
epoch, so (seed, epoch, batch index) names a batch and is all a checkpoint must remember.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from scheduler.errors import DatasetError, SpecError


@dataclass(frozen=True, kw_only=True)
class BatchPosition:
    """Where the data stream is: the next batch to produce."""

    epoch: int = 0  # passes over the dataset completed
    index: int = 0  # batch index inside the epoch


def epoch_batches(lengths: Sequence[int] | np.ndarray, *, tokens_per_batch: int, seed: int,
                  epoch: int = 0, units: Sequence[int] | np.ndarray | None = None
                  ) -> list[np.ndarray]:
    """Sample ids of every global batch of one epoch, in order.

    Samples are taken in a seeded permutation and appended to the current batch until the
    next one would exceed `tokens_per_batch`; a sample longer than the budget forms a batch
    of its own (the planner then decides whether it fits the cluster).

    `units` (int[N], e.g. scheduler.dataset.read_units) makes samples that share a unit id
    move as one: the permutation is over units, a unit is never split over two batches, and
    its samples stay adjacent in index order (a DPO pair: chosen, then rejected). With every
    unit a singleton, or None, the batches are exactly the per-sample ones.
    """
    if tokens_per_batch < 1:
        raise SpecError(f"tokens_per_batch={tokens_per_batch} must be >= 1")
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.size == 0:
        raise DatasetError("lengths: the dataset has no samples")
    members = _unit_members(units, lengths.size)
    count = lengths.size if members is None else len(members)
    order = np.random.default_rng([seed, epoch]).permutation(count)
    sizes = lengths if members is None else np.array([lengths[m].sum() for m in members])
    batches: list[np.ndarray] = []
    current: list[int] = []
    used = 0
    for u, n in zip(order.tolist(), sizes[order].tolist(), strict=True):
        if current and used + n > tokens_per_batch:
            batches.append(np.asarray(current, dtype=np.int64))
            current, used = [], 0
        if members is None:
            current.append(u)
        else:
            current.extend(members[u].tolist())
        used += n
    if current:
        batches.append(np.asarray(current, dtype=np.int64))
    return batches


def _unit_members(units, n: int) -> list[np.ndarray] | None:
    """Sample ids of each unit, units in increasing id order (None: every sample alone)."""
    if units is None:
        return None
    units = np.asarray(units, dtype=np.int64)
    if units.shape != (n,):
        raise ValueError(f"units: shape {units.shape}, expected ({n},) (one per sample)")
    order = np.argsort(units, kind="stable")
    _, starts = np.unique(units[order], return_index=True)
    return np.split(order, starts[1:])


def iter_batches(lengths: Sequence[int] | np.ndarray, *, tokens_per_batch: int, seed: int,
                 start: BatchPosition = BatchPosition()) -> Iterator[tuple[BatchPosition,
                                                                            np.ndarray]]:
    """Endless (position, ids) stream from `start`, epoch after epoch."""
    epoch, index = start.epoch, start.index
    while True:
        batches = epoch_batches(lengths, tokens_per_batch=tokens_per_batch, seed=seed,
                                epoch=epoch)
        for k in range(index, len(batches)):
            yield BatchPosition(epoch=epoch, index=k), batches[k]
        epoch, index = epoch + 1, 0
