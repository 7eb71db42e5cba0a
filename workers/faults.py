"""Fault drills for tests and operators: make one rank hang, exit, die or slow down.

`RINGMASTER_FAULT` holds one or more comma-separated specs `KIND:key=value:...`
(docs/execution.md, "Fault drills"; docs/elastic.md):

    stall   hang at the start of step S (as if stuck in a collective); `stall_s=X` ends
            the hang after X seconds (a rank that comes back), default for ever; with
            `micro_batch=M[:layer=L][:phase=forward|backward]` instead when the step
            reaches that position (parallelism.progress)
    crash   exit (status 17) at the start of step S
    kill    SIGKILL itself in the middle of step S, right after the backward of its
            micro-batch number `after` (default 1; at the latest once its micro-batches are
            done, before the step's collectives), so the peers of its rings and of the
            collectives see it vanish mid-step; `after=ring`: as it enters its first ring,
            so that its ring peers are blocked on it; with `at=join` instead in the middle
            of forming a world that a replacement joins
    slow    compute `factor=F` times slower from step S (default 0) on

Keys: `rank=R` (the slot; `rank=ring`: the highest rank of the step plan's rings, whoever
that is), `step=S`, `world=E` (the world epoch the step runs in, default 0: the survivors'
rerun of the step does not repeat the fault), `attempt=A` (default 1; slow: every attempt
unless given), `job=NAME` (jobs whose id starts with NAME-, default any), `life=L` (the
L-th process of that slot in the attempt, default 1: a replacement does not repeat its
predecessor's fault).
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass

__all__ = ["KINDS", "Fault", "arm_kill", "before_first_ring", "fault_at", "fault_specs",
           "perform", "positional_stall", "ring_victim", "slow_factor"]

KINDS = ("stall", "crash", "kill", "slow")
POSITION_KEYS = ("micro_batch", "layer", "phase")


@dataclass(frozen=True, kw_only=True)
class Fault:
    kind: str  # stall, crash, kill (KINDS but slow, which slow_factor handles)
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


def fault_specs(text: str | None = None) -> list[tuple[str, dict[str, str]]]:
    """RINGMASTER_FAULT's specs (or `text`'s) as (kind, fields); ValueError naming a
    malformed one."""
    text = os.environ.get("RINGMASTER_FAULT", "") if text is None else text
    out = []
    for spec in filter(None, (s.strip() for s in text.split(","))):
        kind, *parts = spec.split(":")
        if kind not in KINDS or not all("=" in p for p in parts):
            raise ValueError(f"RINGMASTER_FAULT: {spec!r} is not KIND:key=value:... with KIND "
                             f"one of {', '.join(KINDS)}")
        out.append((kind, dict(p.split("=", 1) for p in parts)))
    return out


def _targets(fields: dict[str, str], *, job_id: str, attempt: int, slot: int,
             ring_slot: int | None = None, default_attempt: int | None = 1) -> bool:
    job = fields.get("job")
    wanted = fields.get("attempt", default_attempt)
    rank = ring_slot if fields.get("rank") == "ring" else int(fields.get("rank", -1))
    return (rank == slot and (wanted is None or int(wanted) == attempt)
            and (job is None or job_id.startswith(job + "-")))


def fault_at(*, job_id: str, attempt: int, slot: int, step: int | None, life: int = 1,
             at: str = "step", ring_slot: int | None = None,
             world: int = 0) -> Fault | None:
    """The fault RINGMASTER_FAULT asks this rank to simulate now, if any.

    `at` is "step" (the start of step `step`, in world epoch `world`) or "join" (forming a
    world with a joiner); `ring_slot` is the slot `rank=ring` names in this step (the
    plan's ring_victim).
    """
    for kind, f in fault_specs():
        if kind == "slow" or any(k in f for k in POSITION_KEYS):
            continue  # slow_factor's and positional_stall's
        hit = (_targets(f, job_id=job_id, attempt=attempt, slot=slot, ring_slot=ring_slot)
               and int(f.get("life", 1)) == life and f.get("at", "step") == at
               and (at == "join" or (int(f.get("step", -1)) == step
                                     and int(f.get("world", 0)) == world)))
        if hit:
            stall, after = f.get("stall_s"), f.get("after", "1")
            return Fault(kind=kind, after=after if after == "ring" else int(after),
                         stall_s=float(stall) if stall is not None else None)
    return None


def slow_factor(*, job_id: str, attempt: int, slot: int, step: int) -> float:
    """How many times slower this rank's compute is at `step` (1.0: not slowed)."""
    for kind, f in fault_specs():
        if kind == "slow" and _targets(f, job_id=job_id, attempt=attempt, slot=slot,
                                       default_attempt=None) \
                and step >= int(f.get("step", 0)):
            factor = float(f.get("factor", "nan"))
            if not factor >= 1.0 or factor == float("inf"):
                raise ValueError(f"RINGMASTER_FAULT: slow factor={f.get('factor')!r} must be a "
                                 "finite number >= 1")
            return factor
    return 1.0


def positional_stall(*, job_id: str, attempt: int, slot: int):
    """A parallelism.progress `on_mark` hook that hangs this rank where a positional stall
    spec says (None without one)."""
    wanted = [f for kind, f in fault_specs() if kind == "stall" and any(
        k in f for k in POSITION_KEYS) and _targets(f, job_id=job_id, attempt=attempt,
                                                    slot=slot)]
    if not wanted:
        return None

    def hook(pos) -> None:
        for f in wanted:
            if pos.step == int(f.get("step", -1)) and pos.micro_batch == int(f["micro_batch"]) \
                    and int(f.get("layer", pos.layer)) == pos.layer \
                    and f.get("phase", pos.phase) == pos.phase:
                time.sleep(1e9)  # hang like a rank stuck in a kernel or a collective
    return hook


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
        after = before_first_ring(plan, rank) if fault.after == "ring" else int(fault.after)
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
