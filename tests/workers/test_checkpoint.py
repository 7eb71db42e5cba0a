"""workers.checkpoint: bit-identical resume (single process here; 4 gloo ranks with rings
in test_checkpoint_distributed.py)."""

from __future__ import annotations

import pytest
import torch

from workers.train import StepInput, TrainConfig, Trainer, train

from .helpers import group, one_thread, plan_of, random_samples, tiny_model  # noqa: F401


def _source(position):
    """A deterministic plan source: batch k has its own lengths, samples and two micro-batches."""
    k = position.index
    lengths = [3 + (5 * k) % 11, 1 + (3 * k) % 7, 20 - k % 9]
    plan = plan_of(1, [[group([0], [(0, lengths[0]), (2, lengths[2])])],
                       [group([0], [(1, lengths[1])])]])
    return StepInput(plan=plan, samples=random_samples(lengths, seed=k),
                     next_position=type(position)(epoch=0, index=k + 1))


def _trainer():
    # float32 on purpose: bit-identity must not rely on float64 hiding differences.
    cfg = TrainConfig(lr=3e-3, warmup_steps=2, total_steps=8, max_grad_norm=0.5)
    return Trainer(tiny_model(seed=5, dtype="float32"), cfg, rank=0)


@pytest.mark.parametrize("k", [0, 3])
def test_resume_is_bit_identical(tmp_path, k):
    total = 6
    straight = _trainer()
    losses = [s.stats.loss for s in train(straight, num_steps=total, plan_source=_source)]

    first = _trainer()
    head = [s.stats.loss for s in train(first, num_steps=k, plan_source=_source)]
    first.save(tmp_path / "ckpt")
    torch.manual_seed(999)  # the restore must bring back the RNG, not inherit this
    resumed = _trainer()
    resumed.restore(tmp_path / "ckpt")
    assert resumed.step == k and resumed.data_position.index == k
    tail = [s.stats.loss for s in train(resumed, num_steps=total - k, plan_source=_source)]

    assert head + tail == losses  # exact float equality, not approx
    for (n, a), b in zip(straight.model.named_parameters(), resumed.model.parameters(),
                         strict=True):
        assert torch.equal(a, b), n
    sa, sb = straight.optimizer.state_tensors(), resumed.optimizer.state_tensors()
    assert sorted(sa) == ["exp_avg", "exp_avg_sq", "grads", "params"]  # fp32: no masters
    for key in ("params", "exp_avg", "exp_avg_sq"):
        assert torch.equal(sa[key], sb[key]), key


def test_rng_state_is_restored(tmp_path):
    trainer = _trainer()
    torch.manual_seed(7)
    trainer.save(tmp_path / "c")
    want = torch.rand(4)
    torch.manual_seed(8)
    trainer.restore(tmp_path / "c")
    assert torch.equal(torch.rand(4), want)


def test_missing_or_partial_checkpoint_is_a_clear_error(tmp_path):
    trainer = _trainer()
    with pytest.raises(ValueError, match="holds no checkpoint"):
        trainer.restore(tmp_path / "nothing")
    (tmp_path / "half").mkdir()
    with pytest.raises(ValueError, match="holds no checkpoint"):
        trainer.restore(tmp_path / "half")


def test_save_overwrites_and_leaves_no_partial(tmp_path):
    trainer = _trainer()
    train(trainer, num_steps=1, plan_source=_source)
    trainer.save(tmp_path / "c")
    train(trainer, num_steps=1, plan_source=_source)
    trainer.save(tmp_path / "c")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]
    other = _trainer()
    other.restore(tmp_path / "c")
    assert other.step == 2


def test_restore_refuses_another_precision_or_optimizer_layout(tmp_path):
    trainer = _trainer()  # fp32, one rank: sharding "none" (flat layout)
    train(trainer, num_steps=1, plan_source=_source)
    trainer.save(tmp_path / "c")
    fp64 = Trainer(tiny_model(seed=5), TrainConfig(precision="fp64"), rank=0)
    with pytest.raises(ValueError, match="written with precision='fp32'; this trainer runs "
                                         "precision='fp64'"):
        fp64.restore(tmp_path / "c")
    zero1 = Trainer(tiny_model(seed=5, dtype="float32"),
                    TrainConfig(optimizer_sharding="zero1"), rank=0)
    with pytest.raises(ValueError, match="optimizer_sharding='zero1'"):
        zero1.restore(tmp_path / "c")
    flat = Trainer(tiny_model(seed=6, dtype="float32"),
                   TrainConfig(optimizer_sharding="distributed"), rank=0)
    flat.restore(tmp_path / "c")  # none and distributed share the flat layout
    for key in ("params", "exp_avg", "exp_avg_sq"):
        assert torch.equal(flat.optimizer.state_tensors()[key],
                           trainer.optimizer.state_tensors()[key]), key
