"""Fault injection through `patches:`: every failure is classified, the loop goes on, and the
ledger, results.tsv and the champion branch stay consistent."""

from __future__ import annotations

from pathlib import Path

import psutil
import pytest

from test_loop import BENCH, diff, experiments, git, make_target, run_loop, write_patches

FAULTS = [
    ("syntax error", BENCH.replace("score = abs", "score = (abs"), "invalid", "does not compile"),
    ("exception", BENCH.replace('print("---")', 'raise RuntimeError("boom")'), "crash", "RuntimeError: boom"),
    ("nan loss", BENCH.replace('print("---")', 'print("step 3 loss nan"); print("FAIL"); raise SystemExit(1)'),
     "crash", "NaN or exploding loss"),
    ("infinite loop", BENCH.replace('print("---")', "while True: pass"), "timeout", "limit"),
    ("child outlives parent", BENCH.replace('print("---")', '''import subprocess, sys, os
child = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"])
open(os.environ["PID_FILE"], "w").write(str(child.pid))
print("---")'''), "discard", None),
    ("100 MB of output", BENCH.replace('print("---")', '''import sys
block = ("x" * 1023 + "\\n") * 1024
for _ in range(100):
    sys.stdout.write(block)
print("---")'''), "discard", None),
    ("memory blow-up", BENCH.replace('print("---")', "hog = bytearray(8 * 2**30)"), "crash", "out of memory: MemoryError"),
]


@pytest.mark.slow
def test_every_fault_is_classified_and_the_loop_goes_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repo = make_target(tmp_path)
    toml = repo / "autoresearch.toml"
    toml.write_text(toml.read_text().replace("startup_allowance = 60", "startup_allowance = 2")
                    .replace("eval_allowance = 120", "eval_allowance = 1")
                    .replace("budget = 5", "budget = 1\nmemory_limit_gb = 2\nlog_cap_mb = 2\npass_env = [\"PID_FILE\"]"))
    git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "limits for the fault tests")
    pid_file = tmp_path / "child.pid"
    monkeypatch.setenv("PID_FILE", str(pid_file))
    better = BENCH.replace("WIDTH = 10 ", "WIDTH = 16 ")
    patches = [diff("bench.py", BENCH, text, name) for name, text, _, _ in FAULTS]
    patches += [diff("data.txt", "frozen input\n", "edited\n", "edit a frozen file"),
                diff("bench.py", BENCH, "", "delete the program").replace("+++ b/bench.py", "+++ /dev/null"),
                diff("bench.py", BENCH, better, "a real improvement")]
    run_loop(repo, f"patches:{write_patches(tmp_path / 'patches', patches)}")
    rows = experiments(repo)
    expected = [status for _, _, status, _ in FAULTS] + ["invalid", "crash", "keep"]
    assert [e.status for e in rows[1:]] == expected, [(e.description, e.status, e.reason) for e in rows]
    for e, (name, _, _, needle) in zip(rows[1:], FAULTS):
        if needle:
            assert needle in (e.reason or ""), (name, e.reason)
    assert rows[-2].commit_sha  # the deletion is a real commit too
    # the child that ignored SIGTERM did not survive its run
    pid = int(pid_file.read_text())
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    # 100 MB of output: the log is capped, the summary at its end still parsed
    big = next(e for e in rows if e.description == "100 MB of output")
    assert Path(big.log_path or "").stat().st_size < 3 * 2**20 and big.metric == pytest.approx(9.5)
    # ledger, results.tsv and git agree
    tsv = (repo / "results.tsv").read_text().splitlines()
    assert len(tsv) == 1 + len(rows)
    assert [line.split("\t")[3] for line in tsv[1:]] == [
        "keep" if e.status == "keep" else "discard" if e.status == "discard" else "crash" for e in rows]
    assert git(repo, "rev-parse", "refs/heads/autoresearch/t1") == rows[-1].commit_sha
    assert git(repo, "rev-parse", "HEAD") == git(repo, "rev-parse", "main")
