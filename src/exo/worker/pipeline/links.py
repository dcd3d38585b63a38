"""TCP links between consecutive stage runners: one listener per runner, one outgoing link.

Reader threads turn the bytes of each accepted connection into `Received` frames on the
stage's event queue; a put blocks when the queue is full, so a slow stage pushes back on
its sender through TCP instead of dropping anything. The outgoing link is written by the
stage's main thread (`send`), whole frames at a time.
"""

import ipaddress
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO, cast

import psutil
from loguru import logger

from exo.worker.pipeline.frames import Frame, StreamCorrupt, read_frame

_CONNECT_RETRY_S = 0.2


@dataclass(frozen=True)
class Received:
    frame: Frame


@dataclass(frozen=True)
class LinkLost:
    """An incoming link that had carried frames closed or went out of step."""

    reason: str


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def bind_host(advertised: str) -> str:
    """Where a runner listens: loopback only when that is all the node advertises."""
    return "127.0.0.1" if is_loopback(advertised) else "0.0.0.0"


def advertised_host(api_host: str) -> str:
    """The address other nodes reach this node's stages at: the API host when it is a
    concrete address, else the first non-loopback IPv4 address (loopback if none)."""
    try:
        address = ipaddress.ip_address(api_host)
    except ValueError:
        address = None
    if address is not None and not address.is_unspecified:
        return api_host
    for addresses in psutil.net_if_addrs().values():
        for a in addresses:
            if a.family == socket.AF_INET and not ipaddress.ip_address(a.address).is_loopback:
                return a.address
    return "127.0.0.1"


def listen_socket(host: str) -> socket.socket:
    """A stage's listening socket on a port the kernel picks. The worker binds it and hands
    the open socket to its runner (no window in which another process could take the port
    between choosing it and binding it)."""
    return socket.create_server((host, 0), reuse_port=False)


class StageListener:
    """Accepts the previous stage's connection (and, on the first stage, the last's) on a
    listening socket it takes over."""

    def __init__(self, sock: socket.socket, put: Callable[[Received | LinkLost], None]) -> None:
        self._put = put
        self._sock = sock
        self.port = int(sock.getsockname()[1])
        self._closed = False
        threading.Thread(target=self._accept, name="stage-accept", daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, peer = self._sock.accept()
            except OSError:
                return
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            name = f"stage-in-{peer[0]}:{peer[1]}"
            threading.Thread(target=self._read, args=(conn, name), name=name, daemon=True).start()

    def _read(self, conn: socket.socket, name: str) -> None:
        stream = cast(BinaryIO, conn.makefile("rb", buffering=1 << 20))
        carried = False
        reason = "closed by the previous stage"
        try:
            while (frame := read_frame(stream)) is not None:
                carried = True
                self._put(Received(frame))
        except StreamCorrupt as exc:
            logger.error(f"{name}: corrupt activation stream, closing it: {exc}")
            reason = f"corrupt activation stream: {exc}"
        except OSError as exc:
            reason = f"connection error: {exc}"
        finally:
            conn.close()
        # A connection that never carried a frame (a port probe) is no pipeline link.
        if carried and not self._closed:
            self._put(LinkLost(f"incoming link {name} lost: {reason}"))

    def close(self) -> None:
        self._closed = True
        self._sock.close()


class StageSender:
    """The link to the next stage (from the last stage: back to the first)."""

    def __init__(self, sock: socket.socket, target: str) -> None:
        self._sock = sock
        self.target = target
        self._lock = threading.Lock()

    @classmethod
    def connect(cls, host: str, port: int, timeout_s: float) -> "StageSender":
        """Connect, retrying while the next stage's runner starts listening."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                sock = socket.create_connection((host, port), timeout=5.0)
                break
            except OSError as exc:
                if time.monotonic() >= deadline:
                    raise ConnectionError(
                        f"could not connect to the next stage at {host}:{port} within "
                        f"{timeout_s:g}s: {exc}"
                    ) from None
                time.sleep(_CONNECT_RETRY_S)
        sock.settimeout(None)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(sock, f"{host}:{port}")

    def send(self, frame: bytes) -> None:
        with self._lock:
            self._sock.sendall(frame)

    def close(self) -> None:
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
