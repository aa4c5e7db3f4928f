"""An LLM research agent: `openai:<model>` (any OpenAI-compatible server) and `anthropic:<model>`.

It reads the brief, the champion's code and the history, and replies with a description, a
rationale and its edits: SEARCH/REPLACE blocks, or one JSON object of the schema the request
carries (`reply_format`, structured.py; small local models get JSON). A reply that cannot be
parsed, a SEARCH that does not match exactly, a no-op, or a file that no longer compiles is sent
back with a precise error in the reply's own terms, up to `max_attempts` times; after that the
proposal carries the error and the loop records it as invalid.
Given a transcripts directory, every conversation (each request, the model's raw reply, what was
wrong with it) is saved there as one JSON file, `<tag>-<UTC time>Z-llm.json`, secrets redacted,
also when the provider fails midway; its path goes in the proposal's `meta["transcript"]`.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..config import SECRET_PATTERNS
from ..errors import ContextTooLong
from ..experiment import Experiment
from ..files import write_atomically
from ..procgroup import redact
from .base import AgentBase, AgentError, Proposal, ResearchContext
from .context import Prompt, RepairRequest, build_prompt
from .edits import BLOCKS, EditBlock, ReplyFormat, apply_edits, describe_problem
from .providers import Completion, Message, Provider

REPLIES_FORMAT = "autoresearch-replies/1"  # the transcript's shape, as the web dashboard reads it


@dataclass
class Usage:
    """Tokens and cost of one proposal, all attempts included."""

    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float | None = None
    requests: int = 0
    seconds: float = 0.0

    def add(self, c: Completion) -> None:
        self.input_tokens += c.input_tokens
        self.output_tokens += c.output_tokens
        self.requests += c.attempts
        self.seconds += c.seconds
        if c.cost_usd is not None:
            self.cost_usd = (self.cost_usd or 0.0) + c.cost_usd

    def as_meta(self) -> dict[str, Any]:
        return {"input_tokens": self.input_tokens, "output_tokens": self.output_tokens, "cost_usd": self.cost_usd,
                "requests": self.requests, "llm_seconds": round(self.seconds, 3)}


@dataclass
class Replies:
    """One conversation as saved: every request, the model's raw reply and why it was refused."""

    agent: str  # the provider's spec
    kind: str  # "propose" or "repair"
    repair_of: int | None = None
    started_at: float = field(default_factory=time.time)
    system: str = ""
    exchanges: list[dict[str, Any]] = field(default_factory=list)
    outcome: str = ""  # "ok", the error of a proposal with no valid edit, or "failed: <the exception>"
    reply_format: str = "blocks"  # what the model was asked to answer in: "blocks" or "json"

    def add(self, prompt: str, c: Completion) -> dict[str, Any]:
        """Record one request; the caller sets the returned exchange's `problem` when the reply is refused."""
        exchange: dict[str, Any] = {
            "request": len(self.exchanges) + 1, "prompt": prompt, "reply": c.text, "model": c.model,
            "input_tokens": c.input_tokens, "output_tokens": c.output_tokens, "seconds": round(c.seconds, 3),
            "cost_usd": c.cost_usd, "truncated": c.truncated, "problem": None}
        self.exchanges.append(exchange)
        return exchange

    def as_json(self) -> dict[str, Any]:
        return {"format": REPLIES_FORMAT, "agent": self.agent, "kind": self.kind, "repair_of": self.repair_of,
                "reply_format": self.reply_format, "started_at": self.started_at, "system": self.system,
                "exchanges": self.exchanges, "outcome": self.outcome}


class LLMAgent(AgentBase):
    """Proposes code changes with a chat model. Slow: the loop prepares proposals ahead."""

    slow = True
    can_rebase = True  # the same edits, on the new champion's files

    def __init__(self, provider: Provider, editable: Callable[[str], bool], *, max_attempts: int = 3,
                 max_chars: int = 120_000, hardware: str = "", max_tokens: int = 8192,
                 transcripts: Path | None = None, tag: str = "run", secret_env: Sequence[str] = (),
                 reply_format: ReplyFormat = BLOCKS) -> None:
        """`transcripts`: the directory every conversation is saved to (None: nowhere); `tag` starts
        the file names; `secret_env`: patterns of variables redacted from them besides SECRET_PATTERNS;
        `reply_format`: edits.BLOCKS or structured.JSON (its response_format goes with each request)."""
        if max_attempts < 1:
            raise AgentError("max_attempts must be at least 1")
        self.provider, self.editable = provider, editable
        self.name = provider.spec
        self.max_attempts, self.max_chars, self.hardware, self.max_tokens = max_attempts, max_chars, hardware, max_tokens
        self.transcripts, self.tag = transcripts, tag
        self.secrets = (*SECRET_PATTERNS, *secret_env)
        self.reply_format = reply_format

    def propose(self, context: ResearchContext) -> Proposal | None:
        return self._converse(context, None)

    def repair(self, context: ResearchContext, failed: Experiment, log_tail: str, attempt: int,
               max_attempts: int) -> Proposal | None:
        return self._converse(context, RepairRequest(failed=failed, log_tail=log_tail, attempt=attempt,
                                                     max_attempts=max_attempts))

    def rebase(self, proposal: Proposal, files: dict[str, str]) -> Proposal | None:
        """The same edits on a newer champion's files, when every SEARCH still matches."""
        return _rebase_edits(proposal, files, self.editable)

    def _prompt(self, context: ResearchContext, repair: RepairRequest | None, max_chars: int) -> Prompt:
        return build_prompt(context, max_chars=max_chars, hardware=self.hardware, repair=repair,
                            reply_format=self.reply_format)

    def _complete(self, context: ResearchContext, repair: RepairRequest | None, messages: list[Message],
                  usage: Usage, replies: Replies) -> tuple[Completion, list[Message]]:
        """One request (its system prompt noted in `replies`); a context that is too long is rebuilt
        at half the size, twice at most."""
        max_chars = self.max_chars
        for _ in range(3):
            prompt = self._prompt(context, repair, max_chars)
            convo = [Message("user", prompt.user), *messages[1:]] if messages else [Message("user", prompt.user)]
            try:
                completion = self.provider.complete(prompt.system, convo, max_tokens=self.max_tokens,
                                                    response_format=self.reply_format.response_format)
            except ContextTooLong:
                max_chars //= 2
                continue
            usage.add(completion)
            replies.system = replies.system or prompt.system
            return completion, convo
        raise AgentError(f"the prompt is too long for {self.provider.spec} even at {max_chars * 2} characters",
                         "use a model with a longer context, or lower [agent] max_chars")

    def _converse(self, context: ResearchContext, repair: RepairRequest | None) -> Proposal:
        """One proposal or repair conversation, saved whatever its end (when there is a directory)."""
        replies = Replies(agent=self.provider.spec, kind="propose" if repair is None else "repair",
                          repair_of=None if repair is None else repair.failed.id, reply_format=self.reply_format.name)
        try:
            proposal = self._attempts(context, repair, replies)
            replies.outcome = proposal.error or "ok"
        except BaseException as exc:
            lines = str(exc).strip().splitlines()
            replies.outcome = f"failed: {type(exc).__name__}" + (f": {lines[0]}" if lines else "")
            raise
        finally:
            path = None if self.transcripts is None else save_replies(replies, self.transcripts, self.tag, self.secrets)
        return proposal if path is None else replace(proposal, meta={**proposal.meta, "transcript": str(path)})

    def _attempts(self, context: ResearchContext, repair: RepairRequest | None, replies: Replies) -> Proposal:
        usage = Usage()
        messages: list[Message] = []
        problems: list[str] = []
        fmt = self.reply_format
        for attempt in range(1, self.max_attempts + 1):
            completion, messages = self._complete(context, repair, messages, usage, replies)
            exchange = replies.add(messages[-1].content, completion)  # the prompt, then each error sent back
            try:
                reply = fmt.parse(completion.text)
                changed = apply_edits(context.files, reply.blocks, self.editable, fmt)
                _check_compiles(changed, fmt)
            except AgentError as exc:
                cut_at = self.max_tokens if completion.truncated else None
                problems.append(str(exc).splitlines()[0] + (f" (cut off at {cut_at} tokens)" if cut_at else ""))
                exchange["problem"] = problems[-1]
                messages = [*messages, Message("assistant", completion.text),
                            Message("user", describe_problem(exc, fmt, cut_at))]
                continue
            meta = {**usage.as_meta(), "attempts": attempt, "format_errors": problems, "model": completion.model,
                    "edits": [{"path": b.path, "search": b.search, "replace": b.replace} for b in reply.blocks]}
            if repair is not None:
                meta["repair_of"] = repair.failed.id
            return Proposal(description=reply.description, files=changed, rationale=reply.rationale, meta=meta)
        last = problems[-1] if problems else "no reply"
        return Proposal(description=f"(no valid edit after {self.max_attempts} attempts)",
                        error=f"no valid edit after {self.max_attempts} attempts: {last}",
                        meta={**usage.as_meta(), "attempts": self.max_attempts, "format_errors": problems})


def save_replies(replies: Replies, directory: Path, tag: str, secrets: Sequence[str] = SECRET_PATTERNS) -> Path:
    """Write `replies` to `directory/<tag>-<UTC start, ms>Z-llm.json` (`...Z-2-llm.json` and on when
    taken) through a temporary file, so a reader never sees half of one; the values of the variables
    `secrets` names (fnmatch patterns) redacted."""
    directory.mkdir(parents=True, exist_ok=True)
    start = datetime.fromtimestamp(replies.started_at, timezone.utc)
    stem = f"{tag}-{start:%Y%m%dT%H%M%S}.{start.microsecond // 1000:03d}Z"
    path, n = directory / f"{stem}-llm.json", 1
    while path.exists():
        n += 1
        path = directory / f"{stem}-{n}-llm.json"
    text = json.dumps(_redacted(replies.as_json(), os.environ, secrets), ensure_ascii=False, indent=1) + "\n"
    return write_atomically(path, text, mode=None)


def _redacted(value: Any, env: Mapping[str, str], secrets: Sequence[str]) -> Any:
    """`value` (JSON data) with secrets replaced in every string, before quoting could hide them."""
    if isinstance(value, str):
        return redact(value, env, secrets)
    if isinstance(value, list):
        return [_redacted(v, env, secrets) for v in value]
    if isinstance(value, dict):
        return {k: _redacted(v, env, secrets) for k, v in value.items()}
    return value


def _rebase_edits(proposal: Proposal, files: dict[str, str], editable: Callable[[str], bool]) -> Proposal | None:
    """Re-apply a proposal's edits (as SEARCH/REPLACE blocks, whatever the reply's format) to other
    files (a newer champion)."""
    blocks = [EditBlock(path=e["path"], search=e["search"], replace=e["replace"], index=i + 1)
              for i, e in enumerate(proposal.meta.get("edits", []))]
    if not blocks:
        return None
    try:
        changed = apply_edits(files, blocks, editable)
        _check_compiles(changed)
    except AgentError:
        return None
    return Proposal(description=proposal.description, files=changed, rationale=proposal.rationale, meta=proposal.meta)


def _check_compiles(files: dict[str, str], fmt: ReplyFormat = BLOCKS) -> None:
    for path, text in files.items():
        if path.endswith(".py"):
            try:
                compile(text, path, "exec")
            except SyntaxError as exc:
                raise AgentError(f"after your edits {path} does not compile: {exc.msg} at line {exc.lineno}",
                                 f"send corrected {fmt.block}s against the original file") from None
