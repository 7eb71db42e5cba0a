"""Job entrypoint: `python -m workers.driver --job ID --attempt A --controller ADDR`.

The controller's launcher starts one driver per job attempt, detached from the controller
so that the workers outlive a controller restart. The driver registers as the attempt's
driver (rank -1) to learn the job's worker config, joins Ray (`RAY_ADDRESS`, or a local
Ray it starts), starts the worker group (one actor per rank; it hosts the attempt's
TCPStore, where every world's process group meets) and has every rank serve the
controller's plan stream (workers.agent), which forms the worlds.

Under `failure.mode: replan` (docs/elastic.md) a rank's death does not end the attempt:
the driver names the dead rank to the controller (which re-forms the world without it),
and serves the rank again once Ray has restarted its actor, a replacement that rejoins at
a step boundary; a rank the controller fenced off (stalled) that comes back is served
again the same way, in its own process. The driver exits when the ranks do:

    0  every rank finished (all steps done, or drained after a stop request)
    1  a rank died, failed or was fenced off: the attempt is lost (the job may restart)
    3  the job cannot run as specified (bad worker config, or a rank refused its data or
       config: a RingmasterError): restarting will not help (reason InvalidInput)

and writes `{"code": ..., "message": ..., "reason": ...}` to `--exit-file` first, which is
how the launcher tells these apart after a controller restart. The message is one line
(the full traceback of anything unexpected goes to the driver's log). Before exiting 1 or
3 the driver reports the failure over gRPC with its class (user or infrastructure), so the
job's state says why without waiting for the exit to be noticed.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import traceback
from pathlib import Path

from scheduler.driver_exit import EXIT_FAILED, EXIT_LOST, EXIT_OK, INVALID_INPUT
from scheduler.worker_config import WorkerConfig

DRIVER_RANK = -1
FORWARDED_PREFIXES = ("RINGMASTER_", "OTEL_")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m workers.driver", description=__doc__.split(
        "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--job", required=True, help="the job's id in the controller")
    p.add_argument("--attempt", type=int, default=1, help="attempt number (fencing token)")
    p.add_argument("--controller", required=True, help="controller gRPC address host:port")
    p.add_argument("--exit-file", type=Path, default=None, help="where to write the status")
    return p.parse_args(argv)


def _write_exit(path: Path | None, code: int, message: str, reason: str = "") -> int:
    message = " ".join(message.split())[-4000:]
    if path is not None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"code": code, "message": message, "reason": reason}))
        tmp.replace(path)
    print(f"driver exiting with status {code}: {message}", flush=True)
    return code


def _report(me, exc, *, user: bool, rank: int | None = None) -> None:
    try:
        me.report_failure(step=-1, error=str(exc), user=user, failed_rank=rank)
    except Exception:  # the controller may be away (or fenced us); the exit file tells
        pass


def forwarded_env() -> dict[str, str]:
    """The driver's variables every rank needs too (tracing, fault drills)."""
    return {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_PREFIXES)}


def _init_ray(num_ranks: int) -> None:
    import ray

    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:  # a private local Ray, small enough for a laptop or CI
        ray.init(include_dashboard=False, num_cpus=max(num_ranks, os.cpu_count() or 1),
                 object_store_memory=100_000_000, log_to_driver=True)


def run(args: argparse.Namespace) -> tuple[int, str, str]:
    """The attempt, start to finish; returns (exit code, message, reason)."""
    from workers.controller_client import ControllerClient, Fenced, WorkerIdentity
    from workers.group import PlacementError, WorkerError, WorkerGroup

    me = ControllerClient(args.controller, WorkerIdentity(job_id=args.job, attempt=args.attempt,
                                                           rank=DRIVER_RANK))
    try:
        text = me.register(host=socket.gethostname(), pid=os.getpid()).job_spec_json
    except Fenced as exc:
        return EXIT_LOST, str(exc), ""
    try:  # a WorkerConfigError names the fields; TrainConfig refuses what it cannot run
        config = group_config(WorkerConfig.from_json(text))
    except ValueError as exc:
        message = f"worker config is not usable: {' '.join(str(exc).split())}"
        _report(me, message, user=True)
        return EXIT_FAILED, message, INVALID_INPUT
    _init_ray(config.num_ranks)
    try:
        with WorkerGroup(config, form_world=False) as group:
            for rank, node in enumerate(group.node_ids()):
                print(f"rank {rank} runs on ray node {node}", flush=True)
            if not config.elastic:
                results = group.run_agents(args.controller, args.job, args.attempt)
            else:
                results = serve_elastic(group, me, args)
    except PlacementError as exc:  # the cluster cannot hold the plan's topology
        _report(me, exc, user=False)
        return EXIT_FAILED, str(exc), ""
    except WorkerError as exc:
        _report(me, exc.detail, user=exc.user, rank=exc.rank)
        if exc.user:
            return EXIT_FAILED, str(exc), INVALID_INPUT
        return EXIT_LOST, str(exc), ""
    except Fenced as exc:
        return EXIT_LOST, str(exc), ""
    stopped = any(r.stopped for r in results)
    steps = max((r.final_step for r in results), default=0)
    return EXIT_OK, f"{'stopped' if stopped else 'finished'} at step {steps}", ""


def group_config(cfg: WorkerConfig):
    """The worker group of a worker config: elastic (Ray restarts lost ranks' actors,
    collectives bounded by twice the heartbeat timeout) under failure.mode replan.

    Twice: the controller declares a stalled rank lost after one heartbeat timeout and its
    new world interrupts the survivors blocked on it (ElasticRank.interrupt); their own
    timeout must not fire first, or they would abandon the step at the very moment the
    controller looks for the rank that stopped."""
    from workers.agent import train_config
    from workers.group import GroupConfig

    replan = cfg.failure.mode == "replan"
    return GroupConfig(num_ranks=cfg.num_ranks, model=cfg.model, model_dir=cfg.model_dir,
                       model_init=cfg.model_init, train=train_config(cfg),
                       seed=cfg.training.seed, env=forwarded_env(),
                       ranks_per_node=cfg.ranks_per_node,
                       timeout_s=2 * cfg.failure.heartbeat_timeout_s if replan else 600.0,
                       max_actor_restarts=MAX_ACTOR_RESTARTS if replan else 0)


MAX_ACTOR_RESTARTS = 16  # per rank and attempt; then the rank stays out of the world
DEATH_GRACE_S = 1.0  # how long to wait for more ranks dying with the first one


def serve_elastic(group, me, args: argparse.Namespace) -> list:
    """Every rank serves the controller; a dead or fenced rank is served again."""
    import ray

    launch = _Launcher(group, args)
    for s in range(group.config.num_ranks):
        launch.now(s)
    results = []
    while launch.running or launch.later:
        launch.due()
        ready, _ = ray.wait(list(launch.running), num_returns=1,
                            timeout=1.0 if launch.later else 5.0)
        if ready:  # ranks lost together are reported together: one new world, not two
            rest = [r for r in launch.running if r not in ready]
            ready += ray.wait(rest, num_returns=len(rest), timeout=DEATH_GRACE_S)[0] \
                if rest else []
        dead: list[tuple[int, str]] = []  # (slot, why) of the ranks found dead
        for ref in ready:
            slot = launch.running.pop(ref)
            result = launch.outcome(slot, ref, dead)
            if result is not None and result.fenced:
                me.heartbeat(step=-1, progress=0)  # Fenced here: the attempt is over
                launch.now(slot)  # a stalled rank came back: serve it afresh
            elif result is not None:
                results.append(result)
        if dead:
            me.report_failure(step=-1, error="; ".join(f"rank {s}: {e}" for s, e in dead),
                              lost_ranks=[s for s, _ in dead])
    return results


class _Launcher:
    """The run_agent calls of the driver's ranks, relaunched as Ray restarts their actors."""

    def __init__(self, group, args: argparse.Namespace):
        self.group, self.args = group, args
        self.running: dict = {}  # ref -> slot
        self.later: dict[int, float] = {}  # slot -> when to try again (actor restarting)
        self.deaths = dict.fromkeys(range(group.config.num_ranks), 0)

    def now(self, slot: int) -> None:
        a = self.args
        self.running[self.group.actors[slot].run_agent.remote(a.controller, a.job,
                                                               a.attempt)] = slot

    def due(self) -> None:
        import time

        for slot, at in list(self.later.items()):
            if time.monotonic() >= at:
                del self.later[slot]
                self.now(slot)

    def outcome(self, slot: int, ref, dead: list[tuple[int, str]]):
        """The AgentResult of a finished call, or None (the rank died or is restarting)."""
        import time

        import ray
        from ray.exceptions import RayActorError, RayTaskError

        from workers.group import worker_error

        try:
            return ray.get(ref)
        except RayActorError as exc:
            if "restarting" in str(exc).lower():  # not a new death: Ray is on it
                self.later[slot] = time.monotonic() + 0.5
                return None
            self.deaths[slot] += 1
            dead.append((slot, str(exc).splitlines()[0][:300]))
            if self.deaths[slot] <= MAX_ACTOR_RESTARTS:
                self.now(slot)  # Ray restarts the actor: a replacement
            return None
        except RayTaskError as exc:  # the rank raised: a bug or bad input, not a loss
            raise worker_error(slot, exc) from None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        code, message, reason = run(args)
    except Exception as exc:  # anything unexpected loses the attempt; the policy decides
        traceback.print_exc()  # the whole story in the driver's log; the status says one line
        code, message, reason = EXIT_LOST, f"driver failed: {type(exc).__name__}: {exc}", ""
    return _write_exit(args.exit_file, code, message, reason)


if __name__ == "__main__":
    sys.exit(main())
