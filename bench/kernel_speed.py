"""Benchmarks of kernels/: attention with LSE and fused linear cross-entropy.

CPU (no CUDA): the torch backend against the materialized reference and torch SDPA at
small sizes (float32, causal, Hq=8, Hkv=2, D=64), and linear CE time and peak RSS against
the naive full-logits version.

CUDA: forward+backward TFLOP/s of the Triton kernel against SDPA's flash backend, causal
bf16, Hq=32, Hkv=8, D=128, one sequence of 4K/16K/32K/64K tokens (SDPA gets k/v already
expanded to 32 heads, outside the timing); linear CE time and peak memory against the
naive version at V=128K, H=4096 for T=16K and 32K tokens. FLOPs: forward
4 * pairs * Hq * D with pairs = T(T+1)/2 causal, backward 2.5x that (FlashAttention-2
counting).

    .venv/bin/python -m bench.kernel_speed                  # whatever device is present
    .venv/bin/python -m bench.kernel_speed --json out.json  # also write the rows as JSON
    .venv/bin/python -m bench.kernel_speed --threads 2      # CPU: more intra-op threads
Correctness is not checked here: bench/gpu_check.sh runs tests/kernels/test_gpu.py first.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import kernels


def _timed(fn, *, warmup: int, iters: int) -> float:
    """Median wall seconds of ``fn()`` (CUDA-synchronized when on GPU)."""
    return statistics.median(_samples(fn, warmup=warmup, iters=iters)[0])


def _samples(fn, *, warmup: int, iters: int) -> tuple[list[float], list[float]]:
    """Wall and process-CPU seconds per call. On a shared CPU box the wall time includes
    waiting for cores; CPU seconds (all threads) are the steadier figure there."""
    cuda = torch.cuda.is_available()
    for _ in range(warmup):
        fn()
    wall, cpu = [], []
    for _ in range(iters):
        if cuda:
            torch.cuda.synchronize()
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        if cuda:
            torch.cuda.synchronize()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return wall, cpu


def _causal_fwd_flops(tokens: int, heads: int, head_dim: int) -> float:
    return 4.0 * tokens * (tokens + 1) / 2 * heads * head_dim


def _attention_inputs(tokens, hq, hkv, d, dtype, device):
    gen = torch.Generator(device=device).manual_seed(0)

    def rand(h):
        return torch.randn(tokens, h, d, generator=gen, device=device, dtype=dtype)

    q, k, v, dout = rand(hq), rand(hkv), rand(hkv), rand(hq)
    cu = torch.tensor([0, tokens], dtype=torch.int32, device=device)
    return q, k, v, dout, cu


def _fwd_bwd(forward, leaves, dout):
    def run():
        out = forward(*leaves)
        torch.autograd.grad(out, leaves, dout)
    return run


def _ours(cu, backend):
    def forward(q, k, v):
        return kernels.attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, causal=True,
                                 backend=backend)
    return forward


def _reference(cu):
    def forward(q, k, v):
        return kernels.attention_reference(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu,
                                           causal=True)[0]
    return forward


def _sdpa(group, flash_only):
    def forward(q, k, v):  # [T, H, D] -> SDPA's [1, H, T, D]
        qs, ks, vs = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
        if group > 1:
            ks, vs = ks.repeat_interleave(group, 1), vs.repeat_interleave(group, 1)
        if flash_only:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                out = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True)
        else:
            out = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True)
        return out[0].transpose(0, 1)
    return forward


def attention_cpu(rows: list[dict]) -> None:
    for tokens in (512, 1024, 2048):
        q, k, v, dout, cu = _attention_inputs(tokens, 8, 2, 64, torch.float32, "cpu")
        leaves = [t.requires_grad_() for t in (q, k, v)]
        flops = 3.5 * _causal_fwd_flops(tokens, 8, 64)
        impls = (("torch backend", _ours(cu, "torch")), ("naive reference", _reference(cu)),
                 ("torch SDPA", _sdpa(4, False)))
        for name, fwd in impls:
            wall, cpu = _samples(_fwd_bwd(fwd, leaves, dout), warmup=1, iters=3)
            seconds, cpu_seconds = statistics.median(wall), statistics.median(cpu)
            rows.append(dict(bench="attention fwd+bwd", device="cpu", impl=name, tokens=tokens,
                             wall_ms=round(seconds * 1e3, 1), cpu_ms=round(cpu_seconds * 1e3, 1),
                             gflop_per_cpu_s=round(flops / cpu_seconds / 1e9, 2)))


def attention_cuda(rows: list[dict], seqlens: list[int]) -> None:
    hq, hkv, d = 32, 8, 128
    for tokens in seqlens:
        q, k, v, dout, cu = _attention_inputs(tokens, hq, hkv, d, torch.bfloat16, "cuda")
        leaves = [t.requires_grad_() for t in (q, k, v)]
        fwd_flops = _causal_fwd_flops(tokens, hq, d)
        iters = 10 if tokens <= 16384 else 4
        impls = (("triton", _ours(cu, "triton")), ("SDPA flash", _sdpa(hq // hkv, True)))
        for name, fwd in impls:
            with torch.no_grad():
                t_fwd = _timed(lambda f=fwd, x=leaves: f(*x), warmup=2, iters=iters)
            t_all = _timed(_fwd_bwd(fwd, leaves, dout), warmup=2, iters=iters)
            rows.append(dict(
                bench="attention causal bf16 Hq=32 Hkv=8 D=128", device="cuda", impl=name,
                tokens=tokens, fwd_ms=round(t_fwd * 1e3, 2), fwd_bwd_ms=round(t_all * 1e3, 2),
                fwd_tflops=round(fwd_flops / t_fwd / 1e12, 1),
                fwd_bwd_tflops=round(3.5 * fwd_flops / t_all / 1e12, 1),
            ))


def _ce_inputs(tokens, vocab, hidden, dtype, device):
    gen = torch.Generator(device=device).manual_seed(0)
    h = torch.randn(tokens, hidden, generator=gen, device=device, dtype=dtype)
    w = torch.randn(vocab, hidden, generator=gen, device=device, dtype=dtype) / hidden**0.5
    t = torch.randint(0, vocab, (tokens,), generator=gen, device=device)
    return h.requires_grad_(), w.requires_grad_(), t


def _ce_step(mode, h, w, t):
    fn = kernels.linear_cross_entropy if mode == "fused" else kernels.linear_cross_entropy_reference

    def run():
        loss, _ = fn(h, w, t)
        torch.autograd.grad(loss, [h, w])
    return run


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def ce_child(mode: str, tokens: int, vocab: int, hidden: int) -> None:
    """One process per measurement: peak RSS growth over one fwd+bwd, on CPU (Linux).

    The peak (VmHWM, what ru_maxrss reports) is reset once the inputs exist, so library
    pages evicted after import cannot distort the difference."""
    h, w, t = _ce_inputs(tokens, vocab, hidden, torch.float32, "cpu")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base_kib = _status_kib("VmRSS")
    wall, cpu = _samples(_ce_step(mode, h, w, t), warmup=0, iters=1)
    extra_mib = (_status_kib("VmHWM") - base_kib) / 1024
    print(json.dumps({"seconds": wall[0], "cpu_seconds": cpu[0], "extra_mib": extra_mib}))


def linear_ce_cpu(rows: list[dict]) -> None:
    tokens, vocab, hidden = 16384, 32768, 256
    for mode in ("naive", "fused"):
        proc = subprocess.run(
            [sys.executable, "-m", "bench.kernel_speed", "--threads", str(torch.get_num_threads()),
             "--ce-child", mode, str(tokens), str(vocab), str(hidden)],
            capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parents[1],
        )
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append(dict(bench=f"linear CE fwd+bwd f32 T={tokens} V={vocab} H={hidden}",
                         device="cpu", impl=mode, wall_ms=round(res["seconds"] * 1e3),
                         cpu_ms=round(res["cpu_seconds"] * 1e3),
                         extra_mib=round(res["extra_mib"])))


def linear_ce_cuda(rows: list[dict], tokens: int) -> None:
    vocab, hidden = 131072, 4096
    for mode in ("naive", "fused"):
        h, w, t = _ce_inputs(tokens, vocab, hidden, torch.bfloat16, "cuda")
        step = _ce_step(mode, h, w, t)
        step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - base
        seconds = _timed(step, warmup=1, iters=5)
        rows.append(dict(bench=f"linear CE fwd+bwd bf16 T={tokens} V={vocab} H={hidden}",
                         device="cuda", impl=mode, ms=round(seconds * 1e3, 1),
                         extra_mib=round(extra / 2**20)))
        del h, w, t, step
        torch.cuda.empty_cache()


def _print_targets(rows: list[dict]) -> None:
    """The issue's targets, from the CUDA rows: attention fwd+bwd >= 1.0x SDPA flash at
    32K tokens; linear CE memory <= 1/8 of naive with time <= 1.2x."""
    by = {(r["bench"], r["impl"], r.get("tokens")): r for r in rows}
    for (bench, impl, tokens), row in by.items():
        if impl == "triton":
            sdpa = by[(bench, "SDPA flash", tokens)]
            ratio = row["fwd_bwd_tflops"] / sdpa["fwd_bwd_tflops"]
            goal = " (target >= 1.0)" if tokens == 32768 else ""
            print(f"attention {tokens}: triton/SDPA fwd+bwd TFLOP/s = {ratio:.2f}{goal}")
        if impl == "fused":
            naive = by[(bench, "naive", tokens)]
            print(f"{bench}: memory {row['extra_mib'] / max(naive['extra_mib'], 1):.3f}x "
                  f"(target <= 0.125), time {row['ms'] / naive['ms']:.2f}x (target <= 1.2)")


def _print_table(rows: list[dict]) -> None:
    keys = list(dict.fromkeys(k for row in rows for k in row))
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for row in rows:
        print("| " + " | ".join(str(row.get(k, "")) for k in keys) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="also write the rows to this file")
    parser.add_argument("--seqlens", default="4096,16384,32768,65536",
                        help="CUDA attention sequence lengths, comma-separated")
    parser.add_argument("--ce-tokens", default="16384,32768",
                        help="CUDA linear-CE token counts, comma-separated")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU intra-op threads (1: steady figures on a shared box)")
    parser.add_argument("--ce-child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.ce_child:
        mode, *sizes = args.ce_child
        ce_child(mode, *(int(s) for s in sizes))
        return
    rows: list[dict] = []
    if torch.cuda.is_available():
        print(f"device: {torch.cuda.get_device_name()}", flush=True)
        attention_cuda(rows, [int(s) for s in args.seqlens.split(",")])
        for tokens in args.ce_tokens.split(","):
            linear_ce_cuda(rows, int(tokens))
        _print_table(rows)
        _print_targets(rows)
    else:
        print(f"device: cpu ({torch.get_num_threads()} threads)", flush=True)
        attention_cpu(rows)
        linear_ce_cpu(rows)
        _print_table(rows)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
