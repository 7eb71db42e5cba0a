"""The typed client: every call parses into the API's schemas; errors become ApiError."""

from __future__ import annotations

import pytest

from controller.client import ApiError, RingmasterClient
from controller.schemas import JobPublic
from tests.controller.harness import DEMO_SPEC


@pytest.fixture
def rm(ctl, tmp_path):
    (tmp_path / "token").write_text(ctl.token + "\n")  # found through the state directory
    (tmp_path / "controller.json").write_text(f'{{"url": "{ctl.url}"}}')
    with RingmasterClient(state_dir=tmp_path) as client:
        yield client


def test_state_directory_discovery_and_round_trip(rm, ctl):
    assert rm.url == ctl.url and rm.health()
    job = rm.submit({**DEMO_SPEC, "name": "client"})
    assert isinstance(job, JobPublic) and job.phase == "Pending" and not job.done
    assert rm.get(job.id).transitions[0].reason == "Submitted"
    assert job.id in [j.id for j in rm.iter_jobs(page_size=2)]
    with pytest.raises(ApiError, match="only a finished job") as exc:
        rm.delete(job.id)
    assert exc.value.status == 409 and exc.value.code == "conflict"
    with pytest.raises(TimeoutError, match="still Pending"):
        rm.wait(job.id, timeout_s=0.2, poll_s=0.05)
    assert rm.stop(job.id).result == "Stopped"
    assert rm.wait(job.id).result == "Stopped"
    rm.delete(job.id)
    with pytest.raises(ApiError) as exc:
        rm.get(job.id)
    assert exc.value.status == 404


def test_validation_errors_carry_field_details(rm):
    with pytest.raises(ApiError) as exc:
        rm._call("POST", "/v1/jobs", json={**DEMO_SPEC, "training": {"steps": 0}})
    assert exc.value.status == 422
    fields = {d["field"] for d in exc.value.details}
    assert {"training.steps", "training.global_batch_tokens"} <= fields


def test_wrong_token_and_unreachable_url(ctl):
    with RingmasterClient(ctl.url, token="nope") as bad, pytest.raises(ApiError) as exc:
        bad.list()
    assert exc.value.status == 401
    with RingmasterClient("http://127.0.0.1:9", token="x", timeout_s=2) as gone:
        assert not gone.health()
        with pytest.raises(ApiError, match="cannot reach the controller") as exc:
            gone.list()
    assert exc.value.status == 0
