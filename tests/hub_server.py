"""A test double of the Hugging Face Hub HTTP API, for push/pull tests that never touch the network.

It speaks the subset of the Hub API that huggingface_hub's real client (2.4) uses for `create_repo`,
`upload_folder` / `create_commit` / `push_to_hub`, `model_info` / `repo_info`, `list_repo_files` /
`list_repo_tree`, `list_repo_refs`, `create_branch`, `create_tag`, `hf_hub_download` and
`snapshot_download`. Run it with `HF_ENDPOINT` pointing at it (the `hub_endpoint` fixture below does this).

Routes (`{t}` is `model`, `dataset` or `space`; revisions may be a branch, a tag or a 40-hex commit sha):
  POST /api/repos/create                          409 if the repo exists (the client handles exist_ok)
  POST /api/{t}s/{repo}/preupload/{rev}           every file is answered `uploadMode: "regular"`, so content
                                                  goes base64 in the commit payload: no LFS, no xet transfer
  POST /api/{t}s/{repo}/commit/{branch}           NDJSON: header, file, deletedFile, deletedFolder
  POST /api/{t}s/{repo}/branch/{branch}, /tag/{rev}   JSON {"startingPoint": rev} (optional), {"tag": name}
  GET  /api/{t}s/{repo}[/revision/{rev}]          repo info: id, sha, private, siblings
  GET  /api/{t}s/{repo}/tree/{rev}[/{path}]       ?recursive=true lists the whole tree (one page)
  GET  /api/{t}s/{repo}/refs                      branches and tags
  HEAD/GET /[{t}s/]{repo}/resolve/{rev}/{path}    X-Repo-Commit, ETag (git blob sha1), Content-Length
  POST /api/validate-yaml, GET /api/whoami-v2                                     trivial answers

Storage is in memory: a commit is a full snapshot {path: bytes} with a sha1 id; refs map branch and tag
names to commits. A new repo gets an initial commit with `.gitattributes`, as on the Hub. Errors mirror
the Hub so the client raises its own exceptions: an unknown repo is 404 `X-Error-Code: RepoNotFound`,
an unknown revision 404 `RevisionNotFound`, a missing file 404 `EntryNotFound` (with `X-Repo-Commit`).
Auth: writes, and reads of private repos, need `Authorization: Bearer <token>` (else 401 RepoNotFound, as
on the Hub); a wrong token is always 401. Not supported: LFS/xet uploads, PRs, pagination, Range requests.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import re
import socket
import sys
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

USER = "hf-vq-tester"
_REPO = r"(?P<repo>[\w.-]+/[\w.-]+)"
_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
_OPS = "revision|tree|preupload|commit|branch|tag|refs"
_API = re.compile(rf"^/api/(?P<t>models|datasets|spaces)/{_REPO}(?:/(?P<op>{_OPS})(?:/(?P<rev>[^/]+)(?:/(?P<path>.*))?)?)?$")
_RESOLVE = re.compile(rf"^/(?:(?P<t>datasets|spaces)/)?{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")


def git_blob_sha(data: bytes) -> str:
    """The git object id of a blob, which the Hub sends as ETag / tree `oid` of a regular (non-LFS) file."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class HubError(Exception):
    """An error answer of the Hub: status, message, `X-Error-Code`, optional `X-Repo-Commit`, extra JSON."""

    def __init__(self, status: int, message: str, code: str | None = None, commit: str | None = None, **extra):
        super().__init__(message)
        self.status, self.message, self.code, self.commit, self.extra = status, message, code, commit, extra


@dataclass
class Repo:
    type: str
    id: str
    private: bool
    commits: dict = field(default_factory=dict)  # sha -> {"files": {path: bytes}, "parent", "title", "date"}
    branches: dict = field(default_factory=dict)
    tags: dict = field(default_factory=dict)

    def resolve(self, rev: str) -> str:
        sha = self.branches.get(rev) or self.tags.get(rev) or (rev if rev in self.commits else None)
        if sha is None:
            raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return sha

    def commit(self, branch: str, files: dict, title: str) -> str:
        parent = self.branches.get(branch)
        listing = "".join(f"{p}\0{git_blob_sha(files[p])}\n" for p in sorted(files))
        sha = hashlib.sha1(f"{parent}\n{title}\n{len(self.commits)}\n{listing}".encode()).hexdigest()
        date = datetime.datetime.now(datetime.timezone.utc).isoformat().replace("+00:00", "Z")
        self.commits[sha] = {"files": dict(files), "parent": parent, "title": title, "date": date}
        self.branches[branch] = sha
        return sha


class HubState:
    """All repos of the fake Hub, keyed by (type, id), plus the one token it accepts."""

    def __init__(self, token: str):
        self.token = token
        self.repos: dict[tuple[str, str], Repo] = {}
        self.lock = threading.Lock()
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request, for assertions


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like the Hub; every answer has a Content-Length
    server: "HubServer"

    def log_message(self, *args):  # keep pytest output clean
        pass

    # ---- plumbing
    def _send(self, status: int, body: bytes | dict | list = b"", headers: dict | None = None, head=False):
        if not isinstance(body, bytes):
            body = json.dumps(body).encode()
            headers = {"Content-Type": "application/json", **(headers or {})}
        self.send_response(status)
        for k, v in {**(headers or {}), "Content-Length": str(len(body))}.items():
            self.send_header(k, v)
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _json(self) -> dict:
        return json.loads(self.body or b"{}")
    def _authorized(self) -> bool:
        """True with the right token, False with none; a wrong token is refused outright (401)."""
        auth = self.headers.get("Authorization")
        if auth is not None and auth != f"Bearer {self.server.state.token}":
            raise HubError(401, "Invalid credentials in Authorization header")
        return auth is not None

    def _repo(self, t: str, repo_id: str, write: bool = False) -> Repo:
        authorized = self._authorized()
        if write and not authorized:
            raise HubError(401, "You must be authenticated to write", "RepoNotFound")
        repo = self.server.state.repos.get((t, repo_id))
        if repo is None or (repo.private and not authorized):
            raise HubError(404 if authorized else 401, "Repository not found", "RepoNotFound")
        return repo

    def _dispatch(self, method: str):
        self.server.state.requests.append((method, self.path))
        self.body = self.rfile.read(int(self.headers.get("Content-Length") or 0))  # always drain (keep-alive)
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        try:
            with self.server.state.lock:
                self._route(method, url.path, query)
        except Exception as e:  # a HubError is the Hub's answer; anything else is a bug in the double: 500
            if not isinstance(e, HubError):
                e = HubError(500, f"Hub test double failed: {e!r}")
            headers = {"X-Error-Message": e.message, "X-Error-Code": e.code, "X-Repo-Commit": e.commit}
            headers = {k: v for k, v in headers.items() if v}
            self._send(e.status, {"error": e.message, **e.extra}, headers, head=method == "HEAD")

    do_GET = lambda self: self._dispatch("GET")  # noqa: E731
    do_HEAD = lambda self: self._dispatch("HEAD")  # noqa: E731
    do_POST = lambda self: self._dispatch("POST")  # noqa: E731

    # ---- routes
    def _route(self, method: str, path: str, query: dict):
        if method == "POST" and path == "/api/repos/create":
            return self._create_repo(self._json())
        if method == "POST" and path == "/api/validate-yaml":
            return self._send(200, {"errors": [], "warnings": []})
        if method == "GET" and path == "/api/whoami-v2":
            if not self._authorized():
                raise HubError(401, "Invalid username or password.")
            return self._send(200, {"type": "user", "name": USER, "orgs": [], "auth": {"type": "access_token"}})
        if (m := _RESOLVE.match(path)) and method in ("GET", "HEAD"):
            return self._resolve(m, head=method == "HEAD")
        m = _API.match(path)
        if m is None:
            raise HubError(404, f"No such route in the Hub test double: {method} {path}")
        t, op = _TYPES[m["t"]], m["op"]
        rev = unquote(m["rev"]) if m["rev"] else None
        repo = self._repo(t, m["repo"], write=method == "POST")
        if method == "GET" and op in (None, "revision"):
            return self._info(repo, rev or "main", query)
        if method == "GET" and op == "tree":
            return self._tree(repo, rev, unquote(m["path"] or ""), query.get("recursive", "").lower() == "true")
        if method == "GET" and op == "refs":
            refs = {k: [{"name": n, "ref": f"refs/{g}/{n}", "targetCommit": c} for n, c in d.items()]
                    for k, g, d in (("branches", "heads", repo.branches), ("tags", "tags", repo.tags))}
            return self._send(200, {**refs, "converts": []})
        if method == "POST" and op in ("preupload", "commit"):
            return self._preupload(repo, rev, self._json()) if op == "preupload" else self._commit(repo, rev, query)
        if method == "POST" and op == "branch":
            start = repo.resolve(self._json().get("startingPoint") or "main")
            if rev in repo.branches:
                raise HubError(409, f"Reference already exists: refs/heads/{rev}")
            repo.branches[rev] = start
            return self._send(200, {})
        if method == "POST" and op == "tag":
            tag = self._json()["tag"]
            if tag in repo.tags:
                raise HubError(409, f"Tag already exists: {tag}")
            repo.tags[tag] = repo.resolve(rev)
            return self._send(200, {})
        raise HubError(405, f"Method not supported by the Hub test double: {method} {path}")

    def _create_repo(self, payload: dict):
        if not self._authorized():
            raise HubError(401, "You must be authenticated to create a repo")
        t = payload.get("type") or "model"
        repo_id = f"{payload.get('organization') or USER}/{payload['name']}"
        prefix = "" if t == "model" else f"{t}s/"
        if (t, repo_id) in self.server.state.repos:  # the client reads "url" from this 409 when exist_ok=True
            raise HubError(409, "You already created this repo", url=f"{self.server.url}/{prefix}{repo_id}")
        repo = Repo(t, repo_id, private=payload.get("visibility", payload.get("private")) in ("private", True))
        repo.commit("main", {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"}, "initial")
        self.server.state.repos[(t, repo_id)] = repo
        self._send(200, {"url": f"{self.server.url}/{prefix}{repo_id}", "name": repo_id, "id": repo_id})

    def _info(self, repo: Repo, rev: str, query: dict):
        sha = repo.resolve(rev)
        commit = repo.commits[sha]
        siblings = [{"rfilename": p} for p in sorted(commit["files"])]
        if query.get("blobs", "").lower() == "true":
            for s in siblings:
                data = commit["files"][s["rfilename"]]
                s.update(size=len(data), blobId=git_blob_sha(data))
        info = {"id": repo.id, "author": repo.id.split("/")[0], "sha": sha, "private": repo.private, "disabled": False,
                "gated": False, "lastModified": commit["date"], "tags": [], "siblings": siblings}
        self._send(200, info)

    def _tree(self, repo: Repo, rev: str, folder: str, recursive: bool):
        files = repo.commits[repo.resolve(rev)]["files"]
        prefix = f"{folder.strip('/')}/" if folder.strip("/") else ""
        entries, dirs = [], set()
        for p in sorted(files):
            if not p.startswith(prefix):
                continue
            parts = p[len(prefix):].split("/")
            for i in range(1, len(parts) if recursive else min(len(parts), 2)):
                dirs.add(prefix + "/".join(parts[:i]))
            if recursive or len(parts) == 1:
                entries.append({"type": "file", "oid": git_blob_sha(files[p]), "size": len(files[p]), "path": p})
        if prefix and not entries and not dirs:
            raise HubError(404, f"Entry not found: {folder}", "EntryNotFound")
        folders = [{"type": "directory", "oid": hashlib.sha1(d.encode()).hexdigest(), "size": 0, "path": d}
                   for d in sorted(dirs)]
        self._send(200, folders + entries)

    def _preupload(self, repo: Repo, rev: str, payload: dict):
        files = repo.commits[repo.resolve(rev)]["files"] if rev in repo.branches else {}
        answer = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                   "oid": git_blob_sha(files[f["path"]]) if f["path"] in files else None} for f in payload["files"]]
        self._send(200, {"files": answer, "commitOid": repo.branches.get(rev)})

    def _commit(self, repo: Repo, branch: str, query: dict):
        if query.get("create_pr") == "1":
            raise HubError(400, "Pull requests are not supported by the Hub test double")
        if branch not in repo.branches:
            raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
        files = dict(repo.commits[repo.branches[branch]]["files"])
        title = ""
        for line in self.body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                title = value.get("summary", "")
                parent = value.get("parentCommit")
                if parent is not None and parent != repo.branches[branch]:
                    raise HubError(412, "A commit has happened since. Please refresh and try again.")
            elif key == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                if files.pop(value["path"], None) is None:
                    raise HubError(404, f"A file with this name doesn't exist: {value['path']}", "EntryNotFound")
            elif key == "deletedFolder":
                folder = value["path"].rstrip("/") + "/"
                files = {p: d for p, d in files.items() if not p.startswith(folder)}
            else:
                raise HubError(400, f"Commit operation {key!r} not supported by the Hub test double (no LFS)")
        sha = repo.commit(branch, files, title)
        prefix = "" if repo.type == "model" else f"{repo.type}s/"
        commit_url = f"{self.server.url}/{prefix}{repo.id}/commit/{sha}"
        self._send(200, {"success": True, "commitOid": sha, "commitUrl": commit_url, "pullRequestUrl": None})

    def _resolve(self, m: re.Match, head: bool):
        repo = self._repo(_TYPES[m["t"]] if m["t"] else "model", m["repo"])
        sha = repo.resolve(unquote(m["rev"]))
        path = unquote(m["path"])
        data = repo.commits[sha]["files"].get(path)
        if data is None:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", commit=sha)
        headers = {"X-Repo-Commit": sha, "ETag": f'"{git_blob_sha(data)}"', "Content-Type": "application/octet-stream"}
        self._send(200, data, headers, head=head)


class HubServer(ThreadingHTTPServer):
    """The fake Hub on 127.0.0.1, on a free port, serving from a daemon thread. Use as a context manager."""

    daemon_threads = True

    def __init__(self, token: str = "hf_test_double_token"):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.state, self.token, self.url = HubState(token), token, f"http://127.0.0.1:{self.server_address[1]}"
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.cache_dir = self._monkeypatch = self._tmp = None  # set by the `hub_endpoint` fixture
        self._caches = 0

    def fresh_cache(self) -> str:
        """Point HF_HUB_CACHE (env and huggingface_hub's constants) at a new empty dir; returns it. Fixture only."""
        from huggingface_hub import constants
        from huggingface_hub.utils import _cache_manager

        self._caches += 1
        self.cache_dir = self._tmp / f"hub-cache-{self._caches}"
        self.cache_dir.mkdir(parents=True)
        self._monkeypatch.setenv("HF_HUB_CACHE", str(self.cache_dir))
        self._monkeypatch.setattr(constants, "HF_HUB_CACHE", str(self.cache_dir))
        self._monkeypatch.setattr(_cache_manager, "HF_HUB_CACHE", str(self.cache_dir))  # scan_cache_dir default
        return str(self.cache_dir)

    def __enter__(self) -> "HubServer":
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.shutdown()
        self.server_close()
        self._thread.join(timeout=5)


def _loopback_only(getaddrinfo):
    def guarded(host, *args, **kwargs):
        if host not in ("127.0.0.1", "localhost", "::1", b"127.0.0.1", b"localhost"):
            raise OSError(f"network access to {host!r} is blocked during Hub tests (only the local test double)")
        return getaddrinfo(host, *args, **kwargs)
    return guarded


@pytest.fixture
def hub_endpoint(monkeypatch, tmp_path):
    """Start the Hub test double and point huggingface_hub (and transformers) at it, with a fresh cache.

    Sets HF_ENDPOINT, HF_TOKEN, HF_HUB_CACHE (a tmp dir, `server.cache_dir`), HF_HUB_DISABLE_TELEMETRY=1,
    HF_HUB_OFFLINE=0 and HF_HUB_DISABLE_XET=1 (belt and braces: the server never offers xet, and the xet
    upload pipeline works against it too, see test_hub_server.py), patches the copies huggingface_hub and
    transformers took at import (constants, the module-level `HfApi` behind `huggingface_hub.create_repo` &
    co, transformers' cached `HfApi`), and blocks name resolution of anything but loopback so no request can
    reach huggingface.co. Yields the `HubServer`: `.url`, `.token`, `.state` (repos, `requests` log), and
    `.fresh_cache()` to point HF_HUB_CACHE at a new empty dir. Everything is restored and the server stopped after.
    """
    import huggingface_hub
    from huggingface_hub import constants, hf_api
    from huggingface_hub.utils import _detect_agent

    with HubServer() as server:
        server._monkeypatch, server._tmp = monkeypatch, tmp_path
        env = {"HF_ENDPOINT": server.url, "HF_TOKEN": server.token, "HF_HUB_DISABLE_TELEMETRY": "1",
               "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_XET": "1",
               "HF_HOME": str(tmp_path / "hf-home"), "HF_XET_CACHE": str(tmp_path / "xet")}  # hf_xet reads these
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        for k in ("TRANSFORMERS_OFFLINE", "HUGGING_FACE_HUB_TOKEN"):
            monkeypatch.delenv(k, raising=False)
        server.fresh_cache()
        template = server.url + "/{repo_id}/resolve/{revision}/{filename}"  # hf_hub_url() formats this one
        patches = {"ENDPOINT": server.url, "HUGGINGFACE_CO_URL_TEMPLATE": template, "HF_HUB_OFFLINE": False,
                   "HF_HUB_DISABLE_TELEMETRY": True, "HF_HUB_DISABLE_XET": True, "HF_XET_CACHE": str(tmp_path / "xet")}
        for k, v in patches.items():
            monkeypatch.setattr(constants, k, v)
        monkeypatch.setattr(hf_api.api, "endpoint", server.url)  # `huggingface_hub.create_repo` & co are bound to it
        monkeypatch.setattr(_detect_agent, "_registry", _detect_agent._EMPTY_REGISTRY)  # no registry fetch/write
        tf_hub = sys.modules.get("transformers.utils.hub")  # caches one HfApi, with the endpoint of its creation
        if tf_hub is not None:
            monkeypatch.setattr(tf_hub, "_hf_api", None)
        monkeypatch.setattr(socket, "getaddrinfo", _loopback_only(socket.getaddrinfo))
        huggingface_hub.close_session()  # drop pooled connections from earlier tests
        yield server
        huggingface_hub.close_session()
        if tf_hub is None and "transformers.utils.hub" in sys.modules:  # imported during the test
            sys.modules["transformers.utils.hub"]._hf_api = None
