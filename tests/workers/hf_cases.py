"""Tiny Hugging Face checkpoints of every supported family, and transformers as the reference.

Each case is a config built with transformers itself (so the fields are spelled as real
checkpoints spell them), random weights nudged off their init (no norm at exactly 1, no
bias at 0), saved with transformers' `save_pretrained`.

The float32 islands. Even in a float64 model transformers computes RMSNorm in float32
(`hidden_states.to(torch.float32)`) and the RoPE frequencies and angles in float32
(`dtype=torch.float`, `.float()`), which limits any comparison to ~1e-7. `float64_islands`
makes transformers' *own* code run those two islands in float64: in the modeling modules
of the four families and in `modeling_rope_utils` it replaces the module-level name
`torch` by a proxy on which `torch.float32` and `torch.float` are `torch.float64` (every
other attribute is torch's). Positions go through `.float()` (a tensor method, still
float32), which is exact for integers below 2^24, and are then multiplied by the float64
frequencies. Nothing of ours is involved, so the reference stays independent; with
SDPA attention (eager attention's softmax is a third float32 island) the two models then
agree to ~1e-15.
"""

from __future__ import annotations

import contextlib
import importlib
import types
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

VOCAB = 101
LENGTHS = [13, 1, 30, 6]  # a length-1 sequence; positions past original_max_position (16)
FAMILIES = ["llama3", "llama-yarn", "mistral", "qwen2-tied", "qwen3"]
_MODULES = ["transformers.modeling_rope_utils", "transformers.models.llama.modeling_llama",
            "transformers.models.mistral.modeling_mistral",
            "transformers.models.qwen2.modeling_qwen2",
            "transformers.models.qwen3.modeling_qwen3"]


def hf_config(family: str):
    """The transformers config of one test family (tiny, GQA 4:2)."""
    import transformers as T

    common = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=96, max_position_embeddings=128,
                  rms_norm_eps=1e-6)
    if family == "llama3":
        return T.LlamaConfig(**common, rope_theta=500000.0, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16})
    if family == "llama-yarn":
        return T.LlamaConfig(**{**common, "max_position_embeddings": 64}, rope_scaling={
            "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
            "attention_factor": 1.2, "beta_fast": 8.0, "beta_slow": 0.5})
    if family == "mistral":
        return T.MistralConfig(**common, sliding_window=64)
    if family == "qwen2-tied":
        return T.Qwen2Config(**common, tie_word_embeddings=True, rope_theta=1e6)
    if family == "qwen3":
        return T.Qwen3Config(**{**common, "max_position_embeddings": 64}, head_dim=24,
                             rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                           "original_max_position_embeddings": 16})
    raise ValueError(family)


def make_checkpoint(directory: Path, family: str, *, dtype: torch.dtype = torch.float64,
                    seed: int = 0, **save_kwargs) -> Path:
    """Save a randomly initialised, perturbed transformers model of `family`; returns dir."""
    import transformers as T

    torch.manual_seed(seed)
    model = T.AutoModelForCausalLM.from_config(hf_config(family), attn_implementation="sdpa")
    model = model.to(torch.float64)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.to(dtype).save_pretrained(directory, **save_kwargs)
    return Path(directory)


class _Float64Torch(types.ModuleType):
    float = torch.float64
    float32 = torch.float64

    def __getattr__(self, name):
        return getattr(torch, name)


@contextlib.contextmanager
def float64_islands():
    """transformers' RMSNorm and RoPE in float64 (see the module docstring)."""
    proxy = _Float64Torch("torch")
    modules = [importlib.import_module(m) for m in _MODULES]
    saved = [m.torch for m in modules]
    for m in modules:
        m.torch = proxy
    try:
        yield
    finally:
        for m, t in zip(modules, saved, strict=True):
            m.torch = t


def load_reference(directory: Path, dtype: torch.dtype = torch.float64):
    """transformers' own model of `directory` (SDPA), float64 islands when dtype is float64."""
    import transformers as T

    ctx = float64_islands() if dtype == torch.float64 else contextlib.nullcontext()
    with ctx:
        model = T.AutoModelForCausalLM.from_pretrained(directory, dtype=dtype,
                                                       attn_implementation="sdpa")
    if dtype == torch.float64:
        assert model.model.rotary_emb.inv_freq.dtype == torch.float64
    return model


def packed_batch(lengths: Sequence[int] = LENGTHS, seed: int = 3):
    """(ids [T], cu_seqlens) of random tokens."""
    cu = torch.tensor([0, *torch.tensor(list(lengths)).cumsum(0).tolist()], dtype=torch.int32)
    ids = torch.randint(0, VOCAB, (int(cu[-1]),), generator=torch.Generator().manual_seed(seed))
    return ids, cu


def reference_loss_and_grads(hf_model, ids: torch.Tensor, cu: torch.Tensor, spec):
    """transformers, one sequence at a time: (logits [T, V], summed next-token CE, grads by
    *our* parameter names)."""
    from scheduler.hf_checkpoint import parameter_names

    hf_model.zero_grad(set_to_none=True)
    logits, total = [], 0.0
    with float64_islands():
        for s, e in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
            out = hf_model(ids[s:e][None]).logits[0]
            logits.append(out.detach())
            if e - s > 1:
                total = total + F.cross_entropy(out[:-1], ids[s + 1:e], reduction="sum")
        total.backward()
    theirs = dict(hf_model.named_parameters())
    grads = {ours: theirs[hf].grad.detach().clone() for ours, hf, _ in parameter_names(spec)}
    return torch.cat(logits), float(total.detach()), grads


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm())
