"""The job state machine stepped against FakeLauncher, on a real (embedded) Redis.

Every legal path of the lifecycle, the restart budget and back-off, fencing of stale
attempts, gang admission with backfill, stop races, and the transition table itself.
"""

from __future__ import annotations

import pytest

from controller.launchers import EventKind, FakeLauncher, LauncherEvent
from controller.machine import BoundedRestarts, JobStateMachine
from controller.redis_server import open_redis
from controller.spec import JobCreate
from controller.states import TRANSITIONS, IllegalTransition, StaleState, State, check_transition
from controller.store import JobNotFound, JobStore, StepMetrics


class Clock:
    def __init__(self) -> None:
        self.t = 1_000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture(scope="module")
def redis_client(tmp_path_factory):
    handle = open_redis(state_dir=tmp_path_factory.mktemp("redis"), url="")
    yield handle.client
    handle.close()


@pytest.fixture
def env(redis_client, request):
    clock = Clock()
    store = JobStore(redis_client, prefix=f"t-{request.node.name}", clock=clock)
    launcher = FakeLauncher(total_ranks=8)
    machine = JobStateMachine(store=store, launcher=launcher, clock=clock,
                              restart_policy=BoundedRestarts(base_delay_s=2.0, max_delay_s=5))
    return store, launcher, machine, clock


def spec(name: str = "job", num_ranks: int = 4, max_restarts: int = 2) -> JobCreate:
    return JobCreate.model_validate(dict(
        name=name, model="tiny", dataset={"path": "d"}, resources={"num_ranks": num_ranks},
        training={"steps": 5, "global_batch_tokens": 128},
        failure={"max_restarts": max_restarts}))


def states(store: JobStore, job_id: str) -> list[str]:
    return [t.dst.value for t in store.transitions(job_id)]


def test_happy_path_pending_to_succeeded(env):
    store, launcher, machine, _ = env
    job, created = store.create(spec())
    assert created and job.state is State.PENDING and job.attempt == 0
    machine.tick()  # admitted and started: Scheduling, READY queued
    assert store.get(job.id).state is State.SCHEDULING
    assert launcher.started == [(job.id, 1)]
    machine.tick()
    rec = store.get(job.id)
    assert rec.state is State.RUNNING and rec.attempt == 1 and rec.started_at is not None
    launcher.complete(job.id)
    machine.tick()
    rec = store.get(job.id)
    assert rec.state is State.SUCCEEDED and rec.finished_at is not None
    assert states(store, job.id) == ["Pending", "Scheduling", "Running", "Succeeded"]
    assert job.id not in store.active_ids()


def test_worker_loss_restarts_with_backoff_until_the_budget_is_spent(env):
    store, launcher, machine, clock = env
    job, _ = store.create(spec(max_restarts=1))
    machine.tick(), machine.tick()
    launcher.lose_worker(job.id, rank=3, message="exit code -9")
    machine.tick()
    rec = store.get(job.id)
    assert rec.state is State.RESTARTING and "rank 3: exit code -9" in rec.message
    assert rec.not_before == clock.t + 2.0  # first back-off is base_delay_s
    machine.tick()
    assert store.get(job.id).state is State.RESTARTING  # back-off not over
    clock.t += 2.0
    machine.tick()
    assert store.get(job.id).attempt == 2 and launcher.started[-1] == (job.id, 2)
    machine.tick()
    launcher.lose_worker(job.id)
    machine.tick()
    rec = store.get(job.id)
    assert rec.state is State.FAILED and rec.reason == "RestartLimitReached"
    assert states(store, job.id) == ["Pending", "Scheduling", "Running", "Restarting",
                                     "Scheduling", "Running", "Failed"]


def test_events_of_an_old_attempt_are_fenced_off(env):
    store, launcher, machine, clock = env
    job, _ = store.create(spec())
    machine.tick(), machine.tick()
    launcher.lose_worker(job.id)
    machine.tick()
    clock.t += 10
    machine.tick(), machine.tick()
    assert store.get(job.id).attempt == 2
    launcher.push(LauncherEvent(job_id=job.id, attempt=1, kind=EventKind.COMPLETED))
    launcher.push(LauncherEvent(job_id=job.id, attempt=1, kind=EventKind.WORKER_LOST))
    machine.tick()
    assert store.get(job.id).state is State.RUNNING  # attempt-1 news changes nothing


def test_terminal_jobs_never_move_again(env):
    store, launcher, machine, _ = env
    job, _ = store.create(spec())
    machine.tick(), machine.tick()
    launcher.fail(job.id, "CUDA error: illegal memory access")
    machine.tick()
    assert store.get(job.id).state is State.FAILED
    for kind in EventKind:
        launcher.push(LauncherEvent(job_id=job.id, attempt=1, kind=kind))
    machine.tick()
    assert store.get(job.id).state is State.FAILED
    with pytest.raises(StaleState, match="already finished"):
        machine.request_stop(job.id)


def test_gang_admission_backfills_smaller_jobs(env):
    store, launcher, machine, clock = env
    big, _ = store.create(spec("big", num_ranks=8))
    clock.t += 1
    running, _ = store.create(spec("small", num_ranks=4))
    machine.tick()
    assert store.get(big.id).state is State.SCHEDULING  # oldest first, takes all 8 ranks
    assert store.get(running.id).state is State.PENDING  # no partial gang on 0 free ranks
    launcher.complete(big.id)
    machine.tick()
    assert store.get(running.id).state is State.SCHEDULING


def test_stop_pending_running_and_restarting(env):
    store, launcher, machine, _ = env
    pending, _ = store.create(spec("pending", num_ranks=8))
    blocker = pending
    assert machine.request_stop(pending.id).state is State.STOPPED
    run, _ = store.create(spec("run", num_ranks=4))
    machine.tick(), machine.tick()
    rec = machine.request_stop(run.id)
    assert rec.state is State.STOPPING and rec.stop_requested
    assert machine.request_stop(run.id).state is State.STOPPING  # idempotent
    machine.tick()
    assert store.get(run.id).state is State.STOPPED
    assert states(store, run.id)[-2:] == ["Stopping", "Stopped"]
    again, _ = store.create(spec("again", num_ranks=4))
    machine.tick(), machine.tick()
    launcher.lose_worker(again.id)
    machine.tick()
    assert machine.request_stop(again.id).state is State.STOPPED
    assert store.get(blocker.id).state is State.STOPPED


def test_launcher_start_failure_counts_as_a_lost_attempt(env):
    store, launcher, machine, _ = env

    def broken(job, attempt):
        raise RuntimeError("kubernetes API: 503")

    launcher.start = broken
    job, _ = store.create(spec(max_restarts=0))
    machine.tick()
    rec = store.get(job.id)
    assert rec.state is State.FAILED and "start failed: kubernetes API: 503" in rec.message


def test_transition_table_is_closed_and_enforced(env):
    store, *_ = env
    for src, dsts in TRANSITIONS.items():
        if src is not None and src.terminal:
            assert not dsts
        for dst in State:
            if dst not in dsts:
                with pytest.raises(IllegalTransition):
                    check_transition(src, dst)
    job, _ = store.create(spec())
    with pytest.raises(IllegalTransition, match="Pending -> Running"):
        store.transition(job.id, src=State.PENDING, dst=State.RUNNING, reason="x")
    with pytest.raises(StaleState, match="is Pending, not Running"):
        store.transition(job.id, src=State.RUNNING, dst=State.SUCCEEDED, reason="x")
    with pytest.raises(JobNotFound):
        store.transition("nope", src=State.PENDING, dst=State.STOPPED, reason="x")


def test_step_metrics_logs_and_checkpoints_are_recorded(env):
    store, *_ = env
    job, _ = store.create(spec())
    for step in (1, 2, 3):
        store.append_step_metrics(job.id, StepMetrics(
            step=step, attempt=1, loss=3.0 / step, tokens_per_s=1000.0 + step,
            predicted_step_s=0.5, measured_step_s=0.55, imbalance=0.02))
    store.record_checkpoint(job.id, step=2, path="/ckpt/step-2")
    rec = store.get(job.id)
    assert rec.current_step == 3 and rec.last_checkpoint == "/ckpt/step-2"
    assert [m.step for m in store.step_metrics(job.id, since_step=2)] == [2, 3]
    store.append_logs(job.id, [f"line {i}" for i in range(7)], rank=1)
    last, cursor = store.read_logs(job.id, tail=3)
    assert [x.text for x in last] == ["line 4", "line 5", "line 6"] and last[0].rank == 1
    head, cursor = store.read_logs(job.id, cursor="0", limit=2)
    rest, _ = store.read_logs(job.id, cursor=cursor, limit=100)
    assert [x.text for x in head + rest] == [f"line {i}" for i in range(7)]
    with pytest.raises(ValueError, match="cursor='abc' is not a log cursor"):
        store.read_logs(job.id, cursor="abc")


# several replicas, admission messages --------------------------------------------------------
def test_a_stop_taken_elsewhere_is_carried_out_by_the_next_pass(env):
    """A standby replica moves the job to Stopping in the store only; the machine that runs
    the launcher stops the workers on its next pass, once."""
    store, launcher, machine, _ = env
    job, _ = store.create(spec())
    machine.tick()
    machine.tick()
    assert store.get(job.id).state is State.RUNNING
    store.transition(job.id, src=State.RUNNING, dst=State.STOPPING, reason="StopRequested")
    machine.tick()
    assert launcher.stopped == [job.id]
    machine.tick()  # STOPPED arrives; the job is done and nothing is stopped twice
    assert store.get(job.id).state is State.STOPPED and launcher.stopped == [job.id]


def test_a_restart_waits_until_its_gang_fits_again(env):
    store, launcher, machine, clock = env
    job, _ = store.create(spec(num_ranks=4))
    machine.tick()
    machine.tick()
    launcher.lose_worker(job.id)
    other, _ = store.create(spec(name="other", num_ranks=8))
    machine.tick()  # job Restarting (its ranks freed); other takes all 8 ranks
    clock.t += 10  # past the back-off
    machine.tick()
    assert store.get(other.id).state in (State.SCHEDULING, State.RUNNING)
    assert store.get(job.id).state is State.RESTARTING  # its gang no longer fits: it waits
    assert launcher.free_ranks == 0 and len(launcher.groups) == 1


class WaitingLauncher(FakeLauncher):
    """Admits nothing and says why."""

    def admit(self, job):
        return False

    def admission_message(self, job):
        return f"waiting for Kueue admission in queue q-{job.spec.name}"


def test_a_waiting_job_says_why_without_a_transition(redis_client, request):
    clock = Clock()
    store = JobStore(redis_client, prefix=f"t-{request.node.name}", clock=clock)
    machine = JobStateMachine(store=store, launcher=WaitingLauncher(), clock=clock)
    job, _ = store.create(spec(name="queued"))
    machine.tick()
    machine.tick()
    rec = store.get(job.id)
    assert (rec.state, rec.reason, rec.message) == (
        State.PENDING, "AwaitingAdmission", "waiting for Kueue admission in queue q-queued")
    assert states(store, job.id) == ["Pending"]  # a note, not a transition
    store.transition(job.id, src=State.PENDING, dst=State.STOPPED, reason="StopRequested")
    with pytest.raises(StaleState):  # the note never overwrites a newer state's reason
        store.note(job.id, state=State.PENDING, reason="AwaitingAdmission", message="x")
    assert store.get(job.id).reason == "StopRequested"
