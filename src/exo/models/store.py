"""Converted models on disk, one directory per model id, each converted exactly once."""

import fcntl
import shutil
from collections.abc import Callable, Generator
from contextlib import contextmanager
from pathlib import Path

from exo.models.builtin import builtin_gguf_path
from exo.models.cards import BUILTIN_SOURCE, card_for
from exo.models.convert import ProgressCallback, convert_gguf, read_record, staging_prefix
from exo.shared.types.models import ModelCard

# Where each card source's GGUF comes from.
_GGUF_SOURCES: dict[str, Callable[[], Path]] = {BUILTIN_SOURCE: builtin_gguf_path}


class UnsupportedModelSourceError(RuntimeError):
    """A known card whose weights this store cannot fetch."""


class ModelStore:
    """Rooted at a directory (the daemon uses `<cache dir>/models`)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def card(self, model_id: str) -> ModelCard:
        """Raises UnknownModelError for an id no card describes."""
        return card_for(model_id)

    def path_for(self, model_id: str) -> Path:
        return self.root / self.card(model_id).model_id

    def is_ready(self, model_id: str) -> bool:
        return read_record(self.path_for(model_id)) is not None

    def ensure(self, model_id: str, on_progress: ProgressCallback | None = None) -> Path:
        """The model's directory, converting it first if needed. Blocks; safe across processes."""
        path = self.path_for(model_id)
        if read_record(path) is not None:
            return path
        source = _GGUF_SOURCES.get(self.card(model_id).source)
        if source is None:
            raise UnsupportedModelSourceError(
                f"{model_id}: no way to fetch weights from {self.card(model_id).source}"
            )
        with self._lock(path):
            # Another process may have finished while we waited for the lock.
            if read_record(path) is not None:
                return path
            self._discard_partial(path)
            convert_gguf(source(), path, on_progress)
        return path

    @contextmanager
    def _lock(self, path: Path) -> Generator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with (self.root / f".{path.name}.lock").open("a") as lock_file:
            fcntl.flock(lock_file, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock_file, fcntl.LOCK_UN)

    def _discard_partial(self, path: Path) -> None:
        # Only called under the lock: any staging directory left is from a dead converter.
        for leftover in self.root.glob(f"{staging_prefix(path)}*"):
            shutil.rmtree(leftover, ignore_errors=True)
        if path.exists():
            shutil.rmtree(path)
