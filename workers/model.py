"""The Llama-style Transformer the workers train, and its fused forward+backward step.

`Transformer.__call__` is plain autograd on a packed varlen batch (the reference every memory
scheme is tested against). `Transformer.forward_backward` is what the worker's step runs:
it fuses forward and backward so that

  - the LM head and the objective are streamed in sequence chunks (StreamBP Sec. 3.1,
    workers/objectives.py), never materialising [T, V] logits;
  - `stream_chunk_size` turns on layer-wise StreamBP (parallelism/streambp.py): the forward
    keeps only layer inputs and each layer's backward runs chunk by chunk;
  - `offload_ratio` turns on MEMO's token-wise swap/recompute (parallelism/offload.py), or,
    with StreamBP, swaps that share of the kept layer inputs to host;
  - `ring` runs the layers' attention as ring attention over a zigzag-sharded sequence
    (parallelism/ring_attention.py); see docs/streambp.md for why a ring uses offload
    rather than StreamBP.

Loss: the objective's *sum* (next-token CE summed over predictions by default); gradients
are accumulated (+=) times `grad_scale`, so the caller divides by the global number of
predictions (docs/architecture.md "The invariant", ByteScale Eq. 1 = Eq. 2).

Legend: T tokens (packed), H hidden, V vocab, S sequences.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.graph import get_gradient_edge

from parallelism.offload import (
    AttentionCore,
    HostSwapper,
    TokenwiseOffloadStack,
    local_attention_core,
    ring_attention_core,
)
from parallelism.progress import PROGRESS
from parallelism.streambp import StreamBPStack
from scheduler.specs import ModelSpec
from workers.layers import DecoderLayer, RMSNorm
from workers.objectives import (
    DPO,
    GRPO,
    IGNORE_INDEX,
    HeadInputs,
    NextTokenCE,
    Objective,
    token_logps,
)

DEFAULT_HEAD_CHUNK = 4096  # tokens per streamed head chunk when StreamBP is off
INIT_STD = 0.02

_DTYPES = {"float64": torch.float64, "float32": torch.float32, "float16": torch.float16,
           "bfloat16": torch.bfloat16}


def next_token_targets(input_ids: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """targets[t] = input_ids[t + 1] within t's sequence; -100 at each sequence's last token."""
    targets = torch.full_like(input_ids, IGNORE_INDEX)
    targets[:-1] = input_ids[1:]
    ends = cu_seqlens[1:].long()
    ends = ends[ends > cu_seqlens[:-1].long()] - 1  # last token of each non-empty sequence
    targets[ends.to(input_ids.device)] = IGNORE_INDEX
    return targets


def sequence_index(cu_seqlens: torch.Tensor, device=None) -> torch.Tensor:
    """[T] index of the sequence each packed token belongs to."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long().cpu()
    idx = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
    return idx.to(device) if device is not None else idx


def default_position_ids(cu_seqlens: torch.Tensor, device=None) -> torch.Tensor:
    """Position of each token within its own sequence."""
    seq = sequence_index(cu_seqlens)
    pos = torch.arange(len(seq)) - cu_seqlens.long().cpu()[seq]
    return pos.to(device) if device is not None else pos


class Transformer(nn.Module):
    """Llama-style decoder: embedding, `num_layers` DecoderLayers, RMSNorm, LM head.

    The options of Llama 2/3, Mistral, Qwen2 and Qwen3 come from the ModelSpec (layer
    options in workers/layers.py). With `tie_word_embeddings` the head's weight *is* the
    embedding's Parameter: parameters() lists it once and its .grad collects both the
    head's and the embedding's contribution. `source_dir` is the Hugging Face model
    directory the model came from (workers.hf), if any: exports copy its tokenizer files.
    """

    def __init__(self, spec: ModelSpec, *, initialize: bool = True):
        """`initialize=False` skips the random init (weights about to be loaded; on the meta
        device this also avoids normal_, whose meta kernel imports torch._dynamo)."""
        super().__init__()
        self.spec = spec
        self.source_dir: str | None = None
        dtype = _DTYPES[spec.dtype]
        shape = (spec.vocab_size, spec.hidden_size)
        self.embed = nn.Embedding(*shape, dtype=dtype) if initialize else \
            nn.Embedding(*shape, dtype=dtype, _weight=torch.empty(shape, dtype=dtype))
        self.layers = nn.ModuleList(DecoderLayer.from_spec(spec, dtype)
                                    for _ in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, eps=spec.norm_eps, dtype=dtype)
        self.head = nn.Linear(spec.hidden_size, spec.vocab_size, bias=False, dtype=dtype)
        self.tie_weights()
        if initialize:
            self.reset_parameters()

    def tie_weights(self) -> None:
        """Make the head's weight the embedding's (tied specs; again after to_empty)."""
        if self.spec.tie_word_embeddings:
            self.head.weight = self.embed.weight

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """N(0, 0.02) weights, residual outputs scaled by 1/sqrt(2L) (GPT-2), unit norms,
        zero biases."""
        self.embed.weight.normal_(0.0, INIT_STD)
        out_std = INIT_STD / math.sqrt(2 * self.spec.num_layers)
        for layer in self.layers:
            assert isinstance(layer, DecoderLayer)
            layer.reset_parameters(std=INIT_STD, out_std=out_std)
        self.norm.weight.fill_(1.0)
        if not self.spec.tie_word_embeddings:
            self.head.weight.normal_(0.0, INIT_STD)

    # ------------------------------------------------------------------ plain autograd
    def forward(self, input_ids: torch.Tensor, cu_seqlens: torch.Tensor,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """logits [T, V] of a packed batch (plain autograd; the reference)."""
        cu, pos = self._check_batch(input_ids, cu_seqlens, position_ids)
        core = local_attention_core(cu).autograd
        x = self.embed(input_ids)
        for layer in self.layers:
            x = layer(x, pos, core)
        return self.head(self.norm(x))

    # ------------------------------------------------------------------ forward only
    @torch.no_grad()
    def token_logprobs(self, input_ids: torch.Tensor, *, cu_seqlens: torch.Tensor,
                       position_ids: torch.Tensor | None = None,
                       targets: torch.Tensor | None = None, ring: list[int] | None = None,
                       chunk_size: int = DEFAULT_HEAD_CHUNK, comm_stats=None) -> torch.Tensor:
        """[T] float log p(targets[t] | tokens <= t), 0 where there is no target; no graph.

        What a reference or sampling policy's stored log-probs are made of (workers/ref_logps.py).
        The inputs are as forward_backward takes them (a zigzag shard with `ring`); each
        layer's activations are freed as soon as the next layer has run, and the head is
        streamed in `chunk_size` tokens, so no [T, V] logits exist at once.
        """
        self._check_step(ring, position_ids, targets, None, 0.0, 1.0, NextTokenCE())
        cu, pos = self._check_batch(input_ids, cu_seqlens, position_ids)
        targets = next_token_targets(input_ids, cu) if targets is None else targets
        _check_same_length("targets", targets, input_ids)
        core = self._ring_core(cu, ring, comm_stats) if ring is not None \
            else local_attention_core(cu)
        x = F.embedding(input_ids, self.embed.weight)
        for layer in self.layers:
            x = layer(x, pos, core.autograd)
        out = torch.empty(x.shape[0], dtype=torch.promote_types(x.dtype, torch.float32),
                          device=x.device)
        for start in range(0, x.shape[0], chunk_size):
            sl = slice(start, start + chunk_size)
            out[sl] = token_logps(x[sl], self.norm, self.head.weight, targets[sl])
        return out

    # ------------------------------------------------------------------ fused step
    def forward_backward(self, input_ids: torch.Tensor, *, cu_seqlens: torch.Tensor,
                         position_ids: torch.Tensor | None = None,
                         targets: torch.Tensor | None = None, grad_scale: float = 1.0,
                         stream_chunk_size: int | None = None, offload_ratio: float = 0.0,
                         ring: list[int] | None = None,
                         objective: Objective | None = None,
                         comm_stats=None, scheme: str | None = None) -> tuple[torch.Tensor, int]:
        """(loss_sum, num_predictions); parameter .grad += grad_scale * d loss_sum / d param.

        With `ring`, inputs (ids, cu_seqlens, position_ids, targets) are this rank's zigzag
        shard (parallelism.zigzag_shard); position_ids and targets are then required, and
        `comm_stats` (parallelism.CommStats) counts the ring bytes this rank sends.
        `scheme` names the memory scheme explicitly ("plain", "streambp", "offload": MEMO
        even at offload_ratio 0, i.e. full recompute); None infers it from the arguments
        (stream_chunk_size set: StreamBP; offload_ratio > 0: offload; else plain).
        loss_sum is a detached float64 scalar on the CPU; num_predictions an int (pairs
        for DPO).
        """
        objective = NextTokenCE() if objective is None else objective
        self._check_step(ring, position_ids, targets, stream_chunk_size, offload_ratio,
                         grad_scale, objective)
        cu, pos = self._check_batch(input_ids, cu_seqlens, position_ids)
        targets = next_token_targets(input_ids, cu) if targets is None else targets
        _check_same_length("targets", targets, input_ids)
        scheme = _check_scheme(scheme, stream_chunk_size, offload_ratio, ring)
        stack = self._make_stack(cu, pos, stream_chunk_size, offload_ratio, ring, comm_stats,
                                 scheme)
        with torch.no_grad():
            hidden = stack.forward(F.embedding(input_ids, self.embed.weight))
        PROGRESS.phase("head")
        inputs = HeadInputs(hidden_TH=hidden, targets_T=targets,
                            seq_index_T=sequence_index(cu, input_ids.device),
                            num_sequences=len(cu) - 1,
                            chunk_size=stream_chunk_size or DEFAULT_HEAD_CHUNK,
                            grad_scale=float(grad_scale))
        loss_sum, num, grad_hidden = objective.streamed_backward(inputs, self.norm,
                                                                 self.head.weight)
        del hidden, inputs
        handoff = [grad_hidden]
        del grad_hidden  # the stack's backward owns it: freed after the top layer's backward
        grad_embed = stack.backward(handoff.pop())
        with torch.enable_grad():
            torch.autograd.backward([F.embedding(input_ids, self.embed.weight)], [grad_embed])
        return loss_sum, num

    def _make_stack(self, cu, pos, stream_chunk_size, offload_ratio, ring, comm_stats=None,
                    scheme: str = "plain"):
        core = self._ring_core(cu, ring, comm_stats) if ring is not None \
            else local_attention_core(cu)
        swapper = HostSwapper(pos.device)
        if scheme == "streambp" and ring is not None:
            warnings.warn(f"stream_chunk_size={stream_chunk_size} is not used with ring: a "
                          "context-parallel group runs MEMO token-wise offload/recompute "
                          f"(offload_ratio={offload_ratio}) instead of layer-wise StreamBP "
                          "(docs/streambp.md); the loss head is still streamed", stacklevel=3)
            scheme = "offload"
        if scheme == "streambp":
            return StreamBPStack(self.layers, position_ids=pos, cu_seqlens=cu,
                                 chunk_size=stream_chunk_size, core_forward=core.forward,
                                 offload_ratio=offload_ratio, swapper=swapper)
        if scheme == "offload":
            return TokenwiseOffloadStack(self.layers, position_ids=pos, core=core,
                                         alpha=offload_ratio, swapper=swapper)
        return AutogradStack(self.layers, position_ids=pos, core=core)

    @staticmethod
    def _ring_core(cu: torch.Tensor, ring: list[int], comm_stats=None) -> AttentionCore:
        return ring_attention_core(cu, ring, comm_stats=comm_stats)

    # ------------------------------------------------------------------ input checks
    def _check_batch(self, input_ids, cu_seqlens, position_ids):
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 1 \
                or input_ids.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"input_ids must be a 1-D int tensor [T] (a packed batch); got "
                             f"{_describe(input_ids)}")
        if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 \
                or cu_seqlens.dtype != torch.int32:
            raise ValueError(f"cu_seqlens must be a 1-D int32 tensor; got {_describe(cu_seqlens)}")
        cu = cu_seqlens.cpu()
        if len(cu) < 2 or int(cu[0]) != 0 or int(cu[-1]) != input_ids.shape[0] \
                or bool((cu[1:] < cu[:-1]).any()):
            raise ValueError(f"cu_seqlens={cu.tolist()} must start at 0, never decrease and end "
                             f"at the number of tokens T={input_ids.shape[0]}")
        if input_ids.numel() and (int(input_ids.min()) < 0
                                  or int(input_ids.max()) >= self.spec.vocab_size):
            lo, hi = int(input_ids.min()), int(input_ids.max())
            raise ValueError(f"input_ids hold ids in [{lo}, {hi}]; valid ids are "
                             f"0..{self.spec.vocab_size - 1}")
        if position_ids is None:  # whole sequences: check them against a sliding window
            if self.spec.sliding_window is not None and len(cu) > 1:
                self.spec.check_sequence_length(int((cu[1:] - cu[:-1]).max()))
            return cu, default_position_ids(cu, input_ids.device)
        _check_same_length("position_ids", position_ids, input_ids)
        return cu, position_ids

    @staticmethod
    def _check_step(ring, position_ids, targets, stream_chunk_size, offload_ratio,
                    grad_scale, objective) -> None:
        if ring is not None:
            if len(ring) < 1 or len(set(ring)) != len(ring):
                raise ValueError(f"ring={ring} must list distinct global ranks")
            missing = [n for n, v in (("position_ids", position_ids), ("targets", targets))
                       if v is None]
            if missing:
                raise ValueError(f"with ring={ring} the inputs are a zigzag shard, so "
                                 f"{' and '.join(missing)} must be given (sharded like "
                                 "input_ids; a shard's last token predicts a token on "
                                 "another rank)")
            if isinstance(objective, DPO) and objective.ring_sum is None and len(ring) > 1:
                raise ValueError(f"objective=DPO with ring={ring} needs DPO.ring_sum (the "
                                 "ring members' sum of the sequence log-probs, "
                                 "parallelism.ring_sum): each member holds a shard")
        if stream_chunk_size is not None and (not isinstance(stream_chunk_size, int)
                                              or isinstance(stream_chunk_size, bool)
                                              or stream_chunk_size < 1):
            raise ValueError(f"stream_chunk_size={stream_chunk_size!r} must be None (off) or "
                             "an int >= 1")
        if not 0.0 <= offload_ratio <= 1.0:
            raise ValueError(f"offload_ratio={offload_ratio} must be in [0, 1]")
        if not math.isfinite(grad_scale):
            raise ValueError(f"grad_scale={grad_scale} must be finite")
        if not isinstance(objective, NextTokenCE | DPO | GRPO):
            raise ValueError(f"objective={objective!r} must be NextTokenCE, DPO or GRPO "
                             "(workers.objectives)")


def _check_scheme(scheme: str | None, stream_chunk_size, offload_ratio: float, ring) -> str:
    """The stack to run: the named scheme, or the one the arguments imply."""
    if scheme is None:
        if stream_chunk_size is not None:
            return "streambp"
        return "offload" if offload_ratio > 0 else "plain"
    if scheme not in ("plain", "streambp", "offload"):
        raise ValueError(f"scheme={scheme!r} is not valid; valid: plain, streambp, offload")
    if scheme == "streambp" and stream_chunk_size is None:
        raise ValueError("scheme='streambp' needs stream_chunk_size (tokens per chunk)")
    if scheme == "plain" and (offload_ratio or stream_chunk_size is not None):
        raise ValueError(f"scheme='plain' takes no offload_ratio ({offload_ratio}) or "
                         f"stream_chunk_size ({stream_chunk_size})")
    return scheme


class AutogradStack:
    """All layers under plain autograd (no memory scheme), forward then backward."""

    def __init__(self, layers, *, position_ids: torch.Tensor, core: AttentionCore):
        self.layers, self.pos, self.core = layers, position_ids, core

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.x_leaf = x.detach().requires_grad_()
        with torch.enable_grad():
            y = self.x_leaf
            for i, layer in enumerate(self.layers):
                PROGRESS.layer(i, "forward")
                y = layer(y, self.pos, self.core.autograd)
                # fires as autograd reaches this layer's output: its backward starts
                y.register_hook(_backward_marker(i))
        self.y_edge = get_gradient_edge(y)
        return y.detach()

    def backward(self, dy: torch.Tensor) -> torch.Tensor:
        torch.autograd.backward([self.y_edge], [dy])
        assert self.x_leaf.grad is not None, "the backward above wrote it"
        return self.x_leaf.grad


def _backward_marker(layer: int):
    def mark(grad: torch.Tensor) -> None:
        PROGRESS.layer(layer, "backward")
    return mark


def _check_same_length(name: str, t, input_ids: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(input_ids.shape):
        raise ValueError(f"{name} must be a tensor shaped like input_ids "
                         f"{tuple(input_ids.shape)}; got {_describe(t)}")


def _describe(t) -> str:
    if isinstance(t, torch.Tensor):
        return f"tensor shape={tuple(t.shape)} dtype={t.dtype}"
    return repr(t)
