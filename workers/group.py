"""The Ray worker group: one actor per rank, one global process group, steps driven by plans.

`WorkerGroup` starts `num_ranks` `RankWorker` actors (`num_gpus=1` each on GPU clusters, a
CPU share otherwise), has them join one torch.distributed group (NCCL on CUDA, gloo on
CPU; rank 0's node hosts the rendezvous), builds the same model on every rank, and then
runs steps: the driver sends each actor the plan and only the samples its micro-batches
hold, and every actor runs `Trainer.train_step` (or `run_step`). Save/restore call the
DCP checkpoint on all ranks.

Failure handling: every call waits on all ranks with `ray.wait`, so the first rank that
raises or dies is reported at once (`WorkerError` / `WorkerDiedError` naming the rank)
instead of waiting for the others, which may be blocked in a collective with it until the
process-group timeout. A failed group is broken: `stop()` kills the actors. Ray itself is
the caller's: `ray.init()` before (`RAY_ADDRESS` selects a cluster); `WorkerGroup` starts a
local Ray only when none is running.

Placement follows the planner's topology: with `ranks_per_node` (the job cluster's
`gpus_per_node`) and a Ray cluster of more than one node, rank r runs on planner node
r // ranks_per_node, each planner node one Ray node (one placement group, a bundle per
node, STRICT_SPREAD), so a ring the planner kept inside a node is inside one machine.

Used by `python -m workers.driver` (the job entrypoint): `train(num_steps, plan_source)`
runs the loop from the driver with any PlanSource (the controller's plan stream, or
workers.data.DatasetPlanSource for local runs).
"""

from __future__ import annotations

import datetime
import os
import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import ray
import torch
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from scheduler.batching import BatchPosition
from scheduler.errors import RingmasterError
from scheduler.plan import StepPlan
from scheduler.specs import ModelSpec
from workers.data import sequence_ids_of_rank
from workers.step import StepStats
from workers.train import PlanSource, TrainConfig, TrainStats

__all__ = ["GroupConfig", "RankWorker", "WorkerDiedError", "WorkerError", "WorkerGroup"]


class WorkerError(RuntimeError):
    """A rank raised during a group call; `rank` says which. `user`: the cause is the
    job's data or config (a RingmasterError: retrying cannot help); `detail` is the cause
    without the rank."""

    def __init__(self, rank: int, message: str, *, user: bool = False):
        super().__init__(f"rank {rank}: {message}")
        self.rank, self.detail, self.user = rank, message, user


class WorkerDiedError(WorkerError):
    """A rank's actor (process) died; the group cannot continue."""


@dataclass(frozen=True, kw_only=True)
class GroupConfig:
    """How to start a worker group."""

    num_ranks: int  # actors (= world size)
    model: ModelSpec  # built identically on every rank, in train.precision's compute dtype
    # Hugging Face directory the model comes from (workers.hf); with model_init "pretrained"
    # every rank loads its weights (`model` may override its RoPE settings), with "random"
    # it is only the source of the tokenizer files an export copies.
    model_dir: str | None = None
    model_init: Literal["pretrained", "random"] = "random"
    train: TrainConfig = field(default_factory=TrainConfig)  # optimizer and schedule
    seed: int = 0  # model initialisation seed (same on every rank)
    use_gpu: bool | None = None  # None: GPUs if the Ray cluster has at least num_ranks
    cpus_per_rank: float | None = None  # CPU actors' share; None: cluster CPUs / ranks, <= 1
    torch_threads: int = 1  # intra-op threads per CPU actor
    timeout_s: float = 600.0  # process-group timeout and the longest wait on one call
    start_timeout_s: float = 120.0  # actors scheduled and process group joined
    env: dict[str, str] = field(default_factory=dict)  # environment of every rank's process
    # The planner's node size: rank r on node r // ranks_per_node (module docstring);
    # None, or a one-node Ray cluster: wherever Ray puts the actors.
    ranks_per_node: int | None = None

    def __post_init__(self) -> None:
        if self.num_ranks < 1:
            raise ValueError(f"num_ranks={self.num_ranks} must be >= 1")
        if self.cpus_per_rank is not None and self.cpus_per_rank <= 0:
            raise ValueError(f"cpus_per_rank={self.cpus_per_rank} must be > 0 (or None)")
        if self.torch_threads < 1:
            raise ValueError(f"torch_threads={self.torch_threads} must be >= 1")
        if self.ranks_per_node is not None and self.ranks_per_node < 1:
            raise ValueError(f"ranks_per_node={self.ranks_per_node} must be >= 1 (or None)")
        if self.model_init not in ("pretrained", "random") or (
                self.model_init == "pretrained" and self.model_dir is None):
            raise ValueError(f"model_init={self.model_init!r} must be 'random' or "
                             "'pretrained' (which needs model_dir)")
        if self.timeout_s <= 0 or self.start_timeout_s <= 0:
            raise ValueError(f"timeout_s={self.timeout_s} and start_timeout_s="
                             f"{self.start_timeout_s} must be > 0")
        num_tensors = len(self.model.parameter_numels())
        if self.train.optimizer_sharding == "zero1" and num_tensors < self.num_ranks:
            raise ValueError(f"optimizer_sharding='zero1' needs a parameter tensor per rank, "
                             f"but the model has {num_tensors} for num_ranks={self.num_ranks};"
                             " use 'distributed' or 'none'")


class RankWorker:
    """One rank: its process-group membership, model and trainer (the Ray actor's body)."""

    def __init__(self, rank: int, config: GroupConfig, use_gpu: bool):
        self.rank, self.config, self.use_gpu = rank, config, use_gpu
        self.trainer = None

    def rendezvous_address(self) -> tuple[str, int]:
        """This node's address and a free port (asked of rank 0 only)."""
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def node_id(self) -> str:
        """The Ray node this rank runs on."""
        return ray.get_runtime_context().get_node_id()

    def setup(self, address: str, port: int) -> int:
        """Join the global process group and build the model and trainer; returns pid."""
        import torch.distributed as dist

        from workers.train import Trainer

        if self.use_gpu:
            torch.cuda.set_device(0)  # Ray exposes exactly this actor's GPU
        else:
            torch.set_num_threads(self.config.torch_threads)
        dist.init_process_group(
            "nccl" if self.use_gpu else "gloo", init_method=f"tcp://{address}:{port}",
            rank=self.rank, world_size=self.config.num_ranks,
            timeout=datetime.timedelta(seconds=self.config.timeout_s))
        # NCCL wants one collective over every rank before any ring's point-to-point ops
        # (docs/ring-attention.md); it is also a cheap check that every rank arrived.
        dist.barrier()
        device = "cuda" if self.use_gpu else "cpu"
        train = self.config.train.resolve(device_type=device,
                                          world_size=self.config.num_ranks)
        model = self._initial_model(train.precision, device)
        self.trainer = Trainer(model, train, rank=self.rank)
        return os.getpid()

    def _initial_model(self, precision: str, device: str):
        """The same weights on every rank, in the precision's compute dtype: each rank loads
        the shared directory (workers.hf says why), or draws the same random init; checked
        with one all-reduce."""
        from scheduler.model_states import compute_dtype
        from workers.hf import load_pretrained
        from workers.train import build_model

        cfg = self.config
        if cfg.model_init == "pretrained":
            model = load_pretrained(cfg.model_dir, spec=cfg.model,
                                    dtype=compute_dtype(precision), device=device)
        else:
            torch.manual_seed(cfg.seed)
            model = build_model(cfg.model, precision, device=device)
            model.source_dir = cfg.model_dir
        _check_same_weights(model, cfg.model_dir)
        return model

    def run_step(self, plan_json: str, samples: Mapping[int, torch.Tensor]) -> StepStats:
        from workers.step import run_step

        plan = StepPlan.model_validate_json(plan_json)
        return run_step(self.trainer.model, plan, samples, rank=self.rank)

    def train_step(self, plan_json: str, samples: Mapping[int, torch.Tensor],
                   next_position: BatchPosition | None, batch=None) -> TrainStats:
        plan = StepPlan.model_validate_json(plan_json)
        return self.trainer.train_step(plan, samples, next_position=next_position,
                                       batch=batch)

    def save(self, directory: str) -> str:
        return str(self.trainer.save(directory))

    def restore(self, directory: str) -> tuple[int, BatchPosition]:
        self.trainer.restore(directory)
        return self.trainer.step, self.trainer.data_position

    def state(self, what: str) -> dict[str, torch.Tensor]:
        """CPU copies of the parameters ("params") or their gradients ("grads")."""
        pairs = self.trainer.model.named_parameters()
        if what == "params":
            return {n: p.detach().cpu().clone() for n, p in pairs}
        if what == "grads":
            return {n: p.grad.detach().cpu().clone() for n, p in pairs if p.grad is not None}
        raise ValueError(f"what={what!r} is not valid; valid: params, grads")

    def run_agent(self, controller: str, job_id: str, attempt: int):
        """Serve the controller's plan stream as this rank until the job ends (agent mode)."""
        from scheduler.telemetry import make_tracer_provider
        from workers.agent import RankAgent
        from workers.controller_client import WorkerIdentity

        identity = WorkerIdentity(job_id=job_id, attempt=attempt, rank=self.rank)
        provider = make_tracer_provider(default_service_name="ringmaster-worker")
        try:
            return RankAgent(controller=controller, identity=identity,
                             tracer_provider=provider).run(self.trainer)
        finally:
            provider.shutdown()  # flush what the batch exporters still hold

    def stop(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def _check_same_weights(model: torch.nn.Module, source: str | None) -> None:
    """Every rank must start from identical weights (the loss invariant assumes one model):
    compare a float64 checksum of the parameters across the world."""
    import torch.distributed as dist

    with torch.no_grad():  # float64 reductions, no float64 copy of any tensor
        per_tensor = torch.stack([p.sum(dtype=torch.float64) for p in model.parameters()])
        position = torch.arange(1, len(per_tensor) + 1, dtype=torch.float64,
                                device=per_tensor.device)
        sums = torch.stack([per_tensor.sum(), (per_tensor * position).sum()])
    low, high = sums.clone(), sums.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    if not torch.equal(low, high):
        where = f" from {source!r} (is it on storage every rank sees, the same files?)" \
            if source else ""
        raise RuntimeError(f"ranks start from different weights{where}: parameter checksums "
                           f"range {low.tolist()} .. {high.tolist()}")


def _ensure_ray() -> None:
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False)


def _resources(config: GroupConfig) -> tuple[bool, dict]:
    """(use_gpu, actor options) for this cluster."""
    available = ray.cluster_resources()
    use_gpu = config.use_gpu
    if use_gpu is None:
        use_gpu = available.get("GPU", 0) >= config.num_ranks and torch.cuda.is_available()
    if use_gpu:
        return True, {"num_gpus": 1, "num_cpus": 1}
    share = config.cpus_per_rank
    if share is None:
        share = min(1.0, available.get("CPU", 1) / config.num_ranks)
    return False, {"num_cpus": share}


class PlacementError(ValueError):
    """The Ray cluster cannot hold the planner's topology (too few or too small nodes)."""


def _node_placement(config: GroupConfig, options: dict) -> tuple[object, list[dict]]:
    """(placement group or None, per-rank actor options): rank r on planner node
    r // ranks_per_node, one Ray node each, when the Ray cluster has several nodes."""
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    gpn, n = config.ranks_per_node, config.num_ranks
    alive = [node for node in ray.nodes() if node.get("Alive")]
    if gpn is None or len(alive) < 2:
        return None, [{} for _ in range(n)]
    num_nodes = -(-n // gpn)
    if num_nodes > len(alive):
        raise PlacementError(f"the plan puts {n} ranks on {num_nodes} nodes of {gpn} "
                         f"(gpus_per_node); the Ray cluster has {len(alive)} nodes")
    if config.cpus_per_rank is None and "num_gpus" not in options:  # a node's share
        node_cpus = min(node["Resources"].get("CPU", 1.0) for node in alive)
        options["num_cpus"] = min(1.0, node_cpus / min(gpn, n))
    bundle = {"CPU": options["num_cpus"] * min(gpn, n)}
    if "num_gpus" in options:
        bundle["GPU"] = float(options["num_gpus"] * min(gpn, n))
    pg = placement_group([dict(bundle) for _ in range(num_nodes)], strategy="STRICT_SPREAD")
    try:
        ray.get(pg.ready(), timeout=config.start_timeout_s)
    except GetTimeoutError:
        ray.util.remove_placement_group(pg)
        raise PlacementError(f"no {num_nodes} Ray nodes with {bundle} free each for the plan's "
                         f"nodes of {gpn} ranks within {config.start_timeout_s:g} s") from None
    return pg, [{"scheduling_strategy": PlacementGroupSchedulingStrategy(
        pg, placement_group_bundle_index=r // gpn)} for r in range(n)]


class WorkerGroup:
    """One Ray actor per rank, driven together; use as a context manager or call stop()."""

    def __init__(self, config: GroupConfig):
        self.config = config
        self.data_position = BatchPosition()  # next batch of the loop (restored by restore)
        self._broken: WorkerError | None = None
        _ensure_ray()
        self.use_gpu, options = _resources(config)
        if config.env:  # actors start from the raylet's environment, not the driver's
            options["runtime_env"] = {"env_vars": dict(config.env)}
        self._pg, per_rank = _node_placement(config, options)
        actor = ray.remote(RankWorker)
        self.actors = [actor.options(max_restarts=0, **options, **per_rank[r]).remote(
            r, config, self.use_gpu) for r in range(config.num_ranks)]
        try:
            address, port = self._gather([self.actors[0].rendezvous_address.remote()],
                                         config.start_timeout_s, ranks=[0])[0]
            self.pids = self._call("setup", address, port, timeout_s=config.start_timeout_s)
        except BaseException:
            self.stop()
            raise

    # ----------------------------------------------------------------- waiting on ranks
    def _gather(self, refs: Sequence, timeout_s: float, *, ranks: Sequence[int]) -> list:
        """Results in rank order; raises on the first rank to fail, die or time out."""
        where = {ref: r for ref, r in zip(refs, ranks, strict=True)}
        pending, results = list(refs), {}
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=timeout_s)
            if not ready:
                late = sorted(where[p] for p in pending)
                self._fail(WorkerError(late[0], f"ranks {late} did not answer within "
                                                f"{timeout_s} s"))
            ref = ready[0]
            try:
                results[where[ref]] = ray.get(ref, timeout=timeout_s)
            except RayActorError as exc:
                self._fail(WorkerDiedError(where[ref], f"actor died ({exc.__class__.__name__}: "
                                                       f"{str(exc).splitlines()[0]})"))
            except RayTaskError as exc:
                cause = exc.cause if exc.cause is not None else exc
                user = isinstance(cause, RingmasterError)  # bad data or config, not a crash
                text = str(cause) if user else f"{type(cause).__name__}: {cause}"
                self._fail(WorkerError(where[ref], text, user=user))
            except GetTimeoutError:
                self._fail(WorkerError(where[ref], f"no result within {timeout_s} s"))
        return [results[r] for r in ranks]

    def _fail(self, error: WorkerError):
        self._broken = error
        raise error

    def _call(self, method: str, *args, timeout_s: float | None = None,
              per_rank: Callable[[int], tuple] | None = None) -> list:
        """Call `method` on every actor (args, or per_rank(rank)); results in rank order."""
        if self._broken is not None:
            raise WorkerError(self._broken.rank, f"the group is broken by an earlier failure "
                                                 f"({self._broken}); start a new one")
        refs = [getattr(a, method).remote(*(per_rank(r) if per_rank else args))
                for r, a in enumerate(self.actors)]
        return self._gather(refs, timeout_s or self.config.timeout_s,
                            ranks=range(len(self.actors)))

    # ----------------------------------------------------------------- public API
    def _per_rank_inputs(self, plan: StepPlan, samples: Mapping[int, torch.Tensor]):
        if plan.world_size != self.config.num_ranks:
            raise ValueError(f"plan.world_size={plan.world_size} but the group has "
                             f"{self.config.num_ranks} ranks")
        text = plan.model_dump_json()
        subsets = [{i: samples[i] for i in sequence_ids_of_rank(plan, r) if i in samples}
                   for r in range(self.config.num_ranks)]
        return text, subsets

    def run_step(self, plan: StepPlan, samples: Mapping[int, torch.Tensor]) -> list[StepStats]:
        """Forward+backward of `plan` on every rank (no optimizer step); stats per rank."""
        text, subsets = self._per_rank_inputs(plan, samples)
        return self._call("run_step", per_rank=lambda r: (text, subsets[r]))

    def train_step(self, plan: StepPlan, samples: Mapping[int, torch.Tensor], *,
                   next_position: BatchPosition | None = None,
                   batch=None) -> list[TrainStats]:
        """One optimizer step of `plan` on every rank; stats per rank. `samples` are tokens
        or workers.sample.SampleData; `batch` the batch's records (workers.loss.BatchMeta)."""
        text, subsets = self._per_rank_inputs(plan, samples)
        out = self._call("train_step", per_rank=lambda r: (text, subsets[r], next_position,
                                                            batch))
        if next_position is not None:
            self.data_position = next_position
        return out

    def train(self, num_steps: int, plan_source: PlanSource,
              on_step: Callable[[list[TrainStats]], None] | None = None) -> list[list[TrainStats]]:
        """`num_steps` steps from `data_position`; plan_source returns every rank's samples.

        The same loop as workers.train.train: the group is a trainer whose steps run on
        every rank (it has `data_position` and `train_step`).
        """
        from workers.train import train

        return train(self, num_steps=num_steps, plan_source=plan_source, on_step=on_step)

    def run_agents(self, controller: str, job_id: str, attempt: int) -> list:
        """Every rank runs workers.agent.RankAgent against the controller until the job ends.

        Returns each rank's AgentResult; raises WorkerError/WorkerDiedError naming the first
        rank that fails or dies (the others may be blocked in a collective with it).
        """
        return self._call("run_agent", controller, job_id, attempt, timeout_s=1e9)

    def save(self, directory: str | Path) -> Path:
        """DCP checkpoint of every rank into `directory` (shared storage across nodes)."""
        return Path(self._call("save", str(directory))[0])

    def restore(self, directory: str | Path) -> int:
        """Restore every rank from `directory`; returns the restored step."""
        step, position = self._call("restore", str(directory))[0]
        self.data_position = position
        return step

    def state(self, what: str = "params") -> list[dict[str, torch.Tensor]]:
        """Every rank's parameters or gradients (CPU copies), for checks and export."""
        return self._call("state", what)

    def node_ids(self) -> list[str]:
        """The Ray node of every rank, in rank order."""
        return self._call("node_id", timeout_s=self.config.start_timeout_s)

    def stop(self) -> None:
        """Leave the process group where possible, then end every actor. Idempotent."""
        actors, self.actors = getattr(self, "actors", []), []
        if actors and self._broken is None:
            refs = [a.stop.remote() for a in actors]
            ray.wait(refs, num_returns=len(refs), timeout=10)
        for a in actors:
            ray.kill(a, no_restart=True)
        pg, self._pg = getattr(self, "_pg", None), None
        if pg is not None:
            ray.util.remove_placement_group(pg)

    def __enter__(self) -> WorkerGroup:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
