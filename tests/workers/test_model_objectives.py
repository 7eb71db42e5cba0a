"""DPO and GRPO through the streamed head equal the unchunked objective (float64, 1e-10).

The reference computes full [T, V] logits with plain autograd through `model(...)` and
writes each objective's formula directly (Rafailov et al. 2023 Eq. 7; Shao et al. 2024
Eq. 3 with token-level sums and the k3 KL estimator).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from workers.model import next_token_targets
from workers.objectives import DPO, GRPO, group_advantages

from .helpers import perturbed_model_and_batch

TOL = 1e-10
LENGTHS = [9, 5, 13, 6, 1, 8]


@pytest.fixture(scope="module")
def setup():
    return perturbed_model_and_batch(LENGTHS, data_seed=2)


def _token_logps(model, ids, cu):
    targets = next_token_targets(ids, cu)
    logp = model(ids, cu_seqlens=cu).log_softmax(-1)
    picked = logp.gather(1, targets.clamp(min=0)[:, None])[:, 0]
    return picked * (targets != -100), targets != -100


def _seq_sums(x, lengths):
    return torch.stack([c.sum() for c in x.split(lengths)])


def _grads(model, fn):
    model.zero_grad(set_to_none=True)
    out = fn()
    return out, {n: p.grad.clone() for n, p in model.named_parameters()}


def _check(got, want):
    for n, g in want.items():
        err = ((got[n] - g).norm() / g.norm()).item()
        assert err <= TOL, f"{n}: relative error {err:.2e}"


KW = [pytest.param({}, id="plain"), pytest.param({"stream_chunk_size": 7}, id="streambp-7"),
      pytest.param({"offload_ratio": 0.5}, id="offload-0.5")]


@pytest.mark.parametrize("kwargs", KW)
def test_dpo_equals_unchunked(setup, kwargs):
    model, ids, cu = setup
    g = torch.Generator().manual_seed(5)
    obj = DPO(chosen=torch.tensor([0, 2, 5]), rejected=torch.tensor([1, 3, 4]),
              ref_chosen_logps=-40 + torch.randn(3, generator=g, dtype=torch.float64),
              ref_rejected_logps=-40 + torch.randn(3, generator=g, dtype=torch.float64),
              beta=0.3)

    def reference():
        seq = _seq_sums(_token_logps(model, ids, cu)[0], LENGTHS)
        z = obj.beta * ((seq[obj.chosen] - obj.ref_chosen_logps)
                        - (seq[obj.rejected] - obj.ref_rejected_logps))
        loss = -F.logsigmoid(z).sum()
        (loss * 0.5).backward()
        return loss.item()

    want_loss, want = _grads(model, reference)
    (loss, num), got = _grads(model, lambda: model.forward_backward(
        ids, cu_seqlens=cu, objective=obj, grad_scale=0.5, **kwargs))
    _check(got, want)
    assert num == 3 and abs(float(loss) - want_loss) <= TOL * abs(want_loss)


@pytest.mark.parametrize("kwargs", KW)
def test_grpo_equals_unchunked(setup, kwargs):
    model, ids, cu = setup
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():
        lp = _token_logps(model, ids, cu)[0]
    adv = group_advantages(torch.rand(6, generator=g, dtype=torch.float64), 3)
    obj = GRPO(advantages=adv, clip_low=0.2, clip_high=0.2, kl_coef=0.05,
               old_logps=lp + 0.3 * torch.randn(lp.shape, generator=g, dtype=torch.float64),
               ref_logps=lp + 0.2 * torch.randn(lp.shape, generator=g, dtype=torch.float64))

    def reference():
        logp, valid = _token_logps(model, ids, cu)
        a = adv.repeat_interleave(torch.tensor(LENGTHS))
        ratio = torch.exp(logp - obj.old_logps)
        surr = torch.minimum(ratio * a, ratio.clamp(0.8, 1.2) * a)
        d = obj.ref_logps - logp
        loss = ((-surr + 0.05 * (d.exp() - d - 1)) * valid).sum()
        (loss * 0.5).backward()
        return loss.item()

    want_loss, want = _grads(model, reference)
    (loss, num), got = _grads(model, lambda: model.forward_backward(
        ids, cu_seqlens=cu, objective=obj, grad_scale=0.5, **kwargs))
    _check(got, want)
    assert num == sum(LENGTHS) - len(LENGTHS)
    assert abs(float(loss) - want_loss) <= TOL * abs(want_loss)


def test_group_advantages_are_standardised_per_group():
    adv = group_advantages(torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0]), 3)
    assert torch.allclose(adv[:3], torch.tensor([-1.2247, 0.0, 1.2247], dtype=torch.float64),
                          atol=1e-4)
    assert torch.equal(adv[3:], torch.zeros(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="group_size=4"):
        group_advantages(torch.rand(6), 4)


def test_objective_mistakes_name_the_field(setup):
    model, ids, cu = setup
    bad_pairs = DPO(chosen=torch.tensor([0]), rejected=torch.tensor([9]),
                    ref_chosen_logps=torch.zeros(1), ref_rejected_logps=torch.zeros(1))
    with pytest.raises(ValueError, match="DPO.rejected"):
        model.forward_backward(ids, cu_seqlens=cu, objective=bad_pairs)
    bad_adv = GRPO(advantages=torch.zeros(2), old_logps=torch.zeros(ids.shape[0]))
    with pytest.raises(ValueError, match="GRPO.advantages"):
        model.forward_backward(ids, cu_seqlens=cu, objective=bad_adv)
