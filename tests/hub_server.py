"""A small Hugging Face Hub on 127.0.0.1, for tests that run the real `huggingface_hub` client against it.

`HubServer({(repo_type, repo_id, filename): bytes, …})` serves those files the way huggingface.co does, as
git-LFS files. It speaks the part of the Hub's HTTP API that our code's calls use (huggingface_hub 2.4):

- `HEAD`/`GET /{datasets/|spaces/}{repo_id}/resolve/{revision}/{filename}` → 302 to the file's blob on a
  second origin (the stand-in for the Hub's CDN), with `X-Repo-Commit`, `ETag` (the git oid of the LFS pointer),
  `X-Linked-Etag` (the LFS oid, i.e. the sha256), `X-Linked-Size` and `Location`. The client reads the metadata
  from this redirect and fetches the bytes from `Location` (`hf_hub_download`);
- `HEAD`/`GET <cdn>/lfs/{sha256}` → 200 with the bytes;
- `POST /api/{repo_type}s/{repo_id}/paths-info/{revision}` (form `paths=…&expand=…`) → the files' git and LFS
  metadata as JSON (`HfApi.get_paths_info`);
- `GET /api/{repo_type}s/{repo_id}/tree/{revision}[/{path}]?recursive=…` → the file listing
  (`HfApi.list_repo_tree`, `list_repo_files`), in one page;
- 404 with the Hub's `X-Error-Code` (RepoNotFound, RevisionNotFound, EntryNotFound) for anything else.

`revision` is `main` or the repository's (made-up, stable) commit hash. `advertised_sha256` makes the server
publish another sha256 for a file than its bytes have: a file corrupted on the way, as the client sees it.
Every request is recorded in `requests` as (method, origin "hub" or "cdn", path) so that a test can check what
the client asked for. Range requests are not supported (the client then restarts an interrupted download).

Why a subprocess: huggingface_hub reads `HF_ENDPOINT` once, when it is imported (`constants.ENDPOINT`, and the
URL templates and trusted origins built from it), and the test process imported it long before any test runs.
Rather than patch those module globals in-process, `run_sa2vp` runs the installed `sa2vp` command in a fresh
process whose environment points `HF_ENDPOINT` at this server and `HF_HOME` at a temporary folder (no real
token or cache is read or written), with telemetry off and no proxy: the shipped command, end to end.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sysconfig
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import NamedTuple
from urllib.parse import parse_qs, unquote, urlsplit

FileKey = tuple[str, str, str]  # (repo_type: "model" | "dataset" | "space", repo_id, filename)

_RESOLVE = re.compile(r"^/(?:(?P<kind>datasets|spaces)/)?(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$")
_API = re.compile(
    r"^/api/(?P<kind>models|datasets|spaces)/(?P<repo>[^/]+/[^/]+)/(?P<op>paths-info|tree)/"
    r"(?P<rev>[^/]+)(?:/(?P<path>.*))?$"
)


class Request(NamedTuple):  # equal to the plain tuple (method, origin, path)
    method: str
    origin: str  # "hub" or "cdn"
    path: str  # as sent (percent-encoded), without the query


@dataclass(frozen=True)
class _File:
    data: bytes
    sha256: str  # the one the hub publishes (normally that of `data`)

    @property
    def pointer(self) -> bytes:  # the git-LFS pointer file that git stores in place of the bytes
        return f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\nsize {len(self.data)}\n".encode()

    @property
    def git_oid(self) -> str:  # git's blob id of the pointer file
        return hashlib.sha1(b"blob %d\0" % len(self.pointer) + self.pointer).hexdigest()

    def entry(self, path: str) -> dict[str, object]:
        lfs = {"oid": self.sha256, "size": len(self.data), "pointerSize": len(self.pointer)}
        return {"type": "file", "oid": self.git_oid, "size": len(self.data), "lfs": lfs, "path": path}


def commit_hash(repo_type: str, repo_id: str) -> str:
    """The commit every revision of a served repository resolves to (made up, stable)."""
    return hashlib.sha1(f"{repo_type}/{repo_id}".encode()).hexdigest()


class HubServer:
    """The Hub (and its CDN) on two free loopback ports while the `with` block runs."""

    def __init__(self, files: Mapping[FileKey, bytes], advertised_sha256: Mapping[FileKey, str] | None = None):
        advertised = dict(advertised_sha256 or {})
        self.repos: dict[tuple[str, str], dict[str, _File]] = {}
        self.blobs: dict[str, bytes] = {}
        for (repo_type, repo_id, filename), data in files.items():
            file = _File(data, advertised.get((repo_type, repo_id, filename), hashlib.sha256(data).hexdigest()))
            self.repos.setdefault((repo_type, repo_id), {})[filename] = file
            self.blobs[file.sha256] = data
        self.requests: list[Request] = []
        self._servers = [_Origin(self, "hub"), _Origin(self, "cdn")]
        self.endpoint, self.cdn_endpoint = (f"http://127.0.0.1:{s.server_address[1]}" for s in self._servers)

    def __enter__(self) -> HubServer:
        for server in self._servers:
            threading.Thread(target=server.serve_forever, name=f"hub-{server.origin}", daemon=True).start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        for server in self._servers:  # afterwards the ports refuse connections: a hub that went away
            server.shutdown()
            server.server_close()

    def client_env(self, hf_home: Path, **extra: str) -> dict[str, str]:
        """The environment for a process whose huggingface_hub should talk to this server only."""
        drop = ("HF_", "HUGGING_FACE_", "SA2VP_")  # no real token, cache, offline flag or project setting
        env = {k: v for k, v in os.environ.items() if not k.startswith(drop) and not k.lower().endswith("_proxy")}
        env.update(
            HF_ENDPOINT=self.endpoint,
            HF_HOME=str(hf_home),
            HF_HUB_DISABLE_TELEMETRY="1",
            NO_PROXY="127.0.0.1",
            no_proxy="127.0.0.1",
            **extra,
        )
        return env


def run_sa2vp(args: Sequence[str], cwd: Path, env: Mapping[str, str]) -> subprocess.CompletedProcess[str]:
    """Run the installed `sa2vp` command (this environment's script) in `cwd`; output captured as text."""
    command = Path(sysconfig.get_path("scripts")) / "sa2vp"
    return subprocess.run(
        [str(command), *args], cwd=cwd, env=dict(env), capture_output=True, text=True, timeout=120, check=False
    )


class _Origin(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, hub: HubServer, origin: str):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.hub, self.origin = hub, origin


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the client's connection pool expects; every reply has a length
    server: _Origin

    def log_message(self, format: str, *args: object) -> None:
        pass  # `requests` records what matters; nothing on stderr

    def do_HEAD(self) -> None:
        self._handle("HEAD")

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def _handle(self, method: str) -> None:
        url = urlsplit(self.path)
        hub = self.server.hub
        hub.requests.append(Request(method, self.server.origin, url.path))
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.server.origin == "cdn":
            sha256 = url.path.removeprefix("/lfs/")
            if method in ("HEAD", "GET") and sha256 in hub.blobs:
                data = hub.blobs[sha256]
                return self._reply(200, data, {"Content-Type": "application/octet-stream", "ETag": f'"{sha256}"'})
            return self._reply(404, b"not found")
        if (match := _RESOLVE.match(url.path)) and method in ("HEAD", "GET"):
            repo_type = {"datasets": "dataset", "spaces": "space"}.get(match["kind"] or "", "model")
            return self._resolve(repo_type, match["repo"], unquote(match["rev"]), unquote(match["file"]))
        if (match := _API.match(url.path)) and (method, match["op"]) in (("POST", "paths-info"), ("GET", "tree")):
            repo_type = match["kind"][:-1]
            files = self._repo(repo_type, match["repo"], unquote(match["rev"]))
            if files is None:
                return
            if match["op"] == "paths-info":
                return self._json(_paths_info(files, _requested_paths(self.headers.get("Content-Type", ""), body)))
            recursive = parse_qs(url.query).get("recursive", ["false"])[0].lower() == "true"
            return self._json(_tree(files, unquote(match["path"] or ""), recursive))
        return self._reply(404, b'{"error": "not found"}', {"Content-Type": "application/json"})

    def _repo(self, repo_type: str, repo_id: str, revision: str) -> dict[str, _File] | None:
        files = self.server.hub.repos.get((repo_type, repo_id))
        if files is None:
            self._error(404, "RepoNotFound", "Repository not found")
        elif revision not in ("main", commit_hash(repo_type, repo_id)):
            self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
            files = None
        return files

    def _resolve(self, repo_type: str, repo_id: str, revision: str, filename: str) -> None:
        files = self._repo(repo_type, repo_id, revision)
        if files is None:
            return
        commit = commit_hash(repo_type, repo_id)
        file = files.get(filename)
        if file is None:
            return self._error(
                404, "EntryNotFound", f'{filename} does not exist on "{revision}"', {"X-Repo-Commit": commit}
            )
        self._reply(
            302,
            b"",
            {
                "Location": f"{self.server.hub.cdn_endpoint}/lfs/{file.sha256}",
                "X-Repo-Commit": commit,
                "ETag": f'"{file.git_oid}"',
                "X-Linked-Etag": f'"{file.sha256}"',
                "X-Linked-Size": str(len(file.data)),
            },
        )

    def _error(self, status: int, code: str, message: str, headers: Mapping[str, str] | None = None) -> None:
        body = json.dumps({"error": message}).encode()
        self._reply(
            status,
            body,
            {"Content-Type": "application/json", "X-Error-Code": code, "X-Error-Message": message, **(headers or {})},
        )

    def _json(self, value: object) -> None:
        self._reply(200, json.dumps(value).encode(), {"Content-Type": "application/json"})

    def _reply(self, status: int, body: bytes, headers: Mapping[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))  # for HEAD too: the length a GET would have
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


def _requested_paths(content_type: str, body: bytes) -> list[str]:
    if content_type.startswith("application/json"):
        paths = json.loads(body or b"{}").get("paths", [])
        return [paths] if isinstance(paths, str) else list(paths)
    return parse_qs(body.decode(), keep_blank_values=True).get("paths", [])


def _folders(files: Iterable[str]) -> set[str]:
    return {"/".join(name.split("/")[:i]) for name in files for i in range(1, name.count("/") + 1)}


def _folder_entry(path: str) -> dict[str, object]:
    return {"type": "directory", "oid": hashlib.sha1(f"tree {path}".encode()).hexdigest(), "size": 0, "path": path}


def _paths_info(files: Mapping[str, _File], paths: Iterable[str]) -> list[dict[str, object]]:
    folders = _folders(files)
    return [files[p].entry(p) if p in files else _folder_entry(p) for p in paths if p in files or p in folders]


def _tree(files: Mapping[str, _File], under: str, recursive: bool) -> list[dict[str, object]]:
    prefix = f"{under.strip('/')}/" if under.strip("/") else ""
    names = sorted({*files, *_folders(files)})
    inside = [n for n in names if n.startswith(prefix) and (recursive or "/" not in n[len(prefix) :])]
    return [files[n].entry(n) if n in files else _folder_entry(n) for n in inside]
