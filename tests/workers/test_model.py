"""workers.model: the Llama-style Transformer and its fused forward_backward.

References are independent of the code under test: a naive per-sequence float64 model
written from the equations (for the forward), and plain autograd through `model(...)` with
torch's own cross-entropy (for every memory scheme's gradients). Tolerance 1e-10 relative:
float64 with sums in different orders (chunks, streams) differs by ~1e-15 per op.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from scheduler.specs import MODEL_PRESETS, ModelSpec
from workers.model import Transformer, default_position_ids, next_token_targets

TOL = 1e-10
LENGTHS = [7, 1, 23, 12, 2]  # odd, a length-1 sequence (no predictions), packed


def _cu(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


@pytest.fixture(scope="module")
def model() -> Transformer:
    torch.manual_seed(0)
    m = Transformer(MODEL_PRESETS["tiny"]).to(torch.float64)
    with torch.no_grad():  # larger than init so every path's gradient is far from zero
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return m


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(1)
    cu = _cu(LENGTHS)
    return torch.randint(0, 256, (int(cu[-1]),), generator=g), cu


def _grads(model, fn) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    fn()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _assert_close(got: dict, want: dict) -> None:
    for name, g in want.items():
        err = ((got[name] - g).norm() / g.norm()).item()
        assert err <= TOL, f"{name}: relative error {err:.2e}"


def _reference_sft(model, ids, cu, scale=1.0):
    def run():
        logits = model(ids, cu_seqlens=cu)
        loss = F.cross_entropy(logits, next_token_targets(ids, cu), reduction="sum")
        (loss * scale).backward()
        run.loss = loss.item()
    grads = _grads(model, run)
    return run.loss, grads


# ---------------------------------------------------------------- naive forward reference


def _naive_logits(model: Transformer, ids, lengths) -> torch.Tensor:
    """Per-sequence Llama forward from the equations, with an explicit causal softmax."""
    spec, out, start = model.spec, [], 0
    hd, rep = spec.head_dim, spec.num_heads // spec.num_kv_heads

    def rms(x, w):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + spec.norm_eps) * w

    def rope(x, pos):  # x [L, heads, hd]
        inv = spec.rope_theta ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
        ang = pos[:, None].double() * inv[None]
        c, s = ang.cos()[:, None], ang.sin()[:, None]
        a, b = x[..., : hd // 2], x[..., hd // 2:]
        return torch.cat([a * c - b * s, b * c + a * s], -1)

    for L in lengths:
        x = model.embed.weight[ids[start:start + L]]
        pos = torch.arange(L)
        for lyr in model.layers:
            n = rms(x, lyr.attn_norm.weight)
            q = rope((n @ lyr.wq.weight.T).view(L, -1, hd), pos)
            k = rope((n @ lyr.wk.weight.T).view(L, -1, hd), pos).repeat_interleave(rep, 1)
            v = (n @ lyr.wv.weight.T).view(L, -1, hd).repeat_interleave(rep, 1)
            s = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(hd)
            s = s.masked_fill(torch.ones(L, L, dtype=torch.bool).triu(1), float("-inf"))
            o = torch.einsum("hqk,khd->qhd", s.softmax(-1), v).reshape(L, -1)
            h = x + o @ lyr.wo.weight.T
            m = rms(h, lyr.mlp_norm.weight)
            x = h + (F.silu(m @ lyr.w_gate.weight.T) * (m @ lyr.w_up.weight.T)) \
                @ lyr.w_down.weight.T
        out.append(rms(x, model.norm.weight) @ model.head.weight.T)
        start += L
    return torch.cat(out)


def test_forward_matches_naive_llama(model, batch):
    ids, cu = batch
    with torch.no_grad():
        got = model(ids, cu_seqlens=cu)
        want = _naive_logits(model, ids, LENGTHS)
    assert got.shape == (int(cu[-1]), 256)
    assert ((got - want).norm() / want.norm()).item() <= TOL


def test_explicit_position_ids_equal_default(model, batch):
    ids, cu = batch
    pos = default_position_ids(cu)
    assert pos[:9].tolist() == [0, 1, 2, 3, 4, 5, 6, 0, 0]
    with torch.no_grad():
        assert torch.equal(model(ids, cu_seqlens=cu), model(ids, cu_seqlens=cu,
                                                            position_ids=pos))


def test_init_is_deterministic_and_counts_params():
    spec = MODEL_PRESETS["tiny"]
    torch.manual_seed(3)
    a = Transformer(spec)
    torch.manual_seed(3)
    b = Transformer(spec)
    for (n, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q), n
    assert p.dtype == torch.float32  # the tiny preset's dtype
    assert sum(p.numel() for p in a.parameters()) == spec.num_params


def test_next_token_targets():
    ids = torch.tensor([5, 6, 7, 8, 9, 10])
    cu = torch.tensor([0, 3, 3, 4, 6], dtype=torch.int32)  # includes an empty sequence
    assert next_token_targets(ids, cu).tolist() == [6, 7, -100, -100, 10, -100]


# ---------------------------------------------------------------- forward_backward exactness

SCHEMES = [
    pytest.param({}, id="streamed-head"),
    *[pytest.param({"stream_chunk_size": c}, id=f"streambp-{c}") for c in (1, 7, 64)],
    pytest.param({"stream_chunk_size": sum(LENGTHS)}, id="streambp-full"),
    *[pytest.param({"offload_ratio": a}, id=f"offload-{a}") for a in (0.0, 0.5, 1.0)],
    pytest.param({"stream_chunk_size": 7, "offload_ratio": 0.5}, id="streambp-7+offload"),
]


@pytest.mark.parametrize("kwargs", SCHEMES)
def test_forward_backward_equals_autograd(model, batch, kwargs):
    ids, cu = batch
    want_loss, want = _reference_sft(model, ids, cu, scale=0.25)
    got = _grads(model, lambda: _run(model, ids, cu, kwargs))
    _assert_close(got, want)
    assert abs(_run.loss - want_loss) <= TOL * abs(want_loss)
    assert _run.num == sum(LENGTHS) - len(LENGTHS)


def _run(model, ids, cu, kwargs):
    loss, num = model.forward_backward(ids, cu_seqlens=cu, grad_scale=0.25, **kwargs)
    _run.loss, _run.num = float(loss), num


def test_forward_backward_accumulates(model, batch):
    ids, cu = batch
    _, once = _reference_sft(model, ids, cu)
    model.zero_grad(set_to_none=True)
    model.forward_backward(ids, cu_seqlens=cu)
    model.forward_backward(ids, cu_seqlens=cu, stream_chunk_size=5)
    _assert_close({n: p.grad / 2 for n, p in model.named_parameters()}, once)


def test_explicit_targets_are_used(model, batch):
    ids, cu = batch
    targets = torch.randint(0, 256, ids.shape)
    targets[::3] = -100
    model.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(ids, cu_seqlens=cu), targets, reduction="sum")
    loss.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    got = _grads(model, lambda: model.forward_backward(ids, cu_seqlens=cu, targets=targets,
                                                       stream_chunk_size=4))
    _assert_close(got, want)


@pytest.mark.parametrize("bad, match", [
    (dict(cu_seqlens=torch.tensor([0, 5], dtype=torch.int32)), "cu_seqlens"),
    (dict(cu_seqlens=torch.tensor([0, 45]), ), "int32"),
    (dict(stream_chunk_size=0), "stream_chunk_size"),
    (dict(offload_ratio=1.5), "offload_ratio"),
    (dict(ring=[0, 1]), "position_ids and targets"),
    (dict(targets=torch.zeros(3, dtype=torch.long)), "targets"),
    (dict(objective="dpo"), "objective"),
])
def test_forward_backward_rejects_mistakes(model, batch, bad, match):
    ids, cu = batch
    kwargs = dict(cu_seqlens=cu) | bad
    with pytest.raises(ValueError, match=match):
        model.forward_backward(ids, **kwargs)


def test_rejects_out_of_vocab_ids(model):
    cu = _cu([3])
    with pytest.raises(ValueError, match="valid ids are 0..255"):
        model(torch.tensor([1, 256, 2]), cu_seqlens=cu)


def test_spec_dtype_is_used():
    spec = ModelSpec(**(MODEL_PRESETS["tiny"].model_dump() | {"dtype": "bfloat16"}))
    assert Transformer(spec).head.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("kwargs", [{"stream_chunk_size": 7}, {"offload_ratio": 0.5}],
                         ids=["streambp-7", "offload-0.5"])
def test_float32_error_is_within_a_small_multiple_of_torchs(model, batch, kwargs):
    """At float32 our schemes must be as accurate as plain float32 autograd, vs float64."""
    ids, cu = batch
    _, exact = _reference_sft(model, ids, cu)
    m32 = Transformer(MODEL_PRESETS["tiny"]).to(torch.float32)
    m32.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    _, plain32 = _reference_sft(m32, ids, cu)
    ours = _grads(m32, lambda: m32.forward_backward(ids, cu_seqlens=cu, **kwargs))
    for name, g in exact.items():
        torch_err = ((plain32[name].double() - g).norm() / g.norm()).item()
        our_err = ((ours[name].double() - g).norm() / g.norm()).item()
        assert our_err <= 4 * torch_err + 1e-6, (name, our_err, torch_err)


def test_bfloat16_step_runs_every_scheme(batch):
    """bf16 end to end (norm statistics and RoPE in float32, lse float32): finite bf16 grads."""
    ids, cu = batch
    torch.manual_seed(0)
    m = Transformer(MODEL_PRESETS["tiny"]).to(torch.bfloat16)
    losses = []
    for kwargs in ({}, {"stream_chunk_size": 5}, {"offload_ratio": 0.5}):
        m.zero_grad(set_to_none=True)
        loss, num = m.forward_backward(ids, cu_seqlens=cu, **kwargs)
        losses.append(float(loss))
        for n, p in m.named_parameters():
            assert p.grad.dtype == torch.bfloat16 and bool(torch.isfinite(p.grad).all()), n
    # ~ln(256) per prediction at init; schemes agree to bf16 precision
    assert abs(losses[0] / num - math.log(256)) < 0.1
    assert max(losses) - min(losses) <= 1e-2 * losses[0]
