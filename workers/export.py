"""`python -m workers.export CHECKPOINT --out DIR`: a training checkpoint as a Hugging Face model.

What `ringmaster export` runs (the controller's CLI imports no torch, so it starts this
module by name). It reads the model state dict of a DCP checkpoint (workers/checkpoint.py,
the "model" entry) into a model built from the checkpoint's model card (the spec trained,
RoPE overrides included) and writes it with workers.hf.save_pretrained: config.json,
model.safetensors (sharded with an index above --max-shard-size) and the tokenizer files
of the Hugging Face directory the job started from. Host memory: the model once, in the
checkpoint's dtype, plus one shard.
"""

from __future__ import annotations

import argparse
import re
import sys
import warnings
from pathlib import Path

from scheduler.errors import RingmasterError, SpecError
from scheduler.specs import DTYPE_BYTES, ModelSpec, model_preset

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str) -> int:
    """Bytes of '5GB', '500MiB' or '1000000' (transformers' max_shard_size spelling)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).upper() not in _UNITS or float(m.group(1)) <= 0:
        raise SpecError(f"--max-shard-size={text!r} is not a size; give e.g. 5GB, 500MiB or "
                        "a number of bytes")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def checkpoint_spec(checkpoint: Path, model: str | None) -> tuple[ModelSpec, str | None]:
    """(spec, source directory): the model card's, or `model`'s (a preset or directory)."""
    from workers.hf import read_model_card

    if model is not None:
        spec = model_preset(model)
        return spec, model if Path(model).is_dir() else None
    return read_model_card(checkpoint)


def _stored_dtype(checkpoint: Path) -> str:
    """The dtype the checkpoint holds the embedding in (the model's compute dtype)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from workers.hf import dtype_name

    meta = dcp.FileSystemReader(str(checkpoint)).read_metadata().state_dict_metadata
    entry = meta.get("model.embed.weight")
    if entry is None:
        raise SpecError(f"checkpoint {checkpoint} holds no model.embed.weight; is it a "
                        "Ringmaster training checkpoint?")
    if not isinstance(entry, TensorStorageMetadata):
        raise SpecError(f"checkpoint {checkpoint}: model.embed.weight is not a tensor; is it "
                        "a Ringmaster training checkpoint?")
    name = dtype_name(entry.properties.dtype)
    assert name is not None, "dtype_name maps a torch dtype to a name or raises"
    return name


def load_checkpoint_model(checkpoint: str | Path, *, model: str | None = None):
    """The Transformer whose weights a DCP training checkpoint holds."""
    import torch.distributed.checkpoint as dcp

    from workers.hf import empty_model

    path = Path(checkpoint)
    if not (path / ".metadata").is_file():
        raise SpecError(f"checkpoint={str(path)!r} holds no checkpoint (no .metadata)")
    spec, source = checkpoint_spec(path, model)
    spec = spec.with_overrides(dtype=_stored_dtype(path))
    net = empty_model(spec)
    state = {"model": net.state_dict()}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(path), no_dist=True)
    net.source_dir = source
    return net


def export(checkpoint: str | Path, out: str | Path, *, dtype: str | None = None,
           model: str | None = None, max_shard_bytes: int | None = None) -> Path:
    """Write the checkpoint as a Hugging Face model directory `out`; returns it."""
    from workers.hf import DEFAULT_SHARD_BYTES, save_pretrained

    if dtype is not None and dtype not in DTYPE_BYTES:
        raise SpecError(f"--dtype={dtype!r} is not valid; valid: {', '.join(DTYPE_BYTES)}")
    net = load_checkpoint_model(checkpoint, model=model)
    return save_pretrained(net, out, dtype=dtype,
                           max_shard_bytes=max_shard_bytes or DEFAULT_SHARD_BYTES)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m workers.export", description=__doc__.split(
        "\n\n")[0])
    p.add_argument("checkpoint", type=Path, help="a checkpoint directory (step_<n>)")
    p.add_argument("--out", type=Path, required=True, help="the model directory to write")
    p.add_argument("--dtype", default=None, help="stored dtype (default: the checkpoint's)")
    p.add_argument("--model", default=None, help="preset or model directory trained, for "
                                                 "checkpoints without a model card")
    p.add_argument("--max-shard-size", default="5GB", help="shard above this (default 5GB)")
    args = p.parse_args(argv)
    try:
        out = export(args.checkpoint, args.out, dtype=args.dtype, model=args.model,
                     max_shard_bytes=parse_size(args.max_shard_size))
    except (RingmasterError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
