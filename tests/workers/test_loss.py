"""workers.loss: DPO records that lack their pair or role get an error naming the sample.

A DPO sample's record must say which pair it belongs to and whether it is the chosen or
the rejected sequence (scheduler.dataset_meta checks that for datasets on disk; SampleData
built by hand is checked here). Without the role, BatchMeta.from_samples used to fail with
a bare KeyError; without the pair id, group_inputs blamed a "pair None".
"""

from __future__ import annotations

import pytest
import torch

from scheduler.dataset_meta import SampleMeta
from workers.loss import BatchMeta, ObjectiveConfig, group_inputs
from workers.sample import SampleData

from .helpers import group


def _dpo(tokens: list[int], *, pair_id: int | None, role: str | None) -> SampleData:
    mask = torch.tensor([False] + [True] * (len(tokens) - 1))
    return SampleData(tokens=torch.tensor(tokens), loss_mask=mask,
                      meta=SampleMeta(kind="dpo", num_loss_tokens=len(tokens) - 1,
                                      pair_id=pair_id, role=role),
                      ref_logps=torch.zeros(len(tokens), dtype=torch.float64), old_logps=None)


def test_batch_meta_pairs_chosen_and_rejected_by_their_records():
    samples = {0: _dpo([1, 2, 3], pair_id=7, role="rejected"),
               1: _dpo([1, 2, 4, 5], pair_id=7, role="chosen")}
    meta = BatchMeta.from_samples(samples)
    assert meta.pairs == ((1, 0),) and meta.num_loss_tokens == (2, 3)


def test_batch_meta_names_a_dpo_record_without_its_role():
    samples = {0: _dpo([1, 2, 3], pair_id=7, role="chosen"),
               1: _dpo([1, 2, 4], pair_id=7, role=None)}
    with pytest.raises(ValueError, match=r"samples\[1\]: a DPO sample needs a pair_id and the "
                                         r"role chosen or rejected \(got pair_id=7, role=None\)"):
        BatchMeta.from_samples(samples)


def test_group_inputs_names_a_dpo_record_without_its_pair():
    samples = {0: _dpo([1, 2, 3], pair_id=None, role="chosen"),
               1: _dpo([1, 2, 4], pair_id=3, role="rejected")}
    with pytest.raises(ValueError, match=r"samples\[0\]: a DPO sample needs a pair_id"):
        group_inputs(group([0], [(0, 3), (1, 3)]), samples, 0, ObjectiveConfig(type="dpo"))
