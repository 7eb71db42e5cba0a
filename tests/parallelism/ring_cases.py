"""Per-rank bodies of the distributed ring-attention tests (spawned by parallelism/worlds.py).

A case is a plain dict: rings (disjoint lists of global ranks, ring order), per-ring
sequence lengths, heads, head dim, causal, seed. Every rank rebuilds the same float64
global batch from the seed, runs ring_attention on its zigzag shard (or sits the case out
if it is in no ring), back-propagates a fixed random upstream gradient, and returns its
shards; the parent unshards and compares with an independent full-attention reference.
"""

from __future__ import annotations

import time

import torch

D_MODEL = 12


def batch(case: dict, group_index: int) -> dict:
    """The float64 global batch of one ring of a case (same on every process)."""
    gen = torch.Generator().manual_seed(case["seed"] * 1000 + group_index)
    lengths = case["lengths"][group_index]
    total, hq, hkv, d = sum(lengths), case["hq"], case["hkv"], case["d"]
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    return {
        "cu": torch.tensor(cu, dtype=torch.int32),
        "q": rand(total, hq, d), "k": rand(total, hkv, d), "v": rand(total, hkv, d),
        "dout": rand(total, hq, d),
        # for the "inside a larger graph" case: x -> projections -> position rotation
        "x": rand(total, D_MODEL), "wq": rand(D_MODEL, hq * d), "wk": rand(D_MODEL, hkv * d),
        "wv": rand(D_MODEL, hkv * d),
    }


def position_mix(t: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """A RoPE-like position-dependent map, so the test sees wrong position ids."""
    angle = (pos.to(t.dtype) * 0.01)[:, None, None]
    return t * torch.cos(angle) + t.roll(1, dims=-1) * torch.sin(angle)


def _run_case(rank: int, case: dict) -> dict | None:
    from parallelism import CommStats, ring_attention, zigzag_shard

    mine = [g for g, ring in enumerate(case["rings"]) if rank in ring]
    if not mine:
        return None
    g = mine[0]
    ring = case["rings"][g]
    b = batch(case, g)
    d, j = len(ring), ring.index(rank)
    shard = {name: zigzag_shard(b[name], b["cu"], d, j)[0] for name in ("q", "k", "v", "dout", "x")}
    _, cu_local, pos_local = zigzag_shard(b["q"], b["cu"], d, j)
    stats = CommStats()
    dtype = getattr(torch, case.get("dtype", "float64"))
    shard = {n: t.to(dtype) for n, t in shard.items()}
    if case.get("graph"):
        params = {n: b[n].clone().requires_grad_(True) for n in ("wq", "wk", "wv")}
        x = shard["x"]
        q = position_mix((x @ params["wq"]).view(len(x), case["hq"], case["d"]), pos_local)
        k = position_mix((x @ params["wk"]).view(len(x), case["hkv"], case["d"]), pos_local)
        v = (x @ params["wv"]).view(len(x), case["hkv"], case["d"])
        leaves = tuple(params.values())
    else:
        q, k, v = (shard[n].clone().requires_grad_(True) for n in ("q", "k", "v"))
        leaves = (q, k, v)
    if case.get("reuse_setup"):
        out, grads, fwd_bytes = _two_layers_one_setup(q, k, v, cu_local, ring, case, stats,
                                                      shard["dout"])
    else:
        out = ring_attention(q, k, v, cu_seqlens=cu_local, ring=ring, causal=case["causal"],
                             comm_stats=stats, backend=case.get("backend", "auto"))
        fwd_bytes = dict(stats.bytes_sent)
        grads = torch.autograd.grad(out, leaves, shard["dout"])
    grads = tuple(t.double() for t in grads)
    return {"group": g, "position": j, "out": out.detach().double(), "grads": grads,
            "fwd_bytes": fwd_bytes, "bytes": dict(stats.bytes_sent)}


def _two_layers_one_setup(q, k, v, cu_local, ring, case, stats, dout):
    """Explicit forward/backward twice (two 'layers') on one handshake; returns layer 2's."""
    from parallelism import ring_attention_backward, ring_attention_forward, ring_attention_setup

    setup = ring_attention_setup(q, k, cu_seqlens=cu_local, ring=ring, causal=case["causal"],
                                 comm_stats=stats)
    runs = []
    for _ in range(2):
        out, lse = ring_attention_forward(q.detach(), k.detach(), v.detach(), setup)
        runs.append((out, ring_attention_backward(dout, q.detach(), k.detach(), v.detach(),
                                                  out, lse, setup)))
    assert torch.equal(runs[0][0], runs[1][0])
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1], strict=True))
    fwd_bytes = {"kv": stats.bytes_sent.get("kv", 0) // 2,
                 "handshake": stats.bytes_sent.get("handshake", 0)}
    return runs[1][0], runs[1][1], fwd_bytes


def run_cases(rank: int, world_size: int, cases: list[dict]) -> list[dict | None]:
    return [_run_case(rank, case) for case in cases]


def _protocol(rank: int) -> dict:
    from parallelism import CommProtocolError, CommStats, RingComm

    ring = [2, 0, 1]  # not sorted: next/prev follow the list, not rank order
    stats = CommStats()
    comm = RingComm(ring, channel="t", stats=stats)
    seen = {}

    def expect(name, fn):
        try:
            fn()
            seen[name] = "no error"
        except CommProtocolError as exc:
            seen[name] = str(exc)

    mine = torch.full((3, 5), float(rank), dtype=torch.float32)
    got = comm.send_recv(mine)
    expect("send_to_stranger", lambda: comm.send(mine, to=rank))
    expect("non_contiguous", lambda: comm.send(mine.t(), to=comm.next_rank))
    comm.commit()
    expect("send_in_flight", lambda: comm.send(mine, to=comm.next_rank))
    expect("commit_twice", comm.commit)
    expect("close_in_flight", comm.close)
    comm.wait()
    expect("wait_twice", comm.wait)
    comm.close()
    return {"got": float(got[0, 0]), "prev": comm.prev_rank, "next": comm.next_rank,
            "errors": seen, "sent": stats.bytes_sent, "received": stats.bytes_received}


def run_misuse_world(rank: int, world_size: int) -> dict:
    """World of 3: the RingComm protocol checks, then ring attention misuse (timeouts last)."""
    return {"protocol": _protocol(rank), "ring": run_error_cases(rank, world_size)}


def run_error_cases(rank: int, world_size: int) -> dict:
    """Misuse on a world of 3: each entry is (error type, message, seconds to fail)."""
    from parallelism import RingCommError, ring_attention, zigzag_shard

    b = batch({"seed": 3, "lengths": [[7, 4]], "hq": 2, "hkv": 1, "d": 4}, 0)
    results = {}

    def attempt(name, ring, position, size):
        q, cu, _ = zigzag_shard(b["q"], b["cu"], size, position)
        k, v = (zigzag_shard(b[n], b["cu"], size, position)[0] for n in ("k", "v"))
        start = time.monotonic()
        try:
            ring_attention(q, k, v, cu_seqlens=cu, ring=ring)
            results[name] = ("ok", "", time.monotonic() - start)
        except (ValueError, RingCommError) as exc:
            results[name] = (type(exc).__name__, str(exc), time.monotonic() - start)

    # 1. rank 1 names a ring it is not in; ranks 0 and 2 run that ring correctly.
    attempt("not_member", [0, 2], {0: 0, 1: 0, 2: 1}[rank], 2)
    # 2. members disagree on the ring order.
    ring = {0: [0, 1, 2], 1: [1, 0, 2], 2: [0, 1, 2]}[rank]
    attempt("order_mismatch", ring, ring.index(rank), 3)
    # 3. rank 2 passes position 0's shard: the members' lengths are no zigzag of one batch.
    attempt("shard_mismatch", [0, 1, 2], rank if rank < 2 else 0, 3)
    # 4. last: rank 2 never joins; 0 and 1 must fail at the process-group timeout.
    if rank < 2:
        attempt("absent_member", [0, 1, 2], rank, 3)
    return results
