"""This node's durable copy of the global event log: bytes only, no event types.

The typed layer serialises each `IndexedEvent` to bytes and calls `EventLogFile`.

Files, in one directory: the log (`events.log` or whatever path is given), `snapshot.bin`
next to it, and `<log>.lock` (an flock so two processes never write one log).

Indices: gap-free and increasing. The first index is 0; `last_index` is -1 for "no
event". After compaction the file starts at `first_index` = snapshot index + 1.

Fsync policy (with `fsync=True`, the default; tests may pass False and skip every sync):
- `append_many` is a group commit: the whole batch goes out in one `pwrite` and one
  fsync before it returns, so an event is durable before the master broadcasts or acks
  it and before a follower applies it. `append` is a batch of one.
- Creating the log, writing a snapshot and compacting all write a temp file, fsync it,
  rename it into place and fsync the directory, so a crash leaves the old file or the
  new one, never a mix.
- On macOS fsync stops at the drive's cache, so F_FULLFSYNC is used where it exists.

Recovery on open: a torn tail (short header, short payload or bad crc with no intact
record after it) is logged as one warning and truncated away. Damage followed by an
intact record is `EventLogCorrupt`, never dropped silently. A failed append is cut back
and raised as `EventLogWriteError`; a failed fsync also poisons the log until reopened.

Not thread-safe: one owner calls it (from a worker thread if it must not block a loop).
"""

from exo.shared.eventlog.errors import (
    EventLogBusy,
    EventLogCompacted,
    EventLogCorrupt,
    EventLogError,
    EventLogGap,
    EventLogUnreadable,
    EventLogWriteError,
)
from exo.shared.eventlog.framing import MAX_PAYLOAD_BYTES
from exo.shared.eventlog.log import SNAPSHOT_NAME, EventLogFile

__all__ = [
    "MAX_PAYLOAD_BYTES",
    "SNAPSHOT_NAME",
    "EventLogBusy",
    "EventLogCompacted",
    "EventLogCorrupt",
    "EventLogError",
    "EventLogFile",
    "EventLogGap",
    "EventLogUnreadable",
    "EventLogWriteError",
]
