"""Shared helpers of the workers tests: small models, plans, the plain-autograd reference."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from scheduler.plan import GroupMemory, MicroBatch, RingGroup, SeqSlice, StepPlan, group_memory
from scheduler.specs import ModelSpec, model_preset
from workers.model import Transformer


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny shapes gain nothing from threads, and the dev box's two cores are shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_spec(dtype: str = "float64") -> ModelSpec:
    return model_preset("tiny").model_copy(update={"dtype": dtype})


def tiny_model(seed: int = 0, dtype: str = "float64") -> Transformer:
    torch.manual_seed(seed)
    return Transformer(tiny_spec(dtype))


def perturbed_model_and_batch(lengths: Sequence[int], *, data_seed: int):
    """A float64 tiny model with weights nudged off their init (so no gradient is trivially
    zero) and a packed batch of random ids: (model, ids, cu_seqlens)."""
    torch.manual_seed(0)
    model = Transformer(model_preset("tiny")).to(torch.float64)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    ids = torch.randint(0, 256, (int(cu[-1]),),
                        generator=torch.Generator().manual_seed(data_seed))
    return model, ids, cu


def random_samples(lengths: Sequence[int], seed: int, vocab: int = 256) -> dict[int, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {i: torch.randint(0, vocab, (int(n),), generator=g) for i, n in enumerate(lengths)}


def group(ranks: Sequence[int], seqs: Sequence[tuple[int, int]], offload: float = 0.0):
    """A RingGroup from (id, length) pairs."""
    return RingGroup(ranks=list(ranks), sequences=[SeqSlice(id=i, length=n, offload_ratio=offload)
                                                   for i, n in seqs])


def plan_of(world_size: int, micro_batches: Sequence[Sequence[RingGroup]],
            capacity_tokens: int = 10**6) -> StepPlan:
    return StepPlan(world_size=world_size, capacity_tokens=capacity_tokens,
                    micro_batches=[MicroBatch(groups=list(g)) for g in micro_batches]).check()


def as_v2(plan: StepPlan, spec: ModelSpec, packed: GroupMemory | None = None) -> StepPlan:
    """`plan` in format version 2: every group names the scheme version 1 meant for it
    (scheduler.plan.group_memory), packed groups `packed` instead when given."""
    def convert(g: RingGroup) -> RingGroup:
        mem = packed if packed is not None and g.ring_size == 1 else group_memory(g, spec)
        return RingGroup(ranks=g.ranks, memory=mem, sequences=[
            SeqSlice(id=x.id, length=x.length) for x in g.sequences])
    return StepPlan(version=2, world_size=plan.world_size, capacity_tokens=plan.capacity_tokens,
                    micro_batches=[MicroBatch(groups=[convert(g) for g in mb.groups])
                                   for mb in plan.micro_batches]).check()


def one_rank_planner(lengths: np.ndarray) -> StepPlan:
    """Everything packed on rank 0 in one micro-batch (for single-process loops)."""
    return plan_of(1, [[group([0], [(i, int(n)) for i, n in enumerate(lengths)])]])


def odd_ring_planner(lengths: np.ndarray) -> StepPlan:
    """4 ranks: the two longest sequences on rings [1, 3] and [2, 0], the rest packed
    round-robin in a second micro-batch (deterministic, so reruns see the same plans)."""
    order = sorted(range(len(lengths)), key=lambda i: (-int(lengths[i]), i))
    seqs = [(i, int(lengths[i])) for i in order]
    rings = [group([1, 3], seqs[:1]), group([2, 0], seqs[1:2])]
    packs = [group([r], seqs[2 + r::4]) for r in range(4) if seqs[2 + r::4]]
    return plan_of(4, [rings, packs] if packs else [rings])


def reference_loss_and_grads(model: torch.nn.Module, samples: Mapping[int, torch.Tensor]
                             ) -> tuple[float, dict[str, torch.Tensor]]:
    """The loss of docs/architecture.md ("The invariant") by plain autograd, one sequence at
    a time: sum CE / sum (L - 1)."""
    model.zero_grad(set_to_none=True)
    total, count = 0.0, 0
    for tokens in samples.values():
        if len(tokens) < 2:
            continue
        cu = torch.tensor([0, len(tokens)], dtype=torch.int32)
        logits = model(tokens, cu)
        total = total + F.cross_entropy(logits[:-1].double(), tokens[1:], reduction="sum")
        count += len(tokens) - 1
    loss = total / count
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return float(loss.detach()), grads


def max_rel_err(got: Mapping[str, torch.Tensor], want: Mapping[str, torch.Tensor]) -> float:
    """max over tensors of ||got - want|| / ||want||."""
    return max(float((got[k] - want[k]).norm() / want[k].norm()) for k in want)


def torch_adamw_run(config: Mapping, batch, num_steps: int
                    ) -> tuple[dict[str, torch.Tensor], list[float], list[float]]:
    """The distributed optimizer's reference: one float64 process, plain autograd on the
    whole batch (`batch(step)`), clip_grad_norm_, torch's AdamW with decay on matrices
    only, the trainer's schedule for `config` (workers.train.TrainConfig fields).
    Returns the final parameters, each step's loss and each step's gradient norm."""
    from workers.train import TrainConfig, build_model, lr_at

    torch.manual_seed(0)
    model = build_model(tiny_spec(), "fp64")
    cfg = TrainConfig(**config)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": rest, "weight_decay": 0.0}], lr=cfg.lr,
                            betas=cfg.betas, eps=cfg.eps, foreach=False)
    losses, norms = [], []
    for s in range(num_steps):
        loss, grads = reference_loss_and_grads(model, batch(s))
        losses.append(float(loss))
        for n, p in model.named_parameters():
            p.grad = grads[n]
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(),
                                                          cfg.max_grad_norm)))
        for g in opt.param_groups:
            g["lr"] = lr_at(s, cfg)
        opt.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}, losses, norms
