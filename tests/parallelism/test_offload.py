"""MEMO token-wise swap/recompute: exactness, where the bytes go, and the host swapper.

Reference: plain autograd through the same layers (float64, 1e-10 relative; swapping is a
copy and recomputation repeats the same float64 ops, so only summation order differs).
"""

from __future__ import annotations

import pytest
import torch

from parallelism.offload import HostSwapper, LiveBytesMeter, TokenwiseOffloadStack, _split
from parallelism.offload import local_attention_core as core_of
from workers.layers import DecoderLayer
from workers.model import AutogradStack, default_position_ids

TOL = 1e-10
LENGTHS = [9, 1, 14, 6]


def _stack_inputs(dtype=torch.float64, num_layers=2, hidden=32):
    torch.manual_seed(0)
    layers = torch.nn.ModuleList(
        DecoderLayer(hidden_size=hidden, num_heads=4, num_kv_heads=2, ffn_hidden_size=48,
                     rope_theta=10000.0, norm_eps=1e-5, dtype=dtype) for _ in range(num_layers))
    with torch.no_grad():
        for p in layers.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    cu = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()], dtype=torch.int32)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(int(cu[-1]), hidden, dtype=dtype, generator=g)
    dy = torch.randn(x.shape, dtype=dtype, generator=g)
    return layers, cu, default_position_ids(cu), x, dy


def _run(stack, layers, x, dy):
    layers.zero_grad(set_to_none=True)
    stack.forward(x)
    dx = stack.backward(dy)
    return dx, {n: p.grad.clone() for n, p in layers.named_parameters()}


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("resident", [0, 1])
def test_offload_stack_equals_autograd(alpha, resident):
    layers, cu, pos, x, dy = _stack_inputs()
    want_dx, want = _run(AutogradStack(layers, position_ids=pos, core=core_of(cu)), layers,
                         x, dy)
    stack = TokenwiseOffloadStack(layers, position_ids=pos, core=core_of(cu), alpha=alpha,
                                  swapper=HostSwapper(torch.device("cpu")),
                                  num_resident_layers=resident)
    dx, got = _run(stack, layers, x, dy)
    assert ((dx - want_dx).norm() / want_dx.norm()).item() <= TOL
    for n, g in want.items():
        assert ((got[n] - g).norm() / g.norm()).item() <= TOL, n


def test_swapped_layers_hold_nothing_on_device_between_forward_and_backward():
    layers, cu, pos, x, dy = _stack_inputs(torch.float32, num_layers=3)
    params = list(layers.parameters())
    plain = LiveBytesMeter(exclude=params)
    with plain.measure():
        stack = AutogradStack(layers, position_ids=pos, core=core_of(cu))
        stack.forward(x)
        plain_after_forward = plain.live_bytes
        stack.backward(dy)
    host = {}
    for alpha in (0.0, 0.5, 1.0):
        meter = LiveBytesMeter(exclude=params)
        with meter.measure():
            stack = TokenwiseOffloadStack(layers, position_ids=pos, core=core_of(cu),
                                          alpha=alpha, swapper=HostSwapper(torch.device("cpu")),
                                          num_resident_layers=0)
            stack.forward(x)
            assert meter.live_bytes <= plain_after_forward / 20, alpha
            stack.backward(dy)
        host[alpha] = meter.peak_host_bytes
    # x, o and lse always; the rest grows with alpha
    assert host[0.0] < host[0.5] < host[1.0]
    per_layer_always = x.numel() * 4 * 2 + 4 * x.shape[0] * 4
    assert host[0.0] == 3 * per_layer_always


def test_host_swapper_copies_are_independent():
    swapper = HostSwapper(torch.device("cpu"))
    t = torch.randn(5, 3)
    h = swapper.offload(t)
    assert h.host.untyped_storage().data_ptr() != t.untyped_storage().data_ptr()
    before = t.clone()
    t.add_(1.0)
    swapper.prefetch(h)
    assert torch.equal(swapper.fetch(h), before)


def test_split_and_alpha_validation():
    assert [_split(a, 10) for a in (0.0, 0.05, 0.5, 1.0)] == [0, 1, 5, 10]
    layers, cu, pos, *_ = _stack_inputs()
    with pytest.raises(ValueError, match="offload_ratio=1.5"):
        TokenwiseOffloadStack(layers, position_ids=pos, core=core_of(cu), alpha=1.5,
                              swapper=HostSwapper(torch.device("cpu")))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (pinned memory, streams)")
def test_cuda_swapper_round_trip_on_side_stream():
    swapper = HostSwapper(torch.device("cuda"))
    t = torch.randn(1024, 64, device="cuda")
    h = swapper.offload(t)
    assert h.host.is_pinned()
    swapper.prefetch(h)
    assert torch.equal(swapper.fetch(h), t)
