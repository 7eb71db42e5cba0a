"""Activation arena: every tensor autograd saves for backward lives at a planned offset.

MEMO (arXiv 2407.12117, Sec. 4.3) places activations at addresses planned ahead, so the
caching allocator never sees them and cannot fragment. Here the requests are the tensors
autograd saves for backward, seen through `torch.autograd.graph.saved_tensors_hooks`:

1. `record_saved_tensors(step)` runs one step with hooks that only count: each saved
   tensor's bytes and its lifetime on an axis of hook events (its pack, its last unpack).
2. `plan_arena(trace)` gives those intervals to `scheduler.memory.plan_offsets` (best fit
   + CP-SAT, MEMO's MIP) and `ActivationArena(plan)` allocates one byte buffer of the
   planned peak.
3. Inside `arena.saving()`, the pack hook copies each saved tensor into its slot and hands
   autograd a view of the slot; unpack returns that view. The original is then free as
   soon as the forward no longer needs it, so on CUDA activations occupy only the arena.
   Copies are exact, so loss and gradients are bit-identical to a run without the arena
   (the tests hold it to that). On CPU the path runs the same way and saves nothing.

Parameters (and views of them) are saved by reference, not copied. Memory safety: a slot
is reused only by a pack that comes after its tensor's last unpack, and an unpacked view
is consumed by the backward node that unpacked it before the next hook event. A step
must issue the same sequence of saves as the recorded one, each at most as large (checked,
else ValueError): as MEMO does, one arena planned at the longest length serves every
shorter batch of the same structure (sizes are affine in tokens, slots only shrink).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

import torch

from scheduler.memory import MemoryPlan, plan_offsets

T = TypeVar("T")
DEFAULT_ALIGNMENT = 512  # bytes; the CUDA caching allocator's granularity, any dtype fits


@dataclass(frozen=True, kw_only=True)
class SavedTensorTrace:
    """The saved-for-backward requests of one step, in pack order."""

    nbytes: tuple[int, ...]                   # bytes of each saved tensor (contiguous copy)
    dtypes: tuple[torch.dtype, ...]           # its dtype (checked on replay)
    lifetimes: tuple[tuple[int, int], ...]    # (pack event, last unpack event), inclusive
    num_by_reference: int                     # parameters saved as they are (not planned)


class _Recorder:
    def __init__(self, keep: set[int]):
        self.keep, self.event = keep, 0
        self.rows: list[list] = []            # nbytes, dtype, first, last
        self.num_by_reference = 0

    def pack(self, t: torch.Tensor):
        if _is_kept(t, self.keep):
            self.num_by_reference += 1
            return (None, t)
        self.rows.append([t.numel() * t.element_size(), t.dtype, self.event, self.event])
        self.event += 1
        return (len(self.rows) - 1, t)

    def unpack(self, handle) -> torch.Tensor:
        index, t = handle
        if index is not None:
            self.rows[index][3] = self.event
            self.event += 1
        return t


def record_saved_tensors(step: Callable[[], object], *,
                         parameters: Iterable[torch.Tensor] = ()) -> SavedTensorTrace:
    """Run `step` (a forward and its backward) once and record what autograd saves."""
    recorder = _Recorder(_storages(parameters))
    with torch.autograd.graph.saved_tensors_hooks(recorder.pack, recorder.unpack):
        step()
    return SavedTensorTrace(
        nbytes=tuple(r[0] for r in recorder.rows), dtypes=tuple(r[1] for r in recorder.rows),
        lifetimes=tuple((r[2], r[3]) for r in recorder.rows),
        num_by_reference=recorder.num_by_reference)


def plan_arena(trace: SavedTensorTrace, *, time_limit_s: float = 5.0,
               alignment: int = DEFAULT_ALIGNMENT) -> MemoryPlan:
    """Offsets of every saved tensor in the arena (MEMO's level-1 MIP over the trace)."""
    return plan_offsets(list(trace.nbytes), list(trace.lifetimes), time_limit_s=time_limit_s,
                        alignment=alignment)


class ActivationArena:
    """One preallocated buffer that holds every saved activation at its planned offset."""

    def __init__(self, plan: MemoryPlan, trace: SavedTensorTrace, *,
                 device: torch.device | str = "cpu",
                 parameters: Iterable[torch.Tensor] = ()):
        if len(plan.offsets) != len(trace.nbytes):
            raise ValueError(f"plan has {len(plan.offsets)} offsets but the trace "
                             f"{len(trace.nbytes)} saved tensors; plan the same trace")
        self.plan, self.trace = plan, trace
        self.buffer = torch.empty(plan.peak_bytes, dtype=torch.uint8, device=device)
        self._keep = _storages(parameters)
        self._next = 0

    @classmethod
    def for_step(cls, step: Callable[[], object], *, parameters: Iterable[torch.Tensor] = (),
                 device: torch.device | str = "cpu", time_limit_s: float = 5.0
                 ) -> ActivationArena:
        """Record `step` once, plan it and allocate the arena (the step runs once)."""
        params = list(parameters)
        trace = record_saved_tensors(step, parameters=params)
        return cls(plan_arena(trace, time_limit_s=time_limit_s), trace, device=device,
                   parameters=params)

    @property
    def nbytes(self) -> int:
        return self.buffer.numel()

    @contextmanager
    def saving(self) -> Iterator[ActivationArena]:
        """Route autograd's saved tensors through the arena for one step."""
        self._next = 0
        with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t):
            yield self
        if self._next != len(self.trace.nbytes):
            raise ValueError(f"the step saved {self._next} tensors but the arena was planned "
                             f"for {len(self.trace.nbytes)}; re-plan for this step's shapes")

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        if _is_kept(t, self._keep):
            return t
        k = self._next
        nbytes = t.numel() * t.element_size()
        if k >= len(self.trace.nbytes) or nbytes > self.trace.nbytes[k] \
                or t.dtype != self.trace.dtypes[k]:
            planned = (f"at most {self.trace.nbytes[k]} bytes of {self.trace.dtypes[k]}"
                       if k < len(self.trace.nbytes) else "nothing")
            raise ValueError(f"saved tensor #{k} is {nbytes} bytes of {t.dtype}, the arena "
                             f"planned {planned}; re-plan for this step's shapes")
        self._next += 1
        offset = self.plan.offsets[k]
        slot = self.buffer[offset:offset + nbytes].view(t.dtype).view(t.shape)
        slot.copy_(t)
        return slot


@dataclass(kw_only=True)
class _Planned:
    arena: ActivationArena
    size: tuple[int, ...]  # the recorded micro-batch's size figures


class ArenaCache:
    """Arenas for a worker's micro-batches, a few per kind of micro-batch.

    A kind (`key`) names micro-batches that save the same sequence of tensors (the step
    decides: e.g. a packed micro-batch with the same number of streamed-head chunks); its
    `size` figures (tokens, sequences) bound every saved tensor. A micro-batch runs
    through the first arena of its kind that it fits (every size figure at most the
    recorded one); otherwise it is recorded by running it (that run is the real one, so
    nothing is computed twice) and planned. Each kind keeps its `per_kind` most recently
    planned arenas (MEMO plans at the longest length; sizes that are not ordered, more
    tokens but fewer sequences, need more than one).
    """

    def __init__(self, *, parameters: Iterable[torch.Tensor], device: torch.device | str,
                 time_limit_s: float = 5.0, per_kind: int = 2):
        if per_kind < 1:
            raise ValueError(f"per_kind={per_kind} must be >= 1")
        self.parameters = list(parameters)
        self.device = device
        self.time_limit_s = time_limit_s
        self.per_kind = per_kind
        self.num_recorded = 0  # micro-batches that had to be recorded and planned
        self._planned: dict[object, list[_Planned]] = {}

    @property
    def nbytes(self) -> int:
        """Bytes held by every arena (what the planned placement costs in memory)."""
        return sum(p.arena.nbytes for kind in self._planned.values() for p in kind)

    def run(self, key: object, size: tuple[int, ...], step: Callable[[], T]) -> T:
        """`step()`'s result, its saved tensors placed in an arena of kind `key`."""
        kind = self._planned.setdefault(key, [])
        for planned in kind:
            if all(a <= b for a, b in zip(size, planned.size, strict=True)):
                with planned.arena.saving():
                    return step()
        result: list[T] = []
        arena = ActivationArena.for_step(lambda: result.append(step()),
                                         parameters=self.parameters, device=self.device,
                                         time_limit_s=self.time_limit_s)
        self.num_recorded += 1
        # The new arena covers every recorded size it dominates; keep the rest (newest last).
        kind[:] = [p for p in kind if not all(a <= b for a, b in zip(p.size, size,
                                                                         strict=True))]
        kind.append(_Planned(arena=arena, size=tuple(size)))
        del kind[:-self.per_kind]
        return result[0]


def _storages(tensors: Iterable[torch.Tensor]) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in tensors}


def _is_kept(t: torch.Tensor, keep: set[int]) -> bool:
    """Saved by reference: parameters and their views, and empty tensors."""
    return isinstance(t, torch.nn.Parameter) or t.numel() == 0 \
        or t.untyped_storage().data_ptr() in keep
