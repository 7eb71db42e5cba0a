"""The gRPC side of the execution plane: workers register, stream plans, report, beat.

One `AttemptRuntime` per live (job, attempt) holds what only matters while the attempt
runs (who registered, when each rank last made progress, the worlds and their plan
pipelines); everything durable goes to the store, so after a controller restart the
runtime is rebuilt lazily on the first call of a worker of the current attempt and the
workers carry on. A step report is acknowledged only once it is stored (keyed by job,
attempt, step and rank: a retried report overwrites itself); a step is complete once
every member of its world not lost since has reported it, and its metrics are recorded
exactly once by whichever call completes it, with a line in the job's log
(controller.step_reports); ranks add their own lines (ReportLogs).

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
Scheduling, Running or Stopping, and from a rank's current process (the incarnation its
Register returned; a lost rank's process is fenced off for good). READY is reported to the
launcher when the attempt's first world is announced (every rank registered), or, after a
controller restart, when every rank has called in with the attempt's secret.

Under `failure.mode: restart` a rank whose progress counter has not moved for the job's
heartbeat timeout, or that reports a failure, ends the attempt (WORKER_LOST). Before it
does, the ranks' last positions (heartbeats: micro-batch, layer, direction, ring hop) are
compared with the step's plan (controller.hang) to name the rank(s) the others wait on,
their ring and their place in the step: in the job's log, its WorkerLost transition, a
`job.hang` span and the controller's log. Under `replan` (docs/elastic.md, the default) a
rank the driver reports dead, or the rank whose progress stopped first among those still
computing, is lost: the survivors form a new world (controller.world_service,
controller.worlds, controller.membership) and re-plan the same batch; a replacement joins
at a step boundary; only when re-planning cannot work does the attempt end (a
`fallback_restart` event says why). Every change is a job event (REST, CLI), a
`job.world_change` span and a log line. TLS: `serve_grpc(credentials=...)`. While the job
store is away a call gets UNAVAILABLE (workers retry it), not a traceback. The external
launcher (`completes_from_reports`) is told COMPLETED once every rank reported the last step.
"""

from __future__ import annotations

import functools
import inspect
import logging
import threading
import time
from concurrent.futures import Executor

import grpc
import redis
from google.protobuf import json_format
from opentelemetry import propagate, trace

from controller.attempt_runtime import AttemptRuntime, RankState
from controller.hang import HangReport, hang_span, localise, position_of
from controller.launchers.base import EventKind, LauncherEvent
from controller.membership import Membership
from controller.planning import PlannedStep
from controller.rpc import ringmaster_pb2 as pb
from controller.rpc import ringmaster_pb2_grpc as pb_grpc
from controller.states import JobRecord, State
from controller.step_reports import (
    group_seconds,
    groups_by_size,
    one_line,
    step_log_line,
    step_metrics,
)
from controller.store import JobNotFound, JobStore
from controller.worker_auth import WorkerAuth
from controller.world_service import WORLD_WAKE_S, WorldKeeper, changed, live_members
from controller.worlds import AttemptWorlds, Next, policy_of
from scheduler.driver_exit import INVALID_INPUT  # the reason of a job whose input cannot work
from scheduler.errors import InfeasibleBatchError, RingmasterError
from scheduler.worker_config import WorkerConfig, WorkerFailure, WorkerTraining

log = logging.getLogger(__name__)

LIVE_STATES = (State.SCHEDULING, State.RUNNING, State.STOPPING)
DRIVER_RANK = -1  # the attempt's driver process registers with this rank
PLANS_AHEAD = 2  # a rank may hold plans this many steps past the last completed one
MAX_LOG_BATCH = 1000  # log lines one ReportLogs call may append
# One pool thread per open plan stream (a sync gRPC server runs a stream's handler on one
# thread for its life) plus the unary calls: threads start on demand, so the cap costs
# nothing until a job that large connects. See docs/benchmarks.md (control plane).
MAX_RPC_THREADS = 10_000
STREAM_WAKE_S = 5.0  # a waiting plan stream's safety wake-up; events notify it sooner


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
        self.keeper = WorldKeeper(store=store, tracer=self.tracer, clock=clock,
                                  lose=self._lose, finish_step=self._finish_step,
                                  localise=self._localise)
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
                 registering: bool = False) -> tuple[AttemptRuntime | None, str]:
        """The attempt's runtime once the call is authenticated and fenced against the
        store's current (state, attempt) and the rank's current process (but when
        `registering`); `full` re-reads the whole record (Register needs the last
        checkpoint), otherwise the spec is parsed only when the attempt changed."""
        self._authenticate(worker, context)
        rt, why = self._attempt_runtime(worker, full=full)
        if rt is None or worker.rank == DRIVER_RANK or registering \
                or self._incarnation_current(rt, worker):
            return rt, why
        why = (f"rank {worker.rank} process (incarnation {worker.incarnation}) of job "
               f"{rt.job.id} attempt {rt.job.attempt} was fenced off: it was lost, or a newer "
               "process replaced it")
        log.info("%s", why)
        return None, why

    @staticmethod
    def _incarnation_current(rt: AttemptRuntime, worker: pb.WorkerId) -> bool:
        with rt.cond:
            return rt.worlds.membership.current(worker.rank, worker.incarnation)

    def _attempt_runtime(self, worker: pb.WorkerId, *, full: bool
                         ) -> tuple[AttemptRuntime | None, str]:
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
        ranks = {r: RankState(progress_at=now, heard_at=now, done_step=resumed)
                 for r in range(job.spec.resources.num_ranks)}
        policy = policy_of(job.spec)
        saved = self.store.world(job.id) or {}
        membership = Membership(policy=policy)
        history: dict[int, tuple[int, ...]] = {}
        if saved.get("attempt") == job.attempt:  # a controller restart: carry on
            membership = Membership.restore(policy, saved["membership"])
            history = {int(e): tuple(m) for e, m in saved.get("history", {}).items()}
        worlds = AttemptWorlds(spec=job.spec, attempt=job.attempt, membership=membership,
                               planner_pool=self.planner_pool, history=history,
                               announced_at=now)
        worlds.pipeline(job.spec.resources.num_ranks)  # reads the dataset: fail fast
        return AttemptRuntime(job=job, worlds=worlds, ranks=ranks,
                              worker_config=worker_config_json(job),
                              ready_sent=membership.world is not None)

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
        rt, why = self._runtime(request.worker, context, full=True, registering=True)
        if rt is None:
            return pb.RegisterReply(accepted=False, reason=why)
        job, rank, incarnation = rt.job, request.worker.rank, 0
        if rank != DRIVER_RANK:
            incarnation = self._register_rank(rt, rank)
            self.store.append_logs(job.id, [f"rank {rank} registered from {request.host} "
                                            f"pid {request.pid} (attempt {job.attempt}, "
                                            f"incarnation {incarnation})"])
        return pb.RegisterReply(
            accepted=True, world_size=job.spec.resources.num_ranks,
            job_spec_json=rt.worker_config, start_step=_resume_step(job),
            checkpoint_dir=job.spec.training.checkpoint_dir or "",
            resume_from=job.last_checkpoint or "", incarnation=incarnation)

    def _register_rank(self, rt: AttemptRuntime, rank: int) -> int:
        """A rank's new process: its incarnation; READY once the first world is announced."""
        with rt.cond:
            now = self.clock()
            incarnation, change = rt.worlds.registered(
                rank, checkpoint=bool(rt.job.last_checkpoint), now=now)
            st = rt.ranks[rank]
            st.registered, st.progress_at, st.heard_at, st.stream_end = True, now, now, None
            st.streamed_step = st.done_step  # a new process holds no plan yet
            everyone = rt.worlds.world is not None
            changed(rt)
        self.keeper.record(rt, change)
        if everyone and not rt.ready_sent:
            rt.ready_sent = True
            self.launcher.report(LauncherEvent(job_id=rt.job.id, attempt=rt.job.attempt,
                                               kind=EventKind.READY))
        return incarnation

    @_expected_failures
    def Heartbeat(self, request, context):
        rt, why = self._runtime(request.worker, context)
        if rt is None:
            return pb.HeartbeatReply(accepted=False, reason=why)
        self._heard_from(rt, request.worker.rank)
        with rt.cond:
            st = rt.ranks.get(request.worker.rank)
            if st is not None:
                st.heard_at, st.syncing = self.clock(), request.syncing
                if request.HasField("position"):
                    st.position = position_of(request.worker.rank, request.position)
            if st is not None and (request.step, request.progress) != st.progress:
                st.progress, st.progress_at = (request.step, request.progress), self.clock()
            w = rt.worlds.world
            epoch = w.epoch if w is not None else -1
            # a world formed on a loss (not a join at a step boundary) breaks the older ones
            broken = w.epoch if w is not None and w.boundary is None else 0
        stop = rt.job.state is State.STOPPING
        return pb.HeartbeatReply(accepted=True, stop=stop, world_epoch=epoch,
                                 broken_below=broken, reason="stop requested" if stop else "")

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
        elif rt.replan and rank == DRIVER_RANK and request.lost_ranks:
            ranks = sorted(set(request.lost_ranks))
            self.store.append_logs(rt.job.id, [f"the driver reports rank(s) {ranks} dead: "
                                               f"{one_line(request.error)}"])
            self.keeper.ranks_lost(rt, ranks, f"the process of rank(s) {ranks} died")
        elif rt.replan and request.recoverable:
            self.keeper.waits_for_world(rt, rank, request.step, request.error,
                                        request.world_epoch)
        elif rt.replan and request.cannot_replan:
            self.keeper.fall_back(rt, cause, request.step)
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
        with rt.cond:
            epoch = max(rt.pending.get(request.step, -1), request.world_epoch)
            rt.pending[request.step] = epoch
            maybe_complete = kept >= len(live_members(rt, epoch))
        if maybe_complete:  # every live member may have finished it: streams may move on
            self._finish_step(rt, request.step)
        return pb.Ack(accepted=True)

    @_expected_failures
    def StreamPlans(self, request: pb.PlanRequest, context: grpc.ServicerContext):
        rt, why = self._runtime(request.worker, context)
        if rt is None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, why)
        slot, step = request.worker.rank, request.from_step
        epoch = request.world_epoch if request.formed else None
        with rt.cond:  # a rank (re)connecting has finished everything before from_step
            st = rt.ranks.get(slot)
            if st is not None:
                st.done_step = max(st.done_step, step - 1)
                st.progress_at = self.clock()
        if st is not None:
            self.keeper.stream_formed(rt, slot, epoch, step)
        self._heard_from(rt, slot)
        if st is None:  # the driver has no plans to follow
            return
        st.streaming = True
        context.add_callback(functools.partial(self._wake, rt))  # the stream ended
        try:
            yield from self._stream(rt, request, context, step, epoch)
        finally:
            st.streaming = False

    def _stream(self, rt: AttemptRuntime, request: pb.PlanRequest,
                context: grpc.ServicerContext, step: int, epoch: int | None):
        """One world's plans for a rank: a stop, a World to form (the rank then asks
        again), or plans of `epoch` as their turn comes."""
        slot = request.worker.rank
        while context.is_active():
            if not self._current(rt) or not self._incarnation_current(rt, request.worker):
                fresh, why = self._runtime(request.worker, context)  # the store says why
                if fresh is None:
                    context.abort(grpc.StatusCode.FAILED_PRECONDITION, why)
                rt = fresh
            stop_at = self._stop_stream(rt, slot, step)
            if stop_at is not None:
                yield pb.PlanMessage(step=stop_at, stop=True)
                return
            nxt = self.keeper.next(rt, slot, epoch, request.world_epoch, step)
            if nxt is Next.FENCED:
                context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                              f"rank {slot} is no longer in the attempt's world")
            if nxt is Next.WORLD:
                yield self.keeper.world_message(rt, slot, step)
                return
            if nxt is Next.WAIT:
                with rt.cond:
                    rt.cond.wait(timeout=WORLD_WAKE_S)
                continue
            assert epoch is not None, "Next.PLAN: the rank has formed a world"
            if not self._wait_turn(rt, step, epoch):
                continue
            message = self._plan_message(rt, epoch, step, slot)
            if message is None:  # the attempt is ending (fallback): the next pass says so
                with rt.cond:
                    rt.cond.wait(timeout=WORLD_WAKE_S)
                continue
            yield message
            step += 1

    def _stop_stream(self, rt: AttemptRuntime, slot: int, step: int) -> int | None:
        """The step of the stream's stop message, if it ends here (None: it goes on): a
        stop request, the job's last step, or a replacement still waiting when the world
        finished the job (recorded as the rank's stream end)."""
        total = rt.job.spec.training.steps
        done = self.keeper.world_done(rt, slot)
        if not (rt.job.state is State.STOPPING or step >= total or done):
            return None
        with rt.cond:
            st = rt.ranks[slot]
            st.stream_end = st.done_step + 1 if done else step
        return total if done else step

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

    def _wait_turn(self, rt: AttemptRuntime, step: int, epoch: int | None) -> bool:
        """True once `step` is within PLANS_AHEAD of the step every live member of world
        `epoch` has finished; else wait (up to STREAM_WAKE_S) and say False.

        Woken once per step (when its last report completes it), when the membership or
        the job's state moves, when the runtime is dropped and when the stream ends; not
        per report."""
        with rt.cond:
            if step <= _min_done(rt, epoch) + PLANS_AHEAD:
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

    def _planned(self, rt: AttemptRuntime, size: int, step: int) -> tuple[PlannedStep, str]:
        """The step's plan for a world of `size` ranks and its span's traceparent, computed
        once for all ranks."""
        with rt.plan_lock:
            if (size, step) in rt.plans:
                return rt.plans[size, step]
            job = rt.job
            parent = propagate.extract({"traceparent": job.trace_parent} if job.trace_parent
                                       else {})
            with self.tracer.start_as_current_span("planner.plan_step", context=parent) as span:
                planned = rt.worlds.pipeline(size).get(step)
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
            rt.plans[size, step] = (planned, carrier.get("traceparent", ""))
            return rt.plans[size, step]

    def _plan_message(self, rt: AttemptRuntime, epoch: int, step: int,
                      slot: int) -> pb.PlanMessage | None:
        """The step's message for world `epoch`, built (plan serialised) once and sent to
        every member; None when its batch does not fit the smaller world (fallback)."""
        size = len(rt.worlds.members_of(epoch))
        try:
            planned, traceparent = self._planned(rt, size, step)
        except InfeasibleBatchError as exc:
            if size >= rt.job.spec.resources.num_ranks:
                raise
            self.keeper.fall_back(rt, f"step {step}'s batch does not fit {size} ranks: {exc}",
                                  step)
            return None
        with rt.cond:
            rt.worlds.plan_sent(epoch, step)
            st = rt.ranks[slot]
            if st.streamed_step < step:
                if st.done_step >= st.streamed_step:  # it waited on us until now
                    st.progress_at = self.clock()
                st.streamed_step = step
        with rt.plan_lock:
            if (epoch, step) not in rt.messages:
                rt.messages[epoch, step] = _build_message(rt, planned, traceparent, epoch, step)
            return rt.messages[epoch, step]

    def _finish_step(self, rt: AttemptRuntime, step: int) -> None:
        """Once every live member of the world `step` ran in has stored its report: record
        the step (exactly once, whoever completes it) and log its line."""
        job = rt.job
        stored = self.store.step_reports(job.id, attempt=job.attempt, step=step)
        if not stored:
            return
        reports = {rank: json_format.Parse(text, pb.StepReport())
                   for rank, text in stored.items()}
        epochs = {r.world_epoch for r in reports.values()}
        with rt.cond:
            if not set(live_members(rt, max(epochs))) <= set(reports):
                return
            rt.pending.pop(step, None)
            changed(rt)  # every member finished the step: plan streams may move on
            members = rt.worlds.members_of(max(epochs)) or tuple(sorted(reports))
        size = len(members)
        with rt.plan_lock:
            planned, _ = rt.plans.pop((size, step), (None, ""))
            for key in [k for k in rt.messages if k[1] <= step]:
                del rt.messages[key]
        pipeline = rt.worlds.pipeline(size)
        if planned is not None and len(epochs) == 1 and planned.plan.world_size == size:
            by_rank = {members.index(s): r for s, r in reports.items() if s in members}
            pipeline.observe(planned.plan, group_seconds(planned.plan, by_rank),
                             {r: list(rep.micro_batch_busy_s or rep.micro_batch_times_s)
                              for r, rep in by_rank.items()})
        metrics = step_metrics(step, job.attempt, reports, planned,
                               rank_speeds=pipeline.rank_speeds)
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
        if rt.replan:
            self.keeper.check(rt)
            return
        timeout = rt.job.spec.failure.heartbeat_timeout_s
        now = self.clock()
        for rank, st in rt.ranks.items():
            if st.finished:
                continue
            if st.done_step >= st.streamed_step and (st.streaming
                                                     or now - st.heard_at <= timeout):
                # it has finished every plan it got: it waits on us (an open plan stream),
                # or, still beating, forms a world (restoring the checkpoint; the
                # process-group timeout bounds that); not stalled in a step
                continue
            if now - st.progress_at > timeout:
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
        planned = rt.plans.get((len(rt.ranks), step), (None, ""))[0]
        report = localise(planned.plan if planned else None, positions, len(rt.ranks),
                          silent=silent)
        hang_span(self.tracer, rt.job, report)
        return report


def _min_done(rt: AttemptRuntime, epoch: int | None) -> int:
    """The newest step every live member of world `epoch` has finished (caller holds
    rt.cond): O(members) once per completed step and world, then cached."""
    if epoch not in rt.min_done:
        rt.min_done[epoch] = min(rt.ranks[s].done_step for s in live_members(rt, epoch))
    return rt.min_done[epoch]


def _build_message(rt: AttemptRuntime, planned: PlannedStep, traceparent: str, epoch: int,
                   step: int) -> pb.PlanMessage:
    plan, training = planned.plan, rt.job.spec.training
    checkpoint = bool(training.checkpoint_dir) and (
        (step + 1) % training.checkpoint_interval == 0 or step + 1 == training.steps)
    return pb.PlanMessage(
        step=step, plan_json=plan.model_dump_json(), sample_ids=planned.sample_ids,
        data_epoch=planned.next_position.epoch, data_index=planned.next_position.index,
        checkpoint=checkpoint, traceparent=traceparent, world_epoch=epoch,
        predicted_step_s=plan.predicted.makespan_s if plan.predicted else 0.0)


def _resume_step(job: JobRecord) -> int:
    return job.last_checkpoint_step or 0 if job.last_checkpoint else 0


def worker_config_json(job: JobRecord) -> str:
    """What a worker needs of the job: a scheduler.worker_config.WorkerConfig, as JSON
    (workers do not import controller)."""
    return worker_config(job).model_dump_json()


def worker_config(job: JobRecord) -> WorkerConfig:
    """The job's WorkerConfig, every default the planner used resolved."""
    spec = job.spec
    return WorkerConfig(
        job_id=job.id, attempt=job.attempt, name=spec.name, model=spec.resolve_model(),
        model_dir=spec.model_dir(), model_init=spec.resolve_model_init(),
        dataset=spec.dataset.path, num_ranks=spec.resources.num_ranks,
        # Precision and sharding resolved here, once: the planner charged these figures.
        training=WorkerTraining.model_validate({
            **spec.training.model_dump(), "precision": spec.resolve_precision(),
            "optimizer_sharding": spec.resolve_optimizer_sharding(),
            "shard_mirror": spec.resolve_shard_mirror()}),
        objective=spec.objective, failure=WorkerFailure.model_validate(spec.failure.model_dump()),
        heartbeat_interval_s=max(0.2, min(5.0, spec.failure.heartbeat_timeout_s / 4)),
        # The planner's node size: the workers place rank r on node r // ranks_per_node.
        ranks_per_node=spec.resolve_cluster().gpus_per_node)


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


__all__ = ["WorkerService", "serve_grpc", "worker_config", "worker_config_json"]
