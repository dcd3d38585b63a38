"""A node fetches a hub model's files from peers that hold them, then from the hub.

Node A downloads from a hub on loopback (tests/fake_hub.py) and serves its store through
the real API (`/hub/...`, over HTTP on loopback); node B's store names A as a peer. The
daemon-level path (the node choosing its peers from the cluster state) is in
tests/test_daemon_hub.py.
"""

import socket
import threading
from collections.abc import Generator
from contextlib import contextmanager
from pathlib import Path

import anyio
import httpx
import pytest

from exo.api.app import create_app
from exo.api.server import serve_http
from exo.models.convert import MARKER_NAME
from exo.models.describe import describe
from exo.models.hub import HubClient, HubError
from exo.models.store import ModelStore
from exo.shared.types.models import ModelCard
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
