"""HDP gradient synchronization: one all-reduce (sum) of every gradient over the world.

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
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist

__all__ = ["all_reduce_gradients"]

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
