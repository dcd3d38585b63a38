"""An advisory lock on a file, taken only if nobody holds it (flock: released when its
holder closes the file or dies, so a killed process never leaves a held lock behind)."""

import fcntl
from collections.abc import Generator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def try_lock(lock_path: Path) -> Generator[bool]:
    """True while this process holds the lock of `lock_path` (created if missing), else
    False at once."""
    with lock_path.open("a") as lock_file:
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)
