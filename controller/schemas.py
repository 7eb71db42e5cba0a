"""REST bodies (pydantic, versioned with the API under /v1): what clients send and receive.

`JobCreate` (controller.spec) is the request body; `JobPublic`/`JobList` what comes back;
`ErrorBody` the shape of every 4xx/5xx. The typed client (controller.client) parses
responses into these same classes.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Literal, overload

from pydantic import BaseModel, ConfigDict, Field

from controller.spec import JobCreate
from controller.states import JobRecord, Phase, Result, Transition
from controller.store import EVENT_KINDS, JobEvent, LogLine, StepMetrics
from scheduler.plan import StepPlan


class _Public(BaseModel):
    model_config = ConfigDict(extra="forbid")


@overload
def _ts(t: float) -> datetime: ...


@overload
def _ts(t: float | None) -> datetime | None: ...


def _ts(t: float | None) -> datetime | None:
    return None if t is None else datetime.fromtimestamp(t, tz=UTC)


class TransitionPublic(_Public):
    from_state: str | None = Field(description="State before (null at submission).")
    to_state: str = Field(description="State after.")
    at: datetime
    attempt: int
    reason: str
    message: str

    @classmethod
    def of(cls, t: Transition) -> TransitionPublic:
        return cls(from_state=t.src.value if t.src else None, to_state=t.dst.value,
                   at=_ts(t.at), attempt=t.attempt, reason=t.reason, message=t.message)


class WorldPublic(_Public):
    """The ranks the job's current attempt trains on (docs/elastic.md)."""

    attempt: int
    epoch: int = Field(description="World number within the attempt; grows with every "
                                   "membership change.")
    size: int = Field(description="Ranks in the world.")
    ranks: list[int] = Field(description="The member ranks, in process-group rank order.")
    missing: list[int] = Field(description="Ranks of the job not in the world (lost, or a "
                                           "replacement waiting for the next step boundary).")
    joining: list[int] = Field(description="Members that have no state yet (rejoining).")
    formed: bool = Field(description="Every member has formed the world.")
    reason: str = Field(description="Why the world formed.")

    @classmethod
    def of(cls, saved: dict | None, num_ranks: int, attempt: int) -> WorldPublic | None:
        """From the store's snapshot (controller.membership), if it is this attempt's."""
        if not saved or saved.get("attempt") != attempt or not saved["membership"]["world"]:
            return None
        w = saved["membership"]["world"]
        members = list(w["members"])
        return cls(attempt=attempt, epoch=w["epoch"], size=len(members), ranks=members,
                   missing=[r for r in range(num_ranks) if r not in members],
                   joining=list(w["joining"]), reason=w["reason"],
                   formed=set(w["formed"]) == set(members))


class JobEventPublic(_Public):
    kind: Literal[tuple(EVENT_KINDS)] = Field(  # type: ignore[valid-type]
        description="rank_lost, world_shrunk, rank_joined or fallback_restart.")
    at: datetime
    attempt: int
    epoch: int = Field(description="The world epoch after the event.")
    step: int = Field(description="The step it happened at (the first step the new world "
                                  "runs).")
    ranks: list[int] = Field(description="The ranks concerned.")
    world_size: int = Field(description="Ranks in the world after the event.")
    reason: str

    @classmethod
    def of(cls, e: JobEvent) -> JobEventPublic:
        return cls(kind=e.kind, at=_ts(e.at), attempt=e.attempt, epoch=e.epoch, step=e.step,
                   ranks=list(e.ranks), world_size=e.world_size, reason=e.reason)


class JobEventList(_Public):
    job_id: str
    events: list[JobEventPublic] = Field(description="Oldest first.")


class JobPublic(_Public):
    """A job as the API shows it."""

    id: str
    name: str
    submission_id: str | None
    phase: Phase = Field(description="Lifecycle phase; 'Finished' once `result` is set.")
    result: Result | None = Field(description="How the job ended; null while it runs.")
    reason: str = Field(description="CamelCase cause of the last transition.")
    message: str = Field(description="Human-readable detail of the last transition.")
    attempt: int = Field(description="Attempts started so far (fencing token).")
    current_step: int = Field(description="Last step a worker reported.")
    steps_completed: int = Field(default=0, description="Optimizer steps done so far (the "
                                                        "last reported step + 1, or the "
                                                        "step resumed from).")
    total_steps: int
    last_checkpoint: str | None
    last_checkpoint_step: int | None
    stop_requested: bool
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    spec: JobCreate
    transitions: list[TransitionPublic] | None = Field(
        default=None, description="Every state change, oldest first (GET /v1/jobs/{id} only).")
    world: WorldPublic | None = Field(
        default=None, description="The ranks the current attempt trains on (GET "
                                  "/v1/jobs/{id} only; null before its ranks registered).")

    @property
    def done(self) -> bool:
        return self.result is not None

    @classmethod
    def of(cls, rec: JobRecord, transitions: list[Transition] | None = None,
           world: WorldPublic | None = None) -> JobPublic:
        return cls(
            id=rec.id, name=rec.spec.name, submission_id=rec.spec.submission_id,
            phase=rec.state.phase, result=rec.state.result, reason=rec.reason,
            message=rec.message, attempt=rec.attempt, current_step=rec.current_step,
            steps_completed=rec.steps_completed,
            total_steps=rec.spec.training.steps, last_checkpoint=rec.last_checkpoint,
            last_checkpoint_step=rec.last_checkpoint_step, stop_requested=rec.stop_requested,
            created_at=_ts(rec.created_at), updated_at=_ts(rec.updated_at),
            started_at=_ts(rec.started_at), finished_at=_ts(rec.finished_at), spec=rec.spec,
            transitions=None if transitions is None else [TransitionPublic.of(t)
                                                          for t in transitions], world=world)


class JobList(_Public):
    jobs: list[JobPublic]
    next_page_token: str | None = Field(description="Pass as page_token for the next page; "
                                                    "null on the last page.")
    total: int = Field(description="Jobs in the store.")


class StepMetricsPublic(_Public):
    step: int
    attempt: int
    loss: float
    tokens_per_s: float
    predicted_step_s: float
    measured_step_s: float
    imbalance: float = Field(description="max rank busy / mean rank busy - 1.")
    groups: str = Field(default="", description="The step plan's groups by ring size, "
                                                "'SIZExCOUNT' words, e.g. '1x6 2x1 4x1'.")
    peak_memory_bytes: int = Field(default=0, description="The largest peak of any rank "
                                                          "(device memory on GPUs, the "
                                                          "process's on CPUs).")
    rank_speeds: list[float] = Field(
        default_factory=list, description="Each rank's estimated speed after the step, "
        "relative to the planner's reference rank (below 1: slower; the next plans give it "
        "proportionally less work); empty when not measured.")
    world_size: int = Field(default=0, description="Ranks the step ran on (fewer than the "
                                                   "job's after a lost rank).")
    at: datetime

    @classmethod
    def of(cls, m: StepMetrics) -> StepMetricsPublic:
        return cls(step=m.step, attempt=m.attempt, loss=m.loss, tokens_per_s=m.tokens_per_s,
                   predicted_step_s=m.predicted_step_s, measured_step_s=m.measured_step_s,
                   imbalance=m.imbalance, groups=m.groups, world_size=m.world_size,
                   peak_memory_bytes=m.peak_memory_bytes, rank_speeds=list(m.rank_speeds),
                   at=_ts(m.at))


class MetricsPage(_Public):
    job_id: str
    steps: list[StepMetricsPublic]
    next_since_step: int | None = Field(description="since_step for the next page; null if "
                                                    "this page is the last so far.")


class LogLinePublic(_Public):
    cursor: str
    at: datetime
    rank: int | None
    text: str

    @classmethod
    def of(cls, line: LogLine) -> LogLinePublic:
        return cls(cursor=line.cursor, at=_ts(line.at), rank=line.rank, text=line.text)


class LogChunk(_Public):
    job_id: str
    lines: list[LogLinePublic]
    next_cursor: str = Field(description="Pass as cursor to read what follows.")
    finished: bool = Field(description="The job has finished: no more lines will come.")


class ErrorDetail(_Public):
    field: str | None = Field(description="Dotted path of the offending field, if any.")
    message: str


class ErrorBody(_Public):
    code: str = Field(description="Machine-readable error code, e.g. invalid_request.")
    message: str = Field(description="One line naming the field and what is valid.")
    details: list[ErrorDetail] = Field(default_factory=list)
    error_id: str | None = Field(default=None, description=(
        "Only on a 500 (code internal): the id under which the controller log holds the "
        "traceback."))


class ErrorResponse(_Public):
    error: ErrorBody


class BatchPreview(_Public):
    """The plan of one global batch of the job's dataset."""

    index: int
    num_sequences: int
    num_tokens: int
    max_length: int
    groups_by_size: dict[str, int] = Field(description="Ring size -> number of groups.")
    predicted_step_s: float
    lower_bound_s: float
    peak_tokens_per_rank: list[float] = Field(
        description="Per rank: most tokens held in any one micro-batch (each group's memory "
                    "scheme decides how many of them stay on the device).")
    peak_memory_gib_per_rank: list[float] = Field(
        description="Per rank: model states plus the peak activations of its largest "
                    "micro-batch under its group's memory scheme, GiB (memory model).")
    plan: StepPlan


class PlanPreview(_Public):
    job_name: str
    num_samples: int = Field(description="Samples in the dataset.")
    num_batches_in_epoch: int
    capacity_tokens: int
    world_size: int
    batches: list[BatchPreview]
    gantt_png_base64: str | None = Field(default=None,
                                         description="Gantt chart of the first batch (PNG).")


class Health(_Public):
    status: Literal["ok", "unavailable"]
    detail: str = ""
