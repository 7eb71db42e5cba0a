"""What issue 21's checks cost: submit-time validation of a dataset, and storing step
reports so that none is lost across a controller restart. Side by side in one run.

    .venv/bin/python -m bench.lifecycle [--tokens 50000000] [--ranks 8] [--steps 200]

1. `controller.validation.check_dataset` on a synthetic dataset of `--tokens` uint32 tokens:
   with its manifest (max_token_id recorded at import) and without one (a memory-mapped
   scan in chunks of 16 Mi tokens); wall seconds, best of 3, and the scan's tokens/s.
2. Per step of a `--ranks`-rank job: the Redis work of the stored reports
   (`add_step_report` per rank, then `step_reports` + `complete_step`) against the old
   in-memory path (`append_step_metrics` once), as CPU ms of this process and of the
   embedded Redis server per step (psutil).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil


def write_dataset(out: Path, num_tokens: int) -> Path:
    from scheduler.dataset import DatasetWriter
    from scheduler.dataset_meta import pretrain_records

    rng = np.random.default_rng(0)
    lengths = rng.integers(512, 8192, size=num_tokens // 4000 + 1)
    lengths = lengths[np.cumsum(lengths) <= num_tokens]
    with DatasetWriter(out / "data") as w:
        for start in range(0, lengths.size, 1000):
            part = lengths[start:start + 1000]
            tokens = rng.integers(0, 32000, size=int(part.sum()), dtype=np.uint32)
            mask = np.ones(tokens.size, dtype=np.uint8)
            w.add_encoded(tokens, part, mask, pretrain_records(part))
    return out


def time_validation(data: Path) -> float:
    from controller.spec import parse_job_spec
    from controller.validation import check_dataset

    spec = parse_job_spec({"name": "b", "model": "llama-7b", "dataset": {"path": str(data)},
                           "resources": {"num_ranks": 8, "cluster": "h100"},
                           "training": {"steps": 1, "global_batch_tokens": 1 << 20}})
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        check_dataset(spec)
        best = min(best, time.perf_counter() - t0)
    return best


def bench_validation(num_tokens: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        data = write_dataset(Path(tmp), num_tokens)
        n = int(np.diff(np.frombuffer((data / "data.idx").read_bytes()[24:], "<u8")).sum())
        with_manifest = time_validation(data)
        (data / "data.json").unlink()
        scan = time_validation(data)
    print(f"validation of {n:,} tokens: manifest {with_manifest * 1e3:.1f} ms, scan "
          f"{scan * 1e3:.1f} ms ({n / scan / 1e6:,.0f} M tokens/s), "
          f"ratio {scan / with_manifest:.1f}x")


def bench_reports(ranks: int, steps: int) -> None:
    from google.protobuf import json_format

    from controller.redis_server import open_redis
    from controller.rpc import ringmaster_pb2 as pb
    from controller.spec import parse_job_spec
    from controller.step_reports import step_metrics
    from controller.store import JobStore, StepMetrics

    with tempfile.TemporaryDirectory() as tmp:
        redis = open_redis(state_dir=Path(tmp))
        server = psutil.Process(redis.server_pid) if redis.server_pid else None
        store = JobStore(redis.client)
        data = write_dataset(Path(tmp) / "d", 100_000)
        spec = parse_job_spec({"name": "b", "model": "tiny", "dataset": {"path": str(data)},
                               "resources": {"num_ranks": ranks, "cluster": "cpu"},
                               "training": {"steps": steps, "global_batch_tokens": 4096}})
        report = pb.StepReport(loss=2.0, tokens=1000, micro_batch_times_s=[0.1] * 4,
                               step_time_s=0.5, predicted_step_s=0.4, plan_groups="1x4 2x2")

        def stored(job_id: str, step: int) -> None:
            for rank in range(ranks):
                report.step = step
                store.add_step_report(job_id, attempt=1, step=step, rank=rank,
                                      report=json_format.MessageToJson(report))
            got = store.step_reports(job_id, attempt=1, step=step)
            reports = {r: json_format.Parse(t, pb.StepReport()) for r, t in got.items()}
            store.complete_step(job_id, step_metrics(step, 1, reports, None))

        def in_memory(job_id: str, step: int) -> None:
            store.append_step_metrics(job_id, StepMetrics(
                step=step, attempt=1, loss=2.0, tokens_per_s=1.0, predicted_step_s=0.4,
                measured_step_s=0.5, imbalance=0.0))

        for name, fn in (("stored reports", stored), ("in memory (before)", in_memory)):
            job, _ = store.create(spec)
            me, c0 = psutil.Process(), psutil.Process().cpu_times()
            r0 = server.cpu_times() if server else None
            for step in range(steps):
                fn(job.id, step)
            c1 = me.cpu_times()
            ctl_ms = (c1.user + c1.system - c0.user - c0.system) / steps * 1e3
            srv = ""
            if server:
                r1 = server.cpu_times()
                srv = f", redis {(r1.user + r1.system - r0.user - r0.system) / steps * 1e3:.2f} ms"
            print(f"{name}: {ranks} ranks, controller {ctl_ms:.2f} ms CPU per step{srv}")
        redis.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=50_000_000)
    p.add_argument("--ranks", type=int, default=8)
    p.add_argument("--steps", type=int, default=200)
    args = p.parse_args()
    bench_validation(args.tokens)
    bench_reports(args.ranks, args.steps)


if __name__ == "__main__":
    main()
