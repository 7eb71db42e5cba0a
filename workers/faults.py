"""Fault drills for tests and operators: make one rank hang, exit or die on purpose.

`RINGMASTER_FAULT` holds one or more comma-separated specs `KIND:key=value:...`:

    stall   hang at the start of step S (as if stuck in a collective); `stall_s=X` ends
            the hang after X seconds (a rank that comes back), default for ever
    crash   exit (status 17) at the start of step S
    kill    SIGKILL itself in the middle of step S, right after the backward of its
            micro-batch number `after` (default 1), so the peers of its later rings and
            of the step's collectives see it vanish mid-step; with `at=join` instead when
            it is told to form a world that a replacement joins

Keys: `rank=R` (the slot), `step=S`, `attempt=A` (default 1), `job=NAME` (jobs whose id
starts with NAME-, default any), `life=L` (the L-th process of that slot in the attempt,
default 1: a replacement does not repeat its predecessor's fault).
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass

import torch

__all__ = ["Fault", "arm_kill", "fault_at", "perform"]


@dataclass(frozen=True, kw_only=True)
class Fault:
    kind: str  # stall, crash, kill
    after: int = 1  # kill: micro-batches to finish first
    stall_s: float | None = None  # stall: None hangs for ever


def _specs(text: str) -> list[tuple[str, dict[str, str]]]:
    out = []
    for spec in filter(None, (s.strip() for s in text.split(","))):
        kind, *parts = spec.split(":")
        out.append((kind, dict(p.split("=", 1) for p in parts)))
    return out


def fault_at(*, job_id: str, attempt: int, slot: int, step: int | None, life: int = 1,
             at: str = "step") -> Fault | None:
    """The fault RINGMASTER_FAULT asks this rank to simulate now, if any.

    `at` is "step" (the start of step `step`) or "join" (forming a world with a joiner).
    """
    for kind, f in _specs(os.environ.get("RINGMASTER_FAULT", "")):
        job = f.get("job")
        hit = (int(f.get("rank", -1)) == slot and int(f.get("attempt", 1)) == attempt
               and int(f.get("life", 1)) == life and f.get("at", "step") == at
               and (at == "join" or int(f.get("step", -1)) == step)
               and (job is None or job_id.startswith(job + "-")))
        if hit:
            stall = f.get("stall_s")
            return Fault(kind=kind, after=int(f.get("after", 1)),
                         stall_s=float(stall) if stall is not None else None)
    return None


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def perform(fault: Fault | None, model: torch.nn.Module | None = None):
    """Act out `fault` now (stall, crash, an immediate kill) or arm it (a mid-step kill:
    returns the hook handle to remove once the step is over)."""
    if fault is None:
        return
    if fault.kind == "stall":
        time.sleep(fault.stall_s if fault.stall_s is not None else 1e9)
    elif fault.kind == "crash":
        os._exit(17)
    elif fault.kind == "kill" and model is None:
        _die()
    elif fault.kind == "kill":
        return arm_kill(model, after=fault.after)
    return None


def arm_kill(model: torch.nn.Module, *, after: int):
    """SIGKILL this process once `after` micro-batches' backward passes have finished.

    The embedding's gradient is the last one each micro-batch's backward produces
    (workers.model.Transformer.forward_backward), so its hook marks a micro-batch's end.
    Returns the hook handle (remove it to disarm).
    """
    seen = [0]

    def count(_param) -> None:
        seen[0] += 1
        if seen[0] >= after:
            _die()

    return model.embed.weight.register_post_accumulate_grad_hook(count)
