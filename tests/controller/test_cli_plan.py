"""`ringmaster plan`: every input format, both outputs, the Gantt chart, clear errors."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from controller.cli import app
from scheduler.plan import StepPlan

LENGTHS = [200, 150, 90, 40, 30, 7, 5, 3]
TINY = ["--ranks", "4", "--model", "tiny", "--cluster", "cpu", "--capacity-tokens", "64",
        "--time-limit", "0.2"]


def run(*args: str):
    return CliRunner().invoke(app, ["plan", *args])


@pytest.fixture(params=["lines", "json", "npy"])
def lengths_file(request, tmp_path):
    if request.param == "lines":
        path = tmp_path / "lengths.txt"
        path.write_text("\n".join(map(str, LENGTHS)) + "\n")
    elif request.param == "json":
        path = tmp_path / "lengths.json"
        path.write_text(json.dumps(LENGTHS))
    else:
        path = tmp_path / "lengths.npy"
        np.save(path, np.asarray(LENGTHS, dtype=np.int64))
    return path


def test_json_output_is_a_valid_plan_with_predictions(lengths_file):
    # naive keeps every sequence on its minimum ring D(s) (D(200)=4, D(150)=3, D(90)=2 at
    # 64 tokens per rank), so the ring sizes show that every length was read.
    res = run("--lengths", str(lengths_file), *TINY, "--policy", "naive", "--output", "json")
    assert res.exit_code == 0, res.output
    plan = StepPlan.model_validate_json(res.stdout)
    plan.check(LENGTHS)
    assert plan.predicted.makespan_s >= plan.predicted.lower_bound_s > 0
    assert {g.ring_size for _, g in plan.groups()} == {1, 2, 3, 4}


def test_table_summarises_groups_bound_and_speedup(tmp_path):
    path = tmp_path / "l.txt"
    path.write_text("\n".join(map(str, LENGTHS)))
    res = run("--lengths", str(path), *TINY, "--policy", "naive")
    assert res.exit_code == 0, res.output
    for text in ("naive plan", "ring size", "makespan / bound", "speed-up vs static",
                 "best CP=", "speed-up vs pow2 dynamic CP", "peak / budget", "fp32 /"):
        assert text in res.stdout


def test_png_gantt_is_written(tmp_path):
    path = tmp_path / "l.json"
    path.write_text(json.dumps(LENGTHS))
    png = tmp_path / "plan.png"
    res = run("--lengths", str(path), *TINY, "--png", str(png))
    assert res.exit_code == 0, res.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_same_seed_same_plan(tmp_path):
    path = tmp_path / "l.json"
    path.write_text(json.dumps([int(x) for x in np.random.default_rng(5).integers(1, 300, 40)]))
    outs = [run("--lengths", str(path), *TINY, "--output", "json", "--seed", "3").stdout
            for _ in range(2)]
    assert outs[0] == outs[1]


@pytest.mark.parametrize(("content", "extra", "message"), [
    ("[5, 0, 3]", [], "lengths[1]=0"),
    ("[]", [], "batch is empty"),
    ("5\nabc\n", [], "entry 1 is 'abc'"),
    ("[5, 6]", ["--ranks", "0"], "--ranks 0"),
    ("[5, 6]", ["--cluster", "tpu"], "cluster='tpu'"),
])
def test_user_mistakes_exit_2_with_one_line(tmp_path, content, extra, message):
    path = tmp_path / "l.txt"
    path.write_text(content)
    args = [*TINY, *extra] if "--ranks" not in extra else [*TINY[2:], *extra]
    res = run("--lengths", str(path), *args)
    assert res.exit_code == 2
    assert message in res.stderr
    assert "Traceback" not in res.output


def test_missing_file_exits_2(tmp_path):
    res = run("--lengths", str(tmp_path / "nope.txt"), *TINY)
    assert res.exit_code == 2 and "file not found" in res.stderr


def test_infeasible_batch_exits_2_with_id_length_and_limit(tmp_path):
    # Run as a user does (the installed entry point), so the exit status is the real one.
    path = tmp_path / "l.json"
    path.write_text("[5, 1000000000, 7]")
    proc = subprocess.run([sys.executable, "-c", "from controller.cli import main; main()",
                           "plan", "--lengths", str(path), *TINY],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "sequence id 1 of length 1000000000 cannot fit" in proc.stderr
    assert "largest length that fits" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_json_carries_per_group_predictions(tmp_path):
    path = tmp_path / "l.json"
    path.write_text(json.dumps(LENGTHS))
    res = run("--lengths", str(path), *TINY, "--output", "json", "--precision", "fp64")
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    plan = StepPlan.model_validate(data)
    assert plan.version == 2 and plan.memory.precision == "fp64"
    groups = [g for _, g in plan.groups()]
    for g, p in zip(groups, data["predicted"]["groups"], strict=True):
        assert len(p["flops_per_rank"]) == len(p["bytes_sent_per_rank"]) == \
            len(p["peak_bytes_per_rank"]) == g.ring_size
        assert all(b <= plan.memory.device_budget_bytes for b in p["peak_bytes_per_rank"])


def test_a_model_that_cannot_fit_is_refused_naming_bytes(tmp_path):
    path = tmp_path / "l.json"
    path.write_text(json.dumps([4096, 100]))
    res = run("--lengths", str(path), "--ranks", "8", "--model", "llama-70b")
    assert res.exit_code == 2
    assert "model states need" in res.output and "device budget is 72.00 GiB" in res.output
