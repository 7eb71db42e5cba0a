"""One training step of a StepPlan on one rank: forward + backward of its micro-batches,
then one gradient reduction over the world.

The loss is the one of docs/architecture.md ("The invariant"): the objective's sum over
the global batch (next-token cross-entropy over every prediction for pre-training; over the
loss targets for SFT; GRPO's surrogate; DPO's pair losses) divided by one global count N
(predictions sum(L_i - 1), loss targets, sequences or pairs: workers/loss.py,
docs/objectives.md). Every rank knows N before its first micro-batch, from the plan's
lengths or the batch's per-sample records. In the training path (`grads`, the
optimizer's parallelism.GradBuffer) each micro-batch's gradient of its summed loss is
added into the flat master-dtype buffer, and after the rank's last micro-batch one
reduction (all-reduce, or the distributed optimizer's
reduce-scatter) sums the ranks' partial gradients and divides by N in the buffer's dtype
(float32 under bf16-mixed: 1/N is never rounded to bf16). Without `grads`, micro-batches
run with grad_scale = 1 / N into the parameters' `.grad` and one SUM all-reduce
(parallelism.all_reduce_gradients) finishes. Either way every rank gets the full-batch
gradient however many micro-batches it ran, zero included (ByteScale, arXiv 2502.21231,
Eq. 1 = Eq. 2), and no collective runs inside a micro-batch.

Per micro-batch a rank is in exactly one group (the plan guarantees disjoint ranks):
  - a group of one rank packs its sequences whole (varlen, cu_seqlens);
  - a group of d ranks splits every sequence zigzag over its ring (ring position j holds
    chunks j and 2d-1-j, parallelism.zigzag_shard); targets (masked), position ids and
    stored log-probs are sharded the same way, so each rank predicts exactly the tokens
    it holds and ring attention supplies the keys/values of the other ranks.
Memory (`memory_scheme`): each group runs exactly the memory scheme its plan names
(scheduler/plan.py `GroupMemory`: plain autograd, layer-wise StreamBP with its chunk, or
MEMO token-wise offload at its alpha; a version-1 plan's rule is spelled out by
`scheduler.plan.group_memory`); the step holds no memory constants of its own. Before any
micro-batch, every rank checks the whole plan against the device budget the plan was made
for (scheduler.rank_memory, with this model's real dtype), so an over-budget plan is
refused on every rank alike, before any ring starts. The LM head is always streamed.

Progress: the step marks where the rank is (micro-batch and its group, then the step's
collectives) in parallelism.progress, which the layers and ring attention refine (layer,
forward/backward, ring hop); the heartbeat sends it for hang localisation.

Legend: T tokens this rank holds in the micro-batch.
"""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Mapping
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from parallelism import CommStats, GradBuffer, all_reduce_gradients
from parallelism.progress import PROGRESS
from scheduler.plan import RingGroup, StepPlan, group_memory
from scheduler.rank_memory import check_plan_fits
from workers.arena import ArenaCache
from workers.loss import BatchMeta, ObjectiveConfig, global_normalizer, group_inputs
from workers.model import DEFAULT_HEAD_CHUNK
from workers.sample import SampleData

__all__ = ["StepStats", "global_num_predictions", "memory_scheme", "run_step"]

_DTYPE_NAMES = {torch.float64: "float64", torch.float32: "float32", torch.float16: "float16",
                torch.bfloat16: "bfloat16"}


@dataclass(frozen=True, kw_only=True)
class StepStats:
    """What one rank reports of a step (global figures are the same on every rank)."""

    loss: float  # global loss: the objective's sum over the batch / normalizer
    objective: str = "pretrain"  # workers.loss.ObjectiveConfig.type
    normalizer: int = 0  # N: predictions, loss targets, sequences or pairs (workers.loss)
    num_predictions: int  # global predictions, sum over sequences of (length - 1)
    num_tokens: int  # global tokens of the batch
    local_num_tokens: int  # tokens this rank held over its micro-batches (its shards)
    local_loss_sum: float  # this rank's part of the summed loss
    micro_batch_times_s: tuple[float, ...]  # wall time of each micro-batch this rank ran
    step_time_s: float  # the whole step on this rank, gradient reduction included
    peak_memory_bytes: int  # CUDA: peak allocated in the step; CPU: process peak RSS
    arena_bytes: int = 0  # MEMO activation arenas in use (workers.arena.ArenaCache)
    ring_bytes_sent: int = 0  # bytes this rank sent along its rings: attention's channels
    # and dpo's log-prob exchange (8 (d - 1) per sequence), as scheduler.work.ring_bytes counts
    # the device's busy time in each micro-batch (`device_clock`): what the rank's speed
    # is estimated from (scheduler/speeds.py)
    micro_batch_busy_s: tuple[float, ...] = ()


def global_num_predictions(plan: StepPlan) -> int:
    """N = sum(L - 1) over every sequence of the plan (what the loss is divided by)."""
    return sum(s.length - 1 for _, g in plan.groups() for s in g.sequences)


def _check_inputs(plan: StepPlan, samples: Mapping[int, torch.Tensor | SampleData],
                  rank: int, group, model, batch: BatchMeta | None) -> None:
    # A broken plan (a rank in two groups at once, a DPO pair split over two groups, ...)
    # would deadlock a ring or lose a pair's loss: every rank refuses it alike.
    plan.check(pairs=batch.pairs if batch is not None else None)
    dtype = _DTYPE_NAMES[next(model.parameters()).dtype]
    check_plan_fits(plan, model.spec.model_copy(update={"dtype": dtype}))
    if not 0 <= rank < plan.world_size:
        raise ValueError(f"rank={rank} is outside the plan (valid 0..{plan.world_size - 1})")
    initialized = dist.is_available() and dist.is_initialized()
    world = dist.get_world_size(group) if initialized else 1
    if world != plan.world_size:
        raise ValueError(f"plan.world_size={plan.world_size} but the process group has {world} "
                         f"rank(s){'' if initialized else ' (none is initialized)'}")
    for _, g in plan.micro_batches_of(rank):
        for s in g.sequences:
            if s.id not in samples:
                raise ValueError(f"samples: sequence id {s.id} (in a group of ranks {g.ranks}) "
                                 f"is missing; rank {rank} needs it")
            x = samples[s.id]
            t = x.tokens if isinstance(x, SampleData) else x
            if t.dim() != 1 or t.numel() != s.length or t.dtype.is_floating_point:
                raise ValueError(f"samples[{s.id}]: expected 1-D integer tokens of length "
                                 f"{s.length} (the plan's), got {t.dtype} of shape "
                                 f"{tuple(t.shape)}")


def _check_window(model, plan: StepPlan) -> None:
    """A model with a sliding window refuses a plan with a sequence longer than it (every
    rank checks the whole plan, so all raise before any collective)."""
    spec = getattr(model, "spec", None)
    if spec is not None and spec.sliding_window is not None:
        longest = max(s.length for _, g in plan.groups() for s in g.sequences)
        spec.check_sequence_length(longest, where="plan: a sequence")


def memory_scheme(g: RingGroup, num_tokens: int, spec) -> dict:
    """forward_backward's memory arguments for a rank holding `num_tokens` of group `g`:
    exactly the scheme the plan names for `g` (scheduler.plan.group_memory)."""
    mem = group_memory(g, spec)
    return {"scheme": mem.scheme, "offload_ratio": mem.offload_ratio,
            "stream_chunk_size": mem.chunk_tokens}


def _arena_key(g: RingGroup, num_tokens: int, scheme: dict) -> tuple | None:
    """The arena kind of a micro-batch, or None where the arena does not apply.

    Packed micro-batches without offload or StreamBP save the same tensors for the same
    number of streamed-head chunks; rings and offload/StreamBP manage their activations
    themselves (host copies, recompute), so they run without an arena.
    """
    if g.ring_size > 1 or scheme["scheme"] != "plain":
        return None
    return ("pack", -(-num_tokens // DEFAULT_HEAD_CHUNK))


def _run_group(model, g: RingGroup, samples, rank: int, grad_scale: float,
               objective: ObjectiveConfig, arenas: ArenaCache | None = None,
               comm_stats: CommStats | None = None) -> tuple:
    """forward_backward of this rank's part of one group: (loss_sum, count, tokens), where
    count is this rank's share of the global normaliser (workers.loss)."""
    device = next(model.parameters()).device
    inp = group_inputs(g, samples, rank, objective, device=device, comm_stats=comm_stats)
    kwargs: dict[str, Any] = {"targets": inp.targets_T, "objective": inp.objective}
    if g.ring_size > 1:
        kwargs.update(position_ids=inp.position_ids, ring=list(g.ranks), comm_stats=comm_stats)
    num_tokens = inp.ids_T.numel()
    kwargs.update(memory_scheme(g, num_tokens, model.spec))

    def step():
        return model.forward_backward(inp.ids_T, cu_seqlens=inp.cu_seqlens,
                                      grad_scale=grad_scale, **kwargs)

    key = _arena_key(g, num_tokens, kwargs) if arenas is not None else None
    if arenas is None or key is None:
        loss_sum, _ = step()
    else:
        loss_sum, _ = arenas.run(key, (num_tokens, len(inp.cu_seqlens) - 1), step)
    return float(loss_sum) if inp.reports_loss else 0.0, inp.count, num_tokens


def _peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return int(rss if sys.platform == "darwin" else rss * 1024)


def device_clock(device: torch.device):
    """The clock of the device's busy time: wall time on CUDA (each micro-batch ends with
    a synchronize); on CPU the process's CPU time, since a shared CPU box also gives this
    rank's core to other processes, which is not this rank being slow."""
    return time.perf_counter if device.type == "cuda" else time.process_time


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_step(model, plan: StepPlan, samples: Mapping[int, torch.Tensor | SampleData], *,
             rank: int, group=None, arenas: ArenaCache | None = None,
             grads: GradBuffer | None = None, objective: ObjectiveConfig | None = None,
             batch: BatchMeta | None = None) -> StepStats:
    """Run `rank`'s share of `plan`; on return the global gradient is synchronised.

    With `grads` (the optimizer's GradBuffer) the gradient lands in its flat buffer (whole
    on every rank after an all-reduce, or this rank's shard after a reduce-scatter) and
    the parameters' `.grad` stay None; without, every rank's `.grad` is the global
    gradient. Either way gradients are overwritten (zeroed first), not accumulated into;
    the optimizer is not stepped. `samples` maps plan sequence id -> its 1-D integer
    tokens, or its workers.sample.SampleData (tokens, loss mask, metadata, stored
    log-probs), which every objective but pretrain needs; a rank needs only the ids of the
    groups it is in. `objective` (default pretrain) decides the targets and the loss;
    `batch` gives the whole batch's records (workers.loss.BatchMeta: loss-target counts
    and DPO pairs), from which every rank computes the global normaliser before its first
    micro-batch; without it, `samples` must hold every plan id. `group` is the world
    process group of the gradient reduction (default: the default group); ring attention
    addresses ring members by global rank with point-to-point ops on the default group
    (one global group, never a group per batch). With `arenas`
    (workers.arena.ArenaCache), packed micro-batches keep their saved activations at
    MEMO-planned offsets of one arena per micro-batch kind (exact: the same loss and
    gradients as without).
    """
    objective = objective or ObjectiveConfig()
    if batch is None and objective.masked and len(samples) == len(plan.sequence_ids()):
        batch = BatchMeta.from_samples(samples)
    _check_inputs(plan, samples, rank, group, model, batch)
    _check_window(model, plan)
    normalizer = global_normalizer(plan, objective, batch)
    if normalizer < 1:
        raise ValueError(f"plan: the batch has nothing to normalise by for objective "
                         f"{objective.type!r} (no predictions, loss targets or pairs)")
    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model.zero_grad(set_to_none=True)
    if grads is not None:
        grads.zero_()
    scale = 1.0 / normalizer if grads is None else 1.0  # grads divides after the sum
    start = time.perf_counter()
    clock = PROGRESS.clock = device_clock(device)  # the slow drill measures on it too
    times, busy, loss_sum, local_count, local_tokens = [], [], 0.0, 0, 0
    comm = CommStats()
    with grads.accumulating() if grads is not None else nullcontext():
        for m, g in plan.micro_batches_of(rank):
            PROGRESS.micro_batch(m, tuple(g.ranks))
            t0, b0 = time.perf_counter(), clock()
            ls, n, tok = _run_group(model, g, samples, rank, scale, objective, arenas, comm)
            _sync(device)
            PROGRESS.phase("after")  # inside the timing: the slow drill's last stretch
            times.append(time.perf_counter() - t0)
            busy.append(clock() - b0)
            loss_sum, local_count = loss_sum + ls, local_count + n
            local_tokens += tok
    PROGRESS.phase("reduce")  # the step's collectives: every rank must get here
    if grads is None:
        all_reduce_gradients(model.parameters(), group=group)
    else:
        grads.sync(normalizer)
    totals = _global_totals(loss_sum, local_count, device, group)
    if int(totals[1]) != normalizer:
        raise RuntimeError(f"the ranks counted {int(totals[1])} for objective "
                           f"{objective.type!r}, the batch's records say {normalizer}: did "
                           "every rank get the same plan and batch?")
    return StepStats(
        loss=float(totals[0]) / normalizer, objective=objective.type, normalizer=normalizer,
        num_predictions=global_num_predictions(plan),
        num_tokens=sum(g.num_tokens for _, g in plan.groups()), local_num_tokens=local_tokens,
        local_loss_sum=loss_sum, micro_batch_times_s=tuple(times),
        micro_batch_busy_s=tuple(busy),
        step_time_s=time.perf_counter() - start, peak_memory_bytes=_peak_memory(device),
        arena_bytes=arenas.nbytes if arenas is not None else 0,
        ring_bytes_sent=comm.total_sent())


def _global_totals(loss_sum: float, count: int, device, group) -> torch.Tensor:
    """(summed loss, normaliser count) over the world: one float64 all-reduce (none on one
    rank). float64 keeps the summed loss exact enough to report; NCCL needs it on the
    device."""
    totals = torch.tensor([loss_sum, float(count)], dtype=torch.float64,
                          device=device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(totals, group=group)
    _sync(device)
    return totals
