"""Listening sockets a node needs (its API, its mesh), with one clear error when it cannot,
and serving them in a way that is safe to cancel."""

import errno
import os
import socket
from collections.abc import Awaitable, Callable

import anyio
from anyio.abc import SocketAttribute, SocketListener, SocketStream, TaskGroup
from anyio.streams.stapled import MultiListener
from loguru import logger

_HINTS = {
    errno.EADDRINUSE: "another program holds it (another exo on this machine?): stop it or "
    "choose another port",
    errno.EACCES: "ports below 1024 need privileges: choose a port above 1023",
    errno.EADDRNOTAVAIL: "that address is not one of this machine's",
}


class ListenError(Exception):
    """A node could not listen where it was told to: an operator's mistake, in one line."""


def listen_error(what: str, host: str, port: int, exc: OSError) -> ListenError:
    hint = _HINTS.get(exc.errno or 0)
    reason = os.strerror(exc.errno) if exc.errno else str(exc)
    return ListenError(
        f"cannot listen on {host}:{port} for {what}: {reason}" + (f"; {hint}" if hint else "")
    )


def listen_tcp(what: str, host: str, port: int) -> socket.socket:
    """A TCP socket bound and listening on host:port (address reuse on, as servers do)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, backlog=1024)
    except OSError as exc:
        raise listen_error(what, host, port, exc) from None


async def serve_connections(
    listener: MultiListener[SocketStream] | SocketListener,
    handle: Callable[[SocketStream], Awaitable[None]],
) -> None:
    """`listener.serve(handle)` (each connection in its own task, until cancelled), safe to
    cancel at any moment.

    anyio's `accept` awaits `loop.sock_accept`. On CPython 3.11, when that is cancelled in the
    loop turn its socket became readable, the loop's already queued callback accepts anyway
    and sets a result on the cancelled future: an `InvalidStateError` in the loop's exception
    handler, and an accepted connection nobody closes. Waiting for readability, then accepting
    without blocking, leaves no such window. The listener stays the caller's to close."""
    listeners = listener.listeners if isinstance(listener, MultiListener) else [listener]
    async with anyio.create_task_group() as tg:
        for one in listeners:
            assert isinstance(one, SocketListener)
            tg.start_soon(_accept_forever, one.extra(SocketAttribute.raw_socket), handle, tg)


async def _accept_forever(
    sock: socket.socket, handle: Callable[[SocketStream], Awaitable[None]], tg: TaskGroup
) -> None:
    while True:
        await anyio.wait_readable(sock)
        try:
            conn, _ = sock.accept()
        except (BlockingIOError, InterruptedError):
            continue  # another accept took it, or the peer gave up
        except OSError as exc:  # out of descriptors, or the like: not this listener's end
            logger.warning(f"accepting a connection failed: {exc}; retrying in 0.1 s")
            await anyio.sleep(0.1)
            continue
        tg.start_soon(_handle_one, conn, handle)


async def _handle_one(
    conn: socket.socket, handle: Callable[[SocketStream], Awaitable[None]]
) -> None:
    try:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        stream = await SocketStream.from_socket(conn)
    except BaseException:
        conn.close()
        raise
    await handle(stream)
