"""FakeLauncher keeps the Launcher contract: gang admission, fenced events, idempotent stop."""

from __future__ import annotations

import pytest

from controller.launchers import EventKind, FakeLauncher, make_launcher
from controller.spec import JobCreate
from controller.states import JobRecord, State


def _job(job_id: str, num_ranks: int) -> JobRecord:
    spec = JobCreate.model_validate(dict(
        name="t", model="tiny", dataset={"path": "d"}, resources={"num_ranks": num_ranks},
        training={"steps": 1, "global_batch_tokens": 64}))
    return JobRecord(id=job_id, spec=spec, state=State.PENDING)


def test_gang_admission_counts_free_ranks():
    fl = FakeLauncher(total_ranks=6)
    a, b = _job("a", 4), _job("b", 4)
    assert fl.admit(a)
    fl.start(a, 1)
    assert fl.free_ranks == 2
    assert not fl.admit(b)  # all or nothing: 2 free ranks do not start a 4-rank gang
    with pytest.raises(RuntimeError, match="4 ranks requested, 2 free"):
        fl.start(b, 1)
    fl.stop("a")
    assert fl.admit(b)


def test_events_carry_the_attempt_and_drain_once():
    fl = FakeLauncher(total_ranks=4)
    job = _job("a", 3)
    fl.start(job, 1)
    fl.lose_worker("a", rank=2)
    events = fl.poll()
    assert [(e.kind, e.attempt, e.rank) for e in events] == [
        (EventKind.READY, 1, None), (EventKind.WORKER_LOST, 1, 2)]
    assert fl.poll() == []
    assert fl.free_ranks == 4  # a lost worker ends the attempt and frees its ranks
    fl.stop("a")
    fl.stop("a")
    assert [e.kind for e in fl.poll()] == [EventKind.STOPPED, EventKind.STOPPED]


def test_make_launcher_names_valid_choices():
    assert isinstance(make_launcher("fake", total_ranks=2), FakeLauncher)
    with pytest.raises(ValueError, match="launcher='slurm' is not known; valid: ray"):
        make_launcher("slurm")
