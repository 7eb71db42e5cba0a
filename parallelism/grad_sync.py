"""HDP gradient synchronization: one reduction of every gradient over the world per step.

ByteScale (arXiv 2502.21231) Eq. 1 = Eq. 2: the gradient of the global-batch loss
sum_i CE_i / N_global is the sum over ranks of each rank's partial gradient
(sum over the predictions it computed) / N_global, whatever mix of data- and
context-parallel work each rank did. So after every rank has accumulated its micro-batches
with grad_scale = 1 / N_global, a single SUM all-reduce over one global process group
finishes the step; no per-ring reduction and no rescaling afterwards.

Gradients are flattened into buckets (one dtype and device each, at most `bucket_bytes`)
so the number of collectives does not grow with the number of parameters. A parameter
whose gradient is None (a rank that ran no micro-batch, or a layer it did not touch)
contributes zeros: every rank must post the same buckets in the same order. The
single-process reference is plain autograd over the whole batch; tests compare the two.

`GradBuffer` is the training path (Megatron-Core's `main_grad`, its distributed
optimizer's grad buffer): one flat buffer in the optimizer's dtype (float32 under
bf16-mixed) that every parameter's gradient is added into by a post-accumulate-grad hook,
which then frees the parameter's own `.grad`. Gradients of every micro-batch (and of every
chunk StreamBP or offload backpropagates separately) are thus summed in the buffer's
dtype, at most one parameter's compute-dtype gradient is alive at a time, and the
hooks never communicate: `sync` runs once, after the rank's last micro-batch, so ranks
with different numbers of micro-batches and rings' point-to-point traffic cannot
interleave with a collective. `sync` reduces (all-reduce, or reduce-scatter into this
rank's shard for the distributed optimizer, ZeRO stage 2) and then divides by the loss's
normaliser in the buffer's dtype, so the 1/N of the loss is never rounded to bf16.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Literal

import torch
import torch.distributed as dist

__all__ = ["GradBuffer", "all_reduce_gradients"]

DEFAULT_BUCKET_BYTES = 64 * 1024 * 1024


def _buckets(params: list[torch.nn.Parameter], bucket_bytes: int):
    """Consecutive runs of params sharing dtype and device, each under `bucket_bytes`."""
    bucket: list[torch.nn.Parameter] = []
    size = 0
    for p in params:
        nbytes = p.numel() * p.element_size()
        same = not bucket or (p.dtype == bucket[0].dtype and p.device == bucket[0].device)
        if bucket and (not same or size + nbytes > bucket_bytes):
            yield bucket
            bucket, size = [], 0
        bucket.append(p)
        size += nbytes
    if bucket:
        yield bucket


def all_reduce_gradients(params: Iterable[torch.nn.Parameter], *, group=None,
                         bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> None:
    """Replace each `p.grad` by its sum over all ranks of `group` (default: the world).

    Missing gradients are created as zeros first. A no-op without an initialized process
    group or with a world of one rank.
    """
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes={bucket_bytes} must be >= 1")
    params = [p for p in params if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size(group) == 1:
        return
    for bucket in _buckets(params, bucket_bytes):
        flat = torch.cat([p.grad.reshape(-1) for p in bucket])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        offset = 0
        for p in bucket:
            n = p.numel()
            p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
            offset += n


def _world_size(group) -> int:
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


class GradBuffer:
    """A flat gradient buffer that backward accumulates into (see the module docstring).

    `offsets[i]` is where `params[i]` starts in the buffer of `numel` elements (any layout
    the optimizer chooses; elements no parameter covers are padding and stay zero).
    `mode` is the reduction of `sync`: "all_reduce" leaves the summed gradient everywhere;
    "reduce_scatter" leaves it only in this rank's shard of numel / world_size elements
    (`shard`), the rest of the buffer holding this rank's partial sums.
    """

    def __init__(self, params: Sequence[torch.nn.Parameter], offsets: Sequence[int], numel: int,
                 *, dtype: torch.dtype, mode: Literal["all_reduce", "reduce_scatter"],
                 group=None):
        if mode not in ("all_reduce", "reduce_scatter"):
            raise ValueError(f"mode={mode!r} is not valid; valid: all_reduce, reduce_scatter")
        world = _world_size(group)
        if mode == "reduce_scatter" and numel % world:
            raise ValueError(f"numel={numel} must split into {world} equal shards")
        self.mode, self.group, self.world_size = mode, group, world
        rank = dist.get_rank(group) if world > 1 else 0
        self.shard = slice(rank * (numel // world), (rank + 1) * (numel // world)) \
            if mode == "reduce_scatter" else slice(0, numel)
        self.buffer = torch.zeros(numel, dtype=dtype, device=params[0].device)
        self.views = [self.buffer[o:o + p.numel()].view_as(p)
                      for p, o in zip(params, offsets, strict=True)]
        self._active = False
        self._handles = [p.register_post_accumulate_grad_hook(self._hook(v))
                         for p, v in zip(params, self.views, strict=True)]

    def _hook(self, view: torch.Tensor):
        def add_and_free(p: torch.nn.Parameter) -> None:
            if self._active:
                assert p.grad is not None, "a post-accumulate-grad hook runs on a set grad"
                view.add_(p.grad)  # in the buffer's dtype (bf16 grads upcast exactly)
                p.grad = None
        return add_and_free

    @contextmanager
    def accumulating(self) -> Iterator[GradBuffer]:
        """Within: every gradient backward produces is added into the buffer."""
        if self._active:
            raise RuntimeError("GradBuffer.accumulating() is already active")
        self._active = True
        try:
            yield self
        finally:
            self._active = False

    def zero_(self) -> None:
        self.buffer.zero_()

    def sync(self, divisor: int | float) -> torch.Tensor:
        """Sum over the ranks, then divide by `divisor`; returns the reduced part."""
        out = self.buffer[self.shard]
        if self.world_size > 1 and self.mode == "all_reduce":
            dist.all_reduce(self.buffer, op=dist.ReduceOp.SUM, group=self.group)
        elif self.world_size > 1:
            dist.reduce_scatter_single(out, self.buffer, op=dist.ReduceOp.SUM,
                                       group=self.group)
        return out.div_(divisor)

    def remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
