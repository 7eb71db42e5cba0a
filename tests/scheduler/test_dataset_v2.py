"""Format version 2: masks and records, version-1 files, log-prob columns, pair batching."""

from __future__ import annotations

import numpy as np
import pytest

from scheduler.batching import epoch_batches
from scheduler.dataset import (
    DatasetWriter,
    TokenDataset,
    dataset_stats,
    read_lengths,
    read_structure,
    read_units,
)
from scheduler.dataset_columns import TokenColumnWriter, remove_token_column, write_token_column
from scheduler.errors import DatasetError


def write_v1(path, samples):
    """A version-1 dataset byte by byte, as the version-1 writer laid it out."""
    path.mkdir(parents=True, exist_ok=True)
    offsets = np.concatenate([[0], np.cumsum([len(s) for s in samples])]).astype("<u8")
    (path / "data.idx").write_bytes(b"RMIDX\x00\x01\x00" + np.array(
        [1, len(samples)], dtype="<u8").tobytes() + offsets.tobytes())
    (path / "data.bin").write_bytes(np.concatenate(samples).astype("<u4").tobytes())
    return path


def test_version_1_reads_as_pretraining(tmp_path, rng):
    samples = [rng.integers(0, 2**32, size=n, dtype=np.uint64) for n in (1, 7, 127)]
    ds = TokenDataset(write_v1(tmp_path, samples))
    assert ds.version == 1 and len(ds) == 3 and ds.columns == ()
    for i, s in enumerate(samples):
        np.testing.assert_array_equal(ds[i], s)
        assert ds.loss_mask(i).tolist() == [1] * len(s)
        m = ds.meta(i)
        assert (m.kind, m.num_loss_tokens, m.pair_id, m.group_id) == ("pretrain", len(s) - 1,
                                                                       None, None)
    assert read_units(tmp_path) is None
    st = dataset_stats(tmp_path)
    assert st["kinds"] == {"pretrain": 3} and st["num_loss_tokens"] == 0 + 6 + 126
    assert st["max_token_id"] == int(max(s.max() for s in samples))


def test_round_trip_of_every_field(tmp_path, rng):
    with DatasetWriter(tmp_path / "data") as w:
        w.add([5, 6, 7])
        w.add([1, 2, 3, 4], loss_mask=[0, 0, 1, 1], kind="sft")
        w.add([1, 2, 9], loss_mask=[0, 1, 1], kind="dpo", pair_id=0, role="rejected")
        w.add([1, 2, 8], loss_mask=[0, 1, 1], kind="dpo", pair_id=0, role="chosen")
        w.add([3, 4], loss_mask=[0, 1], kind="grpo", group_id=0, reward=0.5, advantage=-1.0)
    ds = TokenDataset(tmp_path)
    assert ds.version == 2 and ds.lengths.tolist() == [3, 4, 3, 3, 2]
    assert ds.loss_mask(1).tolist() == [0, 0, 1, 1]
    assert [ds.meta(i).num_loss_tokens for i in range(5)] == [2, 2, 2, 2, 1]
    assert (ds.meta(2).role, ds.meta(3).role, ds.meta(3).pair_id) == ("rejected", "chosen", 0)
    g = ds.meta(4)
    assert (g.group_id, g.reward, g.advantage) == (0, 0.5, -1.0)
    st = read_structure(tmp_path)
    assert st.pairs().tolist() == [[3, 2]] and st.units().tolist() == [0, 1, 3, 3, 4]
    assert st.kind_counts == {"pretrain": 1, "sft": 1, "dpo": 2, "grpo": 1}
    assert ds.manifest["num_tokens"] == 15 and ds.max_token_id == 9


@pytest.mark.parametrize("bad,needle", [
    ({"kind": "dpo", "pair_id": 0, "role": "chosen"}, "DPO pair 0 does not hold exactly one"),
    ({"kind": "dpo"}, "dpo samples need both"),
    ({"kind": "sft", "group_id": 3}, "required for grpo samples only"),
    ({"kind": "rlhf"}, "kind='rlhf' is not known"),
])
def test_writer_rejects_inconsistent_records(tmp_path, bad, needle):
    with pytest.raises((ValueError, DatasetError), match=needle):
        with DatasetWriter(tmp_path / "data") as w:
            w.add([1, 2, 3], **bad)
            w.close()


def test_truncated_mask_and_meta_are_named(tmp_path):
    with DatasetWriter(tmp_path / "data") as w:
        w.add([1, 2, 3])
    (tmp_path / "data.mask").write_bytes(b"\x01\x01")
    with pytest.raises(DatasetError, match=r"data\.mask: truncated or oversized at offset 2"):
        TokenDataset(tmp_path)
    (tmp_path / "data.mask").write_bytes(b"\x01" * 3)
    (tmp_path / "data.meta").write_bytes(b"\0" * 47)
    with pytest.raises(DatasetError, match=r"data\.meta: truncated or oversized at offset 47"):
        TokenDataset(tmp_path).meta(0)
    assert read_lengths(tmp_path).tolist() == [3]  # lengths need the index only


def lengths_dataset(tmp_path, lengths):
    with DatasetWriter(tmp_path / "data") as w:
        for n in lengths:
            w.add(np.arange(1, n + 1))
    return tmp_path


def test_log_prob_column_written_in_any_order_and_replaced_atomically(tmp_path, rng):
    lengths = [1, 7, 127, 3]
    lengths_dataset(tmp_path, lengths)
    values = {i: -rng.random(n) for i, n in enumerate(lengths)}
    order = rng.permutation(len(lengths))
    write_token_column(tmp_path, "ref_logps", ((int(i), values[int(i)]) for i in order),
                       source="model-a")
    old = TokenDataset(tmp_path)
    assert old.columns == ("ref_logps",)
    for i, v in values.items():
        expect = np.concatenate([[0.0], v[1:]]).astype(np.float32)  # token 0: no prediction
        np.testing.assert_array_equal(old.column("ref_logps", i), expect)
    with TokenColumnWriter(tmp_path, "ref_logps", source="model-b", dtype="<f8") as w:
        for i, v in values.items():
            w.write(i, 2 * v)
    new = TokenDataset(tmp_path)
    np.testing.assert_array_equal(new.sample(2).ref_logps[1:], 2 * values[2][1:])
    np.testing.assert_array_equal(old.column("ref_logps", 2)[1:],  # the old map stays valid
                                  values[2][1:].astype(np.float32))
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    assert remove_token_column(tmp_path, "ref_logps") and TokenDataset(tmp_path).columns == ()


def test_column_writer_failures_leave_the_dataset_as_it_was(tmp_path):
    lengths_dataset(tmp_path, [2, 3])
    with pytest.raises(DatasetError, match=r"1 sample\(s\) were never written \(first: 1\)"):
        with TokenColumnWriter(tmp_path, "old_logps") as w:
            w.write(0, [0.0, -1.0])
    with pytest.raises(DatasetError, match=r"shape \(2,\), expected \(3,\)"):
        with TokenColumnWriter(tmp_path, "old_logps") as w:
            w.write(1, [0.0, -1.0])
    with pytest.raises(DatasetError, match="token 2 is nan"):
        with TokenColumnWriter(tmp_path, "old_logps") as w:
            w.write(1, [0.0, -1.0, float("nan")])
    with pytest.raises(DatasetError, match="column='logits' is not known"):
        TokenColumnWriter(tmp_path, "logits")
    assert TokenDataset(tmp_path).columns == ()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_pairs_are_never_split_over_batches(tmp_path, rng):
    with DatasetWriter(tmp_path / "data") as w:
        for k in range(60):
            if k % 3 == 0:
                w.add(np.ones(int(rng.integers(2, 40)), dtype=np.int64))
                continue
            for role in ("chosen", "rejected"):
                w.add(np.ones(int(rng.integers(2, 40)), dtype=np.int64), kind="dpo",
                      pair_id=k, role=role)
    st = read_structure(tmp_path)
    units = read_units(tmp_path)
    for epoch in range(3):
        batches = epoch_batches(st.lengths, tokens_per_batch=90, seed=4, epoch=epoch,
                                units=units)
        assert sorted(np.concatenate(batches).tolist()) == list(range(len(st)))
        for b in batches:
            pairs = st.batch_pairs(b)  # raises if a pair is split
            assert all(b[r] == b[c] + 1 for c, r in pairs)  # adjacent, chosen first
            assert st.lengths[b].sum() <= 90 or len(b) <= 2
    with pytest.raises(DatasetError, match="DPO pair .* is split"):
        st.batch_pairs([int(st.pairs()[0, 0])])
    plain = epoch_batches(st.lengths, tokens_per_batch=90, seed=4)
    singletons = epoch_batches(st.lengths, tokens_per_batch=90, seed=4,
                               units=np.arange(len(st)))
    assert [b.tolist() for b in plain] == [b.tolist() for b in singletons]


def test_stats_figures(tmp_path, rng):
    lengths = rng.integers(2, 500, size=101)
    with DatasetWriter(tmp_path / "data") as w:
        for n in lengths:
            mask = np.ones(n, dtype=np.uint8)
            mask[: n // 2] = 0
            w.add(np.full(n, 7), loss_mask=mask, kind="sft")
    st = dataset_stats(tmp_path)
    ordered = np.sort(lengths)
    assert st["length"]["min"] == ordered[0] and st["length"]["max"] == ordered[-1]
    assert st["length"]["p50"] == ordered[50]  # the median of 101 values
    assert st["num_loss_tokens"] == int(sum(n - n // 2 for n in lengths))
    assert st["loss_share"] == pytest.approx(st["num_loss_tokens"] / int((lengths - 1).sum()))
    assert st["kinds"] == {"sft": 101} and st["num_pairs"] == 0 and st["max_token_id"] == 7
