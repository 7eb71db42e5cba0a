"""RayLauncher without Ray: a stand-in driver executable exercises the launcher's part
(detached start, exit-status protocol, log forwarding, graceful stop, rediscovery of
drivers after a controller restart, gang admission)."""

from __future__ import annotations

import os
import stat
import sys
import threading
import time

import pytest

from controller.launchers.base import EventKind, LauncherEvent
from controller.launchers.ray import RayLauncher
from controller.spec import parse_job_spec
from controller.states import JobRecord, State

FAKE_DRIVER = """#!{python}
import json, os, signal, sys, time
args = sys.argv[1:]
exit_file = args[args.index("--exit-file") + 1]
mode = os.environ.get("FAKE_MODE", "ok")
print("hello from", args[args.index("--job") + 1], "attempt", args[args.index("--attempt") + 1],
      flush=True)
def done(code, message):
    json.dump({{"code": code, "message": message}}, open(exit_file, "w"))
    sys.exit(code)
signal.signal(signal.SIGTERM, lambda *a: done(0, "drained"))
if mode == "ok":
    done(0, "finished")
if mode == "fail":
    done(3, "bad config")
if mode == "vanish":
    os._exit(9)
time.sleep(60)
"""


def job(name: str, ranks: int = 2) -> JobRecord:
    spec = parse_job_spec({"name": name, "model": "tiny", "dataset": {"path": "/d"},
                           "resources": {"num_ranks": ranks, "cluster": "cpu"},
                           "training": {"steps": 1, "global_batch_tokens": 10}})
    return JobRecord(id=f"{name}-1", spec=spec, state=State.SCHEDULING, attempt=1)


@pytest.fixture
def launcher(tmp_path, monkeypatch):
    exe = tmp_path / "fake-python"
    exe.write_text(FAKE_DRIVER.format(python=sys.executable))
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    logs: list[tuple[str, list[str]]] = []

    def make(**kw):
        kw.setdefault("on_logs", lambda j, lines: logs.append((j, lines)))
        return RayLauncher(state_dir=tmp_path / "state", controller_address="127.0.0.1:1",
                           python=str(exe), total_ranks=4, drain_timeout_s=5, **kw)

    return make, logs, monkeypatch


def events_until(launcher: RayLauncher, timeout_s: float = 20.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = launcher.poll()
        if got:
            return got
        time.sleep(0.05)
    raise TimeoutError("no launcher event")


@pytest.mark.parametrize("mode,kind", [("ok", EventKind.COMPLETED), ("fail", EventKind.FAILED),
                                       ("vanish", EventKind.WORKER_LOST)])
def test_exit_status_becomes_an_event(launcher, mode, kind):
    make, logs, mp = launcher
    mp.setenv("FAKE_MODE", mode)
    rl = make()
    rl.start(job("a"), 1)
    (event,) = events_until(rl)
    assert (event.job_id, event.attempt, event.kind) == ("a-1", 1, kind)
    assert any("hello from a-1 attempt 1" in line for _, lines in logs for line in lines)


def test_stop_drains_then_reports_stopped(launcher):
    make, _, mp = launcher
    mp.setenv("FAKE_MODE", "hang")
    rl = make()
    rl.start(job("b"), 1)
    time.sleep(0.5)
    assert rl.poll() == []
    rl.stop("b-1")
    (event,) = events_until(rl, timeout_s=30)  # SIGTERM after the drain timeout
    assert event.kind is EventKind.STOPPED


def test_drivers_are_found_again_after_a_controller_restart(launcher):
    make, _, mp = launcher
    mp.setenv("FAKE_MODE", "hang")
    first = make()
    first.start(job("c"), 1)
    pid = first._drivers["c-1"].pid
    first.close()  # the controller goes away; the driver keeps running
    second = make()
    assert second._drivers["c-1"].pid == pid
    assert not second.admit(job("d", ranks=3))  # 2 of 4 ranks are still taken
    os.killpg(pid, 9)
    os.waitpid(pid, 0)  # reaped, as init reaps a dead controller's orphaned driver
    (event,) = events_until(second)
    assert event.kind is EventKind.WORKER_LOST and "without an exit status" in event.message
    assert second.admit(job("d", ranks=3))


def test_gang_admission(launcher):
    make, _, mp = launcher
    rl = make()
    assert rl.admit(job("e", ranks=4))
    assert not rl.admit(job("f", ranks=5))
    ready = LauncherEvent(job_id="e-1", attempt=1, kind=EventKind.READY)
    rl.report(ready)  # what the gRPC service observed comes out of poll()
    assert rl.poll() == [ready]


def test_report_does_not_wait_for_a_poll_busy_with_io(launcher):
    """The gRPC service's report() must not wait while poll() forwards logs (on_logs
    writes to the job store) or kills a driver: here on_logs blocks until released, and
    report(), tracks() and admit() still return (10 s: "did not block" on a loaded box)."""
    make, _, mp = launcher
    mp.setenv("FAKE_MODE", "hang")
    entered, release = threading.Event(), threading.Event()

    def on_logs(job_id, lines):
        entered.set()
        release.wait(60)

    rl = make(on_logs=on_logs)
    rl.start(job("g"), 1)
    pid = rl._drivers["g-1"].pid
    polled: list = []
    poller = threading.Thread(target=lambda: polled.extend(events_until(rl, 60)), daemon=True)
    poller.start()
    ready = LauncherEvent(job_id="g-1", attempt=1, kind=EventKind.READY)
    try:
        assert entered.wait(60), "the driver's output never reached on_logs"
        for call, args in ((rl.report, (ready,)), (rl.tracks, ("g-1", 1)),
                           (rl.admit, (job("h"),))):
            t = threading.Thread(target=call, args=args, daemon=True)
            t.start()
            t.join(10)
            assert not t.is_alive(), f"{call.__name__} waited for poll()'s I/O"
    finally:
        release.set()
        poller.join(60)
        os.killpg(pid, 9)
        rl._children[pid].wait()
    assert polled == [ready]  # delivered by the poll that was busy, once
