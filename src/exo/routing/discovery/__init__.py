"""Finding peers: mDNS (zeroconf, `_exo._tcp.local.`) and `--peer HOST:PORT` addresses.

`Discovery` advertises this node (TXT records: node id, cluster namespace, mesh protocol
version, mesh and API ports) and browses for others. Each compatible peer found (or whose
announcement changed) is handed to `on_peer`; typically the node calls
`mesh.add_peer(peer.host, peer.mesh_port)`. A peer of another namespace or an
incompatible protocol version is ignored with one log line per node and reason, however
often it announces itself.
"""

import ipaddress
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import anyio
from anyio.abc import TaskGroup, TaskStatus
from loguru import logger

from exo.routing.discovery._zeroconf import Change, Resolved, ZeroconfAdapter, local_addresses
from exo.routing.mesh.messages import NODE_ID_PATTERN, PROTOCOL_VERSION, printable
from exo.shared.types.ids import NodeId

SERVICE_TYPE = "_exo._tcp.local."

# TXT record keys.
TXT_NODE_ID = "node_id"
TXT_NAMESPACE = "namespace"
TXT_VERSION = "protocol_version"
TXT_MESH_PORT = "mesh_port"
TXT_API_PORT = "api_port"


# ------------------------------------------------------------------ --peer HOST:PORT


class PeerAddressError(ValueError):
    """A `--peer` value that is not HOST:PORT; the message says what is wrong."""


@dataclass(frozen=True, order=True)
class PeerAddress:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


_HOSTNAME = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,62})(?:\.[A-Za-z0-9_-]{1,63})*\.?$"
)


def parse_peer(text: str, *, default_port: int | None = None) -> PeerAddress:
    """Parse `HOST:PORT`, `IPV4:PORT` or `[IPV6]:PORT` (PORT optional with `default_port`).

    Raises `PeerAddressError` with a message naming the value and the expected form.
    """
    value = text.strip()
    example = (
        "expected HOST:PORT, e.g. 192.168.1.20:52416, mac-studio.local:52416 or [fe80::1]:52416"
    )

    def fail(why: str) -> PeerAddressError:
        return PeerAddressError(f"invalid --peer {text!r}: {why}; {example}")

    if not value:
        raise fail("empty")
    if "://" in value or "/" in value:
        raise fail("give HOST:PORT without a scheme or path (no http://, no /...)")
    port_text: str | None
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            raise fail("missing ']' after the IPv6 address")
        host, rest = value[1:end], value[end + 1 :]
        if rest and not rest.startswith(":"):
            raise fail(f"unexpected {rest!r} after ']'")
        port_text = rest[1:] if rest else None
        try:
            if ipaddress.ip_address(host.split("%")[0]).version != 6:
                raise fail("brackets are for IPv6 addresses only")
        except ValueError:
            raise fail(f"{host!r} is not an IPv6 address") from None
    elif value.count(":") > 1:
        raise fail("IPv6 addresses need brackets, e.g. [::1]:52416")
    elif ":" in value:
        host, port_text = value.split(":", 1)
    else:
        host, port_text = value, None
    if not host:
        raise fail("missing host")
    if not value.startswith("["):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            if re.fullmatch(r"[0-9.]+", host):
                raise fail(f"{host!r} is not a valid IPv4 address") from None
            if not _HOSTNAME.match(host):
                raise fail(f"{host!r} is not a valid host name") from None
    if port_text is None or port_text == "":
        if default_port is None:
            raise fail("missing port")
        return PeerAddress(host, default_port)
    if not port_text.isdigit():
        raise fail(f"port {port_text!r} is not a number")
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise fail(f"port {port} is out of range 1-65535")
    return PeerAddress(host, port)


# ------------------------------------------------------------------ mDNS


@dataclass(frozen=True)
class DiscoveredPeer:
    node_id: NodeId
    namespace: str
    protocol_version: int
    addresses: tuple[str, ...]  # preferred first (IPv4 before IPv6)
    mesh_port: int
    api_port: int

    @property
    def host(self) -> str:
        return self.addresses[0]


def _service_name(node_id: NodeId) -> str:
    label = re.sub(r"[^A-Za-z0-9-]", "-", node_id)[:63]
    return f"{label}.{SERVICE_TYPE}"


class Discovery:
    """Advertise this node and report compatible peers, until cancelled."""

    def __init__(
        self,
        *,
        node_id: NodeId,
        namespace: str,
        mesh_port: int,
        api_port: int,
        on_peer: Callable[[DiscoveredPeer], None] | None = None,
        interfaces: Sequence[str] | None = None,
        ipv4_only: bool = False,
        advertise_addresses: Sequence[str] | None = None,
        protocol_version: int = PROTOCOL_VERSION,
        resolve_timeout_ms: int = 3000,
    ) -> None:
        """`interfaces`: the IP addresses to run mDNS on (None: all interfaces).
        `advertise_addresses`: the addresses put in the A/AAAA records (None: the
        `interfaces` if given, else this host's non-loopback addresses)."""
        self.node_id = node_id
        self.namespace = namespace
        self.mesh_port = mesh_port
        self.api_port = api_port
        self.protocol_version = protocol_version
        self._on_peer = on_peer
        self._interfaces = list(interfaces) if interfaces is not None else None
        self._ipv4_only = ipv4_only
        self._advertise = list(advertise_addresses) if advertise_addresses is not None else None
        self._resolve_timeout_ms = resolve_timeout_ms
        self._peers: dict[NodeId, DiscoveredPeer] = {}
        self._names: dict[str, NodeId] = {}
        self._ignored: dict[str, str] = {}  # service name -> why (logged once)
        # Those of them that are exo nodes of this namespace speaking another protocol
        # version: a node of this cluster on another version, which its user wants to know.
        self._other_version: set[str] = set()
        self._resolving: set[str] = set()
        self._tg: TaskGroup | None = None
        self._zc: ZeroconfAdapter | None = None
        self._changed = anyio.Event()

    def peers(self) -> dict[NodeId, DiscoveredPeer]:
        """Compatible peers currently announced."""
        return dict(self._peers)

    def ignored(self) -> dict[NodeId, str]:
        """Incompatible nodes announced now, with the reason (logged once per announcement)."""
        return {
            NodeId(name.removesuffix("." + SERVICE_TYPE)): why
            for name, why in self._ignored.items()
        }

    def other_versions(self) -> dict[NodeId, str]:
        """The ignored nodes of this namespace that speak another protocol version (another
        version of exo), while they are announced."""
        return {
            NodeId(name.removesuffix("." + SERVICE_TYPE)): self._ignored[name]
            for name in sorted(self._other_version)
            if name in self._ignored
        }

    async def wait_for(self, predicate: Callable[[dict[NodeId, DiscoveredPeer]], bool]) -> None:
        while not predicate(self.peers()):
            if self._changed.is_set():
                self._changed = anyio.Event()
            await self._changed.wait()

    def properties(self) -> dict[str, str]:
        return {
            TXT_NODE_ID: self.node_id,
            TXT_NAMESPACE: self.namespace,
            TXT_VERSION: str(self.protocol_version),
            TXT_MESH_PORT: str(self.mesh_port),
            TXT_API_PORT: str(self.api_port),
        }

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Start browsing and announcing; `started()` once browsing (announcing takes
        another ~2 s: mDNS probes the name first)."""
        zc = ZeroconfAdapter(self._interfaces, self._ipv4_only)
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                self._zc = zc
                zc.browse(SERVICE_TYPE, self._on_change)
                tg.start_soon(self._announce, zc)
                task_status.started()
                await anyio.sleep_forever()
        finally:
            self._tg = None
            self._zc = None
            with anyio.CancelScope(shield=True):
                try:
                    await zc.close()
                except Exception as e:  # closing must never mask the real exit
                    logger.debug("discovery: closing zeroconf failed: {!r}", e)

    async def _announce(self, zc: ZeroconfAdapter) -> None:
        if self._advertise is not None:
            addresses = self._advertise
        elif self._interfaces is not None:
            addresses = [a for a in self._interfaces if _is_ip(a)]
        else:
            addresses = local_addresses(self._ipv4_only)
        started = time.monotonic()
        try:
            await zc.register(
                SERVICE_TYPE,
                _service_name(self.node_id),
                self.mesh_port,
                self.properties(),
                addresses,
                server=f"{_service_name(self.node_id).split('.')[0]}.local.",
            )
        except Exception as e:
            logger.warning("discovery: could not announce this node over mDNS: {!r}", e)
            return
        logger.info(
            "discovery: announced {} ({}) on {} in {:.1f} s",
            self.node_id,
            SERVICE_TYPE,
            ", ".join(addresses) or "no address",
            time.monotonic() - started,
        )

    def _on_change(self, name: str, change: Change) -> None:
        if change == "removed":
            if self._ignored.pop(name, None) is not None:
                self._other_version.discard(name)
                self._changed.set()
            node_id = self._names.pop(name, None)
            if node_id is not None and self._peers.pop(node_id, None) is not None:
                logger.info("discovery: {} is no longer announced", node_id)
                self._changed.set()
            return
        if self._tg is not None and name not in self._resolving:
            self._resolving.add(name)
            self._tg.start_soon(self._resolve, name)

    async def _resolve(self, name: str) -> None:
        zc = self._zc
        if zc is None:
            self._resolving.discard(name)
            return
        try:
            resolved = await zc.resolve(SERVICE_TYPE, name, self._resolve_timeout_ms)
        except Exception as e:
            logger.debug("discovery: resolving {} failed: {!r}", name, e)
            return
        finally:
            self._resolving.discard(name)
        if resolved is not None:
            self._consider(resolved)

    def _ignore(self, name: str, why: str, *, other_version: bool = False) -> None:
        if other_version:
            self._other_version.add(name)
        else:
            self._other_version.discard(name)
        if self._ignored.get(name) != why:
            self._ignored[name] = why
            self._changed.set()
            logger.warning(
                "discovery: {} ignores {}: {}",
                self.node_id,
                printable(name.removesuffix("." + SERVICE_TYPE)),
                printable(why),
            )

    def _consider(self, found: Resolved) -> None:
        props = found.properties
        node_id = props.get(TXT_NODE_ID)
        if not node_id:
            self._ignore(found.name, "announcement without a node id")
            return
        if node_id == self.node_id:
            return
        if not re.fullmatch(NODE_ID_PATTERN, node_id):
            self._ignore(found.name, f"invalid node id {node_id!r}")
            return
        namespace = props.get(TXT_NAMESPACE) or ""
        if namespace != self.namespace:
            self._ignore(
                found.name,
                f"node {node_id} is in cluster namespace {namespace!r}, this node in {self.namespace!r}",
            )
            return
        version = _int(props.get(TXT_VERSION))
        if version != self.protocol_version:
            self._ignore(
                found.name,
                f"node {node_id} speaks mesh protocol version {props.get(TXT_VERSION)!r}, "
                f"this node {self.protocol_version}",
                other_version=True,
            )
            return
        mesh_port = _int(props.get(TXT_MESH_PORT)) or found.port
        api_port = _int(props.get(TXT_API_PORT))
        addresses = tuple(sorted(found.addresses, key=lambda a: (":" in a, a)))
        if not mesh_port or api_port is None or not addresses:
            self._ignore(found.name, f"node {node_id}: incomplete announcement {props}")
            return
        self._ignored.pop(found.name, None)
        self._other_version.discard(found.name)
        peer = DiscoveredPeer(
            node_id=NodeId(node_id),
            namespace=namespace,
            protocol_version=self.protocol_version,
            addresses=addresses,
            mesh_port=mesh_port,
            api_port=api_port,
        )
        self._names[found.name] = peer.node_id
        if self._peers.get(peer.node_id) == peer:
            return
        self._peers[peer.node_id] = peer
        self._changed.set()
        logger.info(
            "discovery: found {} at {} (mesh port {}, api port {})",
            peer.node_id,
            ", ".join(addresses),
            mesh_port,
            api_port,
        )
        if self._on_peer is not None:
            self._on_peer(peer)


def _int(value: str | None) -> int | None:
    if value is None or not value.isdigit():
        return None
    return int(value)


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True
