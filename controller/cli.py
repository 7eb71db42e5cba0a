"""`ringmaster` command line: one typer app; each command family lives in its own module.

The controller imports no torch; commands that need workers start them by name.
"""

from __future__ import annotations

import json
import subprocess
import sys
from enum import StrEnum
from pathlib import Path

import typer

from controller.cli_data import data_app
from controller.cli_demo import demo
from controller.cli_errors import print_error
from controller.cli_jobs import register as register_job_commands
from controller.cli_memory import memory
from controller.cli_plan import plan
from scheduler.errors import RingmasterError

app = typer.Typer(
    name="ringmaster",
    help="Orchestrate long-context LLM training on dynamic Hybrid-Data-Parallel meshes.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            typer.echo(f"ringmaster {version('ringmaster')}")
        except PackageNotFoundError:  # run from a source tree that was never installed
            typer.echo("ringmaster (not installed: version unknown)")
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", is_eager=True, callback=_version,
                                       help="Print the version and exit.")) -> None:
    """Orchestrate long-context LLM training on dynamic Hybrid-Data-Parallel meshes."""


app.add_typer(data_app, name="data")
app.command("demo")(demo)
app.command("plan")(plan)
app.command("memory")(memory)
register_job_commands(app)


class SchemaKind(StrEnum):
    plan = "plan"
    model = "model"
    cluster = "cluster"
    job = "job"


def _schema_models() -> dict:
    from controller.spec import JobCreate
    from scheduler.plan import StepPlan
    from scheduler.specs import ClusterSpec, ModelSpec

    return {"plan": StepPlan, "model": ModelSpec, "cluster": ClusterSpec, "job": JobCreate}


@app.command()
def schema(kind: SchemaKind = typer.Argument(..., help="Which document's JSON Schema.")):
    """Print the JSON Schema of a plan, model spec, cluster spec or job spec."""
    typer.echo(json.dumps(_schema_models()[kind.value].model_json_schema(), indent=2))


@app.command("export")
def export_checkpoint(
    checkpoint: Path = typer.Argument(..., help="A training checkpoint directory (step_<n>)."),
    out: Path = typer.Option(..., "--out", help="The Hugging Face model directory to write."),
    dtype: str | None = typer.Option(None, help="Stored dtype (default: the checkpoint's)."),
    model: str | None = typer.Option(
        None, help="Preset or model directory trained (only for checkpoints without a "
                   "model card)."),
    max_shard_size: str = typer.Option("5GB", help="Write shards with an index above this."),
):
    """Write a checkpoint as a Hugging Face model directory (config.json, safetensors,
    tokenizer files) that transformers and vLLM load; see docs/models.md."""
    cmd = [sys.executable, "-m", "workers.export", str(checkpoint), "--out", str(out),
           "--max-shard-size", max_shard_size]
    cmd += ["--dtype", dtype] if dtype else []
    cmd += ["--model", model] if model else []
    # The export needs torch; the controller does not import it, so it runs by name.
    raise typer.Exit(subprocess.run(cmd, check=False).returncode)


def main() -> None:
    """Entry point that turns domain errors into one clear line and exit status 2."""
    try:
        app()
    except RingmasterError as exc:
        print_error(exc)
        sys.exit(2)
