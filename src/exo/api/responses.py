"""Responses that watch the client: a disconnect cancels the work behind them.

`EventStreamResponse` sends its headers lazily, with the first thing written: an ApiError
raised before that is an ordinary JSON error response with its status; one raised after is
an SSE `data: {"error": ...}` event, and the stream closes.
"""

from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

import anyio
from loguru import logger
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from exo.api.errors import ApiError
from exo.api.translate import sse_comment, sse_data

T = TypeVar("T")

_SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),  # nginx and friends: do not buffer the stream
]


class ClientGone(Exception):
    """A write to the client failed: it went away."""


class Outcome(Generic[T]):
    def __init__(self) -> None:
        self.value: T | None = None
        self.error: ApiError | None = None
        self.disconnected = False


async def run_watching_client(receive: Receive, work: Callable[[], Awaitable[T]]) -> Outcome[T]:
    """Run `work` until it ends or the client disconnects (then it is cancelled)."""
    outcome = Outcome[T]()
    async with anyio.create_task_group() as tg:

        async def watch() -> None:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    outcome.disconnected = True
                    tg.cancel_scope.cancel()
                    return

        tg.start_soon(watch)
        try:
            outcome.value = await work()
        except ApiError as e:
            outcome.error = e
        except ClientGone:
            outcome.disconnected = True
        except Exception as e:
            logger.opt(exception=e).error("API request failed")
            outcome.error = ApiError(500, f"Internal error: {e!r}", code="internal_error")
        finally:
            tg.cancel_scope.cancel()
    return outcome


class SSEChannel:
    """What a producer writes to; the 200 and the SSE headers go out with the first write."""

    def __init__(self, send: Send) -> None:
        self._send = send
        self.started = False

    async def start(self) -> None:
        if not self.started:
            self.started = True
            await self._write_message(
                {"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS}
            )

    async def write(self, chunk: bytes) -> None:
        await self.start()
        await self._write_message({"type": "http.response.body", "body": chunk, "more_body": True})

    async def comment(self, text: str) -> None:
        await self.write(sse_comment(text))

    async def data(self, payload: str, event_id: int | None = None) -> None:
        await self.write(sse_data(payload, event_id))

    async def close(self) -> None:
        await self.start()
        await self._write_message({"type": "http.response.body", "body": b"", "more_body": False})

    async def _write_message(self, message: dict[str, object]) -> None:
        try:
            await self._send(message)
        except OSError as e:
            raise ClientGone from e


class EventStreamResponse(Response):
    media_type = "text/event-stream"

    def __init__(self, produce: Callable[[SSEChannel], Awaitable[None]]) -> None:
        super().__init__(status_code=200, media_type=self.media_type)
        self._produce = produce

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        channel = SSEChannel(send)
        outcome = await run_watching_client(receive, lambda: self._produce(channel))
        if outcome.disconnected:
            return
        try:
            if outcome.error is not None:
                if not channel.started:
                    await outcome.error.response()(scope, receive, send)
                    return
                await channel.data(outcome.error.body().model_dump_json())
            await channel.close()
        except ClientGone:
            pass


class WatchedResponse(Response):
    """A response computed while the client is watched: a disconnect cancels the computation."""

    def __init__(self, compute: Callable[[], Awaitable[Response]]) -> None:
        super().__init__(status_code=200)
        self._compute = compute

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        outcome = await run_watching_client(receive, self._compute)
        if outcome.disconnected:
            return
        response = outcome.error.response() if outcome.error is not None else outcome.value
        if response is not None:
            await response(scope, receive, send)
