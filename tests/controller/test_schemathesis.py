"""Property test of the whole REST API: schemathesis generates requests from the served
OpenAPI document (valid ones and deliberately invalid ones) and no answer may be a 5xx.

A few hundred cases against the real server on loopback; derandomized so a failure
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
RUNS = {("positive", False): 150, ("negative", False): 120, ("positive", True): 80}


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
        if case.query and case.query.get("follow") in (True, "true"):
            case.query["wait_s"] = 0  # a long-poll of a live job would only slow the run
        response = case.call(base_url=ctl.url, headers=auth, timeout=30)
        statuses.append(response.status_code)
        case.validate_response(response, checks=checks, headers=auth)

    run()
    assert len(statuses) >= RUNS[run_key] * 0.9
    assert max(statuses) < 500
    assert any(200 <= s < 300 for s in statuses) or mode is GenerationMode.NEGATIVE
