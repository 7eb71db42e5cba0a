"""Import existing corpora into the token dataset format.

JSONL or Parquet rows with a pre-tokenized `input_ids` column, or a `text` column turned
into ids by a byte-level tokenizer (UTF-8 bytes, vocab 256). Every bad row names the file
and the row.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from scheduler.dataset import DatasetWriter
from scheduler.errors import DatasetError


def byte_tokenize(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def _rows(path: Path) -> Iterator[tuple[int, dict]]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as exc:  # pyarrow raises several types for corrupt files
            raise DatasetError(f"{path}: not a readable Parquet file ({exc})") from None
        for i, row in enumerate(table.to_pylist()):
            yield i, row
        return
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DatasetError(f"{path}: row {i} (line {i + 1}) is not JSON: {exc}") from None
            if not isinstance(row, dict):
                raise DatasetError(f"{path}: row {i} is a {type(row).__name__}, not an object")
            yield i, row


def import_rows(source: str | Path, out: str | Path, *, column: str | None = None) -> int:
    """Convert a JSONL/Parquet file into `out/data.{bin,idx}`; returns the sample count."""
    source = Path(source)
    if not source.exists():
        raise DatasetError(f"{source}: file not found")
    count = 0
    with DatasetWriter(Path(out) / "data") as w:
        for i, row in _rows(source):
            col = column or ("input_ids" if "input_ids" in row else "text")
            if col not in row:
                raise DatasetError(f"{source}: row {i} has neither 'input_ids' nor 'text' "
                                   f"(columns: {sorted(row)})")
            value = row[col]
            ids = byte_tokenize(value) if isinstance(value, str) else value
            if not isinstance(ids, list) or not ids or not all(
                    isinstance(t, int) and 0 <= t < 2**32 for t in ids):
                raise DatasetError(f"{source}: row {i} column {col!r} must be a non-empty list "
                                   "of token ids in [0, 2**32) or a non-empty string")
            w.add(ids)
            count += 1
    if count == 0:
        raise DatasetError(f"{source}: no rows")
    return count
