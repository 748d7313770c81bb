"""Run logging: the hand-written TensorBoard event format, JSONL metrics, PNG plot."""

from __future__ import annotations

import json
import struct

import pytest

from minigpt.train.runlog import RunLogger
from minigpt.train.tensorboard import (
    EventWriter,
    crc32c,
    encode_event,
    frame_record,
    masked_crc32c,
    read_records,
)


def test_crc32c_known_values():
    assert crc32c(b"123456789") == 0xE3069283  # the standard CRC-32C check value
    assert crc32c(b"") == 0
    assert crc32c(bytes(32)) == 0x8A9136AA  # RFC 3720 test vector: 32 zero bytes
    assert masked_crc32c(b"") == 0xA282EAD8


def test_event_encoding_by_hand():
    # wall_time=1.5, step=3, one scalar "a"=2.0, spelled out in protobuf wire format
    expected = (
        b"\x09"
        + struct.pack("<d", 1.5)
        + b"\x10\x03"
        + b"\x2a\x0a"
        + b"\x0a\x08"
        + b"\x0a\x01a"
        + b"\x15"
        + struct.pack("<f", 2.0)
    )
    assert encode_event(1.5, 3, scalars={"a": 2.0}) == expected
    assert encode_event(0.0, 300)[9:] == b"\x10\xac\x02"  # multi-byte varint


def test_event_file_round_trip(tmp_path):
    w = EventWriter(tmp_path)
    w.add_scalars({"train/loss": 1.25}, step=7)
    w.close()
    records = read_records(w.path)
    assert len(records) == 2 and b"brain.Event:2" in records[0]
    assert b"train/loss" in records[1] and struct.pack("<f", 1.25) in records[1]
    data = w.path.read_bytes()
    w.path.write_bytes(data[:-3])
    with pytest.raises(ValueError, match="truncated"):
        read_records(w.path)
    w.path.write_bytes(frame_record(b"x")[:-1] + b"\x00")
    with pytest.raises(ValueError, match="checksum"):
        read_records(w.path)


def test_run_logger(tmp_path):
    log = RunLogger(tmp_path)
    log.log("train", 10, 1.0, loss=3.0, lr=1e-3)
    log.log("eval", 10, 2.0, val_loss=3.1, val_bpb=2.5)
    log.log("sample", 10, 2.5, samples=["hi"])
    log.close()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in lines] == ["train", "eval", "sample"]
    assert lines[1] == {"kind": "eval", "step": 10, "time_s": 2.0, "val_loss": 3.1, "val_bpb": 2.5}
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
    (events,) = tmp_path.glob("events.out.tfevents.*")
    assert len(read_records(events)) == 3  # version + two scalar records (samples are text)
