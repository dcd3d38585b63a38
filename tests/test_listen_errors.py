"""A port the node cannot listen on is one clear line and exit code 2, nothing else: no
traceback, no half-started node, and the node's home is as good as before."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from exo.shared.listen import ListenError, listen_tcp
from tests.daemon import Daemon, free_port


def run_exo(home: Path, api_port: int, mesh_port: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "exo.main",
            "--api-host",
            "127.0.0.1",
            "--api-port",
            str(api_port),
            "--mesh-host",
            "127.0.0.1",
            "--mesh-port",
            str(mesh_port),
            "--no-discovery",
        ],
        env={**os.environ, "EXO_HOME": str(home)},
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize("taken", ["api", "mesh"])
def test_a_taken_port_is_one_clear_error_and_the_node_starts_once_it_is_free(
    tmp_path: Path, taken: str
) -> None:
    api_port, mesh_port = free_port(), free_port()
    port = api_port if taken == "api" else mesh_port
    holder = socket.create_server(("127.0.0.1", port))
    try:
        result = run_exo(tmp_path, api_port, mesh_port)
    finally:
        holder.close()
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    what = "the API" if taken == "api" else "the mesh"
    assert f"cannot listen on 127.0.0.1:{port} for {what}: Address already in use" in output
    assert "Traceback" not in output
    # Nothing was left broken: the same home starts on the same ports.
    node = Daemon(tmp_path)
    node.port, node.mesh_port = api_port, mesh_port
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
