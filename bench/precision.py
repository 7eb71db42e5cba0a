"""bf16-mixed vs fp32 on the demo task: loss curves side by side, and the step-time ratio.

The task is `make demo`'s (controller/cli_demo.py): scheduler.synth's copy task with a
block of PERIOD = 72 tokens repeated, ids 1..15, lengths uniform up to 256 (at least 16).
Both runs train the tiny model from the same weights (bf16-representable, so fp32 starts
exactly where bf16-mixed does) on the same batches, one rank, packed micro-batches,
AdamW at the given LR with warmup and cosine decay. The two trainers step in alternation
(step k of fp32, then step k of bf16-mixed), so load on a shared machine hits both alike
and the time ratio is measured side by side. A model that copies nothing stays at
ln(15) = 2.71 nats per prediction.

Writes a PNG of both curves (raw and a 10-step moving mean) and prints the final losses
(mean of the last 10 steps), their relative gap and the median step-time ratio.

    .venv/bin/python -m bench.precision [--steps 200] [--tokens-per-batch 1024]
        [--lr 3e-3] [--out docs/img/precision-loss.png]

On CPU bfloat16 matmuls are slower than float32 ones, so the time ratio here says nothing
of a GPU, where bf16-mixed is the default (absolute GPU figures: pending).
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from scheduler.plan import MicroBatch, RingGroup, SeqSlice, StepPlan
from scheduler.specs import model_preset
from scheduler.synth import synthesize
from workers.data import DatasetPlanSource
from workers.train import TrainConfig, Trainer, build_model

VOCAB, PERIOD, MAX_LENGTH = 16, 72, 256
PRECISIONS = ("fp32", "bf16-mixed")


def packed_plan(lengths: np.ndarray) -> StepPlan:
    """Everything on rank 0 in one packed micro-batch."""
    seqs = [SeqSlice(id=i, length=int(n)) for i, n in enumerate(lengths)]
    return StepPlan(world_size=1, capacity_tokens=int(lengths.sum()),
                    micro_batches=[MicroBatch(groups=[RingGroup(ranks=[0], sequences=seqs)])])


def trainers(args, data_dir: Path) -> dict[str, tuple[Trainer, DatasetPlanSource]]:
    torch.manual_seed(args.seed)
    init = build_model(model_preset("tiny"), "bf16-mixed")
    out = {}
    for precision in PRECISIONS:
        model = build_model(model_preset("tiny"), precision)
        dtype = next(model.parameters()).dtype
        model.load_state_dict({k: v.to(dtype) for k, v in init.state_dict().items()})
        cfg = TrainConfig(lr=args.lr, warmup_steps=10, total_steps=args.steps,
                          precision=precision)
        source = DatasetPlanSource(data_dir, tokens_per_batch=args.tokens_per_batch,
                                   seed=args.seed, planner=packed_plan)
        out[precision] = (Trainer(model, cfg, rank=0), source)
    return out


def run(args) -> dict[str, dict[str, list[float]]]:
    with tempfile.TemporaryDirectory(prefix="ringmaster-precision-") as tmp:
        synthesize(Path(tmp) / "data", distribution="uniform", num_samples=args.num_samples,
                   max_length=MAX_LENGTH, vocab_size=VOCAB, seed=args.seed, period=PERIOD,
                   min_length=16)
        runs = trainers(args, Path(tmp) / "data")
        curves = {p: {"loss": [], "time": []} for p in PRECISIONS}
        for step in range(args.steps):
            for precision, (trainer, source) in runs.items():
                inp = source(trainer.data_position)
                t0 = time.perf_counter()
                stats = trainer.train_step(inp.plan, inp.samples, next_position=inp.next_position)
                curves[precision]["time"].append(time.perf_counter() - t0)
                curves[precision]["loss"].append(stats.stats.loss)
            if (step + 1) % 50 == 0:
                print(f"step {step + 1}: " + ", ".join(
                    f"{p} {c['loss'][-1]:.3f}" for p, c in curves.items()), flush=True)
    return curves


def plot(curves: dict, out: Path, args) -> None:
    """Top: both loss curves (raw, and a 10-step moving mean); bottom: their relative gap."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, gap_ax) = plt.subplots(2, 1, figsize=(7, 5.5), dpi=100, sharex=True,
                                     gridspec_kw={"height_ratios": [3, 1.3]})
    styles = {"fp32": dict(color="tab:blue", lw=3.0), "bf16-mixed": dict(color="tab:orange",
                                                                       lw=1.5, ls="--")}
    loss = {k: np.array(c["loss"]) for k, c in curves.items()}
    steps = np.arange(1, args.steps + 1)
    for precision in PRECISIONS:
        style = styles[precision]
        ax.plot(steps, loss[precision], color=style["color"], alpha=0.2, lw=0.8)
        mean = np.convolve(loss[precision], np.ones(10) / 10, mode="valid")
        ax.plot(steps[9:], mean, label=f"{precision} (10-step mean)", **style)
    ax.axhline(math.log(VOCAB - 1), color="gray", ls=":", lw=0.8, label="ln 15: no copying")
    ax.set_ylabel("loss (nats per prediction)")
    ax.set_title(f"demo task, tiny model, 1 rank, {args.tokens_per_batch} tokens/step, "
                 f"lr {args.lr:g}")
    ax.set_ylim(bottom=1.0, top=min(6.0, ax.get_ylim()[1]))
    ax.legend()
    rel = 100 * (loss["bf16-mixed"] - loss["fp32"]) / loss["fp32"]
    gap_ax.plot(steps, rel, color="tab:orange", lw=0.8)
    gap_ax.axhline(0.0, color="gray", lw=0.8)
    gap_ax.set_ylabel("bf16-mixed - fp32\n(% of fp32)")
    gap_ax.set_xlabel("optimizer step")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--tokens-per-batch", type=int, default=1024)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--num-samples", type=int, default=3000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--out", type=Path, default=Path("docs/img/precision-loss.png"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    curves = run(args)
    plot(curves, args.out, args)
    final = {k: float(np.mean(c["loss"][-10:])) for k, c in curves.items()}
    med = {k: statistics.median(c["time"][5:]) for k, c in curves.items()}
    gap = (final["bf16-mixed"] - final["fp32"]) / final["fp32"]
    print(f"final loss (mean of last 10 steps): fp32 {final['fp32']:.4f}, bf16-mixed "
          f"{final['bf16-mixed']:.4f} (gap {100 * gap:+.2f}%)")
    print(f"median step: fp32 {med['fp32'] * 1e3:.1f} ms, bf16-mixed "
          f"{med['bf16-mixed'] * 1e3:.1f} ms (ratio bf16-mixed / fp32 "
          f"{med['bf16-mixed'] / med['fp32']:.2f})")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
