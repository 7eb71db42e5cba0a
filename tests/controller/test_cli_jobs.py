"""`ringmaster submit/status/list/logs/stop/schema job` against a real controller on loopback.

Server errors must reach the user as one line on stderr (exit status 2), never a traceback.
"""

from __future__ import annotations

import json
import threading

import pytest
import yaml
from typer.testing import CliRunner

from controller.cli import app
from controller.store import StepMetrics
from tests.controller.harness import DEMO_SPEC


@pytest.fixture
def run(ctl, tmp_path):
    runner = CliRunner()
    env = {"RINGMASTER_URL": ctl.url, "RINGMASTER_TOKEN": ctl.token,
           "RINGMASTER_STATE_DIR": str(tmp_path)}

    def invoke(*args: str, token: str | None = None):
        e = dict(env) if token is None else {**env, "RINGMASTER_TOKEN": token}
        return runner.invoke(app, list(args), env=e)

    return invoke


@pytest.fixture
def spec_file(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({**DEMO_SPEC, "name": "cli"}))
    return path


def test_submit_status_list_stop_as_json(run, spec_file, ctl):
    r = run("submit", str(spec_file), "-o", "json")
    assert r.exit_code == 0, r.output
    job = json.loads(r.stdout)
    assert job["phase"] == "Pending" and job["name"] == "cli"
    status = json.loads(run("status", job["id"], "--output", "json").stdout)
    assert status["id"] == job["id"] and status["transitions"][0]["to_state"] == "Pending"
    listed = json.loads(run("list", "-o", "json", "--all", "--limit", "2").stdout)
    assert set(listed) == {"jobs", "next_page_token", "total"}  # the API's JobList
    assert job["id"] in [j["id"] for j in listed["jobs"]] and listed["next_page_token"] is None
    other = json.loads(run("submit", str(spec_file), "-o", "json").stdout)
    page = json.loads(run("list", "-o", "json", "--limit", "1").stdout)
    assert [j["id"] for j in page["jobs"]] == [other["id"]] and page["next_page_token"]
    run("stop", other["id"])
    stopped = json.loads(run("stop", job["id"], "-o", "json").stdout)
    assert stopped["result"] == "Stopped"


def test_tables_and_logs(run, spec_file, ctl):
    job_id = json.loads(run("submit", str(spec_file), "-o", "json").stdout)["id"]
    ctl.controller.store.append_logs(job_id, ["hello from rank 2"], rank=2)
    table = run("status", job_id)
    assert table.exit_code == 0 and job_id in table.stdout and "Pending" in table.stdout
    logs = run("logs", job_id)
    assert logs.exit_code == 0 and "r2: hello from rank 2" in logs.stdout
    run("stop", job_id)
    follow = run("logs", job_id, "-f")  # a finished job: follow ends after the last line
    assert follow.exit_code == 0 and "hello from rank 2" in follow.stdout


@pytest.mark.parametrize("args, fragment", [
    (("status", "no-such-job"), "job 'no-such-job' not found (HTTP 404)"),
    (("stop", "Bad_Id"), "job_id: String should match pattern"),
    (("logs", "no-such-job"), "not found"),
])
def test_server_errors_are_one_line(run, args, fragment):
    r = run(*args)
    assert r.exit_code == 2
    assert fragment in r.stderr and "Traceback" not in r.output
    assert len(r.stderr.strip().splitlines()) == 1


def test_wrong_token_and_bad_spec_are_one_line(run, spec_file, tmp_path):
    r = run("list", token="wrong")
    assert r.exit_code == 2 and "wrong bearer token (HTTP 401)" in r.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**DEMO_SPEC, "resources": {"num_ranks": -1}}))
    r = run("submit", str(bad))
    assert r.exit_code == 2 and "resources.num_ranks" in r.stderr
    assert "Traceback" not in r.output


def test_unreachable_controller_is_one_line(tmp_path, spec_file):
    from controller.testing import free_port

    r = CliRunner().invoke(app, ["list"], env={
        "RINGMASTER_URL": f"http://127.0.0.1:{free_port()}", "RINGMASTER_TOKEN": "x"})
    assert r.exit_code == 2 and "cannot reach the controller" in r.stderr


def test_schema_job_prints_the_job_spec_schema():
    r = CliRunner().invoke(app, ["schema", "job"])
    assert r.exit_code == 0
    schema = json.loads(r.stdout)
    assert schema["title"] == "JobCreate" and "resources" in schema["properties"]


def test_submit_wait_follows_the_job_to_its_result(run, spec_file, ctl):
    """A driver thread plays the workers: it steps the machine, reports steps, completes."""
    store, machine, launcher = ctl.controller.store, ctl.controller.machine, ctl.launcher
    done = threading.Event()

    def workers() -> None:
        reported = 0
        while not done.wait(0.05):
            machine.tick()
            for job_id in store.active_ids():
                job = store.get(job_id)
                if job.spec.name != "waited" or job.state.value != "Running":
                    continue
                reported += 1
                store.append_step_metrics(job_id, StepMetrics(
                    step=reported, attempt=job.attempt, loss=1.0 / reported,
                    tokens_per_s=1e4, predicted_step_s=0.1, measured_step_s=0.1,
                    imbalance=0.0))
                if reported == job.spec.training.steps:
                    launcher.complete(job_id)

    spec_file.write_text(yaml.safe_dump({**DEMO_SPEC, "name": "waited",
                                         "training": {"steps": 3, "global_batch_tokens": 64}}))
    driver = threading.Thread(target=workers, daemon=True)
    driver.start()
    try:
        r = run("submit", str(spec_file), "--wait", "-o", "json")
    finally:
        done.set()
        driver.join(timeout=10)
    assert r.exit_code == 0, r.output
    job = json.loads(r.stdout)
    assert (job["result"], job["current_step"], job["attempt"]) == ("Succeeded", 3, 1)
    # Without a terminal: plain lines (no bar, no control codes), the last one at N/N.
    lines = r.stderr.strip().splitlines()
    assert lines and all(line.startswith(f"{job['id']}: step ") for line in lines)
    assert lines[-1].startswith(f"{job['id']}: step 3/3 Succeeded")
    assert "\x1b" not in r.stderr


def test_tables_keep_full_ids_at_80_columns(run, ctl):
    spec = {**DEMO_SPEC, "name": "a-rather-long-job-name-that-users-do-write-x"}
    job = ctl.client().post("/v1/jobs", json=spec).json()
    for args in (("list",), ("list", "--wide"), ("status", job["id"])):
        r = run(*args, "--limit", "5") if args[0] == "list" else run(*args)
        assert r.exit_code == 0, r.output
        assert all(len(line) <= 80 for line in r.stdout.splitlines()), r.stdout
        assert any(job["id"] in line for line in r.stdout.splitlines()), r.stdout
    ctl.client().post(f"/v1/jobs/{job['id']}:stop")


def test_progress_on_a_terminal_ends_at_n_of_n():
    import io
    from datetime import UTC, datetime

    from rich.console import Console

    from controller.cli_watch import JobProgress
    from controller.schemas import JobPublic
    from controller.spec import parse_job_spec

    now = datetime.now(UTC)
    job = JobPublic(id="j-1", name="j", submission_id=None, phase="Finished",
                    result="Succeeded", reason="Completed", message="", attempt=1,
                    current_step=24, steps_completed=25, total_steps=25, last_checkpoint=None,
                    last_checkpoint_step=None, stop_requested=False, created_at=now,
                    updated_at=now, started_at=now, finished_at=now,
                    spec=parse_job_spec({**DEMO_SPEC, "training": {
                        "steps": 25, "global_batch_tokens": 64}}))
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=80)
    with JobProgress(console, job) as view:
        view.update(job, None)
    assert "step 25/25" in out.getvalue() and "step 24/25" not in out.getvalue()


def test_version():
    from importlib.metadata import version

    r = CliRunner().invoke(app, ["--version"])
    assert r.exit_code == 0 and r.stdout.strip() == f"ringmaster {version('ringmaster')}"


def test_metrics_table_json_and_follow(run, ctl):
    store = ctl.controller.store
    job = ctl.client().post("/v1/jobs", json={**DEMO_SPEC, "name": "watched"}).json()
    for step in range(3):
        store.append_step_metrics(job["id"], StepMetrics(
            step=step, attempt=1, loss=2.0 - step / 4, tokens_per_s=1000.0 * (step + 1),
            predicted_step_s=0.5, measured_step_s=0.25, imbalance=0.125, groups="1x2 2x1",
            peak_memory_bytes=3 << 20))
    table = run("metrics", job["id"])
    assert table.exit_code == 0, table.output
    assert all(len(line) <= 80 for line in table.stdout.splitlines())
    assert "1.5000" in table.stdout and "3,000" in table.stdout and "1x2 2x1" in table.stdout
    page = json.loads(run("metrics", job["id"], "-o", "json").stdout)
    assert set(page) == {"job_id", "steps", "next_since_step"}  # the API's MetricsPage
    assert [m["loss"] for m in page["steps"]] == [2.0, 1.75, 1.5]
    ctl.client().post(f"/v1/jobs/{job['id']}:stop")  # finished: --follow ends
    follow = run("metrics", job["id"], "--follow", "-o", "json")
    assert follow.exit_code == 0, follow.output
    assert [json.loads(line)["step"] for line in follow.stdout.splitlines()] == [0, 1, 2]
