"""`ringmaster` command line: one typer app; each command family lives in its own module.

The controller imports no torch; commands that need workers start them by name.
"""

from __future__ import annotations

import json
import sys
from enum import StrEnum

import typer
from rich.console import Console

from controller.cli_data import data_app
from controller.cli_demo import demo
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
app.add_typer(data_app, name="data")
app.command("demo")(demo)
app.command("plan")(plan)
app.command("memory")(memory)
register_job_commands(app)
err = Console(stderr=True, soft_wrap=True)


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


def main() -> None:
    """Entry point that turns domain errors into one clear line and exit status 2."""
    try:
        app()
    except RingmasterError as exc:
        err.print(f"[red]error:[/red] {exc}")
        sys.exit(2)
