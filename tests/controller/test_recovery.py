"""The state machine after a controller restart and past its timeouts (issue 23), and the
cost of a reconcile pass: it reads the jobs that need action, not every active job.

A "restart" is a new JobStateMachine with a new FakeLauncher on the same Redis: exactly
what a controller killed with SIGKILL leaves behind (the store has the jobs, the new
launcher has no record of what the old one started).
"""

from __future__ import annotations

import pytest

from controller.launchers import FakeLauncher
from controller.machine import BoundedRestarts, JobStateMachine, Reconciler, Timeouts
from controller.redis_server import open_redis
from controller.spec import JobCreate
from controller.states import State
from controller.store import JobStore

TIMEOUTS = Timeouts(scheduling_s=100.0, stopping_s=30.0, stop_attempts=3)


class Clock:
    def __init__(self) -> None:
        self.t = 5_000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture(scope="module")
def redis_client(tmp_path_factory):
    handle = open_redis(state_dir=tmp_path_factory.mktemp("redis"), url="")
    yield handle.client
    handle.close()


@pytest.fixture
def world(redis_client, request):
    clock = Clock()
    store = JobStore(redis_client, prefix=f"r-{request.node.name}", clock=clock)

    def machine(launcher: FakeLauncher | None = None) -> JobStateMachine:
        return JobStateMachine(store=store, launcher=launcher or FakeLauncher(total_ranks=64),
                               clock=clock, timeouts=TIMEOUTS,
                               restart_policy=BoundedRestarts(base_delay_s=1.0))

    return store, machine, clock


def spec(name: str = "job", max_restarts: int = 0) -> JobCreate:
    return JobCreate.model_validate(dict(
        name=name, model="tiny", dataset={"path": "d"}, resources={"num_ranks": 2},
        training={"steps": 5, "global_batch_tokens": 128},
        failure={"max_restarts": max_restarts}))


def history(store: JobStore, job_id: str) -> list[tuple[str, str]]:
    return [(t.dst.value, t.reason) for t in store.transitions(job_id)]


def test_a_stuck_scheduling_job_is_redriven_after_a_restart(world):
    store, machine, _ = world
    job, _ = store.create(spec(max_restarts=0))  # no restart budget at all
    old = machine(FakeLauncher(total_ranks=64, auto_ready=False))
    old.tick()  # admitted: Scheduling, attempt 1 ... and then the controller is killed
    assert store.get(job.id).state is State.SCHEDULING

    launcher = FakeLauncher(total_ranks=64)
    new = machine(launcher)
    new.recover()
    assert launcher.started == [(job.id, 2)]  # a new attempt: stale workers are fenced off
    new.tick()
    rec = store.get(job.id)
    assert (rec.state, rec.attempt, rec.redrives) == (State.RUNNING, 2, 1)
    assert history(store, job.id)[-3:] == [("Restarting", "Redriven"),
                                           ("Scheduling", "Redriven"),
                                           ("Running", "WorkersReady")]
    assert "never started" in store.transitions(job.id)[-3].message
    launcher.lose_worker(job.id)  # the re-drive did not spend the (empty) restart budget
    new.tick()
    assert store.get(job.id).reason == "RestartLimitReached"


def test_recover_leaves_attempts_the_launcher_still_runs_alone(world):
    store, machine, _ = world
    job, _ = store.create(spec())
    launcher = FakeLauncher(total_ranks=64, auto_ready=False)
    m = machine(launcher)
    m.tick()
    m.recover()  # same launcher: it knows attempt 1
    assert launcher.started == [(job.id, 1)]
    assert store.get(job.id).state is State.SCHEDULING


def test_the_reconciler_recovers_before_its_first_pass(world):
    store, machine, _ = world
    job, _ = store.create(spec())
    machine(FakeLauncher(total_ranks=64, auto_ready=False)).tick()
    reconciler = Reconciler(machine(FakeLauncher(total_ranks=64)), interval_s=0.05).start()
    try:
        deadline_passes = 400
        while store.get(job.id).state is not State.RUNNING and deadline_passes:
            reconciler._stop.wait(0.05)
            deadline_passes -= 1
    finally:
        reconciler.close()
    assert store.get(job.id).state is State.RUNNING and store.get(job.id).attempt == 2


def test_scheduling_past_its_timeout_loses_the_attempt(world):
    store, machine, clock = world
    job, _ = store.create(spec(max_restarts=1))
    launcher = FakeLauncher(total_ranks=64, auto_ready=False)
    m = machine(launcher)
    m.tick()
    clock.t += TIMEOUTS.scheduling_s - 1
    m.tick()
    assert store.get(job.id).state is State.SCHEDULING
    clock.t += 2
    m.tick()
    rec = store.get(job.id)
    assert rec.state is State.RESTARTING and rec.reason == "WorkerLost"
    assert "scheduling timeout" in rec.message
    clock.t += 10
    m.tick()
    assert store.get(job.id).attempt == 2 and launcher.started[-1] == (job.id, 2)


def test_a_stop_is_reissued_then_times_out_with_a_reason(world):
    store, machine, clock = world
    job, _ = store.create(spec())

    class DeafLauncher(FakeLauncher):
        def stop(self, job_id: str) -> None:  # the workers never confirm
            self.stopped.append(job_id)

    launcher = DeafLauncher(total_ranks=64)
    m = machine(launcher)
    m.tick(), m.tick()
    m.request_stop(job.id)
    assert launcher.stopped == [job.id]
    for _ in range(2):
        clock.t += TIMEOUTS.stopping_s
        m.tick()
        assert store.get(job.id).state is State.STOPPING
    assert launcher.stopped == [job.id] * 3  # re-issued after each stopping_s
    clock.t += TIMEOUTS.stopping_s
    m.tick()
    rec = store.get(job.id)
    assert (rec.state, rec.reason) == (State.STOPPED, "StopTimedOut")
    assert "may still be running" in rec.message


def test_recover_reissues_the_stop_of_a_stopping_job(world):
    store, machine, _ = world
    job, _ = store.create(spec())
    m = machine()
    m.tick(), m.tick()
    store.transition(job.id, src=State.RUNNING, dst=State.STOPPING, reason="StopRequested")
    launcher = FakeLauncher(total_ranks=64)  # the restarted controller's: knows nothing
    new = machine(launcher)
    new.recover()
    new.tick()  # stops it: the fresh launcher has no workers of it and says so ...
    assert launcher.stopped == [job.id]
    new.tick()  # ... with STOPPED, which the next pass applies
    assert store.get(job.id).state is State.STOPPED


def test_a_pass_reads_only_jobs_that_need_action(world):
    store, machine, clock = world
    m = machine(FakeLauncher(total_ranks=1000))
    ids = [store.create(spec(name=f"j{i}"))[0].id for i in range(60)]
    m.tick(), m.tick()
    assert all(store.get(i).state is State.RUNNING for i in ids)
    reads: list[str] = []
    real_get = store.get
    store.get = lambda job_id: reads.append(job_id) or real_get(job_id)
    try:
        for _ in range(5):
            clock.t += 1
            m.tick()
        assert reads == []  # 60 Running jobs, nothing due: not one of them is read
        pending = store.create(spec(name="late"))[0]
        m.tick()
        assert set(reads) == {pending.id}  # the one job that needed admission
    finally:
        del store.get


def test_recover_rebuilds_the_indexes_of_an_older_store(world, redis_client):
    store, machine, _ = world
    job, _ = store.create(spec())
    redis_client.delete(store._k("pending"), store._k("due"))  # as written before v1.1
    m = machine()
    m.tick()
    assert store.get(job.id).state is State.PENDING  # invisible to the pass ...
    m.recover()
    m.tick()
    assert store.get(job.id).state is State.SCHEDULING  # ... until recovery indexes it
