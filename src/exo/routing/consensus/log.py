"""The in-memory tail of the replicated log: entries after a base (the compaction point)."""

from collections.abc import Iterable, Sequence

from exo.routing.consensus.entries import LogEntry


def entry_bytes(entry: LogEntry) -> int:
    """An entry's size on the wire (JSON), for byte-bounded appends."""
    return len(entry.model_dump_json())


class RaftLog:
    def __init__(self, base_index: int = -1, base_term: int = 0) -> None:
        self.base_index = base_index
        self.base_term = base_term
        self._entries: list[LogEntry] = []
        # entry_bytes of each entry, measured when an append first needs it (only a
        # master's appends do: followers and a restored log never pay for it).
        self._sizes: list[int | None] = []

    @property
    def last_index(self) -> int:
        return self.base_index + len(self._entries)

    @property
    def last_term(self) -> int:
        return self._entries[-1].term if self._entries else self.base_term

    def term_at(self, index: int) -> int | None:
        """The term of the entry at `index`; None if it is compacted away or not held."""
        if index == self.base_index:
            return self.base_term
        if self.base_index < index <= self.last_index:
            return self._entries[index - self.base_index - 1].term
        return None

    def entry(self, index: int) -> LogEntry:
        return self._entries[index - self.base_index - 1]

    def slice(self, start: int, end: int, max_bytes: int | None = None) -> list[LogEntry]:
        """Held entries with start <= index < end; with `max_bytes`, only as many as fit in
        that many bytes, but at least one."""
        start = max(start, self.base_index + 1)
        end = min(end, self.last_index + 1)
        if start >= end:
            return []
        offset = self.base_index + 1
        if max_bytes is not None:
            total = 0
            for i in range(start - offset, end - offset):
                size = self._sizes[i]
                if size is None:
                    size = self._sizes[i] = entry_bytes(self._entries[i])
                total += size
                if total > max_bytes and i > start - offset:
                    end = i + offset
                    break
        return self._entries[start - offset : end - offset]

    def append(self, entries: Sequence[LogEntry]) -> None:
        for expected, entry in enumerate(entries, self.last_index + 1):
            if entry.index != expected:
                raise ValueError(f"log append at {entry.index}, expected {expected}")
        self._entries.extend(entries)
        self._sizes.extend(None for _ in entries)

    def truncate_after(self, index: int) -> None:
        if index < self.base_index:
            raise ValueError(f"cannot truncate to {index}: compacted up to {self.base_index}")
        del self._entries[index - self.base_index :]
        del self._sizes[index - self.base_index :]

    def compact(self, upto: int) -> None:
        """Forget entries up to `upto` (they are in a snapshot)."""
        term = self.term_at(upto)
        if term is None:
            raise ValueError(f"cannot compact to {upto}: not held")
        del self._entries[: upto - self.base_index]
        del self._sizes[: upto - self.base_index]
        self.base_index, self.base_term = upto, term

    def reset(self, base_index: int, base_term: int, entries: Iterable[LogEntry] = ()) -> None:
        self.base_index, self.base_term = base_index, base_term
        self._entries = []
        self._sizes = []
        self.append(list(entries))

    def first_index_of_term(self, index: int, floor: int) -> int:
        """The first held index > floor whose term equals the term at `index`."""
        term = self.term_at(index)
        while index - 1 > max(floor, self.base_index) and self.term_at(index - 1) == term:
            index -= 1
        return index
