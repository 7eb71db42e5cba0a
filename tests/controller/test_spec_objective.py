"""The job spec's `objective:`: shapes refused by name, checked at submit (and preview)
against the dataset's kinds, pairs, advantages and log-prob columns, and carried to the
workers' config."""

from __future__ import annotations

import json

import numpy as np
import pytest

from controller.spec import parse_job_spec
from controller.states import JobRecord, State
from controller.worker_service import worker_config_json
from scheduler.dataset import DatasetWriter, read_lengths
from scheduler.dataset_columns import write_token_column
from scheduler.worker_config import WorkerConfig
from tests.controller.harness import DEMO_SPEC


def _dataset(path, kind: str, *, ref_logps: bool = False) -> str:
    rng = np.random.default_rng(0)
    with DatasetWriter(path / "data") as w:
        for k in range(8):
            tokens = rng.integers(0, 256, size=int(rng.integers(5, 20)))
            mask = np.r_[np.zeros(3), np.ones(len(tokens) - 3)].astype(np.uint8)
            extra = {}
            if kind == "dpo":
                extra = {"pair_id": k // 2, "role": ("chosen", "rejected")[k % 2]}
            elif kind == "grpo":
                extra = {"group_id": k // 4, "reward": float(k), "advantage": k - 3.5}
            w.add(tokens, loss_mask=mask, kind=kind, **extra)
    if ref_logps:
        lengths = read_lengths(path)
        write_token_column(path / "data", "ref_logps",
                           ((i, -np.ones(n)) for i, n in enumerate(lengths)))
    return str(path)


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp("objective-data")
    out = {}
    for name, kind, ref in (("sft", "sft", False), ("dpo", "dpo", False),
                            ("dpo-ref", "dpo", True), ("grpo", "grpo", False)):
        (root / name).mkdir()
        out[name] = _dataset(root / name, kind, ref_logps=ref)
    return out


def _body(name: str, dataset: str, objective: dict) -> dict:
    return {**DEMO_SPEC, "name": name, "dataset": {"path": dataset}, "objective": objective}


REFUSED = [
    ("sft", {"type": "dpo"}, "objective.type", "'dpo' trains on dpo samples, but dataset"),
    ("dpo", {"type": "sft"}, "objective.type", "preference pairs train with objective type dpo"),
    ("dpo", {"type": "dpo"}, "objective.type", "ringmaster data ref-logps"),
    ("grpo", {"type": "grpo", "kl_coef": 0.1}, "objective.kl_coef", "reference log-probs"),
    ("sft", {"type": "grpo"}, "objective.type", "'grpo' trains on grpo samples"),
    ("grpo", {"type": "grpo", "beta": 0.1}, "objective.grpo.beta", "unknown field"),
    ("dpo-ref", {"type": "dpo", "label_smoothing": 0.5}, "objective.dpo.label_smoothing",
     "less than 0.5"),
    ("grpo", {"type": "grpo", "clip_range": {"low": 1.2, "high": 0.2}},
     "objective.grpo.clip_range.ClipRange.low", "less than 1"),
    ("sft", {"type": "ppo"}, "objective", "does not match any of the expected tags"),
]


@pytest.mark.parametrize("data, objective, field, fragment", REFUSED,
                         ids=[f"{r[0]}:{r[1]['type']}:{r[2]}" for r in REFUSED])
def test_objectives_the_dataset_cannot_train_are_422_naming_the_field(
        ctl, datasets, data, objective, field, fragment):
    for route in ("/v1/jobs", "/v1/jobs:plan"):
        r = ctl.client().post(route, json=_body("obj", datasets[data], objective))
        assert r.status_code == 422, (route, r.text)
        err = r.json()["error"]
        assert field in [d["field"] for d in err["details"]], err
        assert fragment in err["message"], err["message"]


def test_accepted_objectives_reach_the_worker_config(ctl, datasets):
    accepted = [("sft", {"type": "sft"}), ("sft", {"type": "pretrain"}),
                ("dpo-ref", {"type": "dpo", "beta": 0.3, "label_smoothing": 0.1}),
                ("grpo", {"type": "grpo", "clip_range": {"low": 0.2, "high": 0.28},
                          "loss_normalization": "sequence"})]
    for k, (data, objective) in enumerate(accepted):
        r = ctl.client().post("/v1/jobs", json=_body(f"ok-{k}", datasets[data], objective))
        assert r.status_code == 201, r.text
        spec = parse_job_spec(_body(f"ok-{k}", datasets[data], objective))
        text = worker_config_json(JobRecord(id="j", spec=spec, state=State.PENDING))
        sent = json.loads(text)["objective"]
        assert {k: v for k, v in sent.items() if k in objective} == objective
    from workers.loss import ObjectiveConfig  # the workers read exactly these figures

    got = ObjectiveConfig.from_config(WorkerConfig.from_json(text).objective)
    assert (got.type, got.clip_low, got.clip_high, got.loss_normalization) == (
        "grpo", 0.2, 0.28, "sequence")
    assert parse_job_spec(DEMO_SPEC).objective.type == "pretrain"  # the default
