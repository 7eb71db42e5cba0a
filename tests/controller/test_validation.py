"""Submit and preview share one validation: bad datasets, vocab, capacity, checkpoint dirs.

Against a real controller (embedded Redis, FakeLauncher with 64 ranks) over HTTP. Each
refusal is checked at submit (nothing is stored) and at preview (the same message).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest

from scheduler.checkpoint_owner import CheckpointOwner, read_owner, write_owner
from scheduler.dataset import DatasetWriter
from tests.controller.harness import DEMO_SPEC


def spec_with(**sections) -> dict:
    out = copy.deepcopy(DEMO_SPEC)
    for key, value in sections.items():
        out[key] = {**out.get(key, {}), **value} if isinstance(value, dict) else value
    return out


def write_dataset(path: Path, samples: list[list[int]]) -> Path:
    with DatasetWriter(path / "data") as w:
        for s in samples:
            w.add(np.array(s, dtype=np.int64))
    return path


def refused(ctl, body: dict, status: int = 422) -> dict:
    """The error of both submit and preview, which must agree; nothing was stored."""
    c = ctl.client()
    before = c.get("/v1/jobs").json()["total"]
    sub, plan = c.post("/v1/jobs", json=body), c.post("/v1/jobs:plan", json=body)
    assert sub.status_code == status, sub.text
    assert plan.status_code == status, plan.text
    assert sub.json()["error"]["message"] == plan.json()["error"]["message"]
    assert c.get("/v1/jobs").json()["total"] == before
    return sub.json()["error"]


@pytest.mark.parametrize("damage", ["no index", "truncated bin", "bad magic"])
def test_a_bad_dataset_is_a_422_at_submit(ctl, tmp_path, damage):
    data = write_dataset(tmp_path / "ds", [[1, 2, 3, 4]] * 5)
    if damage == "no index":
        (data / "data.idx").unlink()
    elif damage == "truncated bin":
        raw = (data / "data.bin").read_bytes()
        (data / "data.bin").write_bytes(raw[:-4])
    else:
        (data / "data.idx").write_bytes(b"garbage!" + (data / "data.idx").read_bytes()[8:])
    err = refused(ctl, spec_with(dataset={"path": str(data)}))
    assert err["details"][0]["field"] == "dataset.path"
    expected = {"no index": "index file not found", "truncated bin": "truncated",
                "bad magic": "bad magic"}[damage]
    assert expected in err["message"] and "\n" not in err["message"]


@pytest.mark.parametrize("manifest", [True, False], ids=["manifest", "scan"])
def test_token_ids_beyond_the_vocab_are_refused_at_submit(ctl, tmp_path, manifest):
    # tiny has vocab_size 256: id 256 is one past the last valid one.
    data = write_dataset(tmp_path / "ds", [[5, 6, 7], [1, 256, 2], [3, 4]])
    if not manifest:  # a dataset without a manifest is scanned
        (data / "data.json").unlink()
    err = refused(ctl, spec_with(dataset={"path": str(data)}))
    assert err["details"][0]["field"] == "dataset.path"
    assert "token id 256" in err["message"] and "vocab_size is 256" in err["message"]


def test_the_manifest_max_token_id_is_trusted_only_when_it_matches(ctl, tmp_path):
    data = write_dataset(tmp_path / "ds", [[5, 6, 7], [1, 300, 2]])
    m = json.loads((data / "data.json").read_text())
    (data / "data.json").write_text(json.dumps({**m, "max_token_id": 7, "num_tokens": 99}))
    err = refused(ctl, spec_with(dataset={"path": str(data)}))
    assert "token id 300" in err["message"]  # a stale manifest: the scan decides


def test_a_job_larger_than_the_launchers_capacity_is_refused(ctl):
    err = refused(ctl, spec_with(resources={"num_ranks": 65, "cluster": "cpu"}))
    assert err["details"][0]["field"] == "resources.num_ranks"
    assert "at most 64 ranks" in err["message"]


def test_a_pending_job_says_what_it_waits_for(ctl):
    c = ctl.client()
    big = c.post("/v1/jobs", json=spec_with(name="big", resources={"num_ranks": 60})).json()
    small = c.post("/v1/jobs", json=spec_with(name="small",
                                              resources={"num_ranks": 8})).json()
    ctl.controller.machine.tick()
    waiting = c.get(f"/v1/jobs/{small['id']}").json()
    assert waiting["phase"] == "Pending" and waiting["reason"] == "AwaitingAdmission"
    assert waiting["message"] == "waiting for 8 free ranks: 60 of 64 are in use"
    for job in (big, small):
        c.post(f"/v1/jobs/{job['id']}:stop")
    ctl.controller.machine.tick()


def fake_checkpoint(directory: Path, step: int, owner: str | None) -> Path:
    (directory / f"step_{step}").mkdir(parents=True)
    (directory / f"step_{step}" / ".metadata").write_bytes(b"dcp")
    if owner:
        write_owner(directory, CheckpointOwner(job_id=owner, job_name="first"))
    return directory


def test_a_checkpoint_dir_of_another_job_is_refused_unless_resumed(ctl, tmp_path):
    c = ctl.client()
    ckpt = tmp_path / "ckpt"
    first = c.post("/v1/jobs", json=spec_with(name="first", training={
        "checkpoint_dir": str(ckpt)})).json()
    # While the first job is active its directory is taken, even before its workers wrote
    # anything ...
    err = refused(ctl, spec_with(name="second", training={"checkpoint_dir": str(ckpt)}),
                  status=409)
    assert err["details"][0]["field"] == "training.checkpoint_dir"
    assert first["id"] in err["message"] and "has not finished" in err["message"]
    # ... and once they saved step_4 and claimed it, resume_from cannot take it over either.
    fake_checkpoint(ckpt, 4, owner=first["id"])
    err = refused(ctl, spec_with(name="second", training={"checkpoint_dir": str(ckpt),
                                                          "resume_from": str(ckpt)}), status=409)
    assert "has not finished" in err["message"]
    c.post(f"/v1/jobs/{first['id']}:stop")
    ctl.controller.machine.tick()
    assert c.get(f"/v1/jobs/{first['id']}").json()["result"] == "Stopped"

    # Finished, it left step_4 and its owner record: a fresh job may not mix into it ...
    err = refused(ctl, spec_with(name="second", training={"checkpoint_dir": str(ckpt)}),
                  status=409)
    assert f"job {first['id']}" in err["message"] and "training.resume_from" in err["message"]
    # ... but may continue that run by naming it.
    body = spec_with(name="second", training={"checkpoint_dir": str(ckpt),
                                              "resume_from": str(ckpt)})
    second = c.post("/v1/jobs", json=body)
    assert second.status_code == 201, second.text
    job = second.json()
    assert job["last_checkpoint"] == str(ckpt / "step_4")
    assert job["last_checkpoint_step"] == 4 and job["steps_completed"] == 4
    c.post(f"/v1/jobs/{job['id']}:stop")
    ctl.controller.machine.tick()


def test_resume_from_must_name_a_checkpoint_with_steps_left(ctl, tmp_path):
    err = refused(ctl, spec_with(training={"resume_from": str(tmp_path / "nothing")}))
    assert err["details"][0]["field"] == "training.resume_from"
    ckpt = fake_checkpoint(tmp_path / "c", 10, owner=None)
    err = refused(ctl, spec_with(training={"resume_from": str(ckpt), "steps": 10}))
    assert err["details"][0]["field"] == "training.steps"
    assert "step 10" in err["message"]


def test_an_unowned_directory_with_checkpoints_is_refused(ctl, tmp_path):
    ckpt = fake_checkpoint(tmp_path / "old", 2, owner=None)
    err = refused(ctl, spec_with(training={"checkpoint_dir": str(ckpt)}), status=409)
    assert "no owner record" in err["message"]
    assert read_owner(ckpt) is None  # the controller only reads the directory


def test_cluster_figures_the_cost_model_cannot_hold_are_a_422_at_submit(ctl):
    absurd = spec_with(resources={"num_ranks": 4, "cluster": dict(
        num_nodes=1, gpus_per_node=4, gpu_memory_gib=1e300, achieved_tflops=1e-300,
        intra_node_bandwidth_gbps=1e-300, inter_node_bandwidth_gbps=1e300,
        pcie_bandwidth_gbps=1e-300, host_memory_gib=1e300)})
    assert "out of the range" in refused(ctl, absurd)["message"]


def test_the_ray_launchers_capacity_is_the_cpus_unless_overridden(tmp_path, monkeypatch):
    from controller.edge import FieldError
    from controller.launchers.ray import RayLauncher, local_cpu_count
    from controller.spec import parse_job_spec

    monkeypatch.delenv("RINGMASTER_MAX_RANKS", raising=False)
    cpus = local_cpu_count()
    assert 1 <= cpus <= len(__import__("os").sched_getaffinity(0))
    assert RayLauncher(state_dir=tmp_path, controller_address="x").total_ranks == cpus
    monkeypatch.setenv("RINGMASTER_MAX_RANKS", "3")
    launcher = RayLauncher(state_dir=tmp_path, controller_address="x")
    big = parse_job_spec(spec_with(resources={"num_ranks": 4}))
    with pytest.raises(FieldError, match="at most 3 ranks at once .*RINGMASTER_MAX_RANKS"):
        launcher.check_spec(big)
    assert RayLauncher(state_dir=tmp_path, controller_address="x",
                       total_ranks=4).check_spec(big) is None
    monkeypatch.setenv("RINGMASTER_MAX_RANKS", "many")
    with pytest.raises(ValueError, match="RINGMASTER_MAX_RANKS='many'"):
        RayLauncher(state_dir=tmp_path, controller_address="x")
