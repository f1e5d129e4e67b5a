"""Source stage of `tinylm`: corpus, byte-level BPE tokenizer, decoder, held-out perplexity, checks.

Corpus. Nothing is downloaded: the text is `pydoc_data.topics.topics`, the documentation topics
Python's `help()` shows (79 topics, about 465,000 characters on Python 3.11: the language
reference's sections and the built-in types' pages), so it is fixed for a Python version (the
build's source hash records it). `split_topics` splits the topics, never a topic, into three
disjoint sets by a seeded rule: the topic names, sorted and shuffled with `source.seed`, are walked
in that order and each goes to evaluation if evaluation then still holds at most
`source.eval_share` of all characters, else to calibration if that then holds at most
`source.calibration_share`, else to training (on 3.11 with seed 0: 51 training topics, 395,567
characters; 14 evaluation, 46,299; 14 calibration, 23,104). No text is shared between the sets,
so the held-out perplexity measures text the tokenizer and the model never saw. Each set is one
token stream: every topic (in name order) encoded on its own and followed by `<|endoftext|>`, so
the model learns to end.

Tokenizer. `fit_tokenizer` trains a byte-level BPE of `source.vocab_size` tokens with HF
`tokenizers` on the training topics only: ByteLevel pre-tokenizer (GPT-2's split, no prefix
space) and decoder, the 256 byte symbols as the initial alphabet (so any text encodes), the special
token `<|endoftext|>` as id 0. BPE training came out deterministic (three processes with
different hash seeds trained the same vocabulary, and a test trains it twice): unlike WordPiece
(see `kiln.models.text_encoder.build.fit_tokenizer`) it needs no workaround. On 3.11 the
1,024-token vocabulary makes the training stream 135,663 tokens (2.9 characters a token), the
evaluation stream 15,111 and the calibration stream 8,175. `extra_files` publishes it as
`tokenizer.json`, with `generation.json` (`generation_config`): the facts a generation engine
needs (end-of-text id, vocabulary, context, layers, heads, head dim; no beginning-of-sequence
token: a prompt is encoded as is).

Model. `TinyLM` is a GPT-style decoder in plain torch, so the exported graph is exactly what is
written here: token + learned position embeddings (from `position_ids` only, never from a tensor
index), `source.layers` pre-LayerNorm blocks (causal multi-head self-attention with the KV cache,
GELU MLP), a final LayerNorm, and an output head tied to the token embeddings. Attention takes
the keys and values of `past_key_values` concatenated with this call's (returned as `present`);
a key is masked by adding `MASK_BIAS` (finite) to its score where it lies after the query or where
`attention_mask` is 0. Initialization is GPT-2's (normal(0, 0.02); residual projections scaled by
1/sqrt(2 * layers)).

Training. AdamW (betas 0.9/0.95, weight decay on matrices only), linear warmup then cosine decay,
gradient clipping at 1.0, on `source.batch_size` windows of `max_context + 1` tokens drawn at
seeded random offsets of the training stream, through the same `forward` that is exported (mask of
ones, positions 0.., empty past). Seeded and deterministic (`kiln.build.training.seeded`) on
`TRAIN_THREADS` threads. Measured here (AMD EPYC, 2 cores, otherwise idle): the spec's 900 steps
of 8 x 256 tokens (1.8 M tokens, about 14 passes over the training stream) take 77 s, about 85 ms a
step (forward 30, backward 48: matrix products, so only fewer FLOPs would make it faster); the
whole build of the model (train, export, check, INT8, verify) 93 s. CI builds it on every `make
test`, hence the size: within about 90 s of training a small model reaches a lower held-out
perplexity than a larger one, which sees too few tokens. Held-out perplexity (bigram: 40.6):

    2 layers, width 128 (0.56 M parameters, the spec)   800 / 900 / 1000 steps: 30.8 / 28.5 / 26.6
                                                        (72 / 77 / 93 s)
    same, 800 steps, peak learning rate 0.005 / 0.008   30.0 / diverged (0.003 is the spec's)
    4 layers, width 256 (3.5 M)                         250 steps (as long): 47.7, worse than the bigram
    4 layers, width 128 (0.96 M)                        650 steps: 35.6
    3 layers, width 128 (0.76 M)                        800 steps: 29-30, about 100 s
    2 layers, width 192 (1.1 M)                         800 steps: 26.1, about 110 s
    1 layer, width 128 (0.36 M)                         1500 steps: 36.5
(the sizes other than the spec's were measured with a prototype of the same recipe, on a machine
shared with other jobs, so their times are rough.) A 2,048-token vocabulary made the bigram harder
to beat (its perplexity per token 56.6, and the model's output layer twice as costly).

Metric. "held-out perplexity reduction vs bigram": 1 - exp(mean NLL of the model) / exp(mean NLL
of `Bigram`) over the same held-out targets. The evaluation stream is cut into windows of
`max_context` tokens (prefill, empty past); the logits after token t of a window predict token t+1
of the stream (the last one predicts the next window's first token), so every token the windows
cover but the first, and the one after them, is predicted once (15,104 on 3.11), by the model
from up to `max_context` tokens of its window and by the bigram from the one before it. `Bigram`
is interpolated Witten-Bell: P(b|a) = lam_a * c(a,b)/c(a) + (1 - lam_a) * P1(b) with lam_a =
c(a) / (c(a) + distinct followers of a) and P1 the add-one unigram, fitted on the training
stream; it needs no tuning on held-out data (add-one bigram smoothing is far weaker here,
perplexity 120, and would make the gate meaningless).

Checks beyond the metric (`verify`, every build): the KV-cache path of each built variant
against the whole-sequence path, greedy decoding with and without the cache, and a padded batch
against each sequence alone (see `verify`).

The stage interface the pipeline uses (see `kiln.build.pipeline.SourceStage`): `train`,
`save_checkpoint`, `held_out`, and the optional `extra_files`, `int8_settings` and `verify`;
`load_trained` for the tests' FP32 reference.
"""

from __future__ import annotations

import functools
import json
import math
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torch import nn

from kiln.build import check
from kiln.build.check import HeldOut
from kiln.build.publish import load_state_dict, save_state_dict, write_bytes_atomic
from kiln.build.quantize import Int8Settings
from kiln.build.training import seeded
from kiln.spec import ModelSpec, Tolerance, served_name

from .spec import (
    ATTENTION_MASK,
    INPUT_IDS,
    LOGITS,
    POSITION_IDS,
    SPEC,
    TinyLMSource,
    past_key,
    past_value,
    present_key,
    present_value,
)

Progress = Callable[[str], None]
Runner = Callable[[dict[str, np.ndarray]], Mapping[str, np.ndarray]]
"""One forward call: input name -> array in, output name -> array out (a PyTorch module through
`kiln.build.check.torch_runner`, or an ONNX artifact through `check.artifact_runner`)."""

END_OF_TEXT = "<|endoftext|>"
"""The one special token: ends every document; id 0."""
END_OF_TEXT_ID = 0
TOKENIZER_FILE = "tokenizer.json"
GENERATION_FILE = "generation.json"
GENERATION_FORMAT = 1
"""Bumped when the layout of `generation.json` changes."""


class CorpusError(RuntimeError):
    """The offline corpus or the tokenizer does not fit the source's settings."""


# --- corpus ---------------------------------------------------------------------------------------


def topics() -> dict[str, str]:
    """Python's documentation topics: name -> text (`pydoc_data.topics.topics`)."""
    from pydoc_data.topics import topics as found

    return dict(found)


@dataclass(frozen=True)
class TopicSplit:
    """Topic names of the three disjoint sets, each sorted."""

    training: tuple[str, ...]
    evaluation: tuple[str, ...]
    calibration: tuple[str, ...]


def split_topics(source: TinyLMSource) -> TopicSplit:
    """The seeded split of whole topics into training, evaluation and calibration (module
    docstring's rule).

    Raises:
        CorpusError: a set came out empty (shares too small for the topics' sizes).
    """
    texts = topics()
    order = sorted(texts)
    random.Random(source.seed).shuffle(order)
    total = sum(len(texts[name]) for name in order)
    limits = {"evaluation": source.eval_share * total, "calibration": source.calibration_share * total}
    sets: dict[str, list[str]] = {"training": [], "evaluation": [], "calibration": []}
    held = dict.fromkeys(limits, 0)
    for name in order:
        size = len(texts[name])
        target = next((s for s in limits if held[s] + size <= limits[s]), "training")
        sets[target].append(name)
        if target in held:
            held[target] += size
    empty = [name for name, names in sets.items() if not names]
    if empty:
        raise CorpusError(
            f"the topic split left the {', '.join(empty)} set(s) empty: fields "
            "'build.source.eval_share' and 'calibration_share' must each admit at least one topic"
        )
    return TopicSplit(*(tuple(sorted(sets[s])) for s in ("training", "evaluation", "calibration")))


# --- tokenizer ------------------------------------------------------------------------------------


def fit_tokenizer(texts: Sequence[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE of `vocab_size` tokens trained on `texts` (deterministic, see the module
    docstring), `<|endoftext|>` as id 0.

    Raises:
        CorpusError: the vocabulary came out another size, or the special token another id.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(texts), trainer=trainer)
    if tokenizer.get_vocab_size(with_added_tokens=True) != vocab_size:
        raise CorpusError(
            f"the BPE trainer made {tokenizer.get_vocab_size(with_added_tokens=True)} tokens, not "
            f"field 'build.source.vocab_size' {vocab_size}: the training topics hold too few merges"
        )
    if tokenizer.token_to_id(END_OF_TEXT) != END_OF_TEXT_ID:
        raise CorpusError(f"{END_OF_TEXT} got id {tokenizer.token_to_id(END_OF_TEXT)}, not {END_OF_TEXT_ID}")
    return tokenizer


@functools.lru_cache(maxsize=4)
def _tokenizer_json(source: TinyLMSource) -> str:
    split = split_topics(source)
    texts = topics()
    return fit_tokenizer([texts[name] for name in split.training], source.vocab_size).to_str()


def train_tokenizer(source: TinyLMSource) -> Tokenizer:
    """The tokenizer trained on the training topics (the same source gives the same tokenizer)."""
    return Tokenizer.from_str(_tokenizer_json(_data_fields(source)))


def _data_fields(source: TinyLMSource) -> TinyLMSource:
    """`source` with only the fields that shape the corpus and the tokenizer (a cache key)."""
    default = TinyLMSource()
    return replace(
        default, seed=source.seed, vocab_size=source.vocab_size, eval_share=source.eval_share,
        calibration_share=source.calibration_share,
    )


def load_tokenizer(path: Path | str) -> Tokenizer:
    """The tokenizer saved at `path` (a `tokenizer.json`, or the folder holding one)."""
    path = Path(path)
    if path.is_dir():
        path = path / TOKENIZER_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no tokenizer at {path}; run `kiln build --model tinylm` first")
    return Tokenizer.from_file(str(path))


def encode_documents(tokenizer: Tokenizer, documents: Sequence[str]) -> np.ndarray:
    """One int64 stream: each document's tokens followed by `<|endoftext|>`."""
    parts = []
    for encoding in tokenizer.encode_batch(list(documents), add_special_tokens=False):
        parts += [np.asarray(encoding.ids, dtype=np.int64), np.array([END_OF_TEXT_ID], np.int64)]
    return np.concatenate(parts)


@dataclass(frozen=True)
class Streams:
    """The three token streams (int64, 1-D)."""

    training: np.ndarray
    evaluation: np.ndarray
    calibration: np.ndarray


@functools.lru_cache(maxsize=4)
def _streams(source: TinyLMSource) -> Streams:
    split, texts = split_topics(source), topics()
    tokenizer = train_tokenizer(source)
    made = {
        part: encode_documents(tokenizer, [texts[name] for name in getattr(split, part)])
        for part in ("training", "evaluation", "calibration")
    }
    for array in made.values():
        array.setflags(write=False)
    return Streams(**made)


def token_streams(source: TinyLMSource) -> Streams:
    """The training, evaluation and calibration token streams (cached; read-only arrays)."""
    return _streams(_data_fields(source))


# --- bigram baseline ------------------------------------------------------------------------------


class Bigram:
    """Interpolated Witten-Bell bigram over token ids (module docstring), fitted on one stream."""

    def __init__(self, stream: np.ndarray, vocab_size: int) -> None:
        stream = np.asarray(stream, dtype=np.int64)
        pairs = stream[:-1] * vocab_size + stream[1:]
        counts = np.bincount(pairs, minlength=vocab_size * vocab_size).reshape(vocab_size, vocab_size)
        self.vocab_size = vocab_size
        self.counts = counts
        self.row_totals = counts.sum(axis=1).astype(np.float64)
        followers = (counts > 0).sum(axis=1).astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            self.weights = np.where(self.row_totals > 0, self.row_totals / (self.row_totals + followers), 0.0)
        unigram = np.bincount(stream, minlength=vocab_size).astype(np.float64)
        self.unigram = (unigram + 1.0) / (unigram.sum() + vocab_size)

    def log_prob(self, previous: np.ndarray, following: np.ndarray) -> np.ndarray:
        """Natural-log P(following | previous), elementwise."""
        previous, following = np.asarray(previous), np.asarray(following)
        totals = self.row_totals[previous]
        seen = self.counts[previous, following] / np.maximum(totals, 1.0)
        weight = self.weights[previous]
        return np.log(weight * seen + (1.0 - weight) * self.unigram[following])

    def perplexity(self, stream: np.ndarray) -> float:
        """exp of the mean NLL of every token of `stream` but the first, given the one before."""
        stream = np.asarray(stream)
        return float(np.exp(-np.mean(self.log_prob(stream[:-1], stream[1:]))))


@functools.lru_cache(maxsize=4)
def _bigram(source: TinyLMSource) -> Bigram:
    return Bigram(token_streams(source).training, source.vocab_size)


def bigram(source: TinyLMSource) -> Bigram:
    """The bigram fitted on the training stream (cached)."""
    return _bigram(_data_fields(source))


# --- model ----------------------------------------------------------------------------------------

INIT_STD = 0.02
"""GPT-2's initializer: weights ~ normal(0, 0.02), biases 0, LayerNorm 1 and 0."""
LAYER_NORM_EPS = 1e-5
MASK_BIAS = -1e4
"""Added to the attention score of a key the query may not see (later, or masked): exp(-1e4) is 0
in FP32, and it is finite, so a padding query that sees no key gets a uniform softmax (finite
garbage) instead of 0/0 = NaN; -inf would give NaN there, and an INT8 or FP16 graph could not
represent it."""


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention over the cached keys/values and this call's."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"heads ({heads}) must divide width ({width})")
        self.heads = heads
        self.head_dim = width // heads
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.qkv = nn.Linear(width, 3 * width)
        self.output = nn.Linear(width, width)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        """[batch, seq, width] -> [batch, heads, seq, head_dim]."""
        return x.reshape(x.shape[0], x.shape[1], self.heads, self.head_dim).transpose(1, 2)

    def forward(
        self, hidden: torch.Tensor, bias: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """hidden [batch, seq, width]; bias [batch, 1, seq, past + seq] (0 or MASK_BIAS); past_k,
        past_v [batch, heads, past, head_dim]. Returns (output, present_k, present_v)."""
        query, key, value = self.qkv(hidden).chunk(3, dim=-1)
        key = torch.cat([past_k, self._split(key)], dim=2)
        value = torch.cat([past_v, self._split(value)], dim=2)
        scores = (self._split(query) * self.scale) @ key.transpose(-1, -2) + bias
        context = (torch.softmax(scores, dim=-1) @ value).transpose(1, 2)
        return self.output(context.reshape(hidden.shape)), key, value


class Block(nn.Module):
    """Pre-LayerNorm block: x + attention(LN(x)); x + MLP(LN(x)) with GELU."""

    def __init__(self, width: int, heads: int, mlp_width: int) -> None:
        super().__init__()
        self.attention_norm = nn.LayerNorm(width, eps=LAYER_NORM_EPS)
        self.attention = CausalSelfAttention(width, heads)
        self.mlp_norm = nn.LayerNorm(width, eps=LAYER_NORM_EPS)
        self.mlp_in = nn.Linear(width, mlp_width)
        self.activation = nn.GELU()
        self.mlp_out = nn.Linear(mlp_width, width)

    def forward(
        self, hidden: torch.Tensor, bias: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        attended, key, value = self.attention(self.attention_norm(hidden), bias, past_k, past_v)
        hidden = hidden + attended
        hidden = hidden + self.mlp_out(self.activation(self.mlp_in(self.mlp_norm(hidden))))
        return hidden, key, value


class TinyLM(nn.Module):
    """input_ids, attention_mask, position_ids, past keys/values -> logits, present keys/values.

    The ONNX signature of `kiln.models.tinylm.spec` (positional, in the spec's input order: the
    past tensors as layer 0 key, layer 0 value, layer 1 key, ...; outputs likewise).
    """

    def __init__(
        self, vocab_size: int, width: int, layers: int, heads: int, mlp_width: int, max_context: int
    ) -> None:
        super().__init__()
        self.layers = layers
        self.heads = heads
        self.head_dim = width // heads
        self.max_context = max_context
        self.token_embeddings = nn.Embedding(vocab_size, width)
        self.position_embeddings = nn.Embedding(max_context, width)
        self.blocks = nn.ModuleList(Block(width, heads, mlp_width) for _ in range(layers))
        self.final_norm = nn.LayerNorm(width, eps=LAYER_NORM_EPS)
        self.apply(_init_weights)
        for name, parameter in self.named_parameters():
            if name.endswith(("attention.output.weight", "mlp_out.weight")):
                nn.init.normal_(parameter, mean=0.0, std=INIT_STD / math.sqrt(2 * layers))

    def attention_bias(
        self, attention_mask: torch.Tensor, sequence: int, total: torch.Tensor | int
    ) -> torch.Tensor:
        """[batch, 1, sequence, total]: 0 where new token s (absolute index total - sequence + s)
        may see key j (j <= that index and attention_mask[b, j] == 1), else MASK_BIAS."""
        keys = torch.arange(total, device=attention_mask.device)
        queries = torch.arange(sequence, device=attention_mask.device) + (total - sequence)
        causal = keys[None, :] <= queries[:, None]
        # The mask reshaped to [batch, total] with `total` from the keys' shape: one symbolic
        # length through the graph, which ONNX Runtime's symbolic shape inference needs.
        mask = attention_mask.reshape(attention_mask.shape[0], total) > 0
        visible = causal[None, None, :, :] & mask[:, None, None, :]
        return torch.where(visible, 0.0, MASK_BIAS)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        *past: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        if len(past) != 2 * self.layers:
            raise ValueError(
                f"expected {2 * self.layers} past tensors (key, value per layer), got {len(past)}"
            )
        hidden = self.token_embeddings(input_ids) + self.position_embeddings(position_ids)
        sequence = input_ids.shape[1]
        bias = self.attention_bias(attention_mask, sequence, past[0].shape[2] + sequence)
        present: list[torch.Tensor] = []
        for index, block in enumerate(self.blocks):
            hidden, key, value = block(hidden, bias, past[2 * index], past[2 * index + 1])
            present += [key, value]
        logits = self.final_norm(hidden) @ self.token_embeddings.weight.t()
        return (logits, *present)

    def empty_past(self, batch: int) -> tuple[torch.Tensor, ...]:
        """Zero-length past keys/values for `batch` sequences (a prefill)."""
        return tuple(torch.zeros(batch, self.heads, 0, self.head_dim) for _ in range(2 * self.layers))


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=INIT_STD)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
    if isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def build_model(source: TinyLMSource) -> TinyLM:
    """The decoder with the source's dims and GPT-2 initial weights from the global RNG (`train`
    seeds a forked one)."""
    return TinyLM(
        vocab_size=source.vocab_size, width=source.width, layers=source.layers, heads=source.heads,
        mlp_width=source.mlp_width, max_context=source.max_context,
    )


def untrained(source: TinyLMSource) -> TinyLM:
    """The decoder with its seeded initial weights, not trained, in eval mode (what `train` starts
    from; the tests show the perplexity gate refuses it)."""
    with seeded(source.seed):
        return build_model(source).eval()


# --- training -------------------------------------------------------------------------------------

TRAIN_THREADS = 2
"""PyTorch threads while training: the machines this runs on have 2 cores (one thread would take
about 1.7x as long, past the time CI can give), and a fixed count keeps the result independent of
a bigger machine's core count. On a 2-core machine busy with other work the two threads stall
each other: the same training took 465 s instead of 77 (same weights: training is deterministic)."""
BETAS = (0.9, 0.95)
GRAD_CLIP = 1.0
LOG_EVERY = 100
"""Steps between training progress lines."""


def lm_loss(model: TinyLM, windows: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over windows [batch, n + 1] (tokens 0..n-1 predict 1..n), run
    through the exported `forward` (mask of ones, positions 0.., empty past)."""
    inputs, targets = windows[:, :-1], windows[:, 1:]
    batch, length = inputs.shape
    mask = torch.ones_like(inputs)
    positions = torch.arange(length).expand(batch, length)
    logits = model(inputs, mask, positions, *model.empty_past(batch))[0]
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def learning_rate(source: TinyLMSource, step: int) -> float:
    """Linear warmup over `warmup_steps`, then cosine decay to 0 at `train_steps`."""
    warmup = min(1.0, (step + 1) / source.warmup_steps) if source.warmup_steps else 1.0
    return source.learning_rate * warmup * 0.5 * (1.0 + math.cos(math.pi * step / source.train_steps))


def train(source: TinyLMSource, progress: Progress | None = None) -> TinyLM:
    """Trains the decoder on the training stream (module docstring); returns it in eval mode.

    The tokenizer and the token streams are made here too, so a bad corpus fails the "train"
    stage; the caller's global RNG and thread count are left as they were.

    Args:
        source: Model dims, training settings and the seed.
        progress: Receives lines on the corpus, the model, every `LOG_EVERY` steps and the end.
    """
    say = progress or (lambda line: None)
    split, streams = split_topics(source), token_streams(source)
    say(
        f"corpus: pydoc_data topics, {len(split.training)} training / {len(split.evaluation)} "
        f"evaluation / {len(split.calibration)} calibration (disjoint); tokens "
        f"{len(streams.training):,} / {len(streams.evaluation):,} / {len(streams.calibration):,} "
        f"(byte-level BPE, {source.vocab_size} tokens)"
    )
    window = source.max_context + 1
    stream = torch.from_numpy(np.array(streams.training))
    if len(stream) <= window:
        raise CorpusError(f"the training stream ({len(stream)} tokens) is shorter than one window ({window})")
    start = time.perf_counter()
    with seeded(source.seed, deterministic=True, threads=TRAIN_THREADS):
        model = build_model(source)
        say(
            f"model: {source.layers} layers, width {source.width}, {source.heads} heads, context "
            f"{source.max_context}, {sum(p.numel() for p in model.parameters()):,} parameters; "
            f"{source.train_steps} steps of {source.batch_size} x {source.max_context} tokens"
        )
        matrices = [p for p in model.parameters() if p.dim() >= 2]
        others = [p for p in model.parameters() if p.dim() < 2]
        optimizer = torch.optim.AdamW(
            [
                {"params": matrices, "weight_decay": source.weight_decay},
                {"params": others, "weight_decay": 0.0},
            ],
            lr=source.learning_rate, betas=BETAS,
        )
        generator = torch.Generator().manual_seed(source.seed)
        model.train()
        for step in range(source.train_steps):
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(source, step)
            offsets = torch.randint(0, len(stream) - window + 1, (source.batch_size,), generator=generator)
            windows = torch.stack([stream[o : o + window] for o in offsets.tolist()])
            loss = lm_loss(model, windows)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
            optimizer.step()
            if (step + 1) % LOG_EVERY == 0 or step + 1 == source.train_steps:
                say(
                    f"step {step + 1}/{source.train_steps}  loss {loss.item():.3f}  "
                    f"[{time.perf_counter() - start:.1f} s]"
                )
    return model.eval()


save_checkpoint = save_state_dict
"""SourceStage: saves the weights (state_dict), atomically."""


def load_trained(
    spec: ModelSpec, artifacts: Path | None = None, checkpoint: Path | None = None
) -> TinyLM:
    """The trained decoder from its checkpoint, in eval mode.

    Raises:
        FileNotFoundError: no checkpoint; run the build first.
    """
    assert spec.build is not None and isinstance(spec.build.source, TinyLMSource)
    _, state = load_state_dict(checkpoint if checkpoint is not None else spec, artifacts)
    model = build_model(spec.build.source)
    model.load_state_dict(state)
    return model.eval()


# --- held-out data and metric ---------------------------------------------------------------------

METRIC = "held-out perplexity reduction vs bigram"
BIGRAM_RULE = (
    "interpolated Witten-Bell bigram fitted on the training topics: P(b|a) = lam_a c(a,b)/c(a) + "
    "(1 - lam_a) P1(b), lam_a = c(a) / (c(a) + distinct followers of a), P1 add-one unigram"
)
METRIC_RULE = (
    "1 - perplexity / bigram perplexity over the same held-out targets: each evaluation window of "
    "max_context tokens (prefill, empty past) predicts its next max_context tokens"
)


def windows(stream: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, targets): the stream cut into whole windows of `length` tokens, and for each the
    `length` tokens that follow each position (the stream shifted by one). int64 [n, length]."""
    count = (len(stream) - 1) // length
    if count < 1:
        raise CorpusError(f"a stream of {len(stream)} tokens holds no window of {length} + 1")
    inputs = np.array(stream[: count * length], dtype=np.int64).reshape(count, length)
    targets = np.array(stream[1 : count * length + 1], dtype=np.int64).reshape(count, length)
    return inputs, targets


def prefill_inputs(source: TinyLMSource, input_ids: np.ndarray) -> tuple[np.ndarray, ...]:
    """The decoder's inputs for full windows from position 0 with an empty past: (input_ids, mask
    of ones, positions 0.., zero-length past per layer and kind), in the spec's input order."""
    count, length = input_ids.shape
    mask = np.ones((count, length), dtype=np.int64)
    positions = np.broadcast_to(np.arange(length, dtype=np.int64), (count, length)).copy()
    empty = np.zeros((count, source.heads, 0, source.head_dim), dtype=np.float32)
    return (np.ascontiguousarray(input_ids), mask, positions, *([empty] * (2 * source.layers)))


def mean_nll(logits: np.ndarray, targets: np.ndarray) -> float:
    """Mean negative log-likelihood (nats) of `targets` [n, s] under `logits` [n, s, vocab]; a
    non-finite logit row scores +inf."""
    total = 0.0
    for item_logits, item_targets in zip(logits, targets, strict=True):
        scores = np.asarray(item_logits, dtype=np.float64)
        top = scores.max(axis=-1, keepdims=True)
        log_norm = np.log(np.exp(scores - top).sum(axis=-1)) + top[:, 0]
        picked = scores[np.arange(len(item_targets)), item_targets]
        total += float(np.sum(log_norm - picked))
    value = total / targets.size
    return value if math.isfinite(value) else math.inf


def perplexity(logits: np.ndarray, targets: np.ndarray) -> float:
    """exp(mean_nll)."""
    return math.exp(min(mean_nll(logits, targets), 700.0))


@dataclass(frozen=True)
class Evaluation:
    """The held-out windows, their targets and the bigram's perplexity on those targets."""

    inputs: np.ndarray
    targets: np.ndarray
    bigram_perplexity: float

    def reduction(self, model_perplexity: float) -> float:
        """The metric: 1 - model perplexity / the bigram's."""
        return 1.0 - model_perplexity / self.bigram_perplexity


def evaluation(source: TinyLMSource) -> Evaluation:
    """The evaluation windows and the bigram's perplexity on exactly their targets."""
    streams = token_streams(source)
    inputs, targets = windows(streams.evaluation, source.max_context)
    previous = inputs.reshape(-1)  # token k precedes target k: the stream itself
    baseline = float(np.exp(-np.mean(bigram(source).log_prob(previous, targets.reshape(-1)))))
    return Evaluation(inputs, targets, baseline)


def held_out(source: TinyLMSource) -> HeldOut:
    """Evaluation windows (scored by the metric) and calibration windows, all prefill inputs.

    `inputs` and `calibration` are the decoder's inputs in the spec's order, batch-first: windows
    of `max_context` tokens with a mask of ones, positions 0.. and zero-length past tensors.
    """
    held = evaluation(source)
    calibration_ids, _ = windows(token_streams(source).calibration, source.max_context)

    def score(outputs: Sequence[np.ndarray], reference: Sequence[np.ndarray]) -> float:
        del reference
        return held.reduction(perplexity(outputs[0], held.targets))

    return HeldOut(
        inputs=prefill_inputs(source, held.inputs),
        calibration=prefill_inputs(source, calibration_ids),
        metric=METRIC,
        score=score,
    )


# --- published files -----------------------------------------------------------------------------


def generation_config(source: TinyLMSource) -> dict[str, Any]:
    """`generation.json`: what a generation engine needs to know about the ONNX model."""
    return {
        "format": GENERATION_FORMAT,
        "eos_token_id": END_OF_TEXT_ID,
        "bos_token_id": None,
        "pad_token_id": END_OF_TEXT_ID,
        "vocab_size": source.vocab_size,
        "max_context": source.max_context,
        "num_layers": source.layers,
        "num_heads": source.heads,
        "head_dim": source.head_dim,
        "hidden_size": source.width,
        "inputs": {
            "input_ids": INPUT_IDS, "attention_mask": ATTENTION_MASK, "position_ids": POSITION_IDS,
            "past_key": past_key(0).replace(".0.", ".{i}."),
            "past_value": past_value(0).replace(".0.", ".{i}."),
        },
        "outputs": {
            "logits": LOGITS,
            "present_key": present_key(0).replace(".0.", ".{i}."),
            "present_value": present_value(0).replace(".0.", ".{i}."),
        },
    }


def extra_files(source: TinyLMSource, model: nn.Module | None, workdir: Path) -> dict[str, Path]:
    """`tokenizer.json` and `generation.json`, written into `workdir` for publishing beside every
    served variant (they depend on the source only, not on the weights)."""
    del model
    folder = Path(workdir)
    config = json.dumps(generation_config(source), indent=2) + "\n"
    return {
        TOKENIZER_FILE: write_bytes_atomic(
            folder / TOKENIZER_FILE, train_tokenizer(source).to_str().encode()
        ),
        GENERATION_FILE: write_bytes_atomic(folder / GENERATION_FILE, config.encode()),
    }


# --- INT8 -----------------------------------------------------------------------------------------

INT8_SETTINGS = Int8Settings(op_types_to_quantize=("MatMul",))
"""Static QDQ of the MatMul nodes only (the projections, the MLP, the attention products and the
tied output head), `kiln.build.quantize`'s defaults otherwise (MinMax calibration on the
calibration windows, quint8 activations, per-channel qint8 weights, reduced range). Measured on
the trained model (metric drop vs FP32 PyTorch; KV cache = the INT8 model's cached logits vs its
own whole-sequence logits):

    every op type (the default)        drop 0.236; the -1e4 mask bias sets the scale of the score
                                       tensors (Add, Softmax), so attention collapses
      ... but Add, Softmax kept FP32   drop 0.004, yet the cache is broken: logits 5.2 off, greedy
                                       tokens differ after 10 of 128; the cache Concat's scale was
                                       calibrated on the empty past of prefill windows
    MatMul only (chosen)               drop 0.003; cached = whole sequence exactly, padded batch =
                                       alone exactly (fixed scales, integer products)
    MatMul only, attention products    drop 0.001; otherwise the same, but excluding them needs
      kept FP32                        exporter-made node names
    dynamic MatMul quantization        drop 0.001, but each call's activation scale comes from
      (ONNX Runtime quantize_dynamic)  the whole batch: cached vs whole sequence 0.25 apart, a
                                       padded batch vs alone 0.35 (a sequence's result would
                                       depend on its batch neighbours); kiln.build.quantize has
                                       no dynamic mode either

The perplexity gate alone would have passed the broken cache (its windows are prefills): hence
`verify` on every variant. Zero-length past tensors calibrate fine here (MinMax sees only the
MatMul inputs, never the empty past itself)."""


def int8_settings(source: TinyLMSource) -> Int8Settings:
    """SourceStage hook: `INT8_SETTINGS`."""
    del source
    return INT8_SETTINGS


# --- KV-cache checks ------------------------------------------------------------------------------



class KVCacheError(ValueError):
    """A variant's cached path disagrees with the whole-sequence path, or a padded batch with a
    sequence alone; the message names the variant, the check, the prompt, the token and tensor."""


CHUNK_TOKENS = 4
"""Check (a) feeds this many tokens in one call after the prompt (several new tokens with a past),
then the rest one at a time."""
INT8_SELF_TOLERANCE = Tolerance(atol=0.3, rtol=0.01)
"""How far an INT8 variant's cached or padded-batch logits may lie from its own whole-sequence or
alone logits (there is no PyTorch INT8 to compare with). Served as built (fused integer kernels)
they are equal here; with ONNX Runtime's basic optimizations only (the numeric-variation pass of
`make test`: unfused QuantizeLinear/DequantizeLinear and float MatMul) an activation can round to
the neighbouring step, which moved a logit by up to 0.14. A broken cache moved them by 2.5 to 5
(`INT8_SETTINGS`), dynamic quantization's batch dependence by 0.25 to 0.35."""


def empty_past(source: TinyLMSource, batch: int) -> list[np.ndarray]:
    """Zero-length past keys/values (key, value per layer) for `batch` sequences."""
    return [np.zeros((batch, source.heads, 0, source.head_dim), np.float32) for _ in range(2 * source.layers)]


def decoder_step(
    run: Runner,
    source: TinyLMSource,
    input_ids: np.ndarray,
    attention_mask: np.ndarray,
    position_ids: np.ndarray,
    past: Sequence[np.ndarray],
) -> tuple[np.ndarray, list[np.ndarray]]:
    """One decoder call: (logits [batch, seq, vocab], present keys/values, key and value per
    layer)."""
    feed = {
        INPUT_IDS: np.ascontiguousarray(input_ids, dtype=np.int64),
        ATTENTION_MASK: np.ascontiguousarray(attention_mask, dtype=np.int64),
        POSITION_IDS: np.ascontiguousarray(position_ids, dtype=np.int64),
    }
    for layer in range(source.layers):
        feed[past_key(layer)] = np.ascontiguousarray(past[2 * layer], dtype=np.float32)
        feed[past_value(layer)] = np.ascontiguousarray(past[2 * layer + 1], dtype=np.float32)
    outputs = run(feed)
    present = []
    for layer in range(source.layers):
        present += [np.asarray(outputs[present_key(layer)]), np.asarray(outputs[present_value(layer)])]
    return np.asarray(outputs[LOGITS]), present


def whole_sequence(
    run: Runner, source: TinyLMSource, tokens: Sequence[int]
) -> tuple[np.ndarray, list[np.ndarray]]:
    """`tokens` in one call from position 0, no past: (logits [n, vocab], present per layer and
    kind [heads, n, head_dim])."""
    ids = np.asarray(tokens, np.int64)[None]
    positions = np.arange(ids.shape[1], dtype=np.int64)[None]
    logits, present = decoder_step(run, source, ids, np.ones_like(ids), positions, empty_past(source, 1))
    return logits[0], [p[0] for p in present]


def cached(
    run: Runner, source: TinyLMSource, tokens: Sequence[int], prefill: int, chunk: int = CHUNK_TOKENS
) -> tuple[np.ndarray, list[np.ndarray]]:
    """`tokens` through the cache: the first `prefill` in one call with an empty past, the next
    `chunk` in one call with that past, then one at a time, each call's `present` the next one's
    `past`. Returns what `whole_sequence` returns."""
    tokens = list(tokens)
    past = empty_past(source, 1)
    pieces, start = [], 0
    bounds = [prefill, min(len(tokens), prefill + chunk), *range(prefill + chunk + 1, len(tokens) + 1)]
    for end in bounds:
        if end <= start:
            continue
        ids = np.asarray(tokens[start:end], np.int64)[None]
        positions = np.arange(start, end, dtype=np.int64)[None]
        logits, past = decoder_step(run, source, ids, np.ones((1, end), np.int64), positions, past)
        pieces.append(logits[0])
        start = end
    return np.concatenate(pieces), [p[0] for p in past]


@dataclass(frozen=True)
class Greedy:
    """A greedy decoding: the tokens chosen, and at each step the gap between the two highest
    logits and the larger magnitude of the two (to tell a decided choice from a near-tie)."""

    tokens: tuple[int, ...]
    gaps: tuple[float, ...]
    magnitudes: tuple[float, ...]


def _choose(logits: np.ndarray) -> tuple[int, float, float]:
    top2 = np.argsort(logits)[-2:]
    second, first = float(logits[top2[0]]), float(logits[top2[1]])
    return int(top2[1]), first - second, max(abs(first), abs(second))


def greedy(run: Runner, source: TinyLMSource, prompt: Sequence[int], steps: int, *, cache: bool) -> Greedy:
    """Greedy decoding of `steps` tokens after `prompt`: with the cache (prefill, then one token
    and the past per step) or without it (the whole sequence again at every step)."""
    sequence = list(prompt)
    chosen, gaps, magnitudes = [], [], []
    past = empty_past(source, 1)
    logits, past = decoder_step(
        run, source, np.asarray(sequence, np.int64)[None], np.ones((1, len(sequence)), np.int64),
        np.arange(len(sequence), dtype=np.int64)[None], past,
    )
    for step in range(steps):
        token, gap, magnitude = _choose(logits[0, -1])
        chosen.append(token)
        gaps.append(gap)
        magnitudes.append(magnitude)
        sequence.append(token)
        if step + 1 == steps:
            break
        if cache:
            logits, past = decoder_step(
                run, source, np.asarray([[token]], np.int64), np.ones((1, len(sequence)), np.int64),
                np.asarray([[len(sequence) - 1]], np.int64), past,
            )
        else:
            logits = whole_sequence(run, source, sequence)[0][None]
    return Greedy(tuple(chosen), tuple(gaps), tuple(magnitudes))


def padded_batch(
    run: Runner, source: TinyLMSource, sequences: Sequence[Sequence[int]], prompts: Sequence[int], steps: int
) -> list[np.ndarray]:
    """Sequences run together as a generation engine batches them: prompts of different lengths
    right-padded in one prefill (mask 0 on the padding), then `steps` decode calls of one token
    each (the sequence's own next token) whose past is the previous call's present, padding gaps
    included, and whose mask appends a 1. Returns per sequence the logits of its real tokens
    ([prompt + steps, vocab])."""
    count, width = len(sequences), max(prompts)
    ids = np.zeros((count, width), np.int64)
    mask = np.zeros((count, width), np.int64)
    for row, (tokens, length) in enumerate(zip(sequences, prompts, strict=True)):
        ids[row, :length] = tokens[:length]
        mask[row, :length] = 1
    positions = np.broadcast_to(np.arange(width, dtype=np.int64), (count, width))
    logits, past = decoder_step(run, source, ids, mask, positions, empty_past(source, count))
    rows = [[logits[row, :length]] for row, length in enumerate(prompts)]
    for step in range(steps):
        ids = np.asarray([[tokens[length + step]] for tokens, length in zip(sequences, prompts, strict=True)])
        positions = np.asarray([[length + step] for length in prompts], np.int64)
        mask = np.concatenate([mask, np.ones((count, 1), np.int64)], axis=1)
        logits, past = decoder_step(run, source, ids, mask, positions, past)
        for row in range(count):
            rows[row].append(logits[row, :1])
    return [np.concatenate(parts) for parts in rows]


def alone(run: Runner, source: TinyLMSource, tokens: Sequence[int], prompt: int, steps: int) -> np.ndarray:
    """One sequence as `padded_batch` runs it, but alone (batch 1, no padding)."""
    return padded_batch(run, source, [tokens], [prompt], steps)[0]


def verify_prompts(source: TinyLMSource) -> list[tuple[list[int], int]]:
    """(tokens, prompt length) of the checks: `source.verify_prompts` evaluation windows spread
    over the held-out stream, each `prompt_tokens + decode_tokens` long, with prompts of different
    lengths (so a batch of them pads)."""
    inputs = evaluation(source).inputs
    count = source.verify_prompts
    picks = np.linspace(0, len(inputs) - 1, count).round().astype(int)
    step = max(1, source.prompt_tokens // (2 * count))
    length = source.prompt_tokens + source.decode_tokens
    return [
        (inputs[pick, :length].tolist(), max(1, source.prompt_tokens - i * step))
        for i, pick in enumerate(picks)
    ]


def _close(
    variant: str, check_name: str, what: str, candidate: np.ndarray, reference: np.ndarray,
    tolerance: Tolerance, reference_name: str,
) -> float:
    """The max abs error of `candidate` vs `reference`; KVCacheError when beyond `tolerance`."""
    comparison = check.compare({what: candidate}, {what: reference}, tolerance)
    worst = comparison.worst
    if not comparison.ok:
        raise KVCacheError(
            f"variant {variant}: {check_name}: {what} differs from {reference_name} at token "
            f"{worst.worst_item}: max abs error {worst.max_abs:.3g}, {worst.violations} of "
            f"{worst.elements} values beyond atol {tolerance.atol:g} / rtol {tolerance.rtol:g}"
        )
    return comparison.max_abs


def _tie_bound(tolerance: Tolerance, magnitude: float) -> float:
    """The largest top-2 logit gap two runs within `tolerance` of each other may rank either way
    (as `kiln.build.check.undecided_top1`)."""
    return 2 * tolerance.atol + 2 * tolerance.rtol * magnitude


def verify_variant(
    variant: str,
    run: Runner,
    reference: Runner,
    reference_name: str,
    source: TinyLMSource,
    tolerance: Tolerance,
) -> dict[str, Any]:
    """The KV-cache checks of one variant (`run`), raising KVCacheError on the first failure:

    (a) cache vs whole sequence: each prompt fed through the cache (`cached`: prefill, a chunk of
        `CHUNK_TOKENS`, then one token at a time) gives the logits and final present keys/values
        that `reference` gives for the whole sequence at once, within `tolerance`;
    (b) greedy: `decode_tokens` greedy tokens with the cache equal those without it (the whole
        prefix recomputed each step). Where they differ at a step whose top two logits lie within
        the tolerance of each other (without the cache), either run may break that near-tie: the
        comparison of that prompt stops there and the record counts it;
    (c) padded batch: the prompts right-padded in one batch, then decoded together with padding
        gaps in the past (`padded_batch`), give each sequence's logits as it gets alone, within
        `tolerance`.

    Returns:
        The record for the manifest: max abs errors, tokens compared, near-ties.
    """
    prompts = verify_prompts(source)
    errors = {"cache_vs_whole": 0.0, "present_vs_whole": 0.0, "padded_vs_alone": 0.0}
    compared = ties = 0
    for index, (tokens, prompt) in enumerate(prompts):
        where = f"prompt {index} ({prompt} + {len(tokens) - prompt} tokens)"
        logits_error, present_error = _cache_vs_whole(
            variant, run, reference, reference_name, source, tolerance, tokens, prompt, where
        )
        errors["cache_vs_whole"] = max(errors["cache_vs_whole"], logits_error)
        errors["present_vs_whole"] = max(errors["present_vs_whole"], present_error)
        equal, tie = _greedy_with_and_without_cache(variant, run, source, tolerance, tokens, prompt, where)
        compared += equal
        ties += tie
    errors["padded_vs_alone"] = _padded_vs_alone(variant, run, source, tolerance, prompts)
    return {
        "reference": reference_name,
        "tolerance": {"atol": tolerance.atol, "rtol": tolerance.rtol},
        "max_abs_error": errors,
        "greedy_tokens_equal": compared,
        "greedy_near_ties": ties,
    }


def _cache_vs_whole(
    variant: str,
    run: Runner,
    reference: Runner,
    reference_name: str,
    source: TinyLMSource,
    tolerance: Tolerance,
    tokens: Sequence[int],
    prompt: int,
    where: str,
) -> tuple[float, float]:
    """Check (a) of `verify_variant` on one prompt: (max abs error of the logits, of the presents)."""
    logits, present = cached(run, source, tokens, prompt)
    want_logits, want_present = whole_sequence(reference, source, tokens)
    name = f"(a) cache vs whole sequence, {where}"
    logits_error = _close(variant, name, LOGITS, logits, want_logits, tolerance, reference_name)
    present_error = 0.0
    for layer in range(source.layers):
        for kind, got, want in (
            (present_key(layer), present[2 * layer], want_present[2 * layer]),
            (present_value(layer), present[2 * layer + 1], want_present[2 * layer + 1]),
        ):
            present_error = max(
                present_error,
                _close(
                    variant, name, kind, got.transpose(1, 0, 2), want.transpose(1, 0, 2),
                    tolerance, reference_name,
                ),
            )
    return logits_error, present_error


def _greedy_with_and_without_cache(
    variant: str,
    run: Runner,
    source: TinyLMSource,
    tolerance: Tolerance,
    tokens: Sequence[int],
    prompt: int,
    where: str,
) -> tuple[int, int]:
    """Check (b) of `verify_variant` on one prompt: (tokens found equal, near-ties broken: 0 or 1)."""
    with_cache = greedy(run, source, tokens[:prompt], source.decode_tokens, cache=True)
    without = greedy(run, source, tokens[:prompt], source.decode_tokens, cache=False)
    compared = 0
    for step, (got_token, want_token) in enumerate(zip(with_cache.tokens, without.tokens, strict=True)):
        if got_token == want_token:
            compared += 1
            continue
        if without.gaps[step] <= _tie_bound(tolerance, without.magnitudes[step]):
            return compared, 1  # a near-tie broken the other way: the sequences part here, legitimately
        raise KVCacheError(
            f"variant {variant}: (b) greedy with vs without the cache, {where}: token "
            f"{step} of {source.decode_tokens} is {got_token} with the cache and {want_token} "
            f"without (their top-2 logit gap {without.gaps[step]:.3g}); tokens so far "
            f"{list(without.tokens[:step])}"
        )
    return compared, 0


def _padded_vs_alone(
    variant: str,
    run: Runner,
    source: TinyLMSource,
    tolerance: Tolerance,
    prompts: Sequence[tuple[Sequence[int], int]],
) -> float:
    """Check (c) of `verify_variant`: the max abs error of the padded batch's logits."""
    steps = source.decode_tokens
    together = padded_batch(run, source, [t for t, _ in prompts], [p for _, p in prompts], steps)
    error = 0.0
    for index, ((tokens, prompt), got) in enumerate(zip(prompts, together, strict=True)):
        want = alone(run, source, tokens, prompt, steps)
        name = (
            f"(c) padded batch of {len(prompts)} (prompts of {', '.join(str(p) for _, p in prompts)} "
            f"tokens, {steps} decode steps) vs alone, prompt {index}"
        )
        error = max(error, _close(variant, name, LOGITS, got, want, tolerance, "the same sequence alone"))
    return error


def verify(
    source: TinyLMSource,
    model: nn.Module | None,
    artifacts: Mapping[str, Path],
    workdir: Path,
    progress: Progress | None = None,
    *,
    spec: ModelSpec = SPEC,
) -> dict[str, Any]:
    """SourceStage hook: the KV-cache checks of every built variant, and the perplexities.

    FP32 (the exported ONNX, run as kiln_onnx serves it) is checked against the trained PyTorch
    module within the spec's tolerance; INT8 against its own whole-sequence run within
    `INT8_SELF_TOLERANCE` (its cached and uncached paths quantize the same activations with the
    same calibrated scales, so they agree far closer than INT8 agrees with FP32). See
    `verify_variant` for the checks. The perplexities of the bigram, of PyTorch and of each
    variant on the held-out windows are recorded with the rule.

    Raises:
        KVCacheError (a ValueError: the pipeline fails the build in stage "verify"): a check failed.
    """
    del workdir
    say = progress or (lambda line: None)
    if model is None:
        raise KVCacheError("the KV-cache checks compare with the trained PyTorch model; none was given")
    served = {precision: replace(spec, name=served_name(spec.name, precision)) for precision in artifacts}
    torch_run = check.torch_runner(model, spec)
    held = evaluation(source)
    inputs = prefill_inputs(source, held.inputs)
    torch_ppl = perplexity(check.run_batched(torch_run, spec, inputs)[LOGITS], held.targets)
    record: dict[str, Any] = {
        "perplexity": {
            "rule": f"{METRIC}: {METRIC_RULE}; bigram: {BIGRAM_RULE}",
            "held_out_targets": int(held.targets.size),
            "bigram": held.bigram_perplexity,
            "pytorch": torch_ppl,
        },
        "kv_cache": {},
    }
    for precision, artifact in artifacts.items():
        run = check.artifact_runner(Path(artifact), served[precision])
        variant_ppl = perplexity(check.run_batched(run, spec, inputs)[LOGITS], held.targets)
        record["perplexity"][precision] = variant_ppl
        if precision == "fp32":
            reference, name, tolerance = torch_run, "PyTorch (whole sequence)", spec.build.tolerance
        else:
            reference, name, tolerance = run, f"{precision} (whole sequence)", INT8_SELF_TOLERANCE
        result = verify_variant(precision, run, reference, name, source, tolerance)
        record["kv_cache"][precision] = result
        errors = result["max_abs_error"]
        say(
            f"{precision}: perplexity {variant_ppl:.2f} (PyTorch {torch_ppl:.2f}, bigram "
            f"{held.bigram_perplexity:.2f}); KV cache vs {name}: logits max abs error "
            f"{errors['cache_vs_whole']:.2g}, present {errors['present_vs_whole']:.2g}; greedy "
            f"{result['greedy_tokens_equal']} tokens equal with and without the cache "
            f"({result['greedy_near_ties']} near-ties); padded batch vs alone {errors['padded_vs_alone']:.2g}"
        )
    return record
