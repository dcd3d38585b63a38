"""Log growth of an idle 3-node cluster of real daemons (telemetry issue's target: under
100 events per node-hour when nothing changes).

Starts three `exo` daemons on loopback (separate EXO_HOMEs, `--peer`), waits until they
form one cluster, lets them idle for `--seconds` at the default telemetry interval, and
counts the entries the log gained, by kind.

    uv run python bench/bench_idle_cluster.py [--seconds 600]
"""

import argparse
import collections
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.daemon import Daemon, free_port


def entries(daemon: Daemon, start: int, end: int) -> list[dict[str, Any]]:
    got: list[dict[str, Any]] = []
    if end < start:
        return got
    with httpx.stream("GET", f"{daemon.url}/events?from={start}", timeout=30.0) as response:
        for line in response.iter_lines():
            if line.startswith("data:"):
                entry = json.loads(line[5:])
                got.append(entry)
                if entry["index"] >= end:
                    break
    return got


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=600.0)
    args = parser.parse_args()
    models = Path.home() / ".cache" / "exo" / "models"
    with tempfile.TemporaryDirectory(prefix="exo-idle-") as tmp:
        ports = [free_port() for _ in range(3)]
        daemons: list[Daemon] = []
        for i in range(3):
            peers = [a for j in range(3) if j != i for a in ("--peer", f"127.0.0.1:{ports[j]}")]
            daemon = Daemon(Path(tmp) / f"n{i}", models if models.exists() else None, *peers)
            daemon.mesh_port = ports[i]
            daemons.append(daemon)
        try:
            for daemon in daemons:
                daemon.start()
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                views = [d.get("/state") for d in daemons]
                if all(len(v["cluster"]["voters"]) == 3 for v in views):
                    break
                time.sleep(0.5)
            time.sleep(30)  # start-up inventories, first metrics and link probes settle
            start = daemons[0].get("/state")["last_index"] + 1
            time.sleep(args.seconds)
            end = daemons[0].get("/state")["last_index"]
            kinds = collections.Counter(
                str(e["event"]["kind"]) for e in entries(daemons[0], start, end)
            )
            total = sum(kinds.values())
            hours = args.seconds / 3600
            print(
                f"idle 3-node cluster, {args.seconds:.0f} s: {total} entries, "
                f"{total / hours / 3:.1f} per node-hour; by kind: {dict(kinds)}"
            )
        finally:
            for daemon in daemons:
                daemon.stop()


if __name__ == "__main__":
    main()
