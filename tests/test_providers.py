"""The LLM providers, with the real openai and anthropic SDKs talking to FakeLLM on 127.0.0.1."""

from __future__ import annotations

import os
import socket
import sys
import time
from typing import Any

import pytest
from fake_llm import Delay, FakeLLM, Reply, Status
from fake_llm import fake_llm  # noqa: F401  (the fixture)

from autoresearch.agents.providers import (
    PRICES,
    Message,
    Provider,
    ProviderOptions,
    ProviderRequestError,
    estimate_cost,
    make_provider,
)
from autoresearch.errors import (
    AgentAuthFailed,
    AgentUnavailable,
    ConfigError,
    ContextTooLong,
    MissingExtra,
    MissingKey,
    ModelNotFound,
)

KEY = "sk-test-7f3a9c21"
SYSTEM = "You are a careful researcher."
CHAT = [Message("user", "propose a change"), Message("assistant", "lower the lr"), Message("user", "why?")]
ENV = {"openai": "OPENAI_API_KEY", "anthropic": "ANTHROPIC_API_KEY"}


@pytest.fixture(autouse=True)
def _no_sdk_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The SDKs read OPENAI_*/ANTHROPIC_* (base URLs, keys, headers): tests start without any."""
    for name in list(os.environ):
        if name.startswith(("OPENAI_", "ANTHROPIC_")):
            monkeypatch.delenv(name)


@pytest.fixture(params=["openai", "anthropic"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def base_url(kind: str, server: FakeLLM) -> str:
    return server.openai_base_url if kind == "openai" else server.anthropic_base_url


def provider_for(kind: str, server: FakeLLM, monkeypatch: pytest.MonkeyPatch, key: str | None = KEY,
                 **options: Any) -> Provider:
    if key is not None:
        monkeypatch.setenv(ENV[kind], key)
    settings = {"timeout": 5.0, "max_retries": 3, "backoff_base": 0.01, "backoff_max": 0.05, **options}
    return make_provider(f"{kind}:test-model", ProviderOptions(base_url=base_url(kind, server), **settings))


# --- success and wire format ------------------------------------------------------------------


def test_good_reply_carries_text_tokens_cost_and_wire_format(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with FakeLLM([Reply("hello", input_tokens=1000, output_tokens=500)], key=KEY) as server:
        provider = provider_for(kind, server, monkeypatch, prices={"test-model": (2.0, 8.0)})
        result = provider.complete(SYSTEM, CHAT, max_tokens=123)
    assert provider.spec == f"{kind}:test-model"
    assert result.text == "hello" and result.model == "test-model"
    assert (result.input_tokens, result.output_tokens, result.attempts) == (1000, 500, 1)
    assert result.cost_usd == pytest.approx(1000 * 2.0 / 1e6 + 500 * 8.0 / 1e6)
    assert 0 < result.seconds < 5
    [request] = server.requests
    turns = [{"role": m.role, "content": m.content} for m in CHAT]
    assert request.json["model"] == "test-model"
    if kind == "openai":
        assert request.path == "/v1/chat/completions"
        assert request.headers["authorization"] == f"Bearer {KEY}"
        assert request.json["messages"] == [{"role": "system", "content": SYSTEM}, *turns]
        assert request.json["max_tokens"] == 123  # a local server: the parameter every server knows
    else:
        assert request.path == "/v1/messages"
        assert KEY in (request.headers.get("x-api-key", ""), request.headers.get("authorization", "")[7:])
        assert request.json["system"] == SYSTEM
        assert request.json["messages"] == turns
        assert request.json["max_tokens"] == 123
    assert "temperature" not in request.json


def test_temperature_is_sent_when_set(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with FakeLLM([Reply("ok")]) as server:
        provider_for(kind, server, monkeypatch, temperature=0.3).complete(SYSTEM, CHAT)
    assert server.requests[0].json["temperature"] == 0.3


def test_unknown_price_and_missing_usage(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with FakeLLM([Reply("no usage", input_tokens=None, output_tokens=None)]) as server:
        result = provider_for(kind, server, monkeypatch).complete(SYSTEM, CHAT)
    assert result.text == "no usage"
    assert (result.input_tokens, result.output_tokens, result.cost_usd) == (0, 0, None)


def test_openai_switches_token_parameter_once_when_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    refusal = "Unsupported parameter: 'max_tokens' is not supported with this model. Use 'max_completion_tokens'."
    with FakeLLM([Status(400, refusal), Reply("ok")]) as server:
        result = provider_for("openai", server, monkeypatch).complete(SYSTEM, CHAT, max_tokens=77)
    assert result.text == "ok" and result.attempts == 2
    assert server.requests[0].json["max_tokens"] == 77
    assert server.requests[1].json["max_completion_tokens"] == 77 and "max_tokens" not in server.requests[1].json


# --- transient failures are retried -----------------------------------------------------------


def test_rate_limit_then_success(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with FakeLLM([Status(429, "slow down", retry_after=0), Reply("hello")], key=KEY) as server:
        result = provider_for(kind, server, monkeypatch).complete(SYSTEM, CHAT)
    assert result.text == "hello" and result.attempts == 2 and len(server.requests) == 2


def test_retry_after_is_honoured(monkeypatch: pytest.MonkeyPatch) -> None:
    with FakeLLM([Status(429, "slow down", retry_after=1), Reply("hello")]) as server:
        provider = provider_for("openai", server, monkeypatch, backoff_max=5.0)
        start = time.monotonic()
        result = provider.complete(SYSTEM, CHAT)
    assert result.attempts == 2 and time.monotonic() - start >= 1.0


def test_retry_after_beyond_backoff_max_gives_up_at_once(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with FakeLLM([Status(429, "come back in an hour", retry_after=3600), Reply("never")]) as server:
        with pytest.raises(AgentUnavailable, match="3600"):
            provider_for(kind, server, monkeypatch).complete(SYSTEM, CHAT)
    assert len(server.requests) == 1


def test_server_errors_then_success(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with FakeLLM([Status(500, "boom"), Status(502, "bad gateway"), Reply("fine")]) as server:
        result = provider_for(kind, server, monkeypatch).complete(SYSTEM, CHAT)
    assert result.text == "fine" and result.attempts == 3


def test_timeout_then_success(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with FakeLLM([Delay(3.0, then=Reply("late")), Reply("on time")]) as server:
        result = provider_for(kind, server, monkeypatch, timeout=0.5).complete(SYSTEM, CHAT)
    assert result.text == "on time" and result.attempts == 2


def test_persistent_outage_becomes_agent_unavailable(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with FakeLLM([Status(503, "overloaded")]) as server:
        with pytest.raises(AgentUnavailable) as info:
            provider_for(kind, server, monkeypatch, max_retries=3).complete(SYSTEM, CHAT)
    assert not isinstance(info.value, AgentAuthFailed)
    assert len(server.requests) == 4 and "4 request(s)" in str(info.value) and "503" in str(info.value)


def test_rate_limit_on_tokens_is_not_a_context_error(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with FakeLLM([Status(429, "too many tokens per minute"), Reply("ok")]) as server:
        assert provider_for(kind, server, monkeypatch).complete(SYSTEM, CHAT).attempts == 2


def test_connection_refused_becomes_agent_unavailable(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens there now
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv(ENV[kind], KEY)
    url = f"http://127.0.0.1:{port}" + ("/v1" if kind == "openai" else "")
    options = ProviderOptions(base_url=url, max_retries=2, backoff_base=0.01, backoff_max=0.02, timeout=2.0)
    with pytest.raises(AgentUnavailable, match=r"3 request\(s\).*cannot connect"):
        make_provider(f"{kind}:test-model", options).complete(SYSTEM, CHAT)


# --- permanent failures are never retried -----------------------------------------------------


def test_wrong_key_fails_once_without_leaking_it(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with FakeLLM([Reply("never")], key="sk-the-right-one") as server:
        provider = provider_for(kind, server, monkeypatch, key=KEY)
        with pytest.raises(AgentAuthFailed) as info:
            provider.complete(SYSTEM, CHAT)
    assert len(server.requests) == 1
    message = str(info.value)
    assert KEY not in message and KEY not in repr(info.value) and KEY not in repr(provider)
    assert ENV[kind] in message and "\n" not in message
    assert info.value.__cause__ is None


def test_unknown_model_is_not_retried(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with FakeLLM([Status(404, "The model `test-model` does not exist"), Reply("never")]) as server:
        with pytest.raises(ModelNotFound, match="test-model"):
            provider_for(kind, server, monkeypatch).complete(SYSTEM, CHAT)
    assert len(server.requests) == 1


@pytest.mark.parametrize("message", [
    "This model's maximum context length is 8192 tokens. However, your messages resulted in 9000 tokens.",
    "prompt is too long: 215000 tokens > 200000 maximum",
    "the request exceeds the available context size, try increasing it",
])
def test_context_too_long_is_not_retried(kind: str, message: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with FakeLLM([Status(400, message), Reply("never")]) as server:
        with pytest.raises(ContextTooLong):
            provider_for(kind, server, monkeypatch).complete(SYSTEM, CHAT)
    assert len(server.requests) == 1


def test_other_client_errors_are_request_errors(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with FakeLLM([Status(400, "messages: roles must alternate"), Reply("never")]) as server:
        with pytest.raises(ProviderRequestError, match="roles must alternate"):
            provider_for(kind, server, monkeypatch).complete(SYSTEM, CHAT)
    assert len(server.requests) == 1


# --- construction: spec, SDK, key -------------------------------------------------------------


def test_missing_key(kind: str) -> None:
    with pytest.raises(MissingKey, match=f"{ENV[kind]} is not set"):
        make_provider(f"{kind}:m")
    with pytest.raises(MissingKey, match="MY_LLM_KEY is not set"):
        make_provider(f"{kind}:m", ProviderOptions(api_key_env="MY_LLM_KEY"))
    with pytest.raises(MissingKey):  # a remote server still needs a key (nothing is contacted)
        make_provider(f"{kind}:m", ProviderOptions(base_url="http://llm.example.com/v1"))


def test_local_server_needs_no_key(kind: str, fake_llm: FakeLLM, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_llm.script.append(Reply("local"))
    result = provider_for(kind, fake_llm, monkeypatch, key=None).complete(SYSTEM, CHAT)
    assert result.text == "local"
    assert fake_llm.requests[0].headers["authorization"] == "Bearer not-needed"


def test_local_server_that_wants_a_key_says_which_variable(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with FakeLLM([Reply("never")], key=KEY) as server:
        with pytest.raises(AgentAuthFailed, match=f"{ENV[kind]} is not set"):
            provider_for(kind, server, monkeypatch, key=None).complete(SYSTEM, CHAT)
    assert len(server.requests) == 1


@pytest.mark.parametrize("spec", ["gemini:pro", "openai:", "gpt-5", "", "anthropic:  "])
def test_unknown_spec(spec: str) -> None:
    with pytest.raises(ConfigError, match="openai:<model>"):
        make_provider(spec)


def test_missing_sdk_is_missing_extra(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, kind, None)  # makes `import openai` raise ImportError
    monkeypatch.setenv(ENV[kind], KEY)
    with pytest.raises(MissingExtra, match=f"the {kind} SDK is not installed") as info:
        make_provider(f"{kind}:m")
    assert "autoresearch[llm]" in str(info.value)


def test_bad_message_role() -> None:
    with pytest.raises(ValueError):
        Message("system", "no")


# --- prices -----------------------------------------------------------------------------------


def test_estimate_cost() -> None:
    assert estimate_cost("gpt-5-mini", 1_000_000, 1_000_000) == pytest.approx(sum(PRICES["gpt-5-mini"]))
    assert estimate_cost("claude-sonnet-4-5-20250929", 2_000_000, 0) == pytest.approx(2 * PRICES["claude-sonnet-4-5"][0])
    assert estimate_cost("gpt-4o-2024-08-06", 0, 1_000_000) == pytest.approx(PRICES["gpt-4o"][1])
    assert estimate_cost("my-local-model", 10, 10) is None
    assert estimate_cost("my-local-model", 10**6, 10**6, {"my-local-model": (0.0, 0.0)}) == 0.0
    assert estimate_cost("gpt-5", 10**6, 0, {"gpt-5": (9.0, 9.0)}) == pytest.approx(9.0)


# --- the fake server itself -------------------------------------------------------------------


def test_fake_script_repeats_last_step_and_can_be_extended() -> None:
    fake = FakeLLM([Reply("a"), Reply("b")])
    assert [fake.next_step() for _ in range(3)] == [Reply("a"), Reply("b"), Reply("b")]
    fake.script.extend([Reply("c"), Reply("d")])
    assert [fake.next_step() for _ in range(3)] == [Reply("c"), Reply("d"), Reply("d")]
    assert FakeLLM().next_step() is None
