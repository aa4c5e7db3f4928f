"""A thin wrapper over the git command line. Real git, no library: every user has it.

Git must never act on anything a run could have written. A run may write its worktree, and a
worktree's `.git` is a file that points git at the lab's repository: replaced by a directory of the
run's making (hooks, `core.fsmonitor`, alternates, ...), the loop's next git command there would run
the run's code outside the sandbox, as the user. So a worktree's Git names its git directory and work
tree explicitly (`--git-dir`, `--work-tree`: git then never reads the worktree's `.git`), every call
disables hooks and the file-system monitor, and `restore_gitfile` puts back the `.git` file a run
replaced (the sandbox also binds it read-only).
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

from .errors import GitError

# On every call: no hooks (the loop's commits, checkouts and resets run no code of anyone's) and no
# file-system monitor (core.fsmonitor names a program git would start)
SAFE_CONFIG = ("-c", "core.hooksPath=/dev/null", "-c", "core.fsmonitor=false")
# Used only when the user has no identity configured, so `init` works on a fresh machine.
FALLBACK_IDENTITY = {"GIT_AUTHOR_NAME": "autoresearch", "GIT_AUTHOR_EMAIL": "autoresearch@localhost",
                     "GIT_COMMITTER_NAME": "autoresearch", "GIT_COMMITTER_EMAIL": "autoresearch@localhost"}


class Git:
    """Git commands run in one repository; with `git_dir`, in a worktree of it whose `.git` is never read."""

    def __init__(self, root: Path, git_dir: Path | None = None) -> None:
        self.root = root
        self.git_dir = git_dir

    def argv(self, *args: str) -> list[str]:
        """The command line of `git args...` for this repository."""
        where = [f"--git-dir={self.git_dir}", f"--work-tree={self.root}"] if self.git_dir is not None else []
        return ["git", *where, *SAFE_CONFIG, *args]

    def run(self, *args: str, check: bool = True, env: dict[str, str] | None = None) -> str:
        """Run `git args...` in the repository and return its stdout, stripped."""
        if shutil.which("git") is None:
            raise GitError("git is not installed", "install git (e.g. `apt-get install git`) and try again")
        full_env = {**os.environ, **(env or {})}
        proc = subprocess.run(self.argv(*args), cwd=self.root, capture_output=True, text=True, env=full_env)
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

    # -- what the loop needs ------------------------------------------------------------------

    def head(self) -> str:
        return self.run("rev-parse", "HEAD")

    def resolve(self, ref: str) -> str | None:
        """The commit a ref points at, or None when it does not exist."""
        out = self.run("rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}", check=False)
        return out or None

    def update_ref(self, ref: str, commit: str, old: str | None = None) -> None:
        """Point `ref` at `commit`; with `old`, only if it still points there (compare and swap)."""
        args = ["update-ref", ref, commit]
        if old is not None:
            args.append(old)
        self.run(*args)

    def current_branch(self) -> str | None:
        out = self.run("symbolic-ref", "--quiet", "HEAD", check=False)
        return out or None

    def show(self, commit: str, path: str) -> bytes | None:
        """A file's bytes at a commit, or None when the file is not there."""
        proc = subprocess.run(self.argv("show", f"{commit}:{path}"), cwd=self.root, capture_output=True)
        return proc.stdout if proc.returncode == 0 else None

    def ls_files(self, commit: str) -> list[str]:
        out = self.run("ls-tree", "-r", "--name-only", commit)
        return out.splitlines() if out else []

    def add_worktree(self, path: Path, commit: str) -> None:
        self.run("worktree", "prune")
        self.run("worktree", "add", "--detach", "--force", str(path), commit)

    def worktree(self, path: Path) -> Git:
        """The Git of this repository's worktree at `path`, with its git directory found from the
        repository's side (`<common dir>/worktrees/*/gitdir` names each worktree's `.git`), never from
        the worktree's own `.git`. GitError when `path` is not a worktree of this repository."""
        common = Path(self.run("rev-parse", "--git-common-dir"))
        common = (self.root / common if not common.is_absolute() else common).resolve()
        wanted = (Path(path) / ".git").resolve()
        for admin in sorted((common / "worktrees").glob("*")):
            try:
                target = Path((admin / "gitdir").read_text(encoding="utf-8").strip())
            except OSError:
                continue
            if target.resolve() == wanted:
                return Git(Path(path), admin)
        raise GitError(f"{path} is not a worktree of {self.root}", "run again: the worktree is made anew")

    def restore_gitfile(self) -> str | None:
        """Make this worktree's `.git` the file git wrote (`gitdir: <git dir>`) again. Returns what was
        there instead (a directory, a link, other text), or None when it was intact."""
        assert self.git_dir is not None, "restore_gitfile is for a worktree's Git"
        gitfile = self.root / ".git"
        expected = f"gitdir: {self.git_dir}\n"
        found: str | None
        try:
            info = gitfile.lstat()
        except FileNotFoundError:
            found = "nothing"
        else:
            if stat.S_ISLNK(info.st_mode):
                found = "a symbolic link"
            elif stat.S_ISDIR(info.st_mode):
                found = "a directory"
            elif not stat.S_ISREG(info.st_mode):
                found = "a special file"
            else:
                text = gitfile.read_bytes()[:4096].decode("utf-8", "replace").strip()
                named = text.removeprefix("gitdir:").strip() if text.startswith("gitdir:") else None
                # git may write the path relative to the worktree (worktree.useRelativePaths)
                intact = named is not None and (self.root / named).resolve() == Path(self.git_dir).resolve()
                found = None if intact else "a file with other contents"
        if found is None:
            return None
        if found == "a directory":
            shutil.rmtree(gitfile)
        elif found != "nothing":
            gitfile.unlink()
        gitfile.write_text(expected, encoding="utf-8")
        return found

    def reset_to(self, commit: str) -> None:
        """Make this (worktree) checkout exactly `commit`: tracked files restored, untracked removed."""
        self.run("checkout", "-q", "--detach", "--force", commit)
        self.run("reset", "-q", "--hard", commit)
        self.run("clean", "-q", "-ffdx")  # -ff: nested repositories a run left behind go too

    def changed_paths(self) -> list[str]:
        """Paths that differ from HEAD in the working tree: modified, added, deleted, untracked."""
        out = self.run_raw("status", "--porcelain", "-z", "--untracked-files=all")  # unstripped: " M path"
        paths: list[str] = []
        entries = out.split("\0")
        i = 0
        while i < len(entries):
            entry = entries[i]
            i += 1
            if not entry:
                continue
            code, path = entry[:2], entry[3:]
            paths.append(path)
            if "R" in code or "C" in code:  # a rename is followed by its source path
                paths.append(entries[i])
                i += 1
        return sorted(set(paths))

    def diff_head(self) -> str:
        """The working tree's changes against HEAD as a unified diff, new files included."""
        self.run("add", "-A")
        return self.run_raw("diff", "--cached", "--binary", "HEAD")

    def run_raw(self, *args: str) -> str:
        """Like run(), but the output is not stripped (diffs must end with their newline)."""
        proc = subprocess.run(self.argv(*args), cwd=self.root, capture_output=True, text=True)
        if proc.returncode != 0:
            raise GitError(f"git {' '.join(args)} failed: {proc.stderr.strip()}")
        return proc.stdout

    def apply(self, patch: str, three_way: bool = False) -> str | None:
        """Apply a unified diff to the working tree; the error text when it does not apply.
        With `three_way`, a patch whose context moved is merged using the blobs it names."""
        args = self.argv("apply", "--whitespace=nowarn", *(["--3way"] if three_way else []), "-")
        proc = subprocess.run(args, cwd=self.root, input=patch, capture_output=True, text=True)
        return None if proc.returncode == 0 else (proc.stderr.strip() or "git apply failed")

    def commit_staged(self, message: str) -> str:
        """Commit what is staged (even nothing) and return the commit's hash."""
        self.run("commit", "-q", "--no-verify", "--allow-empty", "-m", message, env=self._identity_env())
        return self.head()
