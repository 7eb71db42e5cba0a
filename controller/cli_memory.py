"""`ringmaster memory`: the MEMO memory plan of one forward+backward, as a table or JSON.

Torch-free: it plans from the stored token-affine profiles (scheduler/memory_model.py);
`python -m workers.memtrace --model ...` records new ones.
"""

from __future__ import annotations

import json
from enum import StrEnum
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from controller.cli_errors import fail
from scheduler.errors import RingmasterError, SpecError

GIB = 1024**3


class MemoryOutput(StrEnum):
    table = "table"
    json = "json"


def memory(
    model: str = typer.Option("llama-7b", help="Model preset or a HF config.json path."),
    tokens: int = typer.Option(65536, "--tokens", help="Tokens one rank holds in a step."),
    layers: int = typer.Option(None, "--layers", help="Decoder layers (default: the model's)."),
    time_limit: float = typer.Option(5.0, "--time-limit", help="Seconds of CP-SAT per level."),
    output: MemoryOutput = typer.Option(MemoryOutput.table, help="table or json."),
):
    """Plan activation addresses (MEMO bi-level MIP) and compare with a caching allocator."""
    from scheduler.activations import ActivationModel
    from scheduler.alloc_sim import simulate_caching_allocator
    from scheduler.memory_model import find_profile, plan_model, unrolled_trace
    from scheduler.specs import model_preset
    from scheduler.work import Scheme

    try:
        if tokens < 1:
            raise SpecError(f"--tokens {tokens}: must be >= 1")
        if layers is not None and layers < 1:
            raise SpecError(f"--layers {layers}: must be >= 1")
        spec = model_preset(model)
        spec = spec if layers is None else spec.model_copy(update={"num_layers": layers})
        profile = find_profile(spec)
        plan = plan_model(profile, tokens, num_layers=spec.num_layers, time_limit_s=time_limit)
    except (ValueError, RingmasterError) as exc:
        fail(exc)
    sim = simulate_caching_allocator(*unrolled_trace(profile, tokens,
                                                     num_layers=spec.num_layers))
    figures: dict[str, Any] = {
        "tokens": tokens, "num_layers": spec.num_layers,
        "layer_max_live_bytes": plan.layer.plan.max_live_bytes,
        "layer_block_bytes": max(plan.layer.forward_peak, plan.layer.backward_peak),
        "model_max_live_bytes": plan.unrolled_max_live_bytes,
        "planned_peak_bytes": plan.peak_bytes,
        "planned_bytes_per_token": plan.bytes_per_token,
        # the other memory schemes' peaks (scheduler/activations.py, the same profile)
        "memo_offload_peak_bytes": ActivationModel(spec, profile=profile).peak_bytes(
            tokens, Scheme(name="offload", offload_ratio=1.0)),
        "streambp_peak_bytes": ActivationModel(spec, profile=profile).peak_bytes(
            tokens, Scheme(name="streambp", chunk_tokens=min(tokens, 4096))),
        "caching_allocator_reserved_bytes": sim.peak_reserved_bytes,
        "status": plan.model_plan.status,
    }
    if output is MemoryOutput.json:
        typer.echo(json.dumps(figures, indent=2))
        return
    table = Table(title=f"MEMO memory plan: {model}, {tokens} tokens, {spec.num_layers} layers")
    table.add_column("figure")
    table.add_column("value", justify="right")
    for key, value in figures.items():
        shown = f"{value / GIB:.3f} GiB" if key.endswith("_bytes") else (
            f"{value:,.0f} B" if key.endswith("per_token") else str(value))
        table.add_row(key.removesuffix("_bytes"), shown)
    Console().print(table)
