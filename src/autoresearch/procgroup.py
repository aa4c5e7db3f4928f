"""Child processes in a session of their own: what they inherit, and how their whole group is ended.

The runner (an experiment) and the coding-assistant agents (a headless `claude` or `codex`) both start
a child with `start_new_session=True`, so the child leads a process group that nothing else is in,
and end it with `kill_group`: SIGTERM to the group, a grace period, then SIGKILL, so the children
it left behind go too. Neither passes the child a secret (`scrub_env`), and no transcript of an agent
keeps one (`redact`). POSIX only (Linux, macOS).
"""

from __future__ import annotations

import fnmatch
import os
import signal as signals
import time
from collections.abc import Callable, Iterable, Mapping

import psutil  # type: ignore[import-untyped]


def scrub_env(env: Mapping[str, str], patterns: Iterable[str]) -> dict[str, str]:
    """A copy of `env` without the variables whose name matches a pattern (fnmatch, any case)."""
    upper = [p.upper() for p in patterns]
    return {k: v for k, v in env.items() if not any(fnmatch.fnmatchcase(k.upper(), p) for p in upper)}


def redact(text: str, env: Mapping[str, str], patterns: Iterable[str]) -> str:
    """`text` with the value of every variable `scrub_env` would drop replaced by `<NAME>`; values
    under 8 characters are left, they would match ordinary words. Longest first: a key that
    contains another is replaced whole; one value in two variables gets the first name."""
    secrets = sorted(set(env) - set(scrub_env(env, patterns)), key=lambda name: (-len(env[name]), name))
    for name in secrets:
        if len(env[name]) >= 8:
            text = text.replace(env[name], f"<{name}>")
    return text


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
            if os.getpgid(proc.pid) == pgid and is_live(proc):
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
        signal_group(pgid, sig)
        wait_until(lambda: not group_alive(pgid), wait)


def signal_group(pgid: int, sig: int) -> None:
    """Send `sig` to a process group; one that is gone (or not ours) is left alone."""
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def wait_until(done: Callable[[], bool], timeout: float) -> bool:
    """Poll `done` every 50 ms for up to `timeout` seconds; its last answer."""
    deadline = time.monotonic() + timeout
    while not (finished := done()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return finished


def is_live(proc: psutil.Process) -> bool:
    """True while the process runs (a zombie has exited: it only waits for its parent)."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
