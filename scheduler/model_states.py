"""Model states: what one rank holds for the parameters, for each precision and sharding.

The one place that says which tensors a training rank keeps besides activations, so the
planner's memory model (`capacity_tokens`, the refusal of models that cannot fit) and the
runtime (workers/train.py, workers/optim.py) agree byte for byte. Torch-free: the planner
imports it.

Precision (`TrainConfig.precision`, job spec `training.precision`):

    precision    compute (params, activations)   masters   grad buffer   AdamW moments
    bf16-mixed   bfloat16                        float32   float32       float32 x 2
    fp32         float32                         -         float32       float32 x 2
    fp64         float64                         -         float64       float64 x 2

bf16-mixed keeps fp32 master weights and moments, accumulates every micro-batch's
gradient into one fp32 buffer (Megatron-Core's `main_grad`) and casts the updated masters
back into the compute copy. fp32 and fp64 update the compute parameters directly (they
are their own masters).

Optimizer sharding (`TrainConfig.optimizer_sharding`) over the N ranks of the world:

    none         every rank holds all masters and moments; one all-reduce of the gradients
    zero1        masters and moments of the parameters a rank owns (whole tensors, largest
                 first onto the least-loaded rank); all-reduce, then each owner broadcasts
    distributed  one flat buffer cut into N contiguous shards of ceil(P / N) elements
                 (Megatron-Core's distributed optimizer, ZeRO stage 2 communication):
                 reduce-scatter the gradient buffer after the rank's last micro-batch, AdamW
                 on the shard's masters and moments, all-gather the compute parameters

In every scheme the compute parameters and the full gradient buffer stay on every rank
(a rank's micro-batches touch every parameter, and the reduce-scatter runs in place).

Legend: P parameters, N ranks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from scheduler.errors import SpecError
from scheduler.specs import DTYPE_BYTES, DType, ModelSpec

Precision = Literal["bf16-mixed", "fp32", "fp64"]
OptimizerSharding = Literal["none", "zero1", "distributed"]

PRECISIONS: tuple[str, ...] = ("bf16-mixed", "fp32", "fp64")
OPTIMIZER_SHARDINGS: tuple[str, ...] = ("none", "zero1", "distributed")

_COMPUTE: dict[str, DType] = {"bf16-mixed": "bfloat16", "fp32": "float32", "fp64": "float64"}
_MASTER: dict[str, DType] = {"bf16-mixed": "float32", "fp32": "float32", "fp64": "float64"}


def check_precision(precision: str) -> Precision:
    if precision not in PRECISIONS:
        raise SpecError(f"precision={precision!r} is not valid; valid: {', '.join(PRECISIONS)}")
    return precision  # type: ignore[return-value]


def check_sharding(sharding: str) -> OptimizerSharding:
    if sharding not in OPTIMIZER_SHARDINGS:
        raise SpecError(f"optimizer_sharding={sharding!r} is not valid; valid: "
                        f"{', '.join(OPTIMIZER_SHARDINGS)}")
    return sharding  # type: ignore[return-value]


def compute_dtype(precision: str) -> DType:
    """The dtype of the parameters the model computes with, and of its activations."""
    return _COMPUTE[check_precision(precision)]


def master_dtype(precision: str) -> DType:
    """The dtype of the weights AdamW updates, its moments and the gradient buffer."""
    return _MASTER[check_precision(precision)]


def has_masters(precision: str) -> bool:
    """True when the masters are a separate copy of the compute parameters."""
    return compute_dtype(precision) != master_dtype(precision)


def default_precision(device_type: str) -> Precision:
    """bf16-mixed on CUDA, fp32 elsewhere (CPUs have no fast bfloat16 matmul)."""
    return "bf16-mixed" if device_type == "cuda" else "fp32"


def default_sharding(world_size: int) -> OptimizerSharding:
    """distributed when there is more than one rank to shard over."""
    return "distributed" if world_size > 1 else "none"


def shard_numel(num_params: int, world_size: int) -> int:
    """Elements of one rank's contiguous shard of the flat buffer (padded to N shards)."""
    return math.ceil(num_params / world_size)


def zero1_owned_numel(numels: Sequence[int], world_size: int) -> list[int]:
    """Elements each rank owns under zero1: whole tensors, largest first onto the
    least-loaded rank, ties to the lower rank (workers.train.partition_parameters)."""
    load = [0] * world_size
    for i in sorted(range(len(numels)), key=lambda i: (-numels[i], i)):
        r = min(range(world_size), key=lambda r: (load[r], r))
        load[r] += numels[i]
    return load


@dataclass(frozen=True, kw_only=True)
class StateBytes:
    """Bytes of model states one rank holds, by kind."""

    params: int  # compute-dtype parameters (every rank)
    grads: int  # the gradient buffer (every rank, full size)
    masters: int  # separate master weights (bf16-mixed only), the rank's share
    moments: int  # AdamW exp_avg + exp_avg_sq, the rank's share

    @property
    def total(self) -> int:
        return self.params + self.grads + self.masters + self.moments


def model_state_bytes(model: ModelSpec, *, precision: str, sharding: str, world_size: int,
                      rank: int | None = None) -> StateBytes:
    """Model-state bytes of one rank (the largest rank's when `rank` is None).

    `model.num_params` is the parameter count (workers.model.Transformer builds exactly
    those); zero1 shards by whole tensors, so its figure needs the tensors' sizes
    (`model.parameter_numels()`), and ranks differ.
    """
    check_precision(precision)
    check_sharding(sharding)
    if world_size < 1:
        raise SpecError(f"world_size={world_size} must be >= 1")
    if rank is not None and not 0 <= rank < world_size:
        raise SpecError(f"rank={rank} is outside the world (valid 0..{world_size - 1})")
    p = model.num_params
    cb, mb = DTYPE_BYTES[compute_dtype(precision)], DTYPE_BYTES[master_dtype(precision)]
    if sharding == "none" or world_size == 1:
        owned = p
    elif sharding == "distributed":
        owned = shard_numel(p, world_size)
    else:
        loads = zero1_owned_numel(model.parameter_numels(), world_size)
        owned = max(loads) if rank is None else loads[rank]
    masters = owned * mb if has_masters(precision) else 0
    return StateBytes(params=p * cb, grads=p * mb, masters=masters, moments=2 * owned * mb)
