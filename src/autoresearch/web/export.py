"""`autoresearch report --html`: the dashboard's overview as one self-contained file, to share.

The same templates, script and chart library as the dashboard, inlined; the tag's state embedded as
JSON; the detail of every kept experiment and of the latest ones embedded as panels the table's rows
open (`#e-<id>`). It needs no server and no network. Its Content-Security-Policy allows only its own
inline scripts and styles (by hash), so text in it can never run as a script.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
from pathlib import Path
from typing import Any

from markupsafe import Markup

from ..carry import Verdict
from ..experiment import Experiment
from ..files import write_atomically
from ..lab import Lab
from . import data
from .render import environment, static_dir

DETAILS = 300  # the latest experiments whose detail is embedded (besides every kept one)


def script_json(value: Any) -> Markup:
    """JSON safe inside a <script> element: `<`, `>` and `&` escaped, so no text can end the element."""
    text = json.dumps(value, separators=(",", ":"), allow_nan=False, default=str)
    return Markup(text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026"))  # noqa: S704


def _hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


def render_html(lab: Lab, history: list[Experiment], tag: str, runs: list[dict[str, Any]],
                details: int = DETAILS, found: list[tuple[str, str, list[Verdict]]] | None = None) -> str:
    """The report as one HTML document (`found`: the tag's studies, carry.lab_studies)."""
    static = static_dir()
    css = [(static / name).read_text(encoding="utf-8") for name in ("uPlot.min.css", "diff.css", "app.css")]
    js = [(static / name).read_text(encoding="utf-8") for name in ("uPlot.iife.min.js", "app.js")]
    value = data.state(lab, history, tag, [tag], runs, found=found or [])
    value["version"] = None
    value["workers"] = []  # a snapshot: nothing runs in a file
    chosen = {e.id for e in history if e.status == "keep"}
    chosen |= {e.id for e in data.experiments_of(history)[-details:]}
    embedded = sorted(chosen)
    panels = [data.detail(lab, e, history) for e in history if e.id in chosen]
    csp = ("default-src 'none'; img-src data:; base-uri 'none'; form-action 'none'; "
           f"script-src {' '.join(_hash(t) for t in js)}; style-src {' '.join(_hash(t) for t in css)}")
    return environment().get_template("overview.html").render(
        mode="static", lab=lab.config.name, tag=tag, tags=[tag], metric=lab.config.metric.name,
        state_json=script_json(value), details=panels, embedded=set(embedded), written=time.time(), csp=csp,
        inline_css=[Markup(t) for t in css], inline_js=[Markup(t) for t in js])  # noqa: S704 (the package's files)


def write_html(lab: Lab, history: list[Experiment], tag: str, runs: list[dict[str, Any]], path: Path,
               found: list[tuple[str, str, list[Verdict]]] | None = None) -> Path:
    """Write the report to `path` (through a temporary file: a reader never sees half of it)."""
    text = render_html(lab, history, tag, runs, found=found)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_atomically(path, text)
