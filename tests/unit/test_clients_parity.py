"""One SDK, two surfaces: the blocking API is generated from the asyncio one and matches it.

- `scripts/unasync.py --check`: the committed blocking modules are exactly what the generator
  writes from the asyncio sources (so no fix can land on one side only);
- every sync/async pair has the same public methods, each with the same parameters (names, kinds,
  defaults, annotations up to the Async prefix); the async ones are coroutines.
"""

from __future__ import annotations

import importlib.util
import inspect
import shutil
from pathlib import Path

import pytest

from kiln import clients

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("unasync", ROOT / "scripts" / "unasync.py")
assert _spec is not None and _spec.loader is not None
unasync = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(unasync)

PAIRS = [
    (clients.Client, clients.AsyncClient),
    (clients.ImageClassifier, clients.AsyncImageClassifier),
    (clients.DigitsReader, clients.AsyncDigitsReader),
    (clients.TextEmbedder, clients.AsyncTextEmbedder),
    (clients.FraudScorer, clients.AsyncFraudScorer),
    (clients.TextGenerator, clients.AsyncTextGenerator),
]
IDS = [sync.__name__ for sync, _ in PAIRS]
CONTEXT = {"__enter__": "__aenter__", "__exit__": "__aexit__"}
RETURNS_STREAM = {"stream"}
"""Methods that return a stream object at once (a plain function on both sides; the stream is
iterated with `for` / `async for`)."""
STREAM_PROTOCOL = {"__iter__": "__aiter__", "__next__": "__anext__", "close": "aclose", **CONTEXT}


def public(cls: type) -> dict[str, object]:
    return {
        name: member for name, member in inspect.getmembers(cls)
        if not name.startswith("_") and (inspect.isfunction(member) or isinstance(member, property))
    }


def described(function: object) -> list[tuple[str, object, object, str]]:
    """(name, kind, default, annotation without 'Async') per parameter, and the return type."""
    signature = inspect.signature(function)  # type: ignore[arg-type]
    params = [
        (p.name, p.kind, p.default, str(p.annotation).replace("Async", ""))
        for p in signature.parameters.values()
    ]
    return params + [("return", None, None, str(signature.return_annotation).replace("Async", ""))]


def test_the_blocking_modules_are_generated_from_the_asyncio_sources() -> None:
    assert unasync.main(["--check"]) == 0, "run .venv/bin/python scripts/unasync.py"


def test_the_check_fails_naming_a_stale_blocking_module(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for source, target, _ in unasync.PAIRS:
        for name in (source, target):
            (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(ROOT / name, tmp_path / name)
    edited = tmp_path / "clients" / "_sync_client.py"
    edited.write_text(edited.read_text().replace("READY_POLL_S)", "READY_POLL_S * 2)", 1))
    monkeypatch.setattr(unasync, "ROOT", tmp_path)
    assert unasync.main(["--check"]) == 1
    err = capsys.readouterr().err
    assert "clients/_sync_client.py is stale (run scripts/unasync.py)" in err
    assert "READY_POLL_S * 2" in err
    assert unasync.main([]) == 0 and unasync.main(["--check"]) == 0  # written anew, current again


@pytest.mark.parametrize(("sync", "asynchronous"), PAIRS, ids=IDS)
def test_sync_and_async_offer_the_same_methods_with_the_same_parameters(sync: type, asynchronous: type) -> None:
    assert asynchronous.__name__ == "Async" + sync.__name__
    ours, theirs = public(sync), public(asynchronous)
    assert sorted(ours) == sorted(theirs)
    for name, method in ours.items():
        if isinstance(method, property):
            assert isinstance(theirs[name], property), name
            continue
        assert described(method) == described(theirs[name]), name
        assert not inspect.iscoroutinefunction(method), f"{sync.__name__}.{name} is a coroutine"
        if name in RETURNS_STREAM:
            assert not inspect.iscoroutinefunction(theirs[name]), f"{asynchronous.__name__}.{name}"
            continue
        assert inspect.iscoroutinefunction(theirs[name]), f"{asynchronous.__name__}.{name} is not a coroutine"
    for enter, aenter in CONTEXT.items():
        assert hasattr(sync, enter) and hasattr(asynchronous, aenter)
        assert described(getattr(sync, enter)) == described(getattr(asynchronous, aenter))
    assert described(sync.__init__) == described(asynchronous.__init__)


def test_the_generation_streams_speak_the_iterator_protocols_of_their_side() -> None:
    sync, asynchronous = clients.GenerationStream, clients.AsyncGenerationStream
    assert asynchronous.__name__ == "Async" + sync.__name__
    assert sorted(public(sync)) == ["close"] and sorted(public(asynchronous)) == ["aclose"]
    for ours, theirs in STREAM_PROTOCOL.items():
        assert described(getattr(sync, ours)) == described(getattr(asynchronous, theirs)), ours
        assert not inspect.iscoroutinefunction(getattr(sync, ours)), ours
        coroutine = theirs not in ("__aiter__",)
        assert inspect.iscoroutinefunction(getattr(asynchronous, theirs)) is coroutine, theirs
    assert described(sync.__init__) == described(asynchronous.__init__)
