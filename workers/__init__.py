"""Workers: the Llama-style model and its fused step, objectives, data, training runtime."""

from workers.model import Transformer, default_position_ids, next_token_targets, sequence_index
from workers.objectives import DPO, GRPO, NextTokenCE, group_advantages

__all__ = [
    "DPO",
    "GRPO",
    "NextTokenCE",
    "Transformer",
    "default_position_ids",
    "group_advantages",
    "next_token_targets",
    "sequence_index",
]
