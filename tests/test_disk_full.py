"""A node whose disk fills up stops with one clear line, and starts again on the same home
with everything it had committed. The daemon's files are capped with RLIMIT_FSIZE (writes
past the cap fail as on a full disk, without root or a small filesystem)."""

import resource
import signal
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.daemon import Daemon

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m-instruct"
# Room for the node to start and commit a few dozen events, not for a converted model.
CAP_BYTES = 48 * 1024


def _capped() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failed write, not a killed process
    resource.setrlimit(
        resource.RLIMIT_FSIZE, (CAP_BYTES, resource.getrlimit(resource.RLIMIT_FSIZE)[1])
    )


def test_a_full_disk_stops_the_node_plainly_and_loses_nothing_committed(tmp_path: Path) -> None:
    node = Daemon(tmp_path / "home")
    node.home.mkdir(parents=True)
    # A log file all but at the cap: its writes fail from the first records on.
    log_file = node.home / "cache" / "logs" / "exo.jsonl"
    log_file.parent.mkdir(parents=True)
    log_file.write_bytes(b"\n" * (CAP_BYTES - 256))
    # Output through a pipe: a file of ours would be capped too.
    process = subprocess.Popen(
        node.argv,
        env=node.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        preexec_fn=_capped,
    )
    chunks: list[bytes] = []
    assert process.stdout is not None
    reader = threading.Thread(target=lambda: chunks.extend(process.stdout or []), daemon=True)
    reader.start()
    committed = 0
    deadline = time.monotonic() + 150
    try:
        # Each placement commits events (the instance, its runner failing to convert the
        # model into the capped store, its removal) until the log cannot grow.
        while process.poll() is None and time.monotonic() < deadline:
            try:
                committed = max(committed, node.get("/state")["last_index"])
                placed = httpx.post(f"{node.url}/instances", json={"model": MODEL}, timeout=10)
                instance = placed.json().get("instance_id")
                if instance:
                    httpx.delete(f"{node.url}/instances/{instance}", timeout=10)
            except (httpx.HTTPError, ValueError):  # starting, or stopping: no answer
                time.sleep(0.2)
        code = process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    reader.join(timeout=10)
    output = b"".join(chunks).decode(errors="replace")
    assert code == 1, output[-4000:]
    assert "exo stopped: the replicated log could not be written" in output, output[-4000:]
    assert "Make room (or mend the disk)" in output
    assert "unhandled errors in a TaskGroup" not in output
    # The log file's failing writes are said once, not an error block per record.
    assert "Logging error" not in output
    assert output.count(f"the log file {log_file} cannot be written (") == 1, output[-4000:]
    assert committed > 0

    # The same home, room again: the node starts, with every event it had committed.
    try:
        node.start()
        assert node.get("/state")["last_index"] >= committed
        placed = httpx.post(f"{node.url}/instances", json={"model": MODEL}, timeout=30)
        assert placed.status_code < 300, placed.text
    finally:
        node.stop()
