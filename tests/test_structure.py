"""The import graph and the seams say the truth: agents need neither the ledger nor the runner, the
process-group helpers live in procgroup, every agent is an AgentBase with every member of the Agent
protocol, and the hand-off protocol's names are spelled only in handoff.py."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

from autoresearch import handoff, procgroup, runner
from autoresearch.agents import coding_cli, make_agent
from autoresearch.agents.base import Agent, AgentBase, Proposal, ResearchContext

SRC = Path(runner.__file__).resolve().parent
FORBIDDEN_IN_AGENTS = ("autoresearch.ledger", "autoresearch.runner")
GROUP_HELPERS = ("group_alive", "kill_group", "scrub_env")
PROTOCOL_FILES = ("runner.py", "measurement.py", "evaluator.py", "template/prepare.py")
MEMBERS = {"name", "slow", "can_rebase", "propose", "repair", "rebase"}


def imported_modules(path: Path, package: str) -> set[str]:
    """Every module `path` imports, relative imports resolved against `package` (its own package);
    `from X import name` counts as X and as X.name (which may be a module)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1])
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def test_agents_import_neither_the_ledger_nor_the_runner() -> None:
    files = sorted((SRC / "agents").glob("*.py"))
    assert files
    for path in files:
        bad = {m for m in imported_modules(path, "autoresearch.agents")
               if any(m == f or m.startswith(f + ".") for f in FORBIDDEN_IN_AGENTS)}
        assert not bad, f"agents/{path.name} imports {sorted(bad)}"


def test_the_import_resolver_sees_relative_and_absolute_imports(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text("from ..ledger import Experiment\nfrom .. import runner\nimport autoresearch.runner as r\n"
                      "from .base import Proposal\n")
    found = imported_modules(sample, "autoresearch.agents")
    assert {"autoresearch.ledger", "autoresearch.runner", "autoresearch.agents.base"} <= found


def test_group_helpers_come_from_procgroup() -> None:
    for name in GROUP_HELPERS:
        helper = getattr(procgroup, name)
        assert getattr(runner, name) is helper, f"runner.{name} is not procgroup's"
        assert getattr(coding_cli, name) is helper, f"coding_cli.{name} is not procgroup's"
    for path in (SRC / "runner.py", SRC / "agents" / "coding_cli.py"):
        defined = {n.name for n in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
                   if isinstance(n, ast.FunctionDef)}
        assert not defined & set(GROUP_HELPERS), f"{path.name} defines {sorted(defined & set(GROUP_HELPERS))} again"


def test_the_protocol_declares_every_member() -> None:
    declared = set(Agent.__annotations__) | {n for n in vars(Agent) if not n.startswith("_")}
    assert declared == MEMBERS


def _assistant(tmp_path: Path) -> Path:
    exe = tmp_path / "bin" / "assistant"
    exe.parent.mkdir(exist_ok=True)
    exe.write_text(f"#!{sys.executable}\nraise SystemExit(1)\n")
    exe.chmod(0o755)
    return exe


def _patches(tmp_path: Path) -> Path:
    folder = tmp_path / "patches"
    folder.mkdir(exist_ok=True)
    (folder / "001.patch").write_text("Lower the learning rate\n--- a/train.py\n+++ b/train.py\n@@ -1 +1 @@\n-LR = 0.1\n+LR = 0.05\n")
    return folder


# spec -> (options, slow, can_rebase); nothing here reaches a network
AGENTS: dict[str, tuple[dict[str, object], bool, bool]] = {
    "hparam": ({}, False, False),
    "patches": ({}, False, False),
    "openai:fake-model": ({"base_url": "http://127.0.0.1:9/v1"}, True, True),
    "anthropic:fake-model": ({"base_url": "http://127.0.0.1:9"}, True, True),
    "claude-code": ({"executable": "ASSISTANT"}, True, False),
    "codex:some-model": ({"executable": "ASSISTANT"}, True, False),
}


@pytest.mark.parametrize("spec", AGENTS)
def test_every_agent_is_an_agent_base_with_every_member(spec: str, tmp_path: Path) -> None:
    options, slow, can_rebase = AGENTS[spec]
    options = {k: str(_assistant(tmp_path)) if v == "ASSISTANT" else v for k, v in options.items()}
    built = f"patches:{_patches(tmp_path)}" if spec == "patches" else spec
    agent = make_agent(built, tmp_path, options)
    assert isinstance(agent, AgentBase)
    for member in MEMBERS:
        assert hasattr(agent, member), f"{type(agent).__name__} has no {member}"
    for method in ("propose", "repair", "rebase"):
        assert callable(getattr(agent, method))
    assert isinstance(agent.name, str) and agent.name
    assert (agent.slow, agent.can_rebase) == (slow, can_rebase)
    if not can_rebase:
        with pytest.raises(NotImplementedError):
            agent.rebase(Proposal(description="x"), {})


def test_agent_base_defaults() -> None:
    class Minimal(AgentBase):
        name = "minimal"

        def propose(self, context: ResearchContext) -> Proposal | None:
            return None

    agent = Minimal()
    assert (agent.slow, agent.can_rebase) == (False, False)
    assert agent.repair(None, None, "", 1, 1) is None  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        AgentBase()  # type: ignore[abstract]  # propose is abstract


def _code_strings(path: Path) -> list[tuple[int, str]]:
    """The string literals of a module's code (f-string parts too), docstrings left out."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    return [(node.lineno, node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings]


def test_handoff_names_are_spelled_only_in_handoff_py() -> None:
    names = [handoff.MODEL, handoff.RESULT, handoff.ERROR, "AUTORESEARCH_HANDOFF",
             *(getattr(handoff, n) for n in dir(handoff) if n.endswith("_ENV"))]
    assert "model.pt2" in names and "result.json" in names
    for relative in PROTOCOL_FILES:
        for line, text in _code_strings(SRC / relative):
            spelled = [n for n in names if n in text] + ([handoff.READY] if text == handoff.READY else [])
            assert not spelled, f"{relative}:{line} spells {spelled} (use autoresearch.handoff)"


def test_the_scan_sees_a_literal(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text('"""Writes model.pt2: a docstring may say so."""\nX = f"{1}/model.pt2"\n')
    assert [text for _, text in _code_strings(sample)] == ["/model.pt2"]
