"""Moving a proposal into the experiment worktree: applying it, preparing the next one in a thread
while the current run goes, and carrying a prepared one over to a champion that changed meanwhile."""

from __future__ import annotations

import os
import threading
import time
from dataclasses import replace
from pathlib import Path

from .agents.base import Agent, Proposal, ResearchContext
from .gitrepo import Git


def apply_proposal(wt: Git, root: Path, proposal: Proposal) -> str | None:
    """Put the proposal into the worktree at `root`; the reason when it cannot be applied."""
    if proposal.patch is not None:
        error = wt.apply(proposal.patch)
        if error and wt.apply(proposal.patch, three_way=True) is None:
            return None  # written against an older champion, merged cleanly onto this one
        return f"patch does not apply: {error.splitlines()[0]}" if error else None
    root = root.resolve()
    for path, content in proposal.files.items():
        target = (root / path).resolve()
        if root not in target.parents:
            return f"path {path} is outside the lab"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(content, encoding="utf-8")
    return None


def merge_onto(wt: Git, root: Path, proposal: Proposal, old: str, new: str) -> Proposal | None:
    """The proposal written against commit `old`, moved onto `new` by a three-way merge of its diff;
    None when it no longer fits. Leaves the worktree at `new`."""
    wt.reset_to(old)
    if apply_proposal(wt, root, proposal) is not None:
        wt.reset_to(new)
        return None
    patch = wt.diff_head()
    wt.reset_to(new)
    merged = bool(patch.strip()) and wt.apply(patch, three_way=True) is None
    changed = wt.changed_paths() if merged else []
    files = {p: (root / p).read_text(encoding="utf-8") for p in changed if (root / p).is_file()}
    deleted = [p for p in changed if not (root / p).exists()]
    wt.reset_to(new)
    if not merged or not files or deleted:
        return None
    return replace(proposal, files=files, patch=None)


class Prefetch:
    """A proposal being prepared in a thread, against the champion of `context`."""

    def __init__(self, agent: Agent, context: ResearchContext) -> None:
        self.agent, self.context = agent, context
        self.proposal: Proposal | None = None
        self.error: BaseException | None = None
        self.seconds = 0.0
        self.thread = threading.Thread(target=self._work, name="autoresearch-prefetch", daemon=True)
        self.thread.start()

    def _work(self) -> None:
        t0 = time.monotonic()
        try:
            self.proposal = self.agent.propose(self.context)
        except BaseException as exc:  # handed to the loop's thread, which decides
            self.error = exc
        self.seconds = time.monotonic() - t0


def log_tail(path: str | None, lines: int = 80) -> str:
    """The last `lines` lines of a run's log (at most its last 16 KB), for an agent asked to repair it."""
    if not path:
        return ""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 16384))
            text = f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def commit_message(proposal: Proposal) -> str:
    body = f"\n\n{proposal.rationale}" if proposal.rationale else ""
    return f"{proposal.description}{body}"
