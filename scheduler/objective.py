"""The objective of a job: what its step optimises, as the job spec and the workers' config
(scheduler.worker_config) both carry it.

`pretrain` (next-token loss on every token), `sft` (on the loss targets of the dataset's
mask), `dpo` (preference pairs against stored reference log-probs) or `grpo`
(group-relative policy optimisation with stored advantages). Each type is its own pydantic
model, so a parameter of another objective (`beta` on a grpo objective) is refused by name.
The controller checks at submit which dataset each one can train on
(controller.spec_objective); the workers build workers.loss.ObjectiveConfig from it;
docs/objectives.md has the formulas.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["ClipRange", "DpoObjective", "GrpoObjective", "Objective", "PretrainObjective",
           "SftObjective"]


class _Objective(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PretrainObjective(_Objective):
    """Next-token cross-entropy on every prediction, the loss mask ignored."""

    type: Literal["pretrain"] = "pretrain"


class SftObjective(_Objective):
    """Next-token cross-entropy on the loss targets of the dataset's mask only."""

    type: Literal["sft"]


class DpoObjective(_Objective):
    """Direct preference optimisation (Rafailov et al. 2023) over the dataset's pairs."""

    type: Literal["dpo"]
    beta: float = Field(default=0.1, gt=0, le=1000, allow_inf_nan=False,
                        description="Inverse temperature of the implicit reward.")
    label_smoothing: float = Field(
        default=0.0, ge=0, lt=0.5, allow_inf_nan=False,
        description="Assumed share of flipped preference labels (conservative DPO): the "
                    "loss is -(1 - e) log sigmoid(z) - e log sigmoid(-z).")


class ClipRange(_Objective):
    """An asymmetric clip of the importance ratio: [1 - low, 1 + high] (DAPO)."""

    low: float = Field(ge=0, lt=1, allow_inf_nan=False, description="1 - low is the floor.")
    high: float = Field(ge=0, le=100, allow_inf_nan=False,
                        description="1 + high is the ceiling.")


class GrpoObjective(_Objective):
    """Group-relative policy optimisation (Shao et al. 2024) with the stored advantages."""

    type: Literal["grpo"]
    clip_range: Annotated[float, Field(ge=0, lt=1, allow_inf_nan=False)] | ClipRange = Field(
        default=0.2, description="epsilon: the ratio is clipped to [1 - epsilon, "
                                 "1 + epsilon]; or {low, high}.")
    kl_coef: float = Field(default=0.0, ge=0, le=1000, allow_inf_nan=False,
                           description="Weight of the k3 KL estimator to the stored "
                                       "reference log-probs (ref_logps); 0: no KL term.")
    loss_normalization: Literal["token", "sequence"] = Field(
        default="token", description="token: divide by the batch's loss tokens; sequence: "
                                     "average each sequence's tokens, then the sequences.")


Objective = Annotated[PretrainObjective | SftObjective | DpoObjective | GrpoObjective,
                      Field(discriminator="type")]
