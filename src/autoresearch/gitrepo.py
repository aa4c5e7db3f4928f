"""A thin wrapper over the git command line. Real git, no library: every user has it."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from .errors import GitError

# Used only when the user has no identity configured, so `init` works on a fresh machine.
FALLBACK_IDENTITY = {"GIT_AUTHOR_NAME": "autoresearch", "GIT_AUTHOR_EMAIL": "autoresearch@localhost",
                     "GIT_COMMITTER_NAME": "autoresearch", "GIT_COMMITTER_EMAIL": "autoresearch@localhost"}


class Git:
    """Git commands run in one repository."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def run(self, *args: str, check: bool = True, env: dict[str, str] | None = None) -> str:
        """Run `git args...` in the repository and return its stdout, stripped."""
        if shutil.which("git") is None:
            raise GitError("git is not installed", "install git (e.g. `apt-get install git`) and try again")
        full_env = {**os.environ, **(env or {})}
        proc = subprocess.run(["git", *args], cwd=self.root, capture_output=True, text=True, env=full_env)
        if check and proc.returncode != 0:
            detail = (proc.stderr or proc.stdout).strip().splitlines()
            raise GitError(f"git {' '.join(args)} failed: {detail[-1] if detail else proc.returncode}")
        return proc.stdout.strip()

    def is_repo(self) -> bool:
        return self.run("rev-parse", "--is-inside-work-tree", check=False) == "true"

    def is_root(self) -> bool:
        """True when the directory is the top of its own repository (not inside another one)."""
        top = self.run("rev-parse", "--show-toplevel", check=False)
        return bool(top) and Path(top).resolve() == self.root.resolve()

    def init(self) -> None:
        self.run("init", "-q", "-b", "main")

    def _identity_env(self) -> dict[str, str]:
        has_name = bool(self.run("config", "user.name", check=False))
        has_email = bool(self.run("config", "user.email", check=False))
        return {} if has_name and has_email else FALLBACK_IDENTITY

    def commit_all(self, message: str) -> str:
        """Stage everything (respecting .gitignore), commit, and return the new commit's hash."""
        self.run("add", "-A")
        self.run("commit", "-q", "--no-verify", "-m", message, env=self._identity_env())
        return self.run("rev-parse", "HEAD")

    def is_clean(self) -> bool:
        return self.run("status", "--porcelain") == ""
