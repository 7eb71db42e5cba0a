"""Job states, the legal transitions between them, and the job record the store keeps.

A job is in one `State`. The five active ones are its *phase* (Pending, Scheduling,
Running, Restarting, Stopping); the three terminal ones are its *result* (Succeeded,
Failed, Stopped) and never change again. `TRANSITIONS` is the whole machine: anything not
listed is a bug and raises `IllegalTransition`. The attempt counter grows by one each time
workers are started; the execution side fences on it (reports of an older attempt are
dropped).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Literal, cast

from controller.spec import JobCreate
from scheduler.errors import ConflictError

Phase = Literal["Pending", "Scheduling", "Running", "Restarting", "Stopping", "Finished"]
Result = Literal["Succeeded", "Failed", "Stopped"]


class State(StrEnum):
    PENDING = "Pending"        # accepted, waiting until the launcher admits its gang
    SCHEDULING = "Scheduling"  # admitted; workers of the current attempt are starting
    RUNNING = "Running"        # every rank of the current attempt is up
    RESTARTING = "Restarting"  # the attempt ended abnormally; a new one will start
    STOPPING = "Stopping"      # a stop was requested; waiting for the workers to exit
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    STOPPED = "Stopped"

    @property
    def terminal(self) -> bool:
        return self in _TERMINAL

    @property
    def phase(self) -> Phase:
        """Lifecycle phase as the API reports it: the state, or 'Finished' when terminal."""
        return "Finished" if self.terminal else cast(Phase, self.value)  # an active state

    @property
    def result(self) -> Result | None:
        return cast(Result, self.value) if self.terminal else None  # a terminal state


_TERMINAL = frozenset({State.SUCCEEDED, State.FAILED, State.STOPPED})

TRANSITIONS: dict[State | None, frozenset[State]] = {
    None: frozenset({State.PENDING}),  # creation
    State.PENDING: frozenset({State.SCHEDULING, State.STOPPED, State.FAILED}),
    State.SCHEDULING: frozenset({State.RUNNING, State.RESTARTING, State.STOPPING,
                                 State.FAILED, State.SUCCEEDED}),
    State.RUNNING: frozenset({State.SUCCEEDED, State.RESTARTING, State.STOPPING, State.FAILED}),
    State.RESTARTING: frozenset({State.SCHEDULING, State.STOPPED, State.FAILED}),
    State.STOPPING: frozenset({State.STOPPED, State.SUCCEEDED, State.FAILED}),
    State.SUCCEEDED: frozenset(),
    State.FAILED: frozenset(),
    State.STOPPED: frozenset(),
}


class IllegalTransition(RuntimeError):
    """A transition outside TRANSITIONS was attempted (a controller bug, never user input)."""


class StaleState(ConflictError, RuntimeError):
    """The job was no longer in the expected state when the transition was applied."""


def check_transition(src: State | None, dst: State) -> None:
    if dst not in TRANSITIONS[src]:
        raise IllegalTransition(f"{src.value if src else 'created'} -> {dst.value} is not a "
                                f"legal job transition")


@dataclass(frozen=True, kw_only=True)
class Transition:
    """One recorded state change."""

    src: State | None  # None for the creation of the job
    dst: State
    at: float  # unix seconds
    attempt: int  # the attempt counter after the change
    reason: str  # machine-readable CamelCase cause, e.g. "WorkerLost"
    message: str = ""  # human-readable detail


@dataclass(frozen=True, kw_only=True)
class JobRecord:
    """A job as stored; `JobPublic` is its REST form."""

    id: str
    spec: JobCreate
    state: State
    attempt: int = 0  # number of attempts started so far (fencing token)
    reason: str = ""
    message: str = ""
    created_at: float = 0.0
    updated_at: float = 0.0
    state_since: float = 0.0  # when the job entered its current state (0: before v1.1)
    started_at: float | None = None  # first time any attempt reached Running
    finished_at: float | None = None  # when a terminal state was reached
    current_step: int = 0  # last step a worker reported
    steps_completed: int = 0  # optimizer steps done (the last reported step + 1, or resumed)
    last_checkpoint: str | None = None  # path of the newest checkpoint
    last_checkpoint_step: int | None = None
    stop_requested: bool = False
    not_before: float = 0.0  # Restarting: earliest time the next attempt may start
    redrives: int = 0  # attempts the controller started again itself (not restarts)
    trace_parent: str = ""  # W3C traceparent of the current attempt's job.schedule span
