"""POST /v1/jobs:plan returns valid plans of the job's first batches (real HTTP, real planner).

Validity is checked by the foundation's independent plan validator against lengths read
straight from the dataset file, not by anything the preview computed.
"""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from controller.cli import app
from scheduler.batching import epoch_batches
from scheduler.dataset import DatasetWriter, TokenDataset
from scheduler.plan import StepPlan

LENGTHS = [7, 1, 127, 3000, 450, 9000, 64, 1500, 333, 2049, 5, 700, 12000, 90, 2600, 31]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    prefix = tmp_path_factory.mktemp("ds") / "data"
    rng = np.random.default_rng(7)
    with DatasetWriter(prefix) as w:
        for n in LENGTHS:
            w.add(rng.integers(1, 256, size=n))
    return prefix


def job(dataset, **training) -> dict:
    return {"name": "preview", "model": "tiny", "dataset": {"path": str(dataset)},
            "resources": {"num_ranks": 4, "cluster": "cpu", "capacity_tokens": 2048},
            "training": {"steps": 3, "global_batch_tokens": 16384, "seed": 3, **training},
            "planner": {"policy": "hdp", "time_limit_s": 0.05}}


def test_preview_plans_are_valid_for_the_datasets_batches(ctl, dataset):
    ctl.spans.clear()
    r = ctl.client().post("/v1/jobs:plan", json=job(dataset), params={"num_batches": 3,
                                                                      "gantt": True})
    assert r.status_code == 200, r.text
    out = r.json()
    lengths = TokenDataset(dataset).lengths  # independent of the preview's own reading
    batches = epoch_batches(lengths, tokens_per_batch=16384, seed=3)
    assert out["num_samples"] == len(LENGTHS) and out["num_batches_in_epoch"] == len(batches)
    assert len(out["batches"]) == min(3, len(batches))
    for b, ids in zip(out["batches"], batches, strict=False):
        batch = [int(x) for x in lengths[ids]]
        plan = StepPlan.model_validate(b["plan"])
        assert plan.violations(batch) == [], plan.violations(batch)
        assert plan.world_size == 4 and plan.capacity_tokens == 2048
        assert b["num_tokens"] == sum(batch) and b["max_length"] == max(batch)
        assert b["predicted_step_s"] >= b["lower_bound_s"] * (1 - 1e-9) > 0
        # The memory rule (version 2): plain groups hold at most capacity_tokens per
        # member, and every rank's predicted peak fits the device budget.
        assert all(g.max_local_tokens() <= 2048 for _, g in plan.groups()
                   if g.memory.scheme == "plain")
        assert max(b["peak_memory_gib_per_rank"]) * 2**30 <= plan.memory.device_budget_bytes
        assert max(b["peak_tokens_per_rank"]) <= max(g.max_local_tokens()
                                                      for _, g in plan.groups())
        assert sum(b["groups_by_size"].values()) == sum(1 for _ in plan.groups())
    png = base64.b64decode(out["gantt_png_base64"])
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    spans = [s for s in ctl.spans.get_finished_spans() if s.name == "planner.plan_step"]
    assert len(spans) == len(out["batches"])
    attrs = spans[0].attributes
    assert attrs["planner.world_size"] == 4
    assert attrs["planner.solver_status"] in ("optimal", "feasible")
    assert attrs["planner.predicted_makespan_s"] >= attrs["planner.lower_bound_s"] * (1 - 1e-9)


def test_preview_errors_are_422_naming_the_cause(ctl, dataset, tmp_path):
    c = ctl.client()
    missing = job(tmp_path / "nothing")
    r = c.post("/v1/jobs:plan", json=missing)
    assert r.status_code == 422 and "index file not found" in r.json()["error"]["message"]
    too_long = job(dataset)  # 1 token per rank and (almost) no host memory to offload to
    too_long["resources"].update(capacity_tokens=1, cluster=dict(
        num_nodes=1, gpus_per_node=4, gpu_memory_gib=12, achieved_tflops=0.05,
        intra_node_bandwidth_gbps=2, inter_node_bandwidth_gbps=1, pcie_bandwidth_gbps=5,
        host_memory_gib=1e-9))
    r = c.post("/v1/jobs:plan", json=too_long)
    assert r.status_code == 422, r.text
    assert "cannot fit" in r.json()["error"]["message"]
    absurd = job(dataset)
    absurd["resources"] = {"num_ranks": 4, "cluster": dict(
        num_nodes=1, gpus_per_node=4, gpu_memory_gib=1e300, achieved_tflops=1e-300,
        intra_node_bandwidth_gbps=1e-300, inter_node_bandwidth_gbps=1e300,
        pcie_bandwidth_gbps=1e-300, host_memory_gib=1e300)}
    r = c.post("/v1/jobs:plan", json=absurd)
    assert r.status_code == 422 and "out of the range" in r.json()["error"]["message"]
    slow = job(dataset)
    slow["planner"]["time_limit_s"] = 40
    r = c.post("/v1/jobs:plan", json=slow, params={"num_batches": 2})
    assert r.status_code == 422 and "planner.time_limit_s=40" in r.json()["error"]["message"]
    assert c.post("/v1/jobs:plan", json=job(dataset), params={"num_batches": 9}
                  ).status_code == 422


def test_cli_preview_writes_the_gantt_and_prints_the_table(ctl, dataset, tmp_path):
    spec_file = tmp_path / "job.yaml"
    spec_file.write_text(yaml.safe_dump(job(dataset)))
    env = {"RINGMASTER_URL": ctl.url, "RINGMASTER_TOKEN": ctl.token}
    png = tmp_path / "plan.png"
    r = CliRunner().invoke(app, ["preview", str(spec_file), "--num-batches", "1", "--png",
                                 str(png)], env=env)
    assert r.exit_code == 0, r.output
    assert "16 samples, 3 batches/epoch" in r.stdout and "Gantt chart written" in r.stdout
    assert png.read_bytes().startswith(b"\x89PNG")
    r = CliRunner().invoke(app, ["preview", str(spec_file), "-o", "json"], env=env)
    assert r.exit_code == 0 and len(json.loads(r.stdout)["batches"]) == 2


def test_a_model_that_cannot_fit_a_device_is_refused_before_dispatch(ctl, dataset):
    # llama-70b on 80 GB H100s without tensor parallelism: 138 GB of bf16 parameters alone.
    c = ctl.client()
    big = job(dataset) | {"name": "too-big", "model": "llama-70b"}
    big["resources"] = {"num_ranks": 8, "cluster": "h100"}
    for path in ("/v1/jobs:plan", "/v1/jobs"):
        r = c.post(path, json=big)
        assert r.status_code == 422, r.text
        message = r.json()["error"]["message"]
        assert "model states need" in message and "device budget is 72.00 GiB" in message
        assert "77309411328 bytes" in message  # the bytes available, exactly
    assert all(j["name"] != "too-big" for j in c.get("/v1/jobs").json()["jobs"])
