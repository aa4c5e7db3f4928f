"""`hparam` — the built-in agent: Optuna's TPE over the hyperparameter constants of train.py. No LLM.

Choices, and why:

- The space is built around the *baseline's* values (stored as `origin` in every proposal's meta and
  read back from the ledger), not the moving champion's: TPE learns only when every trial lives in one
  fixed space. Each dimension is widened to hold the champion's current value, so the dimensions a
  proposal leaves alone are always inside it.
- TPE proposes a full point; the agent keeps the `max_changes` dimensions it moved furthest from the
  champion (as a fraction of the room on that side: see `Dim.distance`) and leaves the rest at the
  champion's values. A change of one or two constants can be judged and kept under the ratchet; a
  change of fifteen cannot. The values actually written are what is stored (and told to the rebuilt
  study with their distributions), so TPE learns from what really ran.
- The study is rebuilt from `context.history` on every call, its sampler seeded by the agent's seed
  and the history's length: it survives restarts, two agents with the same seed and history propose
  the same thing, and random samples never restart their sequence when the champion moves.
- A crash, timeout or invalid run is told as a finished trial with a violated constraint. TPE ignores
  FAIL trials altogether; an infeasible trial always lands in its bad group, so the sampler moves away
  from what crashed. Runs still in flight are told as RUNNING (TPE's constant liar spreads parallel
  workers apart); `killed` runs are left out, being the operator's doing rather than the config's.
- A configuration whose searched values equal the baseline's, the champion's or any recorded
  proposal's is never proposed again (on any parent: the section would be the same text).
"""

from __future__ import annotations

import io
import json
import math
import random
import tokenize
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState, create_trial

from ..constants import Constant, find_constants, set_constants
from ..errors import ConfigError
from .base import AgentBase, AgentError, Proposal, ResearchContext

Value = Any  # int | float | str | bool: the value of one searched dimension
FAILED = ("crash", "timeout", "invalid")
IN_FLIGHT = ("pending", "running")
OVERRIDE_TYPES = {"low": (int, float), "high": (int, float), "log": (bool,), "choices": (list, tuple),
                  "exclude": (bool,)}
TPE_ASKS = 25  # samples drawn from TPE before falling back to random single-constant changes
RANDOM_TRIES = 500


@dataclass(frozen=True)
class Dim:
    """One searched dimension: a constant (`DEPTH`) or one element of a tuple constant (`ADAM_BETAS[1]`)."""

    name: str
    constant: str
    index: int | None
    dist: BaseDistribution
    beta: bool = False  # a value in (0, 1) whose scale is its distance to 1, like a momentum

    def clean(self, value: Value) -> Value:
        """The value as written to the file: 3 significant digits, inside the range, the right type."""
        d = self.dist
        if isinstance(d, IntDistribution):
            return min(max(int(round(value)), d.low), d.high)
        if isinstance(d, FloatDistribution):
            v = round(1.0 - _sig(1.0 - float(value)), 12) if self.beta else _sig(float(value))
            return min(max(v, d.low), d.high)
        return value

    def contains(self, value: Value) -> bool:
        d = self.dist
        if isinstance(d, CategoricalDistribution):
            return any(c == value and isinstance(c, bool) == isinstance(value, bool) for c in d.choices)
        if isinstance(value, bool) or not isinstance(value, int if isinstance(d, IntDistribution) else (int, float)):
            return False
        return bool(d.low <= value <= d.high)  # type: ignore[attr-defined]

    def distance(self, a: Value, b: Value) -> float:
        """How far `a` moved from `b`, as a fraction of the room on that side of `b` (log units for log
        ranges, ranks for numeric choices); another word counts as half. Measured so, a uniform draw
        scores 1/2 on average whatever the dimension, and a value at the edge of its range (a ratio of
        0.0, the largest power of two) is not favoured over one in the middle."""
        d = self.dist
        if a == b:
            return 0.0
        if isinstance(d, CategoricalDistribution):
            if not all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in d.choices):
                return 0.5
            ranked = sorted(d.choices)  # type: ignore[type-var]
            a, b, d = ranked.index(a), ranked.index(b), IntDistribution(0, len(ranked) - 1)
        if isinstance(d, IntDistribution) and not d.log:  # a move of k steps counts as k - 1/2, as if binned
            return float((abs(a - b) - 0.5) / (d.high - b if a > b else b - d.low))
        low, high = float(d.low), float(d.high)  # type: ignore[attr-defined]
        if getattr(d, "log", False):
            if min(a, b) <= 0:
                return 1.0
            a, b, low, high = math.log(a), math.log(b), math.log(low), math.log(high)
        room = high - b if a > b else b - low
        return min(1.0, abs(a - b) / room) if room > 0 else 1.0

    def random(self, rng: random.Random) -> Value:
        d = self.dist
        if isinstance(d, CategoricalDistribution):
            return rng.choice(list(d.choices))
        if isinstance(d, IntDistribution):
            return rng.randint(d.low, d.high)
        assert isinstance(d, FloatDistribution)
        if d.log:
            return self.clean(math.exp(rng.uniform(math.log(d.low), math.log(d.high))))
        return self.clean(rng.uniform(d.low, d.high))


def _sig(x: float, digits: int = 3) -> float:
    return float(f"{x:.{digits}g}")


def _comments(source: str) -> dict[int, tuple[str, bool]]:
    """line -> (comment, whether it stands alone on its line). Text inside strings is not a comment."""
    found: dict[int, tuple[str, bool]] = {}
    lines = source.splitlines()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            row, col = tok.start
            found[row] = (tok.string, not lines[row - 1][:col].strip())
    return found


def section_constants(source: str, heading: str | None = None) -> dict[str, Constant]:
    """The constants of the section whose comment line contains `heading` (default "Hyperparameters").

    The section runs from that comment to the next `# ---` banner below the heading's own block of
    comment lines, or to the end of the file. With no such comment, every upper-case constant is in it.
    """
    found, comments = find_constants(source), _comments(source)
    key = (heading or "Hyperparameters").lower()
    start = next((line for line, (text, alone) in sorted(comments.items()) if alone and key in text.lower()), None)
    if start is None:
        return found
    lines = source.splitlines()
    block_end = start  # 1-based: the last comment line of the heading's banner
    while block_end < len(lines) and lines[block_end].strip().startswith("#"):
        block_end += 1
    banners = [line for line, (text, alone) in comments.items() if alone and text.startswith("# ---")]
    end = min((line for line in banners if line > block_end), default=len(lines) + 1)
    return {name: c for name, c in found.items() if start < c.line < end}


def _comment_choices(source: str, constant: Constant, comments: dict[int, tuple[str, bool]]) -> list[Value] | None:
    """The alternatives of a trailing `# choices: "SSSL", "SL", "L"` comment, if there is one."""
    for line in range(constant.line, source.count("\n", 0, constant.end) + 2):
        text = comments.get(line, ("", True))[0]
        if "choices:" in text:
            try:  # read as a constant, so arithmetic like 2**20 works as it does in the file
                return list(find_constants(f"C = ({text.split('choices:', 1)[1].strip()},)")["C"].value)
            except (KeyError, SyntaxError):
                raise AgentError(f"cannot read the choices comment of {constant.name}: {text}",
                                 'write it as  # choices: "A", "B"') from None
    return None


def _auto(name: str, value: Value, element: bool) -> tuple[BaseDistribution, bool] | None:
    """The default range of a value, and whether it is momentum-like; None when it is not searched."""
    if isinstance(value, bool):
        return CategoricalDistribution([True, False]), False
    if isinstance(value, int):
        if value >= 1 and value & (value - 1) == 0:  # powers of two stay powers of two, v/4 .. v*4
            bits = value.bit_length()
            return CategoricalDistribution([2**k for k in range(max(0, bits - 3), bits + 2)]), False
        return (IntDistribution(max(1, value // 2), value * 2), False) if value >= 1 else None
    if not isinstance(value, float) or not math.isfinite(value) or value < 0.0:
        return None
    unit = name.endswith(("_RATIO", "_FRAC"))  # a fraction of something: stays within [0, 1]
    if value == 0.0:
        return (FloatDistribution(0.0, 1.0), False) if unit else None
    if value < 1.0 and (element or "BETA" in name):
        gap = 1.0 - value  # 0.95 searches [0.8, 0.9875]: the distance to 1 moves by up to 4x
        return FloatDistribution(round(max(0.0, 1.0 - 4 * gap), 12), round(1.0 - gap / 4, 12)), True
    return FloatDistribution(value / 4, min(1.0, value * 4) if unit and value <= 1.0 else value * 4, log=True), False


def _overridden(key: str, value: Value, rule: dict[str, Any], comment: list[Value] | None) -> BaseDistribution:
    """The range an override (or a `# choices:` comment) declares, checked against the value's type."""
    if "choices" in rule or (comment is not None and "low" not in rule and "high" not in rule):
        choices = list(rule.get("choices", comment or []))
        if not choices:
            raise AgentError(f"the choices of {key} are empty")
        for c in choices:
            if not (type(c) is type(value) or (isinstance(value, float) and type(c) is int)):
                raise AgentError(f"the choices of {key} must be {type(value).__name__}s like its value {value!r}, "
                                 f"not {c!r}")
        return CategoricalDistribution([float(c) if isinstance(value, float) else c for c in choices])
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise AgentError(f"{key} is {value!r}: a range needs a number", "give choices = [...] instead")
    low, high, log = rule.get("low"), rule.get("high"), bool(rule.get("log", False))
    if low is None or high is None or not low < high or (log and low <= 0):
        raise AgentError(f"the override of {key} needs low < high" + (" and low > 0 with log" if log else ""))
    if isinstance(value, int):
        if not (isinstance(low, int) and isinstance(high, int)):
            raise AgentError(f"{key} is an integer: its low and high must be integers")
        return IntDistribution(low, high, log=log)
    return FloatDistribution(float(low), float(high), log=log)


def _widen(dist: BaseDistribution, value: Value) -> BaseDistribution:
    """`dist`, grown to hold the champion's current value."""
    if isinstance(dist, CategoricalDistribution):
        if any(c == value and type(c) is type(value) for c in dist.choices):
            return dist
        return CategoricalDistribution([*dist.choices, value])
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (getattr(dist, "log", False) and value <= 0):
        return dist
    low, high = min(dist.low, value), max(dist.high, value)  # type: ignore[attr-defined]
    if isinstance(dist, IntDistribution):
        return IntDistribution(int(low), int(high), log=dist.log)
    return FloatDistribution(low, high, log=getattr(dist, "log", False))


def check_overrides(overrides: dict[str, Any]) -> None:
    """Each entry must be a table of known options of the right types; names are checked against the file."""
    for key, rule in overrides.items():
        if not isinstance(rule, dict):
            raise AgentError(f"the hparam space entry {key} must be a table like {{low = 0.01, high = 0.1}}")
        for option, value in rule.items():
            if option not in OVERRIDE_TYPES:
                raise AgentError(f"the hparam space entry {key} has an unknown option {option!r}",
                                 f"use {', '.join(OVERRIDE_TYPES)}")
            number_as_bool = option in ("low", "high") and isinstance(value, bool)
            if not isinstance(value, OVERRIDE_TYPES[option]) or number_as_bool:
                raise AgentError(f"the hparam space entry {key}: {option} = {value!r} has the wrong type")


def derive_space(source: str, overrides: dict[str, dict[str, Any]] | None = None, section: str | None = None,
                 origin: dict[str, Value] | None = None) -> dict[str, Dim]:
    """The searched dimensions of a file, in file order; ranges are built around `origin` where given.

    An override may name a constant outside the section (it is then searched), or a tuple's element
    as NAME[i]; naming a constant the file does not have is an error.
    """
    overrides, origin = overrides or {}, origin or {}
    check_overrides(overrides)
    every, chosen, comments = find_constants(source), section_constants(source, section), _comments(source)
    for key, rule in overrides.items():
        base = key.split("[", 1)[0]
        if base not in every:
            raise AgentError(f"the hparam space names {key}, which is not a constant of the file",
                             "check [agent.space] in autoresearch.toml")
        value = every[base].value
        if "[" in key and not (isinstance(value, tuple) and key[len(base):] in [f"[{i}]" for i in range(len(value))]):
            raise AgentError(f"the hparam space names {key}, but {base} is {value!r}")
        if isinstance(value, tuple) and "[" not in key and set(rule) - {"exclude"}:
            raise AgentError(f"{key} is a tuple: give ranges for its elements as {key}[0], {key}[1], ...")
    dims: dict[str, Dim] = {}
    for name, constant in every.items():
        named = [k for k in overrides if k.split("[", 1)[0] == name]
        if (name not in chosen and not named) or overrides.get(name, {}).get("exclude", False):
            continue
        value = constant.value
        parts: list[tuple[int | None, Value]] = [(None, value)]
        if isinstance(value, tuple):
            parts = list(enumerate(value))
        if name not in chosen or (isinstance(value, tuple) and not all(isinstance(v, float) for v in value)):
            parts = [(i, v) for i, v in parts if (name if i is None else f"{name}[{i}]") in named]
        for index, current in parts:
            key = name if index is None else f"{name}[{index}]"
            rule = overrides.get(key, {})
            comment = _comment_choices(source, constant, comments) if index is None else None
            if rule.get("exclude", False):
                continue
            if set(rule) & {"low", "high", "choices"} or comment is not None:
                declared = _overridden(key, origin.get(key, current), rule, comment)
                found: tuple[BaseDistribution, bool] | None = (declared, False)
            else:
                found = _auto(name, origin.get(key, current), index is not None)
            if found is not None:
                dims[key] = Dim(key, name, index, _widen(found[0], current), found[1])
    return dims


def current_values(source: str, dims: dict[str, Dim]) -> dict[str, Value]:
    """Each dimension's value in `source`."""
    found = find_constants(source)
    return {n: found[d.constant].value if d.index is None else found[d.constant].value[d.index]
            for n, d in dims.items()}


def _key(params: dict[str, Value]) -> str:
    return json.dumps(params, sort_keys=True)


def _fmt(value: Value) -> str:
    """A value for the description: 4 significant digits, powers of two as in the file."""
    if isinstance(value, tuple):
        return "(" + ", ".join(_fmt(v) for v in value) + ")"
    if isinstance(value, bool):
        return repr(value)
    if isinstance(value, int):
        return f"2**{value.bit_length() - 1}" if value >= 1024 and value & (value - 1) == 0 else str(value)
    if isinstance(value, float):
        text = f"{value:.4g}"
        return text if any(c in text for c in ".enai") else text + ".0"
    return json.dumps(value)


def _typed(value: Value) -> Any:
    return tuple(_typed(v) for v in value) if isinstance(value, tuple) else (type(value), value)


def _write(source: str, values: dict[str, Value]) -> str:
    """set_constants, then any float it wrote as an integer literal (2.0 as `2`) written back as a float."""
    text = set_constants(source, values)
    found = find_constants(text)
    for name in sorted(values, key=lambda n: found[n].start, reverse=True):
        v = values[name]
        if _typed(found[name].value) != _typed(v):
            literal = "(" + ", ".join(repr(e) for e in v) + ")" if isinstance(v, tuple) else repr(v)
            text = text[:found[name].start] + literal + text[found[name].end:]
    return text


class HparamAgent(AgentBase):
    """Proposes changes of at most `max_changes` hyperparameter constants, sampled by Optuna TPE.

    `space` is the [agent.space] table of autoresearch.toml; `section` the heading that marks the
    hyperparameter section (default "Hyperparameters"); `startup_trials` the random trials TPE takes
    before it models the history.
    """

    name = "hparam"

    def __init__(self, file: str = "train.py", space: dict[str, dict[str, Any]] | None = None, seed: int = 0,
                 section: str | None = None, max_changes: int = 2, startup_trials: int = 8) -> None:
        if max_changes < 1:
            raise AgentError(f"max_changes must be at least 1, not {max_changes}")
        check_overrides(space or {})
        self.file, self.space, self.seed, self.section = file, dict(space or {}), seed, section
        self.max_changes, self.startup_trials = max_changes, startup_trials

    def target(self, context: ResearchContext) -> str:
        """The file to edit: `file`, or, when the lab has no such file (a project of its own), the first
        editable Python file with a hyperparameter heading, or the only editable Python file."""
        if self.file in context.files:
            return self.file
        python = sorted(path for path in context.files if path.endswith(".py"))
        key = (self.section or "Hyperparameters").lower()
        marked = [path for path in python if any(alone and key in text.lower()
                                                 for text, alone in _comments(context.files[path]).values())]
        if marked or len(python) == 1:
            return (marked or python)[0]
        raise AgentError(f"the hparam agent edits {self.file}, which is not an editable file of the lab",
                         'set file = "..." under [agent] in autoresearch.toml')

    def _space(self, context: ResearchContext) -> tuple[str, dict[str, Dim], dict[str, Value], dict[str, Value]]:
        """The champion's text, the dimensions, the champion's values and the baseline's values."""
        path = self.target(context)
        source = context.files[path]
        stored: dict[str, Value] = next(
            (e.meta["origin"] for e in context.history if isinstance(e.meta.get("origin"), dict)), {})
        dims = derive_space(source, self.space, self.section, stored)
        if not dims:
            raise AgentError(f"no hyperparameters to search in {path}",
                             "add a '# Hyperparameters' section of NAME = value lines, "
                             "or [agent.space] in autoresearch.toml")
        current = current_values(source, dims)
        origin = {n: stored[n] if n in stored and d.contains(stored[n]) else current[n] for n, d in dims.items()}
        return source, dims, current, origin

    def study(self, context: ResearchContext) -> optuna.Study:
        """A fresh in-memory study holding a trial for every experiment of the history it can place."""
        _, dims, _, origin = self._space(context)
        return self._study(context, dims, origin)

    def _study(self, context: ResearchContext, dims: dict[str, Dim], origin: dict[str, Value]) -> optuna.Study:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        # seeded by the history too: with the seed alone, every rebuilt study would draw the same random
        # start-up samples, so each new champion was offered the first samples' changes again
        seed = random.Random(f"{self.seed}-{len(context.history)}").getrandbits(32)
        sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=self.startup_trials)
        direction = StudyDirection.MAXIMIZE if context.direction == "max" else StudyDirection.MINIMIZE
        study = optuna.create_study(direction=direction, sampler=sampler)
        dists = {n: d.dist for n, d in dims.items()}
        metrics = [e.metric for e in context.history if e.metric is not None and math.isfinite(e.metric)]
        worst = (min(metrics) if context.direction == "max" else max(metrics)) if metrics else 0.0
        for e in context.history:
            params = origin if e.kind == "baseline" else e.meta.get("params")
            if not (isinstance(params, dict) and all(n in params and d.contains(params[n]) for n, d in dims.items())):
                continue  # another agent's experiment, or one from a space that no longer holds it
            params = {n: params[n] for n in dims}
            trial: FrozenTrial | None = None
            if e.status in ("keep", "discard") and e.metric is not None and math.isfinite(e.metric):
                trial = create_trial(value=e.metric, params=params, distributions=dists)
            elif e.status in FAILED:  # the value is never compared: infeasible trials rank below all others
                trial = create_trial(value=worst, params=params, distributions=dists, constraints={"failed": 1.0})
            elif e.status in IN_FLIGHT:
                trial = create_trial(state=TrialState.RUNNING, params=params, distributions=dists)
            if trial is not None:
                study.add_trial(trial)
        return study

    def propose(self, context: ResearchContext) -> Proposal | None:
        path, (source, dims, current, origin) = self.target(context), self._space(context)
        study = self._study(context, dims, origin)
        tried = {_key(origin), _key(current)}
        for e in context.history:
            params = e.meta.get("params")
            if isinstance(params, dict) and all(n in params for n in dims):
                tried.add(_key({n: params[n] for n in dims}))
        told = [t for t in study.trials if t.state == TrialState.COMPLETE]
        values = [t.value for t in told if not t.constraints and t.value is not None]
        best = (max(values) if context.direction == "max" else min(values)) if values else context.champion_metric
        so_far = f"; best so far {best:.6g}" if best is not None else ""
        mode = "TPE sample" if len(told) >= self.startup_trials else "random start-up sample"
        for _ in range(TPE_ASKS):
            trial = study.ask({n: d.dist for n, d in dims.items()})
            point = {n: d.clean(trial.params[n]) for n, d in dims.items()}
            study.tell(trial, state=TrialState.FAIL)  # the study is thrown away; the ledger keeps what ran
            moved = sorted((n for n in dims if dims[n].distance(point[n], current[n]) > 0),
                           key=lambda n: -dims[n].distance(point[n], current[n]))[: self.max_changes]
            params = {n: point[n] if n in moved else current[n] for n in dims}
            if _key(params) not in tried:
                trials = f"{len(told)} trial{'s' * (len(told) != 1)}"
                return self._proposal(path, source, dims, current, params, origin, f"{mode} after {trials}{so_far}")
        rng = random.Random(f"{self.seed}-{len(context.history)}")
        for _ in range(RANDOM_TRIES):
            name = rng.choice(list(dims))
            params = {**current, name: dims[name].random(rng)}
            if _key(params) not in tried:
                return self._proposal(path, source, dims, current, params, origin,
                                      f"random single-constant change: TPE kept proposing tried ones{so_far}")
        return None

    def _proposal(self, path: str, source: str, dims: dict[str, Dim], current: dict[str, Value],
                  params: dict[str, Value], origin: dict[str, Value], rationale: str) -> Proposal:
        changed = [n for n in dims if _key({"v": params[n]}) != _key({"v": current[n]})]
        found = find_constants(source)
        values: dict[str, Value] = {}
        for n in changed:
            d = dims[n]
            if d.index is None:
                values[d.constant] = params[n]
            else:  # a tuple element: the other elements stay as they are, in order
                elements = list(values.get(d.constant) or found[d.constant].value)
                elements[d.index] = params[n]
                values[d.constant] = tuple(elements)
        try:
            text = _write(source, values)
        except ConfigError as exc:
            raise AgentError(f"cannot write {', '.join(values)} into {path}: {exc}") from None
        description = ", ".join(f"{c} {_fmt(found[c].value)} -> {_fmt(v)}" for c, v in values.items())
        return Proposal(description=description, files={path: text}, rationale=rationale,
                        meta={"params": params, "changed": changed, "origin": origin})
