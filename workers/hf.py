"""Hugging Face model directories in and out: `load_pretrained`, `save_pretrained`.

Loading reads config.json into a ModelSpec (scheduler.hf_config: anything that would
change the math and is not implemented is refused by name), checks every shard's header
against the tensors that spec needs (scheduler.hf_checkpoint: names, shapes, dtypes, no
leftovers) before allocating anything, then builds the model with uninitialised storage
and fills it tensor by tensor with the `safetensors` library. Memory: each read covers at
most READ_CHUNK_BYTES of one tensor through a freshly opened file, so neither the decoded
chunk nor the file pages the memory map touched (they count in the process's RSS while
mapped) grow with the model: peak host memory is the model's own bytes (on CPU; ~0 on
CUDA) plus about two chunks. An error at any point raises before the model is returned,
so a partially loaded model is never used.

In a job every rank loads the same directory itself (load on every rank, rather than
load once and broadcast): a rank's host memory stays bounded by the chunk (a broadcast
needs the whole model on the sending host first, and a collective per tensor), ranks on
one node share the file pages through the page cache, and no rank waits on another.
The files must sit on storage every rank sees; workers.group checks after loading that
every rank holds the same weights.

Saving writes config.json (the spec's architecture and the RoPE settings actually
trained, on top of the source model's config), `model.safetensors` or, above
`max_shard_bytes`, `model-0000i-of-0000n.safetensors` with `model.safetensors.index.json`,
and copies the tokenizer and generation files of the directory the model came from, so
`transformers.AutoModelForCausalLM.from_pretrained` and vLLM-style loaders read it like
the original.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from scheduler.errors import SpecError
from scheduler.hf_checkpoint import (
    INDEX_FILE,
    SINGLE_FILE,
    CheckpointLayout,
    TensorEntry,
    inspect_checkpoint,
    parameter_names,
)
from scheduler.hf_config import read_hf_config
from scheduler.specs import DTYPE_BYTES, DType, ModelSpec
from workers.model import Transformer

__all__ = ["MODEL_CARD", "READ_CHUNK_BYTES", "load_pretrained", "read_model_card",
           "save_pretrained", "write_model_card"]

READ_CHUNK_BYTES = 16 * 2**20  # bytes of one tensor read per opened file
DEFAULT_SHARD_BYTES = 5 * 10**9  # transformers' "5GB"
MODEL_CARD = "ringmaster-model.json"  # beside a training checkpoint: its spec and source
# What a model directory carries besides weights and config.json (copied on export).
COPIED_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
                "generation_config.json", "chat_template.jinja", "chat_template.json")

_TORCH_DTYPES: dict[DType, torch.dtype] = {
    "float64": torch.float64, "float32": torch.float32, "float16": torch.float16,
    "bfloat16": torch.bfloat16}
_NAMES = {v: k for k, v in _TORCH_DTYPES.items()}


def dtype_name(dtype: str | torch.dtype | None) -> DType | None:
    """'bfloat16' for torch.bfloat16 or 'bfloat16'; None stays None."""
    if dtype is None:
        return None
    if isinstance(dtype, str):
        for name in _TORCH_DTYPES:  # the names of DTYPE_BYTES, as the DType literal
            if name == dtype:
                return name
    if isinstance(dtype, torch.dtype) and dtype in _NAMES:
        return _NAMES[dtype]
    raise SpecError(f"dtype={dtype!r} is not valid; valid: {', '.join(DTYPE_BYTES)}")


# --------------------------------------------------------------------------- loading


def load_pretrained(path: str | Path, *, dtype: str | torch.dtype | None = None,
                    spec: ModelSpec | None = None,
                    device: str | torch.device = "cpu") -> Transformer:
    """The Transformer of Hugging Face model directory `path`, weights loaded.

    `dtype`: the parameters' dtype (default: the config's). `spec`: the architecture to
    build instead of config.json's, e.g. with a job's rope_theta / rope_scaling override
    (its tensor shapes must still match the checkpoint). `device`: where the parameters
    live; tensors are copied there chunk by chunk. Raises SpecError (CheckpointError)
    naming the file and field for a bad directory; nothing is returned half loaded.
    """
    directory = Path(path)
    if spec is None:
        spec = ModelSpec.from_hf_config(directory, dtype=dtype_name(dtype))
    elif dtype is not None:
        spec = spec.with_overrides(dtype=dtype_name(dtype))
    layout = inspect_checkpoint(directory, spec)
    model = empty_model(spec, device)
    params = dict(model.named_parameters())
    for file in layout.files:
        for entry in (e for e in layout.entries if e.file == file):
            _read_tensor(entry, params[entry.name])
    model.source_dir = str(directory)
    return model


def empty_model(spec: ModelSpec, device: str | torch.device = "cpu") -> Transformer:
    """A Transformer with uninitialised parameters on `device` (no random init).

    Built on the meta device, then each parameter gets plain `torch.empty` storage (shared
    parameters stay shared). Not `Module.to_empty`: its meta-tensor path imports
    torch's symbolic-shape machinery (sympy, ~40 MB) into every loading process.
    """
    with torch.device("meta"):
        model = Transformer(spec, initialize=False)
    made: dict[int, torch.nn.Parameter] = {}
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False, remove_duplicate=False)):
            if id(p) not in made:
                made[id(p)] = torch.nn.Parameter(
                    torch.empty(p.shape, dtype=p.dtype, device=device),
                    requires_grad=p.requires_grad)
            module.register_parameter(name, made[id(p)])
    return model


@torch.no_grad()
def _read_tensor(entry: TensorEntry, param: torch.nn.Parameter) -> None:
    """Copy one checkpoint tensor into `param`, at most READ_CHUNK_BYTES per opened file."""
    row_bytes = (param[0].numel() if param.dim() > 1 else 1) * param.element_size()
    rows = max(1, READ_CHUNK_BYTES // row_bytes)
    for start in range(0, param.shape[0], rows):
        stop = min(start + rows, param.shape[0])
        with safe_open(str(entry.file), framework="pt") as f:  # closing unmaps the pages
            param[start:stop].copy_(f.get_slice(entry.hf_name)[start:stop])


def checkpoint_bytes(path: str | Path, spec: ModelSpec | None = None) -> int:
    """Bytes of a model directory's parameters as stored (what loading must stay near)."""
    spec = spec or ModelSpec.from_hf_config(path)
    layout: CheckpointLayout = inspect_checkpoint(path, spec)
    return layout.num_bytes


# --------------------------------------------------------------------------- saving


def save_pretrained(model: Transformer, directory: str | Path, *,
                    dtype: str | torch.dtype | None = None,
                    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                    source_dir: str | Path | None = None) -> Path:
    """Write `model` as a Hugging Face model directory; returns it.

    `dtype`: the stored dtype (default: the model's). `source_dir` (default
    `model.source_dir`): the directory it came from, whose config.json fields are kept and
    whose tokenizer files are copied. Existing weight files in `directory` are replaced.
    Host memory: one shard's tensors in the stored dtype at a time.
    """
    if max_shard_bytes < 1:
        raise ValueError(f"max_shard_bytes={max_shard_bytes} must be >= 1")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    name = dtype_name(dtype) or model.spec.dtype
    source = source_dir if source_dir is not None else model.source_dir
    spec = model.spec.with_overrides(dtype=name)
    base = read_hf_config(source)[0] if source and (Path(source) / "config.json").is_file() \
        else None
    for stale in [*out.glob("model*.safetensors"), out / INDEX_FILE]:
        stale.unlink(missing_ok=True)
    _write_weights(model, spec, out, _TORCH_DTYPES[name], max_shard_bytes)
    (out / "config.json").write_text(json.dumps(spec.to_hf_config(base), indent=2) + "\n")
    if source:
        for file in COPIED_FILES:
            if (Path(source) / file).is_file() and Path(source).resolve() != out.resolve():
                shutil.copyfile(Path(source) / file, out / file)
    return out


def _shards(sizes: list[int], limit: int) -> list[list[int]]:
    """Consecutive tensor indices per shard, each shard <= limit unless one tensor is more."""
    shards: list[list[int]] = [[]]
    used = 0
    for i, n in enumerate(sizes):
        if shards[-1] and used + n > limit:
            shards.append([])
            used = 0
        shards[-1].append(i)
        used += n
    return shards


def _write_weights(model: Transformer, spec: ModelSpec, out: Path, dtype: torch.dtype,
                   limit: int) -> None:
    params = dict(model.named_parameters())
    names = parameter_names(spec)
    sizes = [params[ours].numel() * DTYPE_BYTES[spec.dtype] for ours, _, _ in names]
    shards = _shards(sizes, limit)
    files = [SINGLE_FILE] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map: dict[str, str] = {}
    for file, members in zip(files, shards, strict=True):
        tensors = {names[i][1]: params[names[i][0]].detach().to("cpu", dtype).contiguous()
                   for i in members}
        save_file(tensors, str(out / file), metadata={"format": "pt"})
        weight_map |= {hf: file for hf in tensors}
        del tensors
    if len(files) > 1:
        index = {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}
        (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


# --------------------------------------------------------------------------- checkpoints


def write_model_card(directory: str | Path, model: Transformer) -> None:
    """Record beside a training checkpoint what `ringmaster export` needs: the spec trained
    (RoPE overrides included) and the Hugging Face directory the model came from."""
    card = {"version": 1, "spec": model.spec.model_dump(mode="json"),
            "source_dir": getattr(model, "source_dir", None)}
    (Path(directory) / MODEL_CARD).write_text(json.dumps(card, indent=1) + "\n")


def read_model_card(directory: str | Path) -> tuple[ModelSpec, str | None]:
    """(spec, source directory) of a checkpoint written with a model card."""
    path = Path(directory) / MODEL_CARD
    if not path.is_file():
        raise SpecError(f"checkpoint {directory} has no {MODEL_CARD} (written by checkpoints "
                        "of this version); pass --model with the preset or model directory "
                        "it was trained from")
    card = json.loads(path.read_text())
    return ModelSpec.model_validate(card["spec"]), card.get("source_dir")
