"""The training loop around `run_step`: AdamW, gradient clipping, LR schedule, checkpoints.

`Trainer` holds one rank's model and its optimizer (workers.optim.ShardedAdamW): the
model computes in the compute dtype of `TrainConfig.precision`, the step's gradient is
summed into the optimizer's flat master-dtype buffer (one reduction after the rank's last
micro-batch), and AdamW updates the master weights this rank owns under
`TrainConfig.optimizer_sharding` (all of them, ZeRO-1 whole tensors, or the distributed
optimizer's contiguous shard) and publishes the compute parameters. Clipping is by the
global L2 norm (Pascanu et al. 2013); AdamW is Loshchilov & Hutter 2019, Alg. 2, with
decay on matrices only. What each setting holds and sends: docs/precision.md, from the
table of scheduler/model_states.py.

The LR schedule is a pure function of the optimizer step (linear warmup, then cosine or
linear decay to `min_lr_ratio * lr`), so a restored step count alone restores it. A
`PlanSource` supplies each step's plan and this rank's samples given the data position;
the loop records the position after each batch, which the checkpoint stores, so resuming
continues the data stream exactly (bit-identical to running straight through).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal, Protocol, TypeVar

import torch
import torch.distributed as dist

from parallelism.progress import PROGRESS
from scheduler.batching import BatchPosition
from scheduler.model_states import (
    OPTIMIZER_SHARDINGS,
    PRECISIONS,
    OptimizerSharding,
    Precision,
    compute_dtype,
    default_precision,
    default_sharding,
)
from scheduler.plan import StepPlan
from scheduler.specs import ModelSpec
from workers.loss import BatchMeta, ObjectiveConfig
from workers.optim import ShardedAdamW, partition_parameters
from workers.sample import SampleData
from workers.step import StepStats, run_step

__all__ = ["InFlightStep", "PlanSource", "StepInput", "Stepper", "TrainConfig", "TrainStats",
           "Trainer", "build_model", "lr_at", "partition_parameters", "run_steps", "train"]


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Optimizer and schedule settings of a job (identical on every rank)."""

    lr: float = 1e-3  # peak learning rate
    warmup_steps: int = 0  # linear warmup from lr / warmup_steps to lr over these steps
    total_steps: int = 1000  # the decay reaches min_lr_ratio * lr at this step
    schedule: Literal["cosine", "linear", "constant"] = "cosine"  # decay after warmup
    min_lr_ratio: float = 0.1  # final LR as a share of lr
    weight_decay: float = 0.1  # AdamW decoupled decay, on matrices only (not norms)
    betas: tuple[float, float] = (0.9, 0.95)  # AdamW moment decay rates
    eps: float = 1e-8  # AdamW denominator epsilon
    max_grad_norm: float | None = 1.0  # clip the global gradient L2 norm; None: no clipping
    # Compute and master dtypes (scheduler.model_states): "bf16-mixed", "fp32", "fp64";
    # None: by device, bf16-mixed on CUDA and fp32 elsewhere (see `resolve`).
    precision: Precision | None = None
    # Where AdamW's masters and moments live: "none" (every rank), "zero1" (whole tensors
    # per owner), "distributed" (contiguous shards); None: distributed on > 1 rank.
    optimizer_sharding: OptimizerSharding | None = None
    # MEMO activation arenas for packed micro-batches (workers.arena.ArenaCache): "auto"
    # uses them on CUDA, where they keep activations out of the caching allocator; on CPU
    # the path is exact but saves nothing.
    activation_arena: Literal["auto", "on", "off"] = "auto"
    # Keep a mirror of the previous owner's optimizer shard (distributed, > 1 rank), so a
    # lost rank's shard survives (workers.optim, workers.elastic; job spec
    # failure.shard_mirror). Costs scheduler.model_states' StateBytes.mirror per rank.
    shard_mirror: bool = False
    # What the step optimises (pretrain, sft, dpo, grpo and their parameters; workers.loss).
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)

    def __post_init__(self) -> None:
        checks = [
            ("lr", self.lr > 0, "> 0"), ("warmup_steps", self.warmup_steps >= 0, ">= 0"),
            ("total_steps", self.total_steps >= 1, ">= 1"),
            ("min_lr_ratio", 0 <= self.min_lr_ratio <= 1, "in [0, 1]"),
            ("weight_decay", self.weight_decay >= 0, ">= 0"),
            ("betas", all(0 <= b < 1 for b in self.betas) and len(self.betas) == 2,
             "two values in [0, 1)"),
            ("eps", self.eps > 0, "> 0"),
            ("max_grad_norm", self.max_grad_norm is None or self.max_grad_norm > 0,
             "> 0 or None"),
            ("schedule", self.schedule in ("cosine", "linear", "constant"),
             "cosine, linear or constant"),
            ("activation_arena", self.activation_arena in ("auto", "on", "off"),
             "auto, on or off"),
            ("precision", self.precision is None or self.precision in PRECISIONS,
             f"None or one of {', '.join(PRECISIONS)}"),
            ("optimizer_sharding", self.optimizer_sharding is None
             or self.optimizer_sharding in OPTIMIZER_SHARDINGS,
             f"None or one of {', '.join(OPTIMIZER_SHARDINGS)}"),
        ]
        for name, ok, valid in checks:
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r} is not valid (must be {valid})")

    def resolve(self, *, device_type: str, world_size: int) -> TrainConfig:
        """This config with `precision` and `optimizer_sharding` decided (their defaults)."""
        return replace(self, precision=self.precision or default_precision(device_type),
                       optimizer_sharding=self.optimizer_sharding
                       or default_sharding(world_size))


def build_model(spec: ModelSpec, precision: str, *, device: torch.device | str = "cpu"):
    """The Transformer of `spec` in the compute dtype of `precision`, on `device`.

    The spec's own `dtype` is replaced: the precision decides what the workers compute in.
    """
    from workers.model import Transformer

    model = Transformer(spec.model_copy(update={"dtype": compute_dtype(precision)}))
    return model.to(device)


def _arena_cache(model: torch.nn.Module, config: TrainConfig):
    """The step's activation arenas, or None (see TrainConfig.activation_arena)."""
    device = next(model.parameters()).device
    if config.activation_arena == "off" or (config.activation_arena == "auto"
                                            and device.type != "cuda"):
        return None
    from workers.arena import ArenaCache

    return ArenaCache(parameters=model.parameters(), device=device)


def lr_at(step: int, config: TrainConfig) -> float:
    """Learning rate of optimizer step `step` (0-based)."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    if config.schedule == "constant":
        return config.lr
    span = max(1, config.total_steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    if config.schedule == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        shape = 1.0 - progress
    return config.lr * (config.min_lr_ratio + (1.0 - config.min_lr_ratio) * shape)


@dataclass(frozen=True, kw_only=True)
class StepInput:
    """What a plan source hands the loop for one step."""

    plan: StepPlan  # the step's plan (the same on every rank)
    # plan id -> tokens, or SampleData (masked objectives), at least this rank's ids
    samples: Mapping[int, torch.Tensor | SampleData]
    next_position: BatchPosition  # data position after this batch (checkpointed)
    batch: BatchMeta | None = None  # the whole batch's records (masked objectives)


# Given the data position of the next batch, return that step's input.
PlanSource = Callable[[BatchPosition], StepInput]


@dataclass(frozen=True, kw_only=True)
class TrainStats:
    """One optimizer step as a rank saw it."""

    step: int  # optimizer steps completed after this one
    lr: float  # learning rate used
    grad_norm: float  # global gradient L2 norm before clipping
    stats: StepStats | None  # the forward/backward step's figures (None: a step finished
    # by workers.elastic after its collectives were interrupted on this rank)


@dataclass(kw_only=True)
class InFlightStep:
    """An optimizer step a rank has started and not finished: what workers.elastic needs
    to finish it everywhere or drop it everywhere when a rank is lost in the middle."""

    step: int  # the optimizer step (0-based) being taken
    next_position: BatchPosition | None  # data position once it completes
    stats: StepStats | None = None  # run_step returned: the gradient is reduced
    norm: float | None = None  # the last collective before the update completed here
    committed: bool = False  # masters and moments updated (local)
    published: bool = False  # the updated parameters exchanged


class Trainer:
    """One rank's model, optimizer and progress (step count, data position).

    `config` is resolved against the model's device and the world (`TrainConfig.resolve`):
    the model must be in its precision's compute dtype (`build_model`). The optimizer
    (`self.optimizer`, workers.optim.ShardedAdamW) turns the model's parameters into views
    of its flat buffer, so build the Trainer after moving the model to its device.
    """

    def __init__(self, model: torch.nn.Module, config: TrainConfig, *, rank: int, group=None):
        device = next(model.parameters()).device
        world = dist.get_world_size(group) if dist.is_available() and dist.is_initialized() \
            else 1
        self.config = config.resolve(device_type=device.type, world_size=world)
        self.model, self.rank, self.group = model, rank, group
        self.optimizer = self.build_optimizer()
        self.step = 0  # optimizer steps completed
        self.data_position = BatchPosition()  # next batch of the data stream
        self.in_flight: InFlightStep | None = None  # the step started and not finished
        self.arenas = _arena_cache(model, self.config)

    def build_optimizer(self) -> ShardedAdamW:
        """An optimizer of this trainer's settings over the current world (the model's
        Parameters become views of its buffer; workers.elastic builds one per world)."""
        c = self.config
        assert c.precision is not None and c.optimizer_sharding is not None, \
            "Trainer.config is resolved in __init__"
        return ShardedAdamW(self.model, precision=c.precision, sharding=c.optimizer_sharding,
                            betas=c.betas, eps=c.eps, weight_decay=c.weight_decay,
                            group=self.group, shard_mirror=c.shard_mirror)

    def train_step(self, plan: StepPlan, samples: Mapping[int, torch.Tensor | SampleData], *,
                   next_position: BatchPosition | None = None,
                   batch: BatchMeta | None = None) -> TrainStats:
        """run_step of the config's objective into the optimizer's gradient buffer, clip,
        one AdamW update. `batch`: the batch's records (run_step).

        `in_flight` records how far the step got, so that an interrupted step can be
        finished or dropped consistently on every rank (workers.elastic)."""
        flight = self.in_flight = InFlightStep(step=self.step, next_position=next_position)
        flight.stats = run_step(self.model, plan, samples, rank=self.rank, group=self.group,
                                arenas=self.arenas, grads=self.optimizer.grads,
                                objective=self.config.objective, batch=batch)
        PROGRESS.phase("optimizer")  # the clip's norm is a collective too
        self.commit(self.optimizer.prepare())
        self.optimizer.publish()
        flight.published = True
        PROGRESS.phase("done")
        return self.finish_step()

    def commit(self, norm: float) -> None:
        """Update masters and moments for the in-flight step, clipped by the global `norm`
        (local: its collectives are done here or, for workers.elastic, elsewhere)."""
        flight = self.in_flight
        assert flight is not None, "commit without a step in flight (train_step starts one)"
        self.optimizer.commit(lr=lr_at(flight.step, self.config), step=flight.step + 1,
                              norm=norm, max_grad_norm=self.config.max_grad_norm)
        flight.norm, flight.committed = norm, True

    def finish_step(self) -> TrainStats:
        """Count the committed in-flight step as done: step count and data position."""
        flight, self.in_flight = self.in_flight, None
        assert flight is not None and flight.committed, "finish_step without a committed step"
        assert flight.norm is not None, "commit() sets the norm of the step it commits"
        self.step = flight.step + 1
        if flight.next_position is not None:
            self.data_position = flight.next_position
        return TrainStats(step=self.step, lr=lr_at(flight.step, self.config),
                          grad_norm=flight.norm, stats=flight.stats)

    def rebuild_arenas(self) -> None:
        """New activation arenas after the parameters moved to another buffer."""
        self.arenas = _arena_cache(self.model, self.config)

    def save(self, directory: str | Path) -> Path:
        """Checkpoint model, optimizer, step, RNG and data position (collective)."""
        from workers.checkpoint import save_checkpoint

        return save_checkpoint(directory, self)

    def restore(self, directory: str | Path) -> None:
        """Load a checkpoint written by `save` (collective)."""
        from workers.checkpoint import load_checkpoint

        load_checkpoint(directory, self)


StatsT = TypeVar("StatsT", covariant=True)


class Stepper(Protocol[StatsT]):
    """What `run_steps` drives: a Trainer (its TrainStats), or a workers.group.WorkerGroup
    (every rank's, one list per step)."""

    @property
    def data_position(self) -> BatchPosition: ...  # next batch of the data stream

    def train_step(self, plan: StepPlan, samples: Mapping[int, torch.Tensor | SampleData], *,
                   next_position: BatchPosition | None = None,
                   batch: BatchMeta | None = None) -> StatsT: ...


def run_steps(stepper: Stepper[StatsT], *, num_steps: int, plan_source: PlanSource,
              on_step: Callable[[StatsT], None] | None = None) -> list[StatsT]:
    """Run `num_steps` steps of `stepper` from its data position; `on_step` sees each."""
    if num_steps < 0:
        raise ValueError(f"num_steps={num_steps} must be >= 0")
    out = []
    for _ in range(num_steps):
        inp = plan_source(stepper.data_position)
        s = stepper.train_step(inp.plan, inp.samples, next_position=inp.next_position,
                               batch=inp.batch)
        out.append(s)
        if on_step is not None:
            on_step(s)
    return out


def train(trainer: Trainer, *, num_steps: int, plan_source: PlanSource,
          on_step: Callable[[TrainStats], None] | None = None,
          checkpoint_dir: str | Path | None = None, checkpoint_every: int = 0) -> list[TrainStats]:
    """Run `num_steps` optimizer steps from the trainer's data position.

    With `checkpoint_dir` and `checkpoint_every` > 0, saves `checkpoint_dir/step_<n>` every
    `checkpoint_every` steps. `on_step` sees each step's stats (metrics, reporting).
    """
    if num_steps < 0:
        raise ValueError(f"num_steps={num_steps} must be >= 0")
    if checkpoint_every < 0 or (checkpoint_every and checkpoint_dir is None):
        raise ValueError(f"checkpoint_every={checkpoint_every} needs checkpoint_dir and >= 0")

    def after(s: TrainStats) -> None:
        if on_step is not None:
            on_step(s)
        if checkpoint_every and checkpoint_dir is not None \
                and trainer.step % checkpoint_every == 0:
            trainer.save(Path(checkpoint_dir) / f"step_{trainer.step}")

    return run_steps(trainer, num_steps=num_steps, plan_source=plan_source, on_step=after)

