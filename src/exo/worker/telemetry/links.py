"""Measure a link between two nodes over any async byte stream: RTT and bulk bandwidth.

The measuring side runs `measure_link`; the other side runs `serve_link_probe` on the same
connection. Frames are a 1-byte type, a 4-byte big-endian length and the payload:

    P <8 bytes>   ping; answered by  p <same 8 bytes>
    B <bytes>     bulk data, counted
    E             end of bulk; answered by  e <8-byte count received>
    Q             done; the server returns

Bandwidth is the bulk bytes over the time from the first bulk byte sent to the count coming
back, less the minimum RTT (the count's trip back and the last byte's trip out). Cost per
measurement: `pings` round trips plus `bulk_bytes` (4 MiB by default) one way.
"""

import statistics
import struct
import time
from collections.abc import Callable

from anyio.abc import ByteReceiveStream, ByteSendStream
from anyio.streams.buffered import BufferedByteReceiveStream

from exo.shared.types.telemetry import LinkProfile

_HEADER = struct.Struct(">cI")
_COUNT = struct.Struct(">Q")
_PING, _PONG, _BULK, _END, _ENDED, _QUIT = b"P", b"p", b"B", b"E", b"e", b"Q"


class LinkProbeError(Exception):
    pass


async def _send(stream: ByteSendStream, kind: bytes, payload: bytes = b"") -> None:
    await stream.send(_HEADER.pack(kind, len(payload)) + payload)


_KINDS = frozenset({_PING, _PONG, _BULK, _END, _ENDED, _QUIT})
_MAX_FRAME = 1 << 24


async def _receive(stream: BufferedByteReceiveStream) -> tuple[bytes, bytes]:
    kind, length = _HEADER.unpack(await stream.receive_exactly(_HEADER.size))
    if kind not in _KINDS or length > _MAX_FRAME:
        raise LinkProbeError(f"not a link probe frame: {kind!r}, {length} bytes")
    payload = await stream.receive_exactly(length) if length else b""
    return kind, payload


async def serve_link_probe(send: ByteSendStream, receive: ByteReceiveStream) -> int:
    """Answer one peer's measurement; returns the bulk bytes it sent."""
    reader = BufferedByteReceiveStream(receive)
    received = 0
    total = 0
    while True:
        kind, payload = await _receive(reader)
        if kind == _PING:
            await _send(send, _PONG, payload)
        elif kind == _BULK:
            received += len(payload)
        elif kind == _END:
            await _send(send, _ENDED, _COUNT.pack(received))
            total += received
            received = 0
        elif kind == _QUIT:
            return total
        else:
            raise LinkProbeError(f"unexpected frame {kind!r}")


async def measure_link(
    send: ByteSendStream,
    receive: ByteReceiveStream,
    *,
    pings: int = 10,
    bulk_bytes: int = 4 << 20,
    chunk_bytes: int = 64 << 10,
    clock: Callable[[], float] = time.perf_counter,
    wall_ms: Callable[[], int] = lambda: int(time.time() * 1000),
) -> LinkProfile:
    if pings < 1:
        raise ValueError("at least one ping")
    reader = BufferedByteReceiveStream(receive)
    rtts: list[float] = []
    for seq in range(pings):
        token = _COUNT.pack(seq)
        start = clock()
        await _send(send, _PING, token)
        kind, payload = await _receive(reader)
        if kind != _PONG or payload != token:
            raise LinkProbeError(f"bad ping answer {kind!r}")
        rtts.append(clock() - start)
    rtt_min = min(rtts)
    bandwidth = 0.0
    if bulk_bytes > 0:
        block = bytes(chunk_bytes)
        start = clock()
        sent = 0
        while sent < bulk_bytes:
            n = min(chunk_bytes, bulk_bytes - sent)
            await _send(send, _BULK, block[:n])
            sent += n
        await _send(send, _END)
        kind, payload = await _receive(reader)
        elapsed = clock() - start
        if kind != _ENDED or _COUNT.unpack(payload)[0] != sent:
            raise LinkProbeError("bulk transfer was not fully received")
        bandwidth = sent / max(elapsed - rtt_min, elapsed / 100, 1e-9)
    await _send(send, _QUIT)
    return LinkProfile(
        rtt_ms=statistics.median(rtts) * 1000.0,
        rtt_min_ms=rtt_min * 1000.0,
        bandwidth_bytes_per_s=bandwidth,
        ping_samples=pings,
        bulk_bytes=bulk_bytes,
        measured_at_ms=wall_ms(),
    )
