"""Shared fixtures: fresh random generators and temporary datasets."""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import settings

# `make test` draws the same examples every run (CI must not fail on a new random draw it
# cannot replay); `HYPOTHESIS_PROFILE=explore make test` searches with fresh randomness
# and keeps failures in .hypothesis/ for replay.
settings.register_profile("ci", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(12345)
