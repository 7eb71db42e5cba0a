"""RoPE frequency schedules for long context: the `rope_scaling` of a ModelSpec.

RoPE (Su et al. 2021, Eq. 34) rotates each pair i of a head's dimensions by the angle
pos * f_i with f_i = theta^(-2i/D). Context extension changes only the frequencies f_i
(and, for YaRN, the size of q.k), never the positions, so every ring size and every
zigzag shard sees the same angles as long as the positions are the global ones:

    default  f_i = theta^(-2i/D)
    linear   f_i / factor                     (position interpolation, Chen et al. 2023)
    llama3   low frequencies (wavelength > L0 / low_freq_factor) divided by factor, high
             ones (wavelength < L0 / high_freq_factor) kept, a linear blend in between
             (Llama 3.1, L0 = original_max_position_embeddings)
    yarn     "NTK-by-parts" (Peng et al. 2023, Eq. 17-19): per pair, a ramp between the
             interpolated f_i / factor and the original f_i, chosen by how many rotations
             the pair makes over L0; cos and sin are multiplied by the attention factor
             (Eq. 22, 0.1 ln(factor) + 1 unless given), which scales q.k by its square

The formulas follow Hugging Face transformers' `modeling_rope_utils` so that a checkpoint
trained there sees the same angles here (tests/workers/test_hf_models.py compares them).
Torch-free and computed in float64 with `math`: the planner imports this module, and the
workers turn the frequencies into a tensor once per layer and device.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from scheduler.errors import SpecError


class _Rope(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DefaultRope(_Rope):
    """Plain RoPE (no scaling); in a job spec's override it removes the checkpoint's."""

    rope_type: Literal["default"] = Field(description="Plain RoPE.")


class LinearRope(_Rope):
    """Position interpolation: every frequency divided by `factor`."""

    rope_type: Literal["linear"] = Field(description="Position interpolation.")
    factor: float = Field(ge=1, description="Context extension ratio (new / original).")


class Llama3Rope(_Rope):
    """Llama 3.1's frequency-dependent interpolation."""

    rope_type: Literal["llama3"] = Field(description="Llama 3.1 scaling.")
    factor: float = Field(ge=1, description="Divides the low frequencies.")
    low_freq_factor: float = Field(gt=0, description="Wavelengths above L0 / low_freq_factor "
                                                     "are interpolated fully.")
    high_freq_factor: float = Field(gt=0, description="Wavelengths below L0 / high_freq_factor "
                                                      "are kept.")
    original_max_position_embeddings: int = Field(gt=0, description="L0: the context length "
                                                                    "of pre-training.")

    @model_validator(mode="after")
    def _check(self) -> Llama3Rope:
        if self.high_freq_factor <= self.low_freq_factor:
            raise SpecError(f"high_freq_factor={self.high_freq_factor} must be greater than "
                            f"low_freq_factor={self.low_freq_factor}")
        return self


class YarnRope(_Rope):
    """YaRN: NTK-by-parts interpolation plus an attention temperature."""

    rope_type: Literal["yarn"] = Field(description="YaRN (Peng et al. 2023).")
    factor: float = Field(ge=1, description="Context extension ratio (new / original).")
    original_max_position_embeddings: int = Field(gt=0, description="L0: the context length "
                                                                    "of pre-training.")
    attention_factor: float | None = Field(
        default=None, gt=0, description="Multiplies cos and sin (so q.k by its square); None: "
                                        "0.1 ln(factor) + 1, or the mscale ratio when both "
                                        "mscale and mscale_all_dim are set.")
    beta_fast: float = Field(default=32.0, gt=0, description="Rotations over L0 above which a "
                                                             "pair is not interpolated.")
    beta_slow: float = Field(default=1.0, gt=0, description="Rotations over L0 below which a "
                                                            "pair is fully interpolated.")
    mscale: float | None = Field(default=None, description="DeepSeek-style numerator scale of "
                                                           "the derived attention factor.")
    mscale_all_dim: float | None = Field(default=None, description="DeepSeek-style denominator "
                                                                   "scale of that factor.")
    truncate: bool = Field(default=True, description="Round the ramp's ends to whole "
                                                     "dimensions (floor / ceil).")


RopeScaling = Annotated[LinearRope | Llama3Rope | YarnRope, Field(discriminator="rope_type")]
# What a job spec may set: a schedule, or "default" for none.
RopeSetting = Annotated[DefaultRope | LinearRope | Llama3Rope | YarnRope,
                        Field(discriminator="rope_type")]
ROPE_TYPES: tuple[str, ...] = ("default", "linear", "llama3", "yarn")


def _base_frequencies(head_dim: int, theta: float) -> list[float]:
    return [1.0 / theta ** (i / head_dim) for i in range(0, head_dim, 2)]


def _llama3(freqs: list[float], s: Llama3Rope) -> list[float]:
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    out = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < high_wavelen:
            out.append(f)
        elif wavelen > low_wavelen:
            out.append(f / s.factor)
        else:
            smooth = ((s.original_max_position_embeddings / wavelen - s.low_freq_factor)
                      / (s.high_freq_factor - s.low_freq_factor))
            out.append((1 - smooth) * f / s.factor + smooth * f)
    return out


def _yarn(freqs: list[float], head_dim: int, theta: float, s: YarnRope) -> list[float]:
    def correction_dim(rotations: float) -> float:  # the pair index making `rotations` over L0
        return (head_dim * math.log(s.original_max_position_embeddings
                                    / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(s.beta_fast), correction_dim(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    out = []
    for i, f in enumerate(freqs):
        ramp = min(max((i - low) / (high - low), 0.0), 1.0)
        keep = 1.0 - ramp  # share of the original (extrapolated) frequency
        out.append(f / s.factor * (1 - keep) + f * keep)
    return out


@lru_cache(maxsize=64)
def inverse_frequencies(head_dim: int, theta: float,
                        scaling: LinearRope | Llama3Rope | YarnRope | None) -> tuple[float, ...]:
    """f_i for i = 0 .. head_dim/2 - 1 (float64)."""
    freqs = _base_frequencies(head_dim, theta)
    if scaling is None:
        return tuple(freqs)
    if isinstance(scaling, LinearRope):
        return tuple(f / scaling.factor for f in freqs)
    if isinstance(scaling, Llama3Rope):
        return tuple(_llama3(freqs, scaling))
    return tuple(_yarn(freqs, head_dim, theta, scaling))


def attention_factor(scaling: LinearRope | Llama3Rope | YarnRope | None) -> float:
    """What cos and sin are multiplied by (1 except for YaRN)."""
    if not isinstance(scaling, YarnRope):
        return 1.0
    if scaling.attention_factor is not None:
        return scaling.attention_factor

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if scaling.mscale and scaling.mscale_all_dim:
        return mscale(scaling.factor, scaling.mscale) / mscale(scaling.factor,
                                                               scaling.mscale_all_dim)
    return mscale(scaling.factor)
