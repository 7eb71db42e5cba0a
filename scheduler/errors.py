"""Domain errors shared by every layer (torch-free so the controller can import them).

Every error a user can cause names the field, the bad value and what would be valid, and
belongs to one of six families, which the REST API maps to a status by class
(controller/errors.py, docs/api.md#errors): a spec (`SpecError`), a dataset
(`DatasetError`), a plan (`PlanError`), capacity (`CapacityError`), each a 422; a
conflict with the system's state (`ConflictError`, 409); something that does not exist
(`NotFoundError`, 404). The first four are also `ValueError`s, so callers that catch
ValueError keep working. Anything else raised, a bare ValueError included, is a bug: a
500 with an error id, never the user's fault.
"""

from __future__ import annotations


class RingmasterError(Exception):
    """Base class of the errors Ringmaster raises on purpose about what a job asks for (its
    spec, data, plan, size); NotFoundError and ConflictError stand apart (see there)."""


class NotFoundError(LookupError):
    """What a request names (a job) does not exist. Not a RingmasterError: it is about the
    system's state when asked, not about the job's inputs (code that ends a job as invalid
    input on a RingmasterError must not end it for this)."""


class ConflictError(Exception):
    """The request is valid but conflicts with the state the system is in (a reused
    submission id, a stop of a finished job, a directory another job holds). Not a
    RingmasterError, for NotFoundError's reason; a conflict about a job's own inputs may
    be both (CheckpointDirInUse is also a SpecError)."""


class CapacityError(RingmasterError, ValueError):
    """A job or a batch is larger than the cluster, or the controller, can run."""


class PlanError(RingmasterError, ValueError):
    """A step plan breaks the plan format or the device memory budget."""


class SpecError(RingmasterError, ValueError):
    """A model, cluster or job spec is invalid."""


class PlanValidationError(PlanError):
    """A StepPlan breaks one or more rules of the plan format; `violations` lists them all."""

    def __init__(self, violations: list[str]):
        self.violations = list(violations)
        head = f"plan is invalid ({len(self.violations)} violation(s)):"
        super().__init__("\n  - ".join([head, *self.violations]))

    def __reduce__(self):  # pickles with its own arguments (it crosses process pools)
        return type(self), (self.violations,)


class InfeasibleBatchError(CapacityError):
    """A sequence cannot fit even on every rank with full offload."""

    def __init__(self, seq_id: int, length: int, max_length: int):
        self.seq_id = seq_id
        self.length = length
        self.max_length = max_length
        super().__init__(
            f"sequence id {seq_id} of length {length} cannot fit: the largest length that fits "
            f"this cluster (all ranks, full offload) is {max_length}"
        )

    def __reduce__(self):  # the planner process raises it: it must unpickle in the parent
        return type(self), (self.seq_id, self.length, self.max_length)


class DatasetError(RingmasterError, ValueError):
    """A token dataset file is missing, corrupt or truncated; names the file and offset."""


class DeviceMemoryError(SpecError):
    """A model's states do not fit one device under the job's precision and sharding;
    names the bytes needed and the bytes available."""

    def __init__(self, message: str, *, needed_bytes: int, available_bytes: int):
        self.needed_bytes = needed_bytes
        self.available_bytes = available_bytes
        super().__init__(message)


class PlanMemoryError(PlanError):
    """A plan whose predicted per-rank peak exceeds the device budget; `violations` names
    every group, its peak and the budget."""

    def __init__(self, violations: list[str]):
        self.violations = list(violations)
        head = (f"plan exceeds the device memory budget ({len(self.violations)} group(s)); "
                "no rank was started:")
        super().__init__("\n  - ".join([head, *self.violations]))
