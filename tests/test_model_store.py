"""The model store: converts the built-in model once, redoes interrupted work, knows its cards."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from exo.models import convert
from exo.models.cards import BUILTIN_MODEL_ID, KNOWN_CARDS, UnknownModelError
from exo.models.convert import MARKER_NAME, WEIGHTS_NAME, ConversionRecord, NotEnoughDiskSpace
from exo.models.store import ModelStore


class ProgressLog:
    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []

    def __call__(self, done: int, total: int) -> None:
        self.calls.append((done, total))


@pytest.fixture(scope="module")
def ready_store(tmp_path_factory: pytest.TempPathFactory) -> ModelStore:
    store = ModelStore(tmp_path_factory.mktemp("cache") / "models")
    store.ensure(BUILTIN_MODEL_ID)
    return store


def tensor_sizes(weights: Path) -> dict[str, int]:
    """Bytes of each tensor, from the safetensors header."""
    with weights.open("rb") as file:
        header_size = int.from_bytes(file.read(8), "little")
        header: dict[str, dict[str, list[int]]] = json.loads(file.read(header_size))
    header.pop("__metadata__", None)
    return {
        name: entry["data_offsets"][1] - entry["data_offsets"][0] for name, entry in header.items()
    }


def test_ensure_converts_once_and_reports_bounded_progress(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "models")
    assert not store.is_ready(BUILTIN_MODEL_ID)
    first = ProgressLog()
    path = store.ensure(BUILTIN_MODEL_ID, first)
    assert path == store.path_for(BUILTIN_MODEL_ID)
    assert store.is_ready(BUILTIN_MODEL_ID)
    assert 2 <= len(first.calls) <= 102
    assert [done for done, _ in first.calls] == sorted(done for done, _ in first.calls)
    total = first.calls[-1][1]
    assert first.calls[-1] == (total, total)

    marker = path / MARKER_NAME
    converted_at = marker.stat().st_mtime_ns
    second = ProgressLog()
    assert store.ensure(BUILTIN_MODEL_ID, second) == path
    assert second.calls == []
    assert marker.stat().st_mtime_ns == converted_at
    # Nothing but the model and its lock file is left next to it.
    assert sorted(p.name for p in store.root.iterdir()) == [
        f".{BUILTIN_MODEL_ID}.lock",
        BUILTIN_MODEL_ID,
    ]


def test_interrupted_conversions_are_redone(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "models")
    path = store.path_for(BUILTIN_MODEL_ID)
    # A converter killed mid-way leaves its staging directory and, say, a half-written dir.
    leftover = store.root / f".{BUILTIN_MODEL_ID}.partial-99999-deadbeef"
    leftover.mkdir(parents=True)
    (leftover / WEIGHTS_NAME).write_bytes(b"truncated")
    path.mkdir()
    (path / WEIGHTS_NAME).write_bytes(b"truncated")
    assert not store.is_ready(BUILTIN_MODEL_ID)

    store.ensure(BUILTIN_MODEL_ID)
    assert store.is_ready(BUILTIN_MODEL_ID)
    assert not leftover.exists()
    assert (path / WEIGHTS_NAME).stat().st_size > 90_000_000

    (path / MARKER_NAME).unlink()
    assert not store.is_ready(BUILTIN_MODEL_ID)
    log = ProgressLog()
    store.ensure(BUILTIN_MODEL_ID, log)
    assert log.calls, "a directory without its marker must be converted again"
    assert store.is_ready(BUILTIN_MODEL_ID)


def test_a_disk_without_room_is_told_before_anything_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = ModelStore(tmp_path / "models")
    real = convert.shutil.disk_usage(tmp_path)

    def thirty_megabytes_free(_path: object) -> object:
        return real._replace(free=30_000_000)

    monkeypatch.setattr(convert.shutil, "disk_usage", thirty_megabytes_free)
    with pytest.raises(NotEnoughDiskSpace, match=r"needs 1\d\d MB, 30 MB free"):
        store.ensure(BUILTIN_MODEL_ID)
    assert not store.is_ready(BUILTIN_MODEL_ID)
    assert [p.name for p in store.root.iterdir()] == [f".{BUILTIN_MODEL_ID}.lock"]


def test_a_conversion_in_an_older_format_is_redone(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "models")
    path = store.ensure(BUILTIN_MODEL_ID)
    record = ConversionRecord.model_validate_json((path / MARKER_NAME).read_text())
    old = record.model_copy(update={"format": record.format - 1})
    (path / MARKER_NAME).write_text(old.model_dump_json())
    assert not store.is_ready(BUILTIN_MODEL_ID)
    store.ensure(BUILTIN_MODEL_ID)
    assert store.is_ready(BUILTIN_MODEL_ID)


def test_unknown_model_ids_raise_a_typed_error(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "models")
    for call in (store.ensure, store.card, store.path_for, store.is_ready):
        with pytest.raises(UnknownModelError):
            call("../not-a-model")
    assert not (tmp_path / "models").exists()


def test_card_byte_figures_match_the_converted_files(ready_store: ModelStore) -> None:
    card = ready_store.card(BUILTIN_MODEL_ID)
    assert card == KNOWN_CARDS[BUILTIN_MODEL_ID]
    sizes = tensor_sizes(ready_store.path_for(BUILTIN_MODEL_ID) / WEIGHTS_NAME)
    per_layer = [
        sum(size for name, size in sizes.items() if name.startswith(f"model.layers.{layer}."))
        for layer in range(card.n_layers)
    ]
    assert per_layer == [card.bytes_per_layer] * card.n_layers
    non_layer = sum(size for name, size in sizes.items() if not name.startswith("model.layers."))
    assert non_layer == card.bytes_non_layer
    assert sum(sizes.values()) == card.n_layers * card.bytes_per_layer + card.bytes_non_layer
    config = json.loads((ready_store.path_for(BUILTIN_MODEL_ID) / "config.json").read_text())
    assert config["num_hidden_layers"] == card.n_layers
    assert config["hidden_size"] == card.hidden_size
    assert config["vocab_size"] == card.vocab_size
    assert config["max_position_embeddings"] == card.context_length
    kv_heads, head_dim = config["num_key_value_heads"], config["head_dim"]
    assert card.kv_bytes_per_token_per_layer == 2 * kv_heads * head_dim * 2


_ENSURE_IN_A_PROCESS = """
import sys
from pathlib import Path
from exo.models.store import ModelStore
calls = []
ModelStore(Path(sys.argv[1])).ensure(sys.argv[2], lambda done, total: calls.append(done))
print("converted" if calls else "reused")
"""


@pytest.mark.slow
def test_concurrent_processes_convert_once(tmp_path: Path) -> None:
    root = tmp_path / "models"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", _ENSURE_IN_A_PROCESS, str(root), BUILTIN_MODEL_ID],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(3)
    ]
    outcomes = sorted(process.communicate(timeout=120)[0].strip() for process in processes)
    assert [process.returncode for process in processes] == [0, 0, 0]
    assert outcomes == ["converted", "reused", "reused"]
    assert ModelStore(root).is_ready(BUILTIN_MODEL_ID)
