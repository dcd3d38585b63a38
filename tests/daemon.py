"""Real `exo` daemons as subprocesses on loopback, each with its own EXO_HOME and port."""

import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

from exo.worker.engines.torch.compile_env import COMPILE_ENV

_handed_out: set[int] = set()


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A loopback port for a daemon to bind later, below the kernel's ephemeral range.

    A port the kernel picked (bind to 0) is in that range, and by the time the daemon binds
    it an outgoing connection or a runner's listener may hold it (CI once failed on exactly
    that: "Address already in use"). Below the range only explicit binds take ports; each
    port is handed out once per test process."""
    low = min(_ephemeral_low(), 32768)
    while True:
        port = random.randrange(10000, low)
        if port in _handed_out:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port


# A test daemon's torch stages step eagerly unless its test asks for the compiled decode
# (`compiled=True`). Compiling a stage's decode steps costs 40-60 s of every runner load on
# a 2-core machine even with inductor's cache warm (dynamo traces each graph anew; eager:
# ready in ~10 s), and the cluster, failover, download and dashboard tests load runners
# dozens of times for what they check. The compiled path runs end to end in
# tests/test_daemon_api.py and tests/test_daemon_pipeline.py (their daemons),
# tests/test_pipeline_chain.py and tests/test_runner_process.py (runner processes), and
# tests/test_torch_engine.py.
EAGER = {COMPILE_ENV: "0"}


class Daemon:
    def __init__(
        self,
        home: Path,
        shared_models: Path | None = None,
        *args: str,
        compiled: bool = False,
    ) -> None:
        self.home = home
        self.compiled = compiled
        self.port = free_port()
        self.mesh_port = free_port()
        # Daemons of a test find each other by --peer; mDNS only where a test asks for it.
        discovery = () if "--discovery-interface" in args else ("--no-discovery",)
        self.args = (*discovery, *args)
        self.log_path = home / "daemon.out"
        self.process: subprocess.Popen[bytes] | None = None
        if shared_models is not None:  # conversion is tested elsewhere; reuse one copy
            models = home / "cache" / "models"
            models.parent.mkdir(parents=True, exist_ok=True)
            if not models.exists():
                models.symlink_to(shared_models, target_is_directory=True)

    @property
    def mesh_address(self) -> str:
        return f"127.0.0.1:{self.mesh_port}"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def argv(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "exo.main",
            "--api-host",
            "127.0.0.1",
            "--api-port",
            str(self.port),
            "--mesh-host",
            "127.0.0.1",
            "--mesh-port",
            str(self.mesh_port),
            *self.args,
        ]

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, **({} if self.compiled else EAGER), "EXO_HOME": str(self.home)}

    def start(self, timeout_s: float = 120.0) -> "Daemon":
        self.home.mkdir(parents=True, exist_ok=True)
        out = self.log_path.open("ab")
        self.process = subprocess.Popen(
            self.argv, env=self.env, stdout=out, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"daemon exited with {self.process.returncode}:\n{self.output()}"
                )
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"daemon did not come up:\n{self.output()}")

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def get(self, path: str) -> Any:
        response = httpx.get(f"{self.url}{path}", timeout=30.0)
        response.raise_for_status()
        return response.json()

    def runner_pids(self) -> list[int]:
        assert self.process is not None
        children = psutil.Process(self.process.pid).children(recursive=True)
        return [c.pid for c in children if "exo.worker.runner" in " ".join(c.cmdline())]

    def wait_ready(self, model: str, timeout_s: float = 180.0) -> dict[str, Any]:
        """Place `model` (idempotent) and wait until its runners serve."""
        httpx.post(f"{self.url}/instances", json={"model": model}, timeout=30.0).raise_for_status()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            state = self.get("/state")["state"]
            for inst in state["instances"].values():
                kinds = [
                    state["runners"].get(s["runner_id"], {}).get("kind") for s in inst["shards"]
                ]
                if (
                    inst["model_id"] == model
                    and inst["failed_reason"] is None
                    and all(k in ("ready", "running") for k in kinds)
                ):
                    return inst
            time.sleep(0.25)
        raise TimeoutError(f"{model} did not become ready:\n{self.output()}")

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 30.0) -> int:
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.process.send_signal(sig)
        try:
            return self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise

    def kill(self) -> None:
        """SIGKILL the daemon (and, like a crash of the machine's process tree, its runners)."""
        assert self.process is not None
        runners = self.runner_pids()
        self.process.kill()
        self.process.wait()
        for pid in runners:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def start_cluster(root: Path, models: Path, n: int, *extra: str) -> list[Daemon]:
    mesh_ports = [free_port() for _ in range(n)]
    daemons: list[Daemon] = []
    for i in range(n):
        peers = [a for j in range(n) if j != i for a in ("--peer", f"127.0.0.1:{mesh_ports[j]}")]
        daemon = Daemon(root / f"node{i}", models, *peers, *extra)
        daemon.mesh_port = mesh_ports[i]
        daemons.append(daemon)
    for daemon in daemons:
        daemon.start()
    return daemons
