"""The model-state byte table agrees with the tensors the runtime builds."""

from __future__ import annotations

import pytest

from scheduler.errors import SpecError
from scheduler.model_states import (
    compute_dtype,
    model_state_bytes,
    shard_numel,
    step_collectives,
    zero1_owned_numel,
)
from scheduler.specs import MODEL_PRESETS, ModelSpec

SPECS = [MODEL_PRESETS["tiny"],
         ModelSpec(vocab_size=97, hidden_size=48, num_layers=3, num_heads=6, num_kv_heads=2,
                   ffn_hidden_size=80, dtype="float32")]
_ODD = dict(vocab_size=97, hidden_size=48, num_layers=3, num_heads=6, num_kv_heads=2,
            ffn_hidden_size=80, dtype="float32")
# Every option the Hugging Face families add changes the tensor list.
FAMILY_SPECS = {
    "llama-bias": ModelSpec(**_ODD, attention_bias=True, attention_out_bias=True,
                            rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                          "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                          "original_max_position_embeddings": 64}),
    "mistral": ModelSpec(**_ODD, model_type="mistral", sliding_window=4096),
    "qwen2-tied": ModelSpec(**_ODD, model_type="qwen2", attention_bias=True,
                            tie_word_embeddings=True),
    "qwen3": ModelSpec(**_ODD, model_type="qwen3", qk_norm=True, head_dim=12,
                       rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                     "original_max_position_embeddings": 64}),
}
ALL_SPECS = [*SPECS, *FAMILY_SPECS.values()]
ALL_IDS = ["tiny", "odd", *FAMILY_SPECS]


@pytest.mark.parametrize("spec", ALL_SPECS, ids=ALL_IDS)
def test_parameter_numels_are_the_transformers_tensors(spec):
    from workers.model import Transformer

    model = Transformer(spec)
    assert [p.numel() for p in model.parameters()] == spec.parameter_numels()
    assert sum(p.numel() for p in model.parameters()) == spec.num_params


def test_tied_head_counts_once():
    tied, untied = FAMILY_SPECS["qwen2-tied"], FAMILY_SPECS["qwen2-tied"].model_copy(
        update={"tie_word_embeddings": False})
    assert untied.num_params - tied.num_params == tied.vocab_size * tied.hidden_size
    bytes_tied = model_state_bytes(tied, precision="fp32", sharding="none", world_size=1)
    assert bytes_tied.total == 16 * tied.num_params


@pytest.mark.parametrize("spec", [SPECS[1], FAMILY_SPECS["qwen2-tied"], FAMILY_SPECS["qwen3"]],
                         ids=["odd", "qwen2-tied", "qwen3"])
@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_zero1_loads_match_the_runtime_partition(world, spec):
    from workers.model import Transformer
    from workers.train import partition_parameters

    params = list(Transformer(spec).parameters())
    owners = partition_parameters(params, world)
    expected = [sum(p.numel() for p, o in zip(params, owners, strict=True) if o == r)
                for r in range(world)]
    assert zero1_owned_numel(spec.parameter_numels(), world) == expected


def test_bytes_by_precision_and_sharding():
    spec = SPECS[1]
    p = spec.num_params
    # Hand-computed from the table in the module docstring.
    mixed = model_state_bytes(spec, precision="bf16-mixed", sharding="none", world_size=4)
    assert (mixed.params, mixed.grads, mixed.masters, mixed.moments) == (2 * p, 4 * p, 4 * p,
                                                                         8 * p)
    dist = model_state_bytes(spec, precision="bf16-mixed", sharding="distributed", world_size=7)
    n = -(-p // 7)
    assert p % 7 and p % 11  # the padding is really exercised
    # Parameter and gradient buffers padded to 7 equal shards; masters + moments of one.
    assert dist.total == (2 + 4) * 7 * n + 12 * n
    fp32 = model_state_bytes(spec, precision="fp32", sharding="distributed", world_size=11)
    s11 = shard_numel(p, 11)
    assert fp32.masters == 0 and fp32.total == 8 * 11 * s11 + 8 * s11
    one = model_state_bytes(spec, precision="fp32", sharding="distributed", world_size=1)
    assert one.total == 16 * p  # one rank: no shards, no padding
    fp64 = model_state_bytes(spec, precision="fp64", sharding="none", world_size=1)
    assert fp64.total == 32 * p
    z = [model_state_bytes(spec, precision="fp32", sharding="zero1", world_size=3, rank=r)
         for r in range(3)]
    assert sum(s.moments for s in z) == 8 * p
    assert model_state_bytes(spec, precision="fp32", sharding="zero1",
                             world_size=3).total == max(s.total for s in z)
    assert compute_dtype("bf16-mixed") == "bfloat16"


@pytest.mark.parametrize("kwargs, field", [
    (dict(precision="bf16", sharding="none", world_size=2), "precision='bf16'"),
    (dict(precision="fp32", sharding="zero3", world_size=2), "optimizer_sharding='zero3'"),
    (dict(precision="fp32", sharding="none", world_size=0), "world_size=0"),
])
def test_bad_settings_name_the_field(kwargs, field):
    with pytest.raises(SpecError, match=field.replace("(", r"\(")):
        model_state_bytes(SPECS[0], **kwargs)


def test_step_collectives_by_sharding():
    spec = SPECS[1]
    p = spec.num_params
    assert step_collectives(spec, precision="bf16-mixed", sharding="distributed",
                            world_size=1) == ()
    d = step_collectives(spec, precision="bf16-mixed", sharding="distributed", world_size=7)
    padded = 7 * -(-p // 7)
    assert [(c.op, c.payload_bytes, c.dtype, c.what) for c in d] == [
        ("reduce_scatter", 4 * padded, "float32", "gradients"),
        ("all_reduce", 16, "float64", "loss totals"),
        ("all_reduce", 8, "float64", "grad norm"),
        ("all_gather", 2 * padded, "bfloat16", "parameters")]
    n = step_collectives(spec, precision="fp64", sharding="none", world_size=3)
    assert [(c.op, c.payload_bytes) for c in n] == [("all_reduce", 8 * p), ("all_reduce", 16)]
    z = step_collectives(spec, precision="fp32", sharding="zero1", world_size=3)
    assert [(c.op, c.root) for c in z] == [("all_reduce", None), ("all_reduce", None),
                                         ("broadcast", 0), ("broadcast", 1), ("broadcast", 2)]
    assert sum(c.payload_bytes for c in z[2:]) == 4 * p
    with pytest.raises(SpecError, match="optimizer_sharding='zero2'"):
        step_collectives(spec, precision="fp32", sharding="zero2", world_size=2)


def test_shard_mirror_bytes_and_traffic():
    spec = SPECS[1]
    p = spec.num_params
    s7 = shard_numel(p, 7)
    # bf16-mixed: the previous owner's float32 masters and two float32 moments.
    plain = model_state_bytes(spec, precision="bf16-mixed", sharding="distributed",
                              world_size=7)
    mirrored = model_state_bytes(spec, precision="bf16-mixed", sharding="distributed",
                                 world_size=7, shard_mirror=True)
    assert mirrored.mirror == 12 * s7 and mirrored.total == plain.total + 12 * s7
    # fp32/fp64: moments only (the masters are the replicated compute parameters).
    assert model_state_bytes(spec, precision="fp32", sharding="distributed", world_size=7,
                             shard_mirror=True).mirror == 8 * s7
    assert model_state_bytes(spec, precision="fp64", sharding="distributed", world_size=7,
                             shard_mirror=True).mirror == 16 * s7
    # Nothing to mirror on one rank, nor outside the distributed optimizer.
    for sharding, world in (("distributed", 1), ("none", 4), ("zero1", 4)):
        assert model_state_bytes(spec, precision="fp32", sharding=sharding, world_size=world,
                                 shard_mirror=True).mirror == 0
    d = step_collectives(spec, precision="bf16-mixed", sharding="distributed", world_size=7,
                         shard_mirror=True)
    # The shift comes before the grad norm: the last collective before the update.
    assert [(c.op, c.payload_bytes, c.dtype, c.what) for c in d][2:4] == [
        ("send_recv", 4 * s7, "float32", "mirror gradients"),
        ("all_reduce", 8, "float64", "grad norm")]
    assert step_collectives(spec, precision="fp32", sharding="none", world_size=3,
                            shard_mirror=True) == step_collectives(
        spec, precision="fp32", sharding="none", world_size=3)
