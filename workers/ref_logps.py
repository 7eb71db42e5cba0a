"""Forward-only HDP job: a model's per-token log-probs stored as a dataset column.

`python -m workers.ref_logps DATA --model DIR` (what `ringmaster data ref-logps` runs)
computes log p(token t | tokens < t) under the model of DIR for every token of DATA and
installs it as the column `ref_logps` (DPO's reference policy, GRPO's KL anchor) or
`old_logps` (GRPO's sampling policy), in float32 (float64 for a float64 model),
atomically (scheduler.dataset_columns): on any error the dataset is left as it was.

Why a forward-only job and not a frozen copy inside training: a frozen reference holds a
second set of weights on every rank (2 bytes per parameter in bf16, as much as the compute
copy) and costs a forward pass per step (~1/3 of a training step); stored log-probs cost 4
bytes per token on disk, read with the tokens, and nothing on the device (docs/data.md).

How: the samples are cut into batches of `num_ranks x capacity_tokens x 4` tokens in
dataset order; rank 0 plans each with the HDP planner (scheduler.planner.plan_batch), so a
sequence longer than one rank's capacity runs on a ring (ring attention, zigzag shards)
exactly as in training, and broadcasts the plan. Every rank runs its groups forward only
(`Transformer.token_logprobs`: no graph, the head streamed in chunks) and rank 0 gathers
the shards, reassembles each sequence and writes the column. The planner balances with
the training cost model; forward work is proportional to it within attention's
backward/forward ratio, so the balance holds while its absolute predictions do not apply.

Memory per rank: the model's weights in `--dtype`, one micro-batch's activations of one
layer at a time (`capacity_tokens`), and the gathered log-probs of one batch on rank 0.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from parallelism import zigzag_index, zigzag_shard
from scheduler.dataset import TokenDataset
from scheduler.dataset_columns import COLUMNS, TokenColumnWriter
from scheduler.plan import RingGroup, StepPlan

BATCH_CAPACITIES = 4  # a batch holds this many micro-batches' worth of every rank's tokens


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m workers.ref_logps", description=__doc__.split(
        "\n")[0])
    p.add_argument("data", help="the token dataset (directory or prefix)")
    p.add_argument("--model", required=True, help="Hugging Face model directory")
    p.add_argument("--column", default="ref_logps", choices=COLUMNS)
    p.add_argument("--num-ranks", type=int, default=1, help="processes (one per GPU)")
    p.add_argument("--capacity-tokens", type=int, default=8192,
                   help="tokens one rank holds per micro-batch")
    p.add_argument("--dtype", default=None, help="parameter dtype (default: the config's)")
    p.add_argument("--planner-time-limit-s", type=float, default=0.5)
    args = p.parse_args(argv)
    for name in ("num_ranks", "capacity_tokens"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 1")
    return args


def batches(lengths: np.ndarray, tokens_per_batch: int) -> list[np.ndarray]:
    """Consecutive sample ids, cut where the next sample would overfill the batch."""
    out, start, total = [], 0, 0
    for i, n in enumerate(lengths.tolist()):
        if total and total + n > tokens_per_batch:
            out.append(np.arange(start, i))
            start, total = i, 0
        total += n
    if start < len(lengths):
        out.append(np.arange(start, len(lengths)))
    return out


def plan_of(lengths: Sequence[int], model, args: argparse.Namespace) -> StepPlan:
    from scheduler.planner import plan_batch
    from scheduler.specs import cluster_preset

    cluster = cluster_preset("cpu" if not torch.cuda.is_available() else "h100",
                             num_ranks=args.num_ranks)
    return plan_batch(list(lengths), cluster, model.spec, capacity_tokens=args.capacity_tokens,
                      time_limit_s=args.planner_time_limit_s, predictions=False)


def group_logps(model, g: RingGroup, tokens: dict[int, torch.Tensor], rank: int,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed rows of the group this rank computed, their target-aligned log-probs)."""
    seqs = [tokens[s.id] for s in g.sequences]
    lengths = torch.tensor([0] + [len(t) for t in seqs])
    cu = torch.cumsum(lengths, 0).to(torch.int32)
    ids = torch.cat(seqs).long()
    if g.ring_size == 1:
        rows = torch.arange(ids.numel())
        out = model.token_logprobs(ids.to(device), cu_seqlens=cu.to(device))
        return rows, out.cpu()
    from workers.model import next_token_targets

    j = g.ranks.index(rank)
    targets = zigzag_shard(next_token_targets(ids, cu), cu, g.ring_size, j)[0]
    local, cu_local, pos = zigzag_shard(ids, cu, g.ring_size, j)
    out = model.token_logprobs(local.to(device), cu_seqlens=cu_local.to(device),
                               position_ids=pos.to(device), targets=targets.to(device),
                               ring=list(g.ranks))
    return zigzag_index(cu, g.ring_size, j), out.cpu()


def run_batch(model, ds: TokenDataset, sample_ids: np.ndarray, plan: StepPlan, rank: int,
              device: torch.device) -> list[tuple[tuple[int, tuple[int, ...]], np.ndarray,
                                                  np.ndarray]]:
    """This rank's results: (micro-batch/group key, packed rows, values) per group."""
    tokens = {s.id: torch.from_numpy(ds[int(sample_ids[s.id])].astype(np.int64))
              for _, g in plan.micro_batches_of(rank) for s in g.sequences}
    out = []
    for m, g in plan.micro_batches_of(rank):
        rows, values = group_logps(model, g, tokens, rank, device)
        out.append(((m, tuple(g.ranks)), rows.numpy(), values.double().numpy()))
    return out


def write_batch(writer: TokenColumnWriter, ds: TokenDataset, sample_ids: np.ndarray,
                plan: StepPlan, results: list) -> None:
    """Reassemble each group from its members' rows and write every sequence's column."""
    by_group: dict[tuple, list] = {}
    for key, rows, values in results:
        by_group.setdefault(key, []).append((rows, values))
    for m, mb in enumerate(plan.micro_batches):
        for g in mb.groups:
            lengths = [s.length for s in g.sequences]
            packed = np.zeros(sum(lengths))
            for rows, values in by_group[(m, tuple(g.ranks))]:
                packed[rows] = values
            start = 0
            for s, n in zip(g.sequences, lengths, strict=True):
                column = np.zeros(n)
                column[1:] = packed[start:start + n - 1]  # target t predicts token t + 1
                writer.write(int(sample_ids[s.id]), column)
                start += n


def _rank_main(rank: int, args: argparse.Namespace, port: int) -> None:
    from workers.hf import load_pretrained

    world = args.num_ranks
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{rank}" if cuda else "cpu")
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
    try:
        model = load_pretrained(args.model, dtype=args.dtype, device=device).eval()
        ds = TokenDataset(args.data)
        # float32 holds a log-prob to ~1e-7; a float64 model keeps its precision
        dtype = "<f8" if model.embed.weight.dtype == torch.float64 else "<f4"
        writer = TokenColumnWriter(args.data, args.column, source=str(Path(args.model)),
                                   dtype=dtype) if rank == 0 else None
        _run(model, ds, writer, rank, world, args, device)
        if writer is not None:
            writer.commit()
    finally:
        if world > 1:
            dist.destroy_process_group()


def _run(model, ds: TokenDataset, writer, rank: int, world: int,
         args: argparse.Namespace, device: torch.device) -> None:
    lengths = ds.lengths
    try:
        for sample_ids in batches(lengths, world * args.capacity_tokens * BATCH_CAPACITIES):
            plans: list[StepPlan | None] = [
                plan_of(lengths[sample_ids], model, args) if rank == 0 else None]
            if world > 1:
                dist.broadcast_object_list(plans, src=0)
            plan = plans[0]
            assert plan is not None, "rank 0 planned, and broadcast its plan"
            results = run_batch(model, ds, sample_ids, plan, rank, device)
            gathered: list[Any] | None = [None] * world if rank == 0 else None
            if world > 1:
                dist.gather_object(results, gathered, dst=0)
            else:
                gathered = [results]
            if writer is not None:
                assert gathered is not None, "the writer is rank 0's, which gathers"
                write_batch(writer, ds, sample_ids, plan, [r for g in gathered for r in g])
    except BaseException:
        if writer is not None:
            writer.abort()
        raise


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_inputs(args: argparse.Namespace) -> None:
    """The user's mistakes, before any process starts (ValueError naming the input)."""
    from scheduler.hf_checkpoint import inspect_checkpoint
    from scheduler.specs import ModelSpec

    ds = TokenDataset(args.data)
    spec = ModelSpec.from_hf_config(Path(args.model))
    inspect_checkpoint(Path(args.model), spec)
    top = ds.max_token_id
    if top >= spec.vocab_size:
        raise ValueError(f"--model {args.model}: vocab_size={spec.vocab_size}, but dataset "
                         f"{args.data} holds token id {top} (tokenized for another model?)")
    if args.num_ranks > 1 and torch.cuda.is_available() \
            and torch.cuda.device_count() < args.num_ranks:
        raise ValueError(f"--num-ranks={args.num_ranks}: only {torch.cuda.device_count()} "
                         "GPUs are visible")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from scheduler.errors import RingmasterError

    try:
        check_inputs(args)
        if args.num_ranks == 1:
            _rank_main(0, args, 0)
        else:
            import torch.multiprocessing as mp

            mp.spawn(_rank_main, args=(args, _free_port()), nprocs=args.num_ranks)
    except (ValueError, RingmasterError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{args.column}: {args.data} ({len(TokenDataset(args.data)):,} samples) under "
          f"{args.model}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
