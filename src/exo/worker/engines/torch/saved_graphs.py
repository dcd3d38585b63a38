"""Compiled decode steps saved on disk, so that a runner's next start loads each graph in
about a second instead of compiling it.

Compiling one of a stage's graphs takes 5-15 s on a 2-core box with inductor's cache warm,
nearly all of it dynamo tracing our Python, and a stage that shares a node's cores has
eight of them (four batch sizes at two thread counts). torch's `aot_compile` (experimental
in torch 2.15) turns that trace into a file: `load_compiled_function` reads it back in
1-2 s and the graph steps as fast as a compiled one. The file holds the graph and its
guards, not the weights: the stage is passed in at every call, as to `_decode_step`.

A file is keyed by everything its graph depends on: torch and Python, this CPU (inductor
writes code for its instruction set), the engine's own sources, the model's config, the
stage's layer range and weight format, the batch size and the thread count (the graph's
guards hold torch's thread count: a call at another count raises). The files live beside
inductor's cache (`$TORCHINDUCTOR_CACHE_DIR/exo_graphs`, the node's cache folder); a saver
first deletes what no start has used for 30 days.

Saving costs far more than compiling: `aot_compile` bypasses AOTAutograd's cache, ~30 s
for one request's graph and ~75 s for eight requests' on a 2-core box. So a runner never
saves while it serves: once it is ready, it starts `python -m
exo.worker.engines.torch.saved_graphs` at idle priority, which loads the same stage and
saves each graph the runner found missing, and ends when its runner ends (it watches the
pipe the runner holds). The runner itself compiles what it needs as before; what the saver
writes serves its next start, a restart, or a re-placement after a failure.

A saver is a convenience for later starts and never takes memory a runner may need: it
needs about as much as its runner (the same stage, the same compiler: ~1 GB for the built-in
model), so a runner starts one only if that leaves `memory_floor` free (a tenth of the RAM,
at least 1 GiB), and a saver ends, saving nothing more, as soon as free memory falls below
the floor (another runner loading, a request's cache growing).

`$EXO_TORCH_SAVED_GRAPHS`: "0" neither loads nor saves; "load" loads but starts no saver
(the test suite saves once, up front); anything else, or unset, does both. A file that does
not load, or a graph that refuses a step, is deleted and that step runs as if it had never
been saved.
"""

import contextlib
import functools
import hashlib
import os
import platform
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Generator, Sequence
from pathlib import Path
from typing import Any, cast

import psutil
import torch
from loguru import logger
from torch import Tensor

from exo.models import architecture
from exo.shared.file_lock import try_lock
from exo.shared.types.base import Frozen
from exo.worker.engines.base import ShardSpec
from exo.worker.engines.torch.compile_env import saved_graphs_mode
from exo.worker.engines.torch.quant import WeightFormat

_ENGINE_SOURCES = Path(__file__).parent
_SUFFIX = ".graph"
# Saved graphs (and failures) unused for this long are deleted by the next saver.
_KEEP_S = 30 * 24 * 3600.0
# A lock or partial file this old belongs to a saver that was killed.
_LEFT_BEHIND_S = 3600.0
# Free memory a saver leaves to everything else: a tenth of the RAM, at least this.
_FLOOR_FRACTION = 0.10
_FLOOR_MIN_BYTES = 1 << 30
# How often a saver looks at free memory.
_MEMORY_POLL_S = 0.5
_GIB = float(1 << 30)

Graph = Callable[..., Tensor]


class GraphRecipe(Frozen):
    """What a saver needs to load the runner's stage again, and what the files are keyed by."""

    model_dir: str
    start: int
    end: int
    n_layers: int
    weights: WeightFormat
    # A digest of the model's config.json: the graph's shapes and quantization.
    config: str

    @classmethod
    def of(cls, model_dir: Path, shard: ShardSpec, weights: WeightFormat) -> "GraphRecipe":
        config = hashlib.sha256((model_dir / "config.json").read_bytes()).hexdigest()
        return cls(
            model_dir=str(model_dir),
            start=shard.start_layer,
            end=shard.end_layer,
            n_layers=shard.n_layers,
            weights=weights,
            config=config,
        )

    @property
    def shard(self) -> ShardSpec:
        return ShardSpec(self.start, self.end, self.n_layers)


@functools.cache
def _sources_digest() -> str:
    """The engine's Python and C++ sources, and the model description it reads (constants
    such as the norms' epsilon are part of a graph): a change to any can change the graph."""
    digest = hashlib.sha256()
    engine = [p for p in _ENGINE_SOURCES.rglob("*") if p.suffix in (".py", ".cpp", ".h")]
    for path in [*sorted(engine), Path(architecture.__file__)]:
        if "__pycache__" not in path.parts:
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def _cpu_flags() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return platform.processor()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return " ".join(sorted(line.split(":", 1)[1].split()))
    return ""


def default_directory() -> Path:
    """Beside inductor's cache: the node's cache folder for a runner (the worker sets
    $TORCHINDUCTOR_CACHE_DIR), else torch's own default."""
    cache = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if cache:
        return Path(cache) / "exo_graphs"
    from torch._inductor.runtime.cache_dir_utils import cache_dir  # pyright: ignore[reportPrivateUsage]

    return Path(cache_dir()) / "exo_graphs"


class SavedGraphs:
    """The saved graphs of one stage: one file per batch size and thread count."""

    def __init__(self, recipe: GraphRecipe, directory: Path | None = None) -> None:
        self.recipe = recipe
        self.directory = directory or default_directory()
        parts = (
            torch.__version__,
            sys.version,
            platform.machine(),
            _cpu_flags(),
            _sources_digest(),
            recipe.config,
            f"{recipe.start}:{recipe.end}:{recipe.n_layers}:{recipe.weights}",
        )
        self._prefix = hashlib.sha256("\0".join(parts).encode()).hexdigest()[:24]
        self._saver: subprocess.Popen[bytes] | None = None

    def path(self, bucket: int, threads: int) -> Path:
        return self.directory / f"{self._prefix}-b{bucket}-t{threads}{_SUFFIX}"

    def missing(self, wanted: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
        """Those of `wanted` neither saved nor failed to save before (a saver that failed
        on a graph leaves its traceback in a `.failed` file: it is not tried again)."""
        return [
            (b, t)
            for b, t in wanted
            if not self.path(b, t).is_file() and not self.path(b, t).with_suffix(".failed").exists()
        ]

    def load(self, bucket: int, threads: int) -> Graph | None:
        """The saved graph, or None (not saved, or unreadable: then the file is deleted)."""
        path = self.path(bucket, threads)
        if not path.is_file():
            return None
        started = time.perf_counter()
        try:
            with path.open("rb") as file:
                graph = cast(Graph, torch.compiler.load_compiled_function(file))  # pyright: ignore[reportArgumentType]
        except Exception:
            logger.opt(exception=True).warning(
                f"could not load the saved graph {path}; deleting it"
            )
            self.discard(bucket, threads)
            return None
        with contextlib.suppress(OSError):
            os.utime(path)  # in use: `prune` keeps it
        logger.debug(
            f"loaded the saved decode step of batches of {bucket} at {threads} threads"
            f" in {time.perf_counter() - started:.1f} s"
        )
        return graph

    def discard(self, bucket: int, threads: int) -> None:
        with contextlib.suppress(OSError):
            self.path(bucket, threads).unlink()

    def save(self, graph: Any, bucket: int, threads: int) -> None:
        """Write a graph from `aot_compile` (whole or not at all: renamed into place)."""
        path = self.path(bucket, threads)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
        try:
            graph.save_compiled_function(str(partial))
            os.replace(partial, path)
        finally:
            with contextlib.suppress(OSError):
                partial.unlink()

    def prune(self, now: float | None = None) -> int:
        """Delete what no start has used for `_KEEP_S` (the graphs of an older torch or exo,
        of a model since deleted), and what a saver that was killed left behind; returns
        how many files went. A loaded graph's time is renewed at every load."""
        now = time.time() if now is None else now
        gone = 0
        for path in self.directory.glob("*"):
            left_behind = path.suffix in (".lock", ".partial")
            if path.suffix not in (_SUFFIX, ".failed") and not left_behind:
                continue
            with contextlib.suppress(OSError):
                if now - path.stat().st_mtime > (_LEFT_BEHIND_S if left_behind else _KEEP_S):
                    path.unlink()
                    gone += 1
        return gone

    @contextlib.contextmanager
    def claim(self, bucket: int, threads: int) -> Generator[bool]:
        """Whether this process may save that graph: no other saver is saving it now."""
        self.directory.mkdir(parents=True, exist_ok=True)
        lock = self.path(bucket, threads).with_suffix(".lock")
        with try_lock(lock) as mine:
            if not mine:
                yield False
                return
            try:
                yield True
            finally:
                # Gone before it is unlocked: a saver that opened it meanwhile gets the lock
                # next and then finds the graph saved; one that comes later makes a new one.
                with contextlib.suppress(OSError):
                    lock.unlink()

    @property
    def saver(self) -> "subprocess.Popen[bytes] | None":
        """The saver this store started, if any."""
        return self._saver

    def save_in_background(self, wanted: Sequence[tuple[int, int]]) -> None:
        """Start a saver (idle priority) for those of `wanted` that are not saved yet."""
        missing = self.missing(wanted)
        if not missing or saved_graphs_mode() != "save" or self._saver is not None:
            return
        memory = psutil.virtual_memory()
        # What the saver will hold: about what this runner holds (the same stage, compiled).
        needed = psutil.Process().memory_info().rss
        if not saver_fits(memory.available, memory.total, needed):
            logger.info(
                f"not saving {len(missing)} compiled decode steps for later starts: a saver"
                f" needs ~{needed / _GIB:.1f} GiB, {memory.available / _GIB:.1f} GiB is free"
                f" and {memory_floor(memory.total) / _GIB:.1f} GiB must stay free;"
                " the next start compiles them again"
            )
            return
        argv = [
            sys.executable,
            "-m",
            __name__,
            self.recipe.model_dump_json(),
            ",".join(f"{b}:{t}" for b, t in missing),
            str(self.directory),
        ]
        # Its stdin is a pipe this process holds: the saver ends when the pipe closes. It
        # logs to this runner's stderr (the node's log); never to its stdout (our frames).
        self._saver = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
        logger.info(
            f"saving {len(missing)} compiled decode steps for later starts"
            f" (at idle priority, pid {self._saver.pid})"
        )


def memory_floor(total: int) -> int:
    """Free memory (bytes) a saver leaves on a host with `total` bytes of RAM."""
    return max(_FLOOR_MIN_BYTES, int(total * _FLOOR_FRACTION))


def saver_fits(available: int, total: int, needed: int) -> bool:
    """Whether a saver that needs `needed` bytes leaves the floor free."""
    return available - needed >= memory_floor(total)


def give_way_when_memory_is_low(
    free_and_total: Callable[[], tuple[int, int]],
    give_way: Callable[[int, int], None],
    stop: threading.Event,
    poll_s: float = _MEMORY_POLL_S,
) -> None:
    """Call `give_way(free, floor)` (once) as soon as free memory falls below the floor;
    returns then, or when `stop` is set. The saver runs it in a thread of its own."""
    while not stop.wait(poll_s):
        free, total = free_and_total()
        if free < memory_floor(total):
            give_way(free, memory_floor(total))
            return


def _host_memory() -> tuple[int, int]:
    memory = psutil.virtual_memory()
    return memory.available, memory.total


def _end_when_memory_is_low() -> None:
    """Exit (saving nothing more) when free memory falls below the floor: a runner, ours or
    another instance's, needs it more than later starts need our graphs. A file being
    written stays partial (never loaded; `prune` deletes it); the lock goes with us."""

    def give_way(free: int, floor: int) -> None:
        logger.warning(
            f"free memory is down to {free / _GIB:.1f} GiB (floor {floor / _GIB:.1f} GiB):"
            " giving way, saving nothing more"
        )
        os._exit(0)

    threading.Thread(
        target=give_way_when_memory_is_low,
        args=(_host_memory, give_way, threading.Event()),
        name="memory-watch",
        daemon=True,
    ).start()


def _lowest_priority() -> None:
    if sys.platform == "linux":
        with contextlib.suppress(OSError):
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
            return
    with contextlib.suppress(OSError):
        os.nice(19)


def _end_with_parent() -> None:
    """Exit as soon as the runner's end of our stdin closes (the runner ended)."""

    def watch() -> None:
        # os.read, not sys.stdin: a daemon thread blocked in a buffered read holds its lock,
        # and the interpreter aborts at exit when it cannot take it.
        with contextlib.suppress(OSError):
            while os.read(0, 4096):
                pass
        os._exit(0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def save_graphs(recipe: GraphRecipe, wanted: Sequence[tuple[int, int]], directory: Path) -> int:
    """Load the recipe's stage (eager) and save each wanted graph not saved yet; returns how
    many this call saved. The saver process calls it; tests call it too."""
    from exo.worker.engines.torch.compiled import aot_compile_step
    from exo.worker.engines.torch.device import choose_placement
    from exo.worker.engines.torch.llama import load_stage

    store = SavedGraphs(recipe, directory)
    todo = store.missing(wanted)
    if not todo:
        return 0
    # The stage as its runner loaded it, without the runner's compiled decoder.
    placement = choose_placement(recipe.weights)
    with torch.no_grad():
        stage = load_stage(
            Path(recipe.model_dir),
            recipe.start,
            recipe.end,
            placement.weights,
            placement.activation_dtype,
            placement.device,
            lambda _: None,
        )
    pruned = store.prune()
    if pruned:
        logger.info(f"deleted {pruned} saved graphs no start used for 30 days")
    saved = 0
    current = torch.get_num_threads()
    for bucket, threads in todo:
        with store.claim(bucket, threads) as mine:
            if not mine or store.path(bucket, threads).is_file():
                continue
            started = time.perf_counter()
            torch.set_num_threads(threads)
            try:
                graph = aot_compile_step(stage, bucket)
            except Exception:
                failed = store.path(bucket, threads).with_suffix(".failed")
                failed.write_text(traceback.format_exc(), encoding="utf-8")
                logger.opt(exception=True).warning(f"could not save a decode step: {failed}")
                continue
            finally:
                torch.set_num_threads(current)
            store.save(graph, bucket, threads)
            saved += 1
            logger.info(
                f"saved the decode step of batches of {bucket} at {threads} threads"
                f" in {time.perf_counter() - started:.1f} s"
            )
    return saved


def _parse_wanted(text: str) -> list[tuple[int, int]]:
    pairs = [part.split(":") for part in text.split(",") if part]
    return [(int(bucket), int(threads)) for bucket, threads in pairs]


def main(argv: Sequence[str]) -> int:
    """python -m exo.worker.engines.torch.saved_graphs RECIPE_JSON B:T[,B:T...] DIRECTORY"""
    if len(argv) != 3:
        print(main.__doc__, file=sys.stderr)
        return 2
    logger.remove()
    logger.add(
        sys.stderr,
        level=os.environ.get("EXO_RUNNER_LOG_LEVEL", "INFO"),
        format="{time:YYYY-MM-DD HH:mm:ss.SSS} | {level: <8} | graph saver - {message}",
    )
    _lowest_priority()
    _end_with_parent()
    _end_when_memory_is_low()
    recipe = GraphRecipe.model_validate_json(argv[0])
    save_graphs(recipe, _parse_wanted(argv[1]), Path(argv[2]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
