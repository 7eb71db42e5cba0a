"""The streamed loss head: LM head + objective, forward and backward one sequence chunk at a time.

StreamBP (arXiv 2506.03077, Sec. 3.1) never materialises the [T, V] logits: for each chunk
of tokens it computes the chunk's logits, its loss and that loss's backward into the hidden
states and the head weight, then frees the chunk, so the head's activation peak is one
chunk's logits instead of all of them. Objectives whose gradient couples tokens through a
sequence-level quantity (DPO's sequence log-probability, Rafailov et al. 2023, Eq. 7) take
a first no-grad chunked pass that computes the per-sequence factor dL/dlogp(seq); the
chunked backward then weights each token's log-probability by its sequence's factor, which
is the exact gradient (the StreamBP paper's treatment of DPO/GRPO, Sec. 3.3).

Objectives (all return a *sum*; the caller divides by a global count, docs/architecture.md
"The invariant"):
  NextTokenCE  sum over predictions of -log p(target)       normalised per prediction
  DPO          sum over pairs of -log sigmoid(beta * margin) (label-smoothed)  per pair
  GRPO         sum over loss tokens of the clipped surrogate (Shao et al. 2024, Eq. 3) plus
               an optional k3 KL to a reference policy, weighted per sequence for
               per-sequence normalisation                     per token or per sequence
Which targets carry a loss is the targets themselves: a masked target is IGNORE_INDEX.
The global counts and why they make every plan exact: docs/objectives.md.

Legend: T tokens, H hidden, V vocab, S sequences, P pairs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import kernels
from parallelism.offload import track_buffer
from parallelism.progress import PROGRESS

IGNORE_INDEX = -100


@dataclass(frozen=True, kw_only=True)
class HeadInputs:
    """What every objective sees: the final hidden states and where sequences start."""

    hidden_TH: torch.Tensor  # last decoder layer's output (before the final norm), detached
    targets_T: torch.Tensor  # next-token ids, IGNORE_INDEX where there is no prediction
    seq_index_T: torch.Tensor  # which sequence of the packed batch each token belongs to
    num_sequences: int  # sequences in the packed batch (len(cu_seqlens) - 1)
    chunk_size: int  # tokens per streamed chunk
    grad_scale: float  # multiplies every gradient (e.g. 1 / global number of predictions)


def _chunks(num_tokens: int, chunk_size: int) -> Iterator[slice]:
    for start in range(0, num_tokens, chunk_size):
        PROGRESS.phase("head")  # each chunk is progress (parallelism.progress)
        yield slice(start, min(start + chunk_size, num_tokens))


def token_logps(hidden_TH: torch.Tensor, norm, weight_VH: torch.Tensor,
                targets_T: torch.Tensor) -> torch.Tensor:
    """log p(target) per token (0 where the target is ignored), at >= float32."""
    logits = F.linear(norm(hidden_TH), weight_VH)
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    valid = targets_T != IGNORE_INDEX
    picked = logits.log_softmax(-1).gather(1, targets_T.clamp(min=0)[:, None])[:, 0]
    return torch.where(valid, picked, torch.zeros_like(picked))


def _leaf_grad(h: torch.Tensor) -> torch.Tensor:
    """The gradient a backward left in leaf `h`: set, since every objective's chunk loss
    is computed from `h` (token_logps, or the fused kernel)."""
    assert h.grad is not None, "the chunk's loss does not depend on its hidden states"
    return h.grad


class ChunkedHead:
    """Runs f(chunk's token log-probs) -> loss chunk by chunk and backprops each chunk."""

    def __init__(self, inputs: HeadInputs, norm, weight_VH: torch.Tensor):
        self.inputs, self.norm, self.weight = inputs, norm, weight_VH
        self.grad_hidden = track_buffer(torch.zeros_like(inputs.hidden_TH))

    def slices(self) -> Iterator[slice]:
        return _chunks(self.inputs.hidden_TH.shape[0], self.inputs.chunk_size)

    @torch.no_grad()
    def logps_no_grad(self, sl: slice) -> torch.Tensor:
        return token_logps(self.inputs.hidden_TH[sl], self.norm, self.weight,
                           self.inputs.targets_T[sl])

    def backward_chunk(self, sl: slice, loss_fn) -> torch.Tensor:
        """loss_fn(logps_chunk, sl) -> scalar; its gradient lands in params and grad_hidden."""
        with torch.enable_grad():
            h = self.inputs.hidden_TH[sl].detach().requires_grad_()
            loss = loss_fn(token_logps(h, self.norm, self.weight, self.inputs.targets_T[sl]), sl)
            (loss * self.inputs.grad_scale).backward()
        self.grad_hidden[sl] = _leaf_grad(h)
        return loss.detach()


@dataclass(frozen=True, kw_only=True)
class NextTokenCE:
    """SFT / pretraining: sum of next-token cross-entropy over all predictions."""

    def streamed_backward(self, inputs: HeadInputs, norm, weight_VH: torch.Tensor):
        """(loss_sum, num_predictions, d loss_sum*grad_scale / d hidden) via the fused kernel."""
        grad_hidden = track_buffer(torch.zeros_like(inputs.hidden_TH))
        loss_sum = torch.zeros((), dtype=torch.float64, device=inputs.hidden_TH.device)
        num = torch.zeros((), dtype=torch.int64, device=inputs.hidden_TH.device)
        for sl in _chunks(inputs.hidden_TH.shape[0], inputs.chunk_size):  # no host syncs
            with torch.enable_grad():
                h = inputs.hidden_TH[sl].detach().requires_grad_()
                loss, n = kernels.linear_cross_entropy(norm(h), weight_VH, inputs.targets_T[sl],
                                                       ignore_index=IGNORE_INDEX,
                                                       chunk_size=inputs.chunk_size)
                (loss * inputs.grad_scale).backward()
            grad_hidden[sl] = _leaf_grad(h)
            loss_sum += loss.detach().double()
            num += n
        return loss_sum.cpu(), int(num), grad_hidden


@dataclass(frozen=True, kw_only=True)
class DPO:
    """Direct preference optimisation over (chosen, rejected) sequence pairs of the batch.

    A sequence's log-probability is the sum over its loss targets (targets_T not
    IGNORE_INDEX: the completion). On a ring every member holds a zigzag shard of both
    sequences of a pair; `ring_sum` adds the members' partial sums (parallelism.ring_sum,
    bit-identical everywhere), so every member sees the pair's whole margin and
    backpropagates its own tokens: the exact gradient, one small exchange per micro-batch.
    The loss is the sigmoid loss with label smoothing eps (Mitchell 2023, "conservative
    DPO", the convention of TRL's `label_smoothing`):
    -(1 - eps) log sigmoid(z) - eps log sigmoid(-z), z = beta x margin.
    """

    chosen: torch.Tensor  # [P] index of each pair's chosen sequence in the packed batch
    rejected: torch.Tensor  # [P] index of each pair's rejected sequence
    ref_chosen_logps: torch.Tensor  # [P] reference policy's summed log-prob of the chosen seq
    ref_rejected_logps: torch.Tensor  # [P] same for the rejected sequence
    beta: float = 0.1  # inverse temperature of the implicit reward
    label_smoothing: float = 0.0  # assumed share of flipped preference labels, in [0, 0.5)
    ring_sum: Callable[[torch.Tensor], torch.Tensor] | None = None  # ring members' sum

    def validate(self, num_sequences: int) -> None:
        p = self.chosen.shape[0]
        for name in ("chosen", "rejected", "ref_chosen_logps", "ref_rejected_logps"):
            t = getattr(self, name)
            if t.dim() != 1 or t.shape[0] != p:
                raise ValueError(f"DPO.{name} has shape {tuple(t.shape)}; expected [{p}] "
                                 "(one entry per pair, like DPO.chosen)")
        for name in ("chosen", "rejected"):
            idx = getattr(self, name)
            if p and (int(idx.min()) < 0 or int(idx.max()) >= num_sequences):
                raise ValueError(f"DPO.{name}={idx.tolist()} must index the batch's "
                                 f"{num_sequences} sequences (0..{num_sequences - 1})")
        if bool((self.chosen == self.rejected).any()):
            raise ValueError("DPO.chosen and DPO.rejected must differ in every pair")
        if not self.beta > 0:
            raise ValueError(f"DPO.beta={self.beta} must be > 0")
        if not 0 <= self.label_smoothing < 0.5:
            raise ValueError(f"DPO.label_smoothing={self.label_smoothing} must be in [0, 0.5)")

    def pair_loss(self, seq_logps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed loss, d loss / d margin per pair) from whole-sequence log-probs."""
        z = self.beta * ((seq_logps[self.chosen] - self.ref_chosen_logps.double())
                         - (seq_logps[self.rejected] - self.ref_rejected_logps.double()))
        eps = self.label_smoothing
        # softplus(-z) = -log sigmoid(z)
        loss = ((1 - eps) * F.softplus(-z) + eps * F.softplus(z)).sum()
        dz = -(1 - eps) * torch.sigmoid(-z) + eps * torch.sigmoid(z)
        return loss, dz * self.beta

    def streamed_backward(self, inputs: HeadInputs, norm, weight_VH: torch.Tensor):
        self.validate(inputs.num_sequences)
        head = ChunkedHead(inputs, norm, weight_VH)
        seq_logps = torch.zeros(inputs.num_sequences, dtype=torch.float64,
                                device=inputs.hidden_TH.device)
        for sl in head.slices():  # pass 1 (no grad): sequence log-probs
            seq_logps.index_add_(0, inputs.seq_index_T[sl], head.logps_no_grad(sl).double())
        if self.ring_sum is not None:
            seq_logps = self.ring_sum(seq_logps)
        loss_sum, d_margin = self.pair_loss(seq_logps)
        factor = torch.zeros_like(seq_logps)  # d loss / d logp(seq): chosen +, rejected -
        factor.index_add_(0, self.chosen, d_margin).index_add_(0, self.rejected, -d_margin)
        for sl in reversed(list(head.slices())):  # pass 2: factor-weighted chunk backward
            head.backward_chunk(sl, lambda lp, s: (factor[inputs.seq_index_T[s]].to(lp.dtype)
                                                   * lp).sum())
        return loss_sum.cpu(), int(self.chosen.shape[0]), head.grad_hidden


@dataclass(frozen=True, kw_only=True)
class GRPO:
    """Group-relative policy optimisation: clipped ratio surrogate with per-sequence advantages.

    Per loss token t of sequence i (Shao et al. 2024, Eq. 3; the asymmetric clip of DAPO,
    Yu et al. 2025): r_t = exp(logp_t - old_t), loss_t = -min(r_t A_i, clip(r_t, 1 - low,
    1 + high) A_i) + kl_coef x k3_t, with the k3 estimator of KL(policy || ref)
    k3_t = exp(ref_t - logp_t) - (ref_t - logp_t) - 1 (Schulman 2020; DeepSeekMath Eq. 4).
    Without `old_logps` the step is on-policy: r_t = exp(logp_t - stop_grad(logp_t)) is 1
    with the gradient of logp_t, where the clip is inactive. The sum is weighted per
    sequence by `sequence_weights` (1 / |o_i| for per-sequence normalisation; None: 1).
    """

    advantages: torch.Tensor  # [S] one advantage per sequence (see group_advantages)
    old_logps: torch.Tensor | None = None  # [T] log-prob of each target under the sampler
    clip_low: float = 0.2  # the ratio is clipped to [1 - clip_low, 1 + clip_high]
    clip_high: float = 0.2
    ref_logps: torch.Tensor | None = None  # [T] reference policy log-probs for the KL term
    kl_coef: float = 0.0  # weight of the k3 KL estimator exp(r - l) - (r - l) - 1
    sequence_weights: torch.Tensor | None = None  # [S] weight of each sequence's tokens

    def validate(self, num_tokens: int, num_sequences: int) -> None:
        per_sequence, per_token = "one per sequence", "one per token, aligned with targets"
        for name, want, what in (("advantages", num_sequences, per_sequence),
                                 ("sequence_weights", num_sequences, per_sequence),
                                 ("old_logps", num_tokens, per_token),
                                 ("ref_logps", num_tokens, per_token)):
            t = getattr(self, name)
            if t is not None and tuple(t.shape) != (want,):
                raise ValueError(f"GRPO.{name} has shape {tuple(t.shape)}; expected "
                                 f"[{want}] ({what})")
        if not (0 <= self.clip_low < 1 and self.clip_high >= 0):
            raise ValueError(f"GRPO.clip_low={self.clip_low} must be in [0, 1) and "
                             f"GRPO.clip_high={self.clip_high} >= 0")
        if self.kl_coef and self.ref_logps is None:
            raise ValueError(f"GRPO.kl_coef={self.kl_coef} needs GRPO.ref_logps")

    def token_loss(self, logps: torch.Tensor, sl: slice, seq_index: torch.Tensor):
        adv = self.advantages[seq_index].to(logps.dtype)
        if self.old_logps is None:  # on-policy: ratio 1, clip inactive
            loss = -torch.exp(logps - logps.detach()) * adv
        else:
            ratio = torch.exp(logps - self.old_logps[sl].to(logps.dtype))
            clipped = ratio.clamp(1 - self.clip_low, 1 + self.clip_high)
            loss = -torch.minimum(ratio * adv, clipped * adv)
        if self.kl_coef:
            assert self.ref_logps is not None, "validate() requires ref_logps with kl_coef"
            d = self.ref_logps[sl].to(logps.dtype) - logps
            loss = loss + self.kl_coef * (torch.exp(d) - d - 1)
        if self.sequence_weights is not None:
            loss = loss * self.sequence_weights[seq_index].to(logps.dtype)
        return loss

    def streamed_backward(self, inputs: HeadInputs, norm, weight_VH: torch.Tensor):
        self.validate(inputs.hidden_TH.shape[0], inputs.num_sequences)
        head = ChunkedHead(inputs, norm, weight_VH)
        valid = inputs.targets_T != IGNORE_INDEX
        loss_sum = torch.zeros((), dtype=torch.float64)

        def chunk_loss(lp: torch.Tensor, sl: slice) -> torch.Tensor:
            per_token = self.token_loss(lp, sl, inputs.seq_index_T[sl])
            return torch.where(valid[sl], per_token, torch.zeros_like(per_token)).sum()

        for sl in reversed(list(head.slices())):  # token-local: one pass suffices
            loss_sum += head.backward_chunk(sl, chunk_loss).double().cpu()
        return loss_sum, int(valid.sum()), head.grad_hidden


def group_advantages(rewards: torch.Tensor, group_size: int, *, eps: float = 1e-6):
    """GRPO's A_i = (r_i - mean(group)) / (std(group) + eps), groups of consecutive sequences."""
    if group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"group_size={group_size} must be >= 1 and divide the "
                         f"{rewards.numel()} rewards")
    r = rewards.reshape(-1, group_size).double()
    std = r.std(dim=1, keepdim=True, unbiased=False) if group_size > 1 else torch.zeros_like(r)
    return ((r - r.mean(dim=1, keepdim=True)) / (std + eps)).reshape(-1)


Objective = NextTokenCE | DPO | GRPO
