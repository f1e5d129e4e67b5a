"""kiln's OpenAI-compatible endpoints (`kiln.openai`) against the served `tinylm_generate`.

The app runs in process (`OpenAIServer`, uvicorn on a free port) in front of the session's
tritonserver, and the official `openai` client talks to it unchanged: completions and chat,
whole and streamed. The expected texts come from Triton's own HTTP `generate` endpoint (a plain
POST), with the chat prompt rendered by the documented template. Raw HTTP checks the error
answers (OpenAI's format and status) and that a client disconnecting mid-stream cancels its
request upstream (`kiln_generate_requests_total{finish_reason="cancelled"}` on /metrics). Last,
`kiln serve` starts the endpoints beside Triton and prints their URL, and `--no-openai` does not.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest

from kiln import paths, tensors
from kiln.openai import OpenAIServer, chat
from kiln.server import TritonServer

MODEL = tensors.TEXT_GENERATOR
PROMPTS = (
    "The return value of",
    "A class definition",
    "If the",
    "Exceptions are raised when an error is detected during execution of",
)
CONVERSATIONS = (
    [{"role": "user", "content": "What does a class definition do?"}],
    [{"role": "system", "content": "You explain Python."}, {"role": "user", "content": "The return value of"}],
    [{"role": "user", "content": "Exceptions are raised when"}],
)
GREEDY = {"temperature": 0.0}
MIN_LONG_TOKENS = 64
"""The request of the client that hangs up must run at least this long (greedy, alone)."""
BALLAST = 15
"""Sampled requests kept running while a client hangs up (see test_text_generator_client's
BALLAST): they slow each decode step several times, so the request is still running when its
cancellation arrives, whatever the model's speed."""
BALLAST_START_S = 0.05
METRICS_WAIT_S = 10.0
PUSH_INTERVAL_S = 1.2
REQUESTS_TOTAL = "kiln_generate_requests_total"
RUNNING = "kiln_generate_requests_running"
SERVE_TIMEOUT_S = 90.0


def raw_generate(server: TritonServer, prompt: str, **fields: object) -> dict:
    """The reference: Triton's HTTP generate endpoint, posted to with urllib."""
    request = urllib.request.Request(
        f"http://{server.http_url}/v2/models/{MODEL}/generate",
        data=json.dumps({"text_input": prompt, **fields}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def post(base_url: str, path: str, body: object = None, raw: bytes | None = None) -> tuple[int, str, str]:
    """(status, content type, body) of a POST to the OpenAI endpoints."""
    request = urllib.request.Request(
        f"{base_url}{path}", data=raw if raw is not None else json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.headers["Content-Type"], error.read().decode()


def events(body: str) -> list[str]:
    return [line[len("data: "):] for line in body.split("\n") if line.startswith("data: ")]


@pytest.fixture(scope="module")
def openai_server(server: TritonServer) -> Iterator[OpenAIServer]:
    with OpenAIServer(server.grpc_url, port=0) as running:
        yield running


@pytest.fixture(scope="module")
def client(openai_server: OpenAIServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=openai_server.url, api_key="unused", max_retries=0)


def chat_reference(server: TritonServer, messages: list[dict], **fields: object) -> dict:
    stop = list(fields.pop("stop", [])) + [chat.IMPLICIT_STOP]
    return raw_generate(server, chat.render(messages), stop=stop, **fields)


# --- the official client --------------------------------------------------------------------------


def test_models_lists_the_generation_model(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list()] == [MODEL]
    card = client.models.retrieve(MODEL)
    assert (card.id, card.owned_by) == (MODEL, "kiln")
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no_such_model")


def test_a_completion_is_tritons_text(server: TritonServer, client: openai.OpenAI) -> None:
    for prompt in PROMPTS[:2]:
        reference = raw_generate(server, prompt, max_tokens=24, **GREEDY)
        answer = client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0)
        assert answer.object == "text_completion" and answer.model == MODEL and answer.id.startswith("cmpl-")
        choice = answer.choices[0]
        assert (choice.text, choice.finish_reason) == (reference["text_output"], reference["finish_reason"])
        assert (answer.usage.prompt_tokens, answer.usage.completion_tokens, answer.usage.total_tokens) == (
            reference["prompt_tokens"], reference["completion_tokens"],
            reference["prompt_tokens"] + reference["completion_tokens"],
        )


def test_a_streamed_completion_joins_into_the_same_text(server: TritonServer, client: openai.OpenAI) -> None:
    reference = raw_generate(server, PROMPTS[3], max_tokens=32, **GREEDY)
    chunks = list(client.completions.create(
        model=MODEL, prompt=PROMPTS[3], max_tokens=32, temperature=0, stream=True,
        stream_options={"include_usage": True},
    ))
    texts = [c for c in chunks if c.choices]
    assert len(texts) > 1
    assert "".join(c.choices[0].text for c in texts) == reference["text_output"]
    assert [c.choices[0].finish_reason for c in texts] == [None] * (len(texts) - 1) + [reference["finish_reason"]]
    usage = chunks[-1]
    assert usage.choices == [] and (usage.usage.prompt_tokens, usage.usage.completion_tokens) == (
        reference["prompt_tokens"], reference["completion_tokens"],
    )
    assert all(c.usage is None for c in texts)


def test_sampling_options_and_the_top_k_extension_reach_the_model(server: TritonServer, client: openai.OpenAI) -> None:
    fields = {"max_tokens": 24, "temperature": 0.9, "top_p": 0.9, "seed": 5}
    reference = raw_generate(server, PROMPTS[1], top_k=20, **fields)
    answer = client.completions.create(model=MODEL, prompt=PROMPTS[1], extra_body={"top_k": 20}, **fields)
    assert answer.choices[0].text == reference["text_output"]
    other = raw_generate(server, PROMPTS[1], top_k=1, **fields)["text_output"]
    greedy = raw_generate(server, PROMPTS[1], max_tokens=24, **GREEDY)["text_output"]
    assert other == greedy  # top_k 1 is greedy: the extension really reached the sampler
    stopped = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=24, temperature=0,
                                        stop=[greedy[4:7]])
    assert (stopped.choices[0].text, stopped.choices[0].finish_reason) == (greedy[: greedy.find(greedy[4:7])], "stop")


def test_a_chat_completion_is_the_templates_prompt_continued(server: TritonServer, client: openai.OpenAI) -> None:
    messages = CONVERSATIONS[1]
    reference = chat_reference(server, messages, max_tokens=24, **GREEDY)
    answer = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=24, temperature=0)
    assert answer.object == "chat.completion" and answer.id.startswith("chatcmpl-")
    choice = answer.choices[0]
    assert choice.message.role == "assistant"
    assert (choice.message.content, choice.finish_reason) == (reference["text_output"], reference["finish_reason"])
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (
        reference["prompt_tokens"], reference["completion_tokens"],
    )
    limited = client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=3, temperature=0)
    assert limited.usage.completion_tokens <= 3


def test_a_streamed_chat_sends_chunks_then_the_finish_then_the_usage(server: TritonServer, client: openai.OpenAI) -> None:
    messages = CONVERSATIONS[0]
    reference = chat_reference(server, messages, max_tokens=32, **GREEDY)
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=32, temperature=0, stream=True,
        stream_options={"include_usage": True},
    ))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    body = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].delta.content or "" for c in body) == reference["text_output"]
    assert body[-1].choices[0].finish_reason == reference["finish_reason"]
    assert [c.choices[0].finish_reason for c in body[:-1]] == [None] * (len(body) - 1)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == reference["completion_tokens"]


def test_the_client_raises_openais_errors(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model=MODEL, prompt="hi", temperature=2.5)
    assert bad.value.body["param"] == "temperature" and "between 0 and 2" in bad.value.body["message"]
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}])
    assert missing.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as streamed:  # refused before the stream starts
        list(client.completions.create(model=MODEL, prompt="", stream=True))
    assert streamed.value.body["param"] == "prompt"


# --- raw HTTP: error answers ----------------------------------------------------------------------

CHAT = "/chat/completions"
COMPLETIONS = "/completions"
ERRORS = [
    # (path, body, status, param, words in the message)
    (COMPLETIONS, {"model": MODEL, "prompt": "hi", "max_token": 4}, 400, "max_token", "Unrecognized request argument"),
    (CHAT, {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "n": 2}, 400, "n", "n must be 1"),
    (CHAT, {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "logit_bias": {"1": 5}}, 400,
     "logit_bias", "not supported"),
    (CHAT, {"model": MODEL, "messages": [{"role": "tool", "content": "4"}]}, 400, "messages[0].role", "'tool'"),
    (CHAT, {"model": MODEL, "messages": "hello"}, 400, "messages", "must be a list"),
    (CHAT, {"model": MODEL, "messages": []}, 400, "messages", "at least one message"),
    (COMPLETIONS, {"model": MODEL, "prompt": "hi", "top_p": 0}, 400, "top_p", "top_p must be in (0, 1]"),
    (COMPLETIONS, {"model": MODEL, "prompt": "hi", "max_tokens": 100_000}, 400, "max_tokens", "context"),
    (CHAT, {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 100_000},
     400, "max_completion_tokens", "context"),
    (COMPLETIONS, {"model": MODEL, "prompt": "x" * 20_000}, 400, "prompt", "more than max_prompt_bytes"),
    (COMPLETIONS, {"model": "no_such_model", "prompt": "hi"}, 404, "model", "does not exist"),
    (COMPLETIONS, {"model": MODEL, "prompt": "", "stream": True}, 400, "prompt", "prompt is empty"),
]


@pytest.mark.parametrize(("path", "body", "status", "param", "words"), ERRORS, ids=[f"{e[3]}-{e[2]}" for e in ERRORS])
def test_errors_have_openais_format_and_status(
    openai_server: OpenAIServer, path: str, body: dict, status: int, param: str, words: str
) -> None:
    got, kind, text = post(openai_server.url, path, body)
    assert (got, kind) == (status, "application/json"), text
    error = json.loads(text)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and words in error["message"]
    assert error["type"] == ("invalid_request_error" if status == 400 else "not_found_error")


def test_a_body_that_is_not_json_is_a_400(openai_server: OpenAIServer) -> None:
    status, _, text = post(openai_server.url, COMPLETIONS, raw=b"{not json")
    assert status == 400 and "could not parse the JSON body" in json.loads(text)["error"]["message"]


def test_health_answers_ok_while_the_model_serves(openai_server: OpenAIServer) -> None:
    with urllib.request.urlopen(openai_server.url.removesuffix("/v1") + "/health", timeout=10) as response:
        assert response.status == 200
        assert json.loads(response.read()) == {"status": "ok", "triton": "ready", "models": {MODEL: "ready"}}


def test_a_raw_stream_ends_with_done(openai_server: OpenAIServer) -> None:
    status, kind, text = post(openai_server.url, COMPLETIONS, {"model": MODEL, "prompt": PROMPTS[0],
                                                               "max_tokens": 4, "stream": True})
    assert status == 200 and kind.startswith("text/event-stream")
    data = events(text)
    assert data[-1] == "[DONE]" and json.loads(data[-2])["choices"][0]["finish_reason"] == "length"


# --- a client that hangs up mid-stream -------------------------------------------------------------


def requests_by_reason(server: TritonServer) -> dict[str, float]:
    return {r: server.metric(REQUESTS_TOTAL, model=MODEL, finish_reason=r) for r in ("cancelled", "length", "stop")}


def wait_until(condition: Callable[[], bool], timeout: float = METRICS_WAIT_S) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def settled_counts(server: TritonServer) -> dict[str, float]:
    """The finish-reason counts once every request so far shows (metrics are pushed once a second)."""
    last = requests_by_reason(server)
    deadline = time.monotonic() + METRICS_WAIT_S
    while time.monotonic() < deadline:
        time.sleep(PUSH_INTERVAL_S)
        now = requests_by_reason(server)
        if now == last and server.metric(RUNNING, model=MODEL) == 0:
            return now
        last = now
    raise AssertionError(f"the generation metrics did not settle within {METRICS_WAIT_S} s: {last}")


@dataclass(frozen=True)
class Long:
    """The greedy request (max_tokens filling the context) of some candidates that runs longest."""

    body: dict
    completion_tokens: int


def longest(server: TritonServer, candidates: list[tuple[str, dict, list[str]]]) -> Long:
    context = json.loads(_generation_json().read_text())["max_context"]
    runs = []
    for prompt, body, stop in candidates:
        max_tokens = context - raw_generate(server, prompt, max_tokens=1)["prompt_tokens"]
        answer = raw_generate(server, prompt, max_tokens=max_tokens, stop=stop, **GREEDY)
        runs.append(Long({**body, "max_tokens": max_tokens, "temperature": 0, "stream": True},
                         answer["completion_tokens"]))
    best = max(runs, key=lambda run: run.completion_tokens)
    assert best.completion_tokens >= MIN_LONG_TOKENS, (
        f"no request generates {MIN_LONG_TOKENS} tokens ({runs}): too short to hang up on"
    )
    return best


@contextlib.contextmanager
def busy(server: TritonServer) -> Iterator[None]:
    """Keeps BALLAST sampled requests running in the engine while the block runs; waits for them
    (they end by themselves, never "cancelled")."""
    context = json.loads(_generation_json().read_text())["max_context"]
    with ThreadPoolExecutor(BALLAST) as pool:
        futures = [
            pool.submit(raw_generate, server, PROMPTS[i % len(PROMPTS)], temperature=1.0, seed=2000 + i,
                        max_tokens=context - len(PROMPTS[i % len(PROMPTS)].encode()) - 1)
            for i in range(BALLAST)
        ]
        time.sleep(BALLAST_START_S)
        try:
            yield
        finally:
            for future in futures:
                future.result()


def _generation_json() -> Path:
    folder = paths.model_repository() / "tinylm"
    versions = sorted((p for p in folder.glob("*") if (p / "generation.json").is_file()), key=lambda p: p.name)
    if not versions:
        pytest.fail(f"tinylm is not built in {folder}: run `make build-engines`", pytrace=False)
    return versions[-1] / "generation.json"


def hang_up_after_the_first_event(base_url: str, path: str, body: dict) -> bytes:
    """POSTs a streamed request on a raw socket, reads up to its first event, closes the socket."""
    host, port = re.match(r"http://([^:/]+):(\d+)", base_url).groups()  # type: ignore[union-attr]
    data = json.dumps(body).encode()
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(
            f"POST /v1{path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n\r\n".encode() + data
        )
        received = b""
        while b"data: " not in received:
            chunk = sock.recv(4096)
            assert chunk, f"the server closed before the first event: {received!r}"
            received += chunk
    return received


@pytest.mark.parametrize("path", [COMPLETIONS, CHAT])
def test_a_client_hanging_up_mid_stream_cancels_its_request(
    server: TritonServer, openai_server: OpenAIServer, path: str
) -> None:
    if path == COMPLETIONS:
        long = longest(server, [(p, {"model": MODEL, "prompt": p}, []) for p in PROMPTS])
    else:
        long = longest(server, [
            (chat.render(m), {"model": MODEL, "messages": m}, [chat.IMPLICIT_STOP]) for m in CONVERSATIONS
        ])
    before = settled_counts(server)
    with busy(server):
        received = hang_up_after_the_first_event(openai_server.url, path, long.body)
    assert received.startswith(b"HTTP/1.1 200")
    assert wait_until(lambda: requests_by_reason(server)["cancelled"] >= before["cancelled"] + 1), (
        "the request of the client that hung up was not cancelled"
    )
    assert settled_counts(server)["cancelled"] == before["cancelled"] + 1


# --- kiln serve -----------------------------------------------------------------------------------


class Serve:
    """`kiln serve` on the built repository (only tinylm_generate loaded), in its own session."""

    def __init__(self, *flags: str) -> None:
        kiln = Path(sys.executable).parent / "kiln"
        command = [str(kiln)] if kiln.is_file() else [sys.executable, "-m", "kiln.cli"]
        self.process = subprocess.Popen(
            [*command, "serve", "--repository", str(paths.model_repository()), "--free-ports", "--quiet",
             "--model-control-mode", "explicit", "--load-model", MODEL, *flags],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def ready_block(self) -> str:
        block = []
        deadline = time.monotonic() + SERVE_TIMEOUT_S
        while time.monotonic() < deadline:
            line = self.lines.get(timeout=max(0.1, deadline - time.monotonic()))
            if line is None:
                pytest.fail(f"kiln serve exited: {self.process.stderr.read() if self.process.stderr else ''}")
            block.append(line)
            if "press Ctrl-C to stop" in line:
                return "\n".join(block)
        pytest.fail(f"kiln serve was not ready in {SERVE_TIMEOUT_S} s")

    def stop(self) -> int:
        os.killpg(self.process.pid, signal.SIGINT)
        return self.process.wait(timeout=60)

    def kill(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


def test_kiln_serve_starts_the_openai_endpoints_beside_triton(server: TritonServer) -> None:
    run = Serve()
    try:
        block = run.ready_block()
        found = re.search(r"^  OpenAI +(http://\S+/v1) \(([^)]*)\)$", block, re.M)
        assert found, block
        base_url, models = found.groups()
        assert models == MODEL
        answer = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0).chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3,
        )
        assert answer.usage.completion_tokens <= 3
        assert run.stop() == 0
        with pytest.raises(OSError):  # stopped with Triton
            urllib.request.urlopen(base_url + "/models", timeout=5)
    finally:
        run.kill()


def test_kiln_serve_no_openai_leaves_them_off(server: TritonServer) -> None:
    run = Serve("--no-openai")
    try:
        block = run.ready_block()
        assert "OpenAI" not in block and re.search(rf"^  models .*{MODEL} \(READY\)", block, re.M), block
        assert run.stop() == 0
    finally:
        run.kill()
