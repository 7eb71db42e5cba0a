"""The training loop around `run_step`: AdamW, gradient clipping, LR schedule, checkpoints.

Every rank holds the full model. After `run_step` all ranks hold the same global
gradient, so clipping (by the global L2 norm, Pascanu et al. 2013) and the AdamW update
(Loshchilov & Hutter 2019, Alg. 2) run locally and keep the replicas identical without
further communication. Optionally (`zero1`) the AdamW state is sharded over the ranks
(ZeRO stage 1, Rajbhandari et al. 2020): each rank updates the parameters it owns and
broadcasts them.

The LR schedule is a pure function of the optimizer step (linear warmup, then cosine or
linear decay to `min_lr_ratio * lr`), so a restored step count alone restores it. A
`PlanSource` supplies each step's plan and this rank's samples given the data position;
the loop records the position after each batch, which the checkpoint stores, so resuming
continues the data stream exactly (bit-identical to running straight through).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist

from scheduler.batching import BatchPosition
from scheduler.plan import StepPlan
from workers.step import StepStats, run_step

__all__ = ["PlanSource", "StepInput", "TrainConfig", "TrainStats", "Trainer",
           "broadcast_parameters", "build_optimizer", "lr_at", "partition_parameters", "train"]


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
    zero1: bool = False  # shard AdamW state over the ranks (ZeRO stage 1); see Trainer
    # MEMO activation arenas for packed micro-batches (workers.arena.ArenaCache): "auto"
    # uses them on CUDA, where they keep activations out of the caching allocator; on CPU
    # the path is exact but saves nothing.
    activation_arena: Literal["auto", "on", "off"] = "auto"

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
        ]
        for name, ok, valid in checks:
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r} is not valid (must be {valid})")


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


def build_optimizer(model: torch.nn.Module, config: TrainConfig,
                    params: list[torch.nn.Parameter] | None = None) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (embeddings, projections) and none on norms.

    `params` restricts it to a subset of the model's parameters (a ZeRO-1 shard).
    """
    decay, no_decay = [], []
    for p in model.parameters() if params is None else params:
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": config.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr_at(0, config),
                             betas=config.betas, eps=config.eps, foreach=False)


@dataclass(frozen=True, kw_only=True)
class StepInput:
    """What a plan source hands the loop for one step."""

    plan: StepPlan  # the step's plan (the same on every rank)
    samples: Mapping[int, torch.Tensor]  # plan id -> tokens, at least this rank's ids
    next_position: BatchPosition  # data position after this batch (checkpointed)


# Given the data position of the next batch, return that step's input.
PlanSource = Callable[[BatchPosition], StepInput]


@dataclass(frozen=True, kw_only=True)
class TrainStats:
    """One optimizer step as a rank saw it."""

    step: int  # optimizer steps completed after this one
    lr: float  # learning rate used
    grad_norm: float  # global gradient L2 norm before clipping
    stats: StepStats  # the forward/backward step's figures


def partition_parameters(params: list[torch.nn.Parameter], num_ranks: int) -> list[int]:
    """Owner rank of each parameter: largest first onto the least-loaded rank (ZeRO-1)."""
    if len(params) < num_ranks:
        raise ValueError(f"zero1: {len(params)} parameter tensors cannot be sharded over "
                         f"{num_ranks} ranks (each rank must own one); set zero1=False")
    load = [0] * num_ranks
    owners = [0] * len(params)
    for i in sorted(range(len(params)), key=lambda i: (-params[i].numel(), i)):
        r = min(range(num_ranks), key=lambda r: (load[r], r))
        owners[i] = r
        load[r] += params[i].numel()
    return owners


def broadcast_parameters(params: list[torch.nn.Parameter], owners: list[int], group) -> None:
    """Every rank receives each parameter from its owner (one broadcast per owner and dtype)."""
    for r in sorted(set(owners)):
        mine = [p for p, o in zip(params, owners, strict=True) if o == r]
        for dtype in sorted({p.dtype for p in mine}, key=str):
            same = [p for p in mine if p.dtype == dtype]
            flat = torch.cat([p.detach().reshape(-1) for p in same])
            dist.broadcast(flat, group=group, group_src=r)
            offset = 0
            with torch.no_grad():
                for p in same:
                    p.copy_(flat[offset:offset + p.numel()].view_as(p))
                    offset += p.numel()


class Trainer:
    """One rank's model, optimizer and progress (step count, data position).

    With `config.zero1` on several ranks, each rank keeps AdamW state only for the
    parameters it owns (`partition_parameters`), updates those after the step's
    all-reduce, and receives the others from their owners, so optimizer memory is divided
    by the world size. The update is the same per-parameter AdamW, so weights and losses
    are bit-identical to the unsharded trainer.
    """

    def __init__(self, model: torch.nn.Module, config: TrainConfig, *, rank: int, group=None):
        self.model, self.config, self.rank, self.group = model, config, rank, group
        self.params = [p for p in model.parameters() if p.requires_grad]
        world = dist.get_world_size(group) if dist.is_available() and dist.is_initialized() \
            else 1
        self.owners = partition_parameters(self.params, world) if config.zero1 and world > 1 \
            else None
        local = rank if group is None else dist.get_rank(group)
        owned = None if self.owners is None else [
            p for p, o in zip(self.params, self.owners, strict=True) if o == local]
        self.optimizer = build_optimizer(model, config, owned)
        self.step = 0  # optimizer steps completed
        self.data_position = BatchPosition()  # next batch of the data stream
        self.arenas = _arena_cache(model, config)

    def train_step(self, plan: StepPlan, samples: Mapping[int, torch.Tensor], *,
                   next_position: BatchPosition | None = None) -> TrainStats:
        """run_step, clip, one AdamW update at this step's LR."""
        stats = run_step(self.model, plan, samples, rank=self.rank, group=self.group,
                         arenas=self.arenas)
        max_norm = self.config.max_grad_norm if self.config.max_grad_norm else math.inf
        # Every rank holds the full gradient, so every rank computes the same norm.
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, max_norm, foreach=False))
        lr = lr_at(self.step, self.config)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        self.optimizer.step()
        if self.owners is not None:
            broadcast_parameters(self.params, self.owners, self.group)
        self.step += 1
        if next_position is not None:
            self.data_position = next_position
        return TrainStats(step=self.step, lr=lr, grad_norm=grad_norm, stats=stats)

    def save(self, directory: str | Path) -> Path:
        """Checkpoint model, optimizer, step, RNG and data position (collective)."""
        from workers.checkpoint import save_checkpoint

        return save_checkpoint(directory, self)

    def restore(self, directory: str | Path) -> None:
        """Load a checkpoint written by `save` (collective)."""
        from workers.checkpoint import load_checkpoint

        load_checkpoint(directory, self)


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
    out = []
    for _ in range(num_steps):
        inp = plan_source(trainer.data_position)
        s = trainer.train_step(inp.plan, inp.samples, next_position=inp.next_position)
        out.append(s)
        if on_step is not None:
            on_step(s)
        if checkpoint_every and trainer.step % checkpoint_every == 0:
            trainer.save(Path(checkpoint_dir) / f"step_{trainer.step}")
    return out

