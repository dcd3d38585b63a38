"""The consensus core wired to this node's disk, the mesh and its own components.

`ClusterService` owns the `ConsensusNode` (pure, `exo.routing.consensus`) and drives it:
ticks every `tick_ms`, packets from the mesh, local events from the worker and telemetry,
commands from the API. After each batch of inputs it drains a `Ready`, makes its
records durable (`ClusterStore.persist`, in a worker thread), then sends its messages,
then publishes the committed entries. What the rest of the node reads (`state`,
`subscribe`, `wait_for`) is only ever committed *and* durable on this node.

Joining: a node that has never been in a cluster asks its peers to let it join; if after
`bootstrap_wait_s` no peer has a cluster and it has the smallest id among the peers it
reaches (or reaches none), it founds one. Peers tell each other their cluster and their
peers' addresses on connect (`cluster.hello`), so one `--peer` is enough to find all.
"""

import functools
import math
import random
import time
import uuid
from collections.abc import AsyncGenerator, Callable
from contextlib import asynccontextmanager

import anyio
from anyio.abc import TaskStatus
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from loguru import logger
from pydantic import Field, ValidationError

from exo.cluster.store import ClusterStore
from exo.routing import topics
from exo.routing.consensus import ConsensusConfig, ConsensusNode, Decider, Packet, Ready
from exo.routing.consensus.messages import Snapshot
from exo.routing.mesh import Mesh, MeshError, PeerUnavailable, TopicMessage, WireMessage
from exo.routing.router import Router
from exo.shared.schema_fingerprint import fingerprint
from exo.shared.types.base import Frozen
from exo.shared.types.cluster import ClusterStatus
from exo.shared.types.commands import CommandEnvelope, CommandReply
from exo.shared.types.events import Event, EventOrigin, IndexedEvent, LocalEvent
from exo.shared.types.ids import CommandId, NodeId
from exo.shared.types.state import State

# A live subscriber this far behind is cut off; it resumes from the log (no silent drop).
_SUBSCRIBER_BUFFER = 10_000
HELLO_TOPIC = "cluster.hello"
TOKENS_TOPIC = "tokens"


class PeerAddress(Frozen):
    node_id: NodeId
    host: str = Field(min_length=1, max_length=255)
    port: int = Field(gt=0, lt=65536)


class ClusterHello(Frozen):
    """Sent to each peer on connect and whenever this node's cluster changes."""

    cluster: str | None
    master: NodeId | None
    peers: tuple[PeerAddress, ...] = Field(max_length=1024)
    # Where this node answers link probes (telemetry), if it does.
    probe_port: int | None = Field(default=None, gt=0, lt=65536)


@functools.cache
def wire_schema_fingerprint() -> str:
    """What a peer parses from this node: the mesh's frames (consensus packets carry the
    events and commands), the snapshot inside `InstallSnapshot`, and the topics' payloads.
    Nodes of a cluster must agree on it (`MeshConfig.schema_fingerprint`)."""
    return fingerprint(WireMessage, Snapshot, ClusterHello, topics.AddressedStream)


class StorageFailed(RuntimeError):
    """The replicated log could not be written: this node stops rather than diverge."""


class ClusterService:
    def __init__(
        self,
        *,
        node_id: NodeId,
        session: str,
        store: ClusterStore,
        mesh: Mesh,
        router: Router,
        decide: Decider,
        config: ConsensusConfig | None = None,
        bootstrap_wait_s: float = 2.0,
        rng: random.Random | None = None,
    ) -> None:
        self.node_id = node_id
        self.origin: EventOrigin = f"{node_id}/{session}"
        self._store = store
        self._mesh = mesh
        self._router = router
        self._cfg = config or ConsensusConfig()
        self._bootstrap_wait_s = bootstrap_wait_s
        self._core = ConsensusNode(
            node_id,
            origin=self.origin,
            rng=rng or random.Random(),
            decide=decide,
            config=self._cfg,
            restored=store.restored(),
        )
        self._state = self._core.state
        self._changed = anyio.Event()
        self._kick = anyio.Event()
        self._subscribers: list[MemoryObjectSendStream[IndexedEvent]] = []
        self._waiters: dict[CommandId, MemoryObjectSendStream[CommandReply]] = {}
        self._next_seq = self._state.origin_seqs.get(self.origin, -1) + 1
        self._peer_clusters: dict[NodeId, str | None] = {}
        self._peer_probe_ports: dict[NodeId, int] = {}
        self.probe_port: int | None = None  # set by the node before `run`
        self._hello_sent: dict[NodeId, int] = {}  # peer -> connection id greeted
        self._last_hello_cluster: str | None = self._core.cluster
        self._started = time.monotonic()

    # ------------------------------------------------------------------ the view

    @property
    def state(self) -> State:
        """The committed state, durable on this node."""
        return self._state

    @property
    def last_index(self) -> int:
        return self._state.last_index

    @property
    def is_master(self) -> bool:
        return self._core.is_master

    def status(self) -> ClusterStatus:
        core = self._core
        return ClusterStatus(
            node_id=self.node_id,
            cluster=core.cluster,
            role=core.role,
            term=core.term,
            master=core.master,
            commit=core.commit,
            log_last_index=core.last_index,
            voters=dict(core.members.voters),
            connected={
                peer: (None if info.rtt_s is None else info.rtt_s * 1000)
                for peer, info in sorted(self._mesh.peers().items())
            },
            refused=self._mesh.refused(),
        )

    async def wait_for(self, predicate: Callable[[State], bool], timeout_s: float) -> State:
        with anyio.fail_after(timeout_s):
            while not predicate(self._state):
                await self._changed.wait()
        return self._state

    async def wait_changed(self) -> State:
        await self._changed.wait()
        return self._state

    def read_range(self, start: int, end: int) -> list[IndexedEvent]:
        """Committed entries in [start, end); compacted ones are not returned."""
        return self._store.read_range(start, min(end, self._state.last_index + 1))

    @asynccontextmanager
    async def subscribe(
        self, from_index: int
    ) -> AsyncGenerator[MemoryObjectReceiveStream[IndexedEvent]]:
        """Committed entries from `from_index`, then live ones, with no gap between the
        two. The stream ends if this node's log is replaced by a snapshot (resubscribe)."""
        send, receive = anyio.create_memory_object_stream[IndexedEvent](math.inf)
        # No await between reading the backlog and joining the live list: nothing can be
        # published in between (publishing happens on this event loop).
        for event in self.read_range(from_index, self._state.last_index + 1):
            send.send_nowait(event)
        self._subscribers.append(send)
        try:
            with receive:
                yield receive
        finally:
            if send in self._subscribers:
                self._subscribers.remove(send)
            send.close()

    # ------------------------------------------------------------------ producers

    async def emit(self, event: Event) -> int:
        """Hand a local event to the master (re-sent until indexed); returns its seq."""
        seq = self._next_seq
        self._next_seq += 1
        self._core.submit_local_events(
            [LocalEvent(origin=self.origin, origin_seq=seq, event=event)]
        )
        self._poke()
        return seq

    async def wait_indexed(self, origin_seq: int, timeout_s: float) -> None:
        await self.wait_for(lambda s: s.origin_seqs.get(self.origin, -1) >= origin_seq, timeout_s)

    async def send_command(self, envelope: CommandEnvelope, timeout_s: float) -> CommandReply:
        """Forward to the master; its accept or reject once the outcome is committed.

        With no master (an election) the command waits; the core rejects it after its
        own bound (`command_timeout_ticks`). `timeout_s` only guards against a bug."""
        send, receive = anyio.create_memory_object_stream[CommandReply](1)
        self._waiters[envelope.command_id] = send
        try:
            self._core.submit_command(envelope)
            self._poke()
            with receive, anyio.fail_after(timeout_s):
                return await receive.receive()
        finally:
            self._waiters.pop(envelope.command_id, None)
            send.close()

    def leave(self) -> None:
        """Ask to be removed from the voters (graceful shutdown of a member)."""
        self._core.leave()
        self._poke()

    # ------------------------------------------------------------------ running

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        logger.info(
            f"cluster: node {self.node_id} "
            + (
                f"restored (cluster {self._core.cluster}, term {self._core.term}, "
                f"log at {self._core.last_index}, commit {self._core.commit})"
                if self._core.cluster is not None
                else "has never been in a cluster; looking for one"
            )
        )
        # A restored node re-applies its committed entries: publish that state at once.
        self._drain_restored()
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._ticker)
            tg.start_soon(self._receive)
            tg.start_soon(self._forward_tokens)
            task_status.started()
            await self._drive()

    def _drain_restored(self) -> None:
        # Restoring re-applies the entries up to the persisted commit inside the core:
        # they are on disk already; what it asks to write (a checkpoint) is written now.
        ready = self._core.ready()
        self._store.persist(ready)
        self._state = self._core.state

    def _poke(self) -> None:
        self._kick.set()

    async def _ticker(self) -> None:
        period = self._cfg.tick_ms / 1000
        while True:
            await anyio.sleep(period)
            self._sync_peers()
            self._maybe_bootstrap()
            self._core.tick()
            self._poke()

    async def _drive(self) -> None:
        while True:
            await self._kick.wait()
            self._kick = anyio.Event()
            ready = self._core.ready()
            state = self._core.state  # exactly the state after `ready.committed`
            if ready.is_empty() and ready.snapshot is None:
                continue
            try:
                await anyio.to_thread.run_sync(self._store.persist, ready)
            except Exception as exc:
                logger.error(f"cluster: the replicated log could not be written: {exc}")
                raise StorageFailed(f"the replicated log could not be written: {exc}") from exc
            for packet in ready.messages:
                self._send_packet(packet)
            self._publish(ready, state)
            for reply in ready.replies:
                self._answer(reply)
            if self._core.cluster != self._last_hello_cluster:
                self._last_hello_cluster = self._core.cluster
                self._hello_sent.clear()  # tell every peer about the new cluster

    def _send_packet(self, packet: Packet) -> None:
        try:
            if not self._mesh.try_send(packet.to, packet):
                logger.debug(f"cluster: queue to {packet.to} full; the core re-sends")
        except PeerUnavailable:
            pass  # not connected (yet): the core re-sends on its own schedule
        except MeshError as exc:
            logger.error(f"cluster: cannot send {packet.message.kind} to {packet.to}: {exc}")

    def _publish(self, ready: Ready, state: State) -> None:
        if ready.snapshot is not None and ready.snapshot_resets_log:
            # The whole log was replaced: subscribers cannot continue gap-free.
            logger.info(f"cluster: caught up from a snapshot at index {ready.snapshot.index}")
            for send in self._subscribers:
                send.close()
            self._subscribers.clear()
        for entry in ready.committed:
            for send in list(self._subscribers):
                if send.statistics().current_buffer_used >= _SUBSCRIBER_BUFFER:
                    logger.warning("event subscriber fell too far behind; disconnecting it")
                    self._subscribers.remove(send)
                    send.close()
                    continue
                try:
                    send.send_nowait(entry)
                except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                    self._subscribers.remove(send)
        if state is not self._state:
            self._state = state
            self._changed.set()
            self._changed = anyio.Event()

    def _answer(self, reply: CommandReply) -> None:
        waiter = self._waiters.get(reply.command_id)
        if waiter is None:
            return
        try:
            waiter.send_nowait(reply)
        except (anyio.WouldBlock, anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass  # a duplicate reply, or the caller gave up

    # ------------------------------------------------------------------ peers

    def _sync_peers(self) -> None:
        peers = self._mesh.peers()
        self._core.set_peers(peers)
        for peer_id in list(self._peer_clusters):
            if peer_id not in peers:
                del self._peer_clusters[peer_id]
        for peer_id, info in peers.items():
            if self._hello_sent.get(peer_id) != info.connection:
                self._hello_sent[peer_id] = info.connection
                self._send_hello(peer_id)

    def _send_hello(self, to: NodeId) -> None:
        known = tuple(
            PeerAddress(node_id=peer_id, host=info.remote[0], port=info.listen_port)
            for peer_id, info in sorted(self._mesh.peers().items())
            if peer_id != to and info.listen_port > 0
        )
        hello = ClusterHello(
            cluster=self._core.cluster,
            master=self._core.master,
            peers=known,
            probe_port=self.probe_port,
        )
        try:
            self._mesh.try_send(
                to, TopicMessage(topic=HELLO_TOPIC, payload=hello.model_dump_json())
            )
        except MeshError:
            pass

    def _on_hello(self, sender: NodeId, hello: ClusterHello) -> None:
        self._peer_clusters[sender] = hello.cluster
        if hello.probe_port is not None:
            self._peer_probe_ports[sender] = hello.probe_port
        connected = self._mesh.peers()
        for peer in hello.peers:
            if peer.node_id != self.node_id and peer.node_id not in connected:
                self._mesh.add_peer(peer.host, peer.port)

    def probe_targets(self) -> dict[NodeId, tuple[str, int]]:
        """Connected peers that answer link probes: node id -> (host, port)."""
        return {
            peer: (info.remote[0], self._peer_probe_ports[peer])
            for peer, info in self._mesh.peers().items()
            if peer in self._peer_probe_ports
        }

    def _maybe_bootstrap(self) -> None:
        if self._core.cluster is not None:
            return
        if time.monotonic() - self._started < self._bootstrap_wait_s:
            return
        connected = set(self._mesh.peers())
        if any(self._peer_clusters.get(p) is not None for p in connected):
            return  # a peer has a cluster: its master lets us in
        if any(p < self.node_id for p in connected):
            return  # the smallest id founds it; we join
        cluster = uuid.uuid4().hex
        logger.info(
            f"cluster: founding cluster {cluster}"
            + (f" (peers without a cluster: {sorted(connected)})" if connected else " (alone)")
        )
        self._core.bootstrap(cluster)
        self._poke()

    # ------------------------------------------------------------------ the mesh

    async def _receive(self) -> None:
        async for item in self._mesh.incoming():
            message = item.message
            if isinstance(message, Packet):
                self._core.receive(message)
                self._poke()
            else:
                await self._on_topic(item.sender, message)

    async def _on_topic(self, sender: NodeId, message: TopicMessage) -> None:
        try:
            if message.topic == HELLO_TOPIC:
                self._on_hello(sender, ClusterHello.model_validate_json(message.payload))
            elif message.topic == TOKENS_TOPIC:
                addressed = topics.AddressedStream.model_validate_json(message.payload)
                if addressed.to == self.node_id:
                    await self._router.publish(topics.TOKENS, addressed)
            else:
                logger.warning(f"mesh: unknown topic {message.topic!r} from {sender}; ignored")
        except ValidationError as exc:
            logger.warning(f"mesh: malformed {message.topic!r} message from {sender}: {exc}")

    async def _forward_tokens(self) -> None:
        """Tokens addressed to another node (its client's request) travel over the mesh."""
        with self._router.subscribe(topics.TOKENS) as tokens:
            async for addressed in tokens:
                if addressed.to == self.node_id:
                    continue
                message = TopicMessage(topic=TOKENS_TOPIC, payload=addressed.model_dump_json())
                try:
                    await self._mesh.send(addressed.to, message)
                except MeshError as exc:
                    # The owner's node is gone or unreachable: nobody waits for these tokens.
                    logger.debug(f"tokens for {addressed.to} dropped: {exc}")
