"""What an LLM sees: a system prompt (role, rules, reply format) and a user prompt (the brief, the
code, the history), within a size budget, the same text for the same input. The reply format is
SEARCH/REPLACE blocks (edits.BLOCKS) or one JSON object (structured.JSON).

The brief, the code and a repair request are never cut. When the whole is over `max_chars`, the
rest shrinks in this order: the near-miss diffs go (least close first), then the diffs of kept
changes (oldest first), then the history table keeps only its most recent rows and every kept one,
the older rows summarised one line per status. Rows are whole or absent, never cut. When the fixed
parts alone are over the budget the prompt is returned anyway, for the provider to refuse.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import PurePosixPath

from ..experiment import Experiment
from .base import ResearchContext
from .edits import BLOCKS, ReplyFormat

NEAR_MISSES = 5  # at most this many near misses, from the best 20% of discards
DIFF_CHARS = 6_000  # one diff in the history is cut after this many characters
DESCRIPTION_CHARS = 160  # a table row's description
AGENT_CHARS = 40  # a table row's agent (who proposed it)
LOG_LINES, LOG_CHARS = 60, 6_000  # the end of a failed run's log
LANGUAGES = {".py": "python", ".md": "markdown", ".toml": "toml", ".json": "json", ".sh": "bash",
             ".yaml": "yaml", ".yml": "yaml", ".c": "c", ".cpp": "cpp", ".cu": "cuda", ".rs": "rust"}
GROUP_ORDER = ("keep", "discard", "crash", "timeout", "invalid", "killed", "running", "pending")


@dataclass(frozen=True)
class Prompt:
    system: str
    user: str

    def __len__(self) -> int:
        return len(self.system) + len(self.user)


@dataclass(frozen=True)
class RepairRequest:
    """Ask for a fix of one failed idea (not a new idea)."""

    failed: Experiment
    log_tail: str
    attempt: int
    max_attempts: int
    files_have_change: bool = True  # the context's files are the failed commit's (as the loop passes them)


def _delta(e: Experiment) -> float | None:
    return None if e.metric is None or e.champion_metric is None else e.metric - e.champion_metric


def _gain(e: Experiment, direction: str) -> float:
    """How much better than its champion (positive = better); -inf when unmeasured."""
    delta = _delta(e)
    return -math.inf if delta is None else (-delta if direction == "min" else delta)


def _line(text: str | None, limit: int) -> str:
    text = " ".join((text or "").split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _fenced(text: str, language: str = "") -> str:
    """`text` in a code fence longer than any run of backticks inside it."""
    ticks = "`" * max(3, max(map(len, re.findall(r"`+", text)), default=0) + 1)
    body = text if text.endswith("\n") or not text else text + "\n"
    return f"{ticks}{language}\n{body}{ticks}"


def _cut(text: str, limit: int, keep_end: bool = False) -> str:
    """At most `limit` characters, cut at a line boundary, saying how much was left out."""
    if len(text) <= limit:
        return text
    lines = text.splitlines()
    kept: list[str] = []
    size = 0
    for line in reversed(lines) if keep_end else lines:
        if size + len(line) + 1 > limit:
            break
        kept.append(line)
        size += len(line) + 1
    note = f"[... {len(lines) - len(kept)} more lines left out]"
    return "\n".join([note, *reversed(kept)] if keep_end else [*kept, note])


def _agent(e: Experiment) -> str:
    """Who proposed e, as one short line (several agents may share a run)."""
    return _line(e.agent, AGENT_CHARS) or "-"


def _row(e: Experiment) -> str:
    delta = _delta(e)
    status = e.status if e.kind == "experiment" else f"{e.status} ({e.kind})"
    description = _line(e.description, DESCRIPTION_CHARS).replace("|", "\\|")  # a pipe would end the cell
    agent = _agent(e).replace("|", "\\|")
    return (f"| {e.id} | {agent} | {status} | {'-' if e.metric is None else f'{e.metric:.6f}'} | "
            f"{'-' if delta is None else f'{delta:+.6f}'} | {'-' if e.lines_changed is None else e.lines_changed} | "
            f"{description} |")


def history_table(history: list[Experiment], max_rows: int | None, direction: str = "min") -> str:
    """The history as a Markdown table, oldest first. With `max_rows`, only the most recent rows and
    every kept row are listed; the older rest is summarised, one line per status."""
    if not history:
        return "No experiments yet."
    recent = len(history) if max_rows is None else max(0, min(max_rows, len(history)))
    older = history[:len(history) - recent]
    listed = [e for e in older if e.status == "keep"] + history[len(history) - recent:]
    out: list[str] = []
    summarised = [e for e in older if e.status != "keep"]
    if summarised:
        out.append(f"Experiments {older[0].id}-{older[-1].id}, summarised by status (every kept one is in the table):")
        order = {status: rank for rank, status in enumerate(GROUP_ORDER)}
        for status in sorted({e.status for e in summarised}, key=lambda s: (order.get(s, len(order)), s)):
            group = [e for e in summarised if e.status == status]
            best = max(group, key=lambda e: (_gain(e, direction), -e.id))
            detail = (f" (best #{best.id} by {_agent(best)}: {best.metric:.6f}, delta {_delta(best):+.6f}, "
                      f"{_line(best.description, 80)})"
                      if best.metric is not None and _delta(best) is not None else "")
            out.append(f"- {len(group)} {status}{detail}")
        out.append("")
    out += ["| id | agent | status | metric | delta | lines | description |", "|---|---|---|---|---|---|---|"]
    out += [_row(e) for e in listed]
    return "\n".join(out)


def _diff_entry(e: Experiment, metric_name: str) -> str:
    delta = _delta(e)
    score = "" if e.metric is None else f"{metric_name} {e.metric:.6f}" + (
        "" if delta is None else f", delta {delta:+.6f}") + ", "
    return (f"### #{e.id}: {_line(e.description, 200)} ({score}by {_agent(e)})\n"
            f"{_fenced(_cut(e.patch or '', DIFF_CHARS), 'diff')}")


def _system(context: ResearchContext, fmt: ReplyFormat) -> str:
    paths = sorted(context.files)
    better = "lower" if context.direction == "min" else "higher"
    example_path = paths[0] if paths else "train.py"
    return f"""\
You are the researcher of an automated research lab. Each time you are asked, you propose ONE change
to the code under study: one idea, as small as the idea allows. You do not run anything. Our program
applies your change as a git commit, runs it for a fixed budget of {context.budget:g} seconds (wall clock,
measured from outside: startup and compilation count), measures {context.metric_name} ({better} is better)
with evaluation code your change cannot touch, and keeps the change only when the gain is larger than
run-to-run noise; otherwise it returns to the best version so far (the champion).

Rules:
- Edit only the editable files: {", ".join(paths) or "(none)"}. Every other file is fixed.
- No new dependencies: use only what the code already imports and the Python standard library.
- Do not touch the evaluation, the validation data, the time budget, or how the metric is computed or
  reported. Attempts are detected and void the experiment.
- Your {fmt.block}s apply to the code exactly as shown in the prompt. Do not repeat an experiment from the
  history unless you change what made it fail.
- Simplicity wins ties: the same result with less code is better.

Reply in exactly this format:

{fmt.shape(example_path)}

{fmt.rules}

For example (the lines here are made up; copy yours from the real file):

{fmt.example(example_path)}
"""


def _repair_section(context: ResearchContext, repair: RepairRequest, fmt: ReplyFormat) -> str:
    e = repair.failed
    tail = "\n".join(repair.log_tail.rstrip("\n").splitlines()[-LOG_LINES:])
    where = ("The code shown above is this failed version (the champion with the change applied): edit it."
             if repair.files_have_change else
             f"The code shown above is the champion's, WITHOUT the change: your {fmt.block}s must make the whole "
             "change, fixed.")
    return "\n".join([
        f"# Repair: experiment #{e.id} failed ({e.status}), attempt {repair.attempt} of {repair.max_attempts}",
        "",
        "Fix THAT idea so that it runs to the end. Do not propose a different idea.",
        f"- Description: {_line(e.description, 300)}",
        f"- Rationale: {_line(e.rationale, 1000) or '-'}",
        f"- What went wrong: {_line(e.reason, 1000) or e.status}",
        "",
        "Its diff against the champion:",
        _fenced(_cut(e.patch or "(no diff recorded)", 4 * DIFF_CHARS), "diff"),
        "",
        "The last lines of its log:",
        _fenced(_cut(tail, LOG_CHARS, keep_end=True) or "(empty log)"),
        "",
        where + " Reply in the usual format; keep the description close to the original and say in the "
        "rationale what you fixed.",
    ])


def build_prompt(context: ResearchContext, *, max_chars: int = 120_000, hardware: str = "",
                 repair: RepairRequest | None = None, reply_format: ReplyFormat = BLOCKS) -> Prompt:
    """The prompt for the next proposal (or, with `repair`, for the fix of a failed one), asking for
    a reply in `reply_format`."""
    system = _system(context, reply_format)
    better = "lower" if context.direction == "min" else "higher"
    champion = "not measured yet" if context.champion_metric is None else f"{context.champion_metric:.6f}"
    if repair is not None and repair.files_have_change:
        code_title = f"# The code of the failed experiment #{repair.failed.id}"
    else:
        code_title = f"# The champion's code (commit {context.champion_commit[:7]})"
    code = [code_title] + [f"## {path}\n{_fenced(context.files[path], LANGUAGES.get(PurePosixPath(path).suffix, ''))}"
                           for path in sorted(context.files)]
    head = "\n\n".join([
        f"# Research brief (program.md)\n\n{context.program.strip()}",
        "# Setup\n"
        f"- Hardware: {hardware.strip() or 'not stated'}\n"
        f"- Budget: {context.budget:g} seconds per experiment, wall clock\n"
        f"- Metric: {context.metric_name}, {better} is better; the champion's is {champion}\n"
        f"- Editable files: {', '.join(sorted(context.files)) or '(none)'}",
        "\n\n".join(code),
    ])
    history = list(context.history)
    note = (f"{len(history)} experiments so far. delta = metric minus the champion's metric when the experiment "
            f"was judged ({'negative' if context.direction == 'min' else 'positive'} is better).")
    if len({e.agent for e in history if e.kind == "experiment"}) > 1:
        note += " Several agents share this run: `agent` says who proposed each experiment."
    last = context.last_failure
    if last is not None and repair is None:
        note += f"\nThe latest experiment, #{last.id}, failed ({last.status}): {_line(last.reason, 500) or '-'}"
    if repair is not None:
        tail = _repair_section(context, repair, reply_format)
    else:
        tail = ("# Your task\n\nPropose the next experiment: one change to the champion's code that you expect "
                f"to improve {context.metric_name}. Reply in the format given in the system prompt.")
    kept = [e for e in reversed(history) if e.status == "keep" and e.kind == "experiment" and e.patch]
    discards = sorted((e for e in history if e.status == "discard" and e.kind == "experiment" and e.patch
                       and _delta(e) is not None), key=lambda e: (-_gain(e, context.direction), -e.id))
    near = discards[:min(NEAR_MISSES, math.ceil(0.2 * len(discards)))]

    kept_diffs = [_diff_entry(e, context.metric_name) for e in kept]
    near_diffs = [_diff_entry(e, context.metric_name) for e in near]
    tables: dict[int | None, str] = {}

    def assemble(rows: int | None, n_kept: int, n_near: int) -> str:
        if rows not in tables:
            tables[rows] = history_table(history, rows, context.direction)
        parts = [head, f"# History\n\n{note}\n\n{tables[rows]}"]
        if n_kept:
            parts.append("## Kept changes, most recent first\n\n" + "\n\n".join(kept_diffs[:n_kept]))
        if n_near:
            parts.append("## Near misses: discarded, but close\n\n" + "\n\n".join(near_diffs[:n_near]))
        return "\n\n".join([*parts, tail]) + "\n"

    def fits(user: str) -> bool:
        return len(system) + len(user) <= max_chars

    user = assemble(None, len(kept), len(near))
    for n_near in range(len(near) - 1, -1, -1):
        if fits(user):
            break
        user = assemble(None, len(kept), n_near)
    for n_kept in range(len(kept) - 1, -1, -1):
        if fits(user):
            break
        user = assemble(None, n_kept, 0)
    if not fits(user):
        low, high = 0, len(history)  # the most recent rows listed: the largest count that fits
        while low < high:
            middle = (low + high + 1) // 2
            low, high = (middle, high) if fits(assemble(middle, 0, 0)) else (low, middle - 1)
        user = assemble(low, 0, 0)
    return Prompt(system=system, user=user)
