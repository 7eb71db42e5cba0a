"""`ringmaster data ...`: synthesize and import token datasets."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from scheduler.errors import RingmasterError

data_app = typer.Typer(help="Create token datasets (.bin/.idx).", no_args_is_help=True)
console = Console()


def fail(exc: Exception) -> None:
    """Show a user's mistake as one line on stderr and exit with status 2."""
    Console(stderr=True, soft_wrap=True).print(f"[red]error:[/red] {exc}", highlight=False)
    raise typer.Exit(2)


def stats_table(title: str, stats: dict[str, float]) -> Table:
    table = Table(title=title)
    table.add_column("statistic")
    table.add_column("value", justify="right")
    for k, v in stats.items():
        table.add_row(k, f"{v:,.0f}" if k.startswith("num_") else f"{v:.2%}")
    return table


@data_app.command("synth")
def synth(
    out: Path = typer.Option(..., "--out", help="Directory to write data.bin/data.idx into."),
    distribution: str = typer.Option("byted", help="byted | github | uniform"),
    num_samples: int = typer.Option(1000, "--num-samples", help="Samples to draw."),
    max_length: int = typer.Option(65536, "--max-length", help="Longest sample (scales the "
                                   "published 2M-token distribution down)."),
    vocab_size: int = typer.Option(256, "--vocab-size", help="Token ids are in [1, vocab)."),
    seed: int = typer.Option(0, help="Random seed."),
    period: int = typer.Option(None, help="Copy distance: repeat a random block of this many "
                               "tokens (default: the second half copies the first)."),
    min_length: int = typer.Option(2, "--min-length", help="Raise shorter samples to this."),
):
    """Write a synthetic copy-task corpus with a published length distribution."""
    from scheduler.synth import length_stats, synthesize

    try:
        lengths = synthesize(out, distribution=distribution, num_samples=num_samples,
                             max_length=max_length, vocab_size=vocab_size, seed=seed,
                             period=period, min_length=min_length)
    except (ValueError, RingmasterError) as exc:
        fail(exc)
    console.print(stats_table(f"{distribution}: {out}", length_stats(lengths,
                                                                     max_length=max_length)))


@data_app.command("import")
def import_(
    source: Path = typer.Argument(..., help="A .jsonl or .parquet file."),
    out: Path = typer.Option(..., "--out", help="Directory to write data.bin/data.idx into."),
    column: str = typer.Option(None, help="Column to read (default input_ids, else text)."),
):
    """Import JSONL/Parquet rows (pre-tokenized input_ids, or text as UTF-8 bytes)."""
    from scheduler.ingest import import_rows

    try:
        n = import_rows(source, out, column=column)
    except (ValueError, RingmasterError, OSError) as exc:
        fail(exc)
    console.print(f"imported {n} samples into {out}")
