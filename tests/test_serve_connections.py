"""Serving a listener is safe to cancel in the very loop turn a connection arrives.

anyio's `listener.serve` loses that race on CPython 3.11: the loop's queued accept callback
sets a result on the cancelled `sock_accept` future (an `InvalidStateError` in the loop's
exception handler, which anyio's pytest plugin raises) and leaks the accepted socket. The
mesh and the link prober serve through `serve_connections`, so a node that stops while a
peer dials it stays quiet."""

import asyncio
import socket
from collections.abc import Callable, Coroutine, Generator
from contextlib import contextmanager
from typing import Any

import anyio
import pytest
from anyio.abc import SocketAttribute, SocketStream
from anyio.lowlevel import checkpoint
from anyio.streams.stapled import MultiListener

from exo.shared.listen import serve_connections

Serve = Callable[[MultiListener[SocketStream]], Coroutine[Any, Any, None]]


async def _close(stream: SocketStream) -> None:
    await stream.aclose()


@contextmanager
def _loop_errors() -> Generator[list[BaseException]]:
    """What reaches the running loop's exception handler meanwhile."""
    errors: list[BaseException] = []
    loop = asyncio.get_running_loop()
    previous = loop.get_exception_handler()

    def record(_loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        errors.append(context["exception"])

    loop.set_exception_handler(record)
    try:
        yield errors
    finally:
        loop.set_exception_handler(previous)


async def _cancel_as_a_connection_arrives(serve: Serve) -> list[BaseException]:
    """Serve, connect (on loopback the kernel completes it at once), yield exactly one loop
    turn, so the listener's readiness is queued behind this task, and cancel before the
    queued accept callback runs. Returns what reached the loop's exception handler."""
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    port = int(listener.extra(SocketAttribute.local_port))
    client: socket.socket | None = None
    with _loop_errors() as errors:
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(serve, listener)
                await anyio.sleep(0.05)  # the accept loop is waiting
                client = socket.create_connection(("127.0.0.1", port))
                await checkpoint()
                tg.cancel_scope.cancel()
            await anyio.sleep(0.05)  # a queued callback has run by now
        finally:
            if client is not None:
                client.close()
            await listener.aclose()
    return errors


@pytest.mark.anyio
async def test_anyios_serve_loses_the_race_this_guards_against() -> None:
    """The hazard is real on this runtime: once this fails, the workaround can go."""
    errors = await _cancel_as_a_connection_arrives(lambda listener: listener.serve(_close))
    assert [type(e).__name__ for e in errors] == ["InvalidStateError"]


@pytest.mark.anyio
async def test_serve_connections_survives_a_cancel_as_a_connection_arrives() -> None:
    errors = await _cancel_as_a_connection_arrives(
        lambda listener: serve_connections(listener, _close)
    )
    assert errors == []


@pytest.mark.anyio
async def test_serve_connections_hands_each_connection_to_the_handler() -> None:
    received: list[bytes] = []

    async def answer(stream: SocketStream) -> None:
        async with stream:
            received.append(await stream.receive())
            await stream.send(b"ok")

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    port = int(listener.extra(SocketAttribute.local_port))
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(serve_connections, listener, answer)
        for i in range(3):
            async with await anyio.connect_tcp("127.0.0.1", port) as client:
                await client.send(b"hello %d" % i)
                with anyio.fail_after(5):
                    assert await client.receive() == b"ok"
        tg.cancel_scope.cancel()
    assert received == [b"hello 0", b"hello 1", b"hello 2"]
