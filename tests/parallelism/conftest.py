"""Shared launches for the ring tests: spawning gloo ranks is the slow part on the dev box,
so one 3-rank world serves both the comm-protocol and the ring-misuse tests."""

from __future__ import annotations

import pytest

from parallelism.worlds import run_distributed
from tests.parallelism.ring_cases import run_misuse_world


@pytest.fixture(scope="session")
def misuse_world() -> list[dict]:
    # the 'absent member' case must fail at the process-group timeout; 6 s was short enough
    # for the other collectives of this world to hit it on a loaded 2-core box
    return run_distributed(run_misuse_world, 3, timeout_s=180, pg_timeout_s=20)
