"""The REST API (FastAPI), version 1: submit, watch, stop, delete and preview jobs.

`create_app(...)` wires the routes to a `JobStore`, a `JobStateMachine` and the Redis
handle given by the caller (controller.server builds the real ones; tests pass a
FakeLauncher). Every route but /healthz and /readyz needs `Authorization: Bearer <token>`,
/metrics (Prometheus, controller.prometheus) included.

Concurrency: the job routes are plain `def` functions on FastAPI's thread pool, where the
blocking Redis client belongs (every command bounded by a socket timeout). What can wait
is `async` and never takes a thread: /healthz, /readyz (a PING on its own small asyncio
pool) and the log route, whose `follow=true` long poll blocks in `XREAD BLOCK` on the
long-poll asyncio pool (socket timeout longer than the longest `wait_s`). So any number of
followers neither exhausts the thread pool nor delays a probe. Errors: see
controller.errors (no client input yields a 5xx); what the edge accepts: controller.edge.
docs/api.md documents every route with examples.

Annotations here are evaluated eagerly (no `from __future__ import annotations`): route
parameters are built in closures over the settings, and FastAPI must see their types.
"""

import contextlib
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import redis
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request, Response
from fastapi import Path as PathParam
from fastapi.responses import PlainTextResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from opentelemetry.sdk.trace import TracerProvider

from controller import preview as preview_mod
from controller import prometheus
from controller.edge import (
    JOB_ID_CONVERTOR,
    QueryBool,
    QueryFloat,
    QueryInt,
    SafeJsonRoute,
    confine_paths,
)
from controller.errors import BodyLimits, error_response, install_error_handlers
from controller.machine import JobStateMachine
from controller.redis_server import RedisHandle, async_client_like
from controller.schemas import (
    ErrorResponse,
    Health,
    JobEventList,
    JobEventPublic,
    JobList,
    JobPublic,
    LogChunk,
    LogLinePublic,
    MetricsPage,
    PlanPreview,
    StepMetricsPublic,
    WorldPublic,
)
from controller.spec import JobCreate
from controller.store import JobStore
from controller.telemetry import instrument_fastapi
from controller.validation import validate_job
from scheduler.errors import SpecError

API_VERSION = "v1"
JOB_ID_PATTERN = r"^[a-z0-9][-a-z0-9]{0,79}$"
STORE_UNAVAILABLE = "job store unavailable"


@dataclass(frozen=True, kw_only=True)
class ApiSettings:
    token: str  # the bearer token every client must present
    max_body_bytes: int = 1 << 20  # larger request bodies get 413
    body_timeout_s: float = 30.0  # a body not complete by then gets 408
    max_page_size: int = 500  # jobs per GET /v1/jobs page
    max_log_lines: int = 1000  # lines per GET .../logs chunk
    max_log_wait_s: float = 30.0  # longest a follow=true read blocks
    data_roots: tuple[Path, ...] = ()  # spec paths must lie inside one (empty: anywhere)


ERRORS: dict[int | str, dict[str, Any]] = {  # FastAPI's `responses`
    code: {"model": ErrorResponse} for code in (401, 404, 405, 408, 409, 413, 422, 503)}
JobId = Annotated[str, PathParam(pattern=JOB_ID_PATTERN,
                                 description="Job id from POST /v1/jobs.")]
JOB = f"/jobs/{{job_id:{JOB_ID_CONVERTOR}}}"
# OpenAPI links from a submitted job to what can be done with it (clients and the
# stateful schemathesis run follow them).
JOB_LINKS = {name: {"operationId": op, "parameters": {"job_id": "$response.body#/id"}}
             for name, op in (("GetJob", "getJob"), ("StopJob", "stopJob"),
                              ("DeleteJob", "deleteJob"), ("JobLogs", "jobLogs"),
                              ("JobMetrics", "jobMetrics"),
                              ("JobEvents", "jobEvents"))}


def create_app(*, store: JobStore, machine: JobStateMachine, settings: ApiSettings,
               redis_handle: RedisHandle | None = None,
               tracer_provider: TracerProvider | None = None) -> FastAPI:
    """The ASGI app; the caller owns store, machine, Redis and their lifetimes.

    `redis_handle` repoints the app's asyncio clients when it restarts an embedded Redis;
    without one they are made like the store's client.
    """
    if not settings.token:
        raise SpecError("settings.token: an empty bearer token would let anyone in")
    app = FastAPI(title="Ringmaster controller", version="1.0.0",
                  description="Submit, watch, stop and preview long-context training jobs.",
                  responses=ERRORS,
                  lifespan=_lifespan(redis_handle, store, settings.max_log_wait_s))
    install_error_handlers(app)
    app.add_middleware(BodyLimits, max_bytes=settings.max_body_bytes,
                       timeout_s=settings.body_timeout_s)
    tracer = (tracer_provider.get_tracer("controller.api") if tracer_provider
              else preview_mod.default_tracer())
    app.include_router(_health_router(settings.token))
    app.include_router(_jobs_router(store, machine, settings, tracer),
                       dependencies=[Depends(_auth(settings.token))])
    app.include_router(_metrics_router(store), dependencies=[Depends(_auth(settings.token))])
    if tracer_provider is not None:
        instrument_fastapi(app, tracer_provider)
    return app


def _lifespan(redis_handle: RedisHandle | None, store: JobStore, max_block_s: float):
    """Open the asyncio Redis clients in the server's event loop; close them there."""

    def client(purpose):
        if redis_handle is not None:
            return redis_handle.async_client(purpose)
        return async_client_like(store.r, purpose, max_block_s=max_block_s)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.long_poll = client("long_poll")
        app.state.probe = client("probe")
        try:
            yield
        finally:
            await app.state.long_poll.aclose()
            await app.state.probe.aclose()

    return lifespan


def _token_ok(header: str | None, expected: bytes) -> bool:
    scheme, _, credential = (header or "").partition(" ")
    return scheme.lower() == "bearer" and secrets.compare_digest(credential.strip().encode(),
                                                                 expected)


def _auth(token: str):
    bearer = HTTPBearer(auto_error=False, description="The controller's API token.")
    expected = token.encode()

    def require_token(cred: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if cred is None or cred.scheme.lower() != "bearer":
            raise HTTPException(401, "missing bearer token (Authorization: Bearer <token>)",
                                headers={"WWW-Authenticate": "Bearer"})
        if not secrets.compare_digest(cred.credentials.encode(), expected):
            raise HTTPException(401, "wrong bearer token", headers={"WWW-Authenticate":
                                                                    "Bearer"})

    return require_token


def _health_router(token: str) -> APIRouter:
    router = APIRouter(tags=["health"])
    expected = token.encode()

    @router.get("/healthz", response_model=Health, operation_id="healthz")
    async def healthz() -> Health:
        """The process is up (liveness); answers without touching Redis or a thread."""
        return Health(status="ok")

    @router.get("/readyz", response_model=Health, responses={503: {"model": Health}},
                operation_id="readyz")
    async def readyz(request: Request, response: Response) -> Health:
        """The job store answers (readiness). Why not is told to token holders only."""
        try:
            await request.app.state.probe.ping()
        except redis.RedisError as exc:
            response.status_code = 503
            response.headers["Retry-After"] = "1"
            told = _token_ok(request.headers.get("authorization"), expected)
            return Health(status="unavailable",
                          detail=f"{STORE_UNAVAILABLE}: {exc}" if told else STORE_UNAVAILABLE)
        return Health(status="ok")

    return router


def _metrics_router(store: JobStore) -> APIRouter:
    router = APIRouter(tags=["metrics"])
    registry = prometheus.make_registry(store)

    @router.get("/metrics", response_class=PlainTextResponse, operation_id="prometheusMetrics",
                responses={200: {"content": {"text/plain": {}},
                                 "description": "Prometheus text format 0.0.4."}})
    def metrics() -> Response:
        """Jobs and their newest step for Prometheus (controller.prometheus lists the
        series); needs the API token."""
        return Response(prometheus.render(registry),
                        media_type=prometheus.CONTENT_TYPE)

    return router


def _jobs_router(store: JobStore, machine: JobStateMachine, settings: ApiSettings,
                 tracer) -> APIRouter:
    router = APIRouter(prefix=f"/{API_VERSION}", tags=["jobs"], route_class=SafeJsonRoute)

    @router.post("/jobs:plan", response_model=PlanPreview, operation_id="previewJob")
    def preview_job(spec: JobCreate,
                    num_batches: Annotated[QueryInt, Query(ge=1, le=8)] = 2,
                    gantt: Annotated[QueryBool, Query(description="Include a PNG Gantt.")
                                     ] = False,
                    ) -> PlanPreview:
        """Dry run: plan the first global batches of the job's dataset (nothing starts)."""
        confine_paths(spec, settings.data_roots)
        validate_job(spec, launcher=machine.launcher, store=store)  # what submit checks
        return preview_mod.preview_plan(spec, num_batches=num_batches, gantt=gantt,
                                        tracer=tracer)

    @router.post("/jobs", response_model=JobPublic, status_code=201, operation_id="submitJob",
                 responses={200: {"model": JobPublic, "description": "Idempotent replay.",
                                  "links": JOB_LINKS},
                            201: {"description": "Submitted.", "links": JOB_LINKS}})
    def submit_job(spec: JobCreate, response: Response) -> JobPublic:
        """Submit a job; with a known submission_id and the same body, return that job."""
        confine_paths(spec, settings.data_roots)
        with tracer.start_as_current_span("job.submit") as span:
            span.set_attribute("job.name", spec.name)
            span.set_attribute("job.num_ranks", spec.resources.num_ranks)
            rec, created = store.find_submission(spec), False
            if rec is None:  # a replay returns the job it made; anything new is validated
                checked = validate_job(spec, launcher=machine.launcher, store=store)
                resume = (checked.resume.path, checked.resume.step) if checked.resume else None
                rec, created = store.create(spec, resume=resume)
            span.set_attribute("job.id", rec.id)
            span.set_attribute("job.created", created)
        if not created:
            response.status_code = 200
        return JobPublic.of(rec)

    @router.get("/jobs", response_model=JobList, operation_id="listJobs")
    def list_jobs(limit: Annotated[QueryInt, Query(ge=1, le=settings.max_page_size)] = 50,
                  page_token: Annotated[str | None, Query(max_length=19,
                                                          pattern=r"^[0-9]+$")] = None,
                  ) -> JobList:
        """Jobs, newest first, one page at a time."""
        records, token = store.list(limit=limit, page_token=page_token)
        return JobList(jobs=[JobPublic.of(r) for r in records], next_page_token=token,
                       total=store.count())

    @router.get(JOB, response_model=JobPublic, operation_id="getJob",
                responses={200: {"description": "The job.", "links": JOB_LINKS}})
    def get_job(job_id: JobId) -> JobPublic:
        """One job, with every state transition it went through and its current world."""
        rec = store.get(job_id)
        world = WorldPublic.of(store.world(job_id), rec.spec.resources.num_ranks, rec.attempt)
        return JobPublic.of(rec, store.transitions(job_id), world=world)

    @router.post(f"{JOB}:stop", response_model=JobPublic, operation_id="stopJob",
                 responses={200: {"description": "Stopping or stopped.", "links": JOB_LINKS}})
    def stop_job(job_id: JobId) -> JobPublic:
        """Stop a job (idempotent while it stops; 409 once it has finished)."""
        return JobPublic.of(machine.request_stop(job_id))

    @router.delete(JOB, status_code=204, response_class=Response, operation_id="deleteJob")
    def delete_job(job_id: JobId) -> Response:
        """Delete a finished job and its metrics and logs (409 while it is active)."""
        store.delete(job_id)
        return Response(status_code=204)

    _add_watch_routes(router, store, settings)
    return router


def _add_watch_routes(router: APIRouter, store: JobStore, settings: ApiSettings) -> None:
    @router.get(f"{JOB}/logs", response_model=LogChunk, operation_id="jobLogs")
    async def job_logs(request: Request, job_id: JobId,
                       tail: Annotated[QueryInt | None, Query(
                           ge=1, le=settings.max_log_lines, description="Last N lines.")
                       ] = None,
                       cursor: Annotated[str | None, Query(
                           max_length=41, pattern=r"^[0-9]{1,20}(-[0-9]{1,20})?$",
                           description="next_cursor of the previous chunk; '0' = start.")
                       ] = None,
                       follow: QueryBool = False,
                       wait_s: Annotated[QueryFloat, Query(ge=0, le=settings.max_log_wait_s)
                                         ] = 10.0,
                       limit: Annotated[QueryInt, Query(ge=1, le=settings.max_log_lines)
                                        ] = 500,
                       ) -> LogChunk | Response:
        """A bounded chunk of a job's log; follow=true waits up to wait_s for new lines."""
        if tail is not None and cursor is not None:
            return error_response(422, "tail and cursor: give one, not both", details=[
                {"field": "query.tail", "message": "conflicts with cursor"}])
        block = int(wait_s * 1000) if follow and cursor is not None else 0
        lines, nxt, state = await store.read_logs_async(
            request.app.state.long_poll, job_id, cursor=cursor, tail=tail, limit=limit,
            block_ms=block)
        return LogChunk(job_id=job_id, lines=[LogLinePublic.of(x) for x in lines],
                        next_cursor=nxt, finished=state.terminal)

    @router.get(f"{JOB}/events", response_model=JobEventList, operation_id="jobEvents")
    def job_events(job_id: JobId,
                   limit: Annotated[QueryInt, Query(ge=1, le=10_000)] = 1000) -> JobEventList:
        """The job's world changes: rank_lost, world_shrunk, rank_joined, fallback_restart."""
        return JobEventList(job_id=job_id, events=[
            JobEventPublic.of(e) for e in store.events(job_id, limit=limit)])

    @router.get(f"{JOB}/metrics", response_model=MetricsPage, operation_id="jobMetrics")
    def job_metrics(job_id: JobId,
                    since_step: Annotated[QueryInt, Query(ge=0, le=2**53)] = 0,
                    limit: Annotated[QueryInt, Query(ge=1, le=10_000)] = 1000) -> MetricsPage:
        """Per-step loss, tokens/s, predicted vs measured step time and imbalance."""
        rows = store.step_metrics(job_id, since_step=since_step, limit=limit)
        nxt = rows[-1].step + 1 if len(rows) == limit else None
        return MetricsPage(job_id=job_id, steps=[StepMetricsPublic.of(m) for m in rows],
                           next_since_step=nxt)
