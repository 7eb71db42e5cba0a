"""Planning layer: specs, plan types, cost model, HDP planner, token dataset format.

Torch-free on purpose: it runs inside the controller's planning process.
"""

from scheduler.errors import (
    DatasetError,
    InfeasibleBatchError,
    PlanValidationError,
    RingmasterError,
    SpecError,
)
from scheduler.plan import MicroBatch, Predicted, RingGroup, SeqSlice, StepPlan
from scheduler.specs import ClusterSpec, ModelSpec, cluster_preset, model_preset

__all__ = [
    "ClusterSpec", "DatasetError", "InfeasibleBatchError", "MicroBatch", "ModelSpec",
    "PlanValidationError", "Predicted", "RingGroup", "RingmasterError", "SeqSlice", "SpecError",
    "StepPlan", "cluster_preset", "model_preset",
]
