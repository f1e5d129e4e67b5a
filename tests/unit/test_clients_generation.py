"""Unit tests of the text-generation clients' I/O-free part (`kiln.clients._generate_core`): no
server (tests/integration/test_text_generator_client.py runs them against one).

Request checking and encoding (both transports' forms), the server-sent-events parser (chunks cut
at every byte, every line ending), reply decoding from gRPC outputs and HTTP JSON, result
assembly, and the error mapping, on the messages kiln_generate and Triton 2.51 really send (copied
from a running server: they are the contract the mapping reads).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

from kiln import tensors
from kiln.clients import (
    DeadlineExceededError,
    Generation,
    GenerationDelta,
    InvalidInputError,
    KilnError,
    ModelNotFoundError,
    ModelNotReadyError,
    ServerError,
    ServerUnavailableError,
)
from kiln.clients._generate_core import error_from_body, reply_from_json, reply_from_outputs
from kiln.clients.generation import (
    FINISH_CANCELLED,
    Progress,
    Reply,
    SSEDecoder,
    classify_stream_error,
    encode_call,
    field_of,
    generation_error,
)

MODEL = "tinylm_generate"
URL = "grpc://127.0.0.1:8001"

# --- requests -------------------------------------------------------------------------------------


def test_a_call_sends_only_the_fields_given_and_always_says_whether_it_streams() -> None:
    call = encode_call(MODEL, "hello", stream=False)
    assert call.prompt == "hello" and dict(call.fields) == {tensors.STREAM: False}
    assert call.path() == "/v2/models/tinylm_generate/generate"
    assert json.loads(call.json_body()) == {"text_input": "hello", "stream": False}

    call = encode_call(
        MODEL, "hé", max_tokens=16, temperature=0, top_k=5, top_p=0.9, seed=2**40, stop="\n\n",
        stream=True, request_id="r-1",
    )
    assert call.path() == "/v2/models/tinylm_generate/generate_stream"
    assert call.request_id == "r-1" and call.stream
    assert json.loads(call.json_body()) == {
        "text_input": "hé", "max_tokens": 16, "temperature": 0.0, "top_k": 5, "top_p": 0.9,
        "seed": 2**40, "stop": ["\n\n"], "stream": True,
    }
    encoded = {name: (datatype, array) for name, datatype, array in call.tensors()}
    assert list(encoded) == list(tensors.__dict__[n.upper()] for n in (
        "text_input", "max_tokens", "temperature", "top_k", "top_p", "seed", "stop", "stream"))
    expected = {
        "text_input": ("BYTES", np.object_, ["hé".encode()]),
        "max_tokens": ("INT32", np.int32, [16]),
        "temperature": ("FP32", np.float32, [0.0]),
        "top_k": ("INT32", np.int32, [5]),
        "top_p": ("FP32", np.float32, [np.float32(0.9)]),
        "seed": ("INT64", np.int64, [2**40]),
        "stop": ("BYTES", np.object_, [b"\n\n"]),
        "stream": ("BOOL", np.bool_, [True]),
    }
    for name, (datatype, dtype, values) in expected.items():
        assert encoded[name][0] == datatype, name
        assert encoded[name][1].dtype == dtype and encoded[name][1].tolist() == values, name


def test_stop_takes_one_string_or_several_and_bytes_prompts_are_decoded() -> None:
    call = encode_call(MODEL, b"x", stop=["a", b"b"], stream=True)
    assert call.prompt == "x" and call.fields[tensors.STOP] == ("a", "b")
    assert tensors.STOP not in encode_call(MODEL, "x", stop=(), stream=True).fields
    assert tensors.STOP not in encode_call(MODEL, "x", stop=None, stream=True).fields


@pytest.mark.parametrize(
    ("kwargs", "field", "words"),
    [
        ({"prompt": 12}, "text_input", "text_input must be a str (or UTF-8 bytes), got int"),
        ({"prompt": b"\xff\xfe"}, "text_input", "text_input is not valid UTF-8 (byte 0: invalid start byte)"),
        ({"max_tokens": "16"}, "max_tokens", "max_tokens must be an integer, got '16' (str)"),
        ({"max_tokens": 1.5}, "max_tokens", "max_tokens must be an integer, got 1.5 (float)"),
        ({"max_tokens": True}, "max_tokens", "max_tokens must be an integer, got True (bool)"),
        ({"max_tokens": 2**31}, "max_tokens", "max_tokens must fit in INT32 (-2147483648..2147483647), got 2147483648"),
        ({"top_k": "all"}, "top_k", "top_k must be an integer, got 'all' (str)"),
        ({"seed": 2**63}, "seed", "seed must fit in INT64"),
        ({"temperature": "hot"}, "temperature", "temperature must be a number, got 'hot' (str)"),
        ({"temperature": float("nan")}, "temperature", "temperature must be a finite number, got nan"),
        ({"top_p": float("inf")}, "top_p", "top_p must be a finite number, got inf"),
        ({"stop": 3}, "stop", "stop must be a string or a sequence of strings, got int"),
        ({"stop": ["ok", 3]}, "stop", "stop[1] must be a str (or UTF-8 bytes), got int"),
    ],
)
def test_a_field_of_the_wrong_type_is_refused_before_sending_naming_it(kwargs, field, words) -> None:
    prompt = kwargs.pop("prompt", "hello")
    with pytest.raises(InvalidInputError) as caught:
        encode_call(MODEL, prompt, stream=False, **kwargs)
    assert caught.value.input_name == field
    assert words in str(caught.value)


def test_numpy_scalars_are_accepted_and_values_are_left_to_the_model() -> None:
    call = encode_call(MODEL, "x", max_tokens=np.int64(3), temperature=np.float32(0.5), top_k=-1,
                       seed=-5, stream=False)
    assert call.fields[tensors.MAX_TOKENS] == 3 and call.fields[tensors.TEMPERATURE] == 0.5
    assert call.fields[tensors.TOP_K] == -1 and call.fields[tensors.SEED] == -5  # the model refuses these


# --- server-sent events ---------------------------------------------------------------------------

TRITON_STREAM = (
    b'data: {"completion_tokens":1,"finish_reason":"","model_name":"tinylm_generate",'
    b'"model_version":"1","prompt_tokens":7,"text_output":" f\xc3\xa9"}\n\n'
    b'data: {"completion_tokens":2,"finish_reason":"length","model_name":"tinylm_generate",'
    b'"model_version":"1","prompt_tokens":7,"text_output":"ssion"}\n\n'
)
"""What Triton 2.51's generate_stream sent for a 2-token request (with an accent added)."""


def test_triton_events_parse_whole_and_cut_at_every_byte() -> None:
    whole = SSEDecoder().feed(TRITON_STREAM)
    assert [json.loads(e)["text_output"] for e in whole] == [" fé", "ssion"]
    for cut in range(1, len(TRITON_STREAM)):
        decoder = SSEDecoder()
        events = decoder.feed(TRITON_STREAM[:cut]) + decoder.feed(TRITON_STREAM[cut:]) + decoder.close()
        assert events == whole, cut
    decoder = SSEDecoder()
    assert [e for i in range(len(TRITON_STREAM)) for e in decoder.feed(TRITON_STREAM[i : i + 1])] == whole


@pytest.mark.parametrize("newline", [b"\n", b"\r\n", b"\r"])
def test_every_line_ending_of_the_standard_is_understood(newline: bytes) -> None:
    stream = newline.join([b"\xef\xbb\xbfdata: one", b"data:two", b"", b": a comment", b"event: x",
                           b"id: 7", b"data", b"", b"", b"retry: 10", b"", b"data:  three", b"", b""])
    # A data line with no colon is data "" (an event of its own); blank lines with no data
    # before them and the comment/event/id/retry lines dispatch nothing; one space is stripped.
    expected = ["one\ntwo", "", " three"]
    assert SSEDecoder().feed(stream) == expected
    decoder = SSEDecoder()
    assert [e for i in range(len(stream)) for e in decoder.feed(stream[i : i + 1])] == expected


def test_an_event_cut_off_by_the_end_of_the_stream_is_dropped() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b'data: {"a": 1}\n\ndata: {"b"') == ['{"a": 1}']
    assert decoder.close() == []


# --- replies and results --------------------------------------------------------------------------


def test_replies_decode_from_grpc_arrays_and_from_http_json_alike() -> None:
    outputs = {
        tensors.TEXT_OUTPUT: np.array(["d\xe9j\xe0".encode()], dtype=np.object_),
        tensors.FINISH_REASON: np.array([b"stop"], dtype=np.object_),
        tensors.PROMPT_TOKENS: np.array([7], np.int32),
        tensors.COMPLETION_TOKENS: np.array([3], np.int32),
    }
    from_grpc = reply_from_outputs(outputs, final=True)
    from_http = reply_from_json(
        '{"completion_tokens":3,"finish_reason":"stop","model_name":"m","model_version":"1",'
        '"prompt_tokens":7,"text_output":"d\\u00e9j\\u00e0"}', final=True
    )
    assert from_grpc == from_http == Reply("déjà", "stop", 7, 3, True)
    assert reply_from_json('{"text_output": ["x"], "finish_reason": [""], "prompt_tokens": [2]}') == Reply(
        "x", "", 2, None, False
    )
    empty_final = reply_from_outputs({}, final=True)  # Triton's empty final response
    assert empty_final == Reply(final=True) and empty_final.last


def test_error_events_and_error_bodies_become_server_exceptions() -> None:
    with pytest.raises(InferenceServerException) as caught:
        reply_from_json('{"error":"temperature must be between 0 and 2 (0 is greedy), got 9.0"}')
    assert caught.value.status() is None and "temperature must be" in caught.value.message()
    with pytest.raises(InferenceServerException, match="not JSON"):
        reply_from_json("<html>")
    sse = b'data: {"error":"text_input is empty: send a prompt of at least one character"}\n\n'
    error = error_from_body(sse, "400")
    assert (error.status(), error.message()) == ("400", "text_input is empty: send a prompt of at least one character")
    error = error_from_body(b'{"error":"Request for unknown model: \'nope\' is not found"}', "404")
    assert (error.status(), error.message()) == ("404", "Request for unknown model: 'nope' is not found")
    assert error_from_body(b"", "502").message() == "HTTP 502"


def test_progress_assembles_the_deltas_into_the_whole_generation() -> None:
    progress = Progress()
    deltas = [
        progress.delta(Reply(" def", "", 4, 1), 0.010),
        progress.delta(Reply("", "", 4, 2), 0.012),
        progress.delta(Reply(" f():", "length", 4, 3, final=True), 0.015),
    ]
    assert deltas[0] == GenerationDelta(" def", None, 4, 1, 0.010)
    assert [d.final for d in deltas] == [False, False, True]
    assert deltas[-1].finish_reason == "length" and deltas[-1].completion_tokens == 3
    assert progress.generation(0.02, "r") == Generation(" def f():", "length", 4, 3, 0.02, "r")
    assert progress.generation(0.02, "r").total_tokens == 7


@pytest.mark.parametrize("last", [Reply(final=True), None], ids=["empty final", "stream ended"])
def test_a_request_the_server_ends_without_a_reason_finishes_cancelled(last: Reply | None) -> None:
    progress = Progress()
    progress.delta(Reply("ab", "", 3, 2), 0.01)
    delta = progress.delta(last, 0.02)
    assert delta == GenerationDelta("", FINISH_CANCELLED, 3, 2, 0.02)
    assert progress.generation(0.03, None).finish_reason == FINISH_CANCELLED


# --- errors ---------------------------------------------------------------------------------------

SERVER_MESSAGES = [
    # (what kiln_generate or Triton 2.51 answered, the class, the field)
    ("text_input is empty: send a prompt of at least one character", InvalidInputError, "text_input"),
    ("text_input is 20000 bytes, more than max_prompt_bytes 16384", InvalidInputError, "text_input"),
    ("text_input must hold exactly one prompt", InvalidInputError, "text_input"),
    ("the prompt (3 tokens) plus max_tokens (5000) is more than the model's context of 1024 tokens: "
     "shorten the prompt or lower max_tokens", InvalidInputError, "max_tokens"),
    ("temperature must be between 0 and 2 (0 is greedy), got 5.0", InvalidInputError, "temperature"),
    ("top_p must be in (0, 1], got 0.0", InvalidInputError, "top_p"),
    ("top_k must be 0 (off) or a positive number of tokens, got -1", InvalidInputError, "top_k"),
    ("seed must be between 0 and 2**63 - 1, got -5", InvalidInputError, "seed"),
    ("stop[1] is empty: every stop string needs a character", InvalidInputError, "stop"),
    ("at most 8 stop strings, got 9", InvalidInputError, "stop"),
    ("unknown field(s) 'bogus': kiln_generate takes text_input, max_tokens, temperature, top_k, top_p, "
     "seed, stop, stream", InvalidInputError, "bogus"),
    ("[request id: dt] inference input 'max_tokens' data-type is 'INT64', but model 'tinylm_generate' "
     "expects 'INT32'", InvalidInputError, "max_tokens"),
    ("Request for unknown model: 'nope' is not found", ModelNotFoundError, None),
    ("Request for unknown model: 'tinylm_generate' has no available versions", ModelNotReadyError, None),
    ("300 requests are already waiting for room in the KV cache (max_waiting 256); retry later",
     ServerUnavailableError, None),
    ("the model is shutting down", ServerUnavailableError, None),
    ("[Errno 5] the ONNX model failed: the stream broke", ServerError, None),
]


@pytest.mark.parametrize(("message", "cls", "field"), SERVER_MESSAGES, ids=[m[:40] for m, _, _ in SERVER_MESSAGES])
def test_a_streamed_error_without_a_status_is_mapped_by_its_words(message, cls, field) -> None:
    assert classify_stream_error(message) is cls
    error = generation_error(InferenceServerException(message), model=MODEL, url=URL, request_id="r")
    assert type(error) is cls
    assert error.server_message == message and error.model == MODEL and error.request_id == "r"
    assert str(error).startswith(f"model '{MODEL}' at {URL}: {message}")
    if cls is InvalidInputError:
        assert error.input_name == field


@pytest.mark.parametrize(
    ("status", "cls"),
    [("400", InvalidInputError), ("404", ModelNotFoundError), ("503", ServerUnavailableError),
     ("500", ServerError), ("StatusCode.UNAVAILABLE", ServerUnavailableError),
     ("StatusCode.DEADLINE_EXCEEDED", DeadlineExceededError)],
)
def test_an_error_with_a_status_is_mapped_like_the_other_clients_errors(status: str, cls: type) -> None:
    message = "temperature must be between 0 and 2 (0 is greedy), got 9.0"
    error = generation_error(InferenceServerException(message, status=status), model=MODEL, url=URL)
    assert type(error) is cls and error.status == status
    if cls is InvalidInputError:
        assert error.input_name == "temperature"


def test_timeouts_and_unreachable_servers_map_like_everywhere_else() -> None:
    assert isinstance(generation_error(TimeoutError("late"), model=MODEL, url=URL, timeout=0.5),
                      DeadlineExceededError)
    unreachable = generation_error(ConnectionRefusedError(111, "refused"), model=MODEL, url=URL)
    assert isinstance(unreachable, ServerUnavailableError)
    kept = ServerError("as is")
    assert generation_error(kept, model=MODEL, url=URL) is kept
    assert isinstance(generation_error(RuntimeError("odd"), model=MODEL, url=URL), KilnError)


def test_field_of_only_guesses_when_asked_to() -> None:
    assert field_of("the stream is no longer valid", strict=True) is None
    assert field_of("the stream is no longer valid") == "stream"
    assert field_of("no field here") is None
