"""A hub model into the store: its files at the card's pinned commit, resumable across restarts.

Files land in `.<name>.download-<commit>/` next to the model's directory. That directory is
kept when a download stops (crash, lost network, full disk), so the next try fetches only
what is missing, from where each file stopped. The marker is written last, then the
directory is renamed into place: a model directory with a marker is always complete.
"""

from pathlib import Path

from exo.models.convert import (
    CONVERSION_FORMAT,
    MARKER_NAME,
    ConversionRecord,
    ProgressCallback,
    ThrottledProgress,
    replace_dir,
    require_free_space,
)
from exo.models.describe import wanted_files
from exo.models.hub import HubClient, HubSource


def download_dir(out_dir: Path, source: HubSource) -> Path:
    return out_dir.with_name(f".{out_dir.name}.download-{source.commit[:12]}")


def download_model(
    client: HubClient, source: HubSource, out_dir: Path, on_progress: ProgressCallback | None
) -> None:
    files = wanted_files(client.files(source.repo, source.commit))
    total = sum(f.size for f in files)
    staging = download_dir(out_dir, source)
    staging.mkdir(parents=True, exist_ok=True)

    def held(path: Path) -> int:
        part = path.with_name(path.name + ".part")
        return path.stat().st_size if path.exists() else part.stat().st_size if part.exists() else 0

    have = sum(held(staging / f.path) for f in files)
    require_free_space(out_dir, total - have)
    progress = ThrottledProgress(on_progress, total)
    progress.advance(have)
    for file in files:
        dest = staging / file.path
        if dest.exists() and dest.stat().st_size == file.size:
            continue  # verified before it was renamed from its part file
        client.download(source.repo, source.commit, file, dest, progress.advance)
    record = ConversionRecord(
        format=CONVERSION_FORMAT,
        source_file=str(source),
        source_bytes=total,
        tensor_bytes=sum(f.size for f in files if f.path.endswith(".safetensors")),
    )
    (staging / MARKER_NAME).write_text(record.model_dump_json(indent=2))
    replace_dir(staging, out_dir)
    progress.finish()
