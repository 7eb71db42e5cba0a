"""One rank of one job attempt, driven by the controller over gRPC.

The agent registers (getting the job's worker config and its process's incarnation), rank
0 claims the checkpoint directory for the job (scheduler.checkpoint_owner: refused if it
holds another job's checkpoints), then serves the plan stream: a World message says which
ranks form the next process group (workers.elastic.ElasticRank.join: at the start of the
attempt, after a peer was lost, or when a replacement joins; the first world restores the
last checkpoint), a plan message is one step: read this rank's samples (token ids checked
against the model's vocabulary), `Trainer.train_step` under a `worker.step` span whose
parent is the planner's span (W3C context from the plan message), save a checkpoint when
the plan says so, report the step (with the plan's prediction and groups, so the report is
complete on its own). A step that breaks because a peer vanished (its process died, or it
stalled past the process-group timeout) is abandoned: the agent says so (a recoverable
failure), skips the plans still queued for the broken world and waits for the next World,
where the interrupted step is finished or dropped on every member (docs/elastic.md).

A heartbeat thread sends the rank's position in its step (parallelism.progress:
micro-batch, layer, forward/backward, ring hop, whether it waits on a ring peer), whether
it only waits on peers (`syncing`: its micro-batches are done, or it is blocked in a ring
exchange), its progress counter (every mark of the position, and bumps around each step
and checkpoint), and ships the rank's log lines (workers.rank_logs); the controller
presumes a rank whose counter stops moving on a plan it holds, among those still
computing, to be stalled and compares the positions with the plan to name whom the others
wait on. A plan message with `stop` (job done or stop requested) ends the loop at a step
boundary; a fenced process (lost, replaced, or an old attempt) stops without writing
anything more: before a checkpoint it checks with the controller.

Failures: an error of the job's data or config (a RingmasterError: bad tokens, a truncated
dataset, a checkpoint directory of another job) is reported as a USER failure, which ends
the job as InvalidInput without a retry; anything else as an infrastructure failure,
which the job's failure policy may retry. Either way with the step and one line.
With `training.tensorboard_dir`, rank 0 writes the step's scalars as TensorBoard events
(workers.tensorboard).

Fault drills: workers.faults (`RINGMASTER_FAULT`).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
from opentelemetry import propagate, trace

from parallelism.progress import PROGRESS, StepPosition
from scheduler.batching import BatchPosition
from scheduler.checkpoint_owner import claim
from scheduler.dataset import TokenDataset
from scheduler.errors import RingmasterError
from scheduler.plan import StepPlan
from scheduler.worker_config import WorkerConfig
from workers.controller_client import ControllerClient, Fenced, WorkerIdentity
from workers.data import GlobalBatch, read_plan_samples, read_sample_data, sequence_ids_of_rank
from workers.elastic import (
    ElasticRank,
    FlightStatus,
    JoinReport,
    Unrecoverable,
    World,
    comm_failure,
)
from workers.faults import fault_at, perform, positional_stall, ring_victim, slow_factor
from workers.loss import BatchMeta, ObjectiveConfig
from workers.rank_logs import RankLogs
from workers.tensorboard import ScalarWriter
from workers.train import TrainConfig, Trainer

log = logging.getLogger(__name__)

# Phases of a step in which a rank computes nothing of its own: it waits on its peers.
_SYNC_PHASES = frozenset({"reduce", "optimizer", "done"})


@dataclass(frozen=True, kw_only=True)
class AgentResult:
    rank: int
    steps_run: int  # steps this agent trained in this attempt
    final_step: int  # optimizer steps completed (including restored ones)
    stopped: bool  # ended by a stop request rather than by finishing the job
    fenced: bool = False  # ended because the controller fenced this process off


def train_config(cfg: WorkerConfig) -> TrainConfig:
    """The optimizer settings of a worker config (what the controller's Register sends).

    `precision`, `optimizer_sharding` and `shard_mirror` come resolved by the controller
    (the planner's memory and cost model used the same); `objective` is the spec's."""
    training = cfg.training
    return TrainConfig(lr=training.learning_rate, total_steps=training.steps,
                       warmup_steps=min(10, training.steps // 10),
                       precision=training.precision,
                       optimizer_sharding=training.optimizer_sharding,
                       shard_mirror=training.shard_mirror,
                       objective=ObjectiveConfig.from_config(cfg.objective))


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


def waits_on_peers(pos: StepPosition) -> bool:
    """Blocked on other ranks, not computing: in the step's collectives (its micro-batches
    are done), between steps, or in a ring exchange. The controller never takes such a
    rank for the stalled one (a stalled peer holds it up)."""
    return pos.phase in _SYNC_PHASES or pos.waiting


class _Heartbeat(threading.Thread):
    def __init__(self, client: ControllerClient, interval_s: float, logs: RankLogs):
        super().__init__(name="heartbeat", daemon=True)
        self.client, self.interval_s, self.logs = client, interval_s, logs
        self.step, self.progress = 0, 0
        self.world_epoch = -1  # the controller's current world, as last heard
        # ElasticRank.interrupt: abandon a step of a broken world
        self.interrupt: Callable[[int], bool] | None = None
        self.stop_requested = threading.Event()
        self.fenced = threading.Event()
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(self.interval_s):
            pos = PROGRESS.snapshot()
            try:
                reply = self.client.heartbeat(step=self.step, progress=self.progress + pos.ticks,
                                              syncing=waits_on_peers(pos), position=pos)
            except Exception:  # fenced or controller gone for good: the main loop notices
                self.fenced.set()
                return
            self.world_epoch = reply.world_epoch
            if self.interrupt is not None and reply.broken_below > 0:
                self.interrupt(reply.broken_below)
            if reply.stop:
                self.stop_requested.set()
            self.logs.flush()

    def bump(self) -> None:
        self.progress += 1

    def close(self) -> None:
        self._done.set()


class RankAgent:
    """Runs one rank (see the module docstring)."""

    def __init__(self, *, controller: str, identity: WorkerIdentity, tracer_provider=None,
                 life: int = 1):
        self.identity, self.life = identity, life
        self.client = ControllerClient(controller, identity)
        self.tracer = (tracer_provider or trace.get_tracer_provider()).get_tracer("workers.agent")
        self.steps_run, self._step = 0, -1
        self._events: ScalarWriter | None = None  # rank 0's TensorBoard file, if configured

    def run(self, elastic: ElasticRank) -> AgentResult:
        """Serve the controller's worlds and plans as this rank until the job ends."""
        try:
            reply = self.client.register(host=socket.gethostname(), pid=os.getpid())
        except Fenced as exc:
            self.client.close()
            return self._result(elastic, stopped=False, fenced=True, why=str(exc))
        cfg = WorkerConfig.from_json(reply.job_spec_json)  # a SpecError: the job's fault
        logs = RankLogs(self.client).attach()
        self.beat = _Heartbeat(self.client, cfg.heartbeat_interval_s, logs)
        self.beat.interrupt = elastic.interrupt
        PROGRESS.on_mark = positional_stall(job_id=self.identity.job_id,
                                            attempt=self.identity.attempt,
                                            slot=self.identity.rank)
        PROGRESS.phase("done")  # not in a step (a fenced predecessor's may have stopped mid-way)
        stopped, fenced, why = False, False, ""
        try:
            self._prepare(cfg, reply)
            self.beat.start()
            stopped = self._serve(elastic)
        except Fenced as exc:
            fenced, why = True, str(exc)
        except Exception as exc:
            self._report(exc)
            raise
        finally:
            self.beat.close()
            logs.flush()
            logs.detach()
            if self._events is not None:
                self._events.close()
            self.client.close()
        return self._result(elastic, stopped=stopped, fenced=fenced, why=why)

    def _prepare(self, cfg: WorkerConfig, reply) -> None:
        """Claim the checkpoint directory (rank 0), open the dataset and the event file."""
        training, rank = cfg.training, self.identity.rank
        self.total_steps, self.ckpt_dir = training.steps, reply.checkpoint_dir
        self.vocab_size = cfg.model.vocab_size
        if rank == 0 and reply.checkpoint_dir:
            claim(reply.checkpoint_dir, job_id=self.identity.job_id,
                  job_name=cfg.name, resume_from=training.resume_from)
        self.dataset = TokenDataset(cfg.dataset)
        if rank == 0 and training.tensorboard_dir:
            self._events = ScalarWriter(training.tensorboard_dir)

    def _result(self, elastic: ElasticRank, *, stopped: bool, fenced: bool, why: str
                ) -> AgentResult:
        if fenced:
            print(f"rank {self.identity.rank} (incarnation {self.client.identity.incarnation})"
                  f" fenced off, stopping without writing anything: {why}", flush=True)
        step = elastic.trainer.step if elastic.trainer is not None else 0
        return AgentResult(rank=self.identity.rank, steps_run=self.steps_run, final_step=step,
                           stopped=stopped, fenced=fenced)

    def _report(self, exc: Exception) -> None:
        """Tell the controller why this rank ends (a user or infrastructure failure)."""
        user = isinstance(exc, RingmasterError)
        text = " ".join(str(exc).split())
        error = text if user else f"{type(exc).__name__}: {text}"
        log.error("step %d: %s", self._step, error)
        try:
            self.client.report_failure(step=self._step, error=error, user=user)
        except Exception:  # the controller may be away; the driver reports too
            pass

    # ----------------------------------------------------------------- worlds
    def _serve(self, elastic: ElasticRank) -> bool:
        """Worlds one after another; True if a stop request ended the job early."""
        epoch, formed = -1, False
        while True:
            step = elastic.joined()[0].step if formed else 0
            kind, value = self._stream(elastic, epoch, formed, step)
            if kind == "stop":
                return value
            epoch, formed = value.epoch, self._form(elastic, value)

    def _form(self, elastic: ElasticRank, msg) -> bool:
        """Form the world of a World message; False if a peer vanished meanwhile."""
        world = World(epoch=msg.epoch, members=tuple(msg.members), store_prefix=msg.store_prefix)
        done: list[JoinReport] = []

        def join() -> None:
            with self.tracer.start_as_current_span("worker.join_world") as span:
                done.append(elastic.join(world, checkpoint=msg.checkpoint or None))
                span.set_attributes(_join_attributes(self.identity, done[0]))

        try:
            error = comm_failure(join)
        except Unrecoverable as exc:
            self.client.report_failure(step=-1, error=f"cannot form world {msg.epoch}: {exc}",
                                       cannot_replan=True)
            raise Fenced(f"world {msg.epoch} cannot be formed: {exc}") from None
        if error:
            elastic.abandon()
            self.client.report_failure(step=-1, error=f"forming world {msg.epoch}: {error}",
                                       recoverable=True, world_epoch=msg.epoch)
            return False
        report = done[0]
        self.beat.step = self._step = elastic.joined()[0].step
        self.beat.bump()
        print(f"rank {self.identity.rank}: formed world {msg.epoch} of {world.size} ranks at "
              f"step {report.step} in {report.seconds:.2f} s ({msg.reason}); received "
              f"{report.bytes_received} state bytes, sent {report.bytes_sent}, published "
              f"{report.param_bytes} parameter bytes", flush=True)
        if msg.checkpoint and self.identity.rank == 0:
            log.info("world %d restored what no rank held from checkpoint %s: resuming at "
                     "step %d", msg.epoch, msg.checkpoint, report.step + 1)
        if report.finished is not None:
            self._report_finished(report.finished, msg.epoch)
        return True

    def _report_finished(self, f: FlightStatus, epoch: int) -> None:
        """A step this rank finished while forming the world (its peers committed it)."""
        self.client.report_step(step=f.step, loss=f.loss or 0.0,
                                num_predictions=f.num_predictions, tokens=0,
                                step_time_s=0.0, world_epoch=epoch)

    # ----------------------------------------------------------------- plans
    def _stream(self, elastic: ElasticRank, epoch: int, formed: bool, from_step: int):
        """("stop", stopped) or ("world", World message): the end of one world's stream."""
        broken = False
        for msg in self.client.plans(from_step=from_step, world_epoch=epoch, formed=formed):
            if self.beat.fenced.is_set():
                raise Fenced("the controller no longer accepts this process's heartbeats")
            if msg.stop:
                return "stop", msg.step < self.total_steps
            if msg.HasField("world"):
                return "world", msg.world
            if broken or msg.world_epoch != epoch:
                continue  # planned for a world that broke: the next World replaces it
            error = comm_failure(partial(self._run_step, msg, elastic, epoch))
            if error:  # (outside the except block: its traceback holds the group)
                broken = True
                PROGRESS.phase("done")  # nothing left to compute: it waits on the others now
                elastic.abandon()  # peers blocked on this rank fail now, not at the timeout
                self.client.report_failure(step=msg.step, error=error, recoverable=True,
                                           world_epoch=epoch)
        raise Fenced("the plan stream ended without a stop or a new world")

    def _run_step(self, msg, elastic: ElasticRank, epoch: int) -> None:
        trainer, world = elastic.joined()
        rank = world.rank_of(self.identity.rank)
        if msg.step != trainer.step:
            raise RuntimeError(f"rank {self.identity.rank}: controller sent step {msg.step} but "
                               f"the trainer is at step {trainer.step}")
        self._step = msg.step
        plan = StepPlan.model_validate_json(msg.plan_json)
        kill = self._drills(msg.step, plan, trainer, world, epoch)
        if self.beat.fenced.is_set():  # e.g. back from a stall the controller gave up on
            raise Fenced(f"the controller fenced this process off during step {msg.step}")
        self.beat.bump()
        samples, batch = _step_samples(self.dataset, plan, msg.sample_ids, rank,
                                       trainer.config.objective, self.vocab_size)
        parent = propagate.extract({"traceparent": msg.traceparent} if msg.traceparent else {})
        t0 = time.perf_counter()
        try:
            with self.tracer.start_as_current_span("worker.step", context=parent) as span:
                span.set_attributes({"ringmaster.job_id": self.identity.job_id,
                                     "ringmaster.rank": self.identity.rank,
                                     "ringmaster.step": msg.step,
                                     "ringmaster.attempt": self.identity.attempt,
                                     "ringmaster.world_epoch": epoch,
                                     "ringmaster.world_size": world.size})
                stats = trainer.train_step(plan, samples, batch=batch,
                                           next_position=BatchPosition(
                                               epoch=msg.data_epoch, index=msg.data_index))
        finally:
            if kill is not None:
                kill.remove()
        step_time = time.perf_counter() - t0
        self.steps_run += 1
        self.beat.bump()  # trained; a checkpoint may take a while longer
        path = self._checkpoint(msg, trainer)
        self.beat.step = trainer.step
        self.beat.bump()
        self._report_step(msg, plan, stats, step_time, path, epoch)

    def _drills(self, step: int, plan: StepPlan, trainer: Trainer, world: World, epoch: int):
        """Start the step's position record and act out (or arm) its fault drill, if any:
        the armed mid-step kill's handle, to remove once the step is over."""
        me = self.identity
        PROGRESS.begin_step(step)
        PROGRESS.slowdown = slow_factor(job_id=me.job_id, attempt=me.attempt, slot=me.rank,
                                        step=step)
        victim = ring_victim(plan)
        fault = fault_at(job_id=me.job_id, attempt=me.attempt, slot=me.rank, step=step,
                         life=self.life, world=epoch,
                         ring_slot=world.members[victim] if victim is not None else None)
        return perform(fault, trainer, plan, world.rank_of(me.rank))

    def _report_step(self, msg, plan: StepPlan, stats, step_time: float, path: str,
                     epoch: int) -> None:
        s = stats.stats
        groups = " ".join(f"{k}x{v}" for k, v in plan.groups_by_size().items())
        self.client.report_step(step=msg.step, loss=s.loss, num_predictions=s.num_predictions,
                                tokens=s.local_num_tokens,
                                micro_batch_times_s=s.micro_batch_times_s,
                                micro_batch_busy_s=s.micro_batch_busy_s,
                                peak_memory_bytes=s.peak_memory_bytes, step_time_s=step_time,
                                checkpoint_path=path, predicted_step_s=msg.predicted_step_s,
                                plan_groups=groups, world_epoch=epoch)
        if self._events is not None:
            batch_tokens = sum(q.length for _, g in plan.groups() for q in g.sequences)
            self._events.add_scalars(stats.step, {
                "train/loss": s.loss, "train/tokens_per_s": batch_tokens / step_time,
                "train/step_time_s": step_time, "train/predicted_step_s": msg.predicted_step_s,
                "train/peak_memory_gib": s.peak_memory_bytes / 2**30,
                "train/learning_rate": stats.lr, "train/grad_norm": float(stats.grad_norm)})

    def _checkpoint(self, msg, trainer: Trainer) -> str:
        """Save when the plan says so, after asking the controller: a fenced process writes
        nothing (the others' save, a collective, fails without it and is skipped)."""
        if not (msg.checkpoint and self.ckpt_dir):
            return ""
        self.client.heartbeat(step=trainer.step, progress=self.beat.progress)  # or Fenced
        t0 = time.perf_counter()
        path = str(trainer.save(Path(self.ckpt_dir) / f"step_{trainer.step}"))
        if self.identity.rank == 0:
            log.info("checkpoint of step %d saved to %s in %.1f s", trainer.step, path,
                     time.perf_counter() - t0)
        return path


def _join_attributes(identity: WorkerIdentity, report: JoinReport) -> dict:
    return {"ringmaster.job_id": identity.job_id, "ringmaster.rank": identity.rank,
            "ringmaster.attempt": identity.attempt, "world.epoch": report.world.epoch,
            "world.size": report.world.size, "world.step": report.step,
            "world.bytes_received": report.bytes_received,
            "world.bytes_sent": report.bytes_sent, "world.param_bytes": report.param_bytes,
            "world.finished_step": report.finished.step if report.finished else -1,
            "world.dropped_step": report.dropped_step if report.dropped_step is not None
            else -1, "world.seconds": report.seconds}
