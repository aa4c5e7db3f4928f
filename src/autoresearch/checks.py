"""Checks a change must pass before any compute is spent on it.

A change fails when it is empty, touches a file outside the editable set, alters a frozen file,
leaves a Python file that does not compile, or repeats a change already tried on the same parent.
"""

from __future__ import annotations

import fnmatch
import hashlib
from collections.abc import Iterable
from pathlib import Path

from .gitrepo import Git


def matches(path: str, globs: Iterable[str]) -> bool:
    return any(fnmatch.fnmatch(path, g) or path == g for g in globs)


def frozen_hashes(git: Git, commit: str, globs: Iterable[str]) -> dict[str, str]:
    """sha256 of every file of `commit` that a frozen glob matches."""
    globs = list(globs)
    out: dict[str, str] = {}
    for path in git.ls_files(commit):
        if matches(path, globs):
            data = git.show(commit, path) or b""
            out[path] = hashlib.sha256(data).hexdigest()
    return out


def patch_hash(patch: str) -> str:
    """Identity of a change: its diff without the index lines (which carry blob ids only)."""
    lines = [line for line in patch.splitlines() if not line.startswith("index ")]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def check_change(worktree: Path, changed: list[str], editable: Iterable[str], frozen: dict[str, str],
                 tried: set[str], patch: str) -> str | None:
    """None when the change may run, else the reason it is invalid (one line)."""
    editable = list(editable)
    if not changed or not patch.strip():
        return "empty change: nothing differs from the champion"
    outside = [p for p in changed if not matches(p, editable)]
    if outside:
        return f"changes files outside the editable set: {', '.join(outside[:5])}"
    for path, digest in frozen.items():
        file = worktree / path
        if not file.is_file() or hashlib.sha256(file.read_bytes()).hexdigest() != digest:
            return f"frozen file {path} was changed"
    for path in changed:
        file = worktree / path
        if path.endswith(".py") and file.is_file():
            source = file.read_text(encoding="utf-8", errors="replace")
            try:
                compile(source, path, "exec")
            except SyntaxError as exc:
                return f"{path} does not compile: {exc.msg} (line {exc.lineno})"
            except ValueError as exc:  # e.g. null bytes
                return f"{path} does not compile: {exc}"
    if patch_hash(patch) in tried:
        return "identical to a change already tried on this champion"
    return None


def lines_changed(patch: str) -> int:
    """Added plus removed lines of a unified diff: the simplicity criterion, made measurable."""
    return sum(1 for line in patch.splitlines()
               if (line.startswith("+") and not line.startswith("+++"))
               or (line.startswith("-") and not line.startswith("---")))


def net_lines(patch: str) -> int:
    """Added minus removed lines: negative when a change makes the code shorter."""
    added = sum(1 for line in patch.splitlines() if line.startswith("+") and not line.startswith("+++"))
    removed = sum(1 for line in patch.splitlines() if line.startswith("-") and not line.startswith("---"))
    return added - removed
