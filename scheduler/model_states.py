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

Shard mirror (`shard_mirror`, job spec `failure.shard_mirror`, distributed on N > 1 only):
rank r also holds a copy of shard (r - 1) mod N, the shard of the previous rank of the
ring of owners, so a lost rank's shard survives on the next one (docs/elastic.md):

    precision    mirror (the previous rank's shard)
    bf16-mixed   float32 masters + float32 moments x 2          (12 bytes per element)
    fp32, fp64   moments x 2 (its masters are the replicated compute parameters)

Per step the owner sends its reduced gradient shard to the mirror's holder (one
point-to-point shift around the ring of owners, master dtype), which runs the same AdamW
update on the copy: bit-identical, since every update is elementwise.

In every scheme the compute parameters and the full gradient buffer stay on every rank
(a rank's micro-batches touch every parameter, and the reduce-scatter runs in place).
Under `distributed` (N > 1) both are one flat buffer padded to N * ceil(P / N) elements:
the reduce-scatter and the all-gather need N equal shards, and they run in place on
those buffers (as Megatron-Core pads its buffers), so the padding (< N elements) is held.

Transients, not counted here (the runtime frees them before the step ends): in
bf16-mixed each parameter's bfloat16 `.grad` lives only until its post-accumulate hook
has added it into the fp32 buffer, and the AdamW update allocates one master-dtype
temporary the size of the largest parameter (workers/optim.py).

Per step the optimizer issues the collectives `step_collectives` lists (the planner
charges their time): gradients reduced once after the rank's last micro-batch (an
all-reduce, or under `distributed` a reduce-scatter), the loss totals (all-reduce), under
`distributed` the mirror's gradient shift (with `shard_mirror`) and the squared gradient norm
of the shards (all-reduce; it is the step's last collective before any state changes, so
a rank that completes it knows every rank can commit: docs/elastic.md), and the updated
compute parameters (zero1: one broadcast per owner; distributed: one all-gather).

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
    mirror: int = 0  # the previous owner's shard: masters (bf16-mixed) + moments

    @property
    def total(self) -> int:
        return self.params + self.grads + self.masters + self.moments + self.mirror


def has_mirror(*, sharding: str, world_size: int, shard_mirror: bool) -> bool:
    """True when the optimizer keeps a mirror of the previous owner's shard."""
    return shard_mirror and sharding == "distributed" and world_size > 1


def mirror_holder(owner: int, world_size: int) -> int:
    """The rank that mirrors `owner`'s shard: the next rank of the ring of owners."""
    return (owner + 1) % world_size


def model_state_bytes(model: ModelSpec, *, precision: str, sharding: str, world_size: int,
                      rank: int | None = None, shard_mirror: bool = False) -> StateBytes:
    """Model-state bytes of one rank (the largest rank's when `rank` is None).

    `model.num_params` is the parameter count (workers.model.Transformer builds exactly
    those); zero1 shards by whole tensors, so its figure needs the tensors' sizes
    (`model.parameter_numels()`), and ranks differ. Under `distributed` the parameter and
    gradient buffers hold the padding of `buffer_numel`; with `shard_mirror` each rank
    also holds the previous owner's shard (`StateBytes.mirror`; nothing elsewhere).
    """
    check_precision(precision)
    check_sharding(sharding)
    if world_size < 1:
        raise SpecError(f"world_size={world_size} must be >= 1")
    if rank is not None and not 0 <= rank < world_size:
        raise SpecError(f"rank={rank} is outside the world (valid 0..{world_size - 1})")
    cb, mb = DTYPE_BYTES[compute_dtype(precision)], DTYPE_BYTES[master_dtype(precision)]
    p = buffer_numel(model.num_params, sharding=sharding, world_size=world_size)
    if sharding == "none" or world_size == 1:
        owned = p
    elif sharding == "distributed":
        owned = shard_numel(model.num_params, world_size)
    else:
        loads = zero1_owned_numel(model.parameter_numels(), world_size)
        owned = max(loads) if rank is None else loads[rank]
    masters = owned * mb if has_masters(precision) else 0
    mirror = 0
    if has_mirror(sharding=sharding, world_size=world_size, shard_mirror=shard_mirror):
        mirror = owned * mb * (3 if has_masters(precision) else 2)
    return StateBytes(params=p * cb, grads=p * mb, masters=masters, moments=2 * owned * mb,
                      mirror=mirror)


def buffer_numel(num_params: int, *, sharding: str, world_size: int) -> int:
    """Elements of the flat parameter and gradient buffers: P, or N * ceil(P / N) under
    `distributed` on N > 1 ranks (N equal shards for the in-place collectives)."""
    if sharding == "distributed" and world_size > 1:
        return world_size * shard_numel(num_params, world_size)
    return num_params


CollectiveOp = Literal["all_reduce", "reduce_scatter", "all_gather", "broadcast", "send_recv"]

# The loss totals of a step (summed CE, predictions) and the squared gradient norm travel
# as float64 whatever the precision: they are reported and compared exactly.
LOSS_TOTALS_BYTES = 2 * DTYPE_BYTES["float64"]
GRAD_NORM_BYTES = DTYPE_BYTES["float64"]


@dataclass(frozen=True, kw_only=True)
class Collective:
    """One collective a rank issues in a step, over the whole world.

    `payload_bytes` is the full buffer the collective covers: the tensor of an all-reduce
    or a broadcast, the input of a reduce-scatter, the output of an all-gather (a ring
    algorithm moves (N - 1) / N of it per rank for reduce-scatter and all-gather, twice
    that for an all-reduce). `send_recv` is a shift around the ring of ranks: every rank
    sends `payload_bytes` to the next rank and receives as many from the previous one.
    """

    op: CollectiveOp
    payload_bytes: int
    dtype: DType
    what: str  # "gradients", "loss totals", "mirror gradients", "grad norm" or "parameters"
    root: int | None = None  # the source rank of a broadcast


def step_collectives(model: ModelSpec, *, precision: str, sharding: str,
                     world_size: int, shard_mirror: bool = False) -> tuple[Collective, ...]:
    """The collectives of one training step (workers.train.Trainer.train_step), in order.

    Every rank issues the same list (ranks that ran no micro-batch included), after its
    last micro-batch; none of them runs inside a micro-batch. A world of one issues none.
    Ring attention's point-to-point traffic is not listed here (the ring cost covers it).
    With `shard_mirror` (distributed only) the owners' reduced gradient shards shift to
    their mirrors before the grad norm.
    """
    check_precision(precision)
    check_sharding(sharding)
    if world_size < 1:
        raise SpecError(f"world_size={world_size} must be >= 1")
    if world_size == 1:
        return ()
    cdt, mdt = compute_dtype(precision), master_dtype(precision)
    cb, mb = DTYPE_BYTES[cdt], DTYPE_BYTES[mdt]
    n = buffer_numel(model.num_params, sharding=sharding, world_size=world_size)
    totals = Collective(op="all_reduce", payload_bytes=LOSS_TOTALS_BYTES, dtype="float64",
                        what="loss totals")
    if sharding == "distributed":
        mirror = () if not shard_mirror else (Collective(
            op="send_recv", payload_bytes=shard_numel(model.num_params, world_size) * mb,
            dtype=mdt, what="mirror gradients"),)
        return (Collective(op="reduce_scatter", payload_bytes=n * mb, dtype=mdt,
                           what="gradients"),
                totals, *mirror,
                Collective(op="all_reduce", payload_bytes=GRAD_NORM_BYTES, dtype="float64",
                           what="grad norm"),
                Collective(op="all_gather", payload_bytes=n * cb, dtype=cdt, what="parameters"))
    grads = Collective(op="all_reduce", payload_bytes=n * mb, dtype=mdt, what="gradients")
    if sharding == "none":
        return (grads, totals)
    loads = zero1_owned_numel(model.parameter_numels(), world_size)
    return (grads, totals, *(Collective(op="broadcast", payload_bytes=load * cb, dtype=cdt,
                                        what="parameters", root=r)
                             for r, load in enumerate(loads)))
