"""Shared launches for the ring tests: spawning gloo ranks is the slow part on the dev box,
so one 3-rank world serves both the comm-protocol and the ring-misuse tests."""

from __future__ import annotations

import pytest

from tests.dist import run_distributed
from tests.parallelism.ring_cases import run_misuse_world


@pytest.fixture(scope="session")
def misuse_world() -> list[dict]:
    # short process-group timeout: the 'absent member' case must fail at it, quickly
    return run_distributed(run_misuse_world, 3, timeout_s=90, pg_timeout_s=6)
