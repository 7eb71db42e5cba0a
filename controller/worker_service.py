"""The gRPC side of the execution plane: workers register, stream plans, report, beat.

One `AttemptRuntime` per live (job, attempt) holds what only matters while the attempt
runs (who registered, when each rank last made progress, the step reports not yet
complete, the plan pipeline); everything durable goes to the store. After a controller
restart the runtime is rebuilt lazily from the store on the first call of a worker of the
current attempt, so workers carry on across the restart.

Authentication, then fencing: every call must carry the attempt's secret
(controller.worker_auth; UNAUTHENTICATED otherwise, before anything about the job is
looked at), and is accepted only from the job's current attempt while the job is
Scheduling, Running or Stopping, and from a rank's current process (the incarnation its
Register returned; a lost rank's process is fenced off for good). READY is reported to the
launcher when the attempt's first world is formed of every rank (or, after a controller
restart, when every rank has called in with the attempt's secret). Under `failure.mode:
restart` a rank whose progress counter has not moved for the job's heartbeat timeout, or
that reports a failure, ends the attempt (WORKER_LOST). Under `replan` (docs/elastic.md,
the default) a rank the driver reports dead, or the rank whose progress stopped first, is
lost: the survivors form a new world (controller.worlds, controller.membership) and
re-plan the same batch; a replacement joins at a step boundary; only when re-planning
cannot work does the attempt end (a `fallback_restart` event says why). Every change is a
job event (REST, CLI), a `job.world_change` span and a log line. The port may serve TLS
(`serve_grpc(credentials=...)`). While the job store is away a call gets UNAVAILABLE
(which workers retry), not an application error with a traceback.
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
from opentelemetry import propagate, trace

from controller.launchers.base import EventKind, LauncherEvent
from controller.membership import Membership
from controller.planning import PlannedStep
from controller.rpc import ringmaster_pb2 as pb
from controller.rpc import ringmaster_pb2_grpc as pb_grpc
from controller.states import JobRecord, State
from controller.store import JobNotFound, JobStore, StepMetrics
from controller.worker_auth import WorkerAuth
from controller.worlds import AttemptWorlds, Change, Next, policy_of
from scheduler.errors import InfeasibleBatchError

log = logging.getLogger(__name__)

LIVE_STATES = (State.SCHEDULING, State.RUNNING, State.STOPPING)
DRIVER_RANK = -1  # the attempt's driver process registers with this rank
PLANS_AHEAD = 2  # a rank may hold plans this many steps past the last completed one


@dataclass(kw_only=True)
class RankState:
    registered: bool = False
    progress: tuple[int, int] = (-1, -1)  # (step, progress counter) last heard
    progress_at: float = 0.0  # monotonic time the progress last changed
    heard_at: float = 0.0  # monotonic time of its last call (a waiting replacement's pulse)
    done_step: int = -1  # newest step this rank has finished (reported or resumed past)
    sent_step: int = -1  # newest step whose plan it was sent (it works when > done_step)
    syncing: bool = False  # blocked on peers (the step's collectives, a ring transfer)
    finished: bool = False  # received the end of its plan stream: no longer watched


@dataclass(kw_only=True)
class AttemptRuntime:
    job: JobRecord
    worlds: AttemptWorlds
    ranks: dict[int, RankState]
    reports: dict[int, dict[int, pb.StepReport]] = field(default_factory=dict)
    # (world size, step) -> the plan and its span's traceparent
    plans: dict[tuple[int, int], tuple[PlannedStep, str]] = field(default_factory=dict)
    plan_lock: threading.Lock = field(default_factory=threading.Lock)
    ready_sent: bool = False
    lost_sent: bool = False
    fell_back: bool = False  # a fallback_restart was decided: the attempt is ending
    cond: threading.Condition = field(default_factory=threading.Condition)

    @property
    def replan(self) -> bool:
        return self.job.spec.failure.mode == "replan"


def _store_unavailable_is_retryable(rpc):
    """An RPC whose Redis calls fail answers UNAVAILABLE (the workers' clients retry it)."""
    def abort(context, exc: redis.RedisError):
        log.warning("%s: job store unavailable (%s); answering UNAVAILABLE", rpc.__name__, exc)
        context.abort(grpc.StatusCode.UNAVAILABLE, "job store unavailable; retry")

    if inspect.isgeneratorfunction(rpc):
        @functools.wraps(rpc)
        def streaming(self, request, context):
            try:
                yield from rpc(self, request, context)
            except redis.RedisError as exc:
                abort(context, exc)
        return streaming

    @functools.wraps(rpc)
    def unary(self, request, context):
        try:
            return rpc(self, request, context)
        except redis.RedisError as exc:
            abort(context, exc)
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

    def _runtime(self, worker: pb.WorkerId, context, *, registering: bool = False
                 ) -> tuple[AttemptRuntime | None, str]:
        self._authenticate(worker, context)
        rt, why = self._attempt_runtime(worker)
        if rt is None or worker.rank == DRIVER_RANK or registering:
            return rt, why
        with rt.cond:
            current = rt.worlds.membership.current(worker.rank, worker.incarnation)
        if current:
            return rt, ""
        why = (f"rank {worker.rank} process (incarnation {worker.incarnation}) of job "
               f"{rt.job.id} attempt {rt.job.attempt} was fenced off: it was lost, or a newer "
               "process replaced it")
        log.info("%s", why)
        return None, why

    def _attempt_runtime(self, worker: pb.WorkerId) -> tuple[AttemptRuntime | None, str]:
        try:
            job = self.store.get(worker.job_id)
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
            rt.job = job
            return rt, ""

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
        return AttemptRuntime(job=job, worlds=worlds, ranks=ranks,
                              ready_sent=membership.world is not None)

    def _drop(self, job_id: str, attempt: int) -> None:
        with self._lock:
            rt = self._runtimes.get(job_id)
            if rt is not None and rt.job.attempt <= attempt:
                self._runtimes.pop(job_id, None)
                with rt.cond:
                    rt.cond.notify_all()

    # RPCs ------------------------------------------------------------------------------
    @_store_unavailable_is_retryable
    def Register(self, request, context):
        rt, why = self._runtime(request.worker, context, registering=True)
        if rt is None:
            return pb.RegisterReply(accepted=False, reason=why)
        job, rank, incarnation = rt.job, request.worker.rank, 0
        if rank != DRIVER_RANK:
            with rt.cond:
                now = self.clock()
                incarnation, change = rt.worlds.registered(
                    rank, checkpoint=bool(job.last_checkpoint), now=now)
                st = rt.ranks[rank]
                st.registered, st.progress_at, st.heard_at, st.finished = True, now, now, False
                everyone = rt.worlds.world is not None
                rt.cond.notify_all()
            self._record(rt, change)
            if everyone and not rt.ready_sent:
                rt.ready_sent = True
                self.launcher.report(LauncherEvent(job_id=job.id, attempt=job.attempt,
                                                   kind=EventKind.READY))
            self.store.append_logs(job.id, [f"rank {rank} registered from {request.host} "
                                            f"pid {request.pid} (attempt {job.attempt}, "
                                            f"incarnation {incarnation})"])
        return pb.RegisterReply(
            accepted=True, world_size=job.spec.resources.num_ranks,
            job_spec_json=worker_config_json(job), start_step=_resume_step(job),
            checkpoint_dir=job.spec.training.checkpoint_dir or "",
            resume_from=job.last_checkpoint or "", incarnation=incarnation)

    @_store_unavailable_is_retryable
    def Heartbeat(self, request, context):
        rt, why = self._runtime(request.worker, context)
        if rt is None:
            return pb.HeartbeatReply(accepted=False, reason=why)
        self._heard_from(rt, request.worker.rank)
        with rt.cond:
            st = rt.ranks.get(request.worker.rank)
            now = self.clock()
            if st is not None:
                st.heard_at, st.syncing = now, request.syncing
            if st is not None and (request.step, request.progress) != st.progress:
                st.progress, st.progress_at = (request.step, request.progress), now
            w = rt.worlds.world
            epoch = w.epoch if w is not None else -1
            # a world formed on a loss (not a join at a step boundary) breaks the older ones
            broken = w.epoch if w is not None and w.boundary is None else 0
        stop = rt.job.state is State.STOPPING
        return pb.HeartbeatReply(accepted=True, stop=stop, world_epoch=epoch,
                                 broken_below=broken, reason="stop requested" if stop else "")

    @_store_unavailable_is_retryable
    def ReportFailure(self, request, context):
        rt, why = self._runtime(request.worker, context)
        if rt is None:
            return pb.Ack(accepted=False, reason=why)
        rank = request.worker.rank
        if rt.replan and rank == DRIVER_RANK and request.lost_ranks:
            ranks = sorted(set(request.lost_ranks))
            self.store.append_logs(rt.job.id, [f"the driver reports rank(s) {ranks} dead: "
                                               f"{request.error}"])
            self._ranks_lost(rt, ranks, f"the process of rank(s) {ranks} died")
        elif rt.replan and request.recoverable:
            self._waits_for_world(rt, rank, request.step, request.error, request.world_epoch)
        elif rt.replan and request.cannot_replan:
            self._fall_back(rt, f"rank {rank}: {request.error}", request.step)
        else:
            self._lose(rt, rank, f"rank {rank} failed at step {request.step}: {request.error}")
        return pb.Ack(accepted=True)

    @_store_unavailable_is_retryable
    def ReportStep(self, request, context):
        rt, why = self._runtime(request.worker, context)
        if rt is None:
            return pb.Ack(accepted=False, reason=why)
        self._heard_from(rt, request.worker.rank)
        with rt.cond:
            st = rt.ranks[request.worker.rank]
            st.progress, st.progress_at = (request.step + 1, 0), self.clock()
            st.done_step = max(st.done_step, request.step)
            rt.cond.notify_all()
            got = rt.reports.setdefault(request.step, {})
            got[request.worker.rank] = request
            complete = self._complete(rt, request.step)
        if complete:
            self._finish_step(rt, request.step)
        return pb.Ack(accepted=True)

    @_store_unavailable_is_retryable
    def StreamPlans(self, request, context):
        rt, why = self._runtime(request.worker, context)
        if rt is None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, why)
        slot, step, total = request.worker.rank, request.from_step, rt.job.spec.training.steps
        epoch = request.world_epoch if request.formed else None
        with rt.cond:  # a rank (re)connecting has finished everything before from_step
            st = rt.ranks.get(slot)
            if st is not None:
                st.done_step = max(st.done_step, step - 1)
                st.progress_at = self.clock()
            try:
                completed = epoch is not None and rt.worlds.formed(slot, epoch, step)
            except ValueError as exc:  # the members disagree on where the world starts
                completed, disagree = False, str(exc)
            else:
                disagree = ""
            rt.cond.notify_all()
        if disagree:
            self._fall_back(rt, disagree, step)
        if epoch is not None:
            self._record(rt, Change(snapshot=rt.worlds.membership.snapshot()))
        if completed:
            self.store.append_logs(rt.job.id, [f"world {epoch} formed at step {step}: ranks "
                                               f"{list(rt.worlds.members_of(epoch))}"])
        self._heard_from(rt, request.worker.rank)
        while context.is_active():
            rt, why = self._runtime(request.worker, context)
            if rt is None:
                context.abort(grpc.StatusCode.FAILED_PRECONDITION, why)
            done = self._world_done(rt, slot)
            if rt.job.state is State.STOPPING or step >= total or done:
                with rt.cond:
                    if st is not None:
                        st.finished = True
                yield pb.PlanMessage(step=total if done else step, stop=True)
                return
            nxt = self._next(rt, slot, epoch, request.world_epoch, step)
            if nxt is Next.FENCED:
                context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                              f"rank {slot} is no longer in the attempt's world")
            if nxt is Next.WORLD:
                yield self._world_message(rt, slot, step)
                return
            if nxt is Next.WAIT or not self._wait_turn(rt, step, epoch, context):
                with rt.cond:
                    rt.cond.wait(timeout=0.5)
                continue
            msg = self._plan_message(rt, epoch, step, slot)
            if msg is None:  # the attempt is ending (fallback): the next pass says so
                with rt.cond:
                    rt.cond.wait(timeout=0.5)
                continue
            yield msg
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

    def _next(self, rt: AttemptRuntime, slot: int, epoch: int | None, attempted: int,
              step: int) -> Next:
        """What the stream sends next; a replacement waiting joins when it can."""
        with rt.cond:
            nxt = rt.worlds.next_for(slot, epoch, attempted, step)
            change = Change()
            if nxt is Next.PLAN and rt.worlds.world.epoch == epoch \
                    and rt.worlds.membership.waiting():
                change = rt.worlds.maybe_join(epoch, self.clock())
                if change.world is not None:
                    self._reset_progress(rt)
                    rt.cond.notify_all()
                    nxt = rt.worlds.next_for(slot, epoch, attempted, step)
        self._record(rt, change)
        return nxt

    def _world_done(self, rt: AttemptRuntime, slot: int) -> bool:
        """A replacement still waiting when every member has finished the job's steps."""
        with rt.cond:
            members = rt.worlds.membership.members()
            return bool(members) and slot not in members and all(
                rt.ranks[s].finished for s in members)

    def _world_message(self, rt: AttemptRuntime, slot: int, step: int) -> pb.PlanMessage:
        with rt.cond:
            w = rt.worlds.world
            rt.worlds.world_sent(slot, self.clock())
            rt.ranks[slot].progress_at = self.clock()
        return pb.PlanMessage(step=step, world=pb.World(
            epoch=w.epoch, members=list(w.members), store_prefix=w.store_prefix,
            joining=list(w.joining), reason=w.reason,
            checkpoint=rt.job.last_checkpoint or "",
            start_step=w.boundary if w.boundary is not None else -1))

    def _wait_turn(self, rt: AttemptRuntime, step: int, epoch: int | None, context) -> bool:
        """True once `step` is within PLANS_AHEAD of the step every member of the rank's
        world has finished."""
        with rt.cond:
            lost = {s for s, state in rt.worlds.membership.states.items() if state == "lost"}
            members = [s for s in rt.worlds.members_of(epoch) if s not in lost] or list(
                rt.ranks)
            return step <= min(rt.ranks[s].done_step for s in members) + PLANS_AHEAD

    def _complete(self, rt: AttemptRuntime, step: int) -> bool:
        """Every member of the world the step's reports came from (but the lost) reported."""
        got = rt.reports.get(step)
        if not got:
            return False
        epoch = max(r.world_epoch for r in got.values())
        lost = {s for s, state in rt.worlds.membership.states.items() if state == "lost"}
        expected = {s for s in rt.worlds.members_of(epoch) if s not in lost} or set(rt.ranks)
        return expected <= set(got)

    def _planned(self, rt: AttemptRuntime, size: int, step: int) -> tuple[PlannedStep, str]:
        """The step's plan for a world of `size` ranks and its span's traceparent,
        computed once for all ranks."""
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
        size = len(rt.worlds.members_of(epoch))
        try:
            planned, traceparent = self._planned(rt, size, step)
        except InfeasibleBatchError as exc:
            if size >= rt.job.spec.resources.num_ranks:
                raise
            self._fall_back(rt, f"step {step}'s batch does not fit {size} ranks: {exc}", step)
            return None
        with rt.cond:
            rt.worlds.plan_sent(epoch, step)
            st = rt.ranks[slot]
            if st.sent_step <= st.done_step:  # it was waiting for us, not working
                st.progress_at = self.clock()
            st.sent_step = max(st.sent_step, step)
        plan, training = planned.plan, rt.job.spec.training
        checkpoint = bool(training.checkpoint_dir) and (
            (step + 1) % training.checkpoint_interval == 0 or step + 1 == training.steps)
        return pb.PlanMessage(
            step=step, plan_json=plan.model_dump_json(), sample_ids=planned.sample_ids,
            data_epoch=planned.next_position.epoch, data_index=planned.next_position.index,
            checkpoint=checkpoint, traceparent=traceparent, world_epoch=epoch,
            predicted_step_s=plan.predicted.makespan_s if plan.predicted else 0.0)

    def _finish_step(self, rt: AttemptRuntime, step: int) -> None:
        with rt.cond:
            reports = rt.reports.pop(step, None)
            if not reports:
                return
            epochs = {r.world_epoch for r in reports.values()}
            size = len(reports)
        planned, _ = rt.plans.pop((size, step), (None, ""))
        metrics = step_metrics(step, rt.job.attempt, reports, planned)
        self.store.append_step_metrics(rt.job.id, metrics)
        ckpt = next((r.checkpoint_path for r in reports.values() if r.checkpoint_path), "")
        if ckpt:
            self.store.record_checkpoint(rt.job.id, step=step + 1, path=ckpt)
        if planned is not None and len(epochs) == 1 and planned.plan.world_size == size:
            members = rt.worlds.members_of(epochs.pop()) or tuple(sorted(reports))
            by_rank = {members.index(s): r for s, r in reports.items() if s in members}
            rt.worlds.pipeline(size).observe(planned.plan, group_seconds(planned.plan,
                                                                         by_rank))

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
                self._check_liveness(rt)

    def _check_liveness(self, rt: AttemptRuntime) -> None:
        if not rt.ready_sent or rt.lost_sent:
            return
        if rt.replan:
            self._check_world(rt)
            return
        timeout = rt.job.spec.failure.heartbeat_timeout_s
        now = self.clock()
        for rank, st in rt.ranks.items():
            if not st.finished and now - st.progress_at > timeout:
                self._lose(rt, rank, f"rank {rank} made no progress for {now - st.progress_at:.1f}"
                                     f" s (heartbeat_timeout_s={timeout:g}); presumed stalled")
                return

    # elastic worlds (docs/elastic.md) ---------------------------------------------------
    def _check_world(self, rt: AttemptRuntime) -> None:
        """Replan mode: find the rank that stopped first (the others wait on it), a world
        that did not form in time, replacements gone silent."""
        timeout = rt.job.spec.failure.heartbeat_timeout_s
        now = self.clock()
        with rt.cond:
            verdict = _stalled(rt, now, timeout)
        if verdict is None:
            return
        kind, ranks, message = verdict
        if kind == "regroup":
            with rt.cond:
                change = rt.worlds.regroup_same(message, step=self._step_of(rt), now=now)
                self._reset_progress(rt)
                rt.cond.notify_all()
            self._record(rt, change)
        else:
            self._ranks_lost(rt, ranks, message)

    def _step_of(self, rt: AttemptRuntime) -> int:
        """The step the current world is working on (its members' first unfinished)."""
        members = rt.worlds.membership.members() or tuple(rt.ranks)
        return min(rt.ranks[s].done_step for s in members) + 1

    def _reset_progress(self, rt: AttemptRuntime) -> None:
        now = self.clock()
        for st in rt.ranks.values():
            st.progress_at = now

    def _ranks_lost(self, rt: AttemptRuntime, ranks: list[int], reason: str) -> None:
        """`ranks` are gone: the survivors' new world, or the fallback."""
        with rt.cond:
            step = self._step_of(rt)
            change = rt.worlds.lose(ranks, reason, step=step,
                                    checkpoint=bool(rt.job.last_checkpoint), now=self.clock())
            self._reset_progress(rt)
            rt.cond.notify_all()
            done = [s for s in rt.reports if self._complete(rt, s)]
        self._record(rt, change)
        for s in done:  # the lost rank may have been the last one a step waited for
            self._finish_step(rt, s)

    def _waits_for_world(self, rt: AttemptRuntime, rank: int, step: int, error: str,
                         epoch: int) -> None:
        """A member's step broke on a vanished peer: it waits for the next world. (One of
        an older world than the current one broke because that world did: the current
        World is on its way to the rank, and the report says nothing about it.)"""
        with rt.cond:
            w = rt.worlds.world
            if w is None or epoch >= w.epoch:
                rt.worlds.waiting_world.add(rank)
        self.store.append_logs(rt.job.id, [f"rank {rank} abandoned step {step} and waits for "
                                           f"a new world: {error.splitlines()[0][:300]}"])

    def _fall_back(self, rt: AttemptRuntime, reason: str, step: int) -> None:
        """Re-planning cannot work: a fallback_restart event, then the attempt ends (once)."""
        with rt.cond:
            if rt.lost_sent or rt.fell_back:
                return
            rt.fell_back = True
            w = rt.worlds.world
            event = rt.worlds.fallback_event(reason, step)
        self._record(rt, Change(events=(event,)))
        self._lose(rt, None, f"fallback_restart: {reason} (world {w.epoch if w else '-'})")

    def _record(self, rt: AttemptRuntime, change: Change) -> None:
        """Persist and announce a membership change (outside the attempt's lock)."""
        job = rt.job
        if change.snapshot is not None:
            with rt.cond:
                history = {str(e): list(m) for e, m in rt.worlds.history.items()}
            self.store.set_world(job.id, {"attempt": job.attempt, "membership": change.snapshot,
                                          "history": history})
        for event in change.events:
            event = self.store.append_event(job.id, event)
            self.store.append_logs(job.id, [f"{event.kind}: ranks {list(event.ranks)} at step "
                                            f"{event.step}, world {event.epoch} of "
                                            f"{event.world_size} ranks: {event.reason}"])
            self._trace_event(job, event)
        if change.fallback:
            rt.fell_back = True
            self._lose(rt, None, f"fallback_restart: {change.fallback}")

    def _trace_event(self, job: JobRecord, event) -> None:
        parent = propagate.extract({"traceparent": job.trace_parent} if job.trace_parent
                                   else {})
        with self.tracer.start_as_current_span("job.world_change", context=parent) as span:
            span.set_attributes({
                "ringmaster.job_id": job.id, "ringmaster.attempt": job.attempt,
                "world.event": event.kind, "world.epoch": event.epoch,
                "world.size": event.world_size, "world.ranks": list(event.ranks),
                "world.step": event.step, "world.reason": event.reason})


def _stalled(rt: AttemptRuntime, now: float, timeout: float
             ) -> tuple[str, list[int], str] | None:
    """("lose", ranks, why), ("regroup", [], why) or None (see _check_world)."""
    worlds = rt.worlds
    w = worlds.world
    if w is None:
        return None
    waiting = [s for s in worlds.membership.waiting() if s not in w.members]
    silent = [s for s in waiting if not rt.ranks[s].finished
              and now - rt.ranks[s].heard_at > timeout]
    if silent:
        return "lose", silent, f"replacement rank(s) {silent} went silent for {timeout:g} s"
    forming = not w.complete and (w.boundary is None or w.epoch in worlds.offered)
    if forming:  # members form it with collectives bounded by the process-group timeout,
        # twice the heartbeat timeout (workers.driver.group_config): give them as long
        if now - worlds.announced_at <= 2 * timeout:
            return None
        absent = [s for s in w.members if s not in w.formed and s not in worlds.waiting_world]
        if absent:
            return "lose", absent, (f"rank(s) {absent} did not form world {w.epoch} within "
                                    f"2 x heartbeat_timeout_s={timeout:g}")
        return "regroup", [], f"forming world {w.epoch} failed on every rank"
    if w.members and all(s in worlds.waiting_world for s in w.members):
        return "regroup", [], f"every rank of world {w.epoch} abandoned its step"
    gone = [s for s in w.members if not rt.ranks[s].finished
            and now - rt.ranks[s].heard_at > timeout]
    if gone:
        return "lose", gone, f"rank(s) {gone} went silent for {timeout:g} s (no heartbeat)"
    # Stalled: a rank that holds a plan it has not finished, is still computing it and whose
    # progress stopped. (Waiting for a plan, for a world to form, for a step boundary or in
    # the step's collectives or a ring transfer for the others is not stalling.)
    busy = [s for s in w.members if not rt.ranks[s].finished and s not in worlds.waiting_world
            and (w.complete or s not in w.joining) and not rt.ranks[s].syncing
            and rt.ranks[s].sent_step > rt.ranks[s].done_step]
    late = [s for s in busy if now - rt.ranks[s].progress_at > timeout]
    if not late:
        return None
    first = min(late, key=lambda s: (rt.ranks[s].progress_at, s))
    idle = now - rt.ranks[first].progress_at
    return "lose", [first], (f"rank {first} made no progress for {idle:.1f} s "
                             f"(heartbeat_timeout_s={timeout:g}); presumed stalled")


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
                     "optimizer_sharding": spec.resolve_optimizer_sharding(),
                     "shard_mirror": spec.resolve_shard_mirror()},
        "failure": spec.failure.model_dump(mode="json"),
        "heartbeat_interval_s": max(0.2, min(5.0, spec.failure.heartbeat_timeout_s / 4)),
    })


def step_metrics(step: int, attempt: int, reports: dict[int, pb.StepReport],
                 planned: PlannedStep | None) -> StepMetrics:
    """One StepMetrics from every rank's report of a step."""
    times = [r.step_time_s for r in reports.values()]
    busy = [sum(r.micro_batch_times_s) for r in reports.values()]
    measured = max(times) if times else 0.0
    mean_busy = sum(busy) / len(busy) if busy else 0.0
    any_report = next(iter(reports.values()))
    predicted = planned.plan.predicted.makespan_s if planned and planned.plan.predicted else 0.0
    return StepMetrics(
        step=step, attempt=attempt, loss=any_report.loss, world_size=len(reports),
        tokens_per_s=sum(r.tokens for r in reports.values()) / measured if measured else 0.0,
        predicted_step_s=predicted, measured_step_s=measured,
        imbalance=(max(busy) / mean_busy - 1.0) if mean_busy > 0 else 0.0,
        groups=groups_by_size(planned.plan) if planned else "")


def groups_by_size(plan) -> str:
    """'SIZExCOUNT' words of a plan's groups, smallest ring first (e.g. '1x6 2x1 4x1')."""
    return " ".join(f"{size}x{count}" for size, count in plan.groups_by_size().items())


def group_seconds(plan, reports: dict[int, pb.StepReport]) -> dict[tuple[int, int], float]:
    """Measured time of each (micro_batch, group): the slowest member's micro-batch time."""
    out: dict[tuple[int, int], float] = {}
    for rank, rep in reports.items():
        mine = [(m, gi) for m, mb in enumerate(plan.micro_batches)
                for gi, g in enumerate(mb.groups) if rank in g.ranks]
        for key, seconds in zip(mine, rep.micro_batch_times_s, strict=False):
            out[key] = max(out.get(key, 0.0), seconds)
    return out


def _method(context) -> str:
    try:
        return context._rpc_event.call_details.method.decode().rsplit("/", 1)[-1]
    except AttributeError:  # not grpc's own context (a test double)
        return "RPC"


def serve_grpc(service: WorkerService, *, host: str, port: int, max_workers: int = 64,
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
