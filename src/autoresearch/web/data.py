"""What the dashboard and the HTML report show, computed from the ledger: one tag's state as plain
JSON-able data (figures, chart series, table rows, lineage, workers) and one experiment's detail.

Everything an agent or a run wrote (descriptions, rationales, reasons, diffs, logs, replies) is
cleaned of terminal escapes and controls here, and capped in size; the templates escape it for HTML
and the page's script only ever sets it as text.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..carry import Verdict
from ..display import clean
from ..experiment import Experiment
from ..judge import improvement
from ..lab import Lab
from ..report import (
    champion_line,
    delta_of,
    noise_band,
    per_agent,
    standing,
    standings,
    where_ran,
)

LOG_TAIL_BYTES = 64 * 1024  # the end of a log a page shows (a run's log may be megabytes)
TEXT_BYTES = 256 * 1024  # a diff, a transcript or a reply file: at most this much is read
ROW_TEXT = 300  # characters of a description or reason in the table
FINISHED = ("keep", "discard", "crash", "timeout", "invalid", "killed")


def experiments_of(history: list[Experiment]) -> list[Experiment]:
    """The tag's experiments in order, repeats left out (they are measurements of another one)."""
    return [e for e in history if e.kind != "repeat"]


def _hours(history: list[Experiment], now: float) -> float:
    """Hours from the first experiment's creation to the last finish (or now, while one runs)."""
    if not history:
        return 0.0
    start = min(e.created_at for e in history)
    running = any(e.status == "running" for e in history)
    end = now if running else max((e.finished_at or e.created_at) for e in history)
    return max(0.0, end - start) / 3600


def _workers(runs: list[dict[str, Any]], history: list[Experiment], budget: float) -> list[dict[str, Any]]:
    """One entry per worker of the latest run (from its recorded config), each with what it runs now."""
    declared: list[dict[str, Any]] = []
    config: dict[str, Any] = {}
    if runs:
        try:
            config = json.loads(runs[-1]["config_json"] or "{}")
        except ValueError:
            config = {}
        declared = [w for w in config.get("workers") or [] if isinstance(w, dict)]
    budget = float(config.get("budget") or budget)
    limit = budget + float(config.get("startup_allowance") or 0) + float(config.get("eval_allowance") or 0)
    running = [e for e in history if e.status == "running"]
    names = [str(w.get("name")) for w in declared] or (["w0"] if running else [])
    for e in running:
        if (e.worker or "w0") not in names:
            names.append(e.worker or "w0")
    out = []
    for name in names:
        info = next((w for w in declared if str(w.get("name")) == name), {})
        now_on = next((e for e in running if (e.worker or "w0") == name), None)
        out.append({
            "name": clean(name, limit=40), "node": clean(str(info.get("node") or (now_on.node if now_on else "") or "local"),
                                                          limit=80),
            "device": clean(str(info.get("runs_on") or ""), limit=80),
            "experiment": None if now_on is None else now_on.id,
            "kind": None if now_on is None else now_on.kind,
            "description": "" if now_on is None else clean(now_on.description, limit=ROW_TEXT),
            "started_at": None if now_on is None else now_on.started_at,
            "budget": budget, "limit": limit,
        })
    return out


def row(e: Experiment, n: int | None) -> dict[str, Any]:
    """One experiment as the table and the chart have it (`n`: its number on the chart's x axis)."""
    return {
        "id": e.id, "n": n, "kind": e.kind, "status": e.status, "metric": e.metric, "delta": delta_of(e),
        "test": e.test_metric, "seconds": e.run_seconds, "agent": clean(e.agent, limit=80),
        "worker": clean(e.worker or "", limit=40), "where": clean(where_ran(e) or "", limit=80),
        "commit": e.short_commit if e.commit_sha else "", "cost": e.cost_usd, "created_at": e.created_at,
        "description": clean(e.description, limit=ROW_TEXT),
        "reason": clean(e.reason, limit=ROW_TEXT) if e.status not in ("keep", "discard") else "",
        "repeat_of": e.repeat_of, "lines": e.lines_changed,
    }


def studies(found: list[tuple[str, str, list[Verdict]]]) -> list[dict[str, Any]]:
    """The tag's promote and ablate studies (carry.lab_studies) as the overview's card shows them."""
    return [{"tag": clean(tag, limit=120), "kind": kind,
             "arms": [{"id": v.row, "description": clean(v.description, limit=ROW_TEXT), "pairs": v.pairs,
                       "reference": v.reference, "metric": v.metric, "gain": v.gain, "low": v.low, "high": v.high,
                       "verdict": clean(v.verdict, limit=ROW_TEXT), "notes": [clean(n, limit=ROW_TEXT) for n in v.notes]}
                      for v in result]}
            for tag, kind, result in found]


def state(lab: Lab, history: list[Experiment], tag: str, tags: list[str], runs: list[dict[str, Any]],
          now: float | None = None, found: Sequence[tuple[str, str, list[Verdict]]] = ()) -> dict[str, Any]:
    """Everything the overview shows for one tag, as JSON-able data (`found`: its studies)."""
    now = time.time() if now is None else now
    config = lab.config
    direction, k = config.metric.direction, config.judge.k if config.judge.mode == "noise" else None
    shown = experiments_of(history)
    done = [e for e in shown if e.status not in ("pending", "running")]
    numbers = {e.id: i for i, e in enumerate(done)}
    kept = [e for e in done if e.status == "keep"]
    figures = standings(kept, history)
    best = figures.get(kept[-1].id) if kept else None
    base = figures.get(kept[0].id) if kept else None
    line = champion_line(done, best.metric if best else None)
    band = noise_band(done, line, k) if k is not None else []
    counts: dict[str, int] = {}
    for e in shown:
        counts[e.status] = counts.get(e.status, 0) + 1
    hours = _hours(history, now)
    finished = [e for e in shown if e.status in FINISHED]
    workers = _workers(runs, history, config.budget)
    busy = sum(e.run_seconds or 0.0 for e in history if e.run_seconds) + sum(
        max(0.0, now - e.started_at) for e in history if e.status == "running" and e.started_at)
    lanes = max(1, len(workers), len({e.worker for e in history if e.worker}))
    costs = [e.cost_usd for e in history if e.cost_usd is not None]
    tokens = sum((e.input_tokens or 0) + (e.output_tokens or 0) for e in history)
    champ = None
    if best is not None:
        b = best.experiment
        champ = {"id": b.id, "commit": b.short_commit, "metric": best.metric, "runs": best.runs, "test": b.test_metric,
                 "description": clean(b.description, limit=ROW_TEXT)}
    lineage, previous = [], None
    for e in kept:
        figure = figures.get(e.id)
        level = figure.metric if figure else e.metric
        lineage.append({"id": e.id, "commit": e.short_commit, "metric": level, "runs": figure.runs if figure else 0,
                        "own": e.metric, "test": e.test_metric, "agent": clean(e.agent, limit=80),
                        "description": clean(e.description, limit=ROW_TEXT),
                        "gain": None if previous is None or level is None else improvement(level, previous, direction),
                        "total": None if base is None or level is None else improvement(level, base.metric, direction)})
        previous = level
    chart = {
        "points": [{"n": numbers[e.id], "id": e.id, "metric": e.metric, "status": e.status,
                    "agent": clean(e.agent, limit=80), "description": clean(e.description, limit=120)}
                   for e in done],
        "champion": [[i, level] for i, level in line],
        "band": [[i, lo, hi] for i, lo, hi in band],
        "test": [[numbers[e.id], e.test_metric] for e in kept if e.test_metric is not None],
        "k": k,
    }
    return {
        "tag": tag, "tags": tags, "now": now, "metric": config.metric.name, "direction": direction,
        "lab": clean(config.name, limit=80),
        "counts": counts, "experiments": len(shown), "repeats": len(history) - len(shown),
        "per_hour": len(finished) / hours if hours > 0 else None,
        "utilization": min(1.0, busy / (hours * 3600 * lanes)) if hours > 0 else None,
        "cost": sum(costs) if costs else None, "tokens": tokens,
        "champion": champ,
        "baseline": None if base is None else {"id": base.experiment.id, "metric": base.metric, "runs": base.runs,
                                                "test": base.experiment.test_metric},
        "sigma": next((e.sigma for e in reversed(done) if e.sigma is not None), None),
        "agents": [{"agent": clean(t.agent, limit=80), "proposals": t.proposals, "keeps": t.keeps, "gain": t.gain,
                    "cost": t.cost} for t in per_agent(history, direction)],
        "rows": [row(e, numbers.get(e.id)) for e in reversed(history)], "rows_total": len(history),
        "facets": {"status": sorted({e.status for e in history}), "agent": sorted({clean(e.agent, limit=80) for e in history}),
                   "worker": sorted({clean(e.worker, limit=40) for e in history if e.worker})},
        "chart": chart, "lineage": lineage, "workers": workers, "studies": studies(list(found)),
    }


# -- one experiment ------------------------------------------------------------------------------


def read_tail(path: Path, limit: int) -> tuple[str, int, bool]:
    """The last `limit` bytes of a file, decoded and cleaned (starting at a line), its size, and
    whether it was cut."""
    size = path.stat().st_size
    with path.open("rb") as f:
        if size > limit:
            f.seek(size - limit)
        data = f.read(limit)
    text = data.decode("utf-8", errors="replace")
    if size > limit and "\n" in text:
        text = text.split("\n", 1)[1]
    return clean(text, one_line=False), size, size > limit


def inside(path: str | None, folder: Path) -> Path | None:
    """`path` when it is a file under `folder` (links resolved), else None: a path recorded in the
    ledger is shown only from the lab's own folders."""
    if not path:
        return None
    try:
        resolved = Path(path).resolve()
        base = folder.resolve()
    except (OSError, RuntimeError):
        return None
    if resolved.is_file() and resolved.is_relative_to(base):
        return resolved
    return None


def log_tail(lab: Lab, e: Experiment, limit: int = LOG_TAIL_BYTES) -> dict[str, Any]:
    """The end of e's log: text, size in bytes, whether it was cut, and why none is shown."""
    path = inside(e.log_path, lab.logs)
    if path is None:
        return {"text": "", "size": 0, "truncated": False,
                "missing": "no log recorded" if not e.log_path else "the log is not in the lab's logs folder"}
    text, size, cut = read_tail(path, limit)
    return {"text": text, "size": size, "truncated": cut, "missing": None, "status": e.status}


def replies(lab: Lab, e: Experiment) -> dict[str, Any] | None:
    """The agent's raw replies for e: an LLM agent's requests (`autoresearch-replies/1` JSON) or a
    coding assistant's transcript (text), read from the lab's transcripts folder only."""
    recorded = e.meta.get("transcript")
    if not isinstance(recorded, str):
        return None
    path = inside(recorded, lab.state_dir / "transcripts")
    if path is None:
        return {"path": clean(recorded, limit=300), "missing": "not in the lab's transcripts folder", "exchanges": [],
                "text": ""}
    shown = clean(str(path.relative_to(lab.root.resolve())) if path.is_relative_to(lab.root.resolve()) else str(path))
    if path.suffix == ".json" and path.stat().st_size <= 16 * TEXT_BYTES:
        try:
            data = json.loads(path.read_text(encoding="utf-8", errors="replace"))
        except ValueError:
            data = None
        if isinstance(data, dict) and data.get("format") == "autoresearch-replies/1":
            exchanges = [{"request": x.get("request"), "model": clean(str(x.get("model") or ""), limit=120),
                          "prompt": _capped(x.get("prompt")), "reply": _capped(x.get("reply")),
                          "problem": clean(x.get("problem"), limit=1000) if x.get("problem") else None,
                          "tokens": f"{x.get('input_tokens') or 0} in, {x.get('output_tokens') or 0} out",
                          "seconds": x.get("seconds") if isinstance(x.get("seconds"), (int, float)) else None}
                         for x in data.get("exchanges") or [] if isinstance(x, dict)]
            return {"path": shown, "missing": None, "exchanges": exchanges, "text": "",
                    "system": _capped(data.get("system")), "outcome": clean(str(data.get("outcome") or ""), limit=2000)}
    text, size, cut = read_tail(path, TEXT_BYTES)
    return {"path": shown, "missing": None, "exchanges": [], "text": text, "truncated": cut, "size": size}


def _capped(value: Any, limit: int = TEXT_BYTES) -> str:
    text = clean(value if isinstance(value, str) else "", one_line=False)
    return text if len(text) <= limit else text[:limit] + f"\n… ({len(text) - limit} more characters not shown)"


@dataclass(frozen=True)
class Link:
    id: int
    label: str


def detail(lab: Lab, e: Experiment, history: list[Experiment]) -> dict[str, Any]:
    """Everything one experiment's page shows (texts cleaned; the diff and log capped)."""
    meta = e.meta
    figure = standing(e, history) if e.status == "keep" else None
    links: list[Link] = []
    if e.repeat_of:
        links.append(Link(e.repeat_of, "a repeat run of"))
    if isinstance(meta.get("confirms"), int):
        links.append(Link(meta["confirms"], "merged onto a newer champion, confirming"))
    if e.repair_of:
        links.append(Link(e.repair_of, "a repair of"))
    for x in history:
        if x.repeat_of == e.id:
            links.append(Link(x.id, f"repeat run ({x.status}, {'' if x.metric is None else f'{x.metric:.6f}'})"))
        elif x.meta.get("confirms") == e.id:
            links.append(Link(x.id, f"confirmed as ({x.status})"))
        elif x.repair_of == e.id:
            links.append(Link(x.id, f"repaired by ({x.status})"))
    patch = e.patch or ""
    cut = len(patch) > TEXT_BYTES
    timings = [(name, value) for name, value in (
        ("waited for the proposal", e.wait_seconds), ("proposing", e.propose_seconds), ("run", e.run_seconds),
        ("hand-off", e.handoff_seconds), ("trusted evaluation", e.eval_seconds), ("of which causality check", e.causal_seconds),
        ("evaluating", e.evaluate_seconds)) if value is not None]
    params = {clean(str(key), limit=80): clean(json.dumps(value, default=str), limit=200) for key, value in meta.items()
              if key not in ("edits", "transcript", "format_errors") and not isinstance(value, (dict, list))}
    return {
        "e": e, "description": clean(e.description, one_line=False, limit=4000),
        "rationale": clean(e.rationale, one_line=False, limit=20000),
        "reason": clean(e.reason, one_line=False, limit=4000), "agent": clean(e.agent, limit=120),
        "where": clean(where_ran(e) or "", limit=120), "regime": clean(e.regime or "", limit=120),
        "sandbox": clean(e.sandbox or "", limit=120), "mean": figure,
        "diff": clean(patch[:TEXT_BYTES], one_line=False), "diff_cut": cut, "diff_size": len(patch),
        "links": links, "timings": timings, "params": params,
        "format_errors": [clean(str(p), limit=500) for p in meta.get("format_errors") or []],
        "tokens": (e.input_tokens, e.output_tokens), "cost": e.cost_usd,
        "log": log_tail(lab, e), "replies": replies(lab, e),
    }
