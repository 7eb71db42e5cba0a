"""The step's position marks: a micro-batch's forward, head and backward go layer by layer
under every memory scheme; the slow drill waits (F - 1) x the compute since the last mark
and never for ring waits (a fake clock, so nothing here depends on the machine's speed)."""

from __future__ import annotations

import time

import pytest
import torch

from parallelism import progress as progress_mod
from parallelism.progress import PROGRESS, StepProgress
from tests.workers.helpers import tiny_model
from workers.model import DEFAULT_HEAD_CHUNK


@pytest.fixture
def marks():
    seen = []
    PROGRESS.on_mark = seen.append
    yield seen
    PROGRESS.on_mark = None


@pytest.mark.parametrize("scheme", [dict(), dict(scheme="offload", offload_ratio=0.5),
                                    dict(scheme="streambp", stream_chunk_size=3)])
def test_a_micro_batch_marks_every_layer_forward_then_backward(marks, scheme):
    model = tiny_model(seed=1)
    ids = torch.randint(0, model.spec.vocab_size, (13,))
    cu = torch.tensor([0, 6, 13], dtype=torch.int32)
    PROGRESS.micro_batch(4, (2,))
    model.forward_backward(ids, cu_seqlens=cu, **scheme)
    trail = [(p.phase, p.layer) for p in marks]
    L = model.spec.num_layers
    chunks = -(-13 // (scheme.get("stream_chunk_size") or DEFAULT_HEAD_CHUNK))  # each marks
    assert trail == [("forward", -1)] + [("forward", i) for i in range(L)] \
        + [("head", -1)] * (1 + chunks) + [("backward", i) for i in reversed(range(L))]
    assert {p.micro_batch for p in marks} == {4} and {p.ring for p in marks} == {(2,)}
    assert [p.ticks for p in marks] == sorted(p.ticks for p in marks)


def test_the_slow_drill_sleeps_for_the_compute_not_the_waits(monkeypatch):
    clock = [100.0]
    slept = []
    monkeypatch.setattr(progress_mod, "_busy_wait", lambda s, on: slept.append((s, on)))
    p = StepProgress()
    p.clock = lambda: clock[0]  # the device's busy time
    p.slowdown = 3.0
    p.begin_step(0)
    clock[0] += 5.0  # data loading: not compute
    p.micro_batch(0, (0, 1))
    clock[0] += 2.0  # layer 0's forward: compute ...
    with p.ring_wait():
        clock[0] += 7.0  # ... but this wait on a peer is not
    clock[0] += 1.0
    p.layer(1, "forward")
    clock[0] += 0.5
    p.phase("reduce")
    clock[0] += 4.0  # collectives: not compute
    p.phase("done")
    assert [s for s, _ in slept] == [pytest.approx(2 * 3.0), pytest.approx(2 * 0.5)]
    assert all(on is p.clock for _, on in slept)  # waits measured on the same clock
    assert p.snapshot().phase == "done" and p.snapshot().ticks == 5


def test_the_slow_drills_wait_spends_the_clock_it_is_given():
    # On CPU the clock is the process's CPU time: the wait must burn that much CPU (a
    # sleep would not advance it at all), however the box is loaded.
    t0 = time.process_time()
    progress_mod._busy_wait(0.05, time.process_time)
    assert time.process_time() - t0 >= 0.05
