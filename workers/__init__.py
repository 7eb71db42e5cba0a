"""Workers: the Llama-style model and its fused step, objectives, data, training runtime."""

from workers.model import Transformer, default_position_ids, next_token_targets, sequence_index
from workers.objectives import DPO, GRPO, NextTokenCE, group_advantages
from workers.optim import ShardedAdamW
from workers.step import StepStats, run_step
from workers.train import StepInput, TrainConfig, Trainer, TrainStats, build_model, train

__all__ = [
    "DPO",
    "GRPO",
    "NextTokenCE",
    "ShardedAdamW",
    "StepInput",
    "StepStats",
    "TrainConfig",
    "TrainStats",
    "Trainer",
    "Transformer",
    "build_model",
    "default_position_ids",
    "group_advantages",
    "next_token_targets",
    "run_step",
    "sequence_index",
    "train",
]
