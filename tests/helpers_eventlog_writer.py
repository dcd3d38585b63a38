"""Appends batches to an event log forever, printing each batch's last index once durable.

The crash test SIGKILLs it at a random moment; every index printed must survive.
Usage: python helpers_eventlog_writer.py LOG_PATH [--short-writes]

--short-writes makes every pwrite write at most 64 bytes, as the kernel may, so a kill
lands between the pieces of one batch and leaves a torn tail for the next open to drop.
"""

import hashlib
import os
import random
import sys
from typing import TYPE_CHECKING

from exo.shared.eventlog import EventLogFile

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer

_real_pwrite = os.pwrite


def payload_for(index: int) -> bytes:
    """Deterministic, varied-length payload so the test can check each record's bytes."""
    digest = hashlib.sha256(index.to_bytes(8, "little")).digest()
    length = 1 + (index * 7919) % 1500
    return (digest * (length // len(digest) + 1))[:length]


def _short_pwrite(fd: int, data: "ReadableBuffer", offset: int) -> int:
    return _real_pwrite(fd, memoryview(data)[:64], offset)


def main(path: str, short_writes: bool) -> None:
    if short_writes:
        os.pwrite = _short_pwrite
    rng = random.Random()
    with EventLogFile(path) as log:
        next_index = log.last_index + 1
        while True:
            size = rng.randint(1, 32)
            log.append_many([(i, payload_for(i)) for i in range(next_index, next_index + size)])
            next_index += size
            # Printed only after append_many returned: this index is claimed durable.
            print(next_index - 1, flush=True)


if __name__ == "__main__":
    main(sys.argv[1], short_writes="--short-writes" in sys.argv[2:])
