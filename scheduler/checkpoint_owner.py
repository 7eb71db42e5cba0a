"""Who owns a checkpoint directory, and which checkpoint in it a job may resume from.

A job's `training.checkpoint_dir` holds one `step_<n>` directory per saved checkpoint
(workers.checkpoint writes them; `.metadata` inside marks one complete) and a small owner
record, `ringmaster-owner.json`, naming the job that writes there. Two runs never mix in
one directory: a job pointed at a directory that holds another job's checkpoints is
refused at submit (the controller reads the record) and again by the workers before they
write (rank 0 claims the directory), unless the job's `training.resume_from` names that
directory (or a checkpoint in it): then it continues the other run and takes the directory
over. A directory whose owner left no complete checkpoint holds nothing to mix and may be
claimed again.

Torch-free and filesystem-only, so the controller (which may see the storage read-only)
and the workers apply the same rule. The record is written atomically (temporary file,
rename), so a reader sees the old owner or the new one, never half a file.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from scheduler.errors import SpecError

OWNER_FILE = "ringmaster-owner.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")


@dataclass(frozen=True, kw_only=True)
class CheckpointOwner:
    """The owner record of a checkpoint directory."""

    job_id: str  # the job that writes checkpoints here
    job_name: str = ""
    claimed_at: float = 0.0  # unix seconds
    resumed_from_job: str | None = None  # the previous owner, when the job took it over


@dataclass(frozen=True, kw_only=True)
class Checkpoint:
    """One complete checkpoint: its directory and the optimizer step it holds."""

    path: str
    step: int


def read_owner(directory: str | Path) -> CheckpointOwner | None:
    """The directory's owner record; None when there is none (or it is unreadable junk)."""
    try:
        data = json.loads((Path(directory) / OWNER_FILE).read_text())
        return CheckpointOwner(**{k: data[k] for k in ("job_id", "job_name", "claimed_at",
                                                       "resumed_from_job") if k in data})
    except (OSError, ValueError, TypeError, KeyError):
        return None


def write_owner(directory: str | Path, owner: CheckpointOwner) -> None:
    """Record `owner` (atomically; creates the directory)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".{OWNER_FILE}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(asdict(owner), indent=1) + "\n")
    tmp.replace(directory / OWNER_FILE)


def checkpoints(directory: str | Path) -> list[Checkpoint]:
    """Complete `step_<n>` checkpoints in `directory`, oldest step first."""
    out = []
    try:
        entries = list(Path(directory).iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []
    for entry in entries:
        m = _STEP_DIR.match(entry.name)
        if m and (entry / ".metadata").is_file():
            out.append(Checkpoint(path=str(entry), step=int(m.group(1))))
    return sorted(out, key=lambda c: c.step)


def resolve_resume(path: str | Path) -> Checkpoint:
    """The checkpoint `training.resume_from` names: a `step_<n>` directory itself, or the
    newest complete one in a checkpoint directory. SpecError says what is there instead."""
    path = Path(path)
    m = _STEP_DIR.match(path.name)
    if m and (path / ".metadata").is_file():
        return Checkpoint(path=str(path), step=int(m.group(1)))
    if not path.is_dir():
        raise SpecError(f"{str(path)!r}: no such directory")
    found = checkpoints(path)
    if not found:
        raise SpecError(f"{str(path)!r} holds no complete checkpoint (a step_<n> directory "
                         "with .metadata)")
    return found[-1]


def same_directory(a: str | Path, b: str | Path) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def resumes_from(directory: str | Path, resume_from: str | None) -> bool:
    """Whether `resume_from` names `directory` or a checkpoint directly inside it."""
    if not resume_from:
        return False
    return same_directory(directory, resume_from) or (
        bool(_STEP_DIR.match(Path(resume_from).name))
        and same_directory(directory, Path(resume_from).parent))


def claim_conflict(directory: str | Path, *, job_id: str | None,
                   resume_from: str | None) -> str | None:
    """Why job `job_id` may not write checkpoints into `directory` (None: it may).

    Refused: a directory holding complete checkpoints of another job (or of a run that left
    no owner record), unless `resume_from` names it. `job_id` None: a job not created yet.
    """
    found = checkpoints(directory)
    if not found or resumes_from(directory, resume_from):
        return None
    owner = read_owner(directory)
    if owner is not None and job_id is not None and owner.job_id == job_id:
        return None
    whose = f"job {owner.job_id}" if owner is not None else "a run with no owner record"
    return (f"{str(directory)!r} holds checkpoints of {whose} (newest step_{found[-1].step}); "
            "set training.resume_from to this directory to continue that run, or choose "
            "another checkpoint_dir")


def claim(directory: str | Path, *, job_id: str, job_name: str = "",
          resume_from: str | None = None) -> CheckpointOwner:
    """Make `job_id` the directory's owner (SpecError when `claim_conflict` refuses)."""
    why = claim_conflict(directory, job_id=job_id, resume_from=resume_from)
    if why is not None:
        raise SpecError(f"training.checkpoint_dir: {why}")
    previous = read_owner(directory)
    if previous is not None and previous.job_id == job_id:
        return previous
    owner = CheckpointOwner(job_id=job_id, job_name=job_name, claimed_at=time.time(),
                            resumed_from_job=previous.job_id if previous else None)
    write_owner(directory, owner)
    return owner
