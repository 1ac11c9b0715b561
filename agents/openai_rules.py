"""What OpenAI's API refuses, refused here too, before a request reaches an engine.

The rules every engine shares (the request's shape and the ranges of the sampling fields) as
OpenAI's API documents them; what depends on the engine and the model (a `max_tokens` beyond
the context window) the engine answers itself. A refusal is a 400 in OpenAI's error shape
naming the `param`, so OpenAI's client libraries show it as they would OpenAI's own.
"""

from __future__ import annotations

from typing import Any

#: Message roles OpenAI's chat API accepts.
ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
#: Numeric fields and their inclusive ranges (OpenAI's API reference).
RANGES: dict[str, tuple[float, float]] = {
    "temperature": (0.0, 2.0),
    "top_p": (0.0, 1.0),
    "presence_penalty": (-2.0, 2.0),
    "frequency_penalty": (-2.0, 2.0),
}
#: Integer fields and their least value.
AT_LEAST: dict[str, int] = {"max_tokens": 1, "max_completion_tokens": 1, "n": 1, "top_k": 1}


class InvalidRequest(Exception):
    """The body breaks one of OpenAI's rules; `param` names the field."""

    def __init__(self, message: str, param: str | None) -> None:
        super().__init__(message)
        self.param = param


def check(body: dict[str, Any], chat: bool) -> None:
    """Raise InvalidRequest for the first rule `body` breaks."""
    model = body.get("model")
    if model is None:
        raise InvalidRequest("you must provide a model parameter", "model")
    if not isinstance(model, str):
        raise InvalidRequest(f"model must be a string, got {_kind(model)}", "model")
    for name, (low, high) in RANGES.items():
        value = body.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise InvalidRequest(f"{name} must be a number, got {_kind(value)}", name)
        if not low <= value <= high:
            raise InvalidRequest(
                f"{value} is not a valid {name}: it must be between {low:g} and {high:g}", name
            )
    for name, least in AT_LEAST.items():
        value = body.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidRequest(f"{name} must be an integer, got {_kind(value)}", name)
        if value < least:
            raise InvalidRequest(
                f"{value} is not a valid {name}: it must be at least {least}", name
            )
    if "stream" in body and not isinstance(body["stream"], bool | None):
        raise InvalidRequest(f"stream must be a boolean, got {_kind(body['stream'])}", "stream")
    _check_logprobs(body, chat)
    if chat:
        _check_messages(body.get("messages"))
    elif "prompt" not in body:
        raise InvalidRequest("you must provide a prompt parameter", "prompt")


def _check_logprobs(body: dict[str, Any], chat: bool) -> None:
    # Chat: `logprobs` a boolean and `top_logprobs` 0..20; completions: `logprobs` 0..5.
    logprobs = body.get("logprobs")
    if chat and logprobs is not None and not isinstance(logprobs, bool):
        raise InvalidRequest(f"logprobs must be a boolean, got {_kind(logprobs)}", "logprobs")
    for name, most in (("top_logprobs", 20),) if chat else (("logprobs", 5),):
        value = body.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= most:
            raise InvalidRequest(f"{value!r} is not a valid {name}: it must be an integer "
                                 f"between 0 and {most}", name)  # fmt: skip


def _check_messages(messages: Any) -> None:
    if messages is None:
        raise InvalidRequest("you must provide a messages parameter", "messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("messages must be a non-empty array", "messages")
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise InvalidRequest(f"{where} must be an object, got {_kind(message)}", where)
        role = message.get("role")
        if role not in ROLES:
            raise InvalidRequest(
                f"{role!r} is not a valid role in {where}; allowed: {', '.join(sorted(ROLES))}",
                f"{where}.role",
            )
        content = message.get("content")
        if content is not None and not isinstance(content, str | list):
            raise InvalidRequest(
                f"{where}.content must be a string or an array of parts, got {_kind(content)}",
                f"{where}.content",
            )


def _kind(value: Any) -> str:
    return {bool: "a boolean", str: "a string", list: "an array", dict: "an object",
            type(None): "null"}.get(type(value), type(value).__name__)  # fmt: skip
