"""The one memory model of a rank: model states plus activations against the device budget.

Per rank, during a micro-batch:

    peak = model states (scheduler/model_states.py: parameters, gradient buffer, the
           rank's masters and AdamW moments, for the job's precision x optimizer sharding)
         + activations of the micro-batch under its group's memory scheme
           (scheduler/activations.py, from the model's MEMO profile at the compute dtype)

and the device budget is `gpu_memory_gib x memory_fraction` (the rest: allocator slack,
NCCL buffers, workspaces). The planner sizes `capacity_tokens` from it, chooses each
group's scheme with it, and every plan is checked against it before any rank starts
(`check_plan_memory`: the planner, the controller before dispatch, each rank in
`run_step`). A model whose states alone exceed the budget is refused at once
(`DeviceMemoryError`, naming the bytes needed and available).

Torch-free. Legend: T tokens a rank holds in a micro-batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

from scheduler.activations import ActivationModel, activation_model
from scheduler.errors import DeviceMemoryError, PlanMemoryError
from scheduler.model_states import (
    OPTIMIZER_SHARDINGS,
    StateBytes,
    check_precision,
    check_sharding,
    compute_dtype,
    default_sharding,
    has_mirror,
    model_state_bytes,
)
from scheduler.specs import ClusterSpec, ModelSpec
from scheduler.work import PLAIN, Scheme
from scheduler.zigzag import max_local_tokens

GIB = 1024**3
DEFAULT_MEMORY_FRACTION = 0.9  # the rest goes to allocator slack, NCCL buffers, workspaces


def precision_of(model: ModelSpec) -> str:
    """The precision a ModelSpec's dtype implies: bfloat16/float16 train bf16-mixed (fp32
    masters), float32 and float64 train as themselves."""
    return {"float64": "fp64", "float32": "fp32"}.get(model.dtype, "bf16-mixed")


def gib(num_bytes: float) -> str:
    return f"{num_bytes / GIB:.2f} GiB"


@dataclass(frozen=True, kw_only=True)
class GroupMemoryPrediction:
    """Peak bytes of each member of one group in one micro-batch."""

    tokens_per_rank: tuple[int, ...]  # tokens each ring position holds
    activation_bytes_per_rank: tuple[int, ...]
    peak_bytes_per_rank: tuple[int, ...]  # model states + activations
    host_bytes_per_rank: tuple[int, ...]  # what the scheme parks in host memory
    phase: str  # where the largest member peaks


class RankMemory:
    """Model states + activations of one rank of `cluster` (see the module docstring)."""

    def __init__(self, model: ModelSpec, cluster: ClusterSpec, *, precision: str | None = None,
                 optimizer_sharding: str | None = None, world_size: int | None = None,
                 memory_fraction: float = DEFAULT_MEMORY_FRACTION, profile=None,
                 shard_mirror: bool = False):
        if not 0 < memory_fraction <= 1:
            raise ValueError(f"memory_fraction={memory_fraction} must be in (0, 1]")
        self.model, self.cluster = model, cluster
        self.world_size = cluster.world_size if world_size is None else world_size
        self.precision = check_precision(precision or precision_of(model))
        self.sharding = check_sharding(optimizer_sharding or default_sharding(self.world_size))
        self.dtype = compute_dtype(self.precision)
        # the previous owner's optimizer shard (docs/elastic.md; distributed, > 1 rank)
        self.shard_mirror = has_mirror(sharding=self.sharding, world_size=self.world_size,
                                       shard_mirror=shard_mirror)
        self.memory_fraction = memory_fraction
        self.budget_bytes = int(cluster.gpu_memory_gib * GIB * memory_fraction)
        self.host_budget_bytes = int(cluster.host_memory_gib * GIB * memory_fraction
                                     / cluster.gpus_per_node)
        self.states: StateBytes = model_state_bytes(model, precision=self.precision,
                                                    sharding=self.sharding,
                                                    world_size=self.world_size,
                                                    shard_mirror=self.shard_mirror)
        self.activations = ActivationModel(model, dtype=self.dtype, profile=profile) \
            if profile is not None else activation_model(model, self.dtype)

    @property
    def room_bytes(self) -> int:
        """Device bytes left for activations once the model states are in."""
        return self.budget_bytes - self.states.total

    def check_states_fit(self) -> None:
        """DeviceMemoryError when the model states alone exceed the device budget."""
        if self.room_bytes > 0:
            return
        hint = self._sharding_hint()
        raise DeviceMemoryError(
            f"model states need {gib(self.states.total)} per rank ({self.states.total} bytes: "
            f"parameters {gib(self.states.params)}, gradient buffer {gib(self.states.grads)}, "
            f"masters {gib(self.states.masters)}, AdamW moments {gib(self.states.moments)}, "
            f"shard mirror {gib(self.states.mirror)}; "
            f"precision={self.precision}, optimizer_sharding={self.sharding}, "
            f"{self.world_size} rank(s)) but the device budget is {gib(self.budget_bytes)} "
            f"({self.budget_bytes} bytes: gpu_memory_gib={self.cluster.gpu_memory_gib} x "
            f"memory fraction {self.memory_fraction}). {hint}",
            needed_bytes=self.states.total, available_bytes=self.budget_bytes)

    def _sharding_hint(self) -> str:
        states, sharding = min((model_state_bytes(self.model, precision=self.precision,
                                                  sharding=x, world_size=self.world_size,
                                                  shard_mirror=self.shard_mirror).total, x)
                               for x in OPTIMIZER_SHARDINGS)
        if states < self.budget_bytes and sharding != self.sharding:
            return (f"optimizer_sharding={sharding!r} would need {gib(states)}; set it, or use "
                    "a device with more memory.")
        return ("No supported optimizer sharding fits (every rank holds the full compute "
                "parameters and gradient buffer; tensor parallelism is not supported): use a "
                "device with more memory or a smaller model.")

    # -- capacity ----------------------------------------------------------------------
    def capacity_tokens(self, scheme: Scheme = PLAIN, *, ring_size: int = 1) -> int:
        """The most tokens a rank can hold in one micro-batch under `scheme` (>= 0)."""
        return _capacity(self, scheme, ring_size > 1)

    def offload_capacity_tokens(self, *, ring_size: int = 2) -> int:
        """Tokens a rank holds under MEMO offload at alpha = 1 (the most host bytes and the
        largest device peak of any alpha), limited by the rank's share of host memory."""
        full = Scheme(name="offload", offload_ratio=1.0)
        device = self.capacity_tokens(full, ring_size=ring_size)
        per_token = self.activations.host_bytes(1 << 16, full) / (1 << 16)
        host = math.floor(self.host_budget_bytes / per_token) if per_token > 0 else device
        return max(0, min(device, host))

    # -- groups ------------------------------------------------------------------------
    def group_prediction(self, lengths: Sequence[int], ring_size: int,
                         scheme: Scheme) -> GroupMemoryPrediction:
        from scheduler.zigzag import all_local_tokens

        tokens = tuple(all_local_tokens(lengths, ring_size))
        peaks = [self.activations.peak(t, scheme, ring_size=ring_size) for t in tokens]
        acts = tuple(p.bytes for p in peaks)
        worst = max(range(ring_size), key=lambda j: acts[j])
        return GroupMemoryPrediction(
            tokens_per_rank=tokens, activation_bytes_per_rank=acts,
            peak_bytes_per_rank=tuple(self.states.total + a for a in acts),
            host_bytes_per_rank=tuple(self.activations.host_bytes(t, scheme) for t in tokens),
            phase=peaks[worst].phase)

    def fits(self, lengths: Sequence[int], ring_size: int, scheme: Scheme) -> bool:
        t = max_local_tokens(lengths, ring_size)
        return self.activations.peak_bytes(t, scheme, ring_size=ring_size) <= self.room_bytes


@lru_cache(maxsize=4096)
def _capacity(memory: RankMemory, scheme: Scheme, ring: bool) -> int:
    if memory.room_bytes <= 0:
        return 0
    return memory.activations.max_tokens(memory.room_bytes, scheme, ring_size=2 if ring else 1)


def check_plan_memory(plan, memory: RankMemory,
                      rank_budgets: Sequence[int] | None = None) -> None:
    """PlanMemoryError naming every group whose members would exceed the device budget.

    Peaks are recomputed with `memory` (the plan's `predicted` figures are not trusted);
    each group's scheme is the one the plan names (version 1: its meaning made explicit,
    scheduler.plan.group_memory). `rank_budgets` gives each rank its own budget (node
    pools: `CostModel.rank_memory`), else every rank has `memory`'s. DeviceMemoryError
    first if the states alone do not fit.
    """
    memory.check_states_fit()
    _raise_over_budget(plan, memory.model, memory.activations, memory.states.total,
                       rank_budgets or [memory.budget_bytes] * plan.world_size)


def check_plan_fits(plan, model: ModelSpec) -> None:
    """The workers' check before any micro-batch: a version-2 plan's groups against the
    device budget it was made for (`plan.memory`: each rank's own budget where the plan
    names one per rank), with `model` at the dtype it really runs in and the plan's
    precision and sharding for the model states. A version-1 plan names no budget and
    passes."""
    if plan.memory is None:
        return
    states = model_state_bytes(model, precision=plan.memory.precision,
                               sharding=plan.memory.optimizer_sharding,
                               world_size=plan.world_size,
                               shard_mirror=plan.memory.shard_mirror).total
    budgets = plan.memory.device_budget_bytes_per_rank or \
        [plan.memory.device_budget_bytes] * plan.world_size
    _raise_over_budget(plan, model, activation_model(model, model.dtype), states, budgets)


def _raise_over_budget(plan, model: ModelSpec, activations: ActivationModel, states: int,
                       budgets: Sequence[int]) -> None:
    from scheduler.plan import group_memory
    from scheduler.zigzag import local_tokens

    over = []
    for m, mb in enumerate(plan.micro_batches):
        for gi, g in enumerate(mb.groups):
            scheme = group_memory(g, model).as_scheme()
            lengths = [s.length for s in g.sequences]
            for j, rank in enumerate(g.ranks):
                tokens = local_tokens(lengths, g.ring_size, j)
                peak = activations.peak(tokens, scheme, ring_size=g.ring_size)
                budget = budgets[rank] if 0 <= rank < len(budgets) else min(budgets)
                if states + peak.bytes > budget:
                    over.append(
                        f"micro_batches[{m}].groups[{gi}] (ranks {g.ranks}, scheme "
                        f"{scheme.name}): rank {rank} holds {tokens} tokens and peaks at "
                        f"{gib(states + peak.bytes)} ({states + peak.bytes} bytes: states "
                        f"{gib(states)} + activations {gib(peak.bytes)}, {peak.phase}); the "
                        f"device budget is {gib(budget)} ({budget} bytes)")
                    break
    if over:
        raise PlanMemoryError(over)
