"""Run one experiment: a command in its own session, under a wall-clock limit enforced from outside.

The limit (budget + allowances) runs from spawn, so nothing the code under study does buys it time.
At the limit, and whenever the main process exits, the whole tree is ended: the process group and
every descendant seen while running (one that called setsid or outlived its parent goes too). Secrets
are scrubbed from the environment; output goes to a capped log that keeps its head and its tail; the
outcome is classified from the exit status, the signals and the log. POSIX only (Linux, macOS).

A run can be sandboxed (see sandbox.py), and can hand its trained model to a trusted evaluator: it
writes the model into the handoff directory and then a file named `ready`; the runner notices `ready`,
times it from outside and calls the evaluator in a thread while the run waits for `result.json`. The
code under study can write into that directory too: the evaluator treats what it finds there as
untrusted (a planted link, an early `ready`) and answers with write_handoff_result.
"""

from __future__ import annotations

import fnmatch
import functools
import json
import math
import os
import re
import resource
import shlex
import signal as signals
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import psutil

from .config import SECRET_PATTERNS
from .runlog import CappedLog
from .sandbox import MODES, Confinement, Mode, SandboxUnavailable, confine

Outcome = Literal["ok", "crash", "timeout", "oom", "nan", "killed"]
DEFAULT_SECRET_PATTERNS: tuple[str, ...] = SECRET_PATTERNS
TAIL_LINES, TAIL_BYTES = 50, 8192  # RunResult.tail: at most this many lines and bytes
_SCAN_BYTES = 65536  # the end of the log searched for exception, out-of-memory and NaN lines
# Signals a program raises against itself by faulting: its own crash, not someone killing it.
_FAULTS = {signals.SIGSEGV, signals.SIGBUS, signals.SIGFPE, signals.SIGILL, signals.SIGABRT}
_OOM = re.compile(r"MemoryError|CUDA out of memory|OutOfMemoryError|MPS backend out of memory"
                  r"|Cannot allocate memory|std::bad_alloc", re.I)
_FAIL = re.compile(r"^\s*FAIL\s*$")
_NAN_LOSS = re.compile(r"(?<![a-z])loss(?:[\s:=]+(?:is|was|became|has become|value|of))*[\s:=]+"
                       r"(?:nan|[+-]?inf(?:inity)?)\b|\b(?:nan|inf|non-?finite)\s+(?:\w+\s+){0,3}loss\b", re.I)
_EXCEPTION = re.compile(r"^(?:[A-Za-z_]\w*\.)*[A-Z]\w*(?:Error|Exception|Interrupt|Exit|Iteration)(?::\s.*)?$")
_KEY_VALUE = re.compile(r"([A-Za-z_][\w.\-/]*)\s*:\s*(.*)$")
_DASHES = re.compile(rb"^---[ \t\r]*$", re.M)
_HANDOFF_POLL = 0.1  # seconds between looks for `<handoff_dir>/ready`: the resolution of handoff_seconds
READY, RESULT = "ready", "result.json"  # the files of the handoff protocol


@dataclass(frozen=True)
class RunSpec:
    """One experiment to run. Times are in seconds. The sandbox fields are enforced only when bubblewrap
    runs (RunResult.sandbox == "bwrap"); without it "auto" still gives the run a private TMPDIR inside
    the scratch directory (the first writable path) and, where it can, a network namespace."""

    command: str | Sequence[str]  # a string runs with /bin/sh -c; a sequence is executed directly
    cwd: Path  # where it runs (the experiment's worktree)
    log_path: Path  # stdout and stderr, capped at log_cap_bytes
    budget: float  # training seconds
    startup_allowance: float = 30.0  # added to the limit: interpreter start, imports, compilation
    eval_allowance: float = 30.0  # added to the limit: the final evaluation
    env: Mapping[str, str] | None = None  # base environment (None: os.environ), scrubbed of secrets
    extra_env: Mapping[str, str] = field(default_factory=dict)  # added after scrubbing
    secret_patterns: Sequence[str] = DEFAULT_SECRET_PATTERNS  # fnmatch on names, case-insensitive
    log_cap_bytes: int = 10 * 2**20  # at most this much output is kept: half head, half tail
    memory_limit_bytes: int | None = None  # RLIMIT_AS for the child
    on_start: Callable[[int, int], None] | None = None  # (pid, pgid), right after spawn
    on_tick: Callable[[float], None] | None = None  # seconds since spawn, every tick_seconds
    python: str = sys.executable  # replaces a leading `python` word of the command
    grace_seconds: float = 3.0  # between SIGTERM and SIGKILL
    tick_seconds: float = 0.5
    sample_seconds: float = 0.25  # how often the tree's memory is sampled
    sandbox: Mode = "none"  # "auto": bubblewrap, else the best fallback; "bwrap": bubblewrap or a crash
    writable: tuple[Path, ...] = ()  # read-write besides cwd, made when missing; the first is the scratch dir
    hidden: tuple[Path, ...] = ()  # unreadable in the sandbox: state directory, validation and test shards
    readable: tuple[Path, ...] = ()  # read-only in the sandbox even under a hiding mount (the data cache, the venv)
    device_nodes: tuple[str, ...] | None = None  # GPU device nodes the sandbox binds (None: all there are)
    handoff_dir: Path | None = None  # where the run hands over its model (writable; emptied of stale files)
    on_handoff: Callable[[Path], None] | None = None  # the evaluator, once, in a thread, when `ready` appears

    def __post_init__(self) -> None:
        if self.sandbox not in MODES:
            raise ValueError(f"unknown sandbox mode {self.sandbox!r}: use one of {', '.join(MODES)}")

    @property
    def limit(self) -> float:
        """The wall-clock limit, measured from spawn."""
        return self.budget + self.startup_allowance + self.eval_allowance


@dataclass(frozen=True)
class RunResult:
    """What happened. `error` is one line, None when the outcome is ok."""

    outcome: Outcome
    exit_code: int | None  # None when it never started or died by a signal
    signal: int | None  # the signal it died by
    error: str | None
    wall_seconds: float  # spawn to exit
    peak_rss_mb: float  # the largest summed RSS of the process tree seen
    log_path: Path
    log_bytes: int  # everything the process wrote, dropped bytes included
    log_truncated: bool
    tail: str  # the last lines of the output
    summary: dict[str, float | str]  # the `key: value` lines after the last `---` line
    sandbox: str = "none"  # the confinement in force: "bwrap", "unshare-net" or "none"
    handoff_seconds: float | None = None  # spawn to the first sight of `<handoff_dir>/ready`
    cpu_seconds: float | None = None  # user + system time of the process tree, as last sampled


def scrub_env(env: Mapping[str, str], patterns: Iterable[str]) -> dict[str, str]:
    """A copy of `env` without the variables whose name matches a pattern (fnmatch, any case)."""
    upper = [p.upper() for p in patterns]
    return {k: v for k, v in env.items() if not any(fnmatch.fnmatchcase(k.upper(), p) for p in upper)}


def parse_summary(text: str) -> dict[str, float | str]:
    """The `key: value` lines after the last line that is exactly `---` (floats where they parse)."""
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if line.rstrip() == "---"]
    summary: dict[str, float | str] = {}
    for match in (_KEY_VALUE.match(line.strip()) for line in (lines[starts[-1] + 1:] if starts else [])):
        if match:
            value = match.group(2).strip()
            try:
                summary[match.group(1)] = float(value)
            except ValueError:
                summary[match.group(1)] = value
    return summary


def group_alive(pgid: int) -> bool:
    """True while the process group has a member that is not a zombie."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists but belongs to another user
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) == pgid and _live(proc):
                return True
        except OSError:
            continue
    return False


def kill_group(pgid: int, grace_seconds: float = 3.0) -> None:
    """End a process group: SIGTERM, up to `grace_seconds` to exit, then SIGKILL."""
    if pgid <= 1 or pgid == os.getpgrp():
        raise ValueError(f"refusing to kill process group {pgid}: it is not a training run's group")
    for sig, wait in ((signals.SIGTERM, grace_seconds), (signals.SIGKILL, 2.0)):
        if not group_alive(pgid):
            return
        _killpg(pgid, sig)
        _wait_until(lambda: not group_alive(pgid), wait)


def run_experiment(spec: RunSpec) -> RunResult:
    """Run the command to its end or to the limit and classify what happened. A failing or unstartable
    command is a result, not an exception; KeyboardInterrupt (or an error raised by a callback other
    than on_handoff) ends the tree and propagates. Sandboxed, the pid given to on_start is bwrap's."""
    argv, shell = _argv(spec.command, spec.python)
    env = scrub_env(os.environ if spec.env is None else spec.env, spec.secret_patterns)
    env.setdefault("PYTHONUNBUFFERED", "1")  # otherwise a killed run loses its last lines
    spec.log_path.parent.mkdir(parents=True, exist_ok=True)
    log = CappedLog(spec.log_path, spec.log_cap_bytes)
    handoff = None if spec.handoff_dir is None else _Handoff(Path(spec.handoff_dir), spec.on_handoff)
    box: Confinement | None = None
    try:
        box = _confine(spec, argv, handoff)
        env.update(box.env)
        env.update(spec.extra_env)
        oom_kills, start = _oom_kill_count(), time.monotonic()
        proc = subprocess.Popen(box.argv, cwd=spec.cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=_rlimit(spec.memory_limit_bytes))
    except (SandboxUnavailable, OSError, subprocess.SubprocessError) as exc:
        why, name = getattr(exc, "strerror", None), getattr(exc, "filename", None) or (argv[0] if argv else "")
        message = str(exc) if isinstance(exc, SandboxUnavailable) else \
            f"cannot start the command: {f'{name}: {why}' if why else exc}"
        log.write(f"{message}\n".encode())
        log.close()
        if box is not None:
            box.close()
        return RunResult("crash", None, None, message, 0.0, 0.0, spec.log_path, 0, False, message, {},
                         "none" if box is None else box.mode)
    assert proc.stdout is not None
    tree = _Tree(proc)
    log.start(proc.stdout.fileno())
    timed_out, end = False, start
    try:
        if spec.on_start is not None:
            spec.on_start(proc.pid, proc.pid)  # start_new_session: the child leads its own group
        timed_out = _watch(proc, spec, tree, start, handoff)
        end = time.monotonic()
    finally:
        try:
            tree.end(spec.grace_seconds)
        finally:
            log.close()
            proc.stdout.close()
            box.close()
            if handoff is not None:
                handoff.join()  # the evaluator finishes even when the run did not wait for it
    end = time.monotonic() if timed_out else end

    data = spec.log_path.read_bytes()
    memory_hint = _oom_kill_count() > oom_kills or tree.peak_rss >= 0.9 * (
        spec.memory_limit_bytes or psutil.virtual_memory().total)
    outcome, sig, error = _classify(proc.returncode, shell or box.mode == "bwrap",
                                    data[-_SCAN_BYTES:].decode("utf-8", "replace"), spec, timed_out, memory_hint)
    starts = [m.start() for m in _DASHES.finditer(data)]
    summary = parse_summary(data[starts[-1]:].decode("utf-8", "replace")) if starts else {}
    tail = data[-TAIL_BYTES:].decode("utf-8", "replace").splitlines()
    if len(data) > TAIL_BYTES and len(tail) > 1:
        tail = tail[1:]  # the first one is cut
    return RunResult(outcome, None if sig is not None else proc.returncode, sig, error, end - start,
                     tree.peak_rss / 2**20, spec.log_path, log.total, log.truncated,
                     "\n".join(tail[-TAIL_LINES:]), summary, box.mode, None if handoff is None else handoff.seen,
                     tree.cpu_seconds)


def write_handoff_result(handoff_dir: Path, result: Mapping[str, object]) -> None:
    """Write `<handoff_dir>/result.json` atomically (the run may be reading it) and without following
    a link the code under study may have planted there: a temporary file renamed over the name."""
    fd, temporary = tempfile.mkstemp(prefix=".result-", dir=handoff_dir)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(result, f)
        os.replace(temporary, Path(handoff_dir) / RESULT)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _confine(spec: RunSpec, argv: list[str], handoff: _Handoff | None) -> Confinement:
    """Check what the run needs, make its writable directories, and wrap the command for the sandbox."""
    if not Path(spec.cwd).is_dir():
        raise OSError(f"the working directory {spec.cwd} does not exist")
    if not argv:
        raise OSError("the command is empty")
    writable = [Path(p) for p in spec.writable]
    for path in writable:
        if not path.exists():
            path.mkdir(parents=True)
    if handoff is not None:
        handoff.prepare()
        writable.append(handoff.dir)
    return confine(spec.sandbox, argv, Path(spec.cwd), writable, spec.hidden, writable[0] if spec.writable else None,
                   spec.readable, spec.device_nodes)


def _argv(command: str | Sequence[str], python: str) -> tuple[list[str], bool]:
    """The argv to execute, with a leading `python` word replaced, and whether a shell runs it."""
    if isinstance(command, str):
        match = re.match(r"\s*python(?=\s|$)", command)
        if match:
            command = shlex.quote(python) + command[match.end():]
        return ["/bin/sh", "-c", command], True
    argv = list(command)
    return ([python, *argv[1:]] if argv and argv[0] == "python" else argv), False


def _rlimit(limit: int | None) -> Callable[[], None] | None:
    """A preexec_fn capping the child's address space: a bound C call, safe after fork."""
    return None if limit is None else functools.partial(resource.setrlimit, resource.RLIMIT_AS, (limit, limit))


def _watch(proc: subprocess.Popen[bytes], spec: RunSpec, tree: _Tree, start: float,
           handoff: _Handoff | None) -> bool:
    """Wait for the main process, sampling memory, ticking and looking for the handoff; True when the
    limit expired."""
    deadline, next_tick, next_sample = start + spec.limit, start + spec.tick_seconds, start
    next_poll = start if handoff is not None else math.inf
    while True:
        now = time.monotonic()
        if handoff is not None and now >= next_poll:
            handoff.poll(now - start)
            next_poll = now + _HANDOFF_POLL if handoff.seen is None else math.inf
        if now >= next_sample:
            tree.sample()
            next_sample = now + spec.sample_seconds
        if spec.on_tick is not None and now >= next_tick:
            spec.on_tick(now - start)
            next_tick = now + spec.tick_seconds
        if now >= deadline:
            return True
        try:
            proc.wait(timeout=max(0.01, min(next_sample, next_tick, next_poll, deadline) - now))
            return False
        except subprocess.TimeoutExpired:
            continue


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _oom_kill_count() -> int:
    """How many processes the kernel's OOM killer has ended since boot (0 where unknown)."""
    try:
        with open("/proc/vmstat", encoding="ascii") as f:
            return next((int(line.split()[1]) for line in f if line.startswith("oom_kill ")), 0)
    except (OSError, ValueError, IndexError):
        return 0


def _classify(returncode: int, wrapped: bool, text: str, spec: RunSpec, timed_out: bool,
              memory_hint: bool) -> tuple[Outcome, int | None, str | None]:
    """(outcome, signal, error) from the exit status, the signals and the end of the log."""
    sig = -returncode if returncode < 0 else None
    if sig is None and wrapped and 128 < returncode < 128 + signals.NSIG:
        sig = returncode - 128  # a shell, or bwrap, reports its child's death by signal N as exit 128 + N
    if timed_out:
        return "timeout", sig, f"exceeded the {spec.limit:g} s limit (budget {spec.budget:g} s + allowances)"
    if returncode == 0:
        return "ok", None, None
    lines = [line.rstrip() for line in text.splitlines()]
    oom = [line.strip() for line in lines if _OOM.search(line) and not line.startswith("    ")]
    if oom:
        return "oom", sig, oom[-1][:500]
    name = {s.value: s.name for s in signals.Signals}.get(sig or 0, f"signal {sig}")
    if sig is not None and sig not in _FAULTS:
        if sig == signals.SIGKILL and memory_hint:
            return "oom", sig, "killed by SIGKILL while memory was exhausted (the kernel's OOM killer)"
        return "killed", sig, f"killed by {name}"
    nan = [line.strip() for line in lines if _NAN_LOSS.search(line)]
    if nan or any(_FAIL.match(line) for line in lines):
        return "nan", sig, nan[-1][:500] if nan else "loss is NaN (the run printed FAIL)"
    exceptions = [line for line in lines if _EXCEPTION.match(line)]
    last = [line.strip() for line in lines if line.strip()]
    fallback = f"died by {name}" if sig is not None else last[-1] if last else f"exited with code {returncode}"
    return "crash", sig, (exceptions[-1] if exceptions else fallback)[:500]


class _Handoff:
    """Notices `<dir>/ready`, times it from outside, and runs the trusted evaluator once in a thread."""

    def __init__(self, directory: Path, evaluate: Callable[[Path], None] | None) -> None:
        self.dir, self.evaluate = directory, evaluate
        self.seen: float | None = None  # seconds from spawn to the first sight of `ready`
        self.thread: threading.Thread | None = None

    def prepare(self) -> None:
        """Make the directory and remove a stale `ready` or result, which would fire at once."""
        self.dir.mkdir(parents=True, exist_ok=True)
        for name in (READY, RESULT):
            (self.dir / name).unlink(missing_ok=True)

    def poll(self, elapsed: float) -> None:
        if self.seen is None and os.path.lexists(self.dir / READY):
            self.seen = elapsed
            if self.evaluate is not None:
                self.thread = threading.Thread(target=self._run, name="runner-handoff", daemon=True)
                self.thread.start()

    def _run(self) -> None:
        assert self.evaluate is not None
        try:
            self.evaluate(self.dir)
            error = None if os.path.lexists(self.dir / RESULT) else "the evaluator returned without writing a result"
        except Exception as exc:  # the evaluator's failure goes to the waiting run, which must not hang
            error = f"{type(exc).__name__}: {exc}"
        if error is not None:
            write_handoff_result(self.dir, {"error": error})

    def join(self) -> None:
        if self.thread is not None:
            self.thread.join()


class _Tree:
    """The main process and every descendant seen, so ones that leave its group still get ended."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc, self.peak_rss = proc, 0
        self.known: dict[int, psutil.Process] = {}
        self.cpu: dict[psutil.Process, float] = {}  # the last user + system seconds seen of each process
        try:
            self.known[proc.pid] = psutil.Process(proc.pid)
        except psutil.Error:
            pass

    def sample(self) -> None:
        """Add the current descendants of every known live process and record their summed RSS."""
        alive = {pid: p for pid, p in self.known.items() if p.is_running()}  # zombies too: they still parent
        children: dict[int, list[psutil.Process]] = {}
        for proc in psutil.process_iter(["ppid"]):
            children.setdefault(proc.info.get("ppid") or 0, []).append(proc)
        stack = list(alive)
        while stack:
            for child in children.get(stack.pop(), []):
                if child.pid not in alive:
                    alive[child.pid] = child
                    stack.append(child.pid)
        self.known, total = alive, 0
        for proc in alive.values():
            try:
                total += proc.memory_info().rss
                times = proc.cpu_times()
                self.cpu[proc] = times.user + times.system
            except psutil.Error:
                continue
        self.peak_rss = max(self.peak_rss, total)

    @property
    def cpu_seconds(self) -> float:
        """CPU time of every process seen, up to its last sample: a process's final `sample_seconds`
        are missed (another job on the machine shows as less CPU time per wall second)."""
        return sum(self.cpu.values())

    def gone(self) -> bool:
        return (self.proc.poll() is not None and not group_alive(self.proc.pid)
                and not any(_live(p) for p in self.known.values()))

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None or group_alive(self.proc.pid):
            _killpg(self.proc.pid, sig)
        for proc in self.known.values():
            try:
                proc.send_signal(sig)  # psutil first checks that the pid was not reused
            except psutil.Error:
                continue

    def end(self, grace: float) -> None:
        """SIGTERM to everything, `grace` seconds to exit, then SIGKILL (at once on a second Ctrl-C)."""
        self.sample()
        done = self.gone()
        try:
            if not done:
                self.signal(signals.SIGTERM)
                done = _wait_until(self.gone, grace)
        finally:
            if not done:
                self.signal(signals.SIGKILL)
                self.proc.wait()
                _wait_until(self.gone, 2.0)


def _wait_until(done: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not (finished := done()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return finished


def _live(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
