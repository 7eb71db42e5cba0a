"""AdamW on flat buffers, unsharded, ZeRO-1 or distributed, with fp32 masters under bf16.

Why it exists: the training step (workers.step.run_step) leaves one gradient per step in a
flat buffer (parallelism.GradBuffer, Megatron-Core's `main_grad`), and the model-state
table of scheduler/model_states.py promises exactly which tensors a rank holds for each
precision and optimizer sharding. `ShardedAdamW` holds those tensors and nothing else:

    param buffer   the compute-dtype parameters: the model's Parameters are views into it
    grad buffer    master dtype, full size (GradBuffer)
    masters        bf16-mixed only: float32 copy of the elements this rank updates
                   (fp32/fp64: the owned part of the param buffer itself)
    exp_avg(_sq)   AdamW moments of the elements this rank updates, master dtype

What a rank updates (its "owned" range of the param buffer), and how the updated
parameters reach the others:

    none         the whole buffer on every rank; the gradient is all-reduced, no exchange
    zero1        whole tensors (largest first onto the least-loaded rank, ZeRO stage 1,
                 Rajbhandari et al. 2020); the param buffer is laid out owner by owner so a
                 rank's tensors are contiguous; gradient all-reduce, one broadcast per owner
    distributed  one contiguous shard of ceil(P / N) elements of the buffers, padded to
                 N * ceil(P / N) (Megatron-Core's distributed optimizer, ZeRO stage 2
                 communication): gradient reduce-scatter, AdamW on the shard, one in-place
                 all-gather of the compute parameters

The gradient buffer keeps the model's parameter order in every scheme (zero1's all-reduce
then sums exactly what the unsharded one does, bit for bit). Every collective runs after
the rank's last micro-batch (run_step's `GradBuffer.sync`, then `step`), so ranks that
ran no micro-batch take part like the others and nothing interleaves with ring p2p.

The update is AdamW (Loshchilov & Hutter 2019, Alg. 2) as torch.optim.AdamW computes it:
decoupled weight decay w *= 1 - lr * wd on the elements of matrices only (embeddings,
projections; never norms), moments m = b1 m + (1 - b1) g, v = b2 v + (1 - b2) g^2, and
w -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps). It runs one parameter
segment (a parameter's part of the owned range) at a time with one temporary the size of
that segment, using only correctly rounded elementwise operations, so an element's result
does not depend on how the range is cut: zero1 and none agree bit for bit. Gradient
clipping uses the global L2 norm (Pascanu et al. 2013): under `distributed` the squared
norms of the shards are summed over the ranks (one float64 all-reduce).

Shard mirror (`shard_mirror`, distributed on N > 1): rank r also keeps masters and
moments of shard (r - 1) mod N, the previous owner's (scheduler.model_states'
`mirror_holder`). Each step the owners shift their reduced gradient shards one rank along
the ring of owners into the holder's gradient buffer (the holder's own partial sums there
are not needed), and the holder runs the same AdamW update on the copy: bit-identical to
the owner's, every operation being elementwise. A lost rank's shard thus survives on the
next rank (workers/elastic.py, docs/elastic.md).

The step in three parts, so that a rank lost in the middle cannot leave the others
disagreeing (workers/elastic.py resolves an interrupted step): `prepare` runs every
collective that comes before a state change (the mirror shift, then the grad-norm
all-reduce under `distributed`; under none/zero1 the step's last collective before this is
run_step's loss totals); `commit` changes masters and moments only, locally; `publish`
sends the updated parameters. A rank that has completed the last collective before
`commit` knows that every rank contributed to it, so every rank holds what it needs to
commit the step too.

Memory: the Parameters become views of the param buffer when the optimizer is built, so
the model must already be on its device and must not be moved or re-created afterwards
(except by building another optimizer for another world: `rebind` and `release` hand the
parameters back and forth).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist

from parallelism import GradBuffer
from scheduler.model_states import (
    buffer_numel,
    check_precision,
    check_sharding,
    compute_dtype,
    has_masters,
    has_mirror,
    master_dtype,
    shard_numel,
)

__all__ = ["STATE_KINDS", "ShardedAdamW", "StateInterval", "partition_parameters",
           "state_intervals", "torch_dtype"]

# The per-element optimizer state a rank holds for the elements it updates.
STATE_KINDS = ("master", "exp_avg", "exp_avg_sq")

_TORCH_DTYPES = {"float64": torch.float64, "float32": torch.float32,
                 "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    return _TORCH_DTYPES[name]


def partition_parameters(params: Sequence[torch.nn.Parameter], num_ranks: int) -> list[int]:
    """Owner rank of each parameter: largest first onto the least-loaded rank (ZeRO-1)."""
    if len(params) < num_ranks:
        raise ValueError(f"optimizer_sharding='zero1': {len(params)} parameter tensors "
                         f"cannot be sharded over {num_ranks} ranks (each rank must own one); "
                         "use optimizer_sharding='distributed' or 'none'")
    load = [0] * num_ranks
    owners = [0] * len(params)
    for i in sorted(range(len(params)), key=lambda i: (-params[i].numel(), i)):
        r = min(range(num_ranks), key=lambda r: (load[r], r))
        owners[i] = r
        load[r] += params[i].numel()
    return owners


@dataclass(frozen=True)
class _Segment:
    """One parameter's part of the owned range."""

    param: int  # index in the model's parameter order
    start: int  # in the owned range (masters and moments)
    stop: int
    grad_start: int  # in the gradient buffer
    param_start: int  # in the param buffer
    decay: bool  # weight decay applies (a matrix)


@dataclass(frozen=True)
class _Layout:
    param_offsets: tuple[int, ...]  # start of each parameter in the param buffer
    grad_offsets: tuple[int, ...]  # start of each parameter in the gradient buffer
    numel: int  # elements of both buffers (padding included)
    ranges: tuple[tuple[int, int], ...]  # [lo, hi) of the param buffer each rank updates


def _layout(numels: Sequence[int], owners: list[int] | None, sharding: str,
            world: int) -> _Layout:
    grad_offsets = tuple(sum(numels[:i]) for i in range(len(numels)))
    p = sum(numels)
    numel = buffer_numel(p, sharding=sharding, world_size=world)
    if owners is not None:  # zero1: owner by owner, model order within an owner
        order = sorted(range(len(numels)), key=lambda i: (owners[i], i))
        offsets, at = [0] * len(numels), 0
        for i in order:
            offsets[i], at = at, at + numels[i]
        loads = [sum(n for n, o in zip(numels, owners, strict=True) if o == r)
                 for r in range(world)]
        starts = [sum(loads[:r]) for r in range(world)]
        ranges = tuple((s, s + n) for s, n in zip(starts, loads, strict=True))
        return _Layout(tuple(offsets), grad_offsets, numel, ranges)
    if sharding == "distributed" and world > 1:
        s = shard_numel(p, world)
        ranges = tuple((r * s, (r + 1) * s) for r in range(world))
    else:
        ranges = ((0, numel),) * world
    return _Layout(grad_offsets, grad_offsets, numel, ranges)


def _segments(layout: _Layout, numels: Sequence[int], decays: Sequence[bool],
              lo: int, hi: int) -> list[_Segment]:
    """The parameters' parts of the param-buffer range [lo, hi), in model order."""
    out = []
    for i in range(len(numels)):
        start = layout.param_offsets[i]
        a, b = max(lo, start), min(hi, start + numels[i])
        if a < b:
            out.append(_Segment(param=i, start=a - lo, stop=b - lo,
                                grad_start=layout.grad_offsets[i] + a - start,
                                param_start=a, decay=decays[i]))
    return out


@dataclass(frozen=True)
class StateInterval:
    """Elements [lo, hi) of the model-order flat parameter vector whose optimizer state a
    rank holds, at `offset` of its `part` ("own" range or "mirror")."""

    lo: int
    hi: int
    part: str
    offset: int


def _owners(numels: Sequence[int], sharding: str, world: int) -> list[int] | None:
    if sharding != "zero1" or world == 1:
        return None
    load, owners = [0] * world, [0] * len(numels)
    for i in sorted(range(len(numels)), key=lambda i: (-numels[i], i)):
        r = min(range(world), key=lambda r: (load[r], r))
        owners[i], load[r] = r, load[r] + numels[i]
    return owners


def state_intervals(numels: Sequence[int], *, sharding: str, world_size: int, rank: int,
                    shard_mirror: bool = False) -> list[StateInterval]:
    """Where rank `rank`'s optimizer state lives, in model-order element coordinates.

    A pure function of the parameter sizes and the world (what `ShardedAdamW` builds), so
    any rank can work out what every other rank holds and needs (workers.elastic).
    """
    layout = _layout(numels, _owners(numels, sharding, world_size), sharding, world_size)
    decays = [True] * len(numels)
    parts = [("own", layout.ranges[rank])]
    if has_mirror(sharding=sharding, world_size=world_size, shard_mirror=shard_mirror):
        parts.append(("mirror", layout.ranges[(rank - 1) % world_size]))
    out: list[StateInterval] = []
    for part, (lo, hi) in parts:
        for s in _segments(layout, numels, decays, lo, hi):
            last = out[-1] if out else None
            if last and last.part == part and last.hi == s.grad_start \
                    and last.offset + last.hi - last.lo == s.start:
                out[-1] = StateInterval(lo=last.lo, hi=s.grad_start + s.stop - s.start,
                                        part=part, offset=last.offset)
            else:
                out.append(StateInterval(lo=s.grad_start, hi=s.grad_start + s.stop - s.start,
                                         part=part, offset=s.start))
    return out


class ShardedAdamW:
    """AdamW over flat buffers for one rank (see the module docstring).

    `precision` and `sharding` are scheduler.model_states' names; the model's parameters
    must already be in the compute dtype of `precision`. `group` is the world process
    group (default: the default group, or a single process without one).
    """

    def __init__(self, model: torch.nn.Module, *, precision: str, sharding: str,
                 betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8,
                 weight_decay: float = 0.0, group=None, shard_mirror: bool = False):
        self.precision, self.sharding = check_precision(precision), check_sharding(sharding)
        self.betas, self.eps, self.weight_decay, self.group = betas, eps, weight_decay, group
        initialized = dist.is_available() and dist.is_initialized()
        self.world_size = dist.get_world_size(group) if initialized else 1
        self.rank = dist.get_rank(group) if initialized else 0
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self._check_dtypes()
        self.owners = (partition_parameters(self.params, self.world_size)
                       if sharding == "zero1" and self.world_size > 1 else None)
        self.layout = _layout([p.numel() for p in self.params], self.owners, sharding,
                              self.world_size)
        self.param_buffer = self._bind_parameters()
        mode: Literal["all_reduce", "reduce_scatter"] = "reduce_scatter" \
            if sharding == "distributed" and self.world_size > 1 else "all_reduce"
        self.grads = GradBuffer(self.params, self.layout.grad_offsets, self.layout.numel,
                                dtype=torch_dtype(master_dtype(precision)), mode=mode,
                                group=group)
        self.master, self.exp_avg, self.exp_avg_sq = self._state_of(self.owned_range)
        self.segments = self._segments(*self.owned_range)
        self.shard_mirror = has_mirror(sharding=sharding, world_size=self.world_size,
                                       shard_mirror=shard_mirror)
        self.mirror_range: tuple[int, int] | None = None
        if self.shard_mirror:
            self.mirror_range = self.layout.ranges[(self.rank - 1) % self.world_size]
            self.mirror_master, self.mirror_exp_avg, self.mirror_exp_avg_sq = \
                self._state_of(self.mirror_range)
            self.mirror_segments = self._segments(*self.mirror_range)

    # ----------------------------------------------------------------- construction
    def _check_dtypes(self) -> None:
        want = torch_dtype(compute_dtype(self.precision))
        wrong = sorted({str(p.dtype) for p in self.params if p.dtype != want})
        if wrong:
            raise ValueError(f"precision={self.precision!r} computes in {want}, but the "
                             f"model's parameters are {', '.join(wrong)}: build the model in "
                             f"the precision's compute dtype (workers.train.build_model)")

    def _bind_parameters(self) -> torch.Tensor:
        """The param buffer; every Parameter becomes a view of it (values kept)."""
        ref = self.params[0]
        buffer = torch.zeros(self.layout.numel, dtype=ref.dtype, device=ref.device)
        with torch.no_grad():
            for p, o in zip(self.params, self.layout.param_offsets, strict=True):
                view = buffer[o:o + p.numel()].view_as(p)
                view.copy_(p)
                p.data = view
        return buffer

    def _state_of(self, rng: tuple[int, int]) -> tuple[torch.Tensor, ...]:
        """(master, exp_avg, exp_avg_sq) of a param-buffer range, moments zero."""
        lo, hi = rng
        part = self.param_buffer[lo:hi]
        master = part.to(self.grads.buffer.dtype, copy=True) if has_masters(self.precision) \
            else part
        return master, torch.zeros_like(master), torch.zeros_like(master)

    def _segments(self, lo: int, hi: int) -> list[_Segment]:
        return _segments(self.layout, [p.numel() for p in self.params],
                         [p.dim() >= 2 for p in self.params], lo, hi)

    def rebind(self) -> None:
        """Make the model's Parameters views of this optimizer's param buffer again."""
        with torch.no_grad():
            for p, o in zip(self.params, self.layout.param_offsets, strict=True):
                p.data = self.param_buffer[o:o + p.numel()].view_as(p)

    def release(self) -> None:
        """Stop accumulating gradients into this optimizer (another one takes over)."""
        self.grads.remove_hooks()

    def part(self, name: str) -> dict[str, torch.Tensor]:
        """The state tensors of the "own" range or the "mirror", by STATE_KINDS name."""
        if name == "own":
            return {"master": self.master, "exp_avg": self.exp_avg,
                    "exp_avg_sq": self.exp_avg_sq}
        if name == "mirror" and self.shard_mirror:
            return {"master": self.mirror_master, "exp_avg": self.mirror_exp_avg,
                    "exp_avg_sq": self.mirror_exp_avg_sq}
        raise ValueError(f"part={name!r} is not held here (valid: own"
                         f"{', mirror' if self.shard_mirror else ''})")

    def intervals(self) -> list[StateInterval]:
        """This rank's StateIntervals (what `state_intervals` says for it)."""
        return state_intervals([p.numel() for p in self.params], sharding=self.sharding,
                               world_size=self.world_size, rank=self.rank,
                               shard_mirror=self.shard_mirror)

    @property
    def owned_range(self) -> tuple[int, int]:
        """[lo, hi) of the param buffer whose masters and moments this rank holds."""
        return self.layout.ranges[self.rank]

    def owned_parameters(self) -> list[str]:
        """Names of the parameters with at least one element in this rank's range."""
        return [self.names[s.param] for s in self.segments]

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor of model state this rank holds (for the byte accounting)."""
        out = {"params": self.param_buffer, "grads": self.grads.buffer,
               "exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq}
        if has_masters(self.precision):
            out["masters"] = self.master
        if self.shard_mirror:
            out.update(mirror_exp_avg=self.mirror_exp_avg,
                       mirror_exp_avg_sq=self.mirror_exp_avg_sq)
            if has_masters(self.precision):
                out["mirror_masters"] = self.mirror_master
        return out

    # ----------------------------------------------------------------- the step
    def grad_norm(self) -> float:
        """Global L2 norm of the synchronised gradient (the same on every rank)."""
        if self.grads.mode == "all_reduce":
            # The whole gradient is here: per-parameter norms in model order, no traffic.
            norms = torch.stack([torch.linalg.vector_norm(v) for v in self.grads.views])
            return float(torch.linalg.vector_norm(norms))
        buf = self.grads.buffer
        local = sum(float(torch.linalg.vector_norm(buf[s.grad_start:s.grad_start + s.stop
                                                       - s.start])) ** 2
                    for s in self.segments)
        total = torch.tensor([local], dtype=torch.float64, device=buf.device)
        dist.all_reduce(total, group=self.group)
        return math.sqrt(float(total[0]))

    def step(self, *, lr: float, step: int, max_grad_norm: float | None) -> float:
        """Clip, update the owned range, publish the parameters; returns the grad norm.

        `step` is the 1-based AdamW step (bias correction). Collective: every rank calls it
        after run_step(..., grads=self.grads). The same as prepare, commit, publish.
        """
        norm = self.prepare()
        self.commit(lr=lr, step=step, norm=norm, max_grad_norm=max_grad_norm)
        self.publish()
        return norm

    def prepare(self) -> float:
        """The collectives before any state changes (mirror shift, grad norm); the norm."""
        self._shift_mirror_gradients()
        return self.grad_norm()

    def commit(self, *, lr: float, step: int, norm: float, max_grad_norm: float | None) -> None:
        """Clip by `norm` and update the owned range (and the mirror): local, no traffic."""
        clip = 1.0
        if max_grad_norm is not None and norm > 0:
            clip = min(1.0, max_grad_norm / (norm + 1e-6))  # torch.nn.utils.clip_grad_norm_
        self._update(self.segments, self.part("own"), lr=lr, step=step, clip=clip)
        if self.shard_mirror:
            self._update(self.mirror_segments, self.part("mirror"), lr=lr, step=step,
                         clip=clip)

    def publish(self) -> None:
        """Every rank receives the parameters the others updated (collective)."""
        self._publish()

    @torch.no_grad()
    def params_from_masters(self) -> None:
        """Cast the owned masters into the compute parameters (after the state was loaded
        from elsewhere; fp32/fp64 masters are the parameters themselves)."""
        if not has_masters(self.precision):
            return
        for s in self.segments:
            self.param_buffer[s.param_start:s.param_start + s.stop - s.start].copy_(
                self.master[s.start:s.stop])

    def _shift_mirror_gradients(self) -> None:
        """Own reduced gradient shard to the next rank; the previous one's into its slot."""
        if not self.shard_mirror:
            return
        buf, n = self.grads.buffer, self.world_size
        assert self.mirror_range is not None, "set with shard_mirror"
        lo, hi = self.mirror_range
        ops = [dist.P2POp(dist.isend, buf[self.grads.shard], (self.rank + 1) % n, self.group),
               dist.P2POp(dist.irecv, buf[lo:hi], (self.rank - 1) % n, self.group)]
        for work in dist.batch_isend_irecv(ops):
            work.wait()

    @torch.no_grad()
    def _update(self, segments: list[_Segment], state: dict[str, torch.Tensor], *, lr: float,
                step: int, clip: float) -> None:
        b1, b2 = self.betas
        step_size = lr / (1 - b1 ** step)
        bc2_sqrt = math.sqrt(1 - b2 ** step)
        decay = 1 - lr * self.weight_decay
        buf = self.grads.buffer
        for s in segments:
            g = buf[s.grad_start:s.grad_start + s.stop - s.start]
            w, m, v = (state[k][s.start:s.stop] for k in STATE_KINDS)
            if clip < 1.0:
                g.mul_(clip)
            if s.decay and self.weight_decay:
                w.mul_(decay)
            tmp = torch.mul(g, 1 - b1)
            m.mul_(b1).add_(tmp)
            torch.mul(g, g, out=tmp)
            v.mul_(b2).add_(tmp.mul_(1 - b2))
            torch.sqrt(v, out=tmp)
            tmp.div_(bc2_sqrt).add_(self.eps)
            torch.div(m, tmp, out=tmp)
            w.sub_(tmp.mul_(step_size))
            if has_masters(self.precision):
                self.param_buffer[s.param_start:s.param_start + s.stop - s.start].copy_(w)

    def _publish(self) -> None:
        """Every rank receives the parameters the others updated."""
        if self.world_size == 1 or self.sharding == "none":
            return
        if self.owners is not None:
            for r, (lo, hi) in enumerate(self.layout.ranges):
                dist.broadcast(self.param_buffer[lo:hi], group=self.group, group_src=r)
            return
        lo, hi = self.owned_range
        dist.all_gather_single(self.param_buffer, self.param_buffer[lo:hi], group=self.group)
