"""Checkpoint-directory ownership: who may write where, and what resume_from resolves to."""

from __future__ import annotations

from pathlib import Path

import pytest

from scheduler.checkpoint_owner import (
    checkpoints,
    claim,
    claim_conflict,
    read_owner,
    resolve_resume,
)
from scheduler.errors import SpecError


def saved(directory: Path, *steps: int, partial: int | None = None) -> Path:
    for step in steps:
        (directory / f"step_{step}").mkdir(parents=True)
        (directory / f"step_{step}" / ".metadata").write_bytes(b"x")
    if partial is not None:  # an unfinished save: no .metadata
        (directory / f"step_{partial}").mkdir(parents=True)
    return directory


def test_checkpoints_are_complete_step_directories_in_step_order(tmp_path):
    saved(tmp_path, 10, 2, 4, partial=12)
    (tmp_path / "step_x").mkdir()
    assert [c.step for c in checkpoints(tmp_path)] == [2, 4, 10]
    assert resolve_resume(tmp_path).path == str(tmp_path / "step_10")
    assert resolve_resume(tmp_path / "step_4").step == 4
    with pytest.raises(SpecError, match="no complete checkpoint"):
        resolve_resume(saved(tmp_path / "empty", partial=3))


def test_a_job_claims_a_fresh_directory_and_keeps_it(tmp_path):
    first = claim(tmp_path / "c", job_id="a-1", job_name="a")
    assert read_owner(tmp_path / "c") == first and first.resumed_from_job is None
    saved(tmp_path / "c", 2)
    assert claim(tmp_path / "c", job_id="a-1") == first  # its own restarts
    assert claim_conflict(tmp_path / "c", job_id="b-2", resume_from=None) is not None
    with pytest.raises(SpecError, match="training.checkpoint_dir: .* job a-1"):
        claim(tmp_path / "c", job_id="b-2")
    assert read_owner(tmp_path / "c").job_id == "a-1"


@pytest.mark.parametrize("name", ["the directory", "a step in it"])
def test_resume_from_takes_a_directory_over(tmp_path, name):
    claim(tmp_path, job_id="a-1")
    saved(tmp_path, 2, 4)
    resume = str(tmp_path) if name == "the directory" else str(tmp_path / "step_2")
    owner = claim(tmp_path, job_id="b-2", resume_from=resume)
    assert owner.job_id == "b-2" and owner.resumed_from_job == "a-1"
    assert read_owner(tmp_path) == owner


def test_a_directory_without_complete_checkpoints_can_be_claimed_again(tmp_path):
    claim(tmp_path, job_id="a-1")
    saved(tmp_path, partial=2)  # a-1 failed before any save finished
    assert claim(tmp_path, job_id="b-2").resumed_from_job == "a-1"
