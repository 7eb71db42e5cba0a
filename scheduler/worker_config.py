"""What the controller tells a job's workers at Register: `WorkerConfig`.

The controller builds it from the job's spec, once per attempt, with every default the
planner used resolved (the model spec, precision, optimizer sharding, shard mirrors, the
node size), and sends it as JSON in `RegisterReply.job_spec_json`
(controller.worker_service.worker_config_json); the driver and every rank parse it once
(`WorkerConfig.from_json`) and read attributes. It lives here, torch-free, because both
sides import it: the controller, which builds it, and the workers, which must not import
the controller.

Strict both ways: a field the workers do not know, a missing one or a value of the wrong
type is refused with a `WorkerConfigError` naming every such field. That is the job's
config being unusable, a SpecError (a RingmasterError): the driver fails the attempt as
InvalidInput without a retry (workers.driver). `version` says which shape this is; a
worker refuses a config of a version it does not know by that field's name.

The sections carry the job spec's own field names (controller.spec: `training`,
`failure`, `objective`), so the JSON is the spec's sections plus what the controller
resolved.
"""

from __future__ import annotations

from typing import Final, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from scheduler.errors import SpecError
from scheduler.model_states import OptimizerSharding, Precision
from scheduler.objective import Objective
from scheduler.specs import ModelSpec

__all__ = ["WORKER_CONFIG_VERSION", "WorkerConfig", "WorkerConfigError", "WorkerFailure",
           "WorkerTraining"]

WORKER_CONFIG_VERSION: Final = 1


class WorkerConfigError(SpecError):
    """A worker config the workers cannot use; names every field at fault."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class WorkerTraining(_Section):
    """The spec's `training` section, precision, sharding and shard mirrors resolved."""

    steps: int = Field(ge=1)
    global_batch_tokens: int = Field(ge=1)
    learning_rate: float = Field(gt=0, allow_inf_nan=False)
    seed: int = Field(ge=0)
    checkpoint_dir: str | None
    checkpoint_interval: int = Field(ge=1)
    resume_from: str | None
    tensorboard_dir: str | None
    precision: Precision  # the controller's resolve_precision (the planner charged it)
    optimizer_sharding: OptimizerSharding  # resolve_optimizer_sharding
    shard_mirror: bool  # resolve_shard_mirror: replan, distributed, more than one rank


class WorkerFailure(_Section):
    """The spec's `failure` section (docs/elastic.md)."""

    max_restarts: int = Field(ge=0)
    heartbeat_timeout_s: float = Field(gt=0, allow_inf_nan=False)
    mode: Literal["replan", "restart"]
    shard_mirror: bool
    max_lost_ranks: int = Field(ge=1)


class WorkerConfig(_Section):
    """A job attempt as its driver and ranks see it (see the module docstring)."""

    version: Literal[1] = WORKER_CONFIG_VERSION
    job_id: str = Field(min_length=1)
    attempt: int = Field(ge=0)
    name: str  # the job's name (rank 0 records it as the checkpoint directory's owner)
    model: ModelSpec  # resolved: presets, config.json and overrides applied
    model_dir: str | None  # the Hugging Face directory the model comes from, if any
    model_init: Literal["pretrained", "random"]
    dataset: str  # the token dataset's path, as the workers see it
    num_ranks: int = Field(ge=1)
    training: WorkerTraining
    objective: Objective
    failure: WorkerFailure
    heartbeat_interval_s: float = Field(gt=0, allow_inf_nan=False)
    ranks_per_node: int = Field(ge=1)  # the planner's node size: rank r on r // this

    @classmethod
    def from_json(cls, text: str | bytes) -> WorkerConfig:
        """Parse what Register sent; a WorkerConfigError names every field at fault."""
        try:
            return cls.model_validate_json(text)
        except ValidationError as exc:
            raise WorkerConfigError(describe(exc)) from None


def describe(exc: ValidationError) -> str:
    """One line naming each bad field of a worker config, its value and what is valid."""
    parts = []
    for e in exc.errors(include_url=False):
        where = ".".join(str(p) for p in e["loc"]) or "(the config)"
        value = "" if e["type"] == "missing" else f" (got {_short(e.get('input'))})"
        parts.append(f"{where}: {e['msg']}{value}")
    return "; ".join([*parts, f"this worker reads worker config version {WORKER_CONFIG_VERSION}"])


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
