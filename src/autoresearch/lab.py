"""A lab: a git repository with the code under study, its brief, and autoresearch.toml.

`init_lab` creates one from the package's template; `find_lab` locates the lab that contains a
directory, the way git finds its repository.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from . import constants
from .config import CONFIG_NAME, LabConfig, MetricConfig, TaskConfig, load_config, render_config
from .errors import LabExists, NotALab
from .gitrepo import Git
from .presets import Preset, get_preset

STATE_DIR = ".autoresearch"  # ledger, logs and worktrees: git-ignored
TEMPLATE_FILES = {"prepare.py": "prepare.py", "train.py": "train.py", "program.md": "program.md", "gitignore": ".gitignore"}


@dataclass(frozen=True)
class Lab:
    """A lab on disk."""

    root: Path
    config: LabConfig

    @property
    def state_dir(self) -> Path:
        """Everything autoresearch writes in a lab, git-ignored and hidden from runs."""
        return self.root / STATE_DIR

    @property
    def ledger_path(self) -> Path:
        return self.state_dir / "ledger.db"

    @property
    def logs(self) -> Path:
        """One log per experiment, `NNNNN.log`."""
        return self.state_dir / "logs"

    def worktree(self, tag: str, worker: str | None = None) -> Path:
        """Where a tag's experiments run: one worktree per worker, the first under the tag's name, the
        others `<tag>~w1`, ... (`~` is never in a tag, so no two tags' worktrees share a name)."""
        name = tag if worker in (None, "w0") else f"{tag}~{worker}"
        return self.state_dir / "worktrees" / name

    def scratch(self, experiment_id: int) -> Path:
        """A run's writable folder outside its worktree (hand-off, TMPDIR, HOME); its model's copy
        goes beside it, under `models/` (measurement.model_copy)."""
        return self.state_dir / "scratch" / f"{experiment_id:05d}"

    def trusted(self, tag: str) -> Path:
        """Where the baseline commit's autoresearch.toml is copied for the evaluator."""
        return self.state_dir / "trusted" / tag

    def lock(self, tag: str) -> Path:
        return self.state_dir / f"run-{tag}.lock"


def find_lab(start: Path | None = None) -> Lab:
    """The lab containing `start` (default: the current directory), searching upwards."""
    here = (start or Path.cwd()).resolve()
    for directory in (here, *here.parents):
        if (directory / CONFIG_NAME).is_file():
            return Lab(directory, load_config(directory))
    raise NotALab(f"{here} is not inside a lab (no {CONFIG_NAME} here or above)",
                  "cd into a lab, or create one with `autoresearch init DIR`")


def resolve_preset(name: str) -> Preset:
    """`auto` becomes the preset of the best device present; other names are looked up."""
    if name == "auto":
        from .devices import detect_device  # imports torch: only when needed

        return get_preset(detect_device().type)
    return get_preset(name)


def template_text(name: str) -> str:
    return resources.files("autoresearch").joinpath("template", name).read_text(encoding="utf-8")


def init_lab(path: Path, dataset: str = "sotu", preset: str = "auto", budget: float | None = None) -> Lab:
    """Create a new lab at `path` from the template and make its first commit."""
    from .data import dataset_key  # validates the dataset spec before anything is written

    path = path.resolve()
    if (path / CONFIG_NAME).exists():
        raise LabExists(f"{path} is already a lab", "use it as it is, or choose another directory")
    if path.exists() and not path.is_dir():
        raise LabExists(f"{path} exists and is not a directory", "choose another path")
    if path.exists() and any(path.iterdir()):
        raise LabExists(f"{path} is not empty", "choose a new directory (use `init --target` for an existing project)")
    dataset_key(dataset)
    chosen = resolve_preset(preset)
    if budget is not None and budget <= 0:
        from .errors import ConfigError

        raise ConfigError(f"--budget must be positive seconds, not {budget:g}")
    if budget is None:
        budget = chosen.budget
    task = TaskConfig(dataset=dataset, preset=chosen.name, max_seq_len=chosen.max_seq_len,
                      vocab_size=chosen.vocab_size, eval_tokens=chosen.eval_tokens)
    path.mkdir(parents=True, exist_ok=True)
    for source, target in TEMPLATE_FILES.items():
        text = template_text(source)
        if source == "train.py":
            text = constants.set_constants(text, chosen.train_for(budget))
        (path / target).write_text(text, encoding="utf-8")
    (path / CONFIG_NAME).write_text(render_config(
        name=path.name, run="python train.py", budget=budget,
        editable=["train.py"], frozen=["prepare.py", CONFIG_NAME], metric=MetricConfig(), task=task,
    ), encoding="utf-8")
    git = Git(path)
    if not git.is_root():  # a lab inside another repository gets a repository of its own
        git.init()
    git.commit_all(f"autoresearch: new lab ({dataset}, preset {chosen.name})")
    return Lab(path, load_config(path))


def init_target(path: Path, run: str, editable: list[str], metric: str = "score", direction: str = "min",
                budget: float = 60.0, frozen: list[str] | None = None, json_file: str | None = None) -> Lab:
    """Turn an existing git repository into a lab: write autoresearch.toml, ignore the state dir, commit.

    Only those two files are added or changed; the project's own files are left as they are.
    """
    from .errors import ConfigError

    path = path.resolve()
    git = Git(path)
    if not path.is_dir() or not git.is_root():
        raise NotALab(f"{path} is not the top of a git repository", "run `git init` there first, or give the repository's root")
    if (path / CONFIG_NAME).exists():
        raise LabExists(f"{path} is already a lab", f"edit {CONFIG_NAME} instead")
    if direction not in ("min", "max"):
        raise ConfigError(f"--direction must be min or max, not {direction!r}")
    if not editable:
        raise ConfigError("name at least one --editable file or glob")
    if git.resolve("HEAD") is None:
        raise NotALab(f"{path} has no commit yet", "commit the project's files first")
    (path / CONFIG_NAME).write_text(render_config(
        name=path.name, run=run, budget=budget, editable=editable, frozen=[CONFIG_NAME, *(frozen or [])],
        metric=MetricConfig(name=metric, direction=direction, json_file=json_file), task=None,
    ), encoding="utf-8")
    ignore = path / ".gitignore"
    existing = ignore.read_text(encoding="utf-8") if ignore.exists() else ""
    if f"{STATE_DIR}/" not in existing.splitlines():
        ignore.write_text(existing + ("" if existing.endswith("\n") or not existing else "\n")
                          + f"{STATE_DIR}/\nresults.tsv\n", encoding="utf-8")
    git.run("add", CONFIG_NAME, ".gitignore")
    git.commit_staged("autoresearch: make this repository a lab")
    return Lab(path, load_config(path))
