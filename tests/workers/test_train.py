"""workers.train: LR schedule, AdamW update with clipping, the loop (single process).

The multi-rank loop is covered by the invariant, resume and learning tests.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from scheduler.dataset import DatasetWriter
from scheduler.errors import PlanValidationError
from scheduler.plan import MicroBatch, StepPlan
from workers.data import DatasetPlanSource
from workers.optim import ShardedAdamW
from workers.step import run_step
from workers.train import (
    TrainConfig,
    Trainer,
    lr_at,
    partition_parameters,
    train,
)

from .helpers import (
    group,
    one_rank_planner,
    one_thread,  # noqa: F401 (autouse)
    plan_of,
    random_samples,
    reference_loss_and_grads,
    tiny_model,
)


def test_lr_schedule_warmup_then_decay():
    cfg = TrainConfig(lr=1.0, warmup_steps=4, total_steps=14, min_lr_ratio=0.1)
    assert [lr_at(s, cfg) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(4, cfg) == pytest.approx(1.0)
    assert lr_at(9, cfg) == pytest.approx(0.1 + 0.9 * 0.5)  # cosine midpoint
    assert lr_at(14, cfg) == pytest.approx(0.1) == lr_at(100, cfg)
    lin = TrainConfig(lr=2.0, total_steps=10, schedule="linear", min_lr_ratio=0.0)
    assert lr_at(5, lin) == pytest.approx(1.0)
    assert lr_at(7, TrainConfig(lr=3.0, schedule="constant")) == 3.0


@pytest.mark.parametrize("field,value", [("lr", 0.0), ("warmup_steps", -1), ("total_steps", 0),
                                         ("min_lr_ratio", 1.5), ("betas", (0.9, 1.0)),
                                         ("max_grad_norm", 0.0), ("schedule", "step"),
                                         ("precision", "bf16"),
                                         ("optimizer_sharding", "zero3")])
def test_bad_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=f"{field}="):
        TrainConfig(**{field: value})


def test_weight_decay_on_matrices_only():
    # A zero gradient leaves AdamW's moments at 0, so the update is the decay alone.
    model = tiny_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = ShardedAdamW(model, precision="fp64", sharding="none", weight_decay=0.3)
    opt.step(lr=0.1, step=1, max_grad_norm=None)
    for n, p in model.named_parameters():
        want = before[n] * (1 - 0.1 * 0.3) if p.dim() >= 2 else before[n]
        assert torch.equal(p.detach(), want), n
    assert any(p.dim() < 2 for p in model.parameters())  # norms exist and were spared


def _adamw_first_step(p0, g, *, lr, wd, eps):
    """Loshchilov & Hutter Alg. 2 at t = 1: m_hat = g, v_hat = g^2."""
    return p0 * (1 - lr * wd) - lr * g / (g.abs() + eps)


@pytest.mark.parametrize("max_norm", [None, 0.05])
def test_train_step_is_clipped_adamw_on_the_global_gradient(max_norm):
    lengths = [9, 1, 6, 17]
    samples = random_samples(lengths, seed=4)
    ref_model = tiny_model(seed=2)
    _, grads = reference_loss_and_grads(ref_model, samples)
    norm = math.sqrt(sum(float(g.pow(2).sum()) for g in grads.values()))
    scale = 1.0 if max_norm is None else min(1.0, max_norm / (norm + 1e-6))
    cfg = TrainConfig(lr=1e-2, warmup_steps=2, weight_decay=0.1, max_grad_norm=max_norm,
                      precision="fp64")
    model = tiny_model(seed=2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = Trainer(model, cfg, rank=0)
    plan = plan_of(1, [[group([0], [(0, 9), (3, 17)])], [group([0], [(1, 1), (2, 6)])]])
    out = trainer.train_step(plan, samples)
    assert out.step == 1 and out.lr == pytest.approx(5e-3)
    assert out.grad_norm == pytest.approx(norm, rel=1e-12)
    # The step's gradient differs from the reference by float64 rounding (~1e-19 absolute,
    # other summation order); g / (|g| + eps) magnifies that by up to 1 / eps = 1e8 where g
    # is near 0, so updates agree to lr * 1e-9 (and exactly in sign and size elsewhere).
    for n, p in model.named_parameters():
        wd = 0.1 if p.dim() >= 2 else 0.0
        want = _adamw_first_step(before[n], grads[n] * scale, lr=5e-3, wd=wd, eps=cfg.eps)
        torch.testing.assert_close(p.detach(), want, rtol=1e-12, atol=5e-3 * 1e-9)


def test_run_step_overwrites_gradients_and_checks_samples():
    model = tiny_model()
    samples = random_samples([5, 4], seed=1)
    plan = plan_of(1, [[group([0], [(0, 5), (1, 4)])]])
    for p in model.parameters():
        p.grad = torch.full_like(p, 7.0)
    run_step(model, plan, samples, rank=0)
    _, want = reference_loss_and_grads(tiny_model(), samples)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[n], rtol=1e-12, atol=1e-15)
    with pytest.raises(ValueError, match="sequence id 1"):
        run_step(model, plan, {0: samples[0]}, rank=0)
    with pytest.raises(ValueError, match=r"samples\[1\]"):
        run_step(model, plan, {0: samples[0], 1: samples[0]}, rank=0)
    with pytest.raises(ValueError, match="rank=3"):
        run_step(model, plan, samples, rank=3)
    with pytest.raises(ValueError, match="no predictions"):
        run_step(model, plan_of(1, [[group([0], [(0, 1)])]]), {0: samples[0][:1]}, rank=0)
    with pytest.raises(ValueError, match="plan.world_size=2"):
        run_step(model, plan_of(2, [[group([1, 0], [(0, 5), (1, 4)])]]), samples, rank=0)
    clash = StepPlan(world_size=1, capacity_tokens=100, micro_batches=[MicroBatch(
        groups=[group([0], [(0, 5)]), group([0], [(1, 4)])])])
    with pytest.raises(PlanValidationError, match="rank 0 is also in group"):
        run_step(model, clash, samples, rank=0)


def test_loop_follows_the_data_stream_and_checkpoints(tmp_path, rng):
    with DatasetWriter(tmp_path / "data" / "data") as w:
        for n in rng.integers(2, 30, size=20):
            w.add(rng.integers(0, 256, size=int(n)))
    source = DatasetPlanSource(tmp_path / "data", tokens_per_batch=64, seed=0,
                               planner=one_rank_planner)
    trainer = Trainer(tiny_model(dtype="float32"), TrainConfig(lr=1e-2), rank=0)
    seen = []
    out = train(trainer, num_steps=5, plan_source=source, on_step=seen.append,
                checkpoint_dir=tmp_path / "ckpt", checkpoint_every=2)
    assert [s.step for s in out] == [1, 2, 3, 4, 5] and seen == out
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["step_2", "step_4"]
    assert trainer.data_position == source.stream.position
    assert all(np.isfinite(s.stats.loss) for s in out)
    with pytest.raises(ValueError, match="checkpoint_every"):
        train(trainer, num_steps=1, plan_source=source, checkpoint_every=3)


def test_zero1_partition_balances_and_refuses_too_few_tensors():
    params = [torch.nn.Parameter(torch.zeros(n)) for n in (50, 7, 30, 20, 1, 12)]
    owners = partition_parameters(params, 3)
    load = [sum(p.numel() for p, o in zip(params, owners, strict=True) if o == r)
            for r in range(3)]
    assert sorted(set(owners)) == [0, 1, 2] and max(load) == 50  # the 50 alone, rest split
    with pytest.raises(ValueError, match="zero1"):
        partition_parameters(params[:2], 3)


def test_precision_and_sharding_are_resolved_and_checked():
    cfg = TrainConfig()
    assert cfg.resolve(device_type="cpu", world_size=4).precision == "fp32"
    assert cfg.resolve(device_type="cuda", world_size=4).precision == "bf16-mixed"
    assert cfg.resolve(device_type="cpu", world_size=4).optimizer_sharding == "distributed"
    assert cfg.resolve(device_type="cpu", world_size=1).optimizer_sharding == "none"
    trainer = Trainer(tiny_model(dtype="float32"), cfg, rank=0)
    assert (trainer.config.precision, trainer.config.optimizer_sharding) == ("fp32", "none")
    with pytest.raises(ValueError, match="precision='fp32' computes in torch.float32, but "
                                         "the model's parameters are torch.float64"):
        Trainer(tiny_model(dtype="float64"), TrainConfig(precision="fp32"), rank=0)
    with pytest.raises(TypeError):
        TrainConfig(zero1=True)  # the old switch is gone, not silently ignored
