"""Link profiling over a real loopback TCP connection (two ends of one socket pair)."""

import anyio
import pytest
from anyio.abc import SocketStream
from anyio.streams.memory import MemoryObjectReceiveStream

from exo.shared.types.telemetry import LinkProfile
from exo.worker.telemetry.links import LinkProbeError, measure_link, serve_link_probe


async def _measure_over_loopback(bulk_bytes: int) -> tuple[LinkProfile, int]:
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    served: list[int] = []
    done = anyio.Event()

    async def serve_one(stream: SocketStream) -> None:
        async with stream:
            served.append(await serve_link_probe(stream, stream))
        done.set()

    profile: LinkProfile | None = None
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, serve_one)
        async with await anyio.connect_tcp("127.0.0.1", port) as client:
            profile = await measure_link(client, client, pings=10, bulk_bytes=bulk_bytes)
        with anyio.fail_after(5):
            await done.wait()
        tg.cancel_scope.cancel()
    assert profile is not None
    return profile, served[0]


def test_loopback_link_numbers_are_plausible() -> None:
    profile, served = anyio.run(_measure_over_loopback, 8 << 20)
    assert served == 8 << 20
    assert profile.ping_samples == 10 and profile.bulk_bytes == 8 << 20
    # Loopback on a shared 2-core box: well under 50 ms, and at least 50 MB/s.
    assert 0.0 < profile.rtt_min_ms <= profile.rtt_ms < 50.0
    assert profile.bandwidth_bytes_per_s > 50e6
    print(
        f"loopback: rtt {profile.rtt_ms:.3f} ms (min {profile.rtt_min_ms:.3f}), "
        f"{profile.bandwidth_bytes_per_s / 1e9:.2f} GB/s"
    )


def test_rtt_only_probe() -> None:
    profile, served = anyio.run(_measure_over_loopback, 0)
    assert served == 0 and profile.bandwidth_bytes_per_s == 0.0


def test_garbage_from_the_peer_is_an_error() -> None:
    async def scenario() -> None:
        send, receive = anyio.create_memory_object_stream[bytes](10)
        await send.send(b"Xgarbage")
        with pytest.raises(LinkProbeError):
            await serve_link_probe(_NullSend(), _MemoryReceive(receive))

    anyio.run(scenario)


class _NullSend(anyio.abc.ByteSendStream):
    async def send(self, item: bytes) -> None:
        pass

    async def send_eof(self) -> None:
        pass

    async def aclose(self) -> None:
        pass


class _MemoryReceive(anyio.abc.ByteReceiveStream):
    def __init__(self, inner: MemoryObjectReceiveStream[bytes]) -> None:
        self._inner = inner

    async def receive(self, max_bytes: int = 65536) -> bytes:
        return await self._inner.receive()

    async def aclose(self) -> None:
        await self._inner.aclose()
