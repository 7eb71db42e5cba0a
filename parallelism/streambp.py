"""Layer-wise StreamBP: exact backward of a decoder layer in sequence chunks (arXiv 2506.03077).

StreamBP (Sec. 3.2, Eq. 5-7) writes the layer's backward as a sum over sequence chunks:
with y = f(x) and chunk i of the queries Q_i,

    dW   = sum_i  (d y_i / d W)^T dy_i,        dx_j = sum_{i >= j} (d y_i / d x_j)^T dy_i,

and y_i depends on x only through x_i (query, residual, MLP: token-local) and through the
keys/values of positions <= the chunk's end (causal attention). So for chunk i, in reverse
order, we recompute y_i from x_i and the layer's cached keys/values K[:end_i], V[:end_i],
backprop dy_i, and accumulate dW, dx_i and dK[:end_i], dV[:end_i]. After the last chunk,
dK, dV go back through the key/value projection once. Only one chunk's activations are
alive at a time; keys and values are computed once per layer, not per chunk (the paper's
version). The forward keeps only each layer's input (like activation checkpointing), which
may itself be swapped to host (`offload_ratio`, parallelism/offload.py).

Packed varlen batches: a chunk [a, b) may start inside sequence s0 and end inside s1. Its
keys are the contiguous range [start(s0), b): every sequence strictly between s0 and s1
lies in it whole, and causal attention is bottom-right aligned per sequence, so a chunk is
one varlen attention call with cu_seqlens_q over [a, b) and cu_seqlens_k over
[start(s0), b), no gather, no mask.

`reference_layer_backward` is the plain autograd backward the tests compare against.

Legend: T tokens, H hidden, Hq / Hkv query / key-value heads, D head dim.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

import kernels
from parallelism.offload import HostSwapper, HostTensor, cu_seqlens_for, track_buffer
from parallelism.progress import PROGRESS


@dataclass(frozen=True, kw_only=True)
class StreamChunk:
    """One query chunk of a packed batch and the key range it attends to."""

    start: int  # first query token (index into the packed batch)
    stop: int  # one past the last query token
    key_start: int  # first key token: the start of the sequence holding `start`
    cu_seqlens_q: torch.Tensor  # int32, per sequence intersecting [start, stop), rel. to start
    cu_seqlens_k: torch.Tensor  # int32, same sequences, relative to key_start


def plan_stream_chunks(cu_seqlens: Sequence[int], chunk_size: int) -> list[StreamChunk]:
    """Cut the packed batch [0, T) into query chunks of `chunk_size` tokens (last may be short)."""
    if chunk_size < 1:
        raise ValueError(f"stream_chunk_size={chunk_size} must be >= 1")
    cu = [int(c) for c in cu_seqlens]
    chunks = []
    for a in range(0, cu[-1], chunk_size):
        b = min(a + chunk_size, cu[-1])
        s = bisect.bisect_right(cu, a) - 1  # sequence holding token a (skips empty ones)
        key_start, q_lens, k_lens = cu[s], [], []
        while s < len(cu) - 1 and cu[s] < b:
            if cu[s + 1] > cu[s]:  # empty sequences take no part (kernels reject them)
                q_lens.append(min(cu[s + 1], b) - max(cu[s], a))
                k_lens.append(min(cu[s + 1], b) - cu[s])
            s += 1
        chunks.append(StreamChunk(start=a, stop=b, key_start=key_start,
                                  cu_seqlens_q=_cumsum(q_lens), cu_seqlens_k=_cumsum(k_lens)))
    return chunks


def _cumsum(lengths: list[int]) -> torch.Tensor:
    out = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    out[1:] = torch.tensor(lengths, dtype=torch.int32).cumsum(0)
    return out


def streambp_layer_backward(layer, x_TH: torch.Tensor, dy_TH: torch.Tensor, *,
                            position_ids: torch.Tensor, chunks: Sequence[StreamChunk],
                            softmax_scale: float | None = None) -> torch.Tensor:
    """dx of y = layer(x); adds (accumulates) the layer's parameter gradients.

    `layer` provides query(x, pos), key_value(x, pos) and post(x, o) (workers.layers).
    """
    x_kv = x_TH.detach().requires_grad_()
    with torch.enable_grad():
        k, v = layer.key_value(x_kv, position_ids)  # the per-layer K/V cache, once
    k_cache, v_cache = track_buffer(k.detach()), track_buffer(v.detach())
    dk, dv = track_buffer(torch.zeros_like(k_cache)), track_buffer(torch.zeros_like(v_cache))
    dx = track_buffer(torch.empty_like(x_TH))
    for c in reversed(chunks):
        _chunk_backward(layer, c, x_TH, dy_TH, k_cache, v_cache, dx, dk, dv, position_ids,
                        softmax_scale)
    torch.autograd.backward([k, v], [dk, dv])
    assert x_kv.grad is not None, "the backward above wrote it"
    return dx.add_(x_kv.grad)


def _chunk_backward(layer, c: StreamChunk, x_TH, dy_TH, k_cache, v_cache, dx, dk, dv,
                    position_ids, softmax_scale) -> None:
    """One query chunk: recompute its part of the layer, backprop its dy, accumulate dx of
    the chunk and dK, dV of its key range (a function, so the chunk's graph and tensors
    are freed before the next chunk or the K/V backward)."""
    x_c = x_TH[c.start:c.stop].detach().requires_grad_()
    k_c = k_cache[c.key_start:c.stop].detach().requires_grad_()
    v_c = v_cache[c.key_start:c.stop].detach().requires_grad_()
    with torch.enable_grad():
        q = layer.query(x_c, position_ids[c.start:c.stop])
        o = kernels.attention(q, k_c, v_c, cu_seqlens_q=cu_seqlens_for(c.cu_seqlens_q, q),
                              cu_seqlens_k=cu_seqlens_for(c.cu_seqlens_k, q), causal=True,
                              softmax_scale=softmax_scale)
        y = layer.post(x_c, o)
    torch.autograd.backward([y], [dy_TH[c.start:c.stop]])
    assert x_c.grad is not None and k_c.grad is not None and v_c.grad is not None
    dx[c.start:c.stop] = x_c.grad
    dk[c.key_start:c.stop] += k_c.grad
    dv[c.key_start:c.stop] += v_c.grad


class StreamBPStack:
    """Forward keeps only layer inputs (a share `offload_ratio` of their tokens on host);
    backward runs `streambp_layer_backward` layer by layer, prefetching the next input."""

    def __init__(self, layers: Iterable[torch.nn.Module], *, position_ids: torch.Tensor,
                 cu_seqlens: torch.Tensor, chunk_size: int, core_forward,
                 offload_ratio: float = 0.0, swapper: HostSwapper | None = None,
                 softmax_scale: float | None = None):
        if not 0.0 <= offload_ratio <= 1.0:
            raise ValueError(f"offload_ratio={offload_ratio} must be in [0, 1]")
        self.layers, self.pos, self.core_forward = list(layers), position_ids, core_forward
        self.chunks = plan_stream_chunks(cu_seqlens.tolist(), chunk_size)
        self.offload_ratio, self.swapper = offload_ratio, swapper
        self.softmax_scale = softmax_scale
        # (host part, device part) of each layer's input; None once its backward ran
        self.inputs: list[tuple[HostTensor | None, torch.Tensor] | None] = []

    def _keep(self, x: torch.Tensor) -> tuple[HostTensor | None, torch.Tensor]:
        n_host = int(round(self.offload_ratio * x.shape[0]))
        if not n_host or self.swapper is None:
            return None, track_buffer(x)
        return self.swapper.offload(x[:n_host]), track_buffer(x[n_host:].clone())

    def _swapper(self) -> HostSwapper:
        assert self.swapper is not None, "_keep puts tokens on host only through a swapper"
        return self.swapper

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.inputs = []
        with torch.no_grad():
            for i, layer in enumerate(self.layers):
                PROGRESS.layer(i, "forward")
                self.inputs.append(self._keep(x))
                x = layer(x, self.pos, lambda q, k, v: self.core_forward(q, k, v)[0])
        return x

    def backward(self, dy: torch.Tensor) -> torch.Tensor:
        for i in reversed(range(len(self.layers))):
            PROGRESS.layer(i, "backward")
            below = self.inputs[i - 1] if i > 0 else None
            if below is not None and below[0] is not None:
                self._swapper().prefetch(below[0])
            kept = self.inputs[i]
            assert kept is not None, "each layer's backward runs once"
            host, dev = kept
            self.inputs[i] = None  # this layer's input dies with its backward
            x = dev if host is None else torch.cat([self._swapper().fetch(host), dev])
            del host, dev
            dy = streambp_layer_backward(self.layers[i], x, dy, position_ids=self.pos,
                                         chunks=self.chunks, softmax_scale=self.softmax_scale)
            del x
        return dy


def reference_layer_backward(layer, x_TH: torch.Tensor, dy_TH: torch.Tensor, *,
                             position_ids: torch.Tensor, cu_seqlens: torch.Tensor,
                             softmax_scale: float | None = None) -> torch.Tensor:
    """Plain autograd through the whole layer (what StreamBP must reproduce exactly)."""
    x = x_TH.detach().requires_grad_()
    with torch.enable_grad():
        y = layer(x, position_ids, lambda q, k, v: kernels.attention(
            q, k, v, cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens, causal=True,
            softmax_scale=softmax_scale))
    torch.autograd.backward([y], [dy_TH])
    assert x.grad is not None, "the backward above wrote it"
    return x.grad
