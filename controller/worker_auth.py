"""Who may call the workers' gRPC port: the ranks of a job's current attempt, nobody else.

Every attempt of every job has its own secret, `WorkerAuth.secret_for(job_id, attempt)`:
HMAC-SHA256 under a key the controller derives from its API token, so it survives a
controller restart without being stored anywhere, a worker of one attempt cannot act for
another attempt or job, and the token cannot be recovered from a secret. The launcher
hands the secret to the attempt's processes out of band (`WORKER_SECRET_ENV` in the Ray
job's environment; a per-attempt Kubernetes Secret the pods reference), never on a
command line (`ps` shows those to every local user). Workers send it on every call as
`authorization: Bearer <secret>` metadata; the service compares in constant time before it
looks at anything else (an unauthenticated caller learns nothing, not even whether the job
exists), then applies the attempt fence. Rotating the API token invalidates the secrets of
running attempts: their calls are refused and the attempts restart with new secrets.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable

from scheduler.errors import SpecError

METADATA_KEY = "authorization"
WORKER_SECRET_ENV = "RINGMASTER_WORKER_SECRET"  # where a worker process finds its secret
CONTROLLER_CA_ENV = "RINGMASTER_CONTROLLER_CA"  # PEM (or a PEM file's path): TLS to the port
_KEY_LABEL = b"ringmaster worker secrets v1"


class WorkerAuth:
    """Derives and checks per-attempt worker secrets (see the module docstring)."""

    def __init__(self, key: bytes):
        if len(key) < 16:
            raise ValueError("WorkerAuth key must be at least 16 bytes")
        self._key = key

    @classmethod
    def from_token(cls, token: str) -> WorkerAuth:
        if not token:
            raise SpecError("token: an empty API token cannot key worker secrets")
        return cls(hmac.new(token.encode(), _KEY_LABEL, hashlib.sha256).digest())

    def secret_for(self, job_id: str, attempt: int) -> str:
        """The secret of `attempt` of `job_id` (64 hex characters)."""
        msg = f"{job_id}\n{int(attempt)}".encode()
        return hmac.new(self._key, msg, hashlib.sha256).hexdigest()

    def check(self, metadata: Iterable[tuple[str, str | bytes]] | None, job_id: str,
              attempt: int) -> bool:
        """True when `metadata` carries this attempt's secret (constant-time compare)."""
        expected = self.secret_for(job_id, attempt).encode()
        return hmac.compare_digest(bearer(metadata).encode(), expected)


def bearer(metadata: Iterable[tuple[str, str | bytes]] | None) -> str:
    """The bearer value of gRPC `authorization` metadata ('' when there is none)."""
    for key, value in metadata or ():
        if key.lower() == METADATA_KEY:
            text = value.decode("latin-1") if isinstance(value, bytes) else value
            scheme, _, credential = text.partition(" ")
            return credential.strip() if scheme.lower() == "bearer" else ""
    return ""


def auth_metadata(secret: str) -> list[tuple[str, str]]:
    """What a worker sends on every call."""
    return [(METADATA_KEY, f"Bearer {secret}")] if secret else []


__all__ = ["CONTROLLER_CA_ENV", "WORKER_SECRET_ENV", "WorkerAuth", "auth_metadata", "bearer"]
