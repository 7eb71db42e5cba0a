"""`data import` with a Hugging Face tokenizer: every row shape, JSONL / Parquet / directories.

References are independent of the importer: token ids come straight from the `tokenizers`
library, chat renderings and assistant masks from `transformers.AutoTokenizer` (its own
`apply_chat_template`), spans located by searching the rendered text, advantages from
the statistics module.
"""

from __future__ import annotations

import json
import statistics

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer

from scheduler.dataset import TokenDataset, read_structure
from scheduler.ingest import import_dataset

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"},
     {"role": "assistant", "content": "The capital of France is Paris."}],
    [{"role": "system", "content": "Be brief."},
     {"role": "user", "content": "Write a haiku about rivers."},
     {"role": "assistant", "content": "Rivers carve the stone."},
     {"role": "user", "content": "Numbers like 12345?"},
     {"role": "assistant", "content": "3.14159, slowly, patiently."}],
    [{"role": "user", "content": "émigré accents"},
     {"role": "assistant", "content": ""},  # an empty turn still ends with <|im_end|>
     {"role": "user", "content": "again"},
     {"role": "assistant", "content": "The quick brown fox."}],
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_parquet(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def encode(model_dir, text, special):
    return Tokenizer.from_file(str(model_dir / "tokenizer.json")).encode(
        text, add_special_tokens=special).ids


def eos(model_dir):
    return Tokenizer.from_file(str(model_dir / "tokenizer.json")).token_to_id("</s>")


def test_text_rows_from_jsonl_parquet_and_a_directory(tmp_path, model_dir):
    texts = ["The quick brown fox.", "Long-context training mixes sequences.", "Paris"]
    rows = [{"text": t} for t in texts]
    write_jsonl(tmp_path / "a.jsonl", rows)
    write_parquet(tmp_path / "b.parquet", rows)
    (tmp_path / "dir").mkdir()
    write_jsonl(tmp_path / "dir" / "1.jsonl", rows[:2])
    write_parquet(tmp_path / "dir" / "2.parquet", rows[2:])
    expect = [encode(model_dir, t, True) + [eos(model_dir)] for t in texts]
    for src in ("a.jsonl", "b.parquet", "dir"):
        r = import_dataset([tmp_path / src], tmp_path / f"out-{src}", tokenizer=model_dir)
        ds = TokenDataset(tmp_path / f"out-{src}")
        assert r.kind == "pretrain" and r.num_samples == 3 and ds.version == 2
        assert [ds[i].tolist() for i in range(3)] == expect
        assert all(ds.loss_mask(i).all() for i in range(3))
        assert r.num_loss_tokens == sum(len(e) - 1 for e in expect)
        assert ds.max_token_id == max(max(e) for e in expect)


def test_sft_rows_mask_the_prompt(tmp_path, model_dir):
    rows = [{"prompt": "What is the capital of France?", "completion": " Paris."},
            {"prompt": "", "completion": "The quick brown fox."}]
    for fmt, writer in (("jsonl", write_jsonl), ("parquet", write_parquet)):
        src = writer(tmp_path / f"in.{fmt}", rows)
        import_dataset([src], tmp_path / fmt, tokenizer=model_dir)
        ds = TokenDataset(tmp_path / fmt)
        for i, row in enumerate(rows):
            p = encode(model_dir, row["prompt"], True)
            c = encode(model_dir, row["completion"], False) + [eos(model_dir)]
            assert ds[i].tolist() == p + c
            assert ds.loss_mask(i).tolist() == [0] * len(p) + [1] * len(c)
            assert ds.meta(i).kind == "sft" and ds.meta(i).num_loss_tokens == len(c)


def test_dpo_rows_become_pairs(tmp_path, model_dir):
    rows = [{"prompt": "Capital of France?", "chosen": " Paris.", "rejected": " Rivers."},
            {"prompt": "Fox?", "chosen": " quick brown", "rejected": " lazy dog"}]
    import_dataset([write_parquet(tmp_path / "in.parquet", rows)], tmp_path / "out",
                   tokenizer=model_dir)
    ds, st = TokenDataset(tmp_path / "out"), read_structure(tmp_path / "out")
    assert st.pairs().tolist() == [[0, 1], [2, 3]]
    for k, row in enumerate(rows):
        p = encode(model_dir, row["prompt"], True)
        for j, role in enumerate(("chosen", "rejected")):
            c = encode(model_dir, row[role], False) + [eos(model_dir)]
            m = ds.meta(2 * k + j)
            assert (m.kind, m.pair_id, m.role) == ("dpo", k, role)
            assert ds[2 * k + j].tolist() == p + c
            assert ds.loss_mask(2 * k + j).tolist() == [0] * len(p) + [1] * len(c)
    assert st.batch_pairs([3, 0, 2, 1]) == [(1, 3), (2, 0)]  # plan ids of (chosen, rejected)


def test_grpo_rows_become_groups_with_normalised_advantages(tmp_path, model_dir):
    rows = [{"prompt": "Fox?", "completions": [" quick", " lazy", " brown fox"],
             "rewards": [1.0, 0, 0.25]},
            {"prompt": "One", "completions": [" only"], "rewards": [3]},
            {"prompt": "Tie", "completions": [" a", " b"], "rewards": [2, 2]}]
    import_dataset([write_jsonl(tmp_path / "in.jsonl", rows)], tmp_path / "out",
                   tokenizer=model_dir)
    ds, st = TokenDataset(tmp_path / "out"), read_structure(tmp_path / "out")
    assert len(ds) == 6 and st.num_groups == 3
    i = 0
    for g, row in enumerate(rows):
        mean, std = statistics.fmean(row["rewards"]), statistics.pstdev(row["rewards"])
        for c, r in zip(row["completions"], row["rewards"], strict=True):
            m = ds.meta(i)
            assert (m.kind, m.group_id, m.reward) == ("grpo", g, r)
            assert m.advantage == pytest.approx((r - mean) / (std + 1e-6), abs=1e-12)
            n = len(encode(model_dir, c, False)) + 1
            assert ds.loss_mask(i).tolist()[-n:] == [1] * n and ds.meta(i).num_loss_tokens == n
            i += 1


def reference_chat(model_dir, messages):
    """(ids, mask) from transformers' rendering and a search for each assistant turn."""
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    text = hf.apply_chat_template(messages, tokenize=False)
    spans, pos = [], 0
    for m in messages:
        head = f"<|im_start|>{m['role']}\n"
        pos = text.index(head, pos) + len(head)
        end = text.index("<|im_end|>", pos) + len("<|im_end|>")
        if m["role"] == "assistant":
            spans.append((pos, end))
        pos = end
    enc = Tokenizer.from_file(str(model_dir / "tokenizer.json")).encode(
        text, add_special_tokens=False)
    mask = [int(any(s < e_ and b > s_ for s_, e_ in spans)) for s, b in enc.offsets]
    assert enc.ids == hf.apply_chat_template(messages, tokenize=True, return_dict=True)[
        "input_ids"]
    return enc.ids, mask, text


@pytest.mark.parametrize("which", ["prefix", "markers"])
def test_chat_masks_match_the_templates_own_rendering(tmp_path, model_dir, marker_dir, which):
    directory = model_dir if which == "prefix" else marker_dir
    import_dataset([write_jsonl(tmp_path / "in.jsonl", [{"messages": c} for c in CHATS])],
                   tmp_path / "out", tokenizer=directory)
    ds = TokenDataset(tmp_path / "out")
    for i, messages in enumerate(CHATS):
        ids, mask, text = reference_chat(directory, messages)
        got = ds.loss_mask(i).tolist()
        if which == "prefix":  # the span runs to the next turn: "<|im_end|>\n"
            newline = [t for t, (s, e) in enumerate(Tokenizer.from_file(
                str(directory / "tokenizer.json")).encode(text, add_special_tokens=False)
                .offsets) if text[s:e] == "\n" and t and mask[t - 1]]
            mask = [1 if t in newline else v for t, v in enumerate(mask)]
        assert ds[i].tolist() == ids
        assert got == mask
        assert ds.meta(i).kind == "chat"


def test_marker_masks_equal_transformers_assistant_masks(tmp_path, marker_dir):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(marker_dir), local_files_only=True)
    import_dataset([write_jsonl(tmp_path / "in.jsonl", [{"messages": c} for c in CHATS])],
                   tmp_path / "out", tokenizer=marker_dir)
    ds = TokenDataset(tmp_path / "out")
    for i, messages in enumerate(CHATS):
        ref = hf.apply_chat_template(messages, tokenize=True, return_dict=True,
                                     return_assistant_tokens_mask=True)
        assert ds[i].tolist() == ref["input_ids"]
        assert ds.loss_mask(i).tolist() == ref["assistant_masks"]


def test_conversational_prompt_and_completion(tmp_path, model_dir):
    prompt = CHATS[1][:3]
    rows = [{"prompt": prompt, "completion": "Slowly, patiently."}]
    import_dataset([write_jsonl(tmp_path / "in.jsonl", rows)], tmp_path / "out",
                   tokenizer=model_dir)
    ds = TokenDataset(tmp_path / "out")
    full = prompt + [{"role": "assistant", "content": "Slowly, patiently."}]
    ids, mask, text = reference_chat(model_dir, full)
    assert ds[0].tolist() == ids
    # Loss on everything after the prompt's generation prompt: the last turn and its "\n".
    head = text.rindex("<|im_start|>assistant\n") + len("<|im_start|>assistant\n")
    offsets = Tokenizer.from_file(str(model_dir / "tokenizer.json")).encode(
        text, add_special_tokens=False).offsets
    assert ds.loss_mask(0).tolist() == [int(e > head) for _, e in offsets]


def test_byte_import_without_tokenizer_is_utf8(tmp_path):
    rows = [{"text": "hé"}, {"prompt": "x", "completion": "y"}]
    write_jsonl(tmp_path / "in.jsonl", rows[:1])
    import_dataset([tmp_path / "in.jsonl"], tmp_path / "out")
    ds = TokenDataset(tmp_path / "out")
    assert ds[0].tolist() == list("hé".encode()) and ds.manifest["tokenizer"]["type"] == "bytes"
    write_jsonl(tmp_path / "sft.jsonl", rows[1:])
    import_dataset([tmp_path / "sft.jsonl"], tmp_path / "sft")
    assert TokenDataset(tmp_path / "sft").loss_mask(0).tolist() == [0, 1]


def test_parallel_import_equals_in_process(tmp_path, model_dir, rng):
    rows = [{"prompt": "Fox " * int(rng.integers(1, 9)), "chosen": f" quick {i}",
             "rejected": f" lazy {i}"} for i in range(300)]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    one = import_dataset([src], tmp_path / "one", tokenizer=model_dir, workers=1,
                         rows_per_chunk=37)
    two = import_dataset([src], tmp_path / "two", tokenizer=model_dir, workers=2,
                         rows_per_chunk=37)
    assert one.num_samples == two.num_samples == 600
    for name in ("data.bin", "data.idx", "data.mask", "data.meta"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()
    assert read_structure(tmp_path / "two").pairs().tolist() == [[2 * k, 2 * k + 1]
                                                                 for k in range(300)]


def test_progress_reports_reach_the_total(tmp_path, model_dir):
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": f"The quick fox {i}"} for i in range(50)])
    seen = []
    import_dataset([src], tmp_path / "out", tokenizer=model_dir, rows_per_chunk=8,
                   progress=seen.append)
    assert len(seen) == 7 and [p.num_rows for p in seen][-1] == 50
    assert seen[-1].bytes_done == seen[-1].bytes_total == src.stat().st_size
    assert seen[-1].num_tokens == TokenDataset(tmp_path / "out").num_tokens
    assert np.all(np.diff([p.num_tokens for p in seen]) > 0)


def test_import_stays_torch_free(tmp_path, model_dir):
    """The importer (chat templates included) runs in the torch-free layer."""
    import subprocess
    import sys

    src = write_jsonl(tmp_path / "in.jsonl", [{"messages": CHATS[0]}])
    code = ("import sys; from scheduler.ingest import import_dataset; "
            f"import_dataset([{str(src)!r}], {str(tmp_path / 'out')!r}, "
            f"tokenizer={str(model_dir)!r}); "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert TokenDataset(tmp_path / "out").meta(0).kind == "chat"


def test_chat_rows_pass_tools_to_the_template(tmp_path):
    from transformers import AutoTokenizer

    from tests.hf_tokenizer import CHATML, save_model_dir

    template = ("{% if tools %}<|im_start|>system\nTools: {{ tools | tojson }}<|im_end|>\n"
                "{% endif %}" + CHATML)
    model = save_model_dir(tmp_path / "model", chat_template=template)
    tools = [{"type": "function", "function": {"name": "capital", "parameters": {}}}]
    import_dataset([write_jsonl(tmp_path / "in.jsonl", [{"messages": CHATS[0], "tools": tools}])],
                   tmp_path / "out", tokenizer=model)
    hf = AutoTokenizer.from_pretrained(str(model), local_files_only=True)
    ref = hf.apply_chat_template(CHATS[0], tools=tools, tokenize=True, return_dict=True)
    assert TokenDataset(tmp_path / "out")[0].tolist() == ref["input_ids"]
    assert "Tools:" in hf.apply_chat_template(CHATS[0], tools=tools, tokenize=False)


SHAPE_ROWS = {
    "pretrain": [{"text": "The quick brown fox."}, {"text": "Paris, France."},
                 {"text": "Rivers carve the stone."}],
    "sft": [{"prompt": "Capital?", "completion": " Paris."}, {"prompt": "", "completion": "Fox"},
            {"prompt": "Haiku?", "completion": " Rivers carve the stone."}],
    "chat": [{"messages": c} for c in CHATS],
    "dpo": [{"prompt": "Capital?", "chosen": " Paris.", "rejected": " Rivers."},
            {"prompt": "Fox?", "chosen": " quick", "rejected": " lazy"},
            {"prompt": "Dog?", "chosen": " lazy dog", "rejected": " brown fox"}],
    "grpo": [{"prompt": "Fox?", "completions": [" quick", " lazy"], "rewards": [1.0, 0.0]},
             {"prompt": "Dog?", "completions": [" a", " b", " c"], "rewards": [0.5, 2.0, 1.0]},
             {"prompt": "One", "completions": [" only"], "rewards": [3.0]}],
}


@pytest.mark.parametrize("kind", list(SHAPE_ROWS))
def test_every_shape_reads_alike_from_jsonl_parquet_and_a_directory(tmp_path, model_dir, kind):
    rows = SHAPE_ROWS[kind]
    (tmp_path / "dir" / "sub").mkdir(parents=True)
    sources = {"jsonl": write_jsonl(tmp_path / "in.jsonl", rows),
               "parquet": write_parquet(tmp_path / "in.parquet", rows),
               "dir": tmp_path / "dir"}
    write_jsonl(tmp_path / "dir" / "a.jsonl", rows[:1])
    write_parquet(tmp_path / "dir" / "sub" / "b.parquet", rows[1:])
    files = {}
    for name, src in sources.items():
        r = import_dataset([src], tmp_path / f"out-{name}", tokenizer=model_dir)
        assert r.kind == kind and r.num_rows == 3
        files[name] = [(tmp_path / f"out-{name}" / f).read_bytes()
                       for f in ("data.bin", "data.idx", "data.mask", "data.meta")]
    assert files["jsonl"] == files["parquet"] == files["dir"]
