"""The kiln_text backend's logic: UTF-8 texts -> token ids and attention mask, without Triton.

`TextTokenizer` runs a whole dynamic batch through one `encode_batch` call of the HF `tokenizers`
library, with the `tokenizer.json` the build published beside the encoder (see
`kiln.models.text_encoder.build`): each text becomes [CLS] tokens [SEP], truncated at `max_length`
tokens (the [SEP] kept), and each request's rows are padded with the tokenizer's [PAD] id to the
longest text of that request. That is exactly `kiln.models.text_encoder.build.encode` (the encoding the
build evaluated the model with) applied to each request's texts.

Every text is checked before it is tokenized; a bad one is its request's error, naming the item:
an empty or whitespace-only text, one that keeps no token after normalization (only control
characters, say), invalid UTF-8 (naming the byte), or a text over `max_text_bytes`. A text merely
longer than `max_length` tokens is truncated (or, with `truncation` off, is its request's error).

Only numpy and `tokenizers` are imported: no torch, no Triton.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from kiln import tensors
from kiln.serving.errors import ModelLoadError, RequestError
from kiln.serving.params import Param, parse_params

if TYPE_CHECKING:
    from tokenizers import Encoding, Tokenizer

    from kiln.serving.adapter import Inputs, LoadContext, Outputs

MIN_MAX_LENGTH = 3
"""The shortest useful `max_length`: [CLS], one token, [SEP]."""

TEXT_PARAMS: tuple[Param, ...] = (
    Param(
        "tokenizer_model", "name", "text_encoder",
        "repository model whose newest version folder holds the tokenizer file the build published",
    ),
    Param("tokenizer_file", "name", "tokenizer.json", "the HF tokenizers file in that folder"),
    Param(
        "max_length", "int", 128,
        "longest token sequence, [CLS] and [SEP] included (the encoder's position embeddings)",
        minimum=MIN_MAX_LENGTH,
    ),
    Param(
        "max_text_bytes", "int", 16384,
        "longest text accepted, in UTF-8 bytes; a longer one is its request's error", minimum=1,
    ),
    Param(
        "truncation", "bool", True,
        "cut texts longer than max_length tokens (keeping [SEP]); off: such a text is an error",
    ),
    Param("pad_token", "str", "[PAD]", "the token whose id pads the rows of a request"),
    Param(
        "length_buckets", "ints", (),
        "padded lengths, increasing, each 3..max_length (e.g. 16,32,64): a request is padded to "
        "the smallest one holding its longest text (max_length is the last); absent: to its longest",
        minimum=MIN_MAX_LENGTH,
    ),
    Param(
        "pad_batch", "bool", False,
        "pad every request of a dynamic batch to one length: the bucket of the batch's longest text",
    ),
)
"""kiln_text's `parameters` (config.pbtxt), all optional. The rules across keys (`length_buckets`
against `max_length`) are `check_text_params`'."""


@dataclass(frozen=True)
class TextParams:
    """kiln_text's `parameters`, parsed (see TEXT_PARAMS for each key's meaning)."""

    tokenizer_model: str
    tokenizer_file: str
    max_length: int
    max_text_bytes: int
    truncation: bool
    pad_token: str
    length_buckets: tuple[int, ...]
    pad_batch: bool


class TextInputError(RequestError):
    """A text of a request cannot be tokenized; the message names the input, the item and why.

    Attributes:
        reason: The label of the failure metric ("empty_text", "invalid_utf8", "text_too_long",
            "too_many_tokens", "bad_input").
    """

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class TextLoadError(ModelLoadError):
    """The tokenizer cannot be served as configured; the message names the model and the cause."""


def decode_text(raw: object, index: int, max_text_bytes: int, name: str = tensors.TEXT) -> str:
    """One item of a BYTES input as text, or TextInputError saying what is wrong with it.

    Args:
        raw: The item as the Python backend gives it (`bytes`; `str` is taken as already decoded).
        index: The item's index in its request (for the message).
        max_text_bytes: The longest text accepted, in UTF-8 bytes.
        name: The input's name (for the message).
    """
    where = f"input '{name}' item {index}"
    if isinstance(raw, str):
        data = raw.encode("utf-8", errors="surrogatepass")
    elif isinstance(raw, (bytes, bytearray, memoryview)):
        data = bytes(raw)
    else:
        raise TextInputError(
            f"{where} must be UTF-8 bytes, got a {type(raw).__name__}", "bad_input"
        )
    if len(data) > max_text_bytes:
        raise TextInputError(
            f"{where} is too long: {len(data)} bytes of UTF-8, over the limit of {max_text_bytes} "
            "bytes (parameter max_text_bytes)",
            "text_too_long",
        )
    if not data:
        raise TextInputError(f"{where} is an empty text; send at least one word", "empty_text")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        bad = data[error.start : error.end]
        raise TextInputError(
            f"{where} is not valid UTF-8: {error.reason} at byte {error.start} "
            f"(0x{bad.hex()}) of {len(data)}",
            "invalid_utf8",
        ) from None
    if not text.strip():
        raise TextInputError(
            f"{where} is only whitespace ({len(data)} bytes); send at least one word", "empty_text"
        )
    return text


def texts_of(inputs: Inputs, max_text_bytes: int, name: str = tensors.TEXT) -> list[str]:
    """The texts of one request's BYTES input [batch, 1], each checked by `decode_text`.

    Raises:
        TextInputError: the input is missing or malformed, or one of its texts is bad.
    """
    array = inputs.get(name)
    if array is None:
        raise TextInputError(f"missing input '{name}'", "bad_input")
    if array.ndim != 2 or array.shape[1] != 1 or array.shape[0] == 0:
        raise TextInputError(
            f"input '{name}' has shape {list(array.shape)}; expected [-1, 1] with at least one text",
            "bad_input",
        )
    return [decode_text(raw, i, max_text_bytes, name) for i, raw in enumerate(array[:, 0])]


def configure(tokenizer: Tokenizer, max_length: int, truncation: bool, pad_token: str) -> Tokenizer:
    """A copy of `tokenizer` set up as `kiln.models.text_encoder.build.encode` sets it up: truncation at
    `max_length` (when on) and padding to the longest text of a batch with `pad_token`'s id.

    Raises:
        TextLoadError: `pad_token` is not in the vocabulary, or `max_length` is below 3.
    """
    from tokenizers import Tokenizer

    if max_length < MIN_MAX_LENGTH:
        raise TextLoadError(
            f"max_length must be at least {MIN_MAX_LENGTH} ([CLS], a token, [SEP]), got {max_length}"
        )
    local = Tokenizer.from_str(tokenizer.to_str())
    pad_id = local.token_to_id(pad_token)
    if pad_id is None:
        raise TextLoadError(f"the tokenizer has no token {pad_token!r} (parameter pad_token)")
    if truncation:
        local.enable_truncation(max_length)
    else:
        local.no_truncation()
    local.enable_padding(pad_id=pad_id, pad_token=pad_token)
    return local


def parse_buckets(values: Sequence[int], max_length: int) -> tuple[int, ...]:
    """The parameter `length_buckets` as padded lengths, `max_length` always the last one; () when
    the parameter is absent (each request padded to its own longest text).

    The parameter's kind ("ints", minimum 3) already refuses an item that is not an integer or is
    below 3 (`kiln generate` and the load say so alike); the rules here need `max_length`.

    Args:
        values: The parameter's integers (`TextParams.length_buckets`).
        max_length: The longest token sequence; a bucket above it could never be filled.

    Raises:
        TextLoadError: an item is below 3 or above `max_length`, or the items are not strictly
            increasing.
    """
    given = ",".join(str(v) for v in values)
    buckets: list[int] = []
    for bucket in values:
        if not MIN_MAX_LENGTH <= bucket <= max_length:
            raise TextLoadError(
                f"parameter 'length_buckets' holds {bucket} in {given!r}; each bucket must be "
                f"between {MIN_MAX_LENGTH} and max_length {max_length}"
            )
        if buckets and bucket <= buckets[-1]:
            raise TextLoadError(
                f"parameter 'length_buckets' must be strictly increasing, got {given!r}"
            )
        buckets.append(bucket)
    if buckets and buckets[-1] != max_length:
        buckets.append(max_length)
    return tuple(buckets)


def check_text_params(model: str, values: Mapping[str, Any]) -> None:
    """The rules across kiln_text's parameters, which no one key's kind can check:
    `length_buckets` strictly increasing and within `max_length`. Run by `kiln.spec.validate`
    (`kiln generate`; through `kiln.spec.BACKEND_PARAM_RULES`) and by `load`, so both fail with
    one message.

    Args:
        model: The model's name (for the message).
        values: The parsed parameters (`check_params`' result, or a TextParams' fields).

    Raises:
        TextLoadError: naming the model, the key and the value.
    """
    try:
        parse_buckets(values["length_buckets"], values["max_length"])
    except TextLoadError as error:
        raise TextLoadError(f"model '{model}': {error}") from None


def bucket_of(longest: int, buckets: Sequence[int]) -> int:
    """The smallest bucket holding `longest` tokens; `longest` itself when none does (no buckets,
    or a text over max_length with truncation off, which is refused anyway)."""
    for bucket in buckets:
        if longest <= bucket:
            return bucket
    return longest


def real_tokens(encoding: Encoding) -> int:
    """Tokens of an encoding that are neither special ([CLS], [SEP]) nor padding."""
    return sum(
        1 for m, s in zip(encoding.attention_mask, encoding.special_tokens_mask, strict=True) if m and not s
    )


class TextTokenizer:
    """kiln_text: TEXT (BYTES [batch, 1], UTF-8) -> input_ids, attention_mask (INT64 [batch, seq]).

    `seq` is the token count of the request's longest text (never above `max_length`), rounded up
    to its length bucket when `length_buckets` is set (to the batch's longest, with `pad_batch`);
    shorter rows are padded with the [PAD] id and a mask of 0. A dynamic batch of requests is
    tokenized in one `encode_batch` call; a bad text fails its own request (naming the item),
    never the batch.
    """

    def __init__(self, tokenizer: Tokenizer, params: TextParams, model_name: str = "kiln_text") -> None:
        self.params = params
        self.model_name = model_name
        self.tokenizer = configure(tokenizer, params.max_length, params.truncation, params.pad_token)
        self.pad_id = int(self.tokenizer.token_to_id(params.pad_token))
        self.buckets = parse_buckets(params.length_buckets, params.max_length)

    @classmethod
    def from_file(cls, path: Path | str, params: TextParams, model_name: str = "kiln_text") -> TextTokenizer:
        """The step over the `tokenizer.json` at `path`.

        Raises:
            TextLoadError: the file is missing or not a tokenizer, or the params do not fit it.
        """
        from tokenizers import Tokenizer

        path = Path(path)
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as error:
            raise TextLoadError(f"model '{model_name}': cannot load the tokenizer {path}: {error}") from error
        try:
            return cls(tokenizer, params, model_name)
        except TextLoadError as error:
            raise TextLoadError(f"model '{model_name}': {error}") from error

    def encode(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray, list[int]]:
        """Tokenizes `texts` in one `encode_batch` call, padded to the longest of them.

        Returns:
            (input_ids, attention_mask), int64 [len(texts), longest], and each text's count of
            real tokens (not [CLS], [SEP] or padding).
        """
        encodings = self.tokenizer.encode_batch(list(texts))
        ids = np.array([e.ids for e in encodings], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
        return ids, mask, [real_tokens(e) for e in encodings]

    def run(self, requests: Sequence[Inputs]) -> list[Outputs | Exception]:
        """One dynamic batch: each request's (input_ids, attention_mask), or its error."""
        results: list[Outputs | Exception] = [RequestError("not run")] * len(requests)
        spans: list[tuple[int, int, int]] = []  # (request, first text, text count)
        texts: list[str] = []
        for index, request in enumerate(requests):
            try:
                own = texts_of(request, self.params.max_text_bytes)
            except TextInputError as error:
                results[index] = error
                continue
            spans.append((index, len(texts), len(own)))
            texts.extend(own)
        if not texts:
            return results
        ids, mask, counts = self.encode(texts)
        lengths = mask.sum(axis=1)
        good: list[tuple[int, slice, int]] = []  # (request, its rows, its padded length)
        for index, first, count in spans:
            rows = slice(first, first + count)
            try:
                self._check_tokens(lengths[rows], counts[rows])
            except TextInputError as error:
                results[index] = error
                continue
            good.append((index, rows, bucket_of(int(lengths[rows].max()), self.buckets)))
        if self.params.pad_batch and good:
            widest = max(seq for _, _, seq in good)
            good = [(index, rows, widest) for index, rows, _ in good]
        ids, mask = self._widened(ids, mask, max((seq for _, _, seq in good), default=0))
        for index, rows, seq in good:
            results[index] = {
                tensors.TEXT_INPUT_IDS: np.ascontiguousarray(ids[rows, :seq]),
                tensors.TEXT_ATTENTION_MASK: np.ascontiguousarray(mask[rows, :seq]),
            }
        return results

    def _widened(self, ids: np.ndarray, mask: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
        """`ids` and `mask` with [PAD] / 0 columns appended up to `width` (a bucket may be longer
        than the batch's longest text); unchanged when they are already that wide."""
        extra = width - ids.shape[1]
        if extra <= 0:
            return ids, mask
        rows = ids.shape[0]
        return (
            np.concatenate([ids, np.full((rows, extra), self.pad_id, dtype=ids.dtype)], axis=1),
            np.concatenate([mask, np.zeros((rows, extra), dtype=mask.dtype)], axis=1),
        )

    def _check_tokens(self, lengths: np.ndarray, counts: Sequence[int]) -> None:
        for item, (length, count) in enumerate(zip(lengths, counts, strict=True)):
            if count == 0:
                raise TextInputError(
                    f"input '{tensors.TEXT}' item {item} has no token left after normalization "
                    "(only control, zero-width or replacement characters); send at least one word",
                    "empty_text",
                )
            if length > self.params.max_length:
                raise TextInputError(
                    f"input '{tensors.TEXT}' item {item} is {int(length)} tokens long, over "
                    f"max_length {self.params.max_length}, and truncation is off",
                    "too_many_tokens",
                )


def check_config(model: str, config: Mapping[str, Any]) -> None:
    """The model config must declare kiln_text's tensors: TEXT BYTES in, ids and mask INT64 out.

    Raises:
        TextLoadError: naming the tensor that is missing or of another type.
    """
    want = {
        "input": {tensors.TEXT: "TYPE_STRING"},
        "output": {tensors.TEXT_INPUT_IDS: "TYPE_INT64", tensors.TEXT_ATTENTION_MASK: "TYPE_INT64"},
    }
    for role, expected in want.items():
        declared = {t["name"]: t.get("data_type") for t in config.get(role, ())}
        for name, dtype in expected.items():
            # Triton's JSON names BYTES "TYPE_STRING".
            if declared.get(name) not in (dtype, dtype.replace("TYPE_STRING", "TYPE_BYTES")):
                raise TextLoadError(
                    f"model '{model}': config.pbtxt must declare {role} '{name}' of {dtype}; "
                    f"its {role}s are {declared or 'none'}"
                )


def load(context: LoadContext) -> TextTokenizer:
    """Builds the step from the model's config: parameters, then the published tokenizer."""
    params = parse_params(context.model_name, context.parameters, TEXT_PARAMS, TextParams)
    check_text_params(context.model_name, asdict(params))
    check_config(context.model_name, context.config)
    path = context.artifact(params.tokenizer_model, params.tokenizer_file)
    return TextTokenizer.from_file(path, params, context.model_name)
