"""Bad rows name the file, the row (from 1) and the field; a failed import leaves nothing."""

from __future__ import annotations

import json
import re

import pytest

from scheduler.dataset import TokenDataset
from scheduler.errors import DatasetError
from scheduler.ingest import import_dataset
from scheduler.ingest_rows import ChunkEncoder

GOOD = {"sft": {"prompt": "Fox?", "completion": " quick"},
        "dpo": {"prompt": "Fox?", "chosen": " quick", "rejected": " lazy"},
        "grpo": {"prompt": "Fox?", "completions": [" a", " b"], "rewards": [1, 0]},
        "chat": {"messages": [{"role": "user", "content": "Fox?"},
                              {"role": "assistant", "content": "quick"}]}}

BAD = [  # (row shape, bad row, field named, words of the problem)
    ("sft", {"prompt": "Fox?"}, "completion", "is missing"),
    ("sft", {"prompt": "Fox?", "completion": ""}, "completion", "is empty"),
    ("sft", {"prompt": 7, "completion": " quick"}, "prompt", "must be a string"),
    ("sft", {"prompt": "Fox?", "completion": ["x"]}, "completion", "must be a string"),
    ("dpo", {"prompt": "Fox?", "chosen": " quick"}, "rejected", "is missing"),
    ("dpo", {"prompt": "Fox?", "chosen": " quick", "rejected": " quick"}, "rejected",
     "same ids as 'chosen'"),
    ("grpo", {"prompt": "Fox?", "completions": [" a", " b"], "rewards": [1]}, "rewards",
     "list of 2 numbers"),
    ("grpo", {"prompt": "Fox?", "completions": [" a", " "], "rewards": [1, 0]},
     "completions[1]", "is empty"),
    ("grpo", {"prompt": "Fox?", "completions": [" a"], "rewards": ["high"]}, "rewards[0]",
     "finite number"),
    ("chat", {"messages": [{"role": "user", "content": "Fox?"},
                           {"role": "robot", "content": "beep"}]}, "messages",
     "has no assistant turn"),
    ("chat", {"messages": [{"role": "user", "content": "Fox?"},
                           {"role": "tool", "content": "{}"},
                           {"role": "assistant", "content": "quick"}]}, "messages",
     "chat template error: TemplateError: unknown role tool"),
    ("chat", {"messages": "Fox?"}, "messages", "non-empty list"),
]


def leftovers(parent, keep):
    return sorted(p.name for p in parent.iterdir() if p.name not in keep)


def _one_type(row: dict) -> bool:
    """Whether a Parquet column can hold the bad value beside the good rows' values."""
    return not (isinstance(row.get("messages"), str) or isinstance(row.get("prompt"), int)
                or isinstance(row.get("completion"), list) or "high" in str(row.get("rewards")))


CASES = [(fmt, *case) for case in BAD for fmt in ("jsonl", "parquet")
         if fmt == "jsonl" or _one_type(case[1])]


@pytest.mark.parametrize("fmt,kind,row,field,problem", CASES,
                         ids=[f"{f}-{k}-{n}-{p.split()[0]}" for f, k, _, n, p in CASES])
def test_bad_row_is_named_and_nothing_is_written(tmp_path, model_dir, fmt, kind, row, field,
                                                 problem):
    rows = [GOOD[kind]] * 4 + [row] + [GOOD[kind]]
    src = tmp_path / f"in.{fmt}"
    if fmt == "jsonl":
        src.write_text("\n" + "".join(json.dumps(r) + "\n" for r in rows))  # line = row + 1
        where = r"row 5 \(line 6\)"
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), src)
        where = "row 5"
    with pytest.raises(DatasetError) as info:
        import_dataset([src], tmp_path / "out", tokenizer=model_dir, kind=kind,
                       rows_per_chunk=2)
    msg = str(info.value)
    assert msg.startswith(f"{src}: ") and f"field '{field}'" in msg and problem in msg, msg
    assert re.search(where, msg), msg
    assert leftovers(tmp_path, {src.name}) == []


def test_bad_row_late_in_a_parallel_import_leaves_nothing(tmp_path, model_dir):
    rows = [GOOD["dpo"]] * 700 + [{"prompt": "Fox?", "chosen": " x", "rejected": " x"}]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows + [GOOD["dpo"]] * 50))
    with pytest.raises(DatasetError, match=r"row 701 \(line 701\): field 'rejected'"):
        import_dataset([src], tmp_path / "out", tokenizer=model_dir, workers=2,
                       rows_per_chunk=16)
    assert leftovers(tmp_path, {"in.jsonl"}) == []


def test_exception_mid_way_leaves_nothing(tmp_path, model_dir, monkeypatch):
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"text": f"fox {i}"}) + "\n" for i in range(100)))
    real, calls = ChunkEncoder.encode, []

    def flaky(self, rows):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("disk on fire")
        return real(self, rows)

    monkeypatch.setattr(ChunkEncoder, "encode", flaky)
    with pytest.raises(RuntimeError, match="disk on fire"):
        import_dataset([src], tmp_path / "out", tokenizer=model_dir, rows_per_chunk=10)
    assert len(calls) == 3 and leftovers(tmp_path, {"in.jsonl"}) == []


def test_existing_dataset_survives_a_failed_overwrite(tmp_path, model_dir):
    good, bad = tmp_path / "good.jsonl", tmp_path / "bad.jsonl"
    good.write_text(json.dumps({"text": "fox"}) + "\n")
    bad.write_text(json.dumps({"text": "dog"}) + "\n" + json.dumps({"text": ""}) + "\n")
    import_dataset([good], tmp_path / "out", tokenizer=model_dir)
    before = (tmp_path / "out" / "data.bin").read_bytes()
    with pytest.raises(DatasetError, match="exists and is not empty"):
        import_dataset([good], tmp_path / "out", tokenizer=model_dir)
    with pytest.raises(DatasetError, match=r"bad\.jsonl: row 2 \(line 2\): field 'text'"):
        import_dataset([bad], tmp_path / "out", tokenizer=model_dir, overwrite=True)
    assert (tmp_path / "out" / "data.bin").read_bytes() == before
    assert leftovers(tmp_path, {"good.jsonl", "bad.jsonl", "out"}) == []
    bad.write_text(json.dumps({"text": "The lazy dog"}) + "\n")
    import_dataset([bad], tmp_path / "out", tokenizer=model_dir, overwrite=True)
    assert len(TokenDataset(tmp_path / "out")[0]) > len(before) // 4
    assert leftovers(tmp_path, {"good.jsonl", "bad.jsonl", "out"}) == []


def test_template_that_rewrites_turns_is_reported(tmp_path, rewriting_dir):
    src = tmp_path / "in.jsonl"
    chat = GOOD["chat"]["messages"] * 2
    src.write_text(json.dumps({"messages": chat}) + "\n")
    with pytest.raises(DatasetError, match=r"row 1 \(line 1\): field 'messages': .*rewrites "
                                           "earlier turns"):
        import_dataset([src], tmp_path / "out", tokenizer=rewriting_dir)


@pytest.mark.parametrize("args,needle", [
    ({"tokenizer": "/nonexistent/tok"}, "--tokenizer /nonexistent/tok: not found"),
    ({"column": "body", "kind": "sft"}, "--column 'body' applies to pretrain rows only"),
    ({"workers": 0}, "--workers 0: must be >= 1"),
])
def test_bad_options(tmp_path, args, needle):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps(GOOD["sft"]) + "\n")
    with pytest.raises(DatasetError, match=needle):
        import_dataset([src], tmp_path / "out", **args)
    assert leftovers(tmp_path, {"in.jsonl"}) == []


def test_chat_without_tokenizer_and_unknown_files(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps(GOOD["chat"]) + "\n")
    with pytest.raises(DatasetError, match="field 'messages': messages need --tokenizer"):
        import_dataset([src], tmp_path / "out")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DatasetError, match=r"x\.csv: unsupported file type"):
        import_dataset([tmp_path / "x.csv"], tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="holds no .jsonl"):
        import_dataset([tmp_path / "empty"], tmp_path / "out")
