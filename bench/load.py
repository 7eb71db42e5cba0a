"""Load time and peak host memory of a sharded Hugging Face checkpoint: workers.hf.load_pretrained
against transformers.AutoModelForCausalLM.from_pretrained, on the same files, side by side.

A Llama-shaped checkpoint (random weights, written by workers.hf.save_pretrained in shards
with an index) is loaded by each loader in a fresh process, interleaved `--repeats` times,
once keeping the stored dtype (bfloat16) and once converting to float32. Each process
imports its loader first, then resets its peak RSS (/proc/self/clear_refs) and loads:
"growth" is the peak RSS (VmHWM) minus the RSS before the load, so it counts the model,
every transient buffer, the file pages the loader maps, and any module the load imports
on first use (torch's meta-device kernels, ~150 MB, for both loaders). transformers keeps
same-dtype CPU weights as views of the memory-mapped files, whose pages are read on first
use, so the second pair of columns also reads every weight once (a sum per parameter, what
a first training step does) and measures again. The files are read
once before timing, so both loaders find them in the page cache. Times are wall seconds
(median of the repeats) on this machine's CPU.

    .venv/bin/python -m bench.load [--hidden 1024 --layers 16 --shard-mb 200 --repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

_CHILD = """
import json, sys, time
kind, path, dtype_name = sys.argv[1:4]
import torch
dtype = getattr(torch, dtype_name)
if kind == "ours":
    from workers.hf import load_pretrained
    load = lambda: load_pretrained(path, dtype=dtype)
else:
    import transformers
    load = lambda: transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype)

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

base = status("VmRSS:")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
t0 = time.perf_counter()
model = load()
seconds, growth = time.perf_counter() - t0, status("VmHWM:") - base
with torch.no_grad():  # what the first step does: read every weight
    checksum = sum(float(p.sum()) for p in model.parameters())
touched = time.perf_counter() - t0
print(json.dumps({"seconds": seconds, "growth": growth, "touched_seconds": touched,
                  "touched_growth": status("VmHWM:") - base, "peak": status("VmHWM:"),
                  "bytes": sum(p.numel() * p.element_size() for p in model.parameters())}))
"""


def make_checkpoint(directory: Path, *, hidden: int, layers: int, shard_mb: int) -> int:
    """Write a random Llama-shaped bfloat16 checkpoint in shards; returns its tensor bytes."""
    import torch

    from scheduler.specs import ModelSpec
    from workers.hf import checkpoint_bytes, save_pretrained
    from workers.model import Transformer

    spec = ModelSpec(vocab_size=32000, hidden_size=hidden, num_layers=layers,
                     num_heads=hidden // 64, num_kv_heads=max(1, hidden // 256),
                     ffn_hidden_size=int(2.75 * hidden), dtype="bfloat16",
                     max_position_embeddings=8192)
    torch.manual_seed(0)
    save_pretrained(Transformer(spec), directory, max_shard_bytes=shard_mb * 10**6)
    for f in directory.glob("*.safetensors"):  # into the page cache for both loaders
        f.read_bytes()
    return checkpoint_bytes(directory)


def run_child(kind: str, path: Path, dtype: str) -> dict:
    done = subprocess.run([sys.executable, "-c", _CHILD, kind, str(path), dtype],
                          capture_output=True, text=True, check=False,
                          cwd=Path(__file__).resolve().parents[1])
    if done.returncode:
        raise RuntimeError(f"{kind} load failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--shard-mb", type=int, default=200)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model"
        stored = make_checkpoint(path, hidden=args.hidden, layers=args.layers,
                                 shard_mb=args.shard_mb)
        shards = len(list(path.glob("*.safetensors")))
        print(f"checkpoint: {stored / 1e6:.0f} MB bfloat16 in {shards} shards (+ index)\n")
        print("| load as | loader | load s | peak RSS growth / model bytes | load + read "
              "every weight s | peak RSS growth / model bytes | peak RSS MB |")
        print("|---|---|---|---|---|---|---|")
        for dtype in ("bfloat16", "float32"):
            runs: dict[str, list[dict]] = {"ours": [], "transformers": []}
            for _ in range(args.repeats):
                for kind in runs:
                    runs[kind].append(run_child(kind, path, dtype))
            for kind, rs in runs.items():
                def med(key, rs=rs):
                    return statistics.median(r[key] for r in rs)

                nbytes = rs[0]["bytes"]
                print(f"| {dtype} | {'workers.hf.load_pretrained' if kind == 'ours' else kind}"
                      f" | {med('seconds'):.2f} | {med('growth') / nbytes:.2f} | "
                      f"{med('touched_seconds'):.2f} | {med('touched_growth') / nbytes:.2f} | "
                      f"{med('peak') / 1e6:.0f} |")


if __name__ == "__main__":
    main()
