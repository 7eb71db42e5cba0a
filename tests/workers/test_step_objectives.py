"""Every objective is exact under any plan: 4 gloo ranks running `run_step` give the loss
and gradient of one process computing the objective by its formula on the whole batch.

Objectives: pretrain (the mask ignored), SFT (loss targets only), DPO (sigmoid loss with
label smoothing over pairs, reference log-probs stored per token), GRPO (clipped ratio
against stored old log-probs or on-policy, k3 KL to stored reference log-probs, token and
sequence normalisation, asymmetric clip). Plans are hand-written with rings in odd order
([3, 0, 2], [2, 1], [1, 3]), ranks running 2 or 3 micro-batches, a length-1 sequence, a
sequence whose loss targets are all masked (on a ring), DPO pairs packed and on rings, and
version-2 variants under layer-wise StreamBP (3-token chunks) and MEMO offload (alpha 0.5).
A plan that splits a DPO pair is refused on every rank before any micro-batch.

The reference is written here, independently of workers/loss.py and workers/objectives.py:
full [L, V] logits of each sequence by plain autograd (`model(tokens, cu)`), log_softmax at
float64, the masks, the loss formulas of Rafailov et al. 2023 (Eq. 7, with cDPO's label
smoothing), Shao et al. 2024 (Eq. 3) with DAPO's asymmetric clip and the k3 estimator, and
the normalisers of docs/objectives.md.

Tolerance: float64 everywhere; the step adds the same terms in another order (shard
partial sums, ring LSE merges, the all-reduce, StreamBP chunks), a few ulps, ~1e-15
relative. 1e-10 leaves room for that while a missing, duplicated or mis-normalised term
moves the loss by >= 1/N ~ 1e-2. Across ranks gradients must be bit-identical.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from parallelism.worlds import run_distributed
from scheduler.dataset_meta import SampleMeta
from scheduler.errors import PlanValidationError
from scheduler.plan import GroupMemory, StepPlan
from workers.data import sequence_ids_of_rank
from workers.loss import BatchMeta, ObjectiveConfig
from workers.sample import SampleData
from workers.step import run_step

from .helpers import as_v2, group, max_rel_err, plan_of, tiny_model, tiny_spec

WORLD = 4
REL_TOL = 1e-10
MODEL_SEED = 5


def _model():
    """The tiny float64 model with its weights nudged off the init (no trivial gradient)."""
    model = tiny_model(seed=MODEL_SEED)
    g = torch.Generator().manual_seed(MODEL_SEED)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


# ---------------------------------------------------------------------------- the batches
def _sft_plans() -> tuple[list[int], StepPlan, StepPlan]:
    """Lengths, a version-1 plan and its version-2 variant (StreamBP packs, offload rings).

    Sequence 3 has one token (no prediction); sequence 4 (ring [2, 1]) is fully masked.
    Ranks 0 and 1 run three micro-batches, ranks 2 and 3 two."""
    lengths = [23, 5, 9, 1, 17, 7, 2, 11]
    plan = plan_of(WORLD, [
        [group([3, 0, 2], [(0, 23), (1, 5)]), group([1], [(2, 9), (3, 1)])],
        [group([2, 1], [(4, 17)]), group([0], [(5, 7)])],
        [group([0], [(6, 2)]), group([1, 3], [(7, 11)])],
    ])
    v2 = as_v2(plan, tiny_spec(), packed=GroupMemory(scheme="streambp", chunk_tokens=3))
    for mb in v2.micro_batches:
        for g in mb.groups:
            if g.ring_size > 1:
                g.memory = GroupMemory(scheme="offload", offload_ratio=0.5)
    return lengths, plan, v2.check()


def _dpo_plans() -> tuple[list[int], list[tuple[int, int]], StepPlan, StepPlan]:
    """Six pairs: on rings [3, 0, 2] and [2, 1], two packed together on rank 1, one with
    its chosen id after its rejected id, one whose rejected sequence is fully masked."""
    lengths = [19, 14, 6, 9, 4, 3, 12, 10, 5, 7, 8, 2]
    pairs = [(0, 1), (2, 3), (4, 5), (6, 7), (9, 8), (10, 11)]
    plan = plan_of(WORLD, [
        [group([3, 0, 2], [(0, 19), (1, 14)]), group([1], [(2, 6), (3, 9), (4, 4), (5, 3)])],
        [group([2, 1], [(6, 12), (7, 10)]), group([0], [(8, 5), (9, 7)])],
        [group([0], [(10, 8), (11, 2)])],
    ])
    v2 = as_v2(plan, tiny_spec(), packed=GroupMemory(scheme="streambp", chunk_tokens=3))
    return lengths, pairs, plan, v2


def _mask(length: int, g: torch.Generator, kind: str) -> torch.Tensor:
    """A prompt/completion mask (chat rows: two assistant spans); all zeros for 'none'."""
    mask = torch.zeros(length, dtype=torch.bool)
    if kind == "none" or length < 2:
        return mask
    start = int(torch.randint(1, max(2, length // 2), (1,), generator=g))
    mask[start:] = True
    if kind == "chat" and length > 8:
        mask[start + 2:start + 4] = False
    return mask


def _logps(length: int, g: torch.Generator, center: torch.Tensor | None = None,
           spread: float = 0.3) -> torch.Tensor:
    """Per-token log-probs as a dataset column stores them: [0] = 0, values at tokens 1.."""
    base = -torch.rand(length, generator=g, dtype=torch.float64) * 4 - 0.5 if center is None \
        else center + spread * torch.randn(length, generator=g, dtype=torch.float64)
    base[0] = 0.0
    return base


def _full_logps(model, tokens: torch.Tensor) -> torch.Tensor:
    """log p(token t | < t) for t >= 1 with [0] = 0 (how the column aligns), no grad."""
    with torch.no_grad():
        lp = _seq_logps(model, tokens)
    return torch.cat([torch.zeros(1, dtype=torch.float64), lp])


def _build(lengths, kinds, seed: int, *, pairs=(), grpo: dict | None = None):
    """SampleData per plan id: random tokens, the masks, metadata and stored columns."""
    g = torch.Generator().manual_seed(seed)
    role = {a: ("chosen", k) for k, (a, _) in enumerate(pairs)}
    role |= {b: ("rejected", k) for k, (_, b) in enumerate(pairs)}
    model = _model() if grpo else None
    out = {}
    for i, (n, mk) in enumerate(zip(lengths, kinds, strict=True)):
        tokens = torch.randint(0, 256, (n,), generator=g)
        mask = _mask(n, g, mk)
        kind = "dpo" if pairs else "grpo" if grpo else "sft"
        meta = dict(kind=kind, num_loss_tokens=int(mask[1:].sum()))
        ref = old = None
        if pairs:
            meta.update(pair_id=100 + role[i][1], role=role[i][0])
            ref = _logps(n, g)
        if grpo:
            adv = float(torch.randn(1, generator=g, dtype=torch.float64))
            meta.update(group_id=i // 3, reward=adv, advantage=adv)
            current = _full_logps(model, tokens)
            old = _logps(n, g, current) if grpo.get("old") else None
            ref = _logps(n, g, current, 0.2) if grpo.get("ref") else None
        out[i] = SampleData(tokens=tokens, loss_mask=mask, meta=SampleMeta(**meta),
                            ref_logps=ref, old_logps=old)
    return out


def _cases() -> list[dict]:
    lengths, sft, sft_v2 = _sft_plans()
    kinds = ["chat", "sft", "sft", "sft", "none", "sft", "sft", "chat"]
    dpo_lengths, pairs, dpo, dpo_v2 = _dpo_plans()
    dpo_kinds = ["sft"] * 11 + ["none"]
    sft_samples = _build(lengths, kinds, seed=1)
    cases = [
        dict(name="pretrain", plan=sft, samples=sft_samples, objective=ObjectiveConfig()),
        dict(name="sft", plan=sft, samples=sft_samples, objective=ObjectiveConfig(type="sft")),
        dict(name="sft-streambp-offload", plan=sft_v2, samples=sft_samples,
             objective=ObjectiveConfig(type="sft")),
    ]
    dpo_samples = _build(dpo_lengths, dpo_kinds, seed=2, pairs=pairs)
    cases += [
        dict(name="dpo", plan=dpo, samples=dpo_samples,
             objective=ObjectiveConfig(type="dpo", beta=0.5, label_smoothing=0.1)),
        dict(name="dpo-streambp", plan=dpo_v2, samples=dpo_samples,
             objective=ObjectiveConfig(type="dpo", beta=2.0)),
    ]
    grpo = _build(lengths, kinds, seed=3, grpo={"old": True, "ref": True})
    on_policy = _build(lengths, kinds, seed=4, grpo={"ref": True})
    cases += [
        dict(name="grpo-token-kl", plan=sft, samples=grpo,
             objective=ObjectiveConfig(type="grpo", kl_coef=0.05)),
        dict(name="grpo-sequence-asymmetric", plan=sft_v2, samples=grpo,
             objective=ObjectiveConfig(type="grpo", clip_low=0.1, clip_high=0.28,
                                       loss_normalization="sequence")),
        dict(name="grpo-on-policy", plan=sft, samples=on_policy,
             objective=ObjectiveConfig(type="grpo", kl_coef=0.1)),
    ]
    for c in cases:
        s = c["samples"]
        c["batch"] = BatchMeta(
            num_loss_tokens=tuple(int(s[i].loss_mask[1:].sum()) for i in range(len(s))),
            pairs=tuple(pairs) if c["objective"].type == "dpo" else ())
    return cases


# ---------------------------------------------------------------------------- reference
def _seq_logps(model, tokens: torch.Tensor) -> torch.Tensor:
    """float64 log p(tokens[t] | tokens[:t]) for t = 1..L-1 from the full logits."""
    if len(tokens) < 2:
        return torch.zeros(0, dtype=torch.float64)
    logits = model(tokens, torch.tensor([0, len(tokens)], dtype=torch.int32))
    logp = logits[:-1].double().log_softmax(-1)
    return logp.gather(1, tokens[1:, None])[:, 0]


def _reference_loss(model, samples: dict, objective: ObjectiveConfig, pairs) -> torch.Tensor:
    lp = {i: _seq_logps(model, s.tokens) for i, s in samples.items()}
    mask = {i: s.loss_mask[1:].double() for i, s in samples.items()}
    if objective.type == "pretrain":
        return sum(-x.sum() for x in lp.values()) / sum(len(x) for x in lp.values())
    if objective.type == "sft":
        return sum(-(lp[i] * mask[i]).sum() for i in lp) / sum(m.sum() for m in mask.values())
    if objective.type == "dpo":
        def margin(i):
            return (lp[i] * mask[i]).sum() - (samples[i].ref_logps[1:] * mask[i]).sum()
        eps = objective.label_smoothing
        losses = []
        for chosen, rejected in pairs:
            z = objective.beta * (margin(chosen) - margin(rejected))
            losses.append(-(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z))
        return torch.stack(losses).mean()
    per_seq = {i: _grpo_token_losses(lp[i], samples[i], objective) for i in lp}
    if objective.loss_normalization == "token":
        return sum((per_seq[i] * mask[i]).sum() for i in lp) / sum(m.sum()
                                                                    for m in mask.values())
    kept = [i for i in lp if mask[i].sum() > 0]
    return sum((per_seq[i] * mask[i]).sum() / mask[i].sum() for i in kept) / len(kept)


def _grpo_token_losses(lp: torch.Tensor, s: SampleData, objective: ObjectiveConfig):
    adv = s.meta.advantage
    old = lp.detach() if s.old_logps is None else s.old_logps[1:]
    ratio = torch.exp(lp - old)
    clipped = ratio.clamp(1 - objective.clip_low, 1 + objective.clip_high)
    loss = -torch.minimum(ratio * adv, clipped * adv)
    if objective.kl_coef:
        d = s.ref_logps[1:] - lp
        loss = loss + objective.kl_coef * (torch.exp(d) - d - 1)
    return loss


def _reference(case: dict) -> tuple[float, dict[str, torch.Tensor]]:
    model = _model()
    loss = _reference_loss(model, case["samples"], case["objective"], case["batch"].pairs)
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters()}


# ---------------------------------------------------------------------------- the ranks
def _rank_fn(rank: int, world_size: int, cases: list[dict], split: dict):
    torch.set_num_threads(1)
    out = []
    for c in cases:
        plan = StepPlan.model_validate_json(c["plan"])
        model = _model()
        mine = {i: c["samples"][i] for i in sequence_ids_of_rank(plan, rank)}
        stats = run_step(model, plan, mine, rank=rank, objective=c["objective"],
                         batch=c["batch"])
        flat = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        first = flat.clone()
        dist.broadcast(first, src=0)
        grads = {n: p.grad.clone() for n, p in model.named_parameters()} if rank == 0 else None
        out.append((stats.loss, stats.normalizer, grads, bool(torch.equal(flat, first)),
                    len(stats.micro_batch_times_s)))
    try:  # a plan that splits a pair: refused here, before any micro-batch or collective
        plan = StepPlan.model_validate_json(split["plan"])
        mine = {i: split["samples"][i] for i in sequence_ids_of_rank(plan, rank)}
        run_step(_model(), plan, mine, rank=rank, objective=split["objective"],
                 batch=split["batch"])
        refused = None
    except PlanValidationError as exc:
        refused = str(exc)
    dist.barrier()  # every rank is still in step with the others
    return out, refused


def _split_case(dpo: dict) -> dict:
    """The DPO batch with pair (0, 1) torn apart: 0 on a ring, 1 packed a micro-batch later."""
    plan = plan_of(WORLD, [
        [group([3, 0, 2], [(0, 19)]), group([1], [(2, 6), (3, 9), (4, 4), (5, 3)])],
        [group([2, 1], [(6, 12), (7, 10)]), group([0], [(8, 5), (9, 7)])],
        [group([0], [(10, 8), (11, 2)]), group([3], [(1, 14)])],
    ])
    return {**dpo, "plan": plan.model_dump_json()}


@pytest.mark.distributed
def test_every_objective_equals_its_single_process_reference_under_any_plan():
    cases = _cases()
    for c in cases:  # uneven micro-batch counts in every plan
        assert len({len(c["plan"].micro_batches_of(r)) for r in range(WORLD)}) > 1
    wire = [{**c, "plan": c["plan"].model_dump_json()} for c in cases]
    split = _split_case(next(w for w in wire if w["name"] == "dpo"))
    results = run_distributed(_rank_fn, WORLD, wire, split, timeout_s=240)
    for k, case in enumerate(cases):
        want_loss, want_grads = _reference(case)
        loss, normalizer, grads, _, _ = results[0][0][k]
        assert abs(loss - want_loss) <= REL_TOL * abs(want_loss), (case["name"], loss,
                                                                   want_loss)
        assert max_rel_err(grads, want_grads) <= REL_TOL, case["name"]
        for rank in range(WORLD):
            r_loss, r_norm, _, same_grad, num_micro = results[rank][0][k]
            assert same_grad, f"{case['name']}: rank {rank}'s gradient differs from rank 0's"
            assert (r_loss, r_norm) == (loss, normalizer)
            assert num_micro == len(case["plan"].micro_batches_of(rank))
    by_name = {c["name"]: results[0][0][k][1] for k, c in enumerate(cases)}
    assert by_name["pretrain"] == sum(n - 1 for n in _sft_plans()[0])
    assert by_name["dpo"] == 6 and by_name["grpo-sequence-asymmetric"] == 6  # 8 - 2 unmasked
    for rank in range(WORLD):
        assert "batch pair (0, 1): split across" in results[rank][1], results[rank][1]
