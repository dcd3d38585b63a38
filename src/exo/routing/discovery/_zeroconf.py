"""The only module that touches zeroconf: a small typed adapter over its asyncio API."""

import ipaddress
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Literal, cast

import ifaddr
from zeroconf import IPVersion, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

Change = Literal["added", "updated", "removed"]

_CHANGES: dict[ServiceStateChange, Change] = {
    ServiceStateChange.Added: "added",
    ServiceStateChange.Updated: "updated",
    ServiceStateChange.Removed: "removed",
}


@dataclass(frozen=True)
class Resolved:
    name: str
    port: int | None
    addresses: tuple[str, ...]
    properties: dict[str, str | None]


def local_addresses(ipv4_only: bool) -> list[str]:
    """This host's unicast addresses, loopback and link-local last (or left out)."""
    found: list[str] = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            text = ip.ip if isinstance(ip.ip, str) else ip.ip[0]
            try:
                addr = ipaddress.ip_address(text.split("%")[0])
            except ValueError:
                continue
            if ipv4_only and addr.version != 4:
                continue
            if addr.is_loopback or addr.is_link_local or addr.is_multicast:
                continue
            found.append(str(addr))
    return sorted(set(found), key=lambda a: (":" in a, a))


class ZeroconfAdapter:
    """Register one service and browse one type; callbacks run on the event loop."""

    def __init__(self, interfaces: Sequence[str] | None, ipv4_only: bool) -> None:
        version = IPVersion.V4Only if ipv4_only else IPVersion.All
        if interfaces is None:
            zc = Zeroconf(ip_version=version)
        else:
            zc = Zeroconf(interfaces=list(interfaces), ip_version=version)
        self._azc = AsyncZeroconf(zc=zc)
        self._browser: AsyncServiceBrowser | None = None

    async def register(
        self,
        service_type: str,
        name: str,
        port: int,
        properties: dict[str, str],
        addresses: Sequence[str],
        server: str,
    ) -> None:
        info = AsyncServiceInfo(
            service_type,
            name,
            port=port,
            properties=dict(properties),
            server=server,
            parsed_addresses=list(addresses),
        )
        # zeroconf types the returned awaitable loosely; it completes after the announcements.
        announced = cast(
            "Awaitable[object]",
            await self._azc.async_register_service(info),  # pyright: ignore[reportUnknownMemberType]
        )
        await announced

    def browse(self, service_type: str, on_change: Callable[[str, Change], None]) -> None:
        def handler(
            zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange
        ) -> None:
            del zeroconf, service_type
            on_change(name, _CHANGES[state_change])

        self._browser = AsyncServiceBrowser(self._azc.zeroconf, service_type, handlers=[handler])

    async def resolve(self, service_type: str, name: str, timeout_ms: int) -> Resolved | None:
        info = AsyncServiceInfo(service_type, name)
        if not await info.async_request(self._azc.zeroconf, timeout_ms):
            return None
        return Resolved(
            name=name,
            port=info.port,
            addresses=tuple(info.parsed_scoped_addresses()),
            properties=dict(info.decoded_properties),
        )

    async def close(self) -> None:
        if self._browser is not None:
            await self._browser.async_cancel()
        await self._azc.async_close()
