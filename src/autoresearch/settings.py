"""Environment variables, read in one place.

Every option the user can set from the environment starts with AUTORESEARCH_. Functions, not
module-level constants, so tests can point them elsewhere with monkeypatch.setenv.
"""

from __future__ import annotations

import os
from pathlib import Path

CLIMBMIX_URL = "https://huggingface.co/datasets/karpathy/climbmix-400b-shuffle/resolve/main"
TINYSTORIES_URL = "https://huggingface.co/datasets/karpathy/tinystories-gpt4-clean/resolve/main"


def cache_dir() -> Path:
    """Where datasets and tokenizers live: $AUTORESEARCH_CACHE, else ~/.cache/autoresearch."""
    value = os.environ.get("AUTORESEARCH_CACHE")
    if value:
        return Path(value).expanduser()
    return Path.home() / ".cache" / "autoresearch"


def climbmix_url() -> str:
    """Base URL of the climbmix shards; $AUTORESEARCH_CLIMBMIX_URL points at a mirror."""
    return os.environ.get("AUTORESEARCH_CLIMBMIX_URL", CLIMBMIX_URL).rstrip("/")


def tinystories_url() -> str:
    """Base URL of the TinyStories parquet; $AUTORESEARCH_TINYSTORIES_URL points at a mirror."""
    return os.environ.get("AUTORESEARCH_TINYSTORIES_URL", TINYSTORIES_URL).rstrip("/")


def debug() -> bool:
    """$AUTORESEARCH_DEBUG=1 makes the CLI re-raise errors with their traceback."""
    return os.environ.get("AUTORESEARCH_DEBUG", "") not in ("", "0", "false", "no")


def budget_override() -> float | None:
    """$AUTORESEARCH_BUDGET (seconds) overrides the lab's time budget for one run."""
    value = os.environ.get("AUTORESEARCH_BUDGET")
    return float(value) if value else None
