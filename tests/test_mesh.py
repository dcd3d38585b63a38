"""Mesh transport on loopback: connections, heartbeats, backpressure, reconnects, and
hostile input that must close only the offending connection."""

import json
import random
from collections.abc import AsyncGenerator, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest
from anyio.abc import SocketStream, TaskGroup, TaskStatus
from loguru import logger

from exo.routing.consensus.messages import JoinRequest, Packet
from exo.routing.mesh import (
    Incoming,
    Mesh,
    MeshConfig,
    MessageTooLarge,
    PeerUnavailable,
    TopicMessage,
)
from exo.routing.mesh import mesh as mesh_module
from exo.routing.mesh.messages import PROTOCOL_VERSION, Hello, Reject, parse_handshake
from exo.routing.mesh.wire import (
    HANDSHAKE_MAX_FRAME,
    LENGTH,
    FrameReader,
    Handshake,
    LocalIdentity,
    Session,
    derive_cluster_key,
    frame,
    public_cluster_key,
)
from exo.shared.types.ids import NodeId

pytestmark = pytest.mark.anyio

A, B, C = NodeId("node-a"), NodeId("node-b"), NodeId("node-c")
NS = "test"
SECRET = "correct horse battery staple"

FAST: dict[str, Any] = {
    "namespace": NS,
    "host": "127.0.0.1",
    "port": 0,
    "heartbeat_interval_s": 0.1,
    "heartbeat_timeout_s": 1.0,
    "reconnect_initial_s": 0.05,
    "reconnect_max_s": 0.4,
    "handshake_timeout_s": 2.0,
    "peer_gone_s": 3.0,
    "max_frame_bytes": 1 << 20,
}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def warnings() -> Iterator[list[str]]:
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(str(m).strip()), level="WARNING", format="{message}")
    try:
        yield lines
    finally:
        logger.remove(sink)


def mesh(node_id: NodeId, **overrides: Any) -> Mesh:
    return Mesh(MeshConfig(node_id=node_id, **{**FAST, **overrides}))


def msg(i: int | str, size: int = 0) -> TopicMessage:
    return TopicMessage(topic="t", payload=json.dumps({"i": i, "pad": "x" * size}))


def index(item: Incoming) -> object:
    assert isinstance(item.message, TopicMessage)
    return json.loads(item.message.payload)["i"]


class Nodes:
    """Meshes running in one task group, each stoppable on its own."""

    def __init__(self, tg: TaskGroup) -> None:
        self.tg = tg
        self.scopes: dict[int, anyio.CancelScope] = {}

    async def start(self, m: Mesh) -> int:
        scope = anyio.CancelScope()

        async def run(*, task_status: TaskStatus[int] = anyio.TASK_STATUS_IGNORED) -> None:
            with scope:
                await m.run(task_status=task_status)

        port: int = await self.tg.start(run)
        self.scopes[id(m)] = scope
        return port

    def stop(self, m: Mesh) -> None:
        self.scopes[id(m)].cancel()


@asynccontextmanager
async def nodes() -> AsyncGenerator[Nodes]:
    async with anyio.create_task_group() as tg:
        yield Nodes(tg)
        tg.cancel_scope.cancel()


async def connected(m: Mesh, *peers: NodeId, limit_s: float = 5.0) -> None:
    with anyio.fail_after(limit_s):
        await m.wait_for(lambda p: all(x in p for x in peers))


async def recv(m: Mesh, limit_s: float = 5.0) -> Incoming:
    with anyio.fail_after(limit_s):
        return await m.incoming().receive()


async def pair(ns: Nodes, **overrides: Any) -> tuple[Mesh, Mesh]:
    a, b = mesh(A, **overrides), mesh(B, **overrides)
    await ns.start(a)
    port_b = await ns.start(b)
    a.add_peer("127.0.0.1", port_b)
    await connected(a, B)
    await connected(b, A)
    return a, b


async def assert_working(a: Mesh, b: Mesh, tag: str) -> None:
    await a.send(B, msg(f"a->{tag}"))
    await b.send(A, msg(f"b->{tag}"))
    got_b, got_a = await recv(b), await recv(a)
    assert (got_b.sender, index(got_b)) == (A, f"a->{tag}")
    assert (got_a.sender, index(got_a)) == (B, f"b->{tag}")


# ---------------------------------------------------------------- normal operation


async def test_two_meshes_exchange_messages_both_ways_with_rtt() -> None:
    async with nodes() as ns:
        a, b = await pair(ns, secret=SECRET)
        for i in range(50):
            await a.send(B, msg(i))
            await b.send(A, msg(1000 + i))
        assert [index(await recv(b)) for _ in range(50)] == list(range(50))
        assert [index(await recv(a)) for _ in range(50)] == list(range(1000, 1050))
        with anyio.fail_after(3):
            await a.wait_for(lambda p: p[B].rtt_s is not None)
            await b.wait_for(lambda p: p[A].rtt_s is not None)
        rtt = a.peers()[B].rtt_s
        assert rtt is not None and 0 <= rtt < 0.5
        info_a, info_b = a.peers()[B], b.peers()[A]
        assert info_a.outbound and not info_b.outbound
        assert info_a.local == info_b.remote and info_a.remote == info_b.local
        assert info_b.listen_port == a.port


async def test_three_meshes_form_a_full_mesh_and_carry_consensus_packets() -> None:
    async with nodes() as ns:
        meshes = {n: mesh(n) for n in (A, B, C)}
        ports = {n: await ns.start(m) for n, m in meshes.items()}
        meshes[A].add_peer("127.0.0.1", ports[B])
        meshes[A].add_peer("127.0.0.1", ports[C])
        meshes[C].add_peer("127.0.0.1", ports[B])
        for n, m in meshes.items():
            await connected(m, *(x for x in meshes if x != n))
        for n, m in meshes.items():
            for other in meshes:
                if other != n:
                    packet = Packet(
                        cluster="c", sender=n, to=other, message=JoinRequest(last_index=-1)
                    )
                    await m.send(other, packet)
        for n, m in meshes.items():
            got = [await recv(m) for _ in range(2)]
            assert sorted(g.sender for g in got) == sorted(x for x in meshes if x != n)
            for g in got:
                assert isinstance(g.message, Packet) and g.message.to == n
                assert g.message.sender == g.sender
        assert all(len(m.peers()) == 2 for m in meshes.values())


async def test_simultaneous_dials_yield_one_connection() -> None:
    for secret in (None, SECRET):
        for _round in range(4):
            async with nodes() as ns:
                a, b = mesh(A, secret=secret), mesh(B, secret=secret)
                port_a, port_b = await ns.start(a), await ns.start(b)
                a.add_peer("127.0.0.1", port_b)
                b.add_peer("127.0.0.1", port_a)
                await connected(a, B)
                await connected(b, A)
                first = a.peers()[B].connection, b.peers()[A].connection
                await anyio.sleep(0.3)  # several backoff periods: no flapping
                pa, pb = a.peers(), b.peers()
                assert (pa[B].connection, pb[A].connection) == first
                assert pa[B].local == pb[A].remote and pa[B].remote == pb[A].local
                assert pa[B].outbound != pb[A].outbound
                await assert_working(a, b, "x")


async def test_several_addresses_of_one_node_give_one_connection() -> None:
    async with nodes() as ns:
        a, b = mesh(A), mesh(B, host=None)
        await ns.start(a)
        port_b = await ns.start(b)
        a.add_peer("127.0.0.1", port_b)
        a.add_peer("localhost", port_b)
        a.add_peer("127.0.0.1", a.port)  # its own listener: dialled once, then left alone
        await connected(a, B)
        first = a.peers()[B].connection
        await anyio.sleep(0.3)
        assert list(a.peers()) == [B] and a.peers()[B].connection == first


# ---------------------------------------------------------------- flow control


async def test_slow_receiver_blocks_sender_and_nothing_is_dropped() -> None:
    n, size = 240, 64 * 1024  # ~15 MiB: more than the loopback socket buffers hold
    async with nodes() as ns:
        a, b = await pair(ns, send_queue_size=4, receive_queue_size=2)
        sent = 0

        async def produce() -> None:
            nonlocal sent
            for i in range(n):
                await a.send(B, msg(i, size))
                sent += 1

        ns.tg.start_soon(produce)
        # Longer than heartbeat_timeout_s: a stalled consumer must not look like a dead peer.
        await anyio.sleep(1.5)
        assert sent < n, "the sender should be blocked by the slow receiver"
        assert not a.try_send(B, msg("extra")), "a full queue refuses try_send"
        assert B in a.peers() and A in b.peers()
        got = [index(await recv(b)) for _ in range(n)]
        assert got == list(range(n))
        assert sent == n
        await assert_working(a, b, "after")


async def test_messages_sent_while_a_peer_restarts_are_delivered_after_reconnect() -> None:
    async with nodes() as ns:
        a, b = await pair(ns)
        port_b = b.port
        ns.stop(b)
        with anyio.fail_after(3):
            await a.wait_for(lambda p: B not in p)
        await a.send(B, msg("queued while away"))  # within peer_gone_s: queued, not refused
        b2 = mesh(B, port=port_b)
        await ns.start(b2)
        await connected(a, B)
        got = await recv(b2)
        assert (got.sender, index(got)) == (A, "queued while away")
        await assert_working(a, b2, "restarted")


async def test_reconnect_after_the_dialled_peer_restarts_with_backoff() -> None:
    async with nodes() as ns:
        a, b = await pair(ns)
        port_b = b.port
        ns.stop(b)
        await anyio.sleep(0.6)  # a few failed dials, backoff grows (capped at 0.4 s)
        b2 = mesh(B, port=port_b)
        await ns.start(b2)
        await connected(a, B, limit_s=3)
        await connected(b2, A, limit_s=3)
        await assert_working(a, b2, "back")


async def test_a_peer_that_stays_away_fails_its_queue_with_a_typed_error() -> None:
    async with nodes() as ns:
        a, b = await pair(ns, peer_gone_s=0.5, send_queue_size=2)
        ns.stop(b)
        with anyio.fail_after(3):
            await a.wait_for(lambda p: B not in p)
        await a.send(B, msg(1))
        await a.send(B, msg(2))
        with anyio.fail_after(5), pytest.raises(PeerUnavailable):
            await a.send(B, msg(3))  # blocks on the full queue until the peer is declared gone
        with pytest.raises(PeerUnavailable):
            await a.send(B, msg(4))
        with pytest.raises(PeerUnavailable):
            await a.send(NodeId("never-seen"), msg(5))


async def test_too_large_message_is_refused_at_send() -> None:
    async with nodes() as ns:
        a, b = await pair(ns, max_frame_bytes=4096)
        with pytest.raises(MessageTooLarge):
            await a.send(B, msg(0, 8192))
        await assert_working(a, b, "still")


async def test_heartbeat_timeout_closes_a_silent_connection(warnings: list[str]) -> None:
    async with nodes() as ns:
        a = mesh(A, heartbeat_timeout_s=0.5)
        port = await ns.start(a)
        stream, _session = await raw_handshake(port, NodeId("mute"))
        await connected(a, NodeId("mute"))
        with anyio.fail_after(3):
            await a.wait_for(lambda p: NodeId("mute") not in p)
        await expect_closed(stream)
        assert sum("heartbeat timeout" in w for w in warnings) == 1


# ---------------------------------------------------------------- authentication


async def test_wrong_secret_is_refused(warnings: list[str]) -> None:
    async with nodes() as ns:
        a, b = mesh(A, secret=SECRET), mesh(B, secret="not the secret")
        port_a = await ns.start(a)
        await ns.start(b)
        b.add_peer("127.0.0.1", port_a)
        await anyio.sleep(0.8)
        assert a.peers() == {} and b.peers() == {}
        assert any("auth_failed" in w for w in warnings)


async def test_secret_and_no_secret_do_not_connect(warnings: list[str]) -> None:
    async with nodes() as ns:
        a, b = mesh(A, secret=SECRET), mesh(B)
        port_a = await ns.start(a)
        port_b = await ns.start(b)
        b.add_peer("127.0.0.1", port_a)
        a.add_peer("127.0.0.1", port_b)
        await anyio.sleep(0.8)
        assert a.peers() == {} and b.peers() == {}
        assert any("auth_mismatch" in w for w in warnings)
        # One line per address and reason, however often the dialers retry.
        assert sum("cannot connect" in w for w in warnings) <= 2


async def test_nodes_of_different_builds_do_not_connect_and_say_so(warnings: list[str]) -> None:
    """Another message schema (another exo build) would make every frame malformed to one
    side: the handshake refuses it, with one line per dialled address."""
    async with nodes() as ns:
        a, b = mesh(A, schema_fingerprint="00aa00aa00aa00aa"), mesh(B)
        port_a = await ns.start(a)
        port_b = await ns.start(b)
        b.add_peer("127.0.0.1", port_a)
        a.add_peer("127.0.0.1", port_b)
        await anyio.sleep(0.8)
        assert a.peers() == {} and b.peers() == {}
        dialled = [w for w in warnings if "cannot connect" in w]
        assert 1 <= len(dialled) <= 2, dialled
        assert all(
            "another build of exo" in w and "00aa00aa00aa00aa" in w and "same exo version" in w
            for w in dialled
        ), dialled
        # Both say so in their status too: the dialler by the address it dialled, the
        # dialled node by the dialler's host.
        assert set(a.refused()) >= {f"127.0.0.1:{port_b}"}
        assert set(b.refused()) >= {f"127.0.0.1:{port_a}"}
        for why in (*a.refused().values(), *b.refused().values()):
            assert why.startswith("schema: ") and "another build of exo" in why, why
        ns.stop(a)
        ns.stop(b)
    # A refusal that does not happen again drops out.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(mesh_module, "REFUSED_MEMORY_S", 0.2)
        await anyio.sleep(0.3)
        assert a.refused() == {} and b.refused() == {}


async def test_an_unauthenticated_client_gets_no_messages_in(warnings: list[str]) -> None:
    async with nodes() as ns:
        a, b = await pair(ns, secret=SECRET)
        stream = await anyio.connect_tcp("127.0.0.1", a.port)
        reader = FrameReader(stream)
        # Knows the protocol, not the secret: its proof cannot be right.
        local = identity(
            NodeId("intruder"), key=derive_cluster_key("guess", NS), authenticated=True
        )
        hs = await Handshake.initiate(stream, reader, local)
        with pytest.raises(Exception, match="auth_failed"):
            await hs.finish()  # it cannot verify A's proof either
        await stream.aclose()
        # A bare data frame without any handshake is just as unwelcome.
        stream = await anyio.connect_tcp("127.0.0.1", a.port)
        await stream.send(frame(msg("sneak").model_dump_json().encode()))
        await expect_closed(stream)
        assert NodeId("intruder") not in a.peers()
        await assert_working(a, b, "auth")


async def test_replayed_frames_are_rejected(warnings: list[str]) -> None:
    async with nodes() as ns:
        a, b = await pair(ns, secret=SECRET)
        intruder = NodeId("insider")
        stream, session = await raw_handshake(a.port, intruder, secret=SECRET)
        captured = session.sealer.seal(msg("once").model_dump_json().encode())
        await stream.send(captured)
        got = await recv(a)
        assert (got.sender, index(got)) == (intruder, "once")
        await stream.send(captured)  # the same frame again: sequence number already used
        await expect_closed(stream)
        assert sum("replayed or reordered" in w for w in warnings) == 1
        # A frame recorded on an old connection does not verify on a new one.
        stream2, _ = await raw_handshake(a.port, intruder, secret=SECRET)
        await stream2.send(captured)
        await expect_closed(stream2)
        assert sum("authentication failed" in w for w in warnings) == 1
        await assert_working(a, b, "replay")
        with anyio.move_on_after(0.2):
            extra = await a.incoming().receive()
            pytest.fail(f"nothing else may arrive, got {extra}")


# ---------------------------------------------------------------- hostile input


async def test_bad_input_closes_only_that_connection(warnings: list[str]) -> None:
    async with nodes() as ns:
        a, b = await pair(ns, secret=SECRET)
        good = a.peers()[B].connection, b.peers()[A].connection
        port = a.port

        async def case(name: str, expect: str, payload: bytes, *, eof: bool = False) -> None:
            before = len(warnings)
            stream = await anyio.connect_tcp("127.0.0.1", port)
            await stream.send(payload)
            if eof:
                await stream.send_eof()
            await expect_closed(stream)
            await anyio.sleep(0.05)
            new = warnings[before:]
            assert len(new) == 1 and expect in new[0], (name, new)
            assert (a.peers()[B].connection, b.peers()[A].connection) == good, name
            await assert_working(a, b, name)

        await case("http", "exceeds the limit", b"GET / HTTP/1.1\r\nHost: exo\r\n\r\n")
        await case("oversized", "exceeds the limit", LENGTH.pack(2**32 - 1) + b"x" * 10)
        await case("not json", "not JSON", frame(b"\x00\xff garbage \x13\x37"))
        await case("not hello", "expected hello", frame(b'{"kind": "accept"}'))
        await case("truncated", "truncated frame", LENGTH.pack(100) + b"x" * 10, eof=True)
        await case(
            "limit", "exceeds the limit", LENGTH.pack(HANDSHAKE_MAX_FRAME + 1) + b"{}", eof=True
        )

        # Wrong namespace / version: a clear Reject, then the connection closes.
        for field, value, reason in (
            ("namespace", "other-cluster", "namespace"),
            ("protocol_version", PROTOCOL_VERSION + 1, "version"),
            ("schema_fingerprint", "0123456789abcdef", "schema"),
        ):
            before = len(warnings)
            stream = await anyio.connect_tcp("127.0.0.1", port)
            reader = FrameReader(stream)
            hello = json.loads(hello_bytes(NodeId("stranger"), authenticated=True))
            hello[field] = value
            await stream.send(frame(json.dumps(hello).encode()))
            with anyio.fail_after(3):
                reply = parse_handshake(await reader.read(HANDSHAKE_MAX_FRAME))
            assert isinstance(reply, Reject) and reply.reason == reason
            await expect_closed(stream)
            new = warnings[before:]
            assert len(new) == 1 and reason in new[0], new
            await assert_working(a, b, reason)

        # After a valid handshake: garbage, forged, oversized, truncated, spoofed frames.
        async def after_handshake(
            name: str, expect: str, send: Callable[[Session], bytes], *, eof: bool = False
        ) -> None:
            before = len(warnings)
            stream, session = await raw_handshake(port, NodeId(f"bad-{name}"), secret=SECRET)
            await stream.send(send(session))
            if eof:
                await stream.send_eof()
            await expect_closed(stream)
            await anyio.sleep(0.05)
            new = warnings[before:]
            assert len(new) == 1 and expect in new[0], (name, new)
            assert (a.peers()[B].connection, b.peers()[A].connection) == good, name
            await assert_working(a, b, name)

        def spoofed(s: Session) -> bytes:
            p = Packet(cluster=None, sender=B, to=A, message=JoinRequest(last_index=-1))
            return s.sealer.seal(
                json.dumps(
                    {"kind": "consensus", "packet": json.loads(p.model_dump_json())}
                ).encode()
            )

        await after_handshake("garbage", "authentication failed", lambda s: frame(b"z" * 64))
        await after_handshake("short", "shorter than its header", lambda s: frame(b"z" * 8))
        await after_handshake("oversized", "exceeds the limit", lambda s: LENGTH.pack(1 << 30))
        await after_handshake(
            "truncated",
            "truncated frame",
            lambda s: s.sealer.seal(b'{"kind":"ping"}')[:20],
            eof=True,
        )
        await after_handshake(
            "invalid", "malformed message", lambda s: s.sealer.seal(b'{"kind":"nope"}')
        )
        await after_handshake("spoofed", "claims sender", spoofed)
        with anyio.move_on_after(0.2):
            extra = await a.incoming().receive()
            pytest.fail(f"nothing from the bad connections may arrive, got {extra}")


async def test_fuzzed_handshakes_close_only_their_connection() -> None:
    rng = random.Random(7)
    base: dict[str, object] = json.loads(hello_bytes(NodeId("fuzz"), authenticated=True))
    odd: list[object] = [None, -1, 2**70, "", "x" * 5000, "zz" * 32, "é\n", [], {}, True, 1.5]
    async with nodes() as ns:
        a, b = await pair(ns, secret=SECRET)
        good = a.peers()[B].connection
        for i in range(60):
            hello = dict(base)
            key = rng.choice(sorted(hello))
            if i % 5 == 0:
                del hello[key]
            else:
                hello[key] = rng.choice(odd)
            payload = json.dumps(hello).encode()
            if i % 7 == 0:
                payload = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300)))
            elif i % 3 == 0:
                cut = rng.randrange(len(payload))
                payload = payload[:cut] + bytes([rng.randrange(256)]) + payload[cut + 1 :]
            stream = await anyio.connect_tcp("127.0.0.1", a.port)
            await stream.send(frame(payload))
            await stream.send_eof()  # a hello that happens to be valid then ends at once
            await expect_closed(stream)
        assert a.peers()[B].connection == good
        await assert_working(a, b, "fuzz")
        assert set(a.peers()) == {B}


async def test_a_second_process_with_the_same_node_id_is_refused(warnings: list[str]) -> None:
    async with nodes() as ns:
        a, b = await pair(ns)
        twin = mesh(A)  # e.g. a copied data directory
        await ns.start(twin)
        twin.add_peer("127.0.0.1", a.port)
        await anyio.sleep(0.5)
        assert twin.peers() == {}
        assert any("node id conflict" in w for w in warnings)
        await assert_working(a, b, "twin")


# ---------------------------------------------------------------- helpers


def identity(node_id: NodeId, *, key: bytes, authenticated: bool) -> LocalIdentity:
    return LocalIdentity(
        node_id=node_id,
        namespace=NS,
        instance="raw-client",
        listen_port=0,
        schema_fingerprint="",
        key=key,
        authenticated=authenticated,
    )


def hello_bytes(node_id: NodeId, *, authenticated: bool) -> bytes:
    return (
        Hello(
            protocol_version=PROTOCOL_VERSION,
            node_id=node_id,
            namespace=NS,
            instance="raw-client",
            listen_port=0,
            schema_fingerprint="",
            nonce="00" * 32,
            authenticated=authenticated,
        )
        .model_dump_json()
        .encode()
    )


async def raw_handshake(
    port: int, node_id: NodeId, *, secret: str | None = None
) -> tuple[SocketStream, Session]:
    """A hand-driven client that completes a real handshake (to misbehave afterwards)."""
    stream = await anyio.connect_tcp("127.0.0.1", port)
    key = derive_cluster_key(secret, NS) if secret is not None else public_cluster_key(NS)
    local = identity(node_id, key=key, authenticated=secret is not None)
    with anyio.fail_after(3):
        hs = await Handshake.initiate(stream, FrameReader(stream), local)
        return stream, await hs.finish()


async def expect_closed(stream: SocketStream, limit_s: float = 3.0) -> None:
    """Read (and ignore) until the other side closes."""
    with anyio.fail_after(limit_s):
        try:
            while True:
                await stream.receive()
        except (anyio.EndOfStream, anyio.BrokenResourceError, ConnectionError):
            pass
    await stream.aclose()
