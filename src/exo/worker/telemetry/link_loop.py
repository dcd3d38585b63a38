"""Link profiles between this node and each peer, as `LinkProfileMeasured` events.

Every node serves link probes on a port of its own (told to peers in the cluster hello
over the authenticated mesh). It measures its link to each peer when the peer connects
and then every `interval_s` (10 minutes by default): 10 pings and 4 MiB one way
(`links.measure_link`). An event is emitted for the first measurement of a peer and then
only when RTT or bandwidth moved by more than `change_ratio`, so a quiet cluster writes
few link events. The probe server answers at most `max_probes` measurements at a time,
each bounded in time and size; a bad probe closes only its own connection.
"""

import time
from collections.abc import Callable, Mapping

import anyio
from anyio.abc import SocketStream, TaskStatus
from loguru import logger

from exo.shared.listen import serve_connections
from exo.shared.types.events import LinkProfileMeasured
from exo.shared.types.ids import NodeId
from exo.shared.types.telemetry import LinkProfile
from exo.shared.views import EventSink
from exo.worker.telemetry.links import LinkProbeError, measure_link, serve_link_probe

# Peers this node can probe now: node id -> (host, probe port).
ProbeTargets = Callable[[], Mapping[NodeId, tuple[str, int]]]


def changed(old: LinkProfile | None, new: LinkProfile, ratio: float) -> bool:
    """Worth an event: the first measurement, or RTT/bandwidth moved by more than `ratio`."""
    if old is None:
        return True

    def moved(a: float, b: float, floor: float) -> bool:
        return abs(a - b) > ratio * max(abs(a), floor)

    return moved(old.rtt_ms, new.rtt_ms, 0.25) or moved(
        old.bandwidth_bytes_per_s, new.bandwidth_bytes_per_s, 1e6
    )


class LinkProber:
    def __init__(
        self,
        *,
        node_id: NodeId,
        sink: EventSink,
        targets: ProbeTargets,
        host: str | None,
        interval_s: float = 600.0,
        bulk_bytes: int = 4 << 20,
        change_ratio: float = 0.2,
        timeout_s: float = 20.0,
        max_probes: int = 4,
    ) -> None:
        self._node_id = node_id
        self._sink = sink
        self._targets = targets
        self._host = host
        self._interval_s = interval_s
        self._bulk_bytes = bulk_bytes
        self._change_ratio = change_ratio
        self._timeout_s = timeout_s
        self._serving = anyio.Semaphore(max_probes)
        self._measured: dict[NodeId, tuple[float, tuple[str, int]]] = {}
        self._reported: dict[NodeId, LinkProfile] = {}

    async def serve(self, *, task_status: TaskStatus[int] = anyio.TASK_STATUS_IGNORED) -> None:
        """Answer peers' probes; `started(port)` once listening."""
        listener = await anyio.create_tcp_listener(local_host=self._host, local_port=0)
        port = int(listener.extra(anyio.abc.SocketAttribute.local_port))
        task_status.started(port)
        async with listener:
            await serve_connections(listener, self._answer)

    async def _answer(self, stream: SocketStream) -> None:
        async with stream:
            if self._serving.value == 0:
                return  # busy: the prober retries on its next round
            async with self._serving:
                try:
                    with anyio.fail_after(self._timeout_s):
                        await serve_link_probe(stream, stream)
                except (LinkProbeError, TimeoutError, OSError, anyio.EndOfStream) as exc:
                    logger.debug(f"link probe from a peer ended: {exc!r}")
                except anyio.IncompleteRead:
                    logger.debug("link probe from a peer ended mid-frame")

    async def run(self) -> None:
        """Measure each peer on connect and every `interval_s`."""
        while True:
            now = time.monotonic()
            for peer, address in sorted(self._targets().items()):
                last = self._measured.get(peer)
                if last is None or last[1] != address or now - last[0] >= self._interval_s:
                    self._measured[peer] = (now, address)
                    await self._probe(peer, address)
            await anyio.sleep(1.0)

    async def _probe(self, peer: NodeId, address: tuple[str, int]) -> None:
        host, port = address
        try:
            with anyio.fail_after(self._timeout_s):
                async with await anyio.connect_tcp(host, port) as stream:
                    profile = await measure_link(stream, stream, bulk_bytes=self._bulk_bytes)
        except (
            LinkProbeError,
            TimeoutError,
            OSError,
            anyio.EndOfStream,
            anyio.IncompleteRead,
        ) as exc:
            logger.info(f"link to {peer} at {host}:{port} not measured: {exc!r}")
            return
        logger.debug(
            f"link {self._node_id} -> {peer}: rtt {profile.rtt_ms:.2f} ms, "
            f"{profile.bandwidth_bytes_per_s / 1e6:.0f} MB/s"
        )
        if changed(self._reported.get(peer), profile, self._change_ratio):
            self._reported[peer] = profile
            await self._sink.emit(
                LinkProfileMeasured(source=self._node_id, target=peer, profile=profile)
            )
