"""The templates (Jinja, escaping every value) and the static files the dashboard and the HTML
report share, with the filters they use: numbers, times, and a diff highlighted by Pygments (which
escapes what it highlights)."""

from __future__ import annotations

import datetime
import functools
from pathlib import Path

from markupsafe import Markup

HERE = Path(__file__).parent


def static_dir() -> Path:
    return HERE / "static"


@functools.lru_cache(maxsize=1)
def environment():  # type: ignore[no-untyped-def]
    """The Jinja environment: templates from the package, autoescape on for every template."""
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters.update(metric=metric, signed=signed, seconds=seconds, when=when, diff=highlight_diff, money=money)
    return env


def metric(value: float | None) -> str:
    return "" if value is None else f"{value:.6f}"


def signed(value: float | None) -> str:
    return "" if value is None else f"{value:+.6f}"


def seconds(value: float | None) -> str:
    if value is None:
        return ""
    return f"{value:.1f} s" if value < 120 else f"{value / 60:.1f} min"


def money(value: float | None) -> str:
    if value is None:
        return "—"
    return f"${value:.2f}" if value >= 0.1 else f"${value:.4f}"


def when(value: float | None) -> str:
    if value is None:
        return ""
    return datetime.datetime.fromtimestamp(value).strftime("%Y-%m-%d %H:%M:%S")


def highlight_diff(text: str) -> Markup:
    """A unified diff as HTML, coloured by Pygments' diff lexer (its output is escaped)."""
    from pygments import highlight  # type: ignore[import-untyped]
    from pygments.formatters import HtmlFormatter  # type: ignore[import-untyped]
    from pygments.lexers import DiffLexer  # type: ignore[import-untyped]

    return Markup(highlight(text, DiffLexer(), HtmlFormatter(nowrap=True)))  # noqa: S704 (Pygments escapes)

