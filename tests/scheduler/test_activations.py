"""The per-rank memory model: envelopes against direct trace evaluation, capacities, the
synthetic estimate for untraced models, the plan-memory check and the zigzag arithmetic."""

from __future__ import annotations

import pytest

from scheduler.activations import ActivationModel, live_per_op, synthetic_profile
from scheduler.errors import DeviceMemoryError, PlanMemoryError
from scheduler.memory_model import unrolled_trace
from scheduler.plan import GroupMemory, MicroBatch, RingGroup, SeqSlice, StepPlan
from scheduler.rank_memory import RankMemory, check_plan_memory
from scheduler.specs import cluster_preset, model_preset
from scheduler.work import Scheme
from scheduler.zigzag import chunk_bounds, local_lengths, max_local_tokens

LLAMA = model_preset("llama-7b")
SCHEMES = [Scheme(), Scheme(name="offload", offload_ratio=0.0),
           Scheme(name="offload", offload_ratio=0.7), Scheme(name="streambp", chunk_tokens=512)]


@pytest.mark.parametrize("tokens", [1, 7, 4095, 4096, 4097, 100_003])
def test_plain_envelope_equals_the_unrolled_trace_at_any_length(tokens):
    # The envelope is built from two lengths per regime; the trace is evaluated directly.
    act = ActivationModel(LLAMA)
    sizes, spans = unrolled_trace(act.profile, tokens, num_layers=LLAMA.num_layers)
    direct = int(live_per_op(sizes, spans, max(b for _, b in spans) + 1).max())
    assert act.peak_bytes(tokens) == direct


def test_schemes_order_and_grow_with_tokens():
    act = ActivationModel(LLAMA)
    for t in (16384, 65536):  # long enough that the head's fixed 1.3 GB does not dominate
        plain = act.peak_bytes(t)
        assert act.peak_bytes(t, SCHEMES[3]) < plain / 4  # StreamBP keeps layer inputs only
        assert act.peak_bytes(t, SCHEMES[1]) < plain / 8  # MEMO: ~one layer on the device
        assert act.peak_bytes(t, SCHEMES[1]) <= act.peak_bytes(t, SCHEMES[2])
    for scheme in SCHEMES:
        assert act.peak_bytes(1000, scheme) < act.peak_bytes(2000, scheme)
    assert act.host_bytes(1000, SCHEMES[2]) > act.host_bytes(1000, SCHEMES[1]) > 0
    assert act.host_bytes(1000, SCHEMES[0]) == 0
    with pytest.raises(ValueError, match="streambp does not run on a ring"):
        act.peak(100, SCHEMES[3], ring_size=2)
    # Ring attention's accumulators and blocks in flight, in a phase where they peak.
    assert act.peak_bytes(65536, SCHEMES[1], ring_size=2) > act.peak_bytes(65536, SCHEMES[1])
    assert act.peak_bytes(1000, ring_size=2) >= act.peak_bytes(1000)


@pytest.mark.parametrize("name", ["tiny", "llama-7b", "llama-70b"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_synthetic_estimate_is_conservative_and_within_half(name, dtype):
    spec = model_preset(name).model_copy(update={"dtype": dtype})
    traced, estimate = ActivationModel(spec), ActivationModel(spec, profile=synthetic_profile(spec))
    for tokens in (1000, 4096, 65536):
        for scheme in SCHEMES:
            ratio = estimate.peak_bytes(tokens, scheme) / traced.peak_bytes(tokens, scheme)
            assert 0.98 <= ratio <= 1.5, (tokens, scheme, ratio)


def test_capacity_is_exact_at_its_edge_for_every_scheme():
    mem = RankMemory(LLAMA, cluster_preset("h100", num_ranks=64))
    for scheme in SCHEMES:
        cap = mem.capacity_tokens(scheme)
        assert mem.activations.peak_bytes(cap, scheme) <= mem.room_bytes
        assert mem.activations.peak_bytes(cap + 1, scheme) > mem.room_bytes
    assert mem.capacity_tokens(SCHEMES[1]) > 5 * mem.capacity_tokens()


def _plan(tokens: int, scheme: str = "plain", ranks=(0,)) -> StepPlan:
    mem = GroupMemory(scheme=scheme, offload_ratio=0.5 if scheme == "offload" else 0.0)
    return StepPlan(version=2, world_size=8, capacity_tokens=10**9, micro_batches=[MicroBatch(
        groups=[RingGroup(ranks=list(ranks), sequences=[SeqSlice(id=0, length=tokens)],
                          memory=mem)])])


def test_plan_over_the_device_budget_is_rejected_naming_bytes():
    mem = RankMemory(LLAMA, cluster_preset("h100", num_ranks=8))
    cap = mem.capacity_tokens()
    check_plan_memory(_plan(cap), mem)  # fits
    with pytest.raises(PlanMemoryError) as exc:
        check_plan_memory(_plan(cap + 1), mem)
    text = str(exc.value)
    assert "micro_batches[0].groups[0]" in text and f"holds {cap + 1} tokens" in text
    assert str(mem.budget_bytes) in text and "no rank was started" in text
    check_plan_memory(_plan(cap + 1, "offload"), mem)  # MEMO holds it
    check_plan_memory(_plan(2 * cap, ranks=(0, 1)), mem)  # so does a ring of two


def test_states_that_do_not_fit_are_refused_before_any_plan():
    mem = RankMemory(model_preset("llama-70b"), cluster_preset("h100", num_ranks=8))
    with pytest.raises(DeviceMemoryError, match="tensor parallelism is not supported"):
        check_plan_memory(_plan(10), mem)


@pytest.mark.parametrize("length", [0, 1, 7, 127, 1000, 1001])
@pytest.mark.parametrize("d", [1, 2, 3, 5])
def test_zigzag_arithmetic_covers_every_token_once(length, d):
    b = chunk_bounds(length, d)
    assert b[0] == 0 and b[-1] == length and all(y - x in (length // (2 * d),
                                                          length // (2 * d) + 1)
                                                 for x, y in zip(b, b[1:], strict=False))
    held = [local_lengths([length], d, j)[0] for j in range(d)]
    assert sum(held) == length and max(held) == max_local_tokens([length], d)
    assert max(held) - min(held) <= 1
