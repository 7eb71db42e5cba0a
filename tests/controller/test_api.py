"""REST API over real HTTP on loopback, with the embedded Redis: auth, validation,
idempotency, paging, stop/delete rules, logs/metrics, size limits and tracing."""

from __future__ import annotations

import copy
import time

import pytest

from controller.store import StepMetrics
from tests.controller.harness import DEMO_SPEC


def body(**changes) -> dict:
    """DEMO_SPEC with dotted-path changes; a value of ... deletes the field."""
    out = copy.deepcopy(DEMO_SPEC)
    for path, value in changes.items():
        *parents, leaf = path.split("__")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        if value is ...:
            node.pop(leaf, None)
        else:
            node[leaf] = value
    return out


def test_health_is_open_everything_else_needs_the_token(ctl):
    anon, wrong = ctl.client(None), ctl.client("not-the-token")
    assert anon.get("/healthz").json() == {"status": "ok", "detail": ""}
    assert anon.get("/readyz").status_code == 200
    for client in (anon, wrong):
        for method, path in (("GET", "/v1/jobs"), ("POST", "/v1/jobs"),
                             ("GET", "/v1/jobs/abc"), ("POST", "/v1/jobs/abc:stop"),
                             ("DELETE", "/v1/jobs/abc"), ("POST", "/v1/jobs:plan"),
                             ("GET", "/v1/jobs/abc/logs"), ("GET", "/v1/jobs/abc/metrics")):
            r = client.request(method, path, json=DEMO_SPEC)
            assert r.status_code == 401, (method, path, r.text)
            assert r.headers["www-authenticate"] == "Bearer"
    assert "missing bearer token" in anon.get("/v1/jobs").json()["error"]["message"]
    assert "wrong bearer token" in wrong.get("/v1/jobs").json()["error"]["message"]
    basic = ctl.client(None).get("/v1/jobs", headers={"Authorization": "Basic dGVzdA=="})
    assert basic.status_code == 401


def test_submission_is_idempotent_on_submission_id(ctl):
    c = ctl.client()
    spec = body(submission_id="client-42", name="idem")
    first = c.post("/v1/jobs", json=spec)
    again = c.post("/v1/jobs", json=spec)
    assert first.status_code == 201 and again.status_code == 200
    assert again.json()["id"] == first.json()["id"]
    changed = c.post("/v1/jobs", json={**spec, "training": {"steps": 11,
                                                            "global_batch_tokens": 4096}})
    assert changed.status_code == 409
    err = changed.json()["error"]
    assert err["code"] == "conflict" and "submission_id='client-42'" in err["message"]
    no_key = [c.post("/v1/jobs", json=body(name="nokey")).json()["id"] for _ in range(2)]
    assert no_key[0] != no_key[1]  # without a key every POST is a new job


MALFORMED = [
    (body(name=...), "name", "Field required"),
    (body(name="Bad_Name"), "name", "String should match pattern"),
    (body(submission_id="has space"), "submission_id", "pattern"),
    (body(model="gpt-5"), "model.preset", "Input should be 'tiny', 'llama-7b'"),
    (body(dataset__path=""), "dataset.path", "at least 1 character"),
    (body(resources__num_ranks=0), "resources.num_ranks", "greater than or equal to 1"),
    (body(resources__num_ranks=12, resources__cluster="h100"), "resources",
     "num_ranks=12 is not a multiple"),
    (body(resources__cluster="tpu"), "resources.cluster.preset",
     "'h100', 'a100', 'a800' or 'cpu'"),
    (body(training__steps=-1), "training.steps", "greater than or equal to 1"),
    (body(training__learning_rate="fast"), "training.learning_rate", "valid number"),
    (body(planner__policy="magic"), "planner.policy", "'hdp', 'naive' or 'static'"),
    (body(failure__max_restarts=1.5), "failure.max_restarts", "valid integer"),
    (body(training__batch=3), "training.batch", "unknown field"),
    (body(extra_top_level=True), "extra_top_level", "unknown field"),
    (body(resources=[1, 2]), "resources", "valid dictionary"),
]


@pytest.mark.parametrize("spec, field, fragment", MALFORMED,
                         ids=[m[1] + ":" + m[2][:20] for m in MALFORMED])
def test_malformed_specs_get_422_naming_the_field(ctl, spec, field, fragment):
    r = ctl.client().post("/v1/jobs", json=spec)
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["code"] == "invalid_request"
    assert field in [d["field"] for d in err["details"]], err
    assert fragment in err["message"] and field in err["message"]


@pytest.mark.parametrize("content, ctype", [
    (b"{not json", "application/json"), (b"", "application/json"), (b"[1, 2]", "application/json"),
    (b"\xff\xfe\x00garbage", "application/json"), (b"name: demo", "text/yaml"),
    (b'"just a string"', "application/json"), (b"null", "application/json"),
])
def test_garbage_bodies_get_4xx_never_5xx(ctl, content, ctype):
    r = ctl.client().post("/v1/jobs", content=content, headers={"Content-Type": ctype})
    assert 400 <= r.status_code < 500, r.text
    assert r.json()["error"]["message"]


def test_oversized_body_is_413(ctl):
    huge = body(name="huge")
    huge["dataset"]["path"] = "x" * (2 << 20)
    r = ctl.client().post("/v1/jobs", json=huge)
    assert r.status_code == 413 and "over" in r.json()["error"]["message"]

    def chunks():  # no Content-Length: the limit applies to what actually arrives
        for _ in range(300):
            yield b"x" * 8192

    r = ctl.client().post("/v1/jobs", content=chunks(), headers={"Content-Type":
                                                                  "application/json"})
    assert r.status_code == 413


def test_bad_query_and_path_parameters(ctl):
    c = ctl.client()
    assert c.get("/v1/jobs", params={"limit": 0}).status_code == 422
    r = c.get("/v1/jobs", params={"page_token": "abc"})
    assert r.status_code == 422 and "query.page_token" in r.json()["error"]["message"]
    assert c.get("/v1/jobs/NOT..valid").status_code == 422
    assert c.get("/v1/jobs/no-such-job").status_code == 404
    assert c.post("/v1/jobs/no-such-job:stop").status_code == 404
    assert c.get("/v1/jobs/no-such-job/logs").status_code == 404


def test_paging_walks_every_job_once_newest_first(ctl):
    c = ctl.client()
    ids = [c.post("/v1/jobs", json=body(name=f"page{i}")).json()["id"] for i in range(7)]
    seen, token = [], None
    while True:
        params = {"limit": 3, **({"page_token": token} if token else {})}
        page = c.get("/v1/jobs", params=params).json()
        assert len(page["jobs"]) <= 3
        seen += [j["id"] for j in page["jobs"]]
        token = page["next_page_token"]
        if token is None:
            break
    assert len(seen) == len(set(seen)) == page["total"]
    assert [i for i in seen if i in ids] == ids[::-1]


def test_stop_and_delete_rules(ctl):
    c, machine = ctl.client(), ctl.controller.machine
    job = c.post("/v1/jobs", json=body(name="lifecycle")).json()
    r = c.delete(f"/v1/jobs/{job['id']}")
    assert r.status_code == 409 and "only a finished job" in r.json()["error"]["message"]
    machine.tick(), machine.tick()
    assert c.get(f"/v1/jobs/{job['id']}").json()["phase"] == "Running"
    stopping = c.post(f"/v1/jobs/{job['id']}:stop").json()
    assert stopping["phase"] == "Stopping" and stopping["stop_requested"]
    assert c.post(f"/v1/jobs/{job['id']}:stop").status_code == 200  # idempotent
    machine.tick()
    done = c.get(f"/v1/jobs/{job['id']}").json()
    assert (done["phase"], done["result"], done["reason"]) == ("Finished", "Stopped",
                                                               "StopRequested")
    assert [t["to_state"] for t in done["transitions"]] == [
        "Pending", "Scheduling", "Running", "Stopping", "Stopped"]
    r = c.post(f"/v1/jobs/{job['id']}:stop")
    assert r.status_code == 409 and "already finished" in r.json()["error"]["message"]
    assert c.delete(f"/v1/jobs/{job['id']}").status_code == 204
    assert c.get(f"/v1/jobs/{job['id']}").status_code == 404


def test_logs_and_metrics_are_served_from_the_store(ctl):
    c, store = ctl.client(), ctl.controller.store
    job_id = c.post("/v1/jobs", json=body(name="watch")).json()["id"]
    store.append_logs(job_id, [f"step {i}" for i in range(12)], rank=0)
    for step in range(1, 4):
        store.append_step_metrics(job_id, StepMetrics(
            step=step, attempt=1, loss=4.0 - step, tokens_per_s=5e3, predicted_step_s=1.0,
            measured_step_s=1.1, imbalance=0.03))
    tail = c.get(f"/v1/jobs/{job_id}/logs", params={"tail": 5}).json()
    assert [x["text"] for x in tail["lines"]] == [f"step {i}" for i in range(7, 12)]
    first = c.get(f"/v1/jobs/{job_id}/logs", params={"cursor": "0", "limit": 10}).json()
    rest = c.get(f"/v1/jobs/{job_id}/logs", params={"cursor": first["next_cursor"],
                                                     "follow": True, "wait_s": 0.2}).json()
    assert len(first["lines"]) == 10 and [x["text"] for x in rest["lines"]] == ["step 10",
                                                                                "step 11"]
    empty = c.get(f"/v1/jobs/{job_id}/logs", params={"cursor": rest["next_cursor"],
                                                      "follow": True, "wait_s": 0.2}).json()
    assert empty["lines"] == [] and empty["next_cursor"] == rest["next_cursor"]
    for bad in ("99999999999999999999-0", "18446744073709551616", "1-2-3", "-1"):
        r = c.get(f"/v1/jobs/{job_id}/logs", params={"cursor": bad})
        assert r.status_code == 422 and "cursor" in r.json()["error"]["message"], bad
    both = c.get(f"/v1/jobs/{job_id}/logs", params={"cursor": "0", "tail": 3})
    assert both.status_code == 422 and "tail and cursor" in both.json()["error"]["message"]
    m = c.get(f"/v1/jobs/{job_id}/metrics", params={"since_step": 2}).json()
    assert [(s["step"], s["loss"], s["measured_step_s"]) for s in m["steps"]] == [
        (2, 2.0, 1.1), (3, 1.0, 1.1)]
    assert c.get(f"/v1/jobs/{job_id}").json()["current_step"] == 3


def test_spans_of_a_submit_share_one_trace(ctl):
    ctl.spans.clear()
    r = ctl.client().post("/v1/jobs", json=body(name="traced", submission_id="trace-1"))
    assert r.status_code == 201
    deadline = time.monotonic() + 5  # the server span ends just after the response is sent
    while not any(s.name == "POST /v1/jobs" for s in ctl.spans.get_finished_spans()):
        assert time.monotonic() < deadline, "no server span"
        time.sleep(0.01)
    server = next(s for s in ctl.spans.get_finished_spans() if s.name == "POST /v1/jobs")
    trace_id = server.context.trace_id
    spans = [s for s in ctl.spans.get_finished_spans() if s.context.trace_id == trace_id]
    by_name = {s.name: s for s in spans}
    submit, transition = by_name["job.submit"], by_name["job.transition"]
    redis_spans = [s for s in spans if s.attributes.get("db.system") == "redis"
                   or s.attributes.get("db.system.name") == "redis"]
    assert len(redis_spans) >= 2, [s.name for s in spans]  # INCR, then the MULTI/EXEC
    assert server.parent is None  # the request's root span
    assert submit.parent.span_id == server.context.span_id
    assert transition.parent.span_id == submit.context.span_id
    assert all(s.parent.span_id in (submit.context.span_id, transition.context.span_id)
               for s in redis_spans)
    assert transition.attributes["job.to"] == "Pending"
    assert submit.attributes["job.id"] == r.json()["id"]
    assert submit.resource.attributes["service.name"] == "ringmaster-controller"
