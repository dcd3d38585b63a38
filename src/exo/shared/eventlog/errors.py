"""Typed failures of the event log, so callers can refuse, repair or stop on the right one."""

from pathlib import Path


class EventLogError(Exception):
    """Base of every event-log failure."""


class EventLogCorrupt(EventLogError):
    """The file holds damage that is not a torn tail; replaying past it would lose events."""

    def __init__(self, path: Path, offset: int, reason: str) -> None:
        super().__init__(f"{path}: corrupt at byte {offset}: {reason}")
        self.path = path
        self.offset = offset
        self.reason = reason


class EventLogUnreadable(EventLogError):
    """A record is whole (its checksum holds) but this build cannot parse it: another
    version of exo wrote it. Skipping it would lose events, so the log is refused."""

    def __init__(self, path: Path, index: int, reason: str) -> None:
        what = "the snapshot" if index < 0 else f"record {index}"
        super().__init__(f"{path}: {what} is not readable by this version of exo: {reason}")
        self.path = path
        self.index = index
        self.reason = reason


class EventLogGap(EventLogError):
    """An append whose index is not exactly the next one; the caller must fetch the missing range."""

    def __init__(self, expected: int, got: int) -> None:
        super().__init__(f"append of index {got}, expected {expected}")
        self.expected = expected
        self.got = got


class EventLogCompacted(EventLogError):
    """A read below `first_index`: those events live only in the snapshot now."""

    def __init__(self, requested: int, first_index: int) -> None:
        super().__init__(f"index {requested} was compacted away; first index is {first_index}")
        self.requested = requested
        self.first_index = first_index


class EventLogWriteError(EventLogError):
    """An append did not become durable; none of its records are in the log."""


class EventLogBusy(EventLogError):
    """Another process holds this log; two writers would interleave records."""

    def __init__(self, path: Path) -> None:
        super().__init__(
            f"{path} is locked by another process (is another exo using this EXO_HOME?)"
        )
        self.path = path
