"""Recovery from a lost rank: re-plan on the survivors vs restart from the checkpoint.

The same job (tiny model, 4 CPU ranks, fp32, the distributed optimizer with shard
mirrors, checkpoints every --checkpoint-interval steps) runs twice side by side under one
real controller (Ray launcher, gRPC, Redis): `failure.mode: replan` and `failure.mode:
restart`. Once both have completed --kill-after steps, the bench SIGKILLs rank 1's process
of each (an external kill, as a node loss would be) and measures, per job:

    next step     seconds from the SIGKILL to the next step completed on every rank
    caught up     seconds until the step that was in flight at the kill is completed
                  (a restart first re-runs the steps since its checkpoint)
    shrink bytes  optimizer-state bytes the survivors received forming the smaller world
                  (own shards and mirrors resharded for N-1), and parameter bytes
                  republished
    rejoin bytes  the same for the world the replacement joins (it receives its shard,
                  its mirror and every parameter)

    .venv/bin/python -m bench.recovery --ranks 4 --steps 24 --kill-after 6

Absolute times here are CPU-box times (Ray actor start-up dominates a restart); the
ratio is what the figures in docs/benchmarks.md compare.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import tempfile
import time
from pathlib import Path

FORMED = re.compile(r"rank (\d+): formed world (\d+) of (\d+) ranks at step (\d+) .*received "
                    r"(\d+) state bytes, sent (\d+), published (\d+) parameter bytes")


def start_controller(state: Path, stack: contextlib.ExitStack):
    """A real controller (Ray launcher, gRPC, embedded Redis) serving REST on a thread;
    (controller, client). `stack` stops the REST server and the controller."""
    import ray

    from controller.client import RingmasterClient
    from controller.server import Controller, ControllerConfig
    from controller.testing import free_port, serving

    ray.init(include_dashboard=False, num_cpus=16, object_store_memory=100_000_000,
             log_to_driver=False)
    stack.callback(ray.shutdown)
    ctl = Controller(ControllerConfig(
        state_dir=state, launcher="ray", port=0, grpc_port=0, token="bench",
        reconcile_interval_s=0.2,
        launcher_options={"ray_address": ray.get_runtime_context().gcs_address,
                          "extra_env": {"OTEL_TRACES_EXPORTER": "none"},
                          "drain_timeout_s": 30, "total_ranks": 16}))
    stack.callback(ctl.close)
    url = stack.enter_context(serving(ctl, free_port()))
    ctl.start()
    client = RingmasterClient(url, token="bench")
    stack.callback(client.close)
    return ctl, client


def job_spec(mode: str, data: Path, ckpt: Path, args) -> dict:
    failure = {"mode": mode, "heartbeat_timeout_s": 30.0, "max_restarts": 2}
    return {"name": f"bench-{mode}", "model": "tiny", "dataset": {"path": str(data)},
            "resources": {"num_ranks": args.ranks, "cluster": "cpu", "capacity_tokens": 256},
            "training": {"steps": args.steps, "global_batch_tokens": 1600, "seed": 7,
                         "learning_rate": 3e-3, "checkpoint_dir": str(ckpt),
                         "checkpoint_interval": args.checkpoint_interval,
                         "precision": "fp32"},
            "planner": {"time_limit_s": 0.2}, "failure": failure}


def rank_pid(client, job_id: str, rank: int) -> int:
    pattern = re.compile(rf"rank {rank} registered from \S+ pid (\d+) \(attempt 1")
    for line in client.logs(job_id, tail=500).lines:
        m = pattern.search(line.text)
        if m:
            return int(m.group(1))
    raise RuntimeError(f"no registration of rank {rank} in job {job_id}'s log")


def completed(client, job_id: str) -> list:
    return sorted(client.metrics(job_id).steps, key=lambda m: m.at)


def measure(client, job_id: str, killed_at: float, in_flight: int) -> dict:
    after = [m for m in completed(client, job_id) if m.at.timestamp() > killed_at]
    caught = next(m for m in after if m.step >= in_flight)
    worlds: dict[int, list[tuple]] = {}
    for line in client.logs(job_id, tail=1000).lines:
        m = FORMED.search(line.text)
        if m:
            rank, epoch, size, step, got, sent, params = map(int, m.groups())
            worlds.setdefault(epoch, []).append((size, got, params))
    sizes = {e: rows[0][0] for e, rows in worlds.items()}
    shrink = [e for e, n in sizes.items() if n < max(sizes.values())]
    rejoin = [e for e in sizes if shrink and e > max(shrink)]

    def moved(epochs):
        rows = [r for e in epochs[:1] for r in worlds[e]]
        return sum(r[1] for r in rows), sum(r[2] for r in rows) // max(1, len(rows))

    return {"next_step_s": after[0].at.timestamp() - killed_at,
            "caught_up_s": caught.at.timestamp() - killed_at,
            "shrink": moved(shrink), "rejoin": moved(rejoin)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", type=int, default=4)
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--kill-after", type=int, default=6, help="steps completed before the kill")
    p.add_argument("--checkpoint-interval", type=int, default=4)
    args = p.parse_args()

    from scheduler.synth import synthesize

    tmp = Path(tempfile.mkdtemp(prefix="bench-recovery-"))
    synthesize(tmp / "data", distribution="uniform", num_samples=400, max_length=600, seed=4)
    with contextlib.ExitStack() as stack:
        ctl, client = start_controller(tmp / "state", stack)
        jobs = {mode: client.submit(job_spec(mode, tmp / "data", tmp / mode, args))
                for mode in ("replan", "restart")}
        stack.callback(_stop_unfinished, client, jobs)
        while min(client.get(j.id).current_step for j in jobs.values()) < args.kill_after:
            time.sleep(0.2)
        killed = {}
        for mode, j in jobs.items():
            in_flight = client.get(j.id).current_step + 1
            os.kill(rank_pid(client, j.id, 1), signal.SIGKILL)
            killed[mode] = (time.time(), in_flight)
            print(f"{mode}: SIGKILL at {time.strftime('%H:%M:%S')} in step {in_flight}")
        done = {mode: client.wait(j.id, timeout_s=900, poll_s=0.5) for mode, j in jobs.items()}
        print(f"ranks={args.ranks} steps={args.steps} kill after step {args.kill_after} "
              f"checkpoint every {args.checkpoint_interval}")
        for mode, j in jobs.items():
            r = measure(client, j.id, *killed[mode])
            print(f"{mode:8s} {done[mode].result} attempt {done[mode].attempt}: next step "
                  f"{r['next_step_s']:.2f} s, caught up {r['caught_up_s']:.2f} s; shrink "
                  f"received {r['shrink'][0]} state B, {r['shrink'][1]} param B/rank; rejoin "
                  f"received {r['rejoin'][0]} state B, {r['rejoin'][1]} param B/rank")
            for e in client.events(j.id).events:
                print(f"    {e.at:%H:%M:%S.%f} {e.kind} {e.ranks} step {e.step} -> "
                      f"{e.world_size} ranks: {e.reason}")
            if os.environ.get("BENCH_LOGS"):
                for line in client.logs(j.id, tail=300).lines:
                    print("   ", f"{line.at:%H:%M:%S.%f}", line.text[:200])


def _stop_unfinished(client, jobs: dict) -> None:
    """Stop what still runs (the bench failed half way): no driver outlives it."""
    for j in jobs.values():
        if client.get(j.id).result is None:
            client.stop(j.id)


if __name__ == "__main__":
    main()
