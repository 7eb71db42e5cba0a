"""Optional per-token float columns of a token dataset: reference and old log-probs.

`<prefix>.ref_logps` holds log p_ref(token t | tokens < t) for every token of the dataset
(DPO's reference policy, GRPO's KL anchor); `<prefix>.old_logps` the same under the policy
that sampled GRPO's completions (the importance ratio's denominator). Position 0 of every
sample has no prediction and stores 0. One file per column, self-describing:

    magic    8 bytes  b"RMCOL\\x00\\x01\\x00"
    length   uint64   byte length of the JSON header that follows
    header   JSON     {"name", "dtype" ("<f4" or "<f8"), "num_tokens", "source"}
    padding  zeros to the next multiple of 64 bytes
    values   dtype[num_tokens], aligned with <prefix>.bin

A column is added or replaced atomically: `TokenColumnWriter` fills a temporary file beside
the dataset (any sample order, so a forward-only job can hand results over as its ranks
finish them), and `commit()` checks that every sample was written, fsyncs, and renames it
into place with one `os.replace`. A reader that already mapped the old file keeps reading
it consistently; a new reader sees the new one. Memory: float32 costs 4 bytes per token,
as much as the tokens themselves (see docs/data.md for the trade-off against a frozen
reference model).
"""

from __future__ import annotations

import json
import os
import tempfile
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from scheduler.errors import DatasetError

COLUMNS = ("ref_logps", "old_logps")
COLUMN_MAGIC = b"RMCOL\x00\x01\x00"
DTYPES = ("<f4", "<f8")
_ALIGN = 64


@dataclass(frozen=True)
class TokenColumn:
    """An opened column: its header and its memory-mapped values."""

    header: dict
    values: np.ndarray


def column_path(prefix: str | Path, name: str) -> Path:
    from scheduler.dataset import dataset_prefix

    if name not in COLUMNS:
        raise DatasetError(f"column={name!r} is not known; valid: {', '.join(COLUMNS)}")
    return dataset_prefix(prefix).with_suffix("." + name)


def _encode_header(header: dict) -> bytes:
    body = json.dumps(header, sort_keys=True).encode()
    head = COLUMN_MAGIC + np.array([len(body)], dtype="<u8").tobytes() + body
    return head + b"\0" * (-len(head) % _ALIGN)


def open_column(prefix: str | Path, name: str, *, num_tokens: int) -> TokenColumn | None:
    """The column `name` of a dataset with `num_tokens` tokens, None when it is absent."""
    path = column_path(prefix, name)
    try:
        raw = np.memmap(path, dtype=np.uint8, mode="r")
    except FileNotFoundError:
        return None
    except ValueError:
        raise DatasetError(f"{path}: empty file at offset 0 (expected a column header)") from None
    if raw.size < 16 or bytes(raw[:8]) != COLUMN_MAGIC:
        raise DatasetError(f"{path}: bad magic at offset 0 (not a Ringmaster column file)")
    length = int(np.frombuffer(raw[8:16].tobytes(), dtype="<u8")[0])
    try:
        header = json.loads(bytes(raw[16:16 + length]))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise DatasetError(f"{path}: unreadable JSON header at offset 16") from None
    start = 16 + length + (-(16 + length) % _ALIGN)
    if header.get("dtype") not in DTYPES or header.get("num_tokens") != num_tokens:
        raise DatasetError(f"{path}: header {header} does not describe {num_tokens} values of "
                           f"one of {DTYPES} (the dataset has {num_tokens} tokens)")
    dtype = np.dtype(header["dtype"])
    if raw.size != start + num_tokens * dtype.itemsize:
        raise DatasetError(f"{path}: truncated or oversized at offset {raw.size}: expected "
                           f"{start + num_tokens * dtype.itemsize} bytes")
    values = np.frombuffer(raw, dtype=dtype, count=num_tokens, offset=start)
    return TokenColumn(header=header, values=values)


class TokenColumnWriter:
    """Adds or replaces one per-token column of a dataset, atomically (see the module doc).

    `write(i, values)` takes sample i's values (one per token, in any order, each sample
    once or again to overwrite); `commit()` installs the column; `abort()` (or an exception
    inside the `with` block) removes the temporary file and leaves the dataset untouched.
    """

    def __init__(self, prefix: str | Path, name: str, *, source: str = "",
                 dtype: str = "<f4"):
        from scheduler.dataset import dataset_paths, read_offsets

        if dtype not in DTYPES:
            raise DatasetError(f"dtype={dtype!r} is not supported; valid: {', '.join(DTYPES)}")
        self.path = column_path(prefix, name)
        self._offsets = read_offsets(dataset_paths(prefix)[1]).astype(np.int64)
        num_tokens = int(self._offsets[-1])
        head = _encode_header({"name": name, "dtype": dtype, "num_tokens": num_tokens,
                               "source": source})
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp",
                                   dir=self.path.parent)
        self._tmp = Path(tmp)
        # A writer dropped without commit/abort still removes its temporary file.
        self._cleanup = weakref.finalize(self, self._tmp.unlink, missing_ok=True)
        with os.fdopen(fd, "wb") as f:
            f.write(head)
            f.truncate(len(head) + num_tokens * np.dtype(dtype).itemsize)
        self._values: np.ndarray | None = np.memmap(  # None once aborted
            self._tmp, dtype=dtype, mode="r+", offset=len(head), shape=(num_tokens,)
        ) if num_tokens else np.zeros(0, dtype)
        self._written = np.zeros(len(self._offsets) - 1, dtype=bool)

    def write(self, sample: int, values: np.ndarray | Iterable[float]) -> None:
        n = self._written.size
        if not 0 <= sample < n:
            raise DatasetError(f"sample={sample} is out of range (the dataset has {n} samples)")
        start, stop = int(self._offsets[sample]), int(self._offsets[sample + 1])
        arr = np.asarray(values, dtype=np.float64)
        if arr.shape != (stop - start,):
            raise DatasetError(f"values of sample {sample}: shape {arr.shape}, expected "
                               f"({stop - start},) (one per token)")
        if not np.isfinite(arr[1:]).all():
            t = 1 + int(np.flatnonzero(~np.isfinite(arr[1:]))[0])
            raise DatasetError(f"values of sample {sample}: token {t} is {arr[t]} (log-probs "
                               "must be finite)")
        arr[0] = 0.0  # the first token has no prediction
        if self._values is None:
            raise DatasetError(f"{self.path.name}: the writer was aborted; nothing more can be "
                               "written")
        self._values[start:stop] = arr
        self._written[sample] = True

    def missing(self) -> np.ndarray:
        """int64 indices of the samples not written yet."""
        return np.flatnonzero(~self._written)

    def commit(self) -> Path:
        missing = self.missing()
        if missing.size:
            self.abort()
            raise DatasetError(f"{self.path.name}: {missing.size} sample(s) were never written "
                               f"(first: {int(missing[0])}); the column was not installed")
        if isinstance(self._values, np.memmap):
            self._values.flush()
        with open(self._tmp, "rb+") as f:
            os.fsync(f.fileno())
        del self._values
        self._cleanup.detach()
        os.replace(self._tmp, self.path)
        return self.path

    def abort(self) -> None:
        self._values = None
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> TokenColumnWriter:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


def write_token_column(prefix: str | Path, name: str,
                       values: Iterable[tuple[int, np.ndarray]], *, source: str = "",
                       dtype: str = "<f4") -> Path:
    """Add or replace column `name` from (sample index, per-token values) pairs, atomically."""
    with TokenColumnWriter(prefix, name, source=source, dtype=dtype) as w:
        for i, v in values:
            w.write(i, v)
    return w.path


def remove_token_column(prefix: str | Path, name: str) -> bool:
    """Delete a column; True if it existed."""
    path = column_path(prefix, name)
    existed = path.exists()
    path.unlink(missing_ok=True)
    return existed
