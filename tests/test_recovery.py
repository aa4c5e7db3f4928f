"""What makes a second start safe: one run per tag, stale git locks cleared, only our own orphans ended."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from autoresearch.gitrepo import Git
from autoresearch.recovery import TagBusy, TagLock, clear_stale_git_locks, group_is_from


def test_one_run_per_tag(tmp_path: Path) -> None:
    path = tmp_path / "state" / "run-t1.lock"
    first, second = TagLock(path, "t1"), TagLock(path, "t1")
    first.acquire()
    with pytest.raises(TagBusy, match=f"using tag t1 \\(pid {os.getpid()}\\)"):
        second.acquire()
    TagLock(tmp_path / "state" / "run-t2.lock", "t2").acquire()  # another tag is free
    first.release()
    second.acquire()  # released: the next run gets it
    second.release()


def test_the_lock_dies_with_its_holder(tmp_path: Path) -> None:
    """kill -9 of a running orchestrator must not leave the tag blocked."""
    path = tmp_path / "run-t1.lock"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; sys.path.insert(0, sys.argv[1]);"
        "from autoresearch.recovery import TagLock; lock = TagLock(__import__('pathlib').Path(sys.argv[2]), 't1');"
        "lock.acquire();"
        "print('locked', flush=True); time.sleep(60)"), str(Path(__file__).parent.parent / "src"), str(path)],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
    with pytest.raises(TagBusy, match=f"pid {holder.pid}"):
        TagLock(path, "t1").acquire()
    holder.kill()
    holder.wait()
    lock = TagLock(path, "t1")
    lock.acquire()
    lock.release()


def test_only_the_tags_own_git_locks_are_cleared(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    common = repo / ".git"
    ours = [common / "refs" / "heads" / "autoresearch" / "t1.lock",
            common / "worktrees" / "t1" / "index.lock",
            common / "refs" / "autoresearch" / "experiments" / "7.lock"]
    theirs = [common / "index.lock", common / "refs" / "heads" / "main.lock",
              common / "refs" / "heads" / "autoresearch" / "t2.lock"]
    for lock in ours + theirs:
        lock.parent.mkdir(parents=True, exist_ok=True)
        lock.write_text("")
    clear_stale_git_locks(Git(repo), repo, "t1")
    assert not any(lock.exists() for lock in ours)
    assert all(lock.exists() for lock in theirs)  # the person's git, and another tag's run


def test_an_orphan_group_is_recognised_by_its_start_time() -> None:
    """After a reboot a recorded process-group id may belong to someone else: only a group with a
    process started after the experiment did is ours to end."""
    child = subprocess.Popen(["sleep", "30"], start_new_session=True)
    try:
        assert group_is_from(child.pid, started_at=time.time() - 5)
        assert not group_is_from(child.pid, started_at=time.time() + 3600)
        assert not group_is_from(child.pid, started_at=None)
    finally:
        child.kill()
        child.wait()
