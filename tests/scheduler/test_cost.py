"""CostModel: FLOP coefficients against an explicit per-matrix count, memory capacity,
ring-communication hiding, and the least-squares refit the controller feeds."""

from __future__ import annotations

import math

import numpy as np
import pytest

from scheduler.cost import (
    CostModel,
    Observation,
    default_activation_bytes_per_token,
    nonneg_lstsq,
)
from scheduler.specs import cluster_preset, model_preset

GIB = 1024**3


def explicit_matmul_flops_per_token(m) -> int:
    """2 x (rows x cols) for every weight matrix a token goes through, listed by hand."""
    h, kv, f = m.hidden_size, m.num_kv_heads * m.head_dim, m.ffn_hidden_size
    per_layer = [(h, h), (h, kv), (h, kv), (h, h), (h, f), (h, f), (f, h)]  # q k v o gate up down
    mats = per_layer * m.num_layers + [(h, m.vocab_size)]  # LM head
    return sum(2 * r * c for r, c in mats)


def causal_attention_flops(m, s: int) -> int:
    """Forward FLOPs of causal attention, query i attending to i+1 keys: QK^T and PV."""
    keys = s * (s + 1) // 2
    return m.num_layers * 2 * 2 * keys * m.hidden_size


@pytest.mark.parametrize("name", ["tiny", "llama-7b", "llama-70b"])
def test_coefficients_match_explicit_flop_count(name):
    m, c = model_preset(name), cluster_preset("h100")
    cost = CostModel(m, c)
    flops = c.achieved_tflops * 1e12
    # fwd + bwd = 3 x fwd for matmuls; exact.
    assert cost.b == pytest.approx(3 * explicit_matmul_flops_per_token(m) / flops, rel=1e-12)
    # The model uses the continuous s^2/2 for the causal triangle: error 1/s.
    s = 100_003
    assert cost.a * s * s == pytest.approx(3 * causal_attention_flops(m, s) / flops, rel=2 / s)


def test_capacity_from_gpu_memory_and_zero3_states():
    m, c = model_preset("llama-7b"), cluster_preset("h100", num_ranks=64)
    act = 34 * 4096 * 32  # Korthikanti Eq. 2 in bf16, all layers
    assert default_activation_bytes_per_token(m) == act
    cost = CostModel(m, c, activation_bytes_per_token=act)
    expected = math.floor((80 * GIB * 0.9 - 16 * m.num_params / 64) / act)
    assert cost.capacity_tokens(64) == expected
    # Fewer ranks: each holds more model state, so fewer tokens fit.
    assert cost.capacity_tokens(8) < expected


def test_activation_bytes_are_injectable():
    m, c = model_preset("llama-7b"), cluster_preset("h100")
    base = CostModel(m, c)
    half = CostModel(m, c, activation_bytes_per_token=base.activation_bytes_per_token / 2)
    assert half.capacity_tokens(1024) in (2 * base.capacity_tokens(1024),
                                          2 * base.capacity_tokens(1024) + 1)
    with pytest.raises(ValueError, match="activation_bytes_per_token=-1"):
        CostModel(m, c, activation_bytes_per_token=-1)


def test_capacity_error_names_memory_when_states_do_not_fit():
    m = model_preset("llama-70b")
    with pytest.raises(ValueError, match="gpu_memory_gib"):
        CostModel(m, cluster_preset("h100")).capacity_tokens(1)


def test_ring_communication_hides_up_to_max_hidden_ring():
    cost = CostModel(model_preset("llama-7b"), cluster_preset("h100"))
    s, bw = 1_000_003, 50.0
    d_max = cost.max_hidden_ring(s, bandwidth_gbps=bw)
    assert d_max > 2
    for d in (2, d_max):
        c = cost.seq_cost(s, d, bandwidth_gbps=bw)
        assert c.exposed_comm_s == 0.0
        assert c.compute_s == pytest.approx((cost.a * s * s + cost.b * s) / d, rel=1e-12)
    d = d_max + 7
    exposed = cost.seq_cost(s, d, bandwidth_gbps=bw).exposed_comm_s
    step_comm = cost.ring_bytes_per_token * (s / d) / (bw * 1e9)
    step_attn = cost.a * s * s / d**2
    assert exposed == pytest.approx((d - 1) * (step_comm - step_attn), rel=1e-12)


def test_offload_is_free_when_hidden_and_charged_when_not():
    m, c = model_preset("llama-7b"), cluster_preset("h100")
    cost = CostModel(m, c)
    s = 50_021
    r_hide = cost.hidden_offload_ratio(s)
    assert cost.seq_cost(s, 1, bandwidth_gbps=1, offload_ratio=r_hide * 0.999) \
        .exposed_offload_s == 0.0
    slow = CostModel(m, c.model_copy(update={"pcie_bandwidth_gbps": 0.5}))
    r = 0.9
    assert slow.hidden_offload_ratio(s) < r
    compute = slow.compute_s(s)
    copy_s = r * s * slow.activation_bytes_per_token / 0.5e9
    expected = max(0, copy_s - compute / 3) + max(0, copy_s - 2 * compute / 3)
    got = slow.seq_cost(s, 1, bandwidth_gbps=1, offload_ratio=r).exposed_offload_s
    assert got == pytest.approx(expected, rel=1e-12) and got > 0


def test_vectorised_single_rank_times_match_scalar(rng):
    cost = CostModel(model_preset("llama-7b"), cluster_preset("cpu"))
    lengths = rng.integers(1, 200_000, 50)
    ratios = rng.random(50)
    many = cost.single_rank_times(lengths, ratios)
    one = [cost.seq_time(int(s), 1, bandwidth_gbps=1.0, offload_ratio=float(r))
           for s, r in zip(lengths, ratios, strict=True)]
    np.testing.assert_allclose(many, one, rtol=1e-12)


def test_update_recovers_known_coefficients(rng):
    cost = CostModel(model_preset("tiny"), cluster_preset("cpu"))
    a, b, c = 3.1e-9, 2.7e-6, 4.0e-3
    obs = []
    for _ in range(12):
        lengths = tuple(int(x) for x in rng.integers(1, 5000, rng.integers(1, 5)))
        d = int(rng.integers(1, 5))
        t = (a * sum(s * s for s in lengths) + b * sum(lengths)) / d + c
        obs.append((lengths, t) if d == 1 and rng.random() < 0.5 else (lengths, d, t))
    assert cost.update(obs) is cost
    assert (cost.a, cost.b, cost.c) == pytest.approx((a, b, c), rel=1e-8)


def test_update_with_noise_stays_non_negative(rng):
    cost = CostModel(model_preset("tiny"), cluster_preset("cpu"))
    obs = []
    for _ in range(40):
        s = int(rng.integers(100, 4000))
        t = 2e-6 * s * (1 + 0.05 * rng.standard_normal())  # no quadratic, no fixed part
        obs.append(Observation(lengths=(s,), seconds=max(t, 0.0)))
    cost.update(obs)
    assert cost.a >= 0 and cost.b == pytest.approx(2e-6, rel=0.05) and cost.c >= 0


def test_update_rejects_too_few_or_collinear_observations():
    cost = CostModel(model_preset("tiny"), cluster_preset("cpu"))
    with pytest.raises(ValueError, match="need >= 3"):
        cost.update([((10,), 1.0), ((20,), 2.0)])
    with pytest.raises(ValueError, match="distinct token profiles"):
        cost.update([((10,), 1.0)] * 5)
    with pytest.raises(ValueError, match="ring_size=0"):
        cost.update([{"lengths": [5], "ring_size": 0, "seconds": 1.0}] * 3)
    with pytest.raises(ValueError, match="seconds=nan"):
        Observation(lengths=(3,), seconds=float("nan"))


def test_nonneg_lstsq_against_exhaustive_grid(rng):
    # Independent check: a fine grid search over the non-negative orthant of 2 columns.
    X = rng.random((20, 2))
    y = X @ np.array([1.5, -0.7]) + 0.01 * rng.standard_normal(20)
    got = nonneg_lstsq(X, y)
    grid = np.linspace(0, 3, 601)
    errs = [(np.sum((X @ np.array([u, v]) - y) ** 2), u, v) for u in grid for v in grid[:50]]
    _, u, v = min(errs)
    assert got[1] == 0.0
    assert got[0] == pytest.approx(u, abs=0.005)
