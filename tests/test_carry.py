"""promote and ablate (carry.py): a tag's kept chain replayed at another scale or on another lab, and
each kept change taken out of the champion, measured in paired rounds. Toy targets (deterministic
scores) for the exact figures, real git, SQLite and subprocesses; kill -9 and resume; the built-in
task on the tiny preset end to end (slow)."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from autoresearch.carry import judge_arm, parse_setting, t975
from autoresearch.cli import main
from autoresearch.errors import ConfigError
from autoresearch.ledger import Ledger
from conftest import REPO, prepared_tiny_lab, run_cli
from test_loop import BENCH, diff, experiments, git, make_target, run_loop, write_patches

WIDE = BENCH.replace("WIDTH = 10 ", "WIDTH = 15 ")
FORMULA = "score = abs(WIDTH - 17) + abs(RATE - 0.25) * 10"


def night(tmp_path: Path, patches: list[str], bench: str = BENCH) -> Path:
    """A toy target whose tag t1 kept every one of `patches` (strict judge: each is lower)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    repo = make_target(tmp_path, bench)
    run_loop(repo, f"patches:{write_patches(tmp_path / 'patches', patches)}")
    assert [e.status for e in experiments(repo)] == ["keep"] * (1 + len(patches))
    return repo


def two_changes(tmp_path: Path) -> Path:
    """WIDTH 10 -> 15 (score 9.5 -> 4.5), then RATE 0.5 -> 0.3 (-> 2.5): constants on adjacent lines."""
    return night(tmp_path, [diff("bench.py", BENCH, WIDE, "width 15"),
                            diff("bench.py", WIDE, WIDE.replace("RATE = 0.5 ", "RATE = 0.3 "), "rate 0.3")])


def cli(repo: Path, monkeypatch: pytest.MonkeyPatch, *args: str) -> int:
    monkeypatch.chdir(repo)
    return main([*args, *(["--plain"] if args[0] in ("promote", "ablate") else [])])


def study_rows(repo: Path, kind: str) -> tuple[str, list]:
    with Ledger(repo / ".autoresearch" / "ledger.db") as ledger:
        tags = [t for t in ledger.tags() if f"-{kind}-" in t]
        assert len(tags) == 1, tags
        return tags[0], ledger.experiments(tags[0])


def test_promote_replays_the_chain_at_the_target_and_each_change_alone(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    repo = two_changes(tmp_path)
    tsv = (repo / "results.tsv").read_text()
    assert cli(repo, monkeypatch, "promote", "--set", "PAUSE=0.01", "--repeats", "2", "--each") == 0
    out = capsys.readouterr().out
    tag, rows = study_rows(repo, "promote")
    assert tag.startswith("t1-promote-") and f"tag {tag}, 2 runs per arm" in out
    arms = [e for e in rows if e.kind != "repeat"]
    assert [(e.kind, e.meta["arm"]) for e in arms] == [("baseline", "baseline"), ("experiment", "chain"),
                                                      ("experiment", "each:2"), ("experiment", "each:3")]
    repeats = [e for e in rows if e.kind == "repeat"]
    assert sorted(e.repeat_of for e in repeats) == [e.id for e in arms]  # one more round of each
    assert all(e.status == "measured" and e.meta["round"] == 1 for e in repeats)
    # every run is a commit under refs/autoresearch/experiments/, made from the kept commits
    for e in rows:
        assert git(repo, "rev-parse", f"refs/autoresearch/experiments/{e.id}") == e.commit_sha
    base, chain, alone2, alone3 = (git(repo, "show", f"{e.commit_sha}:bench.py") for e in arms)
    assert "PAUSE = 0.01" in base and "WIDTH = 10 " in base and "RATE = 0.5 " in base
    assert "PAUSE = 0.01" in chain and "WIDTH = 15 " in chain and "RATE = 0.3 " in chain
    assert "WIDTH = 15 " in alone2 and "RATE = 0.5 " in alone2
    assert "WIDTH = 10 " in alone3 and "RATE = 0.3 " in alone3  # a constant change merges by value
    # deterministic scores: the gains to the digit, a zero-width interval (strict judge: no σ floor)
    assert [(e.status, e.reason) for e in arms[1:]] == [
        ("keep", "carries over: gain +7.000000 ± 0.000000 (95% interval, 2 pairs)"),
        ("keep", "carries over: gain +5.000000 ± 0.000000 (95% interval, 2 pairs)"),
        ("keep", "carries over: gain +2.000000 ± 0.000000 (95% interval, 2 pairs)")]
    assert arms[0].status == "keep" and arms[0].metric == 9.5
    assert "the kept chain (2 changes) at PAUSE=0.01: +7.000000 ± 0.000000 (2 pairs) -> carries over" in out
    # the night's own files and default tag are untouched
    assert (repo / "results.tsv").read_text() == tsv
    assert cli(repo, monkeypatch, "report") == 0
    report = (repo / "report.md").read_text()
    assert report.startswith("# autoresearch run `t1`") and "## Promotions" in report and f"### `{tag}`" in report
    assert "| the kept chain (2 changes) at PAUSE=0.01 | 2 | 9.500000 | 2.500000 | +7.000000 |" in report
    assert cli(repo, monkeypatch, "report", "--html") == 0  # the page's own card (test_dashboard_browser)
    assert f'"tag":"{tag}","kind":"promote"' in (repo / "report.html").read_text()
    # the same command again: the study is found, nothing runs twice
    assert cli(repo, monkeypatch, "promote", "--set", "PAUSE=0.01", "--repeats", "2", "--each") == 0
    assert [(e.id, e.status, e.reason) for e in study_rows(repo, "promote")[1]] == [(e.id, e.status, e.reason)
                                                                                for e in rows]
    # more rounds later: the same tag, two more runs per arm
    assert cli(repo, monkeypatch, "promote", "--set", "PAUSE=0.01", "--repeats", "3", "--each") == 0
    assert len(study_rows(repo, "promote")[1]) == len(rows) + 4


def test_a_change_that_does_not_apply_on_another_lab_is_reported(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    formula = WIDE.replace(FORMULA, FORMULA.replace("* 10", "* 5"))
    repo = night(tmp_path / "small", [diff("bench.py", BENCH, WIDE, "width 15"),
                                      diff("bench.py", WIDE, formula, "a gentler rate term")])
    (tmp_path / "big").mkdir()
    other = make_target(tmp_path / "big", BENCH.replace(FORMULA, FORMULA + " + 1.0"))  # its own formula line
    assert cli(repo, monkeypatch, "promote", "--lab", str(other), "--repeats", "2", "--each") == 0
    tag, rows = study_rows(other, "promote")
    arms = {e.meta["arm"]: e for e in rows if e.kind != "repeat"}
    assert set(arms) == {"baseline", "chain", "each:2", "each:3"}
    chain = arms["chain"]
    assert chain.meta["notes"] == ["#3 (a gentler rate term) does not apply on the target: conflicts in bench.py; "
                                   "left out of the chain"]
    assert arms["each:3"].status == "invalid" and arms["each:3"].commit_sha is None
    assert arms["each:3"].reason == "#3 (a gentler rate term) does not apply on the target: conflicts in bench.py"
    assert arms["baseline"].metric == 10.5 and chain.metric == 5.5  # the other lab's own score, plus the width
    assert chain.reason == "carries over: gain +5.000000 ± 0.000000 (95% interval, 2 pairs)"
    assert not experiments(other)  # the other lab's own night is untouched (it had none)
    monkeypatch.chdir(other)
    assert main(["report", "--tag", tag]) == 0
    report = (other / "report.md").read_text()
    assert "not measured: #3 (a gentler rate term) does not apply on the target" in report
    assert "- #3 (a gentler rate term) does not apply on the target: conflicts in bench.py; left out of the chain" in report


def test_ablate_measures_each_change_left_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    wider = WIDE.replace("WIDTH = 15 ", "WIDTH = 17 ")
    rate = wider.replace("RATE = 0.5 ", "RATE = 0.3 ")
    repo = night(tmp_path, [diff("bench.py", BENCH, WIDE, "width 15"), diff("bench.py", WIDE, wider, "width 17"),
                            diff("bench.py", wider, rate, "rate 0.3")])
    assert cli(repo, monkeypatch, "ablate", "--repeats", "2") == 0
    out = capsys.readouterr().out
    tag, rows = study_rows(repo, "ablate")
    arms = {e.meta["arm"]: e for e in rows if e.kind != "repeat"}
    assert arms["champion"].kind == "baseline" and arms["champion"].metric == 0.5
    # width 15 is built on by width 17 (the same constant): it cannot be taken out alone
    assert arms["without:2"].status == "invalid"
    assert arms["without:2"].reason == ("#2 cannot be taken out alone (later changes build on it): bench.py: "
                                        "WIDTH is 17 at the target, not 15")
    assert arms["without:3"].metric == 2.5 and arms["without:4"].metric == 2.5  # WIDTH back to 15; RATE back to 0.5
    assert arms["without:3"].reason == "needed: removing it hurts: effect +2.000000 ± 0.000000 (95% interval, 2 pairs)"
    lines = [line for line in out.splitlines() if line.startswith("  #")]
    assert [line.split(":")[0] for line in lines] == [f"  #{arms['without:3'].id} without #3",
                                                      f"  #{arms['without:4'].id} without #4",
                                                      f"  #{arms['without:2'].id} without #2"]  # by effect, unmeasured last
    assert cli(repo, monkeypatch, "report") == 0
    assert "## Ablations" in (repo / "report.md").read_text()


def test_the_interval_and_the_verdicts() -> None:
    assert judge_arm([], "min", "promote")[3].startswith("not measured")
    assert judge_arm([(2.0, 1.9)], "min", "promote")[:3] == (pytest.approx(0.1), None, None)
    gain, low, high, verdict = judge_arm([(2.0, 1.9), (2.1, 1.9), (2.0, 1.95)], "min", "promote")
    diffs = [0.1, 0.2, 0.05]
    sd = math.sqrt(sum((d - sum(diffs) / 3) ** 2 for d in diffs) / 2)
    assert gain == pytest.approx(0.35 / 3) and high - gain == pytest.approx(4.303 * sd / math.sqrt(3))
    assert low is not None and low < 0 and verdict == "within noise"
    assert judge_arm([(2.0, 1.5), (2.0, 1.6), (2.0, 1.55)], "min", "promote")[3] == "carries over"
    assert judge_arm([(2.0, 2.5), (2.0, 2.6), (2.0, 2.55)], "min", "promote")[3] == "hurts"
    assert judge_arm([(1.0, 1.5), (1.0, 1.6), (1.0, 1.55)], "max", "promote")[3] == "carries over"
    assert judge_arm([(1.0, 1.5), (1.0, 1.6)], "max", "promote")[3] == "within noise"  # t(1) = 12.7: wide
    # an ablation: the champion (reference) against it without the change
    assert judge_arm([(1.5, 2.0), (1.5, 2.1), (1.5, 2.05)], "min", "ablate")[3] == "needed: removing it hurts"
    assert judge_arm([(1.5, 1.5), (1.6, 1.5), (1.5, 1.55)], "min", "ablate")[3].endswith("a candidate for simplification")
    assert judge_arm([(2.0, 1.5), (2.0, 1.6), (2.0, 1.55)], "min", "ablate")[3].startswith("removing it helps")
    # identical runs (fixed seeds) do not make a tiny gain real: the judge's σ floor
    assert judge_arm([(2.0, 1.999), (2.0, 1.999)], "min", "promote", sigma_floor=0.002)[3] == "within noise"
    assert judge_arm([(2.0, 1.999), (2.0, 1.999)], "min", "promote")[3] == "carries over"
    assert t975(1) == 12.706 and t975(200) == 1.96


def test_settings_are_parsed_and_checked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    assert parse_setting("DEPTH=12").value == 12 and parse_setting("train.py:LR=0.02").file == "train.py"
    assert parse_setting('WINDOW="SSSL"').value == "SSSL" and parse_setting("WINDOW=SSSL").value == "SSSL"
    for bad in ("depth=3", "DEPTH", "=3", "DEPTH=[1, 2]"):
        with pytest.raises(ConfigError):
            parse_setting(bad)
    repo = two_changes(tmp_path)
    assert cli(repo, monkeypatch, "promote", "--set", "NOPE=1", "--repeats", "2") == 1
    err = capsys.readouterr().err
    assert err.startswith("error: --set NOPE=1: no editable file has a module-level constant NOPE"), err
    assert cli(repo, monkeypatch, "promote", "--repeats", "1") == 1
    assert "--repeats must be at least 2" in capsys.readouterr().err
    assert cli(repo, monkeypatch, "promote", "--tag", "nothing") == 1
    assert "no experiments with tag 'nothing'" in capsys.readouterr().err
    assert cli(repo, monkeypatch, "promote", "--lab", str(tmp_path), "--repeats", "2") == 1
    assert "no autoresearch.toml there" in capsys.readouterr().err


def test_a_tag_with_nothing_kept_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    repo = make_target(tmp_path)
    worse = diff("bench.py", BENCH, BENCH.replace("WIDTH = 10 ", "WIDTH = 5 "), "width 5")
    run_loop(repo, f"patches:{write_patches(tmp_path / 'patches', [worse])}")
    assert cli(repo, monkeypatch, "ablate") == 1
    assert "tag 't1' has no kept change to ablate" in capsys.readouterr().err


SLOW = BENCH.replace("PAUSE = 0.0 ", "PAUSE = 0.6 ")


def test_kill_9_during_promote_then_the_same_command_resumes(tmp_path: Path) -> None:
    slow_wide = SLOW.replace("WIDTH = 10 ", "WIDTH = 15 ")
    repo = night(tmp_path, [diff("bench.py", SLOW, slow_wide, "width 15"),
                            diff("bench.py", slow_wide, slow_wide.replace("RATE = 0.5 ", "RATE = 0.3 "), "rate 0.3")],
                 bench=SLOW)
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    command = [sys.executable, "-m", "autoresearch", "promote", "--repeats", "3", "--each", "--plain"]
    proc = subprocess.Popen(command, cwd=repo, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    ledger_path = repo / ".autoresearch" / "ledger.db"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # kill it in the middle of its runs
        time.sleep(0.1)
        with Ledger(ledger_path) as ledger:
            tags = [t for t in ledger.tags() if "-promote-" in t]
            done = [e for e in ledger.experiments(tags[0]) if e.status == "measured"] if tags else []
            running = [e for e in ledger.experiments(tags[0]) if e.status == "running"] if tags else []
        if len(done) >= 3 and running:
            break
    assert proc.poll() is None, proc.communicate()[1]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    again = subprocess.run(command, cwd=repo, env=env, capture_output=True, text=True, timeout=240)
    assert again.returncode == 0, again.stderr
    assert "resuming study" in again.stdout
    tag, rows = study_rows(repo, "promote")
    arms = [e for e in rows if e.kind != "repeat"]
    assert len(arms) == 4 and len(rows) == 4 * 3  # every arm and round once: nothing duplicated
    assert {(e.repeat_of or e.id, e.meta["round"]) for e in rows} == {(a.id, r) for a in arms for r in range(3)}
    assert all(e.status in ("keep", "measured") for e in rows), [(e.id, e.status, e.reason) for e in rows]
    assert [e.reason for e in arms[1:]] == [f"carries over: gain +{g:.6f} ± 0.000000 (95% interval, 3 pairs)"
                                            for g in (7, 5, 2)]
    interrupted = [e for e in rows if (e.attempt or 1) > 1]
    assert len(interrupted) == 1  # the run the kill cut short ran again
    for e in rows:
        assert git(repo, "rev-parse", f"refs/autoresearch/experiments/{e.id}") == e.commit_sha


@pytest.mark.slow
def test_the_built_in_task_promoted_to_a_deeper_model_and_ablated(tmp_path: Path, shared_cache: Path) -> None:
    """Tiny preset, through the real runner, evaluator and train.py: a night whose two kept changes
    let it train longer (a step cap the test adds, so that the scores do not depend on the machine's
    speed: 2 steps, then 6, then 12), promoted to DEPTH=3, then ablated."""
    lab = prepared_tiny_lab(tmp_path, shared_cache)
    env = {"AUTORESEARCH_CACHE": str(shared_cache)}
    train = (lab / "train.py").read_text()
    capped = train.replace("SOFTCAP = 15.0 ", "MAX_STEPS = 2                  # steps at most (this test's)\nSOFTCAP = 15.0 ", 1)
    capped = capped.replace("done = training_time >= TIME_BUDGET", "done = training_time >= TIME_BUDGET or step >= MAX_STEPS")
    assert capped.count("MAX_STEPS") == 2
    steps = [capped.replace("MAX_STEPS = 2 ", f"MAX_STEPS = {n} ") for n in (2, 6, 12)]
    (lab / "train.py").write_text(steps[0])
    toml = lab / "autoresearch.toml"
    toml.write_text(toml.read_text().replace('mode = "noise"', 'mode = "strict"'))
    git(lab, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "a step cap, a strict judge")
    patches = write_patches(tmp_path / "patches", [diff("train.py", steps[0], steps[1], "6 steps"),
                                                   diff("train.py", steps[1], steps[2], "12 steps")])
    proc = run_cli("run", "--agent", f"patches:{patches}", "--budget", "60", "--plain", "--tag", "night", cwd=lab, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with Ledger(lab / ".autoresearch" / "ledger.db") as ledger:
        night_rows = ledger.experiments("night")
    kept = [e for e in night_rows if e.kind == "experiment" and e.status == "keep"]
    assert len(kept) == 2, [(e.description, e.status, e.metric, e.reason) for e in night_rows]

    proc = run_cli("promote", "--set", "DEPTH=3", "--budget", "60", "--repeats", "2", "--plain", cwd=lab, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "the kept chain (2 changes) at DEPTH=3, budget 60 s" in proc.stdout
    proc = run_cli("ablate", "--budget", "60", "--repeats", "2", "--plain", cwd=lab, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for kind in ("promote", "ablate"):
        tag, rows = study_rows(lab, kind)
        ran = [e for e in rows if e.status != "invalid"]
        assert len(ran) == 4 and all(e.metric is not None and e.outcome == "ok" for e in ran), \
            [(e.id, e.status, e.reason) for e in rows]
        assert all(e.summary.get("num_steps") for e in ran)  # trained, then scored by the trusted evaluator
        judged = [e for e in ran if e.kind == "experiment"]
        # 12 steps against 2 (promote), or 12 against 6 (ablate): far beyond what timing changes
        assert len(judged) == 1 and judged[0].status == "keep", judged[0].reason
        assert (judged[0].reason or "").startswith("carries over: gain +" if kind == "promote" else "needed: ")
        assert "95% interval, 2 pairs" in (judged[0].reason or "")
        for e in ran:
            assert git(lab, "rev-parse", f"refs/autoresearch/experiments/{e.id}") == e.commit_sha
        if kind == "promote":
            assert all("DEPTH = 3 " in git(lab, "show", f"{e.commit_sha}:train.py") for e in ran)
            assert all(e.summary.get("depth") == 3 for e in ran)
        else:  # the first change's constant was changed again by the second: it cannot go alone
            first = next(e for e in rows if e.status == "invalid")
            assert first.reason == ("#2 cannot be taken out alone (later changes build on it): train.py: "
                                    "MAX_STEPS is 12 at the target, not 6")
    proc = run_cli("report", "--tag", "night", cwd=lab, env=env)
    assert proc.returncode == 0, proc.stderr
    report = (lab / "report.md").read_text()
    assert "## Promotions" in report and "## Ablations" in report


def test_promote_on_two_workers_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--workers 2: the rounds' runs go to both workers (each its own worktree and cores); the same
    rows and verdicts as one worker makes."""
    repo = two_changes(tmp_path)
    assert cli(repo, monkeypatch, "promote", "--repeats", "2", "--each", "--workers", "2") == 0
    tag, rows = study_rows(repo, "promote")
    assert len(rows) == 8 and all(e.status in ("keep", "measured") for e in rows)
    assert {e.worker for e in rows} == {"w0", "w1"}
    arms = [e for e in rows if e.kind != "repeat"]
    assert [e.reason for e in arms[1:]] == [f"carries over: gain +{g:.6f} ± 0.000000 (95% interval, 2 pairs)"
                                            for g in (7, 5, 2)]
