"""Discovery: `--peer` parsing, and mDNS between services on 127.0.0.1 only."""

import socket
from collections.abc import Callable, Iterator

import anyio
import pytest
from anyio.abc import TaskStatus
from loguru import logger

from exo.routing.discovery import (
    DiscoveredPeer,
    Discovery,
    PeerAddress,
    PeerAddressError,
    parse_peer,
)
from exo.routing.mesh import PROTOCOL_VERSION, Mesh, MeshConfig
from exo.shared.types.ids import NodeId

# ---------------------------------------------------------------- --peer


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("192.168.1.20:52416", PeerAddress("192.168.1.20", 52416)),
        (" mac-studio.local:1 ", PeerAddress("mac-studio.local", 1)),
        ("localhost:65535", PeerAddress("localhost", 65535)),
        ("[::1]:52416", PeerAddress("::1", 52416)),
        ("[fe80::1%eth0]:7", PeerAddress("fe80::1%eth0", 7)),
    ],
)
def test_parse_peer_accepts_host_port(text: str, expected: PeerAddress) -> None:
    assert parse_peer(text) == expected


def test_parse_peer_default_port_and_str() -> None:
    assert parse_peer("gpu-box", default_port=52416) == PeerAddress("gpu-box", 52416)
    assert parse_peer("[::1]", default_port=9) == PeerAddress("::1", 9)
    assert str(PeerAddress("::1", 9)) == "[::1]:9"
    assert str(PeerAddress("gpu-box", 9)) == "gpu-box:9"


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("", "empty"),
        ("gpu-box", "missing port"),
        ("gpu-box:", "missing port"),
        (":52416", "missing host"),
        ("gpu-box:http", "is not a number"),
        ("gpu-box:0", "out of range"),
        ("gpu-box:70000", "out of range"),
        ("::1:52416", "need brackets"),
        ("[::1:52416", "missing ']'"),
        ("[::1]52416", "unexpected"),
        ("[10.0.0.1]:5", "not an IPv6 address"),
        ("300.1.1.1:5", "not a valid IPv4 address"),
        ("bad host:5", "not a valid host name"),
        ("http://gpu-box:5", "without a scheme"),
    ],
)
def test_parse_peer_errors_say_what_is_wrong(text: str, why: str) -> None:
    with pytest.raises(PeerAddressError) as e:
        parse_peer(text)
    assert why in str(e.value) and "expected HOST:PORT" in str(e.value)
    assert repr(text) in str(e.value)


# ---------------------------------------------------------------- mDNS on loopback

LOOPBACK = ["127.0.0.1"]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _loopback_multicast_problem() -> str | None:
    """Why multicast on 127.0.0.1 cannot work here, or None if a probe datagram loops back."""
    group = "239.255.42.99"
    try:
        rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    except OSError as e:
        return f"no UDP sockets: {e}"
    with rx, tx:
        try:
            rx.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            rx.bind(("0.0.0.0", 0))
            port = rx.getsockname()[1]
            mreq = socket.inet_aton(group) + socket.inet_aton("127.0.0.1")
            rx.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreq)
            tx.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton("127.0.0.1"))
            tx.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 1)
            tx.sendto(b"exo-probe", (group, port))
            rx.settimeout(1.0)
            data, _ = rx.recvfrom(64)
        except OSError as e:
            return f"multicast on loopback is not available here ({e})"
        return None if data == b"exo-probe" else "multicast probe returned something else"


@pytest.fixture
def mdns() -> None:
    problem = _loopback_multicast_problem()
    if problem is not None:
        print(f"SKIP mDNS tests: {problem}")
        pytest.skip(problem)


@pytest.fixture
def warnings() -> Iterator[list[str]]:
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(str(m).strip()), level="WARNING", format="{message}")
    try:
        yield lines
    finally:
        logger.remove(sink)


def discovery(node: str, namespace: str = "lab", **kw: object) -> Discovery:
    found: list[DiscoveredPeer] = []
    d = Discovery(
        node_id=NodeId(node),
        namespace=namespace,
        mesh_port=kw.pop("mesh_port", 1000),  # pyright: ignore[reportArgumentType]
        api_port=kw.pop("api_port", 2000),  # pyright: ignore[reportArgumentType]
        on_peer=kw.pop("on_peer", found.append),  # pyright: ignore[reportArgumentType]
        interfaces=LOOPBACK,
        ipv4_only=True,
        **kw,  # pyright: ignore[reportArgumentType]
    )
    return d


@pytest.mark.anyio
@pytest.mark.usefixtures("mdns")
async def test_two_nodes_discover_each_other_and_connect_their_meshes() -> None:
    config = {"namespace": "lab", "host": "127.0.0.1", "port": 0, "heartbeat_interval_s": 0.2}
    mesh_a = Mesh(MeshConfig(node_id=NodeId("node-a"), **config))  # pyright: ignore[reportArgumentType]
    mesh_b = Mesh(MeshConfig(node_id=NodeId("node-b"), **config))  # pyright: ignore[reportArgumentType]
    async with anyio.create_task_group() as tg:
        port_a = await tg.start(mesh_a.run)
        port_b = await tg.start(mesh_b.run)

        def dial(mesh: Mesh) -> Callable[[DiscoveredPeer], None]:
            return lambda p: mesh.add_peer(p.host, p.mesh_port)

        a = discovery("node-a", mesh_port=port_a, api_port=52415, on_peer=dial(mesh_a))
        b = discovery("node-b", mesh_port=port_b, api_port=52417, on_peer=dial(mesh_b))
        await tg.start(a.run)
        await tg.start(b.run)
        with anyio.fail_after(10):
            await a.wait_for(lambda p: NodeId("node-b") in p)
            await b.wait_for(lambda p: NodeId("node-a") in p)
        seen = a.peers()[NodeId("node-b")]
        assert seen == DiscoveredPeer(
            node_id=NodeId("node-b"),
            namespace="lab",
            protocol_version=PROTOCOL_VERSION,
            addresses=("127.0.0.1",),
            mesh_port=port_b,
            api_port=52417,
        )
        assert NodeId("node-a") not in a.peers()  # never itself
        with anyio.fail_after(5):
            await mesh_a.wait_for(lambda p: NodeId("node-b") in p)
            await mesh_b.wait_for(lambda p: NodeId("node-a") in p)
        tg.cancel_scope.cancel()


@pytest.mark.anyio
@pytest.mark.usefixtures("mdns")
async def test_other_namespaces_and_versions_are_ignored_with_one_line_each(
    warnings: list[str],
) -> None:
    reported: list[DiscoveredPeer] = []
    a = discovery("node-a", on_peer=reported.append)
    b = discovery("node-b")
    other_ns = discovery("node-c", namespace="elsewhere")
    other_version = discovery("node-d", protocol_version=PROTOCOL_VERSION + 1)
    async with anyio.create_task_group() as tg:
        for d in (a, b, other_ns, other_version):
            await tg.start(d.run)
        with anyio.fail_after(10):
            await a.wait_for(
                lambda p: NodeId("node-b") in p and len(a.ignored()) == 2  # node-c, node-d
            )
        await anyio.sleep(2.5)  # mDNS re-announces (1 s, 2 s, ...) and answers queries
        tg.cancel_scope.cancel()
    assert [p.node_id for p in reported] == [NodeId("node-b")]
    assert set(a.peers()) == {NodeId("node-b")}
    assert set(a.ignored()) == {NodeId("node-c"), NodeId("node-d")}
    # Only the one of this namespace on another version is a node the user should hear of.
    assert list(a.other_versions()) == [NodeId("node-d")]
    assert "protocol version" in a.other_versions()[NodeId("node-d")]
    ns_lines = [w for w in warnings if "node-a ignores node-c" in w]
    version_lines = [w for w in warnings if "node-a ignores node-d" in w]
    assert len(ns_lines) == 1 and "'elsewhere'" in ns_lines[0]
    assert len(version_lines) == 1 and "protocol version" in version_lines[0]


@pytest.mark.anyio
@pytest.mark.usefixtures("mdns")
async def test_a_node_of_another_version_is_listed_while_it_is_announced() -> None:
    a = discovery("node-a")
    newer = discovery("node-n", protocol_version=PROTOCOL_VERSION + 1)
    async with anyio.create_task_group() as tg:
        await tg.start(a.run)
        newer_scope = anyio.CancelScope()

        async def run_newer(*, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
            with newer_scope:
                await newer.run(task_status=task_status)

        await tg.start(run_newer)
        with anyio.fail_after(10):
            await a.wait_for(lambda _: NodeId("node-n") in a.other_versions())
        newer_scope.cancel()  # it stops, and says goodbye over mDNS
        with anyio.fail_after(10):
            await a.wait_for(lambda _: not a.other_versions())
        assert NodeId("node-n") not in a.ignored()
        tg.cancel_scope.cancel()
