"""Whose fault an error is: the REST API maps the domain families of scheduler.errors to
4xx naming the field and the value, and anything else (a bare ValueError, KeyError or
TypeError from inside the planner included) to a 500 with an error id that the log (with
the traceback) and the request's span repeat."""

from __future__ import annotations

import logging
import re
import time

import pytest
from fastapi import FastAPI
from pydantic import BaseModel
from starlette.testclient import TestClient

from controller.errors import install_error_handlers
from controller.store import CheckpointDirInUse, JobNotFound, SubmissionConflict
from scheduler.errors import (
    DatasetError,
    DeviceMemoryError,
    InfeasibleBatchError,
    PlanMemoryError,
    PlanValidationError,
    RingmasterError,
    SpecError,
)
from tests.controller.harness import DEMO_SPEC

ERROR_ID = re.compile(r"^[0-9a-f]{12}$")


class _Strict(BaseModel):
    n: int


def _raise(exc: BaseException):
    def route():
        raise exc
    return route


# (exception raised inside a handler, status, code)
MAPPED = [
    (SpecError("training.steps=0 must be >= 1"), 422, "invalid_request"),
    (DeviceMemoryError("model states need 9 GiB of 8", needed_bytes=9, available_bytes=8),
     422, "invalid_request"),
    (DatasetError("/d/x.idx: truncated at offset 12"), 422, "invalid_request"),
    (InfeasibleBatchError(3, 900, 400), 422, "invalid_request"),
    (PlanValidationError(["group 0: ranks [0, 0] repeat"]), 422, "invalid_request"),
    (PlanMemoryError(["group 0: 9 GiB over the 8 GiB budget"]), 422, "invalid_request"),
    (JobNotFound("job-1"), 404, "not_found"),
    (SubmissionConflict("s-1", "job-1"), 409, "conflict"),
    (CheckpointDirInUse("'/ckpt' is the checkpoint_dir of job job-1"), 409, "conflict"),
    (ValueError("an internal invariant broke"), 500, "internal"),
    (KeyError("groups"), 500, "internal"),
    (TypeError("unsupported operand"), 500, "internal"),
    (RingmasterError("a domain base class is no family"), 500, "internal"),
    (LookupError("not a NotFoundError"), 500, "internal"),
]


def _validation_error() -> Exception:
    try:
        _Strict.model_validate({"n": "many"})
    except ValueError as exc:  # pydantic's ValidationError is a ValueError
        return exc
    raise AssertionError("pydantic accepted a string for an int")


@pytest.mark.parametrize("exc, status, code", MAPPED + [(_validation_error(), 500, "internal")],
                         ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else str(v))
def test_the_status_follows_the_domain_class_not_valueerror(exc, status, code, caplog):
    app = FastAPI()
    install_error_handlers(app)
    app.get("/boom")(_raise(exc))
    with caplog.at_level(logging.ERROR, logger="controller.errors"), \
            TestClient(app, raise_server_exceptions=False) as client:
        r = client.get("/boom")
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code
    if status == 500:
        assert ERROR_ID.match(err["error_id"]) and err["error_id"] in err["message"]
        logged = [rec for rec in caplog.records if err["error_id"] in rec.getMessage()]
        assert logged and logged[0].exc_info[1] is exc
    else:
        assert "error_id" not in err
        assert " ".join(str(exc).split()) in err["message"] or err["message"] in str(exc)
        assert not [rec for rec in caplog.records if rec.levelno >= logging.ERROR]
    if isinstance(exc, CheckpointDirInUse):  # a conflict before it is a SpecError
        assert err["details"] == [{"field": "training.checkpoint_dir",
                                   "message": "'/ckpt' is the checkpoint_dir of job job-1"}]


def _spans_with_event(ctl, name: str, deadline_s: float = 20.0) -> list:
    """Finished spans holding an event `name` (the server span ends after the response)."""
    deadline = time.monotonic() + deadline_s
    while True:
        found = [s for s in ctl.spans.get_finished_spans()
                 if any(e.name == name for e in s.events)]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


@pytest.mark.parametrize("bug", [ValueError("memory planner: ceilings cannot be met"),
                                 KeyError("group_memory"),
                                 TypeError("'NoneType' object is not subscriptable")],
                         ids=lambda e: type(e).__name__)
def test_a_bug_inside_the_preview_planner_is_a_500_with_an_error_id(ctl, monkeypatch, caplog,
                                                                   bug):
    import scheduler.planner

    def broken_planner(*args, **kwargs):
        raise bug

    monkeypatch.setattr(scheduler.planner, "plan_batch", broken_planner)
    ctl.spans.clear()
    with caplog.at_level(logging.ERROR, logger="controller.errors"):
        r = ctl.client().post("/v1/jobs:plan", json=DEMO_SPEC, params={"num_batches": 1})
    assert r.status_code == 500, r.text
    err = r.json()["error"]
    error_id = err["error_id"]
    assert err["code"] == "internal" and ERROR_ID.match(error_id), err
    assert str(bug) not in err["message"]  # the client learns the id, not our internals
    logged = [rec for rec in caplog.records if error_id in rec.getMessage()]
    assert len(logged) == 1, [rec.getMessage() for rec in caplog.records]
    text = logging.Formatter().format(logged[0])
    assert "Traceback (most recent call last)" in text and "broken_planner" in text
    assert f"{type(bug).__name__}: {bug}" in text
    spans = _spans_with_event(ctl, "controller.internal_error")
    events = [e for s in spans for e in s.events if e.name == "controller.internal_error"]
    assert [e.attributes["error.id"] for e in events] == [error_id]
    assert events[0].attributes["exception.type"] == type(bug).__qualname__
    assert spans[0].attributes["error.id"] == error_id


def _with(**changes) -> dict:
    spec = {k: (dict(v) if isinstance(v, dict) else v) for k, v in DEMO_SPEC.items()}
    for path, value in changes.items():
        section, _, leaf = path.partition("__")
        if leaf:
            spec[section] = {**spec.get(section, {}), leaf: value}
        else:
            spec[section] = value
    return spec


def test_user_errors_are_4xx_naming_the_field_and_the_value(ctl, tmp_path):
    c = ctl.client()
    missing = str(tmp_path / "no-dataset")
    cases = [  # (request, status, field in details or None, fragments of the message)
        (("post", "/v1/jobs", _with(dataset={"path": missing})), 422, "dataset.path",
         ["dataset.path", repr(missing), "not found"]),
        (("post", "/v1/jobs", _with(resources__num_ranks=128)), 422, "resources.num_ranks",
         ["resources.num_ranks", "128", "64"]),
        (("post", "/v1/jobs", _with(resources={"num_ranks": 3, "cluster": dict(
            num_nodes=1, gpus_per_node=4, gpu_memory_gib=12, achieved_tflops=1,
            intra_node_bandwidth_gbps=2, inter_node_bandwidth_gbps=1, pcie_bandwidth_gbps=5,
            host_memory_gib=64)})), 422, "resources", ["num_ranks=3", "4 ranks"]),
        (("post", "/v1/jobs:plan", _with(planner={"time_limit_s": 50})), 422, None,
         ["planner.time_limit_s=50", "num_batches=2", "60 s"]),
        (("post", "/v1/jobs:plan", _with(resources={"num_ranks": 4, "capacity_tokens": 1,
                                                    "cluster": dict(
            num_nodes=1, gpus_per_node=4, gpu_memory_gib=12, achieved_tflops=0.05,
            intra_node_bandwidth_gbps=2, inter_node_bandwidth_gbps=1, pcie_bandwidth_gbps=5,
            host_memory_gib=1e-9)})), 422, None, ["sequence id", "of length", "cannot fit"]),
        (("post", "/v1/jobs:plan", _with(model=dict(  # not a list of 10**18 layer tensors
            vocab_size=256, hidden_size=64, num_layers=10**18, num_heads=4, num_kv_heads=2,
            ffn_hidden_size=128))), 422, "model.spec.num_layers",
         ["less than or equal to 10000", str(10**18)]),
        (("get", "/v1/jobs/no-such-job", None), 404, None, ["job 'no-such-job' not found"]),
    ]
    for (method, path, body), status, field, fragments in cases:
        r = c.request(method, path, json=body)
        assert r.status_code == status, (path, body, r.text)
        err = r.json()["error"]
        assert "error_id" not in err
        assert all(f in err["message"] for f in fragments), (fragments, err)
        if field is not None:
            assert field in [d["field"] for d in err["details"]], err


def test_a_query_value_checked_by_the_store_is_a_422_naming_it(ctl):
    job = ctl.client().post("/v1/jobs", json=_with(name="cursor-check")).json()
    big = "99999999999999999999-0"  # the route's pattern admits it; parts must be < 2**64
    r = ctl.client().get(f"/v1/jobs/{job['id']}/logs", params={"cursor": big})
    assert r.status_code == 422, r.text
    assert f"cursor={big!r} is not a log cursor" in r.json()["error"]["message"]


def test_conflicts_are_409_naming_the_value(ctl):
    c = ctl.client()
    first = c.post("/v1/jobs", json=_with(name="conflict", submission_id="sub-errors-1"))
    assert first.status_code == 201, first.text
    r = c.post("/v1/jobs", json=_with(name="conflict", submission_id="sub-errors-1",
                                      training={"steps": 11, "global_batch_tokens": 4096}))
    assert r.status_code == 409, r.text
    err = r.json()["error"]
    assert err["code"] == "conflict" and "error_id" not in err
    assert "submission_id='sub-errors-1'" in err["message"] and first.json()["id"] in \
        err["message"]


@pytest.mark.parametrize("exc, caught_as", [
    (SpecError("x"), ValueError), (DatasetError("x"), ValueError),
    (InfeasibleBatchError(0, 2, 1), ValueError), (PlanValidationError(["x"]), ValueError),
    (CheckpointDirInUse("x"), ValueError), (JobNotFound("j"), LookupError),
    (SubmissionConflict("s", "j"), RuntimeError)], ids=lambda v: type(v).__name__)
def test_callers_catching_the_builtin_classes_still_catch_them(exc, caught_as):
    """The families are added bases: what callers caught before, they still catch. A job
    that is not found or a conflict is no RingmasterError (which the worker service takes
    for 'this job cannot run as specified' and ends the attempt for)."""
    assert isinstance(exc, caught_as)
    if isinstance(exc, JobNotFound | SubmissionConflict):
        assert not isinstance(exc, RingmasterError)
