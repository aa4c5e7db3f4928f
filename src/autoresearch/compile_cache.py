"""A persistent torch.compile cache that no experiment can use to change another's training.

Inside the sandbox HOME is read-only and /tmp is private, so without this every run on CUDA would
compile its model from cold inside its budget (about a minute for the cuda preset's GPT). Here each
run gets a writable copy of its champion's cache: Inductor's FX-graph and autograd caches, Triton's
kernels and the driver's PTX cache. An unchanged model then loads its kernels instead of compiling
them. The budget still counts whatever compiling or loading a run does.

What a run writes lands in its own copy, in its scratch directory, and is dropped with it. Only
when the experiment is kept does its copy become the cache of the new champion, which the next
runs copy in turn. So a cache a run reads was written by the champion it descends from and that
champion's kept ancestors, never by a sibling or a discarded experiment: a planted cache entry can
reach other runs only as part of a change that was itself measured and kept, like the rest of its
code. A copy, not hard links: a run could write into a shared inode in place.
"""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

DIRECTORY = "compile-cache"  # under the lab's state dir, one folder per tag, one cache per champion commit


def cache_env(cache: Path) -> dict[str, str]:
    """The variables that point torch.compile (Inductor, Triton) and the CUDA driver at `cache`."""
    return {
        "TORCHINDUCTOR_CACHE_DIR": str(cache / "inductor"),
        "TRITON_CACHE_DIR": str(cache / "triton"),
        "CUDA_CACHE_PATH": str(cache / "nv"),
        "TORCHINDUCTOR_FX_GRAPH_CACHE": "1",
        "TORCHINDUCTOR_AUTOGRAD_CACHE": "1",
    }


def champion_cache(state_dir: Path, tag: str, commit: str) -> Path:
    return state_dir / DIRECTORY / tag / commit


def for_run(state_dir: Path, tag: str, commits: tuple[str | None, ...], scratch: Path) -> tuple[Path, dict[str, str]]:
    """A fresh copy, in `scratch`, of the first of `commits` that has a champion cache (a champion's
    own re-run reads its own cache, a candidate its parent's); an empty one when none has. Returns
    the copy and the environment that points the run at it."""
    copy = scratch / DIRECTORY
    shutil.rmtree(copy, ignore_errors=True)  # an interrupted attempt's leftovers
    for commit in commits:
        source = champion_cache(state_dir, tag, commit) if commit else None
        if source is not None and source.is_dir():
            shutil.copytree(source, copy, symlinks=True, ignore=_special_files)
            break
    else:
        copy.mkdir(parents=True)
    return copy, cache_env(copy)


def adopt(state_dir: Path, tag: str, commit: str, scratch: Path) -> bool:
    """Make a kept run's copy the cache of its commit, and drop the tag's other caches (their
    commits are no longer the champion). True when it was adopted; a commit that already has a
    cache keeps it (a re-run's copy is not adopted)."""
    copy = scratch / DIRECTORY
    target = champion_cache(state_dir, tag, commit)
    adopted = False
    if copy.is_dir() and not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(copy), str(target))
        adopted = True
    for other in target.parent.iterdir() if target.parent.is_dir() else ():
        if other.name != commit:
            shutil.rmtree(other, ignore_errors=True)
    return adopted


def _special_files(directory: str, names: list[str]) -> list[str]:
    """What copytree must skip: anything but files, folders and links (a kept run could have left a
    named pipe, and opening one to copy it would block the loop forever)."""
    skipped = []
    for name in names:
        try:
            mode = os.lstat(os.path.join(directory, name)).st_mode
        except OSError:
            skipped.append(name)
            continue
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode) or stat.S_ISLNK(mode)):
            skipped.append(name)
    return skipped
