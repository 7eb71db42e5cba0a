"""Benchmark zigzag ring attention (parallelism/ring_attention.py).

CPU (always): forward+backward time of a ring of 2 (two gloo processes, each holding its
zigzag half) against one process running the same total tokens as a ring of one, plus the
bytes each rank moved per channel (CommStats). Each process uses one intra-op thread, so
the two-process ring has twice the cores; the ideal ring-of-2 time is half the single time.

GPU (when CUDA is available): single-device efficiency of the ring's per-step kernel calls
(kernels.attention_with_lse + backward) at the shapes one member sees on a ring of d: the
diagonal (causal, T_local x T_local) and off-diagonal (T_local x T_local/2, no mask)
blocks, in TFLOP/s, next to one full causal call on the whole sequence.

    .venv/bin/python -m bench.ring_attention [--tokens 4096] [--reps 3] [--gpu-only]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from parallelism import CommStats, ring_attention, zigzag_shard
from parallelism.worlds import run_distributed

HQ, HKV, HEAD_DIM = 8, 2, 64


def _batch(lengths: list[int], dtype: torch.dtype, device: str = "cpu"):
    gen = torch.Generator().manual_seed(0)
    total = sum(lengths)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    q, k, v = (torch.randn(total, h, HEAD_DIM, generator=gen, dtype=dtype)
               for h in (HQ, HKV, HKV))
    dout = torch.randn(total, HQ, HEAD_DIM, generator=gen, dtype=dtype)
    return cu, q.to(device), k.to(device), v.to(device), dout.to(device)


def _rank_body(rank: int, world_size: int, lengths: list[int], reps: int) -> dict:
    """Time forward+backward of this rank's shard on a ring of all ranks."""
    import torch.distributed as dist

    cu, q, k, v, dout = _batch(lengths, torch.float32)
    ring = list(range(world_size))
    shard = [zigzag_shard(x, cu, world_size, rank)[0] for x in (q, k, v, dout)]
    cu_local = zigzag_shard(q, cu, world_size, rank)[1]
    times, cpu_times, stats = [], [], CommStats()
    for rep in range(reps + 1):  # the first run warms up and is not timed
        ql, kl, vl = (x.clone().requires_grad_(True) for x in shard[:3])
        stats_rep = CommStats()
        dist.barrier()
        start, cpu_start = time.perf_counter(), time.process_time()
        out = ring_attention(ql, kl, vl, cu_seqlens=cu_local, ring=ring, comm_stats=stats_rep)
        torch.autograd.grad(out, (ql, kl, vl), shard[3])
        if rep:
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
            stats = stats_rep
    return {"median_s": statistics.median(times), "cpu_s": statistics.median(cpu_times),
            "bytes_sent": stats.bytes_sent, "tokens": int(cu_local[-1])}


def cpu_bench(lengths: list[int], reps: int) -> None:
    print(f"# CPU: lengths {lengths}, Hq={HQ}, Hkv={HKV}, D={HEAD_DIM}, float32, causal, "
          f"fwd+bwd, median of {reps}; load average {os.getloadavg()[0]:.1f} on "
          f"{os.cpu_count()} cores")
    single = run_distributed(_rank_body, 1, lengths, reps, timeout_s=900)[0]
    ring2 = run_distributed(_rank_body, 2, lengths, reps, timeout_s=900)
    slowest = max(r["median_s"] for r in ring2)
    print(f"one process, ring of 1 : wall {single['median_s']*1e3:8.1f} ms, CPU "
          f"{single['cpu_s']*1e3:8.1f} ms ({single['tokens']} tokens, 0 bytes sent)")
    for rank, r in enumerate(ring2):
        mib = {c: f"{b / 2**20:.2f} MiB" if b >= 2**16 else f"{b} B"
               for c, b in sorted(r["bytes_sent"].items())}
        print(f"ring of 2, rank {rank}     : wall {r['median_s']*1e3:8.1f} ms, CPU "
              f"{r['cpu_s']*1e3:8.1f} ms ({r['tokens']} tokens) sent {mib}")
    slowest_cpu = max(r["cpu_s"] for r in ring2)
    print(f"speed-up single / slowest member: wall {single['median_s'] / slowest:.2f}x, "
          f"CPU {single['cpu_s'] / slowest_cpu:.2f}x (ideal 2.00x)")


def _member_compute_s(cu, shards, ring_size: int, position: int, reps: int) -> float:
    """One process, no communication: the kernel calls ring position `position` makes."""
    from kernels import attention_with_lse, attention_with_lse_backward
    from parallelism.ring_attention import ring_block, select_rows
    from parallelism.zigzag import ZigzagLayout

    layout = ZigzagLayout.from_cu_seqlens(cu, ring_size)
    q, k, v, dout = (s[position] for s in shards)
    owners = [(position - s) % ring_size for s in range(ring_size)]
    blocks = [(b, r) for r in owners
              if (b := ring_block(layout, position, r, True, q.device)) is not None]

    def run():
        for b, r in blocks:
            qb = select_rows(q, b.q_rows)
            kb, vb = select_rows(shards[1][r], b.kv_rows), select_rows(shards[2][r], b.kv_rows)
            kw = dict(cu_seqlens_q=b.cu_q, cu_seqlens_k=b.cu_k, causal=b.causal)
            out, lse = attention_with_lse(qb, kb, vb, **kw)
            attention_with_lse_backward(select_rows(dout, b.q_rows), qb, kb, vb, out, lse, **kw)

    run()
    times = []
    for _ in range(reps):  # CPU time: the dev box is shared, wall time is mostly waiting
        start = time.process_time()
        run()
        times.append(time.process_time() - start)
    return statistics.median(times)


def compute_share(lengths: list[int], reps: int) -> None:
    torch.set_num_threads(1)
    cu, q, k, v, dout = _batch(lengths, torch.float32)
    print("# per-member compute only (one process, 1 thread, no communication, CPU time)")
    for d in (1, 2):
        shards = [[zigzag_shard(x, cu, d, j)[0] for j in range(d)] for x in (q, k, v, dout)]
        per = [_member_compute_s(cu, shards, d, j, reps) for j in range(d)]
        print(f"ring of {d}: " + ", ".join(f"position {j} {t*1e3:.1f} ms"
                                           for j, t in enumerate(per)))


def _timed_cuda(fn, reps: int) -> float:
    fn()
    torch.cuda.synchronize()
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / reps


def gpu_bench(total: int, ring_size: int, reps: int) -> None:
    from kernels import attention_with_lse, attention_with_lse_backward

    local = total // ring_size
    print(f"# GPU: {torch.cuda.get_device_name()}, bf16, Hq={HQ}, Hkv={HKV}, D={HEAD_DIM}, "
          f"one sequence of {total} on a ring of {ring_size} (T_local={local})")
    cases = {  # name: (q rows, k rows, causal, attention-matrix fraction computed)
        "full causal (1 device)": (total, total, True, 0.5),
        "ring diagonal (causal)": (local, local, True, 0.5),
        "ring off-diagonal": (local, local // 2, False, 1.0),
    }
    for name, (tq, tk, causal, frac) in cases.items():
        cu_q = torch.tensor([0, tq], dtype=torch.int32, device="cuda")
        cu_k = torch.tensor([0, tk], dtype=torch.int32, device="cuda")
        q = torch.randn(tq, HQ, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(tk, HKV, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
                for _ in range(2))
        kw = dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, causal=causal)
        out, lse = attention_with_lse(q, k, v, **kw)
        dout = torch.randn_like(out)
        fwd = _timed_cuda(lambda q=q, k=k, v=v, kw=kw: attention_with_lse(q, k, v, **kw), reps)
        bwd = _timed_cuda(lambda q=q, k=k, v=v, o=out, l=lse, do=dout, kw=kw:
                          attention_with_lse_backward(do, q, k, v, o, l, **kw), reps)
        flops = 4 * tq * tk * HQ * HEAD_DIM * frac  # two matmuls of 2*m*n*k
        print(f"{name:24s}: fwd {fwd*1e3:8.3f} ms {flops / fwd / 1e12:6.1f} TFLOP/s | "
              f"bwd {bwd*1e3:8.3f} ms {2.5 * flops / bwd / 1e12:6.1f} TFLOP/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096, help="total tokens (CPU run)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--gpu-tokens", type=int, default=65536)
    parser.add_argument("--gpu-ring", type=int, default=8)
    parser.add_argument("--gpu-only", action="store_true")
    args = parser.parse_args()
    if not args.gpu_only:
        lengths = [args.tokens - args.tokens // 4 - 3, args.tokens // 4, 3]
        cpu_bench(lengths, args.reps)
        compute_share(lengths, args.reps)
    if torch.cuda.is_available():
        gpu_bench(args.gpu_tokens, args.gpu_ring, max(args.reps, 10))
    else:
        print("# GPU: pending (no CUDA device in this session)")


if __name__ == "__main__":
    main()
