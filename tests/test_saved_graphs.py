"""Compiled decode steps saved by a background saver and loaded by the next start instead of
compiled (exo.worker.engines.torch.saved_graphs)."""

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import psutil
import pytest
import torch

from exo.shared.types.chat import ChatMessage
from exo.worker.engines.base import ChatTokenizer, ShardSpec
from exo.worker.engines.torch import saved_graphs
from exo.worker.engines.torch.compile_env import COMPILE_ENV, SAVED_GRAPHS_ENV, saved_graphs_mode
from exo.worker.engines.torch.compiled import CompiledDecoder
from exo.worker.engines.torch.engine import TorchEngine
from exo.worker.engines.torch.saved_graphs import GraphRecipe, SavedGraphs, save_graphs
from tests.conftest import BUILTIN
from tests.sampling_cases import greedy_with_logits
from tests.tiny_models import save_tiny

N_LAYERS = 30
needs_compiler = pytest.mark.skipif(
    shutil.which("g++") is None and shutil.which("c++") is None, reason="no C++ compiler"
)
SAVER = [sys.executable, "-m", "exo.worker.engines.torch.saved_graphs"]


def _recipe(tmp_path: Path) -> GraphRecipe:
    (tmp_path / "config.json").write_text(json.dumps({"num_hidden_layers": 4}))
    return GraphRecipe.of(tmp_path, ShardSpec(0, 2, 4), "int4")


def test_the_key_follows_the_stage_and_the_config(tmp_path: Path) -> None:
    recipe = _recipe(tmp_path)
    store = SavedGraphs(recipe, tmp_path / "graphs")
    assert store.path(1, 2) != store.path(2, 2) != store.path(1, 1)
    other_half = recipe.model_copy(update={"start": 2, "end": 4})
    assert SavedGraphs(other_half, tmp_path).path(1, 2).name != store.path(1, 2).name
    (tmp_path / "config.json").write_text(json.dumps({"num_hidden_layers": 5}))
    assert SavedGraphs(
        GraphRecipe.of(tmp_path, ShardSpec(0, 2, 4), "int4"), tmp_path / "graphs"
    ).path(1, 2) != store.path(1, 2)
    # The model's folder is not part of it: a copy of the same model shares the graphs.
    copy = tmp_path / "copy"
    copy.mkdir()
    shutil.copy(tmp_path / "config.json", copy / "config.json")
    moved = GraphRecipe.of(copy, ShardSpec(0, 2, 4), "int4")
    assert SavedGraphs(moved, tmp_path / "graphs").path(1, 2) == SavedGraphs(
        GraphRecipe.of(tmp_path, ShardSpec(0, 2, 4), "int4"), tmp_path / "graphs"
    ).path(1, 2)


def test_an_unreadable_file_is_deleted_not_used(tmp_path: Path) -> None:
    store = SavedGraphs(_recipe(tmp_path), tmp_path / "graphs")
    store.directory.mkdir()
    store.path(2, 1).write_bytes(b"not a graph")
    assert store.missing([(2, 1)]) == []
    assert store.load(2, 1) is None
    assert not store.path(2, 1).exists()
    assert store.missing([(2, 1)]) == [(2, 1)]


def test_a_graph_that_failed_to_save_is_not_tried_again(tmp_path: Path) -> None:
    store = SavedGraphs(_recipe(tmp_path), tmp_path / "graphs")
    store.directory.mkdir()
    store.path(4, 2).with_suffix(".failed").write_text("Traceback ...")
    assert store.missing([(1, 2), (4, 2)]) == [(1, 2)]


def test_what_no_start_used_for_a_month_is_pruned(tmp_path: Path) -> None:
    store = SavedGraphs(_recipe(tmp_path), tmp_path / "graphs")
    store.directory.mkdir()
    day = 24 * 3600.0
    now = time.time()
    ages = {
        store.path(1, 2): 40 * day,  # an old version's graph, or a deleted model's
        store.path(2, 2): 10 * day,
        store.path(4, 2).with_suffix(".failed"): 31 * day,
        store.path(8, 2).with_suffix(".lock"): 2 * 3600.0,  # a killed saver's
        store.directory / ".x.graph.123.partial": 2 * 3600.0,
        store.path(8, 1).with_suffix(".lock"): 60.0,  # a saver at work now
        store.directory / "notes.txt": 400 * day,  # not ours
    }
    for path, age in ages.items():
        path.write_bytes(b"x")
        os.utime(path, (now - age, now - age))
    assert store.prune(now) == 4
    left = {p.name for p in store.directory.iterdir()}
    assert left == {store.path(2, 2).name, store.path(8, 1).with_suffix(".lock").name, "notes.txt"}


def test_one_saver_at_a_time_per_graph(tmp_path: Path) -> None:
    store = SavedGraphs(_recipe(tmp_path), tmp_path / "graphs")
    other = SavedGraphs(_recipe(tmp_path), tmp_path / "graphs")
    with store.claim(1, 2) as mine:
        assert mine
        with other.claim(1, 2) as theirs, other.claim(2, 2) as next_one:
            assert not theirs and next_one
    with other.claim(1, 2) as theirs:
        assert theirs


GIB = 1 << 30


def test_a_saver_leaves_a_tenth_of_the_ram_free_and_at_least_a_gib() -> None:
    assert saved_graphs.memory_floor(64 * GIB) == int(6.4 * GIB)
    assert saved_graphs.memory_floor(4 * GIB) == GIB
    assert saved_graphs.saver_fits(available=8 * GIB, total=24 * GIB, needed=GIB)
    assert not saved_graphs.saver_fits(available=3 * GIB, total=24 * GIB, needed=GIB)
    assert saved_graphs.saver_fits(available=GIB, total=4 * GIB, needed=0)
    assert not saved_graphs.saver_fits(available=GIB - 1, total=4 * GIB, needed=0)


def _host_reports(monkeypatch: pytest.MonkeyPatch, available: int, total: int) -> None:
    monkeypatch.setattr(
        saved_graphs.psutil,
        "virtual_memory",
        lambda: SimpleNamespace(available=available, total=total),
    )


def test_a_runner_starts_no_saver_where_it_would_not_leave_the_floor_free(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The saver needs about what its runner holds (here: this process)."""
    store = SavedGraphs(_recipe(tmp_path), tmp_path / "graphs")
    monkeypatch.setenv(SAVED_GRAPHS_ENV, "1")
    total = 16 * GIB
    short = saved_graphs.memory_floor(total) + psutil.Process().memory_info().rss - 64 * (1 << 20)
    _host_reports(monkeypatch, short, total)
    store.save_in_background([(1, 2)])
    assert store.saver is None
    assert store.missing([(1, 2)]) == [(1, 2)]  # nothing marked: a later start tries again


def test_a_saver_gives_way_once_free_memory_falls_below_the_floor() -> None:
    readings = iter(
        [(8 * GIB, 16 * GIB), (3 * GIB, 16 * GIB), (GIB, 16 * GIB), (9 * GIB, 16 * GIB)]
    )
    calls: list[tuple[int, int]] = []
    saved_graphs.give_way_when_memory_is_low(
        lambda: next(readings),
        lambda free, floor: calls.append((free, floor)),
        threading.Event(),
        0,
    )
    assert calls == [(GIB, int(1.6 * GIB))]
    assert next(readings) == (9 * GIB, 16 * GIB)  # it stopped looking once it gave way
    stopped = threading.Event()
    stopped.set()
    saved_graphs.give_way_when_memory_is_low(
        lambda: (0, 16 * GIB), lambda free, floor: calls.append((free, floor)), stopped, 0
    )
    assert len(calls) == 1


def test_the_mode_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for value, mode in (("0", "off"), ("load", "load"), ("", "save"), ("1", "save")):
        monkeypatch.setenv(SAVED_GRAPHS_ENV, value)
        assert saved_graphs_mode() == mode


def test_the_saver_refuses_bad_arguments() -> None:
    result = subprocess.run([*SAVER, "{}"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "RECIPE_JSON" in result.stderr


@pytest.fixture(scope="module")
def model_dir(shared_models: Path) -> Path:
    return shared_models / BUILTIN


def _eager_engine(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> TorchEngine:
    with monkeypatch.context() as patch:
        patch.setenv(COMPILE_ENV, "0")
        engine = TorchEngine.load(model_dir, ShardSpec(0, N_LAYERS, N_LAYERS), lambda _: None)
    assert engine.decoder is None and engine.placement.weights == "int4"
    return engine


@pytest.mark.slow
@needs_compiler
def test_a_saved_step_loads_instead_of_compiling_and_decodes_alike(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The saver (a process of its own, as a runner starts it) saves bucket 1's step; a
    decoder given that store loads it instead of compiling, and greedy decoding through it
    follows the eager int4 engine token for token."""
    eager = _eager_engine(model_dir, monkeypatch)
    threads = eager.placement.threads[-1]
    recipe = GraphRecipe.of(model_dir, eager.shard, "int4")
    directory = tmp_path / "graphs"
    # The saver ends when its stdin closes (its runner ended): hold it open until it is done.
    saver = subprocess.Popen(
        [*SAVER, recipe.model_dump_json(), f"1:{threads}", str(directory)],
        stdin=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert saver.stderr is not None
    err = saver.stderr.read()  # until the saver exits (the test's own timeout bounds it)
    assert saver.wait(timeout=60) == 0, err.decode(errors="replace")[-4000:]
    store = SavedGraphs(recipe, directory)
    assert store.path(1, threads).is_file()
    assert save_graphs(recipe, [(1, threads)], directory) == 0  # nothing left to save

    # The engine, loaded as a runner loads it: loading is all it may do for bucket 1.
    def no_compiling(self: CompiledDecoder, bucket: int) -> None:
        raise AssertionError(f"compiled bucket {bucket} instead of loading it")

    monkeypatch.setattr(CompiledDecoder, "_compile_bucket", no_compiling)
    monkeypatch.setattr(saved_graphs, "default_directory", lambda: directory)
    loaded = TorchEngine.load(model_dir, ShardSpec(0, N_LAYERS, N_LAYERS), lambda _: None)
    decoder = loaded.decoder
    assert decoder is not None and not decoder.failed
    assert decoder.ready == {1} and (1, threads) in decoder.loaded
    graph = decoder.loaded[(1, threads)]
    calls: list[int] = []

    def counted(*args: Any) -> torch.Tensor:
        calls.append(1)
        return graph(*args)

    decoder.loaded[(1, threads)] = counted

    tokenizer = ChatTokenizer.from_dir(model_dir)
    prompt = tokenizer.encode_chat([ChatMessage(role="user", content="Tell me a short story.")])
    expected, expected_logits = greedy_with_logits(eager, prompt, 24)
    got, got_logits = greedy_with_logits(loaded, prompt, 24)
    assert got == expected
    assert len(calls) >= 20  # every decode step but the first, whose length is special
    # As close as a compiled step's (docs/torch_engine.md: within ~0.02 of eager here).
    assert (
        max(float((a - b).abs().max()) for a, b in zip(got_logits, expected_logits, strict=True))
        < 0.1
    )

    # A graph that refuses a step: that step runs eagerly, the file goes, bucket 1 with it.
    def refusing(*args: Any) -> torch.Tensor:
        raise RuntimeError("GuardManager check failed")

    decoder.loaded[(1, threads)] = refusing
    again, _ = greedy_with_logits(loaded, prompt, 4)
    assert again == expected[:4]
    assert not store.path(1, threads).exists()
    assert (1, threads) not in decoder.loaded and decoder.ready == set() and not decoder.failed


@pytest.mark.slow
def test_a_runner_starts_a_saver_for_what_is_missing_and_it_ends_with_the_runner(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only in "save" mode and only for graphs not saved yet; a saver whose runner is gone
    (its stdin closed) exits without saving anything."""
    recipe = GraphRecipe.of(model_dir, ShardSpec(0, N_LAYERS, N_LAYERS), "int4")
    store = SavedGraphs(recipe, tmp_path / "graphs")
    _host_reports(monkeypatch, 64 * GIB, 64 * GIB)  # room, whatever this machine has free
    monkeypatch.setenv(SAVED_GRAPHS_ENV, "load")
    store.save_in_background([(8, 1)])
    assert store.saver is None
    monkeypatch.setenv(SAVED_GRAPHS_ENV, "1")
    store.directory.mkdir()
    store.path(8, 2).write_bytes(b"saved before")
    store.save_in_background([(8, 2)])
    assert store.saver is None
    store.save_in_background([(8, 1), (8, 2)])
    saver = store.saver
    assert saver is not None and saver.stdin is not None
    time.sleep(1)
    saver.stdin.close()
    assert saver.wait(timeout=120) == 0
    assert not store.path(8, 1).exists()


@pytest.mark.slow
@needs_compiler
def test_a_stage_sharing_cores_loads_a_saved_step_for_each_thread_count(tmp_path: Path) -> None:
    """The saver saves a step per thread count (the graphs' guards hold the count); a stage
    that switches between its share of the cores and all of them loads both and steps
    through each at its own count (tests/helpers_torch_threads.py, a process as a runner)."""
    save_tiny("llama", tmp_path)
    recipe = GraphRecipe.of(tmp_path, ShardSpec(0, 3, 3), "int4")
    directory = tmp_path / "graphs"
    saver = subprocess.Popen(
        [*SAVER, recipe.model_dump_json(), "1:1,1:2", str(directory)],
        stdin=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert saver.stderr is not None
    err = saver.stderr.read()
    assert saver.wait(timeout=60) == 0, err.decode(errors="replace")[-4000:]
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.helpers_torch_threads",
            str(tmp_path),
            "--saved",
            str(directory),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-4000:]
