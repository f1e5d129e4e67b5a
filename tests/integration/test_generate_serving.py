"""tinylm_generate (kiln_generate, decoupled) on a real tritonserver: gRPC streaming, Triton's
HTTP generate and generate_stream, bad input, cancellation, a vanished client, metrics.

The reference is the same engine in process on the same published decoder: greedy text served
over any endpoint, alone or among other streams, must be exactly the text generated in process.
"""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from kiln import tensors
from kiln.server import TritonServer
from kiln.serving import generate as g

MODEL = tensors.TEXT_GENERATOR
PROMPTS = (
    "The return value of",
    "A class definition",
    "If the",
    "Exceptions are raised when an error is detected during execution of",
)
METRICS_WAIT_S = 10.0
"""The backend pushes its metrics once a second; a count must show within this."""


@pytest.fixture(scope="module")
def loaded(tinylm_folder: Path) -> g.LoadedModel:
    """The served decoder, loaded in process with the served model's parameters."""
    return g.LoadedModel.from_folder(tinylm_folder, g.default_params())


@pytest.fixture(scope="module")
def reference(loaded: g.LoadedModel) -> Callable[..., g.Event]:
    """Generates in process with the served model's engine and parameters (greedy)."""

    def generate(prompt: str, **fields: object) -> g.Event:
        events: list[g.Event] = []
        engine = g.Engine(loaded.session, loaded.tokenizer, loaded.info, g.default_params(), events.extend)
        fields.setdefault("temperature", 0.0)
        engine.submit(
            g.GenerationRequest.create(loaded.tokenizer, loaded.info, g.default_params(), prompt, **fields),
            "ref",
        )
        while not engine.idle:
            engine.step()
        return events[-1]

    return generate


def grpc_inputs(prompt: bytes | str, **fields: object) -> list[grpcclient.InferInput]:
    types = {
        "max_tokens": ("INT32", np.int32), "temperature": ("FP32", np.float32),
        "top_k": ("INT32", np.int32), "top_p": ("FP32", np.float32), "seed": ("INT64", np.int64),
        "stream": ("BOOL", np.bool_),
    }
    data = prompt.encode() if isinstance(prompt, str) else prompt
    text = grpcclient.InferInput(tensors.TEXT_INPUT, [1], "BYTES")
    text.set_data_from_numpy(np.array([data], dtype=np.object_))
    inputs = [text]
    for name, value in fields.items():
        if name == "stop":
            tensor = grpcclient.InferInput(tensors.STOP, [len(value)], "BYTES")
            tensor.set_data_from_numpy(np.array([s.encode() for s in value], dtype=np.object_))
        else:
            dtype, np_type = types[name]
            tensor = grpcclient.InferInput(name, [1], dtype)
            tensor.set_data_from_numpy(np.array([value], np_type))
        inputs.append(tensor)
    return inputs


class Stream:
    """One gRPC bidirectional stream: sends requests, collects each request's responses."""

    def __init__(self, server: TritonServer) -> None:
        self.client = grpcclient.InferenceServerClient(server.grpc_url)
        self.responses: queue.Queue = queue.Queue()
        self.client.start_stream(callback=lambda result, error: self.responses.put((result, error)))

    def send(self, request_id: str, prompt: bytes | str, **fields: object) -> None:
        self.client.async_stream_infer(MODEL, grpc_inputs(prompt, **fields), request_id=request_id)

    def collect(self, count: int, timeout: float = 60.0) -> dict[str, dict]:
        """Waits until `count` requests have ended; their deltas, finish reasons, errors."""
        results: dict[str, dict] = {}
        deadline = time.monotonic() + timeout
        while sum(r["done"] for r in results.values()) < count:
            result, error = self.responses.get(timeout=max(0.1, deadline - time.monotonic()))
            if error is not None:  # a gRPC stream's error names no request: keyed by arrival
                results[f"error-{len(results)}"] = {"deltas": [], "error": error, "done": True}
                continue
            response = result.get_response()
            entry = results.setdefault(response.id, {"deltas": [], "done": False})
            entry["deltas"].append(result.as_numpy(tensors.TEXT_OUTPUT)[0].decode())
            reason = result.as_numpy(tensors.FINISH_REASON)[0].decode()
            if reason:
                entry.update(
                    finish_reason=reason,
                    completion_tokens=int(result.as_numpy(tensors.COMPLETION_TOKENS)[0]),
                    prompt_tokens=int(result.as_numpy(tensors.PROMPT_TOKENS)[0]),
                    done=True,
                )
        return results

    def close(self, cancel: bool = False) -> None:
        self.client.stop_stream(cancel_requests=cancel)
        self.client.close()


def post(server: TritonServer, path: str, body: object, raw: bytes | None = None) -> tuple[int, str]:
    request = urllib.request.Request(
        f"http://{server.http_url}{path}",
        data=raw if raw is not None else json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def sse_events(body: str) -> list[dict]:
    return [json.loads(line[len("data: "):]) for line in body.splitlines() if line.startswith("data: ")]


def metric(server: TritonServer, name: str, **labels: str) -> float:
    return server.metric(name, model=MODEL, **labels)


def settled(server: TritonServer, name: str, **labels: str) -> float:
    """The metric once the earlier tests' counts have been pushed: the same value across more
    than one push interval (the backend pushes once a second)."""
    value = metric(server, name, **labels)
    deadline = time.monotonic() + METRICS_WAIT_S
    while time.monotonic() < deadline:
        time.sleep(1.5)
        again = metric(server, name, **labels)
        if again == value:
            return value
        value = again
    return value


def wait_for_metric(server: TritonServer, name: str, at_least: float, **labels: str) -> float:
    deadline = time.monotonic() + METRICS_WAIT_S
    value = metric(server, name, **labels)
    while value < at_least and time.monotonic() < deadline:
        time.sleep(0.2)
        value = metric(server, name, **labels)
    return value


def test_grpc_streams_give_the_in_process_text_side_by_side(server: TritonServer, reference) -> None:
    stream = Stream(server)
    try:
        for i, prompt in enumerate(PROMPTS):
            stream.send(str(i), prompt, max_tokens=24 + 4 * i, temperature=0.0, stream=True)
        results = stream.collect(len(PROMPTS))
    finally:
        stream.close()
    for i, prompt in enumerate(PROMPTS):
        want = reference(prompt, max_tokens=24 + 4 * i)
        got = results[str(i)]
        assert "error" not in got, got
        assert "".join(got["deltas"]) == want.text
        assert (got["finish_reason"], got["completion_tokens"], got["prompt_tokens"]) == (
            want.finish_reason, want.completion_tokens, want.prompt_tokens,
        )
        assert len(got["deltas"]) > 1, "a streamed request came back in one piece"


def test_http_generate_and_generate_stream(server: TritonServer, reference) -> None:
    want = reference(PROMPTS[0], max_tokens=16)
    body = {"text_input": PROMPTS[0], "max_tokens": 16, "temperature": 0.0}
    status, text = post(server, f"/v2/models/{MODEL}/generate", body)
    assert status == 200, text
    whole = json.loads(text)
    assert (whole["text_output"], whole["finish_reason"], whole["completion_tokens"]) == (
        want.text, want.finish_reason, want.completion_tokens,
    )
    status, text = post(server, f"/v2/models/{MODEL}/generate_stream", {**body, "stream": True})
    assert status == 200, text
    events = sse_events(text)
    assert len(events) > 1
    assert "".join(e["text_output"] for e in events) == want.text
    assert [e["finish_reason"] for e in events] == [""] * (len(events) - 1) + [want.finish_reason]


def test_the_same_seed_gives_the_same_sampled_text(server: TritonServer) -> None:
    body = {"text_input": PROMPTS[1], "max_tokens": 24, "temperature": 1.0, "top_p": 0.9, "seed": 11}
    texts = {json.loads(post(server, f"/v2/models/{MODEL}/generate", body)[1])["text_output"] for _ in range(3)}
    assert len(texts) == 1


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"text_input": ""}, "text_input is empty"),
        ({"text_input": "x" * 20_000}, "more than max_prompt_bytes"),
        ({"text_input": "hello", "max_tokens": 100_000}, "more than the model's context"),
        ({"text_input": "hello", "temperature": -1.0}, "temperature must be between 0 and 2"),
        ({"text_input": "hello", "top_p": 1.5}, r"top_p must be in (0, 1]"),
        ({"text_input": "hello", "max_token": 5}, "unknown field(s) 'max_token'"),
    ],
)
def test_bad_input_gets_a_400_naming_it(server: TritonServer, body: dict, message: str) -> None:
    status, text = post(server, f"/v2/models/{MODEL}/generate", body)
    assert status == 400, text
    assert message in json.loads(text)["error"]


def test_bad_requests_fail_alone_while_others_stream(server: TritonServer, reference) -> None:
    want = reference(PROMPTS[3], max_tokens=40)
    stream = Stream(server)
    try:
        stream.send("good", PROMPTS[3], max_tokens=40, temperature=0.0, stream=True)
        stream.send("utf8", b"\xff\xfe bad", stream=True)
        stream.send("temperature", "hello", temperature=-2.0, stream=True)
        with ThreadPoolExecutor(4) as pool:  # HTTP ones at the same time
            http = list(pool.map(
                lambda body: post(server, f"/v2/models/{MODEL}/generate", body),
                [{"text_input": ""}, {"text_input": "hi", "bogus": 1}, {"text_input": PROMPTS[0], "max_tokens": 8}],
            ))
        results = stream.collect(3)
    finally:
        stream.close()
    assert "".join(results["good"]["deltas"]) == want.text
    errors = sorted(str(r["error"]) for key, r in results.items() if key != "good")
    assert any("not valid UTF-8" in e for e in errors), errors
    assert any("temperature must be between 0 and 2" in e for e in errors), errors
    assert [status for status, _ in http] == [400, 400, 200]


def test_cancelling_a_stream_frees_its_sequence(server: TritonServer, reference, loaded: g.LoadedModel) -> None:
    cancelled_before = settled(server, "kiln_generate_requests_total", finish_reason="cancelled")
    want = reference(PROMPTS[1], max_tokens=24)
    prompt = g.GenerationRequest.create(loaded.tokenizer, loaded.info, g.default_params(), PROMPTS[0])
    longest = loaded.info.max_context - len(prompt.prompt_ids)  # all the context: as long as it can run
    doomed = Stream(server)
    kept = Stream(server)  # opened first: the doomed stream runs only tens of ms, the cancel must be sooner
    doomed.send("doomed", PROMPTS[0], max_tokens=longest, temperature=0.0, stream=True)
    doomed.responses.get(timeout=30)  # it runs
    try:
        kept.send("kept", PROMPTS[1], max_tokens=24, temperature=0.0, stream=True)
        doomed.close(cancel=True)
        results = kept.collect(1)
    finally:
        kept.close()
    assert "".join(results["kept"]["deltas"]) == want.text
    assert wait_for_metric(
        server, "kiln_generate_requests_total", cancelled_before + 1, finish_reason="cancelled"
    ) == cancelled_before + 1
    assert wait_until(lambda: metric(server, "kiln_generate_requests_running") == 0)
    assert metric(server, "kiln_generate_kv_cache_tokens_used") == 0


VANISHING_CLIENT = textwrap.dedent(
    """
    import os, sys, threading
    import numpy as np
    import tritonclient.grpc as grpcclient
    started = threading.Event()
    client = grpcclient.InferenceServerClient(sys.argv[1])
    client.start_stream(callback=lambda result, error: started.set())
    inputs = []
    for name, dtype, value in (("text_input", "BYTES", np.array([b"The return value of"], dtype=object)),
                               ("max_tokens", "INT32", np.array([200], np.int32)),
                               ("stream", "BOOL", np.array([True]))):
        tensor = grpcclient.InferInput(name, [1], dtype)
        tensor.set_data_from_numpy(value)
        inputs.append(tensor)
    client.async_stream_infer(sys.argv[2], inputs)
    started.wait(30)
    os._exit(0)  # gone mid-stream: no stop_stream, no goodbye
    """
)


def wait_until(condition: Callable[[], bool], timeout: float = METRICS_WAIT_S) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def test_a_client_that_vanishes_mid_stream_is_cancelled(server: TritonServer) -> None:
    before = {
        reason: settled(server, "kiln_generate_requests_total", finish_reason=reason)
        for reason in ("cancelled", "length", "stop")
    }
    subprocess.run([sys.executable, "-c", VANISHING_CLIENT, server.grpc_url, MODEL], check=True, timeout=60)
    assert wait_until(
        lambda: sum(metric(server, "kiln_generate_requests_total", finish_reason=r) for r in before)
        > sum(before.values())
    ), "the vanished client's request never finished"
    assert metric(server, "kiln_generate_requests_total", finish_reason="cancelled") == before["cancelled"] + 1
    assert wait_until(lambda: metric(server, "kiln_generate_requests_running") == 0)
    status, _ = post(server, f"/v2/models/{MODEL}/generate", {"text_input": "still", "max_tokens": 4})
    assert status == 200


def test_metrics_count_first_tokens_and_tokens(server: TritonServer) -> None:
    ttft = "kiln_generate_time_to_first_token_seconds_count"
    before_ttft, before_tokens = settled(server, ttft), settled(server, "kiln_generate_generation_tokens_total")
    for prompt in PROMPTS[:3]:
        status, text = post(server, f"/v2/models/{MODEL}/generate", {"text_input": prompt, "max_tokens": 8})
        assert status == 200, text
    assert wait_for_metric(server, ttft, before_ttft + 3) == before_ttft + 3
    assert wait_for_metric(server, "kiln_generate_generation_tokens_total", before_tokens + 3) >= before_tokens + 3
    assert metric(server, "kiln_generate_kv_cache_tokens_capacity") > 0
