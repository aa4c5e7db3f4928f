"""Typed errors. The library raises these and never prints; the CLI turns each into one line.

Every error carries the sentence a user needs: what went wrong and what to do about it.
"""

from __future__ import annotations


class AutoresearchError(Exception):
    """Base class for every expected failure. `str(err)` is the one-line message for the user."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class ConfigError(AutoresearchError):
    """autoresearch.toml is missing a key, has a wrong type, or names something unknown."""


class NotALab(AutoresearchError):
    """The current directory (and its parents) hold no autoresearch.toml."""


class LabExists(AutoresearchError):
    """`init` was pointed at a directory that already holds a lab or other files."""


class UnknownPreset(ConfigError):
    """A preset name that presets.PRESETS does not know."""


class UnknownDataset(ConfigError):
    """A dataset spec that no recipe understands."""


class DatasetUnreachable(AutoresearchError):
    """A download failed after all retries (no network, wrong mirror URL, HTTP error)."""


class DataNotPrepared(AutoresearchError):
    """Shards or tokenizer are missing from the cache: `autoresearch prepare` has not run."""


class CacheCorrupt(AutoresearchError):
    """A cached file does not match its manifest (truncated download, edited shard, bad pickle)."""


class GitError(AutoresearchError):
    """A git command failed, or git is not installed."""


class DeviceUnavailable(AutoresearchError):
    """A preset asks for a device (cuda, mps) that this machine does not have."""


class MissingExtra(AutoresearchError):
    """An optional dependency (the openai or anthropic SDK) is not installed."""


class MissingKey(AutoresearchError):
    """The API key an agent needs is not in the environment."""


class ModelNotFound(AutoresearchError):
    """The server does not know the model: never retried."""


class ContextTooLong(AutoresearchError):
    """The prompt exceeds the model's context window: never retried as is; the agent shrinks it."""


class AgentUnavailable(AutoresearchError):
    """The agent's service cannot answer now (server down, timeouts, rate limits past every retry).
    The loop pauses and tries again later instead of failing the night."""


class AgentAuthFailed(AgentUnavailable):
    """The server refused the API key. Never retried at once; the loop pauses, says so, and tries later."""


class RayMissing(MissingExtra):
    """`--ray` was asked for and Ray is not installed."""


class RayUnreachable(AutoresearchError):
    """`--ray` names a cluster that cannot be reached."""


class NodeLost(AutoresearchError):
    """A Ray node died, or the worker process running an experiment there was killed: that run is
    lost (not a result of the experiment) and can run again on another node."""

    def __init__(self, node: str, why: str) -> None:
        super().__init__(f"lost the run on node {node}: {why}", "the experiment can run again on another node")
        self.node, self.why = node, why
        self.args = (node, why)  # so that a pickled copy is made the same way


class NodeRefused(AutoresearchError):
    """A Ray node cannot run the lab's experiments comparably with the head: its prepared data (or
    its autoresearch) differs from the head's, or it cannot prepare the data at all."""

    def __init__(self, node: str, problem: str, hint: str | None = None) -> None:
        super().__init__(f"node {node} refused: {problem}", hint or "prepare the same data with the same autoresearch "
                         "on that node (`autoresearch prepare`), or remove it from the cluster")
        self.node, self.problem = node, problem
        self.args = (node, problem, hint)
