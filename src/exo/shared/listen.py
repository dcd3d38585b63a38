"""Listening sockets a node needs (its API, its mesh), with one clear error when it cannot."""

import errno
import os
import socket

_HINTS = {
    errno.EADDRINUSE: "another program holds it (another exo on this machine?): stop it or "
    "choose another port",
    errno.EACCES: "ports below 1024 need privileges: choose a port above 1023",
    errno.EADDRNOTAVAIL: "that address is not one of this machine's",
}


class ListenError(Exception):
    """A node could not listen where it was told to: an operator's mistake, in one line."""


def listen_error(what: str, host: str, port: int, exc: OSError) -> ListenError:
    hint = _HINTS.get(exc.errno or 0)
    reason = os.strerror(exc.errno) if exc.errno else str(exc)
    return ListenError(
        f"cannot listen on {host}:{port} for {what}: {reason}" + (f"; {hint}" if hint else "")
    )


def listen_tcp(what: str, host: str, port: int) -> socket.socket:
    """A TCP socket bound and listening on host:port (address reuse on, as servers do)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, backlog=1024)
    except OSError as exc:
        raise listen_error(what, host, port, exc) from None
