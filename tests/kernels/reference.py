"""Naive float64 references for the kernel tests, written independently of kernels/.

Attention materializes the full score matrix of every sequence, builds the bottom-right
causal mask with ``tril(diagonal=lk - lq)``, and repeats kv heads for GQA; gradients come
from torch autograd through this naive formula. Nothing here imports kernels/.
"""

from __future__ import annotations

import math

import torch


def make_cu(lengths: list[int]) -> torch.Tensor:
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    return torch.tensor(cu, dtype=torch.int32)


def naive_attention(q, k, v, lens_q, lens_k, causal, scale=None):
    """(out [Tq, Hq, D], lse [Hq, Tq]) in float64; differentiable; no-key rows give 0, -inf."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    group = q.shape[1] // k.shape[1]
    outs, lses = [], []
    q0 = k0 = 0
    for lq, lk in zip(lens_q, lens_k, strict=True):
        qs = q[q0:q0 + lq].double()
        ks = k[k0:k0 + lk].double().repeat_interleave(group, dim=1)
        vs = v[k0:k0 + lk].double().repeat_interleave(group, dim=1)
        q0, k0 = q0 + lq, k0 + lk
        scores = torch.einsum("ihd,jhd->hij", qs, ks) * scale
        allowed = torch.ones(lq, lk, dtype=torch.bool, device=q.device)
        if causal:
            allowed = allowed.tril(diagonal=lk - lq)
        has_key = allowed.any(dim=1)
        scores = scores.masked_fill(~allowed, float("-inf"))
        # Rows without keys get harmless finite scores, then weight 0: no NaN in autograd.
        scores = torch.where(has_key[None, :, None], scores, torch.zeros_like(scores))
        probs = torch.softmax(scores, dim=-1) * has_key[None, :, None]
        lse = torch.logsumexp(scores, dim=-1).masked_fill(~has_key[None, :], float("-inf"))
        outs.append(torch.einsum("hij,jhd->ihd", probs, vs))
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses, dim=1)


def naive_linear_ce(hidden, weight, targets, ignore_index=-100):
    """Sum of cross-entropy over non-ignored rows, float64, from full logits."""
    logits = hidden.double() @ weight.double().T
    valid = targets != ignore_index
    logp = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
    picked = logp[valid].gather(1, targets[valid].long()[:, None])[:, 0]
    return -picked.sum(), int(valid.sum())


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """max |x - ref| / max |ref| over finite entries (both must agree on which are -inf)."""
    x, ref = x.detach().double(), ref.detach().double()
    finite = torch.isfinite(ref)
    assert torch.equal(finite, torch.isfinite(x)), "infinite entries differ"
    scale = ref[finite].abs().max().clamp_min(1e-300) if finite.any() else 1.0
    return float((x[finite] - ref[finite]).abs().max() / scale) if finite.any() else 0.0


PEAK_RSS_SNIPPET = '''
def _status_kib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))

def reset_peak_rss():
    """Start a fresh peak (the kernel's VmHWM, which ru_maxrss reports); returns RSS now.
    Without the reset, shared-library pages evicted under memory pressure after import
    would make any "peak minus now" difference meaningless."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_kib("VmRSS")

def peak_rss_kib():
    return _status_kib("VmHWM")
'''
"""Source for memory-measuring subprocesses (Linux): peak RSS growth of one step."""
