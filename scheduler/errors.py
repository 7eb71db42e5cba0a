"""Domain errors shared by every layer (torch-free so the controller can import them).

Every error a user can cause names the field, the bad value and what would be valid.
"""

from __future__ import annotations


class RingmasterError(Exception):
    """Base class of all errors Ringmaster raises on purpose."""


class SpecError(RingmasterError, ValueError):
    """A model, cluster or job spec is invalid."""


class PlanValidationError(RingmasterError, ValueError):
    """A StepPlan breaks one or more rules of the plan format; `violations` lists them all."""

    def __init__(self, violations: list[str]):
        self.violations = list(violations)
        head = f"plan is invalid ({len(self.violations)} violation(s)):"
        super().__init__("\n  - ".join([head, *self.violations]))

    def __reduce__(self):  # pickles with its own arguments (it crosses process pools)
        return type(self), (self.violations,)


class InfeasibleBatchError(RingmasterError, ValueError):
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


class PlanMemoryError(RingmasterError, ValueError):
    """A plan whose predicted per-rank peak exceeds the device budget; `violations` names
    every group, its peak and the budget."""

    def __init__(self, violations: list[str]):
        self.violations = list(violations)
        head = (f"plan exceeds the device memory budget ({len(self.violations)} group(s)); "
                "no rank was started:")
        super().__init__("\n  - ".join([head, *self.violations]))
