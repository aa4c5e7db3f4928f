"""Untrusted text made safe to show: what a run or an agent wrote (descriptions, crash reasons, log
lines) reaches the person's terminal and report through here.

A description such as "\\x1b]8;;https://evil\\x1b\\\\click\\x1b]8;;\\x1b\\\\" or "\\x1b[2J\\x1b[H" would
otherwise rewrite the terminal (clear it, move the cursor, retitle the window, forge earlier lines),
and "[/]" or "[link=...]" would be read as rich markup (a crash, or a forged style). `clean` removes
escape sequences, control characters and the Unicode controls that reorder text; the views pass the
result to rich as plain Text, never as markup.
"""

from __future__ import annotations

import re

# ESC-introduced sequences: CSI (ESC [ ... final), OSC / DCS / SOS / PM / APC strings up to BEL or ST
# (or the line's end: a stray `ESC ]` in a log must not hide the lines after it),
# and two-character escapes; then the 8-bit forms of CSI (0x9b) and the string introducers
_ESCAPES = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]"
                      r"|\x1b[\]PX^_][^\n]*?(?:\x07|\x1b\\|(?=\n)|$)"
                      r"|\x1b[ -/]*[0-~]"
                      r"|\x9b[0-?]*[ -/]*[@-~]"
                      r"|[\x90\x98\x9d\x9e\x9f][^\n]*?(?:\x07|\x9c|(?=\n)|$)")
# C0 controls but tab and newline, DEL, C1 controls, and bidirectional overrides/isolates
_CONTROLS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069\u200e\u200f\u061c]")


def clean(text: str | None, one_line: bool = True, limit: int | None = None) -> str:
    """`text` without terminal escapes or control characters; with `one_line`, tabs and newlines
    become spaces; with `limit`, at most that many characters (an ellipsis marks a cut)."""
    if not text:
        return ""
    text = _CONTROLS.sub("", _ESCAPES.sub("", text))
    if one_line:
        text = text.replace("\n", " ").replace("\t", " ")
    if limit is not None and len(text) > limit:
        text = text[: max(0, limit - 1)] + "…"
    return text


def markdown_cell(text: str | None, limit: int | None = None) -> str:
    """`clean` for a cell of a Markdown table: pipes escaped, so a description cannot add columns."""
    return clean(text, limit=limit).replace("\\", "\\\\").replace("|", "\\|")
