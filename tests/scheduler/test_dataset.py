"""Token dataset: round trip, O(1) sample access, corrupt files named with offsets."""

from __future__ import annotations

import json

import numpy as np
import pytest

from scheduler.dataset import DatasetWriter, TokenDataset, read_lengths
from scheduler.errors import DatasetError
from scheduler.ingest import import_rows


def write(tmp_path, samples):
    with DatasetWriter(tmp_path / "data") as w:
        for s in samples:
            w.add(s)
    return tmp_path


def test_round_trip(tmp_path, rng):
    samples = [rng.integers(0, 2**32, size=n, dtype=np.uint64) for n in (1, 7, 127, 1000)]
    ds = TokenDataset(write(tmp_path, samples))
    assert len(ds) == 4
    assert ds.lengths.tolist() == [1, 7, 127, 1000]
    assert read_lengths(tmp_path).tolist() == [1, 7, 127, 1000]
    for i, s in enumerate(samples):
        np.testing.assert_array_equal(ds[i], s)
    np.testing.assert_array_equal(ds[-1], samples[-1])
    with pytest.raises(IndexError, match="out of range"):
        ds[4]


def test_truncated_bin_names_file_and_offset(tmp_path):
    write(tmp_path, [[1, 2, 3], [4, 5]])
    path = tmp_path / "data.bin"
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(DatasetError, match=r"data\.bin: truncated or oversized at offset 17"):
        TokenDataset(tmp_path)


def test_truncated_idx(tmp_path):
    write(tmp_path, [[1, 2, 3], [4, 5]])
    path = tmp_path / "data.idx"
    path.write_bytes(path.read_bytes()[:-4])
    with pytest.raises(DatasetError, match=r"data\.idx: truncated at offset 44"):
        read_lengths(tmp_path)


def test_bad_magic_and_non_increasing_offsets(tmp_path):
    write(tmp_path, [[1, 2, 3], [4, 5]])
    idx = tmp_path / "data.idx"
    raw = bytearray(idx.read_bytes())
    raw[32:40] = (9).to_bytes(8, "little")  # offsets [0, 9, 5]: sample 1 goes backwards
    idx.write_bytes(bytes(raw))
    with pytest.raises(DatasetError, match="offsets not increasing at sample 1"):
        read_lengths(tmp_path)
    idx.write_bytes(b"garbage!" + bytes(raw[8:]))
    with pytest.raises(DatasetError, match="bad magic at offset 0"):
        read_lengths(tmp_path)


def test_missing_files(tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        TokenDataset(tmp_path / "nope")


def test_writer_rejects_bad_samples(tmp_path):
    with DatasetWriter(tmp_path / "data") as w:
        with pytest.raises(ValueError, match="non-empty"):
            w.add([])
        with pytest.raises(ValueError, match="2\\*\\*32"):
            w.add([-1])


def test_import_jsonl_ids_and_text(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"input_ids": [5, 6, 7]}) + "\n" + json.dumps({"text": "hé"}) + "\n")
    assert import_rows(src, tmp_path / "out") == 2
    ds = TokenDataset(tmp_path / "out")
    assert ds[0].tolist() == [5, 6, 7]
    assert ds[1].tolist() == list("hé".encode())


def test_import_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"input_ids": [[1, 2], [3, 4, 5]]}), tmp_path / "in.parquet")
    assert import_rows(tmp_path / "in.parquet", tmp_path / "out") == 2
    assert TokenDataset(tmp_path / "out").lengths.tolist() == [2, 3]


@pytest.mark.parametrize("line,needle", [  # rows and lines count from 1 (issue 21)
    ("{not json", r"in\.jsonl: row 1 \(line 1\) is not JSON"),
    ('{"other": 1}', r"in\.jsonl: row 1: fields \['other'\] match no row shape"),
    ('{"input_ids": [1, -2]}', r"row 1 \(line 1\): field 'input_ids': must be a non-empty list"),
    ("[1, 2]", r"row 1 \(line 1\) is a list, not an object"),
])
def test_import_bad_rows_are_named(tmp_path, line, needle):
    src = tmp_path / "in.jsonl"
    src.write_text(line + "\n")
    with pytest.raises(DatasetError, match=needle):
        import_rows(src, tmp_path / "out")
