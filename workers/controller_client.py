"""A rank's gRPC client to the controller (register, plan stream, reports, heartbeats).

Every call carries (job, attempt, rank, incarnation); a reply with `accepted=False` means
this process has been fenced off (a newer attempt exists, the job ended, or the rank was
declared lost and replaced) and raises `Fenced`, which ends the rank; so does
FAILED_PRECONDITION, the controller ending an attempt that cannot run (its dataset
vanished, no plan can hold a batch). `register` learns the process's incarnation and
every later call presents it. Calls retry while the controller is unreachable for up to
`reconnect_s`, so ranks survive a controller restart (a step report is retried until it
is acknowledged, which the controller does once it stored it); the plan stream resumes
from the first step not yet received. Trace context goes out as W3C `traceparent`
metadata on every call.

Every call also carries the attempt's secret as `authorization: Bearer <secret>` metadata
(from $RINGMASTER_WORKER_SECRET, which the launcher sets; never a command-line argument);
a call the controller refuses as unauthenticated raises `Unauthenticated` (a `Fenced`: the
rank ends). With $RINGMASTER_CONTROLLER_CA (a PEM, or the path of a PEM file) the channel
uses TLS and trusts that CA. The names match controller.worker_auth, which workers may not
import.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import TypeVar

import grpc
from opentelemetry import propagate

from controller.rpc import ringmaster_pb2 as pb
from controller.rpc import ringmaster_pb2_grpc as pb_grpc

T = TypeVar("T")
_RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
WORKER_SECRET_ENV = "RINGMASTER_WORKER_SECRET"
CONTROLLER_CA_ENV = "RINGMASTER_CONTROLLER_CA"


class Fenced(RuntimeError):
    """The controller no longer accepts this (job, attempt, rank)."""


class Unauthenticated(Fenced):
    """The controller refused this process's worker secret (or its lack of one)."""


def _channel(address: str, ca: str | None) -> grpc.Channel:
    if not ca:
        return grpc.insecure_channel(address)
    pem = ca.encode() if ca.lstrip().startswith("-----BEGIN") else open(ca, "rb").read()
    return grpc.secure_channel(address, grpc.ssl_channel_credentials(root_certificates=pem))


@dataclass(frozen=True, kw_only=True)
class WorkerIdentity:
    job_id: str  # the job's id in the controller
    attempt: int  # fencing token: the attempt this rank belongs to
    rank: int  # the rank (slot) of the job's full world
    incarnation: int = 0  # fencing token within the attempt: this process (from register)

    def to_pb(self) -> pb.WorkerId:
        return pb.WorkerId(job_id=self.job_id, attempt=self.attempt, rank=self.rank,
                           incarnation=self.incarnation)


class ControllerClient:
    """Thin typed wrapper over the generated stub with retries and fencing."""

    def __init__(self, address: str, identity: WorkerIdentity, *, call_timeout_s: float = 10.0,
                 reconnect_s: float = 120.0, secret: str | None = None, ca: str | None = None):
        self.identity = identity
        self._secret = secret if secret is not None else os.environ.get(WORKER_SECRET_ENV, "")
        self._channel = _channel(address, ca if ca is not None else
                                 os.environ.get(CONTROLLER_CA_ENV))
        self._stub = pb_grpc.WorkerServiceStub(self._channel)
        self._timeout = call_timeout_s
        self._reconnect_s = reconnect_s

    def close(self) -> None:
        self._channel.close()

    def _metadata(self) -> list[tuple[str, str]]:
        carrier: dict[str, str] = {}
        propagate.inject(carrier)
        auth = [("authorization", f"Bearer {self._secret}")] if self._secret else []
        return [*carrier.items(), *auth]

    def _refused(self, exc: grpc.RpcError) -> None:
        if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
            raise Unauthenticated(f"controller refused {self.identity}: {exc.details()} (is "
                                  f"{WORKER_SECRET_ENV} this attempt's secret?)") from None
        if exc.code() == grpc.StatusCode.FAILED_PRECONDITION:  # the attempt cannot go on
            raise Fenced(f"controller ended {self.identity}: {exc.details()}") from None

    def _call(self, fn: Callable[..., T], request) -> T:
        deadline = time.monotonic() + self._reconnect_s
        delay = 0.2
        while True:
            try:
                return fn(request, timeout=self._timeout, metadata=self._metadata())
            except grpc.RpcError as exc:
                self._refused(exc)
                if exc.code() not in _RETRYABLE or time.monotonic() > deadline:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 2.0)

    def _accepted(self, reply):
        if not reply.accepted:
            raise Fenced(f"controller rejected {self.identity}: {reply.reason}")
        return reply

    def register(self, *, host: str, pid: int) -> pb.RegisterReply:
        req = pb.RegisterRequest(worker=self.identity.to_pb(), host=host, pid=pid)
        reply = self._accepted(self._call(self._stub.Register, req))
        self.identity = replace(self.identity, incarnation=reply.incarnation)
        return reply

    def report_step(self, **fields) -> None:
        req = pb.StepReport(worker=self.identity.to_pb(), **fields)
        self._accepted(self._call(self._stub.ReportStep, req))

    def heartbeat(self, *, step: int, progress: int, syncing: bool = False,
                  position=None) -> pb.HeartbeatReply:
        """Liveness; `syncing`: blocked on peers (the step's collectives or a ring
        transfer); `position` (parallelism.progress.StepPosition) says where in the step
        the rank is."""
        req = pb.HeartbeatRequest(worker=self.identity.to_pb(), step=step, progress=progress,
                                  syncing=syncing)
        if position is not None:
            req.position.CopyFrom(pb.StepPosition(
                step=position.step, micro_batch=position.micro_batch, ring=list(position.ring),
                layer=position.layer, phase=position.phase, ring_hop=position.ring_hop,
                waiting=position.waiting))
        return self._accepted(self._call(self._stub.Heartbeat, req))

    def report_failure(self, *, step: int, error: str, user: bool = False,
                       failed_rank: int | None = None, lost_ranks: Sequence[int] = (),
                       recoverable: bool = False, cannot_replan: bool = False,
                       world_epoch: int = 0) -> None:
        """Tell the controller this attempt cannot go on: `user` for bad data or config
        (the job fails as InvalidInput, never retried), else an infrastructure failure
        (the job's failure policy decides). `failed_rank`: the rank at fault, when the
        driver reports for one. Elastic jobs (docs/elastic.md): a step of world
        `world_epoch` a vanished peer broke (`recoverable`); a world the state cannot be
        rebuilt for (`cannot_replan`); or, from the driver, ranks whose process died
        (`lost_ranks`). A report the controller refuses raises Fenced."""
        req = pb.FailureReport(worker=self.identity.to_pb(), step=step, error=error[:4000],
                               failure_class=pb.USER if user else pb.INFRASTRUCTURE,
                               lost_ranks=list(lost_ranks), recoverable=recoverable,
                               cannot_replan=cannot_replan, world_epoch=world_epoch)
        if failed_rank is not None:
            req.failed_rank = failed_rank
        self._accepted(self._call(self._stub.ReportFailure, req))

    def report_logs(self, entries: list[pb.LogEntry]) -> None:
        """Append this rank's log lines to the job's log (one call, at most ~1000 lines)."""
        req = pb.LogBatch(worker=self.identity.to_pb(), entries=entries)
        self._accepted(self._call(self._stub.ReportLogs, req))

    def plans(self, from_step: int, *, world_epoch: int = -1,
              formed: bool = False) -> Iterator[pb.PlanMessage]:
        """Plans from `from_step` on, reconnecting (and resuming) across controller restarts.

        `world_epoch`/`formed`: the last World this rank acted on and whether it formed it
        (docs/elastic.md). A message with `world` set ends the stream: form that world,
        then ask again with its epoch."""
        next_step = from_step
        deadline = time.monotonic() + self._reconnect_s
        while True:
            req = pb.PlanRequest(worker=self.identity.to_pb(), from_step=next_step,
                                 world_epoch=world_epoch, formed=formed)
            try:
                for msg in self._stub.StreamPlans(req, metadata=self._metadata()):
                    deadline = time.monotonic() + self._reconnect_s
                    yield msg
                    if msg.stop or msg.HasField("world"):
                        return
                    next_step = msg.step + 1
                return
            except grpc.RpcError as exc:
                self._refused(exc)
                if exc.code() == grpc.StatusCode.FAILED_PRECONDITION:
                    raise Fenced(f"controller closed the plan stream: {exc.details()}") from None
                if exc.code() not in _RETRYABLE or time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
