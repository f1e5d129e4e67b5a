"""kiln_generate's Outbox: the thread that sends the engine's events, merging when it lags."""

from __future__ import annotations

import gc
import threading
import time
import weakref

import pytest

from kiln.serving.generate import FINISH_CANCELLED, FINISH_LENGTH, Event
from kiln.serving.generate_triton import Outbox, merge_events


class Handle:
    """Stands for Triton's request + response sender: only its identity matters to the outbox."""

    def __init__(self, name: str) -> None:
        self.name = name


def event(handle: Handle, delta: str, reason: str | None = None, done: int = 1, first: bool = False) -> Event:
    return Event(handle, delta, reason, prompt_tokens=3, completion_tokens=done, text="", first=first)


def test_merge_joins_each_sequences_deltas_in_order_and_keeps_its_last_state():
    a, b = Handle("a"), Handle("b")
    merged = merge_events([
        event(a, "He", done=2), event(b, "x", done=5), event(a, "ll", done=3),
        event(b, "y", done=6), event(a, "o", FINISH_LENGTH, done=4),
    ])
    assert [(m.handle.name, m.delta, m.finish_reason, m.completion_tokens) for m in merged] == [
        ("a", "Hello", FINISH_LENGTH, 4),
        ("b", "xy", None, 6),
    ]


def test_merge_sends_a_sequences_first_token_alone():
    a, b = Handle("a"), Handle("b")
    merged = merge_events([
        event(a, "He", first=True), event(b, "x", first=True), event(a, "ll", done=2),
        event(b, "y", done=2), event(a, "o", FINISH_LENGTH, done=3),
    ])
    assert [(m.handle.name, m.delta, m.finish_reason, m.first) for m in merged] == [
        ("a", "He", None, True),
        ("b", "x", None, True),
        ("a", "llo", FINISH_LENGTH, False),
        ("b", "y", None, False),
    ]
    (alone,) = merge_events([event(a, "Hi", FINISH_LENGTH, first=True)])
    assert alone.first and alone.finish_reason == FINISH_LENGTH


def test_merge_of_a_cancelled_sequence_carries_the_cancel():
    a = Handle("a")
    (merged,) = merge_events([event(a, "partial"), event(a, "", FINISH_CANCELLED, done=1)])
    assert merged.finish_reason == FINISH_CANCELLED


def test_a_slow_sender_gets_fewer_larger_deltas_and_the_same_text_with_the_final_last():
    handles = [Handle(str(i)) for i in range(3)]
    sent: list[Event] = []

    def slow_send(e: Event) -> None:
        time.sleep(0.01)  # a send slower than the engine's iterations
        sent.append(e)

    outbox = Outbox(slow_send)
    tokens = 40
    for step in range(tokens):
        reason = FINISH_LENGTH if step == tokens - 1 else None
        outbox.put([event(h, f"{step},", reason, done=step + 1, first=step == 0) for h in handles])
        time.sleep(0.001)
    outbox.close()
    for handle in handles:
        mine = [e for e in sent if e.handle is handle]
        assert "".join(e.delta for e in mine) == "".join(f"{step}," for step in range(tokens))
        assert mine[-1].finish_reason == FINISH_LENGTH and mine[-1].completion_tokens == tokens
        assert all(e.finish_reason is None for e in mine[:-1])
        assert mine[0].first and mine[0].delta == "0,", "the first token goes out alone"
        assert len(mine) < tokens, "a lagging sender should have merged deltas"


def test_a_sender_that_keeps_up_sends_one_response_per_event():
    a = Handle("a")
    sent: list[Event] = []
    done = threading.Event()

    def send(e: Event) -> None:
        sent.append(e)
        done.set()

    outbox = Outbox(send)
    for step in range(5):
        done.clear()
        outbox.put([event(a, str(step), FINISH_LENGTH if step == 4 else None)])
        assert done.wait(5.0)
    outbox.close()
    assert [e.delta for e in sent] == ["0", "1", "2", "3", "4"]


def test_close_sends_what_is_queued_then_keeps_no_reference_to_a_request():
    gate = threading.Event()
    sent: list[str] = []

    def send(e: Event) -> None:
        gate.wait(5.0)
        sent.append(e.delta)

    handle = Handle("a")
    ref = weakref.ref(handle)
    outbox = Outbox(send)
    outbox.put([event(handle, "first")])
    outbox.put([event(handle, " last", FINISH_CANCELLED)])
    gate.set()
    outbox.close()
    assert sent and sent[-1].endswith("last")
    sent.clear()
    del handle
    gc.collect()
    assert ref() is None, "the outbox kept a request alive: Triton would not unload the model"
    with pytest.raises(RuntimeError, match="closed"):
        outbox.put([event(Handle("b"), "late")])
