"""A small typed Python client of the REST API; the CLI is built on it.

    from controller.client import RingmasterClient
    with RingmasterClient() as rm:
        job = rm.submit("examples/demo-job.yaml")
        job = rm.wait(job.id)
        print(job.result, rm.metrics(job.id).steps[-1].loss)

Where it connects: `url` or $RINGMASTER_URL or the URL a local controller wrote into its
state directory (controller.json) or http://127.0.0.1:8080. The token: `token` or
$RINGMASTER_TOKEN or the state directory's `token` file. HTTPS is verified against `ca`,
else the CA a local TLS controller named in controller.json, else the system's (httpx
honours $SSL_CERT_FILE). Every non-2xx answer raises `ApiError` carrying the status and
the server's one-line message. `follow_logs` rides out a controller restart or a store
outage (503s, refused connections) for up to `outage_s` at a time, so a follow can run
for as long as the job does.
"""

from __future__ import annotations

import functools
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx

from controller.schemas import (
    JobEventList,
    JobList,
    JobPublic,
    LogChunk,
    LogLinePublic,
    MetricsPage,
    PlanPreview,
)
from controller.spec import JobCreate, inline_local_model, load_job_spec, parse_job_spec
from scheduler.errors import RingmasterError

DEFAULT_URL = "http://127.0.0.1:8080"
TRANSIENT = (0, 502, 503, 504)  # unreachable, or the controller/store briefly away


class ApiError(RingmasterError):
    """The controller answered with an error (or could not be reached: status 0)."""

    def __init__(self, status: int, message: str, *, code: str = "", details: list | None = None):
        self.status, self.code, self.details = status, code, details or []
        super().__init__(f"{message} (HTTP {status})" if status else message)


def _state_dir(state_dir: str | Path | None) -> Path:
    if state_dir is not None:
        return Path(state_dir)
    return Path(os.environ.get("RINGMASTER_STATE_DIR") or Path.home() / ".ringmaster")


def _endpoint(state_dir: Path) -> dict:
    try:
        info = json.loads((state_dir / "controller.json").read_text())
        return info if isinstance(info, dict) else {}
    except (OSError, ValueError):
        return {}


def resolve_url(url: str | None, state_dir: Path) -> str:
    if url or os.environ.get("RINGMASTER_URL"):
        return (url or os.environ["RINGMASTER_URL"]).rstrip("/")
    found = _endpoint(state_dir).get("url")
    return found.rstrip("/") if isinstance(found, str) else DEFAULT_URL


def resolve_ca(ca: str | Path | None, url: str, state_dir: Path) -> str | bool:
    """httpx's `verify`: the given CA, a local TLS controller's, else the system's."""
    if ca is not None:
        return str(ca)
    info = _endpoint(state_dir)
    if url.startswith("https://") and info.get("url", "").rstrip("/") == url and \
            isinstance(info.get("ca"), str):
        return info["ca"]
    return True


def resolve_token(token: str | None, state_dir: Path) -> str | None:
    if token or os.environ.get("RINGMASTER_TOKEN"):
        return token or os.environ["RINGMASTER_TOKEN"]
    path = state_dir / "token"
    return path.read_text().strip() if path.exists() else None


def to_spec(spec: JobCreate | dict | str | Path) -> JobCreate:
    """A JobCreate from a model, a dict, or a YAML/JSON file path (HF configs inlined)."""
    if isinstance(spec, JobCreate):
        return spec
    if isinstance(spec, dict):
        return parse_job_spec(spec)
    path = Path(spec)
    return inline_local_model(load_job_spec(path), base=path.parent)


class RingmasterClient:
    """Typed access to one controller (see the module docstring)."""

    def __init__(self, url: str | None = None, *, token: str | None = None,
                 state_dir: str | Path | None = None, timeout_s: float = 30.0,
                 transport: httpx.BaseTransport | None = None, ca: str | Path | None = None,
                 outage_s: float = 300.0):
        sd = _state_dir(state_dir)
        self.url = resolve_url(url, sd)
        self.token = resolve_token(token, sd)
        self.outage_s = outage_s
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout_s,
                                  transport=transport, verify=resolve_ca(ca, self.url, sd))

    def __enter__(self) -> RingmasterClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _call(self, method: str, path: str, *, timeout_s: float | None = None,
              **kwargs) -> httpx.Response:
        try:
            timeout = httpx.USE_CLIENT_DEFAULT if timeout_s is None else timeout_s
            resp = self._http.request(method, path, timeout=timeout, **kwargs)
        except httpx.TransportError as exc:
            raise ApiError(0, f"cannot reach the controller at {self.url} ({exc}); is "
                              "`ringmaster serve` running, or RINGMASTER_URL set?") from None
        if resp.status_code >= 400:
            raise _api_error(resp)
        return resp

    def health(self) -> bool:
        try:
            return self._http.get("/readyz").status_code == 200
        except httpx.TransportError:
            return False

    def submit(self, spec: JobCreate | dict | str | Path) -> JobPublic:
        body = to_spec(spec).model_dump(mode="json", exclude_none=True)
        return JobPublic.model_validate(self._call("POST", "/v1/jobs", json=body).json())

    def get(self, job_id: str) -> JobPublic:
        return JobPublic.model_validate(self._call("GET", f"/v1/jobs/{job_id}").json())

    def list(self, *, limit: int = 50, page_token: str | None = None) -> JobList:
        params = {"limit": limit, **({"page_token": page_token} if page_token else {})}
        return JobList.model_validate(self._call("GET", "/v1/jobs", params=params).json())

    def iter_jobs(self, *, page_size: int = 100) -> Iterator[JobPublic]:
        token = None
        while True:
            page = self.list(limit=page_size, page_token=token)
            yield from page.jobs
            if not (token := page.next_page_token):
                return

    def stop(self, job_id: str) -> JobPublic:
        return JobPublic.model_validate(self._call("POST", f"/v1/jobs/{job_id}:stop").json())

    def delete(self, job_id: str) -> None:
        self._call("DELETE", f"/v1/jobs/{job_id}")

    def logs(self, job_id: str, *, tail: int | None = None, cursor: str | None = None,
             follow: bool = False, wait_s: float = 10.0, limit: int = 500) -> LogChunk:
        params: dict = {"follow": follow, "wait_s": wait_s, "limit": limit}
        params.update({k: v for k, v in (("tail", tail), ("cursor", cursor)) if v is not None})
        resp = self._call("GET", f"/v1/jobs/{job_id}/logs", params=params,
                          timeout_s=wait_s + 30)
        return LogChunk.model_validate(resp.json())

    def follow_logs(self, job_id: str, *, tail: int | None = 100,
                    wait_s: float = 10.0) -> Iterator[LogLinePublic]:
        """Yield the last `tail` lines, then new lines as they come, until the job ends.

        A transient failure (controller restarting, store away) is retried with back-off
        from the last cursor, so no line is lost or repeated; only an outage longer than
        `outage_s` (or a 4xx, e.g. the job was deleted) ends the follow with ApiError.
        """
        chunk = self._riding_out(lambda: self.logs(job_id, tail=tail) if tail
                                 else self.logs(job_id, cursor="0"))
        yield from chunk.lines
        while not chunk.finished or chunk.lines:
            chunk = self._riding_out(functools.partial(
                self.logs, job_id, cursor=chunk.next_cursor, follow=True, wait_s=wait_s))
            yield from chunk.lines

    def _riding_out(self, call: Callable[[], LogChunk]) -> LogChunk:
        down_since, delay = None, 0.5
        while True:
            try:
                return call()
            except ApiError as exc:
                if exc.status not in TRANSIENT:
                    raise
                down_since = down_since or time.monotonic()
                if time.monotonic() - down_since > self.outage_s:
                    raise
            time.sleep(delay)
            delay = min(delay * 2, 10.0)

    def events(self, job_id: str, *, limit: int = 1000) -> JobEventList:
        """The job's world changes (rank_lost, world_shrunk, rank_joined, fallback_restart)."""
        resp = self._call("GET", f"/v1/jobs/{job_id}/events", params={"limit": limit})
        return JobEventList.model_validate(resp.json())

    def metrics(self, job_id: str, *, since_step: int = 0, limit: int = 1000) -> MetricsPage:
        resp = self._call("GET", f"/v1/jobs/{job_id}/metrics",
                          params={"since_step": since_step, "limit": limit})
        return MetricsPage.model_validate(resp.json())

    def preview(self, spec: JobCreate | dict | str | Path, *, num_batches: int = 2,
                gantt: bool = False) -> PlanPreview:
        body = to_spec(spec).model_dump(mode="json", exclude_none=True)
        resp = self._call("POST", "/v1/jobs:plan", json=body, timeout_s=600,
                          params={"num_batches": num_batches, "gantt": gantt})
        return PlanPreview.model_validate(resp.json())

    def wait(self, job_id: str, *, timeout_s: float | None = None, poll_s: float = 1.0,
             on_update: Callable[[JobPublic], None] | None = None) -> JobPublic:
        """Poll until the job has a result (or `timeout_s` passes: TimeoutError)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            job = self.get(job_id)
            if on_update is not None:
                on_update(job)
            if job.done:
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job.phase} after {timeout_s} s")
            time.sleep(poll_s)


def _api_error(resp: httpx.Response) -> ApiError:
    try:
        err = resp.json()["error"]
        return ApiError(resp.status_code, err["message"], code=err.get("code", ""),
                        details=err.get("details"))
    except (ValueError, KeyError, TypeError):
        return ApiError(resp.status_code, resp.text[:200] or resp.reason_phrase)
