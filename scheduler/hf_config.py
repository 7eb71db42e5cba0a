"""Hugging Face config.json <-> ModelSpec, torch-free.

The controller validates a model directory at submit with `spec_from_hf_config` (so a bad
checkpoint is a 422 naming the field, not a failed job); the workers build their model
from the same spec, and `ringmaster export` writes it back with `hf_config_from_spec`.

Reading is strict where it matters: every field that changes the model's math is either
implemented (and read) or refused by name with the reason (docs/models.md, "What is
refused"). Fields that only describe the checkpoint (token ids, generation defaults) are
ignored; a field this module has never heard of is ignored with a warning, so nothing is
dropped silently. Both the transformers 4 spelling (`rope_theta` + `rope_scaling`,
`torch_dtype`) and the transformers 5 one (`rope_parameters`, `dtype`) are read.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from scheduler.errors import SpecError
from scheduler.rope import ROPE_TYPES

if TYPE_CHECKING:
    from scheduler.specs import ModelSpec

ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                 "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
REQUIRED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
            "intermediate_size")
# Read, or checked and refused when set to something not implemented.
_MATH = {"vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
         "num_key_value_heads", "intermediate_size", "head_dim", "rms_norm_eps", "rope_theta",
         "rope_scaling", "rope_parameters", "tie_word_embeddings", "hidden_act",
         "attention_bias", "mlp_bias", "attention_dropout", "partial_rotary_factor",
         "sliding_window", "use_sliding_window", "max_window_layers", "layer_types",
         "quantization_config", "max_position_embeddings", "model_type", "torch_dtype", "dtype",
         "pretraining_tp"}
# Describe the checkpoint, not the math of a training step.
_METADATA = {"architectures", "transformers_version", "_name_or_path", "use_cache",
             "initializer_range", "bos_token_id", "eos_token_id", "pad_token_id",
             "sep_token_id", "decoder_start_token_id", "return_dict", "output_hidden_states",
             "output_attentions", "torchscript", "use_bfloat16", "tokenizer_class", "id2label",
             "label2id", "problem_type", "task_specific_params", "chunk_size_feed_forward",
             "is_decoder", "is_encoder_decoder", "add_cross_attention", "tie_encoder_decoder",
             "finetuning_task", "prefix", "pruned_heads", "max_length", "min_length",
             "do_sample", "temperature", "top_k", "top_p", "num_beams", "repetition_penalty",
             "length_penalty", "no_repeat_ngram_size", "bad_words_ids", "num_return_sequences",
             "early_stopping", "typical_p", "diversity_penalty", "num_beam_groups",
             "output_scores", "return_dict_in_generate", "forced_bos_token_id",
             "forced_eos_token_id", "remove_invalid_values", "exponential_decay_length_penalty",
             "suppress_tokens", "begin_suppress_tokens", "encoder_no_repeat_ngram_size",
             "cross_attention_hidden_size", "tf_legacy_loss", "use_return_dict"}
_DYNAMIC_REASON = {
    "dynamic": "dynamic NTK recomputes the frequencies from each batch's length at inference "
               "time, so training has no fixed angles to learn; use yarn or llama3 with a "
               "fixed factor",
    "longrope": "LongRoPE switches between two per-dimension factor lists by sequence length; "
                "not implemented",
}


class _Refused(Exception):
    """A config field we read but do not implement (message names it)."""


def read_hf_config(source: str | Path | dict) -> tuple[dict, str]:
    """(the config dict, how to name it in errors) from a dict, a config.json or a directory."""
    if isinstance(source, dict):
        return source, "HF model config"
    path = Path(source)
    if path.is_dir():
        path = path / "config.json"
    try:
        cfg = json.loads(path.read_text())
    except FileNotFoundError:
        raise SpecError(f"model config {path}: file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(f"model config {path}: cannot read ({exc})") from None
    except json.JSONDecodeError as exc:
        raise SpecError(f"model config {path}: not valid JSON ({exc})") from None
    if not isinstance(cfg, dict):
        raise SpecError(f"model config {path}: expected a JSON object, got "
                        f"{type(cfg).__name__}")
    return cfg, f"model config {path}"


def spec_from_hf_config(source: str | Path | dict, *, dtype: str | None = None) -> ModelSpec:
    """The ModelSpec of a Llama / Mistral / Qwen2 / Qwen3 config (see module docstring)."""
    from scheduler.specs import DTYPE_BYTES, ModelSpec, parse_spec

    cfg, where = read_hf_config(source)
    try:
        fields = _fields(cfg)
    except _Refused as exc:
        raise SpecError(f"{where}: {exc}") from None
    stored = cfg.get("dtype") or cfg.get("torch_dtype")
    fields["dtype"] = dtype or (stored if stored in DTYPE_BYTES else "bfloat16")
    unknown = sorted(set(cfg) - _MATH - _METADATA)
    if unknown:
        warnings.warn(f"{where}: field(s) {unknown} are not ones Ringmaster knows; they are "
                      "ignored (if one changes the model's math, the trained model will "
                      "differ from the checkpoint's)", stacklevel=2)
    return parse_spec(ModelSpec, fields, what=where)


def _fields(cfg: dict) -> dict:
    model_type = cfg.get("model_type", "llama")  # configs older than model_type are Llama
    if model_type not in ARCHITECTURES:
        raise _Refused(f"model_type={model_type!r} is not supported; supported: "
                       f"{', '.join(ARCHITECTURES)} (docs/models.md)")
    missing = [k for k in REQUIRED if k not in cfg]
    if missing:
        raise _Refused(f"missing field(s) {missing}; a {model_type} config has them")
    _refuse_unimplemented(cfg, model_type)
    theta, scaling = _rope(cfg)
    qkv_bias, out_bias = _biases(cfg, model_type)
    return dict(
        vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
        num_layers=cfg["num_hidden_layers"], num_heads=cfg["num_attention_heads"],
        num_kv_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
        ffn_hidden_size=cfg["intermediate_size"], head_dim=cfg.get("head_dim"),
        rope_theta=theta, rope_scaling=scaling, norm_eps=cfg.get("rms_norm_eps", 1e-5),
        model_type=model_type, attention_bias=qkv_bias, attention_out_bias=out_bias,
        qk_norm=model_type == "qwen3",
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        max_position_embeddings=cfg.get("max_position_embeddings"),
        sliding_window=_sliding_window(cfg, model_type),
    )


def _refuse_unimplemented(cfg: dict, model_type: str) -> None:
    act = cfg.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise _Refused(f"hidden_act={act!r} is not implemented; the MLP is SwiGLU (silu)")
    if cfg.get("mlp_bias"):
        raise _Refused("mlp_bias=true (a bias on the MLP projections) is not implemented")
    if (cfg.get("attention_dropout") or 0) > 0:
        raise _Refused(f"attention_dropout={cfg['attention_dropout']} is not implemented; "
                       "training runs without dropout (set it to 0.0)")
    if cfg.get("partial_rotary_factor", 1.0) not in (None, 1, 1.0):
        raise _Refused(f"partial_rotary_factor={cfg['partial_rotary_factor']} is not "
                       "implemented; RoPE rotates every dimension of a head")
    if cfg.get("quantization_config"):
        raise _Refused("quantization_config is set: quantized weights cannot be trained here; "
                       "give the full-precision checkpoint")
    kinds = set(cfg.get("layer_types") or ()) - {"full_attention", "sliding_attention"}
    if kinds:
        raise _Refused(f"layer_types holds {sorted(kinds)}; only full_attention (and, within "
                       "the window, sliding_attention) layers are implemented")


def _rope(cfg: dict) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling dict for ModelSpec or None)."""
    rope = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    if not isinstance(rope, dict):
        raise _Refused(f"rope_scaling={rope!r} must be an object")
    if rope and all(isinstance(v, dict) or v is None for v in rope.values()):
        raise _Refused(f"rope_parameters per layer type {sorted(rope)} are not implemented; "
                       "every layer uses one RoPE")
    rope = dict(rope)
    theta = rope.pop("rope_theta", None) or cfg.get("rope_theta", 10000.0)
    kind = rope.pop("rope_type", None) or rope.pop("type", None) or "default"
    rope.pop("type", None)
    if rope.pop("partial_rotary_factor", 1.0) not in (None, 1, 1.0):
        raise _Refused("rope_scaling.partial_rotary_factor is not implemented; RoPE rotates "
                       "every dimension of a head")
    if kind not in ROPE_TYPES:
        why = _DYNAMIC_REASON.get(kind, "not implemented")
        raise _Refused(f"rope_scaling.rope_type={kind!r} is not supported (valid: "
                       f"{', '.join(ROPE_TYPES)}): {why}")
    if kind == "default":
        if rope:
            warnings.warn(f"rope_scaling keys {sorted(rope)} are ignored with rope_type "
                          "'default' (as transformers does)", stacklevel=4)
        return theta, None
    if kind in ("llama3", "yarn") and "original_max_position_embeddings" not in rope:
        rope["original_max_position_embeddings"] = cfg.get("max_position_embeddings")
    if kind == "yarn" and rope.get("factor") is None and cfg.get("max_position_embeddings"):
        rope["factor"] = cfg["max_position_embeddings"] / rope["original_max_position_embeddings"]
    for key in ("beta_fast", "beta_slow"):  # transformers: a null (or 0) means the default
        if key in rope and not rope[key]:
            del rope[key]
    return theta, {"rope_type": kind, **rope}


def _biases(cfg: dict, model_type: str) -> tuple[bool, bool]:
    """(bias on q/k/v, bias on the output projection), as each family's modeling code has."""
    if model_type == "qwen2":
        return True, False
    if model_type == "mistral":
        return False, False
    flag = bool(cfg.get("attention_bias", False))
    return flag, flag


def _sliding_window(cfg: dict, model_type: str) -> int | None:
    """The window of any layer that slides, as transformers applies it."""
    window = cfg.get("sliding_window")
    if model_type in ("llama",) or window is None:
        return None
    if model_type == "mistral":
        return window
    if not cfg.get("use_sliding_window", False):
        return None
    if cfg.get("layer_types") is not None:
        return window if "sliding_attention" in cfg["layer_types"] else None
    sliding_from = cfg.get("max_window_layers", 28)
    return window if sliding_from < cfg["num_hidden_layers"] else None


def hf_config_from_spec(spec: ModelSpec, *, base: dict | None = None) -> dict:
    """config.json of `spec`: `base` (the source model's config, keeping its token ids and
    other metadata) with every field that sets the math replaced by the spec's."""
    cfg = {k: v for k, v in (base or {}).items()
           if k not in ("rope_scaling", "rope_parameters", "rope_theta", "torch_dtype", "dtype",
                        "layer_types", "attention_bias", "sliding_window",
                        "use_sliding_window")}
    scaling = spec.rope_scaling.model_dump(exclude_none=True, exclude_defaults=True) \
        if spec.rope_scaling else None  # defaults left out: transformers' are the same
    cfg.update(
        architectures=[ARCHITECTURES[spec.model_type]], model_type=spec.model_type,
        vocab_size=spec.vocab_size, hidden_size=spec.hidden_size,
        intermediate_size=spec.ffn_hidden_size, num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads, num_key_value_heads=spec.num_kv_heads,
        head_dim=spec.head_dim, hidden_act="silu", rms_norm_eps=spec.norm_eps,
        tie_word_embeddings=spec.tie_word_embeddings, attention_dropout=0.0,
        # transformers 4 and vLLM read rope_theta + rope_scaling; transformers 5 reads
        # rope_scaling first, then rope_parameters: both say the same.
        rope_theta=spec.rope_theta, rope_scaling=scaling,
        rope_parameters={"rope_type": "default", **(scaling or {}), "rope_theta": spec.rope_theta},
        torch_dtype=spec.dtype,
    )
    if spec.max_position_embeddings is not None:
        cfg["max_position_embeddings"] = spec.max_position_embeddings
    if spec.model_type in ("llama", "qwen3"):
        cfg["attention_bias"] = spec.attention_bias
    if spec.model_type == "llama":
        cfg["mlp_bias"] = False
    if spec.model_type == "mistral":
        cfg["sliding_window"] = spec.sliding_window
    if spec.model_type in ("qwen2", "qwen3"):
        cfg["use_sliding_window"] = spec.sliding_window is not None
        cfg["sliding_window"] = spec.sliding_window
        if spec.sliding_window is not None:
            cfg.setdefault("max_window_layers", 0)
    return dict(sorted(cfg.items()))
