"""`ringmaster data import | stats` run as a user runs them (no terminal: plain lines)."""

from __future__ import annotations

import json

import numpy as np

from scheduler.dataset import TokenDataset
from tests.controller.test_cli_foundation import ringmaster
from tests.hf_tokenizer import save_model_dir

ROWS = [{"prompt": "What is the capital of France?", "completion": " Paris."},
        {"prompt": "Fox?", "completion": " The quick brown fox jumps over the lazy dog."},
        {"prompt": "", "completion": "Rivers carve the stone, slowly, patiently."}]


def test_import_with_a_tokenizer_then_stats(tmp_path):
    model = save_model_dir(tmp_path / "model")
    src = tmp_path / "sft.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    out = ringmaster("data", "import", str(src), "--tokenizer", str(model), "--out",
                     str(tmp_path / "ds")).stdout
    assert "imported 3 sft rows as 3 samples" in out and "tokens/s" in out
    ds = TokenDataset(tmp_path / "ds")
    lengths = ds.lengths
    loss = sum(int(ds.loss_mask(i)[1:].sum()) for i in range(len(ds)))
    st = json.loads(ringmaster("data", "stats", str(tmp_path / "ds"), "-o", "json").stdout)
    assert st["num_samples"] == 3 and st["num_tokens"] == int(lengths.sum())
    assert st["length"]["max"] == int(lengths.max())
    assert st["length"]["p50"] == int(np.sort(lengths)[1])
    assert st["num_loss_tokens"] == loss and st["kinds"] == {"sft": 3}
    assert st["tokenizer"]["path"] == str(model)
    table = ringmaster("data", "stats", str(tmp_path / "ds")).stdout
    assert "loss tokens" in table and f"{loss:,} (" in table and "sft 3" in table


def test_bad_row_is_one_line_and_leaves_nothing(tmp_path):
    src = tmp_path / "dpo.jsonl"
    src.write_text(json.dumps({"prompt": "a", "chosen": " b", "rejected": " c"}) + "\n"
                   + json.dumps({"prompt": "a", "chosen": " b"}) + "\n")
    proc = ringmaster("data", "import", str(src), "--out", str(tmp_path / "ds"), check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "dpo.jsonl: row 2 (line 2): field 'rejected': is missing" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dpo.jsonl"]


def test_stats_of_a_missing_dataset(tmp_path):
    proc = ringmaster("data", "stats", str(tmp_path / "none"), check=False)
    assert proc.returncode == 2 and "index file not found" in proc.stderr


def test_progress_plain_lines_without_a_terminal_and_a_bar_with_one():
    import io

    from rich.console import Console

    from controller.cli_progress import ImportProgressView
    from scheduler.ingest import ImportProgress

    snaps = [ImportProgress(num_rows=100 * k, num_samples=100 * k, num_tokens=5000 * k,
                            bytes_done=250 * k, bytes_total=1000, seconds=0.5 * k)
             for k in (1, 2, 4)]
    plain = io.StringIO()
    with ImportProgressView(Console(file=plain, force_terminal=False, width=80),
                            interval_s=0) as view:
        for s in snaps:
            view.update(s)
    lines = plain.getvalue().splitlines()
    assert lines[-1] == "importing: 100% of input, 400 rows, 20,000 tokens, 10,000 tokens/s"
    assert len(lines) == 3 and "\x1b" not in plain.getvalue()
    tty = io.StringIO()
    with ImportProgressView(Console(file=tty, force_terminal=True, width=120)) as view:
        view.update(snaps[1])
        view._bar.refresh()
    assert "tokens/s" in tty.getvalue() and "50.0%" in tty.getvalue()
