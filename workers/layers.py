"""Building blocks of the Llama-style decoder (Touvron et al. 2023): RMSNorm, RoPE, GQA, SwiGLU.

A decoder layer is cut at its one cross-token operation, attention, so that the memory
schemes in parallelism/ can re-run any part of it for any subset of tokens:

    query(x), key_value(x)   token-local: RMSNorm, projections, RoPE from explicit positions
    core(q, k, v)            attention (the only op that mixes tokens; supplied by the caller)
    post(x, o)               token-local: output projection, residual, RMSNorm, SwiGLU, residual

StreamBP (arXiv 2506.03077, Sec. 3.2) needs exactly this cut (queries of one chunk against
cached keys/values); MEMO's token-wise recomputation (arXiv 2407.12117, Sec. 4.1) needs it
too (every op but attention is recomputable per token from the layer input and the
attention output).

Legend: T tokens, H hidden size, Hq query heads, Hkv key/value heads, D head dim, F MLP width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kernels import accumulation_dtype
from scheduler import rope
from scheduler.rope import RopeScaling

# Norm statistics and rotary angles run at >= float32 (float64 stays float64): the
# kernels' accumulation dtype.


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * w (Zhang & Sennrich 2019, Eq. 4)."""

    def __init__(self, dim: int, *, eps: float, dtype: torch.dtype):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.to(accumulation_dtype(x.dtype))
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.to(x.dtype) * self.weight


def rotary_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float,
                   dtype: torch.dtype, scaling: RopeScaling | None = None,
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [T, D/2] of RoPE angles pos * f_i (Su et al. 2021, Eq. 34), f_i = theta^(-2i/D)
    or, with `scaling`, the long-context schedule of scheduler.rope (times its attention
    factor for YaRN). Positions are global, so a zigzag shard gets its tokens' angles."""
    cdt = accumulation_dtype(dtype)
    if scaling is None:
        inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=cdt,
                                           device=position_ids.device) / head_dim)
        angles = position_ids.to(cdt)[:, None] * inv_freq[None, :]
        return angles.cos(), angles.sin()
    inv_freq = _scaled_inverse_frequencies(head_dim, theta, scaling, cdt, position_ids.device)
    angles = position_ids.to(cdt)[:, None] * inv_freq[None, :]
    cos, sin = angles.cos(), angles.sin()
    factor = rope.attention_factor(scaling)
    return (cos, sin) if factor == 1.0 else (cos * factor, sin * factor)


_INV_FREQ: dict[tuple, torch.Tensor] = {}


def _scaled_inverse_frequencies(head_dim: int, theta: float, scaling: RopeScaling,
                                dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The schedule's f_i as a tensor, made once per (schedule, dtype, device)."""
    key = (head_dim, theta, scaling, dtype, device)
    if key not in _INV_FREQ:
        freqs = torch.tensor(rope.inverse_frequencies(head_dim, theta, scaling),
                             dtype=torch.float64)
        _INV_FREQ[key] = freqs.to(dtype=dtype, device=device)
    return _INV_FREQ[key]


def apply_rotary(x_THD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE (the Hugging Face Llama layout) on [T, heads, D]."""
    half = x_THD.shape[-1] // 2
    x1, x2 = x_THD[..., :half].to(cos.dtype), x_THD[..., half:].to(cos.dtype)
    c, s = cos[:, None, :], sin[:, None, :]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).to(x_THD.dtype)


class DecoderLayer(nn.Module):
    """Pre-norm decoder layer: h = x + Attn(norm1(x)); y = h + SwiGLU(norm2(h)).

    Options (ModelSpec, docs/models.md): `head_dim` (default hidden_size / num_heads),
    `attention_bias` on q/k/v and `attention_out_bias` on the output projection (Qwen2,
    Llama with attention_bias), `qk_norm` (Qwen3: RMSNorm over each head of q and k before
    RoPE), `rope_scaling` (scheduler.rope). Every option is token-local, so the memory
    schemes that re-run parts of a layer per token need nothing new.
    """

    def __init__(self, *, hidden_size: int, num_heads: int, num_kv_heads: int,
                 ffn_hidden_size: int, rope_theta: float, norm_eps: float, dtype: torch.dtype,
                 head_dim: int | None = None, attention_bias: bool = False,
                 attention_out_bias: bool = False, qk_norm: bool = False,
                 rope_scaling: RopeScaling | None = None):
        super().__init__()
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.head_dim = head_dim or hidden_size // num_heads
        self.rope_theta, self.rope_scaling = rope_theta, rope_scaling
        q_dim, kv_dim = num_heads * self.head_dim, num_kv_heads * self.head_dim

        def lin(n_in: int, n_out: int, bias: bool = False) -> nn.Linear:
            return nn.Linear(n_in, n_out, bias=bias, dtype=dtype)

        # Registration order is the parameter order ModelSpec.layer_numels lists.
        self.attn_norm = RMSNorm(hidden_size, eps=norm_eps, dtype=dtype)
        self.wq = lin(hidden_size, q_dim, attention_bias)
        self.wk = lin(hidden_size, kv_dim, attention_bias)
        self.wv = lin(hidden_size, kv_dim, attention_bias)
        self.q_norm = RMSNorm(self.head_dim, eps=norm_eps, dtype=dtype) if qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, eps=norm_eps, dtype=dtype) if qk_norm else None
        self.wo = lin(q_dim, hidden_size, attention_out_bias)
        self.mlp_norm = RMSNorm(hidden_size, eps=norm_eps, dtype=dtype)
        self.w_gate, self.w_up = lin(hidden_size, ffn_hidden_size), lin(hidden_size,
                                                                          ffn_hidden_size)
        self.w_down = lin(ffn_hidden_size, hidden_size)

    @classmethod
    def from_spec(cls, spec, dtype: torch.dtype) -> DecoderLayer:
        """The layer a ModelSpec describes."""
        return cls(hidden_size=spec.hidden_size, num_heads=spec.num_heads,
                   num_kv_heads=spec.num_kv_heads, ffn_hidden_size=spec.ffn_hidden_size,
                   rope_theta=spec.rope_theta, norm_eps=spec.norm_eps, dtype=dtype,
                   head_dim=spec.head_dim, attention_bias=spec.attention_bias,
                   attention_out_bias=spec.attention_out_bias, qk_norm=spec.qk_norm,
                   rope_scaling=spec.rope_scaling)

    def _rope(self, x_THD: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        cos, sin = rotary_cos_sin(position_ids, self.head_dim, self.rope_theta, x_THD.dtype,
                                  self.rope_scaling)
        return apply_rotary(x_THD, cos, sin)

    def _heads(self, proj: nn.Linear, norm: RMSNorm | None, n_TH: torch.Tensor,
               num_heads: int) -> torch.Tensor:
        """[T, heads, D] of a projection, per-head normed when the layer has q/k norms."""
        x = proj(n_TH).view(-1, num_heads, self.head_dim)
        return x if norm is None else norm(x)

    def query(self, x_TH: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """q [T, Hq, D] for the tokens of x (token-local)."""
        q = self._heads(self.wq, self.q_norm, self.attn_norm(x_TH), self.num_heads)
        return self._rope(q, position_ids)

    def key_value(self, x_TH: torch.Tensor,
                  position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v [T, Hkv, D] for the tokens of x (token-local)."""
        n = self.attn_norm(x_TH)
        k = self._heads(self.wk, self.k_norm, n, self.num_kv_heads)
        v = self.wv(n).view(-1, self.num_kv_heads, self.head_dim)
        return self._rope(k, position_ids), v

    def qkv(self, x_TH: torch.Tensor, position_ids: torch.Tensor):
        """q, k, v with one RMSNorm (the path the plain forward takes)."""
        n = self.attn_norm(x_TH)
        q = self._heads(self.wq, self.q_norm, n, self.num_heads)
        k = self._heads(self.wk, self.k_norm, n, self.num_kv_heads)
        v = self.wv(n).view(-1, self.num_kv_heads, self.head_dim)
        return self._rope(q, position_ids), self._rope(k, position_ids), v

    def post(self, x_TH: torch.Tensor, o_THD: torch.Tensor) -> torch.Tensor:
        """Everything after attention (token-local): y = h + W2(silu(W1 n) * W3 n)."""
        h = x_TH + self.wo(o_THD.flatten(1))
        n = self.mlp_norm(h)
        return h + self.w_down(F.silu(self.w_gate(n)) * self.w_up(n))

    def forward(self, x_TH: torch.Tensor, position_ids: torch.Tensor, core) -> torch.Tensor:
        """core(q, k, v) -> o [T, Hq, D] is the attention of the caller's layout."""
        q, k, v = self.qkv(x_TH, position_ids)
        return self.post(x_TH, core(q, k, v))

    @torch.no_grad()
    def reset_parameters(self, *, std: float, out_std: float) -> None:
        for lin_ in (self.wq, self.wk, self.wv, self.w_gate, self.w_up):
            lin_.weight.normal_(0.0, std)
        for lin_ in (self.wo, self.w_down):
            lin_.weight.normal_(0.0, out_std)
        for lin_ in (self.wq, self.wk, self.wv, self.wo):
            if lin_.bias is not None:
                lin_.bias.zero_()
        for norm in (self.attn_norm, self.mlp_norm, self.q_norm, self.k_norm):
            if norm is not None:
                norm.weight.fill_(1.0)
