"""An HDP plan with a ring of 3 on gloo, every family: the step's loss and gradient equal
transformers' on the whole batch (each sequence run separately there).

Each rank loads the checkpoint itself (load_pretrained, as a job's ranks do) and runs
`run_step` on the plan: micro-batch 0 splits the longest sequence zigzag over the ring
[2, 0, 1] (ring attention; positions stay global, so every shard gets its own tokens'
angles, scaled RoPE included); micro-batch 1 packs the others one group per rank, one rank
holding two sequences. Reference and tolerance as in test_hf_models.py (1e-10 relative at
float64, transformers' float32 islands in float64); across ranks the gradients must be
bit-identical (one all-reduce). The same launch starts the model as a worker group's
rank does (RankWorker: pretrained weights on every rank, checked to agree).
"""

from __future__ import annotations

import pytest
import torch

from parallelism.worlds import run_distributed
from tests.workers.hf_cases import (
    FAMILIES,
    VOCAB,
    load_reference,
    make_checkpoint,
    reference_loss_and_grads,
    rel_err,
)

TOL = 1e-10
LENGTHS = [31, 13, 1, 6, 9]


def _plan():
    from tests.workers.helpers import group, plan_of

    return plan_of(3, [[group([2, 0, 1], [(0, 31)])],
                       [group([0], [(1, 13), (2, 1)]), group([1], [(3, 6)]),
                        group([2], [(4, 9)])]])


def _samples() -> dict[int, torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    return {i: torch.randint(0, VOCAB, (n,), generator=g) for i, n in enumerate(LENGTHS)}


def _rank_fn(rank: int, world_size: int, directories: list[str]):
    from workers.hf import load_pretrained
    from workers.step import run_step

    out = []
    for d in directories[:-1]:  # the last one is the mismatched copy below
        model = load_pretrained(d, dtype=torch.float64)
        stats = run_step(model, _plan(), _samples(), rank=rank)
        out.append((stats.loss, {n: p.grad.numpy().copy()
                                 for n, p in model.named_parameters()}))
    return out, _start_the_group_way(rank, directories)  # numpy, not tensors: tensors
    # would travel as shared-memory handles


def _start_the_group_way(rank: int, directories: list[str]) -> tuple[str, str]:
    """RankWorker's start-up (workers.group): every rank loads the directory itself and one
    all-reduce checks they agree; a rank that sees other files makes every rank refuse."""
    from scheduler.specs import ModelSpec
    from workers.group import GroupConfig, RankWorker

    def start(d: str) -> str:
        spec = ModelSpec.from_hf_config(directories[0], dtype="float64")
        config = GroupConfig(num_ranks=3, model=spec, model_dir=d, model_init="pretrained")
        try:
            model = RankWorker(rank, config, use_gpu=False)._initial_model("fp64", "cpu")
        except RuntimeError as exc:
            return str(exc)
        return f"ok {model.source_dir}"

    same = start(directories[0])
    # rank 2 reads another copy of the family whose weights differ (another seed)
    return same, start(directories[-1] if rank == 2 else directories[0])


@pytest.mark.distributed
def test_hdp_plan_with_a_ring_of_three_equals_transformers(tmp_path):
    from workers.hf import load_pretrained

    dirs = [make_checkpoint(tmp_path / f, f) for f in FAMILIES]
    other = make_checkpoint(tmp_path / "other", FAMILIES[0], seed=1)
    launched = run_distributed(_rank_fn, 3, [str(d) for d in [*dirs, other]], timeout_s=300)
    results = [r[0] for r in launched]
    for rank, (same, mixed) in enumerate(r[1] for r in launched):
        assert same == f"ok {dirs[0]}", rank
        assert "ranks start from different weights" in mixed, (rank, mixed)
    samples = _samples()
    ids = torch.cat(list(samples.values()))
    cu = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()], dtype=torch.int32)
    num_predictions = sum(n - 1 for n in LENGTHS)
    for f, (family, d) in enumerate(zip(FAMILIES, dirs, strict=True)):
        spec = load_pretrained(d, dtype=torch.float64).spec
        _, loss_sum, grads = reference_loss_and_grads(load_reference(d), ids, cu, spec)
        for rank, per_rank in enumerate(results):
            loss, got = per_rank[f]
            assert abs(loss - loss_sum / num_predictions) <= TOL * loss, (family, rank)
            for name, want in grads.items():
                err = rel_err(torch.from_numpy(got[name]), want / num_predictions)
                assert err <= TOL, f"{family} rank {rank} {name}: relative error {err:.2e}"
                assert (got[name] == results[0][f][1][name]).all(), (family, rank, name)
