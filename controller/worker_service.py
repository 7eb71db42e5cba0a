"""The gRPC side of the execution plane: workers register, stream plans, report, beat.

One `AttemptRuntime` per live (job, attempt) holds what only matters while the attempt
runs (who registered, when each rank last made progress, the plan pipeline); everything
durable goes to the store. After a controller restart the runtime is rebuilt lazily from
the store on the first call of a worker of the current attempt, so workers carry on
across the restart. A step report is acknowledged only once it is stored (keyed by job,
attempt, step and rank, so a rank that retries an unacknowledged report overwrites its
own); the step's metrics are recorded, exactly once, by whichever call completes its set
of reports, on this controller or on the next one. Each recorded step adds one line to
the job's log (loss, tokens/s, step time against the prediction, peak memory, groups);
ranks add their own lines (ReportLogs).

Failures have a class. A rank (or the driver) reporting a USER failure (its data or
config is bad), or an RPC running into a RingmasterError (the dataset vanished after
submit, a batch no plan can hold), ends the attempt with a FAILED event of reason
InvalidInput: the job fails with that one line and is never retried, and the call gets
FAILED_PRECONDITION (no traceback, here or in the log). An infrastructure failure (a
rank lost or stalled, an actor died) is WORKER_LOST, which the job's failure policy may
retry. A rank that has finished every plan it was sent and holds an open plan stream is
waiting on the controller (a busy planner, a restart), not stalled.

Authentication, then fencing: every call must carry the attempt's secret
(controller.worker_auth; UNAUTHENTICATED otherwise, before anything about the job is
looked at), and is accepted only from the job's current attempt while the job is
Scheduling, Running or Stopping. READY is reported to the launcher when every rank has
been heard from (registered, or, after a controller restart, called in with the
attempt's secret); a rank whose progress counter has not moved for the job's heartbeat
timeout, or that reports a failure, ends the attempt (WORKER_LOST). Before it does, the
ranks' last positions (heartbeats: micro-batch, layer, direction, ring hop) are compared
with the step's plan (controller.hang) to name the rank(s) the others wait on, their ring
and their place in the step: in the job's log, its WorkerLost transition, a `job.hang`
span and the controller's log. The port may serve TLS (`serve_grpc(credentials=...)`).
While the job store is away a call gets UNAVAILABLE (which workers retry), not an
application error with a traceback. A launcher with no process of its own that exits
when the job is done (`completes_from_reports`, the external launcher) is told COMPLETED
once every rank has reported the last step.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import threading
import time
from concurrent.futures import Executor
from dataclasses import dataclass, field

import grpc
import redis
from google.protobuf import json_format
from opentelemetry import propagate, trace

from controller.hang import HangReport, RankPosition, localise, position_of
from controller.launchers.base import EventKind, LauncherEvent
from controller.planning import PlannedStep, PlanPipeline
from controller.rpc import ringmaster_pb2 as pb
from controller.rpc import ringmaster_pb2_grpc as pb_grpc
from controller.spec_objective import objective_config
from controller.states import JobRecord, State
from controller.store import JobNotFound, JobStore, StepMetrics
from controller.worker_auth import WorkerAuth
from scheduler.errors import RingmasterError

log = logging.getLogger(__name__)

LIVE_STATES = (State.SCHEDULING, State.RUNNING, State.STOPPING)
INVALID_INPUT = "InvalidInput"  # the reason of a job whose data or config cannot work
MAX_MESSAGE_CHARS = 600  # a failure is one line in the job's message
DRIVER_RANK = -1  # the attempt's driver process registers with this rank
PLANS_AHEAD = 2  # a rank may hold plans this many steps past the last completed one
MAX_LOG_BATCH = 1000  # log lines one ReportLogs call may append
# One pool thread per open plan stream (a sync gRPC server runs a stream's handler on one
# thread for its life) plus the unary calls: threads start on demand, so the cap costs
# nothing until a job that large connects. See docs/benchmarks.md (control plane).
MAX_RPC_THREADS = 10_000
STREAM_WAKE_S = 5.0  # a waiting plan stream's safety wake-up; events notify it sooner


@dataclass(kw_only=True)
class RankState:
    registered: bool = False
    progress: tuple[int, int] = (-1, -1)  # (step, progress counter) last heard
    progress_at: float = 0.0  # monotonic time the progress last changed
    done_step: int = -1  # newest step this rank has finished (reported or resumed past)
    streamed_step: int = -1  # newest step whose plan it received
    streaming: bool = False  # holds an open plan stream: past streamed_step it waits on us
    # the step its plan stream ended at (sent ahead of the steps before it): once the rank
    # has finished every step before it, it is no longer watched
    stream_end: int | None = None
    position: RankPosition | None = None  # where in its step the last heartbeat said it is
    heard_at: float = 0.0  # monotonic time of its last heartbeat

    @property
    def finished(self) -> bool:
        """Its plan stream has ended and it finished every step before the end."""
        return self.stream_end is not None and self.done_step >= self.stream_end - 1


@dataclass(kw_only=True)
class AttemptRuntime:
    job: JobRecord
    pipeline: PlanPipeline
    ranks: dict[int, RankState]
    plans: dict[int, tuple[PlannedStep, str]] = field(default_factory=dict)  # + traceparent
    plan_lock: threading.Lock = field(default_factory=threading.Lock)
    messages: dict[int, pb.PlanMessage] = field(default_factory=dict)  # built once a step
    min_done: int = -1  # min of ranks' done_step; `_advance` keeps it (plan streams read it)
    worker_config: str = ""  # worker_config_json of the attempt, built once
    ready_sent: bool = False
    lost_sent: bool = False
    cond: threading.Condition = field(default_factory=threading.Condition)


def _expected_failures(rpc):
    """What an RPC may run into without it being a bug answers without a traceback: a job
    store outage is UNAVAILABLE (the workers' clients retry it); a job that cannot run as
    specified (its dataset vanished, a batch no plan can hold: a RingmasterError) ends the
    attempt as InvalidInput and the call gets FAILED_PRECONDITION, which ends the rank."""
    def abort(self, request, context, exc: Exception):
        if isinstance(exc, redis.RedisError):
            log.warning("%s: job store unavailable (%s); answering UNAVAILABLE", rpc.__name__,
                        exc)
            context.abort(grpc.StatusCode.UNAVAILABLE, "job store unavailable; retry")
        message = one_line(str(exc))
        self._end_invalid(request.worker.job_id, request.worker.attempt, message)
        context.abort(grpc.StatusCode.FAILED_PRECONDITION, message)

    if inspect.isgeneratorfunction(rpc):
        @functools.wraps(rpc)
        def streaming(self, request, context):
            try:
                yield from rpc(self, request, context)
            except (redis.RedisError, RingmasterError) as exc:
                abort(self, request, context, exc)
        return streaming

    @functools.wraps(rpc)
    def unary(self, request, context):
        try:
            return rpc(self, request, context)
        except (redis.RedisError, RingmasterError) as exc:
            abort(self, request, context, exc)
    return unary


class WorkerService(pb_grpc.WorkerServiceServicer):
    """See the module docstring; `launcher` must offer `report(event)`."""

    def __init__(self, *, store: JobStore, launcher, planner_pool: Executor, auth: WorkerAuth,
                 tracer_provider=None, clock=time.monotonic):
        self.store = store
        self.auth = auth
        self.launcher = launcher
        self.planner_pool = planner_pool
        self.tracer = (tracer_provider or trace.get_tracer_provider()).get_tracer(
            "controller.worker_service")
        self.clock = clock
        self._runtimes: dict[str, AttemptRuntime] = {}
        self._ended: set[tuple[str, int]] = set()  # (job, attempt) ended as InvalidInput
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._monitor = threading.Thread(target=self._watch, name="heartbeat-monitor",
                                         daemon=True)
        self._monitor.start()

    def close(self) -> None:
        self._stop.set()
        self._monitor.join(timeout=5)

    # authentication and fencing ---------------------------------------------------------
    def _authenticate(self, worker: pb.WorkerId, context) -> None:
        """Abort the call (UNAUTHENTICATED) unless it carries the attempt's secret."""
        if not self.auth.check(context.invocation_metadata(), worker.job_id, worker.attempt):
            log.warning("refused an unauthenticated %s call from %s", _method(context),
                        context.peer())
            context.abort(grpc.StatusCode.UNAUTHENTICATED,
                          "missing or wrong worker secret (authorization metadata)")

    def _runtime(self, worker: pb.WorkerId, context, *, full: bool = False,
                 ) -> tuple[AttemptRuntime | None, str]:
        """The attempt's runtime once the call is authenticated and fenced against the
        store's current (state, attempt); `full` re-reads the whole record (Register needs
        the last checkpoint), otherwise the spec is parsed only when the attempt changed."""
        self._authenticate(worker, context)
        try:
            job = self._job(worker.job_id, full=full)
        except JobNotFound:
            return None, f"job {worker.job_id!r} not found"
        if job.state not in LIVE_STATES or job.attempt != worker.attempt:
            self._drop(worker.job_id, worker.attempt)
            return None, (f"attempt {worker.attempt} of job {job.id} is not current (job is "
                          f"{job.state.value}, attempt {job.attempt})")
        n = job.spec.resources.num_ranks
        if not (worker.rank == DRIVER_RANK or 0 <= worker.rank < n):
            return None, f"rank={worker.rank} is out of range (valid 0..{n - 1})"
        with self._lock:
            rt = self._runtimes.get(job.id)
            if rt is None or rt.job.attempt != job.attempt:
                rt = self._new_runtime(job)
                self._runtimes[job.id] = rt
        self._set_job(rt, job)
        return rt, ""

    def _job(self, job_id: str, *, full: bool) -> JobRecord:
        """The job's record: one HMGET of (state, attempt) when the runtime's copy is
        otherwise current (the spec never changes), the whole record when not."""
        with self._lock:
            rt = self._runtimes.get(job_id)
        if rt is None or full:
            return self.store.get(job_id)
        head = self.store.head(job_id)
        if head is None:
            raise JobNotFound(job_id)
        if head == (rt.job.state, rt.job.attempt):
            return rt.job
        return self.store.get(job_id)

    @staticmethod
    def _set_job(rt: AttemptRuntime, job: JobRecord) -> None:
        """Keep the runtime's record; waiting plan streams wake when the state moved."""
        moved = job.state is not rt.job.state
        rt.job = job
        if moved:
            with rt.cond:
                rt.cond.notify_all()

    def _new_runtime(self, job: JobRecord) -> AttemptRuntime:
        now = self.clock()
        resumed = _resume_step(job) - 1
        ranks = {r: RankState(progress_at=now, done_step=resumed)
                 for r in range(job.spec.resources.num_ranks)}
        return AttemptRuntime(job=job, pipeline=PlanPipeline(job.spec, self.planner_pool),
                              ranks=ranks, min_done=resumed,
                              worker_config=worker_config_json(job))

    def _drop(self, job_id: str, attempt: int) -> None:
        with self._lock:
            rt = self._runtimes.get(job_id)
            if rt is not None and rt.job.attempt <= attempt:
                self._runtimes.pop(job_id, None)
                with rt.cond:
                    rt.cond.notify_all()

    # RPCs ------------------------------------------------------------------------------
    @_expected_failures
    def Register(self, request, context):
        rt, why = self._runtime(request.worker, context, full=True)
        if rt is None:
            return pb.RegisterReply(accepted=False, reason=why)
        job, rank = rt.job, request.worker.rank
        if rank != DRIVER_RANK:
            with rt.cond:
                rt.ranks[rank].progress_at = self.clock()
            self._heard_from(rt, rank)
            self.store.append_logs(job.id, [f"rank {rank} registered from {request.host} "
                                            f"pid {request.pid} (attempt {job.attempt})"])
        return pb.RegisterReply(
            accepted=True, world_size=job.spec.resources.num_ranks,
            job_spec_json=rt.worker_config, start_step=_resume_step(job),
            checkpoint_dir=job.spec.training.checkpoint_dir or "",
            resume_from=job.last_checkpoint or "")

    @_expected_failures
    def Heartbeat(self, request, context):
        rt, why = self._runtime(request.worker, context)
        if rt is None:
            return pb.HeartbeatReply(accepted=False, reason=why)
        self._heard_from(rt, request.worker.rank)
        with rt.cond:
            st = rt.ranks.get(request.worker.rank)
            if st is not None:
                st.heard_at = self.clock()
                if request.HasField("position"):
                    st.position = position_of(request.worker.rank, request.position)
            if st is not None and (request.step, request.progress) != st.progress:
                st.progress, st.progress_at = (request.step, request.progress), self.clock()
        stop = rt.job.state is State.STOPPING
        return pb.HeartbeatReply(accepted=True, stop=stop,
                                 reason="stop requested" if stop else "")

    @_expected_failures
    def ReportFailure(self, request, context):
        rt, why = self._runtime(request.worker, context)
        if rt is None:
            return pb.Ack(accepted=False, reason=why)
        rank = request.failed_rank if request.HasField("failed_rank") else request.worker.rank
        where = "the driver" if rank == DRIVER_RANK else f"rank {rank}"
        if request.step >= 0:
            where += f" at step {request.step}"
        cause = f"{where}: {one_line(request.error)}"
        if request.failure_class == pb.USER:
            self._end_invalid(rt.job.id, rt.job.attempt, cause, rank=rank)
        else:
            self._lose(rt, None if rank == DRIVER_RANK else rank, cause)
        return pb.Ack(accepted=True)

    @_expected_failures
    def ReportLogs(self, request, context):
        rt, why = self._runtime(request.worker, context)
        if rt is None:
            return pb.Ack(accepted=False, reason=why)
        entries = request.entries[:MAX_LOG_BATCH]
        lines = [f"{e.level}: {e.text}" if e.level not in ("", "INFO") else e.text
                 for e in entries]
        if lines:
            self.store.append_logs(rt.job.id, lines, rank=request.worker.rank,
                                   times=[e.at for e in entries])
        return pb.Ack(accepted=True)

    @_expected_failures
    def ReportStep(self, request, context):
        rt, why = self._runtime(request.worker, context)
        if rt is None:
            return pb.Ack(accepted=False, reason=why)
        self._heard_from(rt, request.worker.rank)
        with rt.cond:
            st = rt.ranks[request.worker.rank]
            st.progress, st.progress_at = (request.step + 1, 0), self.clock()
            st.done_step = max(st.done_step, request.step)
        # Acknowledged only once stored: a report survives a controller restart, and one
        # whose ack was lost is sent again and overwrites itself.
        kept = self.store.add_step_report(rt.job.id, attempt=rt.job.attempt, step=request.step,
                                          rank=request.worker.rank,
                                          report=json_format.MessageToJson(request))
        if kept >= len(rt.ranks):
            with rt.cond:  # every rank finished the step: plan streams may move on
                _advance(rt)
            self._finish_step(rt, request.step)
        return pb.Ack(accepted=True)

    @_expected_failures
    def StreamPlans(self, request, context):
        rt, why = self._runtime(request.worker, context)
        if rt is None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, why)
        step = request.from_step
        with rt.cond:  # a rank (re)connecting has finished everything before from_step
            st = rt.ranks.get(request.worker.rank)
            if st is not None and step - 1 > st.done_step:
                st.done_step = step - 1
                _advance(rt)
        self._heard_from(rt, request.worker.rank)
        if st is None:  # the driver has no plans to follow
            return
        st.streaming = True
        context.add_callback(functools.partial(self._wake, rt))  # the stream ended
        try:
            yield from self._stream(rt, request, context, st, step)
        finally:
            st.streaming = False

    def _stream(self, rt: AttemptRuntime, request, context, st: RankState, step: int):
        total = rt.job.spec.training.steps
        while context.is_active():
            if not self._current(rt):  # moved on: the store says why (or a new runtime)
                rt, why = self._runtime(request.worker, context)
                if rt is None:
                    context.abort(grpc.StatusCode.FAILED_PRECONDITION, why)
            if rt.job.state is State.STOPPING or step >= total:
                with rt.cond:
                    if st is not None:
                        st.stream_end = step
                yield pb.PlanMessage(step=step, stop=True)
                return
            if not self._wait_turn(rt, step, context):
                continue
            message = self._plan_message(rt, step)
            with rt.cond:
                if st.streamed_step < step:
                    if st.done_step >= st.streamed_step:  # it waited on us until now
                        st.progress_at = self.clock()
                    st.streamed_step = step
            yield message
            step += 1

    # helpers ---------------------------------------------------------------------------
    def _heard_from(self, rt: AttemptRuntime, rank: int) -> None:
        """A rank of the attempt called in; READY once every rank has.

        A rank registers once per attempt, so after a controller restart the rebuilt
        runtime learns of the ranks from their heartbeats, reports and plan streams (each
        authenticated with the attempt's secret) instead.
        """
        if rank == DRIVER_RANK:
            return
        with rt.cond:
            st = rt.ranks[rank]
            if st.registered:
                return
            st.registered, st.progress_at = True, self.clock()
            everyone = all(s.registered for s in rt.ranks.values())
        if everyone and not rt.ready_sent:
            rt.ready_sent = True
            self.launcher.report(LauncherEvent(job_id=rt.job.id, attempt=rt.job.attempt,
                                               kind=EventKind.READY))

    def _wait_turn(self, rt: AttemptRuntime, step: int, context) -> bool:
        """Block until `step` is within PLANS_AHEAD of the step every rank has finished.

        Woken once per step (when its last report completes it), when the job's state
        moves, when the runtime is dropped and when the stream ends; not per report."""
        with rt.cond:
            if step <= rt.min_done + PLANS_AHEAD:
                return True
            rt.cond.wait(timeout=STREAM_WAKE_S)
        return False

    def _current(self, rt: AttemptRuntime) -> bool:
        """Whether `rt` is still the live runtime of its job, by what this process knows
        (unary calls and the monitor keep it within a monitor tick of the store)."""
        with self._lock:
            alive = self._runtimes.get(rt.job.id) is rt
        return alive and rt.job.state in LIVE_STATES

    @staticmethod
    def _wake(rt: AttemptRuntime) -> None:
        with rt.cond:
            rt.cond.notify_all()

    def _planned(self, rt: AttemptRuntime, step: int) -> tuple[PlannedStep, str]:
        """The step's plan and its span's traceparent, computed once for all ranks."""
        with rt.plan_lock:
            if step in rt.plans:
                return rt.plans[step]
            job = rt.job
            parent = propagate.extract({"traceparent": job.trace_parent} if job.trace_parent
                                       else {})
            with self.tracer.start_as_current_span("planner.plan_step", context=parent) as span:
                planned = rt.pipeline.get(step)
                plan = planned.plan
                predicted = plan.predicted
                span.set_attributes({
                    "ringmaster.job_id": job.id, "ringmaster.attempt": job.attempt,
                    "ringmaster.step": step, "planner.world_size": plan.world_size,
                    "planner.groups_by_size": groups_by_size(plan),
                    "planner.predicted_makespan_s": predicted.makespan_s if predicted else 0.0,
                    "planner.lower_bound_s": predicted.lower_bound_s if predicted else 0.0,
                    "planner.planning_s": planned.planning_s,
                })
                carrier: dict[str, str] = {}
                propagate.inject(carrier)
            rt.plans[step] = (planned, carrier.get("traceparent", ""))
            return rt.plans[step]

    def _plan_message(self, rt: AttemptRuntime, step: int) -> pb.PlanMessage:
        """The step's message, built (plan serialised) once and sent to every rank."""
        planned, traceparent = self._planned(rt, step)
        with rt.plan_lock:
            if step in rt.messages:
                return rt.messages[step]
            plan, training = planned.plan, rt.job.spec.training
            checkpoint = bool(training.checkpoint_dir) and (
                (step + 1) % training.checkpoint_interval == 0 or step + 1 == training.steps)
            rt.messages[step] = pb.PlanMessage(
                step=step, plan_json=plan.model_dump_json(), sample_ids=planned.sample_ids,
                data_epoch=planned.next_position.epoch, data_index=planned.next_position.index,
                checkpoint=checkpoint, traceparent=traceparent,
                predicted_step_s=plan.predicted.makespan_s if plan.predicted else 0.0)
            return rt.messages[step]

    def _finish_step(self, rt: AttemptRuntime, step: int) -> None:
        """Every rank's report of `step` is stored: record the step (exactly once, whoever
        completes it) and log its line."""
        job = rt.job
        stored = self.store.step_reports(job.id, attempt=job.attempt, step=step)
        if len(stored) < len(rt.ranks):
            return
        reports = {rank: json_format.Parse(text, pb.StepReport())
                   for rank, text in stored.items()}
        with rt.plan_lock:
            planned, _ = rt.plans.pop(step, (None, ""))
            rt.messages.pop(step, None)
        if planned is not None:  # first: the step's metrics carry the speeds it measured
            rt.pipeline.observe(planned.plan, group_seconds(planned.plan, reports),
                                {r: list(rep.micro_batch_busy_s or rep.micro_batch_times_s)
                                 for r, rep in reports.items()})
        metrics = step_metrics(step, job.attempt, reports, planned,
                               rank_speeds=rt.pipeline.rank_speeds)
        ckpt = next((r.checkpoint_path for r in reports.values() if r.checkpoint_path), "")
        if not self.store.complete_step(job.id, metrics, checkpoint=ckpt or None):
            return
        self.store.append_logs(job.id, [step_log_line(metrics, job.spec.training.steps)])
        if step + 1 == rt.job.spec.training.steps and \
                getattr(self.launcher, "completes_from_reports", False):
            self.launcher.report(LauncherEvent(job_id=rt.job.id, attempt=rt.job.attempt,
                                               kind=EventKind.COMPLETED,
                                               message=f"every rank reported step {step}"))

    def _end_invalid(self, job_id: str, attempt: int, message: str, *,
                     rank: int | None = None) -> None:
        """The attempt cannot succeed however often it is retried: the job fails
        (InvalidInput) with `message`, once."""
        with self._lock:
            if (job_id, attempt) in self._ended:
                return
            self._ended.add((job_id, attempt))
            rt = self._runtimes.get(job_id)
        if rt is not None and rt.job.attempt == attempt:
            rt.lost_sent = True  # what follows (ranks torn down) is no worker loss
        log.warning("job %s attempt %d cannot run: %s", job_id, attempt, message)
        try:
            self.store.append_logs(job_id, [f"invalid input: {message}"])
        except JobNotFound:
            return
        self.launcher.report(LauncherEvent(job_id=job_id, attempt=attempt,
                                           kind=EventKind.FAILED, reason=INVALID_INPUT,
                                           rank=None if rank == DRIVER_RANK else rank,
                                           message=message))

    def _lose(self, rt: AttemptRuntime, rank: int | None, message: str) -> None:
        if rt.lost_sent:
            return
        rt.lost_sent = True
        log.warning("job %s attempt %d: %s", rt.job.id, rt.job.attempt, message)
        self.store.append_logs(rt.job.id, [message])
        self.launcher.report(LauncherEvent(job_id=rt.job.id, attempt=rt.job.attempt,
                                           kind=EventKind.WORKER_LOST, rank=rank,
                                           message=message))

    def _watch(self) -> None:
        while not self._stop.wait(0.25):
            with self._lock:
                runtimes = list(self._runtimes.values())
            for rt in runtimes:
                self._refresh(rt)
                self._check_liveness(rt)

    def _refresh(self, rt: AttemptRuntime) -> None:
        """Follow the store's (state, attempt) of a runtime's job (one HMGET a tick), so
        waiting plan streams learn of a stop or a new attempt without asking Redis."""
        try:
            head = self.store.head(rt.job.id)
            if head is None:
                self._drop(rt.job.id, rt.job.attempt)
            elif head != (rt.job.state, rt.job.attempt):
                job = self.store.get(rt.job.id)
                if job.state not in LIVE_STATES or job.attempt != rt.job.attempt:
                    self._drop(job.id, rt.job.attempt)
                self._set_job(rt, job)
        except (redis.RedisError, JobNotFound) as exc:
            log.debug("refreshing job %s: %s", rt.job.id, exc)

    def _check_liveness(self, rt: AttemptRuntime) -> None:
        if not rt.ready_sent or rt.lost_sent:
            return
        timeout = rt.job.spec.failure.heartbeat_timeout_s
        now = self.clock()
        for rank, st in rt.ranks.items():
            if st.streaming and st.done_step >= st.streamed_step:
                continue  # it has finished every plan it got: it waits on us, not stalled
            if not st.finished and now - st.progress_at > timeout:
                report = self._localise(rt, now, timeout)
                blamed = report.culprit_ranks[0] if report and report.culprits else rank
                idle = now - rt.ranks[blamed].progress_at
                where = f"step {report.step} hung: {report.message}. " if report else ""
                self._lose(rt, blamed, f"{where}Rank {blamed} made no progress for {idle:.1f} s "
                                       f"(heartbeat_timeout_s={timeout:g}); presumed stalled")
                return

    def _localise(self, rt: AttemptRuntime, now: float, timeout: float) -> HangReport | None:
        """Whom the stalled step's ranks wait on (controller.hang), recorded as a span; None
        when no rank has reported a position."""
        with rt.cond:
            positions = {r: st.position for r, st in rt.ranks.items() if st.position}
            silent = {r for r, st in rt.ranks.items() if now - st.heard_at > timeout}
        if not positions:
            return None
        step = min((p.step for p in positions.values() if p.step >= 0), default=-1)
        planned = rt.plans.get(step, (None, ""))[0]
        report = localise(planned.plan if planned else None, positions, len(rt.ranks),
                          silent=silent)
        self._hang_span(rt, report)
        return report

    def _hang_span(self, rt: AttemptRuntime, report: HangReport) -> None:
        job = rt.job
        parent = propagate.extract({"traceparent": job.trace_parent} if job.trace_parent
                                   else {})
        with self.tracer.start_as_current_span("job.hang", context=parent) as span:
            span.set_attributes({
                "ringmaster.job_id": job.id, "ringmaster.attempt": job.attempt,
                "ringmaster.step": report.step, "hang.message": report.message,
                "hang.stalled_ranks": list(report.culprit_ranks),
                "hang.waiting_ranks": sorted({r for c in report.culprits
                                              for r in c.ring_waiters + c.collective_waiters}),
                "hang.stuck_rings": [str(list(r)) for r in report.stuck_rings]})
            if report.culprits:
                c = report.culprits[0]
                span.set_attributes({
                    "hang.ring": list(c.ring), "hang.micro_batch": c.position.micro_batch,
                    "hang.layer": c.position.layer, "hang.phase": c.position.phase,
                    "hang.ring_hop": c.position.ring_hop})


def _advance(rt: AttemptRuntime) -> None:
    """Recompute the step every rank has finished (caller holds rt.cond); wake the plan
    streams when it moved. O(ranks), but only when a step completes or a rank resumes."""
    done = min((s.done_step for s in rt.ranks.values()), default=rt.min_done)
    if done != rt.min_done:
        rt.min_done = done
        rt.cond.notify_all()


def _resume_step(job: JobRecord) -> int:
    return job.last_checkpoint_step or 0 if job.last_checkpoint else 0


def worker_config_json(job: JobRecord) -> str:
    """What a worker needs of the job, as plain JSON (workers do not import controller)."""
    spec = job.spec
    return json.dumps({
        "job_id": job.id, "attempt": job.attempt, "name": spec.name,
        "model": spec.resolve_model().model_dump(mode="json"),
        "model_dir": spec.model_dir(), "model_init": spec.resolve_model_init(),
        "dataset": spec.dataset.path, "num_ranks": spec.resources.num_ranks,
        # Precision and sharding resolved here, once: the planner charged these figures.
        "training": {**spec.training.model_dump(mode="json"),
                     "precision": spec.resolve_precision(),
                     "optimizer_sharding": spec.resolve_optimizer_sharding()},
        "objective": objective_config(spec.objective),
        "heartbeat_interval_s": max(0.2, min(5.0, spec.failure.heartbeat_timeout_s / 4)),
        # The planner's node size: the workers place rank r on node r // ranks_per_node.
        "ranks_per_node": spec.resolve_cluster().gpus_per_node,
    })


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
        rank_speeds=tuple(rank_speeds))


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


def _method(context) -> str:
    try:
        return context._rpc_event.call_details.method.decode().rsplit("/", 1)[-1]
    except AttributeError:  # not grpc's own context (a test double)
        return "RPC"


def serve_grpc(service: WorkerService, *, host: str, port: int,
               max_workers: int = MAX_RPC_THREADS,
               credentials: grpc.ServerCredentials | None = None) -> tuple[grpc.Server, int]:
    """Start a gRPC server for `service` (TLS with `credentials`); returns it and the port."""
    from concurrent.futures import ThreadPoolExecutor

    server = grpc.server(ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="grpc"))
    pb_grpc.add_WorkerServiceServicer_to_server(service, server)
    address = f"{host}:{port}"
    bound = server.add_secure_port(address, credentials) if credentials is not None \
        else server.add_insecure_port(address)
    if bound == 0:
        raise OSError(f"grpc port {host}:{port} could not be bound")
    server.start()
    return server, bound


__all__ = ["WorkerService", "serve_grpc", "worker_config_json"]
