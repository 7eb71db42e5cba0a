"""Layer-wise StreamBP and the streamed head: exactness and memory.

Exactness: one decoder layer's chunked backward against plain autograd (float64, 1e-10
relative: only the order of float64 sums differs). Chunk plans against a brute-force
per-token reading of causal varlen attention. Memory: LiveBytesMeter counts the bytes saved
for backward plus the buffers each scheme holds, live, with the peak.
"""

from __future__ import annotations

import pytest
import torch

from parallelism.offload import LiveBytesMeter, local_attention_core
from parallelism.streambp import (
    StreamBPStack,
    plan_stream_chunks,
    reference_layer_backward,
    streambp_layer_backward,
)
from workers.layers import DecoderLayer, RMSNorm
from workers.model import AutogradStack, default_position_ids
from workers.objectives import ChunkedHead, HeadInputs, token_logps

TOL = 1e-10


def _layer(dtype=torch.float64, hidden=32, ffn=48, seed=0) -> DecoderLayer:
    torch.manual_seed(seed)
    layer = DecoderLayer(hidden_size=hidden, num_heads=4, num_kv_heads=2, ffn_hidden_size=ffn,
                         rope_theta=10000.0, norm_eps=1e-5, dtype=dtype)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return layer


def _cu(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


@pytest.mark.parametrize("lengths", [[7, 1, 23, 12, 2], [0, 5, 0, 3], [64]])
@pytest.mark.parametrize("chunk_size", [1, 3, 7, 64])
def test_chunk_plan_matches_brute_force(lengths, chunk_size):
    cu = _cu(lengths)
    seq_of = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    covered = []
    for c in plan_stream_chunks(cu.tolist(), chunk_size):
        assert c.stop - c.start <= chunk_size and int(c.cu_seqlens_q[-1]) == c.stop - c.start
        for j in range(len(c.cu_seqlens_q) - 1):
            qs = range(c.start + int(c.cu_seqlens_q[j]), c.start + int(c.cu_seqlens_q[j + 1]))
            ks = range(c.key_start + int(c.cu_seqlens_k[j]),
                       c.key_start + int(c.cu_seqlens_k[j + 1]))
            # bottom-right causal: query i of the segment sees keys up to itself
            for t in qs:
                visible = list(ks)[: len(ks) - (qs[-1] - t)]
                want = [u for u in range(cu[-1]) if seq_of[u] == seq_of[t] and u <= t]
                assert visible == want
            covered.extend(qs)
    assert covered == list(range(int(cu[-1])))


@pytest.mark.parametrize("chunk_size", [1, 5, 16, 1000])
def test_layer_backward_equals_autograd(chunk_size):
    layer, lengths = _layer(), [9, 1, 14, 6]
    cu = _cu(lengths)
    pos, g = default_position_ids(cu), torch.Generator().manual_seed(1)
    x = torch.randn(int(cu[-1]), 32, dtype=torch.float64, generator=g)
    dy = torch.randn(x.shape, dtype=torch.float64, generator=g)
    layer.zero_grad(set_to_none=True)
    want_dx = reference_layer_backward(layer, x, dy, position_ids=pos, cu_seqlens=cu)
    want = {n: p.grad.clone() for n, p in layer.named_parameters()}
    layer.zero_grad(set_to_none=True)
    dx = streambp_layer_backward(layer, x, dy, position_ids=pos,
                                 chunks=plan_stream_chunks(cu.tolist(), chunk_size))
    assert ((dx - want_dx).norm() / want_dx.norm()).item() <= TOL
    for n, p in layer.named_parameters():
        assert ((p.grad - want[n]).norm() / want[n].norm()).item() <= TOL, n


def test_chunk_size_must_be_positive():
    with pytest.raises(ValueError, match="stream_chunk_size=0"):
        plan_stream_chunks([0, 5], 0)


# ---------------------------------------------------------------- memory


def _stack_peak(make, x, dy, params) -> int:
    meter = LiveBytesMeter(exclude=params)
    with meter.measure():
        stack = make()
        stack.forward(x)
        stack.backward(dy)
    return meter.peak_bytes


def test_streambp_stack_saves_about_one_over_d_of_plain():
    """Peak <= plain/D + what StreamBP keeps by design (layer inputs, one layer's K/V)."""
    num_layers, T, H, kv = 2, 256, 32, 16
    layers = torch.nn.ModuleList(_layer(torch.float32, H, 96, seed=i) for i in range(num_layers))
    cu, params = _cu([T]), list(layers.parameters())
    pos, core = default_position_ids(cu), local_attention_core(cu)
    x, dy = torch.randn(T, H), torch.randn(T, H)
    plain = _stack_peak(lambda: AutogradStack(layers, position_ids=pos, core=core), x, dy,
                        params)
    row = T * H * 4  # one [T, H] float32 tensor
    # kept inputs + (K, V, dK, dV) + dx + the K/V projection's saved normed input
    fixed = num_layers * row + 4 * T * kv * 4 + 2 * row
    peaks = {}
    for d in (4, 8):
        peaks[d] = _stack_peak(lambda d=d: StreamBPStack(
            layers, position_ids=pos, cu_seqlens=cu, chunk_size=T // d,
            core_forward=core.forward), x, dy, params)
        assert peaks[d] <= plain / d + fixed, (d, peaks[d], plain)
    assert peaks[8] < peaks[4] < plain / 3


def test_streamed_head_peak_is_an_eighth_of_unchunked():
    """T = V = 32768 on the meta device: shapes and saved bytes are real, no memory is used."""
    T, V, H, chunk = 32768, 32768, 64, 2048
    dev = torch.device("meta")
    norm = RMSNorm(H, eps=1e-5, dtype=torch.float32).to(dev)
    weight = torch.nn.Parameter(torch.empty(V, H, device=dev))
    hidden = torch.empty(T, H, device=dev)
    targets = torch.zeros(T, dtype=torch.long, device=dev)
    params = [weight, *norm.parameters()]

    unchunked = LiveBytesMeter(exclude=params)
    with unchunked.measure():
        h = hidden.detach().requires_grad_()
        (-token_logps(h, norm, weight, targets).sum()).backward()

    streamed = LiveBytesMeter(exclude=params)
    with streamed.measure():
        inputs = HeadInputs(hidden_TH=hidden, targets_T=targets, seq_index_T=targets,
                            num_sequences=1, chunk_size=chunk, grad_scale=1.0)
        head = ChunkedHead(inputs, norm, weight)
        for sl in reversed(list(head.slices())):
            head.backward_chunk(sl, lambda lp, s: -lp.sum())
    assert unchunked.peak_bytes >= T * V * 4  # the [T, V] log-probs alone
    assert streamed.peak_bytes <= unchunked.peak_bytes / 8
