"""Import throughput: `ringmaster data import` vs `datasets.Dataset.map(batched=True, num_proc=2)`.

Same files, same tokenizer (a byte-level BPE trained here and saved as a model directory),
same tokens (our import runs with --no-add-eos so both produce the tokenizer's own ids;
the token totals are checked equal). Each contender runs in its own subprocess, measured
side by side in one run: wall time from reading the JSONL to a finished on-disk result
(ours: the token dataset; datasets: load_dataset's Arrow cache plus map's output cache),
tokens/s, and the peak RSS of the contender's whole process tree (psutil, sampled every
20 ms: the main process plus its workers).

    .venv/bin/python -m bench.ingest [--rows 200000] [--words 120] [--repeat 3]

Each contender runs --repeat times in a rotating order; the table shows the median run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]  # children run as `python -m bench.ingest` here

WORDS = ("the a of to and in is for on that with as by at from long short context ring "
         "rank sequence batch token model train step plan memory offload attention "
         "gradient loss learning rate quick brown fox jumps over lazy dog river stone "
         "capital France Paris number 1234 3.14 émigré naïve café").split()


def make_corpus(path: Path, rows: int, words: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    vocab = np.array(WORDS)
    with open(path, "w") as f:
        for _ in range(rows):
            n = int(rng.integers(words // 4, 2 * words))
            f.write(json.dumps({"text": " ".join(vocab[rng.integers(0, len(vocab), n)])})
                    + "\n")


def make_tokenizer(directory: Path, corpus: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=4096, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    with open(corpus) as f:
        lines = [json.loads(next(f))["text"] for _ in range(2000)]
    tok.train_from_iterator(lines, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>"}))


def run_ours(corpus: str, tok: str, work: str, workers: int) -> dict:
    from scheduler.ingest import import_dataset

    t0 = time.perf_counter()
    r = import_dataset([corpus], Path(work) / "out", tokenizer=tok, add_eos=False,
                       workers=workers)
    return {"seconds": time.perf_counter() - t0, "tokens": r.num_tokens}


def run_hf(corpus: str, tok: str, work: str, workers: int) -> dict:
    import datasets
    from transformers import AutoTokenizer

    datasets.disable_progress_bars()
    hf = AutoTokenizer.from_pretrained(tok, local_files_only=True)
    t0 = time.perf_counter()
    ds = datasets.load_dataset("json", data_files=corpus, split="train",
                               cache_dir=str(Path(work) / "cache"))
    t1 = time.perf_counter()
    out = ds.map(lambda b: hf(b["text"]), batched=True, num_proc=workers,
                 remove_columns=["text"])
    t2 = time.perf_counter()
    tokens = sum(len(x) for batch in out.iter(batch_size=10_000) for x in batch["input_ids"])
    return {"seconds": t2 - t0, "map_seconds": t2 - t1, "tokens": tokens}


def measure(which: str, corpus: Path, tok: Path, workers: int) -> dict:
    """Run one contender in a subprocess; its result plus the tree's peak RSS."""
    with tempfile.TemporaryDirectory(dir=corpus.parent) as work:
        cmd = [sys.executable, "-m", "bench.ingest", "--run", which, "--corpus", str(corpus),
               "--tok", str(tok), "--work", work, "--workers", str(workers)]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=ROOT)
        peak = [0]
        done = threading.Event()

        def sample():
            p = psutil.Process(proc.pid)
            while not done.is_set():
                try:
                    tree = [p, *p.children(recursive=True)]
                    peak[0] = max(peak[0], sum(q.memory_info().rss for q in tree))
                except psutil.Error:
                    pass
                time.sleep(0.02)

        t = threading.Thread(target=sample, daemon=True)
        t.start()
        out, _ = proc.communicate()
        done.set()
        t.join()
        if proc.returncode:
            raise SystemExit(f"{which} failed with status {proc.returncode}")
    return {**json.loads(out.strip().splitlines()[-1]), "peak_rss_mib": peak[0] / 2**20}


def _median(results: list[dict]) -> dict:
    """The run of median time, with the largest peak RSS of all runs."""
    best = sorted(results, key=lambda r: r["seconds"])[len(results) // 2]
    return {**best, "peak_rss_mib": max(r["peak_rss_mib"] for r in results)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--words", type=int, default=120)
    ap.add_argument("--run", choices=["ours", "hf"])
    ap.add_argument("--corpus")
    ap.add_argument("--tok")
    ap.add_argument("--work")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3, help="runs per contender (median)")
    args = ap.parse_args()
    if args.run:
        fn = run_ours if args.run == "ours" else run_hf
        print(json.dumps(fn(args.corpus, args.tok, args.work, args.workers)))
        return
    with tempfile.TemporaryDirectory() as d:
        corpus, tok = Path(d) / "corpus.jsonl", Path(d) / "tokenizer"
        make_corpus(corpus, args.rows, args.words)
        make_tokenizer(tok, corpus)
        size = corpus.stat().st_size / 2**20
        print(f"corpus: {args.rows:,} rows, {size:.1f} MiB JSONL; cpus={os.cpu_count()}, "
              f"load={os.getloadavg()[0]:.2f}")
        contenders = [("ringmaster data import, 1 process", "ours", 1),
                      ("ringmaster data import, 2 workers", "ours", 2),
                      ("datasets load_dataset + map(num_proc=2)", "hf", 2)]
        runs = {name: [] for name, _, _ in contenders}
        for rep in range(args.repeat):  # rotate the order: load changes hit each alike
            for name, which, workers in contenders[rep % 3:] + contenders[:rep % 3]:
                runs[name].append(measure(which, corpus, tok, workers))
        rows = [(name, _median(runs[name])) for name, _, _ in contenders]
        tokens = {r["tokens"] for _, r in rows}
        assert len(tokens) == 1, f"token totals differ: {tokens}"
        base = rows[-1][1]["tokens"] / rows[-1][1]["seconds"]
        print(f"{'contender':42s} {'seconds':>8s} {'Mtok/s':>8s} {'vs map':>7s} "
              f"{'peak RSS MiB':>12s}")
        for name, r in rows:
            rate = r["tokens"] / r["seconds"]
            extra = f"  (map alone {r['map_seconds']:.1f} s)" if "map_seconds" in r else ""
            print(f"{name:42s} {r['seconds']:8.1f} {rate / 1e6:8.2f} {rate / base:6.2f}x "
                  f"{r['peak_rss_mib']:12.0f}{extra}")
        print(f"tokens: {tokens.pop():,}; median of {args.repeat} runs each; load after: "
              f"{os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
