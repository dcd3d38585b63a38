"""Hugging Face hub client: pin a revision, list its files, read ranges, download with resume.

Only what the model store needs, over the hub's plain HTTP endpoints (so any mirror that
speaks them works, `HF_ENDPOINT` style, and tests run against a server on loopback):

- `GET /api/models/{repo}/revision/{revision}`: the commit a branch or tag points at;
- `GET /api/models/{repo}/tree/{commit}?recursive=true`: files with sizes and digests;
- `GET /{repo}/resolve/{commit}/{path}`: a file's bytes (redirects to a CDN), with `Range`.

Downloads go to `<dest>.part` and resume from its length; a file is kept only once its size
and digest (sha256 for LFS files, the git blob sha1 for the rest) match the listing. A broken
transfer is resumed at once while it makes progress; one that gets nowhere is tried again
after 1, 2, 4 and 8 s, then given up (the part file stays for the next try).
"""

import hashlib
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol
from urllib.parse import quote

import httpx
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from exo.config import DEFAULT_HF_ENDPOINT

_CHUNK_BYTES = 1024 * 1024
# Waits before each new try of a file whose last try fetched nothing (then it fails);
# a try that fetched something is followed by another at once, resuming.
_RETRY_WAITS_S = (1.0, 2.0, 4.0, 8.0)
# The hub's own rule for names: letters, digits, "-", "_", "." (no leading "." or "-").
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


class _Lfs(BaseModel):
    model_config = ConfigDict(frozen=True)
    oid: str


class _TreeEntry(BaseModel):
    """One entry of the hub's tree listing (other keys ignored)."""

    model_config = ConfigDict(frozen=True)
    type: str
    path: str
    size: int = Field(default=0, ge=0)
    oid: str | None = None
    lfs: _Lfs | None = None


class _Revision(BaseModel):
    model_config = ConfigDict(frozen=True)
    sha: str = Field(pattern=r"^[0-9a-f]{40}$")


_TREE = TypeAdapter(list[_TreeEntry])


class HubError(RuntimeError):
    """The hub could not be reached or answered something unusable."""


class HubNotFound(HubError):
    """No such repository, revision or file (or a private one without a token)."""


class HubDenied(HubError):
    """The repository is gated or private and the token (if any) does not open it."""


class HubCorrupt(HubError):
    """A downloaded file's size or digest differs from the hub's listing."""


def check_repo_id(repo: str) -> str:
    if not _REPO_ID.match(repo) or ".." in repo or "--" in repo or repo.endswith((".", "-")):
        raise ValueError(f"not a hub repository id (owner/name): {repo!r}")
    return repo


def is_repo_id(name: str) -> bool:
    try:
        check_repo_id(name)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class HubFile:
    path: str
    size: int
    # sha256 of the content for LFS files; None for plain git files.
    sha256: str | None
    # The git blob id (sha1 over "blob <size>\0" + content) of plain git files.
    git_oid: str | None


@dataclass(frozen=True)
class HubSource:
    """Where a card's weights come from: `hf:<owner/name>@<commit>` in `ModelCard.source`."""

    repo: str
    commit: str

    PREFIX = "hf:"

    def __str__(self) -> str:
        return f"{self.PREFIX}{self.repo}@{self.commit}"

    @classmethod
    def parse(cls, source: str) -> "HubSource | None":
        if not source.startswith(cls.PREFIX) or "@" not in source:
            return None
        repo, _, commit = source.removeprefix(cls.PREFIX).rpartition("@")
        if not _COMMIT.match(commit):
            return None
        try:
            return cls(check_repo_id(repo), commit)
        except ValueError:
            return None


class HubClient:
    def __init__(
        self,
        endpoint: str = DEFAULT_HF_ENDPOINT,
        token: str | None = None,
        timeout_s: float = 30.0,
        retry_waits_s: tuple[float, ...] = _RETRY_WAITS_S,
    ) -> None:
        self.endpoint = endpoint.rstrip("/")
        self._retry_waits_s = retry_waits_s
        headers = {"user-agent": "exo"}
        if token:
            headers["authorization"] = f"Bearer {token}"
        self._client = httpx.Client(
            # An unreachable hub (an offline cluster) answers within 10 s, not the read bound.
            headers=headers,
            timeout=httpx.Timeout(timeout_s, connect=10.0),
            follow_redirects=True,
        )

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> "HubClient":
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def commit_of(self, repo: str, revision: str) -> str:
        """The commit `revision` (branch, tag or commit) points at."""
        url = (
            f"{self.endpoint}/api/models/{check_repo_id(repo)}/revision/{quote(revision, safe='')}"
        )
        response = self._get(url, f"{repo}@{revision}")
        try:
            return _Revision.model_validate_json(response.content).sha
        except ValidationError as e:
            raise HubError(f"{self.endpoint} gave no commit for {repo}@{revision}") from e

    def files(self, repo: str, commit: str) -> list[HubFile]:
        """Every file of the repository at `commit` (following the listing's pages)."""
        url: str | None = (
            f"{self.endpoint}/api/models/{check_repo_id(repo)}/tree/{commit}?recursive=true"
        )
        found: list[HubFile] = []
        while url is not None:
            response = self._get(url, f"{repo}@{commit}")
            try:
                entries = _TREE.validate_json(response.content)
            except ValidationError as e:
                raise HubError(f"{url}: not a file listing") from e
            found += [_hub_file(e) for e in entries if e.type == "file"]
            following = response.links.get("next", {}).get("url")
            url = None if following is None else str(httpx.URL(url).join(following))
        return found

    def read(self, repo: str, commit: str, path: str, start: int, length: int) -> bytes:
        """Bytes [start, start + length) of a file (fewer if the file ends first)."""
        url = self._file_url(repo, commit, path)
        end = start + length - 1
        response = self._get(url, f"{repo}/{path}", {"range": f"bytes={start}-{end}"})
        if response.status_code == 206:
            return response.content
        return response.content[start : end + 1]  # a server that ignores Range

    def download(
        self, repo: str, commit: str, file: HubFile, dest: Path, on_bytes: Callable[[int], None]
    ) -> None:
        """Fetch `file` to `dest`, resuming `<dest>.part`; on_bytes(n) for each new chunk.

        Raises HubError when tries stop getting anywhere (the part file stays), HubCorrupt
        when the finished file does not match the listing (the part file is removed)."""
        part = _PartFile(dest.with_name(dest.name + ".part"), file)
        url = self._file_url(repo, commit, file.path)
        waits = iter(self._retry_waits_s)
        try:
            while True:
                before = part.size()
                try:
                    self._fetch_into(url, part, on_bytes)
                    break
                except (httpx.TransportError, _Retryable) as e:
                    # A transfer that moved on is tried again at once; one that got nowhere
                    # (hub down, network gone) waits longer each time, then gives up.
                    if part.size() > before:
                        continue
                    wait = next(waits, None)
                    if wait is None:
                        raise HubError(f"downloading {repo}/{file.path}: {e}") from e
                    time.sleep(wait)
        finally:
            part.close()
        part.check()
        part.path.rename(dest)

    # --- HTTP ---------------------------------------------------------------------------

    def _file_url(self, repo: str, commit: str, path: str) -> str:
        return f"{self.endpoint}/{check_repo_id(repo)}/resolve/{commit}/{quote(path)}"

    def _fetch_into(self, url: str, part: "_PartFile", on_bytes: Callable[[int], None]) -> None:
        have = part.resume()
        if have == part.file.size:
            return  # whole already (an empty file has nothing to fetch)
        headers = {"range": f"bytes={have}-"} if have else {}
        with self._client.stream("GET", url, headers=headers) as response:
            if response.status_code == 429 or response.status_code >= 500:
                raise _Retryable(f"the hub answered {response.status_code}")
            _raise_for(response, url)
            if response.status_code != 206 and have:
                # Not a partial answer: the whole file comes again.
                on_bytes(-have)
                have = part.restart()
            for chunk in response.iter_bytes():  # as they come: a break loses none
                part.append(chunk)
                have += len(chunk)
                on_bytes(len(chunk))
        if have < part.file.size:
            raise _Retryable(f"connection ended at {have} of {part.file.size} bytes")

    def _get(self, url: str, what: str, headers: dict[str, str] | None = None) -> httpx.Response:
        try:
            response = self._client.get(url, headers=headers)
        except httpx.TransportError as e:
            raise HubError(f"cannot reach {self.endpoint} for {what}: {e}") from e
        _raise_for(response, what)
        return response


class _Retryable(Exception):
    """A transfer that ended before the file did, or a hub too busy to answer."""


def _raise_for(response: httpx.Response, what: str) -> None:
    status = response.status_code
    if status < 400:
        return
    if status == 404:
        raise HubNotFound(f"{what}: not found on the hub")
    if status in (401, 403):
        raise HubDenied(
            f"{what}: the hub refused access ({status}); a gated or private repository "
            "needs HF_TOKEN set to a token that may read it"
        )
    raise HubError(f"{what}: the hub answered {status}")


def listing_json(files: list[HubFile]) -> bytes:
    """`files` as the hub's tree listing answers them (what `HubClient.files` reads back):
    a node serves the listing of what it downloaded to its peers."""
    entries = [
        _TreeEntry(
            type="file",
            path=f.path,
            size=f.size,
            oid=f.git_oid,
            lfs=_Lfs(oid=f.sha256) if f.sha256 is not None else None,
        )
        for f in files
    ]
    return _TREE.dump_json(entries, exclude_none=True)


def _hub_file(entry: _TreeEntry) -> HubFile:
    sha256 = entry.lfs.oid if entry.lfs is not None else None
    return HubFile(
        path=entry.path,
        size=entry.size,
        sha256=sha256,
        git_oid=entry.oid if sha256 is None else None,
    )


class _Digest(Protocol):
    def update(self, data: bytes, /) -> None: ...
    def hexdigest(self) -> str: ...


class _PartFile:
    """`<dest>.part` and the digest of the bytes in it, kept as they arrive so that the
    finished file's check needs no second pass over it."""

    def __init__(self, path: Path, file: HubFile) -> None:
        self.path, self.file = path, file
        self._digest = self._new_digest()
        self._hashed = 0
        self._out: BinaryIO | None = None

    def size(self) -> int:
        if self._out is not None:
            self._out.flush()
        return self.path.stat().st_size if self.path.exists() else 0

    def resume(self) -> int:
        """Open the part file for appending; what it holds (a previous try's or a previous
        process's bytes) is hashed first unless the digest already covers it."""
        self.close()
        have = self.size()
        if have > self.file.size:
            return self.restart()
        if have != self._hashed:
            self._digest, self._hashed = self._new_digest(), 0
            with self.path.open("rb") as f:
                while chunk := f.read(_CHUNK_BYTES):
                    self._digest.update(chunk)
                    self._hashed += len(chunk)
        self._out = self.path.open("ab" if have else "wb")
        return have

    def restart(self) -> int:
        """Drop what the part file holds: the source sends the whole file again."""
        self.close()
        self._digest, self._hashed = self._new_digest(), 0
        self._out = self.path.open("wb")
        return 0

    def append(self, chunk: bytes) -> None:
        assert self._out is not None, "resume() opens the part file"
        self._out.write(chunk)
        self._digest.update(chunk)
        self._hashed += len(chunk)

    def check(self) -> None:
        """Keep the part file only if its size and digest are the listing's."""
        self.close()
        file = self.file
        size = self.size()
        expected = file.sha256 if file.sha256 is not None else file.git_oid
        if size == file.size == self._hashed and (
            expected is None or self._digest.hexdigest() == expected
        ):
            return
        self.path.unlink()
        raise HubCorrupt(
            f"{file.path}: the download does not match the hub's listing "
            f"({size} of {file.size} bytes, or a different digest); it was removed, retry"
        )

    def _new_digest(self) -> "_Digest":
        if self.file.sha256 is not None:
            return hashlib.sha256()
        return hashlib.sha1(f"blob {self.file.size}\0".encode())

    def close(self) -> None:
        if self._out is not None:
            self._out.close()
            self._out = None
