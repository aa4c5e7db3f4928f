"""Agents, selected by the `--agent` spec: `hparam` (default, no LLM) and `patches:DIR`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .base import Agent, AgentError, Proposal, ResearchContext

__all__ = ["Agent", "AgentError", "Proposal", "ResearchContext", "make_agent", "AGENT_SPECS"]

AGENT_SPECS = ("hparam", "patches:DIR")


def make_agent(spec: str, root: Path, options: dict[str, Any] | None = None) -> Agent:
    """The agent a spec names. `root` resolves relative paths; `options` come from [agent] in the toml."""
    options = options or {}
    if spec == "hparam":
        from .hparam import HparamAgent

        known = {"file", "space", "seed", "max_changes", "startup_trials", "name"}
        unknown = sorted(set(options) - known)
        if unknown:
            raise AgentError(f"autoresearch.toml: [agent] has unknown option(s) {', '.join(unknown)}",
                             f"the hparam agent knows: {', '.join(sorted(known - {'name'}))}")
        try:
            return HparamAgent(file=str(options.get("file", "train.py")), space=options.get("space"),
                               seed=int(options.get("seed", 0)), max_changes=int(options.get("max_changes", 2)),
                               startup_trials=int(options.get("startup_trials", 8)))
        except (TypeError, ValueError) as exc:
            raise AgentError(f"autoresearch.toml: bad [agent] option: {exc}") from None
    if spec.startswith("patches:"):
        from .patches import PatchesAgent

        directory = Path(spec[len("patches:"):]).expanduser()
        return PatchesAgent(directory if directory.is_absolute() else (Path.cwd() / directory).resolve())
    raise AgentError(f"unknown agent {spec!r}", f"choose one of: {', '.join(AGENT_SPECS)}")
