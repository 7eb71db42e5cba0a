"""Token dataset: tokens, a per-token loss mask and per-sample metadata, memory-mapped.

In the style of Megatron's indexed dataset, numpy only, so both the torch-free planner
(which reads only lengths and the pair/group structure) and the workers (which read
tokens) import it. Files of a dataset prefix (docs/data.md has the full layout):

    <prefix>.idx   magic b"RMIDX\\x00\\x01\\x00", uint64 version (1 or 2), uint64 count N,
                   uint64 offsets[N + 1] (token offsets into .bin; offsets[0] = 0, increasing)
    <prefix>.bin   uint32 tokens, back to back
    <prefix>.mask  (v2) uint8 per token: 1 = this token is a loss target (predicted from the
                   token before it); position 0 of a sample never is a prediction
    <prefix>.meta  (v2) one 48-byte record per sample (scheduler.dataset_meta.META_DTYPE)
    <prefix>.json  (v2) manifest: counts, max token id, tokenizer and sources (informational)
    <prefix>.ref_logps, <prefix>.old_logps  optional per-token columns (scheduler.dataset_columns)

Version-1 datasets (no .mask/.meta) read as pre-training corpora: every token a loss
target, kind pretrain. Reads are memory-mapped: a sample's tokens or mask are one slice
(O(1)); all lengths are one `np.diff` over the offsets. The writer streams every file (the
offsets too), so memory stays bounded for any corpus size. Corrupt or truncated files
raise DatasetError naming the file and the byte offset.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from scheduler.dataset_columns import COLUMNS, open_column
from scheduler.dataset_meta import (
    KIND_CODE,
    META_DTYPE,
    ROLE_CODE,
    DatasetStructure,
    SampleMeta,
    decode_record,
    meta_records,
    pretrain_records,
)
from scheduler.errors import DatasetError

MAGIC = b"RMIDX\x00\x01\x00"
VERSION = 2  # what DatasetWriter writes
VERSIONS = (1, 2)  # what the readers accept
TOKEN_DTYPE = np.dtype("<u4")
MASK_DTYPE = np.dtype("u1")
_HEADER = 8 + 8 + 8


def dataset_paths(prefix: str | Path) -> tuple[Path, Path]:
    """(bin, idx) paths of a dataset prefix; accepts a directory holding `data.*` too."""
    base = dataset_prefix(prefix)
    return base.with_suffix(".bin"), base.with_suffix(".idx")


def dataset_prefix(prefix: str | Path) -> Path:
    """The `<dir>/<name>` prefix every file of a dataset hangs off (suffixes stripped)."""
    prefix = Path(prefix)
    if prefix.is_dir():
        return prefix / "data"
    known = (".bin", ".idx", ".mask", ".meta", ".json", ".ref_logps", ".old_logps")
    return prefix.with_suffix("") if prefix.suffix in known else prefix


def _fsync(f) -> None:
    f.flush()
    os.fsync(f.fileno())


class DatasetWriter:
    """Appends samples to a new version-2 dataset; `close()` (or the context manager) seals it.

    Every file is written as samples arrive, the index included (its count is patched in at
    close), so memory does not grow with the corpus. `close()` validates the metadata
    (every DPO pair complete, GRPO samples grouped) and writes the manifest; `fsync=True`
    makes the files durable before close returns (the importer renames the directory next).
    """

    def __init__(self, prefix: str | Path, *, manifest: dict | None = None, fsync: bool = False):
        self.prefix = Path(prefix)
        self.bin_path, self.idx_path = dataset_paths(self.prefix)
        self.prefix.parent.mkdir(parents=True, exist_ok=True)
        self._files = {s: open(self.prefix.with_suffix(s), "wb")
                       for s in (".bin", ".idx", ".mask", ".meta")}
        self._files[".idx"].write(MAGIC + np.array([VERSION, 0, 0], dtype="<u8").tobytes())
        self._manifest, self._fsync = dict(manifest or {}), fsync
        self.num_samples = self.num_tokens = 0
        self.max_token_id = -1

    def add(self, tokens: Iterable[int] | np.ndarray, *, loss_mask=None, kind: str = "pretrain",
            pair_id: int | None = None, role: str | None = None, group_id: int | None = None,
            reward: float | None = None, advantage: float | None = None) -> int:
        """Append one sample; returns its index. `loss_mask` defaults to all ones."""
        arr = np.asarray(tokens)
        if arr.ndim != 1 or arr.size == 0:
            raise DatasetError(f"tokens: a sample must be a non-empty 1-D sequence, got shape "
                               f"{arr.shape}")
        if arr.dtype.kind not in "iu" or (arr.size and (arr.min() < 0 or arr.max() >= 2**32)):
            raise DatasetError("tokens: ids must be integers in [0, 2**32)")
        mask = _check_mask(loss_mask, arr.size)
        rec = _record(kind, pair_id=pair_id, role=role, group_id=group_id, reward=reward,
                      advantage=advantage, num_loss_tokens=int(mask[1:].sum()))
        self.add_encoded(arr.astype(TOKEN_DTYPE), np.array([arr.size]), mask, rec)
        return self.num_samples - 1

    def add_encoded(self, tokens: np.ndarray, lengths: np.ndarray, loss_mask: np.ndarray,
                    records: np.ndarray) -> None:
        """Append n samples at once: tokens and mask back to back, their lengths, records.

        The importer's fast path; the arrays must be consistent (lengths sum to the token
        count, one META_DTYPE record per length, records' loss counts from the mask).
        """
        lengths = np.asarray(lengths, dtype=np.int64)
        if (tokens.size != loss_mask.size or tokens.size != int(lengths.sum())
                or records.size != lengths.size or (lengths < 1).any()):
            raise ValueError("add_encoded: tokens, loss_mask, lengths and records disagree")
        f = self._files
        f[".bin"].write(np.ascontiguousarray(tokens, dtype=TOKEN_DTYPE).tobytes())
        f[".mask"].write(np.ascontiguousarray(loss_mask, dtype=MASK_DTYPE).tobytes())
        f[".meta"].write(np.ascontiguousarray(records, dtype=META_DTYPE).tobytes())
        f[".idx"].write((self.num_tokens + np.cumsum(lengths)).astype("<u8").tobytes())
        self.num_samples += int(lengths.size)
        self.num_tokens += int(tokens.size)
        if tokens.size:
            self.max_token_id = max(self.max_token_id, int(tokens.max()))

    def close(self) -> None:
        if self._files[".bin"].closed:
            return
        idx = self._files[".idx"]
        idx.seek(16)
        idx.write(np.array([self.num_samples], dtype="<u8").tobytes())
        for f in self._files.values():
            if self._fsync:
                _fsync(f)
            f.close()
        structure = read_structure(self.prefix)
        structure.validate(str(self.prefix.with_suffix(".meta")))
        self._write_manifest(structure)

    def _write_manifest(self, structure: DatasetStructure) -> None:
        manifest = {"format": "ringmaster-token-dataset", "version": VERSION,
                    "num_samples": self.num_samples, "num_tokens": self.num_tokens,
                    "max_token_id": self.max_token_id if self.num_tokens else None,
                    "kinds": structure.kind_counts, **self._manifest}
        with open(self.prefix.with_suffix(".json"), "w") as f:
            json.dump(manifest, f, indent=2)
            f.write("\n")
            if self._fsync:
                _fsync(f)

    def abort(self) -> None:
        """Close the files without sealing (the caller removes them)."""
        for f in self._files.values():
            f.close()

    def __enter__(self) -> DatasetWriter:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _check_mask(loss_mask, n: int) -> np.ndarray:
    if loss_mask is None:
        return np.ones(n, dtype=MASK_DTYPE)
    mask = np.asarray(loss_mask)
    if mask.shape != (n,) or not np.isin(mask, (0, 1)).all():
        raise DatasetError(f"loss_mask: must be {n} values of 0/1 (one per token), got shape "
                           f"{mask.shape}")
    return mask.astype(MASK_DTYPE)


def _record(kind: str, *, num_loss_tokens: int, pair_id=None, role=None, group_id=None,
            reward=None, advantage=None) -> np.ndarray:
    if kind not in KIND_CODE:
        raise DatasetError(f"kind={kind!r} is not known; valid: {', '.join(KIND_CODE)}")
    if (kind == "dpo") != (pair_id is not None and role in ("chosen", "rejected")):
        raise DatasetError("pair_id/role: dpo samples need both (role chosen or rejected); "
                           f"other kinds neither (got kind={kind!r}, pair_id={pair_id!r}, "
                           f"role={role!r})")
    if (kind == "grpo") != (group_id is not None):
        raise DatasetError(f"group_id: required for grpo samples only (kind={kind!r}, "
                           f"group_id={group_id!r})")
    rec = meta_records(1)
    rec["kind"], rec["num_loss_tokens"] = KIND_CODE[kind], num_loss_tokens
    if kind == "dpo":
        rec["pair_id"], rec["role"] = pair_id, ROLE_CODE[role]
    if kind == "grpo":
        rec["group_id"] = group_id
        rec["reward"] = np.nan if reward is None else reward
        rec["advantage"] = np.nan if advantage is None else advantage
    return rec


def _read_header(idx_path: Path) -> tuple[np.memmap, int, int]:
    try:
        raw = np.memmap(idx_path, dtype=np.uint8, mode="r")
    except FileNotFoundError:
        raise DatasetError(f"{idx_path}: index file not found") from None
    except ValueError:
        raise DatasetError(f"{idx_path}: empty file at offset 0 (expected a header)") from None
    if raw.size < _HEADER or bytes(raw[:8]) != MAGIC:
        raise DatasetError(f"{idx_path}: bad magic at offset 0 (not a Ringmaster .idx file)")
    version, count = (int(x) for x in np.frombuffer(raw[8:_HEADER].tobytes(), dtype="<u8"))
    if version not in VERSIONS:
        raise DatasetError(f"{idx_path}: version {version} at offset 8 is not supported "
                           f"(valid: {', '.join(map(str, VERSIONS))})")
    return raw, version, count


def read_version(prefix: str | Path) -> int:
    """The format version of a dataset (from its index header)."""
    return _read_header(dataset_paths(prefix)[1])[1]


def read_offsets(idx_path: Path) -> np.ndarray:
    """Validated token offsets (uint64[N+1]) of an `.idx` file."""
    raw, _, count = _read_header(idx_path)
    need = _HEADER + 8 * (count + 1)
    if raw.size < need:
        raise DatasetError(f"{idx_path}: truncated at offset {raw.size}: header says {count} "
                           f"samples, which needs {need} bytes")
    if raw.size > need:
        raise DatasetError(f"{idx_path}: oversized: {raw.size - need} bytes after the last "
                           f"offset at byte {need} (header says {count} samples)")
    offsets = np.frombuffer(raw, dtype="<u8", count=count + 1, offset=_HEADER)
    if offsets[0] != 0:
        raise DatasetError(f"{idx_path}: first offset at byte {_HEADER} is {offsets[0]}, not 0")
    steps = np.diff(offsets.astype(np.int64))
    bad = np.flatnonzero(steps <= 0)
    if bad.size:
        i = int(bad[0])
        raise DatasetError(f"{idx_path}: offsets not increasing at sample {i} "
                           f"(byte {_HEADER + 8 * (i + 1)}); every sample has >= 1 token")
    return offsets


def _map_exact(path: Path, dtype: np.dtype, count: int, what: str) -> np.ndarray:
    """A read-only memmap of exactly `count` items of `dtype`, or a DatasetError."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise DatasetError(f"{path}: {what} file not found") from None
    expect = count * dtype.itemsize
    if size != expect:
        raise DatasetError(f"{path}: truncated or oversized at offset {size}: the index "
                           f"expects {expect} bytes")
    return np.memmap(path, dtype=dtype, mode="r") if size else np.zeros(0, dtype=dtype)


def read_lengths(prefix: str | Path) -> np.ndarray:
    """All sample lengths of a dataset without touching its tokens."""
    return np.diff(read_offsets(dataset_paths(prefix)[1]).astype(np.int64))


def read_structure(prefix: str | Path) -> DatasetStructure:
    """Lengths and per-sample records (kind, pairs, groups, loss counts); no tokens read."""
    base = dataset_prefix(prefix)
    offsets = read_offsets(base.with_suffix(".idx"))
    lengths = np.diff(offsets.astype(np.int64))
    if read_version(base) == 1:
        return DatasetStructure(lengths, pretrain_records(lengths))
    records = _map_exact(base.with_suffix(".meta"), META_DTYPE, lengths.size, "metadata")
    return DatasetStructure(lengths, records)


def read_units(prefix: str | Path) -> np.ndarray | None:
    """Batching units (a DPO pair shares one; scheduler.batching), None without pairs."""
    return read_structure(prefix).units()


@dataclass(frozen=True, kw_only=True)
class Sample:
    """One sample as a worker reads it (numpy views into the memory maps)."""

    tokens: np.ndarray  # uint32[L]
    loss_mask: np.ndarray  # uint8[L]: 1 where token t is a loss target (t >= 1)
    meta: SampleMeta
    ref_logps: np.ndarray | None  # float[L] reference log p(token t | tokens < t); [0] = 0
    old_logps: np.ndarray | None  # float[L] same under the sampling policy (GRPO)


class TokenDataset:
    """Memory-mapped read access: `lengths` (cheap), `ds[i]` (tokens), `sample(i)` (all)."""

    def __init__(self, prefix: str | Path):
        self.prefix = dataset_prefix(prefix)
        self.bin_path, self.idx_path = dataset_paths(self.prefix)
        self._offsets = read_offsets(self.idx_path)
        self.version = read_version(self.prefix)
        self._tokens = _map_exact(self.bin_path, TOKEN_DTYPE, self.num_tokens, "token")
        self._mask = None if self.version == 1 else _map_exact(
            self.prefix.with_suffix(".mask"), MASK_DTYPE, self.num_tokens, "loss mask")
        self._columns = {}
        for name in COLUMNS:
            col = open_column(self.prefix, name, num_tokens=self.num_tokens)
            if col is not None:
                self._columns[name] = col

    def __len__(self) -> int:
        return len(self._offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        """int64[N] length of every sample (reads only the index)."""
        return np.diff(self._offsets.astype(np.int64))

    @property
    def num_tokens(self) -> int:
        return int(self._offsets[-1])

    @property
    def columns(self) -> tuple[str, ...]:
        """Names of the optional per-token columns present (ref_logps, old_logps)."""
        return tuple(self._columns)

    @cached_property
    def structure(self) -> DatasetStructure:
        return read_structure(self.prefix)

    @cached_property
    def manifest(self) -> dict:
        """The `.json` manifest ({} for version 1 or when absent)."""
        try:
            return json.loads(self.prefix.with_suffix(".json").read_text())
        except FileNotFoundError:
            return {}
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DatasetError(f"{self.prefix.with_suffix('.json')}: not JSON ({exc})") from None

    @cached_property
    def max_token_id(self) -> int:
        """Largest token id (from the manifest when it matches, else one pass over .bin)."""
        m = self.manifest
        if m.get("num_tokens") == self.num_tokens and isinstance(m.get("max_token_id"), int):
            return int(m["max_token_id"])
        step = 1 << 24
        return max((int(self._tokens[s:s + step].max())
                    for s in range(0, self.num_tokens, step)), default=-1)

    def _span(self, i: int) -> slice:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"sample index {i} out of range (dataset has {n} samples)")
        i %= n
        return slice(int(self._offsets[i]), int(self._offsets[i + 1]))

    def __getitem__(self, i: int) -> np.ndarray:
        return self._tokens[self._span(i)]

    def loss_mask(self, i: int) -> np.ndarray:
        """uint8[L] of sample i: 1 where the token is a loss target (all ones for version 1)."""
        span = self._span(i)
        if self._mask is None:
            return np.ones(span.stop - span.start, dtype=MASK_DTYPE)
        return self._mask[span]

    def meta(self, i: int) -> SampleMeta:
        self._span(i)
        return decode_record(self.structure.records[i])

    def column(self, name: str, i: int) -> np.ndarray | None:
        """Sample i's values of an optional per-token column, None when it is absent."""
        col = self._columns.get(name)
        return None if col is None else col.values[self._span(i)]

    def sample(self, i: int) -> Sample:
        return Sample(tokens=self[i], loss_mask=self.loss_mask(i), meta=self.meta(i),
                      ref_logps=self.column("ref_logps", i),
                      old_logps=self.column("old_logps", i))


def dataset_stats(prefix: str | Path) -> dict:
    """What `ringmaster data stats` prints: lengths, loss tokens, kinds, pairs, groups."""
    ds = TokenDataset(prefix)
    s = ds.structure
    lengths = s.lengths
    q = {f"p{p}": int(np.percentile(lengths, p, method="nearest")) for p in (50, 90, 99)}
    predictions = int(np.maximum(lengths - 1, 0).sum())
    loss = int(s.num_loss_tokens.sum())
    return {
        "path": str(ds.prefix), "version": ds.version, "num_samples": len(ds),
        "num_tokens": ds.num_tokens,
        "length": {"min": int(lengths.min()), **q, "max": int(lengths.max()),
                   "mean": float(lengths.mean())} if len(ds) else {},
        "num_loss_tokens": loss, "loss_share": loss / predictions if predictions else 0.0,
        "kinds": s.kind_counts, "num_pairs": int(s.pairs().shape[0]),
        "num_groups": s.num_groups, "columns": list(ds.columns),
        "max_token_id": ds.max_token_id, "tokenizer": ds.manifest.get("tokenizer"),
    }
