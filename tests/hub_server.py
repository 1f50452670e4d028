"""A local HTTP server that speaks the part of the Hub API that ``huggingface_hub`` 2.4 uses to push and pull.

The tests point the real ``huggingface_hub`` client (``HF_ENDPOINT`` or ``endpoint=``) at it over loopback, so
push and pull run the client's own code paths end to end: nothing in the client is patched.

What it implements (model repos only), as the client calls it:

* ``POST /api/repos/create``, ``POST /api/models/{repo}/branch/{branch}``, ``GET /api/whoami-v2``
* ``POST /api/validate-yaml`` (the client validates a ``README.md``'s metadata before committing it)
* ``POST /api/models/{repo}/preupload/{rev}``: decides per file "regular" (inlined, base64, in the commit) or
  "lfs" (uploaded first), like the Hub's ``.gitattributes`` (weights files and binary files go to LFS)
* ``POST /{repo}.git/info/lfs/objects/batch`` + ``PUT`` of the content to a signed URL + ``POST`` verify: the
  git-LFS "basic" transfer. The client uploads LFS files with Xet instead whenever ``hf_xet`` is installed,
  which this server does not speak: clients that push LFS files here must run with ``HF_HUB_DISABLE_XET=1``.
* ``POST /api/models/{repo}/commit/{rev}`` (NDJSON: header, ``file``, ``lfsFile``, ``deletedFile``)
* ``GET /api/models/{repo}`` and ``/api/models/{repo}/revision/{rev}`` (model info: ``sha``, ``siblings``)
* ``GET /api/models/{repo}/tree/{rev}[/{path}]`` and ``POST .../paths-info/{rev}`` (used by ``snapshot_download``)
* ``HEAD`` / ``GET /{repo}/resolve/{rev}/{path}``: a regular file is served with ``ETag`` (its git blob id),
  ``X-Repo-Commit`` and ``Content-Length``; an LFS file answers ``302`` to a signed URL on another host name (the
  "CDN": same server, reached as ``cdn_host``) with ``X-Linked-Etag`` (its sha256) and ``X-Linked-Size``, which is
  how the client learns the blob name and size, and why it drops the ``Authorization`` header for the download.
  ``Range`` requests are honoured (the client resumes an interrupted download with one).

Access: a token (``Authorization: Bearer ...``) maps to a user; a user may write to its own namespace and its
organisations'. A private repo is invisible without such a token: ``401`` (no token) or ``404`` (another user),
with ``X-Error-Code: RepoNotFound``, as the Hub answers.

Test controls: :meth:`HubServer.seed_repo` writes a repo directly (server side), :meth:`HubServer.fail_downloads`
makes downloads of a file break part-way (the connection is dropped after a given byte), :attr:`HubServer.log`
records every request.

Run ``python tests/hub_server.py`` to serve on a fixed port by hand.
"""

from __future__ import annotations

import base64
import contextlib
import fnmatch
import hashlib
import hmac
import json
import re
import secrets
import socket
import threading
import time
from dataclasses import dataclass, field
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

import yaml

__all__ = ["DEFAULT_LFS_PATTERNS", "HubServer"]

DEFAULT_LFS_PATTERNS = (
    "*.safetensors",
    "*.bin",
    "*.pt",
    "*.pth",
    "*.ckpt",
    "*.h5",
    "*.msgpack",
    "*.onnx",
    "*.gguf",
)
LFS_SIZE_THRESHOLD = 10 * 1024 * 1024  # the Hub sends files over 10 MB to LFS whatever their name
_REPO = r"(?P<repo>[A-Za-z0-9][\w.\-]*/[\w.\-]+)"


def git_blob_oid(content: bytes) -> str:
    """The git object id of a blob: sha1 of ``b"blob <size>\\0" + content`` (the ETag of a regular file)."""
    return hashlib.sha1(b"blob %d\x00" % len(content) + content).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    """The git-LFS pointer file that git stores in place of an LFS file."""
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


@dataclass(frozen=True)
class StoredFile:
    """One file of a commit."""

    content: bytes
    lfs: bool

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.content).hexdigest()

    @property
    def pointer(self) -> bytes:
        return lfs_pointer(self.sha256, len(self.content))

    @property
    def oid(self) -> str:
        """git blob id of what git stores: the content, or the LFS pointer."""
        return git_blob_oid(self.pointer if self.lfs else self.content)


@dataclass
class Commit:
    oid: str
    parent: str | None
    message: str
    files: dict[str, StoredFile]
    date: float = field(default_factory=time.time)


@dataclass
class Repo:
    repo_id: str
    private: bool
    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, Commit] = field(default_factory=dict)
    created: float = field(default_factory=time.time)

    def resolve(self, revision: str) -> Commit | None:
        if revision in self.branches:
            return self.commits[self.branches[revision]]
        if re.fullmatch(r"[0-9a-f]{40}", revision):
            return self.commits.get(revision)
        return None


@dataclass
class _DownloadFailure:
    after_bytes: int
    remaining: int | None  # failing requests left; None: every request fails


class _HubError(Exception):
    def __init__(
        self, status: int, message: str, code: str | None = None, headers: dict | None = None, **body: Any
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = headers or {}
        self.body = body


class HubServer:
    """A Hub endpoint on ``127.0.0.1`` (``url``), with its LFS "CDN" on ``cdn_host`` (same port).

    Args:
        tokens: token -> user name. Default: ``{"hf_write_alice": "alice"}``.
        orgs: user name -> organisations the user may write to. Default: ``{"alice": ["org"]}``.
        lfs_patterns: file name patterns stored in LFS (uploaded through the LFS batch API); ``()`` stores
            every file as a regular git file (inlined in the commit), which works with a client that has Xet on.
        cdn_host: host name of the signed download URLs of LFS files. ``"localhost"`` differs from the API's
            ``127.0.0.1``, so the client treats it as a CDN (no ``Authorization`` header), as on the Hub.
    """

    def __init__(
        self,
        tokens: dict[str, str] | None = None,
        orgs: dict[str, list[str]] | None = None,
        lfs_patterns: tuple[str, ...] = DEFAULT_LFS_PATTERNS,
        cdn_host: str = "localhost",
    ) -> None:
        self.tokens = dict(tokens if tokens is not None else {"hf_write_alice": "alice"})
        self.orgs = {k: list(v) for k, v in (orgs if orgs is not None else {"alice": ["org"]}).items()}
        self.lfs_patterns = tuple(lfs_patterns)
        self.cdn_host = cdn_host
        self.repos: dict[str, Repo] = {}
        self.lfs_store: dict[str, bytes] = {}
        self.log: list[tuple[str, str, int]] = []  # (method, path, status)
        self._failures: dict[str, _DownloadFailure] = {}
        self._secret = secrets.token_bytes(16)
        self._lock = threading.RLock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._commit_counter = 0

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> HubServer:
        handler = type("_BoundHandler", (_Handler,), {"hub": self})
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="hub-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._httpd is not None, "start() the server first"
        return self._httpd.server_address[1]

    @property
    def url(self) -> str:
        """The endpoint to give the client (``HF_ENDPOINT`` / ``endpoint=``)."""
        return f"http://127.0.0.1:{self.port}"

    # ------------------------------------------------------------------ test controls
    def seed_repo(
        self, repo_id: str, files: dict[str, bytes], *, private: bool = False, branch: str = "main"
    ) -> str:
        """Create ``repo_id`` (if needed) and commit ``files`` to ``branch`` server side; returns the commit id."""
        with self._lock:
            repo = self.repos.get(repo_id) or self._create_repo(repo_id, private)
            head = repo.resolve(branch)
            base = dict(head.files) if head is not None else {}
            for path, content in files.items():
                base[path] = StoredFile(content, self._is_lfs_path(path, len(content), content[:512]))
            return self._add_commit(repo, branch, base, f"Seed {len(files)} file(s)")

    def fail_downloads(self, filename: str, after_bytes: int, times: int | None = None) -> None:
        """Make downloads of ``filename`` (any repo, regular or LFS) drop the connection at byte ``after_bytes``.

        A request for bytes ``[start, end)`` sends what lies before ``after_bytes`` and then closes the socket
        mid-body (so a resumed request starting at or after ``after_bytes`` gets nothing). ``times``: how many
        requests fail before downloads work again (``None``: all of them).
        """
        with self._lock:
            self._failures[filename] = _DownloadFailure(after_bytes, times)

    def clear_failures(self) -> None:
        with self._lock:
            self._failures.clear()

    def file(self, repo_id: str, path: str, revision: str = "main") -> StoredFile:
        """A stored file (for assertions)."""
        with self._lock:
            commit = self.repos[repo_id].resolve(revision)
            assert commit is not None, f"no revision {revision!r} in {repo_id}"
            return commit.files[path]

    def head(self, repo_id: str, revision: str = "main") -> str:
        with self._lock:
            return self.repos[repo_id].branches[revision]

    # ------------------------------------------------------------------ state helpers (hold the lock)
    def _is_lfs_path(self, path: str, size: int, sample: bytes) -> bool:
        if not self.lfs_patterns:
            return False
        name = path.rsplit("/", 1)[-1]
        if any(fnmatch.fnmatch(name, pattern) for pattern in self.lfs_patterns):
            return True
        return size > LFS_SIZE_THRESHOLD or b"\x00" in sample

    def _create_repo(self, repo_id: str, private: bool) -> Repo:
        repo = Repo(repo_id, private)
        self.repos[repo_id] = repo
        attributes = "".join(f"{p} filter=lfs diff=lfs merge=lfs -text\n" for p in self.lfs_patterns)
        self._add_commit(
            repo, "main", {".gitattributes": StoredFile(attributes.encode(), False)}, "initial commit"
        )
        return repo

    def _add_commit(self, repo: Repo, branch: str, files: dict[str, StoredFile], message: str) -> str:
        self._commit_counter += 1
        parent = repo.branches.get(branch)
        digest = hashlib.sha1()
        digest.update(f"{repo.repo_id}\n{parent}\n{message}\n{self._commit_counter}\n".encode())
        for path in sorted(files):
            digest.update(f"{path} {files[path].oid}\n".encode())
        oid = digest.hexdigest()
        repo.commits[oid] = Commit(oid, parent, message, dict(files))
        repo.branches[branch] = oid
        return oid

    def _sign(self, *parts: str) -> str:
        return hmac.new(self._secret, "\n".join(parts).encode(), hashlib.sha256).hexdigest()[:32]

    def _user(self, headers) -> str | None:
        auth = headers.get("Authorization") or headers.get("authorization")
        if not auth:
            return None
        token = auth.split(" ", 1)[1] if auth.lower().startswith("bearer ") else auth
        user = self.tokens.get(token.strip())
        if user is None:
            raise _HubError(401, "Invalid credentials in Authorization header", None)
        return user

    def _can_write(self, user: str | None, namespace: str) -> bool:
        return user is not None and (namespace == user or namespace in self.orgs.get(user, []))

    def _readable_repo(self, repo_id: str, user: str | None) -> Repo:
        repo = self.repos.get(repo_id)
        if repo is None or (repo.private and not self._can_write(user, repo_id.split("/")[0])):
            raise _HubError(401 if user is None else 404, "Repository not found", "RepoNotFound")
        return repo

    def _writable_repo(self, repo_id: str, user: str | None) -> Repo:
        repo = self._readable_repo(repo_id, user)
        if user is None:
            raise _HubError(401, "You must be authenticated to write to a repo", None)
        if not self._can_write(user, repo_id.split("/")[0]):
            raise _HubError(403, f"You don't have the rights to write to {repo_id}", None)
        return repo

    @staticmethod
    def _commit_of(repo: Repo, revision: str) -> Commit:
        commit = repo.resolve(revision)
        if commit is None:
            raise _HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return commit


def _entry(path: str, stored: StoredFile) -> dict[str, Any]:
    entry: dict[str, Any] = {"type": "file", "oid": stored.oid, "size": len(stored.content), "path": path}
    if stored.lfs:
        entry["lfs"] = {"oid": stored.sha256, "size": len(stored.content), "pointerSize": len(stored.pointer)}
    return entry


def _front_matter(text: str) -> dict | None:
    match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", text, re.DOTALL)
    if match is None:
        return None
    data = yaml.safe_load(match.group(1))
    return data if isinstance(data, dict) else None


class _Handler(BaseHTTPRequestHandler):
    hub: HubServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # keep the test output quiet
        return

    # ------------------------------------------------------------------ plumbing
    def _body(self) -> bytes:
        self._body_was_read = True
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _json_body(self) -> Any:
        body = self._body()
        try:
            return json.loads(body or b"{}")
        except json.JSONDecodeError as error:
            raise _HubError(400, f"invalid JSON body: {error}") from None

    def _send(
        self, status: int, body: bytes = b"", headers: dict | None = None, head_only: bool = False
    ) -> None:
        self.send_response(status)
        headers = dict(headers or {})
        headers.setdefault("Content-Length", str(len(body)))
        headers.setdefault("Date", formatdate(usegmt=True))
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if body and not head_only and self.command != "HEAD":
            self.wfile.write(body)
        self.hub.log.append((self.command, self.path, status))

    def _send_json(self, data: Any, status: int = 200, headers: dict | None = None) -> None:
        self._send(status, json.dumps(data).encode(), {"Content-Type": "application/json", **(headers or {})})

    def _send_error(self, error: _HubError) -> None:
        headers = {"X-Error-Message": error.message, **error.headers}
        if error.code:
            headers["X-Error-Code"] = error.code
        self._send_json({"error": error.message, **error.body}, error.status, headers)

    _body_was_read = False

    def _dispatch(self) -> None:
        self._body_was_read = False  # one handler serves every request of a keep-alive connection
        split = urlsplit(self.path)
        path = split.path
        query = {k: v[-1] for k, v in parse_qs(split.query).items()}
        hub = self.hub
        try:
            with hub._lock:
                user = hub._user(self.headers)
            for method, pattern, handler in _ROUTES:
                if method != self.command and not (method == "GET" and self.command == "HEAD"):
                    continue
                match = re.fullmatch(pattern, path)
                if match is not None:
                    params = {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
                    handler(self, user, query, **params)
                    return
            raise _HubError(404, f"no route for {self.command} {path}")
        except _HubError as error:
            # Drain an unread request body so the connection stays usable.
            if self.command in ("POST", "PUT") and not self._body_was_read:
                with contextlib.suppress(OSError):
                    self._body()
            self._send_error(error)
        except (
            Exception
        ) as error:  # a bug of this server: say so to the client instead of a dropped connection
            self.close_connection = True
            self._send_error(_HubError(500, f"test hub server error: {type(error).__name__}: {error}"))

    do_GET = do_HEAD = do_POST = do_PUT = _dispatch

    # ------------------------------------------------------------------ account
    def whoami(self, user: str | None, query: dict) -> None:
        if user is None:
            raise _HubError(401, "Invalid username or password.")
        orgs = [{"name": org, "type": "org"} for org in self.hub.orgs.get(user, [])]
        self._send_json(
            {
                "type": "user",
                "name": user,
                "orgs": orgs,
                "auth": {"type": "access_token", "accessToken": {"role": "write"}},
            }
        )

    def create_repo(self, user: str | None, query: dict) -> None:
        payload = self._json_body()
        if payload.get("type", "model") not in (None, "model"):
            raise _HubError(400, "this test server only hosts model repos")
        name = payload.get("name") or ""
        namespace = payload.get("organization") or user
        if user is None:
            raise _HubError(401, "You must be authenticated to create a repo")
        repo_id = f"{namespace}/{name}"
        if not re.fullmatch(_REPO, repo_id) or "--" in name or ".." in name:
            raise _HubError(400, f"Invalid repo name {repo_id!r}")
        if not self.hub._can_write(user, namespace):
            raise _HubError(
                403, f"You don't have the rights to create a model under the namespace {namespace!r}"
            )
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        with self.hub._lock:
            if repo_id in self.hub.repos:
                # The Hub answers 409 with the repo's url, which create_repo(exist_ok=True) reads.
                raise _HubError(409, "You already created this model repo", url=f"{self.hub.url}/{repo_id}")
            self.hub._create_repo(repo_id, private)
        self._send_json({"url": f"{self.hub.url}/{repo_id}", "name": repo_id, "id": repo_id})

    def create_branch(self, user: str | None, query: dict, repo: str, branch: str) -> None:
        payload = self._json_body()
        hub = self.hub
        with hub._lock:
            stored = hub._writable_repo(repo, user)
            if branch in stored.branches:
                raise _HubError(409, f"Branch {branch} already exists")
            start = hub._commit_of(stored, payload.get("startingPoint") or "main")
            stored.branches[branch] = start.oid
        self._send_json({})

    def validate_yaml(self, user: str | None, query: dict) -> None:
        payload = self._json_body()
        errors = []
        try:
            data = _front_matter(payload.get("content", ""))
        except yaml.YAMLError as error:
            raise _HubError(400, f"Invalid YAML metadata: {error}") from None
        warnings = [] if data else [{"message": "Empty or missing yaml metadata in repo card"}]
        for key in ("library_name", "license", "pipeline_tag"):
            if data and key in data and not isinstance(data[key], str):
                errors.append({"message": f'"{key}" must be a string'})
        if (
            data
            and "tags" in data
            and not (isinstance(data["tags"], list) and all(isinstance(t, str) for t in data["tags"]))
        ):
            errors.append({"message": '"tags" must be an array of strings'})
        if data and "base_model" in data:
            bases = data["base_model"] if isinstance(data["base_model"], list) else [data["base_model"]]
            for base in bases:
                if not isinstance(base, str) or not re.fullmatch(r"[\w.\-]+(/[\w.\-]+)?", base):
                    errors.append({"message": f'"base_model" must be a valid model id, got {base!r}'})
        if errors:
            self._send_json(
                {"errors": errors, "warnings": warnings}, 400, {"X-Error-Message": errors[0]["message"]}
            )
        else:
            self._send_json({"errors": [], "warnings": warnings})

    # ------------------------------------------------------------------ read API
    def model_info(self, user: str | None, query: dict, repo: str, revision: str = "main") -> None:
        hub = self.hub
        with hub._lock:
            stored = hub._readable_repo(repo, user)
            commit = hub._commit_of(stored, revision)
            siblings = []
            for path, f in sorted(commit.files.items()):
                sibling: dict[str, Any] = {"rfilename": path}
                if query.get("blobs"):
                    sibling.update(size=len(f.content), blobId=f.oid)
                    if f.lfs:
                        sibling["lfs"] = {
                            "size": len(f.content),
                            "sha256": f.sha256,
                            "pointerSize": len(f.pointer),
                        }
                siblings.append(sibling)
            card = None
            if "README.md" in commit.files:
                try:
                    card = _front_matter(commit.files["README.md"].content.decode())
                except (yaml.YAMLError, UnicodeDecodeError):
                    card = None
            info = {
                "_id": hashlib.sha1(repo.encode()).hexdigest()[:24],
                "id": repo,
                "modelId": repo,
                "author": repo.split("/")[0],
                "sha": commit.oid,
                "lastModified": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(commit.date)),
                "createdAt": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(stored.created)),
                "private": stored.private,
                "gated": False,
                "disabled": False,
                "downloads": 0,
                "likes": 0,
                "tags": list((card or {}).get("tags") or []),
                "library_name": (card or {}).get("library_name"),
                "pipeline_tag": (card or {}).get("pipeline_tag"),
                "siblings": siblings,
            }
            if card is not None:
                info["cardData"] = card
        self._send_json(info)

    def tree(self, user: str | None, query: dict, repo: str, revision: str, path: str = "") -> None:
        hub = self.hub
        recursive = str(query.get("recursive", "")).lower() in ("1", "true")
        prefix = path.strip("/")
        with hub._lock:
            commit = hub._commit_of(hub._readable_repo(repo, user), revision)
            files = dict(commit.files)
        if prefix and prefix in files:
            raise _HubError(400, f"{prefix} is a file, not a folder")
        entries: list[dict] = []
        folders: set[str] = set()
        for file_path, stored in sorted(files.items()):
            if prefix and not file_path.startswith(prefix + "/"):
                continue
            rest = file_path[len(prefix) + 1 :] if prefix else file_path
            parts = rest.split("/")
            for depth in range(1, len(parts)):
                folder = "/".join(([prefix] if prefix else []) + parts[:depth])
                if (recursive or depth == 1) and folder not in folders:
                    folders.add(folder)
                    entries.append(
                        {"type": "directory", "oid": git_blob_oid(folder.encode()), "size": 0, "path": folder}
                    )
            if recursive or len(parts) == 1:
                entries.append(_entry(file_path, stored))
        if prefix and not entries:
            raise _HubError(404, f"{prefix} does not exist", "EntryNotFound", {"X-Repo-Commit": commit.oid})
        self._send_json(entries)

    def paths_info(self, user: str | None, query: dict, repo: str, revision: str) -> None:
        content_type = self.headers.get("Content-Type", "")
        body = self._body()
        if "json" in content_type:
            paths = json.loads(body or b"{}").get("paths", [])
        else:
            paths = parse_qs(body.decode()).get("paths", [])
        hub = self.hub
        with hub._lock:
            commit = hub._commit_of(hub._readable_repo(repo, user), revision)
            out = [_entry(p, commit.files[p]) for p in paths if p in commit.files]
        self._send_json(out)

    # ------------------------------------------------------------------ write API
    def preupload(self, user: str | None, query: dict, repo: str, revision: str) -> None:
        payload = self._json_body()
        hub = self.hub
        with hub._lock:
            stored = hub._writable_repo(repo, user)
            commit = hub._commit_of(stored, revision)
            files = []
            for item in payload.get("files", []):
                sample = base64.b64decode(item.get("sample", ""))
                lfs = hub._is_lfs_path(item["path"], int(item.get("size", 0)), sample)
                existing = commit.files.get(item["path"])
                oid = None
                if existing is not None:
                    oid = existing.sha256 if existing.lfs else existing.oid
                files.append(
                    {
                        "path": item["path"],
                        "uploadMode": "lfs" if lfs else "regular",
                        "shouldIgnore": False,
                        "oid": oid,
                    }
                )
        self._send_json({"files": files, "commitOid": commit.oid})

    def lfs_batch(self, user: str | None, query: dict, repo: str) -> None:
        payload = self._json_body()
        hub = self.hub
        with hub._lock:
            hub._writable_repo(repo, user)
            if payload.get("operation") != "upload":
                raise _HubError(400, "this test server only accepts LFS uploads")
            objects = []
            for obj in payload.get("objects", []):
                oid, size = obj["oid"], int(obj["size"])
                entry: dict[str, Any] = {"oid": oid, "size": size, "authenticated": True}
                if oid not in hub.lfs_store:
                    sig = hub._sign("upload", oid, str(size))
                    entry["actions"] = {
                        "upload": {
                            "href": f"{hub.url}/_lfs/upload/{oid}?size={size}&sig={sig}",
                            "header": {},
                        },
                        "verify": {"href": f"{hub.url}/_lfs/verify/{oid}", "header": {}},
                    }
                objects.append(entry)
        self._send(
            200,
            json.dumps({"transfer": "basic", "objects": objects}).encode(),
            {"Content-Type": "application/vnd.git-lfs+json"},
        )

    def lfs_upload(self, user: str | None, query: dict, oid: str) -> None:
        hub = self.hub
        size = query.get("size", "")
        if not hmac.compare_digest(query.get("sig", ""), hub._sign("upload", oid, size)):
            raise _HubError(403, "bad upload signature")
        content = self._body()
        if len(content) != int(size) or hashlib.sha256(content).hexdigest() != oid:
            raise _HubError(400, f"uploaded content does not match oid {oid} / size {size}")
        with hub._lock:
            hub.lfs_store[oid] = content
        self._send(200)

    def lfs_verify(self, user: str | None, query: dict, oid: str) -> None:
        payload = self._json_body()
        with self.hub._lock:
            content = self.hub.lfs_store.get(oid)
        if content is None or len(content) != int(payload.get("size", -1)):
            raise _HubError(404, f"LFS object {oid} was not uploaded")
        self._send_json({})

    def commit(self, user: str | None, query: dict, repo: str, revision: str) -> None:
        body = self._body()
        if query.get("create_pr"):
            raise _HubError(400, "this test server does not do pull requests")
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise _HubError(400, "a commit starts with a header line")
        header = lines[0]["value"]
        hub = self.hub
        with hub._lock:
            stored = hub._writable_repo(repo, user)
            if revision not in stored.branches:
                raise _HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
            head = stored.commits[stored.branches[revision]]
            if header.get("parentCommit") and header["parentCommit"] != head.oid:
                raise _HubError(412, "A commit has happened since. Please refresh and try again.")
            files = dict(head.files)
            for line in lines[1:]:
                key, value = line.get("key"), line.get("value", {})
                path = value.get("path", "")
                if not path or path.startswith("/") or ".." in path.split("/"):
                    raise _HubError(400, f"invalid path {path!r}")
                if key == "file":
                    content = (
                        base64.b64decode(value["content"])
                        if value.get("encoding") == "base64"
                        else value["content"].encode()
                    )
                    files[path] = StoredFile(content, False)
                elif key == "lfsFile":
                    content = hub.lfs_store.get(value.get("oid", ""))
                    if content is None:
                        raise _HubError(422, f"LFS file {path} ({value.get('oid')}) was not uploaded")
                    files[path] = StoredFile(content, True)
                elif key == "deletedFile":
                    if files.pop(path, None) is None:
                        raise _HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                elif key == "deletedFolder":
                    files = {p: f for p, f in files.items() if not p.startswith(path.rstrip("/") + "/")}
                else:
                    raise _HubError(400, f"unsupported commit operation {key!r}")
            oid = hub._add_commit(stored, revision, files, header.get("summary", ""))
        self._send_json({"commitUrl": f"{hub.url}/{repo}/commit/{oid}", "commitOid": oid, "success": True})

    # ------------------------------------------------------------------ downloads
    def resolve(self, user: str | None, query: dict, repo: str, revision: str, path: str) -> None:
        hub = self.hub
        with hub._lock:
            stored = hub._readable_repo(repo, user)
            commit = hub._commit_of(stored, revision)
            entry = commit.files.get(path)
            if entry is None:
                raise _HubError(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": commit.oid})
        headers = {"X-Repo-Commit": commit.oid, "Accept-Ranges": "bytes"}
        if entry.lfs:
            sig = hub._sign("cdn", entry.sha256, path)
            location = f"http://{hub.cdn_host}:{hub.port}/_cdn/{entry.sha256}/{quote(path)}?sig={sig}"
            headers.update(
                {
                    "Location": location,
                    "ETag": f'"{entry.oid}"',
                    "X-Linked-Etag": f'"{entry.sha256}"',
                    "X-Linked-Size": str(len(entry.content)),
                }
            )
            self._send(302, b"", headers)
            return
        headers["ETag"] = f'"{entry.oid}"'
        self._serve_bytes(entry.content, path, headers)

    def cdn(self, user: str | None, query: dict, sha256: str, path: str) -> None:
        hub = self.hub
        if not hmac.compare_digest(query.get("sig", ""), hub._sign("cdn", sha256, path)):
            raise _HubError(403, "Request has expired or the signature is invalid")
        with hub._lock:
            content = hub.lfs_store.get(sha256)
        if content is None:
            raise _HubError(404, "no such object")
        self._serve_bytes(content, path, {"ETag": f'"{sha256}"', "Accept-Ranges": "bytes"})

    def _serve_bytes(self, content: bytes, path: str, headers: dict) -> None:
        start, end = 0, len(content)
        status = 200
        range_header = self.headers.get("Range")
        if range_header:
            match = re.fullmatch(r"bytes=(\d+)-(\d*)", range_header.strip())
            if match is None or int(match.group(1)) >= len(content):
                self._send(416, b"", {**headers, "Content-Range": f"bytes */{len(content)}"})
                return
            start = int(match.group(1))
            end = min(len(content), int(match.group(2)) + 1) if match.group(2) else len(content)
            status = 206
            headers = {**headers, "Content-Range": f"bytes {start}-{end - 1}/{len(content)}"}
        body = content[start:end]
        headers = {**headers, "Content-Type": "application/octet-stream", "Content-Length": str(len(body))}
        if self.command == "HEAD":
            self._send(status, body, headers)
            return
        name = path.rsplit("/", 1)[-1]
        with self.hub._lock:
            failure = self.hub._failures.get(name)
            if failure is not None and failure.remaining is not None:
                failure.remaining -= 1
                if failure.remaining <= 0:
                    del self.hub._failures[name]
        if failure is None:
            self._send(status, body, headers)
            return
        # Announce the whole body, send the part before the break, then cut the connection mid-body.
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body[: max(0, failure.after_bytes - start)])
        self.wfile.flush()
        self.close_connection = True
        # Logged before the cut: once the client sees it, it retries on another thread, whose entry must come after.
        self.hub.log.append((self.command, self.path, -1))
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)


_ROUTES: list[tuple[str, str, Any]] = [
    ("GET", r"/api/whoami-v2", _Handler.whoami),
    ("POST", r"/api/repos/create", _Handler.create_repo),
    ("POST", r"/api/validate-yaml", _Handler.validate_yaml),
    ("POST", rf"/api/models/{_REPO}/branch/(?P<branch>[^/]+)", _Handler.create_branch),
    ("POST", rf"/api/models/{_REPO}/preupload/(?P<revision>[^/]+)", _Handler.preupload),
    ("POST", rf"/api/models/{_REPO}/commit/(?P<revision>[^/]+)", _Handler.commit),
    ("POST", rf"/api/models/{_REPO}/paths-info/(?P<revision>[^/]+)", _Handler.paths_info),
    ("GET", rf"/api/models/{_REPO}/tree/(?P<revision>[^/]+)(?:/(?P<path>.+))?", _Handler.tree),
    ("GET", rf"/api/models/{_REPO}/revision/(?P<revision>[^/]+)", _Handler.model_info),
    ("GET", rf"/api/models/{_REPO}", _Handler.model_info),
    ("POST", rf"/{_REPO}\.git/info/lfs/objects/batch", _Handler.lfs_batch),
    ("PUT", r"/_lfs/upload/(?P<oid>[0-9a-f]{64})", _Handler.lfs_upload),
    ("POST", r"/_lfs/verify/(?P<oid>[0-9a-f]{64})", _Handler.lfs_verify),
    ("GET", r"/_cdn/(?P<sha256>[0-9a-f]{64})/(?P<path>.+)", _Handler.cdn),
    ("GET", rf"/{_REPO}/resolve/(?P<revision>[^/]+)/(?P<path>.+)", _Handler.resolve),
]


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--token", default="hf_write_alice", help="write token of user 'alice' (org 'org')")
    args = parser.parse_args()
    with HubServer(tokens={args.token: "alice"}) as server:
        print(f"HF_ENDPOINT={server.url} HF_HUB_DISABLE_XET=1 HF_TOKEN={args.token}", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
