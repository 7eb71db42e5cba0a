"""One rank of one job attempt, driven by the controller over gRPC.

The agent registers (getting the job's worker config and where to resume), restores the
last checkpoint into its rank's trainer when there is one, then runs every plan
the controller streams: read this rank's samples, `Trainer.train_step` under a
`worker.step` span whose parent is the planner's span (W3C context from the plan message),
save a checkpoint when the plan says so, report the step. A heartbeat thread sends the
progress counter (bumped per step); the controller presumes a rank whose counter stops
moving to be stalled. A plan message with `stop` (job done or stop requested) ends the
loop at a step boundary.

Fault injection for tests and drills:
`RINGMASTER_FAULT="stall|crash:rank=R:step=S[:attempt=A][:job=NAME]"` makes rank R hang (or
exit) when it reaches step S of attempt A (default 1) of jobs named NAME (default any).
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

from scheduler.batching import BatchPosition
from scheduler.dataset import TokenDataset
from scheduler.plan import StepPlan
from workers.controller_client import ControllerClient, WorkerIdentity
from workers.data import sequence_ids_of_rank
from workers.train import TrainConfig, Trainer


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
    defaults (by device and world size)."""
    training = cfg["training"]
    steps = int(training["steps"])
    return TrainConfig(lr=float(training["learning_rate"]), total_steps=steps,
                       warmup_steps=min(10, steps // 10),
                       precision=training.get("precision"),
                       optimizer_sharding=training.get("optimizer_sharding"))


def _fault(identity: WorkerIdentity, step: int) -> str | None:
    """The fault RINGMASTER_FAULT asks this rank to simulate at `step`, if any."""
    spec = os.environ.get("RINGMASTER_FAULT", "")
    if not spec:
        return None
    kind, *parts = spec.split(":")
    fields = dict(p.split("=", 1) for p in parts)
    job = fields.get("job")
    hit = (int(fields.get("rank", -1)) == identity.rank and int(fields.get("step", -1)) == step
           and int(fields.get("attempt", 1)) == identity.attempt
           and (job is None or identity.job_id.startswith(job + "-")))
    return kind if hit else None


class _Heartbeat(threading.Thread):
    def __init__(self, client: ControllerClient, interval_s: float):
        super().__init__(name="heartbeat", daemon=True)
        self.client, self.interval_s = client, interval_s
        self.step, self.progress = 0, 0
        self.stop_requested = threading.Event()
        self.fenced = threading.Event()
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(self.interval_s):
            try:
                reply = self.client.heartbeat(step=self.step, progress=self.progress)
            except Exception:  # fenced or controller gone for good: the main loop notices
                self.fenced.set()
                return
            if reply.stop:
                self.stop_requested.set()

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
        if reply.resume_from:
            trainer.restore(reply.resume_from)
        dataset = TokenDataset(cfg["dataset"])
        beat = _Heartbeat(self.client, float(cfg["heartbeat_interval_s"]))
        beat.step = trainer.step
        beat.start()
        steps_run, stopped = 0, False
        try:
            for msg in self.client.plans(from_step=trainer.step):
                if msg.stop:
                    stopped = msg.step < int(cfg["training"]["steps"])
                    break
                self._run_step(msg, trainer, dataset, reply.checkpoint_dir, beat)
                steps_run += 1
        finally:
            beat.close()
            self.client.close()
        return AgentResult(rank=self.identity.rank, steps_run=steps_run,
                           final_step=trainer.step, stopped=stopped)

    def _run_step(self, msg, trainer: Trainer, dataset: TokenDataset, ckpt_dir: str,
                  beat: _Heartbeat) -> None:
        rank = self.identity.rank
        if msg.step != trainer.step:
            raise RuntimeError(f"rank {rank}: controller sent step {msg.step} but the trainer "
                               f"is at step {trainer.step}")
        fault = _fault(self.identity, msg.step)
        if fault == "stall":
            time.sleep(1e9)  # hang like a rank stuck in a collective
        if fault == "crash":
            os._exit(17)
        plan = StepPlan.model_validate_json(msg.plan_json)
        samples = {i: torch.from_numpy(dataset[int(msg.sample_ids[i])].astype("int64"))
                   for i in sequence_ids_of_rank(plan, rank)}
        parent = propagate.extract({"traceparent": msg.traceparent} if msg.traceparent else {})
        t0 = time.perf_counter()
        with self.tracer.start_as_current_span("worker.step", context=parent) as span:
            span.set_attributes({"ringmaster.job_id": self.identity.job_id,
                                 "ringmaster.rank": rank, "ringmaster.step": msg.step,
                                 "ringmaster.attempt": self.identity.attempt})
            stats = trainer.train_step(plan, samples, next_position=BatchPosition(
                epoch=msg.data_epoch, index=msg.data_index))
        step_time = time.perf_counter() - t0
        path = ""
        if msg.checkpoint and ckpt_dir:
            path = str(trainer.save(Path(ckpt_dir) / f"step_{trainer.step}"))
        beat.step, beat.progress = trainer.step, beat.progress + 1
        s = stats.stats
        self.client.report_step(step=msg.step, loss=s.loss, num_predictions=s.num_predictions,
                                tokens=s.local_num_tokens,
                                micro_batch_times_s=s.micro_batch_times_s,
                                peak_memory_bytes=s.peak_memory_bytes, step_time_s=step_time,
                                checkpoint_path=path)
