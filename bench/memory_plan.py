"""MEMO memory plan quality: planned peak vs the max-live lower bound, and vs a caching
allocator, for one decoder layer's trace and the whole model, at 4K..1M tokens.

    .venv/bin/python -m bench.memory_plan [--models tiny llama-7b] [--time-limit 10]
                                          [--arena-gpu]

Traces come from the stored token-affine profiles (scheduler/memory_profiles.json,
recorded by `python -m workers.memtrace`; tests/workers/test_memtrace.py checks a profile
reproduces a fresh trace exactly). Per row: tensors in the trace, max-live bytes (no
placement can do better), the planned peak and its ratio to max-live (target <= 1.02),
the planner's status and wall time (target <= 10 s), and the peak reserved by a simulated
PyTorch caching allocator replaying the same trace (scheduler/alloc_sim.py) with its ratio
to max-live. The "steps" row replays steps of different lengths through one allocator
(its cache carries over, as in training) against one plan sized for the longest step.
Torch-free; prints a Markdown table. `--arena-gpu` adds torch's measured CUDA peaks of a
fused step with and without the activation arena (workers/arena.py).
"""

from __future__ import annotations

import argparse
import time

from scheduler.alloc_sim import CachingAllocatorSim, simulate_caching_allocator
from scheduler.memory import plan_offsets
from scheduler.memory_model import find_profile, plan_model, unrolled_trace
from scheduler.specs import model_preset

GIB = 1024**3
TOKENS = (4096, 16384, 65536, 262144, 1048576)
# Long-tail step lengths (most short, a few long), replayed back to back.
VARYING = [16384, 98304, 32768, 131072, 65536, 114688, 24576, 131072]


def layer_row(name: str, tokens: int, time_limit_s: float) -> str:
    profile = find_profile(model_preset(name))
    sizes, lifetimes = profile.layer.trace(tokens)
    start = time.perf_counter()
    plan = plan_offsets(sizes, lifetimes, time_limit_s=time_limit_s)
    wall = time.perf_counter() - start
    sim = simulate_caching_allocator(sizes, lifetimes)
    live = plan.max_live_bytes
    return (f"| {name} | layer | {tokens:>7} | {len(sizes)} | {live / GIB:.3f} | "
            f"{plan.peak_bytes / GIB:.3f} | {plan.peak_bytes / live:.4f} | {plan.status} | "
            f"{wall:.2f} | {sim.peak_reserved_bytes / GIB:.3f} | "
            f"{sim.peak_reserved_bytes / live:.4f} |")


def model_row(name: str, tokens: int, time_limit_s: float) -> str:
    spec = model_preset(name)
    profile = find_profile(spec)
    start = time.perf_counter()
    plan = plan_model(profile, tokens, num_layers=spec.num_layers, time_limit_s=time_limit_s)
    wall = time.perf_counter() - start
    sizes, lifetimes = unrolled_trace(profile, tokens, num_layers=spec.num_layers)
    sim = simulate_caching_allocator(sizes, lifetimes)
    live = plan.unrolled_max_live_bytes
    return (f"| {name} | model ({spec.num_layers} layers) | {tokens:>7} | {len(sizes)} | "
            f"{live / GIB:.3f} | {plan.peak_bytes / GIB:.3f} | {plan.peak_bytes / live:.4f} | "
            f"{plan.model_plan.status} | {wall:.2f} | {sim.peak_reserved_bytes / GIB:.3f} | "
            f"{sim.peak_reserved_bytes / live:.4f} |")


def varying_lengths_row(name: str, token_counts: list[int], time_limit_s: float) -> str:
    """One allocator across steps of different lengths (its cache carries over, as in
    training) against a plan sized for the longest step (reused by every shorter one)."""
    spec = model_preset(name)
    profile = find_profile(spec)
    sim = CachingAllocatorSim()
    for tokens in token_counts:
        sim.replay(*unrolled_trace(profile, tokens, num_layers=spec.num_layers))
    longest = max(token_counts)
    plan = plan_model(profile, longest, num_layers=spec.num_layers, time_limit_s=time_limit_s)
    live = plan.unrolled_max_live_bytes
    steps = ",".join(f"{t // 1024}K" for t in token_counts)
    return (f"| {name} | model, steps {steps} | {longest:>7} | - | {live / GIB:.3f} | "
            f"{plan.peak_bytes / GIB:.3f} | {plan.peak_bytes / live:.4f} | "
            f"{plan.model_plan.status} | - | {sim.peak_reserved / GIB:.3f} | "
            f"{sim.peak_reserved / live:.4f} |")


def arena_gpu_rows(tokens_list: list[int], time_limit_s: float) -> list[str]:
    """On CUDA: a 2-layer llama-7b-shaped model's fused step (forward_backward) with and
    without the activation arena; torch's own peak allocated/reserved bytes for each."""
    from workers.model import Transformer

    spec = model_preset("llama-7b").model_copy(update={"num_layers": 2})
    model = Transformer(spec).cuda()
    return [_arena_gpu_row(model, tokens, time_limit_s) for tokens in tokens_list]


def _arena_gpu_row(model, tokens: int, time_limit_s: float) -> str:
    import torch

    from workers.arena import ActivationArena

    ids = torch.randint(0, model.spec.vocab_size, (tokens,), device="cuda")
    cu = torch.tensor([0, tokens], dtype=torch.int32, device="cuda")

    def step():
        model.zero_grad(set_to_none=True)
        model.forward_backward(ids, cu_seqlens=cu)
        torch.cuda.synchronize()

    plain = _cuda_peaks(step)
    arena = ActivationArena.for_step(step, parameters=model.parameters(), device="cuda",
                                     time_limit_s=time_limit_s)

    def arena_step():
        with arena.saving():
            step()

    with_arena = _cuda_peaks(arena_step)
    return (f"| llama-7b x2 layers, {tokens} tokens | {plain[0] / GIB:.3f} | "
            f"{plain[1] / GIB:.3f} | {with_arena[0] / GIB:.3f} | {with_arena[1] / GIB:.3f} | "
            f"{arena.nbytes / GIB:.3f} |")


def _cuda_peaks(step) -> tuple[int, int]:
    import torch

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    step()
    return torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny", "llama-7b"])
    parser.add_argument("--tokens", nargs="+", type=int, default=list(TOKENS))
    parser.add_argument("--time-limit", type=float, default=10.0)
    parser.add_argument("--arena-gpu", action="store_true",
                        help="also measure the activation arena on CUDA (needs a GPU)")
    args = parser.parse_args()
    if args.arena_gpu:
        print("| step | plain alloc GiB | plain reserved GiB | arena alloc GiB | "
              "arena reserved GiB | arena buffer GiB |")
        print("|---|---:|---:|---:|---:|---:|")
        for row in arena_gpu_rows([4096, 16384], args.time_limit):
            print(row, flush=True)
    print("| model | trace | tokens | tensors | max-live GiB | planned GiB | planned/max-live "
          "| status | plan s | caching alloc GiB | alloc/max-live |")
    print("|---|---|---:|---:|---:|---:|---:|---|---:|---:|---:|")
    for name in args.models:
        for tokens in args.tokens:
            print(layer_row(name, tokens, args.time_limit), flush=True)
        for tokens in args.tokens:
            print(model_row(name, tokens, args.time_limit), flush=True)
        print(varying_lengths_row(name, VARYING, args.time_limit), flush=True)


if __name__ == "__main__":
    main()
