"""Property test of the whole REST API: schemathesis generates requests from the served
OpenAPI document (valid ones and deliberately invalid ones, and stateful sequences that
follow the document's links from a submitted job to get/stop/delete/logs/metrics) and no
answer may be a 5xx or fail to come (every request has a 30 s timeout; none may use it).

Over 1,000 requests in all against the real server on loopback; derandomized so a failure
reproduces. Valid-mode responses must also match the documented response schemas.
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.generation.modes import GenerationMode
from schemathesis.specs.openapi.checks import response_schema_conformance

from tests.controller.harness import DEMO_SPEC

# (generation mode, path parameters fixed to a real job?) -> number of cases
RUNS = {("positive", False): 340, ("negative", False): 290, ("positive", True): 160}
# Each scenario is a chain of up to 8 linked calls; how many a chain makes depends on the
# answers (a job may have finished by its next call), so on the machine's load: 45 chains
# leave a margin over STATEFUL_CALLS (40 made 295 calls on a loaded box).
STATEFUL_SCENARIOS = 45
STATEFUL_CALLS = 300  # with 90% of RUNS, at least 1,000 requests are asserted in all
TIMEOUT_S = 30


def _valid_spec(body) -> bool:
    from pydantic import ValidationError

    from controller.spec import JobCreate

    try:
        JobCreate.model_validate(body)
    except (ValidationError, ValueError, TypeError):
        return False
    return True


def _no_long_poll(case) -> None:
    if case.query and case.query.get("follow") in (True, "true"):
        case.query["wait_s"] = 0  # a long-poll of a live job would only slow the run


@pytest.mark.slow
@pytest.mark.parametrize("run_key", list(RUNS), ids=lambda k: f"{k[0]}{'-real-job' * k[1]}")
def test_no_request_yields_a_5xx(ctl, run_key):
    mode = GenerationMode(run_key[0])
    schema = schemathesis.openapi.from_url(f"{ctl.url}/openapi.json")
    auth = {"Authorization": f"Bearer {ctl.token}"}
    checks = [not_a_server_error]
    if mode is GenerationMode.POSITIVE:
        checks.append(response_schema_conformance)
    path_parameters = None
    if run_key[1]:  # exercise stop/delete/logs/metrics on a job that exists
        job = ctl.client().post("/v1/jobs", json=DEMO_SPEC).json()
        ctl.controller.store.append_logs(job["id"], ["a line"], rank=0)
        path_parameters = {"job_id": job["id"]}
    statuses: list[int] = []

    @given(case=schema.as_strategy(mode, path_parameters=path_parameters))
    @settings(max_examples=RUNS[run_key], deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    def run(case):
        _no_long_poll(case)
        response = case.call(base_url=ctl.url, headers=auth, timeout=TIMEOUT_S)
        statuses.append(response.status_code)
        case.validate_response(response, checks=checks, headers=auth)

    run()
    assert len(statuses) >= RUNS[run_key] * 0.9
    assert max(statuses) < 500
    assert any(200 <= s < 300 for s in statuses) or mode is GenerationMode.NEGATIVE


@pytest.mark.slow
def test_linked_sequences_yield_no_5xx(ctl):
    """Stateful: submit, then follow the links (get, stop, delete, logs, metrics) with the
    id the server returned, in random orders and with random other inputs."""
    schema = schemathesis.openapi.from_url(f"{ctl.url}/openapi.json")
    # schemathesis's dependency analysis reads `submission_id` (a key the client picks) as
    # a reference to a "Submission" resource nothing creates, and so would never start a
    # chain with a submit; tell it the submit needs nothing.
    schema.analysis.dependency_graph.operations["POST /v1/jobs"].inputs.clear()
    auth = {"Authorization": f"Bearer {ctl.token}"}
    calls: list[tuple[str, int]] = []

    class Machine(schema.as_state_machine()):
        def setup(self):
            # Every scenario starts from an empty store, so the same inputs meet the same
            # answers (hypothesis replays scenarios and insists on that).
            ctl.controller.store.r.flushdb()

        def before_call(self, case):
            _no_long_poll(case)
            if case.operation.label == "POST /v1/jobs" and not _valid_spec(case.body):
                # Random specs almost never validate (the cluster must fit num_ranks, ...);
                # the other runs fuzz bodies. Here a chain needs a job to start from.
                case.body = dict(DEMO_SPEC)

        def get_call_kwargs(self, case):
            return {"base_url": ctl.url, "headers": auth, "timeout": TIMEOUT_S}

        def validate_response(self, response, case, additional_checks=None, **kwargs):
            calls.append((case.operation.label, response.status_code))
            case.validate_response(response, checks=[not_a_server_error], headers=auth)

    Machine.run(settings=settings(max_examples=STATEFUL_SCENARIOS, stateful_step_count=8,
                                  deadline=None, derandomize=True, database=None,
                                  suppress_health_check=list(HealthCheck)))
    assert len(calls) >= STATEFUL_CALLS, len(calls)
    assert max(status for _, status in calls) < 500
    labels = {label for label, status in calls if status < 300}
    # The links were followed: an id from a 201 reached the routes that take one.
    assert {"POST /v1/jobs", "GET /v1/jobs/{job_id}"} <= labels, labels
    assert labels & {"POST /v1/jobs/{job_id}:stop", "DELETE /v1/jobs/{job_id}",
                     "GET /v1/jobs/{job_id}/logs", "GET /v1/jobs/{job_id}/metrics"}
