"""Hypercorn behind a typed function: the node owns the server's lifetime."""

from collections.abc import Awaitable, Callable
from typing import Any, cast

import hypercorn.asyncio
from fastapi import FastAPI
from hypercorn.config import Config

_Serve = Callable[..., Awaitable[None]]


async def serve_http(
    app: FastAPI, host: str, port: int, shutdown: Callable[[], Awaitable[Any]]
) -> None:
    """Serve until `shutdown` returns; no signal handlers of its own."""
    config = Config()
    config.bind = [f"{host}:{port}"]
    config.accesslog = None
    config.errorlog = None
    config.graceful_timeout = 2.0
    serve = cast(_Serve, hypercorn.asyncio.serve)  # pyright: ignore[reportUnknownMemberType]
    await serve(app, config, shutdown_trigger=shutdown)
