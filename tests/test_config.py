"""autoresearch.toml parsing: good files load, bad ones fail with a message naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from autoresearch.config import MetricConfig, TaskConfig, parse_config, render_config
from autoresearch.errors import ConfigError

ROOT = Path("/lab")


def rendered() -> str:
    return render_config("mylab", "python train.py", 120, ["train.py"], ["prepare.py", "autoresearch.toml"],
                         MetricConfig(), TaskConfig("sotu", "cpu", 256, 4096, 32768))


def test_rendered_config_round_trips() -> None:
    cfg = parse_config(rendered(), ROOT)
    assert cfg.name == "mylab" and cfg.run == "python train.py" and cfg.budget == 120.0
    assert cfg.editable == ("train.py",) and cfg.frozen == ("prepare.py", "autoresearch.toml")
    assert cfg.metric == MetricConfig("val_bpb", "min", None)
    assert cfg.task == TaskConfig("sotu", "cpu", 256, 4096, 32768)


def test_target_config_without_task() -> None:
    cfg = parse_config('[lab]\nrun = "./bench.sh"\nbudget = 10\neditable = ["src/*.py"]\n'
                       '[metric]\nname = "score"\ndirection = "max"\njson_file = "out.json"\n', ROOT)
    assert cfg.task is None and cfg.metric.direction == "max" and cfg.metric.json_file == "out.json"
    assert cfg.name == "lab"


@pytest.mark.parametrize("text,message", [
    ("[lab", "not valid TOML"),
    ("[metric]\n", "missing `lab`"),
    ('[lab]\nbudget = 10\neditable = ["a"]\n', "missing `run`"),
    ('[lab]\nrun = "x"\nbudget = "ten"\neditable = ["a"]\n', "`budget` must be a float"),
    ('[lab]\nrun = "x"\nbudget = -1\neditable = ["a"]\n', "must be positive"),
    ('[lab]\nrun = "x"\nbudget = 1\neditable = []\n', "names no file"),
    ('[lab]\nrun = "x"\nbudget = 1\neditable = [3]\n', "list of file names"),
    ('[lab]\nrun = "x"\nbudget = 1\neditable = ["a"]\n[metric]\ndirection = "up"\n', "\"min\" or \"max\""),
    ('[lab]\nrun = "x"\nbudget = 1\neditable = ["a"]\n[task]\ndataset = "sotu"\n', "missing `preset`"),
    ('[lab]\nrun = "x"\nbudget = 1\neditable = ["a"]\n[task]\ndataset = "sotu"\npreset = "cpu"\n'
     'max_seq_len = 64\nvocab_size = 100\neval_tokens = 10\n', "at least 260"),
])
def test_bad_configs_name_the_problem(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")) as info:
        parse_config(text, ROOT)
    assert "autoresearch.toml" in str(info.value)


# ---------------------------------------------------------------------------
# [[agents]]: several agents share a run
# ---------------------------------------------------------------------------

AGENTS = '''
[[agents]]
name = "hparam"
weight = 2
seed = 7
space = { DEPTH = { choices = [2, 4] } }

[[agents]]
name = "openai:gpt-x"
base_url = "http://127.0.0.1:9/v1"
temperature = 0.5

[[agents]]
name = "claude-code"
weight = 0.5
'''


def test_agents_entries_load_with_weights_and_options() -> None:
    from autoresearch.config import AgentSpec

    cfg = parse_config(rendered() + AGENTS, ROOT)
    assert cfg.agent == "hparam" and cfg.agent_options == {}  # [agent] is still read: the loop's settings
    assert [(a.spec, a.weight) for a in cfg.agents] == [("hparam", 2.0), ("openai:gpt-x", 1.0), ("claude-code", 0.5)]
    assert cfg.agents[0].options == {"seed": 7, "space": {"DEPTH": {"choices": [2, 4]}}}
    assert cfg.agents[1].options == {"base_url": "http://127.0.0.1:9/v1", "temperature": 0.5}
    assert cfg.agents[2] == AgentSpec("claude-code", 0.5, {}, "[[agents]] 'claude-code' (entry 3)")
    assert parse_config(rendered(), ROOT).agents == ()


@pytest.mark.parametrize("entry,message", [
    ('name = "hparam"\nweight = 0', "`weight` must be a number above 0, not 0"),
    ('name = "hparam"\nweight = -1.5', "`weight` must be a number above 0"),
    ('name = "hparam"\nweight = "two"', "`weight` must be a number above 0"),
    ('name = "hparam"\nweight = true', "`weight` must be a number above 0"),
    ('weight = 1', "entry 1 needs a `name`"),
    ('name = ""', "entry 1 needs a `name`"),
    ('name = 3', "entry 1 needs a `name`"),
    ('name = "hparam"\nrepair_attempts = 3', "a setting of the whole run \\(move it to \\[agent\\]\\)"),
])
def test_bad_agents_entries_say_what_to_fix(entry: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        parse_config(rendered() + "\n[[agents]]\n" + entry + "\n", ROOT)
    assert "autoresearch.toml: [[agents]]" in str(info.value)


def test_agents_must_be_an_array_of_tables() -> None:
    with pytest.raises(ConfigError, match="array of tables"):
        parse_config('agents = ["hparam"]\n' + rendered(), ROOT)


def test_agents_entries_are_checked_when_built(tmp_path: Path) -> None:
    """What only the agent knows (its spec, its options) fails when the run builds it, naming the entry."""
    from autoresearch.agents import AgentError, AgentPool, make_agents

    def build(text: str):  # type: ignore[no-untyped-def]
        return make_agents(parse_config(rendered() + text, tmp_path).agents, tmp_path, tag="t")

    with pytest.raises(AgentError, match="unknown agent 'gpt-x'.*choose one of: hparam"):
        build('\n[[agents]]\nname = "hparam"\n[[agents]]\nname = "gpt-x"\n')
    with pytest.raises(AgentError, match=r"\[\[agents\]\] 'hparam' \(entry 2\) has unknown option\(s\) sed"):
        build('\n[[agents]]\nname = "hparam"\n[[agents]]\nname = "hparam"\nsed = 1\n')
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "a.patch").write_text("one\n")
    pool = build(f'\n[[agents]]\nname = "hparam"\nweight = 3\nseed = 5\n[[agents]]\nname = "patches:{tmp_path / "p"}"\n')
    assert isinstance(pool, AgentPool) and pool.weights == (3.0, 1.0)
    assert pool.names == ("hparam", f"patches:{tmp_path / 'p'}") and pool.agents[0].seed == 5  # type: ignore[attr-defined]
    single = build('\n[[agents]]\nname = "hparam"\nweight = 3\n')
    assert not isinstance(single, AgentPool) and single.name == "hparam"  # one agent: no pool
