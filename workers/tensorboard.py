"""TensorBoard event files without TensorFlow: scalars per step, written by rank 0.

An event file (`events.out.tfevents.<time>.<host>.<pid>`) is a sequence of TFRecords, each
one serialized `tensorflow.Event` protobuf:

    record  = uint64 length | uint32 masked_crc32c(length) | data | uint32 masked_crc32c(data)
    masked  = ((crc >> 15) | (crc << 17)) + 0xa282ead8   (mod 2**32; CRC-32C, Castagnoli)
    Event   = wall_time (1: double) | step (2: int64) | file_version (3: string) or
              summary (5: Summary)
    Summary = repeated value (1: Value);  Value = tag (1: string) | simple_value (2: float)

The first record carries `file_version = "brain.Event:2"`; every later one a summary of
scalars. That is the whole protocol TensorBoard needs for scalar charts, so the workers
write it with the standard library (torch.utils.tensorboard would pull in the
`tensorboard` package, which the tests use only to read these files back). Records are
flushed after every step, so a crash loses at most the step being written.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from pathlib import Path

_CRC_TABLE: list[int] = []


def _crc_table() -> list[int]:
    if not _CRC_TABLE:
        for n in range(256):
            c = n
            for _ in range(8):
                c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
            _CRC_TABLE.append(c)
    return _CRC_TABLE


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), as TFRecord uses."""
    table, crc = _crc_table(), 0xFFFFFFFF
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tf_record(data: bytes) -> bytes:
    length = struct.pack("<Q", len(data))
    return (length + struct.pack("<I", masked_crc(length)) + data
            + struct.pack("<I", masked_crc(data)))


def _varint(n: int) -> bytes:
    out = bytearray()
    n &= (1 << 64) - 1  # int64 as protobuf writes negative numbers
    while True:
        bits, n = n & 0x7F, n >> 7
        out.append(bits | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field_bytes(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def event_bytes(*, wall_time: float, step: int, file_version: str | None = None,
                scalars: dict[str, float] | None = None) -> bytes:
    """A serialized Event: the file-version header, or a summary of scalar values."""
    out = _varint(1 << 3 | 1) + struct.pack("<d", wall_time) + _varint(2 << 3) + _varint(step)
    if file_version is not None:
        return out + _field_bytes(3, file_version.encode())
    values = b"".join(
        _field_bytes(1, _field_bytes(1, tag.encode()) + _varint(2 << 3 | 5)
                     + struct.pack("<f", float(value)))
        for tag, value in (scalars or {}).items())
    return out + _field_bytes(5, values)


class ScalarWriter:
    """Appends scalar summaries to one new event file in `directory`."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        now = time.time()
        self.path = self.directory / (f"events.out.tfevents.{int(now)}."
                                      f"{socket.gethostname()}.{os.getpid()}")
        self._file = open(self.path, "ab")
        self._write(event_bytes(wall_time=now, step=0, file_version="brain.Event:2"))

    def _write(self, event: bytes) -> None:
        self._file.write(tf_record(event))
        self._file.flush()

    def add_scalars(self, step: int, scalars: dict[str, float]) -> None:
        self._write(event_bytes(wall_time=time.time(), step=step, scalars=scalars))

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> ScalarWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
