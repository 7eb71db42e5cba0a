"""`SampleData`: one sample as an objective needs it (tokens, loss mask, metadata, log-probs).

Its own module so that both the data reader (workers/data.py) and the step
(workers/step.py, workers/loss.py) use it without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from scheduler.dataset_meta import SampleMeta

__all__ = ["SampleData"]


@dataclass(frozen=True, kw_only=True)
class SampleData:
    """One sample for an objective: tokens, loss mask, metadata, stored log-probs."""

    tokens: torch.Tensor  # int64[L]
    loss_mask: torch.Tensor  # bool[L]: token t carries a loss (predicted from t - 1)
    meta: SampleMeta  # kind, pair_id/role (DPO), group_id/reward/advantage (GRPO)
    ref_logps: torch.Tensor | None  # float64[L] log p_ref(token t | tokens < t); [0] = 0
    old_logps: torch.Tensor | None  # float64[L] same under the sampling policy (GRPO)

    def target_mask(self) -> torch.Tensor:
        """bool[L] aligned with targets: position t's target (token t + 1) carries a loss."""
        return torch.cat([self.loss_mask[1:], self.loss_mask.new_zeros(1)])

    @staticmethod
    def to_targets(values_L: torch.Tensor) -> torch.Tensor:
        """Per-token values (ref/old log-probs) moved to target positions; 0 at the end."""
        return torch.cat([values_L[1:], values_L.new_zeros(1)])
