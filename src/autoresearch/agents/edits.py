"""The reply format an LLM answers in, and its strict parsing and application.

A reply is a DESCRIPTION line, a RATIONALE, and SEARCH/REPLACE blocks, each preceded by the path of
the file it changes (see REPLY_FORMAT). Applying is all or nothing: every SEARCH must match exactly
one place of the file as left by the blocks before it, or nothing is applied and the error (block
number, path, the closest region of the file with line numbers) goes back to the model.

An empty SEARCH creates a new file; it is refused when the file already exists (with content), so an
edit can never silently overwrite or append to a file. Creating needs an `editable` predicate that
accepts the path: without one, only the files given may be changed.

A `ReplyFormat` bundles a way of writing edits: how the prompt explains it, its parser, and the words
the error messages use for its parts. `BLOCKS` is this module's; `structured.JSON` is the same edits
as one JSON object. Both parse into EditBlocks, so applying and feedback are shared.
"""

from __future__ import annotations

import posixpath
import re
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from difflib import SequenceMatcher
from typing import Any

from .base import AgentError

REPLY_FORMAT = """\
DESCRIPTION: <one line: what changed, e.g. "raise MATRIX_LR to 0.05 and add warmup">
RATIONALE: <a few sentences: what you expect and why>

{path}
<<<<<<< SEARCH
<exact lines from the current file, indentation and blank lines included>
=======
<replacement lines>
>>>>>>> REPLACE"""

FORMAT_RULES = """\
Each block starts with the file path on its own line. SEARCH must copy a contiguous run of lines \
of the current file exactly and match only one place (add neighbouring lines if needed). Use as \
many blocks as needed; they apply in order. An empty SEARCH creates a new file."""

_SEARCH = re.compile(r"^\s*<{5,9}\s*SEARCH\s*$")
_DIVIDER = re.compile(r"^\s*={5,9}\s*$")
_REPLACE = re.compile(r"^\s*>{5,9}\s*REPLACE\s*$")
_FENCE = re.compile(r"^\s*(?:`{3,}|~{3,})\s*(.*?)\s*$")
_LABEL = re.compile(r"^[\s*_`#]*(DESCRIPTION|RATIONALE)[\s*_`]*:[\s*_`]*(.*?)[\s*_`]*$", re.IGNORECASE)
_FILE_PREFIX = re.compile(r"^(?:#+\s*)?(?:[*_]*(?:file(?:name)?|path)[*_]*\s*:[*_]*\s*)?", re.IGNORECASE)
_PATHLIKE = re.compile(r"[\w.\-][\w.\-/\\]*")
_TOKEN = re.compile(r"\w+|[^\w\s]")


class FormatError(AgentError):
    """The reply cannot be parsed; the message says what is wrong and how the format must look."""


class EditMismatch(AgentError):
    """A SEARCH text does not match exactly one place of its file."""


@dataclass(frozen=True)
class EditBlock:
    path: str
    search: str
    replace: str
    index: int  # 1-based position in the reply


@dataclass(frozen=True)
class ParsedReply:
    description: str
    rationale: str
    blocks: list[EditBlock]


@dataclass(frozen=True)
class ReplyFormat:
    """One way of writing a proposal: what the prompt shows, how a reply is parsed, and what the
    messages sent back call its parts, so the feedback speaks the model's own format."""

    name: str  # "blocks" or "json", as the [agent] reply_format option spells it
    parse: Callable[[str], ParsedReply]  # strict; raises FormatError
    shape: Callable[[str], str]  # the reply's layout, for an example file path
    rules: str  # how edits must be written, after the layout
    example: Callable[[str], str]  # a whole made-up reply changing that file (it parses)
    block: str = "block"  # one edit, in messages: "block 2 (train.py): ..."
    search: str = "SEARCH"  # the part that must match the file
    resend: str = "the whole proposal (DESCRIPTION, RATIONALE and every block)"
    response_format: Mapping[str, Any] | None = None  # sent with each request where the API takes one

    def help(self, path: str = "train.py") -> str:
        """The layout and the rules, as a failed reply is reminded of them."""
        return f"The reply must look like this:\n{self.shape(path)}\n{self.rules}"


def _format_error(problem: str, fmt: ReplyFormat | None = None) -> FormatError:
    return FormatError(f"{problem}\n{(fmt or BLOCKS).help()}")


def _path_in(line: str) -> str | None:
    """The file path a header line names (`train.py`, ```python train.py, File: `train.py`), if any."""
    fence = _FENCE.match(line)
    if fence:
        words = fence.group(1).split()
        if not words or (len(words) == 1 and not re.search(r"[./\\]", words[0])):
            return None  # a bare fence or a language tag
        line = words[-1]
    text = _FILE_PREFIX.sub("", line.strip()).strip().strip("*_`'\"").rstrip(":").strip("*_`'\"")
    return text if _PATHLIKE.fullmatch(text) else None


def _block_path(lines: list[str], at: int, number: int, previous: str | None) -> tuple[str, int]:
    """The path named before the SEARCH marker at `at`, and its line; a block right after another
    reuses its path."""
    j = at - 1
    while j >= 0 and (not lines[j].strip() or (_FENCE.match(lines[j]) and _path_in(lines[j]) is None)):
        j -= 1
    if j >= 0 and _REPLACE.match(lines[j]) and previous:
        return previous, j
    path = _path_in(lines[j]) if j >= 0 else None
    if path is None:
        found = f"found {lines[j].strip()[:80]!r}" if j >= 0 else "found nothing"
        raise _format_error(f"block {number} has no file path: put the path alone on the line before "
                            f"<<<<<<< SEARCH ({found})")
    return path, j


def _block_body(lines: list[str], at: int, number: int, path: str) -> tuple[str, str, int]:
    """SEARCH and REPLACE of the block whose marker is on line `at`, and the line after its end."""
    parts: list[list[str]] = [[], []]
    j = at + 1
    for part, (closing, name) in enumerate(((_DIVIDER, "======="), (_REPLACE, ">>>>>>> REPLACE"))):
        while j < len(lines) and not (_SEARCH.match(lines[j]) or _DIVIDER.match(lines[j]) or _REPLACE.match(lines[j])):
            parts[part].append(lines[j])
            j += 1
        if j >= len(lines) or not closing.match(lines[j]):
            raise _format_error(f"block {number} ({path}) is missing its {name} line")
        j += 1
    search, replace = ("".join(line + "\n" for line in part) for part in parts)
    return search, replace, j


def parse_reply(text: str) -> ParsedReply:
    """Parse a reply strictly. Raises FormatError saying what is wrong and how the format looks."""
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    blocks: list[EditBlock] = []
    labels: dict[str, tuple[int, str]] = {}  # DESCRIPTION/RATIONALE -> (line, text after the colon)
    first_header = len(lines)  # the line of the first block's path
    i = 0
    while i < len(lines):
        if _DIVIDER.match(lines[i]) or _REPLACE.match(lines[i]):
            raise _format_error(f"block {len(blocks) + 1}: {lines[i].strip()} on line {i + 1} without a "
                                "<<<<<<< SEARCH line before it")
        label = _LABEL.match(lines[i])
        if label:
            labels.setdefault(label.group(1).upper(), (i, label.group(2).strip()))
        if not _SEARCH.match(lines[i]):
            i += 1
            continue
        number = len(blocks) + 1
        path, header = _block_path(lines, i, number, blocks[-1].path if blocks else None)
        search, replace, after = _block_body(lines, i, number, path)
        if search == replace:
            raise _format_error(f"the edit changes nothing: block {number} ({path}) has identical SEARCH and REPLACE")
        blocks.append(EditBlock(path=path, search=search, replace=replace, index=number))
        first_header, i = min(first_header, header), after
    if "DESCRIPTION" not in labels:
        raise _format_error("the reply has no DESCRIPTION line")
    description = " ".join(labels["DESCRIPTION"][1].split())
    if not description:
        raise _format_error("the DESCRIPTION line is empty: write the one-line description after 'DESCRIPTION:'")
    if not blocks:
        raise _format_error("no SEARCH/REPLACE block found: the change itself is missing")
    rationale: list[str] = []
    if "RATIONALE" in labels:
        start, first = labels["RATIONALE"]
        ends = [n for n in (first_header, labels["DESCRIPTION"][0]) if n > start]
        rationale = [first, *lines[start + 1:min(ends, default=len(lines))]]
        while len(rationale) > 1 and (not rationale[-1].strip() or _FENCE.match(rationale[-1])):
            rationale.pop()  # an opening fence before the first path
    return ParsedReply(description=description, rationale="\n".join(rationale).strip(), blocks=blocks)


# The made-up proposal every format's example shows (the prompt says its lines are made up).
EXAMPLE_DESCRIPTION = "raise the learning rate to 0.05 and add a 2% warmup"
EXAMPLE_RATIONALE = ("The loss is still falling steeply when the schedule ends, which suggests the rate is too\n"
                     "low for this budget. A short warmup should keep the first steps stable at the higher rate.")
EXAMPLE_SEARCH = ("LEARNING_RATE = 0.04  # peak learning rate\n"
                  "WARMUP_RATIO = 0.0  # fraction of the budget spent warming up\n")
EXAMPLE_REPLACE = ("LEARNING_RATE = 0.05  # peak learning rate\n"
                   "WARMUP_RATIO = 0.02  # fraction of the budget spent warming up\n")


def _blocks_example(path: str) -> str:
    return (f"DESCRIPTION: {EXAMPLE_DESCRIPTION}\nRATIONALE: {EXAMPLE_RATIONALE}\n\n{path}\n<<<<<<< SEARCH\n"
            f"{EXAMPLE_SEARCH}=======\n{EXAMPLE_REPLACE}>>>>>>> REPLACE")


BLOCKS = ReplyFormat(name="blocks", parse=parse_reply, shape=lambda path: REPLY_FORMAT.format(path=path),
                     rules=FORMAT_RULES, example=_blocks_example)


def _clean_path(path: str, index: int, fmt: ReplyFormat) -> str:
    clean = posixpath.normpath(path.replace("\\", "/"))
    if clean.startswith(("/", "../")) or clean in ("..", "."):
        raise AgentError(f"{fmt.block} {index}: the path {path!r} leaves the project; use a relative path such as "
                         "train.py")
    return clean


def _starts(text: str, search: str) -> list[int]:
    """Offsets where `search` occurs at the start of a line (overlaps included)."""
    found, pos = [], text.find(search)
    while pos != -1:
        if pos == 0 or text[pos - 1] == "\n":
            found.append(pos)
        pos = text.find(search, pos + 1)
    return found


def _overlaps(items: list[list[str]], target: list[str], size: int) -> list[float]:
    """Per window of `size` lines, SequenceMatcher.quick_ratio (an upper bound of ratio), sliding."""
    need, window = Counter(target), Counter[str]()
    common = total = 0
    scores: list[float] = []
    for end, line in enumerate(items):
        for item in line:
            common += window[item] < need[item]
            window[item] += 1
        total += len(line)
        if end >= size:
            for item in items[end - size]:
                window[item] -= 1
                common -= window[item] < need[item]
            total -= len(items[end - size])
        if end >= size - 1:
            scores.append(2.0 * common / (total + len(target)) if total + len(target) else 1.0)
    return scores


def closest_region(text: str, search: str, max_ratios: int = 12) -> tuple[int, int, float]:
    """The window of the file (first and last line, 1-based) most like `search`, whitespace ignored.

    Windows have as many lines as SEARCH; similarity is SequenceMatcher.ratio over their tokens,
    punctuation matching only next to matched words (as junk: it makes a ratio ~1 ms, not ~10).
    Ratios are computed for the windows with the best upper bounds (token and whole-line overlaps),
    best first, stopping when no bound can win: a near copy of a region costs one ratio, and at
    most `max_ratios` + 4 are computed.
    """
    have = [_TOKEN.findall(line) for line in text.splitlines()] or [[]]
    want = [_TOKEN.findall(line) for line in search.splitlines()]
    size = max(1, min(len(want), len(have)))
    target = [tok for line in want for tok in line]
    token_bound = _overlaps(have, target, size)
    line_bound = _overlaps([[" ".join(line)] for line in have], [" ".join(line) for line in want], size)
    by_tokens = sorted(range(len(token_bound)), key=lambda s: (-token_bound[s], s))
    by_lines = sorted(range(len(line_bound)), key=lambda s: (-line_bound[s], -token_bound[s], s))
    matcher = SequenceMatcher(lambda tok: not (tok[0].isalnum() or tok[0] == "_"), autojunk=False)
    matcher.set_seq2(target)
    best, tried = (-1.0, 0), set()
    for start in by_tokens[:max_ratios] + by_lines[:4]:
        if start in tried or token_bound[start] <= best[0]:
            continue
        tried.add(start)
        matcher.set_seq1([tok for line in have[start:start + size] for tok in line])
        ratio = matcher.ratio()
        if ratio > best[0] or (ratio == best[0] and start < best[1]):
            best = (ratio, start)
    return best[1] + 1, best[1] + size, max(best[0], 0.0)


def _mismatch(block: EditBlock, path: str, text: str, fmt: ReplyFormat) -> EditMismatch:
    first, last, similarity = closest_region(text, block.search)
    lines = text.splitlines()
    shown = [f"{n:>5} | {lines[n - 1]}" for n in range(first, min(last, first + 59) + 1)]
    if last > first + 59:
        shown.append(f"      ... ({last - first - 59} more lines)")
    searched = block.search.splitlines()
    note = ""
    for k, (mine, theirs) in enumerate(zip(searched, lines[first - 1:last])):
        if mine != theirs:
            note = (f"\nFirst difference: {fmt.search} line {k + 1} is {mine!r} but line {first + k} of {path} is "
                    f"{theirs!r}.")
            break
    if "".join(block.search.split()) == "".join("".join(lines[first - 1:last]).split()):
        note += "\nThe text matches when whitespace is ignored: copy the indentation and spacing exactly."
    return EditMismatch(
        f"{fmt.block} {block.index} ({path}): the {fmt.search} text was not found exactly in {path}. The closest "
        f"region is lines {first}-{last} (similarity {similarity:.2f}, whitespace ignored):\n" + "\n".join(shown) +
        note + f"\nCopy the lines to change exactly from the current {path} into {fmt.search}. No {fmt.block} was "
        "applied.")


def apply_edits(files: dict[str, str], blocks: list[EditBlock], editable: Callable[[str], bool] | None = None,
                fmt: ReplyFormat = BLOCKS) -> dict[str, str]:
    """Apply the blocks in order and return the changed files (path -> new content). All or nothing;
    the errors name the parts as `fmt` does."""
    b, search = fmt.block, fmt.search
    current: dict[str, str | None] = {}
    restore: dict[str, tuple[bool, bool]] = {}  # path -> (had CRLF, lacked the final newline)
    for block in blocks:
        path = _clean_path(block.path, block.index, fmt)
        allowed = editable(path) if editable is not None else path in files
        if not allowed:
            names = ", ".join(sorted(files)) or "none"
            raise AgentError(f"{b} {block.index}: {path} is not an editable file (editable: {names})")
        if path not in current:
            text = files.get(path)
            if text is not None:
                restore[path] = ("\r\n" in text, bool(text) and not text.endswith("\n"))
                text = text.replace("\r\n", "\n")
                text = text + "\n" if restore[path][1] else text
            current[path] = text
        text = current[path]
        if not block.search:
            if text is not None and text.strip():
                raise EditMismatch(f"{b} {block.index} ({path}): an empty {search} creates a new file, but {path} "
                                   f"exists; to change it, copy the lines to replace into {search}. No {b} was applied.")
            current[path] = block.replace
            continue
        if text is None:
            raise EditMismatch(f"{b} {block.index} ({path}): {path} does not exist; to create it, leave {search} "
                               f"empty. No {b} was applied.")
        starts = _starts(text, block.search)
        if not starts:
            raise _mismatch(block, path, text, fmt)
        if len(starts) > 1:
            where = ", ".join(str(text.count("\n", 0, s) + 1) for s in starts[:10])
            raise EditMismatch(f"{b} {block.index} ({path}): the {search} text occurs {len(starts)} times in "
                               f"{path} (at lines {where}); add neighbouring lines so that it matches one place "
                               f"only. No {b} was applied.")
        current[path] = text[:starts[0]] + block.replace + text[starts[0] + len(block.search):]
    changed: dict[str, str] = {}
    for path, text in current.items():
        assert text is not None
        crlf, no_newline = restore.get(path, (False, False))
        if no_newline and text.endswith("\n"):
            text = text[:-1]
        if crlf:
            text = text.replace("\n", "\r\n")
        if files.get(path) != text:
            changed[path] = text
    if not changed:
        raise _format_error(f"the edit changes nothing: the files after applying every {b} equal the originals", fmt)
    return changed


def describe_problem(exc: AgentError, fmt: ReplyFormat = BLOCKS, cut_at: int | None = None) -> str:
    """The message sent back to the model after a failed reply: what went wrong, and what to send.
    `cut_at`: the reply stopped at this many tokens, the most a reply may have."""
    text = str(exc)
    if not isinstance(exc, FormatError):
        text += f"\n{fmt.rules}"
    if cut_at is not None:
        text += (f"\nYour reply was cut off at {cut_at} tokens, the most a reply may have: send a shorter one "
                 "(fewer and smaller edits, a one-sentence rationale).")
    return (f"Your reply could not be applied:\n{text}\n\nReply again with {fmt.resend}, against the current "
            "files as shown before; nothing of the previous reply was kept.")
