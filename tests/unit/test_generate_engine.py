"""kiln_generate's engine in process, on the decoder the build published (no server).

The engine must give every sequence exactly the tokens it would get alone, whatever joins or
leaves the batch around it (continuous batching pads and masks caches of different lengths), and
exactly the tokens of decoding without a cache; the pool must bound memory and make requests
wait, never fail; a cancelled or failed sequence must leave the others untouched.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from kiln.serving import generate as g

PROMPTS = (
    "The return value of",
    "A class definition",
    "If the",
    "Exceptions are raised when an error is detected during execution of",
)
"""Prompts of different token lengths (so prefill pads them and decode caches differ)."""


@pytest.fixture(scope="module")
def loaded(tinylm_folder: Path) -> g.LoadedModel:
    return g.LoadedModel.from_folder(tinylm_folder, g.default_params())


class Recorder:
    """Collects each handle's events, as the Triton side would send them."""

    def __init__(self) -> None:
        self.events: dict[object, list[g.Event]] = {}

    def __call__(self, events: list[g.Event]) -> None:
        for event in events:
            self.events.setdefault(event.handle, []).append(event)

    def last(self, handle: object) -> g.Event:
        return self.events[handle][-1]

    def text(self, handle: object) -> str:
        return "".join(e.delta for e in self.events[handle])


def make_engine(
    loaded: g.LoadedModel, recorder: Recorder, session: object | None = None, **params: object
) -> g.Engine:
    return g.Engine(
        session or loaded.session, loaded.tokenizer, loaded.info, g.default_params(**params), recorder
    )


def request(loaded: g.LoadedModel, prompt: str, **fields: object) -> g.GenerationRequest:
    fields.setdefault("temperature", 0.0)
    return g.GenerationRequest.create(loaded.tokenizer, loaded.info, g.default_params(), prompt, **fields)


def drain(engine: g.Engine, limit: int = 10_000) -> None:
    for _ in range(limit):
        if engine.idle:
            return
        engine.step()
    raise AssertionError("the engine did not finish its sequences")


def alone(loaded: g.LoadedModel, prompt: str, **fields: object) -> g.Event:
    recorder = Recorder()
    engine = make_engine(loaded, recorder)
    engine.submit(request(loaded, prompt, **fields), "only")
    drain(engine)
    return recorder.last("only")


def greedy_without_cache(loaded: g.LoadedModel, prompt: str, tokens: int) -> list[int]:
    """Greedy decoding that recomputes the whole prefix for every token (no past)."""
    info = loaded.info
    ids = loaded.tokenizer.encode(prompt)
    out: list[int] = []
    empty = np.zeros((1, info.num_heads, 0, info.head_dim), np.float32)
    for _ in range(tokens):
        sequence = np.array([ids + out], np.int64)
        feeds = {
            "input_ids": sequence,
            "attention_mask": np.ones_like(sequence),
            "position_ids": np.arange(sequence.shape[1], dtype=np.int64)[None],
        }
        for layer in range(info.num_layers):
            feeds[f"past_key_values.{layer}.key"] = empty
            feeds[f"past_key_values.{layer}.value"] = empty
        (logits,) = loaded.session.run(["logits"], feeds)
        token = int(np.argmax(logits[0, -1]))
        out.append(token)
        if token == info.eos_token_id:
            break
    return out


def test_the_cache_gives_the_tokens_of_recomputing_the_prefix(loaded: g.LoadedModel) -> None:
    recorder = Recorder()
    engine = make_engine(loaded, recorder)
    for prompt in PROMPTS[:2]:
        engine.submit(request(loaded, prompt, max_tokens=24), prompt)
    drain(engine)
    for prompt in PROMPTS[:2]:
        expected = greedy_without_cache(loaded, prompt, 24)
        event = recorder.last(prompt)
        assert event.completion_tokens == len(expected)
        assert event.text == loaded.tokenizer.decode([t for t in expected if t != loaded.info.eos_token_id])


def test_continuous_batching_gives_each_sequence_its_tokens_alone(loaded: g.LoadedModel) -> None:
    expected = {p: alone(loaded, p, max_tokens=20 + 3 * i) for i, p in enumerate(PROMPTS)}
    recorder = Recorder()
    engine = make_engine(loaded, recorder)
    # Staggered: each joins a batch whose caches already differ in length.
    for i, prompt in enumerate(PROMPTS):
        engine.submit(request(loaded, prompt, max_tokens=20 + 3 * i), prompt)
        for _ in range(i + 1):
            engine.step()
    drain(engine)
    for prompt in PROMPTS:
        got, want = recorder.last(prompt), expected[prompt]
        assert (got.text, got.completion_tokens, got.finish_reason) == (
            want.text, want.completion_tokens, want.finish_reason,
        ), prompt
        assert recorder.text(prompt) == got.text  # the deltas add up to the text
    assert engine.stats.decode_batch_items > engine.stats.decode_batches  # they did share batches
    assert engine.pool.used_tokens == 0


def test_sequences_leaving_and_joining_keep_every_other_sequence_exact(loaded: g.LoadedModel) -> None:
    # The longest prompt leaves first; the batch keeps its cache (rows dropped, no regathering)
    # while the others go on, then a newcomer makes it regroup from the pool.
    plan = [(PROMPTS[3], 3), (PROMPTS[2], 40), (PROMPTS[0], 30), (PROMPTS[1], 12)]
    expected = {p: alone(loaded, p, max_tokens=n).text for p, n in plan}
    recorder = Recorder()
    engine = make_engine(loaded, recorder)
    for prompt, tokens in plan[:3]:
        engine.submit(request(loaded, prompt, max_tokens=tokens), prompt)
    for _ in range(8):
        engine.step()
    engine.submit(request(loaded, plan[3][0], max_tokens=plan[3][1]), plan[3][0])
    drain(engine)
    assert {p: recorder.last(p).text for p, _ in plan} == expected
    assert engine.stats.regroupings <= 3 < engine.stats.decode_batches


def test_the_same_seed_gives_the_same_text(loaded: g.LoadedModel) -> None:
    fields = {"max_tokens": 24, "temperature": 1.0, "top_k": 40, "top_p": 0.95}
    first = alone(loaded, PROMPTS[0], seed=7, **fields)
    # The same seed inside a batch with other sequences still repeats.
    recorder = Recorder()
    engine = make_engine(loaded, recorder)
    engine.submit(request(loaded, PROMPTS[1], seed=1, **fields), "other")
    engine.submit(request(loaded, PROMPTS[0], seed=7, **fields), "again")
    drain(engine)
    assert recorder.last("again").text == first.text
    texts = {alone(loaded, PROMPTS[0], seed=seed, **fields).text for seed in range(4)}
    assert len(texts) > 1, "four seeds sampled one text: the seed is not used"


def test_sampling_with_one_candidate_is_greedy(loaded: g.LoadedModel) -> None:
    greedy = alone(loaded, PROMPTS[2], max_tokens=16)
    assert alone(loaded, PROMPTS[2], max_tokens=16, temperature=1.5, top_k=1, seed=3).text == greedy.text
    assert alone(loaded, PROMPTS[2], max_tokens=16, temperature=1.0, top_p=1e-6, seed=3).text == greedy.text


def test_max_tokens_ends_with_length(loaded: g.LoadedModel) -> None:
    event = alone(loaded, PROMPTS[0], max_tokens=5)
    assert event.finish_reason in (g.FINISH_LENGTH, g.FINISH_STOP)
    if event.finish_reason == g.FINISH_LENGTH:
        assert event.completion_tokens == 5


def test_end_of_sequence_ends_with_stop(loaded: g.LoadedModel) -> None:
    # Make the greedy first token the end-of-sequence token: the sequence ends there, with no text.
    first = greedy_without_cache(loaded, PROMPTS[0], 1)[0]
    info = dataclasses.replace(loaded.info, eos_token_id=first)
    recorder = Recorder()
    engine = g.Engine(loaded.session, loaded.tokenizer, info, g.default_params(), recorder)
    engine.submit(request(loaded, PROMPTS[0], max_tokens=10), "eos")
    drain(engine)
    event = recorder.last("eos")
    assert (event.finish_reason, event.completion_tokens, event.text) == (g.FINISH_STOP, 1, "")


def test_a_stop_string_cuts_the_text(loaded: g.LoadedModel) -> None:
    full = alone(loaded, PROMPTS[3], max_tokens=40)
    assert len(full.text) > 6, full.text
    stop = full.text[3:6]
    cut = alone(loaded, PROMPTS[3], max_tokens=40, stop=[stop])
    assert cut.finish_reason == g.FINISH_STOP
    assert cut.text == full.text[: full.text.index(stop)]


def test_the_pool_makes_requests_wait_and_frees_every_block(loaded: g.LoadedModel) -> None:
    recorder = Recorder()
    # Room for two sequences of (prompt + 16) tokens at a time, and not for a third.
    reservation = -(-(len(loaded.tokenizer.encode(PROMPTS[2])) + 16) // 16) * 16
    engine = make_engine(loaded, recorder, kv_cache_tokens=2 * reservation + 15, block_size=16)
    peak = 0
    handles = [f"r{i}" for i in range(5)]
    for handle in handles:
        engine.submit(request(loaded, PROMPTS[2], max_tokens=16), handle)
    while not engine.idle:
        engine.step()
        peak = max(peak, len(engine.running))
        assert engine.pool.used_tokens <= engine.pool.capacity_tokens
    assert peak == 2
    want = alone(loaded, PROMPTS[2], max_tokens=16).text
    assert [recorder.last(h).text for h in handles] == [want] * 5
    assert engine.pool.used_tokens == 0


def test_a_full_queue_refuses_instead_of_growing(loaded: g.LoadedModel) -> None:
    engine = make_engine(loaded, Recorder(), max_waiting=2)
    engine.submit(request(loaded, PROMPTS[0]), "a")
    engine.submit(request(loaded, PROMPTS[0]), "b")
    with pytest.raises(g.OverloadedError, match="max_waiting 2"):
        engine.submit(request(loaded, PROMPTS[0]), "c")


def test_static_batching_admits_only_between_batches(loaded: g.LoadedModel) -> None:
    recorder = Recorder()
    engine = make_engine(loaded, recorder, scheduling="static")
    engine.submit(request(loaded, PROMPTS[0], max_tokens=12), "first")
    engine.step()
    engine.submit(request(loaded, PROMPTS[1], max_tokens=4), "late")
    while recorder.events.get("first", [None])[-1] is None or recorder.last("first").finish_reason is None:
        engine.step()
        assert "late" not in recorder.events, "static batching let a request join a running batch"
    drain(engine)
    assert recorder.last("late").finish_reason is not None


def test_cancelling_frees_the_sequence_and_spares_the_others(loaded: g.LoadedModel) -> None:
    want = alone(loaded, PROMPTS[1], max_tokens=20)
    recorder = Recorder()
    gone: set[str] = set()
    engine = g.Engine(
        loaded.session, loaded.tokenizer, loaded.info, g.default_params(), recorder,
        is_cancelled=lambda handle: handle in gone, cancel_check_s=0.0,
    )
    engine.submit(request(loaded, PROMPTS[0], max_tokens=60), "cancelled")
    engine.submit(request(loaded, PROMPTS[1], max_tokens=20), "kept")
    engine.submit(request(loaded, PROMPTS[2], max_tokens=60), "client-gone")
    for _ in range(3):
        engine.step()
    engine.cancel("cancelled")
    gone.add("client-gone")
    engine.step()
    assert recorder.last("cancelled").finish_reason == g.FINISH_CANCELLED
    assert recorder.last("client-gone").finish_reason == g.FINISH_CANCELLED
    assert [s.handle for s in engine.running] == ["kept"]
    drain(engine)
    assert recorder.last("kept").text == want.text
    assert engine.pool.used_tokens == 0


def test_the_cancel_watcher_cancels_from_its_own_thread_what_the_client_left(loaded: g.LoadedModel) -> None:
    from kiln.serving.generate_triton import CancelWatcher

    recorder = Recorder()
    engine = make_engine(loaded, recorder)
    gone: set[str] = set()
    asked: list[str] = []

    def is_cancelled(handle: str) -> bool:
        asked.append(handle)
        return handle in gone

    engine.submit(request(loaded, PROMPTS[0], max_tokens=60), "client-gone")
    engine.submit(request(loaded, PROMPTS[1], max_tokens=60), "kept")
    engine.step()
    watcher = CancelWatcher(engine, is_cancelled, interval_s=3600.0)  # rounds driven by check()
    try:
        assert watcher.check() == 0 and sorted(asked) == ["client-gone", "kept"]
        gone.add("client-gone")
        assert watcher.check() == 1
    finally:
        watcher.close()
    engine.step()
    assert recorder.last("client-gone").finish_reason == g.FINISH_CANCELLED
    assert [s.handle for s in engine.running] == ["kept"]
    drain(engine)
    assert engine.handles() == [] and engine.pool.used_tokens == 0


class FailingOnce:
    """The real session, except that its `fail_at`-th run raises (a model fault)."""

    def __init__(self, session: object, fail_at: int) -> None:
        self.session, self.fail_at, self.calls = session, fail_at, 0

    def __getattr__(self, name: str) -> object:
        return getattr(self.session, name)

    def run(self, outputs: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("injected fault")
        return self.session.run(outputs, feeds)


def test_a_model_fault_fails_its_batch_and_the_engine_goes_on(loaded: g.LoadedModel) -> None:
    recorder = Recorder()
    engine = make_engine(loaded, recorder, session=FailingOnce(loaded.session, fail_at=3))
    engine.submit(request(loaded, PROMPTS[0], max_tokens=8), "hit")
    drain(engine)
    event = recorder.last("hit")
    assert event.finish_reason == g.FINISH_ERROR and "injected fault" in str(event.error)
    assert engine.pool.used_tokens == 0
    engine.submit(request(loaded, PROMPTS[0], max_tokens=8), "after")
    drain(engine)
    assert recorder.last("after").text == alone(loaded, PROMPTS[0], max_tokens=8).text


@pytest.mark.parametrize(
    ("prompt", "fields", "message"),
    [
        ("", {}, "text_input is empty"),
        ("   ", {}, "text_input is empty"),
        (b"\xff\xfe", {}, "not valid UTF-8"),
        ("x" * 20_000, {}, "more than max_prompt_bytes"),
        ("hello", {"max_tokens": 0}, "max_tokens must be at least 1"),
        ("hello", {"max_tokens": 100_000}, "more than the model's context"),
        ("hello", {"temperature": -0.5}, "temperature must be between 0 and 2"),
        ("hello", {"temperature": float("nan")}, "temperature must be between 0 and 2"),
        ("hello", {"top_k": -1}, "top_k must be 0"),
        ("hello", {"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
        ("hello", {"seed": -1}, "seed must be between"),
        ("hello", {"stop": [""]}, r"stop\[0\] is empty"),
        ("hello", {"stop": [b"\xff"]}, r"stop\[0\] is not valid UTF-8"),
        ("hello", {"stop": ["a"] * 9}, "at most 8 stop strings"),
    ],
)
def test_bad_requests_name_the_field(
    loaded: g.LoadedModel, prompt: str | bytes, fields: dict, message: str
) -> None:
    with pytest.raises(g.GenerationError, match=message):
        g.GenerationRequest.create(loaded.tokenizer, loaded.info, g.default_params(), prompt, **fields)


def test_a_request_larger_than_the_pool_is_refused_not_queued(loaded: g.LoadedModel) -> None:
    params = g.default_params(kv_cache_tokens=32)
    with pytest.raises(g.GenerationError, match="KV-cache budget of 32 tokens"):
        g.GenerationRequest.create(loaded.tokenizer, loaded.info, params, "hello", max_tokens=40)


# --- TextStream (no model) --------------------------------------------------------------------


def feed(stream: g.TextStream, pieces: list[bytes]) -> list[str]:
    return [stream.push(piece) for piece in pieces]


def test_a_character_split_across_tokens_is_never_emitted_half() -> None:
    stream = g.TextStream()
    data = "é日".encode()  # 2 + 3 bytes
    deltas = feed(stream, [data[:1], data[1:3], data[3:4], data[4:]])
    assert deltas == ["", "é", "", "日"]
    assert stream.finish() == ""


def test_invalid_bytes_become_replacement_characters_at_the_end() -> None:
    stream = g.TextStream()
    assert stream.push(b"ok\xe6") == "ok"
    assert stream.finish() == "\ufffd"


@pytest.mark.parametrize(
    ("pieces", "stop", "deltas", "text"),
    [
        ([b"Hello", b" wor", b"ld"], ["world"], ["Hello", " ", ""], "Hello "),
        ([b"ab", b"c", b"d"], ["cd"], ["ab", "", ""], "ab"),
        ([b"a\nU", b"ser: x"], ["\nUser:"], ["a", ""], "a"),
        ([b"abc", b"xyz"], ["cx"], ["ab", ""], "ab"),
    ],
)
def test_stop_strings_are_cut_across_tokens_and_held_back_until_safe(
    pieces: list[bytes], stop: list[str], deltas: list[str], text: str
) -> None:
    stream = g.TextStream(stop)
    assert feed(stream, pieces) == deltas
    assert stream.stopped and stream.text == text
    assert "".join(deltas) == text


def test_text_held_back_for_a_stop_string_that_never_comes_is_released() -> None:
    stream = g.TextStream(["STOP"])
    assert stream.push(b"go ST") == "go "
    assert stream.push(b"AY") == "STAY"
    assert stream.push(b" ST") == " "
    assert stream.finish() == "ST"


def test_the_sampler_filters_top_k_and_top_p() -> None:
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05], np.float32))
    rng = np.random.default_rng(0)
    top2 = g.SamplingParams(max_tokens=1, temperature=1.0, top_k=2)
    assert {g.sample(logits, top2, rng) for _ in range(300)} == {0, 1}
    nucleus = g.SamplingParams(max_tokens=1, temperature=1.0, top_p=0.7)
    assert {g.sample(logits, nucleus, rng) for _ in range(300)} == {0, 1}
    everything = g.SamplingParams(max_tokens=1, temperature=1.0)
    assert {g.sample(logits, everything, rng) for _ in range(2000)} == {0, 1, 2, 3}
    greedy = g.SamplingParams(max_tokens=1, temperature=0.0)
    assert g.sample(logits, greedy, rng) == 0


def test_the_byte_tables_decode_what_the_tokenizer_encodes(loaded: g.LoadedModel) -> None:
    text = "def f(x):\n    return x  # é, 日本, emoji 🙂"
    ids = loaded.tokenizer.encode(text)
    assert loaded.tokenizer.decode(ids) == text

