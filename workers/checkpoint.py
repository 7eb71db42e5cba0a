"""Checkpoints with torch.distributed.checkpoint (DCP): model, optimizer, step, RNG, data.

One directory per checkpoint, written by all ranks together (DCP plans the write so each
replicated tensor is stored once) and read back by all ranks. What it holds:
  model      the module's state dict
  optim      AdamW state keyed by parameter name (DCP's get_state_dict), so it does not
             depend on parameter order; with ZeRO-1 each rank stores its own shard
  progress   optimizer step and data position (epoch, index) as int64 tensors
  rng.rank<r> each rank's torch CPU (and CUDA) generator state: ranks may differ
Together with a deterministic step these make resume bit-identical: k steps, save, a fresh
process, restore, N-k steps gives exactly the N-step losses and weights.

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
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from scheduler.batching import BatchPosition

if TYPE_CHECKING:
    from workers.train import Trainer

__all__ = ["load_checkpoint", "save_checkpoint"]


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


def _progress(trainer: Trainer) -> dict[str, torch.Tensor]:
    """Replicated progress (the same on every rank: DCP stores it once)."""
    pos = trainer.data_position
    return {name: torch.tensor(v, dtype=torch.int64) for name, v in
            [("step", trainer.step), ("epoch", pos.epoch), ("index", pos.index)]}


def _state(trainer: Trainer, *, with_optim: bool) -> tuple[dict, dict | None]:
    """(DCP state dict, full optimizer state dict) of a trainer.

    Tensors are views that loading fills in place. Only the optimizer's per-parameter
    *state* is checkpointed: its hyperparameters (param_groups) are the config's, and the
    LR a function of the step, so the live ones are kept.

    DCP's get_state_dict materialises the state of an optimizer that has not stepped
    (a zero-LR step), which would change its next update; so before the first step
    (step 0, AdamW has no state yet) there is no "optim" entry and the optimizer is left
    untouched. After it every parameter has state (run_step gives each one a gradient);
    with ZeRO-1 each rank's entry holds only the parameters it owns (distinct keys).
    """
    device = next(trainer.model.parameters()).device
    state = {"progress": _progress(trainer), f"rng.rank{trainer.rank}": _rng_state(device)}
    if not with_optim:
        state["model"] = get_model_state_dict(trainer.model)
        return state, None
    state["model"], optim = get_state_dict(trainer.model, trainer.optimizer)
    state["optim"] = {"state": optim["state"]}
    return state, optim


def save_checkpoint(directory: str | Path, trainer: Trainer) -> Path:
    """Write `trainer`'s state to `directory` (collective over trainer.group); returns it."""
    final = Path(directory)
    partial = final.with_name(final.name + ".partial")
    lead = not _distributed(trainer.group) or dist.get_rank(trainer.group) == 0
    if lead:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    _barrier(trainer.group)
    _dcp(dcp.save, _state(trainer, with_optim=trainer.step > 0)[0], partial, trainer.group)
    _barrier(trainer.group)
    if lead:
        shutil.rmtree(final, ignore_errors=True)
        partial.rename(final)
    _barrier(trainer.group)
    return final


def load_checkpoint(directory: str | Path, trainer: Trainer) -> None:
    """Restore `trainer` in place from a checkpoint written by `save_checkpoint`."""
    path = Path(directory)
    if not (path / ".metadata").is_file():
        raise ValueError(f"checkpoint directory={str(path)!r} holds no checkpoint "
                         f"(no .metadata; an unfinished save leaves '<dir>.partial')")
    progress = _progress(trainer)
    _dcp(dcp.load, {"progress": progress}, path, trainer.group)
    with_optim = int(progress["step"]) > 0
    if not with_optim:  # saved before the first update: the optimizer starts fresh
        trainer.optimizer.state.clear()
    # With state saved, get_state_dict materialises AdamW's state so DCP can fill it
    # (it only does so for parameters without gradients).
    trainer.model.zero_grad(set_to_none=True)
    state, optim = _state(trainer, with_optim=with_optim)
    _dcp(dcp.load, state, path, trainer.group)
    if with_optim:
        set_state_dict(trainer.model, trainer.optimizer, model_state_dict=state["model"],
                       optim_state_dict=optim)
    else:
        set_model_state_dict(trainer.model, state["model"])
    trainer.step = int(progress["step"])
    trainer.data_position = BatchPosition(epoch=int(progress["epoch"]),
                                          index=int(progress["index"]))
    rng = state[f"rng.rank{trainer.rank}"]
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng:
        torch.cuda.set_rng_state(rng["cuda"], next(trainer.model.parameters()).device)


def _barrier(group) -> None:
    if _distributed(group):
        dist.barrier(group=group)
