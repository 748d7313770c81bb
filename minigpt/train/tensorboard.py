"""A dependency-free TensorBoard event-file writer for scalar curves.

TensorBoard reads ``events.out.tfevents.*`` files: a sequence of *records*, each
holding one serialized ``Event`` protocol buffer. We only need scalars, and the
two formats involved are small enough to write by hand, which saves installing
the ``tensorboard`` package (and its protobuf/grpc dependencies) just to log:

Record framing (TFRecord)::

    uint64 length                 little-endian byte count of data
    uint32 masked_crc32c(length)  checksum of those 8 bytes
    bytes  data                   the serialized Event
    uint32 masked_crc32c(data)

``masked_crc32c(x) = rotate_right(crc32c(x), 15) + 0xA282EAD8`` (mod 2**32), where
crc32c is the Castagnoli CRC (reflected polynomial 0x82F63B78).

Protocol-buffer messages (field number, wire type)::

    Event   { double wall_time = 1 (fixed64); int64 step = 2 (varint);
              string file_version = 3 (bytes); Summary summary = 5 (bytes) }
    Summary { repeated Value value = 1 (bytes) }
    Value   { string tag = 1 (bytes); float simple_value = 2 (fixed32) }

Point TensorBoard at the run directory (``tensorboard --logdir runs/``) to see them.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from pathlib import Path


def _make_crc32c_table() -> list[int]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_CRC_TABLE = _make_crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli) of ``data``; ``crc32c(b"123456789") == 0xE3069283``."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    """The checksum TFRecord stores: the CRC rotated right by 15 bits plus a constant."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(value: int) -> bytes:
    out = bytearray()
    value &= (1 << 64) - 1  # negative int64s are encoded as their two's complement
    while True:
        bits = value & 0x7F
        value >>= 7
        if value:
            out.append(bits | 0x80)
        else:
            out.append(bits)
            return bytes(out)


def _length_delimited(field: int, payload: bytes) -> bytes:
    return _varint(field << 3 | 2) + _varint(len(payload)) + payload


def encode_event(
    wall_time: float,
    step: int,
    *,
    file_version: str | None = None,
    scalars: dict[str, float] | None = None,
) -> bytes:
    """Serialize one ``Event`` holding a file version or scalar summaries."""
    out = _varint(1 << 3 | 1) + struct.pack("<d", wall_time)
    out += _varint(2 << 3 | 0) + _varint(int(step))
    if file_version is not None:
        out += _length_delimited(3, file_version.encode())
    if scalars:
        summary = b""
        for tag, value in scalars.items():
            item = _length_delimited(1, tag.encode()) + _varint(2 << 3 | 5)
            item += struct.pack("<f", float(value))
            summary += _length_delimited(1, item)
        out += _length_delimited(5, summary)
    return out


def frame_record(data: bytes) -> bytes:
    """Wrap serialized bytes in TFRecord framing (length, checksums)."""
    header = struct.pack("<Q", len(data))
    return (
        header
        + struct.pack("<I", masked_crc32c(header))
        + data
        + struct.pack("<I", masked_crc32c(data))
    )


class EventWriter:
    """Appends scalar summaries to a new ``events.out.tfevents.*`` file in ``log_dir``.

    Example::

        w = EventWriter("runs/demo")
        w.add_scalars({"train/loss": 3.2}, step=10)
        w.close()
    """

    def __init__(self, log_dir: str | os.PathLike) -> None:
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
        self.path = self.log_dir / name
        self._file = open(self.path, "ab")  # noqa: SIM115 -- kept open for the run
        self._write(encode_event(time.time(), 0, file_version="brain.Event:2"))

    def _write(self, event: bytes) -> None:
        self._file.write(frame_record(event))
        self._file.flush()

    def add_scalars(self, scalars: dict[str, float], step: int) -> None:
        """Log several named scalars at one step (tags like ``"val/loss"`` group in the UI)."""
        if scalars:
            self._write(encode_event(time.time(), step, scalars=scalars))

    def close(self) -> None:
        """Flush and close the file (safe to call twice)."""
        if not self._file.closed:
            self._file.close()


def read_records(path: str | os.PathLike) -> list[bytes]:
    """Read back the records of an event file, verifying every checksum.

    Raises:
        ValueError: a truncated record or a checksum mismatch.
    """
    data = Path(path).read_bytes()
    records, pos = [], 0
    while pos < len(data):
        if pos + 12 > len(data):
            raise ValueError(f"{path}: truncated record header at byte {pos}")
        header = data[pos : pos + 8]
        (length,) = struct.unpack("<Q", header)
        (crc,) = struct.unpack("<I", data[pos + 8 : pos + 12])
        if crc != masked_crc32c(header):
            raise ValueError(f"{path}: bad length checksum at byte {pos}")
        body = data[pos + 12 : pos + 12 + length]
        if len(body) != length or pos + 16 + length > len(data):
            raise ValueError(f"{path}: truncated record at byte {pos}")
        (crc,) = struct.unpack("<I", data[pos + 12 + length : pos + 16 + length])
        if crc != masked_crc32c(body):
            raise ValueError(f"{path}: bad data checksum at byte {pos}")
        records.append(body)
        pos += 16 + length
    return records
