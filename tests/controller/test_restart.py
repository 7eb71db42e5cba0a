"""A controller process killed with SIGKILL and started again keeps every job.

Runs `ringmaster serve` as a real subprocess on a loopback port with the embedded Redis in
a temporary state directory. Then it kills the Redis server as well (SIGKILL): the next
controller starts a fresh one that replays the append-only file.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import psutil
import pytest

from controller.client import RingmasterClient
from controller.testing import free_port, start_controller
from tests.controller.harness import DEMO_SPEC


def redis_pid(state_dir: Path) -> int:
    settings = json.loads((state_dir / "redis.db.settings").read_text())
    return int(Path(settings["pidfile"]).read_text())


def snapshot(rm: RingmasterClient) -> dict[str, tuple]:
    return {j.id: (j.phase, j.result, j.attempt, j.reason) for j in rm.iter_jobs(page_size=4)}


@pytest.mark.slow
def test_sigkilled_controller_restarts_with_every_job(tmp_path):
    port = free_port()
    proc = start_controller(tmp_path, port)
    pids = [redis_pid(tmp_path)]
    try:
        with RingmasterClient(f"http://127.0.0.1:{port}", state_dir=tmp_path) as rm:
            assert rm.token == (tmp_path / "token").read_text().strip()
            ids = [rm.submit({**DEMO_SPEC, "name": f"keep{i}"}).id for i in range(6)]
            rm.submit({**DEMO_SPEC, "name": "keep0", "submission_id": "s-1"})
            rm.stop(ids[0])
            deadline = time.monotonic() + 20  # the reconciler admits the others (fake)
            while time.monotonic() < deadline:
                before = snapshot(rm)
                if sum(s[0] == "Running" for s in before.values()) == 6:
                    break
                time.sleep(0.1)
        assert before[ids[0]][1] == "Stopped" and before[ids[1]][0] == "Running"
        assert len(before) == 7

        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        proc = start_controller(tmp_path, port)
        with RingmasterClient(f"http://127.0.0.1:{port}", state_dir=tmp_path) as rm:
            assert snapshot(rm) == before
            again = rm.submit({**DEMO_SPEC, "name": "keep0", "submission_id": "s-1"})
            assert again.id in before  # idempotency survives too

        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        os.kill(redis_pid(tmp_path), signal.SIGKILL)  # the store dies too: replay the AOF
        time.sleep(0.2)
        proc = start_controller(tmp_path, port)
        pids.append(redis_pid(tmp_path))
        assert pids[1] != pids[0]
        with RingmasterClient(f"http://127.0.0.1:{port}", state_dir=tmp_path) as rm:
            assert snapshot(rm) == before
            history = [t.to_state for t in rm.get(ids[0]).transitions]
            assert history[0] == "Pending" and history[-1] == "Stopped"
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        for pid in pids:  # a clean exit shuts its Redis down; make sure of it
            if psutil.pid_exists(pid):
                os.kill(pid, signal.SIGKILL)
    assert not (tmp_path / "controller.json").exists()
