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


class DatasetError(RingmasterError, ValueError):
    """A token dataset file is missing, corrupt or truncated; names the file and offset."""
