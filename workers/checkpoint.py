"""Checkpoints with torch.distributed.checkpoint (DCP): model, optimizer shards, step, RNG, data.

One directory per checkpoint, written by all ranks together (DCP plans the write so each
replicated tensor is stored once) and read back by all ranks. What it holds:
  model       the module's state dict (compute-dtype parameters, replicated)
  optim       AdamW's moments (`exp_avg`, `exp_avg_sq`) and, under bf16-mixed, the float32
              masters (`master`), each rank writing only the elements it owns:
                none, distributed  one global 1-D tensor per kind, in the model's
                                   parameter order (P elements, no padding); each rank
                                   writes its contiguous shard as a DTensor chunk (Shard(0)
                                   on a 1-D mesh over the world), so DCP stores offsets
                                   and a restore on any number of ranks reads exactly the
                                   chunks that overlap its new shard (resharding);
                                   `none` and `distributed` read each other's checkpoints
                zero1              one tensor per parameter name, written by its owner;
                                   a restore on any number of ranks reads the names each
                                   rank owns under the new partition
  progress    optimizer step, data position (epoch, index), the precision and the layout
              (flat or by name) as int64 tensors
  rng.rank<r> each rank's torch CPU (and CUDA) generator state: ranks may differ; a rank
              the saving world did not have keeps its own (with a warning)
and, beside DCP's files, `ringmaster-model.json`: the ModelSpec trained (RoPE overrides
included) and the Hugging Face directory it came from, which `ringmaster export` reads.
Together with a deterministic step these make resume bit-identical on the same world: k
steps, save, a fresh process, restore, N-k steps gives exactly the N-step losses and
weights. On another world the optimizer state is the same, element for element, and only
the order of the gradient reduction's sums changes (fp64: within 1e-10 of continuing).

The write goes to `<dir>.partial` and is renamed by rank 0 after every rank finished, so
a crash mid-save never leaves a directory that looks complete. Assumes `dir` is on storage
every rank sees (a local path for one machine, a shared filesystem across machines).
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

from scheduler.batching import BatchPosition
from scheduler.model_states import PRECISIONS

if TYPE_CHECKING:
    from workers.optim import ShardedAdamW
    from workers.train import Trainer

__all__ = ["load_checkpoint", "load_optimizer_state", "save_checkpoint"]

_LAYOUTS = ("flat", "by_name")  # progress.layout: what `optim` holds (module docstring)


def _distributed(group) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def _dcp_group(group) -> dict:
    """DCP's group arguments: the job's group, or explicitly one process."""
    return {"process_group": group} if _distributed(group) else {"no_dist": True}


def _dcp(fn, state: dict, path: Path, group) -> None:
    """dcp.save / dcp.load; one process is intended here, so DCP's warning about it is not."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        fn(state, checkpoint_id=path, **_dcp_group(group))


def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _layout(opt: ShardedAdamW) -> str:
    return "by_name" if opt.sharding == "zero1" else "flat"


def _progress(trainer: Trainer) -> dict[str, torch.Tensor]:
    """Replicated progress (the same on every rank: DCP stores it once)."""
    pos, opt = trainer.data_position, trainer.optimizer
    values = [("step", trainer.step), ("epoch", pos.epoch), ("index", pos.index),
              ("precision", PRECISIONS.index(opt.precision)),
              ("layout", _LAYOUTS.index(_layout(opt)))]
    return {name: torch.tensor(v, dtype=torch.int64) for name, v in values}


def _optim_kinds(opt: ShardedAdamW) -> dict[str, torch.Tensor]:
    """The owned-range tensors a checkpoint stores: moments, and masters if separate."""
    kinds = {"exp_avg": opt.exp_avg, "exp_avg_sq": opt.exp_avg_sq}
    if "masters" in opt.state_tensors():
        kinds["master"] = opt.master
    return kinds


def _flat_chunk(t: torch.Tensor, opt: ShardedAdamW, group):
    """This rank's real (unpadded) part of an owned-range tensor, addressed globally."""
    num_params = sum(p.numel() for p in opt.params)
    lo, hi = opt.owned_range
    local = t[:max(0, min(hi, num_params) - lo)]
    if not _distributed(group) or opt.sharding == "none":
        return local  # the whole tensor (replicated across ranks under "none")
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import DTensor, Shard

    world = group or dist.group.WORLD
    assert world is not None, "_distributed(group): the default group exists"
    mesh = DeviceMesh.from_group(world, t.device.type)
    chunk = DTensor.from_local(local, mesh, [Shard(0)], run_check=False,
                               shape=torch.Size([num_params]), stride=(1,))
    _check_chunk(chunk, lo, local.numel())
    return chunk


def _check_chunk(chunk, lo: int, numel: int) -> None:
    """DTensor's Shard(0) chunking is ceil(P / N) per rank: the optimizer's shards."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(chunk.shape, chunk.device_mesh,
                                                          chunk.placements)
    assert shape[0] == numel and (numel == 0 or offset[0] == lo), (shape, offset, lo, numel)


def _optim_state(opt: ShardedAdamW, group) -> dict:
    kinds = _optim_kinds(opt)
    if _layout(opt) == "flat":
        return {k: _flat_chunk(t, opt, group) for k, t in kinds.items()}
    return {k: {opt.names[s.param]: t[s.start:s.stop].view_as(opt.params[s.param])
                for s in opt.segments} for k, t in kinds.items()}


def _state(trainer: Trainer) -> dict:
    """The DCP state dict of a trainer; its tensors are views that loading fills in place.

    Only the optimizer's per-element *state* is checkpointed: its hyperparameters are the
    config's, and the LR a function of the step.
    """
    device = next(trainer.model.parameters()).device
    return {"progress": _progress(trainer), f"rng.rank{trainer.rank}": _rng_state(device),
            "model": get_model_state_dict(trainer.model),
            "optim": _optim_state(trainer.optimizer, trainer.group)}


def save_checkpoint(directory: str | Path, trainer: Trainer) -> Path:
    """Write `trainer`'s state to `directory` (collective over trainer.group); returns it."""
    final = Path(directory)
    partial = final.with_name(final.name + ".partial")
    lead = not _distributed(trainer.group) or dist.get_rank(trainer.group) == 0
    if lead:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    _barrier(trainer.group)
    _dcp(dcp.save, _state(trainer), partial, trainer.group)
    _barrier(trainer.group)
    if lead:
        _write_model_card(partial, trainer.model)
        shutil.rmtree(final, ignore_errors=True)
        partial.rename(final)
    _barrier(trainer.group)
    return final


def _saved_keys(path: Path) -> set[str]:
    return set(dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata)


def _check_compatible(path: Path, keys: set[str], saved: dict, trainer: Trainer) -> None:
    """The checkpoint's precision and optimizer layout are the trainer's (clear errors)."""
    if "progress.precision" not in keys or "progress.layout" not in keys:
        raise ValueError(f"checkpoint directory={str(path)!r} records no precision or "
                         "optimizer layout: it was written by an older version of the "
                         "workers and cannot be restored by this one")
    opt = trainer.optimizer
    precision = PRECISIONS[int(saved["precision"])]
    if precision != opt.precision:
        raise ValueError(f"checkpoint {str(path)!r} was written with precision="
                         f"{precision!r}; this trainer runs precision={opt.precision!r} "
                         "(restore with the precision it was saved with)")
    layout = _LAYOUTS[int(saved["layout"])]
    if layout != _layout(opt):
        raise ValueError(f"checkpoint {str(path)!r} holds the optimizer state by "
                         f"{'parameter name (zero1)' if layout == 'by_name' else 'flat shards'}"
                         f"; this trainer runs optimizer_sharding={opt.sharding!r}, which "
                         f"reads {'only zero1' if layout == 'flat' else 'none or distributed'}"
                         " checkpoints")


def load_checkpoint(directory: str | Path, trainer: Trainer) -> None:
    """Restore `trainer` in place from a checkpoint written by `save_checkpoint`, on this
    world or another (see the module docstring)."""
    path = Path(directory)
    if not (path / ".metadata").is_file():
        raise ValueError(f"checkpoint directory={str(path)!r} holds no checkpoint "
                         f"(no .metadata; an unfinished save leaves '<dir>.partial')")
    keys = _saved_keys(path)
    progress = {k: v for k, v in _progress(trainer).items() if f"progress.{k}" in keys}
    _dcp(dcp.load, {"progress": progress}, path, trainer.group)
    _check_compatible(path, keys, progress, trainer)
    state = _state(trainer)
    rng_key = f"rng.rank{trainer.rank}"
    if not any(k.startswith(rng_key + ".") for k in keys):
        warnings.warn(f"checkpoint {str(path)!r} has no RNG state for rank {trainer.rank} "
                      "(saved by fewer ranks); this rank keeps its own", stacklevel=2)
        del state[rng_key]
    _dcp(dcp.load, state, path, trainer.group)
    set_model_state_dict(trainer.model, state["model"])
    trainer.step = int(progress["step"])
    trainer.data_position = BatchPosition(epoch=int(progress["epoch"]),
                                          index=int(progress["index"]))
    if rng_key in state:
        _set_rng(state[rng_key], next(trainer.model.parameters()).device)


def load_optimizer_state(directory: str | Path, trainer: Trainer) -> None:
    """Only the optimizer's masters and moments, into the trainer's current layout
    (collective): what an elastic world takes for the shards no live rank holds
    (workers.elastic); the model, step and data position are left as they are."""
    path = Path(directory)
    if not (path / ".metadata").is_file():
        raise ValueError(f"checkpoint directory={str(path)!r} holds no checkpoint")
    keys = _saved_keys(path)
    progress = {k: v for k, v in _progress(trainer).items() if f"progress.{k}" in keys}
    _dcp(dcp.load, {"progress": progress}, path, trainer.group)
    _check_compatible(path, keys, progress, trainer)
    _dcp(dcp.load, {"optim": _optim_state(trainer.optimizer, trainer.group)}, path,
         trainer.group)


def _set_rng(rng: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng:
        torch.cuda.set_rng_state(rng["cuda"], device)


def _write_model_card(directory: Path, model) -> None:
    """The spec and source directory `ringmaster export` needs (workers.hf.MODEL_CARD)."""
    if hasattr(model, "spec"):
        from workers.hf import write_model_card

        write_model_card(directory, model)


def _barrier(group) -> None:
    if _distributed(group):
        dist.barrier(group=group)
