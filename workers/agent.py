"""One rank of one job attempt, driven by the controller over gRPC.

The agent registers (getting the job's worker config and where to resume), rank 0
claims the checkpoint directory for the job (scheduler.checkpoint_owner: refused if it
holds another job's checkpoints), restores the last checkpoint into its rank's trainer
when there is one, then runs every plan the controller streams: read this rank's samples
(token ids checked against the model's vocabulary), `Trainer.train_step` under a
`worker.step` span whose parent is the planner's span (W3C context from the plan message),
save a checkpoint when the plan says so, report the step (with the plan's prediction and
groups, so the report is complete on its own). A heartbeat thread sends the rank's
position in its step (parallelism.progress: micro-batch, layer, forward/backward, ring
hop) and its progress counter (every mark of the position, and bumps when a step has
trained and again when its checkpoint is saved) and ships the rank's log lines
(workers.rank_logs); the controller presumes a rank whose counter stops moving on a plan
it holds to be stalled and compares the positions with the plan to name whom the others
wait on. A plan message with `stop` (job done or stop requested) ends the loop at a step
boundary.

Failures: an error of the job's data or config (a RingmasterError: bad tokens, a truncated
dataset, a checkpoint directory of another job) is reported as a USER failure, which ends
the job as InvalidInput without a retry; anything else as an infrastructure failure,
which the job's failure policy may retry. Either way with the step and one line.
With `training.tensorboard_dir`, rank 0 writes the step's scalars as TensorBoard events
(workers.tensorboard).

Fault injection for tests and drills: `RINGMASTER_FAULT` holds one or more
comma-separated specs (docs/execution.md, "Fault drills"):

    stall:rank=R:step=S                  hang at the start of step S
    stall:rank=R:step=S:micro_batch=M[:layer=L][:phase=forward|backward]
                                         hang when the step reaches that position
    crash:rank=R:step=S                  exit (status 17) at the start of step S
    slow:rank=R:factor=F[:step=S]        compute F times slower from step S (default 0)

each with `[:attempt=A]` (stall and crash: default 1, so the restarted attempt runs clean;
slow: every attempt unless given) and `[:job=NAME]` (jobs whose id starts with NAME-).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from opentelemetry import propagate, trace

from parallelism.progress import PROGRESS, StepPosition
from scheduler.batching import BatchPosition
from scheduler.checkpoint_owner import claim
from scheduler.dataset import TokenDataset
from scheduler.errors import RingmasterError
from scheduler.plan import StepPlan
from workers.controller_client import ControllerClient, Fenced, WorkerIdentity
from workers.data import GlobalBatch, read_plan_samples, read_sample_data, sequence_ids_of_rank
from workers.loss import BatchMeta, ObjectiveConfig
from workers.rank_logs import RankLogs
from workers.tensorboard import ScalarWriter
from workers.train import TrainConfig, Trainer

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class AgentResult:
    rank: int
    steps_run: int  # steps this agent trained in this attempt
    final_step: int  # optimizer steps completed (including restored ones)
    stopped: bool  # ended by a stop request rather than by finishing the job


def train_config(cfg: dict) -> TrainConfig:
    """The optimizer settings of a worker config (what the controller's Register sends).

    `precision` and `optimizer_sharding` come resolved by the controller (the planner's
    memory and cost model used the same); a config without them gets the workers'
    defaults (by device and world size). `objective` is the spec's (pretrain without)."""
    training = cfg["training"]
    steps = int(training["steps"])
    return TrainConfig(lr=float(training["learning_rate"]), total_steps=steps,
                       warmup_steps=min(10, steps // 10),
                       precision=training.get("precision"),
                       optimizer_sharding=training.get("optimizer_sharding"),
                       objective=ObjectiveConfig.from_config(cfg.get("objective")))


POSITION_KEYS = ("micro_batch", "layer", "phase")


def _fault_specs() -> list[tuple[str, dict[str, str]]]:
    """RINGMASTER_FAULT's specs as (kind, fields); ValueError naming a malformed one."""
    out = []
    for spec in filter(None, (s.strip() for s in os.environ.get("RINGMASTER_FAULT",
                                                                  "").split(","))):
        kind, *parts = spec.split(":")
        if kind not in ("stall", "crash", "slow") or not all("=" in p for p in parts):
            raise ValueError(f"RINGMASTER_FAULT: {spec!r} is not KIND:key=value:... with KIND "
                             "stall, crash or slow")
        out.append((kind, dict(p.split("=", 1) for p in parts)))
    return out


def _targets(identity: WorkerIdentity, fields: dict[str, str], default_attempt) -> bool:
    job = fields.get("job")
    attempt = fields.get("attempt", default_attempt)
    return (int(fields.get("rank", -1)) == identity.rank
            and (attempt is None or int(attempt) == identity.attempt)
            and (job is None or identity.job_id.startswith(job + "-")))


def _fault(identity: WorkerIdentity, step: int) -> str | None:
    """The stall or crash RINGMASTER_FAULT asks this rank to act out at the start of `step`."""
    for kind, f in _fault_specs():
        at_start = kind in ("stall", "crash") and not any(k in f for k in POSITION_KEYS)
        if at_start and int(f.get("step", -1)) == step and _targets(identity, f, 1):
            return kind
    return None


def slow_factor(identity: WorkerIdentity, step: int) -> float:
    """How many times slower this rank's compute is at `step` (1.0: not slowed)."""
    for kind, f in _fault_specs():
        if kind == "slow" and _targets(identity, f, None) and step >= int(f.get("step", 0)):
            factor = float(f.get("factor", "nan"))
            if not factor >= 1.0 or factor == float("inf"):
                raise ValueError(f"RINGMASTER_FAULT: slow factor={f.get('factor')!r} must be a "
                                 "finite number >= 1")
            return factor
    return 1.0


def positional_stall(identity: WorkerIdentity) -> Callable[[StepPosition], None] | None:
    """An `on_mark` hook that hangs this rank where a positional stall spec says, if any."""
    wanted = [f for kind, f in _fault_specs() if kind == "stall" and _targets(identity, f, 1)
              and any(k in f for k in POSITION_KEYS)]
    if not wanted:
        return None

    def hook(pos: StepPosition) -> None:
        for f in wanted:
            if pos.step == int(f.get("step", -1)) and pos.micro_batch == int(f["micro_batch"]) \
                    and int(f.get("layer", pos.layer)) == pos.layer \
                    and f.get("phase", pos.phase) == pos.phase:
                time.sleep(1e9)  # hang like a rank stuck in a kernel or a collective
    return hook


def _step_samples(dataset: TokenDataset, plan: StepPlan, sample_ids, rank: int,
                  objective: ObjectiveConfig, vocab_size: int) -> tuple[dict, BatchMeta | None]:
    """This rank's samples of a step (tokens; SampleData for masked objectives) and the
    batch's records every rank normalises by (from the dataset's metadata, no tokens).
    Token ids beyond the model's vocabulary are a DatasetError (read_plan_samples)."""
    ids = sequence_ids_of_rank(plan, rank)
    tokens = read_plan_samples(dataset, sample_ids, ids, vocab_size=vocab_size)
    if not objective.masked:
        return tokens, None
    batch = GlobalBatch(position=BatchPosition(), sample_ids=np.asarray(sample_ids, np.int64),
                        lengths=dataset.lengths[np.asarray(sample_ids, np.int64)])
    return (read_sample_data(dataset, batch, ids),
            BatchMeta.from_structure(dataset.structure, batch.sample_ids))


class _Heartbeat(threading.Thread):
    def __init__(self, client: ControllerClient, interval_s: float, logs: RankLogs):
        super().__init__(name="heartbeat", daemon=True)
        self.client, self.interval_s, self.logs = client, interval_s, logs
        self.step, self.progress = 0, 0
        self.stop_requested = threading.Event()
        self.fenced = threading.Event()
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(self.interval_s):
            pos = PROGRESS.snapshot()
            try:
                reply = self.client.heartbeat(step=self.step, progress=self.progress + pos.ticks,
                                              position=pos)
            except Exception:  # fenced or controller gone for good: the main loop notices
                self.fenced.set()
                return
            if reply.stop:
                self.stop_requested.set()
            self.logs.flush()

    def close(self) -> None:
        self._done.set()


class RankAgent:
    """Runs one rank (see the module docstring)."""

    def __init__(self, *, controller: str, identity: WorkerIdentity, tracer_provider=None):
        self.identity = identity
        self.client = ControllerClient(controller, identity)
        self.tracer = (tracer_provider or trace.get_tracer_provider()).get_tracer("workers.agent")

    def run(self, trainer: Trainer) -> AgentResult:
        """Train this rank's `trainer` on the controller's plans until the job ends."""
        reply = self.client.register(host=socket.gethostname(), pid=os.getpid())
        cfg = json.loads(reply.job_spec_json)
        logs = RankLogs(self.client).attach()
        beat = _Heartbeat(self.client, float(cfg["heartbeat_interval_s"]), logs)
        self._step, self._events = trainer.step, None
        PROGRESS.on_mark = positional_stall(self.identity)
        try:
            self._prepare(cfg, reply, trainer)
            beat.step = trainer.step
            beat.start()
            return self._serve(cfg, reply, trainer, beat)
        except Exception as exc:
            self._report(exc)
            raise
        finally:
            beat.close()
            logs.flush()
            logs.detach()
            if self._events is not None:
                self._events.close()
            self.client.close()

    def _prepare(self, cfg: dict, reply, trainer: Trainer) -> None:
        """Claim the checkpoint directory (rank 0), restore, open the event file."""
        training, rank = cfg["training"], self.identity.rank
        if rank == 0 and reply.checkpoint_dir:
            claim(reply.checkpoint_dir, job_id=self.identity.job_id,
                  job_name=cfg.get("name", ""), resume_from=training.get("resume_from"))
        if reply.resume_from:
            trainer.restore(reply.resume_from)
            self._step = trainer.step
            if rank == 0:
                log.info("restored checkpoint %s: resuming at step %d", reply.resume_from,
                         trainer.step + 1)
        if rank == 0 and training.get("tensorboard_dir"):
            self._events = ScalarWriter(training["tensorboard_dir"])

    def _serve(self, cfg: dict, reply, trainer: Trainer, beat: _Heartbeat) -> AgentResult:
        dataset = TokenDataset(cfg["dataset"])
        vocab_size = int(cfg["model"]["vocab_size"])
        steps_run, stopped = 0, False
        for msg in self.client.plans(from_step=trainer.step):
            if msg.stop:
                stopped = msg.step < int(cfg["training"]["steps"])
                break
            self._step = msg.step
            self._run_step(msg, trainer, dataset, reply.checkpoint_dir, beat, vocab_size)
            steps_run += 1
        return AgentResult(rank=self.identity.rank, steps_run=steps_run,
                           final_step=trainer.step, stopped=stopped)

    def _report(self, exc: Exception) -> None:
        """Tell the controller why this rank ends (a user or infrastructure failure)."""
        if isinstance(exc, Fenced):
            return  # the controller ended this attempt itself
        user = isinstance(exc, RingmasterError)
        text = " ".join(str(exc).split())
        error = text if user else f"{type(exc).__name__}: {text}"
        log.error("step %d: %s", self._step, error)
        try:
            self.client.report_failure(step=self._step, error=error, user=user)
        except Exception:  # the controller may be away; the driver reports too
            pass

    def _run_step(self, msg, trainer: Trainer, dataset: TokenDataset, ckpt_dir: str,
                  beat: _Heartbeat, vocab_size: int) -> None:
        rank = self.identity.rank
        if msg.step != trainer.step:
            raise RuntimeError(f"rank {rank}: controller sent step {msg.step} but the trainer "
                               f"is at step {trainer.step}")
        PROGRESS.begin_step(msg.step)
        PROGRESS.slowdown = slow_factor(self.identity, msg.step)
        fault = _fault(self.identity, msg.step)
        if fault == "stall":
            time.sleep(1e9)  # hang like a rank stuck in a collective
        if fault == "crash":
            os._exit(17)
        plan = StepPlan.model_validate_json(msg.plan_json)
        samples, batch = _step_samples(dataset, plan, msg.sample_ids, rank,
                                       trainer.config.objective, vocab_size)
        parent = propagate.extract({"traceparent": msg.traceparent} if msg.traceparent else {})
        t0 = time.perf_counter()
        with self.tracer.start_as_current_span("worker.step", context=parent) as span:
            span.set_attributes({"ringmaster.job_id": self.identity.job_id,
                                 "ringmaster.rank": rank, "ringmaster.step": msg.step,
                                 "ringmaster.attempt": self.identity.attempt})
            stats = trainer.train_step(plan, samples, batch=batch, next_position=BatchPosition(
                epoch=msg.data_epoch, index=msg.data_index))
        step_time = time.perf_counter() - t0
        beat.progress += 1  # trained; a checkpoint may take a while longer
        path = self._save(msg, trainer, ckpt_dir)
        beat.step, beat.progress = trainer.step, beat.progress + 1
        s = stats.stats
        groups = " ".join(f"{k}x{v}" for k, v in plan.groups_by_size().items())
        self.client.report_step(step=msg.step, loss=s.loss, num_predictions=s.num_predictions,
                                tokens=s.local_num_tokens,
                                micro_batch_times_s=s.micro_batch_times_s,
                                micro_batch_busy_s=s.micro_batch_busy_s,
                                peak_memory_bytes=s.peak_memory_bytes, step_time_s=step_time,
                                checkpoint_path=path, predicted_step_s=msg.predicted_step_s,
                                plan_groups=groups)
        if self._events is not None:
            batch_tokens = sum(q.length for _, g in plan.groups() for q in g.sequences)
            self._events.add_scalars(trainer.step, {
                "train/loss": s.loss, "train/tokens_per_s": batch_tokens / step_time,
                "train/step_time_s": step_time, "train/predicted_step_s": msg.predicted_step_s,
                "train/peak_memory_gib": s.peak_memory_bytes / 2**30,
                "train/learning_rate": stats.lr, "train/grad_norm": float(stats.grad_norm)})

    def _save(self, msg, trainer: Trainer, ckpt_dir: str) -> str:
        if not (msg.checkpoint and ckpt_dir):
            return ""
        t0 = time.perf_counter()
        path = str(trainer.save(Path(ckpt_dir) / f"step_{trainer.step}"))
        if self.identity.rank == 0:
            log.info("checkpoint of step %d saved to %s in %.1f s", trainer.step, path,
                     time.perf_counter() - t0)
        return path
