"""The model store's size limit (`--model-store-max-gb`): before a download, whole hub
models that no instance on the node runs are removed, least recently used first."""

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from exo.models.describe import describe
from exo.models.hub import HubClient
from exo.models.store import ModelStore
from exo.shared.types.ids import ModelId
from exo.shared.types.models import ModelCard
from tests.fake_hub import FakeHub, FakeRepo, serving

NAMES = ("exo-test/model-a", "exo-test/model-b", "exo-test/model-c")


@pytest.fixture
def hub(repo: FakeRepo) -> Iterator[FakeHub]:
    with serving(FakeHub(repos={name: FakeRepo(dict(repo.files)) for name in NAMES})) as hub:
        yield hub


def _cards(hub: FakeHub) -> dict[ModelId, ModelCard]:
    with HubClient(hub.url) as client:
        cards = [describe(client, name) for name in NAMES]
    return {card.model_id: card for card in cards}


def _store(root: Path, hub: FakeHub, models: float, in_use: frozenset[ModelId]) -> ModelStore:
    """A store whose limit holds `models` copies of the model."""
    cards = _cards(hub)
    one = sum(len(b) for b in hub.repos[NAMES[0]].files.values())
    return ModelStore(
        root,
        card_for=cards.get,
        hub_endpoint=hub.url,
        max_bytes=int(models * one),
        in_use=lambda: in_use,
    )


def _held(root: Path) -> set[str]:
    return {p.name for p in root.iterdir() if p.is_dir()}


def _prepare_in_turn(store: ModelStore, *names: str) -> None:
    for name in names:
        store.ensure(name)
        time.sleep(0.02)  # distinct last-use times, whatever the file system's clock


def test_the_least_recently_used_model_makes_room(tmp_path: Path, hub: FakeHub) -> None:
    store = _store(tmp_path, hub, models=2.5, in_use=frozenset())
    a, b, c = NAMES
    _prepare_in_turn(store, a, b, a)  # a used again: b is now the least recently used
    assert _held(tmp_path) == {"exo-test--model-a", "exo-test--model-b"}
    store.ensure(c)
    assert _held(tmp_path) == {"exo-test--model-a", "exo-test--model-c"}
    assert store.is_ready(a) and store.is_ready(c) and not store.is_ready(b)


def test_a_model_in_use_is_never_removed(tmp_path: Path, hub: FakeHub) -> None:
    a, b, c = NAMES
    store = _store(tmp_path, hub, models=2.5, in_use=frozenset({ModelId(b)}))
    _prepare_in_turn(store, a, b, a)
    store.ensure(c)  # b is the least recently used, but an instance here runs it
    assert _held(tmp_path) == {"exo-test--model-b", "exo-test--model-c"}


def test_with_nothing_to_remove_the_download_goes_ahead_over_the_limit(
    tmp_path: Path, hub: FakeHub
) -> None:
    a, b, _c = NAMES
    store = _store(tmp_path, hub, models=1.5, in_use=frozenset({ModelId(a)}))
    _prepare_in_turn(store, a, b)
    assert _held(tmp_path) == {"exo-test--model-a", "exo-test--model-b"}
    assert store.is_ready(a) and store.is_ready(b)
