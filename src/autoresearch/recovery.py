"""What makes `autoresearch run` safe to start again after any interruption, kill -9 included:
one orchestrator per tag, stale git locks removed, runs a dead orchestrator left behind ended."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TextIO

from .errors import AutoresearchError
from .gitrepo import Git


class TagBusy(AutoresearchError):
    """Another `autoresearch run` holds the tag."""


class TagLock:
    """An exclusive lock on one tag, held for the life of a run. The kernel drops it when its
    holder dies, even by kill -9, so a crashed run never blocks the next one."""

    def __init__(self, path: Path, tag: str) -> None:
        self.path, self.tag = path, tag
        self._file: TextIO | None = None

    def acquire(self) -> None:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "?"
            f.close()
            raise TagBusy(f"another `autoresearch run` is using tag {self.tag} (pid {holder})",
                          "wait for it, stop it, or choose another --tag") from None
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        self._file = f

    def release(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def clear_stale_git_locks(git: Git, root: Path, tag: str) -> None:
    """A kill -9 in the middle of a git command leaves its lock file behind. Only locks of the refs
    and worktree of `tag` are removed; the tag's lock guarantees nobody else is using them."""
    common = Path(git.run("rev-parse", "--git-common-dir"))
    common = common if common.is_absolute() else (root / common)
    candidates = [common / "refs" / "heads" / "autoresearch" / f"{tag}.lock",
                  common / "worktrees" / tag / "index.lock", common / "worktrees" / tag / "HEAD.lock"]
    for worker in (common / "worktrees").glob(f"{tag}~w*"):  # the other workers' (Lab.worktree)
        candidates += [worker / "index.lock", worker / "HEAD.lock"]
    candidates += list((common / "refs" / "autoresearch" / "experiments").glob("*.lock"))
    for lock in candidates:
        lock.unlink(missing_ok=True)


def group_is_from(pgid: int, started_at: float | None) -> bool:
    """True when a process of group `pgid` started no earlier than the experiment did: after a reboot
    the number may belong to an unrelated group, which must not be killed."""
    import psutil

    if started_at is None:
        return False
    for proc in psutil.process_iter(["pid", "create_time"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.info["create_time"] >= started_at - 2:
                return True
        except (ProcessLookupError, psutil.Error):
            continue
    return False
