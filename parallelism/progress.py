"""Where this rank is in its step: micro-batch, layer, forward/backward, ring hop.

Why: when a ring stalls, every member stops making progress, and the controller can only
name the rank the others are waiting on if each rank says where it is. The step code marks
its position as it goes (workers/step.py per micro-batch and the step's collectives, the
layer stacks per layer and direction, ring attention per hop and around every ring
exchange it waits on); the heartbeat thread reads `snapshot()` and sends it
(docs/execution.md, "Hang localisation").

One record per process (`PROGRESS`), written by the training thread and read by the
heartbeat thread: a mark is a few attribute writes under one small lock and one
`perf_counter` (far below a layer's or a ring hop's compute). `ticks` grows with every
mark, so it is also the rank's progress counter.

Fault drills hook in here too (workers/agent.py, `RINGMASTER_FAULT`):
- `slowdown` F > 1 makes the rank's compute F times slower: at every mark, the compute
  time since the previous mark (ring waits excluded) is followed by a wait of (F - 1)
  times it, so ring peers wait for it as they would for a slow GPU. Both are measured on
  `clock`, the device's busy time (on CPU the process's CPU time, so a shared box that
  also gives the rank's core to others neither inflates nor hides the factor), and the
  wait keeps the CPU busy (as a host thread spinning on a device's completion does,
  CUDA's default): a process that sleeps is scheduled first when it wakes;
- `on_mark(position)` is called at every mark (a stall drill sleeps there when the rank
  reaches its position).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

__all__ = ["COMPUTE_PHASES", "PHASES", "PROGRESS", "StepPosition", "StepProgress"]

# Where in a step a rank can be, in order: "start" (the step began: plan check, data),
# "forward" / "head" (the streamed loss head) / "backward" of a micro-batch, "after" (its
# micro-batch is over, the next not begun), "reduce" (the step's gradient collectives,
# after the last micro-batch), "optimizer", "done" (the step is over; the rank waits for
# its next plan).
PHASES = ("start", "forward", "head", "backward", "after", "reduce", "optimizer", "done")
COMPUTE_PHASES = frozenset({"forward", "head", "backward"})


@dataclass(frozen=True, kw_only=True)
class StepPosition:
    """One rank's place in its step."""

    step: int = -1  # optimizer step being run (-1: none yet)
    micro_batch: int = -1  # index in plan.micro_batches (-1: before the rank's first)
    ring: tuple[int, ...] = ()  # ranks of the current micro-batch's group (ring order)
    layer: int = -1  # decoder layer (-1: none, e.g. the embedding or between layers)
    phase: str = "done"  # one of PHASES
    ring_hop: int = -1  # ring step of the current layer's attention (-1: not in a ring op)
    waiting: bool = False  # blocked on a ring exchange with a peer
    ticks: int = 0  # marks so far (grows whenever the rank makes progress)


class StepProgress:
    """The position record and its drills (see the module docstring)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._pos = StepPosition()
        self.slowdown = 1.0
        # the slow drill's clock: the device's busy time (workers.step.device_clock sets
        # it: wall on CUDA, the process's CPU time on CPU)
        self.clock: Callable[[], float] = time.perf_counter
        self.on_mark: Callable[[StepPosition], None] | None = None
        self._since = self.clock()  # compute clock: start of the current interval
        self._waited = 0.0  # ring-wait seconds inside the current interval

    def snapshot(self) -> StepPosition:
        with self._lock:
            return self._pos

    def _mark(self, **changes) -> None:
        with self._lock:
            before = self._pos
            self._pos = pos = replace(before, ticks=before.ticks + 1, **changes)
        if self.slowdown > 1.0:
            self._slow_down(before.phase in COMPUTE_PHASES and not before.waiting)
        if self.on_mark is not None:
            self.on_mark(pos)

    def _slow_down(self, was_compute: bool) -> None:
        now = self.clock()
        if was_compute:
            compute = max(0.0, now - self._since - self._waited)
            _busy_wait((self.slowdown - 1.0) * compute, self.clock)
            now = self.clock()
        self._since, self._waited = now, 0.0

    # -- what the step marks --------------------------------------------------------
    def begin_step(self, step: int) -> None:
        self._mark(step=step, micro_batch=-1, ring=(), layer=-1, phase="start", ring_hop=-1,
                   waiting=False)

    def micro_batch(self, index: int, ring: tuple[int, ...]) -> None:
        self._mark(micro_batch=index, ring=tuple(ring), layer=-1, phase="forward",
                   ring_hop=-1, waiting=False)

    def layer(self, layer: int, phase: str) -> None:
        self._mark(layer=layer, phase=phase, ring_hop=-1, waiting=False)

    def phase(self, phase: str) -> None:
        """A phase outside the layers: "head", "after", "reduce", "optimizer", "done"."""
        self._mark(layer=-1, phase=phase, ring_hop=-1, waiting=False)

    def hop(self, hop: int) -> None:
        self._mark(ring_hop=hop, waiting=False)

    @contextmanager
    def ring_wait(self) -> Iterator[None]:
        """Around a blocking ring exchange: marked as waiting, and not compute."""
        t0 = self.clock()
        with self._lock:
            self._pos = replace(self._pos, waiting=True)
        try:
            yield
        finally:
            self._waited += self.clock() - t0
            with self._lock:
                self._pos = replace(self._pos, waiting=False)


def _busy_wait(seconds: float, clock: Callable[[], float]) -> None:
    """Keep this thread busy until `clock` has advanced by `seconds` (other threads still
    run: the interpreter switches every few milliseconds)."""
    end = clock() + seconds
    while clock() < end:
        pass


PROGRESS = StepProgress()
