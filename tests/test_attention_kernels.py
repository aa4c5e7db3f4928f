"""FlashAttention-3 through the real `kernels` package, against a fake Hugging Face hub on 127.0.0.1.

The hub serves the few endpoints `kernels.get_kernel` uses (refs, tree listings, file downloads).
Its kernel repositories hold a pure-Python "universal" build whose flash_attn_func is attention
written with torch, and a CUDA build that must never be chosen on this machine, so on a CPU the
whole path runs for real: prepare fetches, a run loads offline. kernels and huggingface_hub read
their settings (KERNELS_CACHE, HF_ENDPOINT) when imported, so each fetch and each load runs in a
fresh interpreter, as `autoresearch prepare` and train.py do.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

from autoresearch import attention_kernels, sandbox
from autoresearch.attention_kernels import (
    COMMUNITY_REPO,
    HOPPER_REPO,
    fetch_flash_attention,
    kernel_repo,
    kernels_cache,
    load_flash_attention,
)
from autoresearch.lab import init_lab
from autoresearch.measurement import readable_paths

REPO_ROOT = Path(__file__).resolve().parent.parent
UNIVERSAL = "torch-universal"
CUDA_BUILD = "torch211-cxx11-cu130-x86_64-linux"

INTERFACE = '''\
"""A stand-in for FA3's flash_attn_interface: the same call, computed with torch on any device."""
import torch
import torch.nn.functional as F


def flash_attn_func(q, k, v, softmax_scale=None, causal=False, window_size=(-1, -1), **_):
    B, T, H, D = q.shape
    k = k.repeat_interleave(H // k.size(2), dim=2)
    v = v.repeat_interleave(H // v.size(2), dim=2)
    i = torch.arange(T)[:, None]
    j = torch.arange(T)[None, :]
    keep = torch.ones(T, T, dtype=torch.bool)
    if causal:
        keep &= j <= i
    if window_size[0] >= 0:
        keep &= i - j <= window_size[0]
    y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       attn_mask=keep, scale=softmax_scale)
    return y.transpose(1, 2)
'''


def kernel_files(name: str) -> dict[str, bytes]:
    """A kernel repository: a universal build that works here and a CUDA build that must not load."""
    package = name.replace("-", "_")
    universal = {"id": f"_{package}_universal_test", "name": name, "version": 1, "license": "BSD-3-Clause",
                 "python-depends": [], "backend": {"type": "cpu"}}
    cuda = {"id": f"_{package}_cuda_test", "name": name, "version": 1, "license": "BSD-3-Clause",
            "python-depends": [], "backend": {"type": "cuda", "archs": ["8.0", "9.0a"]}}
    return {
        "README.md": b"# a fake FlashAttention-3 kernel\n",
        f"build/{UNIVERSAL}/metadata.json": json.dumps(universal).encode(),
        f"build/{UNIVERSAL}/{package}/__init__.py": b"from . import flash_attn_interface\n"
                                                    b"from .flash_attn_interface import flash_attn_func\n",
        f"build/{UNIVERSAL}/{package}/flash_attn_interface.py": INTERFACE.encode(),
        f"build/{CUDA_BUILD}/metadata.json": json.dumps(cuda).encode(),
        f"build/{CUDA_BUILD}/{package}/__init__.py": b"raise ImportError('the CUDA build was chosen on a CPU')\n",
    }


def git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class FakeHub:
    """The hub's kernel endpoints for a few repositories, each with one commit on a `v1` branch."""

    def __init__(self) -> None:
        self.repos: dict[str, dict[str, bytes]] = {}
        self.commits: dict[str, str] = {}
        self.requests: list[str] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                hub.handle(self, body=True)

            def do_HEAD(self) -> None:
                hub.handle(self, body=False)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def add(self, repo: str, files: dict[str, bytes]) -> None:
        self.repos[repo] = files
        self.commits[repo] = hashlib.sha1(repo.encode()).hexdigest()

    def handle(self, request: BaseHTTPRequestHandler, body: bool) -> None:
        self.requests.append(f"{request.command} {request.path}")
        path = unquote(urlsplit(request.path).path).strip("/").split("/")
        if path[:2] == ["api", "kernels"] and len(path) >= 5:
            repo, rest = "/".join(path[2:4]), path[4:]
            if rest == ["refs"]:
                return self.refs(request, repo)
            if rest[0] == "tree" and len(rest) >= 2:
                return self.tree(request, repo, rest[1], "/".join(rest[2:]), "recursive=true" in request.path.lower())
            if rest[0] == "revision" and len(rest) >= 2:
                return self.revision(request, repo, rest[1])
        if path[:1] == ["kernels"] and len(path) >= 6 and path[3] == "resolve":
            return self.resolve(request, "/".join(path[1:3]), path[4], "/".join(path[5:]), body)
        self.send(request, 404, {"error": "not found"}, error="EntryNotFound")

    def known(self, request: BaseHTTPRequestHandler, repo: str, revision: str) -> bool:
        if repo not in self.repos:
            self.send(request, 404, {"error": f"Repository {repo} not found"}, error="RepoNotFound")
            return False
        if revision not in ("v1", "main", self.commits[repo]):
            self.send(request, 404, {"error": f"Invalid rev id: {revision}"}, error="RevisionNotFound")
            return False
        return True

    def refs(self, request: BaseHTTPRequestHandler, repo: str) -> None:
        if self.known(request, repo, "v1"):
            branches = [{"name": name, "ref": f"refs/heads/{name}", "targetCommit": self.commits[repo]}
                        for name in ("main", "v1")]
            self.send(request, 200, {"branches": branches, "tags": [], "converts": []})

    def tree(self, request: BaseHTTPRequestHandler, repo: str, revision: str, folder: str, recursive: bool) -> None:
        if not self.known(request, repo, revision):
            return
        prefix = f"{folder}/" if folder else ""
        entries: dict[str, dict[str, object]] = {}
        for name, data in self.repos[repo].items():
            if not name.startswith(prefix):
                continue
            parts = name[len(prefix):].split("/")
            for depth in range(1, len(parts)):  # the folders on the way
                if recursive or depth == 1:
                    sub = prefix + "/".join(parts[:depth])
                    entries[sub] = {"type": "directory", "oid": git_oid(sub.encode()), "size": 0, "path": sub}
            if recursive or len(parts) == 1:
                entries[name] = {"type": "file", "oid": git_oid(data), "size": len(data), "path": name}
        self.send(request, 200, sorted(entries.values(), key=lambda e: str(e["path"])))

    def revision(self, request: BaseHTTPRequestHandler, repo: str, revision: str) -> None:
        if self.known(request, repo, revision):
            siblings = [{"rfilename": name} for name in self.repos[repo]]
            self.send(request, 200, {"id": repo, "sha": self.commits[repo], "siblings": siblings})

    def resolve(self, request: BaseHTTPRequestHandler, repo: str, revision: str, name: str, body: bool) -> None:
        if not self.known(request, repo, revision):
            return
        data = self.repos[repo].get(name)
        if data is None:
            self.send(request, 404, {"error": f"{name} not found"}, error="EntryNotFound")
            return
        request.send_response(200)
        request.send_header("Content-Type", "application/octet-stream")
        request.send_header("Content-Length", str(len(data)))
        request.send_header("ETag", f'"{git_oid(data)}"')
        request.send_header("X-Repo-Commit", self.commits[repo])
        request.end_headers()
        if body:
            request.wfile.write(data)

    @staticmethod
    def send(request: BaseHTTPRequestHandler, status: int, payload: object, error: str | None = None) -> None:
        data = json.dumps(payload).encode()
        request.send_response(status)
        request.send_header("Content-Type", "application/json")
        request.send_header("Content-Length", str(len(data)))
        if error:
            request.send_header("X-Error-Code", error)
        request.end_headers()
        if request.command != "HEAD":
            request.wfile.write(data)


@pytest.fixture
def hub() -> Iterator[FakeHub]:
    server = FakeHub()
    server.add(HOPPER_REPO, kernel_files("flash-attention-3"))
    server.add(COMMUNITY_REPO, kernel_files("flash-attn3"))
    server.thread.start()
    yield server
    server.httpd.shutdown()
    server.httpd.server_close()


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


def run_code(code: str, endpoint: str, tmp_path: Path, cwd: Path | None = None,
             sandboxed: bool = False) -> subprocess.CompletedProcess[str]:
    """Run `code` in a fresh interpreter pointed at `endpoint`, in the runs' bubblewrap sandbox
    when `sandboxed` (no network, / read-only, the data cache bound back read-only)."""
    env = {**os.environ, "HF_ENDPOINT": endpoint, "HF_HOME": str(tmp_path / "hf-home"),
           "PYTHONPATH": str(REPO_ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    for name in ("HF_HUB_OFFLINE", "KERNELS_CACHE", "LOCAL_KERNELS", "HF_TOKEN"):
        env.pop(name, None)
    argv = [sys.executable, "-c", code]
    if cwd is None:
        cwd = tmp_path / "run"
        cwd.mkdir(exist_ok=True)
    if sandboxed:
        box = sandbox.confine("bwrap", argv, cwd, readable=readable_paths())
        argv, env = box.argv, {**env, **box.env}
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def run_python(code: str, endpoint: str, tmp_path: Path, sandboxed: bool = False) -> dict[str, object]:
    """Run `code` (see run_code); it prints one JSON line, returned."""
    proc = run_code(code, endpoint, tmp_path, sandboxed=sandboxed)
    assert proc.returncode == 0, proc.stderr
    result: dict[str, object] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


# A process that believes it has an H100: only where the GPU is asked about (nothing here can run CUDA)
WITH_A_GPU = ("import torch\ntorch.cuda.is_available = lambda: True\n"
              "torch.cuda.get_device_capability = lambda *a: (9, 0)\n")

FETCH = """
import json
from autoresearch.attention_kernels import fetch_flash_attention
logged = []
line = fetch_flash_attention(logged.append, cuda_available=True, capability={capability})
print(json.dumps({{"line": line, "logged": logged}}))
"""

LOAD = """
import json, torch
import torch.nn.functional as F
from autoresearch.attention_kernels import load_flash_attention
func, line = load_flash_attention(cuda_available=True, capability={capability})
result = {{"line": line, "loaded": func is not None}}
if func is not None:
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 16, 4, 8), torch.randn(2, 16, 2, 8), torch.randn(2, 16, 2, 8)
    out = func(q, k, v, causal=True, window_size=(3, 0))
    i, j = torch.arange(16)[:, None], torch.arange(16)[None, :]
    mask = (j <= i) & (i - j <= 3)
    ref = F.scaled_dot_product_attention(q.transpose(1, 2), k.repeat_interleave(2, 2).transpose(1, 2),
                                         v.repeat_interleave(2, 2).transpose(1, 2), attn_mask=mask)
    result["matches"] = bool(torch.allclose(out, ref.transpose(1, 2), atol=1e-5))
print(json.dumps(result))
"""


# --- which kernel, and when none --------------------------------------------------------------

@pytest.mark.parametrize(("capability", "repo"), [
    ((9, 0), HOPPER_REPO),  # H100, H200, GH200
    ((8, 0), COMMUNITY_REPO),  # A100
    ((8, 6), COMMUNITY_REPO),  # RTX 30xx, A10, A40
    ((8, 9), COMMUNITY_REPO),  # RTX 40xx, L4, L40S
    ((10, 0), None),  # B200: no FA3 build
    ((12, 0), None),  # RTX 50xx
    ((7, 5), None),  # T4
])
def test_kernel_repo_by_compute_capability(capability: tuple[int, int], repo: str | None) -> None:
    assert kernel_repo(capability) == repo


def test_without_cuda_both_say_sdpa_and_touch_nothing() -> None:
    logged: list[str] = []
    assert fetch_flash_attention(logged.append, cuda_available=False) == "attention: sdpa — no CUDA device here"
    assert load_flash_attention(cuda_available=False) == (None, "attention: sdpa (no CUDA device here)")
    assert logged == [] and not kernels_cache().exists()


def test_a_gpu_without_a_build_says_so() -> None:
    why = "no FlashAttention-3 build for compute capability 12.0"
    assert fetch_flash_attention(print, cuda_available=True, capability=(12, 0)) == f"attention: sdpa — {why}"
    assert load_flash_attention(cuda_available=True, capability=(12, 0)) == (None, f"attention: sdpa ({why})")


def test_the_real_check_on_a_machine_without_cuda() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert load_flash_attention() == (None, "attention: sdpa (no CUDA device here)")
    assert fetch_flash_attention(print) == "attention: sdpa — no CUDA device here"


def test_kernels_not_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "kernels", None)  # `import kernels` raises ImportError
    hint = "pip install 'autoresearch[cuda]'"
    line = fetch_flash_attention(print, cuda_available=True, capability=(9, 0))
    assert line == f"attention: sdpa — the kernels package is not installed ({hint})"
    assert load_flash_attention(cuda_available=True, capability=(9, 0)) == (
        None, f"attention: sdpa (kernels not installed: {hint})")
    assert "KERNELS_CACHE" not in os.environ and "HF_HUB_OFFLINE" not in os.environ  # put back


def test_load_before_fetch_says_run_prepare(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("kernels")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert load_flash_attention(cuda_available=True, capability=(9, 0)) == (
        None, "attention: sdpa (not fetched: run autoresearch prepare)")
    from huggingface_hub import constants

    assert constants.HF_HUB_OFFLINE is False and "HF_HUB_OFFLINE" not in os.environ  # the switch is put back


# --- the real download and the offline load ---------------------------------------------------

@pytest.mark.parametrize(("capability", "repo", "package"), [
    ((9, 0), HOPPER_REPO, "flash_attention_3"),
    ((8, 9), COMMUNITY_REPO, "flash_attn3"),
])
def test_fetch_then_offline_load(hub: FakeHub, tmp_path: Path, capability: tuple[int, int], repo: str,
                                 package: str) -> None:
    pytest.importorskip("kernels")
    fetched = run_python(FETCH.format(capability=capability), hub.url, tmp_path)
    assert fetched["line"] == f"attention: fetched {repo} (build {UNIVERSAL})"
    assert fetched["logged"] == [f"attention: fetching {repo} (v1) into {kernels_cache()}"]
    assert any(r.startswith(f"GET /api/kernels/{repo}/refs") for r in hub.requests)

    record = json.loads((kernels_cache() / "flash-attention.json").read_text())
    assert record["repo"] == repo and record["revision"] == hub.commits[repo] and record["build"] == UNIVERSAL
    snapshot = kernels_cache() / record["snapshot"]
    downloaded = sorted(str(p.relative_to(snapshot)) for p in snapshot.rglob("*") if p.is_file())
    assert downloaded == sorted(name for name in hub.repos[repo] if name.startswith(f"build/{UNIVERSAL}/"))
    assert (snapshot / "build" / UNIVERSAL / package / "flash_attn_interface.py").is_file()

    hub.requests.clear()
    loaded = run_python(LOAD.format(capability=capability), hub.url, tmp_path)
    assert loaded == {"line": f"attention: fa3 ({repo})", "loaded": True, "matches": True}
    assert hub.requests == []  # the run made no request at all


def test_load_with_the_hub_gone_still_works(hub: FakeHub, tmp_path: Path) -> None:
    pytest.importorskip("kernels")
    assert str(run_python(FETCH.format(capability=(9, 0)), hub.url, tmp_path)["line"]).startswith("attention: fetched")
    loaded = run_python(LOAD.format(capability=(9, 0)), closed_port_url(), tmp_path)
    assert loaded["line"] == f"attention: fa3 ({HOPPER_REPO})" and loaded["matches"] is True


@pytest.mark.skipif(sandbox.bwrap_executable() is None, reason="bubblewrap cannot create namespaces here")
def test_load_inside_the_sandbox(hub: FakeHub, tmp_path: Path) -> None:
    pytest.importorskip("kernels")
    assert kernels_cache().parent in readable_paths()  # the data cache, which holds the kernels cache
    run_python(FETCH.format(capability=(9, 0)), hub.url, tmp_path)
    before = sorted(kernels_cache().rglob("*"))
    hub.requests.clear()
    loaded = run_python(LOAD.format(capability=(9, 0)), hub.url, tmp_path, sandboxed=True)
    assert loaded == {"line": f"attention: fa3 ({HOPPER_REPO})", "loaded": True, "matches": True}
    assert hub.requests == [] and sorted(kernels_cache().rglob("*")) == before  # read-only, offline


def test_a_fetch_for_another_gpu_is_not_loaded(hub: FakeHub, tmp_path: Path) -> None:
    pytest.importorskip("kernels")
    run_python(FETCH.format(capability=(8, 0)), hub.url, tmp_path)  # prepared on an A100
    loaded = run_python(LOAD.format(capability=(9, 0)), hub.url, tmp_path)  # the run lands on an H100
    assert loaded == {"line": "attention: sdpa (not fetched: run autoresearch prepare)", "loaded": False}


def test_hub_unreachable_fetch_reports_why(tmp_path: Path) -> None:
    pytest.importorskip("kernels")
    fetched = run_python(FETCH.format(capability=(9, 0)), closed_port_url(), tmp_path)
    line = str(fetched["line"])
    assert line.startswith(f"attention: sdpa — fetching {HOPPER_REPO} failed: ")
    assert "\n" not in line and not (kernels_cache() / "flash-attention.json").exists()


def test_unknown_repository_fetch_reports_why(hub: FakeHub, tmp_path: Path) -> None:
    pytest.importorskip("kernels")
    del hub.repos[HOPPER_REPO]
    line = str(run_python(FETCH.format(capability=(9, 0)), hub.url, tmp_path)["line"])
    assert line.startswith(f"attention: sdpa — fetching {HOPPER_REPO} failed: ")


def test_a_damaged_record_means_not_fetched(tmp_path: Path) -> None:
    pytest.importorskip("kernels")
    kernels_cache().mkdir(parents=True)
    (kernels_cache() / attention_kernels.RECORD).write_text("{not json")
    assert load_flash_attention(cuda_available=True, capability=(9, 0)) == (
        None, "attention: sdpa (not fetched: run autoresearch prepare)")


# --- autoresearch prepare ---------------------------------------------------------------------

@pytest.fixture
def cuda_lab(tmp_path: Path) -> Path:
    return init_lab(tmp_path / "lab", dataset="sotu", preset="cuda").root


def test_prepare_of_a_cuda_lab_on_this_machine_says_sdpa(cuda_lab: Path, tmp_path: Path) -> None:
    proc = run_code("from autoresearch.cli import main; raise SystemExit(main(['prepare']))",
                    closed_port_url(), tmp_path, cwd=cuda_lab)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == "attention: sdpa — no CUDA device here"


def test_prepare_of_a_cpu_lab_fetches_nothing(tmp_path: Path) -> None:
    lab = init_lab(tmp_path / "lab", dataset="sotu", preset="tiny").root
    proc = run_code(WITH_A_GPU + "from autoresearch.cli import main; raise SystemExit(main(['prepare']))",
                    closed_port_url(), tmp_path, cwd=lab)
    assert proc.returncode == 0, proc.stderr
    assert "attention" not in proc.stdout and not kernels_cache().exists()


def test_prepare_succeeds_when_the_hub_is_unreachable(cuda_lab: Path, tmp_path: Path) -> None:
    pytest.importorskip("kernels")
    proc = run_code(WITH_A_GPU + "from autoresearch.cli import main; raise SystemExit(main(['prepare']))",
                    closed_port_url(), tmp_path, cwd=cuda_lab)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[-3].startswith("Ready: sotu in ")
    assert lines[-2] == f"attention: fetching {HOPPER_REPO} (v1) into {kernels_cache()}"
    assert lines[-1].startswith(f"attention: sdpa — fetching {HOPPER_REPO} failed: ")


def test_prepare_py_fetches_what_train_py_loads(hub: FakeHub, cuda_lab: Path, tmp_path: Path) -> None:
    pytest.importorskip("kernels")
    # the template's own `python prepare.py`, then a fresh process importing from prepare as train.py does
    proc = run_code(WITH_A_GPU + "import runpy; runpy.run_path('prepare.py', run_name='__main__')",
                    hub.url, tmp_path, cwd=cuda_lab)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == f"attention: fetched {HOPPER_REPO} (build {UNIVERSAL})"
    hub.requests.clear()
    proc = run_code(WITH_A_GPU + "import sys; sys.path.insert(0, '.')\n"
                    "from prepare import load_flash_attention\nfunc, line = load_flash_attention()\n"
                    "print(line, func.__module__)", hub.url, tmp_path, cwd=cuda_lab)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[:3] == ["attention:", "fa3", f"({HOPPER_REPO})"]
    assert proc.stdout.strip().endswith(".flash_attn_interface") and hub.requests == []
