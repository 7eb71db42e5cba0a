"""`ringmaster plan`: plan one global batch and show it (JSON, a table, a Gantt chart).

Torch-free, like the rest of the controller: it only needs sequence lengths. The table
compares the plan with the two baselines on the same cost and memory model: the best
static mesh (every CP degree tried) and power-of-two dynamic CP (Megatron-Core's shape);
the JSON form is the StepPlan, whose `predicted.groups` carry each group's FLOPs, ring
bytes and peak bytes per rank. A user's mistake (missing file, bad length, unknown
preset, a sequence that cannot fit, a model whose states cannot fit a device) prints one
line on stderr and exits with status 2.
"""

from __future__ import annotations

import json
from collections import Counter
from enum import StrEnum
from pathlib import Path

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

from controller.cli_errors import fail
from scheduler.errors import RingmasterError, SpecError

console = Console()


class PlanPolicy(StrEnum):
    hdp = "hdp"
    pow2 = "pow2"
    naive = "naive"
    static = "static"


class Precision(StrEnum):
    bf16_mixed = "bf16-mixed"
    fp32 = "fp32"
    fp64 = "fp64"


class Sharding(StrEnum):
    none = "none"
    zero1 = "zero1"
    distributed = "distributed"


class PlanOutput(StrEnum):
    json = "json"
    table = "table"


def read_lengths(path: Path) -> list[int]:
    """Lengths from a .npy array, a JSON list, or one integer per line."""
    if not path.is_file():
        raise SpecError(f"--lengths {path}: file not found")
    if path.suffix == ".npy":
        try:
            arr = np.load(path, allow_pickle=False)
        except ValueError as exc:
            raise SpecError(f"--lengths {path}: not a numeric .npy array ({exc})") from None
        return _as_ints(arr.reshape(-1).tolist(), path)
    text = path.read_text().strip()
    if text.startswith("["):
        try:
            return _as_ints(json.loads(text), path)
        except json.JSONDecodeError as exc:
            raise SpecError(f"--lengths {path}: not a valid JSON list ({exc})") from None
    return _as_ints([line for line in text.splitlines() if line.strip()], path)


def _as_ints(values: list, path: Path) -> list[int]:
    out = []
    for i, v in enumerate(values):
        try:
            x = float(v)
        except (TypeError, ValueError):
            raise SpecError(f"--lengths {path}: entry {i} is {v!r}, not an integer") from None
        if x != int(x):
            raise SpecError(f"--lengths {path}: entry {i} is {v!r}, not an integer")
        out.append(int(x))
    return out


def plan(
    lengths: Path = typer.Option(..., "--lengths", help="Sequence lengths: one per line, a "
                                 "JSON list, or a .npy array."),
    ranks: int = typer.Option(..., "--ranks", help="Number of ranks (GPUs) to plan for."),
    gpus_per_node: int = typer.Option(None, "--gpus-per-node",
                                      help="Ranks per node (default: the preset's, 8 on h100)."),
    model: str = typer.Option("llama-7b", help="Model preset or a HF config.json path."),
    cluster: str = typer.Option("h100", help="Cluster preset: h100, a100, a800 or cpu."),
    capacity_tokens: int = typer.Option(None, "--capacity-tokens", help="Tokens one rank may "
                                        "hold per micro-batch (default: from GPU memory)."),
    policy: PlanPolicy = typer.Option(PlanPolicy.hdp, help="hdp, pow2 (ring sizes powers of "
                                      "two), naive (Alg. 1 only) or static (one CP degree)."),
    precision: Precision = typer.Option(None, "--precision", help="bf16-mixed, fp32 or fp64 "
                                        "(default: the model dtype's)."),
    sharding: Sharding = typer.Option(None, "--optimizer-sharding", help="none, zero1 or "
                                      "distributed (default: distributed on > 1 rank)."),
    time_limit: float = typer.Option(0.5, "--time-limit", help="Seconds of CP-SAT search."),
    seed: int = typer.Option(0, help="Seed of the search (same seed, same plan)."),
    output: PlanOutput = typer.Option(PlanOutput.table, help="json: the StepPlan (with "
                                      "per-group predictions); table: a summary."),
    png: Path = typer.Option(None, "--png", help="Also draw a Gantt chart to this PNG."),
):
    """Plan one global batch on a dynamic HDP mesh and print it."""
    from scheduler.cost import CostModel
    from scheduler.planner import plan_batch
    from scheduler.simulator import simulate
    from scheduler.specs import cluster_preset, model_preset

    try:
        if ranks < 1:
            raise SpecError(f"--ranks {ranks}: need at least one rank")
        batch = read_lengths(lengths)
        spec = model_preset(model)
        hw = cluster_preset(cluster, num_ranks=ranks, gpus_per_node=gpus_per_node)
        cost = CostModel(spec, hw, precision=precision and precision.value,
                         optimizer_sharding=sharding and sharding.value)
        step = plan_batch(batch, hw, spec, policy=policy.value, capacity_tokens=capacity_tokens,
                          time_limit_s=time_limit, seed=seed, cost=cost)
        baselines = {} if output is PlanOutput.json else {
            name: step if policy.value == name else plan_batch(
                batch, hw, spec, policy=name, capacity_tokens=step.capacity_tokens,
                time_limit_s=time_limit, seed=seed, cost=cost, predictions=False)
            for name in ("static", "pow2")}
    except (ValueError, RingmasterError) as exc:
        fail(exc)
    if output is PlanOutput.json:
        typer.echo(step.model_dump_json(indent=2))
    else:
        console.print(summary_table(step, baselines, policy.value))
    if png is not None:
        from scheduler.gantt import draw_gantt

        draw_gantt(step, simulate(step, hw, spec, cost=cost), png)
        Console(stderr=True).print(f"wrote {png}")


def summary_table(step, baselines: dict, policy: str) -> Table:
    """Groups by ring size and memory scheme, makespan, bound, their ratio, the speed-ups
    over the best static mesh and power-of-two dynamic CP, and the memory figures."""
    sizes: Counter[tuple[int, str]] = Counter()
    seqs: Counter[tuple[int, str]] = Counter()
    for _, g in step.groups():
        key = (g.ring_size, g.memory.scheme if g.memory else "v1")
        sizes[key] += 1
        seqs[key] += len(g.sequences)
    table = Table(title=f"{policy} plan: {step.world_size} ranks, "
                        f"{len(step.micro_batches)} micro-batch(es), "
                        f"capacity {step.capacity_tokens} tokens")
    table.add_column("ring size", justify="right")
    table.add_column("scheme")
    table.add_column("groups", justify="right")
    table.add_column("sequences", justify="right")
    for key in sorted(sizes):
        table.add_row(str(key[0]), key[1], str(sizes[key]), str(seqs[key]))
    p = step.predicted
    table.add_section()
    table.add_row("makespan (s)", "", f"{p.makespan_s:.4g}", "")
    table.add_row("lower bound (s)", "", f"{p.lower_bound_s:.4g}", "")
    table.add_row("makespan / bound", "", f"{p.makespan_s / p.lower_bound_s:.3f}", "")
    if "static" in baselines:
        static = baselines["static"]
        degree = max(g.ring_size for _, g in static.groups())
        table.add_row("speed-up vs static", f"best CP={degree}",
                      f"{static.predicted.makespan_s / p.makespan_s:.2f}x", "")
    if "pow2" in baselines:
        table.add_row("speed-up vs pow2 dynamic CP", "",
                      f"{baselines['pow2'].predicted.makespan_s / p.makespan_s:.2f}x", "")
    if step.memory is not None:
        gib = 2**30
        peak = max((max(g.peak_bytes_per_rank) for g in p.groups or []), default=0)
        table.add_section()
        table.add_row("precision / sharding", "",
                      f"{step.memory.precision} / {step.memory.optimizer_sharding}", "")
        table.add_row("model states (GiB/rank)", "", f"{step.memory.model_state_bytes / gib:.2f}",
                      "")
        table.add_row("peak / budget (GiB/rank)", "",
                      f"{peak / gib:.2f} / {step.memory.device_budget_bytes / gib:.2f}", "")
    return table
