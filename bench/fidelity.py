"""Predicted vs measured: FLOPs, ring bytes and peak activation bytes per memory scheme.

What the planner promises (scheduler/work.py, scheduler/activations.py) against what the
executor does on this machine's CPU, the same measurements tests/workers/test_fidelity.py
asserts, at a larger shape and with the errors printed:

- FLOPs: torch.utils.flop_counter.FlopCounterMode (baddbmm_/addmm_ registered);
- ring bytes: RingComm's counters (gloo ranks on loopback, ports 21150+);
- peak: workers.memtrace.step_peak_bytes (every storage of the step, attention opaque,
  host copies and parameter gradients out).

Models: a llama-shaped 4-layer model (hidden 256, 8 heads, 4 KV heads, SwiGLU 688,
vocabulary 8000) in float32 and bfloat16, whose memory profiles are recorded on the fly
with workers.memtrace (as `python -m workers.memtrace` records the presets'); the tiny
preset on rings of 2, 3 and 4 gloo ranks.

    .venv/bin/python -m bench.fidelity [--tokens 2048] [--ring-tokens 1200]
"""

from __future__ import annotations

import argparse
import os
import platform

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.flop_counter import FlopCounterMode

from parallelism import CommStats, zigzag_shard
from scheduler.activations import ActivationModel
from scheduler.specs import ModelSpec, model_preset
from scheduler.work import Scheme, group_flops, ring_bytes
from workers.memtrace import record_profile, step_peak_bytes
from workers.model import Transformer, next_token_targets

SPEC = ModelSpec(vocab_size=8000, hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=4,
                 ffn_hidden_size=688, dtype="float32")
SCHEMES = [Scheme(), Scheme(name="streambp", chunk_tokens=256),
           Scheme(name="streambp", chunk_tokens=256, offload_ratio=0.5),
           *(Scheme(name="offload", offload_ratio=r) for r in (0.0, 1e-6, 0.5, 1.0))]
PORT = 21150
ATEN = torch.ops.aten


def flop_counter() -> FlopCounterMode:
    def baddbmm(self_shape, a, b, *args, out_shape=None, **kwargs):
        return 2 * a[0] * a[1] * a[2] * b[2]

    def addmm(self_shape, a, b, *args, out_shape=None, **kwargs):
        return 2 * a[0] * a[1] * b[1]

    return FlopCounterMode(display=False, custom_mapping={ATEN.baddbmm_: baddbmm,
                                                          ATEN.addmm_: addmm})


def kwargs_of(scheme: Scheme) -> dict:
    return {"scheme": scheme.name, "offload_ratio": scheme.offload_ratio,
            "stream_chunk_size": scheme.chunk_tokens}


def name_of(scheme: Scheme) -> str:
    if scheme.name == "streambp":
        return f"streambp c={scheme.chunk_tokens}" + (
            f" r={scheme.offload_ratio:g}" if scheme.offload_ratio else "")
    return scheme.name + (f" alpha={scheme.offload_ratio:g}" if scheme.name == "offload" else "")


def batch(lengths, vocab: int):
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    ids = torch.randint(0, vocab, (int(cu[-1]),), generator=torch.Generator().manual_seed(0))
    return ids, cu


def measure(model, step) -> tuple[int, int]:
    with flop_counter() as counter:
        step()
    return counter.get_total_flops(), step_peak_bytes(model, step)


def packed_rows(tokens: int) -> list[str]:
    rows = []
    lengths = [tokens // 2 + 1, tokens // 4 - 3, tokens - tokens // 2 - tokens // 4 + 2]
    for dtype in ("float32", "bfloat16"):
        spec = SPEC.model_copy(update={"dtype": dtype})
        act = ActivationModel(spec, profile=record_profile(spec))
        torch.manual_seed(0)
        model = Transformer(spec)
        ids, cu = batch(lengths, spec.vocab_size)
        for scheme in SCHEMES:
            flops, peak = measure(model, lambda s=scheme, m=model, x=ids, c=cu:
                                  m.forward_backward(x, cu_seqlens=c, **kwargs_of(s)))
            want_f = group_flops(spec, lengths, scheme=scheme).total
            want_p = act.peak_bytes(sum(lengths), scheme)
            rows.append(f"| packed {sum(lengths)} | {dtype} | {name_of(scheme)} | "
                        f"{want_f / 1e9:.3f} | {flops / 1e9:.3f} | {want_f / flops - 1:+.2%} | "
                        f"- | - | {want_p / 2**20:.1f} | {peak / 2**20:.1f} | "
                        f"{want_p / peak - 1:+.1%} |")
    return rows


def _ring_rank(rank: int, world: int, cases, tokens: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(PORT))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    lengths = [tokens // 2 + 1, 7, tokens - tokens // 2 - 8]
    ids, cu = batch(lengths, 256)
    targets = next_token_targets(ids, cu)
    for c, (ring, dtype, scheme) in enumerate(cases):
        if rank not in ring:
            continue
        d, j = len(ring), ring.index(rank)
        local, cu_l, pos = zigzag_shard(ids, cu, d, j)
        local_t = zigzag_shard(targets, cu, d, j)[0]
        torch.manual_seed(0)
        model, stats = Transformer(model_preset("tiny").model_copy(update={"dtype": dtype})), \
            CommStats()

        def step(comm=None, m=model, x=local, cl=cu_l, p=pos, t=local_t, r=ring, s=scheme):
            return m.forward_backward(x, cu_seqlens=cl, position_ids=p, targets=t, ring=r,
                                      comm_stats=comm, **kwargs_of(s))

        with flop_counter() as counter:
            step(stats)
        peak = step_peak_bytes(model, step)
        queue.put((c, j, counter.get_total_flops(), stats.total_sent(), peak, local.numel()))
    dist.barrier()
    dist.destroy_process_group()


def ring_rows(tokens: int) -> list[str]:
    cases = [([1, 0], "float32", Scheme()), ([2, 0, 1], "bfloat16", Scheme()),
             ([3, 1, 0, 2], "float32", Scheme()),
             ([2, 0, 1], "float32", Scheme(name="offload", offload_ratio=0.5)),
             ([3, 1, 0, 2], "bfloat16", Scheme(name="offload", offload_ratio=0.0))]
    queue = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_ring_rank, args=(4, cases, tokens, queue), nprocs=4, join=True)
    lengths = [tokens // 2 + 1, 7, tokens - tokens // 2 - 8]
    rows = []
    got = []
    while not queue.empty():
        got.append(queue.get())
    for c, j, flops, sent, peak, held in sorted(got):
        ring, dtype, scheme = cases[c]
        spec = model_preset("tiny").model_copy(update={"dtype": dtype})
        want_f = group_flops(spec, lengths, ring_size=len(ring), position=j, scheme=scheme).total
        want_b = ring_bytes(spec, lengths, ring_size=len(ring), position=j, dtype=dtype).total
        want_p = ActivationModel(spec).peak_bytes(held, scheme, ring_size=len(ring))
        rows.append(f"| ring {len(ring)} pos {j}, {held} tok | {dtype} | {name_of(scheme)} | "
                    f"{want_f / 1e9:.3f} | {flops / 1e9:.3f} | {want_f / flops - 1:+.2%} | "
                    f"{want_b} | {sent} | {want_p / 2**20:.2f} | {peak / 2**20:.2f} | "
                    f"{want_p / peak - 1:+.1%} |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--ring-tokens", type=int, default=1200)
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"<!-- {platform.node()} torch {torch.__version__}, 1 thread per process -->")
    print("| batch | dtype | scheme | predicted GFLOP | measured GFLOP | error | predicted "
          "ring B | measured ring B | predicted peak MiB | measured peak MiB | error |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in packed_rows(args.tokens) + ring_rows(args.ring_tokens):
        print(row, flush=True)


if __name__ == "__main__":
    main()
