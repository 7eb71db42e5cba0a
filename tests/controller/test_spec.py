"""Job spec: the examples validate, mistakes name their field, schema export, HF configs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from controller.spec import JobCreate, inline_local_model, load_job_spec, parse_job_spec
from scheduler.errors import SpecError
from scheduler.specs import MODEL_PRESETS, ModelSpec

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.mark.parametrize("name, ranks, model", [("demo-job.yaml", 4, "tiny"),
                                                ("llama-7b-h100.yaml", 64, "llama-7b")])
def test_examples_validate(name, ranks, model):
    spec = load_job_spec(EXAMPLES / name)
    cluster = spec.resolve_cluster()
    assert spec.resources.num_ranks == cluster.world_size == ranks
    assert spec.resolve_model() == MODEL_PRESETS[model]
    assert spec.training.checkpoint_dir  # both examples checkpoint


def test_examples_round_trip_through_json():
    for path in EXAMPLES.glob("*.yaml"):
        spec = load_job_spec(path)
        again = JobCreate.model_validate_json(spec.model_dump_json())
        assert again == spec and again.fingerprint() == spec.fingerprint()


def test_fingerprint_ignores_key_order_not_values():
    raw = yaml.safe_load((EXAMPLES / "demo-job.yaml").read_text())
    shuffled = {k: (dict(reversed(list(v.items()))) if isinstance(v, dict) else v)
                for k, v in reversed(list(raw.items()))}
    assert parse_job_spec(raw).fingerprint() == parse_job_spec(shuffled).fingerprint()
    raw["training"] = {**raw["training"], "steps": raw["training"]["steps"] + 1}
    assert parse_job_spec(raw).fingerprint() != parse_job_spec(shuffled).fingerprint()


@pytest.mark.parametrize("mutate, fragment", [
    (lambda d: d["training"].update(stepz=3), "training.stepz: unknown field"),
    (lambda d: d.update(priority=1), "priority: unknown field"),
    (lambda d: d["resources"].update(num_ranks=12, cluster="h100"),
     "num_ranks=12 is not a multiple"),
    (lambda d: d["resources"].update(cluster={"num_nodes": 1}),
     "resources.cluster.spec.gpus_per_node: Field required"),
    (lambda d: d["resources"].update(cluster="tpu"), "resources.cluster.preset"),
    (lambda d: d["training"].update(learning_rate=float("nan")), "training.learning_rate"),
    (lambda d: d["dataset"].update(path="a\x00b"), "dataset.path: String should match"),
    (lambda d: d["training"].update(checkpoint_dir="  "), "training.checkpoint_dir"),
    (lambda d: d.update(model="tiny.yaml"), "model.preset: Input should be 'tiny'"),
    (lambda d: d.update(model={"vocab_size": 8}), "model.spec.hidden_size: Field required"),
    (lambda d: d["planner"].update(time_limit_s=0), "planner.time_limit_s"),
    (lambda d: d["training"].update(precision="bf16"),
     "training.precision: Input should be 'bf16-mixed', 'fp32' or 'fp64' (got 'bf16')"),
    (lambda d: d["training"].update(optimizer_sharding="zero3"),
     "training.optimizer_sharding: Input should be 'none', 'zero1' or 'distributed' "
     "(got 'zero3')"),
    (lambda d: (d["training"].update(optimizer_sharding="zero1"),
                d["resources"].update(num_ranks=64)),
     "training.optimizer_sharding='zero1' needs a parameter tensor per rank, but the model "
     "has 21 tensors for num_ranks=64"),
])
def test_mistakes_name_the_field(mutate, fragment):
    raw = yaml.safe_load((EXAMPLES / "demo-job.yaml").read_text())
    mutate(raw)
    with pytest.raises(SpecError, match="invalid job spec") as exc:
        parse_job_spec(raw)
    assert fragment in str(exc.value)


def test_explicit_cluster_fields_must_match_num_ranks():
    raw = yaml.safe_load((EXAMPLES / "demo-job.yaml").read_text())
    cluster = dict(num_nodes=2, gpus_per_node=2, gpu_memory_gib=8, achieved_tflops=1,
                   intra_node_bandwidth_gbps=1, inter_node_bandwidth_gbps=1,
                   pcie_bandwidth_gbps=1, host_memory_gib=8)
    raw["resources"].update(cluster=cluster, capacity_tokens=None)
    assert parse_job_spec(raw).resolve_cluster().world_size == 4
    raw["resources"]["num_ranks"] = 3
    with pytest.raises(SpecError, match="num_ranks=3 must equal the cluster's 4 ranks"):
        parse_job_spec(raw)


def test_node_pools_in_a_job_spec():
    spec = load_job_spec(EXAMPLES / "llama-7b-h100-a100.yaml")
    cluster = spec.resolve_cluster()
    assert cluster.heterogeneous and cluster.world_size == 64
    assert [p.gpu for p in cluster.pools] == ["h100", "a100"]
    assert cluster.pools[1].gpu_memory_gib == 40 and cluster.gpu_memory_gib == 40
    assert cluster.rank_speeds()[31] == 1.0 and cluster.rank_speeds()[32] == 125 / 400
    raw = yaml.safe_load((EXAMPLES / "llama-7b-h100-a100.yaml").read_text())
    for mutate, fragment in [
        (lambda d: d["resources"]["cluster"]["pools"][1].update(num_nodes=0),
         "pools[1]: num_nodes: Input should be greater than 0"),
        (lambda d: d["resources"]["cluster"]["pools"][0].update(preset="v100"),
         "preset='v100' is not a cluster preset"),
        (lambda d: d["resources"]["cluster"]["pools"][0].update(nvlink=1),
         "pools[0]: nvlink: unknown field"),
        (lambda d: d["resources"].update(num_ranks=32), "num_ranks=32 must equal the "
                                                        "cluster's 64 ranks"),
        (lambda d: d["resources"]["cluster"].update(host_memory_gib=[]),
         "host_memory_gib=[] is not a number"),
    ]:
        bad = json.loads(json.dumps(raw))
        mutate(bad)
        with pytest.raises(SpecError, match="invalid job spec") as exc:
            parse_job_spec(bad)
        assert fragment in str(exc.value), (fragment, str(exc.value))


def test_file_errors_are_one_line(tmp_path):
    with pytest.raises(SpecError, match="file not found"):
        load_job_spec(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(SpecError, match="not valid yaml"):
        load_job_spec(bad)
    bad.write_text("- a list\n")
    with pytest.raises(SpecError, match="expected a mapping of job fields, got list"):
        load_job_spec(bad)


def test_local_hf_config_is_inlined(tmp_path):
    cfg = {"vocab_size": 512, "hidden_size": 128, "num_hidden_layers": 3,
           "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 344,
           "torch_dtype": "float32"}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    raw = yaml.safe_load((EXAMPLES / "demo-job.yaml").read_text())
    raw["model"] = "config.json"
    spec = inline_local_model(parse_job_spec(raw), base=tmp_path)
    assert isinstance(spec.model, ModelSpec)
    assert (spec.model.num_layers, spec.model.num_kv_heads, spec.model.ffn_hidden_size) == (
        3, 2, 344)
    assert spec.resolve_model() is spec.model


def test_json_schema_covers_every_section():
    schema = JobCreate.model_json_schema()
    assert set(schema["required"]) == {"name", "model", "dataset", "resources", "training"}
    assert schema["additionalProperties"] is False
    assert {"Resources", "Training", "PlannerSettings", "FailurePolicy", "DatasetRef",
            "ModelSpec", "ClusterSpec"} <= set(schema["$defs"])


def test_precision_and_sharding_defaults_follow_the_cluster_and_world():
    raw = yaml.safe_load((EXAMPLES / "demo-job.yaml").read_text())
    demo = parse_job_spec(raw)  # cpu preset, 4 ranks
    assert (demo.resolve_precision(), demo.resolve_optimizer_sharding()) == ("fp32",
                                                                           "distributed")
    big = load_job_spec(EXAMPLES / "llama-7b-h100.yaml")
    assert big.resolve_precision() == "bf16-mixed"
    raw["resources"]["num_ranks"] = 1
    raw["training"].update(precision="fp64", optimizer_sharding="zero1")
    one = parse_job_spec(raw)
    assert (one.resolve_precision(), one.resolve_optimizer_sharding()) == ("fp64", "zero1")
    raw["training"]["optimizer_sharding"] = None
    assert parse_job_spec(raw).resolve_optimizer_sharding() == "none"
