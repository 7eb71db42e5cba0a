"""workers.data: deterministic global batches and per-rank sample reads."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from scheduler.batching import BatchPosition
from scheduler.dataset import DatasetWriter, TokenDataset
from scheduler.plan import MicroBatch, RingGroup, SeqSlice, StepPlan
from workers.data import BatchStream, read_samples, sequence_ids_of_rank


@pytest.fixture
def corpus(tmp_path, rng):
    lengths = rng.integers(1, 40, size=37)
    samples = [rng.integers(0, 2**32 - 1, size=int(n), dtype=np.uint64) for n in lengths]
    with DatasetWriter(tmp_path / "data") as w:
        for s in samples:
            w.add(s)
    return tmp_path, samples


def test_batches_cover_each_epoch_once_within_budget(corpus):
    path, samples = corpus
    stream = BatchStream(path, tokens_per_batch=60, seed=3)
    seen = []
    while stream.position.epoch == 0:
        b = stream.next_batch()
        if b.position.epoch:
            break
        assert b.num_tokens <= 60 or len(b.sample_ids) == 1
        assert list(b.lengths) == [len(samples[i]) for i in b.sample_ids]
        seen += list(b.sample_ids)
    assert sorted(seen) == list(range(len(samples)))


def test_same_seed_same_batches_and_resume_from_position(corpus):
    path, _ = corpus
    straight = [b for b in itertools.islice(BatchStream(path, tokens_per_batch=50, seed=7), 25)]
    again = BatchStream(TokenDataset(path), tokens_per_batch=50, seed=7)
    first = [again.next_batch() for _ in range(11)]
    resumed = BatchStream(path, tokens_per_batch=50, seed=7, start=again.position)
    rest = [resumed.next_batch() for _ in range(14)]
    assert len({b.position.epoch for b in straight}) > 1  # crosses an epoch boundary
    for a, b in zip(straight, first + rest, strict=True):
        assert a.position == b.position
        np.testing.assert_array_equal(a.sample_ids, b.sample_ids)
    other = BatchStream(path, tokens_per_batch=50, seed=8).next_batch()
    assert not np.array_equal(other.sample_ids, straight[0].sample_ids)


def test_position_at_epoch_end_rolls_over(corpus):
    path, _ = corpus
    stream = BatchStream(path, tokens_per_batch=50, seed=1)
    n0 = sum(1 for b in itertools.takewhile(lambda b: b.position.epoch == 0, stream))
    end = BatchStream(path, tokens_per_batch=50, seed=1,
                      start=BatchPosition(epoch=0, index=n0)).next_batch()
    assert end.position == BatchPosition(epoch=1, index=0)


def test_read_samples_gives_tokens_by_plan_id(corpus):
    path, samples = corpus
    batch = BatchStream(path, tokens_per_batch=80, seed=2).next_batch()
    got = read_samples(path, batch)
    assert sorted(got) == list(range(len(batch.sample_ids)))
    for i, t in got.items():
        assert t.dtype == torch.int64
        np.testing.assert_array_equal(t.numpy(), samples[batch.sample_ids[i]].astype(np.int64))
    assert sorted(read_samples(path, batch, [1, 0])) == [0, 1]
    with pytest.raises(ValueError, match="plan id 99"):
        read_samples(path, batch, [99])


def test_sequence_ids_of_rank_reads_only_what_the_rank_holds():
    plan = StepPlan(world_size=3, capacity_tokens=100, micro_batches=[
        MicroBatch(groups=[RingGroup(ranks=[2, 0], sequences=[SeqSlice(id=1, length=10)]),
                           RingGroup(ranks=[1], sequences=[SeqSlice(id=0, length=3),
                                                           SeqSlice(id=3, length=4)])]),
        MicroBatch(groups=[RingGroup(ranks=[0], sequences=[SeqSlice(id=2, length=5)])]),
    ])
    assert sequence_ids_of_rank(plan, 0) == [1, 2]
    assert sequence_ids_of_rank(plan, 1) == [0, 3]
    assert sequence_ids_of_rank(plan, 2) == [1]


def test_bad_arguments_name_the_field(corpus):
    path, _ = corpus
    with pytest.raises(ValueError, match="tokens_per_batch=0"):
        BatchStream(path, tokens_per_batch=0, seed=0)
    with pytest.raises(ValueError, match="start="):
        BatchStream(path, tokens_per_batch=5, seed=0, start=BatchPosition(epoch=-1))


def test_sample_data_pairs_and_loss_tokens(tmp_path, rng):
    from scheduler.dataset_columns import write_token_column
    from workers.data import batch_loss_tokens, batch_pairs, read_sample_data

    masks = {}
    with DatasetWriter(tmp_path / "data") as w:
        for k in range(40):
            kind = "dpo" if k % 2 else "sft"
            for role in (("chosen", "rejected") if kind == "dpo" else (None,)):
                n = int(rng.integers(2, 30))
                mask = (rng.random(n) < 0.6).astype(np.uint8)
                mask[-1] = 1
                extra = {"pair_id": k, "role": role} if role else {}
                masks[w.add(rng.integers(0, 1000, size=n), loss_mask=mask, kind=kind,
                            **extra)] = mask
    ref = {i: -rng.random(len(m)) for i, m in masks.items()}
    write_token_column(tmp_path, "ref_logps", ref.items(), dtype="<f8")
    stream = BatchStream(tmp_path, tokens_per_batch=70, seed=2)
    for _ in range(12):
        batch = stream.next_batch()
        pairs = batch_pairs(tmp_path, batch)  # raises if the stream split a pair
        data = read_sample_data(tmp_path, batch)
        assert len(pairs) == sum(d.meta.role == "chosen" for d in data.values())
        for c, r in pairs:
            assert (data[c].meta.role, data[r].meta.role) == ("chosen", "rejected")
            assert data[c].meta.pair_id == data[r].meta.pair_id
        assert batch_loss_tokens(tmp_path, batch) == sum(
            int(masks[int(s)][1:].sum()) for s in batch.sample_ids)
        for i, d in data.items():
            sid = int(batch.sample_ids[i])
            assert d.loss_mask.tolist() == masks[sid].astype(bool).tolist()
            assert d.target_mask().tolist() == masks[sid][1:].astype(bool).tolist() + [False]
            torch.testing.assert_close(d.to_targets(d.ref_logps)[:-1],
                                       torch.from_numpy(ref[sid][1:]), rtol=0, atol=0)


def test_controller_and_worker_streams_batch_pairs_alike(tmp_path, rng):
    from controller.planning import BatchSchedule
    from scheduler.dataset import read_lengths, read_units

    with DatasetWriter(tmp_path / "data") as w:
        for k in range(30):
            for role in ("chosen", "rejected"):
                w.add(rng.integers(0, 9, size=int(rng.integers(2, 50))), kind="dpo",
                      pair_id=k, role=role)
    schedule = BatchSchedule(read_lengths(tmp_path), tokens_per_batch=120, seed=5,
                             units=read_units(tmp_path))
    stream = BatchStream(tmp_path, tokens_per_batch=120, seed=5)
    for step in range(20):
        ids, _ = schedule.batch(step)  # crosses an epoch: 30 pairs, ~3 pairs a batch
        assert ids.tolist() == stream.next_batch().sample_ids.tolist()
        assert sorted(ids.tolist()) == sorted({2 * (i // 2) + j for i in ids for j in (0, 1)})
