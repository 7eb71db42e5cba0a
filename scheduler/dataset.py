"""Token dataset: `<name>.bin` (uint32 tokens, back to back) + `<name>.idx` (offsets).

In the style of Megatron's indexed dataset, numpy only, so both the torch-free planner
(which reads only lengths) and the workers (which read tokens) import it.

`.idx` layout, little-endian:
    magic    8 bytes  b"RMIDX\\x00\\x01\\x00"
    version  uint64   1
    count    uint64   number of samples N
    offsets  uint64[N + 1]  token offsets into .bin; offsets[0] = 0, non-decreasing

Reads are memory-mapped: a sample's tokens are one slice (O(1)); all lengths are one
`np.diff` over the offsets. Corrupt or truncated files raise DatasetError naming the file
and the byte offset.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np

from scheduler.errors import DatasetError

MAGIC = b"RMIDX\x00\x01\x00"
VERSION = 1
TOKEN_DTYPE = np.dtype("<u4")
_HEADER = 8 + 8 + 8


def dataset_paths(prefix: str | Path) -> tuple[Path, Path]:
    """(bin, idx) paths of a dataset prefix; accepts a directory holding `data.*` too."""
    prefix = Path(prefix)
    if prefix.is_dir():
        prefix = prefix / "data"
    elif prefix.suffix in (".bin", ".idx"):
        prefix = prefix.with_suffix("")
    return prefix.with_suffix(".bin"), prefix.with_suffix(".idx")


class DatasetWriter:
    """Appends samples to a new dataset; `close()` (or the context manager) writes `.idx`."""

    def __init__(self, prefix: str | Path):
        self.bin_path, self.idx_path = dataset_paths(prefix)
        self.bin_path.parent.mkdir(parents=True, exist_ok=True)
        self._bin = open(self.bin_path, "wb")
        self._offsets = [0]

    def add(self, tokens: Iterable[int] | np.ndarray) -> None:
        arr = np.asarray(tokens)
        if arr.ndim != 1 or arr.size == 0:
            raise ValueError(f"tokens: a sample must be a non-empty 1-D sequence, got shape "
                             f"{arr.shape}")
        if arr.dtype.kind not in "iu" or (arr.size and (arr.min() < 0 or arr.max() >= 2**32)):
            raise ValueError("tokens: ids must be integers in [0, 2**32)")
        self._bin.write(arr.astype(TOKEN_DTYPE, copy=False).tobytes())
        self._offsets.append(self._offsets[-1] + arr.size)

    def close(self) -> None:
        if self._bin.closed:
            return
        self._bin.close()
        with open(self.idx_path, "wb") as f:
            f.write(MAGIC)
            f.write(np.array([VERSION, len(self._offsets) - 1], dtype="<u8").tobytes())
            f.write(np.asarray(self._offsets, dtype="<u8").tobytes())

    def __enter__(self) -> DatasetWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_offsets(idx_path: Path) -> np.ndarray:
    """Validated token offsets (uint64[N+1]) of an `.idx` file."""
    try:
        raw = np.memmap(idx_path, dtype=np.uint8, mode="r")
    except FileNotFoundError:
        raise DatasetError(f"{idx_path}: index file not found") from None
    except ValueError:
        raise DatasetError(f"{idx_path}: empty file at offset 0 (expected a header)") from None
    if raw.size < _HEADER or bytes(raw[:8]) != MAGIC:
        raise DatasetError(f"{idx_path}: bad magic at offset 0 (not a Ringmaster .idx file)")
    version, count = np.frombuffer(raw[8:_HEADER].tobytes(), dtype="<u8")
    if version != VERSION:
        raise DatasetError(f"{idx_path}: version {version} at offset 8 is not supported "
                           f"(valid: {VERSION})")
    need = _HEADER + 8 * (int(count) + 1)
    if raw.size < need:
        raise DatasetError(f"{idx_path}: truncated at offset {raw.size}: header says {count} "
                           f"samples, which needs {need} bytes")
    offsets = np.frombuffer(raw, dtype="<u8", count=int(count) + 1, offset=_HEADER)
    if offsets[0] != 0:
        raise DatasetError(f"{idx_path}: first offset at byte {_HEADER} is {offsets[0]}, not 0")
    steps = np.diff(offsets.astype(np.int64))
    bad = np.flatnonzero(steps <= 0)
    if bad.size:
        i = int(bad[0])
        raise DatasetError(f"{idx_path}: offsets not increasing at sample {i} "
                           f"(byte {_HEADER + 8 * (i + 1)}); every sample has >= 1 token")
    return offsets


class TokenDataset:
    """Memory-mapped read access: `lengths` (cheap), `ds[i]` (one sample's tokens)."""

    def __init__(self, prefix: str | Path):
        self.bin_path, self.idx_path = dataset_paths(prefix)
        self._offsets = read_offsets(self.idx_path)
        expect = int(self._offsets[-1]) * TOKEN_DTYPE.itemsize
        try:
            size = self.bin_path.stat().st_size
        except FileNotFoundError:
            raise DatasetError(f"{self.bin_path}: token file not found") from None
        if size != expect:
            raise DatasetError(f"{self.bin_path}: truncated or oversized at offset {size}: the "
                               f"index expects {expect} bytes")
        self._tokens = np.memmap(self.bin_path, dtype=TOKEN_DTYPE, mode="r") if size else \
            np.zeros(0, dtype=TOKEN_DTYPE)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        """int64[N] length of every sample (reads only the index)."""
        return np.diff(self._offsets.astype(np.int64))

    @property
    def num_tokens(self) -> int:
        return int(self._offsets[-1])

    def __getitem__(self, i: int) -> np.ndarray:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"sample index {i} out of range (dataset has {n} samples)")
        i %= n
        return self._tokens[int(self._offsets[i]):int(self._offsets[i + 1])]


def read_lengths(prefix: str | Path) -> np.ndarray:
    """All sample lengths of a dataset without touching its tokens."""
    return np.diff(read_offsets(dataset_paths(prefix)[1]).astype(np.int64))
