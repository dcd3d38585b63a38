"""The byte-level event log: framing, torn tails, corruption, snapshots, write failures, crashes."""

import errno
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Generator
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from loguru import logger

from exo.shared.eventlog import (
    EventLogBusy,
    EventLogCompacted,
    EventLogCorrupt,
    EventLogError,
    EventLogFile,
    EventLogGap,
    EventLogWriteError,
    durable,
)
from exo.shared.eventlog import log as log_module
from exo.shared.eventlog.framing import FILE_HEADER_SIZE, RECORD_HEADER_SIZE
from tests.helpers_eventlog_writer import payload_for

WRITER = Path(__file__).with_name("helpers_eventlog_writer.py")


def records(start: int, stop: int) -> list[tuple[int, bytes]]:
    return [(i, payload_for(i)) for i in range(start, stop)]


def fill(path: Path, count: int) -> list[int]:
    """Append `count` records one per batch; returns each record's starting file offset."""
    offsets: list[int] = []
    with EventLogFile(path, fsync=False) as log:
        for index, payload in records(0, count):
            offsets.append(path.stat().st_size)
            log.append(index, payload)
    return offsets


@contextmanager
def warnings() -> Generator[list[str]]:
    messages: list[str] = []
    sink = logger.add(messages.append, level="WARNING", format="{message}")
    try:
        yield messages
    finally:
        logger.remove(sink)


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


# -- round trip, ranges, gaps ---------------------------------------------------------


def test_empty_log_has_no_events(tmp_path: Path) -> None:
    with EventLogFile(tmp_path / "deep" / "dir" / "events.log") as log:
        assert (log.first_index, log.last_index, len(log)) == (0, -1, 0)
        assert list(log) == []
        assert log.read_range(0, 10) == []
        assert log.load_snapshot() is None


def test_round_trip_and_reopen(tmp_path: Path) -> None:
    path = tmp_path / "events.log"
    with EventLogFile(path) as log:  # fsync on: exercises the real sync calls
        log.append(0, b"first")
        log.append_many(records(1, 50))
        log.append(50, b"")
        assert log.last_index == 50
    expected = [(0, b"first"), *records(1, 50), (50, b"")]
    with EventLogFile(path) as log:
        assert list(log) == expected
        assert list(log.replay(start=40)) == expected[40:]
        log.append(51, b"after reopen")
    with EventLogFile(path) as log:
        assert log.last_index == 51
        assert log.read_range(51, 52) == [(51, b"after reopen")]


def test_replay_of_a_log_larger_than_one_read_chunk(tmp_path: Path) -> None:
    big = [(i, bytes([i % 256]) * 20_000) for i in range(200)]
    with EventLogFile(tmp_path / "events.log", fsync=False) as log:
        log.append_many(big)
        assert list(log) == big
        assert list(log.replay(start=123)) == big[123:]


def test_read_range_is_half_open_and_clamped(tmp_path: Path) -> None:
    with EventLogFile(tmp_path / "events.log", fsync=False) as log:
        log.append_many(records(0, 10))
        assert log.read_range(3, 6) == records(3, 6)
        assert log.read_range(8, 100) == records(8, 10)
        assert log.read_range(10, 20) == []
        assert log.read_range(4, 4) == []
        with pytest.raises(ValueError, match="bad range"):
            log.read_range(5, 4)
        with pytest.raises(ValueError, match="bad range"):
            log.read_range(-1, 4)


def test_non_consecutive_index_is_refused_and_nothing_is_written(tmp_path: Path) -> None:
    path = tmp_path / "events.log"
    with EventLogFile(path, fsync=False) as log:
        with pytest.raises(EventLogGap) as first:
            log.append(1, b"skips 0")
        assert (first.value.expected, first.value.got) == (0, 1)
        log.append_many(records(0, 3))
        size = path.stat().st_size
        with pytest.raises(EventLogGap):
            log.append(2, b"duplicate")
        with pytest.raises(EventLogGap) as inner:
            log.append_many([(3, b"a"), (4, b"b"), (6, b"gap")])
        assert (inner.value.expected, inner.value.got) == (5, 6)
        assert path.stat().st_size == size
        assert log.last_index == 2
        log.append_many([])  # an empty batch is a no-op, not an error
    with EventLogFile(path) as log:
        assert list(log) == records(0, 3)


def test_second_open_of_the_same_log_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "events.log"
    with EventLogFile(path, fsync=False), pytest.raises(EventLogBusy):
        EventLogFile(path, fsync=False)
    with EventLogFile(path, fsync=False) as log:  # released on close
        assert log.last_index == -1


def test_closed_log_refuses_use(tmp_path: Path) -> None:
    log = EventLogFile(tmp_path / "events.log", fsync=False)
    log.close()
    log.close()
    with pytest.raises(EventLogError, match="closed"):
        log.append(0, b"x")
    with pytest.raises(EventLogError, match="closed"):
        log.read_range(0, 1)


# -- torn tails and corruption --------------------------------------------------------


def test_torn_tail_at_every_byte_of_the_last_record_is_dropped(tmp_path: Path) -> None:
    original = tmp_path / "original.log"
    offsets = fill(original, 4)
    last_start, full = offsets[-1], original.stat().st_size
    with warnings() as seen:  # one sink for the loop: adding a loguru sink is slow
        for cut in range(last_start, full):
            path = tmp_path / f"cut{cut}" / "events.log"
            path.parent.mkdir()
            shutil.copy(original, path)
            os.truncate(path, cut)
            seen.clear()
            with EventLogFile(path, fsync=False) as log:
                assert list(log) == records(0, 3)
                assert len(seen) == (1 if cut > last_start else 0)
                assert path.stat().st_size == last_start
                log.append(3, b"clean after the cut")
            with EventLogFile(path, fsync=False) as log:
                assert list(log) == [*records(0, 3), (3, b"clean after the cut")]


@pytest.mark.parametrize("field_offset", [0, 4, 12, RECORD_HEADER_SIZE + 5])
def test_damaged_last_record_is_a_torn_tail(tmp_path: Path, field_offset: int) -> None:
    path = tmp_path / "events.log"
    offsets = fill(path, 4)
    flip_byte(path, offsets[-1] + field_offset)
    with warnings() as seen, EventLogFile(path, fsync=False) as log:
        assert list(log) == records(0, 3)
        assert len(seen) == 1


def test_zero_filled_tail_is_a_torn_tail(tmp_path: Path) -> None:
    path = tmp_path / "events.log"
    fill(path, 3)
    with path.open("ab") as f:
        f.write(bytes(5000))  # a crash can leave the size extended but the data unwritten
    with EventLogFile(path, fsync=False) as log:
        assert list(log) == records(0, 3)


@pytest.mark.parametrize(
    ("field", "field_offset"),
    [("length", 1), ("index", 5), ("crc", 13), ("payload", RECORD_HEADER_SIZE)],
)
def test_damage_followed_by_intact_records_raises(
    tmp_path: Path, field: str, field_offset: int
) -> None:
    path = tmp_path / "events.log"
    offsets = fill(path, 6)
    flip_byte(path, offsets[2] + field_offset)
    with pytest.raises(EventLogCorrupt) as raised:
        EventLogFile(path, fsync=False)
    assert raised.value.offset == offsets[2], field
    assert path.stat().st_size > offsets[-1], "corruption must not be truncated away"


def test_damaged_header_raises(tmp_path: Path) -> None:
    path = tmp_path / "events.log"
    fill(path, 2)
    flip_byte(path, 0)
    with pytest.raises(EventLogCorrupt, match="magic"):
        EventLogFile(path, fsync=False)
    os.truncate(path, FILE_HEADER_SIZE - 1)
    with pytest.raises(EventLogCorrupt, match="shorter"):
        EventLogFile(path, fsync=False)


@settings(max_examples=150, deadline=None)
@given(
    batches=st.lists(st.lists(st.binary(max_size=300), min_size=1, max_size=6), max_size=8),
    cut_fraction=st.floats(min_value=0.0, max_value=1.0),
)
def test_truncation_anywhere_replays_to_the_prefix_of_whole_records(
    batches: list[list[bytes]], cut_fraction: float
) -> None:
    appended: list[tuple[int, bytes]] = []
    ends: list[int] = []  # file size after each record
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "events.log"
        with EventLogFile(path, fsync=False) as log:
            for batch in batches:
                indexed = [(len(appended) + i, payload) for i, payload in enumerate(batch)]
                log.append_many(indexed)
                appended.extend(indexed)
        size = path.stat().st_size
        position = FILE_HEADER_SIZE
        for _, payload in appended:
            position += RECORD_HEADER_SIZE + len(payload)
            ends.append(position)
        assert position == size
        cut = FILE_HEADER_SIZE + round(cut_fraction * (size - FILE_HEADER_SIZE))
        os.truncate(path, cut)
        with EventLogFile(path, fsync=False) as log:
            replayed = list(log)
        assert replayed == appended[: len(replayed)]
        assert len(replayed) == sum(1 for end in ends if end <= cut)


# -- snapshots and compaction ---------------------------------------------------------


def test_snapshot_compaction_and_reopen(tmp_path: Path) -> None:
    path = tmp_path / "events.log"
    with EventLogFile(path) as log:
        log.append_many(records(0, 10))
        with pytest.raises(ValueError, match="needs a snapshot"):
            log.compact(5)
        log.write_snapshot(5, b"state@5")
        with pytest.raises(ValueError, match="needs a snapshot"):
            log.compact(6)
        log.compact(5)
        assert (log.first_index, log.last_index, len(log)) == (6, 9, 4)
        assert log.read_range(6, 10) == records(6, 10)
        with pytest.raises(EventLogCompacted) as raised:
            log.read_range(3, 8)
        assert raised.value.first_index == 6
        log.compact(2)  # already compacted past it: nothing to do
        log.append(10, b"ten")
    assert (tmp_path / "snapshot.bin").exists()
    with EventLogFile(path) as log:
        assert log.load_snapshot() == (5, b"state@5")
        assert (log.first_index, log.last_index) == (6, 10)
        assert list(log) == [*records(6, 10), (10, b"ten")]
        with pytest.raises(EventLogCompacted):
            list(log.replay(start=0))


def test_compacting_everything_keeps_the_next_index(tmp_path: Path) -> None:
    path = tmp_path / "events.log"
    with EventLogFile(path, fsync=False) as log:
        log.append_many(records(0, 5))
        log.write_snapshot(4, b"state@4")
        log.compact(4)
        assert (log.first_index, log.last_index, len(log)) == (5, 4, 0)
        with pytest.raises(EventLogGap):
            log.append(0, b"restart from zero")
        log.append(5, b"five")
    with EventLogFile(path, fsync=False) as log:
        assert list(log) == [(5, b"five")]


def test_compacting_past_the_end_jumps_to_a_peer_snapshot(tmp_path: Path) -> None:
    with EventLogFile(tmp_path / "events.log", fsync=False) as log:
        log.append_many(records(0, 3))
        log.write_snapshot(100, b"state@100 from the master")
        log.compact(100)
        assert (log.first_index, log.last_index) == (101, 100)
        log.append(101, b"next")
        assert list(log) == [(101, b"next")]


def test_corrupt_snapshot_is_ignored_while_the_full_log_exists(tmp_path: Path) -> None:
    path = tmp_path / "events.log"
    with EventLogFile(path, fsync=False) as log:
        log.append_many(records(0, 5))
        log.write_snapshot(3, b"state@3")
    flip_byte(tmp_path / "snapshot.bin", 30)  # in the payload
    with warnings() as seen, EventLogFile(path, fsync=False) as log:
        assert log.load_snapshot() is None
        assert len(seen) == 1
        assert list(log) == records(0, 5)


def test_corrupt_snapshot_after_compaction_raises(tmp_path: Path) -> None:
    path = tmp_path / "events.log"
    with EventLogFile(path, fsync=False) as log:
        log.append_many(records(0, 5))
        log.write_snapshot(3, b"state@3")
        log.compact(3)
    os.truncate(tmp_path / "snapshot.bin", 10)
    with EventLogFile(path, fsync=False) as log, pytest.raises(EventLogCorrupt):
        log.load_snapshot()


def test_leftover_temp_files_from_a_crash_are_removed(tmp_path: Path) -> None:
    path = tmp_path / "events.log"
    fill(path, 2)
    (tmp_path / "events.log.tmp").write_bytes(b"half a compaction")
    (tmp_path / "snapshot.bin.tmp").write_bytes(b"half a snapshot")
    with EventLogFile(path, fsync=False) as log:
        assert list(log) == records(0, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["events.log", "events.log.lock"]


# -- write failures -------------------------------------------------------------------


def failing_pwrite(after_bytes: int) -> Callable[[int, memoryview, int], int]:
    """A pwrite that writes `after_bytes`, then fails with ENOSPC like a full disk."""
    real = os.pwrite
    budget = [after_bytes]

    def pwrite(fd: int, data: memoryview, offset: int) -> int:
        if budget[0] <= 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        written = real(fd, data[: budget[0]], offset)
        budget[0] -= written
        return written

    return pwrite


@pytest.mark.parametrize("after_bytes", [0, 7, 100, 1000])
def test_write_error_leaves_a_consistent_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, after_bytes: int
) -> None:
    path = tmp_path / "events.log"
    with EventLogFile(path) as log:
        log.append_many(records(0, 3))
        size = path.stat().st_size
        monkeypatch.setattr(os, "pwrite", failing_pwrite(after_bytes))
        with pytest.raises(EventLogWriteError) as raised:
            log.append_many(records(3, 8))
        assert isinstance(raised.value.__cause__, OSError)
        assert path.stat().st_size == size
        assert log.last_index == 2
        monkeypatch.undo()
        log.append_many(records(3, 8))  # disk has room again: the log is still usable
    with EventLogFile(path) as log:
        assert list(log) == records(0, 8)


def test_failed_fsync_is_undone_and_poisons_the_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "events.log"

    def broken_sync(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    with EventLogFile(path) as log:
        log.append_many(records(0, 2))
        size = path.stat().st_size
        monkeypatch.setattr(log_module, "sync", broken_sync)
        with pytest.raises(EventLogWriteError):
            log.append(2, b"lost")
        monkeypatch.undo()
        assert path.stat().st_size == size
        with pytest.raises(EventLogWriteError, match="reopen"):
            log.append(2, b"refused until reopened")
    with EventLogFile(path) as log:
        assert list(log) == records(0, 2)


def test_failed_snapshot_or_compaction_keeps_the_old_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "events.log"
    with EventLogFile(path) as log:
        log.append_many(records(0, 6))
        log.write_snapshot(2, b"state@2")
        monkeypatch.setattr(os, "pwrite", failing_pwrite(10))
        with pytest.raises(EventLogWriteError):
            log.write_snapshot(4, b"state@4")
        with pytest.raises(EventLogWriteError):
            log.compact(2)
        monkeypatch.undo()
        assert log.load_snapshot() == (2, b"state@2")
        assert (log.first_index, list(log)) == (0, records(0, 6))
        log.append(6, b"still usable")


def test_compaction_failing_after_the_rename_poisons_the_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "events.log"

    def broken_sync_dir(directory: Path) -> None:
        raise OSError(errno.EIO, "Input/output error")

    with EventLogFile(path) as log:
        log.append_many(records(0, 6))
        log.write_snapshot(2, b"state@2")
        monkeypatch.setattr(durable, "sync_dir", broken_sync_dir)
        with pytest.raises(EventLogWriteError):
            log.compact(2)
        monkeypatch.undo()
        with pytest.raises(EventLogWriteError, match="reopen"):
            log.append(6, b"would go to the replaced file")
    with EventLogFile(path) as log:
        assert (log.first_index, list(log)) == (3, records(3, 6))


# -- a real crash ---------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_sigkilled_writer_loses_nothing_it_reported_durable(tmp_path: Path) -> None:
    path = tmp_path / "events.log"
    rng = random.Random()
    for round_ in range(6):
        # Odd rounds write in 64-byte pieces so the kill tears a batch (see the helper).
        flags = ["--short-writes"] if round_ % 2 else []
        writer = subprocess.Popen(
            [sys.executable, str(WRITER), str(path), *flags], stdout=subprocess.PIPE, text=True
        )
        assert writer.stdout is not None
        first = writer.stdout.readline()  # it is up and appending
        time.sleep(rng.uniform(0.05, 0.4))
        writer.send_signal(signal.SIGKILL)
        out, _ = writer.communicate()
        lines = (first + out).splitlines(keepends=True)
        reported = [int(line) for line in lines if line.endswith("\n")]
        assert writer.returncode == -signal.SIGKILL
        with EventLogFile(path) as log:
            replayed = list(log)
        assert [index for index, _ in replayed] == list(range(len(replayed)))
        assert all(payload == payload_for(index) for index, payload in replayed)
        assert reported, "the writer never reported a durable append"
        assert len(replayed) - 1 >= max(reported)
