"""A hub model's files from a peer: how fast a node serves its downloads (`/hub` on its API).

Node A's store holds a repository of one large safetensors file (random bytes), fetched
from a hub on loopback (tests/fake_hub.py). A real `exo` daemon on A's EXO_HOME serves it;
this process then downloads it from that daemon as a peer would (`download_model`: the
transfer, the part file, the sha256 check). The reference, measured in the same run, is
the same bytes over a bare loopback socket (`socket.sendfile` to a reader that writes them
to disk): what the machine allows without HTTP or checks.

    uv run python bench/bench_peer_download.py [--mb 1024] [--rounds 3]
"""

import argparse
import os
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.daemon import Daemon
from tests.fake_hub import FakeHub, FakeRepo, serving

from exo.models.download import download_model
from exo.models.hub import HubClient, HubSource

REPO = "bench/peer-copy"
_CHUNK = 1 << 20


def raw_loopback_s(path: Path, dest: Path) -> float:
    """Seconds to move `path` over a loopback socket (sendfile) into `dest`."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def send() -> None:
        conn, _ = server.accept()
        with conn, path.open("rb") as f:
            conn.sendfile(f)

    sender = threading.Thread(target=send)
    sender.start()
    start = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as sock, dest.open("wb") as out:
        buffer = bytearray(_CHUNK)
        view = memoryview(buffer)
        while n := sock.recv_into(buffer):
            out.write(view[:n])
    elapsed = time.perf_counter() - start
    sender.join()
    server.close()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description="a hub model's files from a peer")
    parser.add_argument("--mb", type=int, default=1024, help="size of the weights file")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    size = args.mb * _CHUNK
    work = Path(tempfile.mkdtemp(prefix="exo-peer-bench-"))
    try:
        weights = os.urandom(size)
        repo = FakeRepo({"config.json": b"{}", "model.safetensors": weights})
        source = HubSource(REPO, repo.commit)
        home = work / "a"
        held = home / "cache" / "models" / REPO.replace("/", "--")
        with serving(FakeHub(repos={REPO: repo})) as hub, HubClient(hub.url) as client:
            start = time.perf_counter()
            download_model([client], source, held, None, n_layers=1)
            from_hub_s = time.perf_counter() - start
        del weights, repo
        print(f"{args.mb} MiB file; from the hub on loopback (Python http.server): "
              f"{args.mb / from_hub_s:.0f} MiB/s")  # fmt: skip
        node = Daemon(home).start()
        try:
            peer_s: list[float] = []
            raw_s: list[float] = []
            for _ in range(args.rounds):
                dest = work / "b"
                shutil.rmtree(dest, ignore_errors=True)
                with HubClient(f"{node.url}/hub") as peer:
                    start = time.perf_counter()
                    download_model([peer], source, dest, None, n_layers=1)
                    peer_s.append(time.perf_counter() - start)
                raw = work / "raw.bin"
                raw_s.append(raw_loopback_s(held / "model.safetensors", raw))
                raw.unlink()
        finally:
            node.stop()
        peer, raw = statistics.median(peer_s), statistics.median(raw_s)
        print(f"from a peer's API (download, part file, sha256): {args.mb / peer:.0f} MiB/s "
              f"(median of {args.rounds}; {', '.join(f'{args.mb / s:.0f}' for s in peer_s)})")  # fmt: skip
        print(f"bare loopback socket (sendfile, written to disk): {args.mb / raw:.0f} MiB/s")
        print(f"ratio peer / bare: {raw / peer:.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
