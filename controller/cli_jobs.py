"""`ringmaster serve | submit | status | list | logs | stop | preview | metrics`: jobs.

All but `serve` talk to a controller through controller.client (URL from --url or
$RINGMASTER_URL or the local state directory; token from $RINGMASTER_TOKEN or the state
directory). `--output json` prints the API's JSON; errors are one line on stderr and exit
status 2 (a job that ends without succeeding under `submit --wait` exits 1).
"""

from __future__ import annotations

import base64
from enum import StrEnum
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from controller.cli_errors import err, fail
from controller.cli_watch import metrics, steps_done, wait_with_progress
from controller.client import RingmasterClient
from controller.schemas import JobEventPublic, JobList, JobPublic, PlanPreview, StepMetricsPublic
from scheduler.errors import RingmasterError, SpecError

console = Console(soft_wrap=True)


class Output(StrEnum):
    table = "table"
    json = "json"


class LauncherName(StrEnum):
    ray = "ray"
    kuberay = "kuberay"
    kubernetes = "kubernetes"  # the older name of kuberay
    external = "external"  # ranks started by someone else call back over gRPC
    fake = "fake"


URL = typer.Option(None, "--url", envvar="RINGMASTER_URL", help="Controller base URL.")
STATE_DIR = typer.Option(None, "--state-dir", envvar="RINGMASTER_STATE_DIR",
                         help="Local controller state directory (default ~/.ringmaster).")
OUTPUT = typer.Option(Output.table, "--output", "-o", help="table or json.")


def _client(url: str | None, state_dir: Path | None) -> RingmasterClient:
    return RingmasterClient(url, state_dir=state_dir)


def _print_json(model) -> None:
    typer.echo(model.model_dump_json(indent=2))


def job_table(jobs: list[JobPublic], title: str = "jobs", *, wide: bool = False) -> Table:
    """Jobs as a table that keeps every id whole (copyable) at 80 columns: id, status,
    steps done, reason; `wide` adds attempt, creation time and message."""
    table = Table(title=title)
    table.add_column("id", no_wrap=True, overflow="fold",
                     min_width=max((len(j.id) for j in jobs), default=2))
    table.add_column("status")
    table.add_column("step", justify="right", no_wrap=True)
    table.add_column("reason")
    if wide:
        for col in ("attempt", "created", "message"):
            table.add_column(col)
    for j in jobs:
        # A job the launcher has not admitted yet says why: "Pending: waiting for Kueue
        # admission in queue gpu".
        status: str = j.result or j.phase
        if j.reason == "AwaitingAdmission" and not wide:
            status = f"{status}: {j.message}"
        row = [j.id, status, f"{steps_done(j)}/{j.total_steps}", j.reason]
        if wide:
            row += [str(j.attempt), j.created_at.strftime("%Y-%m-%d %H:%M:%S"), j.message]
        table.add_row(*row)
    return table


def show_job(job: JobPublic, newest: StepMetricsPublic | None = None,
             events: list[JobEventPublic] | None = None) -> None:
    console.print(job_table([job], title=f"job {job.id}"))
    console.print(f"attempt {job.attempt}, created {job.created_at:%Y-%m-%d %H:%M:%S}",
                  highlight=False)
    if newest is not None and newest.rank_speeds:
        console.print(f"rank speeds (after step {newest.step}): "
                      f"{speeds_summary(newest.rank_speeds)}", highlight=False)
    if job.message:
        console.print(f"message: {job.message}", highlight=False)
    if job.world is not None:
        console.print(world_line(job), highlight=False)
    if job.last_checkpoint:
        console.print(f"last checkpoint: {job.last_checkpoint} (step "
                      f"{job.last_checkpoint_step})", highlight=False)
    for t in job.transitions or []:
        console.print(f"  {t.at:%H:%M:%S} {t.from_state or '-'} -> {t.to_state} "
                      f"[{t.reason}] {t.message}", highlight=False)
    for e in events or []:
        console.print(f"  {e.at:%H:%M:%S} {e.kind} ranks {e.ranks} at step {e.step}: world "
                      f"{e.epoch} of {e.world_size} ranks ({e.reason})", highlight=False)


def world_line(job: JobPublic) -> str:
    """'world 2: 3/4 ranks [0, 2, 3], missing [1] (rank 1 lost: ...)'."""
    w = job.world
    assert w is not None, "called for a job that has a world"
    total = job.spec.resources.num_ranks
    extra = f", missing {w.missing}" if w.missing else ""
    extra += f", joining {w.joining}" if w.joining and not w.formed else ""
    extra += "" if w.formed else ", forming"
    return f"world {w.epoch}: {w.size}/{total} ranks {w.ranks}{extra} ({w.reason})"


MAX_SLOW_SHOWN = 8


def speeds_summary(speeds: list[float]) -> str:
    """'1.00 on 6 ranks; slower: rank 1 0.50, rank 5 0.31' (the slowest first)."""
    top = max(speeds)
    slow = sorted((v, r) for r, v in enumerate(speeds) if v < top)
    text = f"{top:.2f} on {len(speeds) - len(slow)} rank(s)"
    if slow:
        shown = ", ".join(f"rank {r} {v:.2f}" for v, r in slow[:MAX_SLOW_SHOWN])
        more = f" (+{len(slow) - MAX_SLOW_SHOWN} more)" if len(slow) > MAX_SLOW_SHOWN else ""
        text += f"; slower: {shown}{more}"
    return text


def serve(
    host: str = typer.Option("127.0.0.1", help="REST bind address."),
    port: int = typer.Option(8080, help="REST port."),
    grpc_port: int = typer.Option(50051, "--grpc-port", help="Port workers call back on "
                                  "(every call needs its attempt's secret)."),
    state_dir: Path = STATE_DIR,
    launcher: LauncherName = typer.Option(LauncherName.ray, help="How job workers start "
                                          "(external: ranks started by another system call "
                                          "back, docs/operations.md; fake: in memory, starts "
                                          "nothing; for API tests)."),
    redis_url: str = typer.Option(None, "--redis-url", envvar="REDIS_URL",
                                  help="External Redis (default: embedded in state dir)."),
    data_root: list[Path] = typer.Option(
        None, "--data-root", help="Directory dataset, model and checkpoint paths must lie "
        "in (repeatable; default: anywhere, as a single-user tool)."),
    tls_cert: Path = typer.Option(None, "--tls-cert", help="PEM certificate (chain): serve "
                                  "REST (HTTPS) and gRPC over TLS. E.g. cert-manager's "
                                  "tls.crt."),
    tls_key: Path = typer.Option(None, "--tls-key", help="PEM private key of --tls-cert "
                                 "(tls.key)."),
    tls_ca: Path = typer.Option(None, "--tls-ca", help="CA the workers trust for the gRPC "
                                "port (ca.crt; default: --tls-cert itself)."),
    max_connections: int = typer.Option(1000, "--max-connections", min=1,
                                        help="Open REST connections; more get 503."),
    max_ranks: int = typer.Option(None, "--max-ranks", min=1, envvar="RINGMASTER_MAX_RANKS",
                                  help="Ranks the ray launcher runs at once (default: one "
                                  "per CPU of this machine; set it to a Ray cluster's size "
                                  "with RAY_ADDRESS). Larger jobs are refused at submit."),
    log_level: str = typer.Option("info", "--log-level", help="debug | info | warning"),
):
    """Run the controller (REST API, job store, state machine, gRPC for workers) in the
    foreground."""
    from controller.http_server import HttpLimits
    from controller.server import ControllerConfig, TlsFiles, default_state_dir
    from controller.server import serve as run

    try:
        if (tls_cert is None) != (tls_key is None):
            raise SpecError("--tls-cert and --tls-key: give both or neither")
        if tls_ca is not None and tls_cert is None:
            raise SpecError("--tls-ca: only with --tls-cert and --tls-key")
        tls = TlsFiles(cert=tls_cert, key=tls_key, ca=tls_ca) if tls_cert else None
        config = ControllerConfig(state_dir=state_dir or default_state_dir(), host=host,
                                  port=port, grpc_port=grpc_port, redis_url=redis_url,
                                  launcher=launcher.value, data_roots=tuple(data_root or ()),
                                  launcher_options={"total_ranks": max_ranks}
                                  if max_ranks and launcher is LauncherName.ray else {},
                                  tls=tls, http=HttpLimits(max_connections=max_connections))
        err.print(f"state directory {config.state_dir} (API token in "
                  f"{config.state_dir / 'token'})", highlight=False)
        run(config, log_level=log_level)
    except (ValueError, RingmasterError, OSError) as exc:
        fail(exc)


def submit(
    file: Path = typer.Argument(..., help="Job spec (.yaml or .json)."),
    wait: bool = typer.Option(False, "--wait", help="Follow the job until it finishes (a "
                              "progress bar on a terminal, a line every 10 s otherwise)."),
    output: Output = OUTPUT, url: str = URL, state_dir: Path = STATE_DIR,
):
    """Submit a job; with --wait show its progress until it ends."""
    try:
        with _client(url, state_dir) as rm:
            job = rm.submit(file)
            if wait:
                job = wait_with_progress(rm, job, err)
    except (RingmasterError, ValueError) as exc:
        fail(exc)
    if output is Output.json:
        _print_json(job)
    else:
        show_job(job)
    if wait and job.result != "Succeeded":
        raise typer.Exit(1)


def status(job_id: str = typer.Argument(..., help="Job id."), output: Output = OUTPUT,
           url: str = URL, state_dir: Path = STATE_DIR):
    """Show one job: phase, result, attempt, step, current world, checkpoint, the ranks'
    measured speeds, its transitions and world changes."""
    try:
        with _client(url, state_dir) as rm:
            job = rm.get(job_id)
            steps = [] if output is Output.json else rm.metrics(
                job_id, since_step=max(job.current_step, 0), limit=1).steps
            events = [] if output is Output.json else rm.events(job_id, limit=50).events
    except RingmasterError as exc:
        fail(exc)
    _print_json(job) if output is Output.json else show_job(
        job, steps[-1] if steps else None, events)


def list_(limit: int = typer.Option(50, help="Jobs per page."),
          all_pages: bool = typer.Option(False, "--all", help="Every page, not just one."),
          page_token: str = typer.Option(None, "--page-token", help="next_page_token of "
                                         "the previous page."),
          wide: bool = typer.Option(False, "--wide", "-w", help="Also attempt, creation "
                                    "time and message."),
          output: Output = OUTPUT, url: str = URL, state_dir: Path = STATE_DIR):
    """List jobs, newest first (-o json: the API's {jobs, next_page_token, total})."""
    try:
        with _client(url, state_dir) as rm:
            page = rm.list(limit=limit, page_token=page_token)
            if all_pages:
                while page.next_page_token:
                    more = rm.list(limit=limit, page_token=page.next_page_token)
                    page = JobList(jobs=[*page.jobs, *more.jobs], total=more.total,
                                   next_page_token=more.next_page_token)
    except RingmasterError as exc:
        fail(exc)
    if output is Output.json:
        _print_json(page)
    else:
        console.print(job_table(page.jobs, wide=wide))
        if page.next_page_token:
            console.print(f"more: --page-token {page.next_page_token}", highlight=False)


def logs(job_id: str = typer.Argument(..., help="Job id."),
         follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing new lines "
                                     "until the job ends."),
         tail: int = typer.Option(100, help="Lines from the end to start with."),
         output: Output = OUTPUT, url: str = URL, state_dir: Path = STATE_DIR):
    """Print a job's log (bounded chunks; -f follows it)."""
    try:
        with _client(url, state_dir) as rm:
            lines = rm.follow_logs(job_id, tail=tail) if follow else \
                rm.logs(job_id, tail=tail).lines
            for line in lines:
                if output is Output.json:
                    typer.echo(line.model_dump_json())
                else:
                    who = "ctl" if line.rank is None else f"r{line.rank}"
                    typer.echo(f"{line.at:%H:%M:%S} {who}: {line.text}")
    except RingmasterError as exc:
        fail(exc)


def stop(job_id: str = typer.Argument(..., help="Job id."), output: Output = OUTPUT,
         url: str = URL, state_dir: Path = STATE_DIR):
    """Stop a job (running workers drain at the next step boundary)."""
    try:
        with _client(url, state_dir) as rm:
            job = rm.stop(job_id)
    except RingmasterError as exc:
        fail(exc)
    _print_json(job) if output is Output.json else show_job(job)


def preview(file: Path = typer.Argument(..., help="Job spec (.yaml or .json)."),
            num_batches: int = typer.Option(2, "--num-batches", help="Batches to plan (1-8)."),
            png: Path = typer.Option(None, "--png", help="Write the first batch's Gantt here."),
            output: Output = OUTPUT, url: str = URL, state_dir: Path = STATE_DIR):
    """Dry run: plan the job's first global batches on the controller; nothing starts."""
    try:
        with _client(url, state_dir) as rm:
            result = rm.preview(file, num_batches=num_batches, gantt=png is not None)
    except (RingmasterError, ValueError) as exc:
        fail(exc)
    if png is not None and result.gantt_png_base64:
        png.write_bytes(base64.b64decode(result.gantt_png_base64))
    if output is Output.json:
        _print_json(result)
        return
    console.print(preview_table(result))
    if png is not None:
        console.print(f"Gantt chart written to {png}", highlight=False)


def preview_table(p: PlanPreview) -> Table:
    table = Table(title=f"{p.job_name}: {p.num_samples} samples, {p.num_batches_in_epoch} "
                        f"batches/epoch, {p.world_size} ranks, capacity {p.capacity_tokens} "
                        "tokens/rank")
    for col in ("batch", "sequences", "tokens", "max len", "groups by size",
                "predicted s", "bound s", "peak GiB/rank"):
        table.add_column(col, justify="right")
    for b in p.batches:
        groups = " ".join(f"{k}x{v}" for k, v in b.groups_by_size.items())
        table.add_row(str(b.index), str(b.num_sequences), f"{b.num_tokens:,}",
                      str(b.max_length), groups, f"{b.predicted_step_s:.3f}",
                      f"{b.lower_bound_s:.3f}", f"{max(b.peak_memory_gib_per_rank):.2f}")
    return table


def register(app: typer.Typer) -> None:
    """Add the job commands to the `ringmaster` app."""
    for fn, name in ((serve, "serve"), (submit, "submit"), (status, "status"),
                     (list_, "list"), (logs, "logs"), (stop, "stop"), (preview, "preview"),
                     (metrics, "metrics")):
        app.command(name)(fn)
