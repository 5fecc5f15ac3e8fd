"""Store records: what the log and snapshot files are made of.

A record is ``length (u32, big-endian) | crc32 of the payload (u32) | payload``; the payload
is one CBOR array. A torn write (power loss, ``kill -9`` in the middle of a write) leaves a
record whose length runs past the end of the file or whose checksum does not match: reading
stops there, and the caller decides whether that is a torn tail (the end of the file being
appended to: cut it off) or corruption (anywhere else: refuse, naming the file and offset).

Payloads:

* ``["meshd-store", kind, version, generation]`` — first record of every file;
  ``kind`` is ``"log"`` or ``"snapshot"``;
* ``["u", doc, epoch, update]`` — a change to ``doc`` at ``epoch`` (a higher epoch than the
  one held replaces the document; an empty update only records the epoch);
* ``["d", doc]`` — the document was dropped;
* ``["end", count]`` — last record of a complete snapshot, ``count`` documents before it.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from typing import Any, Final

from meshd_client.protocol import cbor

MAGIC: Final = "meshd-store"
VERSION: Final = 1
HEADER: Final = struct.Struct(">II")
# One record holds at most one document's whole encoding; far above what replication moves
# in one message (32 MiB), far below what would make a garbage length allocate wildly.
MAX_RECORD: Final = 256 << 20


class RecordError(ValueError):
    """A payload that is well framed but not a record this version understands."""


@dataclass(frozen=True, slots=True)
class Update:
    doc: str
    epoch: int
    update: bytes


@dataclass(frozen=True, slots=True)
class Drop:
    doc: str


@dataclass(frozen=True, slots=True)
class FileHeader:
    kind: str
    version: int
    generation: int


@dataclass(frozen=True, slots=True)
class End:
    count: int


Record = Update | Drop | FileHeader | End


def frame(payload: bytes) -> bytes:
    return HEADER.pack(len(payload), zlib.crc32(payload)) + payload


def encode(record: Record) -> bytes:
    if isinstance(record, Update):
        value: list[Any] = ["u", record.doc, record.epoch, record.update]
    elif isinstance(record, Drop):
        value = ["d", record.doc]
    elif isinstance(record, FileHeader):
        value = [MAGIC, record.kind, record.version, record.generation]
    else:
        value = ["end", record.count]
    return frame(cbor.dumps(value))


def encode_update(doc: str, epoch: int, update: bytes) -> bytes:
    """The hot path: one change, framed (no dataclass on the way)."""
    return frame(cbor.dumps(["u", doc, epoch, update]))


def decode_payload(payload: bytes) -> Record:
    try:
        value = cbor.loads(payload)
    except cbor.CodecError as exc:
        raise RecordError(str(exc)) from None
    if not isinstance(value, list) or not value:
        raise RecordError("a record is a non-empty array")
    tag = value[0]
    if (
        tag == "u"
        and len(value) == 4
        and isinstance(value[1], str)
        and type(value[2]) is int
        and isinstance(value[3], bytes)
    ):
        return Update(value[1], value[2], value[3])
    if tag == "d" and len(value) == 2 and isinstance(value[1], str):
        return Drop(value[1])
    if (
        tag == MAGIC
        and len(value) == 4
        and isinstance(value[1], str)
        and type(value[2]) is int
        and type(value[3]) is int
    ):
        return FileHeader(value[1], value[2], value[3])
    if tag == "end" and len(value) == 2 and type(value[1]) is int:
        return End(value[1])
    raise RecordError(f"unknown record {str(tag)[:20]!r}")


@dataclass(frozen=True, slots=True)
class Scan:
    """What a file holds: its good records, where they end, and why reading stopped early
    (``problem`` is None when every byte was read)."""

    records: list[Record]
    ends: list[int]  # where each record ends
    end: int
    problem: str | None

    def upto(self, offset: int) -> list[Record]:
        """The records that end at or before ``offset``."""
        return [rec for rec, end in zip(self.records, self.ends, strict=True) if end <= offset]


def scan(data: bytes) -> Scan:
    """Read records from the start of ``data`` until the end or the first bad one."""
    records: list[Record] = []
    ends: list[int] = []
    offset = 0
    size = len(data)
    view = memoryview(data)
    while offset < size:
        if size - offset < HEADER.size:
            return Scan(records, ends, offset, f"truncated record header at byte {offset}")
        length, crc = HEADER.unpack_from(data, offset)
        if length > MAX_RECORD:
            return Scan(
                records, ends, offset, f"record length {length} out of range at byte {offset}"
            )
        start = offset + HEADER.size
        if start + length > size:
            return Scan(records, ends, offset, f"truncated record at byte {offset}")
        payload = view[start : start + length]
        if zlib.crc32(payload) != crc:
            return Scan(records, ends, offset, f"checksum mismatch at byte {offset}")
        try:
            records.append(decode_payload(bytes(payload)))
        except RecordError as exc:
            return Scan(records, ends, offset, f"undecodable record at byte {offset}: {exc}")
        offset = start + length
        ends.append(offset)
    return Scan(records, ends, offset, None)
