"""Fault drills for tests and operators: make one rank hang, exit or die on purpose.

`RINGMASTER_FAULT` holds one or more comma-separated specs `KIND:key=value:...`:

    stall   hang at the start of step S (as if stuck in a collective); `stall_s=X` ends
            the hang after X seconds (a rank that comes back), default for ever
    crash   exit (status 17) at the start of step S
    kill    SIGKILL itself in the middle of step S, right after the backward of its
            micro-batch number `after` (default 1; at the latest once its micro-batches are
            done, before the step's collectives), so the peers of its rings and of the
            collectives see it vanish mid-step; `after=ring`: as it enters its first ring,
            so that its ring peers are blocked on it; with `at=join` instead in the middle
            of forming a world that a replacement joins

Keys: `rank=R` (the slot; `rank=ring`: the highest rank of the step plan's rings, whoever
that is), `step=S`, `world=E` (the world epoch the step runs in, default 0: the survivors'
rerun of the step does not repeat the fault), `attempt=A` (default 1), `job=NAME` (jobs
whose id starts with NAME-, default any), `life=L` (the L-th process of that slot in the
attempt, default 1: a replacement does not repeat its predecessor's fault).
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass

__all__ = ["Fault", "arm_kill", "before_first_ring", "fault_at", "perform", "ring_victim"]


@dataclass(frozen=True, kw_only=True)
class Fault:
    kind: str  # stall, crash, kill
    after: int | str = 1  # kill: micro-batches to finish first, or "ring"
    stall_s: float | None = None  # stall: None hangs for ever


def ring_victim(plan) -> int | None:
    """The highest rank in any group of two or more ranks of `plan` (a StepPlan)."""
    ranks = [r for _, g in plan.groups() if len(g.ranks) > 1 for r in g.ranks]
    return max(ranks) if ranks else None


def before_first_ring(plan, rank: int) -> int:
    """How many of `rank`'s micro-batches come before its first ring."""
    mine = plan.micro_batches_of(rank)
    return next((i for i, (_, g) in enumerate(mine) if len(g.ranks) > 1), len(mine))


def _specs(text: str) -> list[tuple[str, dict[str, str]]]:
    out = []
    for spec in filter(None, (s.strip() for s in text.split(","))):
        kind, *parts = spec.split(":")
        out.append((kind, dict(p.split("=", 1) for p in parts)))
    return out


def fault_at(*, job_id: str, attempt: int, slot: int, step: int | None, life: int = 1,
             at: str = "step", ring_slot: int | None = None,
             world: int = 0) -> Fault | None:
    """The fault RINGMASTER_FAULT asks this rank to simulate now, if any.

    `at` is "step" (the start of step `step`, in world epoch `world`) or "join" (forming a
    world with a joiner); `ring_slot` is the slot `rank=ring` names in this step (the
    plan's ring_victim).
    """
    for kind, f in _specs(os.environ.get("RINGMASTER_FAULT", "")):
        job = f.get("job")
        rank = ring_slot if f.get("rank") == "ring" else int(f.get("rank", -1))
        hit = (rank == slot and int(f.get("attempt", 1)) == attempt
               and int(f.get("life", 1)) == life and f.get("at", "step") == at
               and (at == "join" or (int(f.get("step", -1)) == step
                                     and int(f.get("world", 0)) == world))
               and (job is None or job_id.startswith(job + "-")))
        if hit:
            stall, after = f.get("stall_s"), f.get("after", "1")
            return Fault(kind=kind, after=after if after == "ring" else int(after),
                         stall_s=float(stall) if stall is not None else None)
    return None


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def perform(fault: Fault | None, trainer=None, plan=None, rank: int = 0):
    """Act out `fault` now (stall, crash, an immediate kill) or arm it (a mid-step kill of
    `trainer`'s step of `plan` as `rank`: returns the handle to remove once it is over)."""
    if fault is None:
        return None
    if fault.kind == "stall":
        time.sleep(fault.stall_s if fault.stall_s is not None else 1e9)
    elif fault.kind == "crash":
        os._exit(17)
    elif fault.kind == "kill" and trainer is None:
        _die()
    elif fault.kind == "kill":
        after = before_first_ring(plan, rank) if fault.after == "ring" else fault.after
        if after == 0:
            _die()
        return arm_kill(trainer, after=after)
    return None


class _Armed:
    def __init__(self, hook, grads, sync):
        self.hook, self.grads, self.sync = hook, grads, sync

    def remove(self) -> None:
        self.hook.remove()
        self.grads.sync = self.sync


def arm_kill(trainer, *, after: int) -> _Armed:
    """SIGKILL this process once `after` micro-batches' backward passes have finished, or
    when the step's gradient reduction starts if it runs fewer.

    The embedding's gradient is the last one each micro-batch's backward produces
    (workers.model.Transformer.forward_backward), so its hook marks a micro-batch's end;
    the trainer's GradBuffer.sync starts the step's collectives.
    """
    seen = [0]

    def count(_param) -> None:
        seen[0] += 1
        if seen[0] >= after:
            _die()

    grads = trainer.optimizer.grads
    sync = grads.sync

    def die_first(*args, **kwargs):
        _die()
        return sync(*args, **kwargs)

    grads.sync = die_first
    return _Armed(trainer.model.embed.weight.register_post_accumulate_grad_hook(count),
                  grads, sync)
