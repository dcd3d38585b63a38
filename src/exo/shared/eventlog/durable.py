"""The few OS calls that make bytes durable: full writes, fsync, atomic replace."""

import contextlib
import fcntl
import os
from collections.abc import Iterable
from pathlib import Path


def sync(fd: int) -> None:
    """Flush a file to stable storage (on macOS plain fsync stops at the drive's cache)."""
    full_fsync: int | None = getattr(fcntl, "F_FULLFSYNC", None)
    if full_fsync is not None:
        try:
            fcntl.fcntl(fd, full_fsync)
            return
        except OSError:
            pass  # not every filesystem supports it; fsync is the best left
    os.fsync(fd)


def sync_dir(directory: Path) -> None:
    """Make a create or rename inside `directory` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_all(fd: int, data: bytes, offset: int) -> None:
    """pwrite until every byte is written; a short write is not an error, only a retry."""
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


def temp_path(path: Path) -> Path:
    return path.with_name(path.name + ".tmp")


def atomic_write(path: Path, chunks: Iterable[bytes], *, durable: bool) -> None:
    """Readers see the old file or the whole new one, never a mix, even across a crash."""
    tmp = temp_path(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        offset = 0
        for chunk in chunks:
            write_all(fd, chunk, offset)
            offset += len(chunk)
        if durable:
            sync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    os.close(fd)
    os.replace(tmp, path)
    if durable:
        sync_dir(path.parent)


def lock_exclusive(path: Path) -> int:
    """Take a non-blocking exclusive lock on `path`; returns the fd that holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BaseException:
        os.close(fd)
        raise
    return fd
