"""Confine one experiment: what the code under study can read, write and reach while it runs.

With bubblewrap (Linux, `bwrap`) every run sees the whole file system read-only; its worktree and the
paths it is given read-write; the hidden paths empty (a directory becomes an empty read-only tmpfs, a
file reads as /dev/null); a fresh /tmp and /run; no network, not even 127.0.0.1; its own process,
IPC and terminal-session namespaces. Ending bwrap ends everything inside (--die-with-parent: the
sandbox's pid 1 gets SIGKILL, and the kernel then kills every process in its pid namespace).

Without a usable bwrap (not installed, no user namespaces, macOS) the fallback is best effort and the
mode says so: the secrets scrub the runner always does, a private TMPDIR, and on Linux where `unshare
--net` works (root) a network namespace with no interfaces up ("unshare-net"), else nothing ("none").
Hidden and read-only paths are then NOT enforced.
"""

from __future__ import annotations

import functools
import glob
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
               "--unshare-net", "--unshare-pid", "--unshare-ipc", "--die-with-parent", "--new-session")
# Device nodes a GPU run needs and that --dev leaves out (NVIDIA, then DRM and AMD's ROCm).
_GPU_DEVICES = ("/dev/nvidia*", "/dev/dri", "/dev/kfd")
_PROBE_SECONDS = 10.0


class SandboxUnavailable(AutoresearchError):
    """sandbox = "bwrap" was asked for and bubblewrap cannot run here."""


@dataclass
class Confinement:
    """How to start one run and what is in force. Close it after the run (removes the private TMPDIR)."""

    mode: str  # in force: "bwrap", "unshare-net" or "none"
    argv: list[str]  # the command, wrapped
    env: dict[str, str] = field(default_factory=dict)  # set in the run's environment
    tmpdir: Path | None = None  # a private TMPDIR made for this run

    def close(self) -> None:
        if self.tmpdir is not None:
            shutil.rmtree(self.tmpdir, ignore_errors=True)
            self.tmpdir = None


@functools.cache
def bwrap_executable() -> str | None:
    """The bwrap program when it can build our sandbox on this machine (probed once per process)."""
    path = shutil.which("bwrap")
    return path if path and sys.platform.startswith("linux") and _runs([path, *_BWRAP_BASE, "--", "true"]) else None


@functools.cache
def unshare_executable() -> str | None:
    """The unshare program when `unshare --net` works here (Linux, as root; probed once per process)."""
    path = shutil.which("unshare")
    return path if path and sys.platform.startswith("linux") and _runs([path, "--net", "--", "true"]) else None


def confine(mode: str, argv: Sequence[str], cwd: Path, writable: Iterable[Path] = (),
            hidden: Iterable[Path] = (), scratch: Path | None = None, readable: Iterable[Path] = (),
            devices: Iterable[str] | None = None) -> Confinement:
    """Wrap `argv` for `mode` ("auto", "bwrap" or "none"). "bwrap" raises SandboxUnavailable when
    bubblewrap cannot run; "auto" then falls back, making a private TMPDIR in `scratch` (None: the
    system's temporary directory); "none" changes nothing. `devices`: the GPU nodes bwrap binds
    (None: every one found)."""
    if mode not in MODES:
        raise ValueError(f"unknown sandbox mode {mode!r}: use one of {', '.join(MODES)}")
    if mode == "none":
        return Confinement("none", list(argv))
    bwrap = bwrap_executable()
    if bwrap is not None:
        return Confinement("bwrap", bwrap_argv(bwrap, argv, cwd, writable, hidden, readable, devices),
                           {"TMPDIR": "/tmp"})
    if mode == "bwrap":
        raise SandboxUnavailable(UNAVAILABLE)
    tmpdir = Path(tempfile.mkdtemp(prefix="tmp-", dir=scratch))
    unshare = unshare_executable()
    if unshare is not None:
        return Confinement("unshare-net", [unshare, "--net", "--", *argv], {"TMPDIR": str(tmpdir)}, tmpdir)
    return Confinement("none", list(argv), {"TMPDIR": str(tmpdir)}, tmpdir)


def bwrap_argv(bwrap: str, argv: Sequence[str], cwd: Path, writable: Iterable[Path] = (),
               hidden: Iterable[Path] = (), readable: Iterable[Path] = (),
               devices: Iterable[str] | None = None) -> list[str]:
    """The bwrap command line running `argv` in `cwd`, with `cwd` and `writable` read-write,
    `hidden` unreadable, and `readable` bound back read-only where a mount above would hide it (the
    fresh /tmp hides a data cache or a virtualenv that lives there). Paths are resolved; missing
    hidden and readable paths are skipped. `devices` are the GPU nodes bound in (a run given one GPU
    gets that GPU's node and the driver's control nodes: see gpus.py); None binds every GPU node."""
    cwd = Path(cwd).resolve()
    line = [bwrap, *_BWRAP_BASE]
    # GPUs: --dev builds a minimal /dev without them. /proc is the sandbox's own, and the driver's
    # /proc/driver/nvidia is in it; /sys is the host's, read-only (the driver reads PCI topology there)
    nodes = devices if devices is not None else [d for pattern in _GPU_DEVICES for d in sorted(glob.glob(pattern))]
    for device in nodes:
        line += ["--dev-bind", device, device]
    # A mount hides what was beneath it, and the worktree lives inside the hidden state directory, so
    # parents go before children: a hidden directory first, then the writable paths bound back into it
    # (bwrap makes their mount points in the tmpfs). At the same depth the hiding goes last and wins.
    # The interpreter and this package stay readable even when they live under /tmp, which becomes a
    # fresh tmpfs inside (a virtualenv or a checkout there would vanish otherwise).
    needed = (Path(sys.prefix), Path(sys.base_prefix), Path(sys.executable).resolve().parent.parent,
              Path(__file__).resolve().parent.parent)
    mounts = [(p, 1) for p in dict.fromkeys(Path(r).resolve() for r in (*readable, *needed)) if p.exists()]
    mounts += [(p, 2) for p in dict.fromkeys([cwd, *(Path(w).resolve() for w in writable)])]
    mounts += [(p, 3) for p in dict.fromkeys(Path(h).resolve() for h in hidden) if p.exists()]
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
