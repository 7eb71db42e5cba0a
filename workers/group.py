"""The Ray worker group: one actor per rank, one global process group, steps driven by plans.

`WorkerGroup` starts `num_ranks` `RankWorker` actors (`num_gpus=1` each on GPU clusters, a
CPU share otherwise), hosts the attempt's TCPStore (the rendezvous of every world, one
prefix per world epoch, so it outlives any rank), has them form world 0 (one
torch.distributed group, NCCL on CUDA, gloo on CPU) and build the same model on every
rank, and then runs steps: the driver sends each actor the plan and only the samples its
micro-batches hold, and every actor runs `Trainer.train_step` (or `run_step`). Save/restore
call the DCP checkpoint on all ranks.

Failure handling: every call waits on all ranks with `ray.wait`, so the first rank that
raises or dies is reported at once (`WorkerError` / `WorkerDiedError` naming the rank)
instead of waiting for the others, which may be blocked in a collective with it until the
process-group timeout. A failed group is broken: `stop()` kills the actors. With
`GroupConfig.elastic` it is not: the survivors' calls are collected too (they fail within
the process-group timeout, or at once when their peer's process is gone), `regroup()`
forms a world of the survivors (workers.elastic: the interrupted step is finished or
dropped everywhere, the optimizer resharded) and `rejoin()` one with the slots whose actors
Ray restarted. Ray itself is the caller's: `ray.init()` before (`RAY_ADDRESS` selects a
cluster); `WorkerGroup` starts a local Ray only when none is running.

Placement follows the planner's topology: with `ranks_per_node` (the job cluster's
`gpus_per_node`) and a Ray cluster of more than one node, rank r runs on planner node
r // ranks_per_node, each planner node one Ray node (one placement group, a bundle per
node, STRICT_SPREAD), so a ring the planner kept inside a node is inside one machine.

Used by `python -m workers.driver` (the job entrypoint), whose ranks form their worlds as
the controller says (`form_world=False`); `train(num_steps, plan_source)` runs the loop
from the driver with any PlanSource (the controller's plan stream, or
workers.data.DatasetPlanSource for local runs).
"""

from __future__ import annotations

import datetime
import os
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import ray
import torch
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from scheduler.batching import BatchPosition
from scheduler.errors import RingmasterError
from scheduler.plan import StepPlan
from scheduler.specs import ModelSpec
from workers.data import sequence_ids_of_rank
from workers.loss import BatchMeta
from workers.sample import SampleData
from workers.step import StepStats
from workers.train import PlanSource, TrainConfig, Trainer, TrainStats

if TYPE_CHECKING:  # workers.elastic loads when a world forms (on the ranks)
    from workers.elastic import ElasticRank, JoinReport, RankStatus, World

__all__ = ["GroupConfig", "PlacementError", "RankWorker", "WorkerDiedError", "WorkerError",
           "WorkerGroup", "worker_error"]


class WorkerError(RuntimeError):
    """A rank raised during a group call; `rank` says which. `user`: the cause is the
    job's data or config (a RingmasterError: retrying cannot help); `detail` is the cause
    without the rank."""

    def __init__(self, rank: int, message: str, *, user: bool = False):
        super().__init__(f"rank {rank}: {message}")
        self.rank, self.detail, self.user = rank, message, user


class WorkerDiedError(WorkerError):
    """A rank's actor (process) died; `ranks` lists every slot found dead by the call."""

    def __init__(self, rank: int, message: str, ranks: Sequence[int] = ()):
        super().__init__(rank, message)
        self.ranks = tuple(ranks) or (rank,)


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
    # Lost ranks cost a world change, not the group (workers.elastic): Ray restarts a dead
    # actor up to this many times per slot (0: a death breaks the group, as without).
    max_actor_restarts: int = 0

    @property
    def elastic(self) -> bool:
        return self.max_actor_restarts > 0

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
        if self.max_actor_restarts < 0:
            raise ValueError(f"max_actor_restarts={self.max_actor_restarts} must be >= 0")
        num_tensors = len(self.model.parameter_numels())
        if self.train.optimizer_sharding == "zero1" and num_tensors < self.num_ranks:
            raise ValueError(f"optimizer_sharding='zero1' needs a parameter tensor per rank, "
                             f"but the model has {num_tensors} for num_ranks={self.num_ranks};"
                             " use 'distributed' or 'none'")


class RankWorker:
    """One slot: its worlds' process groups, model and trainer (the Ray actor's body).
    `store_address` is the attempt's TCPStore (WorkerGroup hosts it); without it the worker
    only builds models (tests)."""

    def __init__(self, rank: int, config: GroupConfig, use_gpu: bool,
                 store_address: tuple[str, int] | None = None):
        self.rank, self.config, self.use_gpu = rank, config, use_gpu
        self.store_address = store_address
        self.elastic: ElasticRank | None = None  # once the first world forms
        self.job_id, self.attempt = "", 1  # the job this slot serves (fault drills)
        if use_gpu:
            torch.cuda.set_device(0)  # Ray exposes exactly this actor's GPU
        else:
            torch.set_num_threads(config.torch_threads)

    @property
    def trainer(self) -> Trainer:
        """This slot's trainer (a world has formed here)."""
        return self._joined()[0]

    def _joined(self) -> tuple[Trainer, World]:
        if self.elastic is None:
            raise WorkerError(self.rank, "no world has formed on this slot (join first)")
        return self.elastic.joined()

    @property
    def life(self) -> int:
        """1 for this slot's first process, 2 once Ray restarted it (fault drills)."""
        with warnings.catch_warnings():  # Ray's property reads a deprecated one of its own
            warnings.simplefilter("ignore")
            return 2 if ray.get_runtime_context().was_current_actor_reconstructed else 1

    def pid(self) -> int:
        return os.getpid()

    def node_id(self) -> str:
        """The Ray node this rank runs on."""
        return ray.get_runtime_context().get_node_id()

    def elastic_rank(self) -> ElasticRank:
        """This slot's workers.elastic.ElasticRank (connects to the attempt's store)."""
        import torch.distributed as dist

        from workers.elastic import ElasticRank

        if self.elastic is None:
            if self.store_address is None:
                raise WorkerError(self.rank, "this RankWorker has no attempt store (its "
                                             "WorkerGroup passes store_address): no worlds")
            host, port = self.store_address
            store = dist.TCPStore(host, port, is_master=False, timeout=datetime.timedelta(
                seconds=self.config.start_timeout_s))
            self.elastic = ElasticRank(slot=self.rank, store=store,
                                       backend="nccl" if self.use_gpu else "gloo",
                                       timeout_s=self.config.timeout_s,
                                       make_trainer=self._make_trainer,
                                       on_statuses=self._join_fault)
        return self.elastic

    def _join_fault(self, world: World, statuses: list[RankStatus]) -> None:
        """RINGMASTER_FAULT `at=join`: die in the middle of forming a world a replacement
        joins (after the process group formed, before the state moved)."""
        from workers.faults import fault_at, perform

        assert self.elastic is not None, "called by self.elastic's join"
        if self.elastic.live is not None and any(s.live is None for s in statuses):
            perform(fault_at(job_id=self.job_id, attempt=self.attempt, slot=self.rank,
                             step=None, life=self.life, at="join"))

    def _make_trainer(self, *, fresh: bool) -> Trainer:
        """This slot's trainer: everyone's at the start of an attempt (`fresh`), or a
        joiner's, whose weights and optimizer state the others then send."""
        import torch.distributed as dist

        from workers.train import build_model

        device = "cuda" if self.use_gpu else "cpu"
        # Resolved for the job's full world: a smaller world keeps the job's settings.
        train = self.config.train.resolve(device_type=device, world_size=self.config.num_ranks)
        assert train.precision is not None, "resolve() decides the precision"
        if fresh:
            model = self._initial_model(train.precision, device)
        else:
            model = build_model(self.config.model, train.precision, device=device)
            model.source_dir = self.config.model_dir
        return Trainer(model, train, rank=dist.get_rank())

    def _initial_model(self, precision: str, device: str):
        """The same weights on every rank, in the precision's compute dtype: each rank loads
        the shared directory (workers.hf says why), or draws the same random init; checked
        with one all-reduce."""
        from scheduler.model_states import compute_dtype
        from workers.hf import load_pretrained
        from workers.train import build_model

        cfg = self.config
        if cfg.model_init == "pretrained":
            assert cfg.model_dir is not None, "GroupConfig: pretrained needs model_dir"
            model = load_pretrained(cfg.model_dir, spec=cfg.model,
                                    dtype=compute_dtype(precision), device=device)
        else:
            torch.manual_seed(cfg.seed)
            model = build_model(cfg.model, precision, device=device)
            model.source_dir = cfg.model_dir
        _check_same_weights(model, cfg.model_dir)
        return model

    def join(self, world: World, checkpoint: str | None = None) -> JoinReport:
        """Form `world` (workers.elastic.World) with the other members; a JoinReport."""
        return self.elastic_rank().join(world, checkpoint=checkpoint)

    def run_step(self, plan_json: str, samples: Mapping[int, torch.Tensor]) -> StepStats:
        from workers.step import run_step

        plan = StepPlan.model_validate_json(plan_json)
        return run_step(self.trainer.model, plan, samples, rank=self.trainer.rank)

    def train_step(self, plan_json: str, samples: Mapping[int, torch.Tensor | SampleData],
                   next_position: BatchPosition | None,
                   batch: BatchMeta | None = None) -> TrainStats:
        from workers.faults import fault_at, perform, ring_victim

        plan = StepPlan.model_validate_json(plan_json)
        trainer, world = self._joined()
        victim = ring_victim(plan)
        fault = fault_at(job_id=self.job_id, attempt=self.attempt, slot=self.rank,
                         step=trainer.step, life=self.life,
                         ring_slot=world.members[victim] if victim is not None else None,
                         world=world.epoch)
        from workers.elastic import comm_failure

        handle = perform(fault, trainer, plan, trainer.rank)
        out: list[TrainStats] = []
        try:
            error = comm_failure(lambda: out.append(trainer.train_step(
                plan, samples, next_position=next_position, batch=batch)))
        finally:
            if handle is not None:
                handle.remove()
        if error:  # (outside the except block: its traceback holds the process group)
            if self.config.elastic and self.elastic is not None:
                self.elastic.abandon()  # peers blocked on this rank fail now
            raise RuntimeError(error)
        return out[0]

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
        """Serve the controller's plan stream as this slot until the job ends (agent mode)."""
        from scheduler.telemetry import make_tracer_provider
        from workers.agent import RankAgent
        from workers.controller_client import WorkerIdentity

        identity = WorkerIdentity(job_id=job_id, attempt=attempt, rank=self.rank)
        self.job_id, self.attempt = job_id, attempt
        provider = make_tracer_provider(default_service_name="ringmaster-worker")
        try:
            agent = RankAgent(controller=controller, identity=identity,
                              tracer_provider=provider, life=self.life)
            result = agent.run(self.elastic_rank())
            if result.fenced:  # a later run_agent joins afresh as a replacement
                self._reset()
            return result
        finally:
            provider.shutdown()  # flush what the batch exporters still hold

    def _reset(self) -> None:
        from workers.elastic import leave_process_group

        leave_process_group("nccl" if self.use_gpu else "gloo")
        self.elastic = None

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


def host_store(timeout_s: float):
    """The attempt's rendezvous store, served from this process: (store, (host, port))."""
    import torch.distributed as dist

    store = dist.TCPStore("0.0.0.0", 0, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=timeout_s))
    return store, (ray.util.get_node_ip_address(), store.port)


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

    def __init__(self, config: GroupConfig, *, form_world: bool = True):
        self.config = config
        self.data_position = BatchPosition()  # next batch of the loop (restored by restore)
        self._broken: WorkerError | None = None
        self.lost: set[int] = set()  # slots lost since the current world formed
        self._world: World | None = None  # the last formed world
        self.joins: list[JoinReport] = []  # of the last formed world, by rank
        self._epochs = 0  # the next world's epoch
        _ensure_ray()
        self.use_gpu, options = _resources(config)
        env = _rank_env(config, self.use_gpu)
        if env:  # actors start from the raylet's environment, not the driver's
            options["runtime_env"] = {"env_vars": env}
        self._pg, per_rank = _node_placement(config, options)
        self.store, self.store_address = host_store(config.start_timeout_s)
        actor = ray.remote(RankWorker)
        self.actors = [actor.options(max_restarts=config.max_actor_restarts, max_task_retries=0,
                                     **options, **per_rank[r]).remote(
            r, config, self.use_gpu, self.store_address) for r in range(config.num_ranks)]
        try:
            self.pids = self._call_slots(range(config.num_ranks), "pid",
                                         timeout_s=config.start_timeout_s)
            if form_world:
                self.form(range(config.num_ranks))
        except BaseException:
            self.stop()
            raise

    # ----------------------------------------------------------------- waiting on ranks
    def _gather(self, refs: Sequence, timeout_s: float, *, ranks: Sequence[int]) -> list:
        """Results in rank order; raises on the first rank to fail, die or time out.

        Elastic groups wait for every rank first (each either answers, or fails within the
        process-group timeout), so that every dead slot is known (`lost`)."""
        where = {ref: r for ref, r in zip(refs, ranks, strict=True)}
        pending, results, errors = list(refs), {}, []
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=timeout_s)
            if not ready:
                late = sorted(where[p] for p in pending)
                errors.append(WorkerError(late[0], f"ranks {late} did not answer within "
                                                   f"{timeout_s} s"))
                break
            try:
                results[where[ready[0]]] = ray.get(ready[0], timeout=timeout_s)
            except (RayActorError, RayTaskError, GetTimeoutError) as exc:
                errors.append(worker_error(where[ready[0]], exc, timeout_s))
                if not self.config.elastic:
                    break
        if errors:
            self._fail(errors)
        return [results[r] for r in ranks]

    def _fail(self, errors: list[WorkerError]):
        dead = [e.rank for e in errors if isinstance(e, WorkerDiedError)]
        first = next((e for e in errors if isinstance(e, WorkerDiedError)), errors[0])
        if dead:
            first = WorkerDiedError(first.rank, first.detail, ranks=dead)
        if self.config.elastic and dead:
            self.lost |= set(dead)
        else:
            self._broken = first
        raise first

    def _call_slots(self, slots: Sequence[int], method: str, *args,
                    timeout_s: float | None = None,
                    per_rank: Callable[[int], tuple] | None = None) -> list:
        """Call `method` on the actors of `slots` (args, or per_rank(i)); results in order."""
        if self._broken is not None:
            raise WorkerError(self._broken.rank, f"the group is broken by an earlier failure "
                                                 f"({self._broken}); start a new one")
        slots = list(slots)
        refs = [self._remote(s, method, *(per_rank(i) if per_rank else args))
                for i, s in enumerate(slots)]
        return self._gather(refs, timeout_s or self.config.timeout_s, ranks=slots)

    def _remote(self, slot: int, method: str, *args):
        """Start RankWorker.`method` on the actor of `slot`; its ObjectRef."""
        return getattr(self.actors[slot], method).remote(*args)

    def _call(self, method: str, *args, timeout_s: float | None = None,
              per_rank: Callable[[int], tuple] | None = None) -> list:
        """Call `method` on every member of the current world, in rank order."""
        if self.lost:
            raise WorkerError(min(self.lost), f"slots {sorted(self.lost)} were lost: "
                                              "regroup() first")
        return self._call_slots(self.world.members, method, *args, timeout_s=timeout_s,
                                per_rank=per_rank)

    @property
    def world(self) -> World:
        """The last formed world (workers.elastic.World)."""
        if self._world is None:
            raise WorkerError(-1, "no world has formed yet: form() first")
        return self._world

    # ----------------------------------------------------------------- worlds
    def form(self, slots: Sequence[int], *, checkpoint: str | Path | None = None
             ) -> list[JoinReport]:
        """Form a new world of `slots` (workers.elastic); every member's JoinReport."""
        from workers.elastic import World

        epoch, self._epochs = self._epochs, self._epochs + 1  # a failed world used one too
        world = World(epoch=epoch, members=tuple(sorted(slots)), store_prefix=f"epoch{epoch}")
        self.lost -= set(world.members)
        reports = self._call_slots(world.members, "join", world,
                                   str(checkpoint) if checkpoint else None,
                                   timeout_s=self.config.start_timeout_s + self.config.timeout_s)
        self._world, self.joins, self.lost = world, reports, set()
        self.data_position = _position_after(reports, self.data_position)
        return reports

    def regroup(self) -> list[JoinReport]:
        """A world of the survivors after WorkerDiedError (elastic groups only)."""
        if not self.config.elastic:
            raise WorkerError(-1, "regroup() needs GroupConfig.max_actor_restarts > 0")
        return self.form([s for s in self.world.members if s not in self.lost])

    def rejoin(self, slots: Sequence[int] | None = None) -> list[JoinReport]:
        """A world with the slots whose actors Ray restarted (default: every missing one)."""
        missing = [s for s in range(self.config.num_ranks) if s not in self.world.members]
        slots = missing if slots is None else list(slots)
        for s in slots:
            self._wait_restarted(s)
        return self.form([*self.world.members, *slots])

    def _wait_restarted(self, slot: int) -> None:
        """Block until Ray has restarted the actor of `slot` (WorkerDiedError if it won't)."""
        deadline = time.monotonic() + self.config.start_timeout_s
        while True:
            try:
                ray.get(self._remote(slot, "pid"), timeout=self.config.start_timeout_s)
                return
            except RayActorError as exc:  # restarting (ActorUnavailableError), or dead
                if time.monotonic() > deadline or "restarting" not in str(exc).lower():
                    raise WorkerDiedError(slot, f"actor was not restarted ({exc})") from None
                time.sleep(0.2)

    # ----------------------------------------------------------------- public API
    def _per_rank_inputs(self, plan: StepPlan,
                         samples: Mapping[int, torch.Tensor | SampleData]):
        if plan.world_size != self.world.size:
            raise ValueError(f"plan.world_size={plan.world_size} but the group's world has "
                             f"{self.world.size} ranks")
        text = plan.model_dump_json()
        subsets = [{i: samples[i] for i in sequence_ids_of_rank(plan, r) if i in samples}
                   for r in range(self.world.size)]
        return text, subsets

    def run_step(self, plan: StepPlan, samples: Mapping[int, torch.Tensor]) -> list[StepStats]:
        """Forward+backward of `plan` on every rank (no optimizer step); stats per rank."""
        text, subsets = self._per_rank_inputs(plan, samples)
        return self._call("run_step", per_rank=lambda r: (text, subsets[r]))

    def train_step(self, plan: StepPlan, samples: Mapping[int, torch.Tensor | SampleData], *,
                   next_position: BatchPosition | None = None,
                   batch: BatchMeta | None = None) -> list[TrainStats]:
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

        The loop of workers.train.train (workers.train.run_steps): the group is a
        workers.train.Stepper whose steps run on every rank.
        """
        from workers.train import run_steps

        return run_steps(self, num_steps=num_steps, plan_source=plan_source, on_step=on_step)

    def run_agents(self, controller: str, job_id: str, attempt: int) -> list:
        """Every rank runs workers.agent.RankAgent against the controller until the job ends.

        Returns each rank's AgentResult; raises WorkerError/WorkerDiedError naming the first
        rank that fails or dies (the others may be blocked in a collective with it).
        """
        return self._call_slots(range(self.config.num_ranks), "run_agent", controller, job_id,
                                attempt, timeout_s=1e9)

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
        return self._call_slots(range(self.config.num_ranks), "node_id",
                                timeout_s=self.config.start_timeout_s)

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


def _rank_env(config: GroupConfig, use_gpu: bool) -> dict[str, str]:
    """The ranks' environment: the config's, and on NCCL in an elastic group the watchdog
    set to abort a timed-out communicator and raise (2, CleanUpOnly) instead of its
    default, which ends the process: a survivor blocked on a lost peer must live on to
    form the next world (docs/elastic.md). A value the config sets wins."""
    env = dict(config.env)
    if use_gpu and config.elastic:
        env.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "2")
    return env


def worker_error(rank: int, exc: Exception, timeout_s: float = 0.0) -> WorkerError:
    """The WorkerError of a failed Ray call to `rank`'s actor: died, raised (a
    RingmasterError is the job's data or config: `user`), or timed out."""
    if isinstance(exc, RayActorError):
        return WorkerDiedError(rank, f"actor died ({exc.__class__.__name__}: "
                                     f"{str(exc).splitlines()[0]})")
    if isinstance(exc, RayTaskError):
        cause = exc.cause if exc.cause is not None else exc
        user = isinstance(cause, RingmasterError)  # bad data or config, not a crash
        text = str(cause) if user else f"{type(cause).__name__}: {cause}"
        return WorkerError(rank, text, user=user)
    return WorkerError(rank, f"no result within {timeout_s} s")


def _position_after(reports: list, position: BatchPosition) -> BatchPosition:
    """The data position a formed world continues from (a finished step moves it)."""
    done = next((r.finished for r in reports if r.finished is not None), None)
    if done is not None and done.next_position is not None:
        return BatchPosition(epoch=done.next_position[0], index=done.next_position[1])
    return position
