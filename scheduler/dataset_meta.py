"""Per-sample metadata of a token dataset: kind, DPO pairs, GRPO groups, loss-token counts.

Version-2 datasets store one fixed 48-byte record per sample in `<prefix>.meta` (layout in
`META_DTYPE`, documented in docs/data.md); version-1 datasets get the records a pre-training
corpus implies (kind pretrain, no pairs, no groups, every prediction carries a loss).

`DatasetStructure` is what the torch-free side needs without touching tokens: lengths, the
per-sample loss-token counts (so a step's global normaliser is a sum over the batch's
sample ids, known before any rank reads a token), and the pair/group structure (so the
batcher and the planner can keep a DPO pair's two sequences together). It costs O(N)
memory-mapped reads of the index and the records, never of the tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from scheduler.errors import DatasetError

KINDS = ("pretrain", "sft", "chat", "dpo", "grpo")  # code = position
ROLES = ("none", "chosen", "rejected")  # code = position; only DPO samples have a role
KIND_CODE = {k: i for i, k in enumerate(KINDS)}
ROLE_CODE = {r: i for i, r in enumerate(ROLES)}

# Little-endian, 48 bytes, fields at fixed offsets (bytes 2..7 are zero padding).
META_DTYPE = np.dtype({
    "names": ["kind", "role", "pair_id", "group_id", "num_loss_tokens", "reward", "advantage"],
    "formats": ["u1", "u1", "<i8", "<i8", "<i8", "<f8", "<f8"],
    "offsets": [0, 1, 8, 16, 24, 32, 40],
    "itemsize": 48,
})


@dataclass(frozen=True, kw_only=True)
class SampleMeta:
    """One sample's record, decoded."""

    kind: str  # one of KINDS
    num_loss_tokens: int  # positions t >= 1 whose token carries a loss (mask[t] = 1)
    pair_id: int | None = None  # DPO: the pair this sequence belongs to
    role: str | None = None  # DPO: "chosen" or "rejected"
    group_id: int | None = None  # GRPO: the prompt group this completion belongs to
    reward: float | None = None  # GRPO: the raw reward of this completion
    advantage: float | None = None  # GRPO: (reward - group mean) / (group std + eps)


def meta_records(n: int) -> np.ndarray:
    """n empty records: kind pretrain, no pair, no group, rewards NaN."""
    rec = np.zeros(n, dtype=META_DTYPE)
    rec["pair_id"] = rec["group_id"] = -1
    rec["reward"] = rec["advantage"] = np.nan
    return rec


def pretrain_records(lengths: np.ndarray) -> np.ndarray:
    """The records a version-1 (pre-training) dataset implies: L - 1 loss predictions each."""
    rec = meta_records(len(lengths))
    rec["num_loss_tokens"] = np.maximum(np.asarray(lengths, dtype=np.int64) - 1, 0)
    return rec


def decode_record(rec: np.void) -> SampleMeta:
    kind = KINDS[int(rec["kind"])]
    pair, group = int(rec["pair_id"]), int(rec["group_id"])
    return SampleMeta(
        kind=kind, num_loss_tokens=int(rec["num_loss_tokens"]),
        pair_id=pair if pair >= 0 else None,
        role=ROLES[int(rec["role"])] if int(rec["role"]) else None,
        group_id=group if group >= 0 else None,
        reward=float(rec["reward"]) if kind == "grpo" else None,
        advantage=float(rec["advantage"]) if kind == "grpo" else None)


@dataclass(frozen=True, eq=False)
class DatasetStructure:
    """Lengths and per-sample records of a whole dataset (no tokens); see the module doc."""

    lengths: np.ndarray  # int64[N] tokens per sample
    records: np.ndarray  # META_DTYPE[N]

    def __len__(self) -> int:
        return int(self.lengths.size)

    @property
    def kind_counts(self) -> dict[str, int]:
        counts = np.bincount(self.records["kind"], minlength=len(KINDS))
        return {k: int(c) for k, c in zip(KINDS, counts, strict=False) if c}

    @property
    def num_loss_tokens(self) -> np.ndarray:
        """int64[N] loss predictions per sample (what a step normalises by, per token)."""
        return self.records["num_loss_tokens"].astype(np.int64)

    def pairs(self) -> np.ndarray:
        """int64[P, 2]: (chosen, rejected) sample index of every DPO pair, by pair id."""
        dpo = np.flatnonzero(self.records["kind"] == KIND_CODE["dpo"])
        if dpo.size == 0:
            return np.zeros((0, 2), dtype=np.int64)
        key = self.records["pair_id"][dpo] * 4 + self.records["role"][dpo]
        ordered = dpo[np.argsort(key, kind="stable")]
        return ordered.reshape(-1, 2).astype(np.int64)

    @property
    def num_groups(self) -> int:
        groups = self.records["group_id"]
        return int(np.unique(groups[groups >= 0]).size)

    def units(self) -> np.ndarray | None:
        """int64[N] batching unit of each sample (a DPO pair shares one), or None if none pair.

        The unit id of a pair is its chosen sample's index, of any other sample its own, so
        units are sample indices and a corpus without pairs batches exactly as before.
        """
        pairs = self.pairs()
        if pairs.size == 0:
            return None
        units = np.arange(len(self), dtype=np.int64)
        units[pairs[:, 1]] = pairs[:, 0]
        return units

    def batch_pairs(self, sample_ids: Sequence[int] | np.ndarray) -> list[tuple[int, int]]:
        """(chosen, rejected) plan ids of every DPO pair in a batch (plan id = position).

        Raises DatasetError when a batch holds one sequence of a pair without the other: a
        pair's loss needs both, so a batcher that splits a pair is a bug the caller must see.
        """
        ids = np.asarray(sample_ids, dtype=np.int64)
        rec = self.records[ids]
        position = {int(s): p for p, s in enumerate(ids)}
        out = []
        for p in np.flatnonzero(rec["role"] == ROLE_CODE["chosen"]):
            partner = self._partner(int(ids[p]))
            if partner not in position:
                raise DatasetError(f"sample_ids: DPO pair {int(rec['pair_id'][p])} is split: "
                                   f"chosen sample {int(ids[p])} is in the batch, rejected "
                                   f"sample {partner} is not")
            out.append((int(p), position[partner]))
        if 2 * len(out) != int((rec["role"] != 0).sum()):
            raise DatasetError("sample_ids: a rejected DPO sequence is in the batch without "
                               "its chosen partner")
        return out

    def _partner(self, sample: int) -> int:
        return int(self._partners[sample])

    @cached_property
    def _partners(self) -> np.ndarray:
        """int64[N]: the other sequence of each sample's DPO pair, -1 outside pairs."""
        partners = np.full(len(self), -1, dtype=np.int64)
        pairs = self.pairs()
        partners[pairs[:, 0]], partners[pairs[:, 1]] = pairs[:, 1], pairs[:, 0]
        return partners

    def validate(self, where: str) -> None:
        """Raise DatasetError (naming `where`) unless the records are self-consistent."""
        rec, n = self.records, len(self)
        if rec.size != n:
            raise DatasetError(f"{where}: {rec.size} metadata records for {n} samples")
        bad_kind = np.flatnonzero(rec["kind"] >= len(KINDS))
        if bad_kind.size:
            i = int(bad_kind[0])
            raise DatasetError(f"{where}: sample {i} has kind code {rec['kind'][i]} (valid: "
                               f"0..{len(KINDS) - 1} = {', '.join(KINDS)})")
        over = np.flatnonzero((rec["num_loss_tokens"] < 0)
                              | (rec["num_loss_tokens"] > np.maximum(self.lengths - 1, 0)))
        if over.size:
            i = int(over[0])
            raise DatasetError(f"{where}: sample {i} claims {rec['num_loss_tokens'][i]} loss "
                               f"tokens but has {self.lengths[i]} tokens")
        self._validate_pairs(where)
        groups_ok = (rec["group_id"] >= 0) == (rec["kind"] == KIND_CODE["grpo"])
        if not groups_ok.all():
            i = int(np.flatnonzero(~groups_ok)[0])
            raise DatasetError(f"{where}: sample {i}: a group id is required for grpo samples "
                               "and forbidden for others")

    def _validate_pairs(self, where: str) -> None:
        rec = self.records
        dpo = rec["kind"] == KIND_CODE["dpo"]
        roles_ok = np.where(dpo, (rec["role"] >= 1) & (rec["role"] <= 2) & (rec["pair_id"] >= 0),
                            (rec["role"] == 0) & (rec["pair_id"] == -1))
        if not roles_ok.all():
            i = int(np.flatnonzero(~roles_ok)[0])
            raise DatasetError(f"{where}: sample {i}: dpo samples need a pair id and the role "
                               "chosen or rejected; other kinds have neither")
        ids, counts = np.unique(rec["pair_id"][dpo], return_counts=True)
        role_sum = np.bincount(np.searchsorted(ids, rec["pair_id"][dpo]),
                               weights=rec["role"][dpo], minlength=ids.size)
        bad = np.flatnonzero((counts != 2) | (role_sum != 3))
        if bad.size:
            raise DatasetError(f"{where}: DPO pair {int(ids[bad[0]])} does not hold exactly one "
                               "chosen and one rejected sequence")
