"""The noise-aware judge: noise measured from repeats, borderline gains confirmed, no-op changes
not kept, simpler equal changes kept."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from autoresearch.judge import pooled_sigma, verdict, without_outliers
from test_loop import diff, experiments, make_target, run_loop, write_patches

NOISY = '''"""A target whose score is 1.0 + SHIFT plus seeded noise (sigma 0.05): run n uses seed n."""
import os
import random

# Hyperparameters
SHIFT = 0.0        # the knob: lower is better
EXTRA = 0          # a line a simplification may delete

counter = "@COUNTER@"  # outside the worktree: the test's own file
n = int(open(counter).read()) if os.path.exists(counter) else 0
open(counter, "w").write(str(n + 1))
print("---")
print(f"score: {1.0 + SHIFT + random.Random(n).gauss(0, 0.05):.5f}")
''' + "".join(f"\n\n\n\n# slot {i}\n" for i in range(20))  # comment lines a no-op change may edit


def test_pooled_sigma_removes_each_group_mean() -> None:
    assert pooled_sigma([[1.0], [2.0]]) is None
    assert pooled_sigma([[1.0, 1.0, 1.0]]) == 0.0
    sigma = pooled_sigma([[1.0, 1.2], [5.0, 5.2]])  # two commits far apart, same spread
    assert sigma == pytest.approx(math.sqrt((0.01 + 0.01 + 0.01 + 0.01) / 2))


def test_verdict_bands() -> None:
    champion = [1.00, 1.02, 0.98]
    sigma = 0.02
    se = sigma * math.sqrt(1 + 1 / 3)
    assert verdict([1.00 - 3 * se], champion, sigma, "min", 2, 2, False).action == "keep"
    assert verdict([1.00 - 1.5 * se], champion, sigma, "min", 2, 2, False).action == "confirm"
    assert verdict([1.00 - 1.5 * se], champion, sigma, "min", 2, 0, False).action == "discard"
    assert verdict([1.00 - 0.5 * se], champion, sigma, "min", 2, 2, False).action == "discard"
    assert verdict([1.00 + 0.5 * se], champion, sigma, "min", 2, 2, True).action == "keep"  # simpler, equal
    assert verdict([1.00 + 3 * se], champion, sigma, "min", 2, 2, True).action == "discard"  # simpler but worse
    assert verdict([1.00 + 3 * se], champion, sigma, "max", 2, 2, False).action == "keep"  # higher is better
    assert verdict([0.999], [1.0], None, "min", 2, 2, False).action == "keep"  # no noise estimate: strict


def test_a_disturbed_run_is_left_out_of_a_large_group_only() -> None:
    baseline = [2.3977, 1.5590, 1.5737, 1.5683]  # measured: the first run got a fraction of the CPU
    assert without_outliers(baseline) == [1.5590, 1.5737, 1.5683]
    assert pooled_sigma([without_outliers(baseline)]) < 0.01 < 0.3 < pooled_sigma([baseline])
    assert without_outliers([1.55, 1.56, 1.57, 1.60]) == [1.55, 1.56, 1.57, 1.60]  # plain noise stays
    assert without_outliers([2.40, 1.56, 1.57]) == [2.40, 1.56, 1.57]  # a candidate's runs are never trimmed
    assert without_outliers([1.5, 1.5, 1.5, 1.9]) == [1.5, 1.5, 1.5, 1.9]  # no spread to judge by
    # half the runs disturbed is not "a disturbed run": nothing is dropped
    assert without_outliers([1.5, 1.51, 2.4, 2.41]) == [1.5, 1.51, 2.4, 2.41]


def comment_patch(program: str, i: int) -> str:
    return diff("bench.py", program, program.replace(f"# slot {i}\n", f"# slot {i}: a note\n"), f"no-op: comment {i}")


@pytest.mark.slow
def test_no_op_changes_are_not_kept(tmp_path: Path) -> None:
    program = NOISY.replace("@COUNTER@", str(tmp_path / "counter"))
    repo = make_target(tmp_path, program, judge="noise")
    real = diff("bench.py", program, program.replace("SHIFT = 0.0 ", "SHIFT = -0.5"), "a real gain of 10 sigma")
    unused = "EXTRA = 0          # a line a simplification may delete\n"
    simpler = diff("bench.py", program, program.replace(unused, ""), "delete an unused line")
    patches = [comment_patch(program, i) for i in range(20)] + [real]
    run_loop(repo, f"patches:{write_patches(tmp_path / 'patches', patches)}")
    rows = experiments(repo)
    base = rows[0]
    repeats = [e for e in rows if e.kind == "repeat"]
    assert [e.repeat_of for e in repeats[:3]] == [base.id] * 3  # the baseline ran 4 times in all
    decided = [e for e in rows if e.kind == "experiment"]
    noop_keeps = [e for e in decided[:20] if e.status == "keep"]
    assert len(noop_keeps) <= 1, [(e.description, e.reason) for e in noop_keeps]
    assert decided[20].status == "keep" and "σ" in (decided[20].reason or "")
    assert all(e.sigma is not None and e.sigma > 0 for e in decided)
    confirmed = {e.repeat_of for e in repeats} - {base.id}
    assert all(rows[i - 1].kind == "experiment" for i in confirmed if i)  # confirmations repeat experiments
    # the champion was re-measured after 10 experiments
    champions = {e.id for e in rows if e.status == "keep"}
    assert any(e.repeat_of in champions for e in repeats[3:] if rows[e.repeat_of - 1].kind != "experiment"
               or e.repeat_of in champions)
    # results.tsv lists experiments only, never the repeats
    assert len((repo / "results.tsv").read_text().splitlines()) == 1 + 1 + len(decided)
    # a simplification that leaves the score within noise is kept
    write_patches(tmp_path / "simpler", [simpler])
    run_loop(repo, f"patches:{tmp_path / 'simpler'}", tag="t2")
    t2 = [e for e in experiments(repo, "t2") if e.kind == "experiment"]
    assert t2[0].status == "keep" and "simpler" in (t2[0].reason or "")


def test_status_marks_the_run_it_leaves_out(tmp_path: Path) -> None:
    from autoresearch.ledger import Ledger
    from autoresearch.report import status_rows

    with Ledger(tmp_path / "l.db") as ledger:
        run = ledger.start_run("t", "hparam", {})
        base = ledger.add(run_id=run, tag="t", kind="baseline", parent_commit="abc", agent="hparam",
                          description="baseline", status="keep", outcome="ok", metric=2.3977)
        for metric in (1.5590, 1.5737, 1.5683):
            ledger.add(run_id=run, tag="t", kind="repeat", repeat_of=base, parent_commit="abc", agent="hparam",
                       description="repeat", status="measured", outcome="ok", metric=metric)
        ledger.add(run_id=run, tag="t", kind="experiment", parent_commit="abc", agent="hparam",
                   description="idea", status="discard", outcome="ok", metric=9.0)
        rows = status_rows(ledger.experiments("t"))
    assert [r["left_out"] for r in rows] == [True, False, False, False, False]


def test_status_marks_a_run_that_had_less_of_the_machine(tmp_path: Path) -> None:
    from autoresearch.ledger import Ledger
    from autoresearch.report import status_rows

    with Ledger(tmp_path / "l.db") as ledger:
        run = ledger.start_run("t", "hparam", {})
        for i, cpu in enumerate((118.0, 121.0, 70.0, 119.0, 117.0, None)):  # cores: 1.97, 2.02, 1.17, ...
            ledger.add(run_id=run, tag="t", kind="experiment", parent_commit="abc", agent="hparam",
                       description=f"idea {i}", status="discard", outcome="ok", metric=1.5,
                       run_seconds=60.0, cpu_seconds=cpu)
        ledger.add(run_id=run, tag="t", kind="experiment", parent_commit="abc", agent="hparam", description="crash",
                   status="crash", outcome="crash", run_seconds=2.0, cpu_seconds=0.1)  # not compared
        rows = status_rows(ledger.experiments("t"))
        assert [r["disturbed"] is not None for r in rows] == [False, False, True, False, False, False, False]
        assert rows[2]["disturbed"] == pytest.approx(118.0 / 60) and rows[2]["cores"] == pytest.approx(70 / 60)
        assert rows[5]["cores"] is None
        few = status_rows(ledger.experiments("t")[:3])  # under 4 measured runs: no typical figure yet
        assert all(r["disturbed"] is None for r in few)


def test_judge_settings_are_read_and_checked(tmp_path: Path) -> None:
    from autoresearch.config import parse_config
    from autoresearch.errors import ConfigError

    lab = '[lab]\nrun = "python bench.py"\nbudget = 5\neditable = ["bench.py"]\n'
    default = parse_config(lab, tmp_path).judge
    assert default.paired and default.sigma_floor == 0.002
    legacy = parse_config(lab + "[judge]\npaired = false\nsigma_floor = 0\n", tmp_path).judge
    assert not legacy.paired and legacy.sigma_floor == 0.0
    for bad in ("sigma_floor = -0.1", "sigma_floor = 1", 'paired = "yes"', "pairs = true"):
        with pytest.raises(ConfigError):
            parse_config(lab + f"[judge]\n{bad}\n", tmp_path)
