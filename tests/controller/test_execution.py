"""The execution plane end to end: real Ray, real gRPC, real Redis, real training.

One local Ray per module (the drivers join it through RAY_ADDRESS, as they would join a
cluster), one controller with the Ray launcher. Jobs of the tiny model on 2 CPU ranks run
side by side: an uninterrupted job, one whose rank process is killed with SIGKILL after a
checkpoint, one whose rank stalls (simulated hang in a collective), one stopped midway; and
a controller process SIGKILLed while its job trains. Worker spans reach a trace file, so
the trace from REST into each rank's step can be checked.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from controller.client import RingmasterClient
from controller.server import Controller, ControllerConfig
from controller.telemetry import make_tracer_provider
from controller.testing import free_port, serving
from scheduler.synth import synthesize
from scheduler.telemetry import read_trace_file

pytestmark = [pytest.mark.slow, pytest.mark.distributed, pytest.mark.timeout(600)]

HEARTBEAT_TIMEOUT_S = 20.0  # a restore of 4 jobs at once on a loaded 2-core box fits
STALL = "stall:job=stalled:rank=0:step=2"


@pytest.fixture(scope="module")
def ray_address():
    import ray

    ray.init(include_dashboard=False, num_cpus=8, object_store_memory=100_000_000)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data")
    synthesize(out, distribution="uniform", num_samples=200, max_length=300, seed=4)
    return out


def job_spec(name: str, data_dir: Path, ckpt: Path, *, steps: int = 6,
             heartbeat_timeout_s: float = HEARTBEAT_TIMEOUT_S, **training) -> dict:
    return {
        "name": name, "model": "tiny", "dataset": {"path": str(data_dir)},
        "resources": {"num_ranks": 2, "cluster": "cpu", "capacity_tokens": 256},
        "training": {"steps": steps, "global_batch_tokens": 1200, "seed": 7,
                     "learning_rate": 3e-3, "checkpoint_dir": str(ckpt),
                     "checkpoint_interval": 2, **training},
        "planner": {"time_limit_s": 0.2},
        # Restart-from-checkpoint recovery (elastic recovery: tests/controller/
        # test_elastic_jobs.py).
        "failure": {"max_restarts": 2, "heartbeat_timeout_s": heartbeat_timeout_s,
                    "mode": "restart"},
    }


@pytest.fixture(scope="module")
def plane(tmp_path_factory, ray_address):
    state = tmp_path_factory.mktemp("state")
    trace_file = state / "trace.jsonl"
    spans = InMemorySpanExporter()
    env = {"RINGMASTER_TRACE_FILE": str(trace_file), "RINGMASTER_FAULT": STALL,
           "OTEL_TRACES_EXPORTER": "none"}
    ctl = Controller(ControllerConfig(state_dir=state, launcher="ray", port=0,
                                      grpc_port=0, token="t", reconcile_interval_s=0.2,
                                      launcher_options={"ray_address": ray_address,
                                                        "total_ranks": 8,
                                                        "extra_env": env,
                                                        "drain_timeout_s": 60}),
                     tracer_provider=make_tracer_provider(exporters=[spans], synchronous=True))
    with serving(ctl, free_port()) as url:
        ctl.start()
        client = RingmasterClient(url, token="t")
        yield dict(client=client, ctl=ctl, spans=spans, trace_file=trace_file, state=state)
        client.close()
    for job_id in list(ctl.launcher._drivers):
        ctl.launcher._kill(ctl.launcher._drivers[job_id], grace_s=2)
    ctl.close()


def wait_for(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise TimeoutError(f"timed out after {timeout_s} s waiting for {what}")


def final_losses(client: RingmasterClient, job_id: str) -> dict[int, float]:
    """Loss of each step as last reported (a re-run step overwrites the lost attempt's)."""
    out = {}
    for m in sorted(client.metrics(job_id).steps, key=lambda m: (m.step, m.attempt)):
        out[m.step] = m.loss
    return out


def rank_pid(client: RingmasterClient, job_id: str, rank: int, attempt: int) -> int | None:
    pattern = re.compile(rf"rank {rank} registered from \S+ pid (\d+) \(attempt {attempt}[,)]")
    for line in client.logs(job_id, tail=200).lines:
        m = pattern.search(line.text)
        if m:
            return int(m.group(1))
    return None


def tokens_beyond_the_vocab(data_dir: Path, out: Path) -> Path:
    """A copy of the dataset with token id 300 (tiny's vocab is 256) in every sample, whose
    manifest still claims the old largest id: submit trusts a manifest that matches the
    index, so only the workers' own check can catch it."""
    shutil.copytree(data_dir, out)
    tokens = np.memmap(out / "data.bin", dtype="<u4", mode="r+")
    offsets = np.frombuffer((out / "data.idx").read_bytes()[24:], dtype="<u8")
    tokens[offsets[:-1].astype(np.int64)] = 300  # the first token of every sample
    tokens.flush()
    return out


def test_jobs_survive_killed_and_stalled_ranks(plane, data_dir, tmp_path, caplog):
    client = plane["client"]
    straight = client.submit(job_spec("straight", data_dir, tmp_path / "a",
                                      tensorboard_dir=str(tmp_path / "tb")))
    killed = client.submit(job_spec("killed", data_dir, tmp_path / "b"))
    stalled = client.submit(job_spec("stalled", data_dir, tmp_path / "c"))
    bad = client.submit(job_spec("badtokens", tokens_beyond_the_vocab(data_dir, tmp_path / "d"),
                                 tmp_path / "e"))

    # SIGKILL rank 1's process of the `killed` job once it has checkpointed step 2.
    wait_for(lambda: client.get(killed.id).last_checkpoint_step, 240, "a checkpoint")
    pid = rank_pid(client, killed.id, 1, attempt=1)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)

    # Bad data fails fast: one attempt though max_restarts is 2, one line, no traceback.
    failed = client.wait(bad.id, timeout_s=400, poll_s=0.5)
    assert (failed.result, failed.reason, failed.attempt) == ("Failed", "InvalidInput", 1)
    assert "token id 300" in failed.message and "vocab_size is 256" in failed.message
    assert "\n" not in failed.message and failed.message.endswith(
        f"(logs: ringmaster logs {bad.id})")
    assert not [r for r in caplog.records if r.exc_info or "Exception calling" in
                r.getMessage()]

    # A new job continues the straight run from its step 4 (model, optimizer, data
    # position), in a directory of its own.
    client.wait(straight.id, timeout_s=400, poll_s=0.5)
    continued = client.submit(job_spec("continued", data_dir, tmp_path / "f",
                                       resume_from=str(tmp_path / "a" / "step_4")))
    jobs = {j.id: client.wait(j.id, timeout_s=400, poll_s=0.5) for j in (straight, killed,
                                                                        stalled, continued)}
    assert all(j.result == "Succeeded" for j in jobs.values()), \
        {j.name: (j.result, j.reason, j.message) for j in jobs.values()}
    assert jobs[straight.id].attempt == 1
    assert jobs[killed.id].attempt == 2 and jobs[stalled.id].attempt == 2

    # Same data, seed and plans: the restarted job retrains from its checkpoint and ends
    # with the same per-step losses as the uninterrupted one. Tolerance: float32 training
    # where the resumed run restores exact state (bit-identical in practice); 1e-5 allows
    # for a plan that differs in reduction order after a re-plan.
    ref = final_losses(client, straight.id)
    assert sorted(ref) == list(range(6))
    for job in (killed, stalled):
        got = final_losses(client, job.id)
        assert sorted(got) == list(range(6))
        for step in ref:
            assert got[step] == pytest.approx(ref[step], rel=1e-5), (job.name, step)
    resumed = final_losses(client, continued.id)
    assert sorted(resumed) == [4, 5] and jobs[continued.id].attempt == 1
    assert [resumed[s] for s in (4, 5)] == pytest.approx([ref[4], ref[5]], rel=1e-5)

    # The job's log has a line per step (from every rank's reports) and rank 0's
    # checkpoint lines; TensorBoard got the same losses.
    lines = client.logs(straight.id, tail=500).lines
    step_lines = [x.text for x in lines if re.match(r"step \d+/6: loss ", x.text)]
    assert [int(t.split("/")[0].split()[1]) for t in step_lines] == list(range(1, 7))
    for text, loss in zip(step_lines, (ref[s] for s in range(6)), strict=True):
        assert f"loss {loss:.4f}," in text and "tokens/s" in text and "MiB" in text
    assert {(x.rank, x.text.split(" saved")[0]) for x in lines if "saved to" in x.text} == {
        (0, f"checkpoint of step {n}") for n in (2, 4, 6)}
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    scalars = events.Scalars("train/loss")
    assert [e.step for e in scalars] == list(range(1, 7))
    assert [e.value for e in scalars] == pytest.approx([ref[s] for s in range(6)], rel=1e-6)
    assert {"train/tokens_per_s", "train/step_time_s", "train/peak_memory_gib",
            "train/learning_rate", "train/grad_norm"} <= set(events.Tags()["scalars"])

    # The stall was found within twice the heartbeat timeout of the rank's last progress.
    transitions = client.get(stalled.id).transitions
    lost = next(t for t in transitions if t.reason == "WorkerLost")
    assert "no progress" in lost.message
    step1 = next(m for m in client.metrics(stalled.id).steps if m.step == 1 and m.attempt == 1)
    assert (lost.at - step1.at).total_seconds() <= 2 * HEARTBEAT_TIMEOUT_S

    # One trace from the REST submission through job.schedule and the planner into the
    # workers' steps, for every attempt.
    spans = plane["spans"].get_finished_spans()
    submit = next(s for s in spans if s.name.startswith("POST /v1/jobs")
                  and s.attributes.get("http.status_code", 201) in (200, 201)
                  and s.context.trace_id in {x.context.trace_id for x in spans
                                             if x.name == "job.schedule"
                                             and x.attributes["job.id"] == straight.id})
    trace_id = f"0x{submit.context.trace_id:032x}"
    names = {s.name for s in spans if s.context.trace_id == submit.context.trace_id}
    assert {"job.schedule", "planner.plan_step"} <= names
    worker_steps = [s for s in read_trace_file(plane["trace_file"])
                    if s["name"] == "worker.step"
                    and s["attributes"]["ringmaster.job_id"] == straight.id]
    assert len(worker_steps) == 2 * 6
    assert {s["context"]["trace_id"] for s in worker_steps} == {trace_id}


def test_stop_drains_at_a_step_boundary(plane, data_dir, tmp_path):
    client = plane["client"]
    job = client.submit(job_spec("stopped", data_dir, tmp_path, steps=10_000))
    wait_for(lambda: client.get(job.id).current_step >= 1, 240, "two steps")
    client.stop(job.id)
    done = client.wait(job.id, timeout_s=120, poll_s=0.5)
    assert done.result == "Stopped" and done.reason == "StopRequested"
    assert any("driver exiting with status 0: stopped" in line.text
               for line in client.logs(job.id, tail=50).lines)


def start_serve(state: Path, port: int, grpc_port: int, ray_address: str) -> subprocess.Popen:
    env = {**os.environ, "RAY_ADDRESS": ray_address, "OTEL_TRACES_EXPORTER": "none",
           "RINGMASTER_TOKEN": "serve-token", "RINGMASTER_MAX_RANKS": "8"}
    env.pop("RINGMASTER_FAULT", None)
    return subprocess.Popen(
        [sys.executable, "-c", "from controller.cli import main; main()", "serve",
         "--port", str(port), "--grpc-port", str(grpc_port), "--state-dir", str(state),
         "--log-level", "warning"], env=env, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, start_new_session=True)


@pytest.mark.timeout(1500)
def test_controller_killed_mid_run_and_restarted(ray_address, data_dir, tmp_path):
    """Stalls are not what this tests: a heartbeat timeout no step reaches even on a box
    whose cores are busy with other work (a tiny step then takes 20 s and more)."""
    state, port, grpc_port = tmp_path / "state", free_port(), free_port()
    proc = start_serve(state, port, grpc_port, ray_address)
    client = RingmasterClient(f"http://127.0.0.1:{port}", token="serve-token", timeout_s=30)
    try:
        wait_for(client.health, 300, "the controller")
        job = client.submit(job_spec("survivor", data_dir, tmp_path / "ckpt", steps=8,
                                     heartbeat_timeout_s=300))
        wait_for(lambda: client.get(job.id).current_step >= 2, 600, "step 2")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        proc = start_serve(state, port, grpc_port, ray_address)
        wait_for(client.health, 300, "the restarted controller")
        done = client.wait(job.id, timeout_s=900, poll_s=0.5)
        assert done.result == "Succeeded" and done.attempt == 1, \
            [(t.reason, t.message) for t in client.get(job.id).transitions]
        # Reports made while the controller was down were retried until it came back.
        assert {m.step for m in client.metrics(job.id).steps} == set(range(8))
    finally:
        client.close()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


# ----------------------------------------------------------------- objectives end to end
ANSWER_VOCAB, SEPARATOR = 16, 200


def sft_corpus(path: Path, *, num_samples: int = 300, seed: int = 0) -> Path:
    """Prompts of 24 random tokens from {1..16}, a separator, then an 8-token answer that
    counts up from a random start (mod 16) with the loss mask on the answer only.

    The answer is learnable from the previous token alone; the prompt's tokens, from the
    same vocabulary, follow each other at random. Trained on the answers only (sft), a
    tiny model learns the successor rule within a few steps; trained on every token
    (pretrain), the same number of steps is spent mostly on 24 unpredictable prompt tokens
    per 8 answer tokens, whose transitions contradict the rule, so its answer loss stays
    near log 16. That gap (several nats at 10 steps, see the test) is the signal.
    """
    from scheduler.dataset import DatasetWriter

    rng = np.random.default_rng(seed)
    with DatasetWriter(path / "data") as w:
        for _ in range(num_samples):
            start = int(rng.integers(0, ANSWER_VOCAB))
            answer = (start + np.arange(8)) % ANSWER_VOCAB + 1
            prompt = rng.integers(1, ANSWER_VOCAB + 1, size=24)
            w.add(np.r_[prompt, SEPARATOR, answer], kind="sft",
                  loss_mask=np.r_[np.zeros(25), np.ones(8)].astype(np.uint8))
    return path


def answer_loss(checkpoint: Path, data: Path) -> float:
    """Mean next-token CE of a checkpoint's model over the corpus's answer tokens (plain
    torch, float64 logits)."""
    import torch
    import torch.nn.functional as F

    from scheduler.dataset import TokenDataset
    from workers.export import load_checkpoint_model

    model, ds = load_checkpoint_model(checkpoint), TokenDataset(data)
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(ds), 5):
            tokens = torch.from_numpy(ds[i].astype(np.int64))
            mask = torch.from_numpy(ds.loss_mask(i).astype(bool))[1:]
            logits = model(tokens, torch.tensor([0, len(tokens)], dtype=torch.int32))
            ce = F.cross_entropy(logits[:-1].double(), tokens[1:], reduction="none")
            total, count = total + float(ce[mask].sum()), count + int(mask.sum())
    return total / count


def test_sft_job_learns_the_answers_better_than_pretraining(plane, tmp_path):
    """The same job twice through the REST API, objective sft and pretrain: the masked job
    ends with a lower loss on the answer tokens than the unmasked baseline."""
    client = plane["client"]
    data = sft_corpus(tmp_path / "sft-data")
    steps, jobs = 12, {}
    for objective in ("sft", "pretrain"):
        spec = job_spec(f"obj-{objective}", data, tmp_path / objective, steps=steps)
        spec["training"].update(global_batch_tokens=600, learning_rate=1e-2)
        jobs[objective] = client.submit({**spec, "objective": {"type": objective}})
    done = {k: client.wait(j.id, timeout_s=400, poll_s=0.5) for k, j in jobs.items()}
    assert all(j.result == "Succeeded" for j in done.values()), \
        {k: (j.result, j.reason, j.message) for k, j in done.items()}
    loss = {k: answer_loss(tmp_path / k / f"step_{steps}", data) for k in jobs}
    assert loss["sft"] < 0.75 * loss["pretrain"], loss
    # The sft job's own reported loss is the masked loss: it falls as the answers are learnt.
    reported = final_losses(client, jobs["sft"].id)
    assert reported[steps - 1] < 0.75 * reported[0], reported


def dpo_corpus(path: Path, reference: Path, *, num_pairs: int = 150, seed: int = 1) -> Path:
    """Pairs sharing a 16-token random prompt and separator: the chosen answer counts up
    (the successor rule of `sft_corpus`), the rejected one is random; the loss mask on the
    answers. The reference log-probs come from `ringmaster data ref-logps`' job under a
    random tiny model saved at `reference`."""
    from scheduler.dataset import DatasetWriter
    from workers.ref_logps import main as ref_logps

    rng = np.random.default_rng(seed)
    mask = np.r_[np.zeros(17), np.ones(8)].astype(np.uint8)
    with DatasetWriter(path / "data") as w:
        for p in range(num_pairs):
            prompt = np.r_[rng.integers(1, ANSWER_VOCAB + 1, size=16), SEPARATOR]
            chosen = (int(rng.integers(0, ANSWER_VOCAB)) + np.arange(8)) % ANSWER_VOCAB + 1
            rejected = rng.integers(1, ANSWER_VOCAB + 1, size=8)
            for role, answer in (("chosen", chosen), ("rejected", rejected)):
                w.add(np.r_[prompt, answer], kind="dpo", pair_id=p, role=role, loss_mask=mask)
    assert ref_logps([str(path), "--model", str(reference), "--capacity-tokens", "256"]) == 0
    return path


def preference_accuracy(checkpoint: Path, data: Path) -> float:
    """Share of pairs whose implicit reward (policy minus stored reference log-prob of
    the answer) is higher for the chosen answer (plain torch, float64 log-softmax)."""
    import torch

    from scheduler.dataset import TokenDataset
    from workers.export import load_checkpoint_model

    model, ds = load_checkpoint_model(checkpoint), TokenDataset(data)
    rewards = []
    with torch.no_grad():
        for i in range(len(ds)):
            tokens = torch.from_numpy(ds[i].astype(np.int64))
            logits = model(tokens, torch.tensor([0, len(tokens)], dtype=torch.int32))
            lp = logits[:-1].double().log_softmax(-1).gather(1, tokens[1:, None])[:, 0]
            mask = torch.from_numpy(ds.loss_mask(i).astype(bool))[1:]
            ref = torch.from_numpy(ds.column("ref_logps", i).astype(np.float64))[1:]
            rewards.append(float((lp - ref)[mask].sum()))
    chosen, rejected = np.array(rewards[0::2]), np.array(rewards[1::2])
    return float((chosen > rejected).mean())


def test_dpo_job_learns_the_preferred_answers(plane, tmp_path):
    """A DPO job through the REST API on pairs with reference log-probs from the
    forward-only job: its reported loss falls from about log 2 and the trained model
    prefers the chosen answer on most pairs."""
    import torch

    from scheduler.specs import model_preset
    from workers.hf import save_pretrained
    from workers.model import Transformer

    torch.manual_seed(11)
    reference = save_pretrained(Transformer(model_preset("tiny")), tmp_path / "reference")
    client, steps = plane["client"], 12
    data = dpo_corpus(tmp_path / "dpo-data", reference)
    spec = job_spec("obj-dpo", data, tmp_path / "dpo", steps=steps)
    spec["training"].update(global_batch_tokens=600, learning_rate=1e-2)
    job = client.submit({**spec, "objective": {"type": "dpo", "beta": 0.5}})
    done = client.wait(job.id, timeout_s=400, poll_s=0.5)
    assert done.result == "Succeeded", (done.result, done.reason, done.message)
    reported = final_losses(client, job.id)
    assert reported[steps - 1] < 0.6 * reported[0], reported
    assert preference_accuracy(tmp_path / "dpo" / f"step_{steps}", data) > 0.9
