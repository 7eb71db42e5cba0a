"""Allocation traces of a decoder layer, the embedding and the LM head (MEMO's profiling).

MEMO (arXiv 2407.12117, Sec. 4.3) plans addresses from the sequence of memory requests
one training step issues; a request is a tensor's size and its lifetime in op order. This
module records that sequence for one forward+backward of a region of our Transformer:

- on CPU and on the meta device, a TorchDispatchMode counts aten ops and tracks every new
  storage they create with a weak reference to the storage itself, so a storage is live
  from the op that creates it to the last op before its refcount reaches zero (views and
  in-place results share a storage and are not new requests);
- on CUDA, from the caching allocator's own history
  (`torch.cuda.memory._record_memory_history`), one op per allocator event.

Attention is traced as one opaque op whose only requests are its outputs (`out`, `lse`
forward; `dq`, `dk`, `dv` backward): that is the memory contract of the fused kernel that
runs on GPUs (its tiles live in SRAM). The torch backend's tile buffers on CPU are
reported separately as `scratch_peak_bytes`. With that, a layer issues the same requests
at every length, each of a size affine in the number of tokens, so `record_profile` fits
one torch-free profile (scheduler.memory_model.ModelMemoryProfile) per model. On the meta
device no memory is touched, so even llama-70b layers trace in well under a second.

Legend: T tokens, H hidden size, Hq query heads, D head dim, V vocabulary.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from unittest.mock import patch

import torch
import torch.nn.functional as F
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import kernels
from scheduler.memory_model import (
    PROFILES_PATH,
    ModelMemoryProfile,
    RegionProfile,
    TensorProfile,
    fit_affine,
    profile_to_json,
)
from scheduler.specs import ModelSpec, model_preset
from workers.layers import DecoderLayer
from workers.model import DEFAULT_HEAD_CHUNK as HEAD_CHUNK_TOKENS  # the head's chunk

DTYPES = {"float64": torch.float64, "float32": torch.float32, "float16": torch.float16,
          "bfloat16": torch.bfloat16}


@dataclass(frozen=True, kw_only=True)
class TracedTensor:
    """One memory request of a traced region."""

    nbytes: int      # bytes of the storage
    first_op: int    # op that created it
    last_op: int     # last op it was live at (inclusive)
    kind: str        # saved | output | grad_input | transient (scheduler.memory_model.KINDS)
    op_name: str     # the aten op (or opaque region) that created it


@dataclass(frozen=True, kw_only=True)
class RegionTrace:
    """The requests of one forward+backward of a region at `num_tokens` tokens."""

    num_tokens: int
    tensors: tuple[TracedTensor, ...]
    num_ops: int
    backward_op: int            # first op of the backward
    fixed_bytes: int            # parameter gradients (independent of tokens, not planned)
    scratch_peak_bytes: int     # largest live scratch inside an opaque region (CPU tiles)
    attention_ops: tuple[int, ...] = ()  # ops of the opaque attention (forward, backward)

    @property
    def sizes(self) -> list[int]:
        return [t.nbytes for t in self.tensors]

    @property
    def lifetimes(self) -> list[tuple[int, int]]:
        return [(t.first_op, t.last_op) for t in self.tensors]


class StorageLifetimeTracker(TorchDispatchMode):
    """Records (bytes, first op, last op) of every storage created while active."""

    def __init__(self):
        super().__init__()
        self.op = 0                    # index the next op gets
        self.records: list[dict] = []  # nbytes, first, last (None while live), name, ref
        self._live: dict[int, int] = {}          # storage cdata -> record index
        self._opaque_depth = 0
        self._scratch: dict[int, tuple[StorageWeakRef, int]] = {}
        self.scratch_peak_bytes = 0
        self.marks: dict[str, int] = {}
        self.opaque_ops: list[int] = []  # op index of every opaque region, in order

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self._opaque_depth:
            out = func(*args, **(kwargs or {}))
            self._note_scratch(out)
            return out
        self._poll(last=self.op - 1)
        out = func(*args, **(kwargs or {}))
        self._poll(last=self.op)
        inputs = {_cdata(t) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        self._register(out, name=str(func.overloadpacket.__name__), exclude=inputs)
        self.op += 1
        return out

    def mark(self, name: str) -> None:
        """Remember the index of the next op under `name` (e.g. where backward starts)."""
        self._poll(last=self.op - 1)
        self.marks[name] = self.op

    @contextmanager
    def opaque(self, name: str) -> Iterator[list]:
        """Everything inside counts as one op; only tensors appended to the yielded list
        (the region's outputs) are requests, the rest is the region's scratch."""
        self._poll(last=self.op - 1)
        outputs: list = []
        self._opaque_depth += 1
        try:
            yield outputs
        finally:
            self._opaque_depth -= 1
        self._scratch.clear()
        self._poll(last=self.op)
        self._register(outputs, name=name)
        self.opaque_ops.append(self.op)
        self.op += 1

    def finish(self) -> None:
        """Close the trace: what is still live is marked live to the end (last = None)."""
        self._poll(last=self.op - 1)

    def storage_record(self, tensor: torch.Tensor) -> int | None:
        """Index of the record of `tensor`'s storage, if it was created during the trace."""
        return self._live.get(StorageWeakRef(tensor.untyped_storage()).cdata)

    def _register(self, out, *, name: str, exclude: frozenset | set = frozenset()) -> None:
        """Track the storages of `out` that are new: not live already and not an input's
        (a view or an in-place result of a tensor made before the trace is not a request)."""
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            ref = StorageWeakRef(t.untyped_storage())
            if ref.cdata in self._live or ref.cdata in exclude:
                continue
            self._live[ref.cdata] = len(self.records)
            self.records.append(dict(nbytes=t.untyped_storage().nbytes(), first=self.op,
                                     last=None, name=name, ref=ref))

    def _poll(self, *, last: int) -> None:
        for cdata, idx in list(self._live.items()):
            if self.records[idx]["ref"].expired():
                self.records[idx]["last"] = last
                del self._live[cdata]

    def _note_scratch(self, out) -> None:
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                ref = StorageWeakRef(t.untyped_storage())
                self._scratch.setdefault(ref.cdata, (ref, t.untyped_storage().nbytes()))
        self._scratch = {k: v for k, v in self._scratch.items() if not v[0].expired()}
        live = sum(n for _, n in self._scratch.values())
        self.scratch_peak_bytes = max(self.scratch_peak_bytes, live)


class _OpaqueAttention(torch.autograd.Function):
    """Causal attention over one sequence, traced as one op per direction.

    Real tensors go through kernels.attention_with_lse(_backward); meta tensors get
    outputs of the fused kernel's shapes and dtypes (out like q, lse [Hq, T] float32 or
    float64), which is all the trace needs.
    """

    @staticmethod
    def forward(ctx, q, k, v, cu, tracker):
        with tracker.opaque("attention_fwd") as outputs:
            if q.is_meta:
                lse_dtype = kernels.accumulation_dtype(q.dtype)
                out = torch.empty_like(q)
                lse = q.new_empty((q.shape[1], q.shape[0]), dtype=lse_dtype)
            else:
                out, lse = kernels.attention_with_lse(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu,
                                                      causal=True)
            outputs += [out, lse]
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.cu, ctx.tracker = cu, tracker
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        with ctx.tracker.opaque("attention_bwd") as outputs:
            if q.is_meta:
                grads = (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v))
            else:
                grads = kernels.attention_with_lse_backward(
                    dout.contiguous(), q, k, v, out, lse, cu_seqlens_q=ctx.cu,
                    cu_seqlens_k=ctx.cu, causal=True)
            outputs += list(grads)
        return (*grads, None, None)


def trace_layer(layer: DecoderLayer, num_tokens: int, *, seed: int = 0) -> RegionTrace:
    """Requests of `layer(x, position_ids, core)` forward then backward on one sequence.

    The layer's device and dtype are its parameters'. Its input x and the incoming
    gradient come from outside the trace (the layers around it own them).
    """
    param = next(layer.parameters())
    device, dtype = param.device, param.dtype
    x, dy = _random((num_tokens, _hidden(layer)), device, dtype, seed, count=2)
    x.requires_grad_()
    pos = torch.arange(num_tokens, device=device)
    cu = torch.tensor([0, num_tokens], dtype=torch.int32)
    layer.zero_grad(set_to_none=True)
    tracker = StorageLifetimeTracker()
    with tracker:
        y = layer(x, pos, lambda q, k, v: _OpaqueAttention.apply(q, k, v, cu, tracker))
        tracker.mark("backward")
        y.backward(dy)
        tracker.finish()
    special = {"output": [y], "grad_input": [x.grad],
               "fixed": [p.grad for p in layer.parameters() if p.grad is not None]}
    return _region_trace(tracker, num_tokens, special)


def trace_layer_no_grad(layer: DecoderLayer, num_tokens: int, *, seed: int = 0
                        ) -> RegionTrace:
    """Requests of `layer(x, position_ids, core)` under no_grad: the forward layer-wise
    StreamBP runs (parallelism/streambp.py). Everything but the output is transient."""
    param = next(layer.parameters())
    (x,) = _random((num_tokens, _hidden(layer)), param.device, param.dtype, seed, count=1)
    pos = torch.arange(num_tokens, device=param.device)
    cu = torch.tensor([0, num_tokens], dtype=torch.int32)
    tracker = StorageLifetimeTracker()
    with tracker, torch.no_grad():
        y = layer(x, pos, lambda q, k, v: _OpaqueAttention.apply(q, k, v, cu, tracker))
        tracker.mark("backward")
        tracker.finish()
    return _region_trace(tracker, num_tokens, {"output": [y], "grad_input": [], "fixed": []})


def trace_key_value(layer: DecoderLayer, num_tokens: int, *, seed: int = 0) -> RegionTrace:
    """Requests of `layer.key_value(x)` forward, then its backward from given dK, dV: the
    per-layer K/V cache of layer-wise StreamBP (parallelism/streambp.py)."""
    param = next(layer.parameters())
    kv_shape = (num_tokens, layer.num_kv_heads, layer.head_dim)
    (x,) = _random((num_tokens, _hidden(layer)), param.device, param.dtype, seed, count=1)
    dk, dv = _random(kv_shape, param.device, param.dtype, seed + 1, count=2)
    x.requires_grad_()
    pos = torch.arange(num_tokens, device=param.device)
    layer.zero_grad(set_to_none=True)
    tracker = StorageLifetimeTracker()
    with tracker:
        k, v = layer.key_value(x, pos)
        tracker.mark("backward")
        torch.autograd.backward([k, v], [dk, dv])
        tracker.finish()
    special: dict[str, list[torch.Tensor | None]] = {
        "output": [k, v], "grad_input": [x.grad],
        "fixed": [p.grad for p in layer.parameters() if p.grad is not None]}
    return _region_trace(tracker, num_tokens, special)


def trace_embedding(weight: torch.Tensor, num_tokens: int, *, seed: int = 0) -> RegionTrace:
    """Requests of the embedding as Transformer.forward_backward runs it: a no-grad lookup
    in the forward, a differentiable lookup and its backward at the end."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, weight.shape[0], (num_tokens,), generator=gen).to(weight.device)
    (grad,) = _random((num_tokens, weight.shape[1]), weight.device, weight.dtype, seed, count=1)
    weight.grad = None
    tracker = StorageLifetimeTracker()
    with tracker:
        with torch.no_grad():
            x0 = F.embedding(ids, weight)
        tracker.mark("backward")
        torch.autograd.backward([F.embedding(ids, weight)], [grad])
        tracker.finish()
    return _region_trace(tracker, num_tokens, {"output": [x0], "grad_input": [],
                                               "fixed": [weight.grad]})


def trace_head(norm: torch.nn.Module, weight: torch.Tensor, num_tokens: int, *,
               seed: int = 0) -> RegionTrace:
    """Requests of the streamed LM head + next-token loss (NextTokenCE) over one chunk.

    The whole region is one block on the model's op axis (it runs forward and backward
    back to back), so backward_op is its last op + 1. Per-chunk requests repeat for every
    chunk of HEAD_CHUNK_TOKENS; `num_tokens` must fit one chunk.
    """
    from workers.objectives import IGNORE_INDEX, HeadInputs, NextTokenCE

    if num_tokens > HEAD_CHUNK_TOKENS:
        raise ValueError(f"num_tokens={num_tokens} must be <= {HEAD_CHUNK_TOKENS} (one chunk)")
    gen = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, weight.shape[0], (num_tokens,), generator=gen)
    targets[-1] = IGNORE_INDEX
    (hidden,) = _random((num_tokens, weight.shape[1]), weight.device, weight.dtype, seed, 1)
    inputs = HeadInputs(hidden_TH=hidden, targets_T=targets.to(weight.device),
                        seq_index_T=torch.zeros(num_tokens, dtype=torch.long),
                        num_sequences=1, chunk_size=HEAD_CHUNK_TOKENS, grad_scale=1.0)
    weight.grad = None
    norm.zero_grad(set_to_none=True)
    tracker = StorageLifetimeTracker()
    with tracker:
        _, _, grad_hidden = NextTokenCE().streamed_backward(inputs, norm, weight)
        tracker.finish()
    tracker.marks["backward"] = tracker.op
    fixed = [t for t in (weight.grad, norm.weight.grad) if t is not None]
    return _region_trace(tracker, num_tokens, {"output": [], "grad_input": [grad_hidden],
                                               "fixed": fixed})


def trace_layer_cuda(layer: DecoderLayer, num_tokens: int, *, seed: int = 0
                     ) -> RegionTrace:
    """The same requests as the CUDA caching allocator saw them (one op per event)."""
    from torch.cuda import memory as cuda_memory

    param = next(layer.parameters())
    x, dy = _random((num_tokens, _hidden(layer)), param.device, param.dtype, seed, count=2)
    x.requires_grad_()
    pos = torch.arange(num_tokens, device=param.device)
    cu = torch.tensor([0, num_tokens], dtype=torch.int32, device=param.device)
    core = kernels.attention
    layer.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    cuda_memory._record_memory_history(max_entries=1_000_000)
    try:
        y = layer(x, pos, lambda q, k, v: core(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu,
                                                causal=True))
        torch.cuda.synchronize()
        boundary = len(_device_events(cuda_memory._snapshot(), param.device))
        y.backward(dy)
        torch.cuda.synchronize()
        events = _device_events(cuda_memory._snapshot(), param.device)
    finally:
        cuda_memory._record_memory_history(enabled=None)
    assert x.grad is not None, "the backward above wrote it"
    special = {"output": {y.untyped_storage().data_ptr()},
               "grad_input": {x.grad.untyped_storage().data_ptr()},
               "fixed": {_grad(p).untyped_storage().data_ptr() for p in layer.parameters()}}
    return _events_to_trace(events, boundary, special, num_tokens)


def _device_events(snapshot: dict, device: torch.device) -> list[dict]:
    index = device.index if device.index is not None else torch.cuda.current_device()
    return [e for e in snapshot["device_traces"][index]
            if e["action"] in ("alloc", "free_completed")]


def _events_to_trace(events: list[dict], boundary: int, special: dict[str, set[int]],
                     num_tokens: int) -> RegionTrace:
    open_: dict[int, dict] = {}
    done: list[dict] = []
    for op, event in enumerate(events):
        if event["action"] == "alloc":
            open_[event["addr"]] = dict(nbytes=event["size"], first=op, last=None,
                                        addr=event["addr"])
        elif event["addr"] in open_:
            rec = open_.pop(event["addr"])
            rec["last"] = op - 1
            done.append(rec)
    records = sorted(done + list(open_.values()), key=lambda r: r["first"])
    num_ops = len(events)
    fixed = sum(r["nbytes"] for r in records if r["addr"] in special["fixed"])
    tensors = []
    for r in records:
        if r["addr"] in special["fixed"]:
            continue
        kind = _kind(r, boundary, output=r["addr"] in special["output"],
                     grad_input=r["addr"] in special["grad_input"])
        last = num_ops - 1 if r["last"] is None else max(r["first"], r["last"])
        tensors.append(TracedTensor(nbytes=r["nbytes"], first_op=r["first"], last_op=last,
                                    kind=kind, op_name="cuda_alloc"))
    return RegionTrace(num_tokens=num_tokens, tensors=tuple(tensors), num_ops=num_ops,
                       backward_op=boundary, fixed_bytes=fixed, scratch_peak_bytes=0)


def _region_trace(tracker: StorageLifetimeTracker, num_tokens: int,
                  special: dict[str, list]) -> RegionTrace:
    ids = {name: {tracker.storage_record(t) for t in tensors if t is not None} - {None}
           for name, tensors in special.items()}
    num_ops = tracker.op
    boundary = tracker.marks["backward"]
    tensors, fixed = [], 0
    for idx, r in enumerate(tracker.records):
        if idx in ids["fixed"]:
            fixed += r["nbytes"]
            continue
        kind = _kind(r, boundary, output=idx in ids["output"], grad_input=idx in ids["grad_input"])
        last = num_ops - 1 if r["last"] is None else r["last"]
        if kind == "output":
            last = max(last, boundary - 1)   # held by the next region whatever happens here
        tensors.append(TracedTensor(nbytes=r["nbytes"], first_op=r["first"], last_op=last,
                                    kind=kind, op_name=r["name"]))
    return RegionTrace(num_tokens=num_tokens, tensors=tuple(tensors), num_ops=num_ops,
                       backward_op=boundary, fixed_bytes=fixed,
                       scratch_peak_bytes=tracker.scratch_peak_bytes,
                       attention_ops=tuple(tracker.opaque_ops))


def _kind(record: dict, boundary: int, *, output: bool, grad_input: bool) -> str:
    if output:
        return "output"
    if grad_input:
        return "grad_input"
    last = record["last"]
    if record["first"] < boundary and (last is None or last >= boundary):
        return "saved"
    return "transient"


def _cdata(t: torch.Tensor) -> int:
    return StorageWeakRef(t.untyped_storage()).cdata


def _random(shape, device, dtype, seed: int, count: int) -> list[torch.Tensor]:
    if torch.device(device).type == "meta":
        return [torch.empty(shape, device="meta", dtype=dtype) for _ in range(count)]
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
            for _ in range(count)]


def _grad(p: torch.Tensor) -> torch.Tensor:
    assert p.grad is not None, "the traced backward reaches every parameter"
    return p.grad


def _hidden(layer: DecoderLayer) -> int:
    return layer.attn_norm.weight.shape[0]


# -- whole steps -------------------------------------------------------------------------

@contextmanager
def opaque_attention_kernels(tracker: StorageLifetimeTracker) -> Iterator[None]:
    """Run the torch attention kernel as one opaque op per call (its outputs only), the
    memory contract of the fused GPU kernel the profiles assume."""
    from kernels import attention_torch

    forward, backward = attention_torch.attention_forward, attention_torch.attention_backward

    def opaque(fn, name):
        def call(*args, **kwargs):
            with tracker.opaque(name) as outputs:
                result = fn(*args, **kwargs)
                outputs += list(result)
            return result
        return call

    attention_torch.attention_forward = opaque(forward, "attention_fwd")
    attention_torch.attention_backward = opaque(backward, "attention_bwd")
    try:
        yield
    finally:
        attention_torch.attention_forward, attention_torch.attention_backward = \
            forward, backward


def step_peak_bytes(model: torch.nn.Module, step) -> int:
    """Peak bytes of activations live during `step()` (e.g. one forward_backward), as the
    device would hold them: every storage created, attention kernels opaque, host copies
    of the memory schemes (parallelism.HostSwapper) and parameter gradients (model state,
    not activations) left out. What the memory model's predictions are held to."""
    from parallelism.offload import HostSwapper

    tracker, host = StorageLifetimeTracker(), set()
    offload = HostSwapper.offload

    def counted_offload(self, t):
        handle = offload(self, t)
        host.add(tracker.storage_record(handle.host))
        return handle

    model.zero_grad(set_to_none=True)
    with patch.object(HostSwapper, "offload", counted_offload), tracker, \
            opaque_attention_kernels(tracker):
        step()
        tracker.finish()
    excluded = host | {tracker.storage_record(p.grad) for p in model.parameters()
                       if p.grad is not None}
    delta: dict[int, int] = {}
    for idx, r in enumerate(tracker.records):
        if idx in excluded:
            continue
        last = tracker.op if r["last"] is None else r["last"]
        delta[r["first"]] = delta.get(r["first"], 0) + r["nbytes"]
        delta[last + 1] = delta.get(last + 1, 0) - r["nbytes"]
    live = best = 0
    for op in sorted(delta):
        live += delta[op]
        best = max(best, live)
    return best


# -- profiles ------------------------------------------------------------------------------

def fit_region(traces: list[RegionTrace], *, chunk_tokens: int | None = None) -> RegionProfile:
    """The affine profile of traces of one region at several token counts (ValueError if
    their structure differs or a size is not affine in tokens)."""
    first = traces[0]
    for t in traces[1:]:
        if (t.lifetimes, t.num_ops, t.backward_op, [x.kind for x in t.tensors]) != (
                first.lifetimes, first.num_ops, first.backward_op,
                [x.kind for x in first.tensors]):
            raise ValueError(f"traces at {first.num_tokens} and {t.num_tokens} tokens differ "
                             "in structure; the region is not token-invariant")
    counts = [t.num_tokens for t in traces]
    tensors = []
    for i, tensor in enumerate(first.tensors):
        a, b = fit_affine(counts, [t.tensors[i].nbytes for t in traces])
        tensors.append(TensorProfile(bytes_per_token=a, bytes_fixed=b, first_op=tensor.first_op,
                                     last_op=tensor.last_op, kind=tensor.kind))
    return RegionProfile(tensors=tuple(tensors), num_ops=first.num_ops,
                         backward_op=first.backward_op, fixed_bytes=first.fixed_bytes,
                         chunk_tokens=chunk_tokens, attention_ops=first.attention_ops)


def record_profile(spec: ModelSpec, *, token_counts: tuple[int, ...] = (64, 128, 192),
                   layer_device: str = "meta", head_device: str = "cpu") -> ModelMemoryProfile:
    """Trace a layer and the embedding (on `layer_device`) and the head (on `head_device`,
    which must run real kernels) at `token_counts` and fit the model's profile."""
    from workers.layers import DecoderLayer, RMSNorm

    dtype = DTYPES[spec.dtype]
    with torch.device(layer_device):
        layer = DecoderLayer.from_spec(spec, dtype)
        embed = torch.nn.Parameter(torch.empty(spec.vocab_size, spec.hidden_size, dtype=dtype))
    with torch.device(head_device):
        norm = RMSNorm(spec.hidden_size, eps=spec.norm_eps, dtype=dtype)
        head = torch.nn.Parameter(0.02 * torch.randn(spec.vocab_size, spec.hidden_size,
                                                     dtype=dtype))
    _init_if_real(layer, embed)
    head_counts = tuple(min(c, HEAD_CHUNK_TOKENS) for c in token_counts)
    return ModelMemoryProfile(
        model=spec,
        layer=fit_region([trace_layer(layer, n) for n in token_counts]),
        embedding=fit_region([trace_embedding(embed, n) for n in token_counts]),
        layer_no_grad=fit_region([trace_layer_no_grad(layer, n) for n in token_counts]),
        key_value=fit_region([trace_key_value(layer, n) for n in token_counts]),
        head=fit_region([trace_head(norm, head, n) for n in head_counts],
                        chunk_tokens=HEAD_CHUNK_TOKENS),
        recorded_tokens=tuple(token_counts),
        source=f"workers.memtrace: layer/embedding on {layer_device}, head on {head_device}, "
               f"torch {torch.__version__}")


def _init_if_real(layer: DecoderLayer, embed: torch.Tensor) -> None:
    if embed.is_meta:
        return
    with torch.no_grad():
        layer.reset_parameters(std=0.02, out_std=0.02)
        embed.normal_(0.0, 0.02)


def main(argv: list[str] | None = None) -> None:
    """`python -m workers.memtrace --model llama-7b [--dtype float32] [--out PATH]`: record
    and store (under `name`, or `name@dtype` for a dtype other than the preset's)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", required=True,
                        help="model preset or HF config.json (repeatable)")
    parser.add_argument("--dtype", action="append", choices=sorted(DTYPES),
                        help="compute dtype(s) to record (repeatable; default: the model's)")
    parser.add_argument("--out", type=Path, default=PROFILES_PATH)
    args = parser.parse_args(argv)
    stored = json.loads(args.out.read_text()) if args.out.exists() else {}
    for name in args.model:
        spec = model_preset(name)
        for dtype in args.dtype or [spec.dtype]:
            key = name if dtype == spec.dtype else f"{name}@{dtype}"
            stored[key] = profile_to_json(record_profile(spec.model_copy(update={"dtype": dtype})))
            print(f"recorded {key}")
    args.out.write_text(_compact_json(stored))


def _compact_json(data: dict) -> str:
    """Indented JSON with each tensor row on one line (readable diffs of profiles)."""
    text = json.dumps(data, indent=1, sort_keys=True)
    return re.sub(r"\[\s+(-?\d+),\s+(-?\d+),\s+(-?\d+),\s+(-?\d+),\s+(\"\w+\")\s+\]",
                  r"[\1, \2, \3, \4, \5]", text) + "\n"


if __name__ == "__main__":
    main()
