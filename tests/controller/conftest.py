"""One real controller (embedded Redis, FakeLauncher, uvicorn on loopback) per test module."""

from __future__ import annotations

import pytest

from tests.controller.harness import running_controller


@pytest.fixture(scope="module")
def ctl(tmp_path_factory):
    with running_controller(tmp_path_factory.mktemp("state")) as harness:
        yield harness
