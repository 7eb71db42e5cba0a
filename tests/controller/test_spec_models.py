"""Job specs naming Hugging Face model directories: resolution, model_init, RoPE overrides,
and the submit-time checks (config.json and weight headers read torch-free by the
controller; a bad directory is a 422 naming the field)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from controller.spec import parse_job_spec, validate_model
from scheduler.dataset import DatasetWriter
from scheduler.errors import SpecError
from scheduler.hf_checkpoint import parameter_names
from scheduler.specs import ModelSpec
from tests.controller.harness import DEMO_SPEC

CONFIG = {"model_type": "mistral", "vocab_size": 50, "hidden_size": 32,
          "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
          "intermediate_size": 48, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
          "sliding_window": 100, "max_position_embeddings": 4096, "torch_dtype": "float32"}


def model_dir(root: Path, *, weights: bool = True, config: dict | None = None) -> Path:
    """A Hugging Face directory written with numpy only (the controller side has no torch)."""
    root.mkdir(parents=True, exist_ok=True)
    cfg = config or CONFIG
    (root / "config.json").write_text(json.dumps(cfg))
    if weights:
        spec = ModelSpec.from_hf_config(cfg)
        save_file({hf: np.zeros(shape, np.float32) for _, hf, shape in parameter_names(spec)},
                  str(root / "model.safetensors"))
    return root


def job(model, tmp_path: Path, longest: int = 50, **extra) -> dict:
    data = tmp_path / "data"
    if not (data.parent / "data.idx").exists():
        with DatasetWriter(data) as w:
            for n in (10, longest, 3):
                w.add(np.arange(n) % 50)
    return {**copy.deepcopy(DEMO_SPEC), "model": model, "dataset": {"path": str(data)},
            **extra}


def test_a_model_directory_resolves_and_defaults_to_pretrained(tmp_path):
    d = model_dir(tmp_path / "m")
    spec = parse_job_spec(job(str(d), tmp_path))
    assert spec.model_dir() == str(d) and spec.resolve_model_init() == "pretrained"
    assert spec.resolve_model() == ModelSpec.from_hf_config(d)
    assert validate_model(spec).model_type == "mistral"
    empty = parse_job_spec(job(str(model_dir(tmp_path / "e", weights=False)), tmp_path))
    assert empty.resolve_model_init() == "random"
    assert parse_job_spec(job(str(d), tmp_path, model_init="random")).resolve_model_init() \
        == "random"


@pytest.mark.parametrize("model, init, needle", [
    ("tiny", "pretrained", "model_init='pretrained' needs a model directory with weights.*"
                           "not a model directory"),
    ("{empty}", "pretrained", "directory '.*e' has none"),
])
def test_pretrained_without_weights_is_refused(tmp_path, model, init, needle):
    empty = model_dir(tmp_path / "e", weights=False)
    spec = parse_job_spec(job(model.format(empty=empty), tmp_path, model_init=init))
    with pytest.raises(SpecError, match=needle):
        validate_model(spec)


def test_rope_overrides_extend_context(tmp_path):
    d = model_dir(tmp_path / "m")
    spec = parse_job_spec(job({"source": str(d), "rope_theta": 1e6,
                               "rope_scaling": {"rope_type": "yarn", "factor": 4.0,
                                                "original_max_position_embeddings": 4096},
                               "max_position_embeddings": 16384}, tmp_path))
    model = spec.resolve_model()
    assert (model.rope_theta, model.rope_scaling.factor, model.max_position_embeddings) == (
        1e6, 4.0, 16384)
    assert spec.model_dir() == str(d) and spec.resolve_model_init() == "pretrained"
    preset = parse_job_spec(job({"source": "tiny", "rope_theta": 5e5}, tmp_path))
    assert preset.resolve_model().rope_theta == 5e5 and preset.model_dir() is None
    with pytest.raises(SpecError, match=r"model\.source\.rope_scaling\.yarn\.factor"):
        parse_job_spec(job({"source": str(d), "rope_scaling": {
            "rope_type": "yarn", "original_max_position_embeddings": 8}}, tmp_path))
    with pytest.raises(SpecError, match="does not match any of the expected tags: 'default', "
                                        "'linear', 'llama3', 'yarn'"):
        parse_job_spec(job({"source": "tiny", "rope_scaling": {"rope_type": "dynamic"}},
                           tmp_path))


def test_submit_checks_name_the_field(tmp_path):
    with pytest.raises(SpecError, match=r"model: model='/nowhere/model': no such model "):
        validate_model(parse_job_spec(job("/nowhere/model", tmp_path)))
    bad = model_dir(tmp_path / "bad", weights=False, config={**CONFIG, "model_type": "phi3"})
    with pytest.raises(SpecError, match=r"model: model config .*config\.json: "
                                        r"model_type='phi3' is not supported"):
        validate_model(parse_job_spec(job(str(bad), tmp_path)))
    shapes = model_dir(tmp_path / "shape")
    save_file({hf: np.zeros((shape[0] + 1, *shape[1:]) if "up_proj" in hf else shape,
                            np.float32)
               for _, hf, shape in parameter_names(ModelSpec.from_hf_config(CONFIG))},
              str(shapes / "model.safetensors"))
    with pytest.raises(SpecError, match=r"model: .*model\.safetensors: tensor "
                                        r"'model\.layers\.0\.mlp\.up_proj\.weight' has shape"):
        validate_model(parse_job_spec(job(str(shapes), tmp_path)))


def test_sliding_window_is_held_against_the_datasets_longest_sequence(tmp_path):
    d = model_dir(tmp_path / "m")
    validate_model(parse_job_spec(job(str(d), tmp_path / "short", longest=100)))
    with pytest.raises(SpecError, match="model: dataset .*: the longest sequence of 101 "
                                        "tokens is longer than the model's sliding_window=100"):
        validate_model(parse_job_spec(job(str(d), tmp_path / "long", longest=101)))


def test_submit_of_a_bad_model_directory_is_a_422(ctl, tmp_path):
    bad = model_dir(tmp_path / "bad", weights=False, config={**CONFIG, "rope_scaling": {
        "rope_type": "longrope", "short_factor": [1.0], "long_factor": [1.0]}})
    r = ctl.client().post("/v1/jobs", json=job(str(bad), tmp_path))
    assert r.status_code == 422, r.text
    assert "model: model config" in r.json()["error"]["message"]
    assert "rope_scaling.rope_type='longrope' is not supported" in r.json()["error"]["message"]
    ok = ctl.client().post("/v1/jobs", json=job(str(model_dir(tmp_path / "good")), tmp_path,
                                                name="good-model"))
    assert ok.status_code == 201, ok.text


def test_worker_config_carries_the_model_directory_to_the_driver(tmp_path):
    """What the driver gets at Register: the resolved spec (overrides applied), the
    directory and model_init, which become its GroupConfig."""
    from controller.states import JobRecord, State
    from controller.worker_service import worker_config_json
    from scheduler.worker_config import WorkerConfig

    d = model_dir(tmp_path / "m")
    spec = parse_job_spec(job({"source": str(d), "rope_theta": 2e4}, tmp_path))
    cfg = WorkerConfig.from_json(worker_config_json(JobRecord(id="j", spec=spec,
                                                              state=State.PENDING)))
    assert (cfg.model_dir, cfg.model_init) == (str(d), "pretrained")
    model = cfg.model
    assert isinstance(model, ModelSpec)
    assert model.rope_theta == 2e4 and model.sliding_window == 100
