"""Decode steps through `torch.compile` (inductor) on CPU, eager when that is not possible.

An eager decode step of a small model is ~1,500 tiny ops, each a few microseconds of
dispatch: as much time as the int4 matmuls themselves. Compiled, a whole decode step of a
stage is one graph: inductor fuses what lies between the matmuls (norms, RoPE, residuals,
SiLU, casts, the cache writes) into a few C++ loops, and the step pays one guard check and
one call instead of one per layer half (measured: 1.45x the per-half compiled step, whose
guards and wrappers cost ~3 ms of a 12 ms step). Each layer is a nested compile region:
compiled once, called for every layer, so compiling takes seconds however many layers the
stage has. Attention runs inside the graph over each request's own cache up to its own
length (`attend_one_new`); after the warm up the lengths are symbolic, so a graph serves
every length.

The batch size is part of a graph (each request brings its own cache tensors): sizes are
padded to a bucket (1, 2, 4, 8) with scratch requests, one graph per bucket; larger batches
run in chunks of 8. So is torch's thread count (the compiler's guards check it: a step at
another count would run eagerly): a stage that switches between two counts
(`TorchEngine.use_cores`) gets each bucket's graph for each.

Compiling a bucket takes seconds (on a 2-core box 5-15 s each with inductor's cache warm,
most of it dynamo tracing the Python), so a whole model's load compiles only the bucket of
one request, and its runner compiles the others while it has nothing to serve
(`compile_next`, one graph at a time; a request that arrives meanwhile waits for that one).
Until its bucket is there, a batch decodes eagerly (a batch of 4: ~1.4x a compiled step,
while four steps of the one-row graph would cost ~2.3x); a batch size that keeps coming
without the runner ever idling (`_DEMAND_STEPS` eager steps) gets its graph compiled
between two steps. A pipeline stage, and any stage with `$EXO_TORCH_COMPILE=all` (benches),
compiles every bucket at load. Any failure to compile (no C++ compiler, an inductor bug)
falls back to eager for good. A graph that an earlier start saved is loaded instead of
compiled (1-2 s; saved_graphs.py), and runs without dynamo's dispatch: the decoder picks
it by bucket and thread count.
"""

import time
from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
from loguru import logger
from torch import Tensor

from exo.worker.engines.torch.cache import KVCache, RequestBatch, attend_one_new
from exo.worker.engines.torch.llama import LlamaStage, Rope, TransformerBlock
from exo.worker.engines.torch.saved_graphs import Graph, SavedGraphs

# Batch sizes with a graph of their own: a batch runs in the smallest that holds it, larger
# ones in chunks of the largest. With our matmul a block of weights is read once for every
# chunk of 4 rows (from cache after the first), so 8 rows in one graph beat two steps of 4
# (measured: 700 vs 566 tokens/s aggregate; the bucket of 8 adds ~5 s to a warm load).
BUCKETS = (1, 2, 4, 8)
# Capacity of the scratch caches that pad a batch up to its bucket.
_SCRATCH_CAPACITY = 8
# Where padding rows write (a fixed slot of their scratch cache; never 0 or 1, the sizes
# the compiler would specialise on).
_SCRATCH_START = 2
# Compiled as symbols: every length (`starts`) and the capacity (dim 1) of every cache.
_DYNAMIC_SOURCES = r"L\['starts'\].*,L\['keys'\].*:1,L\['values'\].*:1"
# Per decoder: one graph per bucket, plus slack for the compiler's own specialisations.
_RECOMPILE_LIMIT = 4 * len(BUCKETS)
# Eager steps of batches whose bucket has no graph yet, after which the runner stops
# waiting for an idle moment and compiles that bucket between two steps (at ~25 ms an
# eager step of 4 rows here: ~10 s of sustained batching).
_DEMAND_STEPS = 400


def _layer(
    layer: TransformerBlock,
    h: Tensor,
    cos: Tensor,
    sin: Tensor,
    keys: list[Tensor],
    values: list[Tensor],
    starts: list[int],
) -> Tensor:
    q, k, v = layer.before_attention(h, Rope(cos, sin))
    attn = layer.self_attn
    attended = attend_one_new(q, k, v, keys, values, starts, attn.scale, attn.kernel)
    return layer.after_attention(h, attended)


LayerStep = Callable[
    [TransformerBlock, Tensor, Tensor, Tensor, list[Tensor], list[Tensor], list[int]], Tensor
]
# Traced once, then called for every layer of the graph.
_layer_step = cast(LayerStep, torch.compiler.nested_compile_region(_layer))  # pyright: ignore[reportUnknownMemberType]


def _decode_step(
    stage: LlamaStage,
    x: Tensor,
    cos: Tensor,
    sin: Tensor,
    keys: list[list[Tensor]],
    values: list[list[Tensor]],
    starts: list[int],
) -> Tensor:
    """The stage's output for one new token per row; keys[i][b]: layer i's cache of row b."""
    h = stage.embed_tokens(x) if stage.embed_tokens is not None else x.to(stage.activation_dtype)
    for index, layer in enumerate(stage.layers):
        h = _layer_step(layer, h, cos, sin, keys[index], values[index], starts)
    return stage.head(h) if stage.is_last else h


class CompiledDecoder:
    """One-token steps (x [B, 1] ids or [B, 1, D] hidden) of a stage, compiled."""

    def __init__(
        self, stage: LlamaStage, threads: Sequence[int] = (), saved: SavedGraphs | None = None
    ) -> None:
        """`threads`: the thread counts steps will run at (each gets its graphs); the
        current count when empty. `saved`: where graphs saved by an earlier start are
        loaded from, instead of compiling them (saved_graphs.py)."""
        self.stage = stage
        self._threads = tuple(threads)
        self._saved = saved
        # (bucket, thread count) -> a graph loaded from `saved`; the rest go through dynamo.
        self.loaded: dict[tuple[int, int], Graph] = {}
        self.failed = False
        # Buckets with a graph at every thread count. A step only ever runs a graph of one
        # of these, under "eager_on_recompile": a step that would need another graph runs
        # eagerly instead of stalling every request for the compiler. Kept, not derived
        # from `_compiled`: every step reads it, and deriving it costs ~5 us a read here.
        self.ready: set[int] = set()
        # (bucket, thread count) graphs compiled so far, and eager steps per missing bucket.
        self._compiled: set[tuple[int, int]] = set()
        self._demand: dict[int, int] = {}
        self._loading = False
        # Distinct caches, as many as the most padding any bucket needs (5 rows -> 8).
        self._scratch = [stage.new_cache(_SCRATCH_CAPACITY) for _ in range(max(BUCKETS) // 2 - 1)]
        # Every decoder of the process shares `_decode_step`'s cache of graphs (benches and
        # tests load several stages in one process): room for this one's.
        config = torch._dynamo.config  # pyright: ignore[reportPrivateUsage]
        room = _RECOMPILE_LIMIT * max(1, len(self._threads))
        config.recompile_limit = max(config.recompile_limit, room) + room
        # The fused loops are a few thousand elements: serial C++. Threaded, each would be an
        # OpenMP barrier, and a barrier waits a whole time slice whenever the other core is
        # busy (measured: 2.6 instead of 40 tokens/s beside other jobs). The int4 matmuls
        # and attention stay aten kernels on torch's threads.
        self._step = torch.compile(_decode_step, fullgraph=True, options={"cpp.threads": 1})

    @property
    def prepared(self) -> bool:
        """At least one request's steps run compiled."""
        return bool(self.ready)

    @property
    def thread_counts(self) -> tuple[int, ...]:
        return self._threads or (torch.get_num_threads(),)

    def handles(self, batch: RequestBatch) -> bool:
        # A one-token prompt's prefill (length 0) and its first step (1) are lengths the
        # graphs do not cover (the compiler specialises on 0 and 1): eager.
        return (
            self.prepared
            and not self.failed
            and batch.n_new == 1
            and min(batch.starts) >= _SCRATCH_START
        )

    def __call__(self, x: Tensor, batch: RequestBatch) -> Tensor:
        """The stage's output for one decode step; advances the batch like the stage."""
        if self.handles(batch) and self._has_graph_for(x.shape[0]):
            try:
                chunk = max(BUCKETS)
                outs = [
                    self._run(
                        x[i : i + chunk],
                        batch.caches[i : i + chunk],
                        batch.starts[i : i + chunk],
                        batch.positions[i : i + chunk],
                    )
                    for i in range(0, x.shape[0], chunk)
                ]
                out = outs[0] if len(outs) == 1 else torch.cat(outs)
            except _SavedGraphRefused as refused:
                # Nothing advanced yet: this step runs eagerly, the graph is gone for good.
                logger.opt(exception=True).warning(
                    f"a saved decode step failed; deleting it ({refused.key})"
                )
                self._forget(refused.key)
            except Exception:  # any failure to compile means: run eagerly
                # Nothing advanced yet: the eager step rewrites the same cache positions.
                logger.opt(exception=True).warning("compiled decode failed; decoding eagerly")
                self.failed = True
            else:
                batch.advance()
                return out
        return self.stage(x, batch)

    def _has_graph_for(self, rows: int) -> bool:
        """Whether a batch of `rows` runs compiled (its bucket has its graphs); counts the
        eager steps of a missing bucket, and compiles it once they show a sustained need."""
        bucket = _bucket(rows)
        if bucket in self.ready:
            return True
        self._demand[bucket] = self._demand.get(bucket, 0) + 1
        if self._demand[bucket] < _DEMAND_STEPS:
            return False
        logger.info(f"batches of {bucket} keep coming: compiling their decode step now")
        while not self.failed and bucket not in self.ready and self.compile_next(bucket):
            pass
        return bucket in self.ready

    def _run(
        self,
        x: Tensor,
        caches: Sequence[KVCache],
        starts: Sequence[int],
        positions: Tensor,
        compiling: bool = False,
    ) -> Tensor:
        caches, starts = list(caches), list(starts)
        rows = len(caches)
        # The smallest bucket with graphs that holds the rows (`__call__` made sure of one).
        bucket = _bucket(rows) if compiling else min(b for b in self.ready if b >= rows)
        pad = bucket - rows
        if pad:
            x = torch.cat([x, x[:1].expand(pad, *x.shape[1:])])
            positions = torch.cat([positions, positions[:1].expand(pad, 1)])
            caches = [*caches, *self._scratch[:pad]]
            starts = [*starts, *[_SCRATCH_START] * pad]
        args = _step_args(self.stage, x, caches, starts, positions)
        key = (bucket, torch.get_num_threads())
        graph = None if compiling else self.loaded.get(key)
        if graph is not None:
            try:
                out = graph(*args)
            except Exception as exc:
                raise _SavedGraphRefused(key) from exc
            return out[:rows] if pad else out
        # Compiling only when asked to; a step that would need a new graph runs eagerly.
        stance = "default" if compiling else "eager_on_recompile"
        with torch.compiler.set_stance(stance):
            out = self._step(*args)
        return out[:rows] if pad else out

    def _forget(self, key: tuple[int, int]) -> None:
        """Drop a loaded graph that failed a step (and its file): its bucket runs eagerly
        until compiled again (idle time, or sustained demand)."""
        bucket, threads = key
        self.loaded.pop(key, None)
        self._compiled.discard(key)
        self.ready.discard(bucket)
        if self._saved is not None:
            self._saved.discard(bucket, threads)

    def prepare(self, every_bucket: bool = False) -> None:
        """Compile the steps of one request (or of every bucket) at every thread count
        before any request waits for the compiler, each request's length and cache size as
        symbols: one graph per bucket and thread count serves every request."""
        started = time.perf_counter()
        buckets = BUCKETS if every_bucket else BUCKETS[:1]
        self._loading = True
        try:
            while not self.failed and not set(buckets) <= self.ready and self.compile_next():
                pass
        finally:
            self._loading = False
        if self.failed:
            return
        if self._saved is not None:
            self._saved.save_in_background(self.wanted)
        counts = self.thread_counts
        for_counts = f" for {len(counts)} thread counts" if len(counts) > 1 else ""
        rest = sorted(set(BUCKETS) - self.ready)
        later = f"; batches of {', '.join(map(str, rest))} compile when idle" if rest else ""
        how = f"{len(self.loaded)} of {len(self._compiled)} loaded as saved" if self.loaded else ""
        logger.info(
            f"decode steps of batches of {', '.join(map(str, sorted(self.ready)))}{for_counts}"
            f" ready in {time.perf_counter() - started:.1f} s ({how or 'compiled'}){later}"
        )

    @property
    def wanted(self) -> list[tuple[int, int]]:
        """Every (bucket, thread count) graph this decoder may use."""
        return [(b, t) for b in BUCKETS for t in self.thread_counts]

    def compile_next(self, bucket: int | None = None) -> bool:
        """Compile one more graph (the smallest missing bucket, or `bucket`, at the next
        thread count that lacks it), or load it where it was saved; False when nothing is
        left to compile."""
        if self.failed:
            return False
        missing = [
            (b, t)
            for b in BUCKETS
            if bucket is None or b == bucket
            for t in self.thread_counts
            if (b, t) not in self._compiled
        ]
        if not missing:
            return False
        b, threads = missing[0]
        logger.debug(f"compiling the decode step of batches of {b} at {threads} threads")
        started = time.perf_counter()
        current = torch.get_num_threads()
        graph = self._saved.load(b, threads) if self._saved is not None else None
        try:
            torch.set_num_threads(threads)
            if graph is not None:
                self.loaded[(b, threads)] = graph
            else:
                self._compile_bucket(b)
        except Exception:
            logger.opt(exception=True).warning("compiling decode failed; decoding eagerly")
            self.failed = True
            return False
        finally:
            torch.set_num_threads(current)
        self._compiled.add((b, threads))
        if all((b, t) in self._compiled for t in self.thread_counts):
            self.ready.add(b)
            self._demand.pop(b, None)
        if not self._loading:  # the load logs one summary
            how = "loaded the saved" if graph is not None else "compiled the"
            logger.info(
                f"{how} decode step of batches of {b} at {threads} threads"
                f" in {time.perf_counter() - started:.1f} s"
            )
        return len(missing) > 1

    def _compile_bucket(self, bucket: int) -> None:
        # The config module gets `patch` at import time: untyped.
        config: Any = torch.compiler.config
        with torch.no_grad(), config.patch(dynamic_sources=_DYNAMIC_SOURCES):
            x, caches, starts, positions = _example(self.stage, bucket)
            self._run(x, caches, starts, positions, compiling=True)


class _SavedGraphRefused(Exception):
    """A loaded graph raised in a step (its guards refused the call, or it failed)."""

    def __init__(self, key: tuple[int, int]) -> None:
        super().__init__(f"batches of {key[0]} at {key[1]} threads")
        self.key = key


def _example(stage: LlamaStage, bucket: int) -> tuple[Tensor, list[KVCache], list[int], Tensor]:
    """A bucket's inputs to compile with: (x, caches, starts, positions)."""
    if stage.is_first:
        x = torch.zeros((bucket, 1), dtype=torch.int64, device=stage.device)
    else:
        shape = (bucket, 1, stage.args.hidden_size)
        x = torch.zeros(shape, dtype=stage.activation_dtype, device=stage.device)
    caches = [stage.new_cache(4 * _SCRATCH_CAPACITY) for _ in range(bucket)]
    starts = [_SCRATCH_START + b for b in range(bucket)]
    positions = torch.tensor(starts, device=stage.device)[:, None]
    return x, caches, starts, positions


def _step_args(
    stage: LlamaStage, x: Tensor, caches: Sequence[KVCache], starts: list[int], positions: Tensor
) -> tuple[LlamaStage, Tensor, Tensor, Tensor, list[list[Tensor]], list[list[Tensor]], list[int]]:
    """`_decode_step`'s arguments for a batch of rows."""
    rope = Rope.at(positions, stage.inv_freq, stage.activation_dtype)
    layers = range(len(stage.layers))
    keys = [[cache.keys[i] for cache in caches] for i in layers]
    values = [[cache.values[i] for cache in caches] for i in layers]
    return (stage, x, rope.cos, rope.sin, keys, values, starts)


def aot_compile_step(stage: LlamaStage, bucket: int) -> Any:
    """The bucket's decode step at torch's current thread count, compiled ahead of time
    (the same graph `CompiledDecoder` compiles, as `aot_compile` returns it: it saves)."""
    config: Any = torch.compiler.config
    with torch.no_grad(), config.patch(dynamic_sources=_DYNAMIC_SOURCES):
        args = _step_args(stage, *_example(stage, bucket))
        step: Any = torch.compile(_decode_step, fullgraph=True, options={"cpp.threads": 1})
        return step.aot_compile((args, {}))


def _bucket(rows: int) -> int:
    """The bucket a batch of `rows` runs in (larger batches: chunks of the largest)."""
    return next((b for b in BUCKETS if b >= rows), max(BUCKETS))
