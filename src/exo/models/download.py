"""A hub model into the store: the files a stage needs, at the card's pinned commit.

A node that runs layers [start, end) of a sharded checkpoint fetches only the safetensors
files holding them (and the embedding, final norm and head where its stage needs those),
read from `model.safetensors.index.json`; a later stage of another range adds what it
lacks. Files land in the model's directory as `<file>.part`, resume from their length after
any interruption (a crash included), and take their real name only once their size and
digest match the hub's listing. The marker, rewritten atomically after every download,
lists the files present; the engines read only complete `*.safetensors` files.

The files may come from several sources in turn (`sources`): peers of the cluster that
hold them, which serve what they downloaded the hub's way (`served_file`,
`served_listing`), then the hub itself. Each file is still checked against the hub's
listing, and a file a source lacks or serves wrong is fetched from the next.
"""

import json
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from loguru import logger
from pydantic import BaseModel, TypeAdapter, ValidationError

from exo.models.architecture import layer_of
from exo.models.convert import (
    CONVERSION_FORMAT,
    MARKER_NAME,
    ConversionRecord,
    ProgressCallback,
    ThrottledProgress,
    read_record,
    require_free_space,
)
from exo.models.describe import wanted_files
from exo.models.hub import HubClient, HubError, HubFile, HubSource, listing_json

INDEX_NAME = "model.safetensors.index.json"
# Which commit the files in a model's directory belong to, written before the first of them.
_SOURCE_STAMP = ".exo_source"
# The hub's listing of the model's files (sizes, digests), served to peers.
_LISTING = ".exo_listing.json"
# The files the download in progress fetches ({path: size}): peers may follow them as they
# arrive (`ModelStore.served_part`). Removed when the download ends; stale after a crash,
# which the store's lock tells (no download holds it).
_FETCHING = ".exo_fetching.json"
_FETCHING_FILES = TypeAdapter(dict[str, int])


class _Index(BaseModel):
    """A sharded checkpoint's index: which file holds each tensor (other keys ignored)."""

    weight_map: dict[str, str]


def needed_files(
    files: list[HubFile], weight_map: dict[str, str] | None, n_layers: int, layers: range
) -> list[HubFile]:
    """Of a repository's wanted files, those a stage of `layers` reads (all of them for a
    checkpoint without an index)."""
    if weight_map is None:
        return files
    keep = _weight_files(weight_map, n_layers, layers)
    return [f for f in files if not f.path.endswith(".safetensors") or f.path in keep]


def holds(out_dir: Path, record: ConversionRecord, n_layers: int, layers: range) -> bool:
    """Whether a downloaded model's directory has every file a stage of `layers` reads."""
    if record.files is None or INDEX_NAME not in record.files:
        return True  # complete, or an unsharded checkpoint (whole once downloaded)
    weight_map = _weight_map(out_dir / INDEX_NAME)
    return _weight_files(weight_map, n_layers, layers) <= set(record.files)


def _weight_files(weight_map: dict[str, str], n_layers: int, layers: range) -> set[str]:
    first, last = layers.start == 0, layers.stop == n_layers
    keep: set[str] = set()
    for tensor, file in weight_map.items():
        layer = layer_of(tensor)
        if layer is not None:
            needed = layer in layers
        elif tensor.startswith("model.embed_tokens."):
            needed = first or last  # the last stage's head when the embedding is tied
        else:
            needed = last  # the final norm and the head
        if needed:
            keep.add(file)
    return keep


def download_model(
    sources: Sequence[HubClient],
    source: HubSource,
    out_dir: Path,
    on_progress: ProgressCallback | None,
    n_layers: int,
    layers: range | None = None,
) -> None:
    """Bring `out_dir` to hold what a stage of `layers` (None: every layer) needs, from the
    first of `sources` that has each file (peers first, the hub last)."""
    if not sources:
        raise ValueError("no source to download from")
    _claim(out_dir, source)
    record = read_record(out_dir)
    files = wanted_files(_listing(sources, source))
    _write_atomically(out_dir / _LISTING, listing_json(files))
    by_path = {f.path: f for f in files}
    weight_map = None
    if INDEX_NAME in by_path:
        _fetch(sources, source, out_dir, [by_path[INDEX_NAME]], None)  # small: no progress
        weight_map = _weight_map(out_dir / INDEX_NAME)
    wanted = needed_files(files, weight_map, n_layers, layers or range(n_layers))
    present: set[str] = set(record.files or ()) if record is not None else set()
    fetching = out_dir / _FETCHING
    _write_atomically(fetching, json.dumps({f.path: f.size for f in wanted}).encode())
    try:
        _fetch(sources, source, out_dir, wanted, on_progress)
    finally:
        fetching.unlink(missing_ok=True)
    have = present | {f.path for f in wanted}
    _write_record(
        out_dir,
        ConversionRecord(
            format=CONVERSION_FORMAT,
            source_file=str(source),
            source_bytes=sum(by_path[p].size for p in have if p in by_path),
            tensor_bytes=sum(by_path[p].size for p in have if p.endswith(".safetensors")),
            files=tuple(sorted(have)),
        ),
    )


def served_file(out_dir: Path, source: HubSource, path: str) -> Path | None:
    """A whole, checked file of `source`'s commit that `out_dir` holds (None: not here)."""
    if stored_source(out_dir) != source:
        return None
    record = read_record(out_dir)
    if record is None or record.files is None or path not in record.files:
        return None
    found = out_dir / path
    return found if found.is_file() else None


@dataclass(frozen=True)
class GrowingFile:
    """A file this node's download is fetching now, which a peer may follow as it arrives:
    its final path (its bytes are in `<path>.part` until it is whole and checked), its size
    from the listing, and whether the download still runs."""

    path: Path
    size: int
    downloading: Callable[[], bool]

    def open(self) -> int | None:
        """A descriptor of the part file, or of the whole file if it was renamed meanwhile
        (None: neither exists yet). It keeps reading the same bytes across the rename."""
        for candidate in (self.path.with_name(self.path.name + ".part"), self.path):
            try:
                return os.open(candidate, os.O_RDONLY)
            except FileNotFoundError:
                continue
        return None


def fetching_files(out_dir: Path, source: HubSource) -> dict[str, int] | None:
    """The files (path -> size) that a download of `source`'s commit into `out_dir` fetches
    (None: it has not listed them yet, or no download of that commit wrote them). Stale
    after a crash: only worth reading while a download runs (the caller knows: the store's
    lock)."""
    if stored_source(out_dir) != source:
        return None
    try:
        return _FETCHING_FILES.validate_json((out_dir / _FETCHING).read_bytes())
    except (OSError, ValidationError):
        return None


def served_listing(out_dir: Path, source: HubSource) -> bytes | None:
    """The hub's listing of `source`'s files, as this directory's download read it."""
    if stored_source(out_dir) != source:
        return None
    try:
        return (out_dir / _LISTING).read_bytes()
    except OSError:
        return None


def _listing(sources: Sequence[HubClient], source: HubSource) -> list[HubFile]:
    failure: HubError | None = None
    for client in sources:
        try:
            return client.files(source.repo, source.commit)
        except HubError as e:
            failure = e  # the last source's reason (the hub's) is the one reported
    assert failure is not None
    raise failure


def stored_source(out_dir: Path) -> HubSource | None:
    """The commit whose files a model's directory holds (None: not a hub download)."""
    try:
        return HubSource.parse((out_dir / _SOURCE_STAMP).read_text(encoding="utf-8"))
    except OSError:
        return None


def _claim(out_dir: Path, source: HubSource) -> None:
    """Make `out_dir` this commit's: what another commit left there (whole or in parts) is
    not this one's, even where names and sizes agree."""
    if stored_source(out_dir) == source:
        return
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    (out_dir / _SOURCE_STAMP).write_text(str(source), encoding="utf-8")


def _fetch(
    sources: Sequence[HubClient],
    source: HubSource,
    out_dir: Path,
    files: list[HubFile],
    on_progress: ProgressCallback | None,
) -> None:
    def held(file: HubFile) -> int:
        path = out_dir / file.path
        part = path.with_name(path.name + ".part")
        if path.exists():
            return file.size
        return part.stat().st_size if part.exists() else 0

    total = sum(f.size for f in files)
    have = sum(held(f) for f in files)
    require_free_space(out_dir, total - have)
    progress = ThrottledProgress(on_progress, total)
    progress.advance(have)
    for file in files:
        dest = out_dir / file.path
        if dest.exists() and dest.stat().st_size == file.size:
            continue  # verified before it was renamed from its part file
        _download(sources, source, file, dest, progress.advance)
    progress.finish()


def _download(
    sources: Sequence[HubClient],
    source: HubSource,
    file: HubFile,
    dest: Path,
    on_bytes: Callable[[int], None],
) -> None:
    """From the first source that serves `file` whole and right; the part file one source
    left is resumed by the next (same commit, same bytes)."""
    for n, client in enumerate(sources):
        try:
            client.download(source.repo, source.commit, file, dest, on_bytes)
        except HubError as e:
            if n == len(sources) - 1:
                raise
            logger.info(f"{source.repo}/{file.path}: not from {client.endpoint} ({e})")
            continue
        logger.info(f"{source.repo}/{file.path}: {file.size} bytes from {client.endpoint}")
        return


def _weight_map(index: Path) -> dict[str, str]:
    try:
        content = json.loads(index.read_text(encoding="utf-8"))
        weight_map = _Index.model_validate(content).weight_map
    except (OSError, ValueError, ValidationError) as e:
        raise ValueError(f"{index.name} is not a safetensors index: {e}") from e
    return dict(weight_map)


def _write_record(out_dir: Path, record: ConversionRecord) -> None:
    """Replace the marker atomically: a reader sees the old list or the new one."""
    _write_atomically(out_dir / MARKER_NAME, record.model_dump_json(indent=2).encode())


def _write_atomically(path: Path, content: bytes) -> None:
    staging = path.with_name(f".{path.name}.new")
    staging.write_bytes(content)
    staging.replace(path)
