"""A node fetches a hub model's files from peers that hold them, then from the hub.

Node A downloads from a hub on loopback (tests/fake_hub.py) and serves its store through
the real API (`/hub/...`, over HTTP on loopback); node B's store names A as a peer. The
daemon-level path (the node choosing its peers from the cluster state) is in
tests/test_daemon_hub.py.
"""

import socket
import threading
import time
from collections.abc import Generator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import anyio
import httpx
import pytest

from exo.api.app import create_app
from exo.api.server import serve_http
from exo.models.convert import MARKER_NAME
from exo.models.describe import describe
from exo.models.hub import HubClient, HubError
from exo.models.store import ModelStore
from exo.node import model_sources
from exo.shared.types.events import ModelStoreProgress
from exo.shared.types.ids import NodeId
from exo.shared.types.models import ModelCard
from exo.shared.types.state import NodeInfo, State
from tests.factories import INSTANCES, MODEL, instance
from tests.fake_hub import FakeHub, FakeRepo, serving, sharded
from tests.test_api_app import ScriptedBackend
from tests.test_hub import REPO


@contextmanager
def api_of(store: ModelStore) -> Generator[str]:
    """The real API app serving `store`'s downloads on loopback: its `/hub` base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    port = sock.getsockname()[1]
    stop = threading.Event()

    async def shutdown() -> None:
        await anyio.to_thread.run_sync(stop.wait)

    app = create_app(ScriptedBackend(store=store), None)
    thread = threading.Thread(target=lambda: anyio.run(serve_http, app, sock, shutdown))
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}/hub"
    finally:
        stop.set()
        thread.join(timeout=10)


def _unreachable() -> str:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there
    return f"http://127.0.0.1:{port}"


def _card(hub: FakeHub) -> ModelCard:
    with HubClient(hub.url) as client:
        return describe(client, REPO)


def _file_requests(hub: FakeHub) -> list[str]:
    """The files the hub served whole (reading the card takes only header ranges)."""
    return [p.rsplit("/", 1)[-1] for p, r in hub.requests if p.startswith("/cdn/") and r is None]


def test_a_node_without_the_hub_fetches_a_model_from_a_peer(tmp_path: Path, repo: FakeRepo) -> None:
    with serving(FakeHub(repos={REPO: repo})) as hub:
        card = _card(hub)
        cards = {card.model_id: card}
        a = ModelStore(tmp_path / "a", card_for=cards.get, hub_endpoint=hub.url)
        a.ensure(card.model_id)
        with api_of(a) as peer:
            b = ModelStore(
                tmp_path / "b",
                card_for=cards.get,
                hub_endpoint=_unreachable(),
                peers_for=lambda _: [peer],
            )
            asked = len(hub.requests)
            progress: list[tuple[int, int]] = []
            path = b.ensure(card.model_id, lambda done, total: progress.append((done, total)))
            assert len(hub.requests) == asked  # nothing from the hub: it is not reachable
            for name in set(repo.files) - {"README.md"}:
                assert (path / name).read_bytes() == repo.files[name], name
            assert b.is_ready(card.model_id)
            assert progress[-1][0] == progress[-1][1] > 0
            # What the peer serves: whole files with Range (a part file resumes), and 404
            # for anything it does not hold whole, a path outside the listing included.
            commit = hub.repos[REPO].commit
            with httpx.Client() as http:
                url = f"{peer}/{REPO}/resolve/{commit}/model.safetensors"
                part = http.get(url, headers={"range": "bytes=10-19"})
                assert part.status_code == 206
                assert part.content == repo.files["model.safetensors"][10:20]
                for missing in (
                    f"{peer}/{REPO}/resolve/{commit}/README.md",
                    f"{peer}/{REPO}/resolve/{commit}/..%2F..%2F{MARKER_NAME}",
                    f"{peer}/{REPO}/resolve/{'f' * 40}/model.safetensors",
                    f"{peer}/other/repo/resolve/{commit}/config.json",
                    f"{peer}/api/models/other/repo/tree/{commit}",
                ):
                    answer = http.get(missing)
                    assert answer.status_code == 404, missing
                    assert answer.json()["error"]["code"] == "not_held"


def test_what_a_peer_lacks_comes_from_the_hub(tmp_path: Path, repo: FakeRepo) -> None:
    # A holds only the first stage's files of a sharded checkpoint; B runs the second
    # stage: the files both stages read come from A, the rest from the hub.
    sharded(repo, [(0, 10), (10, 20), (20, 30)], embedding=0)
    with serving(FakeHub(repos={REPO: repo})) as hub:
        card = _card(hub)
        cards = {card.model_id: card}
        a = ModelStore(tmp_path / "a", card_for=cards.get, hub_endpoint=hub.url)
        a.ensure(card.model_id, layers=range(0, 15))
        from_hub_for_a = _file_requests(hub)
        assert "model-00003-of-00003.safetensors" not in from_hub_for_a
        with api_of(a) as peer:
            b = ModelStore(
                tmp_path / "b", card_for=cards.get, hub_endpoint=hub.url, peers_for=lambda _: [peer]
            )
            path = b.ensure(card.model_id, layers=range(15, 30))
        from_hub_for_b = _file_requests(hub)[len(from_hub_for_a) :]
        # Layers 10-19 and the embedding/head file A has; layers 20-29 (and the final norm)
        # only the hub.
        assert from_hub_for_b == ["model-00003-of-00003.safetensors"]
        for name in ("model-00002-of-00003.safetensors", "model-00003-of-00003.safetensors"):
            assert (path / name).read_bytes() == repo.files[name]
        assert b.is_ready(card.model_id, range(15, 30))


def test_a_peer_serving_wrong_bytes_is_passed_over(tmp_path: Path, repo: FakeRepo) -> None:
    with serving(FakeHub(repos={REPO: repo})) as hub:
        card = _card(hub)
        cards = {card.model_id: card}
        a = ModelStore(tmp_path / "a", card_for=cards.get, hub_endpoint=hub.url)
        held = a.ensure(card.model_id) / "model.safetensors"
        spoiled = bytearray(held.read_bytes())
        spoiled[-1] ^= 0xFF
        held.write_bytes(bytes(spoiled))  # the disk rotted after A checked it
        asked = len(_file_requests(hub))
        with api_of(a) as peer:
            b = ModelStore(
                tmp_path / "b", card_for=cards.get, hub_endpoint=hub.url, peers_for=lambda _: [peer]
            )
            path = b.ensure(card.model_id)
        assert (path / "model.safetensors").read_bytes() == repo.files["model.safetensors"]
        assert _file_requests(hub)[asked:] == ["model.safetensors"]  # only that file


def test_with_no_source_left_the_hub_s_reason_is_reported(tmp_path: Path, repo: FakeRepo) -> None:
    with serving(FakeHub(repos={REPO: repo})) as hub:
        card = _card(hub)
    cards = {card.model_id: card}
    b = ModelStore(
        tmp_path / "b",
        card_for=cards.get,
        hub_endpoint=_unreachable(),
        peers_for=lambda _: [_unreachable() + "/hub"],
    )
    with pytest.raises(HubError, match="cannot reach"):
        b.ensure(card.model_id)


def _no_wait(_seconds: float) -> None:
    pass


def _wait_for(path: Path) -> None:
    for _ in range(400):
        if path.exists():
            return
        threading.Event().wait(0.025)  # not time.sleep: a test stubs it
    raise AssertionError(f"{path} did not appear")


def _both_download(
    tmp_path: Path, hub: FakeHub, script: list[tuple[str, int]] | None = None
) -> tuple[ModelStore, Path, list[HubError]]:
    """A downloads from the hub (its weights' transfers go as `script` says); once they are
    under way, B downloads with A as its peer. A's store, B's model directory, and A's
    failure if it had one."""
    card = _card(hub)  # (reading the card takes ranges of the weights: before the script)
    if script is not None:
        hub.script["model.safetensors"] = script
    cards = {card.model_id: card}
    a = ModelStore(tmp_path / "a", card_for=cards.get, hub_endpoint=hub.url)
    failed: list[HubError] = []

    def a_downloads() -> None:
        try:
            a.ensure(card.model_id)
        except HubError as e:
            failed.append(e)

    with api_of(a) as peer:
        a_done = threading.Thread(target=a_downloads)
        a_done.start()
        _wait_for(tmp_path / "a" / "exo-test--smollm2-copy" / "model.safetensors.part")
        b = ModelStore(
            tmp_path / "b", card_for=cards.get, hub_endpoint=hub.url, peers_for=lambda _: [peer]
        )
        path = b.ensure(card.model_id)
        a_done.join()
    return a, path, failed


def test_a_node_follows_a_peer_s_download_in_progress(tmp_path: Path, repo: FakeRepo) -> None:
    """Two nodes need the same file at once: B takes it from A as A's download brings it,
    and the hub sends it once."""
    with serving(FakeHub(repos={REPO: repo}, pace={"model.safetensors": 0.02})) as hub:
        a, path, failed = _both_download(tmp_path, hub)
    assert not failed and a.is_ready(REPO)
    for name in set(repo.files) - {"README.md"}:
        assert (path / name).read_bytes() == repo.files[name], name
    assert _file_requests(hub) == ["model.safetensors"]  # A's transfer, and only that


def test_a_peer_still_reading_the_listing_is_waited_for(tmp_path: Path, repo: FakeRepo) -> None:
    """B asks A for the weights while A's download still waits for the hub's listing (so
    it has not said which files it fetches): A's answer waits for that, then follows."""
    with serving(FakeHub(repos={REPO: repo}, pace={"model.safetensors": 0.02})) as hub:
        card = _card(hub)
        cards = {card.model_id: card}
        hub.listing_delays.append(1.5)  # A's listing; B's own comes at once
        a = ModelStore(tmp_path / "a", card_for=cards.get, hub_endpoint=hub.url)
        with api_of(a) as peer:
            a_done = threading.Thread(target=a.ensure, args=(card.model_id,))
            a_done.start()
            _wait_for(tmp_path / "a" / ".exo-test--smollm2-copy.lock")  # A's download began
            b = ModelStore(
                tmp_path / "b", card_for=cards.get, hub_endpoint=hub.url, peers_for=lambda _: [peer]
            )
            path = b.ensure(card.model_id)
            a_done.join()
        assert hub.listing_delays == []
        assert (path / "model.safetensors").read_bytes() == repo.files["model.safetensors"]
        assert _file_requests(hub) == ["model.safetensors"]


def test_when_the_peer_s_download_dies_the_follower_resumes_from_the_hub(
    tmp_path: Path, repo: FakeRepo, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(time, "sleep", _no_wait)  # A's waits between its tries
    weights = repo.files["model.safetensors"]
    cut = len(weights) // 2
    # A's first transfer breaks halfway, then the hub is down for all of A's tries.
    script = [("cut", cut)] + [("status", 503)] * 5
    with serving(FakeHub(repos={REPO: repo}, pace={"model.safetensors": 0.05})) as hub:
        _a, path, failed = _both_download(tmp_path, hub, script)
    assert failed and "503" in str(failed[0])
    assert (path / "model.safetensors").read_bytes() == weights
    # B had the first half from A and asked the hub for the rest only.
    resumed = hub.ranges("model.safetensors")[-1]
    assert resumed is not None and int(resumed.removeprefix("bytes=").rstrip("-")) == cut


def test_which_peers_a_node_asks_and_in_what_order() -> None:
    """Peers that finished come first (nearest first); peers still fetching come next, but
    only those before this node in id order, so that followers never form a ring."""
    me = NodeId("node-m")

    def node(name: str, status: Literal["up", "down"] = "up") -> NodeInfo:
        return NodeInfo(
            node_id=NodeId(name),
            session="s",
            hostname=name,
            api_port=52415,
            started_at_ms=0,
            status=status,
        )

    def progress(name: str, complete: bool) -> ModelStoreProgress:
        return ModelStoreProgress(
            node_id=NodeId(name),
            model_id=MODEL,
            done_bytes=10 if complete else 5,
            total_bytes=10,
            complete=complete,
        )

    names = ["node-a", "node-b", "node-c", "node-d", "node-x", "node-y", "node-z"]
    state = State(
        nodes={NodeId(n): node(n, "down" if n == "node-d" else "up") for n in names},
        model_progress={
            f"{p.node_id}/{MODEL}": p
            for p in (
                progress("node-x", complete=True),  # finished (its id after mine: no matter)
                progress("node-y", complete=True),
                progress("node-a", complete=False),  # fetching, before me
                progress("node-z", complete=False),  # fetching, after me: it may follow me
                progress("node-d", complete=True),  # down
            )
        },
        # node-b has a stage of the model assigned and has not reported yet.
        instances={INSTANCES[0]: instance(INSTANCES[0], NodeId("node-b"))},
    )
    reachable = {
        NodeId("node-a"): ("10.0.0.1", 0.001),
        NodeId("node-b"): ("10.0.0.2", 0.0005),
        NodeId("node-c"): ("10.0.0.3", 0.0001),  # holds nothing of it
        NodeId("node-d"): ("10.0.0.4", 0.0001),
        NodeId("node-x"): ("10.0.0.5", 0.003),
        NodeId("node-y"): ("fe80::1", 0.002),
        NodeId("node-z"): ("10.0.0.7", 0.0001),
    }
    assert model_sources(state, me, MODEL, reachable) == [
        "http://[fe80::1]:52415/hub",
        "http://10.0.0.5:52415/hub",
        "http://10.0.0.2:52415/hub",
        "http://10.0.0.1:52415/hub",
    ]
    # Only connected peers count, and the first of the fetching nodes asks none of them.
    assert model_sources(state, NodeId("node-0"), MODEL, {}) == []
    assert model_sources(state, NodeId("node-0"), MODEL, reachable) == [
        "http://[fe80::1]:52415/hub",
        "http://10.0.0.5:52415/hub",
    ]
