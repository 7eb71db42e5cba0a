"""Per-rank speed from measured micro-batch times: which ranks are slower than the model says.

Every rank reports the wall time of each micro-batch it ran. The cost model predicts the
time of that group on the reference rank (`scheduler.simulator.group_seconds`), so one
micro-batch gives a sample of the rank's effective speed, predicted / measured. A packed
group is one rank's own sample. A ring runs at its slowest member's speed, so a ring's
sample only says that *some* member is that slow; it is counted for a member that has no
packed samples of its own and whom no other member's estimate already explains.

Robust and bounded (a noisy step must not swing the plan):
- each sample is first divided by the (upper) median over the ranks of their packed
  samples of the same step: what loads the whole machine in that step (a busy host, a
  neighbour's job) slows every rank alike and cancels out;
- per rank, the median of its last `window` samples, divided by the rank's nominal speed
  (node pools: `ClusterSpec.rank_speeds`), is its *correction*;
- corrections are normalised by their (upper) median over the ranks, so the typical rank
  is 1 and the cost model's refit (`CostModel.update`) absorbs what every rank shares (a
  model that is off by a constant factor everywhere makes nobody a straggler);
- each update moves a correction by at most a factor `max_step`, within
  [MIN_SPEED, MAX_SPEED]; a rank with fewer than `min_samples` samples keeps 1;
- corrections come out on a grid of `quantum` (so measurement noise does not change the
  plan from step to step, and the balance scheduler sees few speed classes).

The speed the planner gets is nominal x correction (`speeds`). Torch-free; runs in the
controller's process, one estimator per job attempt; not thread-safe (its owner locks).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from scheduler.cost import CostModel
from scheduler.plan import RingGroup, StepPlan
from scheduler.simulator import group_seconds
from scheduler.specs import ClusterSpec
from scheduler.topology import Topology

MIN_SPEED = 0.05  # a rank 20x slower than the rest is clamped here (and named by hangs)
MAX_SPEED = 4.0
DEFAULT_WINDOW = 32  # samples per rank (micro-batches), newest kept
DEFAULT_MIN_SAMPLES = 3
DEFAULT_MAX_STEP = 1.5  # factor one update may move a correction by
DEFAULT_QUANTUM = 0.05
RING_EXPLAINED = 1.1  # another member this close to a ring's sample explains it


@dataclass(frozen=True, kw_only=True)
class GroupSample:
    """One measured micro-batch of one rank."""

    rank: int
    group: RingGroup  # what it ran (ranks, sequences, memory scheme)
    seconds: float  # measured wall time
    bandwidth_gbps: float  # the ring's slowest link (what the prediction uses)
    step: int  # which observed step it came from (samples of one step share its load)


class SpeedEstimator:
    """Running per-rank speeds of one job attempt (see the module docstring)."""

    def __init__(self, cluster: ClusterSpec, *, window: int = DEFAULT_WINDOW,
                 min_samples: int = DEFAULT_MIN_SAMPLES, max_step: float = DEFAULT_MAX_STEP,
                 quantum: float = DEFAULT_QUANTUM):
        if window < 1 or min_samples < 1 or not max_step > 1 or not quantum > 0:
            raise ValueError(f"SpeedEstimator(window={window}, min_samples={min_samples}, "
                             f"max_step={max_step}, quantum={quantum}): need window >= 1, "
                             "min_samples >= 1, max_step > 1, quantum > 0")
        self.cluster = cluster
        self.world_size = cluster.world_size
        self.topology = Topology(cluster)
        self.nominal = np.asarray(cluster.rank_speeds(), dtype=np.float64)
        self.window, self.min_samples = window, min_samples
        self.max_step, self.quantum = max_step, quantum
        self.correction = np.ones(self.world_size)
        self._samples: list[deque[GroupSample]] = [deque(maxlen=window)
                                                   for _ in range(self.world_size)]
        self._steps = 0  # steps observed
        self._baselines: dict[int, float] = {}
        # (id of a sample's group, bandwidth) -> predicted seconds, within one update: the
        # samples hold their groups, so the ids stay theirs while the memo lives
        self._memo: dict[tuple[int, float], float] = {}

    # -- input -----------------------------------------------------------------------
    def observe(self, plan: StepPlan, rank_seconds: Mapping[int, Sequence[float]]) -> None:
        """Record one step: `rank_seconds[r]` is rank r's micro-batch times, in the order
        of `plan.micro_batches_of(r)` (what its StepReport carries)."""
        self._steps += 1
        index = plan.by_rank()
        for rank, times in rank_seconds.items():
            if not 0 <= rank < min(self.world_size, plan.world_size):
                continue
            for (_, g), seconds in zip(index.get(rank, ()), times, strict=False):
                if seconds > 0 and math.isfinite(seconds):
                    self._samples[rank].append(GroupSample(
                        rank=rank, group=g, seconds=float(seconds),
                        bandwidth_gbps=self.topology.ring_bandwidth(g.ranks),
                        step=self._steps))

    # -- estimate --------------------------------------------------------------------
    def update(self, cost: CostModel) -> np.ndarray:
        """Re-estimate every rank's correction against `cost` (the current, refitted
        model: samples are kept raw and re-predicted each time); returns `speeds`."""
        self._memo = {}
        self._baselines = self._step_baselines(cost)
        packed = [self._median(r, cost) for r in range(self.world_size)]
        raw = np.array([np.nan if m is None else m for m in packed])
        own = ~np.isnan(raw)
        explained = np.where(own, raw, self.nominal)
        for r in np.flatnonzero(~own):
            raw[r] = self._ring_estimate(int(r), cost, explained)
        known = ~np.isnan(raw)
        if not known.any():
            return self.speeds
        corr = raw / self.nominal
        # The typical rank is 1: the upper median of the ranks measured on their own
        # (packed groups), or of all when none is.
        corr = corr / float(np.percentile(corr[own if own.any() else known], 50,
                                          method="higher"))
        target = np.where(known, corr, self.correction)
        lo, hi = self.correction / self.max_step, self.correction * self.max_step
        self.correction = np.clip(np.clip(target, lo, hi), MIN_SPEED, MAX_SPEED)
        return self.speeds

    def _speed(self, x: GroupSample, cost: CostModel) -> float:
        """The sample's speed (predicted / measured) relative to its step's baseline."""
        return self._predicted(x, cost) / x.seconds / self._baselines.get(x.step, 1.0)

    def _predicted(self, x: GroupSample, cost: CostModel) -> float:
        """The cost model's time of the sample's group, once per group and update (every
        member of a ring holds a sample of the same group; the model is fixed meanwhile)."""
        key = (id(x.group), x.bandwidth_gbps)
        if key not in self._memo:
            self._memo[key] = group_seconds(x.group, cost, x.bandwidth_gbps)[0]
        return self._memo[key]

    def _step_baselines(self, cost: CostModel) -> dict[int, float]:
        """Per observed step, the upper median over ranks of each rank's median speed
        (over the nominal speed) in that step's packed groups: the step's common factor
        (rings say nothing about one rank; a step without packs has none)."""
        per_step: dict[int, dict[int, list[float]]] = {}
        for rank, samples in enumerate(self._samples):
            for x in samples:
                if x.group.ring_size > 1:
                    continue
                per_step.setdefault(x.step, {}).setdefault(rank, []).append(
                    self._predicted(x, cost) / x.seconds / self.nominal[rank])
        return {step: float(np.percentile([np.median(v) for v in ranks.values()], 50,
                                          method="higher"))
                for step, ranks in per_step.items()}

    def _speed_samples(self, rank: int, cost: CostModel, *, packed: bool) -> list[float]:
        return [self._speed(x, cost) for x in self._samples[rank]
                if (x.group.ring_size == 1) == packed]

    def _median(self, rank: int, cost: CostModel) -> float | None:
        """Median speed of `rank`'s packed samples (None: too few)."""
        got = self._speed_samples(rank, cost, packed=True)
        return float(np.median(got)) if len(got) >= self.min_samples else None

    def _ring_estimate(self, rank: int, cost: CostModel, known: np.ndarray) -> float:
        """Median of `rank`'s ring samples that no other member's estimate explains."""
        kept = []
        for x in self._samples[rank]:
            if x.group.ring_size == 1:
                continue
            speed = self._speed(x, cost)
            others = [known[r] for r in x.group.ranks if r != rank and r < self.world_size]
            if min(others, default=math.inf) > speed * RING_EXPLAINED:
                kept.append(speed)
        return float(np.median(kept)) if len(kept) >= self.min_samples else np.nan

    # -- output ----------------------------------------------------------------------
    @property
    def speeds(self) -> np.ndarray:
        """float64[world]: each rank's speed relative to the cost model's reference rank
        (nominal x correction, the correction on the `quantum` grid)."""
        return self.nominal * quantize(self.correction, self.quantum)

    def group_speed(self, g: RingGroup) -> float:
        """The speed a group ran at: its slowest member's."""
        return float(self.speeds[[r for r in g.ranks if r < self.world_size]].min())

    def samples(self, rank: int) -> int:
        return len(self._samples[rank])


def quantize(speeds: np.ndarray, quantum: float = DEFAULT_QUANTUM) -> np.ndarray:
    """Speeds (or corrections) on a grid of `quantum`, within [MIN_SPEED, MAX_SPEED]
    (rounded to 9 decimals, so 12 x 0.05 reads 0.6)."""
    grid = np.round(np.round(np.asarray(speeds, dtype=np.float64) / quantum) * quantum, 9)
    return np.clip(grid, MIN_SPEED, MAX_SPEED)
