"""Checkpoints in and out: round trips through transformers, sharding, `ringmaster export`
of a training checkpoint, every refusal naming its file and field, and the loader's peak
host memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from scheduler.errors import SpecError
from scheduler.hf_checkpoint import CheckpointError, parameter_names
from scheduler.specs import ModelSpec
from tests.workers.hf_cases import FAMILIES, load_reference, make_checkpoint, packed_batch
from workers.hf import checkpoint_bytes, load_pretrained, save_pretrained

from .helpers import group, one_thread, plan_of, random_samples  # noqa: F401

REPO = Path(__file__).resolve().parents[2]


def _hf_logits(directory: Path, dtype: torch.dtype) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=dtype,
                                                              attn_implementation="sdpa")
    ids, _ = packed_batch([40])
    with torch.no_grad():
        return model(ids[None]).logits[0]


def _tokenizer(directory: Path) -> None:
    """A tiny byte-level BPE trained here (no hub) and its config, as a model dir has."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(["long context training", "ring attention over ranks"] * 20,
                            trainers.BpeTrainer(vocab_size=60, special_tokens=["<unk>"]))
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text('{"tokenizer_class": '
                                                     '"PreTrainedTokenizerFast"}\n')


@pytest.mark.parametrize("family", FAMILIES)
def test_load_save_from_pretrained_is_bit_identical(tmp_path, family):
    """load -> save_pretrained -> transformers: the same tensors and bit-identical logits
    in the stored dtype (bfloat16 here, float32 for one family)."""
    dtype = torch.float32 if family == "qwen2-tied" else torch.bfloat16
    src = make_checkpoint(tmp_path / "src", family, dtype=dtype)
    _tokenizer(src)
    model = load_pretrained(src)
    assert next(model.parameters()).dtype == dtype
    out = save_pretrained(model, tmp_path / "out")
    original, exported = load_file(src / "model.safetensors"), load_file(out / "model.safetensors")
    tied = {"lm_head.weight"} if model.spec.tie_word_embeddings else set()
    assert set(exported) == set(original) - tied
    for name, t in exported.items():
        assert t.dtype == dtype and torch.equal(t, original[name]), name
    assert torch.equal(_hf_logits(out, dtype), _hf_logits(src, dtype))
    src_cfg, out_cfg = (transformers.AutoConfig.from_pretrained(d) for d in (src, out))
    assert out_cfg.rope_parameters == src_cfg.rope_parameters
    assert (out_cfg.tie_word_embeddings, out_cfg.model_type) == (src_cfg.tie_word_embeddings,
                                                                 src_cfg.model_type)
    for file in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / file).read_bytes() == (src / file).read_bytes()
    assert ModelSpec.from_hf_config(out) == model.spec


def test_sharded_checkpoints_both_ways(tmp_path):
    single = make_checkpoint(tmp_path / "single", "llama3", dtype=torch.float32)
    sharded = make_checkpoint(tmp_path / "sharded", "llama3", dtype=torch.float32,
                              max_shard_size="40KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    a, b = load_pretrained(single), load_pretrained(sharded)
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q), name
    out = save_pretrained(b, tmp_path / "out", max_shard_bytes=30_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and all((out / s).is_file() for s in shards)
    assert not (out / "model.safetensors").exists()
    assert index["metadata"]["total_size"] == checkpoint_bytes(out)
    assert torch.equal(_hf_logits(out, torch.float32), _hf_logits(single, torch.float32))


def test_ringmaster_export_of_a_training_checkpoint(tmp_path):
    """A job-like run: load with a rope override, one optimizer step, DCP checkpoint, then
    `ringmaster export`: the config holds the RoPE trained, the weights are the trained
    ones bit for bit, the tokenizer comes along, transformers computes our logits."""
    from workers.train import TrainConfig, Trainer

    src = make_checkpoint(tmp_path / "src", "qwen2-tied", dtype=torch.float64)
    _tokenizer(src)
    spec = ModelSpec.from_hf_config(src).with_overrides(
        rope_theta=4e6, rope_scaling={"rope_type": "linear", "factor": 2.0},
        max_position_embeddings=256)
    trainer = Trainer(load_pretrained(src, spec=spec), TrainConfig(lr=1e-2, precision="fp64"),
                      rank=0)
    lengths = [17, 5]
    trainer.train_step(plan_of(1, [[group([0], [(0, 17), (1, 5)])]]),
                       random_samples(lengths, seed=1, vocab=101))
    trainer.save(tmp_path / "ckpt")
    out = tmp_path / "exported"
    done = subprocess.run([str(Path(sys.executable).with_name("ringmaster")), "export",
                           str(tmp_path / "ckpt"), "--out", str(out), "--max-shard-size",
                           "60KB", "--dtype", "float64"],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["rope_theta"], cfg["rope_scaling"], cfg["max_position_embeddings"]) == (
        4e6, {"rope_type": "linear", "factor": 2.0}, 256)
    assert (out / "model.safetensors.index.json").is_file()
    assert (out / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()
    reference = load_reference(out)
    theirs = dict(reference.named_parameters())
    for ours, hf, _ in parameter_names(trainer.model.spec):
        assert torch.equal(dict(trainer.model.named_parameters())[ours], theirs[hf]), ours
    from tests.workers.hf_cases import float64_islands

    ids, cu = packed_batch([30])
    with float64_islands(), torch.no_grad():
        want = reference(ids[None]).logits[0]
    got = trainer.model(ids, cu).detach()
    assert float((got - want).norm() / want.norm()) <= 1e-10


def test_export_refuses_a_directory_without_checkpoint(tmp_path):
    done = subprocess.run([sys.executable, "-m", "workers.export", str(tmp_path), "--out",
                           str(tmp_path / "o")], capture_output=True, text=True, timeout=120,
                          cwd=REPO)
    assert done.returncode == 2 and "holds no checkpoint (no .metadata)" in done.stderr
    assert "Traceback" not in done.stderr


# --------------------------------------------------------------------------- refusals


def _rewrite(path: Path, edit) -> None:
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def _edit_config(directory: Path, **fields) -> None:
    cfg = json.loads((directory / "config.json").read_text())
    for key, value in fields.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    (directory / "config.json").write_text(json.dumps(cfg))


def _wrong_shape(d: Path) -> None:
    _rewrite(d / "model.safetensors", lambda t: t.update(
        {"model.layers.1.mlp.up_proj.weight": torch.zeros(95, 64)}))


def _missing_tensor(d: Path) -> None:
    _rewrite(d / "model.safetensors", lambda t: t.pop("model.layers.0.self_attn.k_proj.weight"))


def _unexpected_bias(d: Path) -> None:
    _rewrite(d / "model.safetensors", lambda t: t.update(
        {"model.layers.0.self_attn.o_proj.bias": torch.zeros(64)}))


def _missing_shard(d: Path) -> None:
    index = json.loads((d / "model.safetensors.index.json").read_text())
    os.remove(d / sorted(set(index["weight_map"].values()))[-1])


def _only_bin(d: Path) -> None:
    os.remove(d / "model.safetensors")
    (d / "pytorch_model.bin").write_bytes(b"\0")


CASES = [
    # (name, sharded, breaks it, error, message)
    ("wrong shape", False, _wrong_shape, CheckpointError,
     r"model\.safetensors: tensor 'model\.layers\.1\.mlp\.up_proj\.weight' has shape "
     r"\[95, 64\] but config\.json implies \[96, 64\] \(hidden_size=64, intermediate_size=96"),
    ("missing tensor", False, _missing_tensor, CheckpointError,
     r"model\.safetensors: tensor 'model\.layers\.0\.self_attn\.k_proj\.weight' is missing"),
    ("unexpected tensor", False, _unexpected_bias, CheckpointError,
     r"tensor 'model\.layers\.0\.self_attn\.o_proj\.bias' is not a parameter of this model"),
    ("missing shard", True, _missing_shard, CheckpointError,
     r"model-0000\d-of-0000\d\.safetensors: shard file not found"),
    ("pytorch .bin only", False, _only_bin, CheckpointError,
     r"holds no weights.*pytorch_model\.bin.*only safetensors"),
    ("unsupported rope_scaling type", False,
     lambda d: _edit_config(d, rope_parameters={"rope_type": "dynamic", "factor": 2.0}),
     SpecError, r"config\.json: rope_scaling\.rope_type='dynamic' is not supported \(valid: "
                r"default, linear, llama3, yarn\)"),
    ("unknown model_type", False, lambda d: _edit_config(d, model_type="gemma2"), SpecError,
     r"config\.json: model_type='gemma2' is not supported; supported: llama, mistral, qwen2, "
     r"qwen3"),
]


@pytest.mark.parametrize("name, sharded, breaker, error, message", CASES,
                         ids=[c[0] for c in CASES])
def test_bad_checkpoints_are_refused_before_reading(tmp_path, monkeypatch, name, sharded,
                                                    breaker, error, message):
    d = make_checkpoint(tmp_path / "m", "llama3", dtype=torch.float32,
                        **({"max_shard_size": "100KB"} if sharded else {}))
    breaker(d)
    reads = []
    monkeypatch.setattr("workers.hf._read_tensor", lambda *a: reads.append(a))
    with pytest.raises(error, match=message):
        load_pretrained(d)
    assert reads == []  # everything is checked before the first byte is loaded


# --------------------------------------------------------------------------- memory

_MEASURE = """
import json, sys
from workers.hf import checkpoint_bytes, load_pretrained

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

nbytes = checkpoint_bytes(sys.argv[1])
base = status("VmRSS:")
with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM to the current RSS
    f.write("5")
model = load_pretrained(sys.argv[1])
print(json.dumps({"bytes": nbytes, "growth": status("VmHWM:") - base,
                  "params": sum(p.numel() for p in model.parameters())}))
"""


def test_peak_host_memory_while_loading_is_within_1_2x(tmp_path):
    """A ~200 MB float32 checkpoint in 4 shards, loaded in a fresh process: the peak RSS
    (VmHWM, reset just before the load) grows by at most 1.2x the checkpoint's bytes (the
    model itself is 1.0x). The baseline is the RSS after the interpreter, torch and the
    loader's modules are imported: what is measured is what loading this model adds."""
    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("needs /proc/self/clear_refs to reset the peak RSS (Linux)")
    from workers.model import Transformer

    spec = ModelSpec(vocab_size=8192, hidden_size=512, num_layers=12, num_heads=8,
                     num_kv_heads=8, ffn_hidden_size=1536, dtype="float32")
    torch.manual_seed(0)
    save_pretrained(Transformer(spec), tmp_path / "big", max_shard_bytes=60 * 10**6)
    done = subprocess.run([sys.executable, "-c", _MEASURE, str(tmp_path / "big")],
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    assert done.returncode == 0, done.stderr
    m = json.loads(done.stdout.strip().splitlines()[-1])
    assert m["params"] == spec.num_params and 180e6 < m["bytes"] < 220e6
    assert m["growth"] <= 1.2 * m["bytes"], f"peak grew {m['growth'] / m['bytes']:.3f}x"


def test_a_tied_model_resumes_bit_identically(tmp_path):
    """The tied head survives a DCP checkpoint: still one tensor after restore, and the
    next step's loss and weights equal the uninterrupted run's."""
    from workers.model import Transformer
    from workers.train import TrainConfig, Trainer

    spec = ModelSpec(vocab_size=97, hidden_size=48, num_layers=2, num_heads=6, num_kv_heads=2,
                     ffn_hidden_size=80, dtype="float32", model_type="qwen2",
                     attention_bias=True, tie_word_embeddings=True)

    def trainer(seed: int) -> Trainer:
        torch.manual_seed(seed)
        return Trainer(Transformer(spec), TrainConfig(lr=1e-2), rank=0)

    plan = plan_of(1, [[group([0], [(0, 17), (1, 5)])]])
    straight = trainer(0)
    for k in range(2):
        straight.train_step(plan, random_samples([17, 5], seed=k, vocab=97))
    straight.save(tmp_path / "ckpt")
    resumed = trainer(1)
    resumed.restore(tmp_path / "ckpt")
    assert resumed.model.head.weight is resumed.model.embed.weight
    want = straight.train_step(plan, random_samples([17, 5], seed=5, vocab=97)).stats.loss
    got = resumed.train_step(plan, random_samples([17, 5], seed=5, vocab=97)).stats.loss
    assert got == want
    for p, q in zip(straight.model.parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(p, q)
