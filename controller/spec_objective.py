"""The job spec's `objective:` section, and its submit-time check against the dataset.

What the step optimises: `pretrain` (next-token loss on every token), `sft` (on the loss
targets of the dataset's mask), `dpo` (preference pairs against stored reference
log-probs) or `grpo` (group-relative policy optimisation with stored advantages). The
models live in scheduler.objective (the workers' config, scheduler.worker_config, carries
the same ones); each type is its own pydantic model, so a parameter of another objective
(`beta` on a grpo objective) is refused by name. Which dataset each objective can train on
is checked at submit from the dataset's records and columns only (`check_objective`): a
dpo objective on a dataset without pairs is a 422 naming `objective.type`, before anything
starts. The workers receive the objective in their config (controller.worker_service) and
build workers.loss.ObjectiveConfig from it; docs/objectives.md has the formulas and why
every plan gives the single-device gradient.
"""

from __future__ import annotations

from scheduler.errors import DatasetError
from scheduler.objective import (
    ClipRange,
    DpoObjective,
    GrpoObjective,
    Objective,
    PretrainObjective,
    SftObjective,
)

__all__ = ["ClipRange", "DpoObjective", "GrpoObjective", "Objective", "PretrainObjective",
           "SftObjective", "check_objective"]

# Sample kinds (scheduler.dataset_meta.KINDS) each objective trains on.
TRAINS_ON = {"pretrain": ("pretrain", "sft", "chat"), "sft": ("pretrain", "sft", "chat"),
             "dpo": ("dpo",), "grpo": ("grpo",)}


def check_objective(objective: Objective, dataset: str) -> None:
    """Refuse an objective the dataset cannot train (SpecError/FieldError naming the field):
    its sample kinds, DPO pairs, GRPO advantages and the log-prob columns it needs. Reads
    the dataset's records and column headers only. A dataset that does not open is left
    to the dataset check, which names `dataset.path`."""
    from controller.edge import FieldError
    from scheduler.dataset import TokenDataset

    try:
        ds = TokenDataset(dataset)
        kinds = ds.structure.kind_counts
    except (DatasetError, OSError, ValueError):
        return
    kind = objective.type
    wrong = sorted(set(kinds) - set(TRAINS_ON[kind]))
    if wrong:
        found = ", ".join(f"{k} {kinds[k]:,}" for k in sorted(kinds))
        raise FieldError("objective.type", f"{kind!r} trains on {' or '.join(TRAINS_ON[kind])} "
                         f"samples, but dataset {dataset!r} holds {found} "
                         f"({_which_objective(kinds)})")
    if kind == "dpo" and "ref_logps" not in ds.columns:
        raise FieldError("objective.type", f"'dpo' needs the reference log-probs of dataset "
                         f"{dataset!r}; compute them with `ringmaster data ref-logps "
                         f"{dataset} --model DIR` (the reference model)")
    if isinstance(objective, GrpoObjective):
        _check_grpo(objective, ds, dataset)


def _check_grpo(objective: GrpoObjective, ds, dataset: str) -> None:
    from controller.edge import FieldError

    if objective.kl_coef > 0 and "ref_logps" not in ds.columns:
        raise FieldError("objective.kl_coef", f"{objective.kl_coef} needs the reference "
                         f"log-probs of dataset {dataset!r} (`ringmaster data ref-logps "
                         f"{dataset} --model DIR`), or set it to 0")
    import numpy as np

    advantages = ds.structure.records["advantage"]
    bad = np.flatnonzero(~np.isfinite(advantages))
    if bad.size:
        raise FieldError("objective.type", f"'grpo' needs a finite advantage per sample; "
                         f"dataset {dataset!r} has none for sample {int(bad[0])} (import "
                         "GRPO rows with `ringmaster data import`, which normalises the "
                         "rewards per group)")


def _which_objective(kinds: dict[str, int]) -> str:
    if "dpo" in kinds:
        return "preference pairs train with objective type dpo"
    if "grpo" in kinds:
        return "GRPO groups train with objective type grpo"
    return "train it with objective type pretrain or sft"
