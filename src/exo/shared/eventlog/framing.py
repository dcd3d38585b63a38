"""Byte layout of the log file and the replay scan that tells a torn tail from corruption.

File   = header | record*
header = magic "EXOLOG" | version u16 | base index u64 | crc32(preceding header bytes) u32
record = payload length u32 | index u64 | crc32(index bytes + payload) u32 | payload
All integers little-endian. `base` is the index the first record must carry (0, or the
snapshot index + 1 after compaction), so an empty compacted log still knows where it is.
"""

from __future__ import annotations

import mmap
import struct
import zlib
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from exo.shared.eventlog.errors import EventLogCorrupt

FILE_MAGIC = b"EXOLOG"
FILE_VERSION = 1
_FILE_HEADER = struct.Struct("<6sHQ")
_CRC = struct.Struct("<I")
FILE_HEADER_SIZE = _FILE_HEADER.size + _CRC.size
RECORD_HEADER = struct.Struct("<IQI")
RECORD_HEADER_SIZE = RECORD_HEADER.size
_INDEX = struct.Struct("<Q")
# Bounds a garbage length field; events are small, state goes in the snapshot.
MAX_PAYLOAD_BYTES = 64 * 1024 * 1024
# Resync scans the region after a bad record this many bytes at a time, to bound memory.
_RESYNC_WINDOW = 4 * 1024 * 1024

# The replay scan reads an mmap; everything else reads bytes.
Buffer = bytes | mmap.mmap


def encode_file_header(base: int) -> bytes:
    fields = _FILE_HEADER.pack(FILE_MAGIC, FILE_VERSION, base)
    return fields + _CRC.pack(zlib.crc32(fields))


def decode_file_header(path: Path, data: Buffer) -> int:
    """Returns the base index; the header is written atomically, so any damage is corruption."""
    if len(data) < FILE_HEADER_SIZE:
        raise EventLogCorrupt(path, len(data), "file shorter than its header")
    magic, version, base = _FILE_HEADER.unpack_from(data, 0)
    (crc,) = _CRC.unpack_from(data, _FILE_HEADER.size)
    if magic != FILE_MAGIC:
        raise EventLogCorrupt(path, 0, "not an exo event log (bad magic)")
    if crc != zlib.crc32(data[: _FILE_HEADER.size]):
        raise EventLogCorrupt(path, 0, "header checksum mismatch")
    if version != FILE_VERSION:
        raise EventLogCorrupt(path, 0, f"unsupported log version {version}")
    return base


def record_crc(index: int, payload: Buffer) -> int:
    return zlib.crc32(payload, zlib.crc32(_INDEX.pack(index)))


def encode_records(records: Sequence[tuple[int, bytes]]) -> tuple[bytes, list[int]]:
    """One contiguous blob (so one write) and each record's offset within it."""
    parts: list[bytes] = []
    offsets: list[int] = []
    position = 0
    for index, payload in records:
        offsets.append(position)
        parts.append(RECORD_HEADER.pack(len(payload), index, record_crc(index, payload)))
        parts.append(payload)
        position += RECORD_HEADER_SIZE + len(payload)
    return b"".join(parts), offsets


def check_record(buf: Buffer, offset: int, size: int) -> tuple[int, int] | None:
    """(index, end offset) of an intact record at `offset`, or None if it is short or damaged."""
    if offset + RECORD_HEADER_SIZE > size:
        return None
    length, index, crc = RECORD_HEADER.unpack_from(buf, offset)
    start = offset + RECORD_HEADER_SIZE
    end = start + length
    if length > MAX_PAYLOAD_BYTES or end > size:
        return None
    if record_crc(index, buf[start:end]) != crc:
        return None
    return index, end


def decode_record(path: Path, buf: Buffer, at: int, file_offset: int, index: int) -> bytes:
    """The payload of the record at `at` in `buf`, which must be intact and carry `index`."""
    checked = check_record(buf, at, len(buf))
    if checked is None or checked[0] != index:
        raise EventLogCorrupt(path, file_offset, f"record {index} changed on disk since replay")
    return bytes(buf[at + RECORD_HEADER_SIZE : checked[1]])


@dataclass
class Scan:
    offsets: array[int]  # file offset of each record, in index order from base
    end: int  # byte just after the last intact record: where the next append goes
    torn: bool  # bytes after `end` are a torn tail to truncate


def scan(path: Path, buf: Buffer, base: int) -> Scan:
    """Walk every record; stop at a torn tail, raise on damage that has intact records after it."""
    size = len(buf)
    offsets: array[int] = array("Q")
    offset = FILE_HEADER_SIZE
    expected = base
    while offset < size:
        checked = check_record(buf, offset, size)
        if checked is None:
            if _intact_record_after(buf, offset, size, expected):
                raise EventLogCorrupt(
                    path, offset, f"damaged record {expected} has intact records after it"
                )
            return Scan(offsets, offset, torn=True)
        index, end = checked
        if index != expected:
            raise EventLogCorrupt(path, offset, f"record has index {index}, expected {expected}")
        offsets.append(offset)
        expected += 1
        offset = end
    return Scan(offsets, offset, torn=False)


def _intact_record_after(buf: Buffer, bad: int, size: int, expected: int) -> bool:
    """Is there an intact record anywhere after the damaged one at `bad`?

    The damaged length field cannot be trusted to find the next record, so every byte
    position is a candidate. numpy filters positions whose length fits in the file and
    whose index is plausible (at least `expected`, at most one per 16 bytes skipped);
    only those survivors pay for a crc check. This runs only when a bad record is found.
    """
    last_start = size - RECORD_HEADER_SIZE
    for first in range(bad + 1, last_start + 1, _RESYNC_WINDOW):
        count = min(_RESYNC_WINDOW, last_start + 1 - first)
        window = bytes(buf[first : first + count + RECORD_HEADER_SIZE - 1])
        lengths = np.ndarray((count,), dtype="<u4", buffer=window, offset=0, strides=(1,))
        indices = np.ndarray((count,), dtype="<u8", buffer=window, offset=4, strides=(1,))
        positions = np.arange(first, first + count, dtype=np.int64)
        fits = lengths.astype(np.int64) <= np.minimum(
            size - positions - RECORD_HEADER_SIZE, MAX_PAYLOAD_BYTES
        )
        most_skipped = ((positions - bad) // RECORD_HEADER_SIZE).astype(np.uint64)
        floor = np.uint64(expected)
        plausible = (indices >= floor) & (indices - floor <= most_skipped)
        crcs = np.ndarray((count,), dtype="<u4", buffer=window, offset=12, strides=(1,))
        # An all-zero header is never intact (crc32 of 8 zero bytes is not 0), and a
        # zero-filled tail would otherwise make every byte a candidate.
        zeroed = (lengths == 0) & (indices == 0) & (crcs == 0)
        for candidate in np.flatnonzero(fits & plausible & ~zeroed):
            if check_record(buf, first + int(candidate), size) is not None:
                return True
    return False
