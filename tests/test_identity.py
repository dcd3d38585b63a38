"""Node identity: persistent, and never shared by a copied data directory."""

import json
import shutil
from pathlib import Path

import pytest

from exo.identity import (
    BINDING_FILE,
    ID_FILE,
    MACHINE_ID_ENV,
    IdentityError,
    load_or_create_node_id,
    machine_fingerprint,
)


def test_id_is_created_once_and_persists_across_restarts(tmp_path: Path) -> None:
    data = tmp_path / "data"
    first = load_or_create_node_id(data)
    assert first.startswith("node-")
    assert load_or_create_node_id(data) == first
    assert load_or_create_node_id(data) == first
    assert load_or_create_node_id(tmp_path / "other") != first
    binding = json.loads((data / BINDING_FILE).read_text())
    assert binding["node_id"] == first and binding["path"] == str(data.resolve())


def test_a_copied_data_directory_is_refused_with_instructions(tmp_path: Path) -> None:
    original = tmp_path / "node1"
    node_id = load_or_create_node_id(original)
    copy = tmp_path / "node2"
    shutil.copytree(original, copy)
    with pytest.raises(IdentityError) as refused:
        load_or_create_node_id(copy)
    text = str(refused.value)
    assert node_id in text and str(copy) in text
    assert "same id" in text and f"delete {copy}" in text  # how to make it a new node
    assert BINDING_FILE in text  # how to keep the id after a deliberate move
    # The original is unaffected.
    assert load_or_create_node_id(original) == node_id
    # Following the advice for a new node gives a fresh id.
    (copy / ID_FILE).unlink()
    (copy / BINDING_FILE).unlink()
    assert load_or_create_node_id(copy) != node_id


def test_a_directory_from_another_machine_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(MACHINE_ID_ENV, "machine-one")
    node_id = load_or_create_node_id(tmp_path)
    monkeypatch.setenv(MACHINE_ID_ENV, "machine-two")
    assert machine_fingerprint() != ""
    with pytest.raises(IdentityError, match="another machine"):
        load_or_create_node_id(tmp_path)
    # A deliberate move: adopt keeps the id and re-binds it here.
    assert load_or_create_node_id(tmp_path, adopt=True) == node_id
    assert load_or_create_node_id(tmp_path) == node_id


def test_an_id_from_before_bindings_is_adopted(tmp_path: Path) -> None:
    (tmp_path / ID_FILE).write_text("node-0123456789abcdef\n")
    assert load_or_create_node_id(tmp_path) == "node-0123456789abcdef"
    assert (tmp_path / BINDING_FILE).exists()
    assert load_or_create_node_id(tmp_path) == "node-0123456789abcdef"


def test_a_binding_for_another_id_is_refused(tmp_path: Path) -> None:
    load_or_create_node_id(tmp_path)
    (tmp_path / ID_FILE).write_text("node-edited\n")
    with pytest.raises(IdentityError, match="was written for"):
        load_or_create_node_id(tmp_path)


def test_an_unreadable_binding_says_what_to_do(tmp_path: Path) -> None:
    load_or_create_node_id(tmp_path)
    (tmp_path / BINDING_FILE).write_text("{not json")
    with pytest.raises(IdentityError, match="delete"):
        load_or_create_node_id(tmp_path)
