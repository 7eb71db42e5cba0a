"""Watching a job from the command line: `submit --wait` progress and `ringmaster metrics`.

On a terminal, `--wait` draws a rich progress bar of steps done (it ends at N/N when the
job succeeds); without one (CI logs, pipes) it prints a plain line when the phase changes
and at most every `interval_s` seconds otherwise, then the result. `ringmaster metrics ID`
prints the job's per-step metrics as a table, `-o json` as the API's MetricsPage (every
step, `next_since_step` null), and `--follow` keeps printing new steps (one table row, or
one JSON object, per line) until the job ends.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer
from rich import box
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn
from rich.table import Table

from controller.client import RingmasterClient
from controller.schemas import JobPublic, MetricsPage, StepMetricsPublic
from scheduler.errors import RingmasterError, SpecError


def _extra(j: JobPublic, last: StepMetricsPublic | None) -> str:
    text: str = j.result or j.phase
    if last is not None:
        text += f"  loss {last.loss:.4f}  {last.tokens_per_s:,.0f} tok/s"
    return text


def steps_done(j: JobPublic) -> int:
    """Steps to show as done: all of them once the job succeeded."""
    return j.total_steps if j.result == "Succeeded" else min(j.steps_completed, j.total_steps)


class JobProgress:
    """Follows one job on `console` (see the module docstring); `update(job, last)`."""

    def __init__(self, console: Console, job: JobPublic, *, interval_s: float = 10.0):
        self.console, self.interval_s = console, interval_s
        self._bar: Progress | None = None
        self._said: tuple[str, float] = ("", 0.0)  # (phase, time) of the last plain line
        if console.is_terminal:
            self._bar = Progress(TextColumn("{task.description}"), BarColumn(),
                                 TextColumn("step {task.completed}/{task.total}"),
                                 TextColumn("{task.fields[extra]}"), console=console)
            self._task = self._bar.add_task(job.id, total=job.total_steps, extra="")

    def __enter__(self) -> JobProgress:
        if self._bar is not None:
            self._bar.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.stop()

    def update(self, j: JobPublic, last: StepMetricsPublic | None) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=steps_done(j), extra=_extra(j, last))
            return
        phase, now = j.result or j.phase, time.monotonic()
        if phase != self._said[0] or now - self._said[1] >= self.interval_s or j.done:
            self._said = (phase, now)
            self.console.print(f"{j.id}: step {steps_done(j)}/{j.total_steps} "
                               f"{_extra(j, last)}", highlight=False)


def wait_with_progress(rm: RingmasterClient, job: JobPublic, console: Console, *,
                       interval_s: float = 10.0) -> JobPublic:
    """Poll the job until it ends, showing its progress; returns its final record."""
    with JobProgress(console, job, interval_s=interval_s) as view:
        def update(j: JobPublic) -> None:
            steps = rm.metrics(j.id, since_step=max(j.current_step, 0), limit=1).steps
            view.update(j, steps[-1] if steps else None)

        return rm.wait(job.id, on_update=update, poll_s=1.0)


# step (1-based) and attempt, loss, tokens/s, measured and predicted step seconds,
# imbalance, the largest rank's peak memory, groups by ring size: fits 80 columns.
COLUMNS = ("step", "try", "loss", "tok/s", "step s", "pred s", "imbal", "MiB", "groups")


def _row(m: StepMetricsPublic) -> tuple[str, ...]:
    return (str(m.step + 1), str(m.attempt), f"{m.loss:.4f}", f"{m.tokens_per_s:,.0f}",
            f"{m.measured_step_s:.3f}", f"{m.predicted_step_s:.3f}", f"{m.imbalance:.3f}",
            f"{m.peak_memory_bytes / 2**20:,.0f}", m.groups)


def metrics_table(job_id: str, steps: list[StepMetricsPublic]) -> Table:
    table = Table(title=f"job {job_id}: {len(steps)} steps", box=box.SIMPLE_HEAD)
    for col in COLUMNS:
        table.add_column(col, justify="left" if col == "groups" else "right",
                         no_wrap=col != "groups")
    for m in steps:
        table.add_row(*_row(m))
    return table


def all_steps(rm: RingmasterClient, job_id: str, since_step: int = 0) -> list:
    out: list[StepMetricsPublic] = []
    while True:
        page = rm.metrics(job_id, since_step=since_step)
        out.extend(page.steps)
        if page.next_since_step is None:
            return out
        since_step = page.next_since_step


def follow_metrics(rm: RingmasterClient, job_id: str, *, as_json: bool, poll_s: float = 2.0):
    """Print each new step as it is recorded until the job ends."""
    seen: set[tuple[int, int]] = set()
    after = 0  # the first step not printed yet
    if not as_json:
        typer.echo("  ".join(COLUMNS))
    while True:
        job = rm.get(job_id)  # read first: every step recorded before the end is shown
        # A restarted attempt re-runs the steps after the last checkpoint: look from there.
        since = min(after, job.last_checkpoint_step or 0) if job.attempt > 1 else after
        for m in all_steps(rm, job_id, since_step=since):
            if (m.step, m.attempt) not in seen:
                seen.add((m.step, m.attempt))
                after = max(after, m.step + 1)
                typer.echo(m.model_dump_json() if as_json else "  ".join(_row(m)))
        if job.done:
            return
        time.sleep(poll_s)


def metrics(job_id: str = typer.Argument(..., help="Job id."),
            follow: bool = typer.Option(False, "--follow", "-f", help="Print new steps as "
                                        "they are recorded, until the job ends."),
            output: str = typer.Option("table", "--output", "-o", help="table or json."),
            url: str = typer.Option(None, "--url", envvar="RINGMASTER_URL",
                                    help="Controller base URL."),
            state_dir: Path = typer.Option(None, "--state-dir", envvar="RINGMASTER_STATE_DIR",
                                           help="Local controller state directory."),
            ):
    """Per-step metrics of a job: loss, tokens/s, measured vs predicted step time,
    imbalance, peak memory, groups by ring size."""
    from controller.cli_errors import fail
    from controller.cli_jobs import console

    if output not in ("table", "json"):
        fail(SpecError(f"--output {output!r}: valid are table, json"))
    try:
        with RingmasterClient(url, state_dir=state_dir) as rm:
            if follow:
                follow_metrics(rm, job_id, as_json=output == "json")
                return
            steps = all_steps(rm, job_id)
    except RingmasterError as exc:
        fail(exc)
    if output == "json":
        page = MetricsPage(job_id=job_id, steps=steps, next_since_step=None)
        typer.echo(json.dumps(page.model_dump(mode="json"), indent=2))
    else:
        console.print(metrics_table(job_id, steps))
