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
