"""Structured (JSON) replies: the schema in the request, the strict parse, the same exact-match
checks and feedback as SEARCH/REPLACE blocks, and the `reply_format` choice; the real openai and
anthropic SDKs against the scripted server on 127.0.0.1."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from autoresearch.agents import AgentError, Proposal, make_agent
from autoresearch.agents.edits import BLOCKS, EditMismatch, FormatError, apply_edits
from autoresearch.agents.llm import LLMAgent
from autoresearch.agents.structured import JSON, RESPONSE_FORMAT, choose_reply_format, parse_json_reply
from fake_llm import FakeLLM, Reply, Status
from test_llm_agent import WIDTH_EDIT, bench_context, loop_with
from test_loop import BENCH, experiments, git, make_target

WIDTH_12 = ("bench.py", "WIDTH = 10        # an integer knob\n", "WIDTH = 12        # an integer knob\n")


def json_reply(*edits: tuple[str, str, str], description: str = "WIDTH 10 -> 12",
               rationale: str = "closer to the optimum") -> str:
    return json.dumps({"description": description, "rationale": rationale,
                       "edits": [{"file": f, "search": s, "replace": r} for f, s, r in edits]})


GOOD = json_reply(WIDTH_12)


def agent_for(root: Path, server: FakeLLM, spec: str = "openai:fake", **options: Any) -> LLMAgent:
    base_url = server.openai_base_url if spec.startswith("openai:") else server.anthropic_base_url
    agent = make_agent(spec, root, {"base_url": base_url, "max_retries": 0, **options}, editable=("bench.py",), tag="t")
    assert isinstance(agent, LLMAgent)
    return agent


def transcript(proposal: Proposal) -> dict[str, Any]:
    return json.loads(Path(proposal.meta["transcript"]).read_text(encoding="utf-8"))


def feedback(server: FakeLLM, request: int) -> str:
    """The last user message of a request: the prompt, or the error sent back after a refused reply."""
    return server.requests[request].json["messages"][-1]["content"]


# ---------------------------------------------------------------------------
# the JSON conversation: schema in the request, feedback, retries, what is saved
# ---------------------------------------------------------------------------


def test_a_good_reply_is_applied_and_the_request_carries_the_schema(tmp_path: Path) -> None:
    with FakeLLM(script=[Reply(f"```json\n{GOOD}\n```")]) as server:
        agent = agent_for(tmp_path, server)
        proposal = agent.propose(bench_context())
        body = server.requests[0].json
    assert agent.reply_format is JSON  # auto, at 127.0.0.1
    assert proposal is not None and proposal.error is None
    assert proposal.files == {"bench.py": BENCH.replace("WIDTH = 10 ", "WIDTH = 12 ")}
    assert (proposal.description, proposal.rationale) == ("WIDTH 10 -> 12", "closer to the optimum")
    assert proposal.meta["attempts"] == 1 and proposal.meta["format_errors"] == []
    assert proposal.meta["edits"] == [{"path": "bench.py", "search": WIDTH_12[1], "replace": WIDTH_12[2]}]
    # the wire shape, spelled out: OpenAI-compatible structured output, strict
    edit = {"type": "object", "properties": {k: {"type": "string"} for k in ("file", "search", "replace")},
            "required": ["file", "search", "replace"], "additionalProperties": False}
    schema = {"type": "object",
              "properties": {"description": {"type": "string"}, "rationale": {"type": "string"},
                             "edits": {"type": "array", "items": edit}},
              "required": ["description", "rationale", "edits"], "additionalProperties": False}
    assert body["response_format"] == RESPONSE_FORMAT == \
        {"type": "json_schema", "json_schema": {"name": "edit", "strict": True, "schema": schema}}
    # the prompt explains the JSON object, not SEARCH/REPLACE, and its example is a valid reply
    system = body["messages"][0]["content"]
    assert '"edits": [{"file": "bench.py", "search":' in system and "<<<<<<<" not in system and "=======" not in system
    example = system[system.index("For example"):].split("\n\n", 1)[1]
    assert parse_json_reply(example).blocks[0].path == "bench.py"
    assert transcript(proposal)["reply_format"] == "json"


def test_malformed_json_gets_feedback_and_the_second_reply_is_applied(tmp_path: Path) -> None:
    bad = '{"description": "WIDTH 10 -> 12", "rationale": "why", "edits": [}'
    with FakeLLM(script=[Reply(bad), Reply(GOOD)]) as server:
        proposal = agent_for(tmp_path, server).propose(bench_context())
        sent = feedback(server, 1)
        replayed = server.requests[1].json["messages"][-2]
    assert proposal is not None and proposal.error is None and "WIDTH = 12" in proposal.files["bench.py"]
    assert proposal.meta["attempts"] == 2
    (problem,) = proposal.meta["format_errors"]
    assert problem == "the reply is not valid JSON: Expecting value: line 1 column 65"
    assert sent.startswith(f"Your reply could not be applied:\n{problem}\nThe reply must look like this:\n")
    assert '"search"' in sent and "Reply again with the whole JSON object" in sent and "SEARCH" not in sent
    assert replayed == {"role": "assistant", "content": bad}
    data = transcript(proposal)
    assert [x["reply"] for x in data["exchanges"]] == [bad, GOOD]
    assert [x["problem"] for x in data["exchanges"]] == [problem, None] and data["outcome"] == "ok"
    assert data["exchanges"][1]["prompt"] == sent


def test_a_search_that_does_not_match_gets_feedback_naming_the_file(tmp_path: Path) -> None:
    wrong = json_reply(("bench.py", "WIDTH = 99        # an integer knob\n", "WIDTH = 12        # an integer knob\n"))
    with FakeLLM(script=[Reply(wrong), Reply(GOOD)]) as server:
        proposal = agent_for(tmp_path, server).propose(bench_context())
        sent = feedback(server, 1)
    assert proposal is not None and proposal.error is None and proposal.meta["attempts"] == 2
    problem = "edit 1 (bench.py): the search text was not found exactly in bench.py. The closest region is lines 5-5"
    assert proposal.meta["format_errors"][0].startswith(problem)
    assert problem in sent and "    5 | WIDTH = 10        # an integer knob" in sent
    assert "First difference: search line 1 is 'WIDTH = 99        # an integer knob'" in sent
    assert "No edit was applied" in sent and '"search" copies a contiguous run' in sent  # the JSON rules, not the blocks'
    assert transcript(proposal)["exchanges"][0]["problem"] == proposal.meta["format_errors"][0]


@pytest.mark.parametrize("reply, problem", [
    (json.dumps({"description": "d", "edits": []}), "the reply has no 'rationale' field"),
    (json.dumps({"description": "d", "rationale": "r", "edits": "WIDTH = 12"}),
     '"edits" must be an array of edits, not a string'),
    (json.dumps({"description": "d", "rationale": "r", "edits": [{"file": "bench.py", "search": 10, "replace": "12"}]}),
     'edit 1 (bench.py): "search" must be a string, not a number'),
    (json.dumps({"description": "d", "rationale": "r", "edits": [{"file": "bench.py", "search": "x"}]}),
     "edit 1 has no 'replace' field"),
    (json.dumps({"description": "d", "rationale": "r", "edits": []}), '"edits" is empty: the change itself is missing'),
    (json.dumps({"description": " ", "rationale": "r", "edits": [dict(zip(("file", "search", "replace"), WIDTH_12))]}),
     '"description" is empty'),
    (json.dumps({"description": "d", "rationale": "r", "line": 5, "edits": []}),
     "the reply has unknown field(s) 'line': only 'description', 'edits', 'rationale' are allowed"),
    (json.dumps([{"file": "bench.py"}]), "the reply must be a JSON object, not an array"),
    (f"Here is my change:\n{GOOD}", "the reply is not valid JSON: Expecting value: line 1 column 1"),
    (f"{GOOD}\nHope this helps!", "the reply is not valid JSON: Extra data: line 2 column 1"),
    (json_reply(("data.txt", "frozen input\n", "thawed\n")),
     "edit 1: data.txt is not an editable file (editable: bench.py)"),
    (json_reply(WIDTH_12[:2] + (WIDTH_12[1],)), 'edit 1 (bench.py) has identical "search" and "replace"'),
])
def test_each_schema_violation_gets_precise_feedback_and_a_retry(tmp_path: Path, reply: str, problem: str) -> None:
    with FakeLLM(script=[Reply(reply), Reply(GOOD)]) as server:
        proposal = agent_for(tmp_path, server).propose(bench_context())
        sent = feedback(server, 1)
    assert proposal is not None and proposal.error is None and proposal.meta["attempts"] == 2
    assert problem in proposal.meta["format_errors"][0] and problem in sent
    assert transcript(proposal)["exchanges"][0]["problem"] == proposal.meta["format_errors"][0]


def test_no_valid_reply_after_max_attempts_is_an_invalid_proposal(tmp_path: Path) -> None:
    with FakeLLM(script=[Reply("{"), Reply("[]"), Reply('{"description": 1}')]) as server:
        proposal = agent_for(tmp_path, server, max_attempts=3).propose(bench_context())
    assert proposal is not None and proposal.files == {}
    assert proposal.error is not None and proposal.error.startswith("no valid edit after 3 attempts: the reply has no 'edits', 'rationale' field")
    assert len(proposal.meta["format_errors"]) == 3 and len(transcript(proposal)["exchanges"]) == 3


def test_a_reply_cut_off_at_max_tokens_is_told_so(tmp_path: Path) -> None:
    with FakeLLM(script=[Reply('{"description": "WIDTH 10 -> 12", "rationale": "Because', truncated=True),
                         Reply(GOOD)]) as server:
        proposal = agent_for(tmp_path, server, max_tokens=300).propose(bench_context())
        sent = feedback(server, 1)
    assert proposal is not None and proposal.error is None
    (problem,) = proposal.meta["format_errors"]
    assert problem.startswith("the reply is not valid JSON: Unterminated string starting at: line 1 column 48")
    assert problem.endswith("(the reply ends before the JSON object does) (cut off at 300 tokens)")
    assert "Your reply was cut off at 300 tokens, the most a reply may have: send a shorter one" in sent
    assert [x["truncated"] for x in transcript(proposal)["exchanges"]] == [True, False]


def test_a_server_that_refuses_response_format_gets_the_prompt_alone(tmp_path: Path) -> None:
    refusal = Status(400, "'response_format' of type 'json_schema' is not supported with this model")
    with FakeLLM(script=[refusal, Reply(GOOD), Reply(GOOD)]) as server:
        agent = agent_for(tmp_path, server)
        first, second = agent.propose(bench_context()), agent.propose(bench_context())
        bodies = [r.json for r in server.requests]
    assert first is not None and second is not None and first.error is None and second.error is None
    assert "response_format" in bodies[0] and all("response_format" not in b for b in bodies[1:])
    assert first.meta["requests"] == 2  # the refused request and its resend, no retry spent
    assert '"edits"' in bodies[2]["messages"][0]["content"]  # the prompt still asks for the JSON object


def test_json_with_anthropic_is_asked_for_in_the_prompt_only(tmp_path: Path) -> None:
    with FakeLLM(script=[Reply(GOOD)]) as server:
        auto = agent_for(tmp_path, server, "anthropic:fake")
        agent = agent_for(tmp_path, server, "anthropic:fake", reply_format="json")
        proposal = agent.propose(bench_context())
        body = server.requests[0].json
    assert auto.reply_format is BLOCKS and agent.reply_format is JSON
    assert proposal is not None and proposal.error is None and "WIDTH = 12" in proposal.files["bench.py"]
    assert "response_format" not in body and '"edits": [{"file": "bench.py"' in body["system"]


# ---------------------------------------------------------------------------
# the same exact-match checks as SEARCH/REPLACE blocks
# ---------------------------------------------------------------------------


def test_search_texts_are_whole_lines_as_in_blocks() -> None:
    """A search without its final newline still means whole lines: a prefix of a line does not match."""
    (block,) = parse_json_reply(json_reply(("bench.py", "WIDTH = 10        # an integer knob", "WIDTH = 12"))).blocks
    assert (block.search, block.replace) == ("WIDTH = 10        # an integer knob\n", "WIDTH = 12\n")
    assert "WIDTH = 12\nRATE" in apply_edits({"bench.py": BENCH}, [block], fmt=JSON)["bench.py"]
    (prefix,) = parse_json_reply(json_reply(("bench.py", "WIDTH = 1", "WIDTH = 2"))).blocks
    with pytest.raises(EditMismatch, match=r"edit 1 \(bench.py\): the search text was not found exactly"):
        apply_edits({"bench.py": BENCH}, [prefix], fmt=JSON)
    with pytest.raises(EditMismatch, match="the search text occurs 2 times"):
        apply_edits({"bench.py": BENCH + "WIDTH = 10        # an integer knob\n"}, [block], fmt=JSON)
    (create,) = parse_json_reply(json_reply(("extra/new.py", "", "X = 1"))).blocks
    assert apply_edits({"bench.py": BENCH}, [create], lambda p: True, JSON) == {"extra/new.py": "X = 1"}


def test_the_parser_is_strict() -> None:
    assert parse_json_reply(f"  ```JSON\n{GOOD}\n```\n").description == "WIDTH 10 -> 12"
    for text, problem in [("", "the reply is empty"), ("```python\n{}\n```", "not valid JSON"),
                          ("{'description': 'x'}", "not valid JSON: Expecting property name enclosed in double quotes"),
                          ('{"description": "x", "rationale": "y", "edits": [{"file": "", "search": "a", "replace": "b"}]}',
                           'edit 1: "file" is empty'),
                          ('{"description": "x", "rationale": null, "edits": []}', '"rationale" must be a string, not null')]:
        with pytest.raises(FormatError, match=problem):
            parse_json_reply(text)


# ---------------------------------------------------------------------------
# reply_format: auto, blocks, json, and a bad value
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("base_url, expected", [
    ("http://127.0.0.1:8080/v1", "json"), ("http://localhost:11434/v1", "json"), ("http://[::1]:8000/v1", "json"),
    ("http://0.0.0.0:8000/v1", "json"), ("http://127.0.0.2/v1", "json"), ("http://gpu.localhost/v1", "json"),
    ("http://192.168.1.20:8000/v1", "json"), ("http://10.0.0.7/v1", "json"), ("http://172.16.3.4:1234/v1", "json"),
    ("http://[fd00::5]:8000/v1", "json"),
    ("https://api.openai.com/v1", "blocks"), ("https://openrouter.ai/api/v1", "blocks"),
    ("http://8.8.8.8/v1", "blocks"), ("http://my-gpu-box:8000/v1", "blocks"), (None, "blocks"),
])
def test_auto_picks_json_for_local_and_private_servers(base_url: str | None, expected: str) -> None:
    assert choose_reply_format("auto", "openai", base_url).name == expected  # nothing is contacted
    assert choose_reply_format("auto", "anthropic", base_url) is BLOCKS
    assert choose_reply_format("blocks", "openai", base_url) is BLOCKS
    assert choose_reply_format("json", "anthropic", base_url) is JSON


def test_auto_through_make_agent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    local = make_agent("openai:m", tmp_path, {"base_url": "http://127.0.0.1:9/v1"})
    official = make_agent("openai:m", tmp_path, {"base_url": "https://api.openai.com/v1"})
    default = make_agent("openai:m", tmp_path, {})
    flag = make_agent("openai:m", tmp_path, {}, base_url="http://localhost:9/v1")  # --base-url
    assert [a.reply_format.name for a in (local, official, default, flag)] == ["json", "blocks", "blocks", "json"]  # type: ignore[attr-defined]


def test_reply_format_blocks_forces_blocks_on_a_local_server(tmp_path: Path) -> None:
    with FakeLLM(script=[Reply(WIDTH_EDIT)]) as server:
        agent = agent_for(tmp_path, server, reply_format="blocks")
        proposal = agent.propose(bench_context())
        body = server.requests[0].json
    assert agent.reply_format is BLOCKS and "response_format" not in body
    assert "<<<<<<< SEARCH" in body["messages"][0]["content"]
    assert proposal is not None and proposal.error is None and "WIDTH = 12" in proposal.files["bench.py"]
    assert transcript(proposal)["reply_format"] == "blocks"


@pytest.mark.parametrize("value", ["xml", "JSON", 1])
def test_a_bad_reply_format_is_a_one_line_error(tmp_path: Path, value: object) -> None:
    with pytest.raises(AgentError) as caught:
        make_agent("openai:m", tmp_path, {"base_url": "http://127.0.0.1:9/v1", "reply_format": value})
    message = str(caught.value)
    assert message == f"autoresearch.toml: bad [agent] option: reply_format must be one of auto, blocks, json, not {value!r}"


# ---------------------------------------------------------------------------
# the loop: a JSON edit is committed and run
# ---------------------------------------------------------------------------


def test_the_loop_commits_and_runs_a_json_edit(tmp_path: Path) -> None:
    repo = make_target(tmp_path)
    width_15 = json_reply(("bench.py", "WIDTH = 10        # an integer knob\n", "WIDTH = 15        # an integer knob\n"),
                          description="WIDTH 10 -> 15")
    with FakeLLM(script=[Reply("WIDTH = 15"), Reply(width_15)]) as server:
        loop_with(repo, "openai:fake", server, reply_format="auto", max_experiments=1)
        bodies = [r.json for r in server.requests]
    rows = experiments(repo, "llm")
    assert [e.status for e in rows] == ["keep", "keep"], [(e.description, e.reason) for e in rows]
    assert rows[1].description == "WIDTH 10 -> 15" and rows[1].metric == pytest.approx(4.5)
    assert rows[1].meta["attempts"] == 2 and rows[1].meta["format_errors"][0].startswith("the reply is not valid JSON")
    assert all(b["response_format"] == RESPONSE_FORMAT for b in bodies)
    assert "WIDTH = 15        # an integer knob" in git(repo, "show", f"{rows[1].commit_sha}:bench.py")
    assert git(repo, "rev-parse", "refs/heads/autoresearch/llm") == rows[1].commit_sha
