"""The tensor layout of a Hugging Face checkpoint directory, checked before any byte is read.

A model directory holds `config.json` and either one `model.safetensors` or shards
`model-0000i-of-0000n.safetensors` listed by `model.safetensors.index.json` (its
`weight_map` names the shard of every tensor). `inspect_checkpoint` reads only the
safetensors headers (`safetensors.safe_open` with the numpy framework: no torch, no data)
and checks them against the tensors a ModelSpec builds: every shard exists and is a valid
safetensors file, every tensor the model needs is present exactly once with the right
shape and a floating dtype, and nothing unknown is left over. The controller runs it at
submit (a broken checkpoint is a 422 naming the file and the tensor); the workers run it
before they allocate anything, then read tensor by tensor (workers/hf.py), so nothing
partially loaded can be used.

Names: our parameter names (workers.model.Transformer) against Hugging Face's, the same
for Llama, Mistral, Qwen2 and Qwen3.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from scheduler.errors import SpecError
from scheduler.specs import ModelSpec

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
FLOAT_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}
# Buffers old checkpoints carry that are recomputed, never trained.
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)

_LAYER_NAMES = [  # (ours inside layers.{i}., HF's inside model.layers.{i}.)
    ("attn_norm.weight", "input_layernorm.weight"),
    ("wq.weight", "self_attn.q_proj.weight"), ("wq.bias", "self_attn.q_proj.bias"),
    ("wk.weight", "self_attn.k_proj.weight"), ("wk.bias", "self_attn.k_proj.bias"),
    ("wv.weight", "self_attn.v_proj.weight"), ("wv.bias", "self_attn.v_proj.bias"),
    ("q_norm.weight", "self_attn.q_norm.weight"), ("k_norm.weight", "self_attn.k_norm.weight"),
    ("wo.weight", "self_attn.o_proj.weight"), ("wo.bias", "self_attn.o_proj.bias"),
    ("mlp_norm.weight", "post_attention_layernorm.weight"),
    ("w_gate.weight", "mlp.gate_proj.weight"), ("w_up.weight", "mlp.up_proj.weight"),
    ("w_down.weight", "mlp.down_proj.weight"),
]


class CheckpointError(SpecError):
    """A model directory's weights do not match its config (names the file and tensor)."""


@dataclass(frozen=True, kw_only=True)
class TensorEntry:
    """Where one parameter lives in the checkpoint."""

    name: str  # our parameter name (workers.model.Transformer.named_parameters)
    hf_name: str  # the checkpoint's tensor name
    file: Path  # the .safetensors file holding it
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype code: F64, F32, F16, BF16


@dataclass(frozen=True, kw_only=True)
class CheckpointLayout:
    """Every parameter of a model, in Transformer.parameters() order, and where it is."""

    directory: Path
    entries: tuple[TensorEntry, ...]
    files: tuple[Path, ...]  # the weight files, in reading order

    @property
    def num_bytes(self) -> int:
        """Bytes of the parameters as stored."""
        return sum(FLOAT_DTYPES[e.dtype] * _numel(e.shape) for e in self.entries)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def layer_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Our name -> shape of one DecoderLayer's parameters (only those the spec builds)."""
    h, q, kv, f, d = spec.hidden_size, spec.q_dim, spec.kv_dim, spec.ffn_hidden_size, \
        spec.head_dim
    shapes = {"attn_norm.weight": (h,), "wq.weight": (q, h), "wk.weight": (kv, h),
              "wv.weight": (kv, h), "wo.weight": (h, q), "mlp_norm.weight": (h,),
              "w_gate.weight": (f, h), "w_up.weight": (f, h), "w_down.weight": (h, f)}
    if spec.attention_bias:
        shapes |= {"wq.bias": (q,), "wk.bias": (kv,), "wv.bias": (kv,)}
    if spec.attention_out_bias:
        shapes["wo.bias"] = (h,)
    if spec.qk_norm:
        shapes |= {"q_norm.weight": (d,), "k_norm.weight": (d,)}
    return shapes


def parameter_names(spec: ModelSpec) -> list[tuple[str, str, tuple[int, ...]]]:
    """(our name, HF name, shape) of every parameter, in Transformer.parameters() order
    (the tied head is the embedding and has no entry of its own)."""
    shapes = layer_shapes(spec)
    v, h = spec.vocab_size, spec.hidden_size
    out: list[tuple[str, str, tuple[int, ...]]] = [
        ("embed.weight", "model.embed_tokens.weight", (v, h))]
    for i in range(spec.num_layers):
        out += [(f"layers.{i}.{ours}", f"model.layers.{i}.{theirs}", shapes[ours])
                for ours, theirs in _LAYER_NAMES if ours in shapes]
    out.append(("norm.weight", "model.norm.weight", (h,)))
    if not spec.tie_word_embeddings:
        out.append(("head.weight", "lm_head.weight", (v, h)))
    return out


def has_weights(directory: str | Path) -> bool:
    """True when `directory` holds model.safetensors or its sharded index."""
    d = Path(directory)
    return (d / SINGLE_FILE).is_file() or (d / INDEX_FILE).is_file()


def weight_map(directory: str | Path) -> dict[str, Path]:
    """HF tensor name -> file, from the index (sharded) or the single file's header."""
    d = Path(directory)
    index = d / INDEX_FILE
    if index.is_file():
        try:
            data = json.loads(index.read_text())
            mapping = data["weight_map"]
            if not isinstance(mapping, dict):
                raise TypeError("weight_map is not an object")
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{index}: not a valid safetensors index ({exc}); it needs a "
                                  "'weight_map' of tensor name -> shard file") from None
        return {name: d / str(file) for name, file in mapping.items()}
    single = d / SINGLE_FILE
    if single.is_file():
        return {name: single for name in _header(single)}
    others = sorted(p.name for p in d.glob("*.bin")) + sorted(p.name for p in d.glob("*.pt"))
    hint = f" (found {others[:3]}: only safetensors checkpoints are read)" if others else ""
    raise CheckpointError(f"model directory {d} holds no weights: neither {SINGLE_FILE} nor "
                          f"{INDEX_FILE}{hint}")


def _header(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """Tensor name -> (shape, dtype) from a safetensors header (no data is read)."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise CheckpointError(f"{path}: shard file not found (listed in the index)")
    try:
        with safe_open(str(path), framework="numpy") as f:
            return {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype())
                    for k in f.keys()}
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None


def inspect_checkpoint(directory: str | Path, spec: ModelSpec) -> CheckpointLayout:
    """The layout of `directory`'s weights for `spec`; CheckpointError on any mismatch."""
    d = Path(directory)
    mapping = weight_map(d)
    headers = {f: _header(f) for f in dict.fromkeys(mapping.values())}
    for name, file in mapping.items():
        if name not in headers[file]:
            raise CheckpointError(f"{file}: tensor {name!r} is listed in {INDEX_FILE} but the "
                                  "shard does not hold it")
    entries = [_entry(ours, hf, shape, mapping, headers, d, spec)
               for ours, hf, shape in parameter_names(spec)]
    _check_leftovers(mapping, headers, {e.hf_name for e in entries}, spec)
    return CheckpointLayout(directory=d, entries=tuple(entries),
                            files=tuple(dict.fromkeys(e.file for e in entries)))


def _entry(ours: str, hf: str, shape: tuple[int, ...], mapping: dict[str, Path],
           headers: dict, d: Path, spec: ModelSpec) -> TensorEntry:
    if hf not in mapping:
        where = d / INDEX_FILE if (d / INDEX_FILE).is_file() else d / SINGLE_FILE
        raise CheckpointError(f"{where}: tensor {hf!r} is missing; config.json "
                              f"(model_type={spec.model_type!r}{_options(spec)}) needs it")
    file = mapping[hf]
    got, dtype = headers[file][hf]
    if got != shape:
        raise CheckpointError(f"{file}: tensor {hf!r} has shape {list(got)} but config.json "
                              f"implies {list(shape)} ({_implied_by(ours, spec)})")
    if dtype not in FLOAT_DTYPES:
        raise CheckpointError(f"{file}: tensor {hf!r} has dtype {dtype}; valid: "
                              f"{', '.join(FLOAT_DTYPES)} (quantized weights are not read)")
    return TensorEntry(name=ours, hf_name=hf, file=file, shape=shape, dtype=dtype)


def _check_leftovers(mapping: dict[str, Path], headers: dict, used: set[str],
                     spec: ModelSpec) -> None:
    for name, file in mapping.items():
        if name in used or name.endswith(_IGNORED_SUFFIXES):
            continue
        if name == "lm_head.weight" and spec.tie_word_embeddings:
            continue  # a tied head saved anyway: the embedding is the weight that is trained
        why = "bias tensors need attention_bias" if name.endswith(".bias") else \
            "the config does not describe it"
        raise CheckpointError(f"{file}: tensor {name!r} is not a parameter of this model "
                              f"({why}); config.json and the weights disagree")


def _options(spec: ModelSpec) -> str:
    flags = [n for n in ("attention_bias", "attention_out_bias", "qk_norm")
             if getattr(spec, n)]
    return "".join(f", {n}=true" for n in flags) + \
        (", tie_word_embeddings=false" if not spec.tie_word_embeddings else "")


def _implied_by(ours: str, spec: ModelSpec) -> str:
    if ours in ("embed.weight", "head.weight"):
        return f"vocab_size={spec.vocab_size}, hidden_size={spec.hidden_size}"
    if any(k in ours for k in ("wq", "wk", "wv", "wo", "norm")):
        return (f"hidden_size={spec.hidden_size}, num_attention_heads={spec.num_heads}, "
                f"num_key_value_heads={spec.num_kv_heads}, head_dim={spec.head_dim}")
    return f"hidden_size={spec.hidden_size}, intermediate_size={spec.ffn_hidden_size}"
