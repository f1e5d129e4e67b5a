"""OpenAI's API shapes, without I/O: request bodies checked and turned into generation requests,
responses and stream chunks built, errors in OpenAI's format.

Only what a kiln generation model can honour is accepted. A field OpenAI defines but kiln does
not implement is accepted at its neutral value (`presence_penalty: 0`, `n: 1`, `logprobs: null`,
...) and refused otherwise; a field OpenAI does not define is refused (400, naming it), as OpenAI
itself does ("Unrecognized request argument supplied"). `top_k` is kiln's extension (the openai
client sends it through `extra_body`). Values are checked for their type here and for their range
by the model (kiln_generate), whose refusal comes back as a 400 naming the field.
"""

from __future__ import annotations

import json
import math
import numbers
import re
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from kiln import tensors
from kiln.clients import (
    DeadlineExceededError,
    InvalidInputError,
    KilnError,
    ModelNotFoundError,
    ModelNotReadyError,
    PermissionDeniedError,
    ServerUnavailableError,
)
from kiln.clients.results import Generation
from kiln.openai import chat

COMPLETION = "text_completion"
CHAT_COMPLETION = "chat.completion"
CHAT_CHUNK = "chat.completion.chunk"
OWNED_BY = "kiln"
DONE = b"data: [DONE]\n\n"
FINISH_REASONS = ("stop", "length")
"""The finish reasons OpenAI clients know that kiln's models give."""

INVALID_REQUEST = "invalid_request_error"
NOT_FOUND = "not_found_error"
SERVER_ERROR = "server_error"
UNAVAILABLE = "service_unavailable_error"
TIMEOUT = "timeout_error"

COMMON_FIELDS = frozenset({
    "model", "max_tokens", "temperature", "top_p", "seed", "stop", "stream", "stream_options", "n",
    "top_k", "user",
})
COMPLETION_FIELDS = COMMON_FIELDS | {"prompt"}
CHAT_FIELDS = COMMON_FIELDS | {"messages", "max_completion_tokens"}
NEUTRAL: dict[str, tuple[Any, ...]] = {
    # OpenAI fields kiln does not implement, and the values that mean "not used".
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "logit_bias": (None, {}),
    "logprobs": (None, False),
}
COMPLETION_NEUTRAL = {**NEUTRAL, "echo": (None, False), "best_of": (None, 1), "suffix": (None, "")}
CHAT_NEUTRAL = {
    **NEUTRAL,
    "top_logprobs": (None, 0),
    "response_format": (None, {"type": "text"}),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "parallel_tool_calls": (None, False, True),
    "store": (None, False),
    "metadata": (None, {}),
    "service_tier": (None, "auto", "default"),
}


class APIError(Exception):
    """An error answered in OpenAI's format: `{"error": {"message", "type", "param", "code"}}`."""

    def __init__(
        self, status: int, message: str, *, type: str = INVALID_REQUEST, param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, type=INVALID_REQUEST, param=param, code=code)


def model_not_found(model: str, served: list[str]) -> APIError:
    listing = ", ".join(served) or "none"
    return APIError(
        404, f"The model '{model}' does not exist or is not served here (generation models: {listing})",
        type=NOT_FOUND, param="model", code="model_not_found",
    )


# --- requests -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GenerationRequest:
    """A checked completions or chat request, as the text generator takes it.

    Attributes:
        kind: COMPLETION or CHAT_COMPLETION.
        model: The served generation model.
        prompt: The prompt (a chat request's messages rendered with `kiln.openai.chat`).
        options: `generate` / `stream` keyword arguments (max_tokens, temperature, top_p, top_k,
            seed, stop), only those the request set.
        stream: Whether the answer streams (server-sent events).
        include_usage: `stream_options.include_usage`: a last chunk with the usage.
        params: kiln's field name -> the request's (OpenAI's) name, for errors.
    """

    kind: str
    model: str
    prompt: str
    options: Mapping[str, Any] = field(default_factory=dict)
    stream: bool = False
    include_usage: bool = False
    params: Mapping[str, str] = field(default_factory=dict)


def parse_json(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object (400 otherwise)."""
    try:
        body = json.loads(raw)
    except ValueError as error:
        raise bad_request(f"We could not parse the JSON body of your request: {error}") from None
    if not isinstance(body, dict):
        raise bad_request(f"The request body must be a JSON object, got {type(body).__name__}")
    return body


def _check_fields(
    body: Mapping[str, Any], known: frozenset[str], neutral: Mapping[str, tuple[Any, ...]]
) -> None:
    unknown = sorted(set(body) - known - set(neutral))
    if unknown:
        names = ", ".join(unknown)
        raise bad_request(f"Unrecognized request argument(s) supplied: {names}", param=unknown[0],
                          code="unknown_parameter")
    for name, allowed in neutral.items():
        if name in body and not any(_same(body[name], value) for value in allowed):
            shown = ", ".join("null" if v is None else json.dumps(v) for v in allowed)
            raise bad_request(f"{name} is not supported by kiln; leave it out or set it to {shown}",
                              param=name, code="unsupported_parameter")


def _same(given: Any, neutral: Any) -> bool:
    if neutral is None or isinstance(neutral, bool):
        return given is neutral
    return not isinstance(given, bool) and given == neutral


def _optional(body: Mapping[str, Any], name: str, kind: str) -> Any:
    value = body.get(name)
    if value is None:
        return None
    if kind == "int" and (isinstance(value, bool) or not isinstance(value, int)):
        raise bad_request(f"{name} must be an integer, got {json.dumps(value)}", param=name)
    if kind == "number":
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise bad_request(f"{name} must be a number, got {json.dumps(value)}", param=name)
    if kind == "bool" and not isinstance(value, bool):
        raise bad_request(f"{name} must be true or false, got {json.dumps(value)}", param=name)
    return value


def _stop(body: Mapping[str, Any]) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        return (stop,)
    if isinstance(stop, list) and all(isinstance(item, str) for item in stop):
        return tuple(stop)
    raise bad_request("stop must be a string or a list of strings", param="stop")


def _common(body: Mapping[str, Any]) -> dict[str, Any]:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("you must provide a model parameter (a string)", param="model")
    n = body.get("n")
    if n is not None and (isinstance(n, bool) or n != 1):
        raise bad_request("n must be 1: kiln generates one choice per request", param="n",
                          code="unsupported_parameter")
    stream = bool(_optional(body, "stream", "bool"))
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not stream:
            raise bad_request("stream_options is only allowed when stream is true", param="stream_options")
        if not isinstance(options, dict) or set(options) - {"include_usage"}:
            raise bad_request(
                'stream_options takes {"include_usage": true|false} only', param="stream_options"
            )
        include_usage = bool(_optional(options, "include_usage", "bool"))
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise bad_request("user must be a string", param="user")
    generate: dict[str, Any] = {}
    for name, kind_of in (("max_tokens", "int"), ("temperature", "number"), ("top_p", "number"),
                          ("top_k", "int"), ("seed", "int")):
        value = _optional(body, name, kind_of)
        if value is not None:
            generate[name] = value
    stops = _stop(body)
    if stops:
        generate["stop"] = stops
    return {"model": model, "options": generate, "stream": stream, "include_usage": include_usage}


def parse_completion(body: Mapping[str, Any]) -> GenerationRequest:
    """A `POST /v1/completions` body, checked (APIError 400 naming the field otherwise)."""
    _check_fields(body, COMPLETION_FIELDS, COMPLETION_NEUTRAL)
    common = _common(body)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise bad_request(
            "prompt must be a string (or a list of one string): kiln serves one text prompt per request",
            param="prompt",
        )
    params = {tensors.TEXT_INPUT: "prompt"}
    return GenerationRequest(COMPLETION, prompt=prompt, params=params, **common)


def parse_chat(body: Mapping[str, Any]) -> GenerationRequest:
    """A `POST /v1/chat/completions` body, checked and its messages rendered (`kiln.openai.chat`)."""
    _check_fields(body, CHAT_FIELDS, CHAT_NEUTRAL)
    limits = [name for name in ("max_tokens", "max_completion_tokens") if body.get(name) is not None]
    if len(limits) == 2 and body["max_tokens"] != body["max_completion_tokens"]:
        raise bad_request("give max_completion_tokens or max_tokens, not both", param="max_tokens")
    common = _common({**body, "max_tokens": body.get(limits[0]) if limits else None})
    if "messages" not in body:
        raise bad_request("you must provide a messages parameter", param="messages")
    try:
        prompt = chat.render(body["messages"])
    except chat.ChatError as error:
        raise bad_request(str(error), param=error.param) from None
    options = dict(common["options"])
    options["stop"] = tuple(options.get("stop", ())) + (chat.IMPLICIT_STOP,)
    params = {tensors.TEXT_INPUT: "messages", tensors.MAX_TOKENS: limits[0] if limits else "max_tokens"}
    return GenerationRequest(CHAT_COMPLETION, prompt=prompt, params=params, **{**common, "options": options})


# --- responses ------------------------------------------------------------------------------------


def new_id(kind: str) -> str:
    """A response id: "cmpl-..." or "chatcmpl-..." (also sent to Triton as the request id)."""
    prefix = "chatcmpl" if kind == CHAT_COMPLETION else "cmpl"
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def finish_reason(reason: str) -> str:
    """OpenAI's finish reason for kiln's; a request the server cancelled (its model unloaded,
    say) is an error, since OpenAI's clients know no such reason."""
    if reason in FINISH_REASONS:
        return reason
    raise APIError(503, "the server ended the generation before it finished (the model may be "
                   "reloading); retry the request", type=UNAVAILABLE, code="generation_cancelled")


def response(
    request: GenerationRequest, response_id: str, created: int, result: Generation
) -> dict[str, Any]:
    """The whole (not streamed) answer: a text_completion or a chat.completion."""
    reason = finish_reason(result.finish_reason)
    if request.kind == COMPLETION:
        choice = {"index": 0, "text": result.text, "finish_reason": reason, "logprobs": None}
    else:
        choice = {"index": 0, "message": {"role": "assistant", "content": result.text},
                  "finish_reason": reason, "logprobs": None}
    return {
        "id": response_id, "object": request.kind, "created": created, "model": request.model,
        "choices": [choice], "usage": usage(result.prompt_tokens, result.completion_tokens),
    }


def chunk(
    request: GenerationRequest, response_id: str, created: int, *, text: str | None = None,
    role: bool = False, reason: str | None = None,
) -> dict[str, Any]:
    """One streamed chunk: a text_completion (`text`) or a chat.completion.chunk (`delta`)."""
    if request.kind == COMPLETION:
        choice: dict[str, Any] = {"index": 0, "text": text or "", "finish_reason": reason, "logprobs": None}
        kind = COMPLETION
    else:
        delta: dict[str, Any] = {"role": "assistant"} if role else {}
        if text is not None:
            delta["content"] = text
        choice = {"index": 0, "delta": delta, "finish_reason": reason, "logprobs": None}
        kind = CHAT_CHUNK
    body = {
        "id": response_id, "object": kind, "created": created, "model": request.model, "choices": [choice],
    }
    if request.include_usage:
        body["usage"] = None
    return body


def usage_chunk(request: GenerationRequest, response_id: str, created: int, prompt_tokens: int,
                completion_tokens: int) -> dict[str, Any]:
    """The last chunk of a stream with `include_usage`: no choices, the usage."""
    kind = COMPLETION if request.kind == COMPLETION else CHAT_CHUNK
    return {"id": response_id, "object": kind, "created": created, "model": request.model, "choices": [],
            "usage": usage(prompt_tokens, completion_tokens)}


def event(body: Mapping[str, Any]) -> bytes:
    """One server-sent event carrying `body` as JSON."""
    return b"data: " + json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n\n"


def model_card(model: str, created: int) -> dict[str, Any]:
    return {"id": model, "object": "model", "created": created, "owned_by": OWNED_BY}


# --- errors ---------------------------------------------------------------------------------------


def api_error(error: KilnError, request: GenerationRequest | None = None) -> APIError:
    """The OpenAI error for an SDK error (the generation model's own words as the message)."""
    message = error.server_message or error.message
    if isinstance(error, InvalidInputError):
        name = error.input_name
        param = request.params.get(name, name) if request is not None and name else name
        if name == tensors.TEXT_INPUT and request is not None:  # the model's word for the prompt
            said = "prompt" if request.kind == COMPLETION else "the prompt rendered from messages"
            message = re.sub(rf"^{tensors.TEXT_INPUT}\b", said, message)
        return bad_request(message, param=param, code="invalid_value")
    if isinstance(error, ModelNotFoundError):
        return APIError(404, message, type=NOT_FOUND, param="model", code="model_not_found")
    if isinstance(error, (ModelNotReadyError, ServerUnavailableError)):
        return APIError(503, message, type=UNAVAILABLE, code="unavailable")
    if isinstance(error, DeadlineExceededError):
        return APIError(504, message, type=TIMEOUT, code="timeout")
    if isinstance(error, PermissionDeniedError):
        return APIError(503, message, type=UNAVAILABLE, code="unavailable")
    return APIError(500, message, type=SERVER_ERROR, code="internal_error")


def generation_models(configs: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The models among `configs` (name -> Triton model config, as JSON) that kiln's generation
    endpoints serve: backend kiln_generate under Triton's decoupled transaction policy."""
    return sorted(
        name for name, config in configs.items()
        if config.get("backend") == "kiln_generate"
        and bool((config.get("model_transaction_policy") or {}).get("decoupled"))
    )
