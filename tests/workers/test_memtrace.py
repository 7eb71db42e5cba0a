"""Allocation traces: the tracker on a hand-counted function, a decoder layer's trace on CPU
and on meta, scaling with tokens, an independent saved-tensor census, the stored profiles.
"""

from __future__ import annotations

import pytest
import torch

from scheduler.memory import max_live_bytes, plan_offsets
from scheduler.memory_model import find_profile, profile_to_json
from scheduler.specs import model_preset
from tests.scheduler.test_memory import check_plan
from workers.layers import DecoderLayer
from workers.memtrace import (
    StorageLifetimeTracker,
    fit_region,
    record_profile,
    trace_layer,
    trace_layer_cuda,
)


def make_layer(device: str, *, dtype=torch.float32, seed: int = 0) -> DecoderLayer:
    spec = model_preset("tiny")
    torch.manual_seed(seed)
    with torch.device(device):
        layer = DecoderLayer(hidden_size=spec.hidden_size, num_heads=spec.num_heads,
                             num_kv_heads=spec.num_kv_heads, ffn_hidden_size=spec.ffn_hidden_size,
                             rope_theta=spec.rope_theta, norm_eps=spec.norm_eps, dtype=dtype)
    if device != "meta":
        layer.reset_parameters(std=0.02, out_std=0.02)
    return layer


def test_tracker_on_a_hand_counted_function():
    x = torch.randn(5, 3, dtype=torch.float64)          # made before the trace: not a request
    tracker = StorageLifetimeTracker()
    with tracker:
        a = x * 2                # op 0: new, 120 B
        v = a.view(15)           # op 1: a view, no request
        b = v + 1                # op 2: new, 120 B
        del a, v                 # a's storage dies after op 2
        c = b.sum()              # op 3: new, 8 B
        b.add_(c)                # op 4: in place, no request
        tracker.finish()
    rows = [(r["nbytes"], r["first"], r["last"]) for r in tracker.records]
    assert rows == [(120, 0, 2), (120, 2, None), (8, 3, None)]
    assert tracker.op == 5


@pytest.mark.parametrize("tokens", [1, 7, 37])
def test_layer_trace_on_meta_equals_the_real_cpu_trace(tokens):
    cpu, meta = trace_layer(make_layer("cpu"), tokens), trace_layer(make_layer("meta"), tokens)
    assert cpu.tensors == meta.tensors
    assert (cpu.num_ops, cpu.backward_op, cpu.fixed_bytes) == (
        meta.num_ops, meta.backward_op, meta.fixed_bytes)


def test_trace_scales_with_tokens_so_one_profile_serves_all_lengths():
    layer = make_layer("meta", dtype=torch.bfloat16)
    profile = fit_region([trace_layer(layer, n) for n in (7, 64, 127)])
    # A length the fit never saw is predicted exactly, request by request.
    assert profile.trace(1000) == (trace_layer(layer, 1000).sizes,
                                   trace_layer(layer, 1000).lifetimes)
    spec = model_preset("tiny")
    per_token = sum(t.bytes_per_token for t in profile.tensors)
    assert per_token > 10 * spec.hidden_size * 2      # many [T, H] bf16 activations


def test_saved_requests_match_an_independent_census_of_saved_tensors():
    """What autograd packs for backward (seen through saved_tensors_hooks), minus tensors
    that existed before the forward (weights, the input), is the traced 'saved' set."""
    layer, tokens = make_layer("cpu"), 19
    packed: dict[int, int] = {}
    before = {p.untyped_storage().data_ptr() for p in layer.parameters()}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in before:
            packed[s.data_ptr()] = s.nbytes()
        return t

    trace = trace_layer(layer, tokens)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        trace_layer(layer, tokens)
    saved = [t.nbytes for t in trace.tensors if t.kind == "saved"]
    # The input x is packed too (made outside the trace): drop it by its size once.
    census = sorted(packed.values())
    census.remove(tokens * 64 * 4)
    assert sorted(saved) == census


def test_real_layer_trace_plans_validly_and_tightly():
    trace = trace_layer(make_layer("cpu"), 37)
    plan = plan_offsets(trace.sizes, trace.lifetimes, time_limit_s=2.0)
    check_plan(plan, trace.sizes, trace.lifetimes)
    assert plan.peak_bytes <= 1.02 * plan.max_live_bytes


def test_stored_tiny_profile_matches_a_fresh_recording():
    """Guards against a stale scheduler/memory_profiles.json (fix: re-run
    `python -m workers.memtrace --model tiny --model llama-7b ...`). The layer and the
    embedding must match request by request; the head runs through kernels whose op
    sequence may change without changing memory, so it must match in max-live bytes."""
    fresh = record_profile(model_preset("tiny"))
    stored = find_profile(model_preset("tiny"))
    fresh_json, stored_json = profile_to_json(fresh), profile_to_json(stored)
    for key in ("layer", "embedding", "recorded_tokens", "model"):
        assert fresh_json[key] == stored_json[key], f"stored profile is stale in {key}"
    for tokens in (100, 4096, 10_000):
        assert max_live_bytes(*fresh.head.trace(tokens)) == \
            max_live_bytes(*stored.head.trace(tokens)), "stored head profile is stale"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (allocator history)")
def test_cuda_allocator_trace_plans_validly():
    layer = make_layer("cuda", dtype=torch.bfloat16)
    trace = trace_layer_cuda(layer, 4096)
    assert trace.tensors and trace.backward_op < trace.num_ops
    plan = plan_offsets(trace.sizes, trace.lifetimes, time_limit_s=5.0)
    check_plan(plan, trace.sizes, trace.lifetimes)
