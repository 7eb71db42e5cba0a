"""`ringmaster demo`: the best end-to-end path that exists, on embedded defaults."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

console = Console()


def demo(
    out: Path = typer.Option(Path("demo-out"), help="Directory for the demo's outputs."),
    num_samples: int = typer.Option(2000, "--num-samples", help="Samples to synthesize."),
    max_length: int = typer.Option(16384, "--max-length", help="Longest sample."),
    tokens_per_batch: int = typer.Option(131072, "--tokens-per-batch",
                                         help="Global batch size in tokens."),
    capacity_tokens: int = typer.Option(4096, "--capacity-tokens",
                                        help="Tokens one rank holds per micro-batch."),
    num_batches: int = typer.Option(3, "--num-batches", help="Batches to show."),
    seed: int = typer.Option(0, help="Random seed."),
):
    """Synthesize a copy-task corpus, form global batches and show what each needs."""
    from scheduler.batching import epoch_batches
    from scheduler.dataset import TokenDataset
    from scheduler.synth import synthesize

    data_dir = out / "data"
    synthesize(data_dir, distribution="byted", num_samples=num_samples, max_length=max_length,
               seed=seed)
    lengths = TokenDataset(data_dir).lengths
    console.print(f"dataset: {len(lengths)} samples, {lengths.sum():,} tokens -> {data_dir}")
    batches = epoch_batches(lengths, tokens_per_batch=tokens_per_batch, seed=seed)
    for b, ids in enumerate(batches[:num_batches]):
        console.print(_batch_table(b, lengths[ids], capacity_tokens))


def _batch_table(index: int, lengths: np.ndarray, capacity: int) -> Table:
    need = np.array([math.ceil(n / capacity) for n in lengths])
    table = Table(title=f"global batch {index}: {len(lengths)} sequences, "
                        f"{lengths.sum():,} tokens, capacity {capacity} tokens/rank")
    for col in ("ranks needed", "sequences", "tokens", "min len", "max len"):
        table.add_column(col, justify="right")
    for d in np.unique(need):
        sel = lengths[need == d]
        table.add_row(str(d), str(sel.size), f"{sel.sum():,}", str(sel.min()), str(sel.max()))
    return table
