"""The mesh: one authenticated TCP connection per pair of nodes, typed frames, heartbeats.

`Mesh.run` owns a task group: the listener, one dialer per address it was told about
(`add_peer`, from `--peer` and discovery) and the tasks of each live connection (reader,
writer, heartbeat). Each peer has one bounded send queue that outlives reconnections;
incoming messages go to one bounded stream (`incoming()`). Backpressure runs end to end:
a slow consumer of `incoming()` stops the reader, TCP fills, the sender's writer stalls,
its queue fills, and `send` waits. Nothing is dropped silently: a message is lost only
with a connection that dies while it is in flight, and a peer that stays away longer than
`peer_gone_s` fails its queue with `PeerUnavailable` (logged with the count discarded).

Simultaneous dials are resolved in the handshake (see `_admit`), before any data flows:
the connection dialled by the node with the smaller id wins. See docs/mesh.md.
"""

import random
import secrets
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import anyio
from anyio.abc import SocketAttribute, SocketStream, TaskGroup, TaskStatus
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from loguru import logger
from pydantic import Field, ValidationError

from exo.routing.consensus.messages import Packet
from exo.routing.mesh.messages import (
    NAMESPACE_PATTERN,
    NODE_ID_PATTERN,
    WIRE,
    ConsensusPacket,
    Hello,
    MeshMessage,
    Ping,
    Pong,
    RejectReason,
    TopicMessage,
)
from exo.routing.mesh.wire import (
    FRAME_OVERHEAD,
    FrameReader,
    Handshake,
    HandshakeRejected,
    LocalIdentity,
    PeerClosed,
    ProtocolError,
    Session,
    derive_cluster_key,
    public_cluster_key,
)
from exo.shared.listen import listen_error, serve_connections
from exo.shared.types.base import Frozen
from exo.shared.types.ids import NodeId

DEFAULT_MESH_PORT = 52416


class MeshError(Exception):
    """Base of the errors `Mesh.send` raises."""


class PeerUnavailable(MeshError):
    """No connection to this peer, and none expected back (never connected, or away for
    longer than `peer_gone_s`). Queued messages for it were discarded (and logged)."""

    def __init__(self, peer_id: NodeId, reason: str) -> None:
        super().__init__(f"peer {peer_id} unavailable: {reason}")
        self.peer_id = peer_id
        self.reason = reason


class MessageTooLarge(MeshError):
    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"message of {size} bytes exceeds the mesh frame limit of {limit}")
        self.size = size
        self.limit = limit


class MeshConfig(Frozen):
    node_id: NodeId = Field(pattern=NODE_ID_PATTERN)
    namespace: str = Field(default="default", pattern=NAMESPACE_PATTERN)
    # Listen address; None listens on every interface (IPv4 and IPv6).
    host: str | None = None
    # 0 picks a free port (see `Mesh.port` once started).
    port: int = Field(default=DEFAULT_MESH_PORT, ge=0, lt=65536)
    secret: str | None = Field(default=None, repr=False)
    # The fingerprint (`exo.shared.schema_fingerprint`) of the messages this mesh's user
    # sends inside its frames: a peer with another one is refused in the handshake.
    schema_fingerprint: str = Field(default="", pattern=r"^[0-9a-f]{0,64}$")
    # Largest payload (JSON) of one frame; the receiver refuses a longer length prefix
    # before reading it. Must be the same on every node.
    max_frame_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)
    send_queue_size: int = Field(default=1024, ge=1)  # messages per peer
    receive_queue_size: int = Field(default=4096, ge=1)  # messages, all peers together
    connect_timeout_s: float = Field(default=5.0, gt=0)
    handshake_timeout_s: float = Field(default=5.0, gt=0)
    heartbeat_interval_s: float = Field(default=1.0, gt=0)
    # A connection on which nothing arrived for this long is closed (time spent waiting
    # for the local consumer of `incoming()` does not count).
    heartbeat_timeout_s: float = Field(default=5.0, gt=0)
    reconnect_initial_s: float = Field(default=0.2, gt=0)
    reconnect_max_s: float = Field(default=10.0, gt=0)
    # A peer away this long: its queue fails with PeerUnavailable (senders are told).
    peer_gone_s: float = Field(default=10.0, gt=0)


@dataclass(frozen=True)
class Incoming:
    sender: NodeId
    message: MeshMessage


@dataclass(frozen=True)
class PeerInfo:
    node_id: NodeId
    connection: int  # changes when the connection is replaced
    outbound: bool  # this node dialled it
    local: tuple[str, int]
    remote: tuple[str, int]
    listen_port: int  # the peer's advertised mesh port
    rtt_s: float | None  # smoothed round-trip time from heartbeats; None until measured
    connected_for_s: float


# ------------------------------------------------------------------ internals


class _SendQueue:
    """Per-peer FIFO: bounded data (put waits when full) plus a small control lane
    (heartbeats, served first, oldest dropped past 16)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.items: deque[bytes] = deque()
        self.control: deque[bytes] = deque(maxlen=16)
        self.error: MeshError | None = None
        self._readable = anyio.Event()
        self._writable = anyio.Event()

    async def put(self, item: bytes) -> None:
        while True:
            if self.error is not None:
                raise self.error
            if len(self.items) < self.capacity:
                self.items.append(item)
                self._readable.set()
                return
            if self._writable.is_set():
                self._writable = anyio.Event()
            await self._writable.wait()

    def try_put(self, item: bytes) -> bool:
        if self.error is not None:
            raise self.error
        if len(self.items) >= self.capacity:
            return False
        self.items.append(item)
        self._readable.set()
        return True

    def put_control(self, item: bytes) -> None:
        self.control.append(item)
        self._readable.set()

    def pop(self) -> bytes | None:
        if self.control:
            return self.control.popleft()
        if self.items:
            item = self.items.popleft()
            self._writable.set()
            return item
        return None

    async def wait_readable(self) -> None:
        if self.control or self.items:
            return
        if self._readable.is_set():
            self._readable = anyio.Event()
        await self._readable.wait()

    def fail(self, error: MeshError) -> int:
        self.error = error
        dropped = len(self.items)
        self.items.clear()
        self.control.clear()
        self._writable.set()
        return dropped


_Level = Literal["DEBUG", "INFO", "WARNING", "ERROR"]

_connection_ids = iter(range(1, 2**62))


@dataclass(eq=False)
class _Connection:
    peer_id: NodeId
    instance: str
    outbound: bool
    stream: SocketStream
    listen_port: int
    local: tuple[str, int]
    remote: tuple[str, int]
    id: int = field(default_factory=lambda: next(_connection_ids))
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    started: float = field(default_factory=time.monotonic)
    last_rx: float = field(default_factory=time.monotonic)
    delivering: bool = False
    rtt_s: float | None = None
    reason: str | None = None
    level: _Level = "INFO"

    def close(self, reason: str, level: _Level = "INFO") -> None:
        if self.reason is None:
            self.reason = reason
            self.level = level
        self.scope.cancel()


@dataclass(eq=False)
class _Peer:
    queue: _SendQueue
    conn: _Connection | None = None
    away_since: float | None = None
    changed: anyio.Event = field(default_factory=anyio.Event)


@dataclass(eq=False)
class _Pending:
    """An outgoing handshake that has learnt the peer's id and not yet finished."""

    cancelled: bool = False


_Outcome = Literal["connected", "duplicate", "self", "incompatible", "error"]


# How long a refusal stays in `Mesh.refused()` without happening again.
REFUSED_MEMORY_S = 60.0
# Refusals that say the two nodes cannot be one cluster as they are (not a port scanner,
# not a duplicate connection).
_INCOMPATIBLE: frozenset[RejectReason] = frozenset(
    {"version", "namespace", "schema", "auth_mismatch", "auth_failed", "id_conflict"}
)


def _where(address: tuple[str, int]) -> str:
    return f"{address[0]}:{address[1]}"


def _address(value: object) -> tuple[str, int]:
    """A socket address as (host, port); (repr, 0) for anything else."""
    if isinstance(value, tuple):
        parts: tuple[object, ...] = value  # pyright: ignore[reportUnknownVariableType]
        if len(parts) >= 2 and isinstance(parts[1], int):
            return str(parts[0]), parts[1]
        return repr(parts), 0
    return repr(value), 0


class Mesh:
    """Connections to the other nodes of the cluster. See the module docstring."""

    def __init__(
        self,
        config: MeshConfig,
        *,
        on_peer_change: Callable[[NodeId, bool], None] | None = None,
    ) -> None:
        self.config = config
        self.node_id = config.node_id
        self._instance = secrets.token_hex(8)
        if config.secret is not None:
            key, authenticated = derive_cluster_key(config.secret, config.namespace), True
        else:
            key, authenticated = public_cluster_key(config.namespace), False
        self._key = key
        self._authenticated = authenticated
        self._on_peer_change = on_peer_change
        self._port: int | None = None
        self._tg: TaskGroup | None = None
        self._peers: dict[NodeId, _Peer] = {}
        self._pending: dict[NodeId, set[_Pending]] = {}
        self._addresses: set[tuple[str, int]] = set()
        self._address_peer: dict[tuple[str, int], NodeId] = {}
        self._changed = anyio.Event()
        self._logged: dict[tuple[str, str], float] = {}
        # Who was refused as incompatible (an address: host:port dialled, host for a peer
        # that dialled us) -> (why, when), for `refused()`.
        self._refused: dict[str, tuple[str, float]] = {}
        send, receive = anyio.create_memory_object_stream[Incoming](config.receive_queue_size)
        self._incoming_send: MemoryObjectSendStream[Incoming] = send
        self._incoming_receive: MemoryObjectReceiveStream[Incoming] = receive

    # ------------------------------------------------------------------ public API

    @property
    def port(self) -> int:
        """The port the mesh listens on (after `run` has started)."""
        if self._port is None:
            raise RuntimeError("the mesh is not running yet")
        return self._port

    @property
    def _local(self) -> LocalIdentity:
        return LocalIdentity(
            node_id=self.node_id,
            namespace=self.config.namespace,
            instance=self._instance,
            listen_port=self._port or 0,
            schema_fingerprint=self.config.schema_fingerprint,
            key=self._key,
            authenticated=self._authenticated,
        )

    async def run(self, *, task_status: TaskStatus[int] = anyio.TASK_STATUS_IGNORED) -> None:
        """Listen and dial until cancelled; `task_status.started(port)` once listening."""
        try:
            listener = await anyio.create_tcp_listener(
                local_host=self.config.host, local_port=self.config.port
            )
        except OSError as exc:
            host = self.config.host or "*"
            raise listen_error("the mesh", host, self.config.port, exc) from None
        self._port = int(listener.listeners[0].extra(SocketAttribute.local_port))
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                tg.start_soon(serve_connections, listener, self._handle_incoming)
                tg.start_soon(self._watch_gone_peers)
                for address in sorted(self._addresses):
                    tg.start_soon(self._dial_loop, address)
                logger.info(
                    "mesh: node {} listening on port {} (namespace {!r}, {})",
                    self.node_id,
                    self._port,
                    self.config.namespace,
                    "cluster secret set" if self._authenticated else "no cluster secret",
                )
                task_status.started(self._port)
        finally:
            self._tg = None
            with anyio.CancelScope(shield=True):
                await listener.aclose()
            for peer_id, peer in self._peers.items():
                peer.queue.fail(PeerUnavailable(peer_id, "the mesh stopped"))
            self._incoming_send.close()

    def add_peer(self, host: str, port: int) -> None:
        """Keep a connection to the node at this address (dialled with backoff, forever).

        Idempotent. Several addresses of one node are fine: one connection results.
        """
        address = (host, port)
        if address in self._addresses:
            return
        self._addresses.add(address)
        if self._tg is not None:
            self._tg.start_soon(self._dial_loop, address)

    async def send(self, peer_id: NodeId, message: Packet | MeshMessage) -> None:
        """Queue a message for a peer, waiting while its queue is full.

        Raises `PeerUnavailable` for a peer that is not connected (and not just
        reconnecting), or whose queue fails while waiting; `MessageTooLarge`.
        """
        await self._queue_of(peer_id).put(self._encode(message))

    def try_send(self, peer_id: NodeId, message: Packet | MeshMessage) -> bool:
        """Queue without waiting; False (nothing queued) when the peer's queue is full."""
        return self._queue_of(peer_id).try_put(self._encode(message))

    def incoming(self) -> MemoryObjectReceiveStream[Incoming]:
        """The stream of messages from all peers (bounded; a slow reader applies
        backpressure to the senders). Ends when the mesh stops."""
        return self._incoming_receive

    def refused(self) -> dict[str, str]:
        """Nodes this one cannot connect to because they are incompatible (another build,
        protocol version, namespace or secret; a clash of node ids), refused within the
        last `REFUSED_MEMORY_S` by either side: address -> why. Dialling retries at least
        every `reconnect_max_s` (x1.5 jitter), so a lasting problem stays listed, and one
        that was mended drops out."""
        now = time.monotonic()
        return {
            who: why
            for who, (why, when) in sorted(self._refused.items())
            if now - when <= REFUSED_MEMORY_S
        }

    def _note_refusal(self, who: str, reason: RejectReason, detail: str) -> None:
        if reason not in _INCOMPATIBLE:
            return
        now = time.monotonic()
        # Forget the old ones here, so that many strangers cannot grow the table.
        self._refused = {
            k: (why, when)
            for k, (why, when) in self._refused.items()
            if now - when <= REFUSED_MEMORY_S
        }
        self._refused[who] = (f"{reason}: {detail}", now)

    def peers(self) -> dict[NodeId, PeerInfo]:
        """The peers connected now."""
        now = time.monotonic()
        return {
            peer_id: PeerInfo(
                node_id=peer_id,
                connection=conn.id,
                outbound=conn.outbound,
                local=conn.local,
                remote=conn.remote,
                listen_port=conn.listen_port,
                rtt_s=conn.rtt_s,
                connected_for_s=now - conn.started,
            )
            for peer_id, peer in self._peers.items()
            if (conn := peer.conn) is not None
        }

    async def wait_for(self, predicate: Callable[[dict[NodeId, PeerInfo]], bool]) -> None:
        """Wait until `predicate(self.peers())` holds (re-checked on every peer change and
        RTT update)."""
        while not predicate(self.peers()):
            if self._changed.is_set():
                self._changed = anyio.Event()
            await self._changed.wait()

    # ------------------------------------------------------------------ sending

    def _queue_of(self, peer_id: NodeId) -> _SendQueue:
        peer = self._peers.get(peer_id)
        if peer is None:
            raise PeerUnavailable(peer_id, "not connected")
        return peer.queue

    def _encode(self, message: Packet | MeshMessage) -> bytes:
        wire = ConsensusPacket(packet=message) if isinstance(message, Packet) else message
        payload = wire.model_dump_json().encode()
        if len(payload) > self.config.max_frame_bytes:
            raise MessageTooLarge(len(payload), self.config.max_frame_bytes)
        return payload

    # ------------------------------------------------------------------ bookkeeping

    def _notify(self) -> None:
        self._changed.set()

    def _log_limited(self, key: tuple[str, str], level: _Level, text: str) -> None:
        """One line per (remote host, reason) per minute: a misconfigured peer retrying
        forever does not flood the log."""
        now = time.monotonic()
        last = self._logged.get(key)
        if last is not None and now - last < 60.0:
            logger.debug(text)
            return
        if len(self._logged) > 1000:
            self._logged.clear()
        self._logged[key] = now
        logger.log(level, text)

    def _admit(self, hello: Hello, *, outbound: bool) -> tuple[RejectReason, str] | None:
        """Decide, synchronously, whether a handshaken connection may become this peer's
        connection. Both ends apply mirror rules, so they agree without another round:

        - responder: refuse while we have an outgoing handshake to the same peer (or an
          established connection we dialled) and our id is the smaller one; otherwise
          accept and replace whatever we had (the peer evidently considers it dead).
        - initiator (after the peer's Hello, before our proof): refuse if connected, or
          if another of our dials to that node is already past this point.
        """
        peer_id = hello.node_id
        if peer_id == self.node_id:
            if hello.instance == self._instance:
                return "self", "dialled its own listener"
            detail = (
                f"another process (instance {hello.instance}) uses this node's id {peer_id}: "
                "was the data directory copied? Each node needs its own"
            )
            self._log_limited(
                (hello.instance, "id_conflict"), "ERROR", f"mesh: node id conflict: {detail}"
            )
            return "id_conflict", detail
        existing = self._peers.get(peer_id)
        conn = existing.conn if existing is not None else None
        pending = any(not p.cancelled for p in self._pending.get(peer_id, ()))
        if outbound:
            if conn is not None:
                return "duplicate", "already connected"
            if pending:
                return "duplicate", "another dial to this node is under way"
            return None
        wins = self.node_id < peer_id  # our own dial would win the tie-break
        if wins and pending:
            return "duplicate", "simultaneous dial: the connection from the smaller node id wins"
        if wins and conn is not None and conn.outbound and conn.instance == hello.instance:
            return "duplicate", "already connected (the connection from the smaller node id wins)"
        return None

    def _attach(self, hello: Hello, stream: SocketStream, *, outbound: bool) -> _Connection:
        """Make a new connection the peer's connection (synchronously with `_admit`)."""
        conn = _Connection(
            peer_id=hello.node_id,
            instance=hello.instance,
            outbound=outbound,
            stream=stream,
            listen_port=hello.listen_port,
            local=_address(stream.extra(SocketAttribute.local_address)),
            remote=_address(stream.extra(SocketAttribute.remote_address)),
        )
        for pending in self._pending.get(hello.node_id, ()):
            pending.cancelled = True
        peer = self._peers.get(hello.node_id)
        if peer is None:
            peer = self._peers[hello.node_id] = _Peer(_SendQueue(self.config.send_queue_size))
        old = peer.conn
        if old is not None:
            old.close("replaced by a newer connection")
        peer.conn = conn
        peer.away_since = None
        peer.queue.control.clear()
        peer.changed.set()
        peer.changed = anyio.Event()
        self._notify()
        if old is None:
            self._peer_changed(hello.node_id, True)
        return conn

    def _detach(self, conn: _Connection) -> None:
        peer = self._peers.get(conn.peer_id)
        what = f"mesh: connection {conn.id} with {conn.peer_id} at {conn.remote[0]}:{conn.remote[1]} closed"
        logger.log(conn.level, "{}: {}", what, conn.reason or "mesh stopped")
        if peer is None or peer.conn is not conn:
            return  # replaced
        peer.conn = None
        peer.away_since = time.monotonic()
        peer.changed.set()
        peer.changed = anyio.Event()
        self._notify()
        self._peer_changed(conn.peer_id, False)

    def _peer_changed(self, peer_id: NodeId, up: bool) -> None:
        if self._on_peer_change is None:
            return
        try:
            self._on_peer_change(peer_id, up)
        except Exception as e:
            logger.opt(exception=e).error("mesh: on_peer_change callback failed")

    async def _watch_gone_peers(self) -> None:
        period = min(1.0, self.config.peer_gone_s / 4)
        while True:
            await anyio.sleep(period)
            now = time.monotonic()
            for peer_id, peer in list(self._peers.items()):
                if peer.conn is not None or peer.away_since is None:
                    continue
                away = now - peer.away_since
                if away < self.config.peer_gone_s:
                    continue
                dropped = peer.queue.fail(
                    PeerUnavailable(peer_id, f"disconnected for {away:.1f} s")
                )
                del self._peers[peer_id]
                logger.warning(
                    "mesh: peer {} gone for {:.1f} s; discarded {} queued messages",
                    peer_id,
                    away,
                    dropped,
                )

    # ------------------------------------------------------------------ connections

    async def _handle_incoming(self, stream: SocketStream) -> None:
        remote = _address(stream.extra(SocketAttribute.remote_address))
        where = f"{remote[0]}:{remote[1]}"
        try:
            reader = FrameReader(stream)
            try:
                with anyio.fail_after(self.config.handshake_timeout_s):
                    hs = await Handshake.respond(stream, reader, self._local)
            except HandshakeRejected as e:
                self._note_refusal(remote[0], e.reason, e.detail)
                self._log_limited(
                    (remote[0], e.reason),
                    "DEBUG" if e.reason == "duplicate" else "WARNING",
                    f"mesh: handshake with {where} failed, {e}",
                )
                return
            verdict = self._admit(hs.peer, outbound=False)
            if verdict is not None:
                await hs.refuse(*verdict)
                logger.debug("mesh: refused connection from {}: {}: {}", where, *verdict)
                return
            conn = self._attach(hs.peer, stream, outbound=False)
            try:
                with conn.scope:
                    with anyio.fail_after(self.config.handshake_timeout_s):
                        session = await hs.accept()
                    await self._serve(conn, session)
            finally:
                self._detach(conn)
        except ProtocolError as e:
            logger.warning("mesh: closed connection from {}: {}", where, e)
        except PeerClosed:
            logger.info("mesh: connection from {} closed during the handshake", where)
        except TimeoutError:
            logger.warning("mesh: closed connection from {}: handshake timed out", where)
        except (OSError, anyio.BrokenResourceError, anyio.ClosedResourceError) as e:
            logger.info("mesh: connection from {} failed: {!r}", where, e)
        except Exception as e:  # a bug must cost this connection, never the mesh
            logger.opt(exception=e).error("mesh: connection from {} failed unexpectedly", where)
        finally:
            with anyio.CancelScope(shield=True):
                await stream.aclose()

    async def _dial_loop(self, address: tuple[str, int]) -> None:
        backoff = self.config.reconnect_initial_s
        problem: str | None = None
        while True:
            known = self._address_peer.get(address)
            if known is not None:
                peer = self._peers.get(known)
                if peer is not None and peer.conn is not None:
                    await peer.changed.wait()
                    continue
            started = time.monotonic()
            outcome, detail = await self._dial_once(address)
            where = f"{address[0]}:{address[1]}"
            if outcome == "self":
                logger.info("mesh: {} is this node's own listener; not dialling it", where)
                return
            if outcome == "connected":
                problem = None
                self._refused.pop(_where(address), None)
                if time.monotonic() - started >= self.config.heartbeat_interval_s:
                    backoff = self.config.reconnect_initial_s
            elif outcome in ("incompatible", "error") and detail != problem:
                # One line per change of what is wrong with this address, not per retry.
                logger.log(
                    "WARNING" if outcome == "incompatible" else "INFO",
                    "mesh: cannot connect to {}: {} (retrying with backoff)",
                    where,
                    detail,
                )
                problem = detail
            if outcome == "incompatible":
                backoff = self.config.reconnect_max_s
            delay = backoff * random.uniform(0.5, 1.5)
            backoff = min(backoff * 2, self.config.reconnect_max_s)
            await anyio.sleep(delay)

    async def _dial_once(self, address: tuple[str, int]) -> tuple[_Outcome, str]:
        try:
            with anyio.fail_after(self.config.connect_timeout_s):
                stream = await anyio.connect_tcp(*address)
        except (OSError, TimeoutError) as e:
            return "error", f"connect failed: {e or type(e).__name__}"
        try:
            reader = FrameReader(stream)
            pending = _Pending()
            try:
                with anyio.fail_after(self.config.handshake_timeout_s):
                    hs = await Handshake.initiate(stream, reader, self._local)
                    peer_id = hs.peer.node_id
                    self._address_peer[address] = peer_id
                    verdict = self._admit(hs.peer, outbound=True)
                    if verdict is not None:
                        await hs.refuse(*verdict)
                        kind: _Outcome = "self" if verdict[0] == "self" else "duplicate"
                        if verdict[0] == "id_conflict":
                            kind = "incompatible"
                            self._note_refusal(_where(address), *verdict)
                        return kind, verdict[1]
                    self._pending.setdefault(peer_id, set()).add(pending)
                    try:
                        session = await hs.finish()
                    finally:
                        waiting = self._pending.get(peer_id)
                        if waiting is not None:
                            waiting.discard(pending)
                            if not waiting:
                                del self._pending[peer_id]
            except HandshakeRejected as e:
                if e.reason == "duplicate":
                    return "duplicate", e.detail
                self._note_refusal(_where(address), e.reason, e.detail)
                return "incompatible", str(e)
            if pending.cancelled:
                return "duplicate", "the peer's own connection won the tie-break"
            conn = self._attach(session.peer, stream, outbound=True)
            try:
                with conn.scope:
                    await self._serve(conn, session)
            finally:
                self._detach(conn)
            return "connected", conn.reason or ""
        except ProtocolError as e:
            logger.warning("mesh: closed connection to {}:{}: {}", *address, e)
            return "error", str(e)
        except PeerClosed:
            return "error", "closed by the peer during the handshake"
        except TimeoutError:
            return "error", "handshake timed out"
        except (OSError, anyio.BrokenResourceError, anyio.ClosedResourceError) as e:
            return "error", repr(e)
        except Exception as e:  # a bug must cost this connection, never the mesh
            logger.opt(exception=e).error("mesh: connection to {}:{} failed unexpectedly", *address)
            return "error", repr(e)
        finally:
            with anyio.CancelScope(shield=True):
                await stream.aclose()

    async def _serve(self, conn: _Connection, session: Session) -> None:
        """Run a connection until it fails or is closed; the reason is in `conn`."""
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._reader, conn, session)
            tg.start_soon(self._writer, conn, session)
            tg.start_soon(self._heartbeat, conn, session)

    async def _reader(self, conn: _Connection, session: Session) -> None:
        limit = self.config.max_frame_bytes + FRAME_OVERHEAD
        try:
            while True:
                body = await session.reader.read(limit)
                conn.last_rx = time.monotonic()
                payload = session.opener.open(body)
                try:
                    message = WIRE.validate_json(payload)
                except ValidationError as e:
                    first = e.errors()[0]
                    raise ProtocolError(
                        f"malformed message: {first['loc']}: {first['msg']}"
                    ) from None
                match message:
                    case Ping(sent_ns=sent):
                        peer = self._peers.get(conn.peer_id)
                        if peer is not None and peer.conn is conn:
                            peer.queue.put_control(Pong(echo_ns=sent).model_dump_json().encode())
                    case Pong(echo_ns=echo):
                        rtt = max(0.0, (time.monotonic_ns() - echo) / 1e9)
                        conn.rtt_s = rtt if conn.rtt_s is None else 0.8 * conn.rtt_s + 0.2 * rtt
                        self._notify()
                    case ConsensusPacket(packet=packet):
                        if packet.sender != conn.peer_id:
                            raise ProtocolError(
                                f"consensus packet claims sender {packet.sender}, "
                                f"connection is {conn.peer_id}"
                            )
                        await self._deliver(conn, Incoming(conn.peer_id, packet))
                    case TopicMessage():
                        await self._deliver(conn, Incoming(conn.peer_id, message))
        except PeerClosed:
            conn.close("closed by the peer")
        except ProtocolError as e:
            conn.close(f"protocol violation: {e}", "WARNING")
        except (OSError, anyio.BrokenResourceError, anyio.ClosedResourceError) as e:
            conn.close(f"receive failed: {e!r}")

    async def _deliver(self, conn: _Connection, item: Incoming) -> None:
        conn.delivering = True
        try:
            await self._incoming_send.send(item)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            conn.close("nobody reads incoming messages any more")
        finally:
            conn.delivering = False
            conn.last_rx = time.monotonic()

    async def _writer(self, conn: _Connection, session: Session) -> None:
        peer = self._peers.get(conn.peer_id)
        if peer is None:
            return
        queue = peer.queue
        try:
            while peer.conn is conn:
                item = queue.pop()
                if item is None:
                    await queue.wait_readable()
                    continue
                await conn.stream.send(session.sealer.seal(item))
        except (OSError, anyio.BrokenResourceError, anyio.ClosedResourceError) as e:
            conn.close(f"send failed: {e!r}")

    async def _heartbeat(self, conn: _Connection, session: Session) -> None:
        interval = self.config.heartbeat_interval_s
        timeout = self.config.heartbeat_timeout_s
        next_ping = 0.0
        while True:
            now = time.monotonic()
            if now >= next_ping:
                peer = self._peers.get(conn.peer_id)
                if peer is not None and peer.conn is conn:
                    peer.queue.put_control(
                        Ping(sent_ns=time.monotonic_ns()).model_dump_json().encode()
                    )
                next_ping = now + interval
            silent = now - max(conn.last_rx, session.reader.last_receive)
            if not conn.delivering and silent > timeout:
                conn.close(f"heartbeat timeout: nothing received for {silent:.1f} s", "WARNING")
                return
            await anyio.sleep(min(interval, timeout / 4))
