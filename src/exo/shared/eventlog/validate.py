"""Checks an append batch before any byte is written, so a refused batch leaves no trace."""

from collections.abc import Sequence

from exo.shared.eventlog.errors import EventLogGap


def check_consecutive(
    batch: Sequence[tuple[int, bytes]], next_index: int, max_payload: int
) -> None:
    for position, (index, payload) in enumerate(batch):
        if index != next_index + position:
            raise EventLogGap(expected=next_index + position, got=index)
        if len(payload) > max_payload:
            raise ValueError(f"record {index} is {len(payload)} bytes; the limit is {max_payload}")
