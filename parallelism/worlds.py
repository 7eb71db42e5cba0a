"""Spawn a gloo world on this machine: `run_distributed(fn, world_size, *args)`.

The one supported way for tests and bench/ scripts to run a function on several CPU ranks.
Why it exists: a distributed run must never hang its caller and must say which rank failed
and where. Every launch gets a fresh rendezvous (a TCPStore owned by the parent on a port
the OS picked, so there is no free-port race), a process-group timeout so a lost peer
turns into an error inside the rank, and a wall-clock limit after which the parent kills
the ranks. Ranks are spawned (not forked), so `fn` must be a module-level function and
its arguments and result must pickle. Each rank runs with one intra-op thread: the dev
box has two cores shared by many ranks.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import pickle
import queue
import time
import traceback
from collections.abc import Callable
from typing import Any

__all__ = ["DistributedRunError", "run_distributed"]

_HOST = "127.0.0.1"
_GRACE_AFTER_FAILURE_S = 5.0  # let the other ranks report their own error before killing


class DistributedRunError(RuntimeError):
    """One or more ranks raised, or the launch ran past its wall-clock limit."""


def _rank_main(
    rank: int,
    world_size: int,
    port: int,
    timeouts: tuple[float, float],
    fn: Callable[..., Any],
    args: tuple,
    kwargs: dict,
    results: Any,
) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    start_timeout_s, pg_timeout_s = timeouts
    try:
        store = dist.TCPStore(_HOST, port, world_size=None, is_master=False,
                              timeout=datetime.timedelta(seconds=start_timeout_s))
        # Wait for every rank to be up before the process group's (short) timeout starts
        # counting: on a loaded box, spawning and importing torch can take many seconds.
        if store.add("ranks_started", 1) == world_size:
            store.set("all_started", "1")
        store.wait(["all_started"])
        dist.init_process_group(
            "gloo", store=store, rank=rank, world_size=world_size,
            timeout=datetime.timedelta(seconds=pg_timeout_s),
        )
        # Plain pickle, not the queue's ForkingPickler: torch registers shared-memory
        # reductions there, which need the sending rank alive while the parent unpickles.
        results.put((rank, True, pickle.dumps(fn(rank, world_size, *args, **kwargs))))
    except BaseException:  # noqa: BLE001 - every failure must reach the parent
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout_s: float = 60,
    pg_timeout_s: float | None = None,
    **kwargs: Any,
) -> list[Any]:
    """Run `fn(rank, world_size, *args, **kwargs)` on `world_size` gloo ranks.

    Returns each rank's result, indexed by rank. Raises DistributedRunError carrying every
    failed rank's traceback, or naming the ranks still running after `timeout_s` seconds
    (they are killed). `pg_timeout_s` (default: half of `timeout_s`, at least 5 s) bounds
    every collective and point-to-point wait inside the ranks; it starts counting once all
    ranks are up (start-up itself is bounded by `timeout_s`). `pg_timeout_s` and
    `timeout_s` are consumed here and not passed on to `fn`.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    import torch.distributed as dist

    pg_timeout = pg_timeout_s if pg_timeout_s is not None else max(5.0, timeout_s / 2)
    store = dist.TCPStore(_HOST, 0, world_size=None, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=pg_timeout))
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [
        ctx.Process(
            target=_rank_main,
            args=(rank, world_size, store.port, (timeout_s, pg_timeout), fn, args, kwargs,
                  results),
            daemon=True,
        )
        for rank in range(world_size)
    ]
    try:
        for proc in procs:
            proc.start()
        outcomes = _collect(results, procs, timeout_s)
    finally:
        _kill(procs)
        del store
    return _unpack(outcomes, world_size, timeout_s)


def _collect(results: Any, procs: list, timeout_s: float) -> dict[int, tuple[bool, Any]]:
    """Gather (ok, payload) per rank until all report, the deadline, or a failure's grace."""
    outcomes: dict[int, tuple[bool, Any]] = {}
    deadline = time.monotonic() + timeout_s
    while len(outcomes) < len(procs) and time.monotonic() < deadline:
        try:
            rank, ok, payload = results.get(timeout=0.1)
        except queue.Empty:
            dead = [r for r, p in enumerate(procs) if r not in outcomes and not p.is_alive()]
            for rank in dead:  # died without reporting (killed by the OS, os._exit, ...)
                if results.empty():
                    outcomes[rank] = (False, f"rank {rank} exited with code "
                                             f"{procs[rank].exitcode} without a result")
            continue
        outcomes[rank] = (ok, payload)
        if not ok:
            deadline = min(deadline, time.monotonic() + _GRACE_AFTER_FAILURE_S)
    return outcomes


def _kill(procs: list) -> None:
    for proc in procs:
        if proc.is_alive():
            proc.terminate()
    for proc in procs:
        proc.join(timeout=5)
        if proc.is_alive():
            proc.kill()
            proc.join(timeout=5)


def _unpack(outcomes: dict[int, tuple[bool, Any]], world_size: int, timeout_s: float) -> list:
    failures = [f"--- rank {r} ---\n{outcomes[r][1]}" for r in sorted(outcomes)
                if not outcomes[r][0]]
    missing = [r for r in range(world_size) if r not in outcomes]
    if missing:
        failures.append(f"ranks {missing} did not finish within {timeout_s} s and were killed")
    if failures:
        raise DistributedRunError("distributed run failed:\n" + "\n".join(failures))
    return [pickle.loads(outcomes[r][1]) for r in range(world_size)]
