"""`ringmaster data ...`: synthesize, import and describe token datasets (docs/data.md)."""

from __future__ import annotations

import json
from enum import StrEnum
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from controller.cli_errors import fail
from controller.cli_progress import ImportProgressView
from scheduler.errors import RingmasterError

data_app = typer.Typer(help="Create and inspect token datasets (docs/data.md).",
                       no_args_is_help=True)
console = Console()


class Kind(StrEnum):
    pretrain = "pretrain"
    sft = "sft"
    chat = "chat"
    dpo = "dpo"
    grpo = "grpo"


class Output(StrEnum):
    table = "table"
    json = "json"


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
    sources: list[Path] = typer.Argument(..., help="JSONL (.jsonl, .json, .gz) or Parquet "
                                         "files, or directories of them."),
    out: Path = typer.Option(..., "--out", help="Dataset directory to create (written "
                             "atomically: nothing appears there unless every row imports)."),
    tokenizer: Path = typer.Option(None, "--tokenizer", help="A Hugging Face model directory "
                                   "(tokenizer.json, tokenizer_config.json with its chat "
                                   "template) or a tokenizer.json. Default: UTF-8 bytes "
                                   "(vocab 256)."),
    kind: Kind = typer.Option(None, "--kind", help="Row shape (default: the first row's)."),
    column: str = typer.Option(None, help="pretrain only: column to read (default "
                               "input_ids, else text)."),
    add_eos: bool = typer.Option(True, "--add-eos/--no-add-eos", help="Append the "
                                 "tokenizer's EOS after text and completions (chat rows "
                                 "follow their template)."),
    workers: int = typer.Option(None, "--workers", help="Tokenizer processes (default: 1 "
                                "below 8 MiB of input, else the CPU count up to 8)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing dataset "
                                   "at --out (only once the import succeeded)."),
):
    """Import rows: text, prompt/completion, messages, DPO pairs or GRPO groups."""
    from scheduler.ingest import import_dataset

    with ImportProgressView(console) as view:
        try:
            r = import_dataset(sources, out, tokenizer=tokenizer,
                               kind=kind.value if kind else None, column=column,
                               add_eos=add_eos, workers=workers, overwrite=overwrite,
                               progress=view.update)
        except (ValueError, RingmasterError, OSError) as exc:
            view.stop()
            fail(exc)
    console.print(f"imported {r.num_rows:,} {r.kind} rows as {r.num_samples:,} samples, "
                  f"{r.num_tokens:,} tokens ({r.num_loss_tokens:,} with a loss) into {out} in "
                  f"{r.seconds:.1f} s ({r.tokens_per_s:,.0f} tokens/s, {r.workers} "
                  f"worker{'s' if r.workers > 1 else ''})", highlight=False)


class LogpColumn(StrEnum):
    ref_logps = "ref_logps"
    old_logps = "old_logps"


@data_app.command("ref-logps")
def ref_logps(
    data: Path = typer.Argument(..., help="Dataset directory or prefix."),
    model: Path = typer.Option(..., "--model", help="Hugging Face model directory (the "
                                                    "reference, or the sampling policy)."),
    column: LogpColumn = typer.Option(LogpColumn.ref_logps, "--column",
                                      help="ref_logps (DPO, GRPO's KL) or old_logps (GRPO)."),
    num_ranks: int = typer.Option(1, "--num-ranks", min=1, help="Processes (one per GPU)."),
    capacity_tokens: int = typer.Option(8192, "--capacity-tokens", min=1,
                                        help="Tokens one rank holds per micro-batch."),
    dtype: str | None = typer.Option(None, "--dtype", help="Parameter dtype (default: the "
                                                           "config's)."),
):
    """Store a model's per-token log-probs in the dataset (a forward-only HDP job)."""
    import subprocess
    import sys

    # The job runs the workers' code by name, in its own processes (the controller's
    # side imports no torch): python -m workers.ref_logps.
    cmd = [sys.executable, "-m", "workers.ref_logps", str(data), "--model", str(model),
           "--column", column.value, "--num-ranks", str(num_ranks),
           "--capacity-tokens", str(capacity_tokens)] + (["--dtype", dtype] if dtype else [])
    code = subprocess.run(cmd, check=False).returncode
    if code:
        raise typer.Exit(code)


@data_app.command("stats")
def stats(
    data: Path = typer.Argument(..., help="Dataset directory or prefix."),
    output: Output = typer.Option(Output.table, "--output", "-o", help="table or json."),
):
    """Length percentiles, loss tokens, kinds, DPO pairs and GRPO groups of a dataset."""
    from scheduler.dataset import dataset_stats

    try:
        st = dataset_stats(data)
    except (ValueError, RingmasterError, OSError) as exc:
        fail(exc)
    if output is Output.json:
        typer.echo(json.dumps(st, indent=2))
        return
    console.print(dataset_table(st))


def dataset_table(st: dict) -> Table:
    table = Table(title=f"{st['path']} (format v{st['version']})")
    table.add_column("statistic")
    table.add_column("value", justify="right")
    rows = [("samples", f"{st['num_samples']:,}"), ("tokens", f"{st['num_tokens']:,}")]
    rows += [(f"length {k}", f"{v:,.1f}" if k == "mean" else f"{v:,}")
             for k, v in st["length"].items()]
    rows += [("loss tokens", f"{st['num_loss_tokens']:,} ({st['loss_share']:.1%} of "
              "predictions)"),
             ("kinds", ", ".join(f"{k} {v:,}" for k, v in st["kinds"].items()) or "-"),
             ("DPO pairs", f"{st['num_pairs']:,}"), ("GRPO groups", f"{st['num_groups']:,}"),
             ("columns", ", ".join(st["columns"]) or "-"),
             ("max token id", f"{st['max_token_id']:,}")]
    tok = st.get("tokenizer") or {}
    if tok:
        rows.append(("tokenizer", f"{tok.get('path', tok.get('type'))} (vocab "
                     f"{tok.get('vocab_size'):,})"))
    for k, v in rows:
        table.add_row(k, v)
    return table
