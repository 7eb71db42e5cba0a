"""What one live job attempt holds while it runs (controller.worker_service keeps one per
(job, attempt)): who registered and how far each rank got, the attempt's worlds, the plans
and messages built for it, and the locks and condition that guard them. Nothing here is
durable: after a controller restart the worker service rebuilds it from the store.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from controller.hang import RankPosition
from controller.planning import PlannedStep
from controller.rpc import ringmaster_pb2 as pb
from controller.states import JobRecord
from controller.worlds import AttemptWorlds

__all__ = ["AttemptRuntime", "RankState"]


@dataclass(kw_only=True)
class RankState:
    registered: bool = False
    progress: tuple[int, int] = (-1, -1)  # (step, progress counter) last heard
    progress_at: float = 0.0  # monotonic time the progress last changed
    done_step: int = -1  # newest step this rank has finished (reported or resumed past)
    streamed_step: int = -1  # newest step whose plan it received (it works when > done_step)
    streaming: bool = False  # holds an open plan stream: past streamed_step it waits on us
    # the step its plan stream ended at (sent ahead of the steps before it): once the rank
    # has finished every step before it, it is no longer watched
    stream_end: int | None = None
    position: RankPosition | None = None  # where in its step the last heartbeat said it is
    heard_at: float = 0.0  # monotonic time of its last heartbeat (a waiting replacement's pulse)
    syncing: bool = False  # blocked on peers (the step's collectives, a ring transfer)

    @property
    def finished(self) -> bool:
        """Its plan stream has ended and it finished every step before the end."""
        return self.stream_end is not None and self.done_step >= self.stream_end - 1


@dataclass(kw_only=True)
class AttemptRuntime:
    job: JobRecord
    worlds: AttemptWorlds
    ranks: dict[int, RankState]
    # (world size, step) -> the plan and its span's traceparent
    plans: dict[tuple[int, int], tuple[PlannedStep, str]] = field(default_factory=dict)
    plan_lock: threading.Lock = field(default_factory=threading.Lock)
    persist_lock: threading.Lock = field(default_factory=threading.Lock)  # world snapshots
    persisted: dict | None = None  # the world snapshot last stored (under persist_lock)
    # (world epoch, step) -> its message, built once and sent to every member
    messages: dict[tuple[int, int], pb.PlanMessage] = field(default_factory=dict)
    pending: dict[int, int] = field(default_factory=dict)  # step -> newest epoch reporting it
    # world epoch -> min done_step of its live members, cached until a step completes or
    # the membership moves (world_service.changed); plan streams read it
    min_done: dict[int | None, int] = field(default_factory=dict)
    worker_config: str = ""  # worker_config_json of the attempt, built once
    ready_sent: bool = False
    lost_sent: bool = False
    fell_back: bool = False  # a fallback_restart was decided: the attempt is ending
    cond: threading.Condition = field(default_factory=threading.Condition)

    @property
    def replan(self) -> bool:
        return self.job.spec.failure.mode == "replan"
