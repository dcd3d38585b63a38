"""A model from the hub, end to end: the real daemon, started with a repository id, reads its
card from a hub on loopback (tests/fake_hub.py), adds it to the cluster, downloads it when
placed, and serves it to the `openai` client."""

import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from exo.models.convert import MARKER_NAME
from exo.models.store import ModelStore
from tests.conftest import BUILTIN
from tests.daemon import Daemon, free_port
from tests.fake_hub import FakeHub, FakeRepo, serving, sharded

pytestmark = pytest.mark.slow

REPO = "exo-test/smollm2-copy"
OTHER = "exo-test/smollm2-copy-2"


def _own_store(home: Path, shared_models: Path, *args: str) -> Daemon:
    """A daemon whose model store is its own (downloads land there), the built-in model
    linked in."""
    store = home / "cache" / "models"
    store.mkdir(parents=True)
    (store / BUILTIN).symlink_to(shared_models / BUILTIN, target_is_directory=True)
    return Daemon(home, None, *args)


def _client(node: Daemon) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{node.url}/v1", api_key="unused", timeout=300.0, max_retries=0)


def _greedy(node: Daemon, model: str) -> str:
    reply = _client(node).chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Name three colours."}],
        max_tokens=16,
        temperature=0.0,
    )
    return reply.choices[0].message.content or ""


def _delete_instances(node: Daemon) -> None:
    for view in node.get("/instances")["data"]:
        iid = view["instance"]["instance_id"]
        httpx.delete(f"{node.url}/instances/{iid}", timeout=30.0).raise_for_status()


@pytest.fixture(scope="module")
def hub(shared_models: Path) -> Iterator[FakeHub]:
    builtin = ModelStore(shared_models).ensure(BUILTIN)
    files = {p.name: p.read_bytes() for p in builtin.iterdir() if p.name != MARKER_NAME}
    with serving(FakeHub(repos={REPO: FakeRepo(files)})) as hub:
        yield hub


def test_a_hub_model_named_at_start_is_added_downloaded_and_served(
    tmp_path: Path, shared_models: Path, hub: FakeHub
) -> None:
    # Room for one copy of the model (~0.1 GB), not two.
    limit = ("--model-store-max-gb", "0.15")
    node = _own_store(
        tmp_path / "node", shared_models, "--hf-endpoint", hub.url, "--model", REPO, *limit
    )
    store = tmp_path / "node" / "cache" / "models"
    node.start()
    try:
        # `--model` adds the repository and places it, with no request from us.
        deadline = time.monotonic() + 60.0
        while time.monotonic() < deadline:
            state = node.get("/state")["state"]
            if REPO in state["models"] and any(
                i["model_id"] == REPO for i in state["instances"].values()
            ):
                break
            time.sleep(0.25)
        else:
            raise AssertionError(f"{REPO} was not added and placed at start:\n{node.output()}")
        node.wait_ready(REPO)
        # Added again by hand (the same commit): nothing changes.
        added = httpx.post(f"{node.url}/models", json={"repo": REPO}, timeout=60.0)
        assert added.status_code == 200, added.text
        assert added.json()["model_id"] == REPO
        assert REPO in [m.id for m in _client(node).models.list().data]
        # The same weights under another name: the same greedy answer.
        answer = _greedy(node, BUILTIN)
        assert _greedy(node, REPO) == answer != ""
        body = node.get("/state")
        node_id = body["node_id"]
        progress = body["state"]["model_progress"][f"{node_id}/{REPO}"]
        served = sum(len(c) for c in hub.repos[REPO].files.values())
        assert progress["complete"]
        assert progress["done_bytes"] == progress["total_bytes"] == served
        assert (store / "exo-test--smollm2-copy" / "model.safetensors").is_file()
        # Refused while an instance of it runs.
        busy = httpx.delete(f"{node.url}/models/{REPO}", timeout=30.0)
        assert busy.status_code == 400 and "delete them first" in busy.text
        _delete_instances(node)

        # The store holds one copy (--model-store-max-gb): placing a second model removes
        # the first one's files, and the state stops counting this node as a copy of it.
        hub.repos[OTHER] = FakeRepo(dict(hub.repos[REPO].files))
        assert httpx.post(f"{node.url}/models", json={"repo": OTHER}, timeout=60.0).is_success
        node.wait_ready(OTHER)
        assert _greedy(node, OTHER) == answer
        assert not (store / "exo-test--smollm2-copy").exists()
        assert (store / "exo-test--smollm2-copy-2" / "model.safetensors").is_file()
        assert f"removed the files of {REPO}" in node.output()
        progress = node.get("/state")["state"]["model_progress"]
        assert f"{node_id}/{REPO}" not in progress
        assert progress[f"{node_id}/{OTHER}"]["complete"]

        # Files deleted by hand while the daemon is down: it says so when it starts again
        # (restarted without `--model`, which would place REPO again).
        _delete_instances(node)
        node.stop()
        shutil.rmtree(store / "exo-test--smollm2-copy-2")
        node.args = tuple(a for a in node.args if a not in ("--model", REPO))
        node.start()
        deadline = time.monotonic() + 30.0
        while f"{node_id}/{OTHER}" in node.get("/state")["state"]["model_progress"]:
            assert time.monotonic() < deadline, node.output()
            time.sleep(0.2)
        assert f"the files of {OTHER} left the store while this node was down" in node.output()
        # Placed again, they come back.
        node.wait_ready(OTHER)
        assert (store / "exo-test--smollm2-copy-2" / "model.safetensors").is_file()
        assert node.get("/state")["state"]["model_progress"][f"{node_id}/{OTHER}"]["complete"]

        # Removed from the catalogue: the node deletes its files.
        _delete_instances(node)
        assert httpx.delete(f"{node.url}/models/{OTHER}", timeout=30.0).status_code == 200
        assert OTHER not in [m.id for m in _client(node).models.list().data]
        deadline = time.monotonic() + 30.0
        while (store / "exo-test--smollm2-copy-2").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not (store / "exo-test--smollm2-copy-2").exists(), node.output()
    finally:
        node.stop()


SHARDED = "exo-test/smollm2-sharded"


def test_a_pipeline_of_a_sharded_hub_model_fetches_each_stage_s_files_on_its_node(
    tmp_path: Path, shared_models: Path, hub: FakeHub
) -> None:
    """Two nodes, one stage each: each node downloads only the files its layers are in;
    then one node runs the whole model and takes the file it lacks from the other."""
    # The embedding in a file of its own (both stages read it: the head is tied), then
    # layers 0-14 and 15-29 (with the final norm).
    repo = FakeRepo(dict(hub.repos[REPO].files))
    hub.repos[SHARDED] = sharded(repo, [(0, 15), (15, 30)], embedding=2)
    names = sorted(f for f in repo.files if f.endswith(".safetensors"))
    embedding, first, second = names[2], names[0], names[1]
    mesh_ports = [free_port(), free_port()]
    nodes: list[Daemon] = []
    for i in range(2):
        peer = f"127.0.0.1:{mesh_ports[1 - i]}"
        node = _own_store(
            tmp_path / f"node{i}", shared_models, "--hf-endpoint", hub.url, "--peer", peer
        )
        node.mesh_port = mesh_ports[i]
        nodes.append(node.start())
    try:
        ids = [n.get("/state")["node_id"] for n in nodes]
        stages = [
            {"node_id": ids[0], "engine": "torch", "start_layer": 0, "end_layer": 15},
            {"node_id": ids[1], "engine": "torch", "start_layer": 15, "end_layer": 30},
        ]
        placed = httpx.post(
            f"{nodes[0].url}/instances", json={"model": SHARDED, "stages": stages}, timeout=60.0
        )
        assert placed.status_code == 201, placed.text
        nodes[0].wait_ready(SHARDED, timeout_s=300.0)
        assert _greedy(nodes[1], SHARDED) == _greedy(nodes[1], BUILTIN) != ""
        held = [
            {p.name for p in (n.home / "cache" / "models" / "exo-test--smollm2-sharded").iterdir()}
            for n in nodes
        ]
        assert {first, embedding} <= held[0] and second not in held[0]
        assert {second, embedding} <= held[1] and first not in held[1]

        def whole_downloads(name: str) -> int:
            # Whole transfers only: reading the card takes header ranges.
            served = [p for p, r in hub.requests if p.startswith("/cdn/") and r is None]
            return sum(1 for p in served if p.endswith(f"/{name}"))

        from_hub = whole_downloads(first)
        assert from_hub == 1
        # Both stages read the embedding's file, fetched at the same time: one node took
        # it from the hub, the other followed that download (nodes[i].output() says which).
        assert whole_downloads(embedding) == 1, nodes[0].output() + nodes[1].output()

        # The whole model on the second node: the first stage's file comes from the first
        # node (a peer that holds it, over its API on the LAN), not again from the hub.
        _delete_instances(nodes[0])
        whole = [{"node_id": ids[1], "engine": "torch", "start_layer": 0, "end_layer": 30}]
        placed = httpx.post(
            f"{nodes[1].url}/instances", json={"model": SHARDED, "stages": whole}, timeout=60.0
        )
        assert placed.status_code == 201, placed.text
        nodes[1].wait_ready(SHARDED, timeout_s=300.0)
        assert _greedy(nodes[1], SHARDED) == _greedy(nodes[1], BUILTIN) != ""
        store1 = nodes[1].home / "cache" / "models" / "exo-test--smollm2-sharded"
        assert (store1 / first).read_bytes() == repo.files[first]
        assert whole_downloads(first) == from_hub, nodes[1].output()
        peer_api = f"{nodes[0].url}/hub"
        assert f"{SHARDED}/{first}: {len(repo.files[first])} bytes from {peer_api}" in (
            nodes[1].output()
        )
    finally:
        for node in nodes:
            node.stop()
