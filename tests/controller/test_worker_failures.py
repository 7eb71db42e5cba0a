"""Failure classes, stored reports and the rank log, against scripted workers over real
gRPC and Redis (the plane of test_worker_service): user failures end the job as
InvalidInput without a retry; a job whose data vanished fails the same way without a gRPC
traceback; a step whose reports straddle a controller restart is recorded exactly once;
the job's log gets one line per step and the ranks' own lines.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from controller.launchers import FakeLauncher
from controller.launchers.base import EventKind
from controller.machine import JobStateMachine
from controller.rpc import ringmaster_pb2 as pb
from controller.states import State
from controller.worker_service import WorkerService, serve_grpc
from scheduler.plan import StepPlan
from tests.controller import test_worker_service as scripted
from tests.controller.test_worker_service import AUTH, NUM_RANKS, client
from workers.controller_client import ControllerClient, Fenced, WorkerIdentity

plane = scripted.plane  # the scripted workers' fixture: service, store, job, address


def end_job(plane, event):
    """What the state machine makes of the service's event (a fake launcher holds the job)."""
    store, job = plane["store"], plane["job"]
    launcher = FakeLauncher(total_ranks=8)
    machine = JobStateMachine(store=store, launcher=launcher)
    machine.handle(event)
    return store.get(job.id)


def test_a_user_failure_fails_the_job_at_once(plane):
    clients = [client(plane, r) for r in range(NUM_RANKS)]
    for c in clients:
        c.register(host="h", pid=1)
    clients[1].report_failure(step=3, error="dataset /d: sample 12 holds token id 300,\n but "
                                            "the model's vocab_size is 256", user=True)
    event = next(e for e in plane["launcher"].events if e.kind is EventKind.FAILED)
    assert event.reason == "InvalidInput" and event.rank == 1
    job = end_job(plane, event)
    assert (job.state, job.reason, job.attempt) == (State.FAILED, "InvalidInput", 1)
    assert job.spec.failure.max_restarts == 3  # not used: a retry cannot fix the data
    assert job.message == (f"rank 1 at step 3: dataset /d: sample 12 holds token id 300, but "
                           f"the model's vocab_size is 256 (logs: ringmaster logs {job.id})")


def test_an_infrastructure_failure_is_retried_with_one_clean_line(plane):
    driver = client(plane, -1)
    driver.register(host="h", pid=1)
    driver.report_failure(step=-1, error="actor died (RayActorError: The actor died "
                                         "unexpectedly)", failed_rank=1)
    event = next(e for e in plane["launcher"].events if e.kind is EventKind.WORKER_LOST)
    job = end_job(plane, event)
    assert job.state is State.RESTARTING and job.reason == "WorkerLost"
    assert job.message == ("attempt 1: rank 1: actor died (RayActorError: The actor died "
                           f"unexpectedly) (logs: ringmaster logs {job.id})")


def test_a_dataset_gone_after_submit_is_invalid_input_without_a_traceback(plane, tmp_path,
                                                                          caplog):
    (tmp_path / "data" / "data.idx").unlink()
    c = client(plane, 0)
    with caplog.at_level(logging.DEBUG):
        with pytest.raises(Fenced, match="index file not found"):
            c.register(host="h", pid=1)
    event = next(e for e in plane["launcher"].events if e.kind is EventKind.FAILED)
    assert event.reason == "InvalidInput" and "index file not found" in event.message
    assert "\n" not in event.message and "Traceback" not in event.message
    assert not [r for r in caplog.records if r.exc_info or "Exception calling" in
                r.getMessage()]
    with pytest.raises(Fenced):  # the attempt stays ended: no second event
        c.register(host="h", pid=1)
    assert [e.kind for e in plane["launcher"].events].count(EventKind.FAILED) == 1


def report(c, step: int, msg: pb.PlanMessage, rank: int) -> None:
    plan = StepPlan.model_validate_json(msg.plan_json)
    groups = " ".join(f"{k}x{v}" for k, v in plan.groups_by_size().items())
    c.report_step(step=step, loss=2.5, num_predictions=10, tokens=100 + rank,
                  micro_batch_times_s=[0.1] * len(plan.micro_batches_of(rank)),
                  step_time_s=0.5, peak_memory_bytes=(rank + 1) << 20,
                  predicted_step_s=msg.predicted_step_s, plan_groups=groups)


def test_reports_straddling_a_controller_restart_are_recorded_once(plane):
    store, job = plane["store"], plane["job"]
    clients = [client(plane, r) for r in range(NUM_RANKS)]
    for c in clients:
        c.register(host="h", pid=1)
    with ThreadPoolExecutor(max_workers=NUM_RANKS) as ranks:  # they form the world at once
        msgs = list(ranks.map(lambda c: next(scripted.formed(c)), clients))
    report(clients[0], 0, msgs[0], rank=0)  # acknowledged, then the controller dies
    second = WorkerService(store=store, launcher=plane["launcher"],
                           planner_pool=ThreadPoolExecutor(max_workers=1), auth=AUTH)
    server, port = serve_grpc(second, host="127.0.0.1", port=0)
    try:
        again = [ControllerClient(f"127.0.0.1:{port}", WorkerIdentity(  # the same processes
            job_id=job.id, attempt=1, rank=r, incarnation=clients[r].identity.incarnation),
            reconnect_s=5, secret=AUTH.secret_for(job.id, 1)) for r in range(NUM_RANKS)]
        report(again[1], 0, msgs[1], rank=1)
        report(again[0], 0, msgs[0], rank=0)  # an unacknowledged retry of rank 0's report
        report(again[1], 0, msgs[1], rank=1)
    finally:
        server.stop(grace=None)
        second.close()
    rows = store.step_metrics(job.id)
    assert [(m.step, m.attempt) for m in rows] == [(0, 1)]
    plan = StepPlan.model_validate_json(msgs[0].plan_json)
    assert rows[0].predicted_step_s == pytest.approx(plan.predicted.makespan_s)
    assert rows[0].groups == " ".join(f"{k}x{v}" for k, v in plan.groups_by_size().items())
    assert rows[0].peak_memory_bytes == 2 << 20 and rows[0].tokens_per_s == 201 / 0.5
    assert store.get(job.id).steps_completed == 1
    lines = [x.text for x in store.read_logs(job.id)[0]]
    assert sum(t.startswith("step 1/5: loss 2.5000, 402 tokens/s, 0.500 s") for t in lines) == 1


def test_rank_log_lines_join_the_jobs_log(plane):
    c = client(plane, 1)
    c.register(host="h", pid=1)
    c.report_logs([pb.LogEntry(at=time.time(), level="WARNING", text="low disk"),
                   pb.LogEntry(at=time.time(), level="INFO", text="checkpoint saved")])
    lines = plane["store"].read_logs(plane["job"].id)[0]
    assert [(x.rank, x.text) for x in lines[-2:]] == [(1, "WARNING: low disk"),
                                                      (1, "checkpoint saved")]


class SlowPool(ThreadPoolExecutor):
    """A planner pool whose first plan takes `delay_s` (a busy planner process)."""

    def __init__(self, delay_s: float):
        super().__init__(max_workers=1)
        self.submit(time.sleep, delay_s)


@pytest.mark.parametrize("plane", [(0.6, "restart")], indirect=True)
def test_a_rank_waiting_for_its_plan_is_not_stalled(plane):
    service_pool = SlowPool(3.0)
    second = WorkerService(store=plane["store"], launcher=plane["launcher"],
                           planner_pool=service_pool, auth=AUTH)
    server, port = serve_grpc(second, host="127.0.0.1", port=0)
    try:
        job = plane["job"]
        clients = [ControllerClient(f"127.0.0.1:{port}", WorkerIdentity(
            job_id=job.id, attempt=1, rank=r), reconnect_s=5,
            secret=AUTH.secret_for(job.id, 1)) for r in range(NUM_RANKS)]
        for c in clients:
            c.register(host="h", pid=1)
        with ThreadPoolExecutor(max_workers=NUM_RANKS) as ranks:  # both wait at once
            first = list(ranks.map(lambda c: next(scripted.formed(c)), clients))
        # 3 s, five heartbeat timeouts, waiting on us: nobody stalled
        assert [m.step for m in first] == [0, 0]
        assert EventKind.WORKER_LOST not in plane["launcher"].kinds()
    finally:
        server.stop(grace=None)
        second.close()
        service_pool.shutdown(wait=False)


def test_a_worker_config_the_driver_cannot_use_fails_the_job_as_invalid_input(
        plane, monkeypatch, tmp_path):
    """The driver parses the config Register sends once; one it cannot use (here: a field
    missing, one it does not know) is the job's fault: exit 3, reason InvalidInput, one line
    naming the fields, reported over gRPC so the job fails without a retry."""
    import json

    import controller.worker_service as ws
    from scheduler.driver_exit import EXIT_FAILED, INVALID_INPUT
    from workers import driver

    good = ws.worker_config_json

    def broken(job):
        cfg = json.loads(good(job))
        del cfg["training"]["steps"]
        cfg["failure"]["retries"] = 9
        return json.dumps(cfg)

    monkeypatch.setattr(ws, "worker_config_json", broken)
    job = plane["job"]
    monkeypatch.setenv("RINGMASTER_WORKER_SECRET", AUTH.secret_for(job.id, 1))
    exit_file = tmp_path / "exit.json"
    code = driver.main(["--job", job.id, "--attempt", "1", "--controller", plane["address"],
                        "--exit-file", str(exit_file)])
    status = json.loads(exit_file.read_text())
    assert code == status["code"] == EXIT_FAILED and status["reason"] == INVALID_INPUT
    assert status["message"].startswith("worker config is not usable: ")
    assert "training.steps: Field required" in status["message"]
    assert "failure.retries: Extra inputs are not permitted" in status["message"]
    event = next(e for e in plane["launcher"].events if e.kind is EventKind.FAILED)
    assert event.reason == "InvalidInput" and "training.steps" in event.message
    ended = end_job(plane, event)
    assert (ended.state, ended.reason, ended.attempt) == (State.FAILED, "InvalidInput", 1)
    assert "failure.retries" in ended.message and "\n" not in ended.message
