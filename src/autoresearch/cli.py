"""The `autoresearch` command line.

Each subcommand is a function whose docstring is its help. Expected failures are AutoresearchError
subclasses and print as one line, `error: ...`, with exit code 1; set AUTORESEARCH_DEBUG=1 (or pass
--debug) to see the traceback instead.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from . import __version__, settings
from .errors import AutoresearchError, ConfigError
from .lab import find_lab, init_lab
from .presets import PRESETS

if TYPE_CHECKING:
    from .agents import Agent
    from .config import LabConfig

Handler = Callable[[argparse.Namespace], int]


def cmd_init(args: argparse.Namespace) -> int:
    """Create a lab: a git repository with prepare.py, train.py, program.md and autoresearch.toml.

    With --target, make an existing git repository a lab instead: autoresearch.toml names the
    command to run, the editable files, and how to read the metric.

    The preset sizes the model and the task for a device (auto picks CUDA, then Apple MPS, then
    CPU). The budget defaults to the preset's: 300 s on a GPU, 120 s on a CPU, 5 s for `tiny`; on
    the cpu preset a budget of 200 s or more starts from a larger model and batch.
    """
    if args.target is not None:
        from .lab import init_target

        if not args.run or not args.editable:
            raise ConfigError("--target needs --run COMMAND and at least one --editable FILE",
                              "e.g. autoresearch init --target . --run 'python bench.py' --editable 'src/*.py' --metric score")
        lab = init_target(Path(args.target), run=args.run, editable=args.editable, metric=args.metric or "score",
                          direction=args.direction, budget=args.budget or 60.0, frozen=args.frozen,
                          json_file=args.metric_json)
        print(f"Made {lab.root} a lab: run `{lab.config.run}`, metric {lab.config.metric.name} "
              f"({lab.config.metric.direction}), editable {', '.join(lab.config.editable)}")
        return 0
    if args.dir is None:
        raise ConfigError("name the directory of the new lab", "autoresearch init DIR (or --target PATH for an existing repository)")
    lab = init_lab(Path(args.dir), dataset=args.dataset, preset=args.preset, budget=args.budget)
    task = lab.config.task
    assert task is not None
    print(f"Created lab {lab.root} (dataset {task.dataset}, preset {task.preset}, budget {lab.config.budget:g} s)")
    print(f"Next: cd {os.path.relpath(lab.root)} && autoresearch prepare && autoresearch train")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    """Download or build the lab's dataset and train its tokenizer (idempotent, resumable).

    Everything goes to the cache (~/.cache/autoresearch, or $AUTORESEARCH_CACHE), one folder per
    dataset; a re-run verifies every shard against the manifest and repairs what is damaged. A lab
    made for CUDA also gets FlashAttention-3 for this GPU (needs the `cuda` extra), which runs load
    offline; without it they use SDPA, and prepare still succeeds.
    """
    from .data import prepare_dataset

    lab = find_lab()
    task = lab.config.task
    if task is None:
        raise ConfigError("this lab has no [task] table in autoresearch.toml", "`prepare` is for the built-in GPT task")
    prepared = prepare_dataset(task.dataset, task.vocab_size, num_shards=args.num_shards,
                               workers=args.workers, log=lambda line: print(line, flush=True))
    print(f"Ready: {task.dataset} in {prepared.dir} (vocabulary {task.vocab_size})")
    preset = PRESETS.get(task.preset)
    if preset is not None and preset.device == "cuda":
        from .attention_kernels import fetch_flash_attention

        print(fetch_flash_attention(lambda line: print(line, flush=True)), flush=True)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """Run the lab's experiment once in the lab directory (for the built-in task: python train.py).

    The output is shown as it comes; the exit code is the run's.
    """
    lab = find_lab()
    env = dict(os.environ)
    if args.budget is not None:
        if args.budget <= 0:
            raise ConfigError(f"--budget must be positive seconds, not {args.budget:g}")
        env["AUTORESEARCH_BUDGET"] = f"{args.budget:g}"
    command = lab.config.run
    if command.startswith("python "):  # the interpreter autoresearch runs in has the dependencies
        command = f'"{sys.executable}" {command[len("python "):]}'
    try:
        return subprocess.run(command, shell=True, cwd=lab.root, env=env).returncode
    except KeyboardInterrupt:
        return 130


def cmd_run(args: argparse.Namespace) -> int:
    """Run experiments until stopped: baseline first, then propose, run, judge, keep or discard.

    Stops at --max-experiments (the total for the tag, so re-running the same command after a
    crash finishes the plan), at --hours, when the agent runs out of ideas, or on Ctrl-C (once:
    finish the current experiment; twice: abandon it). Running it again resumes the same tag.

    Several agents can share the run: give --agent more than once, or list them as [[agents]]
    entries in autoresearch.toml (each a name, a weight and its own options; used when no --agent
    is given). They take turns in proportion to their weights (1 each for --agent specs that no
    entry names), each sees every experiment and who proposed it, and `status` and `report` break
    the results down per agent.

    --workers runs several experiments at once on this machine (auto: one per GPU); --ray runs
    them on a Ray cluster, one per GPU.
    """
    from .ledger import Ledger
    from .loop import Loop, RunOptions, default_tag, ledger_path

    lab = find_lab()
    if args.budget is not None and args.budget <= 0:
        raise ConfigError(f"--budget must be positive seconds, not {args.budget:g}")
    if args.max_cost is not None and args.max_cost <= 0:
        raise ConfigError(f"--max-cost must be positive dollars, not {args.max_cost:g}")
    workers, ray = _workers(args.workers), _ray(args.ray)
    tag = args.tag or default_tag(lab)
    agent = _agent(args.agent, lab.config, tag, args.base_url)
    options = RunOptions(tag=tag, budget=args.budget, max_experiments=args.max_experiments, hours=args.hours,
                         max_cost=args.max_cost, workers=workers, ray=ray)
    with Ledger(ledger_path(lab)) as ledger:
        loop = Loop(lab, agent, options, ledger, _view(args.plain))
        reason = loop.run()
        commit, metric = loop.champion()
    if metric is not None:
        print(f"champion {metric:.6f} at {commit[:7] if commit else '?'} (branch autoresearch/{tag}); "
              f"{reason}")
    return 0


def _agent(specs: list[str] | None, config: LabConfig, tag: str, base_url: str | None) -> Agent:
    """The run's agent: the --agent specs (each with the options of the [[agents]] entry of that
    name, else [agent]'s), else the [[agents]] entries, else [agent]'s name; several make a pool."""
    from .agents import make_agents
    from .config import AgentSpec

    if specs:
        entries = {e.spec: e for e in reversed(config.agents)}  # the first entry of a name
        chosen = [entries.get(s) or AgentSpec(s, 1.0, config.agent_options) for s in specs]
    else:
        chosen = list(config.agents) or [AgentSpec(config.agent, 1.0, config.agent_options)]
    return make_agents(chosen, config.root, editable=config.editable, tag=tag, base_url=base_url,
                       secret_env=config.secret_env)


def _workers(value: str | None) -> int | None:
    """--workers: a positive count, or auto (0: one per GPU)."""
    if value is None:
        return None
    if value.strip().lower() == "auto":
        return 0
    try:
        count = int(value)
    except ValueError:
        count = 0
    if count < 1:
        raise ConfigError("--workers must be a positive number or auto")
    return count


def _ray(value: str | None) -> str | None:
    """--ray: auto (the cluster `ray start` made on this machine) or HOST:PORT."""
    if value is None or value == "auto":
        return value
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"--ray must be auto or HOST:PORT, not {value!r}",
                          "e.g. --ray 10.0.0.2:6379, the address `ray start --head` printed")
    return value


def cmd_status(args: argparse.Namespace) -> int:
    """Show every experiment: id, commit, metric, change vs the champion, status, seconds, description.

    When several agents share the run, each row names its agent and a second table gives each
    agent's proposals, keeps, summed gain over the champion and cost; when experiments ran on
    several workers, `where` says which worker and node ran each (w1@local, w0@10.0.0.2).
    A failed proposal or run names the file with the agent's replies (`transcript` in --json).
    """
    from dataclasses import asdict

    from .report import champion, per_agent, runs_note, status_rows

    lab, tag, experiments = _recorded(args)
    rows, best = status_rows(experiments), champion(experiments)
    for r, e in zip(rows, experiments):
        r["transcript"] = e.meta.get("transcript")  # the agent's session or replies, as it saved them
    tallies = per_agent(experiments, lab.config.metric.direction)
    metric_name = lab.config.metric.name
    if args.json:
        import json

        figure = None if best is None else {"id": best.experiment.id, "commit": best.experiment.short_commit,
                                            "metric_name": metric_name, "metric": best.metric, "runs": best.runs}
        print(json.dumps({"tag": tag, "champion": figure, "experiments": rows,
                          "agents": [asdict(t) for t in tallies]}, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from .display import clean

    modes = sorted({r["sandbox"] for r in rows if r["sandbox"]})
    caption = None if best is None else \
        f"champion {metric_name} {best.describe()} at {best.experiment.short_commit} (#{best.experiment.id})"
    table = Table(title=f"run {tag}" + (f" (sandbox: {', '.join(modes)})" if modes else ""), header_style="bold",
                  caption=caption)
    several = len(tallies) > 1
    placed = any(r["where"] for r in rows)
    columns = ("id", "commit", "metric", "delta", "test", "status", "seconds", *(("agent",) if several else ()),
               *(("where",) if placed else ()), "description")
    for name in columns:
        table.add_column(name, justify="right" if name in ("id", "metric", "delta", "test", "seconds") else "left")
    for r in rows:
        extra = ([Text(clean(r["agent"], limit=40))] if several else []) + ([Text(clean(r["where"] or ""))] if placed else [])
        replies = ""
        if r["transcript"] and r["status"] in ("invalid", "crash"):
            path, root = Path(str(r["transcript"])).resolve(), lab.root.resolve()
            shown = path.relative_to(root) if path.is_relative_to(root) else path
            replies = f" (agent replies: {clean(str(shown))})"
        table.add_row(str(r["id"]), r["commit"], "" if r["metric"] is None else f"{r['metric']:.6f}",
                      "" if r["delta"] is None else f"{r['delta']:+.6f}",
                      "" if r["test_metric"] is None else f"{r['test_metric']:.6f}", r["status"],
                      "" if r["seconds"] is None else f"{r['seconds']:.0f}", *extra,
                      Text(clean(r["description"]) + (f" ({clean(r['reason'], limit=500)})" if r["reason"]
                                                        and r["status"] not in ("keep", "discard") else ""))
                      + runs_note(r) + replies
                      + (" (left out: far off the other runs of this commit)" if r["left_out"] else "")
                      + (f" (disturbed: it kept {r['cores']:.1f} cores busy where this run's experiments "
                         f"typically keep {r['disturbed']:.1f}; another job shared the machine)" if r["disturbed"] else ""))
    console = Console(width=None if sys.stdout.isatty() else 200)
    console.print(table)
    if several:
        agents = Table(title="per agent", header_style="bold",
                       caption=f"gain: what its kept experiments improved {metric_name} by, summed (positive is better)")
        for name in ("agent", "proposals", "keeps", "gain", "cost"):
            agents.add_column(name, justify="left" if name == "agent" else "right")
        for t in tallies:
            agents.add_row(Text(clean(t.agent)), str(t.proposals), str(t.keeps), f"{t.gain:+.6f}", t.cost_text())
        console.print(agents)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """Write progress.png (metric per experiment, kept ones highlighted, the champion's mean and the
    judge's noise band) and report.md; with --html also report.html, one self-contained page with
    the dashboard's chart and tables that opens from disk, offline.
    """
    from .carry import lab_studies, markdown
    from .ledger import Ledger
    from .report import write_report

    lab, tag, experiments = _recorded(args)
    out = Path(args.out) if args.out else lab.root
    with Ledger(lab.ledger_path, readonly=True) as ledger:
        studies = lab_studies(ledger, tag, lab.config)
        runs = [dict(r) for r in ledger.runs(tag)]
    png, md = write_report(experiments, out, lab.config.metric.name, lab.config.metric.direction, tag,
                           k=_band_k(lab.config), sections=markdown(studies, lab.config.metric.name))
    written = [png, md]
    if args.html:
        from .web.export import write_html

        written.append(write_html(lab, experiments, tag, runs, out / "report.html", studies))
    print("wrote " + ", ".join(str(p) for p in written[:-1]) + f" and {written[-1]}")
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    """Replay a tag's kept changes at a larger scale or on another lab, and measure whether they carry over.

    The baseline and the baseline with every kept change merged in (3-way; with --each, every change
    alone as well) are each run --repeats times, in rounds, at the target: constants set with --set
    NAME=VALUE (repeatable; FILE:NAME=VALUE when several files have one), another --budget, or another
    --lab whose files the changes still apply to (one that does not apply is reported). The same
    runner, sandbox and evaluator as `run`; every run is a ledger row and a commit, under a tag of its
    own. The result: each arm's gain over the baseline, paired by round, with a 95% interval, and a
    verdict (carries over, within noise, hurts). Running the same command again resumes it.
    """
    return _study(args, "promote")


def cmd_ablate(args: argparse.Namespace) -> int:
    """Take each kept change out of the champion in turn, and measure what each is worth.

    The champion and, for every kept change, the champion with that change reverted (3-way; one that
    later changes build on is reported) are each run --repeats times, in rounds. Each change's effect:
    the champion's improvement over the champion without it, paired by round, with a 95% interval,
    sorted by effect; a change whose removal does not hurt is flagged as a candidate for
    simplification. --set and --budget measure it at another scale. Running it again resumes it.
    """
    return _study(args, "ablate")


def _study(args: argparse.Namespace, kind: str) -> int:
    from .carry import Study, StudyOptions, parse_setting, summary_lines
    from .loop import default_tag

    lab = find_lab()
    if args.budget is not None and args.budget <= 0:
        raise ConfigError(f"--budget must be positive seconds, not {args.budget:g}")
    options = StudyOptions(kind=kind, source_tag=args.tag or default_tag(lab),
                           settings=tuple(parse_setting(s) for s in args.set), budget=args.budget,
                           repeats=args.repeats, each=getattr(args, "each", False),
                           target=Path(args.lab) if getattr(args, "lab", None) else None,
                           workers=_workers(args.workers), ray=_ray(args.ray), tag=args.name)
    study = Study(lab, options, _view(args.plain))
    print(f"{kind} of tag {options.source_tag} ({len(study.chain)} kept changes) at {study.scale()}: "
          f"tag {study.tag}, {study.repeats} runs per arm")
    reason, result = study.run()
    print("\n".join(summary_lines(study.tag, kind, result, study.target.config.metric.name)))
    if reason != "study finished":
        print(f"not finished ({reason}): run the same command again to resume")
        return 1
    return 0


def _band_k(config: LabConfig) -> float | None:
    """The k of the noise band drawn around the champion (None with a strict judge: no band)."""
    return config.judge.k if config.judge.mode == "noise" else None


def cmd_dashboard(args: argparse.Namespace) -> int:
    """Serve a live, read-only web dashboard of this lab's experiments: the progress chart, every
    experiment with its diff, verdict, log and agent replies, the chain of champions, the workers.

    It opens the ledger read-only and updates by itself while a run goes. It listens on 127.0.0.1
    unless --host says otherwise; any other address requires the access token it prints.
    """
    from .web.server import serve

    lab = find_lab()
    if args.port < 0 or args.port > 65535:
        raise ConfigError(f"--port must be 0..65535, not {args.port}")
    serve(lab, host=args.host, port=args.port)
    return 0


def _recorded(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    """(lab, tag, experiments) for `status` and `report`: --tag, else the latest run."""
    from .ledger import Ledger
    from .loop import default_tag, ledger_path

    lab = find_lab()
    path = ledger_path(lab)
    if not path.exists():
        raise ConfigError("no experiments yet in this lab", "start them with `autoresearch run`")
    tag = args.tag or default_tag(lab)
    with Ledger(path) as ledger:
        experiments = ledger.experiments(tag)
    if not experiments:
        raise ConfigError(f"no experiments with tag {tag!r}", "see the tags with `autoresearch status --tag NAME`")
    return lab, tag, experiments


def cmd_demo(args: argparse.Namespace) -> int:
    """Try everything on this machine in minutes, offline: a lab on the State of the Union corpus,
    a baseline and a few short experiments by the built-in `hparam` agent, and a report.
    """
    from .agents import make_agent
    from .data import prepare_dataset
    from .ledger import Ledger
    from .loop import Loop, RunOptions, ledger_path
    from .report import write_report

    root = Path(args.dir)
    if (root / "autoresearch.toml").exists():
        from .lab import find_lab as _find

        lab = _find(root)
        print(f"Using the demo lab in {lab.root}")
    else:
        lab = init_lab(root, dataset="sotu", preset=args.preset, budget=args.budget)
        print(f"Created demo lab {lab.root}")
    task = lab.config.task
    assert task is not None
    prepare_dataset(task.dataset, task.vocab_size, log=lambda line: print(line, flush=True))
    options = RunOptions(tag="demo", max_experiments=args.experiments)
    with Ledger(ledger_path(lab)) as ledger:
        loop = Loop(lab, make_agent("hparam", lab.root, editable=lab.config.editable), options, ledger,
                    _view(args.plain))
        loop.run()
        png, md = write_report(ledger.experiments("demo"), lab.root, lab.config.metric.name,
                               lab.config.metric.direction, "demo", k=_band_k(lab.config))
    print(f"Report: {md} and {png}")
    print(f"Next: cd {os.path.relpath(lab.root)} && autoresearch status")
    return 0


def _view(plain: bool):  # type: ignore[no-untyped-def]
    from .view import LiveView, PlainView

    return PlainView() if plain or not sys.stdout.isatty() else LiveView()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="autoresearch",
        description="An overnight research lab: propose a change, run it for a fixed budget, keep it only if it helps.",
    )
    parser.add_argument("--version", action="version", version=f"autoresearch {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks (also: AUTORESEARCH_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def add(name: str, handler: Handler) -> argparse.ArgumentParser:
        doc = handler.__doc__ or ""
        summary = doc.strip().splitlines()[0]
        p = sub.add_parser(name, help=summary, description=doc.strip(),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.set_defaults(handler=handler)
        return p

    p = add("init", cmd_init)
    p.add_argument("dir", nargs="?", help="directory of the new lab (must not exist or be empty)")
    p.add_argument("--dataset", default="sotu",
                   help="climbmix, tinystories, sotu (offline, the default) or files:PATH")
    p.add_argument("--preset", default="auto", choices=["auto", *PRESETS],
                   help="device preset (default: auto)")
    p.add_argument("--budget", type=float, default=None, help="training seconds per experiment")
    p.add_argument("--target", default=None, metavar="PATH", help="make an existing git repository a lab instead")
    p.add_argument("--run", default=None, help="with --target: the command that runs one experiment")
    p.add_argument("--editable", action="append", default=[], metavar="GLOB", help="with --target: a file the agent may change (repeatable)")
    p.add_argument("--frozen", action="append", default=[], metavar="GLOB", help="with --target: a file that must not change (repeatable)")
    p.add_argument("--metric", default=None, help="with --target: the metric's name (a `name: value` output line)")
    p.add_argument("--metric-json", default=None, metavar="FILE", help="with --target: read the metric from this JSON file instead")
    p.add_argument("--direction", default="min", choices=["min", "max"], help="with --target: is lower or higher better")

    p = add("prepare", cmd_prepare)
    p.add_argument("--num-shards", type=int, default=None, help="climbmix: training shards to download (default 10)")
    p.add_argument("--workers", type=int, default=8, help="parallel downloads (default 8)")

    p = add("train", cmd_train)
    p.add_argument("--budget", type=float, default=None, help="override the lab's training seconds for this run")

    p = add("run", cmd_run)
    p.add_argument("--agent", action="append", default=None, metavar="SPEC",
                   help="hparam (default, no LLM), openai:MODEL, anthropic:MODEL, claude-code, codex or patches:DIR; "
                        "repeat it to let several agents share the run")
    p.add_argument("--base-url", default=None,
                   help="an OpenAI-compatible server for openai:MODEL (vLLM, Ollama, llama.cpp, LM Studio, OpenRouter)")
    p.add_argument("--max-cost", type=float, default=None, help="stop when the agent has cost this many dollars")
    p.add_argument("--budget", type=float, default=None, help="training seconds per experiment (default: the lab's)")
    p.add_argument("--max-experiments", type=int, default=None, help="stop when the tag has this many experiments")
    p.add_argument("--hours", type=float, default=None, help="stop after this many hours")
    p.add_argument("--tag", default=None, help="name of the run (default: the latest run, else today's date)")
    p.add_argument("--plain", action="store_true", help="print a line per experiment instead of the live view")
    p.add_argument("--workers", default=None, metavar="N|auto",
                   help="experiments at once on this machine (default 1; auto: one per GPU, 1 without a GPU)")
    p.add_argument("--ray", default=None, metavar="ADDRESS",
                   help="run experiments on a Ray cluster, one per GPU: auto (started here with `ray start`) or HOST:PORT")

    for name, handler in (("promote", cmd_promote), ("ablate", cmd_ablate)):
        p = add(name, handler)
        p.add_argument("--tag", default=None, help="the tag whose kept changes to take (default: the latest run)")
        p.add_argument("--set", action="append", default=[], metavar="[FILE:]NAME=VALUE",
                       help="a constant of the editable files at the target, e.g. DEPTH=12 (repeatable)")
        p.add_argument("--budget", type=float, default=None, help="training seconds per run (default: the lab's)")
        p.add_argument("--repeats", type=int, default=None, help="runs of every arm (default: [judge] repeats)")
        if name == "promote":
            p.add_argument("--each", action="store_true", help="also every kept change alone")
            p.add_argument("--lab", default=None, metavar="PATH", help="promote onto another lab (its directory)")
        p.add_argument("--name", default=None, help="the study's tag (default: derived from the command)")
        p.add_argument("--plain", action="store_true", help="print a line per run instead of the live view")
        p.add_argument("--workers", default=None, metavar="N|auto", help="runs at once on this machine")
        p.add_argument("--ray", default=None, metavar="ADDRESS", help="run on a Ray cluster: auto or HOST:PORT")

    p = add("status", cmd_status)
    p.add_argument("--tag", default=None, help="which run (default: the latest)")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = add("report", cmd_report)
    p.add_argument("--tag", default=None, help="which run (default: the latest)")
    p.add_argument("--out", default=None, help="directory for progress.png and report.md (default: the lab)")
    p.add_argument("--html", action="store_true", help="also write report.html, one self-contained page to share")

    p = add("dashboard", cmd_dashboard)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1; 0.0.0.0: every interface, token required)")
    p.add_argument("--port", type=int, default=8765, help="port (default 8765; 0: any free port)")

    p = add("demo", cmd_demo)
    p.add_argument("dir", nargs="?", default="autoresearch-demo", help="where to put the demo lab")
    p.add_argument("--preset", default="cpu", choices=["auto", *PRESETS], help="device preset (default: cpu)")
    p.add_argument("--budget", type=float, default=20, help="training seconds per experiment (default 20)")
    p.add_argument("--experiments", type=int, default=4, help="experiments after the baseline (default 4)")
    p.add_argument("--plain", action="store_true", help="print a line per experiment instead of the live view")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(args.handler(args))
    except AutoresearchError as exc:
        if args.debug or settings.debug():
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
