"""CPU of one reconcile pass with many Running jobs: the index-driven pass against a scan of
every active job (what the state machine did before issue 23), side by side in one run.

    .venv/bin/python -m bench.reconciler [--jobs 1577 3094] [--passes 40]

For each job count: N Running jobs (FakeLauncher, embedded Redis), then `passes` reconcile
passes of each kind; CPU seconds per pass of the controller process and of the Redis
server (psutil), and what that means at one pass every 0.5 s (share of one core).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import psutil


def scan_pass(machine) -> None:
    """The pre-index pass: read every active job, then admit/restart what needs it."""
    for event in machine.launcher.poll():
        machine.handle(event)
    jobs = [machine.store.get(job_id) for job_id in machine.store.active_ids()]
    _ = [j for j in jobs if j.state.value in ("Pending", "Restarting")]


def cpu_per_pass(fn, passes: int, redis_proc: psutil.Process) -> tuple[float, float]:
    me = psutil.Process()
    c0, r0 = me.cpu_times(), redis_proc.cpu_times()
    for _ in range(passes):
        fn()
    c1, r1 = me.cpu_times(), redis_proc.cpu_times()
    own = (c1.user + c1.system - c0.user - c0.system) / passes
    server = (r1.user + r1.system - r0.user - r0.system) / passes
    return own, server


def run(num_jobs: int, passes: int) -> dict:
    from controller.launchers import FakeLauncher
    from controller.machine import JobStateMachine
    from controller.redis_server import open_redis
    from controller.spec import parse_job_spec
    from controller.states import State
    from controller.store import JobStore

    tmp = Path(tempfile.mkdtemp(prefix="rm-bench-reconciler-"))
    handle = open_redis(state_dir=tmp, url="")
    try:
        store = JobStore(handle.client)
        machine = JobStateMachine(store=store, launcher=FakeLauncher(total_ranks=1 << 30))
        spec = parse_job_spec({"name": "bench", "model": "tiny", "dataset": {"path": "/d"},
                               "resources": {"num_ranks": 1},
                               "training": {"steps": 10, "global_batch_tokens": 64}})
        for _ in range(num_jobs):
            store.create(spec)
        machine.tick(), machine.tick()
        assert all(store.get(j).state is State.RUNNING for j in store.active_ids()[:50])
        redis_proc = psutil.Process(handle.server_pid)
        # An index pass costs a few Redis round trips: run many more of them so the CPU
        # clock (10 ms ticks) resolves it.
        index = cpu_per_pass(machine.tick, passes * 50, redis_proc)
        scan = cpu_per_pass(lambda: scan_pass(machine), passes, redis_proc)
    finally:
        handle.close()
    return {"jobs": num_jobs, "index": index, "scan": scan}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", type=int, nargs="+", default=[1577, 3094])
    p.add_argument("--passes", type=int, default=40)
    args = p.parse_args()
    print(f"# {time.strftime('%Y-%m-%d')} load {psutil.getloadavg()[0]:.1f} "
          f"cpus {psutil.cpu_count()}")
    print("| active Running jobs | pass | controller CPU ms/pass | Redis CPU ms/pass | "
          "core share at 2 passes/s |")
    print("|---|---|---|---|---|")
    for n in args.jobs:
        r = run(n, args.passes)
        for kind in ("scan", "index"):
            own, server = r[kind]
            share = 2 * (own + server) * 100
            print(f"| {n} | {kind} | {own * 1e3:.3f} | {server * 1e3:.3f} | {share:.2f}% |")
        ratio = sum(r["scan"]) / max(sum(r["index"]), 1e-9)
        print(f"| {n} | scan / index | | | {ratio:.0f}x |")


if __name__ == "__main__":
    main()
