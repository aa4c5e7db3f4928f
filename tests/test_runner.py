"""The runner against real subprocesses: outcomes, limits, process trees, logs and environment."""

from __future__ import annotations

import json
import os
import re
import resource
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from autoresearch import sandbox
from autoresearch.config import PASS_ENV
from autoresearch.runner import (RunResult, RunSpec, group_alive, kill_group, parse_summary, run_experiment,
                                 scrub_env, write_handoff_result)

SUMMARY = """print("---")
print("val_bpb:          0.997900")
print("training_seconds: 300.1")
print("peak_vram_mb:     45060.2")
print("num_steps:        953")
"""


def run(tmp_path: Path, source: str, **overrides: Any) -> RunResult:
    """Write `source` to tmp_path/script.py and run it as `python script.py`."""
    (tmp_path / "script.py").write_text(source)
    fields: dict[str, Any] = dict(command="python script.py", cwd=tmp_path, log_path=tmp_path / "logs" / "run.log",
                                  budget=10.0, startup_allowance=0.0, eval_allowance=0.0, grace_seconds=0.5)
    fields.update(overrides)
    return run_experiment(RunSpec(**fields))


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_for_file(path: Path) -> str:
    deadline = time.monotonic() + 10
    while not path.exists() or not path.read_text().strip():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)
    return path.read_text()


def test_ok_parses_the_summary(tmp_path: Path) -> None:
    result = run(tmp_path, 'print("step 1 | loss: 2.5")\n' + SUMMARY)
    assert result.outcome == "ok" and result.exit_code == 0 and result.signal is None and result.error is None
    assert result.summary == {"val_bpb": 0.9979, "training_seconds": 300.1, "peak_vram_mb": 45060.2,
                              "num_steps": 953.0}
    assert result.log_path.read_text().startswith("step 1 | loss: 2.5\n---\n")
    assert result.tail.endswith("num_steps:        953") and not result.log_truncated
    assert result.log_bytes == result.log_path.stat().st_size
    assert 0 < result.wall_seconds < 10 and result.peak_rss_mb >= 0  # too short to be sure of a sample
    assert result.sandbox == "none" and result.handoff_seconds is None


def test_parse_summary_uses_the_last_block() -> None:
    text = "---\nval_bpb: 9\n---\nval_bpb: 1.5\nnote:  fast run \nnot a pair\n  steps : 12\n"
    assert parse_summary(text) == {"val_bpb": 1.5, "note": "fast run", "steps": 12.0}
    assert parse_summary("val_bpb: 1.0\n") == {}


def test_syntax_error_is_a_crash(tmp_path: Path) -> None:
    result = run(tmp_path, "def broken(:\n    pass\n")
    assert result.outcome == "crash" and result.exit_code == 1
    assert result.error is not None and result.error.startswith("SyntaxError")


def test_exception_is_a_crash_with_its_last_line(tmp_path: Path) -> None:
    result = run(tmp_path, 'print("starting")\nx = 1 / 0\n')
    assert result.outcome == "crash" and result.error == "ZeroDivisionError: division by zero"
    assert "Traceback" in result.tail


def test_shell_command_without_exception_reports_its_last_line(tmp_path: Path) -> None:
    result = run(tmp_path, "", command="echo preparing; echo 'bad config value' >&2; exit 3")
    assert result.outcome == "crash" and result.exit_code == 3 and result.error == "bad config value"


def test_fail_line_is_nan(tmp_path: Path) -> None:
    result = run(tmp_path, 'import sys\nprint("step 3 | loss: 2.1")\nprint("FAIL")\nsys.exit(1)\n')
    assert result.outcome == "nan" and result.exit_code == 1 and result.error is not None


def test_nan_loss_line_is_nan(tmp_path: Path) -> None:
    result = run(tmp_path, 'print("step 7 | train_loss: nan")\nraise SystemExit(1)\n')
    assert result.outcome == "nan" and result.error == "step 7 | train_loss: nan"


def test_infinite_loop_times_out_and_nothing_survives(tmp_path: Path) -> None:
    pids: list[int] = []
    result = run(tmp_path, "while True:\n    pass\n", budget=1.0, startup_allowance=0.5, eval_allowance=0.5,
                 on_start=lambda pid, pgid: pids.append(pgid))
    assert result.outcome == "timeout" and result.signal == signal.SIGTERM
    assert result.error == "exceeded the 2 s limit (budget 1 s + allowances)"
    assert 2.0 <= result.wall_seconds < 2.0 + 0.5 + 1.0
    assert not group_alive(pids[0])


def test_background_child_ignoring_sigterm_is_killed_after_a_normal_exit(tmp_path: Path) -> None:
    child = tmp_path / "child.pid"
    source = f"""import subprocess, sys, time
from pathlib import Path
code = ("import os, signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "open({str(child)!r}, 'w').write(str(os.getpid())); time.sleep(600)")
subprocess.Popen([sys.executable, "-c", code])
while not Path({str(child)!r}).exists():
    time.sleep(0.01)
time.sleep(0.1)
print("done")
"""
    result = run(tmp_path, source)
    pid = int(wait_for_file(child))
    assert result.outcome == "ok"
    assert not alive(pid)


def test_grandchild_in_its_own_session_is_killed_on_timeout(tmp_path: Path) -> None:
    grandchild = tmp_path / "grandchild.pid"
    # its pid written by the parent as soon as it exists: one interpreter start to make before the limit,
    # not two, on a loaded machine
    source = f"""import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
open({str(grandchild)!r}, 'w').write(str(child.pid))
while True:
    time.sleep(0.05)
"""
    result = run(tmp_path, source, budget=1.5)
    pid = int(wait_for_file(grandchild))
    assert result.outcome == "timeout"
    assert not alive(pid)


def test_huge_output_is_capped_with_head_and_tail_kept(tmp_path: Path) -> None:
    source = """import sys
out = sys.stdout.buffer
out.write(b"HEAD OF THE LOG\\n")
line = b"x" * 1023 + b"\\n"
for _ in range(100):
    out.write(line * 1024)
out.flush()
""" + SUMMARY
    cap = 4 * 2**20
    me = psutil.Process()
    rss_before, peak_before = me.memory_info().rss, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.monotonic()
    result = run(tmp_path, source, log_cap_bytes=cap)
    assert time.monotonic() - start < 10
    assert me.memory_info().rss - rss_before < 50 * 2**20
    assert (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before) * 1024 < 50 * 2**20
    assert result.outcome == "ok" and result.log_truncated
    assert result.log_bytes > 100 * 2**20
    size = result.log_path.stat().st_size
    assert cap <= size <= cap + 100
    assert result.summary["val_bpb"] == 0.9979 and result.summary["num_steps"] == 953.0
    with result.log_path.open("rb") as f:
        assert f.readline() == b"HEAD OF THE LOG\n"
    data = result.log_path.read_bytes()
    marker = re.search(rb"\[\.\.\. (\d+) bytes omitted \.\.\.\]\n", data)
    assert marker is not None
    assert int(marker.group(1)) == result.log_bytes - (cap - cap // 2) - (len(data) - marker.end())


def test_memory_limit_turns_a_huge_allocation_into_oom(tmp_path: Path) -> None:
    result = run(tmp_path, "buffer = bytearray(4 * 2**30)\n", memory_limit_bytes=2**30)
    assert result.outcome == "oom" and result.error == "MemoryError"


def test_peak_rss_sums_the_tree(tmp_path: Path) -> None:
    source = """import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; b = b'x' * (120 * 2**20); time.sleep(0.8)"])
b = b"y" * (120 * 2**20)
child.wait()
"""
    result = run(tmp_path, source, sample_seconds=0.1)
    assert result.outcome == "ok" and result.peak_rss_mb > 240


def test_cpu_seconds_count_the_tree_busy_or_idle(tmp_path: Path) -> None:
    # each process spins for 1.5 s of its own CPU time, not wall time, so the total is the same on a loaded
    # machine (where it only takes longer); each then sleeps, so samples see its total before it ends
    busy = """import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time\\nwhile time.process_time() < 1.5: pass\\ntime.sleep(1.0)"])
while time.process_time() < 1.5:
    pass
time.sleep(1.0)
child.wait()
"""
    result = run(tmp_path, busy, budget=120.0, sample_seconds=0.1)
    assert result.outcome == "ok" and result.cpu_seconds is not None
    assert 2.9 <= result.cpu_seconds <= 2 * result.wall_seconds  # two processes, each 1.5 s of spinning
    idle = run(tmp_path, "import time\ntime.sleep(1.5)\n", sample_seconds=0.1)
    assert idle.cpu_seconds is not None and idle.cpu_seconds < 0.5 and idle.wall_seconds >= 1.5


def test_empty_command_is_a_crash(tmp_path: Path) -> None:
    result = run(tmp_path, "", command=[])
    assert result.outcome == "crash" and result.error == "cannot start the command: the command is empty"


@pytest.mark.parametrize("sig,outcome", [(signal.SIGKILL, "killed"), (signal.SIGTERM, "killed")])
def test_signal_from_elsewhere_is_killed(tmp_path: Path, sig: int, outcome: str) -> None:
    timers: list[threading.Timer] = []

    def on_start(pid: int, pgid: int) -> None:
        timers.append(threading.Timer(0.5, os.kill, (pid, sig)))
        timers[0].start()

    result = run(tmp_path, "import time\ntime.sleep(30)\n", command=[sys.executable, "script.py"],
                 on_start=on_start)
    assert result.outcome == outcome and result.signal == sig and result.exit_code is None
    assert result.error == f"killed by {signal.Signals(sig).name}"
    assert result.wall_seconds < 5


def test_only_allowed_variables_pass_secrets_never_and_extra_env_is_added(tmp_path: Path) -> None:
    env = {**os.environ, "FOO_API_KEY": "k", "GITHUB_TOKEN": "t", "MY_SECRET_THING": "s", "hf_token": "h",
           "DB_PASSWORD": "p", "PLAIN_SETTING": "plain", "SSH_AUTH_SOCK": "/run/agent", "AWS_SESSION": "x",
           "OMP_NUM_THREADS": "2", "CUDA_VISIBLE_DEVICES": "0", "TORCH_SECRET_TOKEN": "s", "HOME": "/root"}
    dump = tmp_path / "env.json"
    source = f"import json, os\nopen({str(dump)!r}, 'w').write(json.dumps(dict(os.environ)))\n"
    result = run(tmp_path, source, env=env, extra_env={"AUTORESEARCH_BUDGET": "60"})
    assert result.outcome == "ok"
    seen = json.loads(dump.read_text())
    assert not set(seen) & {"FOO_API_KEY", "GITHUB_TOKEN", "MY_SECRET_THING", "hf_token", "DB_PASSWORD",
                            "PLAIN_SETTING", "SSH_AUTH_SOCK", "AWS_SESSION", "TORCH_SECRET_TOKEN"}
    assert {"PATH", "OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES", "AUTORESEARCH_BUDGET", "AUTORESEARCH_CACHE"} <= set(seen)
    assert seen["HOME"] != "/root" and not Path(seen["HOME"]).exists()  # private to the run, then removed
    more = run(tmp_path, source, env=env, pass_env=(*PASS_ENV, "plain_*", "TORCH_SECRET_*"))
    seen = json.loads(dump.read_text())
    assert more.outcome == "ok" and seen["PLAIN_SETTING"] == "plain" and "TORCH_SECRET_TOKEN" not in seen


def test_scrub_env_matches_names_case_insensitively() -> None:
    env = {"Openai_Api_Key": "1", "SECRETARY": "2", "TOKENIZERS_PARALLELISM": "3", "HOME": "/h"}
    assert scrub_env(env, ("*_API_KEY", "*SECRET*", "*_TOKEN")) == {"TOKENIZERS_PARALLELISM": "3", "HOME": "/h"}


def test_on_start_gets_the_group_leader_and_on_tick_ticks(tmp_path: Path) -> None:
    seen: list[tuple[int, int]] = []
    ticks: list[float] = []
    ids = tmp_path / "ids.txt"
    source = f"import os, time\nopen({str(ids)!r}, 'w').write(f'{{os.getpid()}} {{os.getpgrp()}}')\ntime.sleep(1.3)\n"
    result = run(tmp_path, source, command=[sys.executable, "script.py"],
                 on_start=lambda pid, pgid: seen.append((pid, pgid)), on_tick=ticks.append, tick_seconds=0.25)
    assert result.outcome == "ok"
    pid, pgid = map(int, ids.read_text().split())
    assert seen == [(pgid, pgid)] and pid != pgid  # the reaper leads the run's group; the command is its child
    assert len(ticks) >= 3 and ticks == sorted(ticks) and ticks[-1] < result.wall_seconds + 0.1


def test_keyboard_interrupt_kills_the_group_and_propagates(tmp_path: Path) -> None:
    pgids: list[int] = []

    def interrupt(elapsed: float) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, "import time\ntime.sleep(30)\n", on_start=lambda pid, pgid: pgids.append(pgid),
            on_tick=interrupt, tick_seconds=0.2)
    assert pgids and not group_alive(pgids[0])


def test_kill_group_ends_a_detached_group() -> None:
    stubborn = ("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ignoring', flush=True); "
                "time.sleep(600)")
    procs = [subprocess.Popen(["sleep", "600"], start_new_session=True),
             subprocess.Popen([sys.executable, "-c", stubborn], start_new_session=True, stdout=subprocess.PIPE)]
    out = procs[1].stdout
    assert out is not None
    try:
        # the handler is in place before the SIGTERM comes (a fixed sleep can be too short on a loaded machine)
        assert out.readline() == b"ignoring\n"
        for proc in procs:
            assert group_alive(proc.pid)
            start = time.monotonic()
            kill_group(proc.pid, grace_seconds=0.5)
            assert not group_alive(proc.pid) and time.monotonic() - start < 4
            assert proc.wait(timeout=5) in (-signal.SIGTERM, -signal.SIGKILL)
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
        out.close()
    assert procs[1].returncode == -signal.SIGKILL


def test_kill_group_refuses_our_own_group() -> None:
    with pytest.raises(ValueError):
        kill_group(os.getpgrp())


def test_missing_cwd_is_a_crash_not_an_exception(tmp_path: Path) -> None:
    result = run(tmp_path, "", cwd=tmp_path / "nowhere")
    assert result.outcome == "crash" and result.exit_code is None
    assert result.error is not None and "nowhere" in result.error
    assert "nowhere" in result.log_path.read_text()


def test_missing_executable_is_a_crash(tmp_path: Path) -> None:
    result = run(tmp_path, "", command=["no-such-program-anywhere", "x"])
    assert result.outcome == "crash" and result.error is not None and "no-such-program-anywhere" in result.error


def test_python_word_is_replaced_by_the_given_interpreter(tmp_path: Path) -> None:
    bindir = tmp_path / "my interpreters"
    bindir.mkdir()
    wrapper = bindir / "py"
    wrapper.write_text(f"#!/bin/sh\nWRAPPED=yes exec {sys.executable} \"$@\"\n")
    wrapper.chmod(0o755)
    out = tmp_path / "out.txt"
    result = run(tmp_path, f"import os\nopen({str(out)!r}, 'w').write(os.environ.get('WRAPPED', 'no'))\n",
                 python=str(wrapper))
    assert result.outcome == "ok" and out.read_text() == "yes"


HANDOFF = """import sys, time
from pathlib import Path
handoff = Path(sys.argv[1])
time.sleep(1.0)
(handoff / "model.pt2").write_bytes(b"trained weights")
(handoff / "ready").write_text(repr(time.monotonic()))  # when it was written (the clock is the machine's)
while not (handoff / "result.json").exists():
    time.sleep(0.02)
print("RESULT " + (handoff / "result.json").read_text())
"""
MODES = [pytest.param("none"), pytest.param("bwrap", marks=pytest.mark.skipif(
    sandbox.bwrap_executable() is None, reason="bubblewrap is not installed or cannot create namespaces here"))]


def run_handoff(tmp_path: Path, mode: str, evaluate: Any, source: str = HANDOFF, **overrides: Any) -> RunResult:
    """Run `source` with its handoff directory inside a state directory that the sandbox hides."""
    handoff = tmp_path / "state" / "handoff"
    return run(tmp_path, source, command=[sys.executable, "script.py", str(handoff)], handoff_dir=handoff,
               on_handoff=evaluate, sandbox=mode, hidden=(tmp_path / "state",), **overrides)


def printed_result(result: RunResult) -> dict[str, Any]:
    line = next(line for line in result.log_path.read_text().splitlines() if line.startswith("RESULT "))
    printed: dict[str, Any] = json.loads(line[len("RESULT "):])
    return printed


@pytest.mark.parametrize("mode", MODES)
def test_handoff_is_timed_from_outside_and_evaluated_once(tmp_path: Path, mode: str) -> None:
    handoff = tmp_path / "state" / "handoff"
    handoff.mkdir(parents=True)
    (handoff / "ready").touch()  # stale, from an earlier attempt: must not fire at spawn
    (handoff / "result.json").write_text('{"val_bpb": 0.1}')
    spawned: list[float] = []
    calls: list[tuple[float, bytes]] = []

    def evaluate(model: Path) -> dict[str, float]:
        calls.append((time.monotonic(), model.read_bytes()))
        assert handoff not in model.parents  # a copy, out of the run's reach
        return {"val_bpb": 1.25}

    result = run_handoff(tmp_path, mode, evaluate, on_start=lambda pid, pgid: spawned.append(time.monotonic()))
    assert result.outcome == "ok" and result.sandbox == mode, result.tail
    # seen soon after the run wrote it (1 s after its start, on the run's clock, which is the machine's),
    # however long a loaded machine took to start it
    written = float((handoff / "ready").read_text()) - spawned[0]
    assert result.handoff_seconds is not None and 0.9 <= written <= result.handoff_seconds <= written + 0.5
    assert len(calls) == 1 and calls[0][1] == b"trained weights"
    assert abs(calls[0][0] - spawned[0] - result.handoff_seconds) < 0.2
    assert printed_result(result) == {"val_bpb": 1.25}


@pytest.mark.parametrize("mode", MODES)
def test_a_raising_evaluator_still_answers_the_run(tmp_path: Path, mode: str) -> None:
    def evaluate(model: Path) -> None:
        raise RuntimeError("the model file is corrupt")

    result = run_handoff(tmp_path, mode, evaluate)
    assert result.outcome == "ok" and result.handoff_seconds is not None, result.tail
    assert printed_result(result) == {"error": "RuntimeError: the model file is corrupt"}


def test_an_evaluator_that_writes_nothing_still_answers_the_run(tmp_path: Path) -> None:
    result = run_handoff(tmp_path, "none", lambda model: None)
    assert result.outcome == "ok"
    assert printed_result(result) == {"error": "the evaluator returned no result"}


def test_the_limit_covers_the_evaluation_and_the_evaluator_is_awaited(tmp_path: Path) -> None:
    finished: list[float] = []

    def evaluate(model: Path) -> dict[str, float]:
        time.sleep(2.0)  # still evaluating when the limit kills the run at 1.5 s
        finished.append(time.monotonic())
        return {"val_bpb": 1.0}

    quick = HANDOFF.replace("time.sleep(1.0)", "time.sleep(0.1)")  # handed over well before the limit, even
    result = run_handoff(tmp_path, "none", evaluate, source=quick, budget=1.5)  # when the start is slow
    returned = time.monotonic()
    assert result.outcome == "timeout" and result.handoff_seconds is not None
    assert finished and finished[0] <= returned


def test_handoff_without_ready_is_not_timed(tmp_path: Path) -> None:
    calls: list[Path] = []
    result = run_handoff(tmp_path, "none", calls.append, source="print('no handoff')\n")
    assert result.outcome == "ok" and result.handoff_seconds is None and calls == []


def test_write_handoff_result_replaces_a_planted_link(tmp_path: Path) -> None:
    victim = tmp_path / "outside.txt"
    victim.write_text("precious")
    handoff = tmp_path / "handoff"
    handoff.mkdir()
    (handoff / "result.json").symlink_to(victim)
    write_handoff_result(handoff, {"val_bpb": 1.5})
    assert victim.read_text() == "precious" and not (handoff / "result.json").is_symlink()
    assert json.loads((handoff / "result.json").read_text()) == {"val_bpb": 1.5}
    assert sorted(p.name for p in handoff.iterdir()) == ["result.json"]
