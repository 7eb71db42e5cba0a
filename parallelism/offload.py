"""MEMO token-wise activation swap/recompute (arXiv 2407.12117, Sec. 4.1, Eq. 1-2).

Every op of a decoder layer but attention is token-local, so its activations for any token
can be recomputed from two tensors: the layer input x and the attention output o (plus
the softmax log-sum-exp). MEMO therefore always moves x and o (and lse) to host memory,
moves the saved activations of a fraction alpha of the tokens to host as well, and
recomputes the saved activations of the other 1 - alpha of the tokens in backward:

    device bytes per layer ~ 0,  host bytes ~ |x| + |o| + alpha * |rest|,
    recompute FLOPs ~ (1 - alpha) * token-local FLOPs.

alpha is the largest value whose copy time hides under the layer's compute (and whose
host bytes fit), see scheduler/offload_lp.py. The last `num_resident_layers` layers are
not swapped: their backward starts right after the forward, so a swap could not finish.

On CUDA, host buffers are pinned, copies run on a separate stream ordered by events, and
the backward of layer i+1 prefetches layer i. On CPU the same code runs with a separate
host buffer (a copy), so exactness is tested here.

Also here: `LiveBytesMeter`, which counts the bytes saved for backward and the buffers the
memory schemes hold on the device, live, with their peak (how CPU benchmarks and tests
measure activation memory).

Legend: T tokens, H hidden, Hq query heads, D head dim.
"""

from __future__ import annotations

import contextvars
import math
import weakref
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch.autograd.graph import GradientEdge, get_gradient_edge, saved_tensors_hooks

import kernels
from parallelism.progress import PROGRESS

# --------------------------------------------------------------------------- memory meter

_METER: contextvars.ContextVar[LiveBytesMeter | None] = contextvars.ContextVar(
    "ringmaster_live_bytes_meter", default=None)


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


class LiveBytesMeter:
    """Live device bytes of saved-for-backward tensors and of tracked buffers, with the peak.

    Storages are counted once however many tensors view them; parameters are excluded
    (they are weights, not activations). Host copies made by HostSwapper are counted in
    `host_bytes`, not in `live_bytes`.
    """

    def __init__(self, exclude: Iterable[torch.Tensor] = ()):
        self._exclude = {_storage_key(p) for p in exclude}
        self._refs: dict[int, int] = {}
        self._sizes: dict[int, int] = {}
        self.live_bytes = 0
        self.peak_bytes = 0
        self.host_bytes = 0
        self.peak_host_bytes = 0

    def _acquire(self, t: torch.Tensor) -> int | None:
        key = _storage_key(t)
        if key in self._exclude:
            return None
        if key not in self._refs:
            self._refs[key] = 0
            self._sizes[key] = t.untyped_storage().nbytes()
            self.live_bytes += self._sizes[key]
            self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        self._refs[key] += 1
        return key

    def _release(self, key: int | None) -> None:
        if key is None:
            return
        self._refs[key] -= 1
        if not self._refs[key]:
            del self._refs[key]
            self.live_bytes -= self._sizes.pop(key)

    def track(self, t: torch.Tensor) -> torch.Tensor:
        """Count `t` until the Python object dies (buffers the schemes hold themselves)."""
        key = self._acquire(t)
        weakref.finalize(t, self._release, key)
        return t

    def track_host(self, host: torch.Tensor) -> None:
        """Count a host copy until it dies (host memory, apart from `live_bytes`)."""
        nbytes = host.untyped_storage().nbytes()
        self.host_bytes += nbytes
        self.peak_host_bytes = max(self.peak_host_bytes, self.host_bytes)
        weakref.finalize(host, self._drop_host, nbytes)

    def _drop_host(self, nbytes: int) -> None:
        self.host_bytes -= nbytes

    def pack(self, t: torch.Tensor):
        return _Counted(self, t)

    @contextmanager
    def measure(self):
        """Count saved tensors (innermost hooks win: offloaded ones go to host) and buffers."""
        token = _METER.set(self)
        try:
            with saved_tensors_hooks(self.pack, _Counted.unpack):
                yield self
        finally:
            _METER.reset(token)


class _Counted:
    __slots__ = ("meter", "tensor", "key")

    def __init__(self, meter: LiveBytesMeter, t: torch.Tensor):
        self.meter, self.tensor, self.key = meter, t, meter._acquire(t)

    @staticmethod
    def unpack(c: _Counted) -> torch.Tensor:
        return c.tensor

    def __del__(self):
        self.meter._release(self.key)


def track_buffer(t: torch.Tensor) -> torch.Tensor:
    """Report a device buffer to the active LiveBytesMeter, if any (no-op otherwise)."""
    meter = _METER.get()
    return meter.track(t) if meter is not None else t


# --------------------------------------------------------------------------- host swapping


@dataclass(eq=False)
class HostTensor:
    """A tensor parked in host memory, plus its device copy once prefetched."""

    host: torch.Tensor
    device: torch.device
    copied: torch.cuda.Event | None = None  # device->host copy done (CUDA only)
    prefetched: torch.Tensor | None = None  # device copy being filled (after prefetch)
    arrived: torch.cuda.Event | None = None  # host->device copy done (CUDA only)


class HostSwapper:
    """Device <-> host copies: pinned buffers on a side stream (CUDA) or plain copies (CPU)."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.is_cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if self.is_cuda else None

    def offload(self, t: torch.Tensor) -> HostTensor:
        t = t.detach()
        # meta tensors (shape-only memory accounting) get a meta "host" copy
        host = torch.empty(t.shape, dtype=t.dtype, device="meta" if t.is_meta else "cpu",
                           pin_memory=self.is_cuda)
        meter = _METER.get()
        if meter is not None:
            meter.track_host(host)
        if self.stream is None:  # CPU
            host.copy_(t)
            return HostTensor(host=host, device=self.device)
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            host.copy_(t, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.stream)
        t.record_stream(self.stream)  # keep t's memory until the copy has read it
        return HostTensor(host=host, device=self.device, copied=event)

    def prefetch(self, h: HostTensor) -> None:
        """Start the host->device copy (on CUDA it overlaps the current stream's work)."""
        if h.prefetched is not None:
            return
        if self.stream is None:  # CPU
            h.prefetched = h.host.clone()
            return
        assert h.copied is not None, "a CUDA offload records its copy's event"
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(h.copied)
            h.prefetched = h.host.to(self.device, non_blocking=True)
            h.arrived = torch.cuda.Event()
            h.arrived.record(self.stream)

    def fetch(self, h: HostTensor) -> torch.Tensor:
        """The device tensor (prefetching now if nobody did), safe to use on this stream."""
        self.prefetch(h)
        t, h.prefetched = h.prefetched, None
        assert t is not None, "prefetch just filled it"
        if self.is_cuda:
            assert h.arrived is not None, "a CUDA prefetch records its copy's event"
            torch.cuda.current_stream(self.device).wait_event(h.arrived)
            t.record_stream(torch.cuda.current_stream(self.device))
        return track_buffer(t)

    @contextmanager
    def saved_tensors_to_host(self, params: Iterable[torch.Tensor], handles: list[HostTensor]):
        """Every activation autograd saves inside goes to host (parameters stay put)."""
        param_keys = {_storage_key(p) for p in params}
        # A tensor saved by several ops is copied once. `seen` also holds the tensor until
        # the block ends, so its storage address cannot be reused by a new tensor meanwhile.
        seen: dict[tuple, tuple[torch.Tensor, HostTensor]] = {}

        def pack(t: torch.Tensor):
            if t.numel() == 0:  # a fresh empty tensor: an empty view would pin its base
                return torch.empty_like(t)
            if _storage_key(t) in param_keys:
                return t
            ident = (_storage_key(t), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
            if ident not in seen:
                seen[ident] = (t, self.offload(t))
                handles.append(seen[ident][1])
            return seen[ident][1]

        def unpack(h):
            return self.fetch(h) if isinstance(h, HostTensor) else h

        try:
            with saved_tensors_hooks(pack, unpack):
                yield
        finally:
            seen.clear()


# --------------------------------------------------------------------------- attention core


@dataclass(frozen=True, kw_only=True)
class AttentionCore:
    """The layer's one cross-token op, as forward/backward with the log-sum-exp exposed."""

    forward: Callable  # (q, k, v) -> (o [T, Hq, D], lse [Hq, T] float32), no autograd
    backward: Callable  # (do, q, k, v, o, lse) -> (dq, dk, dv)
    autograd: Callable  # (q, k, v) -> o with autograd (the plain path)


def cu_seqlens_for(cu_seqlens: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """cu_seqlens where the kernels want it: q's device (the CPU for meta, shape-only runs)."""
    device = torch.device("cpu") if q.device.type == "meta" else q.device
    return cu_seqlens if cu_seqlens.device == device else cu_seqlens.to(device)


def local_attention_core(cu_seqlens: torch.Tensor, *,
                         softmax_scale: float | None = None) -> AttentionCore:
    """Causal varlen attention of a packed batch held whole by this rank (kernels/)."""
    placed: dict[torch.device, torch.Tensor] = {}

    def kw(q: torch.Tensor) -> dict:
        if q.device not in placed:
            placed[q.device] = cu_seqlens_for(cu_seqlens, q)
        cu = placed[q.device]
        return dict(cu_seqlens_q=cu, cu_seqlens_k=cu, causal=True, softmax_scale=softmax_scale)

    return AttentionCore(
        forward=lambda q, k, v: kernels.attention_with_lse(q, k, v, **kw(q)),
        backward=lambda do, q, k, v, o, lse: kernels.attention_with_lse_backward(
            do, q, k, v, o, lse, **kw(q)),
        autograd=lambda q, k, v: kernels.attention(q, k, v, **kw(q)),
    )


def ring_attention_core(cu_seqlens: torch.Tensor, ring: Sequence[int], *,
                        softmax_scale: float | None = None, group=None,
                        comm_stats=None) -> AttentionCore:
    """Zigzag ring attention of this rank's shard (parallelism/ring_attention.py).

    The ring handshake (ring_attention_setup) runs once, on the first forward; every layer
    of the step reuses it, since every layer sees the same shard layout, whichever path
    (plain autograd or the memory schemes' forward/backward) runs. All members must run
    the same layers in the same order (they do: the step is the same program on each).
    `comm_stats` (parallelism.CommStats) counts the bytes this rank sends per channel.
    """
    from parallelism.ring_attention import (
        _RingAttention,
        ring_attention_backward,
        ring_attention_forward,
        ring_attention_setup,
    )

    state: dict[str, object] = {}

    def setup(q: torch.Tensor, k: torch.Tensor):
        if "setup" not in state:
            state["setup"] = ring_attention_setup(q, k, cu_seqlens=cu_seqlens, ring=ring,
                                                  softmax_scale=softmax_scale, group=group,
                                                  comm_stats=comm_stats)
        return state["setup"]

    return AttentionCore(
        forward=lambda q, k, v: ring_attention_forward(q, k, v, setup(q, k)),
        backward=lambda do, q, k, v, o, lse: ring_attention_backward(do, q, k, v, o, lse,
                                                                      setup(q, k)),
        autograd=lambda q, k, v: _RingAttention.apply(q.contiguous(), k.contiguous(),
                                                      v.contiguous(), setup(q, k)))


# --------------------------------------------------------------------------- MEMO layer stack


class _GradCatcher(torch.autograd.Function):
    """Identity whose backward hands the incoming gradient to a box.

    The swapped part of a layer is a graph over a slice of x (or o). A leaf there would
    pin that slice on the device until backward (autograd's AccumulateGrad holds it);
    this node holds nothing, so only the packed (host) tensors outlive the forward.
    """

    @staticmethod
    def forward(ctx, x, anchor, box):
        ctx.box = box
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        ctx.box.append(grad)
        return None, None, None


def _catch(x: torch.Tensor, anchor: torch.Tensor, box: list) -> torch.Tensor:
    return _GradCatcher.apply(x.detach(), anchor, box)


def _split(alpha: float, num_tokens: int) -> int:
    """Tokens whose activations are swapped (the first ones); the rest are recomputed."""
    return min(num_tokens, math.ceil(alpha * num_tokens - 1e-9))


@dataclass(eq=False)
class _SwappedLayer:
    """What one offloaded layer keeps between its forward and its backward (all on host)."""

    num_swapped: int
    x: HostTensor
    o: HostTensor
    lse: HostTensor
    qkv: tuple[HostTensor, ...] = ()  # q, k, v of the swapped tokens
    qkv_edges: tuple[GradientEdge, ...] = ()  # autograd edges of the swapped tokens' q, k, v
    y_edge: GradientEdge | None = None  # autograd edge of the swapped tokens' layer output
    boxes: dict[str, list] = field(default_factory=dict)  # grads caught at x and o
    handles: list[HostTensor] = field(default_factory=list)  # saved tensors on host


@dataclass(eq=False)
class _ResidentLayer:
    """A layer kept on the device: plain autograd."""

    x_leaf: torch.Tensor
    y_edge: GradientEdge


class TokenwiseOffloadStack:
    """Runs a stack of decoder layers forward, then backward, under MEMO's swap/recompute.

    Layers need `qkv(x, pos)` and `post(x, o)` (token-local) and `forward(x, pos, core)`;
    `core` is the attention (local or ring). `alpha` is the share of tokens whose remaining
    activations are swapped; 0 recomputes them all, 1 swaps them all.
    """

    def __init__(self, layers: Iterable[torch.nn.Module], *, position_ids: torch.Tensor,
                 core: AttentionCore, alpha: float, swapper: HostSwapper,
                 num_resident_layers: int = 1):
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"offload_ratio={alpha} must be in [0, 1]")
        self.layers, self.pos, self.core = list(layers), position_ids, core
        self.alpha, self.swapper = alpha, swapper
        self.num_offloaded = max(0, len(self.layers) - num_resident_layers)
        self.states: list = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.states = []
        for i, layer in enumerate(self.layers):
            PROGRESS.layer(i, "forward")
            run = self._forward_swapped if i < self.num_offloaded else self._forward_resident
            x = run(layer, x)
        return x

    def backward(self, dy: torch.Tensor) -> torch.Tensor:
        for i in reversed(range(len(self.layers))):
            PROGRESS.layer(i, "backward")
            if i > 0 and isinstance(self.states[i - 1], _SwappedLayer):
                self._prefetch(self.states[i - 1])  # overlaps this layer's backward (CUDA)
            state, self.states[i] = self.states[i], None
            if isinstance(state, _SwappedLayer):
                dy = self._backward_swapped(self.layers[i], state, dy)
            else:
                torch.autograd.backward([state.y_edge], [dy])
                dy = state.x_leaf.grad
        return dy

    # ---- resident layers: plain autograd on the device
    def _forward_resident(self, layer, x):
        x_leaf = track_buffer(x.detach().requires_grad_())
        with torch.enable_grad():
            y = layer(x_leaf, self.pos, self.core.autograd)
        self.states.append(_ResidentLayer(x_leaf=x_leaf, y_edge=get_gradient_edge(y)))
        return y.detach()

    # ---- swapped layers
    def _forward_swapped(self, layer, x):
        n_s, params = _split(self.alpha, x.shape[0]), list(layer.parameters())
        anchor = x.new_zeros((), requires_grad=True)
        boxes: dict[str, list] = {"x_pre": [], "x_post": [], "o": []}
        handles: list[HostTensor] = []
        with torch.enable_grad(), self.swapper.saved_tensors_to_host(params, handles):
            q_s, k_s, v_s = layer.qkv(_catch(x[:n_s], anchor, boxes["x_pre"]), self.pos[:n_s])
        with torch.no_grad():
            q_r, k_r, v_r = layer.qkv(x[n_s:], self.pos[n_s:])
            q, k, v = (torch.cat([a.detach(), b]) for a, b in ((q_s, q_r), (k_s, k_r),
                                                                (v_s, v_r)))
            o, lse = self.core.forward(q, k, v)
        with torch.enable_grad(), self.swapper.saved_tensors_to_host(params, handles):
            y_s = layer.post(_catch(x[:n_s], anchor, boxes["x_post"]),
                             _catch(o[:n_s], anchor, boxes["o"]))
        with torch.no_grad():
            y = torch.cat([y_s.detach(), layer.post(x[n_s:], o[n_s:])])
        off = self.swapper.offload
        self.states.append(_SwappedLayer(
            num_swapped=n_s, x=off(x), o=off(o), lse=off(lse),
            qkv=tuple(off(t) for t in (q_s, k_s, v_s)),
            qkv_edges=tuple(get_gradient_edge(t) for t in (q_s, k_s, v_s)) if n_s else (),
            y_edge=get_gradient_edge(y_s) if n_s else None, boxes=boxes, handles=handles))
        return y

    def _prefetch(self, st: _SwappedLayer) -> None:
        for h in (st.x, st.o, st.lse, *st.qkv, *st.handles):
            self.swapper.prefetch(h)

    def _backward_swapped(self, layer, st: _SwappedLayer, dy: torch.Tensor) -> torch.Tensor:
        n_s, fetch = st.num_swapped, self.swapper.fetch
        x, o, lse = fetch(st.x), fetch(st.o), fetch(st.lse)
        # post: swapped tokens replay their saved graph, the others recompute it
        x_r, o_r = x[n_s:].detach().requires_grad_(), o[n_s:].detach().requires_grad_()
        with torch.enable_grad():
            torch.autograd.backward([layer.post(x_r, o_r)], [dy[n_s:]])
        if n_s:
            assert st.y_edge is not None, "a layer with swapped tokens records their edge"
            torch.autograd.backward([st.y_edge], [dy[:n_s]])
        assert x_r.grad is not None and o_r.grad is not None, "the backward above wrote them"
        dx_post = torch.cat([_caught(st.boxes["x_post"], x[:n_s]), x_r.grad])
        do = torch.cat([_caught(st.boxes["o"], o[:n_s]), o_r.grad])
        # attention: q, k, v of swapped tokens from host, of the others recomputed
        x_r2 = x[n_s:].detach().requires_grad_()
        with torch.enable_grad():
            qkv_r = layer.qkv(x_r2, self.pos[n_s:])
        qkv = [torch.cat([fetch(h), t.detach()]) for h, t in zip(st.qkv, qkv_r, strict=True)]
        dqkv = self.core.backward(do, *qkv, o, lse)
        torch.autograd.backward(list(qkv_r), [g[n_s:] for g in dqkv])
        if n_s:
            torch.autograd.backward(list(st.qkv_edges), [g[:n_s] for g in dqkv])
        assert x_r2.grad is not None, "the backward above wrote it"
        return dx_post + torch.cat([_caught(st.boxes["x_pre"], x[:n_s]), x_r2.grad])


def _caught(box: list, like: torch.Tensor) -> torch.Tensor:
    """The gradient a _GradCatcher received (zeros if the slice is empty)."""
    if not box:
        return torch.zeros_like(like)
    return box.pop() if len(box) == 1 else sum(box)
