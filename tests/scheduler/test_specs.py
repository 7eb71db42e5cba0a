"""Specs: presets are consistent, HF configs load, bad fields are named."""

from __future__ import annotations

import json

import pytest

from scheduler.errors import SpecError
from scheduler.specs import (
    CLUSTER_PRESETS,
    MODEL_PRESETS,
    ClusterSpec,
    ModelSpec,
    cluster_preset,
    model_preset,
    parse_spec,
)


def naive_param_count(s: ModelSpec) -> int:
    """Counted matrix by matrix, independently of ModelSpec.num_params."""
    d, kv = s.hidden_size, s.num_kv_heads * (s.hidden_size // s.num_heads)
    matrices = [(d, d), (kv, d), (kv, d), (d, d), (s.ffn_hidden_size, d), (s.ffn_hidden_size, d),
                (d, s.ffn_hidden_size)]
    per_layer = sum(a * b for a, b in matrices) + 2 * d
    return s.num_layers * per_layer + s.vocab_size * d * 2 + d


@pytest.mark.parametrize("name", sorted(MODEL_PRESETS))
def test_model_presets_param_count(name):
    spec = model_preset(name)
    assert spec.num_params == naive_param_count(spec)


def test_llama_7b_is_about_7b():
    assert 6.5e9 < model_preset("llama-7b").num_params < 7.0e9


def test_hf_config_roundtrip(tmp_path):
    cfg = {"vocab_size": 32000, "hidden_size": 4096, "num_hidden_layers": 32,
           "num_attention_heads": 32, "num_key_value_heads": 8, "intermediate_size": 14336,
           "rope_theta": 500000.0, "rms_norm_eps": 1e-5, "torch_dtype": "bfloat16"}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    spec = model_preset(str(path))
    assert (spec.num_kv_heads, spec.ffn_hidden_size, spec.rope_theta) == (8, 14336, 500000.0)


def test_hf_config_missing_field_named(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"vocab_size": 10}))
    with pytest.raises(SpecError, match="num_hidden_layers"):
        ModelSpec.from_hf_config(path)


@pytest.mark.parametrize("field,value,needle", [
    ("num_kv_heads", 3, "num_kv_heads=3 must divide num_heads=4"),
    ("hidden_size", -1, "hidden_size"),
    ("dtype", "int8", "dtype"),
    ("colour", "red", "colour: unknown field"),
])
def test_bad_model_fields_are_named(field, value, needle):
    data = MODEL_PRESETS["tiny"].model_dump() | {field: value}
    with pytest.raises(SpecError, match=needle):
        parse_spec(ModelSpec, data, what="model spec")


def test_cluster_preset_sizes_whole_nodes():
    c = cluster_preset("h100", num_ranks=1024)
    assert (c.num_nodes, c.gpus_per_node, c.world_size) == (128, 8, 1024)
    assert cluster_preset("h100", num_ranks=4).world_size == 4
    assert cluster_preset("cpu", num_ranks=4).node_of(3) == 0


@pytest.mark.parametrize("kwargs,needle", [
    ({"num_ranks": 12}, "num_ranks=12 is not a multiple of gpus_per_node=8"),
    ({"num_ranks": 0}, "num_ranks=0"),
])
def test_cluster_preset_errors(kwargs, needle):
    with pytest.raises(SpecError, match=needle):
        cluster_preset("h100", **kwargs)


def test_unknown_presets_list_valid_names():
    with pytest.raises(SpecError, match="tiny"):
        model_preset("gpt-5")
    with pytest.raises(SpecError, match="a800"):
        cluster_preset("tpu")


def test_cluster_spec_rejects_bad_bandwidth():
    data = dict(CLUSTER_PRESETS["h100"], num_nodes=1, pcie_bandwidth_gbps=0)
    with pytest.raises(SpecError, match="pcie_bandwidth_gbps"):
        parse_spec(ClusterSpec, data, what="cluster spec")
