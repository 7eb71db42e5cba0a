"""Peak activation memory and step time of the memory schemes, and the longest sequence each
fits in a fixed memory budget (binary search).

Methods (the StreamBP paper's comparison, arXiv 2506.03077 Sec. 4, plus ours):
  plain                 autograd through every layer, full [T, V] logits
  checkpointing         layer-wise gradient checkpointing, full logits (the HF baseline)
  checkpointing+head    layer-wise gradient checkpointing, streamed head
  streambp              layer-wise StreamBP + streamed head
  streambp+offload      StreamBP with the kept layer inputs on host (offload_ratio=1)
  memo-offload          MEMO token-wise swap/recompute, alpha=0.5, streamed head

Memory: on CPU, LiveBytesMeter (bytes saved for backward plus the buffers each scheme holds,
live, peak) on the meta device, where shapes are real and nothing is allocated or computed.
Sequences are packed in 2048-token pieces: every saved tensor of every method is linear in
the token count (attention is flash-style, no [T, T] buffer), so a packed batch of T tokens
needs the same bytes as one T-token sequence, while the meta attention loop stays linear in
T. Meta steps still cost ~25 s at 16K tokens on the 2-core box, so on CPU the binary search
runs over the measured law bytes = fixed + slope * tokens (fit on the two longest lengths,
checked on the others: "affine miss"). On CUDA, torch.cuda.max_memory_allocated of real
steps (one sequence) and a binary search of real steps.

Time: real steps on this machine's device at `--time-tokens` tokens (one sequence), best of
`--repeats` interleaved runs (one thread on CPU); the backward time is the layer stack's
backward (what the schemes change; checkpointing's includes its recompute).

    .venv/bin/python -m bench.memory [--budget-mib 1024] [--time-tokens 2048]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from parallelism.offload import HostSwapper, LiveBytesMeter, TokenwiseOffloadStack, track_buffer
from parallelism.offload import local_attention_core as core_of
from parallelism.streambp import StreamBPStack
from scheduler.specs import ModelSpec
from workers.model import AutogradStack, Transformer, default_position_ids, next_token_targets
from workers.objectives import ChunkedHead, HeadInputs

SPEC = ModelSpec(vocab_size=32000, hidden_size=256, num_layers=8, num_heads=8, num_kv_heads=4,
                 ffn_hidden_size=688, dtype="float32")
STREAM_CHUNK = 1024  # StreamBP layer chunk (tokens)
HEAD_CHUNK = 256  # streamed head chunk (tokens): one chunk's logits are 31 MiB at V=32000
PACK = 2048


class CheckpointStack:
    """Layer-wise gradient checkpointing: keep layer inputs, recompute a layer in backward."""

    def __init__(self, layers, *, position_ids, core):
        self.layers, self.pos, self.core = layers, position_ids, core

    def forward(self, x):
        self.inputs = []
        with torch.no_grad():
            for layer in self.layers:
                self.inputs.append(track_buffer(x))
                x = layer(x, self.pos, self.core.autograd)
        return x

    def backward(self, dy):
        for i in reversed(range(len(self.layers))):
            x = self.inputs.pop().detach().requires_grad_()
            with torch.enable_grad():
                y = self.layers[i](x, self.pos, self.core.autograd)
            torch.autograd.backward([y], [dy])
            dy = x.grad
        return dy


def _full_head(model, hidden, targets):
    h = hidden.detach().requires_grad_()
    with torch.enable_grad():
        logits = model.head(model.norm(h))
        F.cross_entropy(logits.float(), targets, reduction="sum").backward()
    return h.grad


def _streamed_head(model, hidden, targets):
    inputs = HeadInputs(hidden_TH=hidden, targets_T=targets, seq_index_T=targets,
                        num_sequences=1, chunk_size=HEAD_CHUNK, grad_scale=1.0)
    head = ChunkedHead(inputs, model.norm, model.head.weight)
    for sl in reversed(list(head.slices())):
        head.backward_chunk(sl, lambda lp, s: -lp.sum())
    return head.grad_hidden


def _stacks(model, cu, pos) -> dict[str, tuple[Callable, Callable]]:
    layers, core = model.layers, core_of(cu)
    swap = HostSwapper(pos.device)
    return {
        "plain": (lambda: AutogradStack(layers, position_ids=pos, core=core), _full_head),
        "checkpointing": (lambda: CheckpointStack(layers, position_ids=pos, core=core),
                          _full_head),
        "checkpointing+head": (lambda: CheckpointStack(layers, position_ids=pos, core=core),
                               _streamed_head),
        "streambp": (lambda: StreamBPStack(layers, position_ids=pos, cu_seqlens=cu,
                                           chunk_size=STREAM_CHUNK, core_forward=core.forward),
                     _streamed_head),
        "streambp+offload": (lambda: StreamBPStack(
            layers, position_ids=pos, cu_seqlens=cu, chunk_size=STREAM_CHUNK,
            core_forward=core.forward, offload_ratio=1.0, swapper=swap), _streamed_head),
        "memo-offload": (lambda: TokenwiseOffloadStack(layers, position_ids=pos, core=core,
                                                        alpha=0.5, swapper=swap),
                         _streamed_head),
    }


def _step(model, ids, cu, method) -> float:
    """One full step; returns the layer stack's backward seconds."""
    pos = default_position_ids(cu, ids.device)
    make_stack, head = _stacks(model, cu, pos)[method]
    stack = make_stack()
    with torch.no_grad():
        hidden = stack.forward(track_buffer(F.embedding(ids, model.embed.weight)))
    dh = head(model, hidden, next_token_targets(ids, cu))
    del hidden
    t0 = time.perf_counter()
    dx = stack.backward(dh)
    if ids.is_cuda:
        torch.cuda.synchronize()
    t_bwd = time.perf_counter() - t0
    with torch.enable_grad():
        torch.autograd.backward([F.embedding(ids, model.embed.weight)], [dx])
    return t_bwd


def _batch(num_tokens: int, device, pack: int | None):
    lengths = [pack] * (num_tokens // pack) + [num_tokens % pack] if pack else [num_tokens]
    lengths = [n for n in lengths if n]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    ids = torch.zeros(num_tokens, dtype=torch.long, device=device)
    return ids, cu


def peak_bytes(model, method: str, num_tokens: int) -> int:
    """Peak live activation bytes of one step (meta: meter; CUDA: allocator)."""
    dev = model.head.weight.device
    ids, cu = _batch(num_tokens, dev, PACK if dev.type == "meta" else None)
    model.zero_grad(set_to_none=True)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        _step(model, ids, cu, method)
        return torch.cuda.max_memory_allocated() - base
    meter = LiveBytesMeter(exclude=list(model.parameters()))
    with meter.measure():
        _step(model, ids, cu, method)
    return meter.peak_bytes


def longest_fitting(model, method: str, budget: int, *, lo: int = 256,
                    resolution: int = 256) -> int:
    """Binary search for the most tokens whose peak stays within `budget` bytes (real runs)."""
    if peak_bytes(model, method, lo) > budget:
        return 0
    hi = lo * 2
    while peak_bytes(model, method, hi) <= budget:
        lo, hi = hi, hi * 2
    while hi - lo > resolution:
        mid = (lo + hi) // 2 // resolution * resolution
        lo, hi = (mid, hi) if peak_bytes(model, method, mid) <= budget else (lo, mid)
    return lo


def affine_fit(lengths: list[int], peaks: list[int]) -> tuple[float, float, float]:
    """(bytes per token, fixed bytes, worst relative miss on the other lengths).

    Fit on the two longest lengths (the asymptotic slope is what a long-sequence budget
    sees); the shorter lengths check how affine the law is.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    (n0, p0), (n1, p1) = [(lengths[i], peaks[i]) for i in order[-2:]]
    slope = (p1 - p0) / (n1 - n0)
    fixed = p0 - slope * n0
    miss = max((abs(fixed + slope * lengths[i] - peaks[i]) / peaks[i] for i in order[:-2]),
               default=0.0)
    return slope, fixed, miss


def longest_fitting_affine(slope: float, fixed: float, budget: int, *,
                           resolution: int = 256) -> int:
    """The same binary search over the measured affine law bytes = fixed + slope * tokens."""
    if fixed + slope * resolution > budget:
        return 0
    lo, hi = resolution, resolution * 2
    while fixed + slope * hi <= budget:
        lo, hi = hi, hi * 2
    while hi - lo > resolution:
        mid = (lo + hi) // 2 // resolution * resolution
        lo, hi = (mid, hi) if fixed + slope * mid <= budget else (lo, mid)
    return lo


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--budget-mib", type=float, default=1024.0)
    ap.add_argument("--time-tokens", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192, 16384])
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    torch.manual_seed(0)
    mem_model = Transformer(SPEC).to("cuda" if cuda else "meta")
    methods = list(_stacks(mem_model, torch.tensor([0, 1], dtype=torch.int32),
                           torch.zeros(1)).keys())
    kind = "cuda max_memory_allocated" if cuda else "LiveBytesMeter on meta"
    print(f"model {SPEC.model_dump()}; memory: {kind}; StreamBP chunk {STREAM_CHUNK}, "
          f"head chunk {HEAD_CHUNK}")
    print("peak MiB at tokens " + " ".join(f"{n:>8}" for n in args.lengths)
          + "   KiB/token  fixed MiB  affine miss")
    budget = int(args.budget_mib * 2**20)
    fits = {}
    for m in methods:
        peaks = [peak_bytes(mem_model, m, n) for n in args.lengths]
        slope, fixed, miss = affine_fit(args.lengths, peaks)
        print(f"  {m:<20}" + " ".join(f"{p / 2**20:8.1f}" for p in peaks)
              + f"   {slope / 1024:9.2f}  {fixed / 2**20:9.1f}  {miss:11.1e}", flush=True)
        fits[m] = (longest_fitting(mem_model, m, budget) if cuda
                   else longest_fitting_affine(slope, fixed, budget))
    how = "binary search of real steps" if cuda else "binary search over the measured law"
    print(f"longest sequence within {args.budget_mib} MiB ({how}; tokens, x checkpointing):")
    for m in methods:
        print(f"  {m:<20} {fits[m]:>8} {fits[m] / max(fits['checkpointing'], 1):6.1f}x")
    time_model = Transformer(SPEC).to("cuda" if cuda else "cpu")
    ids, cu = _batch(args.time_tokens, time_model.head.weight.device, None)
    ids = torch.randint(0, SPEC.vocab_size, ids.shape, device=ids.device)
    print(f"step / layer-backward seconds at {args.time_tokens} tokens "
          "(x checkpointing's backward):")
    torch.set_num_threads(1)  # a shared 2-core box: one thread is the least noisy
    times = {m: (float("inf"), float("inf")) for m in methods}
    for _ in range(args.repeats):  # interleaved, best of `repeats`
        for m in methods:
            t0 = time.perf_counter()
            bwd = _step(time_model, ids, cu, m)
            step = time.perf_counter() - t0
            times[m] = (min(times[m][0], bwd), min(times[m][1], step))
    for m in methods:
        bwd, step = times[m]
        print(f"  {m:<20} step {step:7.2f}  backward {bwd:7.2f} "
              f"{bwd / times['checkpointing'][0]:5.2f}x")


if __name__ == "__main__":
    main()
