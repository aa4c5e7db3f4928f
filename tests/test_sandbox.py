"""The sandbox against real bubblewrap and real subprocesses: what a run can read, write and reach.

The labs here live under /var/tmp, not /tmp: inside the sandbox /tmp is a fresh tmpfs, so a lab under
/tmp would not exist there at all and a write "outside the worktree" would land in that throwaway
tmpfs instead of failing, which would prove nothing.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest

from autoresearch import sandbox
from autoresearch.runner import RunResult, RunSpec, kill_group, run_experiment

BWRAP = sandbox.bwrap_executable()
needs_bwrap = pytest.mark.skipif(BWRAP is None, reason="bubblewrap is not installed or cannot create namespaces here "
                                 "(no unprivileged user namespaces?): install the `bubblewrap` package")
VAL_BYTES = b"VALIDATION SHARD: the bytes the code under study must never see"
LEDGER_BYTES = b"SQLite format 3\x00 the ledger"


@dataclass
class Lab:
    root: Path  # the lab: read-only inside
    state: Path  # <root>/.autoresearch: hidden
    worktree: Path  # <state>/worktrees/t1: the run's cwd, read-write
    scratch: Path  # <state>/scratch/t1: read-write
    cache: Path  # the dataset cache: readable, but its validation shard is hidden
    val: Path
    train: Path
    home: Path

    def spec(self, source: str, **overrides: Any) -> RunSpec:
        (self.worktree / "script.py").write_text(source)
        fields: dict[str, Any] = dict(
            command="python script.py", cwd=self.worktree, log_path=self.state / "logs" / f"{uuid.uuid4().hex}.log",
            budget=20.0, startup_allowance=0.0, eval_allowance=0.0, grace_seconds=0.5, sandbox="bwrap",
            writable=(self.scratch,), hidden=(self.state, self.val), readable=(self.cache,),
            env={"PATH": "/usr/bin:/bin", "HOME": str(self.home)})
        fields.update(overrides)
        return RunSpec(**fields)

    def run(self, source: str, **overrides: Any) -> RunResult:
        return run_experiment(self.spec(source, **overrides))


@pytest.fixture
def lab() -> Iterator[Lab]:
    base = Path(tempfile.mkdtemp(prefix="autoresearch-sandbox-test-", dir="/var/tmp")).resolve()
    try:
        root, cache = base / "lab", base / "cache"
        state = root / ".autoresearch"
        lab = Lab(root, state, state / "worktrees" / "t1", state / "scratch" / "t1", cache, cache / "val_000.bin",
                  cache / "train_000.bin", base / "home")
        for directory in (lab.worktree, lab.scratch, cache, lab.home):
            directory.mkdir(parents=True)
        (root / "autoresearch.toml").write_text("[lab]\n")
        (state / "ledger.db").write_bytes(LEDGER_BYTES)
        lab.val.write_bytes(VAL_BYTES)
        lab.train.write_bytes(b"training tokens")
        yield lab
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def server() -> Iterator[int]:
    """A TCP server on 127.0.0.1 in this process; yields its port and accepts until the test ends."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                listener.accept()[0].close()
            except TimeoutError:
                continue

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        thread.join()
        listener.close()


def probe(result: RunResult) -> dict[str, Any]:
    """The JSON the probe script printed on its `PROBE` line."""
    lines = [line for line in result.log_path.read_text().splitlines() if line.startswith("PROBE ")]
    assert result.outcome == "ok" and lines, result.tail
    report: dict[str, Any] = json.loads(lines[-1][len("PROBE "):])
    return report


def connect_source(port: int) -> str:
    return f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=5).close()\nprint('connected')\n"


@needs_bwrap
def test_no_network_not_even_loopback(lab: Lab, server: int) -> None:
    result = lab.run(connect_source(server))
    assert result.sandbox == "bwrap"
    assert result.outcome == "crash" and result.error is not None
    assert result.error.startswith(("ConnectionRefusedError", "OSError")), result.error
    free = lab.run(connect_source(server), sandbox="none")
    assert free.sandbox == "none" and free.outcome == "ok" and "connected" in free.tail  # the server is real


@needs_bwrap
def test_reads_writes_and_tmp_are_confined(lab: Lab) -> None:
    marker = f"autoresearch-probe-{uuid.uuid4().hex}"
    source = f"""import json, os
from pathlib import Path
report = {{}}
def attempt(name, action):
    try:
        report[name] = action()
    except OSError as exc:
        report[name] = type(exc).__name__
attempt("val", lambda: Path({str(lab.val)!r}).read_bytes().decode("latin-1"))
attempt("train", lambda: Path({str(lab.train)!r}).read_text())
attempt("ledger", lambda: Path({str(lab.state / "ledger.db")!r}).read_bytes().decode("latin-1"))
attempt("state_listing", lambda: sorted(os.listdir({str(lab.state)!r})))
for name, path in [("lab_root", {str(lab.root)!r}), ("cache", {str(lab.cache)!r}), ("home", {str(lab.home)!r}),
                   ("state", {str(lab.state)!r}), ("cwd", "."), ("scratch", {str(lab.scratch)!r})]:
    attempt("write_" + name, lambda: Path(path, "written.txt").write_text("x") and "written")
attempt("tmp_seen", lambda: Path("/tmp/{marker}").exists())
attempt("tmp_write", lambda: Path("/tmp/{marker}").write_text("x") and "written")
report["tmpdir"] = os.environ.get("TMPDIR")
report["own_home"] = [os.environ["HOME"], os.listdir(os.environ["HOME"])]
print("PROBE", json.dumps(report))
"""
    first = probe(lab.run(source))
    assert first["val"] in ("", "PermissionError", "FileNotFoundError")
    assert VAL_BYTES.decode() not in json.dumps(first)
    assert first["train"] == "training tokens"  # the rest of the cache stays readable
    assert first["ledger"] in ("FileNotFoundError", "PermissionError") and "ledger.db" not in first["state_listing"]
    assert all(first[f"write_{name}"] in ("OSError", "PermissionError", "FileNotFoundError")
               for name in ("lab_root", "cache", "home", "state")), first
    assert first["write_cwd"] == first["write_scratch"] == "written"
    assert (lab.worktree / "written.txt").exists() and (lab.scratch / "written.txt").exists()
    for outside in (lab.root, lab.cache, lab.home, lab.state):
        assert not (outside / "written.txt").exists()
    assert lab.val.read_bytes() == VAL_BYTES and (lab.state / "ledger.db").read_bytes() == LEDGER_BYTES
    assert first["tmp_seen"] is False and first["tmp_write"] == "written" and first["tmpdir"] == "/tmp"
    assert first["own_home"] == ["/tmp/home", []]  # a private, empty HOME instead of the user's
    assert not Path("/tmp", marker).exists()  # a private /tmp, not the host's
    second = probe(lab.run(source))
    assert second["tmp_seen"] is False  # nothing persists between runs


@needs_bwrap
def test_the_mode_in_force_is_reported(lab: Lab) -> None:
    assert lab.run("print('hi')\n").sandbox == "bwrap"
    assert lab.run("print('hi')\n", sandbox="auto").sandbox == "bwrap"
    assert lab.run("print('hi')\n", sandbox="none").sandbox == "none"


@needs_bwrap
def test_exit_codes_and_signals_come_through_bwrap(lab: Lab) -> None:
    result = lab.run("import sys\nsys.exit(3)\n")
    assert result.outcome == "crash" and result.exit_code == 3
    result = lab.run("import os, signal\nos.kill(os.getpid(), signal.SIGTERM)\n", command=[sys.executable, "script.py"])
    assert result.outcome == "killed" and result.signal == 15 and result.exit_code is None


@needs_bwrap
def test_sandboxed_run_times_out_and_nothing_survives(lab: Lab) -> None:
    marker = f"marker-{uuid.uuid4().hex}"
    source = """import subprocess, sys, time
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", sys.argv[1]], start_new_session=True)
while True:
    time.sleep(0.05)
"""
    leaders: list[str] = []
    result = lab.run(source, command=[sys.executable, "script.py", marker], budget=1.5,
                     on_start=lambda pid, pgid: leaders.append(psutil.Process(pid).name()))
    assert result.outcome == "timeout" and result.sandbox == "bwrap"
    assert 1.5 <= result.wall_seconds < 1.5 + 0.5 + 1.0
    assert leaders == ["bwrap"]  # on_start sees bwrap, the group leader
    assert live_with(marker) == []


def live_with(marker: str) -> list[list[str]]:
    return [p.info["cmdline"] for p in psutil.process_iter(["cmdline", "status"])
            if marker in (p.info["cmdline"] or []) and p.info["status"] != psutil.STATUS_ZOMBIE]


@needs_bwrap
def test_kill_group_from_another_process_ends_the_sandbox(lab: Lab) -> None:
    """What the loop does on resume with the pgid it recorded: bwrap's group is all it knows."""
    assert BWRAP is not None
    marker = f"marker-{uuid.uuid4().hex}"
    child = "import time; time.sleep(600)"
    code = (f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {child!r}, sys.argv[1]], "
            "start_new_session=True); time.sleep(600)")
    proc = subprocess.Popen(sandbox.bwrap_argv(BWRAP, [sys.executable, "-c", code, marker], lab.worktree),
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while not any(child in cmd for cmd in live_with(marker)):  # bwrap, its pid 1, python, its child
            assert time.monotonic() < deadline, "the sandboxed processes never started"
            time.sleep(0.05)
        kill_group(proc.pid, grace_seconds=0.5)
        proc.wait(timeout=5)
        # the kernel ends what is left in bwrap's PID namespace when its pid 1 dies, asynchronously:
        # under load a process can still show for a moment after bwrap itself has been reaped
        deadline = time.monotonic() + 5
        while live_with(marker) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert live_with(marker) == []
    finally:
        proc.kill()
        proc.wait()
        for survivor in psutil.process_iter(["cmdline"]):
            if marker in (survivor.info["cmdline"] or []):
                survivor.kill()  # only when the test failed: leave nothing behind


@needs_bwrap
def test_hidden_directory_is_bound_back_and_missing_paths_are_skipped(lab: Lab) -> None:
    line = sandbox.bwrap_argv("bwrap", ["python", "train.py"], lab.worktree, [lab.scratch],
                              [lab.val, lab.state, lab.root / "no-such-file"])
    state, worktree = str(lab.state), str(lab.worktree)
    assert line.index("--tmpfs", line.index("--new-session")) < line.index(worktree)  # hide, then bind back
    assert line[line.index(state) - 1] == "--tmpfs" and ["--remount-ro", state] == line[-7:-5]
    assert line[line.index(str(lab.val)) - 2:line.index(str(lab.val))] == ["--ro-bind", "/dev/null"]
    assert str(lab.root / "no-such-file") not in line
    assert line[-5:] == ["--chdir", worktree, "--", "python", "train.py"]
    # A hidden file inside a writable directory: the bind first, then the hiding over it.
    inner = sandbox.bwrap_argv("bwrap", ["true"], lab.worktree, [lab.cache], [lab.val])
    assert inner.index(str(lab.cache)) < inner.index(str(lab.val))


def test_required_bwrap_that_cannot_run_is_a_crash(lab: Lab, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sandbox, "bwrap_executable", lambda: None)  # a machine without bubblewrap
    result = lab.run("print('should not run')\n")
    assert result.outcome == "crash" and result.sandbox == "none" and result.exit_code is None
    assert result.error == 'bubblewrap is not available: install the `bubblewrap` package or set sandbox = "none"'
    assert "should not run" not in result.log_path.read_text()


def test_fallback_without_bwrap_says_what_is_in_force(lab: Lab, server: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sandbox, "bwrap_executable", lambda: None)  # a machine without bubblewrap
    source = "import os\nprint('TMPDIR', os.environ['TMPDIR'])\n" + connect_source(server)
    result = lab.run(source, sandbox="auto")
    lines = result.log_path.read_text().splitlines()
    tmpdir = next(line.split(" ", 1)[1] for line in lines if line.startswith("TMPDIR"))
    assert Path(tmpdir).parent == lab.scratch and not Path(tmpdir).exists()  # private to the run, then removed
    if sandbox.unshare_executable() is None:
        assert result.sandbox == "none" and result.outcome == "ok"
    else:
        assert result.sandbox == "unshare-net" and result.outcome == "crash" and result.error is not None
        assert result.error.startswith("OSError"), result.error  # no interface is up: network unreachable


def test_unknown_mode_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown sandbox mode"):
        RunSpec(command="true", cwd=tmp_path, log_path=tmp_path / "log", budget=1,
                sandbox="docker")  # type: ignore[arg-type]
