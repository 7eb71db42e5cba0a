"""The controller -> workers configuration (scheduler.worker_config.WorkerConfig): what the
controller sends for a real job spec is what the agent and the driver read, typed, on the
same wire format as the hand-built JSON before it; a config with a field too many, one
missing or of the wrong type is refused naming that field.
"""

from __future__ import annotations

import json

import pytest

from controller.spec import parse_job_spec
from controller.states import JobRecord, State
from controller.worker_service import worker_config_json
from scheduler.errors import RingmasterError, SpecError
from scheduler.objective import GrpoObjective
from scheduler.specs import ModelSpec
from scheduler.synth import synthesize
from scheduler.worker_config import WorkerConfig, WorkerConfigError


def real_job(tmp_path) -> JobRecord:
    synthesize(tmp_path / "data", distribution="uniform", num_samples=20, max_length=200,
               seed=1)
    spec = parse_job_spec({
        "name": "typed", "model": "tiny", "dataset": {"path": str(tmp_path / "data")},
        "resources": {"num_ranks": 2, "cluster": "cpu", "gpus_per_node": 1},
        "training": {"steps": 40, "global_batch_tokens": 1024, "learning_rate": 3e-4,
                     "seed": 7, "checkpoint_dir": str(tmp_path / "ckpt"),
                     "checkpoint_interval": 5, "tensorboard_dir": str(tmp_path / "tb")},
        "objective": {"type": "grpo", "clip_range": {"low": 0.2, "high": 0.28},
                      "kl_coef": 0.05, "loss_normalization": "sequence"},
        "failure": {"heartbeat_timeout_s": 8.0, "mode": "replan", "max_restarts": 2}})
    return JobRecord(id="job-typed", spec=spec, state=State.SCHEDULING, attempt=3)


def hand_built(job: JobRecord) -> dict:
    """The worker config as the controller wrote it by hand before WorkerConfig (the wire
    format workers already deployed read): the reference the typed one must reproduce."""
    spec = job.spec
    return {
        "job_id": job.id, "attempt": job.attempt, "name": spec.name,
        "model": spec.resolve_model().model_dump(mode="json"),
        "model_dir": spec.model_dir(), "model_init": spec.resolve_model_init(),
        "dataset": spec.dataset.path, "num_ranks": spec.resources.num_ranks,
        "training": {**spec.training.model_dump(mode="json"),
                     "precision": spec.resolve_precision(),
                     "optimizer_sharding": spec.resolve_optimizer_sharding(),
                     "shard_mirror": spec.resolve_shard_mirror()},
        "objective": spec.objective.model_dump(mode="json"),
        "failure": spec.failure.model_dump(mode="json"),
        "heartbeat_interval_s": max(0.2, min(5.0, spec.failure.heartbeat_timeout_s / 4)),
        "ranks_per_node": spec.resolve_cluster().gpus_per_node,
    }


def test_the_wire_format_is_the_hand_built_one_plus_its_version(tmp_path):
    job = real_job(tmp_path)
    sent = json.loads(worker_config_json(job))
    assert sent.pop("version") == 1
    assert sent == hand_built(job)


def test_what_the_controller_sends_is_what_agent_and_driver_read(tmp_path):
    from workers.agent import train_config
    from workers.driver import MAX_ACTOR_RESTARTS, group_config

    job = real_job(tmp_path)
    cfg = WorkerConfig.from_json(worker_config_json(job))
    assert (cfg.job_id, cfg.attempt, cfg.name, cfg.num_ranks) == ("job-typed", 3, "typed", 2)
    assert isinstance(cfg.model, ModelSpec) and cfg.model == job.spec.resolve_model()
    assert type(cfg.model.vocab_size) is int and cfg.model.vocab_size > 0
    assert (cfg.model_dir, cfg.model_init) == (None, "random")
    assert cfg.dataset == str(tmp_path / "data")
    t = cfg.training
    assert (t.steps, t.global_batch_tokens, t.learning_rate, t.seed) == (40, 1024, 3e-4, 7)
    assert (t.checkpoint_dir, t.checkpoint_interval, t.resume_from, t.tensorboard_dir) == (
        str(tmp_path / "ckpt"), 5, None, str(tmp_path / "tb"))
    assert (t.precision, t.optimizer_sharding, t.shard_mirror) == ("fp32", "distributed", True)
    assert (cfg.failure.mode, cfg.failure.heartbeat_timeout_s, cfg.failure.max_restarts,
            cfg.failure.max_lost_ranks, cfg.failure.shard_mirror) == ("replan", 8.0, 2, 1, True)
    assert cfg.heartbeat_interval_s == 2.0 and cfg.ranks_per_node == 1
    assert isinstance(cfg.objective, GrpoObjective) and cfg.objective.kl_coef == 0.05

    train = train_config(cfg)  # the rank's optimizer settings
    assert (train.lr, train.total_steps, train.warmup_steps) == (3e-4, 40, 4)
    assert (train.precision, train.optimizer_sharding, train.shard_mirror) == (
        "fp32", "distributed", True)
    o = train.objective
    assert (o.type, o.clip_low, o.clip_high, o.kl_coef, o.loss_normalization) == (
        "grpo", 0.2, 0.28, 0.05, "sequence")
    group = group_config(cfg)  # the driver's worker group
    assert (group.num_ranks, group.seed, group.model_init, group.ranks_per_node) == (
        2, 7, "random", 1)
    assert group.model == job.spec.resolve_model() and group.model_dir is None
    assert (group.timeout_s, group.max_actor_restarts) == (16.0, MAX_ACTOR_RESTARTS)
    assert group.train == train


def _edited(tmp_path, edit) -> str:
    sent = json.loads(worker_config_json(real_job(tmp_path)))
    edit(sent)
    return json.dumps(sent)


@pytest.mark.parametrize("edit, named", [
    (lambda c: c.update(bogus=1), "bogus: Extra inputs are not permitted (got 1)"),
    (lambda c: c["training"].update(warmup=3), "training.warmup: Extra inputs are not "
                                               "permitted"),
    (lambda c: c["training"].pop("steps"), "training.steps: Field required"),
    (lambda c: c.pop("heartbeat_interval_s"), "heartbeat_interval_s: Field required"),
    (lambda c: c["training"].update(steps="40"), "training.steps: Input should be a valid "
                                                 "integer (got '40')"),
    (lambda c: c["failure"].update(mode="retry"), "failure.mode: Input should be 'replan' "
                                                  "or 'restart' (got 'retry')"),
    (lambda c: c["objective"].update(beta=0.1), "objective.grpo.beta: Extra inputs"),
    (lambda c: c.update(version=2), "version: Input should be 1 (got 2)"),
])
def test_a_field_too_many_missing_or_mistyped_is_refused_by_name(tmp_path, edit, named):
    with pytest.raises(WorkerConfigError) as info:
        WorkerConfig.from_json(_edited(tmp_path, edit))
    message = str(info.value)
    assert named in message, message
    assert "\n" not in message and message.endswith("this worker reads worker config version 1")
    assert isinstance(info.value, SpecError) and isinstance(info.value, RingmasterError)


def test_every_fault_is_named_at_once_and_not_json_is_refused(tmp_path):
    def two_faults(c):
        c["training"].pop("seed")
        c["failure"]["surprise"] = True

    message = str(pytest.raises(WorkerConfigError, WorkerConfig.from_json,
                                _edited(tmp_path, two_faults)).value)
    assert "training.seed: Field required" in message
    assert "failure.surprise: Extra inputs are not permitted" in message
    with pytest.raises(WorkerConfigError, match=r"\(the config\): Invalid JSON"):
        WorkerConfig.from_json("{not json")
