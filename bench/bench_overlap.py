"""Agent time vs run time, and training-time utilization with and without preparing the next
proposal while the current experiment runs (not a test: prints figures).

    python bench/bench_overlap.py [--delay 30] [--budget 60] [--experiments 4]

The agent is the real OpenAI SDK against a local fake server that answers after `--delay` seconds;
the experiment is a target whose run sleeps for `--budget` seconds (CPU-free, so the figures do not
depend on the machine's load). Utilization = time spent running experiments / loop wall time.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))  # for the runs
sys.path.insert(0, str(REPO / "tests"))

from autoresearch.agents import make_agent  # noqa: E402
from autoresearch.lab import find_lab, init_target  # noqa: E402
from autoresearch.ledger import Ledger  # noqa: E402
from autoresearch.loop import Loop, RunOptions, ledger_path  # noqa: E402
from autoresearch.view import PlainView  # noqa: E402
from fake_llm import Delay, FakeLLM, Reply  # noqa: E402

TARGET = '''import time
# Hyperparameters
RATE = 0.5        # a knob
time.sleep({budget})
print("---")
print(f"score: {{abs(RATE - 0.25):.4f}}")
'''


def reply(value: float) -> str:
    return (f"DESCRIPTION: RATE {value}\nRATIONALE: try it.\n\nbench.py\n<<<<<<< SEARCH\n"
            f"RATE = 0.5        # a knob\n=======\nRATE = {value}        # a knob\n>>>>>>> REPLACE\n")


def one(args: argparse.Namespace, overlap: bool) -> None:
    os.environ["OPENAI_API_KEY"] = "sk-bench"
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "target"
        repo.mkdir()
        (repo / "bench.py").write_text(TARGET.format(budget=args.budget))
        subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
        subprocess.run(["git", "add", "-A"], cwd=repo, check=True)
        subprocess.run(["git", "-c", "user.name=b", "-c", "user.email=b@b", "commit", "-qm", "init"], cwd=repo, check=True)
        init_target(repo, run="python bench.py", editable=["bench.py"], metric="score", budget=args.budget)
        script = [Delay(args.delay, then=Reply(reply(0.6 + i / 100))) for i in range(args.experiments + 2)]
        with FakeLLM(script=script, key="sk-bench") as server:
            lab = find_lab(repo)
            agent = make_agent("openai:bench", repo, {"base_url": server.openai_base_url,
                                                       "reply_format": "blocks"}, editable=["bench.py"])
            agent.slow = overlap  # type: ignore[attr-defined]
            with Ledger(ledger_path(lab)) as ledger:
                loop = Loop(lab, agent, RunOptions(tag="b", max_experiments=args.experiments), ledger, PlainView())
                loop.run()  # the baseline first: not part of the measurement
                rows = ledger.experiments("b")
        runs = [e for e in rows if e.kind == "experiment"]
        start = min(e.created_at - (e.wait_seconds or 0) for e in runs)
        end = max(e.finished_at or 0 for e in runs)
        wall = end - start
        busy = sum(e.run_seconds or 0 for e in runs)
        print(f"overlap {'on ' if overlap else 'off'}: {len(runs)} experiments; agent time per experiment "
              f"{sum(e.propose_seconds or 0 for e in runs) / len(runs):.1f} s, loop waited "
              f"{sum(e.wait_seconds or 0 for e in runs) / len(runs):.1f} s, run {busy / len(runs):.1f} s; "
              f"utilization {busy / wall:.1%} (budget {args.budget:g} s, agent delay {args.delay:g} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--delay", type=float, default=30)
    parser.add_argument("--budget", type=float, default=60)
    parser.add_argument("--experiments", type=int, default=4)
    args = parser.parse_args()
    for overlap in (False, True):
        one(args, overlap)


if __name__ == "__main__":
    main()
