"""Dependency-free TensorBoard scalar writer (no TensorFlow / tensorboardX needed).

An event file is a sequence of TFRecord-framed ``tensorflow.Event`` protos:
``uint64 len | uint32 masked_crc32c(len) | bytes data | uint32 masked_crc32c(data)``, with
masked_crc(x) = ((crc >> 15) | (crc << 17)) + 0xa282ead8 (mod 2^32) and CRC-32C (Castagnoli).
The protos are encoded by hand: Event{1: wall_time double, 2: step int64, 3: file_version,
5: Summary{1: repeated Value{1: tag string, 2: simple_value float}}}.
"""
from __future__ import annotations

import os
import socket
import struct
import time
from pathlib import Path
from typing import Mapping

_POLY = 0x82F63B78
_TABLE = []
for _i in range(256):
    _c = _i
    for _ in range(8):
        _c = (_c >> 1) ^ _POLY if _c & 1 else _c >> 1
    _TABLE.append(_c)


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for b in data:
        crc = _TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc(data: bytes) -> int:
    c = crc32c(data)
    return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _len_field(field: int, payload: bytes) -> bytes:
    return _varint(field << 3 | 2) + _varint(len(payload)) + payload


def encode_event(step: int, wall_time: float, scalars: Mapping[str, float] | None = None,
                 file_version: str | None = None) -> bytes:
    ev = b"\x09" + struct.pack("<d", wall_time) + b"\x10" + _varint(int(step))
    if file_version is not None:
        ev += _len_field(3, file_version.encode())
    if scalars:
        summary = b"".join(
            _len_field(1, _len_field(1, tag.encode()) + b"\x15" + struct.pack("<f", float(v)))
            for tag, v in scalars.items())
        ev += _len_field(5, summary)
    return ev


def frame(data: bytes) -> bytes:
    header = struct.pack("<Q", len(data))
    return header + struct.pack("<I", masked_crc(header)) + data + struct.pack("<I",
                                                                             masked_crc(data))


class SummaryWriter:
    """``SummaryWriter(logdir).scalars(step, {"train/loss": 0.1})``; process 0 only."""

    def __init__(self, logdir: str | os.PathLike):
        self.logdir = Path(logdir)
        self.logdir.mkdir(parents=True, exist_ok=True)
        self.path = self.logdir / f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}"
        self._f = open(self.path, "ab")
        self._f.write(frame(encode_event(0, time.time(), file_version="brain.Event:2")))
        self._f.flush()

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        self._f.write(frame(encode_event(step, time.time(), values)))
        self._f.flush()

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()
