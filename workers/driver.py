"""Job entrypoint: `python -m workers.driver --job ID --attempt A --controller ADDR`.

The controller's launcher starts one driver per job attempt, detached from the controller
so that the workers outlive a controller restart. The driver registers as the attempt's
driver (rank -1) to learn the job's worker config, joins Ray (`RAY_ADDRESS`, or a local
Ray it starts), starts the worker group (one actor per rank, one global process group),
and has every rank serve the controller's plan stream (workers.agent). It exits when the
ranks do:

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
    except Exception:  # the controller may be away; the exit file still tells
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
    from scheduler.specs import ModelSpec
    from workers.agent import train_config
    from workers.controller_client import ControllerClient, Fenced, WorkerIdentity
    from workers.group import GroupConfig, PlacementError, WorkerError, WorkerGroup

    me = ControllerClient(args.controller, WorkerIdentity(job_id=args.job, attempt=args.attempt,
                                                           rank=DRIVER_RANK))
    try:
        cfg = json.loads(me.register(host=socket.gethostname(), pid=os.getpid()).job_spec_json)
    except Fenced as exc:
        return EXIT_LOST, str(exc), ""
    try:
        config = GroupConfig(num_ranks=int(cfg["num_ranks"]),
                             model=ModelSpec.model_validate(cfg["model"]),
                             model_dir=cfg.get("model_dir"),
                             model_init=cfg.get("model_init") or "random",
                             train=train_config(cfg), seed=int(cfg["training"]["seed"]),
                             env=forwarded_env(), ranks_per_node=cfg.get("ranks_per_node"))
    except (KeyError, ValueError) as exc:
        message = f"worker config is not usable: {' '.join(str(exc).split())}"
        _report(me, message, user=True)
        return EXIT_FAILED, message, INVALID_INPUT
    _init_ray(config.num_ranks)
    try:
        with WorkerGroup(config) as group:
            for rank, node in enumerate(group.node_ids()):
                print(f"rank {rank} runs on ray node {node}", flush=True)
            results = group.run_agents(args.controller, args.job, args.attempt)
    except PlacementError as exc:  # the cluster cannot hold the plan's topology
        return EXIT_FAILED, str(exc)
    except WorkerError as exc:
        _report(me, exc.detail, user=exc.user, rank=exc.rank)
        if exc.user:
            return EXIT_FAILED, str(exc), INVALID_INPUT
        return EXIT_LOST, str(exc), ""
    stopped = any(r.stopped for r in results)
    steps = max(r.final_step for r in results)
    return EXIT_OK, f"{'stopped' if stopped else 'finished'} at step {steps}", ""


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
