"""Level-2 (whole-model) memory plan over a hand-built profile, profile files, per-token use.

The hand-built profile has per-token sizes chosen so the model's max-live point is known
in closed form (the head op: every layer's saved + output tensors, the embedding output,
the head's workspace and its gradient), see `hand_profile`.
"""

from __future__ import annotations

import pytest

from scheduler.errors import SpecError
from scheduler.memory import MemoryPlan
from scheduler.memory_model import (
    ModelMemoryProfile,
    RegionProfile,
    TensorProfile,
    find_profile,
    fit_affine,
    placed_trace,
    plan_layer,
    plan_model,
    planned_bytes_per_token,
    profile_from_json,
    profile_to_json,
    stored_profiles,
    unrolled_max_live,
)
from scheduler.specs import ModelSpec, model_preset
from tests.scheduler.test_memory import check_plan, naive_max_live


def tensor(a: int, first: int, last: int, kind: str, b: int = 0) -> TensorProfile:
    return TensorProfile(bytes_per_token=a, bytes_fixed=b, first_op=first, last_op=last, kind=kind)


def hand_profile(num_layers: int) -> ModelMemoryProfile:
    """Per token: a layer keeps 4 (saved) + 1 (output); its forward needs 3 more, its
    backward 5 more and hands 1 down; the embedding output is 1; the head needs 10 and hands
    1 down. At the head op, live = 5 N + 1 + 10 + 1 = 5 N + 12 per token, the maximum."""
    layer = RegionProfile(tensors=(
        tensor(4, 0, 3, "saved"), tensor(3, 0, 1, "transient"), tensor(1, 1, 3, "output"),
        tensor(5, 2, 3, "transient"), tensor(1, 3, 3, "grad_input")),
        num_ops=4, backward_op=2, fixed_bytes=100)
    embedding = RegionProfile(tensors=(tensor(1, 0, 1, "output"), tensor(1, 1, 1, "transient")),
                              num_ops=2, backward_op=1, fixed_bytes=10)
    head = RegionProfile(tensors=(tensor(10, 0, 1, "transient", b=64),
                                  tensor(1, 1, 1, "grad_input")),
                         num_ops=2, backward_op=2, fixed_bytes=10, chunk_tokens=16)
    spec = model_preset("tiny").model_copy(update={"num_layers": num_layers})
    return ModelMemoryProfile(model=spec, layer=layer, embedding=embedding, head=head,
                              recorded_tokens=(8, 16), source="hand-built")


@pytest.mark.parametrize("num_layers", [1, 2, 5])
@pytest.mark.parametrize("tokens", [7, 16])
def test_model_plan_meets_the_closed_form_peak(num_layers, tokens):
    profile = hand_profile(num_layers)
    expected = (5 * num_layers + 12) * tokens + 64
    assert unrolled_max_live(profile, tokens) == expected
    plan = plan_model(profile, tokens, time_limit_s=1.0)
    check_plan(plan.model_plan, list(plan.model_plan.sizes), list(plan.model_plan.lifetimes))
    assert plan.peak_bytes == expected
    assert plan.ratio_to_lower_bound == 1.0


def test_head_chunking_caps_its_workspace_but_not_its_gradient():
    profile = hand_profile(1)
    head = profile.head
    sizes, _ = head.trace(1000)
    assert sizes == [10 * 16 + 64, 1000]   # workspace at one 16-token chunk, gradient whole


def test_layer_plan_is_valid_and_hits_max_live():
    layer = hand_profile(1).layer
    plan = plan_layer(layer, 33, time_limit_s=1.0)
    sizes, lifetimes = layer.trace(33)
    check_plan(plan, sizes, lifetimes)
    assert plan.peak_bytes == naive_max_live(sizes, lifetimes) == (4 + 1 + 5 + 1) * 33


def test_profile_json_round_trip_and_version_check():
    profile = hand_profile(3)
    assert profile_from_json(profile_to_json(profile)) == profile
    data = profile_to_json(profile) | {"version": 99}
    with pytest.raises(SpecError, match="version=99"):
        profile_from_json(data)


def test_fit_affine_is_exact_or_refuses():
    assert fit_affine([64, 128, 192], [64 * 12 + 40, 128 * 12 + 40, 192 * 12 + 40]) == (12, 40)
    with pytest.raises(ValueError, match="not affine"):
        fit_affine([64, 128, 192], [100, 200, 301])
    with pytest.raises(ValueError, match="distinct"):
        fit_affine([64, 64], [1, 1])


def test_unknown_model_names_the_recording_command():
    spec = ModelSpec(vocab_size=11, hidden_size=24, num_layers=1, num_heads=2, num_kv_heads=1,
                     ffn_hidden_size=40)
    with pytest.raises(SpecError, match="python -m workers.memtrace"):
        find_profile(spec)


def test_bad_arguments_name_the_field():
    with pytest.raises(ValueError, match="num_tokens=0"):
        plan_model(hand_profile(1), 0)
    with pytest.raises(ValueError, match="num_layers=0"):
        plan_model(hand_profile(1), 8, num_layers=0)


@pytest.mark.parametrize("name", ["tiny", "llama-7b"])
def test_stored_profiles_plan_every_length_within_two_percent(name):
    profile = find_profile(model_preset(name))
    assert name in stored_profiles()
    for tokens in (4096, 1 << 20):
        layer = plan_layer(profile.layer, tokens, time_limit_s=2.0)
        assert layer.peak_bytes <= 1.02 * layer.max_live_bytes
    per_token = planned_bytes_per_token(model_preset(name), num_tokens=1 << 16)
    assert per_token == plan_model(profile, 1 << 16, time_limit_s=2.0).bytes_per_token


def test_activation_model_uses_the_profile_of_the_compute_dtype():
    from scheduler.activations import ActivationModel

    spec = model_preset("llama-7b")
    for dtype in ("bfloat16", "float32"):
        act = ActivationModel(spec, dtype=dtype)
        assert act.source == "profile" and act.profile.model.dtype == dtype
        # Plain peak = the unrolled model trace's max-live, the MEMO plan's lower bound.
        assert act.peak_bytes(65536) == unrolled_max_live(act.profile, 65536)
    assert ActivationModel(spec, dtype="float32").peak_bytes(4096) > \
        ActivationModel(spec).peak_bytes(4096)
    # The layer count is free: a 3-layer llama-7b plans from the same layer profile.
    shallow = spec.model_copy(update={"num_layers": 3})
    assert ActivationModel(shallow).peak_bytes(65536) < ActivationModel(spec).peak_bytes(65536) / 5
    unknown = spec.model_copy(update={"hidden_size": 4160, "num_heads": 32, "num_kv_heads": 32})
    assert ActivationModel(unknown).source == "synthetic"


@pytest.mark.parametrize(("name", "tokens"), [("tiny", 4099), ("llama-7b", 65536)])
def test_bi_level_plan_composes_into_a_valid_whole_model_placement(name, tokens):
    """Expand both levels to absolute addresses of every tensor of the unrolled model and
    run the independent checker: no two live tensors of the whole model overlap."""
    profile = find_profile(model_preset(name))
    plan = plan_model(profile, tokens, num_layers=3, time_limit_s=2.0)
    sizes, lifetimes, offsets = placed_trace(profile, plan)
    placed = MemoryPlan(offsets=tuple(offsets), sizes=tuple(sizes), lifetimes=tuple(lifetimes),
                        peak_bytes=max(o + s for o, s in zip(offsets, sizes, strict=True)),
                        lower_bound_bytes=0, max_live_bytes=0, status="expanded", gap=0.0,
                        heuristic_peak_bytes=0, solve_time_s=0.0)
    check_plan(placed, sizes, lifetimes)
    assert placed.peak_bytes <= plan.peak_bytes
    assert plan.peak_bytes <= 1.005 * plan.unrolled_max_live_bytes


def test_hand_profile_composes_too():
    profile = hand_profile(4)
    plan = plan_model(profile, 9, time_limit_s=1.0)
    sizes, lifetimes, offsets = placed_trace(profile, plan)
    placed = MemoryPlan(offsets=tuple(offsets), sizes=tuple(sizes), lifetimes=tuple(lifetimes),
                        peak_bytes=max(o + s for o, s in zip(offsets, sizes, strict=True)),
                        lower_bound_bytes=0, max_live_bytes=0, status="expanded", gap=0.0,
                        heuristic_peak_bytes=0, solve_time_s=0.0)
    check_plan(placed, sizes, lifetimes)


def test_profiles_are_found_by_shape_not_by_rope_base():
    """A context-extension job (another rope_theta, a longer context) plans with its
    preset's recorded profile; another architecture option (biases) has none."""
    from scheduler.memory_model import find_profile
    from scheduler.specs import MODEL_PRESETS

    extended = MODEL_PRESETS["llama-7b"].with_overrides(rope_theta=5e6,
                                                        max_position_embeddings=262144)
    assert find_profile(extended) is not None
    with pytest.raises(SpecError, match="no memory profile"):
        find_profile(extended.with_overrides(attention_bias=True, attention_out_bias=True))
