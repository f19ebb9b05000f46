"""A local Hugging Face hub for the pull tests: a real HTTP server on 127.0.0.1.

It answers what huggingface_hub requests:
    GET  /api/models/{repo}[/revision/{rev}]?blobs=true   model_info (siblings with sizes, lfs sha256)
    GET  /api/models/{repo}/tree/{rev}[/{path}]            list_repo_tree
    HEAD /{repo}/resolve/{rev}/{file}                      get_hf_file_metadata (X-Repo-Commit, ETag,
                                                           X-Linked-Etag / X-Linked-Size for LFS)
    GET  /{repo}/resolve/{rev}/{file}                      the bytes, with Range support (206)
with the hub's X-Error-Code headers on 404s. Faults are set per file to test failures:
`cut_after` (close the connection after that many body bytes, once), `status_after_cut`
(answer every later GET with this status), `corrupt` (flip a byte but advertise the true
sha256), `get_status` (GET answers this status though HEAD and the listing succeed).
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse


@dataclass
class HubFile:
    data: bytes
    lfs: bool = True
    cut_after: int | None = None
    status_after_cut: int | None = None
    corrupt: bool = False
    get_status: int | None = None
    advertised_size: int | None = None  # lie about the size (free-disk tests)
    cdn: bool = False  # resolve answers 302 to a CDN host (127.0.0.2), as the hub does for LFS
    cut_done: bool = False

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def git_sha1(self) -> str:
        return hashlib.sha1(b"blob %d\0" % len(self.data) + self.data).hexdigest()

    @property
    def size(self) -> int:
        return self.advertised_size if self.advertised_size is not None else len(self.data)

    def body(self) -> bytes:
        if not self.corrupt:
            return self.data
        b = bytearray(self.data)
        b[len(b) // 2] ^= 0xFF
        return bytes(b)


@dataclass
class Repo:
    files: dict[str, HubFile]
    commit: str = "0123456789abcdef0123456789abcdef01234567"


@dataclass
class Request:
    method: str
    path: str
    range: str | None
    authorization: str | None


@dataclass
class LocalHub:
    repos: dict[str, Repo] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)

    def add(self, repo: str, files: dict[str, HubFile]) -> Repo:
        self.repos[repo] = Repo(files)
        return self.repos[repo]

    def start(self) -> str:
        hub = self

        class Handler(_Handler):
            pass

        Handler.hub = hub
        self.servers = []
        for host in ("127.0.0.1", "127.0.0.2"):  # the hub and its "CDN" (another origin)
            server = _Server((host, 0), Handler)
            threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
            self.servers.append(server)
        self.cdn_url = "http://127.0.0.2:%d" % self.servers[1].server_address[1]
        return "http://127.0.0.1:%d" % self.servers[0].server_address[1]

    def stop(self) -> None:
        for server in self.servers:
            server.shutdown()
            server.server_close()

    def gets(self, name: str) -> list[Request]:
        return [r for r in self.requests if r.method == "GET" and r.path.endswith("/" + name)]


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        import sys

        if not isinstance(sys.exc_info()[1], ConnectionError):  # a client that hung up: expected here
            super().handle_error(request, client_address)


_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$")
_INFO = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)(/revision/(?P<rev>[^/]+))?$")
_CDN = re.compile(r"^/cdn/(?P<sha>[0-9a-f]{64})$")
_TREE = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/tree/(?P<rev>[^/]+)(/(?P<path>.*))?$")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    hub: LocalHub

    def log_message(self, *args) -> None:  # quiet
        pass

    def do_HEAD(self) -> None:
        self._route(head=True)

    def do_GET(self) -> None:
        self._route(head=False)

    def _route(self, head: bool) -> None:
        path = unquote(urlparse(self.path).path)
        self.hub.requests.append(
            Request(self.command, path, self.headers.get("Range"), self.headers.get("authorization"))
        )
        if m := _RESOLVE.match(path):
            return self._resolve(m["repo"], m["rev"], m["file"], head)
        if m := _CDN.match(path):
            for repo in self.hub.repos.values():
                for f in repo.files.values():
                    if f.sha256 == m["sha"]:
                        return self._send_file(repo, f, head)
        if m := _TREE.match(path):
            return self._tree(m["repo"], m["rev"], m["path"] or "")
        if m := _INFO.match(path):
            return self._info(m["repo"], m["rev"])
        self._error(404, "EntryNotFound", "not found")

    # -- API ------------------------------------------------------------------------------

    def _repo(self, name: str, rev: str | None) -> Repo | None:
        repo = self.hub.repos.get(name)
        if repo is None:
            self._error(404, "RepoNotFound", f"Repository {name} not found")
            return None
        if rev not in (None, "main", repo.commit):
            self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
            return None
        return repo

    def _info(self, name: str, rev: str | None) -> None:
        if (repo := self._repo(name, rev)) is None:
            return
        siblings = []
        for fname, f in repo.files.items():
            s = {"rfilename": fname, "size": f.size, "blobId": f.git_sha1}
            if f.lfs:
                s["lfs"] = {"sha256": f.sha256, "size": f.size, "pointerSize": 134}
            siblings.append(s)
        self._json({"id": name, "modelId": name, "sha": repo.commit, "private": False, "siblings": siblings})

    def _tree(self, name: str, rev: str, prefix: str) -> None:
        if (repo := self._repo(name, rev)) is None:
            return
        out = []
        for fname, f in repo.files.items():
            if prefix and not fname.startswith(prefix.rstrip("/") + "/"):
                continue
            item = {"type": "file", "path": fname, "size": f.size, "oid": f.git_sha1}
            if f.lfs:
                item["lfs"] = {"oid": f.sha256, "size": f.size, "pointerSize": 134}
            out.append(item)
        self._json(out)

    # -- files ----------------------------------------------------------------------------

    def _resolve(self, name: str, rev: str, fname: str, head: bool) -> None:
        if (repo := self._repo(name, rev)) is None:
            return
        f = repo.files.get(fname)
        if f is None:
            return self._error(404, "EntryNotFound", f"{fname} does not exist", commit=repo.commit)
        if f.cdn:
            self.send_response(302)
            self.send_header("Location", f"{self.hub.cdn_url}/cdn/{f.sha256}")
            self.send_header("X-Repo-Commit", repo.commit)
            self.send_header("ETag", f'"{f.git_sha1}"')
            self.send_header("X-Linked-Etag", f'"{f.sha256}"')
            self.send_header("X-Linked-Size", str(f.size))
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self._send_file(repo, f, head)

    def _send_file(self, repo: Repo, f: HubFile, head: bool) -> None:
        if not head:
            status = f.get_status or (f.status_after_cut if f.cut_done else None)
            if status:
                return self._error(status, "EntryNotFound" if status == 404 else None, f"status {status}")
        body = f.body()
        start = 0
        rng = self.headers.get("Range")
        if rng and not head:
            m = re.match(r"bytes=(\d+)-(\d*)$", rng)
            if not m or int(m[1]) >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            start = int(m[1])
        self.send_response(206 if start else 200)
        self.send_header("X-Repo-Commit", repo.commit)
        etag = f.sha256 if f.lfs else f.git_sha1
        self.send_header("ETag", f'"{etag}"')
        if f.lfs:
            self.send_header("X-Linked-Etag", f'"{f.sha256}"')
            self.send_header("X-Linked-Size", str(f.size))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Type", "application/octet-stream")
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        self.send_header("Content-Length", str(f.size - start if head else len(body) - start))
        self.end_headers()
        if head:
            return
        payload = body[start:]
        if f.cut_after is not None and not f.cut_done:
            f.cut_done = True
            self.wfile.write(payload[: f.cut_after])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.wfile.write(payload)

    # -- helpers --------------------------------------------------------------------------

    def _json(self, obj) -> None:
        data = json.dumps(obj).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _error(self, status: int, code: str | None, message: str, commit: str | None = None) -> None:
        data = json.dumps({"error": message}).encode()
        self.send_response(status)
        if code:
            self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", message)
        if commit:
            self.send_header("X-Repo-Commit", commit)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
