"""Checks, in a process of its own, that a torch stage sharing a node's cores decodes through
compiled graphs at both of its thread counts, and that one count's graphs do not serve the
other (the control: torch's guards include the thread count).

A runner holds one engine, so this runs as one: compiling several models at several thread
counts in one process trips a dynamo bug in nested-region reuse ("Freevar has no source")
for the models compiled after, which the test process must not inherit.

With `--saved GRAPHS_DIR` it checks instead that such a stage loads both counts' graphs
that a saver saved there (and compiles nothing), and steps through each at its count.

Usage: python -m tests.helpers_torch_threads MODEL_DIR [--saved GRAPHS_DIR] (a tiny Llama,
int4-able); prints "ok" and exits 0, or fails with an AssertionError.
"""

import os
import sys
from pathlib import Path
from typing import Any

import torch

from exo.worker.engines.base import ShardSpec
from exo.worker.engines.torch import device, saved_graphs
from exo.worker.engines.torch.compile_env import SAVED_GRAPHS_ENV
from exo.worker.engines.torch.compiled import CompiledDecoder
from exo.worker.engines.torch.engine import TorchEngine
from exo.worker.runner.protocol import RUNNER_THREADS_ENV

PROMPT = [3, 17, 99]


def _ignore(_: float) -> None:
    pass


def _step(engine: TorchEngine) -> torch.Tensor:
    request = engine.new_request(16, seed=0)
    engine.forward(engine.token_input(PROMPT), request)
    return engine.forward(engine.token_input([42]), request)


def main(model_dir: Path) -> None:
    setattr(device, "physical_cores", lambda: 2)  # noqa: B010 (the counts below need 2)
    set_stance = torch.compiler.set_stance

    def strict(stance: str = "default", **kwargs: Any) -> Any:
        # After preparing, a step that needs a graph the decoder lacks fails (and the
        # decoder says so) instead of running eagerly, which looks the same from outside.
        wanted: Any = "fail_on_recompile" if stance == "eager_on_recompile" else stance
        return set_stance(wanted, **kwargs)

    setattr(torch.compiler, "set_stance", strict)  # noqa: B010
    # The control, first (graphs are shared by every engine of the process): graphs for
    # one count only, and a step at the other is not compiled.
    lone = TorchEngine.load(model_dir, ShardSpec(0, 3, 3), _ignore, weights="int4")
    assert lone.placement.threads == (2,), lone.placement.threads
    torch.set_num_threads(1)
    _step(lone)
    assert lone.decoder is not None and lone.decoder.failed, "one count's graphs served both"
    # A stage sharing cores: compiled at both counts, the eager logits at each.
    os.environ[RUNNER_THREADS_ENV] = "1,2"
    shared = TorchEngine.load(model_dir, ShardSpec(0, 3, 3), _ignore, weights="int4")
    assert shared.placement.threads == (1, 2), shared.placement.threads
    assert torch.get_num_threads() == 2, "a sharing stage loads with all the cores"
    outputs: list[torch.Tensor] = []
    for alone in (False, True, False):
        shared.use_cores(alone)
        assert torch.get_num_threads() == (2 if alone else 1)
        outputs.append(_step(shared))
    decoder = shared.decoder
    assert decoder is not None and decoder.prepared and not decoder.failed, "not compiled"
    shared.decoder = None
    eager = _step(shared)
    assert all(torch.allclose(out, eager, atol=1e-4) for out in outputs), "logits differ"
    print("ok")


def main_saved(model_dir: Path, directory: Path) -> None:
    setattr(device, "physical_cores", lambda: 2)  # noqa: B010 (the counts below need 2)
    setattr(saved_graphs, "default_directory", lambda: directory)  # noqa: B010

    def no_compiling(self: CompiledDecoder, bucket: int) -> None:
        raise AssertionError(f"compiled bucket {bucket} instead of loading it")

    setattr(CompiledDecoder, "_compile_bucket", no_compiling)  # noqa: B010
    os.environ[SAVED_GRAPHS_ENV] = "load"
    os.environ[RUNNER_THREADS_ENV] = "1,2"
    shared = TorchEngine.load(model_dir, ShardSpec(0, 3, 3), _ignore, weights="int4")
    decoder = shared.decoder
    assert decoder is not None and not decoder.failed, "not prepared"
    assert set(decoder.loaded) == {(1, 1), (1, 2)}, decoder.loaded.keys()
    calls: dict[tuple[int, int], int] = {}
    for key, graph in list(decoder.loaded.items()):

        def counted(*args: Any, key: tuple[int, int] = key, graph: Any = graph) -> Any:
            calls[key] = calls.get(key, 0) + 1
            return graph(*args)

        decoder.loaded[key] = counted
    outputs: list[torch.Tensor] = []
    for alone in (False, True, False):
        shared.use_cores(alone)
        outputs.append(_step(shared))
    assert calls == {(1, 1): 2, (1, 2): 1}, calls
    shared.decoder = None
    eager = _step(shared)
    assert all(torch.allclose(out, eager, atol=1e-4) for out in outputs), "logits differ"
    print("ok")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[2] == "--saved":
        main_saved(Path(sys.argv[1]), Path(sys.argv[3]))
    else:
        main(Path(sys.argv[1]))
