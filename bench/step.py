"""Benchmark one training step (workers.step.run_step) of a fixed global batch.

CPU (always): tokens/s of the whole step (forward, backward, the gradient all-reduce) on
1, 2 and 4 gloo ranks, each with one intra-op thread, for the same batch planned by
`scheduler.plan_batch` for that many ranks (rings appear where a sequence exceeds the
capacity). Step time = the slowest rank's `StepStats.step_time_s`, median over steps after
warm-up. Ranks beyond the machine's cores share them, so this measures the overhead of
the plan's parallelism as much as its speed-up.

GPU (when CUDA is available): MFU of one rank's step for a small Llama (1.3B-shaped,
bf16, layer-wise StreamBP when the activations exceed the budget) on one packed sequence of
16K..64K tokens: model FLOPs = 6 * params * tokens + causal attention 6 * layers * T^2 *
hidden (forward: QK^T and PV over the causal half, 2 * T^2 * hidden; backward twice
that), over the measured step time and the device's bf16 dense peak (H100 SXM 989
TFLOP/s, A100/A800 312).

    .venv/bin/python -m bench.step [--ranks 1 2 4] [--steps 5] [--gpu-only]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from parallelism.worlds import run_distributed
from scheduler.plan import MicroBatch, RingGroup, SeqSlice, StepPlan
from scheduler.specs import ModelSpec, model_preset
from workers.model import Transformer
from workers.step import run_step

# A fixed batch: one long sequence, a few medium ones, many short (ByteScale-like skew).
LENGTHS = [2048, 700, 513, 300, 255, 127, 100, 64, 33, 7]
CAPACITY = 1024  # tokens a rank may hold per micro-batch: the 2048 one needs a ring


def _plan(num_ranks: int) -> StepPlan:
    from scheduler import cluster_preset, plan_batch

    if num_ranks == 1:  # everything on one rank, micro-batches of at most 2 x capacity
        groups, current = [], []
        for i, n in enumerate(LENGTHS):
            if current and sum(LENGTHS[j] for j in current) + n > 2 * CAPACITY:
                groups.append(current)
                current = []
            current.append(i)
        groups.append(current)
        return StepPlan(world_size=1, capacity_tokens=2 * CAPACITY, micro_batches=[
            MicroBatch(groups=[RingGroup(ranks=[0], sequences=[
                SeqSlice(id=i, length=LENGTHS[i]) for i in g])]) for g in groups])
    cluster = cluster_preset("cpu", num_ranks=num_ranks)
    return plan_batch(LENGTHS, cluster, model_preset("tiny"), capacity_tokens=CAPACITY,
                      time_limit_s=0.5)


def _rank(rank: int, world_size: int, plan_json: str, steps: int) -> list[float]:
    torch.set_num_threads(1)
    plan = StepPlan.model_validate_json(plan_json)
    torch.manual_seed(0)
    model = Transformer(model_preset("tiny"))
    gen = torch.Generator().manual_seed(1)
    samples = {i: torch.randint(0, 256, (n,), generator=gen) for i, n in enumerate(LENGTHS)}
    times = []
    for _ in range(steps + 1):  # the first is warm-up
        times.append(run_step(model, plan, samples, rank=rank).step_time_s)
    return times[1:]


def cpu_bench(ranks: list[int], steps: int) -> None:
    tokens = sum(LENGTHS)
    print(f"CPU, tiny model float32, batch {len(LENGTHS)} sequences / {tokens} tokens, "
          f"capacity {CAPACITY}, {steps} timed steps")
    print("| ranks | micro-batches per rank | ring sizes | step s (median) | tokens/s |")
    print("|---:|---|---|---:|---:|")
    for n in ranks:
        plan = _plan(n)
        per_rank = run_distributed(_rank, n, plan.model_dump_json(), steps, timeout_s=600)
        step_s = statistics.median(max(t) for t in zip(*per_rank, strict=True))
        counts = [len(plan.micro_batches_of(r)) for r in range(n)]
        rings = sorted({len(g.ranks) for _, g in plan.groups()})
        print(f"| {n} | {counts} | {rings} | {step_s:.3f} | {tokens / step_s:,.0f} |",
              flush=True)


def _mfu_spec() -> ModelSpec:
    # 1.3B-shaped Llama (GPT-3 XL widths, GQA 4:1) so 64K tokens fit one 80 GB device.
    return ModelSpec(vocab_size=32000, hidden_size=2048, num_layers=24, num_heads=16,
                     num_kv_heads=4, ffn_hidden_size=5632, dtype="bfloat16")


def _peak_tflops() -> float:
    name = torch.cuda.get_device_name()
    if "H100" in name or "H200" in name:
        return 989.0
    return 312.0  # A100 / A800 bf16 dense


def gpu_bench(tokens_list: list[int], steps: int) -> None:
    if not torch.cuda.is_available():
        print("GPU: pending (no CUDA device here)")
        return
    spec = _mfu_spec()
    torch.manual_seed(0)
    model = Transformer(spec).cuda()
    print(f"GPU {torch.cuda.get_device_name()}: {spec.num_params / 1e9:.2f}B params, bf16")
    print("| tokens | step s | model TFLOP/s | MFU |")
    print("|---:|---:|---:|---:|")
    for t in tokens_list:
        plan = StepPlan(world_size=1, capacity_tokens=t, micro_batches=[MicroBatch(groups=[
            RingGroup(ranks=[0], sequences=[SeqSlice(id=0, length=t)])])])
        samples = {0: torch.randint(0, spec.vocab_size, (t,), device="cuda")}
        times = []
        for _ in range(steps + 1):
            start = time.perf_counter()
            run_step(model, plan, samples, rank=0)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        step_s = statistics.median(times[1:])
        flops = 6 * spec.num_params * t + 6 * spec.num_layers * t * t * spec.hidden_size
        achieved = flops / step_s / 1e12
        print(f"| {t} | {step_s:.3f} | {achieved:.1f} | {achieved / _peak_tflops():.1%} |",
              flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--gpu-tokens", type=int, nargs="+", default=[16384, 32768, 65536])
    parser.add_argument("--gpu-only", action="store_true")
    args = parser.parse_args()
    if not args.gpu_only:
        cpu_bench(args.ranks, args.steps)
    gpu_bench(args.gpu_tokens, args.steps)


if __name__ == "__main__":
    main()
