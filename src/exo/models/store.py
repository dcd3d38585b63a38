"""Converted models on disk, one directory per model id, each converted exactly once."""

import fcntl
import shutil
import time
from collections.abc import Callable, Generator, Sequence
from collections.abc import Set as AbstractSet
from contextlib import AbstractContextManager, ExitStack, contextmanager
from pathlib import Path

from loguru import logger

from exo.config import DEFAULT_HF_ENDPOINT
from exo.models.builtin import builtin_gguf_path
from exo.models.cards import BUILTIN_SOURCE, KNOWN_CARDS, UnknownModelError
from exo.models.convert import ProgressCallback, convert_gguf, read_record, staging_prefix
from exo.models.download import (
    GrowingFile,
    download_model,
    fetching_files,
    holds,
    served_file,
    served_listing,
    stored_source,
)
from exo.models.hub import HubClient, HubSource
from exo.shared.file_lock import try_lock
from exo.shared.types.ids import ModelId
from exo.shared.types.models import ModelCard

# How long a peer's request for a file waits for a download here that is still reading
# the hub's listing (and so has not said which files it fetches).
_LISTING_WAIT_S = 10.0
# Touched each time a hub model is prepared (a runner about to load it): its last use.
_USED_STAMP = ".exo_used"
# Where each card source's GGUF comes from.
_GGUF_SOURCES: dict[str, Callable[[], Path]] = {BUILTIN_SOURCE: builtin_gguf_path}


class UnsupportedModelSourceError(RuntimeError):
    """A known card whose weights this store cannot fetch."""


class ModelStore:
    """Rooted at a directory (the daemon uses `<cache dir>/models`).

    `card_for` looks a model up: the built-in cards by default; the daemon adds the cards in
    the cluster's state (models added from the hub). Hub models come from the peers
    `peers_for(model_id)` names (base URLs of their `/hub` routes: nodes that hold the
    model), then from `hub_endpoint`.
    """

    def __init__(
        self,
        root: Path,
        card_for: Callable[[ModelId], ModelCard | None] = KNOWN_CARDS.get,
        hub_endpoint: str = DEFAULT_HF_ENDPOINT,
        hub_token: str | None = None,
        peers_for: Callable[[ModelId], Sequence[str]] = lambda _model_id: (),
        max_bytes: int | None = None,
        in_use: Callable[[], AbstractSet[ModelId]] = frozenset,
    ) -> None:
        self.root = root
        self._card_for = card_for
        self._hub_endpoint = hub_endpoint
        self._hub_token = hub_token
        self._peers_for = peers_for
        self._max_bytes = max_bytes
        self._in_use = in_use

    def card(self, model_id: str) -> ModelCard:
        """Raises UnknownModelError for an id no card describes."""
        card = self._card_for(ModelId(model_id))
        if card is None:
            raise UnknownModelError(model_id)
        return card

    def path_for(self, model_id: str) -> Path:
        return self._directory(self.card(model_id).model_id)

    def _directory(self, model_id: str) -> Path:
        # A hub id's "/" would make a nested directory: "owner--name", as the hub's cache does.
        return self.root / model_id.replace("/", "--")

    def is_ready(self, model_id: str, layers: range | None = None) -> bool:
        return self._is_current(self.path_for(model_id), self.card(model_id), layers)

    @staticmethod
    def _is_current(path: Path, card: ModelCard, layers: range | None) -> bool:
        """Prepared for a stage of `layers` (None: every layer); a hub model at the card's
        commit (a re-added model moves it) with the files that stage reads."""
        record = read_record(path)
        if record is None:
            return False
        if HubSource.parse(card.source) is None:
            return True
        every = range(card.n_layers)
        return record.source_file == card.source and holds(
            path, record, card.n_layers, layers or every
        )

    def ensure(
        self,
        model_id: str,
        on_progress: ProgressCallback | None = None,
        layers: range | None = None,
    ) -> Path:
        """The model's directory, converting or downloading first if needed: for a hub model,
        the files a stage of `layers` reads (None: every layer). Blocks; safe across processes."""
        path, card = self.path_for(model_id), self.card(model_id)
        gguf = _GGUF_SOURCES.get(card.source)
        hub = HubSource.parse(card.source)
        if not self._is_current(path, card, layers):
            if gguf is None and hub is None:
                raise UnsupportedModelSourceError(
                    f"{model_id}: no way to fetch weights from {card.source}"
                )
            with self._lock(path):
                # Another process may have finished while we waited for the lock.
                if not self._is_current(path, card, layers):
                    self._prepare(card, path, hub, gguf, on_progress, layers)
        if hub is not None:
            _mark_used(path)
        return path

    def _prepare(
        self,
        card: ModelCard,
        path: Path,
        hub: HubSource | None,
        gguf: Callable[[], Path] | None,
        on_progress: ProgressCallback | None,
        layers: range | None,
    ) -> None:
        if hub is not None:
            if self._max_bytes is not None:
                self._make_room(card, layers or range(card.n_layers), self._max_bytes)
            # What an interrupted download left is resumed, not discarded.
            with ExitStack() as clients:
                sources = [
                    # A peer never sees the hub token; one that stops answering is
                    # left for the next source after one short wait.
                    clients.enter_context(HubClient(peer, retry_waits_s=(0.5,)))
                    for peer in self._peers_for(card.model_id)
                ]
                sources.append(
                    clients.enter_context(HubClient(self._hub_endpoint, self._hub_token))
                )
                download_model(sources, hub, path, on_progress, card.n_layers, layers)
        elif gguf is not None:
            self._discard_partial(path)
            convert_gguf(gguf(), path, on_progress)

    def _make_room(self, card: ModelCard, layers: range, max_bytes: int) -> None:
        """Keep the hub models' files within `max_bytes` once `card`'s stage of `layers` is
        here: remove whole models, least recently used first, that no instance on this node
        runs (nor another process prepares). Under the lock of `card`'s own directory."""
        held = self.hub_models()
        sizes = {model_id: _disk_bytes(path) for model_id, path in held.items()}
        wanted = card.bytes_per_layer * len(layers) + card.bytes_non_layer
        here = sizes.get(card.model_id, 0)
        over = sum(sizes.values()) + max(0, wanted - here) - max_bytes
        if over <= 0:
            return
        keep = set(self._in_use()) | {card.model_id}
        candidates = sorted(
            ((_last_used(path), model_id, path) for model_id, path in held.items()),
            key=lambda found: found[0],
        )
        for _used, model_id, path in candidates:
            if over <= 0:
                break
            if model_id in keep:
                continue
            size = sizes[model_id]
            with self._try_lock(path) as locked:
                if not locked:
                    continue  # another process prepares it now
                shutil.rmtree(path, ignore_errors=True)
            over -= size
            logger.info(
                f"removed the files of {model_id} ({size / 1e9:.2f} GB, the least recently "
                f"used) to keep the model store within {max_bytes / 1e9:.2f} GB"
            )
        if over > 0:
            logger.warning(
                f"the model store will be {over / 1e9:.2f} GB over its {max_bytes / 1e9:.2f} GB "
                f"limit with {card.model_id}: what else it holds is in use"
            )

    def served_file(self, repo: str, commit: str, path: str) -> Path | None:
        """A whole file of hub model `repo` at `commit` that this store holds, for a peer."""
        held = self._held(repo, commit)
        return None if held is None else served_file(held[0], held[1], path)

    def served_part(self, repo: str, commit: str, path: str) -> GrowingFile | None:
        """A file of hub model `repo` at `commit` that this store is downloading now, for a
        peer to follow as it arrives (None: no download here fetches it). A download that
        has not listed its files yet (it is reading the hub's listing) is waited for, up
        to `_LISTING_WAIT_S`. Blocks: call from a thread."""
        found = self._source_dir(repo, commit)
        if found is None:
            return None
        directory, source = found
        deadline = time.monotonic() + _LISTING_WAIT_S
        while self._locked(directory):
            fetching = fetching_files(directory, source)
            if fetching is not None:
                size = fetching.get(path)  # only names it fetches: nothing outside it
                if size is None:
                    return None
                return GrowingFile(directory / path, size, lambda: self._locked(directory))
            if time.monotonic() > deadline:
                return None
            time.sleep(0.05)
        return None

    def served_listing(self, repo: str, commit: str) -> bytes | None:
        """The hub's listing of `repo` at `commit`, if this store downloaded from it."""
        held = self._held(repo, commit)
        return None if held is None else served_listing(held[0], held[1])

    def _source_dir(self, repo: str, commit: str) -> tuple[Path, HubSource] | None:
        """Where `repo` at `commit` lives in this store, whether or not it is there yet."""
        source = HubSource.parse(f"{HubSource.PREFIX}{repo}@{commit}")
        return None if source is None else (self._directory(source.repo), source)

    def _held(self, repo: str, commit: str) -> tuple[Path, HubSource] | None:
        found = self._source_dir(repo, commit)
        return found if found is not None and found[0].is_dir() else None

    def hub_models(self) -> dict[ModelId, Path]:
        """The hub models this store holds files of (whole or in part), by model id."""
        if not self.root.is_dir():
            return {}
        held: dict[ModelId, Path] = {}
        for path in self.root.iterdir():
            source = stored_source(path)
            if source is not None and path.is_dir():
                held[ModelId(source.repo)] = path
        return held

    def remove(self, model_id: ModelId) -> None:
        """Delete a hub model's files (a no-op when none are here). Blocks until no other
        process prepares it."""
        path = self.hub_models().get(model_id)
        if path is None:
            return
        with self._lock(path):
            shutil.rmtree(path, ignore_errors=True)

    def _lock_path(self, path: Path) -> Path:
        return self.root / f".{path.name}.lock"

    def _try_lock(self, path: Path) -> AbstractContextManager[bool]:
        """The lock of `path` if nobody holds it (True), else False at once."""
        self.root.mkdir(parents=True, exist_ok=True)
        return try_lock(self._lock_path(path))

    @contextmanager
    def _lock(self, path: Path) -> Generator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with self._lock_path(path).open("a") as lock_file:
            fcntl.flock(lock_file, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock_file, fcntl.LOCK_UN)

    def _locked(self, path: Path) -> bool:
        """Whether some process (this one included) prepares the model at `path` now."""
        try:
            lock_file = self._lock_path(path).open("rb")
        except FileNotFoundError:
            return False
        with lock_file:
            try:
                fcntl.flock(lock_file, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(lock_file, fcntl.LOCK_UN)
            return False

    def _discard_partial(self, path: Path) -> None:
        # Only called under the lock: any staging directory left is from a dead converter.
        for leftover in self.root.glob(f"{staging_prefix(path)}*"):
            shutil.rmtree(leftover, ignore_errors=True)
        if path.exists():
            shutil.rmtree(path)


def _mark_used(path: Path) -> None:
    try:
        (path / _USED_STAMP).touch()
    except OSError:
        pass  # a full or read-only disk: the directory's own time stands in


def _last_used(path: Path) -> float:
    for candidate in (path / _USED_STAMP, path):
        try:
            return candidate.stat().st_mtime
        except OSError:
            continue
    return 0.0


def _disk_bytes(path: Path) -> int:
    """What the files under `path` take on disk (part files included)."""
    total = 0
    for found in path.rglob("*"):
        try:
            if found.is_file():
                total += found.stat().st_blocks * 512
        except OSError:
            continue
    return total
