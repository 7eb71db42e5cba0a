"""The job store: every job record, transition, step metric and log line, in Redis.

Nothing that matters lives only in process memory: a controller killed with SIGKILL and
started again against the same Redis finds every job with the same id and state. Redis
runs with append-only persistence (controller.redis_server). Keys, all under one prefix:

    {p}:seq                   INCR counter; orders jobs for paging
    {p}:jobs                  ZSET job id -> seq (newest first when listing)
    {p}:active                SET of ids of non-terminal jobs
    {p}:pending               ZSET Pending job id -> seq (the admission queue)
    {p}:due                   ZSET job id -> unix time the state machine must look at it
                              (a Restarting job's back-off end, a Scheduling or Stopping
                              job's timeout); Running jobs need nothing until an event
    {p}:sub:{submission_id}   STRING job id (idempotent submission)
    {p}:checkpoint_dirs       HASH resolved checkpoint_dir -> the newest job given it (in
                              use while that job is active)
    {p}:job:{id}              HASH the record (spec JSON, state, attempt, timestamps, ...)
    {p}:job:{id}:transitions  LIST of transition JSON, oldest first
    {p}:job:{id}:metrics      ZSET step metrics JSON scored by step (one per attempt and step)
    {p}:job:{id}:reports:{attempt}:{step}  HASH rank -> that rank's report, until every
                              rank's is in and the step's metrics are recorded
    {p}:job:{id}:logs         STREAM of log lines (the stream id is the log cursor)
    {p}:job:{id}:events       LIST of job event JSON (rank_lost, world_shrunk, ...), oldest
                              first
    {p}:job:{id}:world        STRING JSON of the current attempt's world and membership

State changes are compare-and-set (WATCH/MULTI on the job hash): a transition applies only
if the job is still in the state the caller saw, so the API and the reconciler may race
safely. Every transition is traced as a `job.transition` span. The pending and due
indexes change in the same transaction as the state, so the reconciler reads only the
jobs that need action (`pending_ids`, `due_ids`), never every active job.

User input reaching Redis is checked first: page tokens and cursors are ASCII digits
(`str.isdigit` accepts other scripts' digits, which Redis then rejects).
"""

from __future__ import annotations

import builtins
import json
import os
import re
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import redis
import redis.asyncio as aioredis
from opentelemetry import propagate, trace
from redis.typing import EncodableT

from controller.redis_replies import (
    LogEntry,
    optional_text,
    read_entries,
    scored,
    stream_entries,
    text_hash,
    texts,
)
from controller.spec import JobCreate
from controller.states import JobRecord, StaleState, State, Transition, check_transition
from scheduler.errors import ConflictError, NotFoundError, SpecError

MAX_LOG_LINES = 100_000  # per job; older lines are trimmed (approximately) on append
MAX_LOG_LINE_CHARS = 8192
REPORT_TTL_S = 86_400  # a step's rank reports are kept at most this long unless complete
_CURSOR = re.compile(r"^[0-9]{1,20}(-[0-9]{1,20})?$")
_PAGE_TOKEN = re.compile(r"^[0-9]{1,20}$")


class JobNotFound(NotFoundError):
    def __init__(self, job_id: str):
        self.job_id = job_id
        super().__init__(f"job {job_id!r} not found")


class CheckpointDirInUse(ConflictError, SpecError):
    """`training.checkpoint_dir` belongs to another job (answered 409: a conflict)."""

    field = "training.checkpoint_dir"

    def __init__(self, message: str):
        super().__init__(f"{self.field}: {message}")


def _dir_key(directory: str | None) -> str | None:
    """A checkpoint directory as the index keys it (symlinks and '..' resolved)."""
    return os.path.realpath(os.path.abspath(directory)) if directory else None


class SubmissionConflict(ConflictError, RuntimeError):
    """The submission_id names a job whose spec differs from this body."""

    def __init__(self, submission_id: str, job_id: str):
        self.submission_id, self.job_id = submission_id, job_id
        super().__init__(f"submission_id={submission_id!r} already names job {job_id} with a "
                         "different spec; resubmit the same body or pick a new submission_id")


@dataclass(frozen=True, kw_only=True)
class StepMetrics:
    """What one training step measured (reported by the workers, once per step)."""

    step: int
    attempt: int
    loss: float
    tokens_per_s: float
    predicted_step_s: float  # the planner's makespan for the step's plan
    measured_step_s: float  # wall time of the step (slowest rank)
    imbalance: float  # max rank busy time / mean rank busy time - 1 (0 = perfectly balanced)
    groups: str = ""  # the plan's groups by ring size, e.g. "2x1 5x2" (size x count)
    at: float = 0.0  # unix seconds when recorded
    peak_memory_bytes: int = 0  # the largest device (or process) peak of any rank
    # each rank's estimated speed after this step, relative to the cost model's reference
    # rank (scheduler.speeds; node pools and stragglers below 1); () when not measured
    rank_speeds: tuple[float, ...] = ()
    world_size: int = 0  # ranks the step ran on (fewer than the job's after a loss)


def _step_metrics(d: dict) -> StepMetrics:
    return StepMetrics(**{**d, "rank_speeds": tuple(d.get("rank_speeds", ()))})


EVENT_KINDS = ("rank_lost", "world_shrunk", "rank_joined", "fallback_restart")
MAX_EVENTS = 10_000  # per job; the oldest are trimmed


@dataclass(frozen=True, kw_only=True)
class JobEvent:
    """Something that changed a job attempt's world (docs/elastic.md)."""

    kind: str  # one of EVENT_KINDS
    attempt: int
    epoch: int  # the world epoch after the event
    step: int  # the step it happened at (the first step the new world runs)
    ranks: tuple[int, ...]  # the ranks concerned (lost, joined)
    world_size: int  # ranks in the world after the event
    reason: str  # why, in a sentence
    at: float = 0.0  # unix seconds


@dataclass(frozen=True, kw_only=True)
class LogLine:
    cursor: str  # stream id; pass it back to read what follows
    at: float
    rank: int | None  # None for the controller's own lines
    text: str


_RECORD_FIELDS = {f.name for f in fields(JobRecord)}
HashFields = dict[EncodableT, EncodableT]  # what HSET's mapping takes


def _encode(rec: JobRecord) -> HashFields:
    out: HashFields = {}
    for k, v in asdict(rec).items():
        if k == "spec":
            out[k] = rec.spec.model_dump_json()
        elif k == "state":
            out[k] = rec.state.value
        else:
            out[k] = json.dumps(v)
    return out


def _decode(reply: Mapping[Any, object]) -> JobRecord:
    h = text_hash(reply)
    values = {k: json.loads(v) for k, v in h.items() if k in _RECORD_FIELDS
              and k not in ("spec", "state")}
    return JobRecord(spec=JobCreate.model_validate_json(h["spec"]), state=State(h["state"]),
                     **values)


def _encode_fields(updates: Mapping[str, object]) -> HashFields:
    unknown = set(updates) - _RECORD_FIELDS
    assert not unknown, f"not JobRecord fields: {unknown}"
    return {k: (v.value if isinstance(v, State) else json.dumps(v)) for k, v in updates.items()}


def check_cursor(cursor: str) -> str:
    """A log cursor is a Redis stream id 'ms-seq' (or 'ms'), both parts below 2**64."""
    if not _CURSOR.match(cursor) or any(int(p) >= 2**64 for p in cursor.split("-")):
        raise SpecError(f"cursor={cursor!r} is not a log cursor (from a previous response's "
                        "next_cursor, e.g. '1732600000000-0'; '0' reads from the start)")
    return cursor


class JobStore:
    """Typed access to the job keys of one Redis (see the module docstring for the layout)."""

    def __init__(self, client: redis.Redis, *, prefix: str = "rm",
                 tracer: trace.Tracer | None = None, clock: Callable[[], float] = time.time):
        self.r = client
        self.p = prefix
        self.tracer = tracer or trace.get_tracer("controller.store")
        self.clock = clock

    def _k(self, *parts: str) -> str:
        return ":".join((self.p, *parts))

    # --- jobs -------------------------------------------------------------------------

    def create(self, spec: JobCreate, *, resume: tuple[str, int] | None = None,
               ) -> tuple[JobRecord, bool]:
        """Store a new Pending job; with a known submission_id return that job instead.

        `resume`: (checkpoint path, step) the job starts from (training.resume_from,
        resolved). Returns (record, created). Raises SubmissionConflict when the
        submission_id names a job with a different spec, CheckpointDirInUse when another
        active job has the same checkpoint_dir.
        """
        seq = self.r.incr(self._k("seq"))
        now = self.clock()
        carrier: dict[str, str] = {}
        propagate.inject(carrier)  # the submission's trace: every attempt joins it
        path, step = resume if resume is not None else (None, None)
        rec = JobRecord(id=f"{spec.name[:48]}-{secrets.token_hex(5)}", spec=spec,
                        state=State.PENDING, created_at=now, updated_at=now, state_since=now,
                        trace_parent=carrier.get("traceparent", ""), last_checkpoint=path,
                        last_checkpoint_step=step, steps_completed=step or 0)
        sub_key = self._k("sub", spec.submission_id) if spec.submission_id else None
        ckpt = _dir_key(spec.training.checkpoint_dir)
        result: builtins.list[str] = []

        def txn(pipe: redis.client.Pipeline) -> None:
            existing = optional_text(pipe.get(sub_key)) if sub_key else None
            if existing is not None:
                result[:] = [existing]
                return
            if ckpt is not None:
                self._check_dir_free(pipe, ckpt)
            pipe.multi()
            if sub_key:
                pipe.set(sub_key, rec.id)
            if ckpt is not None:
                pipe.hset(self._k("checkpoint_dirs"), ckpt, rec.id)
            pipe.hset(self._k("job", rec.id), mapping={**_encode(rec),
                                                         "fingerprint": spec.fingerprint()})
            pipe.zadd(self._k("jobs"), {rec.id: seq})
            pipe.sadd(self._k("active"), rec.id)
            pipe.zadd(self._k("pending"), {rec.id: seq})
            pipe.rpush(self._k("job", rec.id, "transitions"), self._transition_json(
                Transition(src=None, dst=State.PENDING, at=now, attempt=0, reason="Submitted")))

        watched = [k for k in (sub_key, ckpt and self._k("checkpoint_dirs")) if k]
        with self.tracer.start_as_current_span("job.transition") as span:
            self.r.transaction(txn, *watched)
            if result:
                span.set_attribute("job.idempotent_replay", True)
                return self._replay(result[0], spec), False
            self._annotate(span, rec.id, None, State.PENDING, "Submitted", 0)
        return rec, True

    def find_submission(self, spec: JobCreate) -> JobRecord | None:
        """The job an earlier submission with `spec`'s submission_id made (None: none);
        SubmissionConflict when its spec differs."""
        if not spec.submission_id:
            return None
        job_id = optional_text(self.r.get(self._k("sub", spec.submission_id)))
        return None if job_id is None else self._replay(job_id, spec)

    def _check_dir_free(self, pipe: redis.client.Pipeline, directory: str) -> None:
        user = optional_text(pipe.hget(self._k("checkpoint_dirs"), directory))
        if user is not None and pipe.sismember(self._k("active"), user):
            raise CheckpointDirInUse(f"{directory!r} is the checkpoint_dir of job {user}, "
                                     "which has not finished; stop it, or choose another "
                                     "directory")

    def checkpoint_dir_user(self, directory: str) -> str | None:
        """The active job whose checkpoint_dir is `directory` (resolved), if any."""
        key = _dir_key(directory)
        if key is None:  # no directory: nobody's
            return None
        user = optional_text(self.r.hget(self._k("checkpoint_dirs"), key))
        return user if user is not None and self.r.sismember(self._k("active"), user) \
            else None

    def _replay(self, job_id: str, spec: JobCreate) -> JobRecord:
        if self.r.hget(self._k("job", job_id), "fingerprint") != spec.fingerprint():
            raise SubmissionConflict(spec.submission_id or "", job_id)
        return self.get(job_id)

    def get(self, job_id: str) -> JobRecord:
        h = self.r.hgetall(self._k("job", job_id))
        if not h:
            raise JobNotFound(job_id)
        return _decode(h)

    def head(self, job_id: str) -> tuple[State, int] | None:
        """(state, attempt) of a job, None if there is none: one cheap HMGET, no spec
        parsing (the gRPC service fences every worker call with it)."""
        state, attempt = map(optional_text, self.r.hmget(self._k("job", job_id), "state",
                                                         "attempt"))
        if state is None or attempt is None:
            return None
        return State(state), int(json.loads(attempt))

    def exists(self, job_id: str) -> bool:
        return bool(self.r.exists(self._k("job", job_id)))

    # Inside this class `list` names this method: the annotations below spell builtins.list.
    def list(self, *, limit: int = 50, page_token: str | None = None,
             ) -> tuple[list[JobRecord], str | None]:
        """Newest first; `page_token` is the previous page's next_page_token."""
        if limit < 1:
            raise SpecError(f"limit={limit} must be >= 1")
        top = "+inf"
        if page_token is not None:
            if not _PAGE_TOKEN.match(page_token) or int(page_token) >= 2**63:
                raise SpecError(f"page_token={page_token!r} is not a token from a previous "
                                "page (a decimal number)")
            top = f"({page_token}"
        rows = scored(self.r.zrevrangebyscore(self._k("jobs"), top, "-inf", start=0,
                                              num=limit + 1, withscores=True))
        more = len(rows) > limit
        rows = rows[:limit]
        pipe = self.r.pipeline(transaction=False)
        for job_id, _ in rows:
            pipe.hgetall(self._k("job", job_id))
        records = [_decode(h) for h in pipe.execute() if h]
        return records, (str(int(rows[-1][1])) if more else None)

    def active_ids(self) -> builtins.list[str]:
        return sorted(texts(self.r.smembers(self._k("active"))))

    def active_records(self) -> builtins.list[JobRecord]:
        """Every active job's record (one pipelined round trip)."""
        pipe = self.r.pipeline(transaction=False)
        for job_id in self.active_ids():
            pipe.hgetall(self._k("job", job_id))
        return [_decode(h) for h in pipe.execute() if h]

    def newest_step_metrics(self, job_ids: builtins.list[str]) -> dict[str, StepMetrics]:
        """The highest step's metrics of each job that has any (one round trip)."""
        pipe = self.r.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.zrevrange(self._k("job", job_id, "metrics"), 0, 0)
        return {job_id: _step_metrics(json.loads(rows[0]))
                for job_id, rows in zip(job_ids, pipe.execute(), strict=True) if rows}

    def count(self) -> int:
        return int(self.r.zcard(self._k("jobs")))

    def update(self, job_id: str, **updates) -> None:
        """Set non-state fields of a job (stop_requested, not_before, ...)."""
        assert "state" not in updates, "state changes go through transition()"
        key = self._k("job", job_id)
        if not self.r.exists(key):
            raise JobNotFound(job_id)
        self.r.hset(key, mapping={**_encode_fields(updates),
                                  "updated_at": json.dumps(self.clock())})

    def note(self, job_id: str, *, state: State, reason: str, message: str) -> None:
        """Set the reason and message of a job that is still in `state`, without a
        transition (why a Pending job waits); StaleState if it moved on meanwhile."""
        key = self._k("job", job_id)

        def txn(pipe: redis.client.Pipeline) -> None:
            current = optional_text(pipe.hget(key, "state"))
            if current is None:
                raise JobNotFound(job_id)
            if current != state.value:
                raise StaleState(f"job {job_id} is {current}, not {state.value}")
            pipe.multi()
            pipe.hset(key, mapping={**_encode_fields({"reason": reason, "message": message}),
                                    "updated_at": json.dumps(self.clock())})

        self.r.transaction(txn, key)

    def transition(self, job_id: str, *, src: State, dst: State, reason: str,
                   message: str = "", due_at: float | None = None, **updates) -> JobRecord:
        """Move job `job_id` from `src` to `dst` atomically; StaleState if it moved on.

        `due_at`: when the state machine must look at the job again. Default: a Stopping job
        at once (its workers must be told), a Restarting one at its `not_before`, others
        only on an event. Terminal jobs leave every index.
        """
        if due_at is None and dst is State.STOPPING:
            due_at = self.clock()
        elif due_at is None and dst is State.RESTARTING:
            due_at = updates.get("not_before", self.clock())
        check_transition(src, dst)
        key = self._k("job", job_id)
        now = self.clock()
        out: list[JobRecord] = []

        def txn(pipe: redis.client.Pipeline) -> None:
            h = pipe.hgetall(key)
            if not h:
                raise JobNotFound(job_id)
            rec = _decode(h)
            if rec.state != src:
                raise StaleState(f"job {job_id} is {rec.state.value}, not {src.value}")
            new = replace(rec, state=dst, reason=reason, message=message, updated_at=now,
                          state_since=now, **updates)
            if dst.terminal:
                new = replace(new, finished_at=now)
            if dst is State.RUNNING and new.started_at is None:
                new = replace(new, started_at=now)
            pipe.multi()
            pipe.hset(key, mapping=_encode(new))
            pipe.rpush(self._k("job", job_id, "transitions"), self._transition_json(
                Transition(src=src, dst=dst, at=now, attempt=new.attempt, reason=reason,
                           message=message)))
            if dst.terminal:
                pipe.srem(self._k("active"), job_id)
            self._index(pipe, job_id, dst, due_at)
            out[:] = [new]

        with self.tracer.start_as_current_span("job.transition") as span:
            self.r.transaction(txn, key)
            self._annotate(span, job_id, src, dst, reason, out[0].attempt)
        return out[0]

    def _index(self, pipe: redis.client.Pipeline, job_id: str, state: State,
               due_at: float | None) -> None:
        if state is not State.PENDING:
            pipe.zrem(self._k("pending"), job_id)
        if due_at is None or state.terminal:
            pipe.zrem(self._k("due"), job_id)
        else:
            pipe.zadd(self._k("due"), {job_id: due_at})

    def pending_ids(self) -> builtins.list[str]:
        """Pending jobs, oldest first."""
        return texts(self.r.zrange(self._k("pending"), 0, -1))

    def due_ids(self, now: float, *, limit: int = 1000) -> builtins.list[str]:
        """Jobs whose due time has come (earliest first)."""
        return texts(self.r.zrangebyscore(self._k("due"), "-inf", now, start=0, num=limit))

    def set_due(self, job_id: str, at: float | None) -> None:
        """When the state machine must look at an active job next (None: on events only)."""
        if at is None:
            self.r.zrem(self._k("due"), job_id)
        else:
            self.r.zadd(self._k("due"), {job_id: at})

    def index_pending(self, job_id: str) -> None:
        """Queue a Pending job for admission (the recovery pass rebuilds the queue)."""
        score = self.r.zscore(self._k("jobs"), job_id)
        self.r.zadd(self._k("pending"), {job_id: score if score is not None else 0})

    @staticmethod
    def _annotate(span: trace.Span, job_id: str, src: State | None, dst: State, reason: str,
                  attempt: int) -> None:
        span.set_attribute("job.id", job_id)
        span.set_attribute("job.from", src.value if src else "")
        span.set_attribute("job.to", dst.value)
        span.set_attribute("job.reason", reason)
        span.set_attribute("job.attempt", attempt)

    @staticmethod
    def _transition_json(t: Transition) -> str:
        d = asdict(t)
        d["src"] = t.src.value if t.src else None
        d["dst"] = t.dst.value
        return json.dumps(d)

    def transitions(self, job_id: str) -> builtins.list[Transition]:
        if not self.exists(job_id):
            raise JobNotFound(job_id)
        out = []
        for raw in self.r.lrange(self._k("job", job_id, "transitions"), 0, -1):
            d = json.loads(raw)
            out.append(Transition(**{**d, "src": State(d["src"]) if d["src"] else None,
                                     "dst": State(d["dst"])}))
        return out

    def delete(self, job_id: str) -> None:
        """Remove a terminal job and everything recorded about it."""
        rec = self.get(job_id)
        if not rec.state.terminal:
            raise StaleState(f"job {job_id} is {rec.state.value}; only a finished job "
                             "(Succeeded, Failed, Stopped) can be deleted; stop it first")
        pipe = self.r.pipeline()
        reports = list(self.r.scan_iter(match=self._k("job", job_id, "reports", "*"),
                                        count=1000))
        pipe.delete(self._k("job", job_id), *(self._k("job", job_id, s)
                                               for s in ("transitions", "metrics", "logs",
                                                         "events", "world")),
                    *reports)
        pipe.zrem(self._k("jobs"), job_id)
        pipe.srem(self._k("active"), job_id)
        pipe.zrem(self._k("pending"), job_id)
        pipe.zrem(self._k("due"), job_id)
        if rec.spec.submission_id:
            pipe.delete(self._k("sub", rec.spec.submission_id))
        ckpt = _dir_key(rec.spec.training.checkpoint_dir)
        if ckpt is not None and self.r.hget(self._k("checkpoint_dirs"), ckpt) == job_id:
            pipe.hdel(self._k("checkpoint_dirs"), ckpt)
        pipe.execute()

    # --- what the workers report -------------------------------------------------------

    def append_step_metrics(self, job_id: str, m: StepMetrics) -> None:
        """Record one step's measurements; the job's current_step follows the report."""
        key = self._k("job", job_id)
        if not self.r.exists(key):
            raise JobNotFound(job_id)
        m = m if m.at else replace(m, at=self.clock())
        pipe = self.r.pipeline()
        pipe.zadd(self._k("job", job_id, "metrics"), {json.dumps(asdict(m)): m.step})
        pipe.hset(key, mapping=_encode_fields({"current_step": m.step,
                                               "steps_completed": m.step + 1}))
        pipe.execute()

    def add_step_report(self, job_id: str, *, attempt: int, step: int, rank: int,
                        report: str) -> int:
        """Keep one rank's report of a step until the step is complete; returns how many
        ranks' reports of it are kept. Idempotent per (job, attempt, rank, step): a rank
        that retries an unacknowledged report overwrites its own."""
        key = self._k("job", job_id, "reports", str(attempt), str(step))
        pipe = self.r.pipeline()
        pipe.hset(key, str(rank), report)
        pipe.hlen(key)
        pipe.expire(key, REPORT_TTL_S)  # reports of a step that never completes
        return int(pipe.execute()[1])

    def step_reports(self, job_id: str, *, attempt: int, step: int) -> dict[int, str]:
        raw = self.r.hgetall(self._k("job", job_id, "reports", str(attempt), str(step)))
        return {int(rank): report for rank, report in text_hash(raw).items()}

    def complete_step(self, job_id: str, m: StepMetrics, *,
                      checkpoint: str | None = None) -> bool:
        """Record step `m.step` of attempt `m.attempt` exactly once (its metrics, the job's
        progress and the checkpoint it saved) and drop its reports. False when it was
        recorded already (two callers completing the same step, or a retry after a
        controller restart)."""
        key, metrics = self._k("job", job_id), self._k("job", job_id, "metrics")
        m = m if m.at else replace(m, at=self.clock())
        progress: dict[str, object] = {"current_step": m.step, "steps_completed": m.step + 1}
        if checkpoint:
            progress.update(last_checkpoint=checkpoint, last_checkpoint_step=m.step + 1)
        done: list[bool] = []

        def txn(pipe: redis.client.Pipeline) -> None:
            if not pipe.exists(key):
                raise JobNotFound(job_id)
            rows = texts(pipe.zrangebyscore(metrics, m.step, m.step))
            if any(json.loads(r).get("attempt") == m.attempt for r in rows):
                done[:] = [False]
                return
            pipe.multi()
            pipe.zadd(metrics, {json.dumps(asdict(m)): m.step})
            pipe.hset(key, mapping={**_encode_fields(progress),
                                    "updated_at": json.dumps(self.clock())})
            pipe.delete(self._k("job", job_id, "reports", str(m.attempt), str(m.step)))
            done[:] = [True]

        self.r.transaction(txn, metrics)
        return done[0]

    def step_metrics(self, job_id: str, *, since_step: int = 0,
                     limit: int = 1000) -> builtins.list[StepMetrics]:
        if not self.exists(job_id):
            raise JobNotFound(job_id)
        rows = texts(self.r.zrangebyscore(self._k("job", job_id, "metrics"), since_step,
                                          "+inf", start=0, num=limit))
        return [_step_metrics(json.loads(r)) for r in rows]

    def record_checkpoint(self, job_id: str, *, step: int, path: str) -> None:
        self.update(job_id, last_checkpoint=path, last_checkpoint_step=step)

    def append_logs(self, job_id: str, lines: builtins.list[str], *, rank: int | None = None,
                    times: builtins.list[float] | None = None) -> str:
        """Append log lines (each cut at MAX_LOG_LINE_CHARS; `times`: when each was written,
        default now); returns the last cursor."""
        if not self.exists(job_id):
            raise JobNotFound(job_id)
        now = self.clock()
        pipe = self.r.pipeline(transaction=False)
        for i, text in enumerate(lines):
            at = times[i] if times is not None and 0 < times[i] <= now + 60 else now
            pipe.xadd(self._k("job", job_id, "logs"),
                      {"at": at, "rank": "" if rank is None else rank,
                       "text": text[:MAX_LOG_LINE_CHARS]},
                      maxlen=MAX_LOG_LINES, approximate=True)
        ids = pipe.execute()
        return ids[-1] if ids else "0"

    def read_logs(self, job_id: str, *, cursor: str | None = None, tail: int | None = None,
                  limit: int = 1000) -> tuple[builtins.list[LogLine], str]:
        """Lines after `cursor` (or the last `tail` lines), at most `limit` of them.

        Returns the lines and the cursor to continue from. (Waiting for new lines is
        `read_logs_async`, on a long-poll client.)
        """
        if not self.exists(job_id):
            raise JobNotFound(job_id)
        key = self._k("job", job_id, "logs")
        if cursor is None:
            rows = stream_entries(self.r.xrevrange(key, count=min(tail or limit, limit)))[::-1]
            return [self._line(r) for r in rows], rows[-1][0] if rows else "0"
        check_cursor(cursor)
        rows = stream_entries(self.r.xrange(key, min=f"({cursor}" if cursor != "0" else "-",
                                            count=limit))
        lines = [self._line(r) for r in rows]
        return lines, (lines[-1].cursor if lines else cursor)

    async def read_logs_async(self, client: aioredis.Redis, job_id: str, *,
                              cursor: str | None = None, tail: int | None = None,
                              limit: int = 1000, block_ms: int = 0,
                              ) -> tuple[builtins.list[LogLine], str, State]:
        """`read_logs` on an asyncio client; with `block_ms` > 0, a cursor and a job that
        has not finished, wait up to that long for a new line. Also returns the job's state
        after the read (a job that finished meanwhile has no more lines to come)."""
        job_key, key = self._k("job", job_id), self._k("job", job_id, "logs")
        before = optional_text(await client.hget(job_key, "state"))
        if before is None:
            raise JobNotFound(job_id)
        if cursor is None:
            rows = stream_entries(await client.xrevrange(key, count=min(tail or limit,
                                                                          limit)))[::-1]
            return [self._line(r) for r in rows], rows[-1][0] if rows else "0", State(before)
        check_cursor(cursor)
        rows = stream_entries(await client.xrange(
            key, min=f"({cursor}" if cursor != "0" else "-", count=limit))
        if not rows and block_ms > 0 and not State(before).terminal:
            rows = read_entries(await client.xread({key: cursor}, count=limit, block=block_ms))
        after = optional_text(await client.hget(job_key, "state")) or before
        return [self._line(r) for r in rows], rows[-1][0] if rows else cursor, State(after)

    @staticmethod
    def _line(row: LogEntry) -> LogLine:
        cursor, f = row
        return LogLine(cursor=cursor, at=float(f.get("at", 0)),
                       rank=int(f["rank"]) if f.get("rank") else None, text=f.get("text", ""))

    # --- elastic worlds ----------------------------------------------------------------

    def append_event(self, job_id: str, event: JobEvent) -> JobEvent:
        """Record one job event (stamped now); the list keeps the newest MAX_EVENTS."""
        assert event.kind in EVENT_KINDS, event.kind
        event = event if event.at else replace(event, at=self.clock())
        key = self._k("job", job_id, "events")
        pipe = self.r.pipeline()
        pipe.rpush(key, json.dumps(asdict(event)))
        pipe.ltrim(key, -MAX_EVENTS, -1)
        pipe.execute()
        return event

    def events(self, job_id: str, *, limit: int = 1000) -> builtins.list[JobEvent]:
        """The newest `limit` events, oldest first."""
        if not self.exists(job_id):
            raise JobNotFound(job_id)
        rows = self.r.lrange(self._k("job", job_id, "events"), -limit, -1)
        return [JobEvent(**{**d, "ranks": tuple(d["ranks"])}) for d in map(json.loads, rows)]

    def set_world(self, job_id: str, world: dict) -> None:
        """The current attempt's world and membership (controller.membership snapshot)."""
        self.r.set(self._k("job", job_id, "world"), json.dumps(world))

    def world(self, job_id: str) -> dict | None:
        raw = self.r.get(self._k("job", job_id, "world"))
        return json.loads(raw) if raw else None
