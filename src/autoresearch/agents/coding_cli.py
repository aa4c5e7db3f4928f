"""`claude-code` and `codex` — a coding assistant, run headless, proposes the next change.

The assistant works in a scratch worktree of its own, `.autoresearch/agent-worktrees/<tag>`, reset to
the champion before every proposal: never in the person's checkout, never in the experiment worktree
(an experiment may be running there meanwhile). It may read and edit files, nothing more: Claude Code
gets only the file tools, Codex runs in its `workspace-write` sandbox (no network), and
`AUTORESEARCH_NO_TRAIN=1` makes the frozen prepare.py refuse to train. The prompt goes on stdin; the
process runs in its own session under a wall-clock limit enforced from outside, and its whole group
is ended when it exits or times out. Every session is saved to
`.autoresearch/transcripts/<tag>-<UTC time>-<kind>.txt`, secrets redacted.

The proposal is the worktree's diff against the champion (new files included), described by the
`DESCRIPTION:` / `RATIONALE:` lines of the last message. A change to a frozen file stays in the diff:
the loop's checks mark it invalid. Errors: a missing executable or worktree is a configuration problem
(AgentError); a timeout, a non-zero exit or an error reply is transient (AgentUnavailable, or
AgentAuthFailed for a refused login): the loop pauses and asks again later.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from ..config import SECRET_PATTERNS
from ..errors import AgentAuthFailed, AgentUnavailable, GitError
from ..experiment import Experiment
from ..gitrepo import Git
from ..handoff import NO_TRAIN_ENV
from ..lab import STATE_DIR
from ..procgroup import group_alive, kill_group, redact, scrub_env  # noqa: F401 (scrub_env: test_structure)
from .base import AgentBase, AgentError, Proposal, ResearchContext

Kind = Literal["claude-code", "codex"]
HISTORY_LIMIT = 60  # the most recent experiments shown in the prompt, kept ones added
CLAUDE_TOOLS = "Read,Edit,Write,Glob,Grep"  # the only tools Claude Code gets: no shell, no web
CLAUDE_DENIED = "Bash,WebFetch,WebSearch"
_AUTH = re.compile(r"authenticat|api[ _-]?key|\b401\b|unauthori[sz]ed|not logged in|please (?:run /)?log ?in"
                   r"|/login|credentials", re.I)


@dataclass(frozen=True)
class _CLI:
    program: str  # the executable's usual name
    install: str  # what to do when it is missing
    login: str  # what to do when it is not logged in


CLIS: dict[str, _CLI] = {
    "claude-code": _CLI("claude", "install Claude Code (npm install -g @anthropic-ai/claude-code) "
                        "or use --agent openai:<model>", "run `claude` once to log in, or set ANTHROPIC_API_KEY"),
    "codex": _CLI("codex", "install the Codex CLI (npm install -g @openai/codex) or use --agent openai:<model>",
                  "run `codex login`, or set OPENAI_API_KEY"),
}


class CodingCLIAgent(AgentBase):
    """Runs Claude Code or Codex headless in a scratch worktree and returns its diff as the proposal."""

    slow = True  # minutes per proposal: the loop prepares the next one while an experiment runs

    def __init__(self, kind: Kind, lab_root: Path, tag: str, model: str | None = None, timeout: float = 900,
                 executable: str | None = None, extra_args: list[str] | None = None,
                 grace_seconds: float = 5.0, secret_env: Sequence[str] = ()) -> None:
        if kind not in CLIS:
            raise AgentError(f"unknown coding assistant {kind!r}", f"choose one of: {', '.join(CLIS)}")
        self.kind, self.cli = kind, CLIS[kind]
        self.name = f"{kind}:{model}" if model else kind
        self.lab_root, self.tag, self.model = Path(lab_root), tag, model
        self.timeout, self.grace_seconds, self.extra_args = float(timeout), grace_seconds, list(extra_args or [])
        self.executable = self._resolve(executable or self.cli.program)
        self.worktree = self.lab_root / STATE_DIR / "agent-worktrees" / tag
        self.transcripts = self.lab_root / STATE_DIR / "transcripts"
        self.secrets = (*SECRET_PATTERNS, *secret_env)  # whose values a transcript never holds

    # -- the Agent protocol ----------------------------------------------------------------------

    def propose(self, context: ResearchContext) -> Proposal | None:
        """One session from the champion; `context.extra["repair"]` asks to fix a failed idea."""
        repair = context.extra.get("repair")
        prompt = build_prompt(context, repair if isinstance(repair, dict) else None, applied=False)
        return self._session(prompt, context.champion_commit, context)

    def repair(self, context: ResearchContext, failed: Experiment, log_tail: str, attempt: int,
               max_attempts: int | None = None) -> Proposal | None:
        """Fix a crashed change in place: the worktree starts from the failed commit, and the
        proposal's `files` are the full new contents of every file that differs from it or from the champion."""
        base = failed.commit_sha if failed.commit_sha and Git(self.lab_root).resolve(failed.commit_sha) else None
        info = {"failed_description": failed.description, "reason": failed.reason or failed.status,
                "log_tail": log_tail, "diff": failed.patch or "",
                "attempt": f"{attempt} of {max_attempts}" if max_attempts else str(attempt)}
        prompt = build_prompt(context, info, applied=base is not None)
        return self._session(prompt, base or context.champion_commit, context, repair_of=failed)

    # -- one session -----------------------------------------------------------------------------

    def _resolve(self, program: str) -> str:
        found = shutil.which(program)
        if found is None:
            raise AgentError(f"{program} is not installed or not on PATH", self.cli.install)
        return found

    def _checkout(self, commit: str) -> Git:
        """The scratch worktree, (re)created when missing or broken, reset to `commit`."""
        wt = Git(self.worktree)
        try:
            if not (self.worktree / ".git").exists() or not wt.is_root():
                if self.worktree.exists():
                    shutil.rmtree(self.worktree)
                self.worktree.parent.mkdir(parents=True, exist_ok=True)
                Git(self.lab_root).add_worktree(self.worktree, commit)
            wt.reset_to(commit)
        except GitError as exc:
            raise AgentError(f"cannot prepare the assistant's worktree {self.worktree}: {exc}") from None
        return wt

    def command(self, last_message: Path) -> list[str]:
        """The argv; the prompt itself is sent on stdin."""
        if self.kind == "claude-code":
            argv = [self.executable, "-p", "--output-format", "json", "--permission-mode", "acceptEdits",
                    "--tools", CLAUDE_TOOLS, "--allowedTools", CLAUDE_TOOLS, "--disallowedTools", CLAUDE_DENIED]
        else:
            argv = [self.executable, "exec", "--sandbox", "workspace-write", "--skip-git-repo-check", "--json",
                    "--cd", str(self.worktree), "--output-last-message", str(last_message)]
        argv += ["--model", self.model] if self.model else []
        return argv + self.extra_args + (["-"] if self.kind == "codex" else [])

    def _session(self, prompt: str, base: str, context: ResearchContext,
                 repair_of: Experiment | None = None) -> Proposal:
        if not Path(self.executable).is_file():
            self.executable = self._resolve(self.cli.program)
        wt = self._checkout(base)
        self.transcripts.mkdir(parents=True, exist_ok=True)
        now = datetime.now(timezone.utc)  # milliseconds: two sessions never share a name
        transcript = self.transcripts / f"{self.tag}-{now:%Y%m%dT%H%M%S}.{now.microsecond // 1000:03d}Z-{self.kind}.txt"
        env = {**os.environ, NO_TRAIN_ENV: "1"}
        with tempfile.TemporaryDirectory(prefix="autoresearch-assistant-") as scratch:
            tmp = Path(scratch)
            (tmp / "prompt.txt").write_text(prompt, encoding="utf-8")
            argv = self.command(tmp / "last-message.txt")
            code: int | None = None
            seconds, timed_out = 0.0, False
            try:
                code, seconds, timed_out = self._run(argv, tmp, env)
            finally:
                out, err = (_read(tmp / name) for name in ("stdout.txt", "stderr.txt"))
                last = _read(tmp / "last-message.txt")
                _save_transcript(transcript, argv, self.worktree, prompt, out, err, last, code, seconds, timed_out, env,
                                 self.secrets)
        where = f"transcript: {transcript}"
        if timed_out:
            raise AgentUnavailable(f"{self.cli.program} did not finish within {self.timeout:g} s; {where}")
        message, error, meta = (_parse_claude if self.kind == "claude-code" else _parse_codex)(out, last)
        if code != 0 or error:
            notices = meta.get("errors") or [""]
            lines = [line.strip() for line in (error or notices[-1] or err or out).splitlines() if line.strip()]
            why = lines[-1][:300] if lines else f"exit code {code}"
            if _AUTH.search("\n".join([error or "", *notices, *err.splitlines()[-20:]])):
                raise AgentAuthFailed(f"{self.cli.program} could not authenticate: {why}", f"{self.cli.login}; {where}")
            raise AgentUnavailable(f"{self.cli.program} failed (exit code {code}): {why}", where)
        description, rationale = parse_message(message)
        patch = wt.diff_head()
        changed = wt.run("diff", "--cached", "--name-only", "HEAD").splitlines()
        meta.update({"transcript": str(transcript), "assistant": self.kind, "seconds": round(seconds, 3),
                     "exit_code": code, "changed": changed})
        if isinstance(meta.get("usage"), dict):
            meta.update({k: v for k, v in meta["usage"].items() if k in ("input_tokens", "output_tokens")})
        outside = [p for p in changed if p not in context.files]
        if outside:
            meta["outside_editable"] = outside  # the loop's checks decide; noted here for the reader
        if repair_of is not None:
            meta["repair_of"] = repair_of.id
        if not patch.strip():
            return Proposal(description=f"({self.cli.program} made no change) {description}"[:200],
                            rationale=rationale, meta=meta)
        if repair_of is None:
            return Proposal(description=description, patch=patch, rationale=rationale, meta=meta)
        return Proposal(description=description, files=self._repaired_files(wt, base, context.champion_commit),
                        rationale=rationale, meta=meta)

    def _repaired_files(self, wt: Git, base: str, champion: str) -> dict[str, str]:
        """Full contents of every file that differs from the failed commit or from the champion, so
        writing them gives the same tree whichever of the two the loop starts from."""
        paths = set(wt.run("diff", "--cached", "--name-only", base).splitlines())
        paths |= set(wt.run("diff", "--cached", "--name-only", champion).splitlines())
        return {p: (self.worktree / p).read_text(encoding="utf-8", errors="replace")
                for p in sorted(paths) if (self.worktree / p).is_file()}

    def _run(self, argv: list[str], tmp: Path, env: Mapping[str, str]) -> tuple[int | None, float, bool]:
        """Run to the end or to the timeout; the process group is ended either way."""
        with open(tmp / "prompt.txt", "rb") as stdin, open(tmp / "stdout.txt", "wb") as out, \
                open(tmp / "stderr.txt", "wb") as err:
            start = time.monotonic()
            try:
                proc = subprocess.Popen(argv, cwd=self.worktree, env=dict(env), stdin=stdin, stdout=out, stderr=err,
                                        start_new_session=True)
            except OSError as exc:
                raise AgentError(f"cannot start {argv[0]}: {exc.strerror or exc}", self.cli.install) from None
            timed_out = False
            try:
                proc.wait(timeout=self.timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                if proc.poll() is None or group_alive(proc.pid):
                    kill_group(proc.pid, self.grace_seconds)  # children it left behind go too
                proc.wait()
            return (None if timed_out else proc.returncode), time.monotonic() - start, timed_out


# -- the prompt ----------------------------------------------------------------------------------


def build_prompt(context: ResearchContext, repair: Mapping[str, Any] | None, applied: bool) -> str:
    """What the assistant reads: its role, the rules, the brief, the history, the answer format.
    `applied`: the failed change is already in the working directory (a repair in place)."""
    editable = sorted(context.files)
    better = "lower" if context.direction == "min" else "higher"
    score = "not measured yet" if context.champion_metric is None else f"{context.champion_metric:.6g}"
    parts = [
        "You are the researcher of an autoresearch lab. Propose ONE change to the code for the next "
        "experiment, by editing files in the current directory (a scratch copy of the current best "
        "version, the champion). Our program then applies your change, runs it, measures it and decides "
        "whether to keep it: you only edit.",
        f"Editable files: {', '.join(editable) or '(none)'}. Change only these; any other file must stay "
        "exactly as it is (a change to a frozen file such as prepare.py voids the experiment).",
        "Do NOT run training, the experiment, or any long command: the loop runs it on the measured "
        "device with a fixed budget. Do not commit; leave your edits in the working tree.",
        f"Metric: {context.metric_name}, {better} is better. Champion {context.champion_commit[:12]} scores "
        f"{score}. Each experiment trains for a budget of {context.budget:g} s of wall-clock time.",
        "The research brief (program.md):\n<program>\n" + context.program.strip() + "\n</program>",
        "Experiments so far (id, status, metric, delta vs champion of the time, description):\n"
        + (format_history(context.history) or "(none yet: this is the first proposal)"),
    ]
    if repair:
        where = ("The failed change is already applied in this directory: fix it there."
                 if applied else "The working directory holds the champion: implement the idea again, fixed.")
        parts.append(
            f"REPAIR (attempt {repair.get('attempt', 1)}): the change \"{repair.get('failed_description', '')}\" "
            f"failed: {repair.get('reason', '')}. Fix that idea; do not switch to another one. {where}\n"
            f"End of its log:\n<log>\n{str(repair.get('log_tail', ''))[-4000:]}\n</log>\n"
            f"Its diff against the champion:\n<diff>\n{str(repair.get('diff', ''))[:12000]}\n</diff>")
    parts.append("When you are done, end your final message with exactly these two lines:\n"
                 "DESCRIPTION: <one line: what you changed; it becomes the commit message>\n"
                 "RATIONALE: <short: why you expect it to improve the metric>")
    return "\n\n".join(parts) + "\n"


def format_history(history: list[Experiment], limit: int = HISTORY_LIMIT) -> str:
    """One line per experiment: the last `limit` ones plus every kept one, oldest first."""
    recent = {e.id for e in history[-limit:]}
    lines = []
    for e in history:
        if e.id not in recent and e.status != "keep":
            continue
        metric = "-" if e.metric is None else f"{e.metric:.6g}"
        delta = "" if e.metric is None or e.champion_metric is None else f" ({e.metric - e.champion_metric:+.4g})"
        text = " ".join((e.description or "").split())[:120]
        lines.append(f"#{e.id} {e.status} {metric}{delta} {text}".rstrip())
    return "\n".join(lines)


# -- reading the answer --------------------------------------------------------------------------


_DESCRIPTION = re.compile(r"^[\s*_`>#-]*DESCRIPTION[\s*_`]*:[\s*_`]*(.+?)[\s*_`]*$", re.I | re.M)
_RATIONALE = re.compile(r"^[\s*_`>#-]*RATIONALE[\s*_`]*:[\s*_`]*", re.I | re.M)


def parse_message(message: str) -> tuple[str, str]:
    """(description, rationale) from the last DESCRIPTION:/RATIONALE: lines; without them the first
    non-empty line (at most 120 characters) and the rest."""
    found = list(_DESCRIPTION.finditer(message))
    if found:
        description = found[-1].group(1).strip()[:200]
        reason = list(_RATIONALE.finditer(message, found[-1].end()))
        rationale = message[reason[-1].end():].strip() if reason else ""
        return description, rationale[:2000]
    lines = [line.strip() for line in message.strip().splitlines()]
    if not lines or not lines[0]:
        return "(no description given)", ""
    return lines[0][:120], "\n".join(lines[1:]).strip()[:2000]


def _parse_claude(out: str, last: str) -> tuple[str, str | None, dict[str, Any]]:
    """(final message, error or None, meta) from `--output-format json`: one object with `result`."""
    data: Any = None
    for chunk in [out, *reversed(out.strip().splitlines())]:
        try:
            data = json.loads(chunk)
            break
        except ValueError:
            continue
    if isinstance(data, list):  # --verbose prints every message: the result is the last one
        data = next((d for d in reversed(data) if isinstance(d, dict) and d.get("type") == "result"), None)
    if not isinstance(data, dict):
        return out, None, {}
    meta = {k: data[k] for k in ("session_id", "num_turns", "usage") if k in data}
    if isinstance(data.get("total_cost_usd"), (int, float)):
        meta["cost_usd"] = data["total_cost_usd"]  # the key the LLM agents use
    text = str(data.get("result") or "")
    failed = bool(data.get("is_error")) or str(data.get("subtype", "success")) != "success"
    return text, (text or str(data.get("subtype"))) if failed else None, meta


def _parse_codex(out: str, last: str) -> tuple[str, str | None, dict[str, Any]]:
    """(final message, error or None, meta) from `exec --json` events and the last-message file."""
    message: str = last.strip()
    error: str | None = None
    meta: dict[str, Any] = {}
    from_file = bool(message)  # the -o file is authoritative; the events are the fallback
    for line in out.splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if not isinstance(event, dict):
            continue
        kind, item = event.get("type"), event.get("item") or {}
        if kind == "item.completed" and isinstance(item, dict) and item.get("type") == "agent_message" and not from_file:
            message = str(item.get("text", ""))
        elif kind == "turn.completed" and isinstance(event.get("usage"), dict):
            meta["usage"] = event["usage"]
        elif kind == "thread.started":
            meta["session_id"] = event.get("thread_id")
        elif kind == "turn.failed":
            error = str((event.get("error") or {}).get("message") or "the turn failed")
        elif kind == "error":  # may be a notice it recovers from (a reconnect): reported only on failure
            meta.setdefault("errors", []).append(str(event.get("message", "")))
    return message, error, meta


# -- the transcript ------------------------------------------------------------------------------


def _save_transcript(path: Path, argv: list[str], cwd: Path, prompt: str, out: str, err: str, last: str,
                     code: int | None, seconds: float, timed_out: bool, env: Mapping[str, str],
                     secrets: Sequence[str]) -> None:
    status = "timed out" if timed_out else f"exit code {code}"
    sections = [f"command: {shlex.join(argv)}  (prompt on stdin)", f"cwd: {cwd}", f"{status} after {seconds:.1f} s",
                f"=== prompt ===\n{prompt}", f"=== stdout ===\n{out}", f"=== stderr ===\n{err}"]
    if last:
        sections.append(f"=== last message ===\n{last}")
    path.write_text(redact("\n".join(sections) + "\n", env, secrets), encoding="utf-8")


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace") if path.is_file() else ""
