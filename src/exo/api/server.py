"""Hypercorn behind a typed function: the node owns the server's lifetime."""

import socket
from collections.abc import Awaitable, Callable
from typing import Any, cast

import hypercorn.asyncio
from fastapi import FastAPI
from hypercorn.config import Config

_Serve = Callable[..., Awaitable[None]]


async def serve_http(
    app: FastAPI, sock: socket.socket, shutdown: Callable[[], Awaitable[Any]]
) -> None:
    """Serve on `sock` (a listening socket, the server's from now on) until `shutdown`
    returns; no signal handlers of its own."""
    config = Config()
    config.bind = [f"fd://{sock.detach()}"]
    config.accesslog = None
    config.errorlog = None
    config.graceful_timeout = 2.0
    serve = cast(_Serve, hypercorn.asyncio.serve)  # pyright: ignore[reportUnknownMemberType]
    await serve(app, config, shutdown_trigger=shutdown)
