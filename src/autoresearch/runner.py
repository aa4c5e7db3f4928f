"""Run one experiment: a command in its own session, under a wall-clock limit enforced from outside.

The limit (budget + allowances) runs from spawn, so nothing the code under study does buys it time.
At the limit, and whenever the main process exits, the whole tree is ended: the process group and
every descendant seen while running (one that called setsid or outlived its parent goes too); in
every mode the sandbox's wrapper also ends what it contains (bwrap's pid namespace, or the reaper,
a subreaper that every orphan of the run reparents to). The run gets an allow list of environment
variables, never a secret (run_env); output goes to a capped log that keeps its head and its tail; the
outcome is classified from the exit status, the signals and the log. POSIX only (Linux, macOS).

A run can be sandboxed (see sandbox.py), and can hand its trained model to a trusted evaluator: it
writes `model.pt2` into the handoff directory and then a file named `ready`; the runner notices
`ready`, takes one copy of the model out of the run's reach, times the hand-off after that copy, and
calls the evaluator on the copy in a thread while the run waits for `result.json`. Everything in
that directory is the run's: a link, a named pipe or a huge file in place of the model is refused,
never followed, waited on or read past a cap, and a model changed after its copy was taken makes
the hand-off void (see _Handoff). The protocol's names are in handoff.py; the process-group
helpers, shared with the coding-assistant agents, in procgroup.py.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import functools
import json
import math
import os
import re
import resource
import secrets
import shlex
import shutil
import signal as signals
import site
import stat
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

from . import settings
from .config import PASS_ENV, SECRET_PATTERNS
from .handoff import CACHE_ENV, HANDOFF_MAX_BYTES, MODEL, READY, RESULT
from .procgroup import group_alive, is_live, kill_group, scrub_env, signal_group, wait_until  # noqa: F401  (re-exported)
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
_HANDOFF_POLL = 0.1  # seconds between looks for `<handoff_dir>/ready`
_COPY_CHUNK = 8 * 2**20


@dataclass(frozen=True)
class RunSpec:
    """One experiment to run. Times are in seconds. The sandbox fields are enforced only when bubblewrap
    runs (RunResult.sandbox == "bwrap"); without it every mode still gives the run a private TMPDIR and
    HOME inside the scratch directory (the first writable path) and the reaper that ends its processes,
    and "auto" adds unshare's network and pid namespaces where it can (see sandbox.py)."""

    command: str | Sequence[str]  # a string runs with /bin/sh -c; a sequence is executed directly
    cwd: Path  # where it runs (the experiment's worktree)
    log_path: Path  # stdout and stderr, capped at log_cap_bytes
    budget: float  # training seconds
    startup_allowance: float = 30.0  # added to the limit: interpreter start, imports, compilation
    eval_allowance: float = 30.0  # added to the limit: the final evaluation
    env: Mapping[str, str] | None = None  # base environment (None: os.environ), filtered by run_env
    extra_env: Mapping[str, str] = field(default_factory=dict)  # added after filtering
    secret_patterns: Sequence[str] = DEFAULT_SECRET_PATTERNS  # never passed: fnmatch on names, any case
    pass_env: Sequence[str] = PASS_ENV  # the only variables passed (fnmatch, any case); secret_patterns win
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
    # the evaluator: once, in a thread, given the copy of the model taken when `ready` appeared; what it
    # returns is the run's answer (result.json): {"val_bpb": ...} or {"error": ...}
    on_handoff: Callable[[Path], Mapping[str, object]] | None = None
    handoff_copy: Path | None = None  # where that copy goes, out of the run's reach (None: a temporary file)
    handoff_max_bytes: int = HANDOFF_MAX_BYTES

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
    handoff_seconds: float | None = None  # spawn to the model's copy taken (or refused) after `ready` appeared
    cpu_seconds: float | None = None  # user + system time of the process tree, as last sampled
    # what was wrong with the hand-off: a link, a pipe or an oversized file in place of the model
    # (refused, never scored), or a model the run changed after it was copied
    handoff_error: str | None = None


def run_env(env: Mapping[str, str], allow: Iterable[str], deny: Iterable[str]) -> dict[str, str]:
    """The variables of `env` a run gets: those that match an `allow` pattern and no `deny` pattern
    (fnmatch, any case). The run's HOME is not the user's (see sandbox.py), so what lives under the
    real one by default is named: the data cache and, when it exists, the user's site-packages."""
    upper = [p.upper() for p in allow]
    passed = {k: v for k, v in scrub_env(env, deny).items() if any(fnmatch.fnmatchcase(k.upper(), p) for p in upper)}
    passed.setdefault(CACHE_ENV, str(settings.cache_dir()))
    if site.ENABLE_USER_SITE and os.path.isdir(site.getusersitepackages()):
        passed.setdefault("PYTHONUSERBASE", site.getuserbase())
    return passed


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


def run_experiment(spec: RunSpec) -> RunResult:
    """Run the command to its end or to the limit and classify what happened. A failing or unstartable
    command is a result, not an exception; KeyboardInterrupt (or an error raised by a callback other
    than on_handoff) ends the tree and propagates. The pid given to on_start is the wrapper's (bwrap,
    unshare or the reaper: see sandbox.py), which leads the run's process group."""
    argv, shell = _argv(spec.command, spec.python)
    env = run_env(os.environ if spec.env is None else spec.env, spec.pass_env, spec.secret_patterns)
    env.setdefault("PYTHONUNBUFFERED", "1")  # otherwise a killed run loses its last lines
    spec.log_path.parent.mkdir(parents=True, exist_ok=True)
    log = CappedLog(spec.log_path, spec.log_cap_bytes)
    handoff = None if spec.handoff_dir is None else _Handoff(spec)
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
        if handoff is not None:
            handoff.join()
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
    outcome, sig, error = _classify(proc.returncode, shell or box.mode in ("bwrap", "unshare-net"),
                                    data[-_SCAN_BYTES:].decode("utf-8", "replace"), spec, timed_out, memory_hint)
    starts = [m.start() for m in _DASHES.finditer(data)]
    summary = parse_summary(data[starts[-1]:].decode("utf-8", "replace")) if starts else {}
    tail = data[-TAIL_BYTES:].decode("utf-8", "replace").splitlines()
    if len(data) > TAIL_BYTES and len(tail) > 1:
        tail = tail[1:]  # the first one is cut
    return RunResult(outcome, None if sig is not None else proc.returncode, sig, error, end - start,
                     tree.peak_rss / 2**20, spec.log_path, log.total, log.truncated,
                     "\n".join(tail[-TAIL_LINES:]), summary, box.mode, None if handoff is None else handoff.seen,
                     tree.cpu_seconds, None if handoff is None else handoff.error)


def write_handoff_result(handoff_dir: Path, result: Mapping[str, object]) -> None:
    """Write `<handoff_dir>/result.json` atomically (the run may be reading it) and without following
    a link the code under study may have planted there, as the folder or in it."""
    folder = _open_folder(Path(handoff_dir))
    try:
        _write_result(folder, result)
    finally:
        os.close(folder)


def _open_folder(path: Path) -> int:
    """A descriptor of the directory `path`, refusing a link in its place (OSError)."""
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)


def _write_result(folder: int, result: Mapping[str, object]) -> None:
    """result.json in the directory open as `folder`: a fresh temporary file renamed over the name."""
    temporary = f".result-{os.getpid()}-{secrets.token_hex(6)}"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644, dir_fd=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(result, f)
        os.replace(temporary, RESULT, src_dir_fd=folder, dst_dir_fd=folder)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary, dir_fd=folder)
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
            next_poll = now + _HANDOFF_POLL if not handoff.poll(start) else math.inf
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


class _Refused(Exception):
    """The handed-over model cannot be taken; the message says why, for the run and the ledger."""


class _Handoff:
    """The hand-off folder from the runner's side. Everything in it is the run's, so:

    - the folder is opened (O_NOFOLLOW) before the run starts and only that descriptor is read; the
      path must still lead to it when the model is taken, so a link or another folder put in its
      place is refused, never followed;
    - when `ready` appears, `model.pt2` is opened relative to it without following a link (one could
      point at a file the run cannot read, such as another tag's champion in the hidden state
      directory) and without blocking (a named pipe would hold the evaluator while the run trains
      on); it must be a regular file of at most handoff_max_bytes, and is copied to handoff_copy, out
      of the run's reach. The copy is what the evaluator scores, for validation and test;
    - the hand-off is timed after the copy, so a slow write buys no training time;
    - a model.pt2 that differs after the run from what was copied (size, inode, change time) voids
      the hand-off: an honest run never touches it again, and a run that swaps it is an attack.

    `error` says what was wrong; a refused run is answered {"error": ...} like a rejected model.
    """

    def __init__(self, spec: RunSpec) -> None:
        assert spec.handoff_dir is not None
        self.dir, self.evaluate = Path(spec.handoff_dir), spec.on_handoff
        self.copy_to, self.max_bytes, self.limit = spec.handoff_copy, spec.handoff_max_bytes, spec.limit
        self.seen: float | None = None  # seconds from spawn to the copy taken (or refused)
        self.error: str | None = None
        self.thread: threading.Thread | None = None
        self.folder: int | None = None  # descriptor of the folder, opened before the run starts
        self.identity: tuple[int, int] = (0, 0)  # its (st_dev, st_ino)
        self.taken: tuple[int, ...] | None = None  # _version of the model file that was copied

    def prepare(self) -> None:
        """Make the folder (a link or file in its place, left by an earlier attempt, goes first), open
        it, and remove a stale model, `ready` or result, which would hand over at once."""
        if self.dir.is_symlink() or (self.dir.exists() and not self.dir.is_dir()):
            self.dir.unlink()
        self.dir.mkdir(parents=True, exist_ok=True)
        self.folder = _open_folder(self.dir)
        info = os.fstat(self.folder)
        self.identity = (info.st_dev, info.st_ino)
        for name in (MODEL, READY, RESULT):
            try:
                os.unlink(name, dir_fd=self.folder)
            except FileNotFoundError:
                pass
            except OSError:  # a directory: nothing runs yet, and the folder was opened without following links
                shutil.rmtree(self.dir / name)

    def poll(self, start: float) -> bool:
        """Look for `ready` in the folder; once it is there, take the model in a thread. True from then on."""
        if self.thread is None and self.folder is not None:
            try:
                os.stat(READY, dir_fd=self.folder, follow_symlinks=False)
            except FileNotFoundError:
                return False
            self.thread = threading.Thread(target=self._run, args=(start,), name="runner-handoff", daemon=True)
            self.thread.start()
        return self.thread is not None

    def _run(self, start: float) -> None:
        temporary = tempfile.mkdtemp(prefix="autoresearch-handoff-") if self.copy_to is None else None
        target = self.copy_to if temporary is None else Path(temporary) / MODEL
        assert target is not None and self.folder is not None
        try:
            try:
                copy: Path | None = self._take(target, start + self.limit)
            except _Refused as exc:
                copy, self.error = None, f"the hand-off was refused: {exc}"
            self.seen = time.monotonic() - start  # after the copy: writing slowly buys no training time
            if copy is None:
                answer: Mapping[str, object] = {"error": self.error}
            elif self.evaluate is None:
                return
            else:
                try:
                    answer = self.evaluate(copy) or {"error": "the evaluator returned no result"}
                except Exception as exc:  # the evaluator's failure goes to the waiting run, which must not hang
                    answer = {"error": f"{type(exc).__name__}: {exc}"}
            with contextlib.suppress(OSError):  # a run that put a folder at result.json waits for nothing
                _write_result(self.folder, answer)
        finally:
            if temporary is not None:
                shutil.rmtree(temporary, ignore_errors=True)

    def _take(self, target: Path, deadline: float) -> Path:
        """Copy model.pt2 from the folder to `target`, or raise _Refused."""
        assert self.folder is not None
        try:
            now = _open_folder(self.dir)
        except OSError as exc:
            raise _Refused(f"the hand-off folder cannot be opened without following a link ({exc.strerror})") from None
        try:
            info = os.fstat(now)
        finally:
            os.close(now)
        if (info.st_dev, info.st_ino) != self.identity:
            raise _Refused("the hand-off folder was replaced while the run ran")
        try:
            source = os.open(MODEL, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=self.folder)
        except OSError as exc:
            raise _Refused(_unopenable(exc)) from None
        try:
            info = os.fstat(source)
            if not stat.S_ISREG(info.st_mode):
                raise _Refused(f"{MODEL} is {_file_kind(info.st_mode)}, not a regular file")
            if info.st_size > self.max_bytes:
                raise _Refused(f"{MODEL} is {info.st_size / 2**30:.2f} GiB, over the {self.max_bytes / 2**30:g} GiB limit")
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_name(f".{target.name}.{secrets.token_hex(6)}.partial")
            try:
                with open(partial, "xb") as out:
                    while chunk := os.read(source, min(_COPY_CHUNK, self.max_bytes + 1 - out.tell())):
                        if out.tell() + len(chunk) > self.max_bytes:
                            raise _Refused(f"{MODEL} grew past the {self.max_bytes / 2**30:g} GiB limit while it was copied")
                        if time.monotonic() > deadline:
                            raise _Refused(f"copying {MODEL} did not finish within the run's {self.limit:g} s limit")
                        out.write(chunk)
                if _version(os.fstat(source)) != _version(info):
                    raise _Refused(f"{MODEL} changed while it was copied: write it completely before `ready`")
                os.replace(partial, target)
            except OSError as exc:
                raise _Refused(f"{MODEL} could not be copied: {exc}") from None
            finally:
                partial.unlink(missing_ok=True)
            self.taken = _version(info)
            return target
        finally:
            os.close(source)

    def join(self) -> None:
        """Wait for the evaluator to finish; once the run has ended, check that the model it handed
        over is still the one copied; close the folder."""
        if self.thread is not None:
            self.thread.join()
        if self.folder is None:
            return
        if self.taken is not None and self.error is None:
            try:
                now: tuple[int, ...] | None = _version(os.stat(MODEL, dir_fd=self.folder, follow_symlinks=False))
            except OSError:
                now = None
            if now != self.taken:
                self.error = (f"{MODEL} was {'removed' if now is None else 'changed'} after it was handed over "
                              "(the copy taken at the hand-off was scored; an honest run leaves the file alone)")
        os.close(self.folder)
        self.folder = None


def _version(info: os.stat_result) -> tuple[int, ...]:
    """What changes when a file is replaced or written: the change time cannot be set back by hand."""
    return info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns


def _unopenable(exc: OSError) -> str:
    if exc.errno == errno.ENOENT:
        return f"there is no {MODEL} in the hand-off folder"
    if exc.errno in (errno.ELOOP, errno.EMLINK):  # what O_NOFOLLOW gives for a link (Linux, macOS; FreeBSD)
        return f"{MODEL} is a symbolic link: the evaluator reads only a file written into the folder"
    if exc.errno == errno.ENXIO:
        return f"{MODEL} is a socket, not a regular file"
    return f"{MODEL} cannot be opened: {exc.strerror}"


def _file_kind(mode: int) -> str:
    kinds = ((stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))
    return next((name for test, name in kinds if test(mode)), "a special file")


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
                and not any(is_live(p) for p in self.known.values()))

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None or group_alive(self.proc.pid):
            signal_group(self.proc.pid, sig)
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
                done = wait_until(self.gone, grace)
        finally:
            if not done:
                self.signal(signals.SIGKILL)
                self.proc.wait()
                wait_until(self.gone, 2.0)
