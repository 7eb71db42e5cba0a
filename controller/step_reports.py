"""A finished step in the controller's words: its metrics from every rank's report, its
line in the job's log, the measured time of each group (what the cost model refits on).

Pure functions of the reports (controller.rpc StepReport messages) and the plan, used by
controller.worker_service when a step completes and by bench/lifecycle.py.
"""

from __future__ import annotations

from controller.planning import PlannedStep
from controller.rpc import ringmaster_pb2 as pb
from controller.store import StepMetrics

MAX_MESSAGE_CHARS = 600  # a failure is one line in the job's message


def step_metrics(step: int, attempt: int, reports: dict[int, pb.StepReport],
                 planned: PlannedStep | None,
                 rank_speeds: tuple[float, ...] = ()) -> StepMetrics:
    """One StepMetrics from every rank's report of a step (the plan's figures from the
    reports themselves when the plan is not at hand: after a controller restart; the rank
    speeds estimated once it is in)."""
    times = [r.step_time_s for r in reports.values()]
    busy = [sum(r.micro_batch_times_s) for r in reports.values()]
    measured = max(times) if times else 0.0
    mean_busy = sum(busy) / len(busy) if busy else 0.0
    any_report = next(iter(reports.values()))
    if planned is not None:
        predicted = planned.plan.predicted.makespan_s if planned.plan.predicted else 0.0
        groups = groups_by_size(planned.plan)
    else:
        predicted, groups = any_report.predicted_step_s, any_report.plan_groups
    return StepMetrics(
        step=step, attempt=attempt, loss=any_report.loss,
        tokens_per_s=sum(r.tokens for r in reports.values()) / measured if measured else 0.0,
        predicted_step_s=predicted, measured_step_s=measured,
        imbalance=(max(busy) / mean_busy - 1.0) if mean_busy > 0 else 0.0,
        groups=groups, peak_memory_bytes=max(r.peak_memory_bytes for r in reports.values()),
        rank_speeds=tuple(rank_speeds), world_size=len(reports))


def step_log_line(m: StepMetrics, total_steps: int) -> str:
    """The job log's line of a finished step (rank 0 logs the checkpoints it saves)."""
    return (f"step {m.step + 1}/{total_steps}: loss {m.loss:.4f}, {m.tokens_per_s:,.0f} "
            f"tokens/s, {m.measured_step_s:.3f} s (predicted {m.predicted_step_s:.3f} s), "
            f"peak memory {m.peak_memory_bytes / 2**20:,.0f} MiB, groups {m.groups or '-'}")


def one_line(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """A failure as one line: whitespace collapsed; of a traceback, its last line."""
    lines = [x.strip() for x in str(text).splitlines() if x.strip()]
    if lines and lines[0].startswith("Traceback"):
        lines = lines[-1:]
    flat = " ".join(" ".join(lines).split())
    return flat if len(flat) <= limit else flat[:limit - 3] + "..."


def groups_by_size(plan) -> str:
    """'SIZExCOUNT' words of a plan's groups, smallest ring first (e.g. '1x6 2x1 4x1')."""
    return " ".join(f"{size}x{count}" for size, count in plan.groups_by_size().items())


def group_seconds(plan, reports: dict[int, pb.StepReport]) -> dict[tuple[int, int], float]:
    """Measured time of each (micro_batch, group): the slowest member's micro-batch time."""
    mine: dict[int, list[tuple[int, int]]] = {}  # rank -> its (micro_batch, group), in order
    for m, mb in enumerate(plan.micro_batches):
        for gi, g in enumerate(mb.groups):
            for rank in g.ranks:
                mine.setdefault(rank, []).append((m, gi))
    out: dict[tuple[int, int], float] = {}
    for rank, rep in reports.items():
        for key, seconds in zip(mine.get(rank, ()), rep.micro_batch_times_s, strict=False):
            out[key] = max(out.get(key, 0.0), seconds)
    return out


__all__ = ["group_seconds", "groups_by_size", "one_line", "step_log_line", "step_metrics"]
