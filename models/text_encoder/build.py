"""Source stage of `text_encoder`: a WordPiece tokenizer and a small BERT-style encoder.

Corpus. Nothing is downloaded: the text is the docstrings of a fixed list of Python
standard-library modules (the module's own docstring and those of the classes, functions, methods
and properties it defines, read from `__doc__` so nothing is inherited from another module). Each
docstring is cleaned (`inspect.cleandoc`) and split at blank lines into paragraphs; a paragraph
holding code (an indented, `>>>` or reST `..` line) is dropped, the rest have their whitespace
collapsed and are kept when they are `MIN_TEXT_CHARS`..`MAX_TEXT_CHARS` long with at least
`MIN_TEXT_WORDS` words. The texts are therefore fixed for a Python version (the build's source
hash records it; a few training modules, such as subprocess, define platform-specific functions,
so the training pool may also differ between operating systems), and they are English technical
prose, the kind of text the served model would embed.

Three disjoint module lists give three disjoint pools of texts:
    `TRAINING_MODULES`     the tokenizer's training corpus
    `EVALUATION_MODULES`   `held_out().inputs`: the evaluation texts (`source.eval_texts` drawn)
    `CALIBRATION_MODULES`  `held_out().calibration`: INT8 calibration (`source.calibration_texts`)
Disjoint modules alone would not make disjoint texts (two modules may share a sentence), so the
pools are also de-duplicated across: an evaluation text is removed from the other two pools, a
calibration text from the training pool. On Python 3.11 the pools hold 2,819 training (about
300,000 characters), 396 evaluation and 225 calibration texts. The tokenizer never sees an
evaluation or calibration text (and the weights see no text at all: see "Seeded weights,
untrained").

Tokenizer. `train_tokenizer` trains a WordPiece vocabulary of `source.vocab_size` with HF
`tokenizers` (BERT normalizer with lowercasing, BERT pre-tokenizer, special tokens
`SPECIAL_TOKENS` with [PAD] = 0, "[CLS] ... [SEP]" post-processing, truncation at
`source.max_length`, padding to the longest text of a batch), made deterministic around a known
`tokenizers` bug (see `fit_tokenizer`). `extra_files` saves it as
`tokenizer.json` and `vocab.txt`, which the pipeline publishes beside `model.onnx` for the
text-preprocessing backend.

Model. `TextEncoder` is written in plain torch so the exported graph is exactly what is written
here (no fused `nn.TransformerEncoder` fast path): token + learned position embeddings and a
LayerNorm, then `source.layers` post-LayerNorm blocks of multi-head self-attention and a GELU
feed-forward. The attention mask enters as an additive bias of `MASK_BIAS` on padded keys: finite
and representable in FP16, so an FP16 variant neither overflows to -inf nor computes 0 * inf = NaN.

Seeded weights, untrained. The weights are BERT's initialisation (normal(0, `INIT_STD`), seeded
by `source.seed`) and are not trained. Masked-language-model training was tried and left out: on
this two-core machine 200 steps (batch 32) took minutes, brought the loss only from 8.3 (ln 4096)
to 6.1, i.e. to predicting word frequencies, and in doing so collapsed every token embedding onto
one direction (pooled embeddings of unrelated texts had cosine similarity 1.000 to each other), so
the cosine metric below could no longer tell a correct variant from a broken one. The untrained
encoder is a faithful serving workload (a transformer's shapes, ops and cost, distinct embeddings
per text: mean pairwise cosine about 0.4) but not a useful sentence-embedding model.

Metric. "cosine similarity to FP32": per evaluation text, the cosine similarity between the
mask-mean-pooled embeddings of a candidate's outputs and of the FP32 PyTorch model's (the pooling
the `kiln_pool` postprocess does), averaged over texts. Padding positions never enter it.

The stage interface the pipeline uses (see `kiln.build.pipeline.SourceStage`): `train`,
`save_checkpoint`, `held_out`, and the optional `extra_files`. For the text-preprocessing side:
`load_tokenizer` and `encode`.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import math
import platform
import random
import re
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from torch import nn

from kiln.build.check import HeldOut
from kiln.build.publish import (
    load_state_dict,
    save_state_dict,
    write_bytes_atomic,
)
from kiln.build.training import seeded
from kiln.spec import ModelSpec

from .spec import TextEncoderSource

Progress = Callable[[str], None]

# --- corpus ---------------------------------------------------------------------------------------

TRAINING_MODULES = (
    "argparse", "asyncio.base_events", "asyncio.events", "asyncio.streams", "asyncio.tasks",
    "base64", "bdb", "codecs", "collections", "concurrent.futures._base", "configparser",
    "contextlib", "doctest", "enum", "ftplib", "functools", "http.client", "imaplib", "inspect",
    "json", "json.decoder", "locale", "logging", "logging.handlers", "mailbox", "numbers",
    "pathlib", "platform", "pydoc", "queue", "random", "selectors", "shutil", "smtplib", "socket",
    "subprocess", "tarfile", "tempfile", "textwrap", "threading", "traceback", "unittest.case",
    "unittest.mock", "urllib.parse", "urllib.request", "warnings", "xmlrpc.client",
    "xmlrpc.server", "zipfile",
)
"""Modules whose docstrings train the tokenizer (never evaluated or calibrated on)."""
EVALUATION_MODULES = ("difflib", "http.server", "statistics", "xml.etree.ElementTree")
"""Modules whose docstrings are the evaluation texts (never trained or calibrated on)."""
CALIBRATION_MODULES = ("email.message", "ipaddress", "pdb")
"""Modules whose docstrings calibrate INT8."""
MIN_TEXT_CHARS = 40
"""Shorter paragraphs are mostly headings and fragments ("Return the value.")."""
MAX_TEXT_CHARS = 400
"""Longer paragraphs are cut at `max_length` tokens anyway; this keeps most texts whole."""
MIN_TEXT_WORDS = 6
_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")
_CODE_LINE_PREFIXES = (" ", "\t", ">>>", "..")
"""A paragraph with a line starting like this holds code, a literal block or a reST directive."""


class CorpusError(RuntimeError):
    """The offline corpus cannot be assembled or holds too few texts for the spec."""


def _documented_objects(module: Any) -> list[Any]:
    """The module and the classes, functions, methods and properties it defines, in name order."""
    found: list[Any] = [module]
    for name in sorted(vars(module)):
        value = vars(module)[name]
        if not (inspect.isclass(value) or inspect.isfunction(value)):
            continue
        if getattr(value, "__module__", None) != module.__name__:
            continue  # imported from elsewhere: its text belongs to another module
        found.append(value)
        if inspect.isclass(value):
            for member_name in sorted(vars(value)):
                member = vars(value)[member_name]
                if isinstance(member, (staticmethod, classmethod)):
                    member = member.__func__
                if inspect.isfunction(member) or isinstance(member, property):
                    found.append(member)
    return found


def paragraphs(docstring: str) -> list[str]:
    """The prose paragraphs of one docstring, whitespace-normalized and length-filtered."""
    texts = []
    for block in _PARAGRAPH_BREAK.split(inspect.cleandoc(docstring)):
        lines = block.strip("\n").splitlines()
        if not lines or any(line.startswith(_CODE_LINE_PREFIXES) for line in lines):
            continue
        text = " ".join(block.split())
        if MIN_TEXT_CHARS <= len(text) <= MAX_TEXT_CHARS and len(text.split()) >= MIN_TEXT_WORDS:
            texts.append(text)
    return texts


def module_texts(module_name: str) -> list[str]:
    """Every prose paragraph of the docstrings of one standard-library module, in order.

    Raises:
        CorpusError: the module cannot be imported (a Python built without it).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            module = importlib.import_module(module_name)
        except ImportError as error:
            raise CorpusError(
                f"the text corpus needs the standard-library module {module_name!r}, which this "
                f"Python cannot import: {error}"
            ) from error
        texts = []
        for obj in _documented_objects(module):
            doc = getattr(obj, "__doc__", None)
            if isinstance(doc, str):
                texts.extend(paragraphs(doc))
    return texts


def _pool(modules: Iterable[str], exclude: Iterable[str] = ()) -> tuple[str, ...]:
    """The unique texts of `modules` not in `exclude`, sorted (independent of module order)."""
    excluded = set(exclude)
    return tuple(sorted({t for m in modules for t in module_texts(m)} - excluded))


@dataclass(frozen=True)
class Corpus:
    """The three disjoint text pools (each sorted, de-duplicated).

    Attributes:
        training: Trains the tokenizer.
        evaluation: Evaluation texts are drawn from it.
        calibration: INT8 calibration texts are drawn from it.
    """

    training: tuple[str, ...]
    evaluation: tuple[str, ...]
    calibration: tuple[str, ...]


@functools.lru_cache(maxsize=1)
def load_corpus() -> Corpus:
    """The corpus, assembled once per process (see the module docstring)."""
    evaluation = _pool(EVALUATION_MODULES)
    calibration = _pool(CALIBRATION_MODULES, exclude=evaluation)
    training = _pool(TRAINING_MODULES, exclude=(*evaluation, *calibration))
    return Corpus(training=training, evaluation=evaluation, calibration=calibration)


def _draw(pool: tuple[str, ...], count: int, seed: int, field_name: str) -> tuple[str, ...]:
    if count > len(pool):
        raise CorpusError(
            f"field 'build.source.{field_name}' asks for {count} texts but the offline corpus has "
            f"{len(pool)}; use at most {len(pool)}"
        )
    return tuple(random.Random(seed).sample(pool, count))


def evaluation_texts(source: TextEncoderSource) -> tuple[str, ...]:
    """`source.eval_texts` texts drawn with `source.seed` from the evaluation pool."""
    return _draw(load_corpus().evaluation, source.eval_texts, source.seed, "eval_texts")


def calibration_texts(source: TextEncoderSource) -> tuple[str, ...]:
    """`source.calibration_texts` texts drawn with `source.seed` from the calibration pool."""
    return _draw(load_corpus().calibration, source.calibration_texts, source.seed, "calibration_texts")


# --- tokenizer ------------------------------------------------------------------------------------

PAD_TOKEN = "[PAD]"
UNK_TOKEN = "[UNK]"
CLS_TOKEN = "[CLS]"
SEP_TOKEN = "[SEP]"
MASK_TOKEN = "[MASK]"
SPECIAL_TOKENS = (PAD_TOKEN, UNK_TOKEN, CLS_TOKEN, SEP_TOKEN, MASK_TOKEN)
"""In id order: [PAD] is 0, the id `kiln.tensors.TEXT_INPUT_IDS` pads with."""
PAD_ID = 0
TOKENIZER_FILE = "tokenizer.json"
VOCAB_FILE = "vocab.txt"
CONTINUING_SUBWORD_PREFIX = "##"
MIN_ENCODED_LENGTH = 3
"""The shortest useful truncation: [CLS], one token, [SEP]."""


def _untrained_tokenizer(vocab: dict[str, int] | None = None) -> Tokenizer:
    """A BERT-style WordPiece pipeline: normalizer, pre-tokenizer, model (empty or `vocab`), decoder."""
    tokenizer = Tokenizer(
        models.WordPiece(vocab, unk_token=UNK_TOKEN, continuing_subword_prefix=CONTINUING_SUBWORD_PREFIX)
    )
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece(prefix=CONTINUING_SUBWORD_PREFIX)
    return tokenizer


def _continuing_subword_alphabet(tokenizer: Tokenizer, texts: Iterable[str]) -> list[str]:
    """"##c" for every character c that follows another inside a (normalized, pre-tokenized) word
    of `texts`, sorted: the single-character continuing subwords the trainer creates."""
    assert tokenizer.normalizer is not None and tokenizer.pre_tokenizer is not None
    chars: set[str] = set()
    for text in texts:
        normalized = tokenizer.normalizer.normalize_str(text)
        for word, _ in tokenizer.pre_tokenizer.pre_tokenize_str(normalized):
            chars.update(word[1:])
    return [CONTINUING_SUBWORD_PREFIX + c for c in sorted(chars)]


def fit_tokenizer(texts: Sequence[str], vocab_size: int, max_length: int) -> Tokenizer:
    """Trains a WordPiece tokenizer of at most `vocab_size` tokens on `texts`, deterministically.

    `tokenizers`' WordPiece trainer is not deterministic on its own (huggingface/tokenizers issue
    #1794): it numbers the "##c" continuing-subword tokens in hash-map order, and those ids break
    ties between merges of equal count, so two runs on the same texts can learn different
    vocabularies. Here those tokens are handed to the trainer up front, in sorted order (as special
    tokens, which fixes their ids), which makes training deterministic; the trained vocabulary is
    then loaded into a fresh WordPiece model whose only special tokens are `SPECIAL_TOKENS`.

    Returns:
        The tokenizer: lowercasing BERT normalizer and pre-tokenizer, [CLS] ... [SEP], truncation
        at `max_length`, padding to the longest text of a batch with [PAD] (id 0).

    Raises:
        CorpusError: `vocab_size` is too small for the special tokens and the corpus's characters,
            or the special tokens did not get the ids 0..4.
    """
    trainer_tokenizer = _untrained_tokenizer()
    subword_alphabet = _continuing_subword_alphabet(trainer_tokenizer, texts)
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size,
        special_tokens=[*SPECIAL_TOKENS, *subword_alphabet],
        continuing_subword_prefix=CONTINUING_SUBWORD_PREFIX,
        show_progress=False,
    )
    trainer_tokenizer.train_from_iterator(texts, trainer=trainer)
    vocab = trainer_tokenizer.get_vocab(with_added_tokens=False)
    if len(vocab) > vocab_size:
        raise CorpusError(
            f"a vocabulary of {vocab_size} tokens cannot hold the {len(vocab)} special tokens and "
            f"single characters of the corpus; field 'build.source.vocab_size' must be at least "
            f"{len(vocab)}"
        )
    tokenizer = _untrained_tokenizer(vocab)
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    ids = {token: tokenizer.token_to_id(token) for token in SPECIAL_TOKENS}
    if list(ids.values()) != list(range(len(SPECIAL_TOKENS))):
        raise CorpusError(
            f"the trained tokenizer's special-token ids are {ids}, expected 0..{len(SPECIAL_TOKENS) - 1}"
        )
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{CLS_TOKEN} $A {SEP_TOKEN}",
        pair=f"{CLS_TOKEN} $A {SEP_TOKEN} $B:1 {SEP_TOKEN}:1",
        special_tokens=[(CLS_TOKEN, ids[CLS_TOKEN]), (SEP_TOKEN, ids[SEP_TOKEN])],
    )
    tokenizer.enable_truncation(max_length)
    tokenizer.enable_padding(pad_id=PAD_ID, pad_token=PAD_TOKEN)
    return tokenizer


@functools.lru_cache(maxsize=4)
def _tokenizer_json(vocab_size: int, max_length: int) -> str:
    """The tokenizer trained on the training pool, serialized (cached: held_out, extra_files and
    train all need it)."""
    return fit_tokenizer(load_corpus().training, vocab_size, max_length).to_str()


def train_tokenizer(source: TextEncoderSource) -> Tokenizer:
    """A WordPiece tokenizer of `source.vocab_size` trained on the training pool.

    It lowercases, adds [CLS] ... [SEP], truncates at `source.max_length` tokens and pads a batch
    to its longest text with [PAD] (id 0). The same source gives the same tokenizer.
    """
    return Tokenizer.from_str(_tokenizer_json(source.vocab_size, source.max_length))


def save_tokenizer(tokenizer: Tokenizer, folder: Path) -> dict[str, Path]:
    """Writes `tokenizer.json` and `vocab.txt` (one token a line, in id order) into `folder`.

    Returns:
        File name -> written path.
    """
    folder = Path(folder)
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    by_id = sorted(vocab.items(), key=lambda item: item[1])
    if [i for _, i in by_id] != list(range(len(by_id))):
        raise CorpusError("the tokenizer's vocabulary ids are not 0..N-1 without gaps")
    files = {
        TOKENIZER_FILE: write_bytes_atomic(folder / TOKENIZER_FILE, tokenizer.to_str().encode()),
        VOCAB_FILE: write_bytes_atomic(
            folder / VOCAB_FILE, "".join(f"{token}\n" for token, _ in by_id).encode()
        ),
    }
    return files


def load_tokenizer(path: Path | str) -> Tokenizer:
    """The tokenizer saved at `path` (a `tokenizer.json`, or the folder holding one).

    Raises:
        FileNotFoundError: no tokenizer.json there.
    """
    path = Path(path)
    if path.is_dir():
        path = path / TOKENIZER_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no tokenizer at {path}; run `kiln build` first")
    return Tokenizer.from_file(str(path))


def encode(tokenizer: Tokenizer, texts: Sequence[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and attention mask of `texts`, padded with [PAD] to the longest one.

    Each text becomes [CLS] tokens [SEP], truncated to `max_length` tokens (the [SEP] kept). The
    tokenizer passed in is not changed: its truncation and padding are set on a copy.

    Returns:
        (input_ids, attention_mask), both int64 [len(texts), longest]; the mask is 1 on real
        tokens and 0 on padding.
    """
    if not texts:
        raise ValueError("encode() needs at least one text, got none")
    if max_length < MIN_ENCODED_LENGTH:
        raise ValueError(
            f"max_length must be at least {MIN_ENCODED_LENGTH} ([CLS], a token, [SEP]), got {max_length}"
        )
    local = Tokenizer.from_str(tokenizer.to_str())
    local.enable_truncation(max_length)
    local.enable_padding(pad_id=PAD_ID, pad_token=PAD_TOKEN)
    encodings = local.encode_batch(list(texts))
    input_ids = np.array([e.ids for e in encodings], dtype=np.int64)
    attention_mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
    return input_ids, attention_mask


# --- model ----------------------------------------------------------------------------------------

INIT_STD = 0.02
"""BERT's initializer range: weights ~ normal(0, 0.02), biases 0, LayerNorm 1 and 0."""
LAYER_NORM_EPS = 1e-5
"""PyTorch's default; BERT's 1e-12 is below FP16's smallest subnormal."""
MASK_BIAS = -1e4
"""Added to attention scores of padded keys: exp(-1e4) is 0 in FP32 and FP16 alike, and -1e4 is
representable in FP16 (finfo(float32).min would overflow to -inf there)."""


class SelfAttention(nn.Module):
    """Multi-head self-attention with an additive key bias."""

    def __init__(self, hidden_size: int, heads: int) -> None:
        super().__init__()
        if hidden_size % heads:
            raise ValueError(f"heads ({heads}) must divide hidden_size ({hidden_size})")
        self.heads = heads
        self.head_size = hidden_size // heads
        self.scale = 1.0 / math.sqrt(self.head_size)
        self.query = nn.Linear(hidden_size, hidden_size)
        self.key = nn.Linear(hidden_size, hidden_size)
        self.value = nn.Linear(hidden_size, hidden_size)
        self.output = nn.Linear(hidden_size, hidden_size)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        """[batch, seq, hidden] -> [batch, heads, seq, head_size]."""
        return x.reshape(x.shape[0], x.shape[1], self.heads, self.head_size).transpose(1, 2)

    def forward(self, hidden: torch.Tensor, key_bias: torch.Tensor) -> torch.Tensor:
        """Attends over `hidden` [batch, seq, hidden]; `key_bias` [batch, 1, 1, seq] is added to
        the scores (0 for real keys, `MASK_BIAS` for padding)."""
        query = self._split(self.query(hidden) * self.scale)
        key = self._split(self.key(hidden))
        value = self._split(self.value(hidden))
        probs = torch.softmax(query @ key.transpose(-1, -2) + key_bias, dim=-1)
        context = (probs @ value).transpose(1, 2)
        return self.output(context.reshape(hidden.shape))


class EncoderLayer(nn.Module):
    """BERT's post-LayerNorm block: attention, residual, LayerNorm; GELU MLP, residual, LayerNorm."""

    def __init__(self, hidden_size: int, heads: int, intermediate_size: int) -> None:
        super().__init__()
        self.attention = SelfAttention(hidden_size, heads)
        self.attention_norm = nn.LayerNorm(hidden_size, eps=LAYER_NORM_EPS)
        self.intermediate = nn.Linear(hidden_size, intermediate_size)
        self.activation = nn.GELU()
        self.feed_forward_output = nn.Linear(intermediate_size, hidden_size)
        self.output_norm = nn.LayerNorm(hidden_size, eps=LAYER_NORM_EPS)

    def forward(self, hidden: torch.Tensor, key_bias: torch.Tensor) -> torch.Tensor:
        hidden = self.attention_norm(hidden + self.attention(hidden, key_bias))
        inner = self.activation(self.intermediate(hidden))
        return self.output_norm(hidden + self.feed_forward_output(inner))


class TextEncoder(nn.Module):
    """input_ids, attention_mask (int64 [batch, seq]) -> token_embeddings (FP32 [batch, seq, hidden]).

    The tensor contract of `kiln.tensors.TEXT_*`. `seq` may be anything up to `max_length` (the
    number of position embeddings); padded positions get embeddings too, but no real token attends
    to them, so a text's real-token embeddings do not depend on how far it is padded.
    """

    def __init__(
        self,
        vocab_size: int,
        hidden_size: int,
        layers: int,
        heads: int,
        intermediate_size: int,
        max_length: int,
    ) -> None:
        super().__init__()
        self.token_embeddings = nn.Embedding(vocab_size, hidden_size)
        self.position_embeddings = nn.Embedding(max_length, hidden_size)
        self.embedding_norm = nn.LayerNorm(hidden_size, eps=LAYER_NORM_EPS)
        self.layers = nn.ModuleList(
            EncoderLayer(hidden_size, heads, intermediate_size) for _ in range(layers)
        )
        self.apply(_init_weights)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        # arange (ONNX Range) rather than slicing a buffer, and the mask reshaped to the ids' shape:
        # both keep one symbolic sequence dim through the graph, which ONNX Runtime's symbolic
        # shape inference (run by quant_pre_process before INT8 quantization) needs.
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        hidden = self.token_embeddings(input_ids) + self.position_embeddings(positions)
        hidden = self.embedding_norm(hidden)
        mask = attention_mask.reshape(input_ids.shape).to(hidden.dtype)
        key_bias = (1.0 - mask[:, None, None, :]) * MASK_BIAS
        for layer in self.layers:
            hidden = layer(hidden, key_bias)
        return hidden


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=INIT_STD)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
    if isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def build_model(source: TextEncoderSource) -> TextEncoder:
    """The encoder with the source's dims and BERT-style initial weights drawn from the global
    RNG (`train` seeds a forked one)."""
    return TextEncoder(
        vocab_size=source.vocab_size,
        hidden_size=source.hidden_size,
        layers=source.layers,
        heads=source.heads,
        intermediate_size=source.intermediate_size,
        max_length=source.max_length,
    )


def train(source: TextEncoderSource, progress: Progress | None = None) -> TextEncoder:
    """The encoder with seeded, untrained BERT-style weights, in eval mode.

    No training happens (see the module docstring for why); the name is the stage interface's.
    The tokenizer is trained here too, so a bad corpus fails the "train" stage, and the progress
    lines report the corpus and vocabulary sizes. The caller's global RNG is left as it was.

    Args:
        source: Model dims and the seed of the weights.
        progress: Receives one line on the corpus, one on the tokenizer, one on the model.
    """
    say = progress or (lambda line: None)
    corpus = load_corpus()
    say(
        f"corpus: {len(corpus.training)} tokenizer-training, {len(corpus.evaluation)} evaluation "
        f"and {len(corpus.calibration)} calibration texts (Python {platform.python_version()} "
        "standard-library docstrings; disjoint)"
    )
    tokenizer = train_tokenizer(source)
    say(f"tokenizer: WordPiece, {tokenizer.get_vocab_size()} tokens, max_length {source.max_length}")
    with seeded(source.seed):
        model = build_model(source)
    params = sum(p.numel() for p in model.parameters())
    say(
        f"model: {source.layers} layers, hidden {source.hidden_size}, {source.heads} heads, "
        f"{params:,} parameters, seeded (seed {source.seed}), untrained"
    )
    return model.eval()


save_checkpoint = save_state_dict
"""SourceStage: saves the weights (state_dict), atomically."""


def load_trained(
    spec: ModelSpec, artifacts: Path | None = None, checkpoint: Path | None = None
) -> TextEncoder:
    """The trained encoder from its checkpoint, in eval mode.

    Args:
        spec: The model's spec (its source gives the dims; its name, the checkpoint).
        artifacts: The artifacts folder; `kiln.paths.artifacts_dir()` when None.
        checkpoint: A checkpoint file to load instead of the spec's.

    Raises:
        FileNotFoundError: no checkpoint; run the build first.
    """
    assert spec.build is not None and isinstance(spec.build.source, TextEncoderSource)
    _, state = load_state_dict(checkpoint if checkpoint is not None else spec, artifacts)
    model = build_model(spec.build.source)
    model.load_state_dict(state)
    return model.eval()


# --- held-out data and metric ---------------------------------------------------------------------

METRIC = "cosine similarity to FP32"
WORST_COSINE = -1.0
"""The score of a text whose pooled embedding is not finite (NaN or infinity in the outputs)."""


def mean_pool(token_embeddings: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    """Mean of the real tokens' embeddings per text: [batch, seq, hidden] -> [batch, hidden] (FP64).

    This is what the `kiln_pool` postprocess computes; padding positions never enter it.
    """
    weights = np.asarray(attention_mask, dtype=np.float64)[..., np.newaxis]
    summed = (np.asarray(token_embeddings, dtype=np.float64) * weights).sum(axis=1)
    return summed / np.maximum(weights.sum(axis=1), 1.0)


def pooled_cosine(
    outputs: np.ndarray, reference: np.ndarray, attention_mask: np.ndarray
) -> np.ndarray:
    """Per text, the cosine similarity of the mean-pooled `outputs` and `reference` embeddings.

    A text whose pooled vectors are not finite, or zero, scores `WORST_COSINE`.
    """
    a = mean_pool(outputs, attention_mask)
    b = mean_pool(reference, attention_mask)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
        cosine = (a * b).sum(axis=1) / norms
    return np.where(np.isfinite(cosine) & (norms > 0), cosine, WORST_COSINE)


def held_out(source: TextEncoderSource) -> HeldOut:
    """Evaluation and calibration texts, tokenized and padded, scored by pooled cosine to FP32.

    `inputs` and `calibration` are (input_ids, attention_mask), each int64 [texts, longest]: one
    padded array per set (every text padded to the set's longest), so the pipeline can cut it into
    batches along axis 0. The metric is the mean over texts of `pooled_cosine`.
    """
    tokenizer = train_tokenizer(source)
    inputs = encode(tokenizer, evaluation_texts(source), source.max_length)
    calibration = encode(tokenizer, calibration_texts(source), source.max_length)
    mask = inputs[1]

    def score(outputs: Sequence[np.ndarray], reference: Sequence[np.ndarray]) -> float:
        return float(np.mean(pooled_cosine(outputs[0], reference[0], mask)))

    return HeldOut(inputs=inputs, calibration=calibration, metric=METRIC, score=score)


def extra_files(source: TextEncoderSource, model: nn.Module | None, workdir: Path) -> dict[str, Path]:
    """The tokenizer whose ids the model takes, saved into `workdir` for publishing.

    The tokenizer depends on the source only (not on the weights), so `model` is not used.

    Returns:
        {"tokenizer.json": path, "vocab.txt": path}
    """
    del model
    return save_tokenizer(train_tokenizer(source), Path(workdir))
