"""Fixtures the worker tests share."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def local_ray():
    """A private local Ray for one test module (4 CPUs), shut down after it."""
    import ray

    ray.init(include_dashboard=False, object_store_memory=100_000_000, num_cpus=4,
             log_to_driver=False)
    yield
    ray.shutdown()
