"""CUDA checks of the Triton kernels in bfloat16 (skipped without a GPU).

Same rule as the CPU bf16 tests: our error against the naive float64 reference is at most
2x torch's own bfloat16 attention (SDPA) error, forward and all three gradients; the
cross-entropy kernel at most 2x torch's bf16 logits + cross_entropy. bench/gpu_check.sh
runs these before any timing.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import kernels
from tests.kernels.reference import make_cu, naive_attention, naive_linear_ce, rel_err

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

# (lens_q, lens_k, Hq, Hkv, D): packed odd lengths, lq != lk, GQA 1:1 / 4:1 / 8:1.
CASES = [
    ([1, 7, 127, 1000], [1, 7, 127, 1000], 32, 8, 128),
    ([300, 5], [700, 5], 8, 1, 64),
    ([129, 64], [129, 64], 4, 4, 32),
]


def _sdpa(q, k, v, lens_q, lens_k, causal):
    outs, q0, k0 = [], 0, 0
    group = q.shape[1] // k.shape[1]
    for lq, lk in zip(lens_q, lens_k, strict=True):
        mask = torch.ones(lq, lk, dtype=torch.bool, device=q.device)
        mask = mask.tril(diagonal=lk - lq) if causal else mask
        qs = q[q0:q0 + lq].transpose(0, 1)
        ks = k[k0:k0 + lk].repeat_interleave(group, 1).transpose(0, 1)
        vs = v[k0:k0 + lk].repeat_interleave(group, 1).transpose(0, 1)
        outs.append(F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask).transpose(0, 1))
        q0, k0 = q0 + lq, k0 + lk
    return torch.cat(outs)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{len(c[0])}seqs-g{c[2] // c[3]}-d{c[4]}")
def test_triton_bf16_within_twice_sdpa_error(case, causal):
    lens_q, lens_k, hq, hkv, d = case
    gen = torch.Generator(device="cuda").manual_seed(0)

    def rand(t, h):
        return torch.randn(t, h, d, device="cuda", generator=gen, dtype=torch.bfloat16)

    q, k, v = rand(sum(lens_q), hq), rand(sum(lens_k), hkv), rand(sum(lens_k), hkv)
    dout = rand(sum(lens_q), hq)
    cu = dict(cu_seqlens_q=make_cu(lens_q).cuda(), cu_seqlens_k=make_cu(lens_k).cuda(),
              causal=causal)
    ref_leaves = [t.double().requires_grad_() for t in (q, k, v)]
    ref_out, ref_lse = naive_attention(*ref_leaves, lens_q, lens_k, causal)
    ref_grads = torch.autograd.grad((ref_out * dout.double()).sum(), ref_leaves)
    out, lse = kernels.attention_with_lse(q, k, v, backend="triton", **cu)
    grads = kernels.attention_with_lse_backward(dout, q, k, v, out, lse, backend="triton", **cu)
    sdpa_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    sdpa_out = _sdpa(*sdpa_leaves, lens_q, lens_k, causal)
    sdpa_grads = torch.autograd.grad(sdpa_out, sdpa_leaves, dout)
    assert rel_err(out, ref_out) <= 2 * rel_err(sdpa_out, ref_out)
    assert rel_err(lse, ref_lse) <= 1e-5  # float32 from float32 accumulators
    for name, g, s, r in zip("qkv", grads, sdpa_grads, ref_grads, strict=True):
        assert rel_err(g, r) <= 2 * rel_err(s, r), f"d{name}"


def test_linear_ce_bf16_within_twice_torch_error():
    gen = torch.Generator(device="cuda").manual_seed(1)
    hidden = torch.randn(2048, 256, device="cuda", generator=gen, dtype=torch.bfloat16)
    weight = torch.randn(32000, 256, device="cuda", generator=gen, dtype=torch.bfloat16) / 16
    targets = torch.randint(0, 32000, (2048,), device="cuda", generator=gen)
    targets[::9] = -100
    ref_leaves = [hidden.double().requires_grad_(), weight.double().requires_grad_()]
    ref_loss, _ = naive_linear_ce(*ref_leaves, targets)
    ref_grads = torch.autograd.grad(ref_loss, ref_leaves)
    ours = [hidden.clone().requires_grad_(), weight.clone().requires_grad_()]
    loss, _ = kernels.linear_cross_entropy(*ours, targets, chunk_size=512)
    grads = torch.autograd.grad(loss, ours)
    theirs = [hidden.clone().requires_grad_(), weight.clone().requires_grad_()]
    torch_loss = F.cross_entropy(theirs[0] @ theirs[1].T, targets, reduction="sum")
    torch_grads = torch.autograd.grad(torch_loss, theirs)
    err, torch_err = (abs(x.item() - ref_loss.item()) for x in (loss, torch_loss))
    assert err <= 2 * torch_err + 1e-6 * abs(ref_loss.item())
    for g, t, r in zip(grads, torch_grads, ref_grads, strict=True):
        assert rel_err(g, r) <= 2 * rel_err(t, r)
