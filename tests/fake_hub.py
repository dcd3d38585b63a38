"""A Hugging Face hub on loopback: the endpoints exo.models.hub uses, over real HTTP.

Serves repositories made of local files, as the hub does: the revision API, the paged tree
listing (LFS entries with sha256 for safetensors, git blob ids for the rest), and
`resolve` with redirects to a "CDN" path and byte ranges. Knobs make it misbehave: cut a
transfer short, answer 503, flip a byte, demand a token. Every request is recorded.
"""

import hashlib
import json
import threading
from collections.abc import Generator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit


@dataclass
class FakeRepo:
    files: dict[str, bytes]
    commit: str = "0123456789abcdef0123456789abcdef01234567"
    # Requests without "Authorization: Bearer <token>" get a 401.
    token: str | None = None

    @classmethod
    def from_dir(cls, directory: Path, **kwargs: str | None) -> "FakeRepo":
        files = {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}
        return cls(files, **kwargs)  # pyright: ignore[reportArgumentType]

    def entry(self, path: str) -> dict[str, object]:
        content = self.files[path]
        git = hashlib.sha1(f"blob {len(content)}\0".encode() + content).hexdigest()
        entry: dict[str, object] = {"type": "file", "path": path, "size": len(content)}
        if path.endswith(".safetensors"):
            sha = hashlib.sha256(content).hexdigest()
            entry |= {"oid": git, "lfs": {"oid": sha, "size": len(content), "pointerSize": 134}}
        else:
            entry["oid"] = git
        return entry


@dataclass
class FakeHub:
    repos: dict[str, FakeRepo] = field(default_factory=dict[str, FakeRepo])
    # Tree listing page size (None: one page).
    page_size: int | None = None
    # path -> how the next transfers of that file go, one entry each: ("cut", n) stops
    # after byte n of the file, ("status", code) answers that status instead, ("whole", 0)
    # ignores the Range asked for and sends the whole file (200), as some servers do.
    script: dict[str, list[tuple[str, int]]] = field(
        default_factory=dict[str, list[tuple[str, int]]]
    )
    # Files served with their last byte flipped.
    corrupt: set[str] = field(default_factory=set[str])
    # path -> seconds to wait after each MiB of that file sent (a slow link).
    pace: dict[str, float] = field(default_factory=dict[str, float])
    # Seconds the next tree listings wait before they answer, one entry each.
    listing_delays: list[float] = field(default_factory=list[float])
    requests: list[tuple[str, str | None]] = field(default_factory=list[tuple[str, str | None]])
    url: str = ""

    def ranges(self, path_suffix: str) -> list[str | None]:
        """The Range headers of the requests for a file's bytes."""
        return [r for p, r in self.requests if p.startswith("/cdn/") and p.endswith(path_suffix)]


def sharded(repo: FakeRepo, layer_files: list[tuple[int, int]], embedding: int) -> FakeRepo:
    """The repository's `model.safetensors` split the way large checkpoints come: file i
    holds layers [start, end) of `layer_files[i]`, file `embedding` the embedding (an index
    past the list: a file of its own), the last file the final norm; plus the index."""
    from safetensors.numpy import load, save

    tensors = load(repo.files.pop("model.safetensors"))
    count = max(len(layer_files), embedding + 1)
    names = [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]

    def file_of(name: str) -> str:
        if name.startswith("model.embed_tokens."):
            return names[embedding]
        if name.startswith("model.layers."):
            layer = int(name.split(".")[2])
            return names[next(i for i, (a, b) in enumerate(layer_files) if a <= layer < b)]
        return names[len(layer_files) - 1]

    weight_map = {name: file_of(name) for name in tensors}
    for file in names:
        part = {n: t for n, t in tensors.items() if weight_map[n] == file}
        repo.files[file] = save(part, metadata={"format": "mlx"})
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    repo.files["model.safetensors.index.json"] = json.dumps(index).encode()
    return repo


@contextmanager
def serving(hub: FakeHub) -> Generator[FakeHub]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(hub))
    server.daemon_threads = True
    hub.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield hub
    finally:
        server.shutdown()
        server.server_close()


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            url = urlsplit(self.path)
            path = unquote(url.path)
            hub.requests.append((path, self.headers.get("range")))
            parts = path.strip("/").split("/")
            if parts[:2] == ["api", "models"] and len(parts) >= 6:
                self._api(parts[2] + "/" + parts[3], parts[4], parts[5], parse_qs(url.query))
            elif len(parts) >= 5 and parts[2] == "resolve":
                self._resolve(parts[0] + "/" + parts[1], parts[3], "/".join(parts[4:]))
            elif parts[0] == "cdn" and len(parts) >= 5:
                self._bytes(parts[1] + "/" + parts[2], parts[3], "/".join(parts[4:]))
            else:
                self._send(404, b"{}")

        def _repo(self, name: str) -> FakeRepo | None:
            repo = hub.repos.get(name)
            if repo is None:
                self._send(404, b'{"error": "Repository not found"}')
                return None
            if repo.token is not None and self.headers.get("authorization") != (
                f"Bearer {repo.token}"
            ):
                self._send(401, b'{"error": "Invalid credentials"}')
                return None
            return repo

        def _api(self, name: str, what: str, revision: str, query: dict[str, list[str]]) -> None:
            repo = self._repo(name)
            if repo is None:
                return
            if revision not in ("main", repo.commit):
                self._send(404, b'{"error": "Revision not found"}')
            elif what == "revision":
                self._send(200, json.dumps({"id": name, "sha": repo.commit}).encode())
            elif what == "tree":
                if hub.listing_delays:
                    threading.Event().wait(hub.listing_delays.pop(0))
                entries = [repo.entry(p) for p in sorted(repo.files)]
                start = int(query.get("cursor", ["0"])[0])
                end = len(entries) if hub.page_size is None else start + hub.page_size
                headers: dict[str, str] = {}
                if end < len(entries):
                    base = f"/api/models/{name}/tree/{revision}?recursive=true"
                    headers["link"] = f'<{base}&cursor={end}>; rel="next"'
                self._send(200, json.dumps(entries[start:end]).encode(), headers)
            else:
                self._send(404, b"{}")

        def _resolve(self, name: str, revision: str, file: str) -> None:
            repo = self._repo(name)
            if repo is None:
                return
            if revision != repo.commit or file not in repo.files:
                self._send(404, b'{"error": "Entry not found"}')
            elif file.endswith(".safetensors"):  # LFS: the hub redirects to its CDN
                self._send(302, b"", {"location": f"/cdn/{name}/{revision}/{file}"})
            else:
                self._bytes(name, revision, file)

        def _bytes(self, name: str, revision: str, file: str) -> None:
            repo = hub.repos[name]
            content = repo.files[file]
            if file in hub.corrupt:
                content = content[:-1] + bytes([content[-1] ^ 0xFF])
            start, status = 0, 200
            headers: dict[str, str] = {}
            asked = self.headers.get("range")
            planned = hub.script.get(file)
            if planned and planned[0][0] == "whole":
                planned.pop(0)
                asked = None
            if asked is not None and asked.startswith("bytes="):
                first, _, last = asked.removeprefix("bytes=").partition("-")
                start = int(first)
                end = min(int(last) + 1 if last else len(content), len(content))
                headers["content-range"] = f"bytes {start}-{end - 1}/{len(content)}"
                content, status = content[start:end], 206
            pace = hub.pace.get(file)
            if planned:
                how, n = planned.pop(0)
                if how == "status":
                    self._send(n, b"busy")
                else:
                    self._send(status, content, headers, max(0, n - start), pace)
                return
            self._send(status, content, headers, pace=pace)

        def _send(
            self,
            status: int,
            body: bytes,
            headers: dict[str, str] | None = None,
            stop_after: int | None = None,
            pace: float | None = None,
        ) -> None:
            self.send_response(status)
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.send_header("content-length", str(len(body)))
            if stop_after is not None:
                self.send_header("connection", "close")
            self.end_headers()
            sent = body if stop_after is None else body[:stop_after]
            step = len(sent) if pace is None else 1 << 20
            for at in range(0, len(sent), max(step, 1)):
                self.wfile.write(sent[at : at + step])
                if pace is not None:
                    self.wfile.flush()
                    threading.Event().wait(pace)  # not time.sleep: tests may stub that
            if stop_after is not None:
                # A transfer that breaks: fewer bytes than announced, then the connection ends.
                self.wfile.flush()
                self.close_connection = True

    return Handler
