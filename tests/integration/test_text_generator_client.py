"""`TextGenerator` / `AsyncTextGenerator` against the served `tinylm_generate`, over HTTP and gRPC.

The expected texts never come from the SDK: they are what Triton's own HTTP `generate` endpoint
answers to a plain POST (urllib). Greedy text must be the same through every method, transport and
side (sync, asyncio); a stream's deltas joined must be the server's non-streamed text; the same
seed must give the same sampled text; stop strings and max_tokens end the text where they must;
every bad field gets an `InvalidInputError` naming it; and closing a stream early (a `break`,
`close()` / `aclose()`, the end of a `with` block) must cancel the request on the server, which
`kiln_generate_requests_total{finish_reason="cancelled"}` on /metrics shows (pushed once a second).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from kiln import tensors
from kiln.clients import (
    AsyncTextGenerator,
    Client,
    DeadlineExceededError,
    Generation,
    GenerationDelta,
    InvalidInputError,
    ModelNotFoundError,
    TextGenerator,
)
from kiln.server import TritonServer

MODEL = tensors.TEXT_GENERATOR
PROTOCOLS = ("http", "grpc")
PROMPTS = (
    "The return value of",
    "A class definition",
    "If the",
    "Exceptions are raised when an error is detected during execution of",
)
GREEDY = {"temperature": 0.0}
MIN_LONG_TOKENS = 64
"""The request cancelled in flight must run at least this long (greedy, alone)."""
BALLAST = 15
"""Sampled requests kept running beside a request that is to be cancelled in flight (`busy`): a
decode step of 16 sequences takes several times one of a single sequence (a tinylm-sized model:
240 tokens in 280 ms instead of 50 ms alone), so the request still runs when its cancellation
arrives; the engine notices one within about 20 ms (alone, a request of 80 tokens, 21 ms, was
cancelled after its first delta 5 times out of 5; one of 40 tokens, 13 ms, 3 times)."""
BALLAST_START_S = 0.05
TIMEOUT_SHARE = 3
"""The timeout test's timeout: this share of the time the request takes beside the ballast."""
METRICS_WAIT_S = 10.0
"""kiln_generate pushes its metrics once a second; a count must show within this."""
PUSH_INTERVAL_S = 1.2
"""A little more than kiln_generate's metrics push interval (1 s)."""
REQUESTS_TOTAL = "kiln_generate_requests_total"
RUNNING = "kiln_generate_requests_running"


def urls(server: TritonServer) -> dict[str, str]:
    return {"http": f"http://{server.http_url}", "grpc": f"grpc://{server.grpc_url}"}


def raw_generate(server: TritonServer, prompt: str, **fields: object) -> dict:
    """The reference: Triton's HTTP generate endpoint, posted to with urllib (no SDK)."""
    request = urllib.request.Request(
        f"http://{server.http_url}/v2/models/{MODEL}/generate",
        data=json.dumps({"text_input": prompt, **fields}).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as error:
        raise AssertionError(f"the reference request failed: {error.code} {error.read()!r}") from None


@dataclass(frozen=True)
class Long:
    """The greedy request of PROMPTS (max_tokens filling the model's context) that runs longest:
    what a stream closed after its first delta would still be generating."""

    prompt: str
    max_tokens: int
    completion_tokens: int
    context: int


@pytest.fixture(scope="module")
def long_request(server: TritonServer, tinylm_folder: Path) -> Long:
    context = json.loads((tinylm_folder / "generation.json").read_text())["max_context"]
    runs = []
    for prompt in PROMPTS:
        max_tokens = context - raw_generate(server, prompt, max_tokens=1)["prompt_tokens"]
        answer = raw_generate(server, prompt, max_tokens=max_tokens, **GREEDY)
        runs.append(Long(prompt, max_tokens, answer["completion_tokens"], context))
    longest = max(runs, key=lambda run: run.completion_tokens)
    assert longest.completion_tokens >= MIN_LONG_TOKENS, (
        f"no greedy request generates {MIN_LONG_TOKENS} tokens ({runs}): too short to cancel in flight"
    )
    return longest


def start_ballast(server: TritonServer, long: Long, pool: ThreadPoolExecutor) -> list[Future]:
    """BALLAST sampled requests on `pool` (they finish by themselves: "length" or "stop", never
    "cancelled")."""
    return [
        pool.submit(
            raw_generate, server, PROMPTS[i % len(PROMPTS)], temperature=1.0, seed=1000 + i,
            max_tokens=long.context - len(PROMPTS[i % len(PROMPTS)].encode()) - 1,
        )
        for i in range(BALLAST)
    ]


@contextlib.contextmanager
def busy(server: TritonServer, long: Long) -> Iterator[None]:
    """Keeps BALLAST requests running in the engine while the block runs; waits for them after."""
    with ThreadPoolExecutor(BALLAST) as pool:
        futures = start_ballast(server, long, pool)
        time.sleep(BALLAST_START_S)  # admitted by now
        try:
            yield
        finally:
            for future in futures:
                future.result()


@contextlib.asynccontextmanager
async def abusy(server: TritonServer, long: Long) -> AsyncIterator[None]:
    """`busy` for asyncio: the event loop is never blocked while the ballast runs."""
    with ThreadPoolExecutor(BALLAST) as pool:
        futures = start_ballast(server, long, pool)
        await asyncio.sleep(BALLAST_START_S)
        try:
            yield
        finally:
            await asyncio.to_thread(lambda: [future.result() for future in futures])


def requests_by_reason(server: TritonServer) -> dict[str, float]:
    return {
        reason: server.metric(REQUESTS_TOTAL, model=MODEL, finish_reason=reason)
        for reason in ("cancelled", "length", "stop")
    }


def settled_counts(server: TritonServer) -> dict[str, float]:
    """The finish-reason counts once every request sent so far is counted: kiln_generate pushes
    its metrics once a second, so a request that just finished may not show yet. Read until the
    counts hold still across a push with nothing running."""
    last = requests_by_reason(server)
    deadline = time.monotonic() + METRICS_WAIT_S
    while time.monotonic() < deadline:
        time.sleep(PUSH_INTERVAL_S)
        now = requests_by_reason(server)
        if now == last and server.metric(RUNNING, model=MODEL) == 0:
            return now
        last = now
    raise AssertionError(f"the generation metrics did not settle within {METRICS_WAIT_S} s: {last}")


def wait_until(condition: Callable[[], bool], timeout: float = METRICS_WAIT_S) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def check_generation(result: Generation, reference: dict) -> None:
    assert isinstance(result, Generation)
    assert (result.text, result.finish_reason, result.prompt_tokens, result.completion_tokens) == (
        reference["text_output"], reference["finish_reason"], reference["prompt_tokens"],
        reference["completion_tokens"],
    )
    assert result.latency_s > 0


def check_stream(deltas: list[GenerationDelta], reference: dict) -> None:
    assert len(deltas) > 1, "a streamed request came back in one piece"
    assert "".join(d.text for d in deltas) == reference["text_output"]
    assert [d.finish_reason for d in deltas] == [None] * (len(deltas) - 1) + [reference["finish_reason"]]
    last = deltas[-1]
    assert last.final and (last.prompt_tokens, last.completion_tokens) == (
        reference["prompt_tokens"], reference["completion_tokens"],
    )
    counts = [d.completion_tokens for d in deltas]
    assert counts == sorted(counts) and 0 < deltas[0].elapsed_s <= last.elapsed_s


# --- the same text everywhere ---------------------------------------------------------------------


def test_greedy_text_is_the_same_through_every_method_transport_and_side(server: TritonServer) -> None:
    prompt = PROMPTS[0]
    reference = raw_generate(server, prompt, max_tokens=24, **GREEDY)
    for url in urls(server).values():
        with TextGenerator(url) as generator:
            check_generation(generator.generate(prompt, max_tokens=24, temperature=0, request_id="g-1"), reference)
            check_stream(list(generator.stream(prompt, max_tokens=24, temperature=0)), reference)

        async def run(url: str = url) -> tuple[Generation, list[GenerationDelta]]:
            async with AsyncTextGenerator(url) as generator:
                whole = await generator.generate(prompt, max_tokens=24, temperature=0)
                deltas = [d async for d in generator.stream(prompt, max_tokens=24, temperature=0)]
                return whole, deltas

        whole, deltas = asyncio.run(run())
        check_generation(whole, reference)
        check_stream(deltas, reference)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_streams_deltas_joined_are_the_non_streamed_text(server: TritonServer, protocol: str) -> None:
    with TextGenerator(urls(server)[protocol]) as generator:
        for i, prompt in enumerate(PROMPTS):
            fields = {"max_tokens": 16 + 8 * i, "temperature": 0.7, "top_k": 40, "seed": 100 + i}
            whole = generator.generate(prompt, **fields)
            deltas = list(generator.stream(prompt, **fields))
            assert "".join(d.text for d in deltas) == whole.text, prompt
            assert (deltas[-1].finish_reason, deltas[-1].completion_tokens) == (
                whole.finish_reason, whole.completion_tokens,
            )
            assert whole.request_id is None


def test_the_same_seed_gives_the_same_sampled_text(server: TritonServer) -> None:
    prompt, fields = PROMPTS[1], {"max_tokens": 32, "temperature": 1.0, "top_p": 0.9, "seed": 11}
    reference = raw_generate(server, prompt, **fields)
    texts = set()
    for url in urls(server).values():
        with TextGenerator(url) as generator:
            texts |= {generator.generate(prompt, **fields).text for _ in range(2)}
            texts.add("".join(d.text for d in generator.stream(prompt, **fields)))
    assert texts == {reference["text_output"]}
    other = raw_generate(server, prompt, **{**fields, "seed": 12})["text_output"]
    assert other != reference["text_output"], "seeds 11 and 12 gave the same 32 sampled tokens"


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_stop_string_ends_the_text_before_it(server: TritonServer, protocol: str) -> None:
    whole = raw_generate(server, PROMPTS[2], max_tokens=48, **GREEDY)["text_output"]
    middle = whole[len(whole) // 3 :]
    start = next((i for i in range(len(middle) - 2) if "\ufffd" not in middle[i : i + 3]), None)
    assert start is not None, f"no stop string to cut {whole!r} with"
    stop = middle[start : start + 3]
    expected = whole[: whole.find(stop)]
    with TextGenerator(urls(server)[protocol]) as generator:
        result = generator.generate(PROMPTS[2], max_tokens=48, temperature=0, stop=[stop, "\x00never"])
        deltas = list(generator.stream(PROMPTS[2], max_tokens=48, temperature=0, stop=stop))
    assert (result.text, result.finish_reason) == (expected, "stop")
    assert ("".join(d.text for d in deltas), deltas[-1].finish_reason) == (expected, "stop")


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_max_tokens_ends_the_text_with_finish_reason_length(server: TritonServer, protocol: str) -> None:
    prompt = PROMPTS[3]
    unbounded = raw_generate(server, prompt, max_tokens=32, **GREEDY)
    assert unbounded["completion_tokens"] > 5, unbounded
    with TextGenerator(urls(server)[protocol]) as generator:
        result = generator.generate(prompt, max_tokens=5, temperature=0)
        deltas = list(generator.stream(prompt, max_tokens=5, temperature=0))
    assert (result.finish_reason, result.completion_tokens) == ("length", 5)
    assert (deltas[-1].finish_reason, deltas[-1].completion_tokens) == ("length", 5)
    assert unbounded["text_output"].startswith(result.text.rstrip("\ufffd"))  # a cut character is U+FFFD


# --- errors ---------------------------------------------------------------------------------------

BAD_FIELDS = [
    # (the call's arguments, the field named, words of the message), refused by the model
    ({"prompt": ""}, "text_input", "text_input is empty"),
    ({"prompt": "x" * 20_000}, "text_input", "more than max_prompt_bytes"),
    ({"max_tokens": 100_000}, "max_tokens", "more than the model's context"),
    ({"max_tokens": 0}, "max_tokens", "max_tokens must be at least 1"),
    ({"temperature": 2.5}, "temperature", "temperature must be between 0 and 2"),
    ({"top_p": 0.0}, "top_p", "top_p must be in (0, 1]"),
    ({"top_k": -1}, "top_k", "top_k must be 0 (off) or a positive number"),
    ({"seed": -1}, "seed", "seed must be between 0 and 2**63 - 1"),
    ({"stop": ["ok", ""]}, "stop", "stop[1] is empty"),
    ({"stop": [str(i) for i in range(9)]}, "stop", "at most 8 stop strings"),
    # ... and refused by the SDK before sending, for a type no tensor could carry
    ({"prompt": b"\xff\xfe bad"}, "text_input", "text_input is not valid UTF-8"),
    ({"max_tokens": "16"}, "max_tokens", "max_tokens must be an integer"),
    ({"temperature": float("nan")}, "temperature", "temperature must be a finite number"),
]


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize(("kwargs", "field", "words"), BAD_FIELDS, ids=[f"{f}-{w[:24]}" for _, f, w in BAD_FIELDS])
def test_a_bad_field_raises_invalid_input_naming_it(
    server: TritonServer, protocol: str, kwargs: dict, field: str, words: str
) -> None:
    kwargs = dict(kwargs)
    prompt = kwargs.pop("prompt", "hello")
    with TextGenerator(urls(server)[protocol]) as generator:
        with pytest.raises(InvalidInputError) as whole:
            generator.generate(prompt, **kwargs)
        with pytest.raises(InvalidInputError) as streamed:
            list(generator.stream(prompt, **kwargs))
    for error in (whole.value, streamed.value):
        assert error.input_name == field, error
        assert words in str(error)


def test_asyncio_raises_the_same_errors(server: TritonServer) -> None:
    async def run(url: str) -> list[InvalidInputError]:
        async with AsyncTextGenerator(url) as generator:
            errors = []
            for call in (generator.generate("hi", temperature=3.0), generator.generate("", max_tokens=4)):
                try:
                    await call
                except InvalidInputError as error:
                    errors.append(error)
            try:
                async for _ in generator.stream("hi", top_p=1.5):
                    pass
            except InvalidInputError as error:
                errors.append(error)
            return errors

    for url in urls(server).values():
        assert [e.input_name for e in asyncio.run(run(url))] == ["temperature", "text_input", "top_p"]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_an_unknown_model_raises_model_not_found(server: TritonServer, protocol: str) -> None:
    with TextGenerator(urls(server)[protocol], model="no_such_generator") as generator:
        with pytest.raises(ModelNotFoundError, match="no_such_generator"):
            generator.generate("hello")
        with pytest.raises(ModelNotFoundError, match="no_such_generator"):
            list(generator.stream("hello"))


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_timeout_raises_deadline_exceeded(server: TritonServer, protocol: str, long_request: Long) -> None:
    fields = {"max_tokens": long_request.max_tokens, "temperature": 0}
    with TextGenerator(urls(server)[protocol], retry=None) as generator:
        with busy(server, long_request):  # how long the request takes beside the ballast
            start = time.perf_counter()
            generator.generate(long_request.prompt, **fields)
            seconds = time.perf_counter() - start
        timeout = seconds / TIMEOUT_SHARE  # reaches the server for sure, and ends before the request
        before = settled_counts(server)
        with busy(server, long_request):
            with pytest.raises(DeadlineExceededError, match="no answer within the timeout"):
                generator.generate(long_request.prompt, timeout=timeout, **fields)
            with pytest.raises(DeadlineExceededError, match="no answer within the timeout"):
                for _ in generator.stream(long_request.prompt, timeout=timeout, **fields):
                    pass
    # The server ends both: a gRPC deadline cancels; over HTTP the stream's request is cancelled
    # when its connection closes, the non-streamed one (Triton 2.51) runs to its end.
    cancelled = before["cancelled"] + (2 if protocol == "grpc" else 1)
    assert wait_until(lambda: requests_by_reason(server)["cancelled"] >= cancelled), (timeout, seconds)
    assert settled_counts(server)["cancelled"] == cancelled


def test_a_borrowed_client_is_left_open(server: TritonServer) -> None:
    with Client(urls(server)["grpc"]) as client:
        with TextGenerator(client) as generator:
            assert generator.generate("hello", max_tokens=2).completion_tokens == 2
        assert client.is_model_ready(MODEL)
    with pytest.raises(TypeError, match="apply only when a URL is given"):
        TextGenerator(client, timeout=3)


# --- cancellation ---------------------------------------------------------------------------------


def read_one_then_leave(generator: TextGenerator, prompt: str, max_tokens: int, how: str) -> None:
    stream = generator.stream(prompt, max_tokens=max_tokens, temperature=0)
    if how == "break":
        for _ in stream:
            break
        del stream  # dropped unfinished, as after a `for ... break` over generator.stream(...)
    elif how == "close":
        next(stream)
        stream.close()
    elif how == "with":
        with stream:
            next(stream)
    else:
        raise AssertionError(how)


async def aread_one_then_leave(generator: AsyncTextGenerator, prompt: str, max_tokens: int, how: str) -> None:
    stream = generator.stream(prompt, max_tokens=max_tokens, temperature=0)
    if how == "break":
        async for _ in stream:
            break
        del stream
    elif how == "aclose":
        await stream.__anext__()
        await stream.aclose()
    elif how == "async with":
        async with stream:
            await stream.__anext__()
    elif how == "task cancelled":  # cancelled while deltas keep arriving (asyncio.wait_for could lose that)
        first = asyncio.Event()

        async def consume() -> None:
            async for _ in stream:
                first.set()

        task = asyncio.ensure_future(consume())
        await first.wait()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        assert task.cancelled()
    else:
        raise AssertionError(how)


def wait_for_cancellations(server: TritonServer, before: dict[str, float], count: int, what: str) -> None:
    """Waits until exactly `count` requests more than `before` finished cancelled."""
    cancelled = before["cancelled"] + count
    assert wait_until(lambda: requests_by_reason(server)["cancelled"] >= cancelled), (
        f"{what}: the stream left early was not cancelled on the server"
    )
    assert wait_until(lambda: server.metric(RUNNING, model=MODEL) == 0), f"{what}: a sequence still runs"
    assert requests_by_reason(server)["cancelled"] == cancelled, what


SYNC_WAYS = (("grpc", "break"), ("http", "break"), ("grpc", "with"), ("http", "close"))
ASYNC_WAYS = (
    ("grpc", "aclose"), ("http", "aclose"), ("grpc", "async with"), ("http", "break"),
    ("grpc", "task cancelled"), ("http", "task cancelled"),
)


def test_leaving_a_stream_early_cancels_the_request(server: TritonServer, long_request: Long) -> None:
    before = settled_counts(server)
    for done, (protocol, how) in enumerate(SYNC_WAYS, start=1):
        with TextGenerator(urls(server)[protocol]) as generator:
            with busy(server, long_request):
                read_one_then_leave(generator, long_request.prompt, long_request.max_tokens, how)
            wait_for_cancellations(server, before, done, f"{protocol}, {how}")
    with TextGenerator(urls(server)["grpc"]) as generator:
        assert generator.generate("still", max_tokens=3).completion_tokens == 3  # and it goes on


def test_leaving_an_async_stream_early_cancels_the_request(server: TritonServer, long_request: Long) -> None:
    before = settled_counts(server)

    async def run() -> None:
        for done, (protocol, how) in enumerate(ASYNC_WAYS, start=1):
            async with AsyncTextGenerator(urls(server)[protocol]) as generator:
                async with abusy(server, long_request):
                    await aread_one_then_leave(generator, long_request.prompt, long_request.max_tokens, how)
                await asyncio.to_thread(wait_for_cancellations, server, before, done, f"{protocol}, {how}")
        async with AsyncTextGenerator(urls(server)["http"]) as generator:
            assert (await generator.generate("still", max_tokens=3)).completion_tokens == 3

    asyncio.run(run())
