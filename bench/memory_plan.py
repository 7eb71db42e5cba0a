"""MEMO memory plan quality: planned peak vs the max-live lower bound, and vs a caching
allocator, for one decoder layer's trace and the whole model, at 4K..1M tokens.

    .venv/bin/python bench/memory_plan.py [--models tiny llama-7b] [--time-limit 10]

Traces come from the stored token-affine profiles (scheduler/memory_profiles.json,
recorded by `python -m workers.memtrace`; tests/workers/test_memtrace.py checks a profile
reproduces a fresh trace exactly). Per row: tensors in the trace, max-live bytes (no
placement can do better), the planned peak and its ratio to max-live (target <= 1.02),
the planner's status and wall time (target <= 10 s), and the peak reserved by a simulated
PyTorch caching allocator replaying the same trace (scheduler/alloc_sim.py) with its ratio
to max-live. The "steps" row replays steps of different lengths through one allocator
(its cache carries over, as in training) against one plan sized for the longest step.
Torch-free; prints a Markdown table.
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny", "llama-7b"])
    parser.add_argument("--tokens", nargs="+", type=int, default=list(TOKENS))
    parser.add_argument("--time-limit", type=float, default=10.0)
    args = parser.parse_args()
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
