"""The command line: help reads well, and every expected failure is one line that says what to do."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from autoresearch.cli import main
from conftest import run_cli


def one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: "), err
    assert "\n" not in err and "Traceback" not in err
    return err


def test_help_lists_subcommands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for word in ("init", "prepare", "train"):
        assert word in out


def test_no_command_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "usage: autoresearch" in capsys.readouterr().out


def test_init_makes_a_committed_lab(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lab = tmp_path / "mylab"
    assert main(["init", str(lab), "--preset", "tiny", "--budget", "7"]) == 0
    for name in ("prepare.py", "train.py", "program.md", "autoresearch.toml", ".gitignore"):
        assert (lab / name).is_file(), name
    assert ".autoresearch/" in (lab / ".gitignore").read_text()
    toml = (lab / "autoresearch.toml").read_text()
    assert "budget = 7" in toml and 'preset = "tiny"' in toml and 'dataset = "sotu"' in toml
    assert "DEPTH = 2" in (lab / "train.py").read_text()  # the tiny preset's value was written in
    status = subprocess.run(["git", "status", "--porcelain"], cwd=lab, capture_output=True, text=True)
    assert status.stdout == ""  # everything committed
    log = subprocess.run(["git", "log", "--oneline"], cwd=lab, capture_output=True, text=True).stdout
    assert len(log.strip().splitlines()) == 1
    assert "Next: cd" in capsys.readouterr().out


def test_cpu_preset_sizes_train_py_for_the_budget(tmp_path: Path) -> None:
    from autoresearch.constants import find_constants
    from autoresearch.presets import get_preset

    cpu = get_preset("cpu")
    (threshold, longer), = cpu.longer
    assert cpu.budget < threshold  # the default budget gets the base values
    for budget, expected in ((cpu.budget, cpu.train), (threshold, {**cpu.train, **longer}),
                             (3 * threshold, {**cpu.train, **longer})):
        lab = tmp_path / f"lab{budget:g}"
        assert main(["init", str(lab), "--preset", "cpu", "--budget", f"{budget:g}"]) == 0
        found = find_constants((lab / "train.py").read_text())
        assert {name: found[name].value for name in expected} == expected, budget
    assert longer["DEPTH"] > cpu.train["DEPTH"]  # a longer run affords a deeper model


def test_train_for_applies_longer_entries_in_budget_order() -> None:
    from autoresearch.presets import Preset

    preset = Preset(name="p", device="cpu", budget=10, max_seq_len=8, vocab_size=16, eval_tokens=64,
                    train={"DEPTH": 1, "HEAD_DIM": 8},
                    longer=((100, {"DEPTH": 3}), (50, {"DEPTH": 2, "HEAD_DIM": 16})))
    assert preset.train_for(10) == {"DEPTH": 1, "HEAD_DIM": 8}
    assert preset.train_for(50) == {"DEPTH": 2, "HEAD_DIM": 16}
    assert preset.train_for(99.9) == {"DEPTH": 2, "HEAD_DIM": 16}
    assert preset.train_for(100) == {"DEPTH": 3, "HEAD_DIM": 16}
    assert preset.train == {"DEPTH": 1, "HEAD_DIM": 8}  # not changed in place


def test_init_inside_another_repo_gets_its_own(tmp_path: Path) -> None:
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    assert main(["init", str(tmp_path / "lab"), "--preset", "tiny"]) == 0
    top = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=tmp_path / "lab", capture_output=True, text=True)
    assert Path(top.stdout.strip()) == (tmp_path / "lab").resolve()
    outer = subprocess.run(["git", "log"], cwd=tmp_path, capture_output=True, text=True)
    assert outer.returncode != 0  # the outer repository got no commit


def test_init_refuses_an_existing_lab(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["init", str(tmp_path / "lab"), "--preset", "tiny"]) == 0
    capsys.readouterr()
    assert main(["init", str(tmp_path / "lab"), "--preset", "tiny"]) == 1
    assert "already a lab" in one_line_error(capsys)


def test_init_refuses_a_non_empty_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    assert main(["init", str(tmp_path), "--preset", "tiny"]) == 1
    assert "not empty" in one_line_error(capsys)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_init_unknown_dataset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["init", str(tmp_path / "lab"), "--dataset", "wikipedia", "--preset", "tiny"]) == 1
    assert "wikipedia" in one_line_error(capsys)
    assert not (tmp_path / "lab").exists()  # nothing half-made


def test_init_bad_budget(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["init", str(tmp_path / "lab"), "--preset", "tiny", "--budget", "0"]) == 1
    assert "--budget" in one_line_error(capsys)


def test_unknown_preset_is_rejected_by_the_parser(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["init", str(tmp_path / "lab"), "--preset", "tpu"])
    assert info.value.code == 2
    assert "invalid choice: 'tpu'" in capsys.readouterr().err


def test_unknown_preset_in_toml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from autoresearch.errors import UnknownPreset
    from autoresearch.presets import get_preset

    with pytest.raises(UnknownPreset, match="choose one of: auto, cuda, mps, cpu, tiny"):
        get_preset("tpu")


@pytest.mark.parametrize("command", [["prepare"], ["train"]])
def test_outside_a_lab(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                       command: list[str]) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(command) == 1
    err = one_line_error(capsys)
    assert "not inside a lab" in err and "autoresearch init" in err


def test_broken_toml_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["init", str(tmp_path / "lab"), "--preset", "tiny"]) == 0
    (tmp_path / "lab" / "autoresearch.toml").write_text("[lab\n")
    monkeypatch.chdir(tmp_path / "lab")
    capsys.readouterr()
    assert main(["prepare"]) == 1
    assert "not valid TOML" in one_line_error(capsys)


def test_debug_reraises(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from autoresearch.errors import NotALab

    monkeypatch.chdir(tmp_path)
    with pytest.raises(NotALab):
        main(["--debug", "train"])


def test_train_before_prepare_says_run_prepare(tmp_path: Path) -> None:
    assert main(["init", str(tmp_path / "lab"), "--preset", "tiny"]) == 0
    proc = run_cli("train", cwd=tmp_path / "lab")
    assert proc.returncode != 0
    assert "autoresearch prepare" in proc.stderr


def test_module_entry_point_version(tmp_path: Path) -> None:
    proc = run_cli("--version", cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout.startswith("autoresearch ")


# ---------------------------------------------------------------------------
# run: several agents, workers, Ray
# ---------------------------------------------------------------------------


class CapturedLoop:
    """Stands in for loop.Loop: keeps what `run` built, runs nothing."""

    last: CapturedLoop | None = None

    def __init__(self, lab, agent, options, ledger, view) -> None:  # type: ignore[no-untyped-def]
        self.lab, self.agent, self.options = lab, agent, options
        CapturedLoop.last = self

    def run(self) -> str:
        return "captured"

    def champion(self) -> tuple[str | None, float | None]:
        return None, None


@pytest.fixture
def target(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    from test_loop import make_target

    from autoresearch import loop

    repo = make_target(tmp_path)
    (tmp_path / "ideas").mkdir()
    (tmp_path / "ideas" / "01.patch").write_text("an idea\n")
    monkeypatch.setattr(loop, "Loop", CapturedLoop)
    monkeypatch.chdir(repo)
    CapturedLoop.last = None
    return repo


def captured(*argv: str) -> CapturedLoop:
    assert main(["run", "--tag", "t", "--plain", *argv]) == 0
    assert CapturedLoop.last is not None
    return CapturedLoop.last


def test_one_agent_runs_as_before(target: Path) -> None:
    from autoresearch.agents import AgentPool

    run = captured("--agent", "hparam")
    assert not isinstance(run.agent, AgentPool) and run.agent.name == "hparam"
    assert run.options.workers is None and run.options.ray is None and run.options.tag == "t"
    assert not isinstance(captured().agent, AgentPool)  # [agent]'s name: hparam


def test_several_agents_share_the_run(target: Path) -> None:
    from autoresearch.agents import AgentPool

    ideas = target.parent / "ideas"
    run = captured("--agent", "hparam", "--agent", f"patches:{ideas}", "--agent", "hparam")
    assert isinstance(run.agent, AgentPool)
    assert run.agent.names == ("hparam", f"patches:{ideas}", "hparam#2") and run.agent.weights == (1.0, 1.0, 1.0)


def test_agents_entries_make_the_pool_without_agent(target: Path) -> None:
    from autoresearch.agents import AgentPool

    ideas = target.parent / "ideas"
    toml = target / "autoresearch.toml"
    toml.write_text(toml.read_text() + f'\n[[agents]]\nname = "hparam"\nweight = 2\nseed = 9\n'
                                       f'\n[[agents]]\nname = "patches:{ideas}"\n')
    run = captured()
    assert isinstance(run.agent, AgentPool) and run.agent.weights == (2.0, 1.0)
    assert run.agent.agents[0].seed == 9  # type: ignore[attr-defined]
    chosen = captured("--agent", "hparam")  # --agent wins, with the options and weight of its entry
    assert not isinstance(chosen.agent, AgentPool) and chosen.agent.seed == 9  # type: ignore[attr-defined]
    both = captured("--agent", f"patches:{ideas}", "--agent", "hparam")
    assert isinstance(both.agent, AgentPool) and both.agent.weights == (1.0, 2.0)


def test_a_bad_agents_entry_is_one_line(target: Path, capsys: pytest.CaptureFixture[str]) -> None:
    toml = target / "autoresearch.toml"
    toml.write_text(toml.read_text() + '\n[[agents]]\nname = "hparam"\n[[agents]]\nname = "gpt-x"\n')
    assert main(["run", "--tag", "t"]) == 1
    assert "unknown agent 'gpt-x'" in one_line_error(capsys)
    toml.write_text(toml.read_text() + '\n[[agents]]\nname = "hparam"\nweight = 0\n')
    assert main(["run", "--tag", "t"]) == 1
    assert "`weight` must be a number above 0" in one_line_error(capsys)


@pytest.mark.parametrize("argv,workers,ray", [
    (["--workers", "3"], 3, None),
    (["--workers", "auto"], 0, None),
    (["--workers", "1", "--ray", "auto"], 1, "auto"),
    (["--ray", "10.0.0.2:6379"], None, "10.0.0.2:6379"),
])
def test_workers_and_ray_reach_the_run_options(target: Path, argv: list[str], workers: int | None,
                                               ray: str | None) -> None:
    run = captured(*argv)
    assert (run.options.workers, run.options.ray) == (workers, ray)


@pytest.mark.parametrize("argv,message", [
    (["--workers", "0"], "error: --workers must be a positive number or auto"),
    (["--workers", "-2"], "error: --workers must be a positive number or auto"),
    (["--workers", "many"], "error: --workers must be a positive number or auto"),
    (["--ray", "10.0.0.2"], "error: --ray must be auto or HOST:PORT, not '10.0.0.2' (e.g. --ray 10.0.0.2:6379"),
    (["--ray", "host:port"], "error: --ray must be auto or HOST:PORT"),
])
def test_bad_workers_and_ray_are_one_line(target: Path, capsys: pytest.CaptureFixture[str], argv: list[str],
                                          message: str) -> None:
    assert main(["run", "--tag", "t", *argv]) == 1
    assert one_line_error(capsys).startswith(message)
    assert CapturedLoop.last is None  # nothing started


def test_run_help_names_the_new_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    out = capsys.readouterr().out
    assert "--workers N|auto" in out and "--ray ADDRESS" in out and "[[agents]]" in out
    assert "repeat it to let several agents share the run" in out


# ---------------------------------------------------------------------------
# status: where a failed proposal's agent replies are
# ---------------------------------------------------------------------------


def test_status_names_the_replies_of_a_failed_proposal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from fake_llm import FakeLLM, Reply
    from test_loop import make_target

    repo = make_target(tmp_path)
    monkeypatch.chdir(repo)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)  # a small local model: no key
    with FakeLLM(script=[Reply("I would make it faster.")]) as server:
        assert main(["run", "--agent", "openai:small", "--base-url", server.openai_base_url, "--plain",
                     "--max-experiments", "1", "--tag", "t"]) == 0
    capsys.readouterr()
    assert main(["status", "--json", "--tag", "t"]) == 0
    rows = json.loads(capsys.readouterr().out)["experiments"]
    assert [r["status"] for r in rows] == ["keep", "invalid"] and rows[0]["transcript"] is None
    path = Path(rows[1]["transcript"])
    assert path.parent == repo / ".autoresearch" / "transcripts" and path.name.endswith("-llm.json")
    assert [x["reply"] for x in json.loads(path.read_text())["exchanges"]] == ["I would make it faster."] * 3
    assert main(["status", "--tag", "t"]) == 0
    out = capsys.readouterr().out
    assert f".autoresearch/transcripts/{path.name}" in out and "(agent" in out
