"""Every supported family, loaded by workers.hf.load_pretrained, computes what transformers
computes: logits and every parameter's gradient of the summed next-token loss on a packed
batch (each sequence run separately through transformers), by plain autograd and through
the fused step (streamed head, StreamBP, token-wise offload).

Families: Llama with llama3 RoPE scaling, Llama with YaRN (explicit attention factor),
Mistral (a sliding window longer than every sequence), Qwen2 with q/k/v bias and tied
embeddings, Qwen3 with q/k norms, head_dim != hidden/heads and YaRN (derived attention
factor). The reference is transformers' own code at float64 with SDPA attention; its two
float32 islands (RMSNorm, RoPE angles) are run in float64 by `hf_cases.float64_islands`
(its docstring says how). Tolerance 1e-10 relative: both sides then compute the same
float64 math in different op orders (~1e-15); any wrong option (a missing bias, q/k norm
after RoPE, a frequency off by one pair, a tied head missing one gradient) is >= 1e-4.
"""

from __future__ import annotations

import pytest
import torch

from scheduler import rope
from tests.workers.hf_cases import (
    FAMILIES,
    hf_config,
    load_reference,
    make_checkpoint,
    packed_batch,
    reference_loss_and_grads,
    rel_err,
)
from workers.hf import load_pretrained
from workers.model import next_token_targets

from .helpers import one_thread  # noqa: F401

TOL = 1e-10
FUSED = [{}, {"stream_chunk_size": 7}, {"offload_ratio": 0.5}]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {f: make_checkpoint(root / f, f) for f in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_and_gradients_equal_transformers(checkpoints, family):
    model = load_pretrained(checkpoints[family], dtype=torch.float64)
    ids, cu = packed_batch()
    reference = load_reference(checkpoints[family])
    assert sum(p.numel() for p in reference.parameters()) == model.spec.num_params
    want_logits, want_loss, want = reference_loss_and_grads(reference, ids, cu, model.spec)
    logits = model(ids, cu)
    assert rel_err(logits.detach(), want_logits) <= TOL
    targets = next_token_targets(ids, cu)
    loss = torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
    assert abs(loss.item() - want_loss) <= TOL * abs(want_loss)
    loss.backward()
    _assert_grads(model, want, "autograd")
    for kwargs in FUSED:
        model.zero_grad(set_to_none=True)
        fused_loss, num = model.forward_backward(ids, cu_seqlens=cu, **kwargs)
        assert num == sum(n - 1 for n in (cu[1:] - cu[:-1]).tolist())
        assert abs(float(fused_loss) - want_loss) <= TOL * abs(want_loss), kwargs
        _assert_grads(model, want, str(kwargs))


def _assert_grads(model, want: dict, what: str) -> None:
    got = dict(model.named_parameters())
    assert set(got) == set(want), what
    for name, g in want.items():
        err = rel_err(got[name].grad, g)
        assert err <= TOL, f"{what} {name}: relative error {err:.2e}"


def test_options_the_families_exercise(checkpoints):
    """The cases above really cover each option (so a family silently loaded as plain
    Llama would fail here, not pass there)."""
    specs = {f: load_pretrained(checkpoints[f], dtype=torch.float64).spec for f in FAMILIES}
    assert specs["llama3"].rope_scaling.rope_type == "llama3"
    assert specs["llama-yarn"].rope_scaling.attention_factor == 1.2
    assert specs["mistral"].sliding_window == 64
    q2 = specs["qwen2-tied"]
    assert q2.attention_bias and not q2.attention_out_bias and q2.tie_word_embeddings
    q3 = specs["qwen3"]
    assert q3.qk_norm and q3.head_dim == 24 and q3.rope_scaling.attention_factor is None
    tied = load_pretrained(checkpoints["qwen2-tied"], dtype=torch.float64)
    assert tied.head.weight is tied.embed.weight
    assert "head.weight" not in dict(tied.named_parameters())


@pytest.mark.parametrize("family", ["llama3", "llama-yarn", "qwen3"])
def test_frequencies_match_transformers_float32_functions(family):
    """scheduler.rope (float64, torch-free) against transformers' own RoPE init functions
    run unpatched (float32): equal to float32 rounding, the same attention factor."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from scheduler.specs import ModelSpec

    cfg = hf_config(family)
    spec = ModelSpec.from_hf_config(cfg.to_dict())
    inv_freq, factor = ROPE_INIT_FUNCTIONS[spec.rope_scaling.rope_type](cfg)
    ours = torch.tensor(rope.inverse_frequencies(spec.head_dim, spec.rope_theta,
                                                 spec.rope_scaling), dtype=torch.float64)
    assert torch.allclose(ours, inv_freq.double(), rtol=2e-6, atol=0)
    assert rope.attention_factor(spec.rope_scaling) == pytest.approx(factor, rel=1e-12)


def test_sliding_window_refuses_longer_sequences(checkpoints):
    model = load_pretrained(checkpoints["mistral"], dtype=torch.float64)
    ids, cu = packed_batch([70, 3])
    with pytest.raises(ValueError, match="longer than the model's sliding_window=64"):
        model(ids, cu)
