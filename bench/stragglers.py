"""Slow ranks and node pools: speed-aware against speed-blind planning (issue: per-rank
speeds). Run through `bench/planner.py --straggler` / `--pools`.

Simulated (llama-7b, h100 preset, the byted batch of bench/planner.py, hdp): the plan
made for the true per-rank speeds ("aware") and the plan made as if every rank were
nominal ("blind") are both timed by `scheduler.simulate` at the true speeds, next to
`scheduler.lower_bound` for those speeds. `--straggler`: rank 0 at 0.5x. `--pools`: half
the nodes an h100 pool, half an a100 pool (its speed is the presets' TFLOP/s ratio).

Measured (`--straggler`, CPU): 4 gloo ranks run `workers.step.run_step` on the tiny model
with rank 1 slowed 2x by the slow drill (parallelism.progress, as
RINGMASTER_FAULT=slow:rank=1:factor=2 does), once with the aware plan and once with the
blind plan of the same batch; step time = the slowest rank's, median over steps after a
warm-up. Beside each, the simulator's makespan for the same speeds on the cpu preset (its
TFLOP/s is nominal, so compare the aware/blind ratios, not the absolute seconds).
"""

from __future__ import annotations

import statistics
import time

import numpy as np

from scheduler import lower_bound, plan_batch, simulate
from scheduler.specs import ClusterSpec, cluster_preset, model_preset

CPU_LENGTHS = [int(x) for x in np.random.default_rng(7).integers(60, 400, 48)]
CPU_SLOW_RANK, CPU_FACTOR, CPU_WORLD = 1, 2.0, 4


def simulated(cluster: ClusterSpec, speeds: np.ndarray, lengths, *, time_limit_s: float,
              seed: int) -> dict:
    model = model_preset("llama-7b")
    t0 = time.process_time()
    aware = plan_batch(lengths, cluster, model, speeds=speeds, time_limit_s=time_limit_s,
                       seed=seed, predictions=False)
    plan_cpu_s = time.process_time() - t0
    blind = plan_batch(lengths, cluster, model, speeds=np.ones(cluster.world_size),
                       time_limit_s=time_limit_s, seed=seed, predictions=False)
    at = {k: simulate(p, cluster, model, speeds=speeds).makespan_s
          for k, p in (("aware", aware), ("blind", blind))}
    bound = lower_bound(lengths, cluster, model, capacity_tokens=aware.capacity_tokens,
                        speeds=speeds)
    return dict(aware=at["aware"], blind=at["blind"], bound=bound, plan_cpu_s=plan_cpu_s)


def _cpu_rank(rank: int, world: int, plan_json: str, steps: int) -> list[float]:
    import torch

    from parallelism.progress import PROGRESS
    from scheduler.plan import StepPlan
    from workers.model import Transformer
    from workers.step import run_step

    torch.set_num_threads(1)
    plan = StepPlan.model_validate_json(plan_json)
    torch.manual_seed(0)
    model = Transformer(model_preset("tiny"))
    gen = torch.Generator().manual_seed(1)
    samples = {i: torch.randint(0, 256, (n,), generator=gen) for i, n in enumerate(CPU_LENGTHS)}
    PROGRESS.slowdown = CPU_FACTOR if rank == CPU_SLOW_RANK else 1.0
    return [run_step(model, plan, samples, rank=rank).step_time_s for _ in range(steps + 1)][1:]


def measured_cpu(steps: int) -> None:
    from parallelism.worlds import run_distributed

    cluster, model = cluster_preset("cpu", num_ranks=CPU_WORLD), model_preset("tiny")
    speeds = np.ones(CPU_WORLD)
    speeds[CPU_SLOW_RANK] = 1.0 / CPU_FACTOR
    print(f"\nCPU: {CPU_WORLD} gloo ranks, tiny model, {len(CPU_LENGTHS)} sequences / "
          f"{sum(CPU_LENGTHS)} tokens, rank {CPU_SLOW_RANK} slowed {CPU_FACTOR}x, "
          f"{steps} timed steps")
    print("| plan | measured step s (median) | simulated makespan s | rank 1 tokens / others' |")
    print("|---|---:|---:|---:|")
    rows = {}
    for name, plan_speeds in (("aware", speeds), ("blind", np.ones(CPU_WORLD))):
        plan = plan_batch(CPU_LENGTHS, cluster, model, speeds=plan_speeds, time_limit_s=0.5)
        per_rank = run_distributed(_cpu_rank, CPU_WORLD, plan.model_dump_json(), steps,
                                   timeout_s=900)
        step_s = statistics.median(max(t) for t in zip(*per_rank, strict=True))
        sim = simulate(plan, cluster, model, speeds=speeds).makespan_s
        tokens = [sum(g.num_tokens / g.ring_size for _, g in plan.micro_batches_of(r))
                  for r in range(CPU_WORLD)]
        share = tokens[CPU_SLOW_RANK] / np.mean([t for r, t in enumerate(tokens)
                                                 if r != CPU_SLOW_RANK])
        rows[name] = (step_s, sim)
        print(f"| {name} | {step_s:.3f} | {sim:.4f} | {share:.2f} |", flush=True)
    print(f"\nblind/aware: measured {rows['blind'][0] / rows['aware'][0]:.2f}x, "
          f"simulated {rows['blind'][1] / rows['aware'][1]:.2f}x")


def main(args) -> None:
    from bench.planner import global_batch

    print("| case | ranks | aware makespan s | blind makespan s | bound s | blind/aware "
          "| aware/bound | aware plan s (CPU) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for ranks in args.ranks:
        lengths = global_batch("byted", max(32 * 1024 * 1024, 32 * 1024 * ranks), args.seed)
        cases = []
        if args.straggler:
            speeds = np.ones(ranks)
            speeds[0] = 0.5
            cases.append(("one rank 0.5x", cluster_preset("h100", num_ranks=ranks), speeds))
        if args.pools:
            half = max(1, ranks // 16)
            cluster = ClusterSpec(pools=[{"preset": "h100", "num_nodes": half},
                                         {"preset": "a100", "num_nodes": half}])
            cases.append(("50/50 h100/a100", cluster, np.asarray(cluster.rank_speeds())))
        for name, cluster, speeds in cases:
            r = simulated(cluster, speeds, lengths, time_limit_s=args.time_limit,
                          seed=args.seed)
            print(f"| {name} | {cluster.world_size} | {r['aware']:.2f} | {r['blind']:.2f} "
                  f"| {r['bound']:.2f} | {r['blind'] / r['aware']:.2f} "
                  f"| {r['aware'] / r['bound']:.3f} | {r['plan_cpu_s']:.2f} |", flush=True)
    if args.straggler:
        measured_cpu(steps=5)
