"""autoresearch.toml: the one source of truth for a lab's settings.

The file has three tables. `[lab]` says what the loop may edit and how to run an experiment,
`[metric]` how to read the result, and `[task]` fixes the built-in task's data and evaluation
(read by the frozen prepare.py; a lab made with `init --target` has no `[task]`). `[agent]` names
the default agent and the loop's agent settings; `[[agents]]` entries, when present, make several
agents share a run, each with a weight and options of its own.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .judge import JudgeConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on 3.10
    import tomli as tomllib

CONFIG_NAME = "autoresearch.toml"
LOOP_AGENT_KEYS = ("name", "repair_attempts", "pause_seconds", "max_pause_seconds")  # [agent] keys the loop reads
SECRET_PATTERNS = ("*_API_KEY", "*_TOKEN", "*SECRET*", "*PASSWORD*", "*_CREDENTIALS")
# The environment variables a run gets (fnmatch, any case); every other one stays with the orchestrator.
# What a training run reads: the locale and the terminal, Python's own settings, the thread counts of
# OpenMP/MKL/OpenBLAS/Accelerate and of rayon (the tokenizer), the GPU's (CUDA, NVIDIA, ROCm), torch's,
# Triton's and the Hugging Face offline switches, an active virtualenv or conda environment, the
# dynamic loader's library path, and autoresearch's own. `[lab] pass_env` adds to these;
# `[lab] secret_env` (SECRET_PATTERNS) removes from them and wins. HOME and TMPDIR are the run's own.
PASS_ENV = (
    "PATH", "LANG", "LANGUAGE", "LC_*", "TZ", "TERM", "NO_COLOR", "USER", "LOGNAME",
    "PYTHONPATH", "PYTHONHOME", "PYTHONHASHSEED", "PYTHONUNBUFFERED", "PYTHONDONTWRITEBYTECODE",
    "PYTHONPYCACHEPREFIX", "PYTHONWARNINGS", "PYTHONIOENCODING", "PYTHONUTF8", "PYTHONFAULTHANDLER",
    "PYTHONMALLOC", "PYTHONNOUSERSITE", "PYTHONOPTIMIZE", "PYTHONDEVMODE", "PYTHONUSERBASE",
    "VIRTUAL_ENV", "CONDA_PREFIX", "CONDA_DEFAULT_ENV", "LD_LIBRARY_PATH",
    "OMP_*", "KMP_*", "GOMP_*", "MKL_*", "OPENBLAS_*", "VECLIB_MAXIMUM_THREADS", "NUMEXPR_*", "RAYON_NUM_THREADS",
    "TOKENIZERS_PARALLELISM", "MALLOC_*",
    "CUDA_*", "NVIDIA_*", "CUBLAS_*", "CUDNN_*", "NCCL_*", "HIP_*", "ROCR_*", "HSA_*",
    "TORCH*", "PYTORCH_*", "TRITON*", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE",
    "AUTORESEARCH_*", "TMPDIR",
)


@dataclass(frozen=True)
class MetricConfig:
    """How a finished run's score is read."""

    name: str = "val_bpb"  # key of a `name: value` line in the output, or of the JSON file
    direction: str = "min"  # "min" (lower is better) or "max"
    json_file: str | None = None  # when set, read the metric from this JSON file the run writes


@dataclass(frozen=True)
class TaskConfig:
    """The built-in GPT task: fixed for every experiment of the lab."""

    dataset: str  # climbmix, tinystories, sotu or files:PATH
    preset: str  # cuda, mps, cpu or tiny
    max_seq_len: int  # evaluation context length
    vocab_size: int  # tokenizer vocabulary, special tokens included
    eval_tokens: int  # validation tokens per evaluation


@dataclass(frozen=True)
class AgentSpec:
    """One `[[agents]]` entry: an agent of a research community (several agents share one run)."""

    spec: str  # as --agent takes it: hparam, patches:DIR, openai:MODEL, claude-code, ...
    weight: float = 1.0  # its share of the proposals, relative to the others' weights
    options: dict[str, Any] = field(default_factory=dict)  # its options, as [agent] has them
    where: str = "[agent]"  # the table its options come from, for messages


@dataclass(frozen=True)
class LabConfig:
    """A parsed autoresearch.toml."""

    root: Path
    name: str
    run: str  # the command that runs one experiment, in the lab's directory
    budget: float  # training seconds per experiment
    editable: tuple[str, ...]  # globs of files the agent may change
    frozen: tuple[str, ...]  # globs of files that must not change (hashed before each run)
    metric: MetricConfig = field(default_factory=MetricConfig)
    task: TaskConfig | None = None
    startup_allowance: float = 60.0  # seconds added to the limit for start-up and compilation
    eval_allowance: float = 120.0  # seconds added to the limit for the final (trusted) evaluation
    secret_env: tuple[str, ...] = SECRET_PATTERNS  # environment variables never passed to a run (wins)
    pass_env: tuple[str, ...] = PASS_ENV  # the variables a run gets: PASS_ENV and [lab] pass_env
    readable: tuple[Path, ...] = ()  # [lab] readable: more host paths a run may read (a dataset in HOME)
    log_cap_mb: float = 10.0  # output kept per experiment (head and tail)
    memory_limit_gb: float | None = None  # address-space limit of a run (Linux/macOS)
    agent: str = "hparam"  # the default --agent
    agent_options: dict[str, Any] = field(default_factory=dict)  # the [agent] table, e.g. the hparam space
    agents: tuple[AgentSpec, ...] = ()  # [[agents]]: several agents share a run (without --agent, instead of [agent])
    repair_attempts: int = 2  # tries an agent gets to fix its own crashed change
    pause_seconds: float = 30.0  # first pause when the agent's service is down; doubles each time
    max_pause_seconds: float = 600.0
    judge: JudgeConfig = field(default_factory=JudgeConfig)  # [judge]: noise-aware keep/discard
    sandbox: str = "auto"  # "auto" (bubblewrap when usable, else the best fallback), "bwrap" (required), "none"
    trusted_eval: bool = False  # built-in task (default on): score the handed-over model in an evaluator process


def _get(table: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str, default: Any = ...) -> Any:
    if key not in table:
        if default is ...:
            raise ConfigError(f"{CONFIG_NAME}: [{where}] is missing `{key}`", "see the README for the format")
        return default
    value = table[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        expected = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise ConfigError(f"{CONFIG_NAME}: [{where}] `{key}` must be a {expected}, not {value!r}")
    return value


def _strings(table: dict[str, Any], key: str, where: str) -> tuple[str, ...]:
    values = _get(table, key, list, where, [])
    if not all(isinstance(v, str) and v for v in values):
        raise ConfigError(f"{CONFIG_NAME}: [{where}] `{key}` must be a list of file names or globs")
    return tuple(values)


def _sandbox(value: str) -> str:
    if value not in ("auto", "bwrap", "none"):
        raise ConfigError(f'{CONFIG_NAME}: [lab] `sandbox` must be "auto", "bwrap" or "none", not {value!r}')
    return value


def _agents(data: dict[str, Any]) -> tuple[AgentSpec, ...]:
    """The `[[agents]]` entries: each a `name` (an --agent spec), a `weight` (> 0, default 1) and the
    agent's own options; the loop's settings stay in [agent]."""
    entries = data.get("agents", [])
    if not isinstance(entries, list) or not all(isinstance(t, dict) for t in entries):
        raise ConfigError(f"{CONFIG_NAME}: `agents` must be an array of tables",
                          'write each agent as [[agents]] with name = "hparam" (and weight = 1)')
    specs = []
    for i, entry in enumerate(entries, 1):
        spec = entry.get("name")
        if not isinstance(spec, str) or not spec.strip():
            raise ConfigError(f"{CONFIG_NAME}: [[agents]] entry {i} needs a `name`, not {spec!r}",
                              'name the agent as --agent takes it, e.g. name = "hparam"')
        spec = spec.strip()
        where = f"[[agents]] {spec!r} (entry {i})"
        weight = entry.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 < weight < float("inf"):
            raise ConfigError(f"{CONFIG_NAME}: {where} `weight` must be a number above 0, not {weight!r}",
                              "weights are shares of the proposals: 2 and 1 give 2/3 and 1/3")
        loop_keys = sorted(set(entry) & (set(LOOP_AGENT_KEYS) - {"name"}))
        if loop_keys:
            raise ConfigError(f"{CONFIG_NAME}: {where} sets {', '.join(loop_keys)}, a setting of the whole run",
                              "move it to [agent]")
        options = {k: v for k, v in entry.items() if k not in ("name", "weight")}
        specs.append(AgentSpec(spec=spec, weight=float(weight), options=options, where=where))
    return tuple(specs)


def parse_config(text: str, root: Path) -> LabConfig:
    """Parse and validate the text of an autoresearch.toml that lives in `root`."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{CONFIG_NAME} is not valid TOML: {exc}", "fix the file or run `autoresearch init` again") from None
    lab = _get(data, "lab", dict, "lab")
    metric_t = _get(data, "metric", dict, "metric", {})
    direction = _get(metric_t, "direction", str, "metric", "min")
    if direction not in ("min", "max"):
        raise ConfigError(f"{CONFIG_NAME}: [metric] `direction` must be \"min\" or \"max\", not {direction!r}")
    metric = MetricConfig(
        name=_get(metric_t, "name", str, "metric", "val_bpb"),
        direction=direction,
        json_file=_get(metric_t, "json_file", str, "metric", None),
    )
    budget = _get(lab, "budget", float, "lab")
    if budget <= 0:
        raise ConfigError(f"{CONFIG_NAME}: [lab] `budget` must be positive seconds, not {budget}")
    editable = _strings(lab, "editable", "lab")
    if not editable:
        raise ConfigError(f"{CONFIG_NAME}: [lab] `editable` names no file", "list the files the agent may change")
    task = None
    if "task" in data:
        t = _get(data, "task", dict, "task")
        task = TaskConfig(
            dataset=_get(t, "dataset", str, "task"),
            preset=_get(t, "preset", str, "task"),
            max_seq_len=_get(t, "max_seq_len", int, "task"),
            vocab_size=_get(t, "vocab_size", int, "task"),
            eval_tokens=_get(t, "eval_tokens", int, "task"),
        )
        for key in ("max_seq_len", "vocab_size", "eval_tokens"):
            if getattr(task, key) <= 0:
                raise ConfigError(f"{CONFIG_NAME}: [task] `{key}` must be positive")
        if task.vocab_size < 260:
            raise ConfigError(f"{CONFIG_NAME}: [task] `vocab_size` must be at least 260 (256 bytes + 4 special tokens)")
    agent_t = dict(_get(data, "agent", dict, "agent", {}))
    judge_t = _get(data, "judge", dict, "judge", {})
    known = ("mode", "k", "repeats", "confirmations", "remeasure_every", "paired", "sigma_floor")
    unknown = sorted(set(judge_t) - set(known))
    if unknown:
        raise ConfigError(f"{CONFIG_NAME}: [judge] has unknown key(s) {', '.join(unknown)}",
                          f"known: {', '.join(known)}")
    default = JudgeConfig()
    judge = JudgeConfig(
        mode=_get(judge_t, "mode", str, "judge", "noise"), k=_get(judge_t, "k", float, "judge", 2.0),
        repeats=_get(judge_t, "repeats", int, "judge", 4), confirmations=_get(judge_t, "confirmations", int, "judge", 2),
        remeasure_every=_get(judge_t, "remeasure_every", int, "judge", 10),
        paired=_get(judge_t, "paired", bool, "judge", default.paired),
        sigma_floor=_get(judge_t, "sigma_floor", float, "judge", default.sigma_floor),
    )
    if judge.mode not in ("noise", "strict") or judge.k <= 0 or judge.repeats < 1 or judge.confirmations < 0 \
            or judge.remeasure_every < 0 or not 0 <= judge.sigma_floor < 1:
        raise ConfigError(f"{CONFIG_NAME}: [judge] needs mode \"noise\" or \"strict\", k > 0, repeats >= 1, "
                          "confirmations >= 0, remeasure_every >= 0 (0: never), 0 <= sigma_floor < 1")
    memory = _get(lab, "memory_limit_gb", float, "lab", None)
    return LabConfig(
        root=root,
        name=_get(lab, "name", str, "lab", root.name),
        run=_get(lab, "run", str, "lab"),
        budget=budget,
        editable=editable,
        frozen=_strings(lab, "frozen", "lab"),
        metric=metric,
        task=task,
        startup_allowance=_get(lab, "startup_allowance", float, "lab", 60.0),
        eval_allowance=_get(lab, "eval_allowance", float, "lab", 120.0),
        secret_env=_strings(lab, "secret_env", "lab") or SECRET_PATTERNS,
        pass_env=(*PASS_ENV, *_strings(lab, "pass_env", "lab")),
        readable=tuple((root / Path(p).expanduser()).resolve() for p in _strings(lab, "readable", "lab")),
        log_cap_mb=_get(lab, "log_cap_mb", float, "lab", 10.0),
        memory_limit_gb=memory,
        agent=_get(agent_t, "name", str, "agent", "hparam"),
        agent_options={k: v for k, v in agent_t.items() if k not in LOOP_AGENT_KEYS},
        agents=_agents(data),
        repair_attempts=_get(agent_t, "repair_attempts", int, "agent", 2),
        pause_seconds=_get(agent_t, "pause_seconds", float, "agent", 30.0),
        max_pause_seconds=_get(agent_t, "max_pause_seconds", float, "agent", 600.0),
        judge=judge,
        sandbox=_sandbox(_get(lab, "sandbox", str, "lab", "auto")),
        trusted_eval=_get(lab, "trusted_eval", bool, "lab", task is not None),
    )


def load_config(root: Path) -> LabConfig:
    """Read `root/autoresearch.toml`."""
    path = root / CONFIG_NAME
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path} does not exist", "run `autoresearch init` to make a lab") from None
    return parse_config(text, root)


def render_config(
    name: str, run: str, budget: float, editable: list[str], frozen: list[str],
    metric: MetricConfig, task: TaskConfig | None,
) -> str:
    """The text of a new autoresearch.toml, with comments that explain each key."""
    def strings(values: list[str]) -> str:
        return "[" + ", ".join(f'"{v}"' for v in values) + "]"

    lines = [
        "# autoresearch lab settings. The loop reads this file at the start of every run.",
        "",
        "[lab]",
        f'name = "{name}"',
        f'run = "{run}"{" " * max(1, 28 - len(run))}# one experiment, run in the lab directory',
        f"budget = {budget:g}{' ' * max(1, 29 - len(f'{budget:g}'))}# training seconds per experiment (wall clock, measured from outside)",
        f"editable = {strings(editable)}  # the only files an agent may change",
        f"frozen = {strings(frozen)}  # hashed and checked before every run",
        'sandbox = "auto"               # runs see no network, no ledger, no validation data ("none" to disable)',
        "startup_allowance = 60         # seconds added to the limit for start-up and compilation",
        "eval_allowance = 120           # seconds added to the limit for the final (trusted) evaluation",
        "",
        "[agent]",
        'name = "hparam"                # default for `autoresearch run`; override with --agent',
        "",
        "[judge]",
        'mode = "noise"                 # keep only gains beyond run-to-run noise ("strict": any gain)',
        "k = 2                          # standard errors a gain must exceed",
        "repeats = 4                    # baseline runs that measure the noise",
        "confirmations = 2              # extra runs for a borderline gain",
        "remeasure_every = 10           # re-run the champion every this many experiments",
        "paired = true                  # before a keep, re-run the champion beside it (drift-proof)",
        "sigma_floor = 0.002            # noise taken as at least this fraction of the metric",
        "",
        "[metric]",
        f'name = "{metric.name}"',
        f'direction = "{metric.direction}"                # "min": lower is better; "max": higher is better',
    ]
    if metric.json_file:
        lines.append(f'json_file = "{metric.json_file}"')
    if task is not None:
        lines += [
            "",
            "# The built-in task. prepare.py reads these; changing them changes the metric,",
            "# so results from before and after a change are not comparable.",
            "[task]",
            f'dataset = "{task.dataset}"',
            f'preset = "{task.preset}"',
            f"max_seq_len = {task.max_seq_len}",
            f"vocab_size = {task.vocab_size}",
            f"eval_tokens = {task.eval_tokens}",
        ]
    return "\n".join(lines) + "\n"
