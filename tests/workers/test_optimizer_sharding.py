"""The optimizer shardings on 1-4 gloo ranks: exactness, resharded resume, bytes, traffic.

One launch per world size (4, 3, 2, 1 ranks; the 3-rank one also restores the 4-rank
checkpoint) does everything and the tests below read its results:

- exactness: three steps of `distributed` AdamW (clipping on, weight decay on matrices)
  at float64 over hand-written plans with rings (an odd ring of 3 included) and uneven
  micro-batch counts (a rank with none on 4 ranks) equal one process running plain
  autograd on the whole batch and torch.optim.AdamW. Tolerance 1e-12: the two differ only
  in the order of float64 sums (~1e-19 absolute on a gradient element), which AdamW's
  g / (|g| + eps) magnifies by at most lr / eps = 1e6 (lr 1e-2, eps 1e-8), so ~1e-13 per
  step; nothing else in the update is approximate.
- resharded resume: 4 ranks save at step 2 and continue to step 4; 3 fresh ranks (other
  initial weights) restore the checkpoint and run steps 3-4 on their own plans of the same
  batches. Equal within 1e-10: only the reduction order of the gradients differs.
- bytes: after a step, the storages the model and the optimizer hold (parameters, the
  flat gradient buffer, masters, moments; no `.grad` left) equal
  scheduler.model_states.model_state_bytes exactly, for every precision x sharding.
- traffic: the collectives one train step issues (torch.distributed wrapped) equal
  scheduler.model_states.step_collectives exactly (op, payload bytes, dtype, root).
- shard mirror (`shard_mirror=True`, distributed): its bytes and its gradient shift are in
  the same two checks, and after the exact run every rank's mirror equals the previous
  owner's masters and moments bit for bit (the same elementwise update on the same data).
"""

from __future__ import annotations

import functools
import warnings

import pytest
import torch
import torch.distributed as dist

from parallelism.worlds import run_distributed
from scheduler.model_states import (
    OPTIMIZER_SHARDINGS,
    PRECISIONS,
    model_state_bytes,
    step_collectives,
)
from workers.train import TrainConfig, Trainer, build_model

from .helpers import group, plan_of, random_samples, tiny_spec, torch_adamw_run

pytestmark = pytest.mark.distributed

LENGTHS = [27, 13, 7, 1, 19, 9]
STEPS = 3
CONFIG = dict(lr=1e-2, warmup_steps=1, total_steps=6, max_grad_norm=0.5, weight_decay=0.1)


def hdp_plan(world: int):
    """Rings and uneven micro-batch counts for each world size (every id exactly once)."""
    s = [(i, n) for i, n in enumerate(LENGTHS)]
    if world == 1:
        return plan_of(1, [[group([0], s[:3])], [group([0], s[3:])]])
    if world == 2:  # rank 0 runs 2 micro-batches, rank 1 one
        return plan_of(2, [[group([1, 0], s[:1])], [group([0], s[1:])]])
    if world == 3:  # 3, 2 and 1 micro-batches
        return plan_of(3, [[group([2, 0], s[:1]), group([1], s[1:2])],
                           [group([0], s[2:4]), group([1], s[4:5])], [group([0], s[5:])]])
    # world 4: an odd ring of 3, then packs; rank 3 runs no micro-batch at all
    return plan_of(4, [[group([2, 0, 1], s[:2])], [group([1], s[2:4]), group([0], s[4:])]])


def batch(step: int) -> dict[int, torch.Tensor]:
    return random_samples(LENGTHS, seed=100 + step)


def _trainer(world: int, rank: int, *, precision: str, sharding: str, seed: int = 0,
             **overrides) -> Trainer:
    torch.manual_seed(seed)
    cfg = TrainConfig(**{**CONFIG, **overrides}, precision=precision,
                      optimizer_sharding=sharding)
    return Trainer(build_model(tiny_spec(), precision), cfg, rank=rank)


def _params(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


# ----------------------------------------------------------------- inside the ranks
def _state_bytes(trainer: Trainer) -> dict[str, int]:
    """Bytes of the distinct storages the model and optimizer hold, by kind."""
    opt = trainer.optimizer
    assert all(p.grad is None for p in trainer.model.parameters())
    storages: dict[int, tuple[str, int]] = {}
    mirror = [("mirror", t) for t in opt.part("mirror").values()] if opt.shard_mirror else []
    for kind, t in [("params", p) for p in trainer.model.parameters()] + [
            ("grads", opt.grads.buffer), ("masters", opt.master), ("moments", opt.exp_avg),
            ("moments", opt.exp_avg_sq)] + mirror:
        # First kind wins: fp32/fp64 masters are the parameters' own storage.
        storages.setdefault(t.untyped_storage().data_ptr(), (kind, t.untyped_storage().nbytes()))
    held = _tensors_held(opt)
    assert held <= set(storages), "the optimizer holds tensors outside the state table"
    out = {"params": 0, "grads": 0, "masters": 0, "moments": 0, "mirror": 0}
    for kind, nbytes in storages.values():
        out[kind] += nbytes
    return out


def _tensors_held(obj, seen=None) -> set[int]:
    """Storage pointers of every tensor reachable from `obj`'s attributes."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return set()
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return {obj.untyped_storage().data_ptr()}
    if isinstance(obj, dict):
        items = list(obj.values())
    elif isinstance(obj, list | tuple | set):
        items = list(obj)
    elif hasattr(obj, "__dict__") and type(obj).__module__.startswith(("workers", "parallel")):
        items = list(vars(obj).values())
    else:
        return set()
    return set().union(*(_tensors_held(i, seen) for i in items)) if items else set()


_OPS = {"all_reduce": 0, "broadcast": 0, "reduce_scatter_single": 1, "all_gather_single": 0}
_FORBIDDEN = ("all_gather", "all_gather_into_tensor", "reduce_scatter", "reduce_scatter_tensor",
              "all_to_all", "all_to_all_single", "reduce", "gather", "scatter", "barrier")


def _recorded_collectives(fn, grad_buffer: torch.Tensor) -> list[tuple]:
    """(op, payload bytes, dtype, root) of every collective `fn()` issues, and of its
    point-to-point batches that move `grad_buffer` (ring attention's move activations)."""
    calls, saved = [], {}

    def record_p2p(real):
        @functools.wraps(real)
        def recorder(ops):
            storage = grad_buffer.untyped_storage().data_ptr()
            if all(op.tensor.untyped_storage().data_ptr() == storage for op in ops):
                sent = [op.tensor for op in ops if op.op is dist.isend]
                assert len(sent) == 1 and len(ops) == 2, "a shift is one send, one receive"
                t = sent[0]
                calls.append(("send_recv", t.numel() * t.element_size(),
                              str(t.dtype).split(".")[1], None))
            return real(ops)
        return recorder

    def wrap(name, index):
        real = getattr(dist, name)

        @functools.wraps(real)
        def recorder(*args, **kwargs):
            t = args[index] if len(args) > index else kwargs.get(
                "input" if index else "tensor", kwargs.get("output_tensor"))
            op = name.removesuffix("_single")
            root = kwargs.get("group_src", kwargs.get("src")) if name == "broadcast" else None
            calls.append((op, t.numel() * t.element_size(), str(t.dtype).split(".")[1], root))
            return real(*args, **kwargs)
        return recorder

    def forbid(name):
        def refuse(*args, **kwargs):
            raise AssertionError(f"unexpected collective dist.{name} in a step")
        return refuse

    for name in (*_OPS, *_FORBIDDEN):
        saved[name] = getattr(dist, name)
        setattr(dist, name, wrap(name, _OPS[name]) if name in _OPS else forbid(name))
    saved["batch_isend_irecv"] = dist.batch_isend_irecv
    dist.batch_isend_irecv = record_p2p(dist.batch_isend_irecv)
    try:
        fn()
    finally:
        for name, real in saved.items():
            setattr(dist, name, real)
    return calls


SETTINGS = [(p, s, False) for p in PRECISIONS for s in OPTIMIZER_SHARDINGS] + [
    (p, "distributed", True) for p in PRECISIONS]  # (precision, sharding, shard_mirror)


def _accounting(world: int, rank: int) -> dict:
    """Bytes and collectives of one step for every precision x sharding (x mirror)."""
    out = {}
    for precision, sharding, mirror in SETTINGS:
        trainer = _trainer(world, rank, precision=precision, sharding=sharding,
                           shard_mirror=mirror)
        calls = _recorded_collectives(
            lambda t=trainer: t.train_step(hdp_plan(world), batch(0)),
            trainer.optimizer.grads.buffer)
        out[precision, sharding, mirror] = {"bytes": _state_bytes(trainer), "calls": calls}
    return out


def _mirror_and_own(trainer: Trainer) -> dict:
    opt = trainer.optimizer
    out = {"own": {k: t.clone() for k, t in opt.part("own").items()}}
    if opt.shard_mirror:
        out["mirror"] = {k: t.clone() for k, t in opt.part("mirror").items()}
    return out


def _exact_run(world: int, rank: int, ckpt: str) -> dict:
    """STEPS fp64 distributed steps (mirrored); on 4 ranks also save at step 2 and run to
    step 4."""
    trainer = _trainer(world, rank, precision="fp64", sharding="distributed",
                       shard_mirror=True)
    norms = [trainer.train_step(hdp_plan(world), batch(s)).grad_norm for s in range(STEPS)]
    out = {"params": _params(trainer), "norms": norms, "state": _mirror_and_own(trainer)}
    if world == 4:
        again = _trainer(world, rank, precision="fp64", sharding="distributed")
        for s in range(2):
            again.train_step(hdp_plan(world), batch(s))
        again.save(ckpt)
        for s in range(2, 4):
            again.train_step(hdp_plan(world), batch(s))
        out["continued"] = _params(again)
    return out


def _rank_main(rank: int, world: int, ckpt: str) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        out = {"exact": _exact_run(world, rank, ckpt), "accounting": _accounting(world, rank)}
        if world == 3:  # launched after the 4-rank run wrote its checkpoint
            out["restored"] = _restore_on_three(rank, world, ckpt)
        return out


def _restore_on_three(rank: int, world: int, ckpt: str) -> dict:
    trainer = _trainer(world, rank, precision="fp64", sharding="distributed", seed=99)
    trainer.restore(ckpt)
    assert trainer.step == 2
    for s in range(2, 4):
        trainer.train_step(hdp_plan(world), batch(s))
    return _params(trainer)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    ckpt = str(tmp_path_factory.mktemp("sharded") / "step_2")
    return {w: run_distributed(_rank_main, w, ckpt, timeout_s=300) for w in (4, 3, 2, 1)}


# ----------------------------------------------------------------- the reference
def reference_adamw(num_steps: int) -> tuple[dict[str, torch.Tensor], list[float]]:
    """One process: plain autograd on the whole batch, clip_grad_norm_, torch AdamW."""
    params, _, norms = torch_adamw_run(CONFIG, batch, num_steps)
    return params, norms


def _max_abs_diff(a: dict, b: dict) -> float:
    return max(float((a[n] - b[n]).abs().max()) for n in b)


# ----------------------------------------------------------------- the tests
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_distributed_adamw_equals_unsharded_adamw_at_fp64(runs, world):
    want, want_norms = reference_adamw(STEPS)
    assert all(n > CONFIG["max_grad_norm"] for n in want_norms)  # clipping really acts
    for rank, r in enumerate(runs[world]):
        got = r["exact"]
        assert _max_abs_diff(got["params"], want) <= 1e-12, (world, rank)
        assert got["norms"] == pytest.approx(want_norms, rel=1e-12, abs=0)
    moved = _max_abs_diff(want, reference_adamw(0)[0])
    assert moved > 1e-3  # the weights really moved, so 1e-12 is a real bound


def test_resume_from_four_ranks_on_three_equals_continuing_on_four(runs):
    continued = [r["exact"]["continued"] for r in runs[4]]
    for rank, r in enumerate(runs[3]):
        assert _max_abs_diff(r["restored"], continued[0]) <= 1e-10, rank
    assert all(_max_abs_diff(c, continued[0]) == 0 for c in continued)  # replicas agree
    want, _ = reference_adamw(4)
    assert _max_abs_diff(continued[0], want) <= 1e-12  # and both are the real 4 steps


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_state_bytes_equal_model_state_bytes(runs, world):
    spec = tiny_spec()
    for rank, r in enumerate(runs[world]):
        for (precision, sharding, mirror), got in r["accounting"].items():
            want = model_state_bytes(spec, precision=precision, sharding=sharding,
                                     world_size=world, rank=rank, shard_mirror=mirror)
            assert got["bytes"] == {"params": want.params, "grads": want.grads,
                                    "masters": want.masters, "moments": want.moments,
                                    "mirror": want.mirror}, \
                (world, rank, precision, sharding, mirror)
            assert (want.mirror > 0) == (mirror and world > 1)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_step_collectives_are_the_ones_issued(runs, world):
    spec = tiny_spec()
    for r in runs[world]:
        for (precision, sharding, mirror), got in r["accounting"].items():
            want = step_collectives(spec, precision=precision, sharding=sharding,
                                    world_size=world, shard_mirror=mirror)
            assert got["calls"] == [(c.op, c.payload_bytes, c.dtype, c.root) for c in want], \
                (world, precision, sharding, mirror)
    # Not trivially empty: every sharding communicates on more than one rank.
    calls = runs[world][0]["accounting"]
    assert (world == 1) == (len(calls["fp32", "none", False]["calls"]) == 0)
    assert (world == 1) == (not any(c[0] == "send_recv"
                                    for c in calls["fp32", "distributed", True]["calls"]))


@pytest.mark.parametrize("world", [2, 3, 4])
def test_mirror_equals_the_previous_owners_shard_bit_for_bit(runs, world):
    states = [r["exact"]["state"] for r in runs[world]]
    for rank, state in enumerate(states):
        owner = states[(rank - 1) % world]["own"]
        for kind, t in state["mirror"].items():
            assert torch.equal(t, owner[kind]), (world, rank, kind)
        assert float(state["mirror"]["exp_avg_sq"].abs().max()) > 0  # really updated
