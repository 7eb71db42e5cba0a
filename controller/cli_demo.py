"""`ringmaster demo`: the whole system on one machine, on embedded defaults.

Starts an embedded controller (private Redis, local Ray, gRPC for the workers), writes a
copy-task corpus, submits `examples/demo-job.yaml` through the REST API like any client,
follows it with a progress bar, then writes what it saw into `demo-out/`: the first
batch's plan as a Gantt chart, the loss curve, the per-step metrics and the OpenTelemetry
trace (controller and worker spans, one JSON object per line). It stops everything it
started and exits 0 when the loss shows the copy task was learned.

The task (scheduler.synth, `period`): every sample longer than PERIOD tokens repeats a
random block of PERIOD tokens, so those tokens can be predicted only by attending PERIOD
positions back. PERIOD exceeds the per-rank capacity, so every sample with anything to
copy is longer than one rank holds: it runs zigzag-split over a ring, and its copy
sources mostly sit on other ranks. Shorter samples are pure noise packed onto single
ranks. Learned means: the final loss is below the midpoint between the loss of a model
that copies nothing (ln(V-1) per prediction) and one that copies perfectly.
"""

from __future__ import annotations

import math
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

from controller.safe_yaml import load_yaml
from scheduler.errors import SpecError

console = Console(soft_wrap=True)

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "demo-job.yaml"
VOCAB = 16  # copy-task ids 1..15
PERIOD = 72  # copy distance; > capacity_tokens, see the module docstring


def demo(
    out: Path = typer.Option(Path("demo-out"), help="Directory for the demo's outputs."),
    spec_file: Path = typer.Option(EXAMPLE, "--spec", help="Job spec to submit."),
    num_samples: int = typer.Option(3000, "--num-samples", help="Samples to synthesize."),
    steps: int = typer.Option(None, help="Override the spec's training steps."),
    seed: int = typer.Option(0, help="Data seed."),
):
    """Run a real job end to end: controller, planner, Ray workers, rings, metrics, trace."""
    from controller.cli_errors import fail

    try:
        verdict = run_demo(out=out, spec_file=spec_file, num_samples=num_samples,
                           steps=steps, seed=seed)
    except (ValueError, OSError, TimeoutError) as exc:
        fail(exc)
    if not verdict:
        raise typer.Exit(1)


def run_demo(*, out: Path, spec_file: Path, num_samples: int, steps: int | None,
             seed: int) -> bool:
    from scheduler.synth import synthesize

    out = out.resolve()
    for stale in ("state", "data", "checkpoints", "trace.jsonl"):
        path = out / stale
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(
            missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    spec = _demo_spec(spec_file, out, steps)
    capacity = spec["resources"]["capacity_tokens"]
    if PERIOD <= capacity:
        raise SpecError(f"resources.capacity_tokens={capacity} must be < {PERIOD} for the "
                        "copy sources to lie outside a rank's share")
    lengths = synthesize(out / "data", distribution="uniform", num_samples=num_samples,
                         max_length=4 * capacity, vocab_size=VOCAB, seed=seed,
                         period=PERIOD, min_length=16)
    console.print(f"dataset: {len(lengths)} copy-task samples, {lengths.sum():,} tokens, "
                  f"lengths {lengths.min()}..{lengths.max()} -> {out / 'data'}")
    with _EmbeddedController(out, num_ranks=spec["resources"]["num_ranks"]) as ctl:
        return _run_job(ctl, spec, lengths, out)


def _demo_spec(spec_file: Path, out: Path, steps: int | None) -> dict:
    spec: Any = load_yaml(spec_file.read_text())  # the demo's own spec file: a mapping
    spec["dataset"]["path"] = str(out / "data")
    spec["training"]["checkpoint_dir"] = str(out / "checkpoints")
    if steps is not None:
        spec["training"]["steps"] = steps
    return spec


class _EmbeddedController:
    """The controller, its REST server on a free loopback port, and a client to it.

    The demo's ranks are tiny CPU processes: it runs them all even on a machine with fewer
    CPUs (the launcher's limit is raised to the job's size, docs/operations.md#capacity)."""

    def __init__(self, out: Path, *, num_ranks: int):
        self.out, self.num_ranks = out, num_ranks

    def __enter__(self):
        import os

        import uvicorn

        from controller.client import RingmasterClient
        from controller.server import Controller, ControllerConfig
        from controller.telemetry import make_tracer_provider
        from scheduler.telemetry import JsonLinesSpanExporter

        trace_file = self.out / "trace.jsonl"
        os.environ["RINGMASTER_TRACE_FILE"] = str(trace_file)  # the workers' spans
        # Keep the job's traces; drop the reconciler's own Redis polling (root spans).
        keep = lambda span: span.parent is not None or "db.system" not in span.attributes  # noqa: E731
        provider = make_tracer_provider(
            exporters=[JsonLinesSpanExporter(trace_file, keep=keep)], synchronous=True)
        from controller.launchers.ray import local_cpu_count

        ranks = max(self.num_ranks, local_cpu_count())
        self.ctl = Controller(ControllerConfig(state_dir=self.out / "state", launcher="ray",
                                               port=0, grpc_port=0, token="demo",
                                               launcher_options={"total_ranks": ranks}),
                              tracer_provider=provider)
        self.server = uvicorn.Server(self.ctl.uvicorn_config(log_level="warning"))
        threading.Thread(target=self.server.run, daemon=True).start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if time.monotonic() > deadline:
                raise TimeoutError("the embedded REST server did not start in 60 s")
            time.sleep(0.05)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.ctl.start()
        self.client = RingmasterClient(f"http://127.0.0.1:{port}", token="demo")
        console.print(f"controller: REST http://127.0.0.1:{port}, gRPC port "
                      f"{self.ctl.grpc_port}, state {self.out / 'state'}")
        return self

    def __exit__(self, *exc) -> None:
        self.client.close()
        from controller.launchers.ray import RayLauncher

        launcher = self.ctl.launcher
        if isinstance(launcher, RayLauncher):
            for job_id in list(launcher._drivers):
                launcher.stop(job_id)  # a demo interrupted midway leaves nothing behind
                launcher._kill(launcher._drivers[job_id], grace_s=5)
        self.server.should_exit = True
        self.ctl.close()


def _run_job(env: _EmbeddedController, spec: dict, lengths: np.ndarray, out: Path) -> bool:
    import base64

    from controller.cli_watch import wait_with_progress

    client = env.client
    preview = client.preview(spec, num_batches=1, gantt=True)
    (out / "plan-gantt.png").write_bytes(base64.b64decode(preview.gantt_png_base64 or ""))
    job = client.submit(spec)
    console.print(f"submitted job {job.id}: {spec['resources']['num_ranks']} ranks, "
                  f"{job.total_steps} steps")
    t0 = time.monotonic()
    job = wait_with_progress(client, job, console)
    metrics = sorted(client.metrics(job.id).steps, key=lambda m: (m.step, m.attempt))
    console.print(_step_table(metrics))
    _plot_loss(metrics, out / "loss.png")
    (out / "metrics.json").write_text(client.metrics(job.id).model_dump_json(indent=1))
    tokens_s = np.mean([m.tokens_per_s for m in metrics]) if metrics else 0.0
    console.print(f"job {job.result} in {time.monotonic() - t0:.0f} s, mean "
                  f"{tokens_s:,.0f} tokens/s; outputs in {out}")
    return job.result == "Succeeded" and _learned(metrics, lengths)


def _step_table(metrics) -> Table:
    table = Table(title="steps from 1 (groups: ring size x count)")
    for col in ("step", "groups", "predicted s", "measured s", "loss", "tokens/s"):
        table.add_column(col, justify="right")
    every = max(1, len(metrics) // 15)
    for m in metrics[::every] + ([metrics[-1]] if len(metrics) % every != 1 else []):
        table.add_row(str(m.step + 1), m.groups, f"{m.predicted_step_s:.3f}",
                      f"{m.measured_step_s:.3f}", f"{m.loss:.3f}", f"{m.tokens_per_s:,.0f}")
    return table


def _plot_loss(metrics, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.5))
    ax = fig.add_subplot()
    ax.plot([m.step for m in metrics], [m.loss for m in metrics], label="training loss")
    ax.axhline(math.log(VOCAB - 1), color="grey", linestyle="--", label="copies nothing")
    ax.set(xlabel="step", ylabel="loss (nats / prediction)", title="ringmaster demo")
    ax.legend()
    fig.savefig(path, dpi=90, bbox_inches="tight")


def _learned(metrics, lengths: np.ndarray) -> bool:
    """Final loss below the midpoint of copying nothing and copying perfectly."""
    if len(metrics) < 5:
        return False
    nothing = math.log(VOCAB - 1)
    # Perfect copying leaves only each sample's first block unpredictable.
    unpredictable = np.minimum(lengths, PERIOD) - 1
    perfect = nothing * unpredictable.sum() / (lengths - 1).sum()
    threshold = (nothing + perfect) / 2
    final = float(np.mean([m.loss for m in metrics[-5:]]))
    verdict = final < threshold
    console.print(f"final loss {final:.3f} vs {threshold:.3f} (copies nothing {nothing:.3f}, "
                  f"copies perfectly {perfect:.3f}): "
                  f"{'learned' if verdict else 'NOT learned'} the copy task across rings")
    return verdict
