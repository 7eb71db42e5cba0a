"""scheduler.hf_config (torch-free): real config.json shapes read into ModelSpec, written
back, and every unimplemented field refused by name."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from scheduler.errors import SpecError
from scheduler.specs import ModelSpec

# The config.json fields of published checkpoints (architecture and RoPE parts).
LLAMA31_8B = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 128000, "eos_token_id": 128001, "hidden_act": "silu", "hidden_size": 4096,
    "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 131072,
    "mlp_bias": False, "model_type": "llama", "num_attention_heads": 32,
    "num_hidden_layers": 32, "num_key_value_heads": 8, "pretraining_tp": 1,
    "rms_norm_eps": 1e-05, "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0,
                                            "high_freq_factor": 4.0,
                                            "original_max_position_embeddings": 8192,
                                            "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.43.0.dev0", "use_cache": True, "vocab_size": 128256}
QWEN25_7B = {
    "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 3584,
    "initializer_range": 0.02, "intermediate_size": 18944, "max_position_embeddings": 131072,
    "max_window_layers": 28, "model_type": "qwen2", "num_attention_heads": 28,
    "num_hidden_layers": 28, "num_key_value_heads": 4, "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0, "sliding_window": 131072, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "transformers_version": "4.43.1", "use_cache": True,
    "use_sliding_window": False, "vocab_size": 152064}
QWEN3_06B = {
    "architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 151643, "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu",
    "hidden_size": 1024, "initializer_range": 0.02, "intermediate_size": 3072,
    "max_position_embeddings": 40960, "max_window_layers": 28, "model_type": "qwen3",
    "num_attention_heads": 16, "num_hidden_layers": 28, "num_key_value_heads": 8,
    "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000,
    "sliding_window": None, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
    "transformers_version": "4.51.0", "use_cache": True, "use_sliding_window": False,
    "vocab_size": 151936}
MISTRAL_7B_V01 = {
    "architectures": ["MistralForCausalLM"], "bos_token_id": 1, "eos_token_id": 2,
    "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02,
    "intermediate_size": 14336, "max_position_embeddings": 32768, "model_type": "mistral",
    "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
    "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "sliding_window": 4096,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.34.0",
    "use_cache": True, "vocab_size": 32000}


def test_published_configs_read_as_their_architecture():
    llama = ModelSpec.from_hf_config(LLAMA31_8B)
    assert (llama.model_type, llama.num_kv_heads, llama.head_dim, llama.rope_theta) == (
        "llama", 8, 128, 500000.0)
    assert llama.rope_scaling.rope_type == "llama3" and llama.rope_scaling.factor == 8.0
    assert 8.0e9 < llama.num_params < 8.1e9  # Llama 3.1 8B: 8.03B parameters
    qwen = ModelSpec.from_hf_config(QWEN25_7B)
    assert qwen.attention_bias and not qwen.attention_out_bias and qwen.sliding_window is None
    assert 7.6e9 < qwen.num_params < 7.7e9  # Qwen2.5 7B: 7.62B
    q3 = ModelSpec.from_hf_config(QWEN3_06B)
    assert q3.qk_norm and q3.tie_word_embeddings and q3.head_dim == 128 and q3.q_dim == 2048
    assert 0.59e9 < q3.num_params < 0.61e9  # Qwen3 0.6B: 0.596B (tied)
    mistral = ModelSpec.from_hf_config(MISTRAL_7B_V01)
    assert mistral.sliding_window == 4096 and 7.2e9 < mistral.num_params < 7.3e9


@pytest.mark.parametrize("cfg", [LLAMA31_8B, QWEN25_7B, QWEN3_06B, MISTRAL_7B_V01],
                         ids=["llama3.1", "qwen2.5", "qwen3", "mistral"])
def test_written_config_reads_back_as_the_same_spec(cfg):
    spec = ModelSpec.from_hf_config(cfg)
    written = spec.to_hf_config(base=cfg)
    assert ModelSpec.from_hf_config(written) == spec
    assert written["bos_token_id"] == cfg["bos_token_id"]  # metadata of the source is kept
    assert written["rope_parameters"]["rope_theta"] == written["rope_theta"] == spec.rope_theta


def test_transformers5_spelling_reads_the_same():
    v5 = {k: v for k, v in LLAMA31_8B.items() if k not in ("rope_scaling", "rope_theta",
                                                            "torch_dtype")}
    v5["rope_parameters"] = {**LLAMA31_8B["rope_scaling"], "rope_theta": 500000.0}
    v5["dtype"] = "bfloat16"
    assert ModelSpec.from_hf_config(v5) == ModelSpec.from_hf_config(LLAMA31_8B)


def test_context_extension_overrides():
    spec = ModelSpec.from_hf_config(LLAMA31_8B).with_overrides(
        rope_theta=2e6, max_position_embeddings=524288,
        rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    assert (spec.rope_theta, spec.rope_scaling.factor, spec.max_position_embeddings) == (
        2e6, 32.0, 524288)
    plain = spec.with_overrides(rope_scaling={"rope_type": "default"})
    assert plain.rope_scaling is None
    with pytest.raises(SpecError, match="rope_scaling.llama3.high_freq_factor"):
        spec.with_overrides(rope_scaling={"rope_type": "llama3", "factor": 2.0,
                                          "low_freq_factor": 1.0,
                                          "original_max_position_embeddings": 8192})


@pytest.mark.parametrize("field, value, needle", [
    ("model_type", "gemma2", "model_type='gemma2' is not supported; supported: llama, "
                             "mistral, qwen2, qwen3"),
    ("rope_scaling", {"rope_type": "dynamic", "factor": 2.0},
     "rope_scaling.rope_type='dynamic' is not supported .* dynamic NTK"),
    ("rope_scaling", {"type": "longrope", "short_factor": [1], "long_factor": [1]},
     "rope_type='longrope'"),
    ("rope_scaling", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings":
                      8192, "beta_faster": 3}, "rope_scaling.yarn.beta_faster: unknown field"),
    ("hidden_act", "gelu", "hidden_act='gelu' is not implemented"),
    ("mlp_bias", True, "mlp_bias=true"),
    ("attention_dropout", 0.1, "attention_dropout=0.1 is not implemented"),
    ("partial_rotary_factor", 0.5, "partial_rotary_factor=0.5 is not implemented"),
    ("quantization_config", {"quant_method": "gptq"}, "quantization_config is set"),
    ("layer_types", ["full_attention", "chunked_attention"], "chunked_attention"),
    ("num_attention_heads", 31, "num_kv_heads=8 must divide num_heads=31"),
])
def test_unimplemented_fields_are_refused_by_name(tmp_path, field, value, needle):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**LLAMA31_8B, field: value}))
    with pytest.raises(SpecError, match=needle) as err:
        ModelSpec.from_hf_config(tmp_path)  # a model directory
    assert str(path) in str(err.value)


def test_unknown_fields_are_ignored_with_a_warning():
    with pytest.warns(UserWarning, match=r"\['use_flux_capacitor'\] are not ones"):
        ModelSpec.from_hf_config({**LLAMA31_8B, "use_flux_capacitor": True})


def test_sliding_window_is_held_against_sequence_lengths():
    mistral = ModelSpec.from_hf_config(MISTRAL_7B_V01)
    mistral.check_sequence_length(4096)
    with pytest.raises(SpecError, match="longer than the model's sliding_window=4096"):
        mistral.check_sequence_length(4097)
    sliding_qwen = {**QWEN25_7B, "use_sliding_window": True, "max_window_layers": 20}
    assert ModelSpec.from_hf_config(sliding_qwen).sliding_window == 131072
    assert ModelSpec.from_hf_config({**sliding_qwen, "max_window_layers": 28}).sliding_window \
        is None  # no layer at or above max_window_layers: nothing slides


@pytest.mark.parametrize("fields, needle", [
    (dict(model_type="llama", qk_norm=True), "qk_norm=true is the Qwen3 architecture"),
    (dict(model_type="qwen2"), "model_type='qwen2' has a bias on q/k/v"),
    (dict(model_type="llama", attention_bias=True), "one attention_bias flag"),
    (dict(head_dim=15), "head_dim=15 must be even"),
])
def test_specs_a_config_cannot_express_are_refused(fields, needle):
    from scheduler.specs import MODEL_PRESETS, parse_spec

    with pytest.raises(SpecError, match=needle):
        parse_spec(ModelSpec, MODEL_PRESETS["tiny"].model_dump() | fields, what="model spec")


def test_reading_configs_and_headers_imports_no_torch(tmp_path):
    """What the controller runs at submit: config.json and the weights' headers."""
    tiny = {**QWEN3_06B, "vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 1,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
            "intermediate_size": 48}
    (tmp_path / "config.json").write_text(json.dumps(tiny))
    code = f"""
import sys
import numpy as np
from safetensors.numpy import save_file
from scheduler.hf_checkpoint import inspect_checkpoint, parameter_names
from scheduler.specs import ModelSpec
spec = ModelSpec.from_hf_config({str(tmp_path)!r})
save_file({{hf: np.zeros(shape, np.float32) for _, hf, shape in parameter_names(spec)}},
          {str(tmp_path / "model.safetensors")!r})
layout = inspect_checkpoint({str(tmp_path)!r}, spec)
assert len(layout.entries) == len(spec.parameter_numels()), layout
spec.to_hf_config()
assert "torch" not in sys.modules
"""
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
