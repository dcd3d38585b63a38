"""The snapshot file: one (index, payload) pair, replaced atomically, guarded by a crc.

snapshot = magic "EXOSNP" | version u16 | index u64 | length u64 | crc32(all before + payload) u32 | payload
"""

import struct
import zlib
from pathlib import Path

from exo.shared.eventlog.durable import atomic_write
from exo.shared.eventlog.errors import EventLogCorrupt

SNAPSHOT_MAGIC = b"EXOSNP"
SNAPSHOT_VERSION = 1
_FIELDS = struct.Struct("<6sHQQ")
_CRC = struct.Struct("<I")
_HEADER_SIZE = _FIELDS.size + _CRC.size


def write_snapshot_file(path: Path, index: int, payload: bytes, *, durable: bool) -> None:
    fields = _FIELDS.pack(SNAPSHOT_MAGIC, SNAPSHOT_VERSION, index, len(payload))
    crc = zlib.crc32(payload, zlib.crc32(fields))
    atomic_write(path, [fields, _CRC.pack(crc), payload], durable=durable)


def read_snapshot_file(path: Path) -> tuple[int, bytes] | None:
    """None when there is no snapshot; EventLogCorrupt when there is a damaged one."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    if len(data) < _HEADER_SIZE:
        raise EventLogCorrupt(path, len(data), "snapshot shorter than its header")
    magic, version, index, length = _FIELDS.unpack_from(data, 0)
    (crc,) = _CRC.unpack_from(data, _FIELDS.size)
    if magic != SNAPSHOT_MAGIC or version != SNAPSHOT_VERSION:
        raise EventLogCorrupt(path, 0, "not an exo snapshot of a known version")
    if len(data) != _HEADER_SIZE + length:
        raise EventLogCorrupt(
            path, len(data), f"snapshot length {len(data)}, header says {_HEADER_SIZE + length}"
        )
    payload = data[_HEADER_SIZE:]
    if zlib.crc32(payload, zlib.crc32(data[: _FIELDS.size])) != crc:
        raise EventLogCorrupt(path, 0, "snapshot checksum mismatch")
    return index, payload
