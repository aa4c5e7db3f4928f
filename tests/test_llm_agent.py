"""LLM agents end to end: the real openai and anthropic SDKs against a scripted server on
127.0.0.1, driving the real loop on a small target program."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from autoresearch.agents import Agent, Proposal, ResearchContext, make_agent
from autoresearch.agents.llm import LLMAgent, Replies, save_replies
from autoresearch.agents.providers import ProviderOptions, make_provider
from autoresearch.errors import AgentUnavailable
from autoresearch.lab import find_lab
from autoresearch.ledger import Ledger
from autoresearch.loop import Loop, RunOptions, ledger_path
from autoresearch.view import PlainView
from fake_llm import FakeLLM, Reply, Status
from test_loop import BENCH, experiments, git, make_target

KEY = "sk-test-0123456789"


def edit(old: str, new: str, description: str, path: str = "bench.py") -> str:
    return (f"DESCRIPTION: {description}\nRATIONALE: because the score rewards it.\n\n{path}\n"
            f"<<<<<<< SEARCH\n{old}\n=======\n{new}\n>>>>>>> REPLACE\n")


def loop_with(repo: Path, spec: str, server: FakeLLM, tag: str = "llm", *, reply_format: str = "blocks",
              **options: object) -> Loop:
    """The loop on `repo` with an LLM agent at `server`; SEARCH/REPLACE replies unless `reply_format`
    says otherwise (`auto` would pick JSON for the 127.0.0.1 server)."""
    base_url = server.openai_base_url if spec.startswith("openai:") else server.anthropic_base_url
    lab = find_lab(repo)
    agent = make_agent(spec, repo, {"base_url": base_url, "max_retries": 2, "backoff_base": 0.01,
                                    "prices": {"fake": [10_000.0, 0.0]}, "reply_format": reply_format},
                       editable=lab.config.editable, tag=tag)
    with Ledger(ledger_path(lab)) as ledger:
        loop = Loop(lab, agent, RunOptions(tag=tag, **options), ledger, PlainView())  # type: ignore[arg-type]
        loop.run()
    return loop


@pytest.fixture
def keyed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)


@pytest.mark.parametrize("spec", ["openai:fake", "anthropic:fake"])
def test_three_experiments_with_each_sdk(tmp_path: Path, keyed: None, spec: str) -> None:
    repo = make_target(tmp_path)
    script = [
        Reply(edit("WIDTH = 10        # an integer knob", "WIDTH = 15        # an integer knob", "WIDTH 10 -> 15")),
        Reply("I think we should change the rate."),  # malformed: no block, no description
        Reply(edit("RATE = 0.5        # a float knob", "RATE = 0.25       # a float knob", "RATE 0.5 -> 0.25")),
        Status(429, "slow down", retry_after=0),
        Reply(edit("WIDTH = 99", "WIDTH = 16", "SEARCH that does not match")),  # mismatch
        Reply(edit("WIDTH = 15        # an integer knob", "WIDTH = 17        # an integer knob", "WIDTH 15 -> 17")),
    ]
    with FakeLLM(script=script, key=KEY) as server:
        loop_with(tmp_path / "target", spec, server, max_experiments=3)
        requests = server.requests
    rows = experiments(repo, "llm")
    assert [e.status for e in rows] == ["keep", "keep", "keep", "keep"], [(e.description, e.reason) for e in rows]
    assert [e.metric for e in rows] == pytest.approx([9.5, 4.5, 2.0, 0.0])
    assert rows[1].rationale == "because the score rewards it."
    assert rows[2].meta["attempts"] == 2 and rows[3].meta["attempts"] == 2
    assert rows[2].cost_usd == pytest.approx(2.0)  # two requests of 100 input tokens at $10,000 per million
    assert rows[1].input_tokens == 100 and rows[1].output_tokens == 50
    # what the model saw: the brief's metric, the file, the history; and the precise errors on retry
    first = json.dumps(requests[0].json)
    assert "bench.py" in first and "WIDTH = 10" in first and "score" in first
    retry = json.dumps(requests[2].json)
    assert "DESCRIPTION" in retry  # the format error was sent back
    mismatch = json.dumps(requests[5].json)
    assert "WIDTH = 99" in mismatch or "SEARCH" in mismatch
    assert git(repo, "rev-parse", "refs/heads/autoresearch/llm") == rows[-1].commit_sha


def test_no_valid_edit_is_recorded_as_invalid_without_running(tmp_path: Path, keyed: None) -> None:
    repo = make_target(tmp_path)
    noop = edit("WIDTH = 10        # an integer knob", "WIDTH = 10        # an integer knob", "nothing")
    with FakeLLM(script=[Reply(noop)], key=KEY) as server:
        loop_with(repo, "openai:fake", server, max_experiments=1)
    rows = experiments(repo, "llm")
    assert [e.status for e in rows] == ["keep", "invalid"]
    assert "no valid edit after 3 attempts" in (rows[1].reason or "") and rows[1].run_seconds is None


def test_api_keys_never_reach_the_experiment(tmp_path: Path, keyed: None, monkeypatch: pytest.MonkeyPatch) -> None:
    dump = tmp_path / "env.json"
    monkeypatch.setenv("ENV_DUMP", str(dump))
    monkeypatch.setenv("HF_TOKEN", "hf-secret")
    monkeypatch.setenv("MY_SECRET_VALUE", "x")
    bench = BENCH.replace("time.sleep(PAUSE)", "import json, os\njson.dump(dict(os.environ), open(os.environ['ENV_DUMP'], 'w'))")
    repo = make_target(tmp_path, bench)
    toml = repo / "autoresearch.toml"  # runs get an allow list of variables: this one is named, secrets are not
    toml.write_text(toml.read_text().replace("[lab]\n", '[lab]\npass_env = ["ENV_DUMP", "MY_SECRET_*"]\n', 1))
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "pass ENV_DUMP"], cwd=repo,
                   check=True)
    with FakeLLM(script=[Reply(edit("WIDTH = 10        # an integer knob", "WIDTH = 12        # an integer knob", "w"))],
                 key=KEY) as server:
        loop_with(repo, "openai:fake", server, max_experiments=1)
    seen = json.loads(dump.read_text())
    assert "ENV_DUMP" in seen and "PATH" in seen
    for name in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "HF_TOKEN", "MY_SECRET_VALUE"):
        assert name not in seen
    assert KEY not in dump.read_text()
    log_text = "".join(p.read_text() for p in (repo / ".autoresearch" / "logs").iterdir())
    assert KEY not in log_text


def test_wrong_key_pauses_instead_of_failing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-wrong")
    repo = make_target(tmp_path)
    toml = repo / "autoresearch.toml"
    toml.write_text(toml.read_text().replace("[agent]\n", "[agent]\npause_seconds = 0.2\nmax_pause_seconds = 0.4\n"))
    git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "short pauses")
    with FakeLLM(script=[Reply("unused")], key=KEY) as server:
        # 5 s for ~12 tries at pauses of 0.4 s; the baseline, seconds on a loaded machine, counts too
        loop = loop_with(repo, "openai:fake", server, hours=5 / 3600)
        tries = len([r for r in server.requests if r.path.endswith("/chat/completions")])
    assert loop.stop_reason.startswith("reached --hours")
    assert [e.status for e in experiments(repo, "llm")] == ["keep"]  # nothing recorded for the failed proposals
    assert 3 <= tries <= 20  # tried again after each pause, not in a tight loop


def test_server_down_then_back(tmp_path: Path, keyed: None) -> None:
    repo = make_target(tmp_path)
    toml = repo / "autoresearch.toml"
    toml.write_text(toml.read_text().replace("[agent]\n", "[agent]\npause_seconds = 0.1\n"))
    git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "short pauses")
    good = Reply(edit("WIDTH = 10        # an integer knob", "WIDTH = 14        # an integer knob", "WIDTH 10 -> 14"))
    with FakeLLM(script=[Status(503, "down")] * 7 + [good], key=KEY) as server:
        loop_with(repo, "openai:fake", server, max_experiments=1)
    rows = experiments(repo, "llm")
    assert [e.status for e in rows] == ["keep", "keep"] and rows[1].metric == pytest.approx(5.5)


def test_crash_is_repaired_by_the_agent(tmp_path: Path, keyed: None) -> None:
    repo = make_target(tmp_path)
    broken = edit('print("---")', 'print("---")\nprint(1 / 0)', "print more")
    fix = edit("print(1 / 0)", "print(1 / 1)", "fix the division")
    other = edit("WIDTH = 10        # an integer knob", "WIDTH = 11        # an integer knob", "prepared meanwhile")
    with FakeLLM(script=[Reply(broken), Reply(other), Reply(fix)], key=KEY) as server:
        loop_with(repo, "openai:fake", server, max_experiments=2)
        repair_prompt = json.dumps(server.requests[-1].json)
    rows = experiments(repo, "llm")
    assert [e.status for e in rows] == ["keep", "crash", "discard"]
    assert rows[2].repair_of == rows[1].id
    assert "ZeroDivisionError" in repair_prompt  # the log tail reached the agent


def test_max_cost_stops_the_run(tmp_path: Path, keyed: None) -> None:
    repo = make_target(tmp_path)
    replies = [Reply(edit("WIDTH = 10        # an integer knob", f"WIDTH = {w}        # an integer knob", f"WIDTH {w}"))
               for w in (11, 12, 13, 14, 15)]
    with FakeLLM(script=replies, key=KEY) as server:
        loop = loop_with(repo, "openai:fake", server, max_cost=2.5)
    rows = experiments(repo, "llm")
    assert loop.stop_reason.startswith("reached --max-cost $2.5")
    assert sum(e.cost_usd or 0 for e in rows) >= 2.5 and len(rows) <= 5


def test_proposals_are_prepared_while_the_experiment_runs(tmp_path: Path, keyed: None) -> None:
    from fake_llm import Delay

    slow = BENCH.replace("PAUSE = 0.0 ", "PAUSE = 1.5 ")
    repo = make_target(tmp_path, slow)
    replies = [Delay(1.0, then=Reply(edit("RATE = 0.5        # a float knob", f"RATE = 0.{r}        # a float knob",
                                          f"RATE 0.{r}"))) for r in (6, 7, 8, 9)]
    with FakeLLM(script=replies, key=KEY) as server:
        loop_with(repo, "openai:fake", server, max_experiments=4)
    rows = experiments(repo, "llm")[1:]
    assert len(rows) == 4 and all(e.status == "discard" for e in rows)
    assert all(e.propose_seconds and e.propose_seconds >= 1.0 for e in rows)
    # every proposal was prepared while the previous run (the baseline for the first) was going
    assert all(e.wait_seconds < 0.5 for e in rows), [e.wait_seconds for e in rows]


def test_missing_key_is_a_one_line_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    from autoresearch.cli import main

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    repo = make_target(tmp_path)
    monkeypatch.chdir(repo)
    assert main(["run", "--agent", "openai:gpt-test", "--plain", "--max-experiments", "1"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: OPENAI_API_KEY is not set") and "\n" not in err.strip()
    assert not os.path.exists(repo / ".autoresearch" / "ledger.db") or experiments(repo, "llm") == []


# ---------------------------------------------------------------------------
# every conversation is saved: .autoresearch/transcripts/<tag>-<time>Z-llm.json
# ---------------------------------------------------------------------------


WIDTH_EDIT = edit("WIDTH = 10        # an integer knob", "WIDTH = 12        # an integer knob", "WIDTH 10 -> 12")


def bench_context() -> ResearchContext:
    return ResearchContext(program="Lower the score.", files={"bench.py": BENCH}, history=[],
                           champion_commit="0" * 40, champion_metric=9.5, metric_name="score", direction="min",
                           budget=5.0)


def replies_agent(root: Path, server: FakeLLM) -> Agent:
    return make_agent("openai:fake", root, {"base_url": server.openai_base_url, "max_retries": 0,
                                            "reply_format": "blocks"}, editable=("bench.py",), tag="t")


def saved(proposal: Proposal, root: Path) -> dict[str, Any]:
    path = Path(proposal.meta["transcript"])
    assert path.parent == root / ".autoresearch" / "transcripts"
    assert re.fullmatch(r"t-\d{8}T\d{6}\.\d{3}Z-llm\.json", path.name), path.name
    return json.loads(path.read_text(encoding="utf-8"))


def test_replies_that_are_no_edit_are_kept_verbatim(tmp_path: Path, keyed: None) -> None:
    garbage = ["I would make it faster.", "Sure! ```python\nWIDTH = 12\n```", "réponse ✓ <<<<<<< SEARCH\nWIDTH"]
    with FakeLLM(script=[Reply(g) for g in garbage], key=KEY) as server:
        proposal = replies_agent(tmp_path, server).propose(bench_context())
        sent = [r.json["messages"] for r in server.requests]
    assert proposal is not None and proposal.error and proposal.error.startswith("no valid edit after 3 attempts")
    data = saved(proposal, tmp_path)
    assert (data["format"], data["agent"], data["kind"], data["repair_of"]) == \
        ("autoresearch-replies/1", "openai:fake", "propose", None)
    assert data["system"] == sent[0][0]["content"] and data["started_at"] <= time.time()
    exchanges = data["exchanges"]
    assert [x["request"] for x in exchanges] == [1, 2, 3]
    assert [x["reply"] for x in exchanges] == garbage
    assert [x["prompt"] for x in exchanges] == [m[-1]["content"] for m in sent]  # the prompt, then the feedback
    assert "WIDTH = 10" in exchanges[0]["prompt"] and "SEARCH" in exchanges[1]["prompt"]
    assert [x["problem"] for x in exchanges] == proposal.meta["format_errors"] and all(proposal.meta["format_errors"])
    assert all(x["model"] == "fake" and (x["input_tokens"], x["output_tokens"]) == (100, 50) for x in exchanges)
    assert all(x["seconds"] >= 0 and x["cost_usd"] is None for x in exchanges)  # no price is known for "fake"
    assert data["outcome"] == proposal.error


def test_a_good_reply_after_a_bad_one(tmp_path: Path, keyed: None) -> None:
    with FakeLLM(script=[Reply("no idea"), Reply(WIDTH_EDIT)], key=KEY) as server:
        proposal = replies_agent(tmp_path, server).propose(bench_context())
    assert proposal is not None and proposal.error is None and "WIDTH = 12" in proposal.files["bench.py"]
    data = saved(proposal, tmp_path)
    assert [x["reply"] for x in data["exchanges"]] == ["no idea", WIDTH_EDIT]
    assert data["exchanges"][0]["problem"] and data["exchanges"][1]["problem"] is None
    assert data["outcome"] == "ok"


def test_a_provider_failing_midway_still_leaves_the_transcript(tmp_path: Path, keyed: None) -> None:
    with FakeLLM(script=[Reply("thinking..."), Status(503, "the model crashed")], key=KEY) as server:
        with pytest.raises(AgentUnavailable):
            replies_agent(tmp_path, server).propose(bench_context())
    files = list((tmp_path / ".autoresearch" / "transcripts").iterdir())
    assert len(files) == 1 and files[0].name.endswith("-llm.json")  # no temporary file left behind
    data = json.loads(files[0].read_text(encoding="utf-8"))
    assert [x["reply"] for x in data["exchanges"]] == ["thinking..."]
    assert data["outcome"].startswith("failed: AgentUnavailable: ") and "\n" not in data["outcome"]


def test_secrets_in_replies_are_redacted(tmp_path: Path, keyed: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MY_SERVICE_TOKEN", 'tok-"quoted"-0123456789')
    with FakeLLM(script=[Reply(f'my key is {KEY} and tok-"quoted"-0123456789'), Reply(WIDTH_EDIT)], key=KEY) as server:
        proposal = replies_agent(tmp_path, server).propose(bench_context())
    assert proposal is not None
    text = Path(proposal.meta["transcript"]).read_text(encoding="utf-8")
    assert KEY not in text and "0123456789" not in text
    reply = json.loads(text)["exchanges"][0]["reply"]
    assert reply == "my key is <ANTHROPIC_API_KEY> and <MY_SERVICE_TOKEN>"  # keyed: both hold KEY


def test_the_labs_own_secret_variables_are_redacted_too(tmp_path: Path, keyed: None,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """`[lab] secret_env` names variables the defaults do not (WANDB_KEY): the run's agent, as the CLI
    makes it from the lab's config, keeps their values out of its saved replies as well."""
    from autoresearch.cli import _agent

    repo = make_target(tmp_path)
    toml = repo / "autoresearch.toml"
    toml.write_text(toml.read_text().replace("[lab]\n", '[lab]\nsecret_env = ["WANDB_*"]\n', 1))
    monkeypatch.setenv("WANDB_KEY", "wandb-0123456789abcdef")
    with FakeLLM(script=[Reply("logging with wandb-0123456789abcdef"), Reply(WIDTH_EDIT)], key=KEY) as server:
        agent = _agent(["openai:fake"], find_lab(repo).config, "t", server.openai_base_url)
        proposal = agent.propose(bench_context())
    assert proposal is not None
    text = Path(proposal.meta["transcript"]).read_text(encoding="utf-8")
    assert "0123456789abcdef" not in text and "<WANDB_KEY>" in text
    assert KEY not in text  # the defaults still apply


def test_conversations_started_in_the_same_millisecond_get_their_own_files(tmp_path: Path) -> None:
    first, second = (save_replies(Replies(agent="openai:x", kind="propose", started_at=1.0), tmp_path, "t")
                     for _ in range(2))
    assert (first.name, second.name) == ("t-19700101T000001.000Z-llm.json", "t-19700101T000001.000Z-2-llm.json")
    assert {p.name for p in tmp_path.iterdir()} == {first.name, second.name}


def test_no_transcripts_directory_no_file(tmp_path: Path, keyed: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with FakeLLM(script=[Reply(WIDTH_EDIT)], key=KEY) as server:
        agent = LLMAgent(make_provider("openai:fake", ProviderOptions(base_url=server.openai_base_url)),
                         editable=lambda path: path == "bench.py")
        proposal = agent.propose(bench_context())
    assert proposal is not None and proposal.error is None and "transcript" not in proposal.meta
    assert list(tmp_path.iterdir()) == []


def test_the_loop_keeps_the_transcript_of_an_invalid_proposal(tmp_path: Path, keyed: None) -> None:
    repo = make_target(tmp_path)
    with FakeLLM(script=[Reply("I would make it faster.")], key=KEY) as server:
        loop_with(repo, "openai:fake", server, max_experiments=1)
    invalid = experiments(repo, "llm")[1]
    assert invalid.status == "invalid"
    path = Path(invalid.meta["transcript"])
    assert path.name.startswith("llm-") and json.loads(path.read_text())["outcome"] == invalid.reason
