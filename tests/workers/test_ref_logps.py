"""`python -m workers.ref_logps` (`ringmaster data ref-logps`): a forward-only HDP job that
stores a model's per-token log-probs, against plain PyTorch at float64.

The reference is written here: the whole sequence through `model(tokens, cu)` (full
[L, V] logits, plain autograd-free forward), log_softmax at float64, the log-prob of each
token given the ones before it, 0 at position 0. The job runs on 2 gloo ranks with a
capacity of 24 tokens, so the 61-token sample runs split on a ring of both ranks (zigzag
shards, ring attention) and the short ones packed. Tolerance: float64 throughout; ring
attention merges partial softmaxes in another order, a few ulps: 1e-10.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from scheduler.dataset import DatasetWriter, TokenDataset
from workers.hf import save_pretrained
from workers.ref_logps import main

from .helpers import tiny_model

LENGTHS = [61, 7, 12, 1, 23, 9, 5, 18]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    model = tiny_model(seed=3)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return save_pretrained(model, tmp_path_factory.mktemp("model") / "ref"), model


def dpo_dataset(path) -> TokenDataset:
    rng = np.random.default_rng(0)
    with DatasetWriter(path / "data") as w:
        for i, n in enumerate(LENGTHS):
            w.add(rng.integers(0, 256, size=n), kind="dpo", pair_id=i // 2,
                  role="chosen" if i % 2 == 0 else "rejected",
                  loss_mask=(np.arange(n) >= n // 3).astype(np.uint8))
    return TokenDataset(path)


def reference_logps(model, tokens: np.ndarray) -> np.ndarray:
    ids = torch.from_numpy(tokens.astype(np.int64))
    with torch.no_grad():
        logits = model(ids, torch.tensor([0, len(ids)], dtype=torch.int32)).double()
    picked = logits[:-1].log_softmax(-1).gather(1, ids[1:, None])[:, 0]
    return np.r_[0.0, picked.numpy()]


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_ref_logps_on_two_ranks_equal_the_float64_reference(model_dir, tmp_path):
    directory, model = model_dir
    ds = dpo_dataset(tmp_path / "d")
    assert main([str(tmp_path / "d"), "--model", str(directory), "--num-ranks", "2",
                 "--capacity-tokens", "24"]) == 0
    ds = TokenDataset(tmp_path / "d")
    assert ds.columns == ("ref_logps",)
    for i in range(len(ds)):
        got = ds.column("ref_logps", i)
        want = reference_logps(model, ds[i])
        assert np.abs(got - want).max() <= 1e-10 * max(1.0, np.abs(want).max()), i


def test_old_logps_on_one_rank_and_a_bad_model_leave_the_dataset_alone(model_dir, tmp_path,
                                                                        capsys):
    directory, model = model_dir
    dpo_dataset(tmp_path / "d")
    assert main([str(tmp_path / "d"), "--model", str(tmp_path / "nowhere"),
                 "--column", "old_logps"]) == 2
    assert "nowhere" in capsys.readouterr().err
    assert TokenDataset(tmp_path / "d").columns == ()
    assert sorted(p.name for p in (tmp_path / "d").iterdir() if p.name.startswith(".")) == []
    assert main([str(tmp_path / "d"), "--model", str(directory), "--column", "old_logps",
                 "--capacity-tokens", "64"]) == 0
    ds = TokenDataset(tmp_path / "d")
    got = ds.column("old_logps", 4)
    assert np.abs(got - reference_logps(model, ds[4])).max() <= 1e-10
