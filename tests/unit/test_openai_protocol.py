"""kiln's OpenAI-compatible endpoints without a model server: the chat template, request checking,
response and chunk shapes, the error format and the status of each SDK error, and the app's own
error answers (FastAPI's TestClient, with Triton's address pointing at a closed port).

tests/integration/test_openai_api.py runs the endpoints against a real tritonserver with the
official openai client.
"""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from kiln.clients import (
    DeadlineExceededError,
    Generation,
    InvalidInputError,
    KilnError,
    ModelNotFoundError,
    ModelNotReadyError,
    ServerError,
    ServerUnavailableError,
)
from kiln.openai import chat, protocol
from kiln.openai.app import create_app
from kiln.openai.protocol import APIError, parse_chat, parse_completion

MODEL = "tinylm_generate"

# --- the chat template ----------------------------------------------------------------------------


def test_the_template_marks_each_role_and_ends_with_the_assistants_turn() -> None:
    prompt = chat.render([
        {"role": "system", "content": "Answer in one line."},
        {"role": "user", "content": "What does len() return?"},
        {"role": "assistant", "content": "The number of items."},
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "And "}, {"type": "text", "text": "max()?"}],
         "name": "ann"},
    ])
    assert prompt == (
        "<|system|>\nAnswer in one line.\n"
        "<|user|>\nWhat does len() return?\n"
        "<|assistant|>\nThe number of items.\n"
        "<|system|>\nBe brief.\n"
        "<|user|>\nAnd max()?\n"
        "<|assistant|>\n"
    )
    assert chat.IMPLICIT_STOP == "\n<|user|>"


@pytest.mark.parametrize(
    ("messages", "param", "words"),
    [
        ("hello", "messages", "messages must be a list of messages, got str"),
        ([], "messages", "at least one message"),
        (["hi"], "messages[0]", "must be an object"),
        ([{"role": "tool", "content": "42"}], "messages[0].role", "is 'tool'"),
        ([{"role": "user"}], "messages[0].content", "has no content"),
        ([{"role": "user", "content": None}], "messages[0].content", "has no content"),
        ([{"role": "user", "content": 3}], "messages[0].content", "must be a string or a list of text parts"),
        ([{"role": "assistant", "content": "x", "tool_calls": []}], "messages[0].tool_calls",
         "does not take: tool_calls"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
         "messages[0].content[0]", "of type 'image_url'"),
        ([{"role": "user", "content": [{"type": "text", "text": 1}]}], "messages[0].content[0].text",
         "must be a string"),
    ],
)
def test_messages_that_do_not_fit_are_refused_naming_the_field(messages, param: str, words: str) -> None:
    with pytest.raises(chat.ChatError) as caught:
        chat.render(messages)
    assert caught.value.param == param
    assert words in str(caught.value)


# --- requests -------------------------------------------------------------------------------------


def test_a_completion_request_passes_only_what_it_sets() -> None:
    request = parse_completion({"model": MODEL, "prompt": "def f("})
    assert (request.kind, request.model, request.prompt) == ("text_completion", MODEL, "def f(")
    assert dict(request.options) == {} and not request.stream and not request.include_usage

    request = parse_completion({
        "model": MODEL, "prompt": ["hi"], "max_tokens": 8, "temperature": 0, "top_p": 0.5, "top_k": 4,
        "seed": 3, "stop": "\n", "stream": True, "stream_options": {"include_usage": True}, "n": 1,
        "user": "u-1", "presence_penalty": 0, "frequency_penalty": 0.0, "logprobs": None, "echo": False,
        "best_of": 1, "logit_bias": {}, "suffix": None,
    })
    assert request.prompt == "hi" and request.stream and request.include_usage
    assert dict(request.options) == {
        "max_tokens": 8, "temperature": 0, "top_p": 0.5, "top_k": 4, "seed": 3, "stop": ("\n",),
    }


def test_a_chat_request_renders_its_messages_and_always_stops_at_a_new_user_turn() -> None:
    request = parse_chat({
        "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 5,
        "stop": ["END"],
    })
    assert request.prompt == "<|user|>\nhi\n<|assistant|>\n"
    assert dict(request.options) == {"max_tokens": 5, "stop": ("END", "\n<|user|>")}
    assert request.params["max_tokens"] == "max_completion_tokens"
    assert dict(parse_chat({"model": MODEL, "messages": [{"role": "user", "content": "x"}]}).options) == {
        "stop": ("\n<|user|>",)
    }


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"prompt": "hi"}, "model", "you must provide a model parameter"),
        ({"model": 3, "prompt": "hi"}, "model", "you must provide a model parameter"),
        ({"model": MODEL}, "prompt", "prompt must be a string"),
        ({"model": MODEL, "prompt": ["a", "b"]}, "prompt", "one text prompt per request"),
        ({"model": MODEL, "prompt": [1, 2, 3]}, "prompt", "one text prompt per request"),
        ({"model": MODEL, "prompt": "hi", "max_token": 4}, "max_token",
         "Unrecognized request argument(s) supplied: max_token"),
        ({"model": MODEL, "prompt": "hi", "b": 1, "a": 2}, "a", "supplied: a, b"),
        ({"model": MODEL, "prompt": "hi", "n": 2}, "n", "n must be 1"),
        ({"model": MODEL, "prompt": "hi", "presence_penalty": 0.5}, "presence_penalty", "not supported by kiln"),
        ({"model": MODEL, "prompt": "hi", "logprobs": 2}, "logprobs", "not supported by kiln"),
        ({"model": MODEL, "prompt": "hi", "echo": True}, "echo", "not supported by kiln"),
        ({"model": MODEL, "prompt": "hi", "max_tokens": "8"}, "max_tokens", 'max_tokens must be an integer, got "8"'),
        ({"model": MODEL, "prompt": "hi", "max_tokens": 8.5}, "max_tokens", "max_tokens must be an integer"),
        ({"model": MODEL, "prompt": "hi", "temperature": True}, "temperature", "temperature must be a number"),
        ({"model": MODEL, "prompt": "hi", "top_k": 1.0}, "top_k", "top_k must be an integer"),
        ({"model": MODEL, "prompt": "hi", "stream": "yes"}, "stream", "stream must be true or false"),
        ({"model": MODEL, "prompt": "hi", "stream_options": {"include_usage": True}}, "stream_options",
         "only allowed when stream is true"),
        ({"model": MODEL, "prompt": "hi", "stream": True, "stream_options": {"x": 1}}, "stream_options",
         "include_usage"),
        ({"model": MODEL, "prompt": "hi", "stop": ["a", 1]}, "stop", "stop must be a string or a list of strings"),
        ({"model": MODEL, "prompt": "hi", "user": 7}, "user", "user must be a string"),
    ],
)
def test_a_bad_completion_request_is_a_400_naming_the_param(body: dict, param: str, words: str) -> None:
    with pytest.raises(APIError) as caught:
        parse_completion(body)
    error = caught.value
    assert (error.status, error.type, error.param) == (400, "invalid_request_error", param)
    assert words in error.message


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"model": MODEL}, "messages", "you must provide a messages parameter"),
        ({"model": MODEL, "messages": [{"role": "robot", "content": "x"}]}, "messages[0].role", "'robot'"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]},
         "tools", "not supported by kiln"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 4,
          "max_completion_tokens": 5}, "max_tokens", "not both"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "prompt": "x"}, "prompt",
         "Unrecognized request argument"),
    ],
)
def test_a_bad_chat_request_is_a_400_naming_the_param(body: dict, param: str, words: str) -> None:
    with pytest.raises(APIError) as caught:
        parse_chat(body)
    assert (caught.value.status, caught.value.param) == (400, param)
    assert words in caught.value.message


def test_a_body_that_is_not_a_json_object_is_a_400() -> None:
    for raw, words in ((b"{bad", "could not parse the JSON body"), (b"[1]", "must be a JSON object, got list")):
        with pytest.raises(APIError) as caught:
            protocol.parse_json(raw)
        assert caught.value.status == 400 and words in caught.value.message


# --- responses ------------------------------------------------------------------------------------


def test_answers_and_chunks_have_openais_shapes() -> None:
    completion = parse_completion({"model": MODEL, "prompt": "p", "stream": True,
                                   "stream_options": {"include_usage": True}})
    result = Generation("text", "length", 3, 4, 0.1)
    assert protocol.response(completion, "cmpl-1", 7, result) == {
        "id": "cmpl-1", "object": "text_completion", "created": 7, "model": MODEL,
        "choices": [{"index": 0, "text": "text", "finish_reason": "length", "logprobs": None}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7},
    }
    assert protocol.chunk(completion, "cmpl-1", 7, text="te") == {
        "id": "cmpl-1", "object": "text_completion", "created": 7, "model": MODEL,
        "choices": [{"index": 0, "text": "te", "finish_reason": None, "logprobs": None}], "usage": None,
    }
    conversation = parse_chat({"model": MODEL, "messages": [{"role": "user", "content": "x"}]})
    assert protocol.response(conversation, "chatcmpl-1", 7, result)["choices"] == [
        {"index": 0, "message": {"role": "assistant", "content": "text"}, "finish_reason": "length",
         "logprobs": None}
    ]
    assert protocol.chunk(conversation, "c", 7, text="", role=True)["choices"][0]["delta"] == {
        "role": "assistant", "content": ""}
    last = protocol.chunk(conversation, "c", 7, reason="stop")
    assert last["object"] == "chat.completion.chunk" and "usage" not in last
    assert last["choices"][0]["delta"] == {} and last["choices"][0]["finish_reason"] == "stop"
    assert protocol.usage_chunk(conversation, "c", 7, 3, 4)["choices"] == []
    assert protocol.event({"a": "é"}) == 'data: {"a":"é"}\n\n'.encode()
    assert protocol.new_id("chat.completion").startswith("chatcmpl-")
    assert protocol.new_id("text_completion").startswith("cmpl-")


def test_a_generation_the_server_cancelled_is_a_503_not_a_finish_reason() -> None:
    request = parse_completion({"model": MODEL, "prompt": "p"})
    with pytest.raises(APIError) as caught:
        protocol.response(request, "cmpl-1", 7, Generation("te", "cancelled", 3, 1, 0.1))
    assert caught.value.status == 503 and caught.value.code == "generation_cancelled"


# --- errors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "status", "kind"),
    [
        (InvalidInputError("temperature must be ...", input_name="temperature"), 400, "invalid_request_error"),
        (ModelNotFoundError("no such model"), 404, "not_found_error"),
        (ModelNotReadyError("loading"), 503, "service_unavailable_error"),
        (ServerUnavailableError("queue full"), 503, "service_unavailable_error"),
        (DeadlineExceededError("late"), 504, "timeout_error"),
        (ServerError("boom"), 500, "server_error"),
        (KilnError("odd"), 500, "server_error"),
    ],
)
def test_each_sdk_error_gets_its_status(error: KilnError, status: int, kind: str) -> None:
    api = protocol.api_error(error)
    assert (api.status, api.type) == (status, kind)
    assert api.body() == {"error": {"message": str(error), "type": kind, "param": api.param, "code": api.code}}


def test_the_models_words_name_the_requests_fields() -> None:
    message = "text_input is empty: send a prompt of at least one character"
    error = InvalidInputError(f"model 'm' at grpc://h:1: {message}", server_message=message, input_name="text_input")
    completion = parse_completion({"model": MODEL, "prompt": ""})
    api = protocol.api_error(error, completion)
    assert (api.param, api.message) == ("prompt", "prompt is empty: send a prompt of at least one character")
    conversation = parse_chat({"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                               "max_completion_tokens": 9})
    assert protocol.api_error(error, conversation).param == "messages"
    too_many = InvalidInputError("the prompt plus max_tokens ...", input_name="max_tokens")
    assert protocol.api_error(too_many, conversation).param == "max_completion_tokens"


def test_generation_models_are_the_decoupled_kiln_generate_ones() -> None:
    configs = {
        "tinylm_generate": {"backend": "kiln_generate", "model_transaction_policy": {"decoupled": True}},
        "not_decoupled": {"backend": "kiln_generate"},
        "digits": {"backend": "kiln_onnx"},
        "other": {"backend": "python", "model_transaction_policy": {"decoupled": True}},
    }
    assert protocol.generation_models(configs) == ["tinylm_generate"]


# --- the app, with no Triton behind it ------------------------------------------------------------


@pytest.fixture(scope="module")
def app_without_triton():
    with TestClient(create_app("grpc://127.0.0.1:9", timeout_s=5)) as client:
        yield client


def test_the_app_answers_in_openais_error_format_without_triton(app_without_triton) -> None:
    client = app_without_triton
    answer = client.post("/v1/completions", content=b"{bad")
    assert answer.status_code == 400 and "could not parse the JSON body" in answer.json()["error"]["message"]
    answer = client.post("/v1/chat/completions", json={"model": MODEL, "messages": [], "n": 1})
    assert answer.status_code == 400 and answer.json()["error"]["param"] == "messages"
    answer = client.post("/v1/completions", json={"model": MODEL, "prompt": "hi"})
    assert answer.status_code == 503, answer.text  # Triton cannot be asked which models it serves
    assert answer.json()["error"]["type"] == "service_unavailable_error"
    assert client.get("/v1/models").status_code == 503
    assert client.get("/health").status_code == 503
    answer = client.get("/v2/models")
    assert answer.status_code == 404 and answer.json() == {"error": {
        "message": "GET /v2/models: Not Found", "type": "not_found_error", "param": None, "code": None}}
    assert client.get("/v1/completions").status_code == 405


# --- kiln serve's flags ---------------------------------------------------------------------------


def serve_args(*flags: str):
    import argparse

    from kiln.cli.serve import add_serve_command

    parser = argparse.ArgumentParser(prog="kiln")
    add_serve_command(parser.add_subparsers())
    return parser.parse_args(["serve", *flags])


@pytest.mark.parametrize(
    ("flags", "port"),
    [
        ((), 9000),
        (("--free-ports",), 0),
        (("--openai-port", "9100"), 9100),
        (("--openai-port", "0"), 0),
        (("--free-ports", "--openai-port", "9100"), 9100),
        (("--http-port", "9000"), 0),  # the default gives way to a Triton port given on the command line
        (("--no-openai",), None),
    ],
)
def test_kiln_serve_flags_place_the_openai_endpoints(flags: tuple[str, ...], port: int | None) -> None:
    from kiln.cli.serve import openai_settings

    settings = openai_settings(serve_args(*flags))
    assert (settings.port if settings is not None else None) == port


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (("--openai-port", "70000"), "--openai-port must be in 0..65535, got 70000"),
        (("--grpc-port", "9100", "--openai-port", "9100"), "--openai-port 9100 is also one of Triton's ports"),
    ],
)
def test_kiln_serve_refuses_an_openai_port_that_cannot_work(flags: tuple[str, ...], words: str) -> None:
    from kiln.cli.serve import openai_settings

    with pytest.raises(ValueError, match=words):
        openai_settings(serve_args(*flags))
