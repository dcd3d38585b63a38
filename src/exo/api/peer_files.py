"""A hub model's files as a node serves them to its peers (`/hub/.../resolve/...`).

A file the node holds whole goes out as a plain file response (with `Range`). A file its
download is fetching right now goes out as it arrives: the answer announces the whole
length and follows the part file, so two nodes that need the same file at once fetch it
from the hub once. The follower checks the digest as every download does; an answer that
ends short (the download stopped, or its part stopped growing) is resumed from another
source.
"""

import os
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
from loguru import logger
from starlette.responses import FileResponse, Response, StreamingResponse

from exo.models.download import GrowingFile

# A request for a file the download has not begun yet waits this long for it (below the
# follower's 30 s read bound), then is refused (the follower asks the next source).
APPEAR_S = 20.0
# A part file that does not grow for this long ends the answer short.
STALL_S = 10.0
_POLL_S = 0.05
_CHUNK_BYTES = 4 << 20
_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")


class HeldFile(FileResponse):
    # Starlette reads a file in 64 KiB pieces, each through a worker thread; a model's
    # gigabytes go faster in larger ones (docs/benchmarks.md, "Models from a peer").
    chunk_size = _CHUNK_BYTES


async def growing_response(growing: GrowingFile, range_header: str | None) -> Response | None:
    """The answer for a file being downloaded; None if it did not begin in time (or the
    download ended without it)."""
    if not await _appeared(growing):
        return None
    size = growing.size
    start, end, status = 0, size, 200
    headers = {"accept-ranges": "bytes"}
    asked = _RANGE.match(range_header or "")
    if asked is not None:  # other forms of Range may be ignored (RFC 9110): the whole file
        first, last = int(asked[1]), asked[2]
        end = min(int(last) + 1, size) if last else size
        if first >= end:
            return Response(status_code=416, headers={"content-range": f"bytes */{size}"})
        start, status = first, 206
        headers["content-range"] = f"bytes {start}-{end - 1}/{size}"
    headers["content-length"] = str(end - start)
    return StreamingResponse(
        _follow(growing, start, end),
        status_code=status,
        headers=headers,
        media_type="application/octet-stream",
    )


async def _appeared(growing: GrowingFile) -> bool:
    part = growing.path.with_name(growing.path.name + ".part")
    deadline = time.monotonic() + APPEAR_S

    def present() -> bool:
        return part.exists() or growing.path.exists()

    while not await anyio.to_thread.run_sync(present):
        if time.monotonic() > deadline or not await anyio.to_thread.run_sync(growing.downloading):
            return False
        await anyio.sleep(_POLL_S)
    return True


async def _follow(growing: GrowingFile, start: int, end: int) -> AsyncIterator[bytes]:
    """Bytes [start, end) of the file as they land. Ends short when the download ends
    without them or the part stops growing for STALL_S."""
    fd = await anyio.to_thread.run_sync(growing.open)
    if fd is None:
        return  # removed in between: the follower resumes elsewhere
    try:
        at, grew, ended = start, time.monotonic(), False
        while at < end:
            chunk = await anyio.to_thread.run_sync(os.pread, fd, min(_CHUNK_BYTES, end - at), at)
            if chunk:
                yield chunk
                at, grew = at + len(chunk), time.monotonic()
                continue
            # At the end of what has arrived.
            if ended:  # and the download had ended before this last look
                _ended_short(growing.path, at, end, "its download ended")
                return
            if time.monotonic() - grew > STALL_S:
                _ended_short(growing.path, at, end, f"no new bytes for {STALL_S:.0f} s")
                return
            ended = not await anyio.to_thread.run_sync(growing.downloading)
            if not ended:
                await anyio.sleep(_POLL_S)
    finally:
        os.close(fd)


def _ended_short(path: Path, at: int, end: int, why: str) -> None:
    logger.info(f"serving {path.name} to a peer: stopped at {at} of {end} bytes ({why})")
