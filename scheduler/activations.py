"""Peak activation bytes of one rank's micro-batch under each memory scheme.

The memory half of "plans are promises": for the tokens a rank holds in one micro-batch
and the scheme its group runs (scheduler/work.py `Scheme`), the most bytes of activations
live at once on the device, as the executor (workers/model.py, parallelism/) allocates
them. Tests hold these figures within 10% of the memory tracer's measurement of real
steps (tests/workers/test_fidelity_memory.py).

Everything is built from the model's stored MEMO profile (scheduler/memory_model.py,
recorded by workers/memtrace.py for the job's compute dtype): the traced plain layer, the
embedding, the streamed head, a layer's no-grad forward and the K/V projection. Every
traced size is affine in the token count (the head's below its chunk), so a phase's live
bytes are affine per op and a scheme's peak is the largest of a few phases:

    plain     the unrolled trace of the whole model (embedding, L layers, head, backward)
    offload   MEMO (parallelism/offload.py), alpha = offload_ratio, L-1 swapped layers:
                head phase: the resident last layer, its input and the head
                backward:   one layer's forward+backward (its saved activations fetched
                            back or recomputed), the incoming gradient, and the layer below
                            prefetched (its x, o, lse and alpha of its saved activations)
    streambp  layer-wise StreamBP (parallelism/streambp.py), chunk c, host share r of the
              kept layer inputs:
                forward:  (1 - r) of L layer inputs kept, one layer's no-grad forward
                head:     kept inputs, the last hidden state and the head in chunks of c
                backward: kept inputs, dy, the layer's K/V cache with its graph, dK, dV,
                          dx, and either one chunk's layer graph with the chunk's dK, dV
                          or the K/V projection's backward

On a ring, attention is ring attention (parallelism/ring_attention.py), whose forward and
backward hold accumulators and KV blocks in flight besides the kernel's outputs; those
are added at the layer's attention ops (`ring_workspace`).

Torch-free (the planner imports it). Legend: T tokens the rank holds, L layers, h hidden,
Hq/Hkv heads, D head dim, kv = Hkv D, cb compute-dtype bytes, acc accumulator bytes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache, partial

import numpy as np

from scheduler.errors import SpecError
from scheduler.memory_model import (
    ModelMemoryProfile,
    RegionProfile,
    TensorProfile,
    find_profile,
    unrolled_trace,
)
from scheduler.specs import DTYPE_BYTES, ModelSpec
from scheduler.work import NUM_RESIDENT_LAYERS, PLAIN, Scheme, accumulation_bytes

HEAD_CHUNK_TOKENS = 4096  # workers.model.DEFAULT_HEAD_CHUNK: the head's chunk off StreamBP


def live_per_op(sizes, lifetimes, num_ops: int) -> np.ndarray:
    """Bytes live at every op of a trace (int64[num_ops])."""
    delta = np.zeros(num_ops + 1, dtype=np.int64)
    for size, (first, last) in zip(sizes, lifetimes, strict=True):
        delta[first] += size
        delta[last + 1] -= size
    return np.cumsum(delta[:-1])


class Envelope:
    """max over ops of (slope * T + intercept): a phase's live bytes as a function of T.

    Built from per-op live bytes at two token counts inside each regime between the
    breakpoints where a traced size stops growing (a chunked region's chunk).
    """

    def __init__(self, live_at: Callable[[int], np.ndarray], breakpoints: tuple[int, ...] = ()):
        points = sorted({b for b in breakpoints if b > 1})
        edges = [1, *points]
        self._regimes = []  # (upper bound or None, slopes, intercepts)
        for k, lo in enumerate(edges):
            hi = edges[k + 1] if k + 1 < len(edges) else None
            t1, t2 = lo, hi if hi is not None else 2 * lo
            a = (live_at(t2) - live_at(t1)) / (t2 - t1)
            self._regimes.append((hi, a, live_at(t1) - a * t1))

    def __call__(self, num_tokens: float) -> float:
        for hi, a, b in self._regimes:
            if hi is None or num_tokens <= hi:
                return float(np.max(a * num_tokens + b))
        raise AssertionError("unreachable: the last regime is unbounded")


@dataclass(frozen=True, kw_only=True)
class PhasePeak:
    """A scheme's peak and the phase it occurs in."""

    bytes: int
    phase: str


class ActivationModel:
    """Peak device (and host) activation bytes of one rank, per memory scheme.

    `profile` defaults to the stored profile of `model` at compute dtype `dtype`; a
    SpecError names the recording command when there is none.
    """

    def __init__(self, model: ModelSpec, *, dtype: str | None = None,
                 profile: ModelMemoryProfile | None = None):
        dtype = dtype or model.dtype
        self.model = model.model_copy(update={"dtype": dtype})
        self.source = "profile"
        if profile is None:
            try:
                profile = find_profile(self.model)
            except SpecError:
                profile, self.source = synthetic_profile(self.model), "synthetic"
        self.profile = profile
        if self.profile.layer_no_grad is None or self.profile.key_value is None:
            raise SpecError(f"memory profile of {self.model.model_dump()} is version 1 (no "
                            "no-grad forward or K/V trace); re-record it with `python -m "
                            "workers.memtrace --model <preset or config.json>`")
        self.cb = DTYPE_BYTES[dtype]
        self.acc = accumulation_bytes(dtype)
        m = self.model
        self.kv = m.num_kv_heads * m.head_dim
        self.x = m.hidden_size * self.cb  # a hidden state, bytes per token
        self.o = m.num_heads * m.head_dim * self.cb  # the attention output
        self.lse = m.num_heads * self.acc
        self._plain = {ring: _unrolled_envelope(self, ring) for ring in (False, True)}
        layer = self.profile.layer
        self._layer_peak = {ring: Envelope(partial(self._layer_live, ring=ring))
                            for ring in (False, True)}
        self._no_grad = _region_envelope(self.profile.layer_no_grad)
        self._key_value = _region_envelope(self.profile.key_value)
        self._layer_resident = _kind_line(layer, "saved", "output")
        self._kv_resident = _kind_line(self.profile.key_value, "saved", "output")

    # -- per-op traces ---------------------------------------------------------------
    def ring_workspace(self, num_tokens: float) -> tuple[float, float]:
        """Bytes ring attention holds at its forward and backward op besides the kernel's
        outputs: accumulators, the KV block in use and the one in flight, the diagonal
        step's partial result and its merge (forward), and the dK/dV accumulators going
        around the ring (backward). Blocks are taken at T tokens (they differ by +-1)."""
        T, h = num_tokens, self.model.q_dim  # out, dq and their accumulators: q-wide
        cb, acc, kv = self.cb, self.acc, self.kv
        own = 0 if acc == cb else h * acc  # separate out/dq accumulator when not float32/64
        fwd = own + 4 * kv * cb + h * cb + self.lse + 3 * h * acc + self.lse
        bwd = own + h * acc + 4 * kv * cb + 4 * kv * acc + (h + 2 * kv) * cb
        return fwd * T, bwd * T

    def _layer_live(self, num_tokens: int, ring: bool) -> np.ndarray:
        layer = self.profile.layer
        live = live_per_op(*layer.trace(num_tokens), layer.num_ops)
        if ring and layer.attention_ops:
            fwd, bwd = self.ring_workspace(num_tokens)
            live[layer.attention_ops[0]] += int(fwd)
            live[layer.attention_ops[-1]] += int(bwd)
        return live

    # -- peaks -----------------------------------------------------------------------
    def peak(self, num_tokens: int, scheme: Scheme = PLAIN, *, ring_size: int = 1) -> PhasePeak:
        """Peak activation bytes of a micro-batch of `num_tokens` tokens on this rank."""
        if num_tokens < 1:
            return PhasePeak(bytes=0, phase="idle")
        ring = ring_size > 1
        if scheme.name == "streambp":
            if ring:
                raise ValueError("scheme streambp does not run on a ring (docs/streambp.md); "
                                 "use offload or plain")
            phases = self._streambp(num_tokens, scheme)
        elif scheme.name == "offload" and self.model.num_layers > NUM_RESIDENT_LAYERS:
            phases = self._offload(num_tokens, scheme.offload_ratio, ring)
        else:
            phases = {"plain": self._plain[ring](num_tokens)}
        phase = max(phases, key=lambda name: phases[name])
        return PhasePeak(bytes=int(np.ceil(phases[phase])), phase=phase)

    def peak_bytes(self, num_tokens: int, scheme: Scheme = PLAIN, *, ring_size: int = 1) -> int:
        return self.peak(num_tokens, scheme, ring_size=ring_size).bytes

    def _offload(self, T: int, alpha: float, ring: bool) -> dict[str, float]:
        swapped = self.model.num_layers - NUM_RESIDENT_LAYERS
        below = (self.x + self.o + self.lse) * T + alpha * self._layer_resident(T)
        backward = self._layer_peak[ring](T) + self.x * T + below  # + the layer below
        if swapped > 1:  # its own swapped share arrives as copies beside its recompute
            backward += alpha * (self.x + self.o + self.lse) * T
        return {
            "offload forward": self.x * T + self._layer_peak[ring](T),
            "offload head": self._layer_resident(T) + self.x * T + self._head(T, HEAD_CHUNK_TOKENS),
            "offload backward": backward,
        }

    def _streambp(self, T: int, scheme: Scheme) -> dict[str, float]:
        L, r, c = self.model.num_layers, scheme.offload_ratio, scheme.stream_chunk
        kept = (1 - r) * L * self.x * T
        current = r * self.x * T  # the layer input being cut into device and host parts
        cache = self._kv_resident(T) + (2 * self.kv * self.cb + self.x) * T  # + dK, dV, dx
        chunk = self._chunk_peak(min(c, T), T)
        refetch = 2 * r * self.x * T  # the input put back together, the next one prefetched
        backward = kept + refetch + self.x * T + max(
            cache + chunk, (2 * self.kv * self.cb + self.x) * T + self._key_value(T))
        return {"streambp forward": kept + current + self._no_grad(T),
                "streambp head": kept + self.x * T + self._head(T, c),
                "streambp backward": backward}

    def _chunk_peak(self, c: int, T: int) -> float:
        """One StreamBP chunk's layer graph: the plain layer's trace at c tokens, whose
        attention backward returns dK, dV over the chunk's key range (up to T) not c."""
        live = self._chunk_live(c).astype(np.float64)
        ops = self.profile.layer.attention_ops
        if ops:
            live[ops[-1]] += 2 * self.kv * self.cb * (T - c)
        return float(live.max())

    @lru_cache(maxsize=64)  # noqa: B019 (one model per instance, a few chunk sizes)
    def _chunk_live(self, c: int) -> np.ndarray:
        layer = self.profile.layer
        return live_per_op(*layer.trace(c), layer.num_ops)

    def _head(self, T: int, chunk: int) -> float:
        head = self.profile.head
        return _head_envelope(head, chunk)(T)

    # -- host ------------------------------------------------------------------------
    def host_bytes(self, num_tokens: int, scheme: Scheme = PLAIN) -> int:
        """Host bytes the scheme parks for a micro-batch (MEMO: x, o, lse and alpha of the
        saved activations of every swapped layer; StreamBP: r of the layer inputs)."""
        T, L = num_tokens, self.model.num_layers
        if scheme.name == "offload":
            swapped = max(0, L - NUM_RESIDENT_LAYERS)
            per_layer = (self.x + self.o + self.lse) * T + scheme.offload_ratio * \
                self._layer_resident(T)
            return int(swapped * per_layer)
        if scheme.name == "streambp":
            return int(scheme.offload_ratio * L * self.x * T)
        return 0

    def max_tokens(self, room_bytes: float, scheme: Scheme = PLAIN, *,
                   ring_size: int = 1) -> int:
        """The most tokens whose peak fits `room_bytes` (0 when even one token does not)."""
        if self.peak_bytes(1, scheme, ring_size=ring_size) > room_bytes:
            return 0
        lo, hi = 1, 2
        while self.peak_bytes(hi, scheme, ring_size=ring_size) <= room_bytes:
            lo, hi = hi, hi * 2
            if hi > 1 << 44:
                return lo
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self.peak_bytes(mid, scheme, ring_size=ring_size) <= room_bytes:
                lo = mid
            else:
                hi = mid
        return lo


@lru_cache(maxsize=32)
def activation_model(model: ModelSpec, dtype: str | None = None) -> ActivationModel:
    """The ActivationModel of a model at a compute dtype, built once per process."""
    return ActivationModel(model, dtype=dtype)


def synthetic_profile(model: ModelSpec) -> ModelMemoryProfile:
    """An estimated profile for a model nobody has traced (`python -m workers.memtrace`
    records the exact one): the layer's tensors grouped into a few blocks whose per-token
    sizes follow workers/layers.py (as scheduler/offload_lp.py counts them), with the
    float32 islands of RMSNorm for 16-bit models. Within ~20% of the traced peaks of the
    presets (tests/scheduler/test_activations.py); the planner reports which it used."""
    cb = DTYPE_BYTES[model.dtype]
    h, f, kv = model.hidden_size, model.ffn_hidden_size, model.num_kv_heads * model.head_dim
    hq, acc = model.num_heads, accumulation_bytes(model.dtype)
    island = 4 * h if cb < 4 else 0  # RMSNorm's float32 copy of its input

    def region(rows, num_ops, backward_op, attention_ops=(), chunk=None) -> RegionProfile:
        return RegionProfile(tensors=tuple(
            TensorProfile(bytes_per_token=int(a), bytes_fixed=int(b), first_op=first,
                          last_op=last, kind=kind) for a, b, first, last, kind in rows),
            num_ops=num_ops, backward_op=backward_op, fixed_bytes=0, chunk_tokens=chunk,
            attention_ops=attention_ops)

    saved = (7 * h + 4 * kv + 4 * f) * cb + hq * acc + 2 * island
    layer = region([(saved, 0, 0, 2, "saved"), (2 * f * cb, 0, 1, 1, "transient"),
                    (h * cb, 0, 1, 1, "output"), ((2 * h + f) * cb, 0, 2, 2, "transient"),
                    (h * cb, 0, 3, 3, "grad_input")], 4, 2, (1, 2))
    no_grad = region([((4 * h + 2 * kv + 3 * f) * cb + island, 0, 0, 0, "transient"),
                      (h * cb, 0, 0, 0, "output")], 1, 1)
    key_value = region([((2 * h + 3 * kv) * cb + island + 4 * model.head_dim, 0, 0, 1, "saved"),
                        (2 * kv * cb, 0, 0, 1, "output"), (5 * h * 4, 0, 1, 1, "transient"),
                        (h * cb, 0, 1, 1, "grad_input")], 2, 1)
    embedding = region([(h * cb, 0, 0, 0, "output"), (h * cb, 0, 1, 1, "transient")], 2, 1)
    # The head's chunk: float32 logits and their gradient; for 16-bit weights also the
    # float32 dW accumulator and its cast into the gradient (kernels/linear_ce.py).
    vh = model.vocab_size * h
    head = region([((8 + 16 // cb) * model.vocab_size + 2 * h * 4,
                    vh * (8 + cb) if cb < 4 else 0, 0, 0, "transient"),
                   (h * cb, 0, 0, 0, "grad_input")], 1, 1, chunk=HEAD_CHUNK_TOKENS)
    return ModelMemoryProfile(model=model, layer=layer, embedding=embedding, head=head,
                              recorded_tokens=(), source="synthetic estimate (scheduler."
                              "activations.synthetic_profile)", layer_no_grad=no_grad,
                              key_value=key_value)


def _kind_line(region: RegionProfile, *kinds: str) -> Callable[[float], float]:
    a = sum(t.bytes_per_token for t in region.of_kind(*kinds))
    b = sum(t.bytes_fixed for t in region.of_kind(*kinds))
    return lambda T: a * T + b


def _region_envelope(region: RegionProfile) -> Envelope:
    return Envelope(lambda t: live_per_op(*region.trace(t), region.num_ops),
                    (region.chunk_tokens,) if region.chunk_tokens else ())


@lru_cache(maxsize=256)
def _head_envelope(head: RegionProfile, chunk: int) -> Envelope:
    from dataclasses import replace

    return _region_envelope(replace(head, chunk_tokens=chunk))


def _unrolled_envelope(act: ActivationModel, ring: bool) -> Envelope:
    profile, L = act.profile, act.model.num_layers
    layer = profile.layer

    def live(t: int) -> np.ndarray:
        sizes, spans = unrolled_trace(profile, t, num_layers=L)
        num_ops = max(last for _, last in spans) + 1
        out = live_per_op(sizes, spans, num_ops)
        if ring and layer.attention_ops:
            fwd, bwd = act.ring_workspace(t)
            for f_op, b_op in attention_ops_unrolled(profile, L):
                out[f_op] += int(fwd)
                out[b_op] += int(bwd)
        return out

    return Envelope(live, (profile.head.chunk_tokens or HEAD_CHUNK_TOKENS,))


def attention_ops_unrolled(profile: ModelMemoryProfile, num_layers: int) -> list[tuple[int, int]]:
    """Each layer's (forward, backward) attention op on the unrolled trace's op axis
    (scheduler.memory_model.unrolled_trace lays the regions out)."""
    layer, emb, head = profile.layer, profile.embedding, profile.head
    fwd0 = emb.backward_op
    fwd_len, bwd_len = layer.backward_op, layer.num_ops - layer.backward_op
    bwd_start = emb.backward_op + num_layers * fwd_len + head.num_ops
    f_op, b_op = layer.attention_ops[0], layer.attention_ops[-1] - layer.backward_op
    out = []
    for i in range(num_layers):
        bwd0 = bwd_start + (num_layers - 1 - i) * bwd_len
        out.append((fwd0 + i * fwd_len + f_op, bwd0 + b_op))
    return out
