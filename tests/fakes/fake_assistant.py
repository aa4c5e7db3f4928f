"""A stand-in for the `claude` and `codex` command lines, installed under those names by the tests.

It parses the real flags (an unknown or wrong one fails like the real CLI: exit 2), checks what the
agent promised (AUTORESEARCH_NO_TRAIN=1, not running in the person's checkout, the worktree reset to
the champion), reads the prompt from stdin, edits train.py and answers in the real output format.

FAKE_MODE: good (default) | frozen (also edits prepare.py) | newfile (also adds helpers.py) |
           noop (edits nothing) | hang (ignores SIGTERM, leaves a child, sleeps) | auth (exit 1, login error) |
           overloaded (an error reply in the real format, exit 1) | notice (codex: a recovered error event) |
           lab (a real lab's train.py: scales MATRIX_LR by a factor that differs on every call)
FAKE_RECORD: a directory where the argv, the prompt and child pids are written.
FAKE_FORBIDDEN: the person's checkout; running there is an error.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

MESSAGE = ("I raised the learning rate.\n\nDESCRIPTION: raise LR from 0.1 to 0.2\n"
           "RATIONALE: the loss curve is still falling steeply at the end of the budget,\n"
           "so a larger step should help.")


def fail(message: str, code: int = 3) -> None:
    print(f"fake assistant: {message}", file=sys.stderr)
    sys.exit(code)


def claude_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="claude")
    p.add_argument("-p", "--print", action="store_true", dest="print_mode")
    p.add_argument("--output-format", choices=["text", "json", "stream-json"], default="text")
    p.add_argument("--permission-mode",
                   choices=["default", "acceptEdits", "plan", "auto", "dontAsk", "bypassPermissions"])
    p.add_argument("--tools", nargs="+")
    p.add_argument("--allowedTools", "--allowed-tools", nargs="+", dest="allowed")
    p.add_argument("--disallowedTools", "--disallowed-tools", nargs="+", dest="disallowed")
    p.add_argument("--model")
    p.add_argument("--max-turns", type=int)
    p.add_argument("--append-system-prompt")
    p.add_argument("prompt", nargs="?")
    args = p.parse_args(argv)
    names = lambda values: {n.strip() for v in values or [] for n in v.replace(",", " ").split()}  # noqa: E731
    if not args.print_mode or args.output_format != "json" or args.permission_mode != "acceptEdits":
        fail("expected -p --output-format json --permission-mode acceptEdits", 2)
    if "Bash" in names(args.tools) | names(args.allowed) or "Bash" not in names(args.disallowed):
        fail("Bash must be unavailable", 2)
    if not {"Read", "Edit"} <= names(args.tools):
        fail("the file tools are missing", 2)
    return args


def codex_args(argv: list[str]) -> argparse.Namespace:
    if not argv or argv[0] != "exec":
        fail("usage: codex exec [OPTIONS] [PROMPT]", 2)
    p = argparse.ArgumentParser(prog="codex exec")
    p.add_argument("-s", "--sandbox", choices=["read-only", "workspace-write", "danger-full-access"])
    p.add_argument("-C", "--cd", dest="cd")
    p.add_argument("-m", "--model")
    p.add_argument("--skip-git-repo-check", action="store_true")
    p.add_argument("--json", action="store_true")
    p.add_argument("-o", "--output-last-message", dest="last")
    p.add_argument("prompt", nargs="?")
    args = p.parse_args(argv[1:])
    if args.sandbox != "workspace-write" or not args.cd or not args.last:
        fail("expected --sandbox workspace-write, --cd DIR and --output-last-message FILE", 2)
    os.chdir(args.cd)
    return args


def main() -> None:
    name = Path(sys.argv[0]).name
    args = claude_args(sys.argv[1:]) if name == "claude" else codex_args(sys.argv[1:])
    mode = os.environ.get("FAKE_MODE", "good")
    record = Path(os.environ["FAKE_RECORD"]) if os.environ.get("FAKE_RECORD") else None
    prompt = sys.stdin.read() if args.prompt in (None, "-") else args.prompt
    if record is not None:
        record.mkdir(parents=True, exist_ok=True)
        (record / "argv.json").write_text(json.dumps(sys.argv))
        (record / "prompt.txt").write_text(prompt)
        (record / "cwd.txt").write_text(os.getcwd())
    if os.environ.get("AUTORESEARCH_NO_TRAIN") != "1":
        fail("AUTORESEARCH_NO_TRAIN=1 is not set")
    forbidden = os.environ.get("FAKE_FORBIDDEN")
    if forbidden and Path.cwd().resolve() == Path(forbidden).resolve():
        fail("running in the person's checkout")
    if "DESCRIPTION:" not in prompt or "train.py" not in prompt:
        fail("the prompt lacks the answer format or the editable files")
    if mode == "auth":
        print("Error: authentication failed: invalid API key (401)", file=sys.stderr)
        sys.exit(1)
    if mode == "overloaded":
        if name == "claude":
            print(json.dumps({"type": "result", "subtype": "success", "is_error": True, "num_turns": 1,
                              "result": "API Error: 529 Overloaded", "session_id": "s"}))
        else:
            print(json.dumps({"type": "error", "message": "Reconnecting... 5/5"}))
            print(json.dumps({"type": "turn.failed", "error": {"message": "stream disconnected: 529 Overloaded"}}))
        sys.exit(1)
    if mode == "hang":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        if record is not None:
            (record / "pids.txt").write_text(f"{os.getpid()} {child.pid}")
        time.sleep(600)
    train = Path("train.py")
    source = train.read_text()
    if mode == "lab":
        import re

        calls = len(list(record.glob("call-*"))) if record is not None else 0
        if record is not None:
            (record / f"call-{calls}").write_text("")
        match = re.search(r"^MATRIX_LR = ([0-9.e-]+)", source, re.M)
        if match is None:
            fail("no MATRIX_LR in train.py")
        new = float(match.group(1)) * (1.0 + 0.25 * (calls + 1))
        train.write_text(source[:match.start(1)] + f"{new:.4g}" + source[match.end(1):])
    elif "LR = 0.1\n" not in source or Path("helpers.py").exists():
        fail("the working directory is not the champion")
    if mode not in ("noop", "lab"):
        train.write_text(source.replace("LR = 0.1\n", "LR = 0.2\n"))
    if mode == "frozen":
        Path("prepare.py").write_text(Path("prepare.py").read_text() + "EVAL_TOKENS = 1\n")
    if mode == "newfile":
        Path("helpers.py").write_text("def warmup(step):\n    return min(1.0, step / 100)\n")
    if name == "claude":
        print(json.dumps({"type": "result", "subtype": "success", "is_error": False, "duration_ms": 1234,
                          "duration_api_ms": 1100, "num_turns": 3, "result": MESSAGE, "session_id": "0f1e2d3c",
                          "total_cost_usd": 0.0123, "usage": {"input_tokens": 1200, "output_tokens": 80}}))
        return
    Path(args.last).write_text(MESSAGE)
    print("codex exec: working", file=sys.stderr)
    if args.json:
        if mode == "notice":
            print(json.dumps({"type": "error", "message": "Reconnecting... 1/5"}))
        for event in ({"type": "thread.started", "thread_id": "th_1"}, {"type": "turn.started"},
                      {"type": "item.completed", "item": {"id": "item_0", "type": "agent_message", "text": MESSAGE}},
                      {"type": "turn.completed", "usage": {"input_tokens": 900, "cached_input_tokens": 0,
                                                           "output_tokens": 60}}):
            print(json.dumps(event))
    else:
        print(MESSAGE)


if __name__ == "__main__":
    main()
