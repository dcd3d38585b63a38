"""This node's durable copy of the replicated log: entries, latest snapshot, hard state.

`persist(ready)` makes one `Ready` of the consensus core durable in the order the core
asks for (docs/consensus.md, "Handling Ready"), before any of its messages leave the
node. `restored()` reads it back after a restart. Layout under the directory:

- `raft.log`: the entries (an `EventLogFile`: CRC-framed records, torn tail dropped on
  replay, compaction behind a snapshot),
- `snapshot.bin`: the latest `Snapshot` (state, voters, index, term), atomic,
- `hardstate.json`: term, vote, cluster id (fsync'd whenever they change) and the commit
  index (written lazily: a lower commit on disk is safe, the master re-sends it).
"""

import threading
from pathlib import Path
from typing import TypeVar

from loguru import logger
from pydantic import TypeAdapter, ValidationError

from exo.routing.consensus import HardState, Membership, Ready, Restored, Snapshot
from exo.shared.apply import apply
from exo.shared.eventlog import EventLogCorrupt, EventLogFile, EventLogUnreadable
from exo.shared.eventlog.durable import atomic_write
from exo.shared.types.events import IndexedEvent
from exo.shared.types.ids import NodeId
from exo.shared.types.state import State

_ENTRY = TypeAdapter(IndexedEvent)
_STATE = TypeAdapter(State)
_SNAPSHOT = TypeAdapter(Snapshot)
_T = TypeVar("_T")
LOG_NAME = "raft.log"
HARD_STATE_NAME = "hardstate.json"


def _parse(adapter: TypeAdapter[_T], payload: bytes, path: Path, index: int) -> _T:
    """A stored record, or `EventLogUnreadable` when this build cannot parse it."""
    try:
        return adapter.validate_json(payload)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "the record"
        raise EventLogUnreadable(path, index, f"{where}: {first['msg']}") from None


class ClusterStore:
    def __init__(self, directory: Path, *, fsync: bool = True) -> None:
        self._dir = directory
        self._durable = fsync
        self._lock = threading.Lock()  # persist runs in a worker thread, reads on the loop
        self._log = EventLogFile(directory / LOG_NAME, fsync=fsync)
        self._hard_path = directory / HARD_STATE_NAME
        self._hard = self._read_hard_state()

    @property
    def directory(self) -> Path:
        return self._dir

    # ------------------------------------------------------------------ reading back

    def _read_hard_state(self) -> HardState | None:
        try:
            return HardState.model_validate_json(self._hard_path.read_bytes())
        except FileNotFoundError:
            return None
        except ValidationError as exc:
            raise EventLogCorrupt(self._hard_path, 0, f"unreadable hard state: {exc}") from exc

    def restored(self) -> Restored | None:
        """What the consensus core needs after a restart; None for a node that never
        persisted a hard state (it has never been in a cluster)."""
        with self._lock:
            if self._hard is None:
                if self._log.last_index >= 0:
                    raise EventLogCorrupt(self._log.path, 0, "log entries without a hard state")
                return None
            snapshot = self._load_snapshot()
            start = self._log.first_index if snapshot is None else snapshot.index + 1
            entries = [
                _parse(_ENTRY, payload, self._log.path, index)
                for index, payload in self._log.replay(max(start, self._log.first_index))
            ]
            return Restored(hard_state=self._hard, snapshot=snapshot, entries=entries)

    def _load_snapshot(self) -> Snapshot | None:
        loaded = self._log.load_snapshot()
        if loaded is None:
            return None
        _index, payload = loaded
        return _parse(_SNAPSHOT, payload, self._log.snapshot_path, -1)

    def read_range(self, start: int, end: int) -> list[IndexedEvent]:
        """Held entries with start <= index < end (compacted ones are gone)."""
        with self._lock:
            start = max(start, self._log.first_index)
            end = min(end, self._log.last_index + 1)
            if start >= end:
                return []
            return [_ENTRY.validate_json(p) for _i, p in self._log.read_range(start, end)]

    # ------------------------------------------------------------------ writing

    def persist(self, ready: Ready) -> None:
        """Make the records of one `Ready` durable, in the core's order. Blocking."""
        with self._lock:
            snapshot = ready.snapshot
            if snapshot is not None and ready.snapshot_resets_log:
                self._write_snapshot(snapshot)
                self._log.reset(snapshot.index + 1)
            if ready.truncate_after is not None:
                self._log.truncate_after(ready.truncate_after)
            if ready.entries:
                self._log.append_many((e.index, _ENTRY.dump_json(e)) for e in ready.entries)
            if snapshot is not None and not ready.snapshot_resets_log:
                self._write_snapshot(snapshot)
                if ready.compact_upto is not None:
                    self._log.compact(ready.compact_upto)
            if ready.hard_state is not None:
                self._write_hard_state(ready.hard_state)

    def _write_snapshot(self, snapshot: Snapshot) -> None:
        self._log.write_snapshot(snapshot.index, snapshot.model_dump_json().encode())

    def _write_hard_state(self, hard: HardState) -> None:
        old = self._hard
        must_sync = old is None or (old.term, old.voted_for, old.cluster) != (
            hard.term,
            hard.voted_for,
            hard.cluster,
        )
        # Only the commit index changed: no fsync (an older commit on disk is safe).
        atomic_write(
            self._hard_path, [hard.model_dump_json().encode()], durable=self._durable and must_sync
        )
        self._hard = hard

    def migrate_single_node_log(self, old_log: Path, node_id: NodeId, cluster: str) -> bool:
        """Adopt the event log of a single-node exo (before the cluster landed) as this
        node's one-voter cluster; the old files are kept. True if there was one."""
        with self._lock:
            if self._hard is not None or not old_log.exists():
                return False
            with EventLogFile(old_log, fsync=False) as old:
                state = State()
                loaded = old.load_snapshot()
                if loaded is not None:
                    state = _parse(_STATE, loaded[1], old.snapshot_path, -1)
                start = max(state.last_index + 1, old.first_index)
                for index, payload in old.replay(start):
                    state = apply(state, _parse(_ENTRY, payload, old_log, index))
            if state.last_index < 0:
                return False
            members = Membership(voters={node_id: 0})
            snapshot = Snapshot(
                index=state.last_index, term=state.term, state=state, members=members
            )
            self._write_snapshot(snapshot)
            self._log.reset(snapshot.index + 1)
            self._write_hard_state(
                HardState(
                    term=state.term, voted_for=node_id, commit=state.last_index, cluster=cluster
                )
            )
            logger.info(
                f"adopted the single-node event log {old_log} (up to index {state.last_index}) "
                "as a one-node cluster"
            )
            return True

    def close(self) -> None:
        with self._lock:
            self._log.close()
