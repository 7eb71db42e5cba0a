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
from scheduler.specs import ClusterSpec, ModelSpec, NodePool, cluster_preset, model_preset

__all__ = [
    "ClusterSpec", "DatasetError", "InfeasibleBatchError", "MicroBatch", "ModelSpec", "NodePool",
    "PlanValidationError", "Predicted", "RingGroup", "RingmasterError", "SeqSlice", "SpecError",
    "StepPlan", "cluster_preset", "model_preset",
]

# Planner API (issue 6), imported on first use so `import scheduler` stays light (the
# planner pulls in OR-tools and networkx).
_LAZY = {
    "plan_batch": "scheduler.planner", "POLICIES": "scheduler.planner",
    "simulate": "scheduler.simulator", "SimResult": "scheduler.simulator",
    "lower_bound": "scheduler.simulator",
    "CostModel": "scheduler.cost", "Observation": "scheduler.cost",
    "SpeedEstimator": "scheduler.speeds",
}
__all__ += list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'scheduler' has no attribute {name!r}")
