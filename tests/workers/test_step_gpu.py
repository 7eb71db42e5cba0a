"""run_step on CUDA (one rank, float32): plain, planned offload and forced StreamBP packs.

Tolerance (STYLE.md, low precision): our error against a float64 CPU reference must be at
most 4x torch's own float32 error (plain autograd of the same weights on the same GPU,
also against float64), plus a floor of 1e-6 relative for gradients that torch happens to
get almost exactly.
"""

from __future__ import annotations

import pytest
import torch

from scheduler.plan import GroupMemory
from workers.step import run_step

from .helpers import (  # noqa: F401
    as_v2,
    group,
    one_thread,
    plan_of,
    random_samples,
    reference_loss_and_grads,
    tiny_model,
    tiny_spec,
)

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(),
                                 reason="needs a CUDA device (no GPU on this machine)")]

LENGTHS = [300, 1, 127, 513, 64]


def _rel(got: dict, want: dict) -> dict[str, float]:
    return {k: float((got[k].double().cpu() - want[k]).norm() / want[k].norm()) for k in want}


@pytest.mark.parametrize("case", ["plain", "offload", "streambp"])
def test_cuda_step_error_is_within_torch_float32_error(case):
    samples = random_samples(LENGTHS, seed=5)
    model = tiny_model(seed=1, dtype="float32").cuda()
    exact = tiny_model(seed=1, dtype="float64")
    exact.load_state_dict({k: v.double().cpu() for k, v in model.state_dict().items()})
    want_loss, want = reference_loss_and_grads(exact, samples)
    torch_loss, torch_grads = reference_loss_and_grads(
        model, {i: t.cuda() for i, t in samples.items()})
    offload = 0.5 if case == "offload" else 0.0
    plan = plan_of(1, [[group([0], [(0, 300), (1, 1), (2, 127)], offload)],
                       [group([0], [(3, 513), (4, 64)], offload)]])
    if case == "streambp":  # version 2: the plan names StreamBP in 20-token chunks
        plan = as_v2(plan, tiny_spec("float32"),
                     packed=GroupMemory(scheme="streambp", chunk_tokens=20))
    stats = run_step(model, plan, {i: t.cuda() for i, t in samples.items()}, rank=0)
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert stats.peak_memory_bytes > 0 and len(stats.micro_batch_times_s) == 2
    ours, theirs = _rel(grads, want), _rel(torch_grads, want)
    for k in want:
        assert ours[k] <= 4 * theirs[k] + 1e-6, (k, ours[k], theirs[k])
    assert abs(stats.loss - want_loss) <= 4 * abs(torch_loss - want_loss) + 1e-6 * want_loss
