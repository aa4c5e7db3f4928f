"""`patches:DIR` — replay patch files in name order. For tests, and for re-testing ideas.

Each file is a unified diff (as `git diff` or `git format-patch` writes it); its first line is the
description. The agent stops when every file has been tried.
"""

from __future__ import annotations

from pathlib import Path

from .base import AgentBase, AgentError, Proposal, ResearchContext

SUFFIXES = (".patch", ".diff")


class PatchesAgent(AgentBase):
    """Proposes the patch files of a directory, one per experiment, in name order."""

    def __init__(self, directory: Path) -> None:
        if not directory.is_dir():
            raise AgentError(f"patches directory {directory} does not exist", "pass patches:DIR with a directory of .patch files")
        self.directory = directory
        self.name = f"patches:{directory}"
        self.files = sorted(p for p in directory.iterdir() if p.suffix in SUFFIXES and p.is_file())
        if not self.files:
            raise AgentError(f"no .patch or .diff files in {directory}")

    def propose(self, context: ResearchContext) -> Proposal | None:
        tried = {e.meta.get("patch_file") for e in context.history if e.kind == "experiment"}
        for path in self.files:
            if path.name in tried:
                continue
            text = path.read_text(encoding="utf-8")
            first = next((line.strip() for line in text.splitlines() if line.strip()), path.stem)
            if first.startswith("Subject:"):
                first = first[len("Subject:"):].strip()
            return Proposal(description=first[:200], patch=text, rationale=f"replayed from {path.name}",
                            meta={"patch_file": path.name})
        return None
