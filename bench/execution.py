"""Execution-plane overhead: plan delivery per step and controller CPU per step.

The controller side is real (gRPC WorkerService, Redis store, planner in its own process);
the ranks are scripted in a separate process with the real worker client: each step they
take the next plan, "train" for --step-ms, and report. We measure, per step, how long a
rank waits for its next plan after reporting (the plan delivery overhead: zero when the
pipeline planned ahead), and the controller's CPU time (its own process plus the planner
process) per step.

    .venv/bin/python -m bench.execution --ranks 4 --steps 60 --step-ms 100
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import tempfile
import time
from pathlib import Path


def scripted_ranks(address: str, job_id: str, ranks: int, step_ms: float, out,
                   secret: str) -> None:
    import threading

    from workers.controller_client import ControllerClient, WorkerIdentity

    waits: list[float] = []

    def rank(r: int) -> None:
        c = ControllerClient(address, WorkerIdentity(job_id=job_id, attempt=1, rank=r),
                             secret=secret)
        c.register(host="bench", pid=r)
        world = next(c.plans(0)).world  # the attempt's first world (docs/elastic.md)
        stream = c.plans(0, world_epoch=world.epoch, formed=True)
        done = time.perf_counter()
        for msg in stream:
            if r == 0:
                waits.append(time.perf_counter() - done)
            if msg.stop:
                return
            time.sleep(step_ms / 1000)
            c.report_step(step=msg.step, loss=1.0, num_predictions=1, tokens=100,
                          micro_batch_times_s=[step_ms / 1000], step_time_s=step_ms / 1000,
                          world_epoch=world.epoch)
            done = time.perf_counter()

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(ranks)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out.put(waits[1:-1])  # the first plan is planned on demand; the last is the stop


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--ranks", type=int, default=4)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--step-ms", type=float, default=100.0)
    args = p.parse_args()

    from controller.planning import make_planner_pool
    from controller.redis_server import open_redis
    from controller.spec import parse_job_spec
    from controller.states import State
    from controller.store import JobStore
    from controller.worker_auth import WorkerAuth
    from controller.worker_service import WorkerService, serve_grpc
    from scheduler.synth import synthesize

    tmp = Path(tempfile.mkdtemp())
    synthesize(tmp / "data", distribution="uniform", num_samples=2000, max_length=256,
               seed=0, min_length=16)
    redis = open_redis(state_dir=tmp / "state")
    store = JobStore(redis.client)

    class Events:
        def report(self, event):
            pass

    pool = make_planner_pool()
    auth = WorkerAuth.from_token("bench")
    service = WorkerService(store=store, launcher=Events(), planner_pool=pool, auth=auth)
    server, port = serve_grpc(service, host="127.0.0.1", port=0)
    spec = parse_job_spec({
        "name": "bench", "model": "tiny", "dataset": {"path": str(tmp / "data")},
        "resources": {"num_ranks": args.ranks, "cluster": "cpu", "capacity_tokens": 64},
        "training": {"steps": args.steps, "global_batch_tokens": 1536},
        "planner": {"time_limit_s": 0.2}, "failure": {"heartbeat_timeout_s": 600}})
    job, _ = store.create(spec)
    store.transition(job.id, src=State.PENDING, dst=State.SCHEDULING, reason="Bench",
                     attempt=1)
    pool.submit(int, 0).result()  # the planner process is up before timing starts
    out = mp.get_context("spawn").Queue()
    ranks = mp.get_context("spawn").Process(
        target=scripted_ranks, args=(f"127.0.0.1:{port}", job.id, args.ranks, args.step_ms,
                                     out, auth.secret_for(job.id, 1)))
    cpu0 = time.process_time()
    child0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    ranks.start()
    waits = out.get()
    ranks.join()
    wall = time.perf_counter() - t0
    own = time.process_time() - cpu0
    pool.shutdown(wait=True)
    child = resource.getrusage(resource.RUSAGE_CHILDREN)
    # Children: the planner process and the scripted ranks' process together.
    children = (child.ru_utime + child.ru_stime) - (child0.ru_utime + child0.ru_stime)
    server.stop(grace=None)
    service.close()
    redis.close()
    waits.sort()
    print(f"ranks={args.ranks} steps={args.steps} step={args.step_ms:.0f} ms wall={wall:.1f} s")
    print(f"plan wait after report: p50 {1000 * waits[len(waits) // 2]:.1f} ms, "
          f"p90 {1000 * waits[int(len(waits) * 0.9)]:.1f} ms, max {1000 * waits[-1]:.1f} ms")
    print(f"controller CPU per step: {1000 * own / args.steps:.1f} ms (service process); "
          f"children (planner + scripted ranks) {1000 * children / args.steps:.1f} ms")


if __name__ == "__main__":
    main()
