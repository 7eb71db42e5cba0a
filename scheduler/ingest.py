"""Import corpora into the token dataset format: JSONL/Parquet files or directories of them.

Pipeline: the main process reads raw chunks (JSONL lines as bytes, Parquet record batches
of the needed columns only) and hands them to worker processes, which parse, validate and
tokenize them (scheduler.ingest_rows; the tokenizer's batch API inside each chunk); the
main process writes the encoded chunks in input order as they come back. At most
2 x workers chunks are in flight, and the writer streams every file, so memory is bounded
by the chunk size whatever the input size. With one worker (the default for small inputs)
everything runs in-process and `encode_batch` uses the tokenizer's own threads.

Atomic: the dataset is written into a temporary directory beside `out` and renamed onto it
only when every row imported; on any failure (a bad row, an exception, Ctrl-C) the
temporary directory is removed and `out` is untouched. Rows are counted from 1, JSONL
errors also give the line.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import TYPE_CHECKING

from scheduler.dataset import DatasetWriter
from scheduler.errors import DatasetError
from scheduler.ingest_rows import (
    SHAPES,
    ChunkEncoder,
    EncodedChunk,
    RowError,
    RowRef,
    detect_kind,
    shape_help,
)
from scheduler.tokenizer import ByteTokenizer, load_tokenizer

if TYPE_CHECKING:
    import pyarrow as pa

SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".parquet")
ROWS_PER_CHUNK = 512
BYTES_PER_CHUNK = 4 << 20
PARALLEL_MIN_BYTES = 8 << 20  # below this, worker start-up costs more than it saves


def byte_tokenize(text: str) -> list[int]:
    return list(text.encode("utf-8"))


@dataclass(frozen=True)
class ImportProgress:
    """Where an import stands (passed to the progress callback after each chunk)."""

    num_rows: int
    num_samples: int
    num_tokens: int
    bytes_done: int  # input bytes consumed (compressed bytes for .gz)
    bytes_total: int
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.num_tokens / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class ImportResult:
    out: Path
    kind: str
    num_rows: int
    num_samples: int
    num_tokens: int
    num_loss_tokens: int
    seconds: float
    workers: int

    @property
    def tokens_per_s(self) -> float:
        return self.num_tokens / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class _RawChunk:
    """Unparsed rows: JSONL (line number, bytes) pairs or a Parquet record batch."""

    file: str
    first_row: int
    lines: list[tuple[int, bytes]] | None
    batch: pa.RecordBatch | None
    input_bytes: int


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return next((s for s in sorted(SUFFIXES, key=len, reverse=True) if name.endswith(s)), "")


def discover(sources: Sequence[str | Path]) -> list[Path]:
    """Input files: each file as given, each directory's matching files (recursive, sorted)."""
    files = []
    for src in map(Path, sources):
        if src.is_dir():
            found = sorted(p for p in src.rglob("*") if p.is_file() and _suffix(p)
                           and not any(part.startswith(".") for part in p.relative_to(src).parts))
            if not found:
                raise DatasetError(f"{src}: directory holds no {', '.join(SUFFIXES)} files")
            files += found
        elif not src.exists():
            raise DatasetError(f"{src}: file not found")
        elif not _suffix(src):
            raise DatasetError(f"{src}: unsupported file type (valid: {', '.join(SUFFIXES)})")
        else:
            files.append(src)
    if not files:
        raise DatasetError("sources: no input files given")
    return files


def _jsonl_chunks(path: Path, rows_per_chunk: int) -> Iterator[_RawChunk]:
    raw = open(path, "rb")
    stream = gzip.open(raw, "rb") if path.name.lower().endswith(".gz") else raw
    with raw, stream:
        lines, row, first, used, pos = [], 0, 1, 0, 0
        for number, line in enumerate(stream, 1):
            if not line.strip():
                continue
            row += 1
            lines.append((number, line))
            used += len(line)
            if len(lines) >= rows_per_chunk or used >= BYTES_PER_CHUNK:
                yield _RawChunk(str(path), first, lines, None, raw.tell() - pos)
                pos, lines, first, used = raw.tell(), [], row + 1, 0
        if lines:
            yield _RawChunk(str(path), first, lines, None, raw.tell() - pos)


def _parquet_file(path: Path):
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for corrupt files
        raise DatasetError(f"{path}: not a readable Parquet file ({exc})") from None


def _parquet_chunks(path: Path, columns: list[str], rows_per_chunk: int
                    ) -> Iterator[_RawChunk]:
    pf = _parquet_file(path)
    present = [c for c in columns if c in pf.schema_arrow.names]
    size, total = path.stat().st_size, max(pf.metadata.num_rows, 1)
    row = 1
    try:
        for batch in pf.iter_batches(batch_size=rows_per_chunk, columns=present or None):
            yield _RawChunk(str(path), row, None, batch, size * batch.num_rows // total)
            row += batch.num_rows
    except OSError as exc:
        raise DatasetError(f"{path}: unreadable Parquet data near row {row} ({exc})") from None


def _parse(chunk: _RawChunk) -> list[tuple[RowRef, object]]:
    if chunk.batch is not None:
        return [(RowRef(chunk.file, chunk.first_row + j), row)
                for j, row in enumerate(chunk.batch.to_pylist())]
    assert chunk.lines is not None, "a chunk holds JSONL lines or a Parquet batch"
    rows = []
    for j, (line_no, line) in enumerate(chunk.lines):
        ref = RowRef(chunk.file, chunk.first_row + j, line_no)
        try:
            rows.append((ref, json.loads(line)))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise RowError(f"{ref.at()} is not JSON: {exc}") from None
    return rows


def _first_row_fields(path: Path) -> list[str] | None:
    if _suffix(path) == ".parquet":
        return list(_parquet_file(path).schema_arrow.names)
    for chunk in _jsonl_chunks(path, 1):
        ref, row = _parse(chunk)[0]
        if not isinstance(row, dict):
            raise RowError(f"{ref.at()} is a {type(row).__name__}, not an object")
        return list(row)
    return None


def detect_import_kind(files: list[Path]) -> str:
    """The row shape of the first non-empty input file (docs/data.md lists them)."""
    for path in files:
        fields = _first_row_fields(path)
        if fields is None:
            continue
        kind = detect_kind(fields)
        if kind is None:
            raise DatasetError(f"{path}: row 1: fields {sorted(fields)} match no row shape (valid: "
                               f"{shape_help()})")
        return kind
    raise DatasetError(f"{files[0]}: no rows")


# -- encoding, in-process or in worker processes -------------------------------------------

_WORKER: ChunkEncoder | None = None


def _init_worker(tokenizer: str | None, kind: str, column: str | None, add_eos: bool) -> None:
    global _WORKER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # parallel over processes instead
    _WORKER = ChunkEncoder(load_tokenizer(tokenizer), kind=kind, column=column,
                           add_eos=add_eos)


def _encode_chunk(chunk: _RawChunk) -> EncodedChunk:
    assert _WORKER is not None, "the pool's initializer (_init_worker) sets it"
    return _WORKER.encode(_parse(chunk))


def _encode_in_pool(chunks: Iterator[_RawChunk], workers: int, init_args: tuple
                    ) -> Iterator[tuple[_RawChunk, EncodedChunk]]:
    pool = ProcessPoolExecutor(workers, mp_context=get_context("spawn"),
                               initializer=_init_worker, initargs=init_args)
    pending: deque = deque()
    try:
        for chunk in chunks:
            pending.append((chunk, pool.submit(_encode_chunk, chunk)))
            if len(pending) >= 2 * workers:
                c, fut = pending.popleft()
                yield c, fut.result()
        while pending:
            c, fut = pending.popleft()
            yield c, fut.result()
    finally:
        for _, fut in pending:
            fut.cancel()
        pool.shutdown(wait=True, cancel_futures=True)


# -- the atomic output directory -----------------------------------------------------------

@contextmanager
def staged_directory(out: Path, *, overwrite: bool) -> Iterator[Path]:
    """A temporary directory beside `out`, renamed onto `out` only if the block succeeds."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DatasetError(f"--out {out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise DatasetError(f"--out {out}: exists and is not empty (pass --overwrite to "
                           "replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.importing-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would outlive the rename
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _install(tmp, out)


def _install(tmp: Path, out: Path) -> None:
    if not out.exists():
        os.rename(tmp, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.replaced-", dir=out.parent))
    os.rename(out, old / "data")
    os.rename(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


# -- the import ----------------------------------------------------------------------------

def _chunks(files: list[Path], kind: str, column: str | None,
            rows_per_chunk: int) -> Iterator[_RawChunk]:
    columns = [column] if column else list(SHAPES[kind]) + (["input_ids"] if kind ==
                                                            "pretrain" else [])
    for path in files:
        if _suffix(path) == ".parquet":
            yield from _parquet_chunks(path, columns, rows_per_chunk)
        else:
            yield from _jsonl_chunks(path, rows_per_chunk)


def _auto_workers(files: list[Path]) -> int:
    size = sum(p.stat().st_size for p in files)
    return 1 if size < PARALLEL_MIN_BYTES else max(1, min(os.cpu_count() or 1, 8))


def import_dataset(sources: Sequence[str | Path], out: str | Path, *,
                   tokenizer: str | Path | None = None, kind: str | None = None,
                   column: str | None = None, add_eos: bool = True,
                   workers: int | None = None, overwrite: bool = False,
                   rows_per_chunk: int = ROWS_PER_CHUNK,
                   progress: Callable[[ImportProgress], None] | None = None) -> ImportResult:
    """Import `sources` into the dataset directory `out` (data.*); see the module doc.

    `kind` forces a row shape (default: the first row's); `column` names the pretrain
    column (default input_ids, else text); `workers` processes (default: 1 for inputs under
    8 MiB, else the CPU count up to 8).
    """
    files = discover(sources)
    kind = kind or detect_import_kind(files)
    if column and kind != "pretrain":
        raise DatasetError(f"--column {column!r} applies to pretrain rows only (this import "
                           f"reads {kind} rows)")
    tok = load_tokenizer(tokenizer)
    encoder = ChunkEncoder(tok, kind=kind, column=column, add_eos=add_eos)
    workers = _auto_workers(files) if workers is None else workers
    if workers < 1:
        raise DatasetError(f"--workers {workers}: must be >= 1")
    manifest = {"tokenizer": tok.describe(), "kind": kind, "add_eos": add_eos,
                "sources": [str(p) for p in files]}
    t0 = time.perf_counter()
    total = sum(p.stat().st_size for p in files)
    out = Path(out)
    with staged_directory(out, overwrite=overwrite) as tmp:
        writer = DatasetWriter(tmp / "data", manifest=manifest, fsync=True)
        with writer:
            raw = _chunks(files, kind, column, rows_per_chunk)
            encoded = ((c, encoder.encode(_parse(c))) for c in raw) if workers == 1 else \
                _encode_in_pool(raw, workers, (tokenizer, kind, column, add_eos))
            stats = _write(writer, encoded, total, t0, progress)
        if stats["rows"] == 0:
            raise DatasetError(f"{files[0]}: no rows" if len(files) == 1 else
                               f"{len(files)} input files hold no rows")
    return ImportResult(out=out, kind=kind, num_rows=stats["rows"],
                        num_samples=writer.num_samples, num_tokens=writer.num_tokens,
                        num_loss_tokens=stats["loss"], seconds=time.perf_counter() - t0,
                        workers=workers)


def _write(writer: DatasetWriter, encoded, total: int, t0: float, progress) -> dict:
    stats = {"rows": 0, "loss": 0, "pairs": 0, "groups": 0, "bytes": 0}
    for raw, chunk in encoded:
        rec = chunk.records
        rec["pair_id"][rec["pair_id"] >= 0] += stats["pairs"]
        rec["group_id"][rec["group_id"] >= 0] += stats["groups"]
        writer.add_encoded(chunk.tokens, chunk.lengths, chunk.mask, rec)
        stats["rows"] += chunk.num_rows
        stats["pairs"] += chunk.num_pairs
        stats["groups"] += chunk.num_groups
        stats["loss"] += int(rec["num_loss_tokens"].sum())
        stats["bytes"] += raw.input_bytes
        if progress is not None:
            progress(ImportProgress(num_rows=stats["rows"], num_samples=writer.num_samples,
                                    num_tokens=writer.num_tokens, bytes_done=stats["bytes"],
                                    bytes_total=total, seconds=time.perf_counter() - t0))
    return stats


def import_rows(source: str | Path, out: str | Path, *, column: str | None = None) -> int:
    """Convert one JSONL/Parquet file (text as UTF-8 bytes) into `out/data.*`; sample count."""
    return import_dataset([source], out, column=column).num_samples


__all__ = ["ByteTokenizer", "ImportProgress", "ImportResult", "byte_tokenize", "discover",
           "import_dataset", "import_rows", "staged_directory"]
