"""LLM providers: one `complete()` call against the OpenAI or Anthropic wire format.

`make_provider("openai:gpt-5-mini")` or `make_provider("anthropic:claude-sonnet-4-5")`. Any
OpenAI-compatible server (vLLM, Ollama, llama.cpp, LM Studio, OpenRouter) is `openai:<model>` with a
`base_url`. The SDKs are optional extras, imported when a provider is built.

The retry loop is ours, not the SDK's (its clients are built with max_retries=0), so the
never-retry list is explicit: rate limits, server errors, dropped connections and timeouts are
retried with exponential backoff and jitter, honouring Retry-After; a refused key, an unknown model,
a context that is too long and any other 4xx fail at once. The API key is read once, at
construction, and never appears in a message or a repr.

A request may carry a `response_format` (the OpenAI-compatible structured-output field, see
structured.py); the OpenAI provider sends it, and drops it for good when the server refuses it with a
400 naming it. The Anthropic Messages API has none: that provider sends the prompt alone.
"""

from __future__ import annotations

import importlib
import ipaddress
import os
import random
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol
from urllib.parse import urlparse

from ..errors import (
    AgentAuthFailed,
    AgentUnavailable,
    AutoresearchError,
    ConfigError,
    ContextTooLong,
    MissingExtra,
    MissingKey,
    ModelNotFound,
)

__all__ = ["Message", "Completion", "Provider", "ProviderOptions", "ProviderRequestError", "OpenAIProvider",
           "AnthropicProvider", "make_provider", "estimate_cost", "is_local", "PRICES", "PROVIDER_SPECS"]

PROVIDER_SPECS = ("openai:<model>", "anthropic:<model>")
LOCAL_KEY = "not-needed"  # sent to local OpenAI-compatible servers when no key is set; they ignore it

# List prices in USD per million tokens (input, output) at the time of writing. They change:
# override or extend them with ProviderOptions.prices (the [agent] prices table in autoresearch.toml).
PRICES: dict[str, tuple[float, float]] = {
    "gpt-5": (1.25, 10.00),
    "gpt-5-mini": (0.25, 2.00),
    "gpt-5-nano": (0.05, 0.40),
    "gpt-4.1": (2.00, 8.00),
    "gpt-4.1-mini": (0.40, 1.60),
    "gpt-4o": (2.50, 10.00),
    "gpt-4o-mini": (0.15, 0.60),
    "o3": (2.00, 8.00),
    "o4-mini": (1.10, 4.40),
    "claude-opus-4-5": (5.00, 25.00),
    "claude-opus-4-1": (15.00, 75.00),
    "claude-sonnet-4-5": (3.00, 15.00),
    "claude-sonnet-4-0": (3.00, 15.00),
    "claude-haiku-4-5": (1.00, 5.00),
    "claude-3-5-haiku-latest": (0.80, 4.00),
}

# Phrases servers use when the prompt does not fit: OpenAI, Anthropic, vLLM, llama.cpp, OpenRouter.
_CONTEXT_PHRASES = ("context length", "context_length", "maximum context", "context window", "context size",
                    "context limit", "prompt is too long", "too many tokens", "input is too long",
                    "exceed_context_size")
_SNAPSHOT = re.compile(r"-\d{4}-?\d{2}-?\d{2}$")  # dated snapshots: gpt-4o-2024-08-06, claude-...-20250929


@dataclass(frozen=True)
class Message:
    """One turn of the conversation."""

    role: str  # "user" or "assistant"
    content: str

    def __post_init__(self) -> None:
        if self.role not in ("user", "assistant"):
            raise ValueError(f"message role must be 'user' or 'assistant', not {self.role!r}")


@dataclass(frozen=True)
class Completion:
    """The model's answer and what it cost."""

    text: str
    model: str  # as the server names it (may be a dated snapshot of the requested model)
    input_tokens: int  # 0 when the server does not report usage
    output_tokens: int
    cost_usd: float | None  # None when no price is known for the model
    seconds: float  # wall time of the successful request
    attempts: int  # requests made, retries included
    truncated: bool = False  # the reply stopped at max_tokens (finish_reason "length", stop_reason "max_tokens")


class Provider(Protocol):
    """Something that answers a conversation: what the LLM agent calls."""

    spec: str  # e.g. "openai:gpt-5-mini"

    def complete(self, system: str, messages: list[Message], max_tokens: int = 8192,
                 response_format: Mapping[str, Any] | None = None) -> Completion: ...


@dataclass(frozen=True)
class ProviderOptions:
    """How to reach the model and how hard to try."""

    base_url: str | None = None  # OpenAI-compatible servers (vLLM, Ollama, llama.cpp, ...); also for anthropic
    api_key_env: str | None = None  # env var holding the key (default OPENAI_API_KEY / ANTHROPIC_API_KEY)
    timeout: float = 600.0  # per request, seconds
    max_retries: int = 6  # transient errors only
    backoff_base: float = 2.0  # seconds; doubles per retry, with jitter, capped at backoff_max
    backoff_max: float = 120.0  # also the longest Retry-After we wait for; a longer one gives up at once
    prices: dict[str, tuple[float, float]] | None = None  # model -> (USD/1M input, USD/1M output), over PRICES
    temperature: float | None = None  # None: the server's default (reasoning models accept no other)


class ProviderRequestError(AutoresearchError):
    """The server rejected the request for a reason retrying cannot fix (a 4xx other than auth,
    unknown model or context length), or sent a reply that cannot be read."""


def estimate_cost(model: str, input_tokens: int, output_tokens: int,
                  prices: dict[str, tuple[float, float]] | None = None) -> float | None:
    """USD for one request, from `prices` merged over PRICES; None for a model with no known price."""
    table = {**PRICES, **(prices or {})}
    price = table.get(model) or table.get(_SNAPSHOT.sub("", model))
    if price is None:
        return None
    return (input_tokens * price[0] + output_tokens * price[1]) / 1_000_000


def make_provider(spec: str, options: ProviderOptions | None = None) -> Provider:
    """The provider a spec names: "openai:<model>" or "anthropic:<model>"."""
    kind, _, model = spec.partition(":")
    classes: dict[str, type[_RetryingProvider]] = {"openai": OpenAIProvider, "anthropic": AnthropicProvider}
    if kind not in classes or not model.strip():
        raise ConfigError(f"unknown LLM spec {spec!r}",
                          f"use one of: {', '.join(PROVIDER_SPECS)}; a local OpenAI-compatible server is "
                          "openai:<model> with --base-url")
    return classes[kind](model.strip(), options or ProviderOptions())


class _Answer(NamedTuple):
    """What one successful request returned."""

    text: str
    model: str
    input_tokens: int
    output_tokens: int
    truncated: bool


@dataclass(frozen=True)
class _Verdict:
    """How to handle one failed request."""

    error: AutoresearchError
    transient: bool = False  # retry after a backoff
    retry_after: float | None = None  # seconds the server asked us to wait
    again: bool = False  # the request was adjusted: send it again at once, no retry spent


class _RetryingProvider:
    """The shared part: key lookup, the retry loop, error classification. Subclasses send one request."""

    name = ""  # "openai" or "anthropic"
    default_key_env = ""
    sdk_module = ""
    spec: str

    def __init__(self, model: str, options: ProviderOptions) -> None:
        if options.timeout <= 0 or options.max_retries < 0 or options.backoff_base < 0 or options.backoff_max < 0:
            raise ConfigError("provider options: timeout must be > 0, max_retries and backoff delays >= 0")
        self.model = model
        self.spec = f"{self.name}:{model}"
        self.options = options
        self.key_env = options.api_key_env or self.default_key_env
        self._sleep: Callable[[float], None] = time.sleep
        self._random = random.Random()
        try:
            self.sdk: Any = importlib.import_module(self.sdk_module)
        except ImportError:
            raise MissingExtra(f"the {self.sdk_module} SDK is not installed", "pip install 'autoresearch[llm]'") from None
        key = os.environ.get(self.key_env, "")
        self._keyless = not key
        if not key:
            if not is_local(options.base_url):
                raise MissingKey(f"{self.key_env} is not set",
                                 f"export {self.key_env}=... or pass --base-url for a local server")
            key = LOCAL_KEY
        self._secret = key
        self.client: Any = self._make_client(key)
        self.base_url = str(self.client.base_url).rstrip("/")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec!r}, base_url={self.base_url!r})"

    def _make_client(self, key: str) -> Any:
        raise NotImplementedError

    def _send(self, system: str, messages: list[Message], max_tokens: int,
              response_format: Mapping[str, Any] | None) -> _Answer:
        """One request. SDK exceptions propagate."""
        raise NotImplementedError

    def complete(self, system: str, messages: list[Message], max_tokens: int = 8192,
                 response_format: Mapping[str, Any] | None = None) -> Completion:
        """Ask the model (its reply constrained by `response_format` where the API takes one); retry
        transient failures; raise a typed error for everything else."""
        attempts, retries = 0, 0
        while True:
            attempts += 1
            start = time.monotonic()
            try:
                answer = self._send(system, messages, max_tokens, response_format)
            except self.sdk.APIError as exc:
                verdict = self._classify(exc)
            else:
                n_in, n_out = answer.input_tokens, answer.output_tokens
                cost = estimate_cost(self.model, n_in, n_out, self.options.prices)
                if cost is None and answer.model != self.model:
                    cost = estimate_cost(answer.model, n_in, n_out, self.options.prices)
                return Completion(text=answer.text, model=answer.model, input_tokens=n_in, output_tokens=n_out,
                                  cost_usd=cost, seconds=time.monotonic() - start, attempts=attempts,
                                  truncated=answer.truncated)
            if verdict.again:
                continue
            if not verdict.transient:
                raise verdict.error from None
            if retries >= self.options.max_retries:
                raise AgentUnavailable(f"{self.spec}: no answer after {attempts} request(s): {verdict.error.message}",
                                       f"check the server at {self.base_url}; the loop pauses and tries again later")
            retries += 1
            self._sleep(self._delay(retries, verdict.retry_after))

    def _delay(self, retry: int, retry_after: float | None) -> float:
        """Seconds before retry number `retry` (1-based): Retry-After when given, else exponential with jitter."""
        if retry_after is not None:
            if retry_after > self.options.backoff_max:
                raise AgentUnavailable(f"{self.spec}: the server asks to wait {retry_after:g} s before retrying",
                                       "the loop pauses and tries again later")
            return max(retry_after, 0.0)
        delay = min(self.options.backoff_max, self.options.backoff_base * 2.0 ** min(retry - 1, 32))
        return delay * self._random.uniform(0.5, 1.0)

    def _classify(self, exc: Any) -> _Verdict:
        """Turn an SDK exception into the error we raise and whether it is worth retrying."""
        sdk = self.sdk
        if isinstance(exc, sdk.APITimeoutError):
            return _Verdict(AgentUnavailable(f"timed out after {self.options.timeout:g} s"), transient=True)
        if isinstance(exc, sdk.APIConnectionError):
            return _Verdict(AgentUnavailable(f"cannot connect to {self.base_url}"), transient=True)
        if not isinstance(exc, sdk.APIStatusError):
            return _Verdict(ProviderRequestError(f"{self.spec}: unreadable reply: {self._scrub(str(exc))}"))
        status: int = exc.status_code
        text, code = self._scrub(_server_message(exc)), _error_code(exc)
        detail = f"HTTP {status}: {text}" if text else f"HTTP {status}"
        if status in (401, 403):
            if self._keyless:
                return _Verdict(AgentAuthFailed(f"{self.spec}: the server at {self.base_url} wants a key and "
                                                f"{self.key_env} is not set ({detail})", f"export {self.key_env}=..."))
            return _Verdict(AgentAuthFailed(f"{self.spec}: the server refused the key in {self.key_env} ({detail})",
                                            f"check {self.key_env}"))
        lowered = f"{text} {code or ''}".lower()
        if status == 413 or (status != 429 and any(p in lowered for p in _CONTEXT_PHRASES)):
            return _Verdict(ContextTooLong(f"{self.spec}: the prompt does not fit the model's context ({detail})",
                                           "shorten the prompt or the history sent to the model"))
        if status == 404 or code == "model_not_found":
            return _Verdict(ModelNotFound(f"{self.spec}: the server at {self.base_url} does not know model "
                                          f"{self.model!r} ({detail})", "check the model name and the base URL"))
        if status in (408, 409, 429) or status >= 500:
            return _Verdict(AgentUnavailable(detail), transient=True, retry_after=_retry_after(exc))
        return _Verdict(ProviderRequestError(f"{self.spec}: the server rejected the request ({detail})"))

    def _scrub(self, text: str) -> str:
        """One line, bounded, and never the key (some servers echo it back in auth errors)."""
        if self._secret and self._secret != LOCAL_KEY:
            text = text.replace(self._secret, "***")
        text = " ".join(text.split())
        return text if len(text) <= 300 else text[:297] + "..."


class OpenAIProvider(_RetryingProvider):
    """Chat Completions: api.openai.com or any OpenAI-compatible server at `base_url`."""

    name = "openai"
    default_key_env = "OPENAI_API_KEY"
    sdk_module = "openai"

    def _make_client(self, key: str) -> Any:
        client = self.sdk.OpenAI(api_key=key, base_url=self.options.base_url, timeout=self.options.timeout,
                                 max_retries=0)
        # api.openai.com wants max_completion_tokens (reasoning models refuse max_tokens); local servers
        # and proxies have long known max_tokens. A 400 naming the other one switches, once.
        official = urlparse(str(client.base_url)).hostname == "api.openai.com"
        self._token_param = "max_completion_tokens" if official else "max_tokens"
        self._switched = False
        self._sends_format = True  # False once the server refused response_format
        self._sent_format = False  # whether the request being classified carried it
        return client

    def _send(self, system: str, messages: list[Message], max_tokens: int,
              response_format: Mapping[str, Any] | None) -> _Answer:
        wire = ([{"role": "system", "content": system}] if system else []) + [
            {"role": m.role, "content": m.content} for m in messages]
        extra: dict[str, Any] = {self._token_param: max_tokens}
        if self.options.temperature is not None:
            extra["temperature"] = self.options.temperature
        self._sent_format = response_format is not None and self._sends_format
        if self._sent_format:
            extra["response_format"] = dict(response_format or {})
        response = self.client.chat.completions.create(model=self.model, messages=wire, timeout=self.options.timeout,
                                                       **extra)
        choices = getattr(response, "choices", None)
        if not choices:
            raise ProviderRequestError(f"{self.spec}: the server at {self.base_url} returned no choices")
        usage = getattr(response, "usage", None)
        return _Answer(choices[0].message.content or "", getattr(response, "model", None) or self.model,
                       int(getattr(usage, "prompt_tokens", 0) or 0), int(getattr(usage, "completion_tokens", 0) or 0),
                       getattr(choices[0], "finish_reason", None) == "length")

    def _classify(self, exc: Any) -> _Verdict:
        if isinstance(exc, self.sdk.BadRequestError) and self._sent_format \
                and "response_format" in _server_message(exc).lower():
            self._sends_format = False  # an older server or model: the prompt still asks for the format
            return _Verdict(ProviderRequestError(_server_message(exc)), again=True)
        if isinstance(exc, self.sdk.BadRequestError) and not self._switched:
            text = _server_message(exc).lower()
            if self._token_param in text and any(w in text for w in ("unsupported", "not supported", "unrecognized",
                                                                     "extra", "unknown")):
                self._switched = True
                self._token_param = "max_tokens" if self._token_param == "max_completion_tokens" else \
                    "max_completion_tokens"
                return _Verdict(ProviderRequestError(text), again=True)
        return super()._classify(exc)


class AnthropicProvider(_RetryingProvider):
    """The Messages API: api.anthropic.com or a compatible server at `base_url` (without /v1)."""

    name = "anthropic"
    default_key_env = "ANTHROPIC_API_KEY"
    sdk_module = "anthropic"

    def _make_client(self, key: str) -> Any:
        return self.sdk.Anthropic(api_key=key, base_url=self.options.base_url, timeout=self.options.timeout,
                                  max_retries=0)

    def _send(self, system: str, messages: list[Message], max_tokens: int,
              response_format: Mapping[str, Any] | None) -> _Answer:
        """`response_format` is not sent: the Messages API has no such field (the prompt asks for the format)."""
        extra: dict[str, Any] = {"system": system} if system else {}
        if self.options.temperature is not None:  # newer SDKs dropped the keyword; the API still takes it
            extra["extra_body"] = {"temperature": self.options.temperature}
        response = self.client.messages.create(model=self.model, max_tokens=max_tokens, timeout=self.options.timeout,
                                               messages=[{"role": m.role, "content": m.content} for m in messages],
                                               **extra)
        blocks = getattr(response, "content", None) or []
        text = "".join(getattr(b, "text", "") or "" for b in blocks if getattr(b, "type", None) == "text")
        usage = getattr(response, "usage", None)
        return _Answer(text, getattr(response, "model", None) or self.model,
                       int(getattr(usage, "input_tokens", 0) or 0), int(getattr(usage, "output_tokens", 0) or 0),
                       getattr(response, "stop_reason", None) == "max_tokens")


def is_local(base_url: str | None, private: bool = False) -> bool:
    """Whether base_url points at this machine (local servers need no key): localhost, 127.0.0.0/8,
    ::1, 0.0.0.0; with `private`, a private-network address too (10/8, 172.16/12, 192.168/16, fc00::/7)."""
    host = urlparse(base_url).hostname if base_url else None
    if not host:
        return False
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return address.is_loopback or address.is_unspecified or (private and address.is_private)


def _error_body(exc: Any) -> dict[str, Any]:
    """The inner error object of either wire format ({"error": {...}} or the bare object)."""
    body = getattr(exc, "body", None)
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return body["error"]
    return body if isinstance(body, dict) else {}


def _server_message(exc: Any) -> str:
    """The server's own words: error.message (both formats), error (a string), detail, or the SDK's text."""
    body = getattr(exc, "body", None)
    for value in (_error_body(exc).get("message"), _error_body(exc).get("detail"),
                  body.get("error") if isinstance(body, dict) else None, body if isinstance(body, str) else None):
        if isinstance(value, str) and value.strip():
            return value
    return str(getattr(exc, "message", "") or exc)


def _error_code(exc: Any) -> str | None:
    """error.code (OpenAI) or error.type (Anthropic), when the server gives one."""
    inner = _error_body(exc)
    value = inner.get("code") or inner.get("type")
    return str(value) if value is not None else None


def _retry_after(exc: Any) -> float | None:
    """Seconds from the retry-after-ms or retry-after header (numbers only; dates are ignored)."""
    response = getattr(exc, "response", None)
    headers = getattr(response, "headers", None)
    if headers is None:
        return None
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            return max(float(value) * scale, 0.0)
        except ValueError:
            continue
    return None
