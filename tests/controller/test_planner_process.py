"""The planner process does not outlive a SIGKILLed controller."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import psutil

_CONTROLLER = """
import os, sys
from controller.planning import make_planner_pool
pool = make_planner_pool()
print(pool.submit(os.getpid).result(), flush=True)
sys.stdin.read()  # wait to be killed
"""


def test_planner_process_exits_when_the_controller_is_killed():
    proc = subprocess.Popen([sys.executable, "-c", _CONTROLLER], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, cwd=os.getcwd())
    try:
        planner = psutil.Process(int(proc.stdout.readline()))
        assert planner.is_running()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        # Generous: the watcher polls every second; a loaded box may be slow to run it.
        planner.wait(timeout=60)
        assert not planner.is_running()
    finally:
        if proc.poll() is None:
            proc.kill()
