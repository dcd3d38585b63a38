"""A model from the hub, end to end: the real daemon, started with a repository id, reads its
card from a hub on loopback (tests/fake_hub.py), adds it to the cluster, downloads it when
placed, and serves it to the `openai` client."""

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from exo.models.convert import MARKER_NAME
from exo.models.store import ModelStore
from tests.conftest import BUILTIN
from tests.daemon import Daemon
from tests.fake_hub import FakeHub, FakeRepo, serving

pytestmark = pytest.mark.slow

REPO = "exo-test/smollm2-copy"


@pytest.fixture(scope="module")
def hub(shared_models: Path) -> Iterator[FakeHub]:
    builtin = ModelStore(shared_models).ensure(BUILTIN)
    files = {p.name: p.read_bytes() for p in builtin.iterdir() if p.name != MARKER_NAME}
    with serving(FakeHub(repos={REPO: FakeRepo(files)})) as hub:
        yield hub


def test_a_hub_model_named_at_start_is_added_downloaded_and_served(
    tmp_path: Path, shared_models: Path, hub: FakeHub
) -> None:
    # Its own store: the download must happen here (the built-in model is linked in).
    node = Daemon(tmp_path / "node", None, "--hf-endpoint", hub.url, "--model", REPO)
    store = tmp_path / "node" / "cache" / "models"
    store.mkdir(parents=True)
    (store / BUILTIN).symlink_to(shared_models / BUILTIN, target_is_directory=True)
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
        client = openai.OpenAI(
            base_url=f"{node.url}/v1", api_key="unused", timeout=300.0, max_retries=0
        )
        assert REPO in [m.id for m in client.models.list().data]
        replies: dict[str, str] = {}
        for model in (BUILTIN, REPO):
            reply = client.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": "Name three colours."}],
                max_tokens=16,
                temperature=0.0,
            )
            replies[model] = reply.choices[0].message.content or ""
        # The same weights under another name: the same greedy answer.
        assert replies[REPO] == replies[BUILTIN] != ""
        body = node.get("/state")
        progress = body["state"]["model_progress"][f"{body['node_id']}/{REPO}"]
        served = sum(len(c) for c in hub.repos[REPO].files.values())
        assert progress["complete"]
        assert progress["done_bytes"] == progress["total_bytes"] == served
        assert (store / "exo-test--smollm2-copy" / "model.safetensors").is_file()
    finally:
        node.stop()
