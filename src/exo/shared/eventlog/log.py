"""EventLogFile: this node's durable, append-only, gap-free log of (index, payload) records."""

from __future__ import annotations

import bisect
import mmap
import os
from array import array
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import TracebackType
from typing import NoReturn

from loguru import logger

from exo.shared.eventlog.durable import atomic_write, lock_exclusive, sync, temp_path, write_all
from exo.shared.eventlog.errors import (
    EventLogBusy,
    EventLogCompacted,
    EventLogCorrupt,
    EventLogError,
    EventLogWriteError,
)
from exo.shared.eventlog.framing import (
    FILE_HEADER_SIZE,
    MAX_PAYLOAD_BYTES,
    Scan,
    decode_file_header,
    decode_record,
    encode_file_header,
    encode_records,
    scan,
)
from exo.shared.eventlog.snapshot import read_snapshot_file, write_snapshot_file
from exo.shared.eventlog.validate import check_consecutive

SNAPSHOT_NAME = "snapshot.bin"
# Replay and compaction read the file in pieces of about this size, not all at once.
_READ_CHUNK = 1024 * 1024


class EventLogFile:
    """Opening replays the file (dropping a torn tail); see the package docstring for the policy."""

    def __init__(self, path: Path | str, *, fsync: bool = True) -> None:
        self._path = Path(path)
        self._durable = fsync
        self._path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._lock_fd: int | None = lock_exclusive(
                self._path.with_name(self._path.name + ".lock")
            )
        except BlockingIOError as exc:
            raise EventLogBusy(self._path) from exc
        try:
            self._fd: int | None = self._open_and_replay()
        except BaseException:
            os.close(self._lock_fd)
            raise
        self._broken = (
            False  # set when a failure left the file in doubt: refuse appends until reopened
        )

    # -- opening -------------------------------------------------------------------------

    def _open_and_replay(self) -> int:
        for leftover in (temp_path(self._path), temp_path(self.snapshot_path)):
            leftover.unlink(missing_ok=True)  # a crash inside atomic_write leaves these behind
        if not self._path.exists():
            atomic_write(self._path, [encode_file_header(0)], durable=self._durable)
        fd = os.open(self._path, os.O_RDWR)
        try:
            result = self._scan(fd)
            if result.torn:
                self._drop_torn_tail(fd, result)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _scan(self, fd: int) -> Scan:
        size = os.fstat(fd).st_size
        self._base = decode_file_header(self._path, os.pread(fd, FILE_HEADER_SIZE, 0))
        if size == FILE_HEADER_SIZE:
            result = Scan(array("Q"), FILE_HEADER_SIZE, torn=False)
        else:
            with mmap.mmap(fd, size, access=mmap.ACCESS_READ) as mapped:
                result = scan(self._path, mapped, self._base)
        self._offsets = result.offsets
        self._end = result.end
        return result

    def _drop_torn_tail(self, fd: int, result: Scan) -> None:
        size = os.fstat(fd).st_size
        logger.warning(
            f"{self._path}: dropping torn tail of {size - result.end} bytes at offset "
            f"{result.end} (last intact index {self.last_index})"
        )
        os.ftruncate(fd, result.end)
        if self._durable:
            sync(fd)

    # -- what the log holds -----------------------------------------------------------

    @property
    def path(self) -> Path:
        return self._path

    @property
    def snapshot_path(self) -> Path:
        return self._path.with_name(SNAPSHOT_NAME)

    @property
    def first_index(self) -> int:
        """Index of the oldest record in the file: 0, or the compaction snapshot's index + 1."""
        return self._base

    @property
    def last_index(self) -> int:
        """Index of the newest event covered (in the file or compacted into the snapshot); -1 = none."""
        return self._base + len(self._offsets) - 1

    def __len__(self) -> int:
        """Number of records in the file (not counting compacted ones)."""
        return len(self._offsets)

    # -- reading ----------------------------------------------------------------------

    def __iter__(self) -> Iterator[tuple[int, bytes]]:
        return self.replay()

    def replay(self, start: int | None = None) -> Iterator[tuple[int, bytes]]:
        """Records from `start` (default `first_index`) to the end, read a chunk at a time."""
        position = self._position(self._base if start is None else start)
        while position < len(self._offsets):
            stop = bisect.bisect_right(
                self._offsets, self._offsets[position] + _READ_CHUNK, lo=position + 1
            )
            yield from self._read(position, stop)
            position = stop

    def read_range(self, start: int, end: int) -> list[tuple[int, bytes]]:
        """Records with start <= index < end; `end` is clamped to what the log holds."""
        if start < 0 or end < start:
            raise ValueError(f"bad range [{start}, {end})")
        position = self._position(start)
        stop = min(end - self._base, len(self._offsets))
        return self._read(position, stop) if position < stop else []

    def _position(self, index: int) -> int:
        self._require_open()
        if index < self._base:
            raise EventLogCompacted(index, self._base)
        return index - self._base

    def _read(self, position: int, stop: int) -> list[tuple[int, bytes]]:
        """Records at offset-index positions [position, stop), with one pread."""
        assert self._fd is not None
        begin = self._offsets[position]
        finish = self._offsets[stop] if stop < len(self._offsets) else self._end
        data = os.pread(self._fd, finish - begin, begin)
        records: list[tuple[int, bytes]] = []
        for at in range(position, stop):
            offset = self._offsets[at]
            index = self._base + at
            records.append((index, decode_record(self._path, data, offset - begin, offset, index)))
        return records

    # -- appending --------------------------------------------------------------------

    def append(self, index: int, payload: bytes) -> None:
        self.append_many([(index, payload)])

    def append_many(self, records: Iterable[tuple[int, bytes]]) -> None:
        """Group commit: one write and one fsync for the batch; durable when this returns.

        All or nothing: on EventLogGap nothing is written; on EventLogWriteError the file
        is cut back to where it was, so none of the batch survives a replay.
        """
        self._require_open()
        if self._broken:
            raise EventLogWriteError(
                f"{self._path}: an earlier write failure left the log unusable; reopen it"
            )
        batch = list(records)
        if not batch:
            return
        check_consecutive(batch, self.last_index + 1, MAX_PAYLOAD_BYTES)
        blob, relative = encode_records(batch)
        start = self._end
        assert self._fd is not None
        try:
            write_all(self._fd, blob, start)
        except OSError as exc:
            self._roll_back(start, exc, after_fsync=False)
        if self._durable:
            try:
                sync(self._fd)
            except OSError as exc:
                self._roll_back(start, exc, after_fsync=True)
        self._offsets.extend(start + offset for offset in relative)
        self._end = start + len(blob)

    def _roll_back(self, start: int, cause: OSError, *, after_fsync: bool) -> NoReturn:
        """Cut the file back to `start` and raise; poison the log if that may not have worked."""
        assert self._fd is not None
        # After a failed fsync the kernel may have dropped dirty pages: trust nothing more.
        self._broken = after_fsync
        try:
            os.ftruncate(self._fd, start)
            if self._durable:
                sync(self._fd)
        except OSError:
            self._broken = True
        logger.error(f"{self._path}: append failed at offset {start} and was undone: {cause}")
        raise EventLogWriteError(f"{self._path}: append not durable: {cause}") from cause

    def truncate_after(self, index: int) -> None:
        """Drop every record with a greater index (a deposed master's uncommitted tail).

        Durable when this returns. Records at or below a compaction point cannot go.
        """
        self._require_open()
        if index < self._base - 1:
            raise EventLogCompacted(index + 1, self._base)
        keep = index + 1 - self._base
        if keep >= len(self._offsets):
            return
        assert self._fd is not None
        cut = self._offsets[keep]
        try:
            os.ftruncate(self._fd, cut)
            if self._durable:
                sync(self._fd)
        except OSError as exc:
            self._broken = True
            raise EventLogWriteError(f"{self._path}: truncation failed: {exc}") from exc
        del self._offsets[keep:]
        self._end = cut

    def reset(self, base: int) -> None:
        """Drop every record; the log continues at `base` (after a snapshot from a peer
        replaced this node's whole log). Write that snapshot first."""
        self._require_open()
        if base < 0:
            raise ValueError(f"bad base index {base}")
        try:
            atomic_write(self._path, [encode_file_header(base)], durable=self._durable)
            new_fd = os.open(self._path, os.O_RDWR)
        except OSError as exc:
            self._broken = True
            raise EventLogWriteError(f"{self._path}: reset failed: {exc}") from exc
        assert self._fd is not None
        os.close(self._fd)
        self._fd = new_fd
        self._offsets = array("Q")
        self._end = FILE_HEADER_SIZE
        self._base = base
        self._broken = False

    # -- snapshots and compaction -----------------------------------------------------

    def write_snapshot(self, index: int, payload: bytes) -> None:
        """Atomically replace snapshot.bin with the state folded up to and including `index`."""
        self._require_open()
        if index < self._base - 1:
            raise ValueError(
                f"snapshot at {index} is older than the compacted log (first index {self._base})"
            )
        try:
            write_snapshot_file(self.snapshot_path, index, payload, durable=self._durable)
        except OSError as exc:
            raise EventLogWriteError(f"{self.snapshot_path}: snapshot not written: {exc}") from exc

    def load_snapshot(self) -> tuple[int, bytes] | None:
        """(index, payload), or None: no snapshot, or a damaged one while the full log still exists."""
        self._require_open()
        try:
            snapshot = read_snapshot_file(self.snapshot_path)
        except EventLogCorrupt as exc:
            if self._base > 0:
                raise EventLogCorrupt(
                    self.snapshot_path,
                    exc.offset,
                    f"{exc.reason}, and the log was compacted past it",
                ) from exc
            logger.warning(f"ignoring damaged snapshot, replaying the full log instead: {exc}")
            return None
        if snapshot is not None and snapshot[0] < self._base - 1:
            raise EventLogCorrupt(
                self.snapshot_path,
                0,
                f"snapshot at {snapshot[0]} predates compacted log start {self._base}",
            )
        return snapshot

    def compact(self, upto_index: int) -> None:
        """Drop records <= upto_index; needs a snapshot at >= upto_index on disk.

        `upto_index` past `last_index` moves an empty log forward to a snapshot a node got
        from a peer, so its next append is upto_index + 1.
        """
        snapshot = self.load_snapshot()
        if snapshot is None or snapshot[0] < upto_index:
            raise ValueError(f"compacting to {upto_index} needs a snapshot at or after it")
        if upto_index < self._base:
            return  # already compacted at least this far
        keep = min(upto_index + 1 - self._base, len(self._offsets))
        cut = self._offsets[keep] if keep < len(self._offsets) else self._end
        try:
            atomic_write(self._path, self._tail_chunks(upto_index + 1, cut), durable=self._durable)
            new_fd = os.open(self._path, os.O_RDWR)
        except OSError as exc:
            assert self._fd is not None
            # Failing after the rename leaves our fd on the unlinked old file: stop appending.
            self._broken = self._path.exists() and not os.path.samestat(
                os.stat(self._path), os.fstat(self._fd)
            )
            raise EventLogWriteError(f"{self._path}: compaction failed: {exc}") from exc
        assert self._fd is not None
        os.close(self._fd)
        self._fd = new_fd
        shift = cut - FILE_HEADER_SIZE
        self._offsets = array("Q", (offset - shift for offset in self._offsets[keep:]))
        self._end -= shift
        self._base = upto_index + 1

    def _tail_chunks(self, base: int, cut: int) -> Iterator[bytes]:
        assert self._fd is not None
        yield encode_file_header(base)
        position = cut
        while position < self._end:
            chunk = os.pread(self._fd, min(_READ_CHUNK, self._end - position), position)
            if not chunk:
                raise EventLogCorrupt(self._path, position, "file shrank during compaction")
            yield chunk
            position += len(chunk)

    # -- lifetime ---------------------------------------------------------------------

    def _require_open(self) -> None:
        if self._fd is None:
            raise EventLogError(f"{self._path} is closed")

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> EventLogFile:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
