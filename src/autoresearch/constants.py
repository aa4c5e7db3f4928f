"""Read and rewrite module-level constants of a Python file, as text.

`init` writes a preset's values into the lab's train.py this way, and the `hparam` agent edits
hyperparameters the same way: the file is parsed with `ast` to find each `NAME = literal`, and
only the literal's characters are replaced, so comments, alignment and layout survive.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError

Literal = Any  # int | float | str | bool | tuple of those


@dataclass(frozen=True)
class Constant:
    """One `NAME = literal` statement at module level."""

    name: str
    value: Literal
    line: int  # 1-based line of the assignment
    start: int  # character offset of the literal in the source
    end: int  # character offset one past the literal


def _line_offsets(source: str) -> list[int]:
    offsets, total = [0], 0
    for line in source.splitlines(keepends=True):
        total += len(line)
        offsets.append(total)
    return offsets


def find_constants(source: str) -> dict[str, Constant]:
    """Every module-level assignment of an upper-case name to a literal, in file order."""
    tree = ast.parse(source)
    offsets = _line_offsets(source)
    found: dict[str, Constant] = {}
    for node in tree.body:
        if not isinstance(node, (ast.Assign, ast.AnnAssign)) or node.value is None:
            continue
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        if len(targets) != 1 or not isinstance(targets[0], ast.Name):
            continue
        name = targets[0].id
        if not name.isupper():
            continue
        try:
            value = _evaluate(node.value)
        except ValueError:
            continue  # `foo()` or a name: not a constant we can rewrite
        expr = node.value
        assert expr.end_lineno is not None and expr.end_col_offset is not None
        start = offsets[expr.lineno - 1] + _char_col(source, offsets, expr.lineno, expr.col_offset)
        end = offsets[expr.end_lineno - 1] + _char_col(source, offsets, expr.end_lineno, expr.end_col_offset)
        found[name] = Constant(name, value, node.lineno, start, end)
    return found


_ARITHMETIC = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b,
    ast.Pow: lambda a, b: a**b,
}


def _evaluate(node: ast.expr) -> Literal:
    """A literal, or arithmetic on number literals such as `2**19` or `40 * 524288`."""
    if isinstance(node, ast.BinOp) and type(node.op) in _ARITHMETIC:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (left, right)):
            raise ValueError("arithmetic on non-numbers")
        if isinstance(node.op, ast.Pow) and abs(right) > 64:
            raise ValueError("exponent too large")
        return _ARITHMETIC[type(node.op)](left, right)
    if isinstance(node, ast.Tuple):
        return tuple(_evaluate(e) for e in node.elts)
    try:
        return ast.literal_eval(node)
    except (ValueError, SyntaxError, TypeError) as exc:
        raise ValueError(str(exc)) from None


def _char_col(source: str, offsets: list[int], lineno: int, byte_col: int) -> int:
    """ast columns count UTF-8 bytes; convert to a character column."""
    line = source[offsets[lineno - 1] : offsets[lineno]]
    return len(line.encode("utf-8")[:byte_col].decode("utf-8", errors="ignore"))


def format_literal(value: Literal) -> str:
    """Source text for a value: powers of two above 512 stay readable as 2**k."""
    if isinstance(value, bool) or value is None:
        return repr(value)
    if isinstance(value, int):
        if value >= 1024 and value & (value - 1) == 0:
            return f"2**{value.bit_length() - 1}"
        return repr(value)
    if isinstance(value, float):
        text = f"{value:.6g}"
        if "e" in text or "inf" in text or "nan" in text:
            return repr(value)
        return text if "." in text else text + ".0"  # 2.0 must stay a float, not become the int 2
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, tuple):
        inner = ", ".join(format_literal(v) for v in value)
        return f"({inner},)" if len(value) == 1 else f"({inner})"
    raise ConfigError(f"cannot write {value!r} as a constant", "use a number, string, bool or tuple")


def set_constants(source: str, values: dict[str, Literal]) -> str:
    """`source` with each named constant's literal replaced; unknown names raise ConfigError."""
    found = find_constants(source)
    missing = [name for name in values if name not in found]
    if missing:
        raise ConfigError(
            f"no module-level constant named {', '.join(missing)}",
            "constants must be written as NAME = literal at the top level of the file",
        )
    edits = sorted(((found[n].start, found[n].end, format_literal(v)) for n, v in values.items()), reverse=True)
    for start, end, text in edits:
        source = source[:start] + text + _realign(source[end:], len(text) - (end - start))
    return source


def _realign(rest: str, grown: int) -> str:
    """Keep a trailing comment in its column when the literal before it grew or shrank."""
    line_end = rest.find("\n")
    line = rest if line_end < 0 else rest[:line_end]
    stripped = line.lstrip(" ")
    if not stripped.startswith("#") or grown == 0:
        return rest
    spaces = max(1, len(line) - len(stripped) - grown)
    return " " * spaces + rest[len(line) - len(stripped):]
