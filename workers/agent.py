"""One rank of one job attempt, driven by the controller over gRPC.

The agent registers (getting the job's worker config and its process's incarnation),
then serves the plan stream: a World message says which ranks form the next process group
(workers.elastic.ElasticRank.join: at the start of the attempt, after a peer was lost, or
when a replacement joins; the first world restores the last checkpoint), a plan message
is one step: read this rank's samples, `Trainer.train_step` under a `worker.step` span
whose parent is the planner's span (W3C context from the plan message), save a checkpoint
when the plan says so, report the step. A step that breaks because a peer vanished (its
process died, or it stalled past the process-group timeout) is abandoned: the agent says
so (a recoverable failure), skips the plans still queued for the broken world and waits
for the next World, where the interrupted step is finished or dropped on every member
(docs/elastic.md). A heartbeat thread sends the progress counter (bumped when a step
starts and after each micro-batch) and whether the rank's micro-batches are done (it then
only waits in the step's collectives); the controller presumes the rank whose counter
stopped first, among those still computing, to be stalled. A plan message with `stop`
(job done or stop requested) ends the loop at a step boundary; a fenced process (lost,
replaced, or an old attempt) stops without writing anything more: before a checkpoint it
checks with the controller.

Fault drills: workers.faults (`RINGMASTER_FAULT`).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from opentelemetry import propagate, trace

from parallelism import CommStats
from scheduler.batching import BatchPosition
from scheduler.dataset import TokenDataset
from scheduler.plan import StepPlan
from workers.controller_client import ControllerClient, Fenced, WorkerIdentity
from workers.data import sequence_ids_of_rank
from workers.elastic import ElasticRank, JoinReport, Unrecoverable, World, comm_failure
from workers.faults import fault_at, perform, ring_victim
from workers.train import TrainConfig


@dataclass(frozen=True, kw_only=True)
class AgentResult:
    rank: int
    steps_run: int  # steps this agent trained in this attempt
    final_step: int  # optimizer steps completed (including restored ones)
    stopped: bool  # ended by a stop request rather than by finishing the job
    fenced: bool = False  # ended because the controller fenced this process off


def train_config(cfg: dict) -> TrainConfig:
    """The optimizer settings of a worker config (what the controller's Register sends).

    `precision`, `optimizer_sharding` and `shard_mirror` come resolved by the controller
    (the planner's memory and cost model used the same); a config without them gets the
    workers' defaults (by device and world size)."""
    training = cfg["training"]
    steps = int(training["steps"])
    return TrainConfig(lr=float(training["learning_rate"]), total_steps=steps,
                       warmup_steps=min(10, steps // 10),
                       precision=training.get("precision"),
                       optimizer_sharding=training.get("optimizer_sharding"),
                       shard_mirror=bool(training.get("shard_mirror", False)))


class _Heartbeat(threading.Thread):
    def __init__(self, client: ControllerClient, interval_s: float):
        super().__init__(name="heartbeat", daemon=True)
        self.client, self.interval_s = client, interval_s
        self.step, self.progress = 0, 0
        self.todo = 0  # micro-batches of the current step still to finish
        self.comm = CommStats()  # the current step's ring traffic (waiting: blocked on peers)
        self.world_epoch = -1  # the controller's current world, as last heard
        self.interrupt = None  # ElasticRank.interrupt: abandon a step of a broken world
        self.stop_requested = threading.Event()
        self.fenced = threading.Event()
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(self.interval_s):
            try:
                reply = self.client.heartbeat(step=self.step, progress=self.progress,
                                              syncing=self.waits_on_peers())
            except Exception:  # fenced or controller gone for good: the main loop notices
                self.fenced.set()
                return
            self.world_epoch = reply.world_epoch
            if self.interrupt is not None and reply.broken_below > 0:
                self.interrupt(reply.broken_below)
            if reply.stop:
                self.stop_requested.set()

    def waits_on_peers(self) -> bool:
        """Blocked on other ranks, not computing: in the step's collectives (its
        micro-batches are done) or in a ring transfer. The controller never takes such a
        rank for the stalled one (a stalled peer holds it up)."""
        return self.todo == 0 or self.comm.waiting > 0

    def bump(self, *_args) -> None:
        self.progress += 1

    def micro_batch_done(self, *_args) -> None:
        self.todo = max(0, self.todo - 1)
        self.bump()

    def close(self) -> None:
        self._done.set()


class RankAgent:
    """Runs one rank (see the module docstring)."""

    def __init__(self, *, controller: str, identity: WorkerIdentity, tracer_provider=None,
                 life: int = 1):
        self.identity, self.life = identity, life
        self.client = ControllerClient(controller, identity)
        self.tracer = (tracer_provider or trace.get_tracer_provider()).get_tracer("workers.agent")
        self.steps_run = 0

    def run(self, elastic: ElasticRank) -> AgentResult:
        """Serve the controller's worlds and plans as this rank until the job ends."""
        stopped = fenced = False
        try:
            reply = self.client.register(host=socket.gethostname(), pid=os.getpid())
        except Fenced as exc:
            return self._result(elastic, stopped=False, fenced=True, why=str(exc))
        cfg = json.loads(reply.job_spec_json)
        self.total_steps, self.ckpt_dir = int(cfg["training"]["steps"]), reply.checkpoint_dir
        self.dataset = TokenDataset(cfg["dataset"])
        self.beat = _Heartbeat(self.client, float(cfg["heartbeat_interval_s"]))
        self.beat.interrupt = elastic.interrupt
        self.beat.start()
        why = ""
        try:
            stopped = self._serve(elastic)
        except Fenced as exc:
            fenced, why = True, str(exc)
        finally:
            self.beat.close()
            self.client.close()
        return self._result(elastic, stopped=stopped, fenced=fenced, why=why)

    def _result(self, elastic: ElasticRank, *, stopped: bool, fenced: bool, why: str
                ) -> AgentResult:
        if fenced:
            print(f"rank {self.identity.rank} (incarnation {self.client.identity.incarnation})"
                  f" fenced off, stopping without writing anything: {why}", flush=True)
        step = elastic.trainer.step if elastic.trainer is not None else 0
        return AgentResult(rank=self.identity.rank, steps_run=self.steps_run, final_step=step,
                           stopped=stopped, fenced=fenced)

    # ----------------------------------------------------------------- worlds
    def _serve(self, elastic: ElasticRank) -> bool:
        """Worlds one after another; True if a stop request ended the job early."""
        epoch, formed = -1, False
        while True:
            step = elastic.trainer.step if formed else 0
            kind, value = self._stream(elastic, epoch, formed, step)
            if kind == "stop":
                return value
            epoch, formed = value.epoch, self._form(elastic, value)

    def _form(self, elastic: ElasticRank, msg) -> bool:
        """Form the world of a World message; False if a peer vanished meanwhile."""
        me = self.identity.rank
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
        self.beat.step = elastic.trainer.step
        self.beat.bump()
        print(f"rank {me}: formed world {msg.epoch} of {world.size} ranks at step "
              f"{report.step} in {report.seconds:.2f} s ({msg.reason}); received "
              f"{report.bytes_received} state bytes, sent {report.bytes_sent}, published "
              f"{report.param_bytes} parameter bytes", flush=True)
        if report.finished is not None:
            self._report_finished(report, msg.epoch)
        return True

    def _report_finished(self, report: JoinReport, epoch: int) -> None:
        """A step this rank finished while forming the world (its peers committed it)."""
        f = report.finished
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
            error = comm_failure(lambda m=msg: self._run_step(m, elastic, epoch))
            if error:  # (outside the except block: its traceback holds the group)
                broken = True
                self.beat.todo = 0  # nothing left to compute: it waits on the others now
                elastic.abandon()  # peers blocked on this rank fail now, not at the timeout
                self.client.report_failure(step=msg.step, error=error, recoverable=True,
                                           world_epoch=epoch)
        raise Fenced("the plan stream ended without a stop or a new world")

    def _run_step(self, msg, elastic: ElasticRank, epoch: int) -> None:
        trainer, rank = elastic.trainer, elastic.world.rank_of(self.identity.rank)
        if msg.step != trainer.step:
            raise RuntimeError(f"rank {self.identity.rank}: controller sent step {msg.step} but "
                               f"the trainer is at step {trainer.step}")
        plan = StepPlan.model_validate_json(msg.plan_json)
        victim = ring_victim(plan)
        fault = fault_at(job_id=self.identity.job_id, attempt=self.identity.attempt,
                         slot=self.identity.rank, step=msg.step, life=self.life,
                         ring_slot=elastic.world.members[victim] if victim is not None
                         else None, world=epoch)
        self.beat.todo = len(plan.micro_batches_of(rank))
        self.beat.comm = comm = CommStats()
        kill = perform(fault, trainer, plan, rank)
        if self.beat.fenced.is_set():  # e.g. back from a stall the controller gave up on
            raise Fenced(f"the controller fenced this process off during step {msg.step}")
        self.beat.bump()
        samples = {i: torch.from_numpy(self.dataset[int(msg.sample_ids[i])].astype("int64"))
                   for i in sequence_ids_of_rank(plan, rank)}
        parent = propagate.extract({"traceparent": msg.traceparent} if msg.traceparent else {})
        hook = trainer.model.embed.weight.register_post_accumulate_grad_hook(
            self.beat.micro_batch_done)
        t0 = time.perf_counter()
        try:
            with self.tracer.start_as_current_span("worker.step", context=parent) as span:
                span.set_attributes({"ringmaster.job_id": self.identity.job_id,
                                     "ringmaster.rank": self.identity.rank,
                                     "ringmaster.step": msg.step,
                                     "ringmaster.attempt": self.identity.attempt,
                                     "ringmaster.world_epoch": epoch,
                                     "ringmaster.world_size": elastic.world.size})
                stats = trainer.train_step(plan, samples, comm_stats=comm,
                                           next_position=BatchPosition(
                                               epoch=msg.data_epoch, index=msg.data_index))
        finally:
            hook.remove()
            if kill is not None:
                kill.remove()
        step_time = time.perf_counter() - t0
        self.steps_run += 1
        path = self._checkpoint(msg, trainer, epoch)
        self.beat.step = trainer.step
        self.beat.bump()
        s = stats.stats
        self.client.report_step(step=msg.step, loss=s.loss, num_predictions=s.num_predictions,
                                tokens=s.local_num_tokens,
                                micro_batch_times_s=s.micro_batch_times_s,
                                peak_memory_bytes=s.peak_memory_bytes, step_time_s=step_time,
                                checkpoint_path=path, world_epoch=epoch)

    def _checkpoint(self, msg, trainer, epoch: int) -> str:
        """Save when the plan says so, after asking the controller: a fenced process writes
        nothing (the others' save, a collective, fails without it and is skipped)."""
        if not (msg.checkpoint and self.ckpt_dir):
            return ""
        self.client.heartbeat(step=trainer.step, progress=self.beat.progress)  # or Fenced
        return str(trainer.save(Path(self.ckpt_dir) / f"step_{trainer.step}"))


def _join_attributes(identity: WorkerIdentity, report: JoinReport) -> dict:
    return {"ringmaster.job_id": identity.job_id, "ringmaster.rank": identity.rank,
            "ringmaster.attempt": identity.attempt, "world.epoch": report.world.epoch,
            "world.size": report.world.size, "world.step": report.step,
            "world.bytes_received": report.bytes_received,
            "world.bytes_sent": report.bytes_sent, "world.param_bytes": report.param_bytes,
            "world.finished_step": report.finished.step if report.finished else -1,
            "world.dropped_step": report.dropped_step if report.dropped_step is not None
            else -1, "world.seconds": report.seconds}
