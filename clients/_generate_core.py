"""What the text-generation clients share without I/O: request encoding, reply decoding, the
server-sent-events parser, error mapping, result assembly.

`TextGenerator` (blocking, `kiln.clients._sync_generate`) and `AsyncTextGenerator` (asyncio,
`kiln.clients._async_generate`) are one implementation: the async module is the source and
`scripts/unasync.py` writes the sync one. Their I/O lives in `kiln.clients._generate_transport`:
gRPC bidirectional streaming (tritonclient) and Triton's HTTP `generate` / `generate_stream`
endpoints (`http.client` blocking, aiohttp for asyncio). Both transports hand the driver the same
`Reply` objects; everything here is shared.

The served model is decoupled (Triton's decoupled transaction policy, `kiln_generate`): a
request gets a stream of responses, one per text delta with `stream` true, or one holding the
whole text. Its tensors are `kiln.tensors`' text-generation names (TEXT_INPUT ... STREAM in;
TEXT_OUTPUT, FINISH_REASON, PROMPT_TOKENS, COMPLETION_TOKENS out).
"""

from __future__ import annotations

import json
import math
import numbers
import re
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tritonclient.utils import InferenceServerException

from kiln import tensors
from kiln.clients.errors import (
    InvalidInputError,
    KilnError,
    ModelNotFoundError,
    ModelNotReadyError,
    ServerError,
    ServerUnavailableError,
    translate,
)
from kiln.clients.results import Generation, GenerationDelta

MODEL = tensors.TEXT_GENERATOR
"""The generation model the clients call unless told otherwise."""
FINISH_STOP = "stop"
FINISH_LENGTH = "length"
FINISH_CANCELLED = "cancelled"
"""The finish reason of a request the server ended without one (e.g. its model was unloaded)."""
FIELDS = (
    tensors.TEXT_INPUT, tensors.MAX_TOKENS, tensors.TEMPERATURE, tensors.TOP_K, tensors.TOP_P,
    tensors.SEED, tensors.STOP, tensors.STREAM,
)
"""The request fields (input tensors) of a kiln_generate model."""
GENERATE_PATH = "/v2/models/{model}/generate"
GENERATE_STREAM_PATH = "/v2/models/{model}/generate_stream"
FINAL_PARAMETER = "triton_final_response"
"""The response parameter that flags a decoupled model's last response (gRPC)."""
EMPTY_FINAL_PARAMETER = "triton_enable_empty_final_response"
"""The request parameter asking Triton to deliver a final response that holds no outputs (gRPC):
without it a request the server ends with an empty response would never look finished."""

_INT32 = (-(2**31), 2**31 - 1)
_INT64 = (-(2**63), 2**63 - 1)
_DTYPES = {
    tensors.MAX_TOKENS: ("INT32", np.int32),
    tensors.TEMPERATURE: ("FP32", np.float32),
    tensors.TOP_K: ("INT32", np.int32),
    tensors.TOP_P: ("FP32", np.float32),
    tensors.SEED: ("INT64", np.int64),
    tensors.STREAM: ("BOOL", np.bool_),
}
"""The Triton datatype and numpy dtype of each scalar field (its tensor is of shape [1])."""


# --- requests -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GenerationCall:
    """One generation request, checked and encoded for either transport.

    Attributes:
        model: The generation model.
        prompt: The prompt.
        fields: The optional fields the call sets (name -> Python value; absent: the server's
            default), `stream` included.
        request_id: The id sent with the request (gRPC; Triton's HTTP generate endpoints take none).
    """

    model: str
    prompt: str
    fields: Mapping[str, Any] = field(default_factory=dict)
    request_id: str | None = None

    @property
    def stream(self) -> bool:
        """Whether the server sends one response per text delta (else one with the whole text)."""
        return bool(self.fields.get(tensors.STREAM, False))

    def tensors(self) -> list[tuple[str, str, np.ndarray]]:
        """(name, Triton datatype, array) per input tensor, for gRPC."""
        out = [(tensors.TEXT_INPUT, "BYTES", _bytes_array([self.prompt]))]
        for name, value in self.fields.items():
            if name == tensors.STOP:
                out.append((name, "BYTES", _bytes_array(value)))
            else:
                datatype, dtype = _DTYPES[name]
                out.append((name, datatype, np.array([value], dtype=dtype)))
        return out

    def json_body(self) -> bytes:
        """The JSON body of Triton's HTTP generate endpoints (one field per input)."""
        body: dict[str, Any] = {tensors.TEXT_INPUT: self.prompt}
        for name, value in self.fields.items():
            body[name] = list(value) if name == tensors.STOP else value
        return json.dumps(body, ensure_ascii=False, allow_nan=False).encode("utf-8")

    def path(self) -> str:
        """The HTTP endpoint: generate_stream when streaming, else generate."""
        template = GENERATE_STREAM_PATH if self.stream else GENERATE_PATH
        return template.format(model=urllib.parse.quote(self.model, safe=""))


def _bytes_array(values: Sequence[str]) -> np.ndarray:
    array = np.empty(len(values), dtype=np.object_)
    for i, value in enumerate(values):
        array[i] = value.encode("utf-8")
    return array


def _text(name: str, value: Any) -> str:
    if isinstance(value, (bytes, bytearray)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError as error:
            raise InvalidInputError(
                f"{name} is not valid UTF-8 (byte {error.start}: {error.reason})", input_name=_base(name),
                expected="UTF-8 text", given="bytes",
            ) from None
    if isinstance(value, str):
        return value
    raise InvalidInputError(
        f"{name} must be a str (or UTF-8 bytes), got {type(value).__name__}", input_name=_base(name),
        expected="str", given=type(value).__name__,
    )


def _base(name: str) -> str:
    return name.split("[", 1)[0]


def _integer(name: str, value: Any, bounds: tuple[int, int], dtype: str) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise InvalidInputError(
            f"{name} must be an integer, got {value!r} ({type(value).__name__})", input_name=name,
            expected=dtype, given=type(value).__name__,
        )
    number = int(value)
    if not bounds[0] <= number <= bounds[1]:
        raise InvalidInputError(
            f"{name} must fit in {dtype} ({bounds[0]}..{bounds[1]}), got {number}", input_name=name,
            expected=dtype, given=str(number),
        )
    return number


def _number(name: str, value: Any) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise InvalidInputError(
            f"{name} must be a number, got {value!r} ({type(value).__name__})", input_name=name,
            expected="FP32", given=type(value).__name__,
        )
    number = float(value)
    if not math.isfinite(number):
        raise InvalidInputError(f"{name} must be a finite number, got {number}", input_name=name,
                                expected="FP32", given=str(number))
    return number


def _stop_strings(stop: str | bytes | Sequence[str | bytes] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    if isinstance(stop, (str, bytes, bytearray)):
        stop = [stop]
    if not isinstance(stop, Sequence):
        raise InvalidInputError(
            f"stop must be a string or a sequence of strings, got {type(stop).__name__}",
            input_name=tensors.STOP, expected="str or sequence of str", given=type(stop).__name__,
        )
    return tuple(_text(f"{tensors.STOP}[{i}]", item) for i, item in enumerate(stop))


def encode_call(
    model: str,
    prompt: str | bytes,
    *,
    max_tokens: int | None = None,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    stop: str | Sequence[str] | None = (),
    stream: bool,
    request_id: str | None = None,
) -> GenerationCall:
    """A checked `GenerationCall`. Only types are checked here (a prompt that is text, integers
    that fit their tensor, finite numbers); the model checks the values (ranges, the context
    length) and names the field when it refuses one, so its rules live in one place.

    Raises:
        InvalidInputError: A field of the wrong type, naming it (nothing is sent).
    """
    if not isinstance(model, str) or not model:
        raise ValueError(f"model must be a non-empty str, got {model!r}")
    if request_id is not None and not isinstance(request_id, str):
        raise TypeError(f"request_id must be a str or None, got {type(request_id).__name__}")
    text = _text(tensors.TEXT_INPUT, prompt)
    fields: dict[str, Any] = {}
    if max_tokens is not None:
        fields[tensors.MAX_TOKENS] = _integer(tensors.MAX_TOKENS, max_tokens, _INT32, "INT32")
    if temperature is not None:
        fields[tensors.TEMPERATURE] = _number(tensors.TEMPERATURE, temperature)
    if top_k is not None:
        fields[tensors.TOP_K] = _integer(tensors.TOP_K, top_k, _INT32, "INT32")
    if top_p is not None:
        fields[tensors.TOP_P] = _number(tensors.TOP_P, top_p)
    if seed is not None:
        fields[tensors.SEED] = _integer(tensors.SEED, seed, _INT64, "INT64")
    stops = _stop_strings(stop)
    if stops:
        fields[tensors.STOP] = stops
    fields[tensors.STREAM] = bool(stream)
    return GenerationCall(model, text, fields, request_id)


# --- replies --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    """One response of the model, as either transport delivers it.

    Attributes:
        text: text_output: the delta (streaming) or the whole text; "" when absent.
        finish_reason: "" until the last response, then "stop", "length" or "cancelled".
        prompt_tokens: Tokens in the prompt (None when the response carried no outputs).
        completion_tokens: Tokens generated so far (None likewise).
        final: Whether the server flagged it as the request's last response.
    """

    text: str = ""
    finish_reason: str = ""
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    final: bool = False

    @property
    def last(self) -> bool:
        """Whether nothing follows (flagged final, or carrying a finish reason)."""
        return self.final or bool(self.finish_reason)


def _scalar(value: Any) -> Any:
    """A one-element output as a Python value (Triton's JSON flattens [1] tensors, gRPC does not)."""
    if isinstance(value, np.ndarray):
        value = value.reshape(-1)
        return value[0].item() if value.dtype != np.object_ else value[0] if value.size else None
    if isinstance(value, (list, tuple)):
        return _scalar(value[0]) if value else None
    return value


def _decode_text(value: Any) -> str:
    value = _scalar(value)
    if value is None:
        return ""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", errors="replace")
    return str(value)


def _count(value: Any) -> int | None:
    value = _scalar(value)
    return None if value is None else int(value)


def reply_from_outputs(outputs: Mapping[str, Any], final: bool) -> Reply:
    """A Reply from one response's named outputs (numpy arrays or JSON values) and its final flag."""
    return Reply(
        text=_decode_text(outputs.get(tensors.TEXT_OUTPUT)),
        finish_reason=_decode_text(outputs.get(tensors.FINISH_REASON)),
        prompt_tokens=_count(outputs.get(tensors.PROMPT_TOKENS)),
        completion_tokens=_count(outputs.get(tensors.COMPLETION_TOKENS)),
        final=final,
    )


def reply_from_json(data: str | bytes, *, final: bool = False, status: str | None = None) -> Reply:
    """A Reply from one JSON object of Triton's HTTP generate endpoints (a response body, or an
    event of generate_stream).

    Raises:
        InferenceServerException: The object is an error ({"error": "..."}; `status` is the HTTP
            status it came with, None inside a stream that had begun) or is not JSON.
    """
    try:
        payload = json.loads(data)
    except ValueError:
        text = data.decode("utf-8", "replace") if isinstance(data, bytes) else data
        raise InferenceServerException(f"the server sent a reply that is not JSON: {text[:200]!r}",
                                       status=status) from None
    if not isinstance(payload, Mapping):
        raise InferenceServerException(f"the server sent a reply that is not a JSON object: {payload!r}",
                                       status=status)
    if "error" in payload:
        raise InferenceServerException(str(payload["error"]), status=status)
    return reply_from_outputs(payload, final=final)


def error_from_body(body: bytes, status: str) -> InferenceServerException:
    """The error an HTTP error response (status >= 300) carries: Triton answers with a JSON object
    ({"error": "..."}), or, from generate_stream, with one server-sent event holding it."""
    text = body.decode("utf-8", errors="replace").strip()
    candidates = [text]
    decoder = SSEDecoder()
    candidates += decoder.feed(body) + decoder.close()
    for candidate in candidates:
        try:
            payload = json.loads(candidate)
        except ValueError:
            continue
        if isinstance(payload, Mapping) and "error" in payload:
            return InferenceServerException(str(payload["error"]), status=status)
    return InferenceServerException(text or f"HTTP {status}", status=status)


# --- server-sent events ---------------------------------------------------------------------------


class SSEDecoder:
    """An incremental parser of server-sent events (the `text/event-stream` format): bytes in, in
    chunks cut anywhere; the `data` of each complete event out.

    Follows the HTML standard's rules: lines end with CRLF, LF or CR; a line starting with ":" is
    a comment; a field's value follows "name:" with one optional space; several `data` lines of
    one event are joined with "\\n"; a blank line ends the event, and an event without data is
    not dispatched; an event the stream ends in the middle of is dropped (`close`). Other fields
    (`event`, `id`, `retry`) are read and ignored: Triton's generate_stream sends only `data`.
    """

    def __init__(self) -> None:
        self._buffer = b""
        self._data: list[str] = []
        self._started = False
        self._after_cr = False

    def feed(self, chunk: bytes) -> list[str]:
        """Adds `chunk`; returns the data of each event it completed, in order."""
        if self._after_cr and chunk.startswith(b"\n"):
            chunk = chunk[1:]  # the LF of a CRLF cut between two chunks
        self._after_cr = False
        self._buffer += chunk
        events: list[str] = []
        while True:
            match = re.search(rb"\r\n|\r|\n", self._buffer)
            if match is None:
                break
            if match.group() == b"\r" and match.end() == len(self._buffer):
                self._after_cr = True  # maybe the first half of a CRLF: the line ends here either way
            line, self._buffer = self._buffer[: match.start()], self._buffer[match.end() :]
            event = self._line(line)
            if event is not None:
                events.append(event)
        return events

    def close(self) -> list[str]:
        """The stream ended: an unterminated event is dropped (the standard's rule)."""
        self._buffer = b""
        self._data = []
        return []

    def _line(self, raw: bytes) -> str | None:
        if not self._started:
            self._started = True
            if raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]  # a byte-order mark before the first line
        line = raw.decode("utf-8", errors="replace")
        if not line:
            if not self._data:
                return None
            data, self._data = "\n".join(self._data), []
            return data
        if line.startswith(":"):
            return None
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        return None


# --- results --------------------------------------------------------------------------------------


class Progress:
    """A request's replies so far, turned into `GenerationDelta`s and, at the end, a `Generation`."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.finish_reason: str | None = None

    def delta(self, reply: Reply | None, elapsed_s: float) -> GenerationDelta:
        """The delta for `reply`; None (the stream ended with no finish reason) ends it as
        "cancelled", as does a final reply without one (Triton's empty final response)."""
        if reply is not None:
            if reply.prompt_tokens is not None:
                self.prompt_tokens = reply.prompt_tokens
            if reply.completion_tokens is not None:
                self.completion_tokens = reply.completion_tokens
        text = reply.text if reply is not None else ""
        self.parts.append(text)
        reason: str | None = None
        if reply is None or reply.last:
            reason = (reply.finish_reason if reply is not None else "") or FINISH_CANCELLED
            self.finish_reason = reason
        return GenerationDelta(text, reason, self.prompt_tokens, self.completion_tokens, elapsed_s)

    def generation(self, latency_s: float, request_id: str | None) -> Generation:
        """The whole result (after the last delta)."""
        return Generation(
            text="".join(self.parts),
            finish_reason=self.finish_reason or FINISH_CANCELLED,
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            latency_s=latency_s,
            request_id=request_id,
        )


# --- errors ---------------------------------------------------------------------------------------

_REQUEST_ID_PREFIX = re.compile(r"^\[request id: [^\]]*\]\s*")
_UNKNOWN_FIELDS = re.compile(r"unknown field\(s\) '([^']+)'")
_NAMED_INPUT = re.compile(r"\binput '([^']+)'")
_LEADING_FIELD = re.compile(r"^(" + "|".join(FIELDS) + r")\b")
_PHRASED_FIELD = re.compile(r"\bplus (max_tokens)\b|\b(stop) strings\b")
_ANY_FIELD = re.compile(r"\b(" + "|".join(FIELDS) + r")\b")
_NOT_READY_MARKERS = ("has no available versions", "is not ready", "is not available")
_UNAVAILABLE_MARKERS = ("retry later", "shutting down")
"""kiln_generate's refusals for want of room (its queue is full, the model is stopping):
UNAVAILABLE, which a gRPC stream reports without the code."""


def field_of(message: str, *, strict: bool = False) -> str | None:
    """The request field a server's error message names, or None.

    kiln_generate's messages start with the field ("temperature must be ...", "stop[1] is
    empty ..."), list unknown ones ("unknown field(s) 'max_token'") or say "plus max_tokens";
    Triton's own say "input 'max_tokens' ...". Unless `strict`, any field name the message
    mentions is taken as a last resort (for messages already known to be about the input).
    """
    message = _REQUEST_ID_PREFIX.sub("", message.strip())
    for pattern in (_UNKNOWN_FIELDS, _NAMED_INPUT, _LEADING_FIELD, _PHRASED_FIELD):
        match = pattern.search(message)
        if match is not None:
            return next(group for group in match.groups() if group)
    if strict:
        return None
    match = _ANY_FIELD.search(message)
    return match.group(1) if match is not None else None


def classify_stream_error(message: str) -> type[KilnError]:
    """The KilnError subclass of an error a response carries without a status (a gRPC stream's
    responses carry only the message; so does an event of an HTTP stream that had begun)."""
    lowered = message.lower()
    if any(marker in lowered for marker in _NOT_READY_MARKERS):
        return ModelNotReadyError
    if "unknown model" in lowered:
        return ModelNotFoundError
    if any(marker in lowered for marker in _UNAVAILABLE_MARKERS):
        return ServerUnavailableError
    if field_of(message, strict=True) is not None:
        return InvalidInputError
    return ServerError


def generation_error(
    error: BaseException,
    *,
    model: str,
    url: str,
    request_id: str | None = None,
    timeout: float | None = None,
) -> KilnError:
    """The KilnError for what a generation call raised, mapped like the other clients' errors
    (INVALID_ARG -> InvalidInputError naming the field, UNAVAILABLE -> ServerUnavailableError, ...).

    A server error without a status (inside a stream) is classified by its words
    (`classify_stream_error`); an InvalidInputError gets `input_name` from the message.
    """
    translated = translate(error, what="generate", model=model, url=url, request_id=request_id,
                           timeout=timeout)
    if (
        isinstance(error, InferenceServerException)
        and error.status() is None
        and type(translated) is ServerError  # the words told `translate` nothing more
    ):
        server_message = error.message() or str(error)
        cls = classify_stream_error(server_message)
        if cls is not ServerError:
            message = f"model '{model}' at {url}: {server_message}"
            if cls is ModelNotFoundError:
                message += " (check the model name; Client.models() lists what the server serves)"
            translated = cls(message, server_message=server_message, model=model, url=url,
                             request_id=request_id)
    if isinstance(translated, InvalidInputError) and translated.input_name is None:
        translated.input_name = field_of(translated.server_message or translated.message)
    return translated
