"""The control-plane simulator speaks the real protocol (issue 19): 16 simulated ranks in
two processes against a real `ringmaster serve --launcher external`, its Redis server and
planner process (bench/control_plane.py). Functional, not timed.

What the ranks recorded themselves is the reference: every rank received every step's
plan once and in order, then the stop message; the controller's stored metrics have
every step, and each step's tokens are the sum of what all 16 ranks reported (so no
report was dropped from the aggregate). A rank that stops progressing is declared lost,
by rank number, after the job's heartbeat timeout.
"""

from __future__ import annotations

import pytest

from bench.control_plane import SimConfig, run_control_plane

NUM_RANKS, STEPS = 16, 4
SMALL = dict(num_ranks=NUM_RANKS, num_procs=2, tokens_per_rank=4096, max_length=16384,
             planner_time_limit_s=0.5, timeout_s=300.0)


def test_every_rank_gets_every_plan_in_order_and_every_report_is_stored(tmp_path):
    res = run_control_plane(SimConfig(steps=STEPS, step_time_s=0.2, **SMALL),
                            workdir=tmp_path)
    assert res.job_state == "Succeeded", (res.job_reason, res.job_message)
    ranks = sorted(r for log in res.logs for r in log.ranks)
    assert ranks == list(range(NUM_RANKS))
    for log in res.logs:
        assert log.fenced == {}
        for r in log.ranks:
            assert log.steps_received[r] == list(range(STEPS)), r
            assert log.stop_received[r], r
            assert sorted(log.reported_at[r]) == list(range(STEPS)), r
    assert res.metrics_steps == list(range(STEPS))
    for step in range(STEPS):
        sent = sum(log.tokens[r][step] for log in res.logs for r in log.ranks)
        assert sent > 0
        assert res.metrics_tokens[step] == pytest.approx(sent, rel=1e-9)


def test_a_rank_that_stops_progressing_is_declared_lost(tmp_path):
    res = run_control_plane(SimConfig(steps=8, step_time_s=0.2, heartbeat_timeout_s=2.0,
                                      lose_rank=5, lose_at_step=2, **SMALL),
                            workdir=tmp_path)
    assert res.job_state == "Failed", (res.job_reason, res.job_message)
    assert "rank 5 made no progress" in res.lost_message.lower()
    stalled = next(log.stalled_at for log in res.logs if 5 in log.ranks)
    # Not before the timeout has passed since its last progress (no upper bound: timing).
    assert res.lost_at is not None and res.lost_at - stalled >= 2.0 - 0.05
    lost_log = next(log for log in res.logs if 5 in log.ranks)
    assert lost_log.steps_received[5][:3] == [0, 1, 2]
    others = [r for log in res.logs for r in log.ranks if r != 5]
    assert all(log.fenced.get(r) for log in res.logs for r in log.ranks if r in others)
