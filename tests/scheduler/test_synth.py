"""Synthetic corpora: published length statistics and copy-task content."""

from __future__ import annotations

import numpy as np
import pytest

from scheduler.batching import BatchPosition, epoch_batches, iter_batches
from scheduler.dataset import TokenDataset
from scheduler.synth import sample_lengths, synthesize

TWO_M = 2 * 1024 * 1024


def shares(lengths: np.ndarray, max_length: int) -> dict[str, float]:
    """Computed here from the published definitions, independently of synth.length_stats."""
    s = max_length / TWO_M
    total = lengths.sum()
    return {
        "short_samples": np.mean(lengths <= 4096 * s),
        "long_samples": np.mean(lengths >= 128 * 1024 * s),
        "long_tokens": lengths[lengths >= 128 * 1024 * s].sum() / total,
        "max_tokens": lengths[lengths >= max_length].sum() / total,
    }


@pytest.mark.parametrize("max_length", [TWO_M, 65536])
def test_byted_matches_bytescale_statistics(max_length):
    # ByteScale sec. 3.1: ~80% of samples <= 4K; the 1% >= 128K hold ~44% of tokens;
    # samples >= 2M hold ~12%. "Within a few points": 3 points on shares, 0.3 on the 1%.
    got = shares(sample_lengths("byted", 300_000, max_length, seed=7), max_length)
    assert abs(got["short_samples"] - 0.80) < 0.03
    assert abs(got["long_samples"] - 0.01) < 0.003
    assert abs(got["long_tokens"] - 0.44) < 0.03
    assert abs(got["max_tokens"] - 0.12) < 0.03


def test_github_long_share():
    got = shares(sample_lengths("github", 300_000, TWO_M, seed=3), TWO_M)
    assert abs(got["long_tokens"] - 0.16) < 0.03


def test_lengths_bounds_and_determinism():
    a = sample_lengths("byted", 5000, 1000, seed=1)
    assert a.min() >= 2 and a.max() <= 1000
    np.testing.assert_array_equal(a, sample_lengths("byted", 5000, 1000, seed=1))
    assert not np.array_equal(a, sample_lengths("byted", 5000, 1000, seed=2))


@pytest.mark.parametrize("kwargs,needle", [
    (dict(distribution="zipf", num_samples=3, max_length=10), "distribution='zipf'"),
    (dict(distribution="byted", num_samples=0, max_length=10), "num_samples=0"),
    (dict(distribution="byted", num_samples=3, max_length=1), "max_length=1"),
])
def test_bad_arguments(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        sample_lengths(**kwargs)


def test_copy_task_content(tmp_path):
    lengths = synthesize(tmp_path, distribution="uniform", num_samples=50, max_length=300,
                         vocab_size=17, seed=0)
    ds = TokenDataset(tmp_path)
    assert ds.lengths.tolist() == lengths.tolist()
    for i in range(len(ds)):
        tokens = ds[i]
        half = len(tokens) - len(tokens) // 2
        assert tokens.min() >= 1 and tokens.max() < 17
        np.testing.assert_array_equal(tokens[half:], tokens[: len(tokens) // 2])


def test_periodic_copy_task(tmp_path):
    lengths = synthesize(tmp_path, distribution="uniform", num_samples=40, max_length=200,
                         vocab_size=9, seed=2, period=13, min_length=20)
    ds = TokenDataset(tmp_path)
    assert lengths.min() >= 20
    for i in range(len(ds)):
        tokens = ds[i]
        np.testing.assert_array_equal(tokens[13:], tokens[:-13])
    with pytest.raises(ValueError, match="period=0"):
        synthesize(tmp_path / "x", distribution="uniform", num_samples=1, max_length=9,
                   period=0)
    with pytest.raises(ValueError, match="min_length=50"):
        synthesize(tmp_path / "y", distribution="uniform", num_samples=1, max_length=9,
                   min_length=50)


def test_batches_respect_budget_and_cover_epoch():
    lengths = sample_lengths("byted", 3000, 4096, seed=0)
    batches = epoch_batches(lengths, tokens_per_batch=20000, seed=5)
    ids = np.concatenate(batches)
    assert sorted(ids.tolist()) == list(range(3000))
    for b in batches:
        assert lengths[b].sum() <= 20000 or len(b) == 1
    again = epoch_batches(lengths, tokens_per_batch=20000, seed=5)
    assert all(np.array_equal(x, y) for x, y in zip(batches, again, strict=True))


def test_iter_batches_resumes_at_position():
    lengths = sample_lengths("uniform", 200, 100, seed=0)
    stream = iter_batches(lengths, tokens_per_batch=500, seed=1)
    first = [next(stream) for _ in range(60)]  # crosses into a second epoch
    pos, _ = first[40]
    resumed = iter_batches(lengths, tokens_per_batch=500, seed=1, start=pos)
    for (p, ids), (q, jds) in zip(first[40:], resumed, strict=False):
        assert p == q and np.array_equal(ids, jds)
    assert first[-1][0].epoch >= 1 and first[0][0] == BatchPosition()
