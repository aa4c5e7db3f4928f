"""A run that plants its own git repository where its worktree's `.git` file was, so that the loop's
next git command there would run the run's hooks and file-system monitor outside the sandbox, as the
user. Git must never read anything a run could have written."""

from __future__ import annotations

import difflib
import os
import subprocess
from pathlib import Path

import pytest

from autoresearch.gitrepo import Git
from autoresearch.ledger import Ledger
from conftest import run_cli
from test_adversarial import prepend_main

IDENTITY = ["-c", "user.name=t", "-c", "user.email=t@t"]


def plant_repository(worktree: Path, lab: Path, marker: Path) -> None:
    """What the attack does: .git becomes a repository borrowing the lab's objects, with a
    post-checkout hook and a core.fsmonitor program that both write `marker`."""
    (worktree / ".git").unlink()
    subprocess.run(["git", "init", "-q", "--bare", str(worktree / ".git")], check=True)
    gitdir = worktree / ".git"
    (gitdir / "objects" / "info" / "alternates").write_text(f"{lab / '.git' / 'objects'}\n")
    hook = gitdir / "hooks" / "post-checkout"
    hook.write_text(f"#!/bin/sh\necho hook >> {marker}\n")
    hook.chmod(0o755)
    for key, value in (("core.bare", "false"), ("core.fsmonitor", f"echo fsmonitor >> {marker}; false")):
        subprocess.run(["git", f"--git-dir={gitdir}", "config", key, value], check=True)


@pytest.fixture
def repo(tmp_path: Path) -> tuple[Path, Path, str]:
    lab = tmp_path / "lab"
    lab.mkdir()
    subprocess.run(["git", "init", "-q", "-b", "main"], cwd=lab, check=True)
    (lab / "train.py").write_text("x = 1\n")
    subprocess.run(["git", "add", "-A"], cwd=lab, check=True)
    subprocess.run(["git", *IDENTITY, "commit", "-qm", "start"], cwd=lab, check=True)
    commit = Git(lab).head()
    worktree = lab / ".autoresearch" / "worktrees" / "t"
    Git(lab).add_worktree(worktree, commit)
    return lab, worktree, commit


def test_the_planted_repository_is_a_real_escape_for_plain_git(repo: tuple[Path, Path, str], tmp_path: Path) -> None:
    lab, worktree, commit = repo
    marker = tmp_path / "escaped"
    plant_repository(worktree, lab, marker)
    subprocess.run(["git", "checkout", "-q", "--detach", "--force", commit], cwd=worktree, check=True)
    assert "hook" in marker.read_text()  # what the loop's git calls did before


def test_the_loops_git_never_reads_a_planted_repository(repo: tuple[Path, Path, str], tmp_path: Path) -> None:
    lab, worktree, commit = repo
    wt = Git(lab).worktree(worktree)
    assert wt.restore_gitfile() is None  # intact
    marker = tmp_path / "escaped"
    plant_repository(worktree, lab, marker)
    assert Git(lab).worktree(worktree).git_dir == wt.git_dir  # found from the lab's side, not from .git
    wt.reset_to(commit)
    (worktree / "train.py").write_text("x = 2\n")
    assert wt.changed_paths() == ["train.py"]
    assert "+x = 2" in wt.diff_head()
    new = wt.commit_staged("x = 2")
    assert Git(lab).resolve(new) == new  # the commit went into the lab's repository
    assert not marker.exists()
    assert wt.restore_gitfile() == "a directory"
    assert (worktree / ".git").is_file() and wt.restore_gitfile() is None
    assert subprocess.run(["git", "status", "--porcelain"], cwd=worktree, capture_output=True, text=True,
                          check=True).stdout == ""  # plain git works in the restored worktree again
    assert not marker.exists()


@pytest.mark.parametrize("replacement", ["link", "text"])
def test_other_replacements_are_restored(repo: tuple[Path, Path, str], tmp_path: Path, replacement: str) -> None:
    lab, worktree, _ = repo
    wt = Git(lab).worktree(worktree)
    (worktree / ".git").unlink()
    if replacement == "link":
        (worktree / ".git").symlink_to(tmp_path)
    else:
        (worktree / ".git").write_text(f"gitdir: {tmp_path}\n")
    assert wt.restore_gitfile() == ("a symbolic link" if replacement == "link" else "a file with other contents")
    assert wt.restore_gitfile() is None


ATTACK = '''    import pathlib, subprocess
    wt = pathlib.Path.cwd()
    try:
        (wt / ".git").unlink()
        subprocess.run(["git", "init", "-q", "--bare", str(wt / ".git")], check=True)
        (wt / ".git" / "objects" / "info" / "alternates").write_text(str(wt.parents[2] / ".git" / "objects"))
        hook = wt / ".git" / "hooks" / "post-checkout"
        hook.write_text("#!/bin/sh\\necho hook >> MARKER\\n")
        hook.chmod(0o755)
        subprocess.run(["git", "--git-dir", str(wt / ".git"), "config", "core.bare", "false"], check=True)
        subprocess.run(["git", "--git-dir", str(wt / ".git"), "config", "core.fsmonitor", "echo fs >> MARKER; false"])
        print("planted")
    except (OSError, subprocess.SubprocessError) as exc:
        print(f"blocked: {type(exc).__name__}")
'''


@pytest.mark.slow
@pytest.mark.parametrize("sandbox", ["none", "auto"])
def test_a_run_that_replaces_its_gitfile_escapes_nothing(tmp_path: Path, shared_cache: Path, sandbox: str,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a sandbox the run plants the repository and is `invalid`; with bubblewrap `.git` is
    read-only and the run cannot plant it. Either way no hook runs and the next experiment is normal."""
    monkeypatch.setenv("AUTORESEARCH_CACHE", str(shared_cache))
    marker = tmp_path / "escaped"
    assert run_cli("init", "lab", "--preset", "tiny", "--budget", "2", cwd=tmp_path).returncode == 0
    lab = tmp_path / "lab"
    toml = lab / "autoresearch.toml"
    toml.write_text(toml.read_text().replace('mode = "noise"', 'mode = "strict"')
                    .replace('sandbox = "auto"', f'sandbox = "{sandbox}"'))
    subprocess.run(["git", *IDENTITY, "commit", "-qam", "strict"], cwd=lab, check=True)
    assert run_cli("prepare", cwd=lab).returncode == 0
    train = (lab / "train.py").read_text()
    attack = prepend_main(train, ATTACK.replace("MARKER", str(marker)))
    honest = train.replace("WARMDOWN_RATIO = 0.5 ", "WARMDOWN_RATIO = 0.6 ")
    patches = tmp_path / "patches"
    patches.mkdir()
    for i, (name, new) in enumerate((("plant a repository as .git", attack), ("warmdown 0.6", honest))):
        body = "".join(difflib.unified_diff(train.splitlines(True), new.splitlines(True), "a/train.py", "b/train.py"))
        (patches / f"{i:02d}.patch").write_text(f"{name}\n\n{body}")
    proc = run_cli("run", "--agent", f"patches:{patches}", "--plain", "--tag", "git", cwd=lab)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with Ledger(lab / ".autoresearch" / "ledger.db") as ledger:
        rows = ledger.experiments("git")
    base, planted, after = rows
    log = Path(planted.log_path).read_text()
    if planted.sandbox == "bwrap":
        assert "blocked: " in log and "planted" not in log
        assert planted.status in ("keep", "discard")  # it trained honestly once the attack failed
    else:
        assert "planted" in log
        assert planted.status == "invalid" and "replaced the worktree's .git" in (planted.reason or "")
    assert not marker.exists()
    assert after.status in ("keep", "discard") and after.metric is not None  # the next one ran normally
    worktree = lab / ".autoresearch" / "worktrees" / "git"
    assert (worktree / ".git").is_file()
    assert os.path.samefile(Git(lab).worktree(worktree).git_dir or "", lab / ".git" / "worktrees" / "git")
