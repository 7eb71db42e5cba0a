"""What the REST edge accepts, over real HTTP: strict types, paths, bodies, 405s, long polls.

Each test is a probe that broke an earlier controller (issue 23): a 300-byte path
component (a 500), a full-width digit in a page token (a 503 "Redis unavailable"), bodies
that do not parse (a 400 without a field), `true`/"4" as integers, 405s naming one
method, log long-polls longer than the Redis socket timeout (a 503) and enough of them to
starve the thread pool that /healthz ran on.
"""

from __future__ import annotations

import copy
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from controller.client import ApiError, RingmasterClient
from controller.schemas import LogChunk
from scheduler.synth import synthesize
from tests.controller.harness import DEMO_SPEC


def spec(**sections) -> dict:
    out = copy.deepcopy(DEMO_SPEC)
    for name, value in sections.items():
        out[name] = {**out.get(name, {}), **value} if isinstance(value, dict) else value
    return out


def error_of(r: httpx.Response) -> dict:
    assert r.status_code == 422, (r.status_code, r.text)
    return r.json()["error"]


@pytest.mark.parametrize("route", ["/v1/jobs", "/v1/jobs:plan"])
def test_a_300_byte_path_component_is_a_422_naming_the_field(ctl, route):
    for field, body in (
            ("dataset.path", spec(dataset={"path": "/data/" + "x" * 300 + "/d"})),
            ("training.checkpoint_dir", spec(training={"checkpoint_dir": "/c/" + "é" * 150})),
            ("model.path", spec(model="/m/" + "y" * 300 + ".json"))):
        err = error_of(ctl.client().post(route, json=body))
        assert field in [d["field"] for d in err["details"]], err
        assert "at most 255" in err["message"]


def test_preview_of_an_unreadable_path_is_a_422_not_a_500(ctl, tmp_path):
    for path in (str(tmp_path), "/proc/self/mem", "/" + "a" * 250 + "/" + "b" * 250):
        r = ctl.client().post("/v1/jobs:plan", json=spec(dataset={"path": path}))
        assert r.status_code == 422, (path, r.text)
    synthesize(tmp_path / "data", distribution="uniform", num_samples=20, max_length=50,
               seed=1)
    (tmp_path / "dir.json").mkdir()
    r = ctl.client().post("/v1/jobs:plan", json=spec(model=str(tmp_path / "dir.json"),
                                                     dataset={"path": str(tmp_path / "data")}))
    assert r.status_code == 422 and "model" in r.json()["error"]["message"], r.text


@pytest.mark.parametrize("query", [
    {"page_token": "\uff11"}, {"page_token": "\u0663"}, {"limit": "\uff15"},
    {"limit": "+5"}, {"limit": " 5"}, {"limit": "5_0"}])
def test_non_ascii_or_sloppy_digits_are_a_422(ctl, query):
    err = error_of(ctl.client().get("/v1/jobs", params=query))
    assert f"query.{next(iter(query))}" in err["message"]


def test_log_cursors_and_query_booleans_are_strict(ctl):
    c = ctl.client()
    job_id = c.post("/v1/jobs", json=spec(name="strict-logs")).json()["id"]
    for params in ({"cursor": "\uff11-0"}, {"cursor": "0", "follow": "yes"},
                   {"cursor": "0", "follow": "1"}, {"tail": "\uff13"},
                   {"cursor": "0", "wait_s": "1e1"}):
        error_of(c.get(f"/v1/jobs/{job_id}/logs", params=params))
    assert c.get(f"/v1/jobs/{job_id}/logs", params={"cursor": "0", "follow": "false"}
                 ).status_code == 200
    error_of(c.post("/v1/jobs:plan", params={"gantt": "on"}, json=DEMO_SPEC))


@pytest.mark.parametrize("value", [True, "4", 4.0, "yes"])
def test_integers_are_not_coerced(ctl, value):
    err = error_of(ctl.client().post("/v1/jobs", json=spec(resources={"num_ranks": value})))
    assert "resources.num_ranks" in [d["field"] for d in err["details"]]
    assert "valid integer" in err["message"]


@pytest.mark.parametrize("content, fragment", [
    (b"[" * 1200 + b"]" * 1200, "nested deeper than 64"),
    (b'{"name": ' + b"9" * 5000 + b"}", "4300 digits"),
    (b'{"name": "\xff"}', "not UTF-8"),
    (b'{"name": NaN}', "NaN"),
    (b'{"name": "x",}', "line 1 column"),
])
def test_bodies_that_do_not_parse_are_a_422_that_says_why(ctl, content, fragment):
    r = ctl.client().post("/v1/jobs", content=content,
                          headers={"Content-Type": "application/json"})
    err = error_of(r)
    assert err["details"][0]["field"] == "body" and fragment in err["message"], err
    assert r.headers.get("connection") != "close"  # a 4xx, not a broken connection


@pytest.mark.parametrize("method, path, allow", [
    ("GET", "/v1/jobs/abc-1:stop", "POST"), ("PUT", "/v1/jobs/abc-1", "GET, DELETE"),
    ("GET", "/v1/jobs:plan", "POST"), ("DELETE", "/v1/jobs", "GET, POST"),
    ("POST", "/healthz", "GET")])
def test_405_lists_every_method_of_the_path(ctl, method, path, allow):
    r = ctl.client().request(method, path)
    assert r.status_code == 405, r.text
    assert sorted(r.headers["allow"].split(", ")) == sorted(allow.split(", "))
    assert r.json()["error"]["code"] == "method_not_allowed"


def test_a_12_s_long_poll_returns_200_on_time(ctl):
    c = ctl.client()
    job_id = c.post("/v1/jobs", json=spec(name="long-poll")).json()["id"]
    t0 = time.monotonic()
    r = c.get(f"/v1/jobs/{job_id}/logs", params={"cursor": "0", "follow": True, "wait_s": 12},
              timeout=120)
    waited = time.monotonic() - t0
    assert r.status_code == 200, r.text
    assert r.json()["lines"] == [] and r.json()["finished"] is False
    assert waited >= 11.9  # it did wait; the Redis client did not give up at its 3 s timeout


def blocked_xreads(ctl) -> int:
    return sum(1 for c in ctl.controller.store.r.client_list() if c.get("cmd") == "xread")


def test_parallel_follows_leave_probes_and_the_api_responsive(ctl):
    """More follows than uvicorn's 40 worker threads, all blocked at once in XREAD; the
    probes and a plain API call still answer while every follow is still waiting."""
    num = 48
    c = ctl.client()
    job_id = c.post("/v1/jobs", json=spec(name="many-follows")).json()["id"]
    limits = httpx.Limits(max_connections=num + 8, max_keepalive_connections=num + 8)
    follows = httpx.Client(base_url=ctl.url, headers={"Authorization": f"Bearer {ctl.token}"},
                           timeout=120, limits=limits)
    params = {"cursor": "0", "follow": True, "wait_s": 30}
    with ThreadPoolExecutor(num) as pool:
        futures = [pool.submit(follows.get, f"/v1/jobs/{job_id}/logs", params=params)
                   for _ in range(num)]
        deadline = time.monotonic() + 60
        while blocked_xreads(ctl) < num:
            assert time.monotonic() < deadline and not any(f.done() for f in futures), \
                f"{blocked_xreads(ctl)} of {num} follows blocked"
            time.sleep(0.05)
        probe = ctl.client(None)
        assert probe.get("/healthz", timeout=20).status_code == 200
        assert probe.get("/readyz", timeout=20).status_code == 200
        assert c.get(f"/v1/jobs/{job_id}", timeout=20).status_code == 200
        assert not any(f.done() for f in futures)  # answered while every follow waited
        ctl.controller.store.append_logs(job_id, ["wake up"], rank=0)
        replies = [f.result(timeout=60) for f in futures]
    follows.close()
    assert all(r.status_code == 200 for r in replies)
    assert all([x["text"] for x in r.json()["lines"]] == ["wake up"] for r in replies)


def test_follow_logs_rides_out_a_controller_outage(monkeypatch):
    """`ringmaster logs -f` keeps following across 503s and refused connections, from the
    cursor it had, and gives up only after `outage_s` of failures."""
    import controller.client as client_mod

    calls = {"n": 0}

    def handler(request: httpx.Request) -> httpx.Response:
        calls["n"] += 1
        if calls["n"] in (2, 3):
            return httpx.Response(503, json={"error": {"code": "unavailable",
                                                       "message": "store away"}})
        if calls["n"] == 4:
            raise httpx.ConnectError("controller restarting")
        cursor = request.url.params.get("cursor")
        assert cursor in (None, "5-0")  # resumed exactly where it stopped
        body = LogChunk(job_id="j", lines=[], next_cursor="5-0", finished=cursor is not None)
        return httpx.Response(200, json=body.model_dump(mode="json"))

    sleeps: list[float] = []
    monkeypatch.setattr(client_mod.time, "sleep", sleeps.append)
    rm = RingmasterClient("http://rm.test", token="t", transport=httpx.MockTransport(handler))
    assert list(rm.follow_logs("j", tail=5)) == []
    assert calls["n"] == 5 and len(sleeps) == 3
    rm.outage_s, calls["n"] = 0.0, 1
    with pytest.raises(ApiError, match="store away"):
        list(rm.follow_logs("j", tail=5))


def test_a_follow_of_a_finished_job_says_so(ctl):
    c = ctl.client()
    job_id = c.post("/v1/jobs", json=spec(name="ends")).json()["id"]
    assert c.post(f"/v1/jobs/{job_id}:stop").status_code == 200
    after = c.get(f"/v1/jobs/{job_id}/logs", params={"cursor": "0", "follow": True,
                                                     "wait_s": 30}, timeout=60).json()
    assert after["finished"] is True and after["lines"] == []
