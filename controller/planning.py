"""Plans ahead: while step t trains, steps t+1 and t+2 are planned in another process.

Planning (CP-SAT under a time budget) is CPU-heavy; running it in the API's process would
stall REST and gRPC. `PlanPipeline` owns one job attempt's plan stream: it forms the
global batches from the dataset's lengths (deterministic for the job's seed, so step s
always gets the same batch, also after a restart), submits `plan_batch` for the next
`depth` steps to a planner process pool, and feeds measured group times back into the cost
model (`CostModel.update`), whose coefficients travel with every later planning request,
so predictions converge to what the workers measure. Each rank's own micro-batch times
feed a `SpeedEstimator` (scheduler/speeds.py): its per-rank speeds travel with the
coefficients, so a slow rank gets proportionally less work from the next plans on; the
refit sees every group's time scaled to the reference rank (times its slowest member's
speed), so one slow rank does not make the model slow for everyone.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context

import numpy as np

from controller.spec import JobCreate
from scheduler.batching import BatchPosition, epoch_batches
from scheduler.cost import CostModel, Observation
from scheduler.dataset import read_structure
from scheduler.dataset_meta import DatasetStructure
from scheduler.plan import StepPlan
from scheduler.specs import ClusterSpec
from scheduler.speeds import SpeedEstimator

MIN_OBSERVATIONS = 3  # a, b and c need three distinct profiles
MAX_OBSERVATIONS = 512  # a sliding window: the newest measurements win
# The attempt's first step is a warm-up (allocator, caches, kernel selection, the first
# collective): its times say little about the steps that follow and are not used.
WARMUP_STEPS = 1


@dataclass(frozen=True, kw_only=True)
class PlannedStep:
    """One step's plan and where its batch came from."""

    step: int  # 0-based optimizer step
    plan: StepPlan
    sample_ids: list[int]  # dataset sample of each plan id
    next_position: BatchPosition  # data position after this batch
    planning_s: float  # wall time the planner process spent


PARENT_POLL_S = 1.0  # how often the planner process checks that the controller lives


def make_planner_pool() -> ProcessPoolExecutor:
    """One planner process (spawned: forking a threaded server is unsafe).

    The process exits by itself when the controller dies: its task queue holds both pipe
    ends, so a SIGKILLed controller would otherwise leave it (and multiprocessing's
    resource tracker) running forever.
    """
    return ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn"),
                               initializer=exit_with_parent, initargs=(os.getpid(),))


def exit_with_parent(parent_pid: int) -> None:
    """Pool initializer: a daemon thread ends this process once `parent_pid` is gone."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(PARENT_POLL_S)
        os._exit(0)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def job_memory_settings(spec: JobCreate) -> tuple[str, str]:
    """(precision, optimizer_sharding) the job's workers train with (the spec's, or their
    defaults: fp32 on the cpu preset, bf16-mixed elsewhere; distributed on > 1 rank), so
    the planner's memory model holds the same model states as the workers."""
    return spec.resolve_precision(), spec.resolve_optimizer_sharding()


def job_cost_model(spec: JobCreate, cluster: ClusterSpec | None = None) -> CostModel:
    """The cost and memory model of a job (its model, cluster, precision and sharding);
    `cluster` replaces the spec's (an elastic world of fewer ranks: cluster_of_size)."""
    precision, sharding = job_memory_settings(spec)
    return CostModel(spec.resolve_model(), cluster or spec.resolve_cluster(),
                     precision=precision, optimizer_sharding=sharding,
                     objective=spec.objective.type, shard_mirror=spec.resolve_shard_mirror())


def check_job_fits(spec: JobCreate) -> None:
    """Refuse a job whose model states alone do not fit one device (DeviceMemoryError,
    naming the bytes needed and available): before it is stored or anything starts."""
    job_cost_model(spec).memory.check_states_fit()


def cluster_of_size(cluster: ClusterSpec, world_size: int) -> ClusterSpec:
    """The job's cluster with `world_size` ranks (an elastic world short of some ranks).

    The survivors' real topology is irregular; the planner sees whole nodes of the largest
    size that divides the world and is at most the cluster's ranks per node."""
    if world_size == cluster.world_size:
        return cluster
    per_node = max(d for d in range(1, min(cluster.gpus_per_node, world_size) + 1)
                   if world_size % d == 0)
    return cluster.model_copy(update={"num_nodes": world_size // per_node,
                                      "gpus_per_node": per_node})


def plan_in_process(lengths: list[int], spec_json: str, coefficients: tuple | None,
                    seed: int, pairs: list[tuple[int, int]] | None = None,
                    speeds: tuple[float, ...] | None = None,
                    world_size: int | None = None) -> tuple[str, float]:
    """Runs in the planner process: plan one batch (its DPO `pairs` kept in one group
    each), return (plan JSON, seconds). `coefficients` (a, b, c) and `speeds` (one per
    rank) are what the pipeline measured; None: the model's own figures and the
    cluster's nominal speeds. `world_size` plans for fewer (or more) ranks than the job's
    (elastic worlds)."""
    from scheduler.planner import plan_batch

    spec = JobCreate.model_validate_json(spec_json)
    model, cluster = spec.resolve_model(), spec.resolve_cluster()
    if world_size is not None:
        cluster = cluster_of_size(cluster, world_size)
    cost = job_cost_model(spec, cluster)
    if coefficients is not None:
        cost.a, cost.b, cost.c = coefficients
    t0 = time.perf_counter()
    plan = plan_batch(lengths, cluster, model, policy=spec.planner.policy,
                      capacity_tokens=spec.resources.capacity_tokens,
                      time_limit_s=spec.planner.time_limit_s, seed=seed, cost=cost,
                      pairs=pairs, speeds=speeds)
    return plan.model_dump_json(), time.perf_counter() - t0


def _refit(cost: CostModel, observations: list[Observation]) -> bool:
    """Refit `cost` on `observations` (prior shape kept unless clearly beaten); False while
    there are too few or too alike to fit."""
    if len(observations) < MIN_OBSERVATIONS:
        return False
    try:
        cost.update(observations, keep_prior_shape=True)
    except ValueError:
        return False  # not yet three distinct profiles
    return True


class BatchSchedule:
    """Step -> (sample ids, next position): a pure function of the job's data settings."""

    def __init__(self, lengths: np.ndarray, *, tokens_per_batch: int, seed: int,
                 units: np.ndarray | None = None, structure: DatasetStructure | None = None):
        self.lengths = lengths
        self.tokens_per_batch = tokens_per_batch
        self.seed = seed
        self.units = units  # DPO pairs move as one (scheduler.dataset.read_units)
        self.structure = structure  # the records, for each batch's DPO pairs
        self._epochs: dict[int, list[np.ndarray]] = {}

    def _epoch(self, epoch: int) -> list[np.ndarray]:
        if epoch not in self._epochs:
            self._epochs[epoch] = epoch_batches(
                self.lengths, tokens_per_batch=self.tokens_per_batch, seed=self.seed, epoch=epoch,
                units=self.units)
        return self._epochs[epoch]

    def batch(self, step: int) -> tuple[np.ndarray, BatchPosition]:
        epoch, index = 0, step
        while index >= len(self._epoch(epoch)):
            index -= len(self._epoch(epoch))
            epoch += 1
        nxt = (epoch, index + 1) if index + 1 < len(self._epoch(epoch)) else (epoch + 1, 0)
        return self._epoch(epoch)[index], BatchPosition(epoch=nxt[0], index=nxt[1])

    def pairs(self, sample_ids: np.ndarray) -> list[tuple[int, int]] | None:
        """The batch's DPO pairs as plan ids (None without pairs in the dataset)."""
        if self.units is None or self.structure is None:
            return None
        return self.structure.batch_pairs(sample_ids) or None


class PlanPipeline:
    """Plans of one job attempt, `depth` steps ahead of the slowest consumer."""

    def __init__(self, spec: JobCreate, executor: Executor, *, depth: int = 2,
                 lengths: np.ndarray | None = None, world_size: int | None = None):
        self.spec = spec
        self.world_size = world_size or spec.resources.num_ranks  # ranks the plans are for
        self._spec_json = spec.model_dump_json()
        self.executor = executor
        self.depth = depth
        structure: DatasetStructure | None = None  # read when no lengths are given
        units: np.ndarray | None = None
        if lengths is None:
            structure = read_structure(spec.dataset.path)
            lengths, units = structure.lengths, structure.units()
        self.schedule = BatchSchedule(lengths, tokens_per_batch=spec.training.global_batch_tokens,
                                      seed=spec.training.seed, units=units, structure=structure)
        self._cost = job_cost_model(spec, self.cluster)
        self._coefficients: tuple | None = None
        self._observations: list[Observation] = []
        self._estimator = SpeedEstimator(self.cluster)
        self._busy_cost = job_cost_model(spec, self.cluster)  # the ranks' busy time
        self._busy_observations: list[Observation] = []
        self._speeds: tuple[float, ...] | None = None  # None: the cluster's nominal speeds
        self._observe_lock = threading.Lock()
        self._steps_seen = 0
        self._futures: dict[int, tuple[Future, np.ndarray, BatchPosition]] = {}
        self._taken: dict[int, tuple[Future, np.ndarray, BatchPosition]] = {}  # being got
        self._done: dict[int, PlannedStep] = {}
        self._lock = threading.Lock()

    def _submit(self, step: int) -> None:
        if step in self._futures or step in self._taken or step in self._done \
                or step >= self.spec.training.steps:
            return
        ids, nxt = self.schedule.batch(step)
        lengths = [int(x) for x in self.schedule.lengths[ids]]
        fut = self.executor.submit(plan_in_process, lengths, self._spec_json,
                                   self._coefficients, self.spec.training.seed + step,
                                   self.schedule.pairs(ids), self._speeds, self.world_size)
        self._futures[step] = (fut, ids, nxt)

    def prefetch(self, step: int) -> None:
        """Make sure steps step..step+depth are being planned."""
        with self._lock:
            for s in range(step, step + self.depth + 1):
                self._submit(s)

    def get(self, step: int, timeout_s: float | None = None) -> PlannedStep:
        """The plan of `step` (blocks while it is computed); plans the next ones meanwhile."""
        self.prefetch(step)
        with self._lock:
            if step in self._done:
                return self._done[step]
            if step in self._futures:  # handed out from now on: no longer replanned
                self._taken[step] = self._futures.pop(step)
            fut, ids, nxt = self._taken[step]
        plan_json, seconds = fut.result(timeout=timeout_s)
        planned = PlannedStep(step=step, plan=StepPlan.model_validate_json(plan_json),
                              sample_ids=[int(i) for i in ids], next_position=nxt,
                              planning_s=seconds)
        with self._lock:
            self._taken.pop(step, None)
            self._done[step] = planned
            for old in [s for s in self._done if s < step - 2 * self.depth]:
                del self._done[old]
        return planned

    def observe(self, plan: StepPlan, group_seconds: dict[tuple[int, int], float],
                rank_seconds: dict[int, list[float]] | None = None) -> None:
        """Measured seconds of each (micro_batch, group index) of `plan` refit the model;
        each rank's own micro-batch times (`rank_seconds[r]`, in the order of
        `plan.micro_batches_of(r)`) re-estimate the rank speeds. The attempt's first
        WARMUP_STEPS steps are skipped."""
        with self._observe_lock:  # two steps' last reports may arrive at once
            self._steps_seen += 1
            if self._steps_seen > WARMUP_STEPS:
                self._observe(plan, group_seconds, rank_seconds)

    def _observe(self, plan: StepPlan, group_seconds: dict[tuple[int, int], float],
                 rank_seconds: dict[int, list[float]] | None) -> None:
        speeds = self._estimator.speeds
        for (m, gi), seconds in group_seconds.items():
            g = plan.micro_batches[m].groups[gi]
            at = float(speeds[[r for r in g.ranks if r < speeds.size]].min())
            self._observations.append(Observation(
                lengths=tuple(s.length for s in g.sequences), ring_size=len(g.ranks),
                seconds=seconds * at))  # what the reference rank would have taken
        self._observations = self._observations[-MAX_OBSERVATIONS:]
        if _refit(self._cost, self._observations):
            self._coefficients = (self._cost.a, self._cost.b, self._cost.c)
        if rank_seconds:
            self._observe_speeds(plan, rank_seconds, speeds)

    def _observe_speeds(self, plan: StepPlan, rank_seconds: dict[int, list[float]],
                        speeds: np.ndarray) -> None:
        """Speeds are estimated against a model of the ranks' own busy times (their clock:
        on a CPU box, CPU time, not wall), refit here at the reference speed."""
        index = plan.by_rank()
        for rank, times in rank_seconds.items():
            if not 0 <= rank < speeds.size:
                continue
            for (_, g), seconds in zip(index.get(rank, ()), times, strict=False):
                if seconds > 0:
                    self._busy_observations.append(Observation(
                        lengths=tuple(s.length for s in g.sequences), ring_size=g.ring_size,
                        seconds=seconds * float(speeds[rank])))
        self._busy_observations = self._busy_observations[-MAX_OBSERVATIONS:]
        _refit(self._busy_cost, self._busy_observations)
        self._estimator.observe(plan, rank_seconds)
        new = self._estimator.update(self._busy_cost)
        estimate = None if np.array_equal(new, self._estimator.nominal) else \
            tuple(float(x) for x in new)
        with self._lock:
            if estimate != self._speeds:
                self._speeds = estimate
                self._replan_pending()

    def _replan_pending(self) -> None:
        """New speeds: the steps planned ahead but not yet handed out are planned again for
        them (a straggler found now gets less work in the next step, not `depth` steps
        later). A superseded plan still being computed is cancelled where the executor
        can, or left to finish unused. Caller holds `_lock`."""
        for step, (fut, _, _) in list(self._futures.items()):
            fut.cancel()
            del self._futures[step]
            self._submit(step)

    @property
    def rank_speeds(self) -> tuple[float, ...]:
        """Each rank's estimated speed relative to the cost model's reference rank (what
        the next plans are made for)."""
        return tuple(float(x) for x in self._estimator.speeds)

    @property
    def cluster(self) -> ClusterSpec:
        return cluster_of_size(self.spec.resolve_cluster(), self.world_size)

    def predict_s(self, plan: StepPlan) -> float:
        """Step time the current (refitted) model predicts for `plan`."""
        from scheduler import simulate

        return simulate(plan, self.cluster, self.spec.resolve_model(),
                        cost=self._cost).makespan_s
