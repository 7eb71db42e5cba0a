"""Plan format: JSON round-trip and every rule of docs/plan-format.md reported at once."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from scheduler.errors import PlanValidationError
from scheduler.plan import StepPlan

EXAMPLE = {
    "version": 1,
    "world_size": 8,
    "capacity_tokens": 32768,
    "micro_batches": [
        {"groups": [
            {"ranks": [0, 1, 2, 3], "sequences": [{"id": 5, "length": 100000,
                                                    "offload_ratio": 0.5}]},
            {"ranks": [4], "sequences": [{"id": 0, "length": 3000, "offload_ratio": 0.0},
                                         {"id": 9, "length": 900, "offload_ratio": 0.0}]},
        ]}
    ],
    "predicted": {"makespan_s": 1.9, "lower_bound_s": 1.8,
                  "per_rank_busy_s": [1.8, 1.9, 1.8, 1.9, 1.8, 1.9, 1.8, 1.9]},
}


def test_design_example_round_trips():
    plan = StepPlan.model_validate_json(json.dumps(EXAMPLE))
    assert json.loads(plan.model_dump_json()) == EXAMPLE
    assert plan.violations() == []


def valid_plan() -> StepPlan:
    return StepPlan.model_validate({
        "world_size": 4, "capacity_tokens": 100,
        "micro_batches": [
            {"groups": [{"ranks": [2, 0, 3], "sequences": [{"id": 0, "length": 250}]},
                        {"ranks": [1], "sequences": [{"id": 1, "length": 60},
                                                     {"id": 2, "length": 40}]}]},
            {"groups": [{"ranks": [1, 2], "sequences": [{"id": 3, "length": 200}]}]},
        ]})


def test_valid_plan_with_lengths():
    plan = valid_plan()
    assert plan.violations([250, 60, 40, 200]) == []
    assert [m for m, _ in plan.micro_batches_of(2)] == [0, 1]
    assert [m for m, _ in plan.micro_batches_of(0)] == [0]
    assert plan.groups_by_size() == {1: 1, 2: 1, 3: 1}


def test_every_violation_is_reported():
    data = valid_plan().model_dump()
    data["micro_batches"][0]["groups"][1]["ranks"] = [3]  # shares rank 3 with group 0
    data["micro_batches"][1]["groups"][0]["ranks"] = [1, 7]  # out of range
    data["micro_batches"][1]["groups"][0]["sequences"][0]["id"] = 1  # duplicate id
    data["micro_batches"][0]["groups"][1]["sequences"][0]["length"] = 150  # over capacity
    plan = StepPlan.model_validate(data)
    with pytest.raises(PlanValidationError) as exc:
        plan.check([250, 60, 40, 200])
    text = "\n".join(exc.value.violations)
    assert "rank 3 is also in group 0" in text
    assert "[7] out of range (valid 0..3)" in text
    assert "id: 1 already appears" in text
    assert "over capacity_tokens=100" in text
    assert "ids [3]" in text and "missing" in text
    assert "length: 150 but the batch says sequence 1 has length 60" in text
    # The duplicated id also carries the wrong length for sequence 1: a seventh violation.
    assert "length: 200 but the batch says sequence 1 has length 60" in text
    assert len(exc.value.violations) == 7


def test_offload_counts_towards_capacity():
    data = valid_plan().model_dump()
    data["micro_batches"][1]["groups"][0]["sequences"][0]["length"] = 300
    assert StepPlan.model_validate(data).violations()
    data["micro_batches"][1]["groups"][0]["sequences"][0]["offload_ratio"] = 0.5
    assert StepPlan.model_validate(data).violations() == []


@pytest.mark.parametrize("mutate,field", [
    (lambda d: d.update(world_size=0), "world_size"),
    (lambda d: d["micro_batches"][0]["groups"][0].update(ranks=[]), "ranks"),
    (lambda d: d["micro_batches"][0]["groups"][0]["sequences"][0].update(offload_ratio=1.5),
     "offload_ratio"),
    (lambda d: d["micro_batches"][0]["groups"][0]["sequences"][0].update(length=0), "length"),
    (lambda d: d.update(surprise=1), "surprise"),
])
def test_schema_errors_name_the_field(mutate, field):
    data = valid_plan().model_dump()
    mutate(data)
    with pytest.raises(ValidationError, match=field):
        StepPlan.model_validate(data)


def test_predicted_length_must_match_world():
    data = dict(EXAMPLE, predicted=dict(EXAMPLE["predicted"], per_rank_busy_s=[1]))
    assert any("per_rank_busy_s" in v for v in StepPlan.model_validate(data).violations())


def test_version_2_example_of_the_docs_is_valid():
    import re
    from pathlib import Path

    text = (Path(__file__).parents[2] / "docs" / "plan-format.md").read_text()
    example = re.search(r"```json\n(.*?)```", text, re.S).group(1)
    plan = StepPlan.model_validate_json(example)
    assert plan.version == 2 and plan.violations() == []
    assert [g.memory.scheme for _, g in plan.groups()] == ["offload", "plain"]


def test_version_2_rules():
    from scheduler.plan import GroupMemory

    plan = valid_plan()
    plan.version = 2
    text = "\n".join(plan.violations())
    assert text.count("memory: missing") == 3  # every group must name its scheme
    for _, g in plan.groups():
        g.memory = GroupMemory()
    # zigzag counts exactly: 250 over 3 ranks puts 84 on a member, 200 over 2 puts 100
    assert plan.violations() == []
    g = plan.micro_batches[0].groups[0]
    g.memory = GroupMemory(scheme="streambp", chunk_tokens=8)
    g.sequences[0].offload_ratio = 0.5
    text = "\n".join(plan.violations())
    assert "streambp runs on packed groups only" in text
    assert "must be 0 in version 2" in text
    g.memory = GroupMemory(scheme="plain", chunk_tokens=4)
    assert "only valid with scheme streambp" in "\n".join(plan.violations())
    v1 = valid_plan()
    v1.micro_batches[0].groups[0].memory = GroupMemory()
    assert "needs version 2" in "\n".join(v1.violations())


def test_by_rank_is_micro_batches_of_for_every_rank():
    from scheduler import plan_batch
    from scheduler.specs import cluster_preset, model_preset

    lengths = [300, 9000, 120, 4000, 50, 17000, 800, 2500, 64, 7000, 1500, 90]
    plan = plan_batch(lengths, cluster_preset("cpu", num_ranks=8), model_preset("tiny"),
                      capacity_tokens=4096, time_limit_s=0.5, seed=0)
    assert any(g.ring_size > 1 for _, g in plan.groups())  # a ring: one group, many ranks
    index = plan.by_rank()
    assert set(index) <= set(range(plan.world_size))
    for rank in range(plan.world_size):
        assert index.get(rank, []) == plan.micro_batches_of(rank)
