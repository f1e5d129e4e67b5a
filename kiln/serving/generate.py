"""kiln_generate's logic: a text-generation engine with a KV cache and continuous batching.

Plain Python over an ONNX Runtime session, testable without Triton (`kiln.serving.generate_triton`
serves it as a decoupled Triton model; `benchmarks` run it in process). The ONNX model follows ONNX
Runtime GenAI's naming (`input_ids`, `attention_mask`, `position_ids`, `past_key_values.{i}.key|value`
in; `logits`, `present.{i}.key|value` out; see `kiln.models.tinylm`), and the build publishes
`tokenizer.json` (byte-level BPE) and `generation.json` beside it.

The engine's loop (`Engine.step`, one iteration; `Engine.run_forever` on a thread):

1. Sequences whose client cancelled leave and free their cache at once.
2. Admission: waiting requests join, first come first served, while the KV-cache pool has room for
   their whole reservation (prompt + `max_tokens` tokens, rounded up to blocks) and fewer than
   `max_running` sequences run. A request that does not fit waits: the pool is preallocated and
   bounded by `kv_cache_tokens`, so a full pool delays requests, never crashes the process.
3. Prefill: the newly admitted prompts run as one batch (right-padded, masked) and each samples
   its first token (the time to first token ends here).
4. Decode: every other running sequence advances one token in one batch; their caches, of
   different lengths, are gathered right-padded with the padding masked out.
5. Finished sequences (end of sequence, a stop string, `max_tokens`, cancelled) leave at once
   and their blocks go back to the pool.

That is continuous (iteration-level) batching: sequences join and leave between decode steps.
`scheduling="static"` is the baseline it is measured against: a batch is formed only when the
previous one has finished, so every member waits for the longest.

Text leaves as UTF-8-safe deltas (`TextStream`): the tokenizer is byte-level, so a token may end
inside a multi-byte character; the incremental decoder holds such bytes back until the character
is complete, and text that could be the start of a stop string is held back until it is not.
"""

from __future__ import annotations

import codecs
import collections
import json
import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kiln.serving.errors import ModelLoadError, RequestError
from kiln.serving.params import Param

FINISH_STOP = "stop"
"""Finish reason: the end-of-sequence token or a stop string (OpenAI's name)."""
FINISH_LENGTH = "length"
"""Finish reason: `max_tokens` generated."""
FINISH_CANCELLED = "cancelled"
"""Finish reason: the client cancelled or went away."""
FINISH_ERROR = "error"
"""Finish reason: the engine failed while running the sequence (the response carries the error)."""

MAX_STOP_STRINGS = 8
MAX_STOP_BYTES = 256
MAX_WASTED_COLUMNS = 64
"""Most padding columns beyond the longest member a decode batch keeps after members left,
before it is regathered from the pool (see `Engine._batch_cache`)."""
MAX_TEMPERATURE = 2.0
"""The largest temperature accepted (OpenAI's limit)."""

GENERATE_PARAMS: tuple[Param, ...] = (
    Param("model", "name", "tinylm", "repository model whose newest version folder holds the ONNX "
          "model, tokenizer.json and generation.json (what the build published)"),
    Param("model_filename", "name", "model.onnx", "ONNX file in that version folder"),
    Param("kv_cache_tokens", "int", 8192, "token budget of the preallocated KV-cache pool", minimum=16),
    Param("block_size", "int", 16, "tokens per KV-cache block (the pool's allocation unit)", minimum=1),
    Param("max_running", "int", 16, "most sequences running at once (one decode batch)", minimum=1),
    Param("max_waiting", "int", 256, "requests waiting for room before new ones are refused", minimum=0),
    Param("default_max_tokens", "int", 64, "max_tokens of a request that sends none", minimum=1),
    Param("max_prompt_bytes", "int", 16384, "longest prompt accepted, in UTF-8 bytes", minimum=1),
    Param("scheduling", "str", "continuous", "continuous (iteration-level) or static batching",
          choices=("continuous", "static")),
    Param("intra_op_threads", "int", 0, "ONNX Runtime threads inside one operator; 0: its choice",
          minimum=0),
    Param("inter_op_threads", "int", 1, "ONNX Runtime threads across operators", minimum=0),
)


@dataclass(frozen=True)
class GenerateParams:
    """kiln_generate's `parameters`, parsed (see GENERATE_PARAMS for each key's meaning)."""

    model: str
    model_filename: str
    kv_cache_tokens: int
    block_size: int
    max_running: int
    max_waiting: int
    default_max_tokens: int
    max_prompt_bytes: int
    scheduling: str
    intra_op_threads: int
    inter_op_threads: int


class GenerationError(RequestError):
    """A generation request is invalid (INVALID_ARG / HTTP 400); the message names the field."""


class OverloadedError(RuntimeError):
    """The engine's waiting queue is full: the request is refused, not queued (UNAVAILABLE)."""


# --- model files ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelInfo:
    """What `generation.json` says about the ONNX model (published by the build)."""

    eos_token_id: int
    vocab_size: int
    max_context: int
    num_layers: int
    num_heads: int
    head_dim: int

    @classmethod
    def from_file(cls, path: Path) -> ModelInfo:
        data = json.loads(Path(path).read_text())
        try:
            return cls(**{name: int(data[name]) for name in cls.__dataclass_fields__})
        except (KeyError, TypeError, ValueError) as error:
            raise ModelLoadError(f"{path}: not a generation.json kiln can read ({error!r})") from error


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet reversed: the printable character each byte is written as in
    a byte-level BPE vocabulary -> that byte (`tokenizers.pre_tokenizers.ByteLevel.alphabet()`)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return {chr(code): byte for byte, code in zip(printable, codes, strict=True)}


class ByteTokenizer:
    """The published byte-level BPE tokenizer: text -> token ids, and each token's bytes."""

    def __init__(self, tokenizer: Any, eos_token_id: int) -> None:
        self._tokenizer = tokenizer
        self.eos_token_id = eos_token_id
        decoder = _byte_decoder()
        size = tokenizer.get_vocab_size(with_added_tokens=True)
        special = {t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special}
        table: list[bytes] = []
        for token_id in range(size):
            piece = tokenizer.id_to_token(token_id)
            if piece is None or piece in special:
                table.append(b"")
            else:
                table.append(bytes(decoder[c] for c in piece if c in decoder))
        self.token_bytes = table

    @classmethod
    def from_file(cls, path: Path, eos_token_id: int) -> ByteTokenizer:
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_file(str(path)), eos_token_id)

    def encode(self, text: str) -> list[int]:
        return list(self._tokenizer.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int]) -> str:
        return b"".join(self.token_bytes[i] for i in ids).decode("utf-8", errors="replace")


# --- requests -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SamplingParams:
    """One request's generation settings (validated by `GenerationRequest.create`).

    Attributes:
        max_tokens: Most tokens to generate.
        temperature: 0 is greedy; higher flattens the distribution (at most MAX_TEMPERATURE).
        top_k: Sample among the k most likely tokens; 0 keeps all.
        top_p: Sample among the most likely tokens whose probabilities sum to top_p (nucleus).
        seed: Seeds this request's sampler: the same seed and prompt give the same text. None
            draws a seed.
        stop: Strings that end the text (not included in it).
    """

    max_tokens: int
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class GenerationRequest:
    """A validated request: the prompt's token ids and the sampling settings."""

    prompt: str
    prompt_ids: tuple[int, ...]
    sampling: SamplingParams
    stream: bool = True

    @classmethod
    def create(
        cls,
        tokenizer: ByteTokenizer,
        info: ModelInfo,
        params: GenerateParams,
        prompt: str | bytes,
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop: Sequence[str | bytes] = (),
        stream: bool = True,
    ) -> GenerationRequest:
        """Validates one request; GenerationError names the field and what was wrong."""
        prompt = _check_prompt(prompt, params)
        ids = tokenizer.encode(prompt)
        max_tokens = _check_length(len(ids), max_tokens, info, params)
        sampling = _sampling(max_tokens, temperature, top_k, top_p, seed, _stop_strings(stop))
        return cls(prompt=prompt, prompt_ids=tuple(ids), sampling=sampling, stream=stream)


def _check_prompt(prompt: str | bytes, params: GenerateParams) -> str:
    """The prompt as text: valid UTF-8, not blank, at most `max_prompt_bytes`."""
    if isinstance(prompt, bytes):
        try:
            prompt = prompt.decode("utf-8")
        except UnicodeDecodeError as error:
            raise GenerationError(
                f"text_input is not valid UTF-8 (byte {error.start}: {error.reason})"
            ) from None
    size = len(prompt.encode("utf-8"))
    if not prompt.strip():
        raise GenerationError("text_input is empty: send a prompt of at least one character")
    if size > params.max_prompt_bytes:
        raise GenerationError(
            f"text_input is {size} bytes, more than max_prompt_bytes {params.max_prompt_bytes}"
        )
    return prompt


def _check_length(prompt_tokens: int, max_tokens: int | None, info: ModelInfo, params: GenerateParams) -> int:
    """`max_tokens` (its default when None), checked against the context and the KV-cache budget."""
    if max_tokens is None:
        max_tokens = min(params.default_max_tokens, max(1, info.max_context - prompt_tokens))
    if max_tokens < 1:
        raise GenerationError(f"max_tokens must be at least 1, got {max_tokens}")
    if prompt_tokens + max_tokens > info.max_context:
        raise GenerationError(
            f"the prompt ({prompt_tokens} tokens) plus max_tokens ({max_tokens}) is more than the "
            f"model's context of {info.max_context} tokens: shorten the prompt or lower max_tokens"
        )
    if prompt_tokens + max_tokens > params.kv_cache_tokens:
        raise GenerationError(
            f"the prompt ({prompt_tokens} tokens) plus max_tokens ({max_tokens}) is more than the "
            f"KV-cache budget of {params.kv_cache_tokens} tokens: lower max_tokens"
        )
    return max_tokens


def _sampling(
    max_tokens: int,
    temperature: float | None,
    top_k: int | None,
    top_p: float | None,
    seed: int | None,
    stops: tuple[str, ...],
) -> SamplingParams:
    """The sampling settings with their defaults, each checked against its range."""
    temperature = 1.0 if temperature is None else float(temperature)
    if not math.isfinite(temperature) or not 0.0 <= temperature <= MAX_TEMPERATURE:
        raise GenerationError(
            f"temperature must be between 0 and {MAX_TEMPERATURE:g} (0 is greedy), got {temperature}"
        )
    top_k = 0 if top_k is None else int(top_k)
    if top_k < 0:
        raise GenerationError(f"top_k must be 0 (off) or a positive number of tokens, got {top_k}")
    top_p = 1.0 if top_p is None else float(top_p)
    if not math.isfinite(top_p) or not 0.0 < top_p <= 1.0:
        raise GenerationError(f"top_p must be in (0, 1], got {top_p}")
    if seed is not None and not 0 <= int(seed) < 2**63:
        raise GenerationError(f"seed must be between 0 and 2**63 - 1, got {seed}")
    return SamplingParams(
        max_tokens=int(max_tokens),
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=None if seed is None else int(seed),
        stop=stops,
    )


def _stop_strings(stop: Sequence[str | bytes]) -> tuple[str, ...]:
    """The stop strings as text: each valid UTF-8, not empty, at most MAX_STOP_BYTES; at most
    MAX_STOP_STRINGS of them."""
    stops: list[str] = []
    for index, item in enumerate(stop):
        if isinstance(item, bytes):
            try:
                item = item.decode("utf-8")
            except UnicodeDecodeError:
                raise GenerationError(f"stop[{index}] is not valid UTF-8") from None
        if not item:
            raise GenerationError(f"stop[{index}] is empty: every stop string needs a character")
        if len(item.encode("utf-8")) > MAX_STOP_BYTES:
            raise GenerationError(f"stop[{index}] is longer than {MAX_STOP_BYTES} bytes")
        stops.append(item)
    if len(stops) > MAX_STOP_STRINGS:
        raise GenerationError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(stops)}")
    return tuple(stops)


# --- text out -----------------------------------------------------------------------------------


class TextStream:
    """Token bytes in, UTF-8-safe text deltas out, cut at the first stop string.

    `push` returns the text that is now safe to emit: never half a multi-byte character (the
    incremental decoder keeps an incomplete one for the next token; invalid bytes become U+FFFD),
    never text that may still turn out to start a stop string. `finish` returns the rest.
    """

    def __init__(self, stop: Sequence[str] = ()) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stop = tuple(stop)
        self._longest = max((len(s) for s in self._stop), default=0)
        self.text = ""
        self.emitted = 0
        self.stopped = False

    def push(self, data: bytes) -> str:
        """Adds a token's bytes; returns the new safe delta ("" when nothing is safe yet)."""
        if self.stopped:
            return ""
        self.text += self._decoder.decode(data)
        return self._advance(final=False)

    def finish(self) -> str:
        """The generation ended: flushes the decoder and returns what was held back."""
        if self.stopped:
            return ""
        self.text += self._decoder.decode(b"", final=True)
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        if self._stop:
            start = max(0, self.emitted - self._longest + 1)
            cut = -1
            for stop in self._stop:
                index = self.text.find(stop, start)
                if index != -1 and (cut == -1 or index < cut):
                    cut = index
            if cut != -1:
                self.text = self.text[:cut]
                self.stopped = True
                return self._take(len(self.text))
            if not final:
                return self._take(len(self.text) - self._held_back())
        return self._take(len(self.text))

    def _held_back(self) -> int:
        """Length of the longest tail of the text that a stop string starts with."""
        text = self.text
        for size in range(min(self._longest - 1, len(text) - self.emitted), 0, -1):
            tail = text[-size:]
            if any(stop.startswith(tail) for stop in self._stop):
                return size
        return 0

    def _take(self, end: int) -> str:
        if end <= self.emitted:
            return ""
        delta = self.text[self.emitted:end]
        self.emitted = end
        return delta


# --- sampling -----------------------------------------------------------------------------------


def sample(logits: np.ndarray, sampling: SamplingParams, rng: np.random.Generator) -> int:
    """One token id from a row of logits: greedy at temperature 0, else temperature, top-k and
    top-p (nucleus) filtering, then a draw from `rng` (the request's own, so a seed repeats)."""
    if sampling.temperature == 0.0:
        return int(np.argmax(logits))
    scores = logits.astype(np.float64) / sampling.temperature
    if 0 < sampling.top_k < scores.shape[0]:
        kth = np.partition(scores, -sampling.top_k)[-sampling.top_k]
        scores = np.where(scores < kth, -np.inf, scores)
    scores -= scores.max()
    probs = np.exp(scores)
    probs /= probs.sum()
    if sampling.top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        cumulative = np.cumsum(probs[order])
        keep = order[: int(np.searchsorted(cumulative, sampling.top_p) + 1)]
        filtered = np.zeros_like(probs)
        filtered[keep] = probs[keep]
        probs = filtered / filtered.sum()
    return int(rng.choice(probs.shape[0], p=probs))


# --- the KV-cache pool --------------------------------------------------------------------------


class KVPool:
    """Preallocated key/value storage for every layer, handed out in blocks of `block_size` tokens.

    `keys[layer]` and `values[layer]` are [blocks, heads, block_size, head_dim] float32 arrays,
    allocated once: the memory is bounded by the token budget whatever the load.
    """

    def __init__(self, info: ModelInfo, tokens: int, block_size: int) -> None:
        self.block_size = block_size
        self.blocks = max(1, tokens // block_size)
        shape = (self.blocks, info.num_heads, block_size, info.head_dim)
        self.keys = [np.zeros(shape, np.float32) for _ in range(info.num_layers)]
        self.values = [np.zeros(shape, np.float32) for _ in range(info.num_layers)]
        self._free = collections.deque(range(self.blocks))

    @property
    def capacity_tokens(self) -> int:
        return self.blocks * self.block_size

    @property
    def used_tokens(self) -> int:
        return (self.blocks - len(self._free)) * self.block_size

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def allocate(self, tokens: int) -> list[int] | None:
        """Blocks for `tokens` tokens, or None when the pool has not that many free."""
        needed = self.blocks_for(tokens)
        if needed > len(self._free):
            return None
        return [self._free.popleft() for _ in range(needed)]

    def release(self, blocks: Sequence[int]) -> None:
        self._free.extend(blocks)

    def slots(self, blocks: Sequence[int], start: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """(block, offset) of token positions start..start+count-1 of a sequence owning `blocks`."""
        positions = np.arange(start, start + count)
        return np.asarray(blocks, np.int64)[positions // self.block_size], positions % self.block_size

    def gather(
        self, layer: int, block_index: np.ndarray, offsets: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Keys and values of `layer` at [batch, width] (block, offset) pairs: [batch, heads,
        width, dim] arrays, one fancy-indexing copy each (padding slots may point anywhere)."""
        keys = self.keys[layer][block_index, :, offsets]  # [batch, width, heads, dim]
        values = self.values[layer][block_index, :, offsets]
        return (
            np.ascontiguousarray(keys.transpose(0, 2, 1, 3)),
            np.ascontiguousarray(values.transpose(0, 2, 1, 3)),
        )

    def write(
        self, layer: int, block_index: np.ndarray, offsets: np.ndarray, keys: np.ndarray, values: np.ndarray
    ) -> None:
        """Stores keys and values given as [n, heads, dim] at n (block, offset) pairs."""
        self.keys[layer][block_index, :, offsets] = keys
        self.values[layer][block_index, :, offsets] = values


# --- sequences and events ---------------------------------------------------------------------


@dataclass
class Sequence_:
    """A request inside the engine (the trailing underscore keeps typing.Sequence free)."""

    request: GenerationRequest
    handle: Any
    arrival: float
    rng: np.random.Generator
    stream: TextStream
    blocks: list[int] = field(default_factory=list)
    length: int = 0
    """Tokens in the cache."""
    generated: list[int] = field(default_factory=list)
    next_token: int | None = None
    first_token_at: float | None = None
    last_token_at: float | None = None
    finish_reason: str | None = None
    text: str = ""

    @property
    def prompt_tokens(self) -> int:
        return len(self.request.prompt_ids)


@dataclass(frozen=True)
class Event:
    """What the engine tells its caller about one sequence after an iteration.

    Attributes:
        handle: What the caller passed to `submit` (e.g. Triton's response sender).
        delta: New text (may be "" while a character or a possible stop string is held back).
        finish_reason: None while running; FINISH_STOP, FINISH_LENGTH, FINISH_CANCELLED or
            FINISH_ERROR on the sequence's last event.
        prompt_tokens: Tokens in the prompt.
        completion_tokens: Tokens generated so far.
        text: The whole text so far (for a non-streaming request's one response).
        error: The exception, with FINISH_ERROR.
        first: This is the sequence's first token (the time to first token ends here).
    """

    handle: Any
    delta: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    text: str
    error: Exception | None = None
    first: bool = False


@dataclass(frozen=True)
class _BatchCache:
    """The last decode step's batch: its members in row order, their present keys/values and
    the mask that went with them (see `Engine._batch_cache`)."""

    sequences: tuple[Sequence_, ...]
    past: list[np.ndarray]
    mask: np.ndarray


@dataclass
class EngineStats:
    """Counts since the engine started and what the last iteration saw (for metrics)."""

    iterations: int = 0
    prefill_batches: int = 0
    decode_batches: int = 0
    decode_batch_items: int = 0
    regroupings: int = 0
    """Decode steps whose batch had to be gathered from the pool (a sequence joined)."""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finished: collections.Counter = field(default_factory=collections.Counter)


# --- the engine ---------------------------------------------------------------------------------


Emit = Callable[[list[Event]], None]
Cancelled = Callable[[Any], bool]


class Engine:
    """Continuous batching over one ONNX Runtime session and a preallocated KV-cache pool.

    Thread use: `submit` and `cancel` from any thread; `step` (or `run_forever`) on one engine
    thread, which calls `emit` with each iteration's events and `is_cancelled(handle)` on each
    running sequence at most every `cancel_check_s` seconds.
    """

    def __init__(
        self,
        session: Any,
        tokenizer: ByteTokenizer,
        info: ModelInfo,
        params: GenerateParams,
        emit: Emit,
        is_cancelled: Cancelled | None = None,
        cancel_check_s: float = 0.02,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.session = session
        self.tokenizer = tokenizer
        self.info = info
        self.params = params
        self.pool = KVPool(info, params.kv_cache_tokens, params.block_size)
        self.emit = emit
        self.is_cancelled = is_cancelled
        self.cancel_check_s = cancel_check_s
        self.clock = clock
        self.stats = EngineStats()
        self.waiting: collections.deque[Sequence_] = collections.deque()
        self.running: list[Sequence_] = []
        self._lock = threading.Condition()
        self._cancelled: set[int] = set()
        self._stopping = False
        self._last_cancel_check = 0.0
        self._cache: _BatchCache | None = None
        self._layers = info.num_layers
        output_names = [o.name for o in session.get_outputs()]
        self._outputs = ["logits"] + [
            f"present.{i}.{kind}" for i in range(self._layers) for kind in ("key", "value")
        ]
        missing = [name for name in self._outputs if name not in output_names]
        if missing:
            raise ModelLoadError(f"the ONNX model lacks outputs {missing} (found {output_names})")

    # -- from any thread

    def submit(self, request: GenerationRequest, handle: Any) -> None:
        """Queues a validated request; OverloadedError when `max_waiting` are already waiting."""
        seed = request.sampling.seed
        sequence = Sequence_(
            request=request,
            handle=handle,
            arrival=self.clock(),
            rng=np.random.default_rng(seed),
            stream=TextStream(request.sampling.stop),
        )
        with self._lock:
            if self._stopping:
                raise OverloadedError("the model is shutting down")
            if len(self.waiting) >= self.params.max_waiting:
                raise OverloadedError(
                    f"{len(self.waiting)} requests are already waiting for room in the KV cache "
                    f"(max_waiting {self.params.max_waiting}); retry later"
                )
            self.waiting.append(sequence)
            self._lock.notify()

    def cancel(self, handle: Any) -> None:
        """Stops the sequence of `handle` at the next iteration (frees its cache)."""
        with self._lock:
            self._cancelled.add(id(handle))
            self._lock.notify()

    def stop(self) -> None:
        """Ends `run_forever`; waiting and running sequences finish as cancelled."""
        with self._lock:
            self._stopping = True
            self._lock.notify()

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running

    def handles(self) -> list[Any]:
        """The handles of the waiting and running sequences (a snapshot, from any thread)."""
        with self._lock:
            return [s.handle for s in self.waiting] + [s.handle for s in tuple(self.running)]

    # -- the engine thread

    def run_forever(self) -> None:
        """Iterates while there is work, sleeps while there is none, until `stop`."""
        while True:
            with self._lock:
                while not self._stopping and self.idle:
                    self._lock.wait()
                if self._stopping:
                    leaving = list(self.waiting) + self.running
                    self.waiting.clear()
                    self.running = []
                    self._cache = None
                    break
            self.step()
        events = [self._finish(s, FINISH_CANCELLED) for s in leaving]
        if events:
            self.emit(events)

    def step(self) -> list[Event]:
        """One iteration (see the module doc); returns (and emits) its events."""
        events: list[Event] = []
        self.stats.iterations += 1
        self._drop_cancelled(events)
        admitted = self._admit()
        decoding = [s for s in self.running if s.next_token is not None]
        for run, batch in ((self._prefill, admitted), (self._decode, decoding)):
            if not batch:
                continue
            try:
                run(batch, events)
            except Exception as error:  # the model failed: that batch's sequences fail, nothing hangs
                for sequence in batch:
                    if sequence.finish_reason is None:
                        events.append(self._finish(sequence, FINISH_ERROR, error))
        self.running = [s for s in self.running if s.finish_reason is None]
        if not self.running:
            # The last batch's members hold their requests (Triton's request objects, which a
            # decoupled model must release before it can unload): let them go once idle.
            self._cache = None
        if events:
            self.emit(events)
        return events

    def _drop_cancelled(self, events: list[Event]) -> None:
        now = self.clock()
        check = self.is_cancelled is not None and now - self._last_cancel_check >= self.cancel_check_s
        if check:
            self._last_cancel_check = now
        with self._lock:
            cancelled, self._cancelled = self._cancelled, set()
            if cancelled or check:
                kept = collections.deque()
                for sequence in self.waiting:
                    if id(sequence.handle) in cancelled or (check and self._client_gone(sequence)):
                        events.append(self._finish(sequence, FINISH_CANCELLED))
                    else:
                        kept.append(sequence)
                self.waiting = kept
        if cancelled or check:
            for sequence in self.running:
                if id(sequence.handle) in cancelled or (check and self._client_gone(sequence)):
                    events.append(self._finish(sequence, FINISH_CANCELLED))
            self.running = [s for s in self.running if s.finish_reason is None]

    def _client_gone(self, sequence: Sequence_) -> bool:
        try:
            return bool(self.is_cancelled(sequence.handle))  # type: ignore[misc]
        except Exception:
            return True

    def _admit(self) -> list[Sequence_]:
        if self.params.scheduling == "static" and self.running:
            return []
        admitted: list[Sequence_] = []
        with self._lock:
            while self.waiting and len(self.running) + len(admitted) < self.params.max_running:
                sequence = self.waiting[0]
                tokens = sequence.prompt_tokens + sequence.request.sampling.max_tokens
                blocks = self.pool.allocate(tokens)
                if blocks is None:
                    break  # first come, first served: the head waits for room, nobody overtakes
                self.waiting.popleft()
                sequence.blocks = blocks
                admitted.append(sequence)
        self.running.extend(admitted)
        return admitted

    def _run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(self._outputs, feeds)

    def _prefill(self, batch: list[Sequence_], events: list[Event]) -> None:
        info = self.info
        lengths = [s.prompt_tokens for s in batch]
        width = max(lengths)
        ids = np.zeros((len(batch), width), np.int64)
        mask = np.zeros((len(batch), width), np.int64)
        for row, sequence in enumerate(batch):
            ids[row, : lengths[row]] = sequence.request.prompt_ids
            mask[row, : lengths[row]] = 1
        positions = np.broadcast_to(np.arange(width, dtype=np.int64), (len(batch), width)).copy()
        feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
        empty = np.zeros((len(batch), info.num_heads, 0, info.head_dim), np.float32)
        for layer in range(self._layers):
            feeds[f"past_key_values.{layer}.key"] = empty
            feeds[f"past_key_values.{layer}.value"] = empty
        logits, *present = self._run(feeds)
        for row, sequence in enumerate(batch):
            n = lengths[row]
            block_index, offsets = self.pool.slots(sequence.blocks, 0, n)
            for layer in range(self._layers):
                keys = present[2 * layer][row, :, :n].transpose(1, 0, 2)  # [n, heads, dim]
                values = present[2 * layer + 1][row, :, :n].transpose(1, 0, 2)
                self.pool.write(layer, block_index, offsets, keys, values)
            sequence.length = n
            self.stats.prompt_tokens += lengths[row]
            self._accept(sequence, logits[row, lengths[row] - 1], events)
        self.stats.prefill_batches += 1

    def _decode(self, batch: list[Sequence_], events: list[Event]) -> None:
        count = len(batch)
        ids = np.array([[s.next_token] for s in batch], np.int64)
        positions = np.array([[s.length] for s in batch], np.int64)
        past, mask = self._batch_cache(batch)
        width = mask.shape[1]
        mask = np.concatenate([mask, np.ones((count, 1), np.int64)], axis=1)
        feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
        for layer in range(self._layers):
            feeds[f"past_key_values.{layer}.key"] = past[2 * layer]
            feeds[f"past_key_values.{layer}.value"] = past[2 * layer + 1]
        logits, *present = self._run(feeds)
        # The new token's keys and values go into the pool (the record a later regrouping
        # gathers from); the outputs themselves are the next step's past as long as the batch
        # keeps its members (`_batch_cache`).
        size = self.pool.block_size
        new_blocks = np.array([s.blocks[s.length // size] for s in batch], np.int64)
        new_offsets = np.array([s.length % size for s in batch], np.int64)
        for layer in range(self._layers):
            keys, values = present[2 * layer][:, :, width], present[2 * layer + 1][:, :, width]
            self.pool.write(layer, new_blocks, new_offsets, keys, values)
        self._cache = _BatchCache(tuple(batch), present, mask)
        for row, sequence in enumerate(batch):
            sequence.length += 1
            self._accept(sequence, logits[row, 0], events)
        self.stats.decode_batches += 1
        self.stats.decode_batch_items += count

    def _batch_cache(self, batch: list[Sequence_]) -> tuple[list[np.ndarray], np.ndarray]:
        """The past keys/values ([batch, heads, width, dim] per layer and kind) and the mask
        ([batch, width]) of `batch`, in its order.

        While the batch keeps its members, the last step's outputs are this step's past: no
        copy (a row's padding columns stay in it, masked). When members only left, their rows
        are dropped (one copy). When any joined, every row is gathered from the pool,
        right-padded to the longest (one copy per regrouping, not per step)."""
        cache = self._cache
        if cache is not None:
            members = cache.sequences
            if len(members) == len(batch) and all(a is b for a, b in zip(members, batch, strict=True)):
                return cache.past, cache.mask
            rows = {id(s): row for row, s in enumerate(members)}
            index = [rows.get(id(s)) for s in batch]
            longest = max(s.length for s in batch)
            # Dropping rows keeps the width (the columns of the sequences that left); once
            # that wastes more than a few blocks per row, the batch is regathered instead.
            narrow = cache.mask.shape[1] - longest <= MAX_WASTED_COLUMNS
            if narrow and all(i is not None for i in index) and index == sorted(index):
                keep = np.array(index, np.int64)
                return [array[keep] for array in cache.past], cache.mask[keep]
        lengths = [s.length for s in batch]
        width = max(lengths)
        count = len(batch)
        mask = np.zeros((count, width), np.int64)
        # Padding slots repeat position 0 of the row's first block: masked out, so any slot would do.
        block_index = np.zeros((count, width), np.int64)
        offsets = np.zeros((count, width), np.int64)
        for row, sequence in enumerate(batch):
            n = lengths[row]
            blocks, slot = self.pool.slots(sequence.blocks, 0, n)
            block_index[row, :n] = blocks
            block_index[row, n:] = sequence.blocks[0]
            offsets[row, :n] = slot
            mask[row, :n] = 1
        past: list[np.ndarray] = []
        for layer in range(self._layers):
            past.extend(self.pool.gather(layer, block_index, offsets))
        self.stats.regroupings += 1
        return past, mask

    def _accept(self, sequence: Sequence_, logits: np.ndarray, events: list[Event]) -> None:
        """Samples the next token of `sequence` and turns it into an event."""
        token = sample(logits, sequence.request.sampling, sequence.rng)
        now = self.clock()
        first = sequence.first_token_at is None
        if first:
            sequence.first_token_at = now
        sequence.last_token_at = now
        sequence.generated.append(token)
        self.stats.completion_tokens += 1
        if token == self.info.eos_token_id:
            events.append(self._finish(sequence, FINISH_STOP, first=first))
            return
        delta = sequence.stream.push(self.tokenizer.token_bytes[token])
        sequence.text += delta
        if sequence.stream.stopped:
            events.append(self._finish(sequence, FINISH_STOP, delta=delta, first=first))
        elif len(sequence.generated) >= sequence.request.sampling.max_tokens:
            events.append(self._finish(sequence, FINISH_LENGTH, delta=delta, first=first))
        else:
            sequence.next_token = token
            events.append(self._event(sequence, delta, None, first=first))

    def _finish(
        self,
        sequence: Sequence_,
        reason: str,
        error: Exception | None = None,
        *,
        delta: str = "",
        first: bool = False,
    ) -> Event:
        if reason in (FINISH_STOP, FINISH_LENGTH):
            rest = sequence.stream.finish()
            sequence.text += rest
            delta += rest
        sequence.finish_reason = reason
        sequence.next_token = None
        if sequence.blocks:
            self.pool.release(sequence.blocks)
            sequence.blocks = []
        self.stats.finished[reason] += 1
        return self._event(sequence, delta, reason, error=error, first=first)

    def _event(
        self,
        sequence: Sequence_,
        delta: str,
        reason: str | None,
        *,
        error: Exception | None = None,
        first: bool = False,
    ) -> Event:
        return Event(
            handle=sequence.handle,
            delta=delta,
            finish_reason=reason,
            prompt_tokens=sequence.prompt_tokens,
            completion_tokens=len(sequence.generated),
            text=sequence.text,
            error=error,
            first=first,
        )


# --- loading --------------------------------------------------------------------------------------


def open_session(path: Path, params: GenerateParams) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = params.intra_op_threads
    options.inter_op_num_threads = params.inter_op_threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@dataclass(frozen=True)
class LoadedModel:
    """What the engine runs: the session, the tokenizer and the model's facts."""

    session: Any
    tokenizer: ByteTokenizer
    info: ModelInfo

    @classmethod
    def from_folder(cls, folder: Path, params: GenerateParams) -> LoadedModel:
        """Loads `model_filename`, tokenizer.json and generation.json from one version folder."""
        folder = Path(folder)
        for name in (params.model_filename, "tokenizer.json", "generation.json"):
            if not (folder / name).is_file():
                raise ModelLoadError(
                    f"{name} not found in {folder} (the build publishes it: run `make build-engines`)"
                )
        info = ModelInfo.from_file(folder / "generation.json")
        tokenizer = ByteTokenizer.from_file(folder / "tokenizer.json", info.eos_token_id)
        return cls(open_session(folder / params.model_filename, params), tokenizer, info)


def default_params(**overrides: Any) -> GenerateParams:
    """GENERATE_PARAMS' defaults, with `overrides` (tests, benchmarks, in-process use)."""
    values = {p.name: p.default for p in GENERATE_PARAMS}
    values.update(overrides)
    return GenerateParams(**values)


def request_fields(inputs: Mapping[str, Any]) -> dict[str, Any]:
    """A request's optional fields from Triton input arrays (None when absent), as Python values."""
    def scalar(name: str) -> Any:
        array = inputs.get(name)
        if array is None:
            return None
        flat = np.asarray(array).reshape(-1)
        if flat.size != 1:
            raise GenerationError(f"{name} must hold one value, got {flat.size}")
        return flat[0].item()

    stop = inputs.get("stop")
    return {
        "max_tokens": scalar("max_tokens"),
        "temperature": scalar("temperature"),
        "top_k": scalar("top_k"),
        "top_p": scalar("top_p"),
        "seed": scalar("seed"),
        "stop": () if stop is None else tuple(np.asarray(stop).reshape(-1).tolist()),
        "stream": bool(scalar("stream")) if inputs.get("stream") is not None else False,
    }
