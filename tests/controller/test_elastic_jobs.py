"""Elastic jobs end to end (failure.mode replan): real Ray, gRPC, Redis and training.

One local Ray and one controller; five jobs of the tiny model run side by side, each with
its own fault drill (workers.faults, RINGMASTER_FAULT filtered by job name):

- reference: 4 ranks, no fault.
- elastic: 4 ranks; at step 2 the highest rank of the plan's rings SIGKILLs itself as it
  enters its ring, so its ring peers are blocked on it. The job goes on at 3 ranks, the
  restarted rank rejoins, the job succeeds in its first attempt; its per-step losses equal
  the reference's within 1e-6 relative (float32: the two runs differ only in the order of
  the gradient sums, ~1e-7 relative per step), and both end at the same data position
  (read from their final checkpoints).
- multi (float64) and reference64 (float64, no fault): 4 ranks; ranks 1 and 3 of multi
  die at once in step 2 (not adjacent: their optimizer shards survive on their mirrors),
  then rank 2 dies in the middle of forming the world a replacement joins. The job goes
  on and succeeds in its first attempt, and its final parameters (read from the two
  final checkpoints) equal reference64's within 1e-10: every world computes the exact
  full-batch gradient and the optimizer state moves bit for bit, so the runs differ only
  by float64 rounding of the gradient sums (~1e-16 relative) amplified by AdamW (see
  tests/workers/test_elastic.py); a stale or misplaced shard moves weights by ~lr.
- stalled: 3 ranks; rank 1 hangs at step 2 for 3x the heartbeat timeout. It is fenced,
  the others abandon the step within the process-group timeout and go on at 2 ranks; when
  it comes back it is refused and writes nothing, and it rejoins as a new process.
- fallback: 2 ranks whose batches need both (sequences longer than one rank's capacity);
  rank 1 dies, re-planning cannot work, and the job restarts from its checkpoint (attempt
  2) with the reason in a fallback_restart event.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from controller.client import RingmasterClient
from controller.server import Controller, ControllerConfig
from controller.testing import free_port, serving
from scheduler.synth import synthesize
from tests.controller.test_execution import final_losses

pytestmark = [pytest.mark.slow, pytest.mark.distributed, pytest.mark.timeout(900)]

TIMEOUT_S = 20.0  # heartbeat timeout of the jobs whose subject is not a stall
STALL_TIMEOUT_S = 8.0
FAULTS = ",".join([
    "kill:job=elastic:rank=ring:step=2:after=ring",
    "kill:job=multi:rank=1:step=2:after=1", "kill:job=multi:rank=3:step=2:after=1",
    "kill:job=multi:rank=2:at=join",
    f"stall:job=stalled:rank=1:step=2:stall_s={3 * STALL_TIMEOUT_S}",
    "kill:job=fallback:rank=1:step=1:after=1"])


@pytest.fixture(scope="module")
def plane(tmp_path_factory):
    import ray

    ray.init(include_dashboard=False, num_cpus=24, object_store_memory=100_000_000)
    state = tmp_path_factory.mktemp("state")
    env = {"RINGMASTER_FAULT": FAULTS, "OTEL_TRACES_EXPORTER": "none"}
    ctl = Controller(ControllerConfig(
        state_dir=state, launcher="ray", port=0, grpc_port=0, token="t",
        reconcile_interval_s=0.2,
        launcher_options={"ray_address": ray.get_runtime_context().gcs_address,
                          "extra_env": env, "drain_timeout_s": 30, "total_ranks": 24}))
    with serving(ctl, free_port()) as url:
        ctl.start()
        client = RingmasterClient(url, token="t")
        yield client
        client.close()
    for driver in list(ctl.launcher._drivers.values()):  # (jobs may end meanwhile)
        ctl.launcher._kill(driver, grace_s=2)
    ctl.close()
    ray.shutdown()


# The cpu preset with almost no host memory: no sequence can be offloaded, so a sequence
# longer than one rank's capacity needs a ring (the fallback job).
NO_HOST = {"num_nodes": 1, "gpus_per_node": 2, "gpu_memory_gib": 12.0,
           "achieved_tflops": 0.05, "intra_node_bandwidth_gbps": 2.0,
           "inter_node_bandwidth_gbps": 1.0, "pcie_bandwidth_gbps": 5.0,
           "host_memory_gib": 1e-6}


def spec(name: str, data: Path, ckpt: Path, *, ranks: int = 4, steps: int = 7,
         capacity: int = 256, timeout_s: float = TIMEOUT_S, interval: int = 5,
         cluster: str | dict = "cpu", precision: str = "fp32", **failure) -> dict:
    return {
        "name": name, "model": "tiny", "dataset": {"path": str(data)},
        "resources": {"num_ranks": ranks, "cluster": cluster, "capacity_tokens": capacity},
        "training": {"steps": steps, "global_batch_tokens": 1600, "seed": 7,
                     "learning_rate": 3e-3, "checkpoint_dir": str(ckpt),
                     "checkpoint_interval": interval, "precision": precision},
        "planner": {"time_limit_s": 0.2},
        "failure": {"max_restarts": 1, "heartbeat_timeout_s": timeout_s, **failure},
    }


def data_position(checkpoint: str) -> tuple[int, int, int]:
    """(step, data epoch, data index) a checkpoint recorded."""
    import torch
    import torch.distributed.checkpoint as dcp

    progress = {k: torch.tensor(0) for k in ("step", "epoch", "index")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load({"progress": progress}, checkpoint_id=checkpoint, no_dist=True)
    return tuple(int(progress[k]) for k in ("step", "epoch", "index"))


def final_parameters(checkpoint: str) -> dict[str, torch.Tensor]:
    """The model's parameters a checkpoint holds, by name (no model needed)."""
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    meta = dcp.FileSystemReader(checkpoint).read_metadata().state_dict_metadata
    state = {k: torch.empty(tuple(m.size), dtype=m.properties.dtype)
             for k, m in meta.items()
             if k.startswith("model.") and isinstance(m, TensorStorageMetadata)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(state, checkpoint_id=checkpoint, no_dist=True)
    return state


def kinds(events) -> list[tuple[str, tuple[int, ...], int]]:
    return [(e.kind, tuple(e.ranks), e.world_size) for e in events]


def test_lost_ranks_cost_a_step_not_a_restart(plane, tmp_path):
    client = plane
    data = tmp_path / "data"
    synthesize(data, distribution="uniform", num_samples=240, max_length=600, seed=4)
    short = tmp_path / "short"  # every batch holds sequences longer than one rank's capacity
    synthesize(short, distribution="uniform", num_samples=120, max_length=300, seed=5)
    jobs = {  # long enough for the replacements to come back before the jobs end
        "reference": client.submit(spec("reference", data, tmp_path / "a", steps=16)),
        "elastic": client.submit(spec("elastic", data, tmp_path / "b", steps=16)),
        "multi": client.submit(spec("multi", data, tmp_path / "c", steps=16,
                                    max_lost_ranks=2, precision="fp64")),
        "reference64": client.submit(spec("reference64", data, tmp_path / "f", steps=16,
                                          precision="fp64")),
        "stalled": client.submit(spec("stalled", data, tmp_path / "d", ranks=3, steps=24,
                                      timeout_s=STALL_TIMEOUT_S)),
        "fallback": client.submit(spec("fallback", short, tmp_path / "e", ranks=2, steps=4,
                                       capacity=160, interval=1, cluster=NO_HOST)),
    }
    done = {n: client.wait(j.id, timeout_s=600, poll_s=1.0) for n, j in jobs.items()}
    failed = {n: (j.result, j.reason, j.message, [(e.kind, e.ranks, e.reason) for e in
                                                  client.events(j.id).events])
              for n, j in done.items() if j.result != "Succeeded"}
    assert not failed, failed
    events = {n: client.events(j.id).events for n, j in jobs.items()}
    assert events["reference"] == events["reference64"] == []
    assert done["reference"].attempt == done["reference64"].attempt == 1

    # elastic: one rank lost mid-step, 3 ranks, the rank back, the same training.
    lost = tuple(events["elastic"][0].ranks)
    assert kinds(events["elastic"]) == [("rank_lost", lost, 3), ("world_shrunk", lost, 3),
                                        ("rank_joined", lost, 4)]
    assert "died" in events["elastic"][0].reason and events["elastic"][0].step == 2
    assert done["elastic"].attempt == 1 and done["elastic"].world.size == 4
    ref, got = (final_losses(client, jobs[n].id) for n in ("reference", "elastic"))
    assert sorted(got) == sorted(ref) == list(range(16))
    assert [got[s] for s in ref] == pytest.approx([ref[s] for s in ref], rel=1e-6, abs=0)
    sizes = {m.step: m.world_size for m in client.metrics(jobs["elastic"].id).steps}
    assert sizes[0] == sizes[15] == 4 and 3 in sizes.values()
    assert data_position(done["elastic"].last_checkpoint) == \
        data_position(done["reference"].last_checkpoint)

    # multi: two lost at once, one lost while others rejoined, and back to 4 ranks.
    multi = kinds(events["multi"])
    assert multi[:2] == [("rank_lost", (1, 3), 2), ("world_shrunk", (1, 3), 2)]
    third = next(i for i, e in enumerate(events["multi"]) if e.ranks == [2])
    assert events["multi"][third].kind == "rank_lost"
    assert events["multi"][third - 1].kind == "rank_joined"  # it died as they joined
    assert done["multi"].attempt == 1 and done["multi"].world.size == 4
    want, got = (final_parameters(done[n].last_checkpoint) for n in ("reference64", "multi"))
    assert sorted(got) == sorted(want) and len(want) > 3
    assert all(got[k].dtype == torch.float64 for k in got)
    assert max(float((got[k] - want[k]).abs().max()) for k in want) <= 1e-10
    first = final_parameters(str(Path(done["multi"].last_checkpoint).parent / "step_5"))
    assert max(float((got[k] - first[k]).abs().max()) for k in want) > 1e-3  # it trained

    # stalled: fenced, the others went on, it came back refused and rejoined afresh.
    stalled = kinds(events["stalled"])
    logs = [line.text for line in client.logs(jobs["stalled"].id, tail=1000).lines]
    assert stalled[:2] == [("rank_lost", (1,), 2), ("world_shrunk", (1,), 2)], \
        ([e.reason for e in events["stalled"]], logs[-60:])
    assert "no progress" in events["stalled"][0].reason and stalled[-1][0] == "rank_joined", \
        ([(e.kind, e.ranks, e.reason) for e in events["stalled"]], logs[-80:])
    assert any("rank 1 (incarnation" in t and "fenced off, stopping without writing" in t
               for t in logs)
    assert done["stalled"].attempt == 1

    # fallback: the batch needs both ranks, so the job restarts from its checkpoint.
    fb = events["fallback"]
    assert kinds(fb) == [("rank_lost", (1,), 1), ("world_shrunk", (1,), 1),
                         ("fallback_restart", (), 1)]
    assert "step 1's batch does not fit 1 ranks" in fb[-1].reason
    assert done["fallback"].attempt == 2
