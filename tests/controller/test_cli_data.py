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
