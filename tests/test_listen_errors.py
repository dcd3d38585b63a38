"""A port the node cannot listen on is one clear line and exit code 2, nothing else: no
traceback, no half-started node, and the node's home is as good as before."""

import socket
import subprocess
from pathlib import Path

import pytest

from exo.shared.listen import ListenError, listen_tcp
from tests.daemon import Daemon, free_port


@pytest.mark.parametrize("taken", ["api", "mesh"])
def test_a_taken_port_is_one_clear_error_and_the_node_starts_once_it_is_free(
    tmp_path: Path, taken: str
) -> None:
    node = Daemon(tmp_path)
    port = node.port if taken == "api" else node.mesh_port
    holder = socket.create_server(("127.0.0.1", port))
    try:
        result = subprocess.run(
            node.argv, env=node.env, capture_output=True, text=True, timeout=120
        )
    finally:
        holder.close()
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    what = "the API" if taken == "api" else "the mesh"
    assert f"cannot listen on 127.0.0.1:{port} for {what}: Address already in use" in output
    assert "Traceback" not in output
    # Nothing was left broken: the same home starts on the same ports.
    try:
        node.start()
        assert node.get("/healthz") is not None
    finally:
        node.stop()


def test_listen_errors_name_the_cause() -> None:
    with pytest.raises(ListenError, match="not one of this machine's"):
        listen_tcp("the API", "203.0.113.7", free_port())  # TEST-NET-3: never local
    if not _privileged():
        with pytest.raises(ListenError, match="below 1024 need privileges"):
            listen_tcp("the API", "127.0.0.1", 81)


def _privileged() -> bool:
    try:
        socket.create_server(("127.0.0.1", 81)).close()
    except OSError:
        return False
    return True
