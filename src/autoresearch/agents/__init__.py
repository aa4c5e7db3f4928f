"""Agents, selected by the `--agent` spec.

- `hparam` (default, no LLM): Optuna TPE over train.py's hyperparameter constants.
- `patches:DIR`: replays unified diffs in name order.
- `openai:<model>`: any OpenAI-compatible chat server (OpenAI, vLLM, Ollama, llama.cpp, LM Studio,
  OpenRouter: set base_url); `anthropic:<model>`: Anthropic's API. Their replies are saved in the
  lab's `.autoresearch/transcripts`, like the coding assistants' sessions. `reply_format`: "blocks"
  (SEARCH/REPLACE), "json" (one object of a schema the server enforces) or "auto": json for a local
  or private-network OpenAI-compatible server, blocks elsewhere (agents/structured.py).
- `claude-code`, `codex`: the coding assistants, run headless in a worktree of their own.

Options come from the `[agent]` table of autoresearch.toml; unknown keys are an error. Several
agents share a run as an `AgentPool` (agents/pool.py): `make_agents` builds one from `[[agents]]`
entries or repeated --agent specs.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .base import Agent, AgentError, Proposal, ResearchContext
from .pool import AgentPool

if TYPE_CHECKING:
    from ..config import AgentSpec

__all__ = ["Agent", "AgentError", "AgentPool", "Proposal", "ResearchContext", "make_agent", "make_agents",
           "AGENT_SPECS"]

AGENT_SPECS = ("hparam", "patches:DIR", "openai:MODEL", "anthropic:MODEL", "claude-code[:MODEL]", "codex[:MODEL]")
OPTIONS = {
    "hparam": {"file", "space", "seed", "max_changes", "startup_trials"},
    "llm": {"base_url", "api_key_env", "timeout", "max_retries", "backoff_base", "backoff_max", "prices",
            "temperature", "max_attempts", "max_chars", "max_tokens", "reply_format"},
    "cli": {"model", "timeout", "executable", "extra_args"},
}


def make_agent(spec: str, root: Path, options: dict[str, Any] | None = None, *, editable: Sequence[str] = ("train.py",),
               tag: str = "run", base_url: str | None = None, where: str = "[agent]",
               secret_env: Sequence[str] = ()) -> Agent:
    """The agent a spec names. `root` is the lab; `options` the [agent] table (`where`: the table
    they come from, for messages); `editable` the lab's globs; `secret_env` the lab's `[lab]
    secret_env`, whose variables' values are redacted from saved replies and transcripts as well."""
    options = dict(options or {})
    unknown = sorted(set(options) - set().union(*OPTIONS.values()))
    if unknown:
        raise AgentError(f"autoresearch.toml: {where} has unknown option(s) {', '.join(unknown)}",
                         f"known options: {', '.join(sorted(set().union(*OPTIONS.values())))}")
    try:
        return _build(spec, root, options, list(editable), tag, base_url, tuple(secret_env))
    except (TypeError, ValueError) as exc:
        raise AgentError(f"autoresearch.toml: bad {where} option: {exc}") from None


def make_agents(specs: Sequence[AgentSpec], root: Path, *, editable: Sequence[str] = ("train.py",),
                tag: str = "run", base_url: str | None = None, secret_env: Sequence[str] = ()) -> Agent:
    """The agent of one spec, or an AgentPool of several, each built by make_agent with its own
    options. A coding assistant after the first gets a scratch worktree of its own (`TAG-2`, ...)."""
    if not specs:
        raise AgentError("no agent given", "pass --agent, or add [[agents]] entries to autoresearch.toml")
    members: list[tuple[Agent, float]] = []
    assistants = 0
    for s in specs:
        own_tag = tag
        if s.spec.partition(":")[0] in ("claude-code", "codex"):
            assistants += 1
            own_tag = tag if assistants == 1 else f"{tag}-{assistants}"
        members.append((make_agent(s.spec, root, s.options, editable=editable, tag=own_tag, base_url=base_url,
                                   where=s.where, secret_env=secret_env), s.weight))
    return members[0][0] if len(members) == 1 else AgentPool(members)


def _build(spec: str, root: Path, options: dict[str, Any], editable: list[str], tag: str,
           base_url: str | None, secret_env: tuple[str, ...]) -> Agent:
    if spec == "hparam":
        from .hparam import HparamAgent

        return HparamAgent(file=str(options.get("file", "train.py")), space=options.get("space"),
                           seed=int(options.get("seed", 0)), max_changes=int(options.get("max_changes", 2)),
                           startup_trials=int(options.get("startup_trials", 8)))
    if spec.startswith("patches:"):
        from .patches import PatchesAgent

        directory = Path(spec[len("patches:"):]).expanduser()
        return PatchesAgent(directory if directory.is_absolute() else (Path.cwd() / directory).resolve())
    if spec.startswith(("openai:", "anthropic:")) and spec.split(":", 1)[1]:
        from ..checks import matches
        from ..lab import STATE_DIR
        from .llm import LLMAgent
        from .providers import ProviderOptions, make_provider
        from .structured import choose_reply_format

        url = base_url or options.get("base_url")
        reply_format = choose_reply_format(options.get("reply_format", "auto"), spec.partition(":")[0], url)
        prices = {str(k): (float(v[0]), float(v[1])) for k, v in dict(options.get("prices", {})).items()}
        provider = make_provider(spec, ProviderOptions(
            base_url=url, api_key_env=options.get("api_key_env"),
            timeout=float(options.get("timeout", 600)), max_retries=int(options.get("max_retries", 6)),
            backoff_base=float(options.get("backoff_base", 2.0)), backoff_max=float(options.get("backoff_max", 120.0)),
            prices=prices or None, temperature=options.get("temperature"),
        ))
        return LLMAgent(provider, editable=lambda path: matches(path, editable),
                        max_attempts=int(options.get("max_attempts", 3)), max_chars=int(options.get("max_chars", 120_000)),
                        max_tokens=int(options.get("max_tokens", 8192)), hardware=hardware(),
                        transcripts=root / STATE_DIR / "transcripts", tag=tag, secret_env=secret_env,
                        reply_format=reply_format)
    kind, _, model = spec.partition(":")
    if kind in ("claude-code", "codex"):
        from .coding_cli import CodingCLIAgent

        return CodingCLIAgent(kind, lab_root=root, tag=tag, model=model or options.get("model"),  # type: ignore[arg-type]
                              timeout=float(options.get("timeout", 900)), executable=options.get("executable"),
                              extra_args=[str(a) for a in options.get("extra_args", [])], secret_env=secret_env)
    raise AgentError(f"unknown agent {spec!r}", f"choose one of: {', '.join(AGENT_SPECS)}")


def hardware() -> str:
    """One line about the machine experiments run on, for the agent's prompt."""
    cores = os.cpu_count() or 1
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        memory = 0.0
    line = f"{cores} CPU cores, {memory:.0f} GB RAM"
    try:
        import torch

        if torch.cuda.is_available():
            line = f"GPU {torch.cuda.get_device_name(0)} ({torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GB); " + line
        elif torch.backends.mps.is_available():
            line = "Apple silicon GPU (MPS); " + line
        else:
            line = "no GPU; " + line
    except ImportError:
        pass
    return line
