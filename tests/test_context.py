"""The prompt an LLM sees: complete where it must be, within its size budget, deterministic."""

from __future__ import annotations

import dataclasses
import random
import re
from pathlib import Path
from typing import Any

import pytest

from autoresearch.agents.base import ResearchContext
from autoresearch.agents.context import Prompt, RepairRequest, build_prompt, history_table
from autoresearch.agents.edits import parse_reply
from autoresearch.ledger import Experiment

TEMPLATE = Path(__file__).resolve().parent.parent / "src" / "autoresearch" / "template"
TRAIN = (TEMPLATE / "train.py").read_text(encoding="utf-8")
PROGRAM = (TEMPLATE / "program.md").read_text(encoding="utf-8")
IDEAS = ["raise MATRIX_LR to {x:.3f}", "set DEPTH to {n} and scale the width to match", "warmup over the first {n}% of the budget",
         "halve WEIGHT_DECAY on the embeddings ({x:.3f})", "window pattern SSSL -> SSL{n}", "use {n} KV heads (grouped-query attention)",
         "softcap the logits at {n}", "warmdown ratio {x:.2f} with a linear decay", "batch size 2^{n} tokens per step",
         "init the output projections at zero and scale the residual by 1/sqrt({n})"]


def experiment(**fields: Any) -> Experiment:
    """An Experiment with every field the test does not name left empty."""
    values: dict[str, Any] = {f.name: None for f in dataclasses.fields(Experiment)}
    values.update(run_id=1, tag="t", kind="experiment", parent_commit="a" * 40, agent="test", created_at=0.0)
    values.update(fields)
    return Experiment(**values)


def synthetic_history(n: int, seed: int = 0) -> list[Experiment]:
    """A baseline, then n-1 experiments: ~10% kept, ~70% discarded, the rest crashed or timed out,
    each with a realistic description and a 20-line diff."""
    rng = random.Random(seed)
    champion = 1.100000
    history = [experiment(id=1, kind="baseline", status="keep", metric=champion, description="baseline",
                          lines_changed=0)]
    for i in range(2, n + 1):
        status = rng.choices(["keep", "discard", "crash", "timeout"], [10, 70, 15, 5])[0]
        idea = rng.choice(IDEAS).format(x=rng.uniform(0.01, 0.9), n=rng.randint(2, 16))
        metric = None if status in ("crash", "timeout") else (
            champion - rng.uniform(0.0005, 0.01) if status == "keep" else champion + rng.uniform(-0.0008, 0.02))
        start = rng.randint(40, 600)
        body = [f"@@ -{start},14 +{start},14 @@"] + [f" context line {k} of the model code" for k in range(6)]
        for k in range(6):
            body += [f"-OLD_VALUE_{k} = {rng.random():.4f}  # the old setting", f"+NEW_VALUE_{k} = {rng.random():.4f}  # {idea}"]
        patch = "diff --git a/train.py b/train.py\n--- a/train.py\n+++ b/train.py\n" + "\n".join(body[:20]) + "\n"
        reason = {"crash": "exception: RuntimeError: CUDA out of memory", "timeout": "timeout after 360 s"}.get(status)
        history.append(experiment(id=i, status=status, metric=metric, champion_metric=champion, description=idea,
                                  rationale=f"because {idea} should help", patch=patch, reason=reason,
                                  lines_changed=12))
        if status == "keep":
            assert metric is not None
            champion = metric
    return history


def context(history: list[Experiment], **overrides: Any) -> ResearchContext:
    kept = [e for e in history if e.status == "keep"]
    values: dict[str, Any] = dict(program=PROGRAM, files={"train.py": TRAIN}, history=history, champion_commit="c" * 40,
                                  champion_metric=kept[-1].metric if kept else None, metric_name="val_bpb",
                                  direction="min", budget=300.0)
    values.update(overrides)
    return ResearchContext(**values)


ROW = re.compile(r"^\| (\d+) \| ")


def delta(e: Experiment) -> float:
    assert e.metric is not None and e.champion_metric is not None
    return e.metric - e.champion_metric


def table_rows(prompt: Prompt) -> dict[int, str]:
    return {int(m.group(1)): line for line in prompt.user.splitlines() if (m := ROW.match(line))}


def test_prompt_holds_brief_files_rules_and_rows() -> None:
    history = synthetic_history(10)
    prompt = build_prompt(context(history, files={"train.py": TRAIN, "model.py": "X = 1\n"}), hardware="1x CPU, 8 GB")
    assert PROGRAM.strip() in prompt.user and TRAIN in prompt.user and "## model.py\n```python\nX = 1\n```" in prompt.user
    assert "1x CPU, 8 GB" in prompt.user and "300 seconds" in prompt.user and "300 seconds" in prompt.system
    assert "val_bpb (lower is better)" in prompt.system and "model.py, train.py" in prompt.system
    assert "<<<<<<< SEARCH" in prompt.system and "No new dependencies" in prompt.system
    rows = table_rows(prompt)
    assert sorted(rows) == [e.id for e in history]
    e = history[3]
    assert rows[e.id].startswith(f"| {e.id} | test | {e.status} | ")
    assert rows[1] == "| 1 | test | keep (baseline) | 1.100000 | - | 0 | baseline |"
    # the example in the system prompt parses
    example = prompt.system[prompt.system.index("DESCRIPTION: raise the learning rate"):]
    assert parse_reply(example).blocks[0].path == "model.py"


def test_delta_is_signed_against_the_champion_of_its_time() -> None:
    e = experiment(id=7, status="discard", metric=1.0125, champion_metric=1.0100, description="a | b", lines_changed=3)
    table = history_table([e], None)
    assert "| 7 | test | discard | 1.012500 | +0.002500 | 3 | a \\| b |" in table


def test_kept_diffs_most_recent_first_and_near_misses() -> None:
    history = synthetic_history(100)
    prompt = build_prompt(context(history), max_chars=1_000_000)
    kept = [e for e in history if e.status == "keep" and e.kind == "experiment"]
    section = prompt.user[prompt.user.index("## Kept changes"):prompt.user.index("## Near misses")]
    assert [int(x) for x in re.findall(r"^### #(\d+):", section, re.M)] == [e.id for e in reversed(kept)]
    discards = sorted((e for e in history if e.status == "discard"), key=delta)
    near = prompt.user[prompt.user.index("## Near misses"):prompt.user.index("# Your task")]
    assert [int(x) for x in re.findall(r"^### #(\d+):", near, re.M)] == [e.id for e in discards[:5]]
    assert discards[0].patch and discards[0].patch in near


@pytest.mark.parametrize("n", [10, 100, 500])
def test_size_budget_keeps_rows_whole_and_every_kept_row(n: int, capsys: pytest.CaptureFixture[str]) -> None:
    history = synthetic_history(n)
    full = build_prompt(context(history), max_chars=10_000_000)
    prompt = build_prompt(context(history), max_chars=60_000)
    assert len(prompt) <= 60_000
    assert PROGRAM.strip() in prompt.user and TRAIN in prompt.user
    expected = {int(m.group(1)): line for line in history_table(history, None).splitlines() if (m := ROW.match(line))}
    rows = table_rows(prompt)
    assert all(expected[i] == line for i, line in rows.items())  # every row listed is whole
    assert {e.id for e in history if e.status == "keep"} <= set(rows)
    assert history[-1].id in rows
    if len(rows) < n:
        summary = re.search(r"^Experiments (\d+)-(\d+), summarised", prompt.user, re.M)
        assert summary and int(summary.group(1)) == 1
        counted = sum(int(x) for x in re.findall(r"^- (\d+) \w+", prompt.user, re.M))
        assert counted + len(rows) == n  # every experiment is either listed or counted
    with capsys.disabled():
        print(f"\n[context size] {n} experiments: {len(full)} chars unbounded, {len(prompt)} chars within 60000 "
              f"({len(rows)} rows listed, {prompt.user.count('### #')} diffs)")


def test_shrink_order_near_misses_then_kept_diffs_then_table() -> None:
    history = synthetic_history(100)
    full = build_prompt(context(history), max_chars=1_000_000)
    without_near = len(full) - len(full.user[full.user.index("## Near misses"):full.user.index("# Your task")])
    prompt = build_prompt(context(history), max_chars=without_near)
    assert "## Near misses" not in prompt.user and "## Kept changes" in prompt.user
    assert len(table_rows(prompt)) == 100
    kept_ids = [e.id for e in history if e.status == "keep" and e.kind == "experiment"]
    prompt = build_prompt(context(history), max_chars=without_near - 100)  # the oldest kept diff goes first
    shown = [int(x) for x in re.findall(r"^### #(\d+):", prompt.user, re.M)]
    assert shown == list(reversed(kept_ids))[:len(shown)] and 0 < len(shown) < len(kept_ids)
    assert len(table_rows(prompt)) == 100


def test_files_over_budget_are_returned_whole() -> None:
    prompt = build_prompt(context(synthetic_history(50)), max_chars=1_000)
    assert TRAIN in prompt.user and len(prompt) > 1_000
    assert {e.id for e in synthetic_history(50) if e.status == "keep"} <= set(table_rows(prompt))


def test_repair_section_asks_for_a_fix_with_the_log_tail() -> None:
    history = synthetic_history(20)
    failed = experiment(id=21, status="crash", description="use 16 KV heads", rationale="more heads",
                        patch="--- a/train.py\n+++ b/train.py\n@@ -1 +1 @@\n-N_KV_HEAD = 4\n+N_KV_HEAD = 16\n",
                        reason="exception: RuntimeError: shape mismatch", commit_sha="f" * 40)
    log = "\n".join(f"step {k:05d} | loss 3.{k:04d}" for k in range(500)) + "\nRuntimeError: shape '[8, 16, 64]' is invalid\n"
    request = RepairRequest(failed=failed, log_tail=log, attempt=2, max_attempts=3)
    prompt = build_prompt(context([*history, failed], last_failure=failed), max_chars=60_000, repair=request)
    section = prompt.user[prompt.user.index("# Repair"):]
    assert "experiment #21 failed (crash), attempt 2 of 3" in section and "Fix THAT idea" in section
    assert "use 16 KV heads" in section and "+N_KV_HEAD = 16" in section and "shape mismatch" in section
    assert "RuntimeError: shape '[8, 16, 64]' is invalid" in section and "step 00499" in section
    assert "step 00000 " not in section
    assert "# Your task" not in prompt.user and "# The code of the failed experiment #21" in prompt.user
    champion_files = build_prompt(context(history), repair=dataclasses.replace(request, files_have_change=False))
    assert "WITHOUT the change" in champion_files.user


def test_prompt_is_deterministic() -> None:
    files = {"train.py": TRAIN, "b.py": "B = 2\n", "a.py": "A = 1\n"}
    one = build_prompt(context(synthetic_history(300), files=files), max_chars=60_000, hardware="cpu")
    two = build_prompt(context(synthetic_history(300), files=dict(reversed(files.items()))), max_chars=60_000,
                       hardware="cpu")
    assert one == two
    assert one.user.index("## a.py") < one.user.index("## b.py") < one.user.index("## train.py")


def test_history_table_summary_groups() -> None:
    history = synthetic_history(60)
    table = history_table(history, 5)
    kept = [e for e in history if e.status == "keep"]
    older = history[:55]
    rows = [line for line in table.splitlines() if ROW.match(line)]
    assert len(rows) == 5 + len([e for e in older if e.status == "keep"])
    assert f"Experiments 1-{older[-1].id}, summarised" in table
    discards = [e for e in older if e.status == "discard"]
    assert f"- {len(discards)} discard (best #" in table
    assert all(f"| {e.id} | test | keep" in table for e in kept)
    assert history_table([], None) == "No experiments yet."
    higher = history_table(history, 5, direction="max")
    best_max = max(discards, key=delta)
    assert f"discard (best #{best_max.id} by test:" in higher


def test_every_row_and_diff_says_which_agent_proposed_it() -> None:
    history = synthetic_history(30)
    agents = ["hparam", "openai:gpt-x", "claude-code"]
    history = [dataclasses.replace(e, agent=agents[e.id % 3] if e.kind == "experiment" else "hparam+openai:gpt-x")
               for e in history]
    history.append(experiment(id=31, status="discard", metric=1.2, champion_metric=1.1, description="pipes",
                              agent="evil | agent\n\x1b[2Jname " + "x" * 100))
    prompt = build_prompt(context(history), max_chars=1_000_000)
    rows = table_rows(prompt)
    for e in history[:-1]:
        assert rows[e.id].startswith(f"| {e.id} | {e.agent} | "), rows[e.id]
    assert rows[31].count(" | ") == 6 and "evil \\| agent" in rows[31]  # its pipe adds no column, its newline no row
    assert len(rows[31]) < 120  # the name is cut
    assert "Several agents share this run" in prompt.user
    kept = [e for e in history if e.status == "keep" and e.kind == "experiment"]
    assert kept and all(f"### #{e.id}: " in prompt.user and f", by {e.agent})" in prompt.user for e in kept)
    one = build_prompt(context([dataclasses.replace(e, agent="hparam") for e in history[:-1]]), max_chars=1_000_000)
    assert "Several agents" not in one.user
