"""Confine one experiment: what the code under study can read, write and reach while it runs.

With bubblewrap (Linux, `bwrap`) every run sees the file system read-only; its worktree and the
paths it is given read-write; the hidden paths empty (a directory becomes an empty read-only tmpfs, a
file reads as /dev/null); the host's HOME, /home, /root, /var/tmp and the other places that hold
sockets or other users' files hidden the same way (host_hidden), with what the run needs (the
interpreter, this package, the data cache, the worktree) bound back inside them; a fresh /tmp, /run
and /dev (so /dev/shm too), and HOME a private empty directory in that /tmp; no network, not even
127.0.0.1, nor abstract unix sockets (both belong to the network namespace); its own process, IPC and
terminal-session namespaces; no capabilities, even when started by root (root's CAP_SYS_ADMIN could
unmount the hiding). Ending bwrap ends everything inside (--die-with-parent: the sandbox's pid 1
gets SIGKILL, and the kernel then kills every process in its pid namespace).

Without a usable bwrap (not installed, no user namespaces, macOS) the fallback is best effort and the
mode says so: the runner's environment allow list, a private TMPDIR and HOME (empty directories in
the scratch folder; the real ones stay readable by path), and a reaper (_REAPER) that ends every
process the run started. On Linux as root, `unshare` adds a network namespace with no interface up,
a pid namespace whose pid 1 is the reaper, a /proc that shows only the run's processes, and drops
every capability ("unshare-net"); elsewhere nothing more ("none"). Hidden and read-only paths are then
NOT enforced: see NOTICES for what each mode leaves open.
"""

from __future__ import annotations

import functools
import glob
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from .errors import AutoresearchError

Mode = Literal["auto", "bwrap", "none"]
MODES: tuple[str, ...] = ("auto", "bwrap", "none")
UNAVAILABLE = 'bubblewrap is not available: install the `bubblewrap` package or set sandbox = "none"'
# Namespaces and fresh mounts every bwrap run gets; also what the usability probe asks for, since a
# container may allow a user namespace but refuse a new /proc.
_BWRAP_BASE = ("--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp", "--tmpfs", "/run",
               "--unshare-net", "--unshare-pid", "--unshare-ipc", "--die-with-parent", "--new-session",
               "--cap-drop", "ALL")
_FRESH = (Path("/tmp"), Path("/run"), Path("/dev"), Path("/proc"))  # already new inside bwrap
# Host places a run has no business reading, beside the user's HOME: other homes, folders where
# other programs leave files for later (a run's leftovers for the next run among them), and the usual
# homes of unix sockets (a socket file can be connected to even through a read-only bind): the docker,
# ssh-agent, X11, D-Bus and systemd sockets live in /run, /tmp and HOME, LXD's in /var/lib/lxd or
# /var/snap/lxd, WSLg's in /mnt/wslg. /var/run and /var/lock are usually links into /run.
HOST_HIDDEN = ("/home", "/root", "/var/tmp", "/var/run", "/var/lock", "/var/spool", "/var/mail",
               "/var/lib/lxd", "/var/snap/lxd", "/mnt/wslg")
PRIVATE_HOME = "/tmp/home"  # HOME inside bwrap: an empty directory in the run's own /tmp
# Device nodes a GPU run needs and that --dev leaves out (NVIDIA, then DRM and AMD's ROCm).
_GPU_DEVICES = ("/dev/nvidia*", "/dev/dri", "/dev/kfd")
_PROBE_SECONDS = 10.0
# unshare as root: no network, a pid namespace the reaper is pid 1 of (--kill-child: unshare's death
# kills it, and with it the namespace), and a /proc of that namespace only, so the run cannot read the
# orchestrator's environment (its API keys) in /proc/<pid>/environ.
_UNSHARE = ("--net", "--pid", "--fork", "--kill-child", "--mount-proc")
# unshare itself does not die with its parent: this starts it with PR_SET_PDEATHSIG (SIGKILL), kept
# across exec, so a killed orchestrator (or Ray worker) takes unshare, and by --kill-child the whole
# namespace, with it. A parent that died before the call is noticed by the pid it was given.
_DIE_WITH_PARENT = r"""
import ctypes, os, signal, sys
ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
if os.getppid() != int(sys.argv[1]):
    sys.exit(137)
os.execv(sys.argv[2], sys.argv[2:])
"""

# The process that runs the command whenever bubblewrap does not. Standard library only, started with
# `python -I` so nothing in the worktree or the environment can stand in for it. On Linux it makes
# itself a child subreaper, so an orphan of the run (a double fork, a daemon after setsid) becomes its
# child instead of init's: every process of the run stays below it, and nothing else does (the
# orchestrator's own children, the evaluator and the agents', are never among them). It passes
# SIGTERM, SIGINT and SIGHUP on to every process of the run and gets SIGTERM itself when its parent
# dies (the orchestrator; under unshare, unshare, which _DIE_WITH_PARENT makes die with the
# orchestrator). When the command's own process ends, it ends the rest (SIGTERM,
# 1 s, SIGKILL) and exits as the command did: the same code, the same signal (as pid 1, which no
# signal of its own can end, 128 + the signal). Under `unshare --pid` it is pid 1, which nothing in the run can signal,
# and the command runs without capabilities or a way to gain them (root's would undo the namespaces).
_REAPER = r"""
import ctypes, os, signal, sys, time
argv, init, main = sys.argv[1:], os.getpid() == 1, 0
prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None
if prctl is not None:
    prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG

def processes():
    if init:
        return [-1]  # every process of the namespace but this one
    if not os.path.isdir("/proc"):
        return [main] if main else []
    children = {}
    for name in os.listdir("/proc"):
        try:
            with open("/proc/" + name + "/stat", "rb") as f:
                children.setdefault(int(f.read().rsplit(b")", 1)[1].split()[1]), []).append(int(name))
        except (OSError, ValueError, IndexError):
            continue
    found, stack = [], [os.getpid()]
    while stack:
        for pid in children.get(stack.pop(), ()):
            found.append(pid)
            stack.append(pid)
    return found

def send(number, frame=None):
    for pid in processes():
        try:
            os.kill(pid, number)
        except OSError:
            pass

def reap(seconds):
    deadline = time.monotonic() + seconds
    while True:
        try:
            if os.waitpid(-1, os.WNOHANG)[0] == 0:
                if time.monotonic() > deadline:
                    return False
                time.sleep(0.02)
        except ChildProcessError:
            return True

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
for number in FORWARDED:
    signal.signal(number, send)
main = os.fork()
if main == 0:
    for number in FORWARDED:
        signal.signal(number, signal.SIG_DFL)
    if init and prctl is not None:  # root in unshare's namespaces: without this, CAP_SYS_ADMIN could leave them
        for cap in range(64):
            prctl(24, cap, 0, 0, 0)  # PR_CAPBSET_DROP: the exec gets no capability
        prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS: nor any from a setuid program
    try:
        os.execvp(argv[0], argv)
    except OSError as exc:
        os.write(2, ("cannot start the command: %s: %s\n" % (argv[0], exc.strerror)).encode())
    os._exit(127)
while True:
    pid, status = os.waitpid(-1, 0)
    if pid == main:
        break
send(signal.SIGTERM)
if not reap(1.0):
    for attempt in range(100):  # again while something forks between the listing and the kill
        send(signal.SIGKILL)
        if reap(0.05):
            break
code = os.waitstatus_to_exitcode(status)
if code < 0 and not init:
    import resource
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    try:
        signal.signal(-code, signal.SIG_DFL)
    except (OSError, ValueError):
        pass
    os.kill(os.getpid(), -code)
os._exit(code if code >= 0 else 128 - code)
"""

# What each mode leaves open, for the one line `autoresearch run` says when it runs with less than bwrap.
NOTICES = {
    "unshare-net": "runs have no network and leave no process behind, but can read the validation and test "
                   "data and their sources, the ledger and your home directory (keys, .netrc, assistants' "
                   "logins), reach unix sockets on disk, and write wherever you can",
    "none": "runs can reach the network and unix sockets, read the validation and test data and their "
            "sources, the ledger, your home directory (keys, .netrc, assistants' logins) and the "
            "orchestrator's environment (/proc/<pid>/environ: its API keys), signal your processes, "
            "and write wherever you can",
}


class SandboxUnavailable(AutoresearchError):
    """sandbox = "bwrap" was asked for and bubblewrap cannot run here."""


@dataclass
class Confinement:
    """How to start one run and what is in force. Close it after the run (removes the private folders)."""

    mode: str  # in force: "bwrap", "unshare-net" or "none"
    argv: list[str]  # the command, wrapped
    env: dict[str, str] = field(default_factory=dict)  # set in the run's environment
    private: list[Path] = field(default_factory=list)  # the TMPDIR and HOME made for this run

    def close(self) -> None:
        for folder in self.private:
            shutil.rmtree(folder, ignore_errors=True)
        self.private = []


@functools.cache
def bwrap_executable() -> str | None:
    """The bwrap program when it can build our sandbox on this machine (probed once per process)."""
    path = shutil.which("bwrap")
    return path if path and sys.platform.startswith("linux") and _runs([path, *_BWRAP_BASE, "--", "true"]) else None


@functools.cache
def unshare_executable() -> str | None:
    """The unshare program when it can build the fallback here (Linux, as root; probed once per process)."""
    path = shutil.which("unshare")
    return path if path and sys.platform.startswith("linux") and _runs([path, *_UNSHARE, "--", "true"]) else None


def notice(mode: str) -> str | None:
    """One line saying what runs under `mode` ("auto", "bwrap" or "none") get less than bubblewrap,
    and why; None when bubblewrap is in force."""
    if mode != "none" and bwrap_executable() is not None:
        return None
    if mode == "bwrap":
        return f"sandbox: {UNAVAILABLE}: every run will crash"
    if mode == "none":
        return f'sandbox: none (sandbox = "none" in autoresearch.toml): {NOTICES["none"]}'
    if not sys.platform.startswith("linux"):
        why = "bubblewrap needs Linux"
    elif shutil.which("bwrap") is None:
        why = "bubblewrap not found: install the bubblewrap package"
    else:
        why = "bubblewrap cannot create its namespaces here: allow unprivileged user namespaces"
    if unshare_executable() is not None:
        return f"sandbox: unshare-net only ({why}): {NOTICES['unshare-net']}"
    return f"sandbox: none ({why}; the unshare fallback needs root): {NOTICES['none']}"


def confine(mode: str, argv: Sequence[str], cwd: Path, writable: Iterable[Path] = (),
            hidden: Iterable[Path] = (), scratch: Path | None = None, readable: Iterable[Path] = (),
            devices: Iterable[str] | None = None) -> Confinement:
    """Wrap `argv` for `mode` ("auto", "bwrap" or "none"). "bwrap" raises SandboxUnavailable when
    bubblewrap cannot run; "auto" then falls back to unshare where it works. Without bubblewrap the
    run gets a private TMPDIR and HOME in `scratch` (None: the system's temporary directory) and the
    reaper. `devices`: the GPU nodes bwrap binds (None: every one found)."""
    if mode not in MODES:
        raise ValueError(f"unknown sandbox mode {mode!r}: use one of {', '.join(MODES)}")
    bwrap = bwrap_executable() if mode != "none" else None
    if bwrap is not None:
        return Confinement("bwrap", bwrap_argv(bwrap, argv, cwd, writable, hidden, readable, devices),
                           {"TMPDIR": "/tmp", "HOME": PRIVATE_HOME})
    if mode == "bwrap":
        raise SandboxUnavailable(UNAVAILABLE)
    private = [Path(tempfile.mkdtemp(prefix=f"{name}-", dir=scratch)) for name in ("tmp", "home")]
    env = {"TMPDIR": str(private[0]), "HOME": str(private[1])}
    reaper = [sys.executable, "-I", "-c", _REAPER, *argv]
    unshare = unshare_executable() if mode == "auto" else None
    if unshare is not None:
        shim = [sys.executable, "-I", "-c", _DIE_WITH_PARENT, str(os.getpid())]
        return Confinement("unshare-net", [*shim, unshare, *_UNSHARE, "--", *reaper], env, private)
    return Confinement("none", reaper, env, private)


def host_hidden() -> list[Path]:
    """The host's places bwrap hides from every run (HOST_HIDDEN and the user's HOME), resolved; those
    missing, and those already fresh inside (/tmp, /run), left out."""
    homes = [os.path.expanduser("~")]
    try:
        homes.append(pwd.getpwuid(os.getuid()).pw_dir)
    except KeyError:
        pass
    found = []
    for path in dict.fromkeys(Path(p).resolve() for p in (*HOST_HIDDEN, *homes)):
        if len(path.parts) > 1 and path.exists() and not any(path.is_relative_to(f) for f in _FRESH):
            found.append(path)
    return found


def needed_paths() -> list[Path]:
    """What every run reads wherever it lives, even inside a hidden place: the interpreter, this
    package and the interpreter's import path (site-packages, the user's site, editable installs);
    not sys.path[0], the orchestrator's own script folder or working directory."""
    paths = [Path(sys.prefix), Path(sys.base_prefix), Path(sys.executable).resolve().parent.parent,
             Path(__file__).resolve().parent.parent, *(Path(p) for p in sys.path[1:] if p)]
    return [p for p in dict.fromkeys(p.resolve() for p in paths) if p.exists()]


def bwrap_argv(bwrap: str, argv: Sequence[str], cwd: Path, writable: Iterable[Path] = (),
               hidden: Iterable[Path] = (), readable: Iterable[Path] = (),
               devices: Iterable[str] | None = None) -> list[str]:
    """The bwrap command line running `argv` in `cwd`, with `cwd` and `writable` read-write,
    `hidden` and host_hidden() unreadable, and `readable` and needed_paths() bound back read-only
    where a mount above would hide them (the fresh /tmp or a hidden HOME hides a data cache or a
    virtualenv that lives there). Paths are resolved; missing hidden and readable paths are skipped.
    `devices` are the GPU nodes bound in (a run given one GPU gets that GPU's node and the driver's
    control nodes: see gpus.py); None binds every GPU node."""
    cwd = Path(cwd).resolve()
    line = [bwrap, *_BWRAP_BASE, "--dir", PRIVATE_HOME]
    # GPUs: --dev builds a minimal /dev without them. /proc is the sandbox's own, and the driver's
    # /proc/driver/nvidia is in it; /sys is the host's, read-only (the driver reads PCI topology there)
    nodes = devices if devices is not None else [d for pattern in _GPU_DEVICES for d in sorted(glob.glob(pattern))]
    for device in nodes:
        line += ["--dev-bind", device, device]
    # A mount hides what was beneath it, and the worktree lives inside the hidden state directory (and
    # a lab, its venv and the data cache often inside the hidden HOME), so parents go before children:
    # a hidden directory first, then the paths bound back into it (bwrap makes their mount points in
    # the tmpfs), then what is hidden inside those (a dataset's source in site-packages, the
    # validation shards in the cache). At the same depth the hiding goes last and wins.
    mounts = [(p, 1) for p in dict.fromkeys([*(Path(r).resolve() for r in readable), *needed_paths()]) if p.exists()]
    mounts += [(p, 2) for p in dict.fromkeys([cwd, *(Path(w).resolve() for w in writable)])]
    mounts += [(p, 3) for p in dict.fromkeys([*host_hidden(), *(Path(h).resolve() for h in hidden)]) if p.exists()]
    empty_dirs: list[str] = []
    for path, kind in sorted(mounts, key=lambda m: (len(m[0].parts), m[1])):
        hide = kind == 3
        if kind == 1:
            line += ["--ro-bind", str(path), str(path)]
        elif not hide:
            line += ["--bind", str(path), str(path)]
        elif path.is_dir():
            line += ["--tmpfs", str(path)]
            empty_dirs.append(str(path))
        else:
            line += ["--ro-bind", "/dev/null", str(path)]
    for directory in empty_dirs:  # after the binds inside them exist; not recursive, so those stay writable
        line += ["--remount-ro", directory]
    return [*line, "--chdir", str(cwd), "--", *argv]


def _runs(argv: list[str]) -> bool:
    try:
        return subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              timeout=_PROBE_SECONDS).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False
