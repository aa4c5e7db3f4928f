"""Structured replies: the proposal as one JSON object, for models that cannot keep SEARCH/REPLACE
markers straight (a 0.5B coding model behind llama.cpp missed `=======` in every reply).

    {"description": "...", "rationale": "...", "edits": [{"file": "train.py", "search": "...", "replace": "..."}]}

The schema goes with each OpenAI-compatible request as `response_format` (json_schema, strict), so a
server that supports it (llama.cpp, vLLM, Ollama, LM Studio, OpenAI) can only sample replies of that
shape. The parse is strict all the same: json.loads of the whole reply, a ``` or ```json fence
around it the only slack; every field present, a string, no others; at least one edit. The edits
become the EditBlocks the SEARCH/REPLACE parser makes, so the exact-match checks of apply_edits and
the agent's feedback and retries are the same in both formats.

`[agent] reply_format`: "blocks", "json", or "auto" (the default): json for `openai:` at a local
or private-network base_url (where the small models are), blocks elsewhere. The Anthropic API has
no response_format, and its models follow SEARCH/REPLACE well: `auto` gives blocks there, and an
explicit "json" asks for the JSON object in the prompt only.
"""

from __future__ import annotations

import json
import re
from typing import Any

from .edits import (
    BLOCKS,
    EXAMPLE_DESCRIPTION,
    EXAMPLE_RATIONALE,
    EXAMPLE_REPLACE,
    EXAMPLE_SEARCH,
    EditBlock,
    FormatError,
    ParsedReply,
    ReplyFormat,
)
from .providers import is_local

REPLY_FORMATS = ("auto", "blocks", "json")

_STRING = {"type": "string"}
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "description": _STRING,
        "rationale": _STRING,
        "edits": {"type": "array", "items": {
            "type": "object",
            "properties": {"file": _STRING, "search": _STRING, "replace": _STRING},
            "required": ["file", "search", "replace"],
            "additionalProperties": False,
        }},
    },
    "required": ["description", "rationale", "edits"],
    "additionalProperties": False,
}
RESPONSE_FORMAT: dict[str, Any] = {"type": "json_schema", "json_schema": {"name": "edit", "strict": True, "schema": SCHEMA}}

JSON_RULES = """\
Send this one JSON object and nothing else: no text before or after it. Each edit changes one \
file: "search" copies a contiguous run of whole lines of the current file exactly (indentation and \
blank lines included, each line ending in \\n) and matches only one place (add neighbouring lines if \
needed); "replace" is the new text for those lines. Use as many edits as needed; they apply in \
order. An empty "search" creates a new file."""

_FENCE = re.compile(r"\A```(?:json)?[ \t]*\n(.*)\n[ \t]*```\Z", re.DOTALL | re.IGNORECASE)
_FIELDS = {"description", "rationale", "edits"}
_EDIT_FIELDS = ("file", "search", "replace")


def _shape(path: str) -> str:
    return ('{"description": "<one line: what changed, e.g. raise MATRIX_LR to 0.05 and add warmup>",\n'
            ' "rationale": "<a few sentences: what you expect and why>",\n'
            f' "edits": [{{"file": {json.dumps(path)}, "search": "<exact lines from the current file>", '
            '"replace": "<replacement lines>"}]}')


def _example(path: str) -> str:
    return json.dumps({"description": EXAMPLE_DESCRIPTION, "rationale": " ".join(EXAMPLE_RATIONALE.split()),
                       "edits": [{"file": path, "search": EXAMPLE_SEARCH, "replace": EXAMPLE_REPLACE}]}, indent=1)


def _error(problem: str) -> FormatError:
    return FormatError(f"{problem}\n{JSON.help()}")


def _kind(value: object) -> str:
    """A JSON value's type, as the schema names it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    return {dict: "an object", list: "an array", str: "a string", int: "a number", float: "a number"}.get(
        type(value), type(value).__name__)


def _fields(value: object, names: set[str] | tuple[str, ...], where: str) -> dict[str, Any]:
    """`value` as an object with exactly the fields `names`, or the error saying what differs."""
    if not isinstance(value, dict):
        raise _error(f"{where} must be a JSON object, not {_kind(value)}")
    missing = [n for n in sorted(names) if n not in value]
    if missing:
        raise _error(f"{where} has no {', '.join(repr(n) for n in missing)} field")
    extra = sorted(set(value) - set(names))
    if extra:
        raise _error(f"{where} has unknown field(s) {', '.join(repr(n) for n in extra)}: only "
                     f"{', '.join(repr(n) for n in sorted(names))} are allowed")
    return value


def _string(value: object, where: str) -> str:
    if not isinstance(value, str):
        raise _error(f"{where} must be a string, not {_kind(value)}")
    return value.replace("\r\n", "\n").replace("\r", "\n")


def _whole_lines(text: str) -> str:
    """A search or replace text as whole lines, as SEARCH/REPLACE blocks always are."""
    return text if not text or text.endswith("\n") else text + "\n"


def parse_json_reply(text: str) -> ParsedReply:
    """Parse a JSON reply strictly. Raises FormatError saying what is wrong and how the reply looks."""
    body = text.strip()
    fence = _FENCE.match(body)
    if fence:
        body = fence.group(1)
    if not body:
        raise _error("the reply is empty")
    try:
        data = json.loads(body)
    except json.JSONDecodeError as exc:
        ended = exc.pos >= len(body.rstrip()) or exc.msg.startswith("Unterminated")
        raise _error(f"the reply is not valid JSON: {exc.msg}: line {exc.lineno} column {exc.colno}"
                     + (" (the reply ends before the JSON object does)" if ended else "")) from None
    reply = _fields(data, _FIELDS, "the reply")
    description = " ".join(_string(reply["description"], '"description"').split())
    if not description:
        raise _error('"description" is empty: say in one line what the change does')
    rationale = _string(reply["rationale"], '"rationale"').strip()
    edits = reply["edits"]
    if not isinstance(edits, list):
        raise _error(f'"edits" must be an array of edits, not {_kind(edits)}')
    if not edits:
        raise _error('"edits" is empty: the change itself is missing')
    blocks: list[EditBlock] = []
    for number, item in enumerate(edits, start=1):
        edit = _fields(item, _EDIT_FIELDS, f"edit {number}")
        path = _string(edit["file"], f'edit {number}: "file"').strip()
        if not path:
            raise _error(f'edit {number}: "file" is empty: name the file to change, e.g. train.py')
        search = _whole_lines(_string(edit["search"], f'edit {number} ({path}): "search"'))
        replace = _string(edit["replace"], f'edit {number} ({path}): "replace"')
        replace = _whole_lines(replace) if search else replace
        if search == replace:
            raise _error(f'the edit changes nothing: edit {number} ({path}) has identical "search" and "replace"')
        blocks.append(EditBlock(path=path, search=search, replace=replace, index=number))
    return ParsedReply(description=description, rationale=rationale, blocks=blocks)


JSON = ReplyFormat(name="json", parse=parse_json_reply, shape=_shape, rules=JSON_RULES, example=_example,
                   block="edit", search="search", resend="the whole JSON object (description, rationale and every edit)",
                   response_format=RESPONSE_FORMAT)
FORMATS = {"blocks": BLOCKS, "json": JSON}


def choose_reply_format(value: object, provider: str, base_url: str | None) -> ReplyFormat:
    """The format `[agent] reply_format` asks for; "auto": json for an OpenAI-compatible `provider`
    ("openai") at a local or private `base_url`, blocks otherwise. Raises ValueError for another value."""
    if value not in REPLY_FORMATS:
        raise ValueError(f"reply_format must be one of {', '.join(REPLY_FORMATS)}, not {value!r}")
    if value == "auto":
        return JSON if provider == "openai" and is_local(base_url, private=True) else BLOCKS
    return FORMATS[str(value)]
