"""A node whose stored log it cannot use (written by another version of exo, or damaged
before its tail) does not start on it: one clear line saying what is wrong and how to start
afresh, exit code 2, no traceback, and nothing on disk changed. Doing what the line says
starts the node."""

import json
import subprocess
from pathlib import Path

from exo.shared.eventlog import EventLogFile
from exo.shared.eventlog.framing import FILE_HEADER_SIZE, RECORD_HEADER_SIZE
from tests.daemon import Daemon


def _node_with_a_log(home: Path) -> tuple[Daemon, Path]:
    node = Daemon(home)
    node.start()
    node.stop()
    (log,) = home.rglob("cluster/raft.log")
    return node, log.parent


def _refused(node: Daemon) -> str:
    result = subprocess.run(node.argv, env=node.env, capture_output=True, text=True, timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "Traceback" not in output
    return output


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.suffix != ".lock"}


def _starts_after_doing_what_it_says(node: Daemon, cluster_dir: Path, output: str) -> None:
    aside = Path(f"{cluster_dir}.old")
    assert f"(mv {cluster_dir} {aside})" in output
    cluster_dir.rename(aside)
    try:
        node.start()
        assert node.get("/healthz") is not None
    finally:
        node.stop()


def test_a_record_of_another_version_of_exo_is_refused_with_what_to_do(tmp_path: Path) -> None:
    node, cluster_dir = _node_with_a_log(tmp_path)
    # What a newer build would have written: a whole, checksummed record with a field this
    # build does not know.
    with EventLogFile(cluster_dir / "raft.log", fsync=False) as log:
        index, payload = list(log)[-1]
        record = json.loads(payload)
        record["index"] = index + 1
        record["from_a_newer_build"] = True
        log.append_many([(index + 1, json.dumps(record).encode())])
    before = _files(cluster_dir)
    output = _refused(node)
    assert f"record {index + 1} is not readable by this version of exo" in output
    assert "from_a_newer_build" in output
    assert "Run the version of exo that wrote it" in output
    assert _files(cluster_dir) == before
    _starts_after_doing_what_it_says(node, cluster_dir, output)


def test_damage_before_the_tail_is_refused_with_what_to_do(tmp_path: Path) -> None:
    node, cluster_dir = _node_with_a_log(tmp_path)
    log_path = cluster_dir / "raft.log"
    with EventLogFile(log_path, fsync=False) as log:
        assert log.last_index - log.first_index >= 1, "needs a record after the damaged one"
    data = bytearray(log_path.read_bytes())
    data[FILE_HEADER_SIZE + RECORD_HEADER_SIZE + 2] ^= 0xFF  # the first record's payload
    log_path.write_bytes(bytes(data))
    before = _files(cluster_dir)
    output = _refused(node)
    assert "corrupt at byte" in output and "Replaying past damage would lose events" in output
    assert _files(cluster_dir) == before
    _starts_after_doing_what_it_says(node, cluster_dir, output)
