"""scheduler.offload_lp: the closed form equals a brute-force search of MEMO's LP."""

from __future__ import annotations

import numpy as np
import pytest

from scheduler.offload_lp import offload_ratio_for, solve_offload_ratio
from scheduler.specs import MODEL_PRESETS, cluster_preset


def _brute_force(always, rest, t, bw_gbps, host, n):
    """Largest alpha on a fine grid satisfying both constraints (0 if none does)."""
    grid = np.linspace(0.0, 1.0, 100_001)
    swap = always + grid * rest
    ok = (swap / (bw_gbps * 1e9) <= t + 1e-15) & (max(n, 1) * swap <= host * (1 + 1e-12))
    return grid[ok].max() if ok.any() else 0.0


@pytest.mark.parametrize("seed", range(20))
def test_closed_form_matches_grid_search(seed):
    rng = np.random.default_rng(seed)
    always, rest = rng.uniform(1e6, 1e9), rng.uniform(1e6, 1e10)
    t, bw = rng.uniform(1e-4, 0.5), rng.uniform(5, 60)
    host, n = rng.uniform(1e8, 1e12), int(rng.integers(1, 80))
    sol = solve_offload_ratio(bytes_always=always, bytes_rest=rest, layer_forward_s=t,
                              pcie_bandwidth_gbps=bw, host_bytes=host, num_swapped_layers=n)
    assert abs(sol.alpha - _brute_force(always, rest, t, bw, host, n)) <= 2e-5
    if 0 < sol.alpha < 1:
        assert sol.bound in ("time", "host") and sol.stall_s == 0.0


def test_bounds_and_stall():
    free = solve_offload_ratio(bytes_always=1.0, bytes_rest=1.0, layer_forward_s=1.0,
                               pcie_bandwidth_gbps=1.0, host_bytes=1e12, num_swapped_layers=4)
    assert (free.alpha, free.bound) == (1.0, "none")
    stalled = solve_offload_ratio(bytes_always=2e9, bytes_rest=1e9, layer_forward_s=0.01,
                                  pcie_bandwidth_gbps=10.0, host_bytes=1e12,
                                  num_swapped_layers=4)
    assert stalled.alpha == 0.0 and stalled.bound == "time"
    assert stalled.stall_s == pytest.approx(0.2 - 0.01)
    with pytest.raises(ValueError, match="pcie_bandwidth_gbps=0"):
        solve_offload_ratio(bytes_always=1, bytes_rest=1, layer_forward_s=1,
                            pcie_bandwidth_gbps=0, host_bytes=1, num_swapped_layers=1)


def test_presets_give_a_sensible_ratio():
    spec = MODEL_PRESETS["llama-7b"]
    sol = offload_ratio_for(spec, cluster_preset("a800", num_ranks=8), num_tokens=32768,
                            sequence_length=131072)
    assert 0.0 <= sol.alpha <= 1.0 and sol.swap_s <= sol.compute_s + 1e-12
    # longer contexts mean more attention compute per token, so more can be swapped
    longer = offload_ratio_for(spec, cluster_preset("a800", num_ranks=8), num_tokens=32768,
                               sequence_length=1_048_576)
    assert longer.alpha >= sol.alpha
