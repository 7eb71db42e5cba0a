"""Triton backends under TRITON_INTERPRET=1 against the naive float64 references.

The interpreter runs each program with numpy on the CPU, so the shapes are tiny (blocks of
16). It computes bfloat16 wrongly (triton-lang/triton#11584), so float32 and float16 only;
bf16 is checked on a GPU by bench/gpu_check.sh.

Tolerances (relative to max |reference|): float32 matmuls are exact-IEEE here and sums are
short, 1e-5 is ~100 ulps. float16 inputs are rounded (eps 9.8e-4) and P is rounded to
float16 before the P V and dS K products, as in every flash kernel: 4e-3 is ~4 ulps.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.kernels.triton_cases import ATTENTION_CASES, CE_CASES

ROOT = Path(__file__).resolve().parents[2]
TOLERANCE = {"f32": 1e-5, "f16": 4e-3}


@pytest.fixture(scope="module")
def interpreted_errors() -> dict:
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, "-m", "tests.kernels.triton_cases"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", [c[0] for c in ATTENTION_CASES])
def test_attention_triton_matches_naive(interpreted_errors, name):
    errors = interpreted_errors[name]
    tol = TOLERANCE[name[-3:]]
    assert errors.pop("finite") == 1.0 and errors.pop("out_dtype_ok") == 1.0
    for what, err in errors.items():
        assert err <= tol, f"{name}: {what} relative error {err:.2e} > {tol:.0e}"


@pytest.mark.parametrize("name", [c[0] for c in CE_CASES])
def test_linear_ce_triton_chunk_matches_naive(interpreted_errors, name):
    errors = interpreted_errors[name]
    tol = TOLERANCE[name[-3:]]
    assert errors.pop("count_ok") == 1.0
    for what, err in errors.items():
        assert err <= tol, f"{name}: {what} relative error {err:.2e} > {tol:.0e}"


def test_ring_step_backward_from_merged_lse(interpreted_errors):
    """Two key blocks merged by LSE, each block's backward from the merged out/lse."""
    for what, err in interpreted_errors["ring-merge-f32"].items():
        assert err <= TOLERANCE["f32"], f"ring merge: {what} relative error {err:.2e}"
