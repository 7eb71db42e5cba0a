"""Synthetic long-context corpora whose length distribution follows published statistics.

ByteScale (arXiv 2502.21231, section 3.1) characterises its production data ("byted"):
about 80% of samples are <= 4K tokens, the 1% of samples >= 128K hold about 44% of all
tokens, and samples >= 2M hold about 12%; for GitHub code about 16% of tokens sit in
samples > 128K. We model lengths as a four-bin mixture (relative to a 2M maximum, scaled
down linearly by `max_length`):

    A  [256, 4K]        log-uniform            weight p_short
    B  (4K, 128K)       log-uniform/uniform mix weight 1 - p_short - p_long
    C  [128K, max)      log-uniform            weight p_long - p_max
    D  max              a point mass           weight p_max

and solve for p_max, the B mix and the C weight so that the token shares match (a
closed-form linear solve, see `_solve`). Content is a copy task: a random prefix followed
by its copy, so the second half can be predicted only by attending across the sequence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from scheduler.dataset import DatasetWriter
from scheduler.errors import SpecError

REFERENCE_MAX = 2 * 1024 * 1024


@dataclass(frozen=True, kw_only=True)
class LengthTargets:
    """Published shape of a corpus' length distribution (fractions in [0, 1])."""

    p_short: float  # share of samples <= 4K (scaled)
    p_long: float  # share of samples >= 128K (scaled)
    share_long: float  # share of tokens in samples >= 128K
    share_max: float  # share of tokens in samples at the maximum length


DISTRIBUTIONS: dict[str, LengthTargets] = {
    "byted": LengthTargets(p_short=0.80, p_long=0.01, share_long=0.44, share_max=0.12),
    "github": LengthTargets(p_short=0.85, p_long=0.0025, share_long=0.16, share_max=0.02),
}


def _log_uniform_mean(lo: float, hi: float) -> float:
    return (hi - lo) / math.log(hi / lo) if hi > lo else lo


@dataclass(frozen=True)
class _Mixture:
    edges: tuple[float, float, float, float]  # a_lo, 4K, 128K, max
    probs: tuple[float, float, float, float]  # A, B, C, D
    b_log_weight: float  # share of bin B drawn log-uniform (rest uniform)


def _solve(t: LengthTargets, max_length: int) -> _Mixture:
    s = max_length / REFERENCE_MAX
    a_lo, a_hi, c_lo, m = max(2.0, 256 * s), max(3.0, 4096 * s), max(4.0, 131072 * s), max_length
    m_a = _log_uniform_mean(a_lo, a_hi)
    m_c = _log_uniform_mean(c_lo, m)
    # Token ratio D:C fixes p_max relative to p_c; the count constraint fixes both.
    r = t.share_max / (t.share_long - t.share_max)
    p_c = t.p_long / (1 + r * m_c / m)
    p_d = t.p_long - p_c
    long_tokens = p_c * m_c + p_d * m
    total = long_tokens / t.share_long
    p_b = 1 - t.p_short - t.p_long
    m_b = (total - long_tokens - t.p_short * m_a) / p_b
    m_log, m_uni = _log_uniform_mean(a_hi, c_lo), (a_hi + c_lo) / 2
    w = min(1.0, max(0.0, (m_uni - m_b) / (m_uni - m_log)))
    return _Mixture((a_lo, a_hi, c_lo, m), (t.p_short, p_b, p_c, p_d), w)


def sample_lengths(distribution: str, num_samples: int, max_length: int, *,
                   seed: int = 0) -> np.ndarray:
    """int64[num_samples] lengths in [2, max_length] drawn from a named distribution."""
    if num_samples < 1:
        raise SpecError(f"num_samples={num_samples} must be >= 1")
    if max_length < 2:
        raise SpecError(f"max_length={max_length} must be >= 2 (a sample needs a prediction)")
    rng = np.random.default_rng(seed)
    if distribution == "uniform":
        return rng.integers(2, max_length + 1, size=num_samples, dtype=np.int64)
    if distribution not in DISTRIBUTIONS:
        valid = ", ".join([*DISTRIBUTIONS, "uniform"])
        raise SpecError(f"distribution={distribution!r} is not known; valid: {valid}")
    mix = _solve(DISTRIBUTIONS[distribution], max_length)
    a_lo, a_hi, c_lo, m = mix.edges
    which = rng.choice(4, size=num_samples, p=np.asarray(mix.probs) / sum(mix.probs))
    u = rng.random(num_samples)
    log_uni = lambda lo, hi: np.exp(np.log(lo) + u * (np.log(hi) - np.log(lo)))  # noqa: E731
    b_uniform = rng.random(num_samples) >= mix.b_log_weight
    out = np.select(
        [which == 0, (which == 1) & ~b_uniform, which == 1, which == 2],
        [log_uni(a_lo, a_hi), log_uni(a_hi, c_lo), a_hi + u * (c_lo - a_hi), log_uni(c_lo, m)],
        default=m,
    )
    return np.clip(np.rint(out), 2, max_length).astype(np.int64)


def copy_task_tokens(length: int, vocab_size: int, rng: np.random.Generator, *,
                     period: int | None = None) -> np.ndarray:
    """A copy-task sample of `length` tokens with ids in 1..vocab-1.

    Default: a random prefix (the first half, rounded up) followed by its copy, so the
    second half can only be predicted by attending back half the sequence. With `period`,
    a random block of `period` tokens repeated to the length (token t = token t - period):
    the same task at a fixed distance, which a small model learns much sooner.
    """
    if vocab_size < 2:
        raise SpecError(f"vocab_size={vocab_size} must be >= 2")
    if period is not None and period < 1:
        raise SpecError(f"period={period} must be >= 1 (or None for half the length)")
    block = length - length // 2 if period is None else min(period, length)
    prefix = rng.integers(1, vocab_size, size=block, dtype=np.uint32)
    return np.resize(prefix, length)


def synthesize(out: str | Path, *, distribution: str, num_samples: int, max_length: int,
               vocab_size: int = 256, seed: int = 0, period: int | None = None,
               min_length: int = 2) -> np.ndarray:
    """Write a copy-task corpus to `out` (a directory, holding data.bin/data.idx).

    `min_length` raises shorter samples to it (the demo wants every sample to need a
    copy); `period` is copy_task_tokens'.
    """
    if not 2 <= min_length <= max_length:
        raise SpecError(f"min_length={min_length} must be in [2, max_length={max_length}]")
    lengths = np.maximum(sample_lengths(distribution, num_samples, max_length, seed=seed),
                         min_length)
    rng = np.random.default_rng(seed + 1)
    with DatasetWriter(Path(out) / "data") as w:
        for n in lengths:
            w.add(copy_task_tokens(int(n), vocab_size, rng, period=period))
    return lengths


def length_stats(lengths: np.ndarray, *, max_length: int) -> dict[str, float]:
    """The statistics the targets are stated in (shares at 4K/128K/max, scaled)."""
    s = max_length / REFERENCE_MAX
    lengths = np.asarray(lengths, dtype=np.int64)
    total = lengths.sum()
    long = lengths >= 131072 * s
    return {
        "num_samples": float(lengths.size),
        "num_tokens": float(total),
        "p_short": float(np.mean(lengths <= 4096 * s)),
        "p_long": float(np.mean(long)),
        "share_long": float(lengths[long].sum() / total),
        "share_max": float(lengths[lengths >= max_length].sum() / total),
    }
