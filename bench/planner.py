"""Benchmark of the HDP planner: quality against the lower bound and two honest baselines,
and plan time, on llama-7b over an h100 cluster preset, on the cost and memory model that
charges what the executor does (docs/planner.md).

Global batches of 32M tokens (32K tokens per rank beyond 1,024 ranks) drawn from the
`byted` and `github` length distributions with a 2M-token maximum. For each: the hdp plan
(greedy + CP-SAT LNS under --time-limit) against
- the best static mesh: every CP degree from the smallest that fits up to N (divisors of N
  or not), the fastest kept ("static CP" is its degree);
- power-of-two dynamic CP, the shape of Megatron-Core's dynamic context parallelism: the
  same balance scheduler with ring sizes restricted to powers of two;
- naive HDP (ByteScale Alg. 1 without balancing).
Columns: makespan / lower bound, baseline / makespan (speed-ups), static / bound (the
best speed-up any plan could reach), memory (capacity in tokens under the plain scheme,
model states and the largest predicted peak per rank, groups under MEMO offload) and the
hdp plan time (wall clock and CPU time of the whole `plan_batch`, including sharding,
simulation, per-group predictions and the memory check; on a shared machine the CPU time
is the figure that does not depend on the neighbours' load).

    .venv/bin/python -m bench.planner [--ranks 64 256 1024 4096 12288] [--seed 0]
                                        [--precision bf16-mixed] [--optimizer-sharding ...]

Prints a markdown table (the one recorded in docs/benchmarks.md).

    .venv/bin/python -m bench.planner --straggler [--pools] [--ranks 1024]

Slow ranks instead (bench/stragglers.py): the simulated makespan of speed-aware against
speed-blind planning, both timed at the true speeds, next to the lower bound for those
speeds; `--straggler`: one rank at 0.5x, then 4 CPU gloo ranks with rank 1 slowed 2x by
the slow drill (measured step time against the simulator's makespan for the same
speeds); `--pools`: a 50/50 H100/A100 cluster of node pools.
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np

from scheduler import CostModel, plan_batch
from scheduler.specs import cluster_preset, model_preset
from scheduler.synth import sample_lengths

MAX_LENGTH = 2 * 1024 * 1024


def global_batch(distribution: str, num_tokens: int, seed: int) -> np.ndarray:
    """Samples from `distribution` until their lengths sum to at least `num_tokens`."""
    chunk = max(1024, num_tokens // 8192)
    parts, total, k = [], 0, 0
    while total < num_tokens:
        draw = sample_lengths(distribution, chunk, MAX_LENGTH, seed=seed * 1000 + k)
        parts.append(draw)
        total += int(draw.sum())
        k += 1
    lengths = np.concatenate(parts)
    return lengths[: int(np.searchsorted(np.cumsum(lengths), num_tokens)) + 1]


def run(ranks: int, distribution: str, *, seed: int, time_limit_s: float,
        precision: str | None, sharding: str | None) -> dict:
    model = model_preset("llama-7b")
    cluster = cluster_preset("h100", num_ranks=ranks)
    tokens = max(32 * 1024 * 1024, 32 * 1024 * ranks)
    lengths = global_batch(distribution, tokens, seed)
    cost = CostModel(model, cluster, precision=precision, optimizer_sharding=sharding)
    t0, c0 = time.perf_counter(), time.process_time()
    hdp = plan_batch(lengths, cluster, model, policy="hdp", time_limit_s=time_limit_s,
                     seed=seed, cost=cost)
    plan_s, cpu_s = time.perf_counter() - t0, time.process_time() - c0
    others = {p: plan_batch(lengths, cluster, model, policy=p, time_limit_s=time_limit_s,
                            seed=seed, cost=cost, predictions=False)
              for p in ("static", "pow2", "naive")}
    m, b = hdp.predicted.makespan_s, hdp.predicted.lower_bound_s
    s = others["static"].predicted.makespan_s
    rings = [g.ring_size for _, g in hdp.groups()]
    peak = max(max(g.peak_bytes_per_rank) for g in hdp.predicted.groups)
    return dict(ranks=ranks, dist=distribution, seqs=len(lengths), tokens=int(lengths.sum()),
                capacity=hdp.capacity_tokens, longest=int(lengths.max()), max_ring=max(rings),
                makespan=m, bound=b, ratio=m / b, static_over=s / m, static_bound=s / b,
                pow2_over=others["pow2"].predicted.makespan_s / m,
                naive_over=others["naive"].predicted.makespan_s / m, plan_s=plan_s,
                cpu_s=cpu_s, static_cp=max(g.ring_size for _, g in others["static"].groups()),
                states_gib=hdp.memory.model_state_bytes / 2**30, peak_gib=peak / 2**30,
                offload=sum(g.memory.scheme == "offload" for _, g in hdp.groups()),
                groups=len(rings))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ranks", type=int, nargs="+", default=None,
                    help="default 64 256 1024 4096 12288; 1024 with --straggler / --pools")
    ap.add_argument("--dists", nargs="+", default=["byted", "github"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--time-limit", type=float, default=0.5)
    ap.add_argument("--precision", default=None)
    ap.add_argument("--optimizer-sharding", default=None)
    ap.add_argument("--straggler", action="store_true", help="one rank at 0.5x speed")
    ap.add_argument("--pools", action="store_true", help="a 50/50 h100/a100 cluster")
    args = ap.parse_args()
    if args.straggler or args.pools:
        from bench.stragglers import main as stragglers

        args.ranks = args.ranks or [1024]
        return stragglers(args)
    args.ranks = args.ranks or [64, 256, 1024, 4096, 12288]
    cost = CostModel(model_preset("llama-7b"), cluster_preset("h100"),
                     precision=args.precision, optimizer_sharding=args.optimizer_sharding)
    print(f"<!-- {platform.node()} python {platform.python_version()}; {cost.precision}, "
          f"{cost.optimizer_sharding} -->")
    print("| ranks | dist | seqs | tokens | capacity | states GiB | peak GiB | offload groups "
          "| best static CP | hdp max ring | makespan s | bound s | makespan/bound "
          "| static/makespan | pow2/makespan | static/bound | naive/makespan "
          "| plan s (wall) | plan s (CPU) |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:"
          "|---:|---:|---:|")
    for ranks in args.ranks:
        for dist in args.dists:
            r = run(ranks, dist, seed=args.seed, time_limit_s=args.time_limit,
                    precision=args.precision, sharding=args.optimizer_sharding)
            print(f"| {r['ranks']} | {r['dist']} | {r['seqs']} | {r['tokens'] / 2**20:.1f}M "
                  f"| {r['capacity']} | {r['states_gib']:.1f} | {r['peak_gib']:.1f} "
                  f"| {r['offload']}/{r['groups']} | {r['static_cp']} | {r['max_ring']} "
                  f"| {r['makespan']:.2f} | {r['bound']:.2f} | {r['ratio']:.3f} "
                  f"| {r['static_over']:.2f} | {r['pow2_over']:.2f} | {r['static_bound']:.2f} "
                  f"| {r['naive_over']:.2f} | {r['plan_s']:.2f} | {r['cpu_s']:.2f} |",
                  flush=True)


if __name__ == "__main__":
    main()
