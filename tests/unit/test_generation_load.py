"""The generation load generator's figures and schedule, and the benchmark's recomputation baseline.

The metric definitions (TTFT, TPOT, ITL, E2E, goodput, tokens/s; `loadtests/generation.py`) are
checked on hand-made timelines whose answers are worked out by hand; the Poisson schedule for its
seed, its rate and its first arrival; the SLO gates for PASS and MISS; and `benchmarks.generation`'s
recomputation baseline (the whole sequence fed every step, no cache) against the engine's KV cache
on a tiny random-weight decoder with tinylm's contract, made here (no build, no server).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from benchmarks import generation as bench
from kiln.serving import generate as g
from loadtests import generation as load

# --- the schedule ---------------------------------------------------------------------------------


def test_the_poisson_schedule_repeats_for_a_seed_and_differs_for_another() -> None:
    first = load.poisson_schedule(5.0, 200, seed=7)
    assert first == load.poisson_schedule(5.0, 200, seed=7)
    assert first != load.poisson_schedule(5.0, 200, seed=8)
    assert first[0] == 0.0
    assert all(b > a for a, b in zip(first, first[1:], strict=False))


def test_the_poisson_schedule_has_the_rate_and_exponential_gaps() -> None:
    rate = 8.0
    times = load.poisson_schedule(rate, 20_001, seed=0)
    gaps = np.diff(times)
    assert gaps.mean() == pytest.approx(1 / rate, rel=0.03)
    # exponential: the standard deviation equals the mean, and P(gap > mean) = 1/e
    assert gaps.std() == pytest.approx(1 / rate, rel=0.05)
    assert (gaps > 1 / rate).mean() == pytest.approx(math.exp(-1), abs=0.02)
    assert times[-1] == pytest.approx(20_000 / rate, rel=0.03)


@pytest.mark.parametrize("rate", [0.0, -1.0, math.inf, math.nan])
def test_the_poisson_schedule_refuses_a_rate_that_is_not_positive(rate: float) -> None:
    with pytest.raises(ValueError, match="rate must be"):
        load.poisson_schedule(rate, 10, seed=0)


def test_the_plan_is_seeded_and_keeps_its_ranges() -> None:
    workload = load.Workload(rate=4.0, requests=300, prompt_words=(5, 9), max_tokens=(10, 20), prompts=6)
    requests = load.plan(workload)
    assert requests == load.plan(workload)
    assert [r.arrival for r in requests] == load.poisson_schedule(4.0, 300, seed=0)
    assert {r.prompt_id for r in requests} == set(range(6))
    assert len({r.prompt for r in requests}) == 6
    assert all(5 <= len(r.prompt.split()) <= 9 for r in requests)
    assert {r.max_tokens for r in requests} == set(range(10, 21))
    assert all(r.seed is None and r.temperature == 0.0 for r in requests)
    sampled = load.plan(load.Workload(rate=4.0, requests=5, temperature=0.8, seed=3))
    assert len({r.seed for r in sampled}) == 5
    assert load.plan(load.Workload(rate=4.0, requests=20, seed=1)) != load.plan(
        load.Workload(rate=4.0, requests=20)
    )


def test_the_prompts_come_from_the_held_out_topics() -> None:
    import pydoc_data.topics

    from kiln import registry

    chosen, source = load.prompt_topics()
    build, spec = registry.module_of("tinylm", "build"), registry.module_of("tinylm", "spec")
    split = build.split_topics(spec.SOURCE)
    assert source == "the tinylm build's held-out evaluation topics"
    assert chosen == split.evaluation and not set(chosen) & set(split.training)
    paragraphs = load.prompt_paragraphs()
    assert paragraphs and all(len(p.split()) >= 8 for p in paragraphs)
    text = " ".join(" ".join(pydoc_data.topics.topics[name].split()) for name in chosen)
    assert all(p in text for p in paragraphs)


# --- the figures ----------------------------------------------------------------------------------


def record(
    index: int,
    arrival: float,
    deliveries: list[tuple[float, int]],
    max_tokens: int = 8,
    reason: str = "length",
) -> load.RequestRecord:
    r = load.RequestRecord(index=index, arrival=arrival, max_tokens=max_tokens, sent=arrival)
    r.deliveries = deliveries
    r.output_tokens = deliveries[-1][1]
    r.end = deliveries[-1][0]
    r.finish_reason = reason
    return r


def test_ttft_tpot_itl_and_e2e_of_one_request() -> None:
    # arrival 1.0; responses at 1.1 (1 token), 1.15 (2), 1.35 (4: two tokens in one delivery)
    r = record(0, 1.0, [(1.1, 1), (1.15, 2), (1.35, 4)], max_tokens=4)
    assert r.ttft == pytest.approx(0.1)
    assert r.e2e == pytest.approx(0.35)
    assert r.tpot == pytest.approx((0.35 - 0.1) / 3)
    assert r.itls() == pytest.approx([0.05, 0.2])
    assert load.check_record(r) is None
    one = record(1, 0.0, [(0.2, 1)], max_tokens=1)
    assert one.tpot is None and one.itls() == []


def test_the_summary_of_hand_made_timelines() -> None:
    records = [
        record(0, 0.0, [(0.1, 1), (0.2, 2), (0.3, 3)], max_tokens=3),  # TTFT 100, TPOT 100
        record(1, 0.5, [(0.55, 1), (0.6, 2), (0.65, 3), (0.7, 4), (0.75, 5)], max_tokens=5),  # 50, 50
        record(2, 1.0, [(1.4, 1), (1.45, 2)], max_tokens=8, reason="stop"),  # TTFT 400, TPOT 50
    ]
    failed = load.RequestRecord(index=3, arrival=1.5, max_tokens=8, error="server error: boom")
    summary = load.summarize([*records, failed], load.GoodputSLO(ttft_ms=150.0, tpot_ms=60.0))
    assert summary["requests"] == 4 and summary["completed"] == 3 and summary["failed"] == 1
    assert summary["failure_ratio"] == 0.25 and summary["errors"] == ["server error: boom"]
    assert summary["duration_s"] == pytest.approx(1.45)  # first arrival 0, last end 1.45
    assert summary["output_tokens"] == 10
    assert summary["output_tokens_per_s"] == pytest.approx(10 / 1.45)
    assert summary["request_throughput"] == pytest.approx(3 / 1.45)
    # goodput: request 1 alone meets TTFT <= 150 ms and TPOT <= 60 ms (0: TPOT 100; 2: TTFT 400)
    assert summary["good_requests"] == 1
    assert summary["goodput"] == pytest.approx(1 / 1.45)
    assert summary["ttft_ms"]["p50"] == pytest.approx(100.0)  # method "higher": an observed value
    assert summary["ttft_ms"]["p99"] == pytest.approx(400.0)
    assert summary["ttft_ms"]["mean"] == pytest.approx(550 / 3)
    assert summary["tpot_ms"]["p50"] == pytest.approx(50.0)
    assert summary["e2e_ms"]["p95"] == pytest.approx(450.0)
    # ITL: the gaps 100, 100 (request 0), 50 x 4 (request 1), 50 (request 2)
    assert summary["itl_ms"]["mean"] == pytest.approx(450 / 7)
    assert summary["itl_ms"]["p50"] == pytest.approx(50.0) and summary["itl_ms"]["p95"] == pytest.approx(
        100.0
    )
    assert summary["finish_reasons"] == {"length": 2, "stop": 1, "none": 1}
    assert summary["multi_token_share"] == 0.0


def test_goodput_counts_a_one_token_request_by_its_ttft_alone() -> None:
    slo = load.GoodputSLO(ttft_ms=100.0, tpot_ms=1.0)
    assert slo.met(record(0, 0.0, [(0.05, 1)], max_tokens=1))
    assert not slo.met(record(0, 0.0, [(0.05, 1), (0.5, 2)], max_tokens=2))
    assert not slo.met(load.RequestRecord(index=0, arrival=0.0, max_tokens=1, error="x"))


def test_tokens_in_a_window_count_each_delivery_once_by_its_time() -> None:
    records = [record(0, 0.0, [(0.5, 1), (1.5, 3), (2.5, 4)]), record(1, 1.0, [(1.2, 2), (3.0, 5)])]
    assert load.tokens_in_window(records, 1.0, 2.0) == 2 + 2
    assert load.tokens_in_window(records, 0.0, 10.0) == 9


@pytest.mark.parametrize(
    ("deliveries", "max_tokens", "reason", "message"),
    [
        ([(0.1, 1), (0.2, 9)], 8, "length", "more than max_tokens 8"),
        ([(0.1, 1), (0.2, 3)], 8, "length", "'length' after 3 of max_tokens 8"),
        ([(0.1, 2), (0.2, 2)], 8, "stop", "did not grow"),
        ([(0.1, 2)], 8, "cancelled", "finish_reason 'cancelled'"),
    ],
)
def test_an_answer_that_breaks_the_contract_fails(
    deliveries: list[tuple[float, int]], max_tokens: int, reason: str, message: str
) -> None:
    r = record(0, 0.0, deliveries, max_tokens=max_tokens, reason=reason)
    assert message in (load.check_record(r) or "")
    assert load.check_record(load.RequestRecord(index=0, arrival=0.0, max_tokens=4)) == "no final response"


def test_greedy_answers_of_one_prompt_must_agree() -> None:
    a, b, c = (record(i, 0.0, [(0.1, 1)]) for i in range(3))
    for r, text in ((a, "The cat"), (b, "The cat sat"), (c, "The dog")):
        r.prompt_id, r.text = 4, text
    assert load.consistency([a, b]) == (1, [])
    pairs, problems = load.consistency([a, b, c])
    assert pairs == 2 and len(problems) == 1
    assert (
        problems[0]
        == "requests 2 and 1 (same prompt, greedy) differ from character 4 of 7: 'dog' vs 'cat sat'"
    )


# --- the gates ------------------------------------------------------------------------------------


def test_the_gates_pass_and_miss_with_the_figure_and_the_shortfall() -> None:
    summary = load.summarize(
        [record(0, 0.0, [(0.2, 1), (0.3, 2), (0.5, 3)], max_tokens=3)], load.GoodputSLO(1000.0, 1000.0)
    )
    gates = load.GenerationGates(p95_ttft_ms=250.0, p95_itl_ms=150.0, min_tokens_per_s=10.0)
    verdicts = {v.gate: v for v in load.check(gates, summary)}
    assert verdicts["p95_ttft_ms"].passed and verdicts["p95_ttft_ms"].measured == pytest.approx(200.0)
    assert not verdicts["p95_itl_ms"].passed  # the gaps are 100 and 200 ms
    assert "MISS  p95 ITL" in verdicts["p95_itl_ms"].describe()
    assert "over by 50.0 ms (+33.3%)" in verdicts["p95_itl_ms"].describe()
    assert not verdicts["min_tokens_per_s"].passed  # 3 tokens in 0.5 s
    assert "under by 4.0 tokens/s" in verdicts["min_tokens_per_s"].describe()
    assert verdicts["max_failure_ratio"].passed
    empty = load.check(
        gates, load.summarize([load.RequestRecord(index=0, arrival=0.0, max_tokens=1, error="x")])
    )
    assert not any(v.passed for v in empty)


def test_gate_overrides_name_the_gates() -> None:
    assert load.parse_overrides(["p95_ttft_ms=500", "min_tokens_per_s=2"]) == {
        "p95_ttft_ms": 500.0,
        "min_tokens_per_s": 2.0,
    }
    with pytest.raises(ValueError, match="NAME one of p95_ttft_ms"):
        load.parse_overrides(["p99_ms=5"])


# --- the recomputation baseline on a tiny decoder -------------------------------------------------

LAYERS, HEADS, HEAD_DIM, CONTEXT = 2, 2, 8, 96


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight decoder with tinylm's ONNX contract (past_key_values.{i}.key/value in,
    present.{i}.key/value out), a byte-level BPE tokenizer and generation.json."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    folder = tmp_path_factory.mktemp("tiny_decoder")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(load.prompt_paragraphs()[:40], trainer)
    tokenizer.save(str(folder / "tokenizer.json"))
    vocab, width = tokenizer.get_vocab_size(), HEADS * HEAD_DIM

    class Decoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.embed = torch.nn.Embedding(vocab, width)
            self.position = torch.nn.Embedding(CONTEXT, width)
            self.qkv = torch.nn.ModuleList(torch.nn.Linear(width, 3 * width) for _ in range(LAYERS))
            self.out = torch.nn.ModuleList(torch.nn.Linear(width, width) for _ in range(LAYERS))
            self.head = torch.nn.Linear(width, vocab)

        def forward(
            self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, *past: torch.Tensor
        ):  # type: ignore[no-untyped-def]
            x = self.embed(ids) + self.position(positions)
            batch, length = ids.shape
            total = past[0].shape[2] + length
            query = torch.arange(length).unsqueeze(1) + past[0].shape[2]
            allowed = (torch.arange(total).unsqueeze(0) <= query).unsqueeze(0) & (mask.unsqueeze(1) == 1)
            bias = (~allowed).float().unsqueeze(1) * -1e4
            presents = []
            for i in range(LAYERS):
                q, k, v = (
                    t.view(batch, length, HEADS, HEAD_DIM).transpose(1, 2)
                    for t in self.qkv[i](x).split(width, -1)
                )
                k, v = torch.cat([past[2 * i], k], 2), torch.cat([past[2 * i + 1], v], 2)
                presents += [k, v]
                attention = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(HEAD_DIM) + bias, -1) @ v
                x = x + self.out[i](attention.transpose(1, 2).reshape(batch, length, width))
            return (self.head(x), *presents)

    pasts = [f"past_key_values.{i}.{kind}" for i in range(LAYERS) for kind in ("key", "value")]
    presents = [f"present.{i}.{kind}" for i in range(LAYERS) for kind in ("key", "value")]
    example = (
        torch.zeros(2, 3, dtype=torch.long),
        torch.ones(2, 5, dtype=torch.long),
        torch.zeros(2, 3, dtype=torch.long),
        *(torch.zeros(2, HEADS, 2, HEAD_DIM) for _ in pasts),
    )
    axes = {
        "input_ids": {0: "batch", 1: "sequence"},
        "attention_mask": {0: "batch", 1: "total"},
        "position_ids": {0: "batch", 1: "sequence"},
        "logits": {0: "batch", 1: "sequence"},
        **{name: {0: "batch", 2: "past"} for name in pasts},
        **{name: {0: "batch", 2: "total"} for name in presents},
    }
    torch.onnx.export(
        Decoder().eval(), example, str(folder / "model.onnx"),
        input_names=["input_ids", "attention_mask", "position_ids", *pasts],
        output_names=["logits", *presents], dynamic_axes=axes, opset_version=17, dynamo=False,
    )  # fmt: skip
    info = {"eos_token_id": 0, "vocab_size": vocab, "max_context": CONTEXT, "num_layers": LAYERS}
    (folder / "generation.json").write_text(json.dumps({**info, "num_heads": HEADS, "head_dim": HEAD_DIM}))
    return folder


@pytest.fixture(scope="module")
def loaded(tiny: Path) -> g.LoadedModel:
    return g.LoadedModel.from_folder(tiny, g.default_params())


def test_recomputing_the_prefix_gives_the_tokens_of_the_kv_cache(loaded: g.LoadedModel) -> None:
    params = g.default_params()
    for prompt in ("The return value of", "A class definition creates"):
        ids = loaded.tokenizer.encode(prompt)
        count = CONTEXT - len(ids)
        cached = bench.kv_generate(loaded, params, prompt, count)
        recomputed = bench.recompute_generate(loaded, ids, count)
        assert len(cached) >= 16
        assert cached == recomputed
    # the comparison can fail: a prefix missing its first token continues differently
    assert bench.recompute_generate(loaded, ids[1:], 16) != bench.kv_generate(loaded, params, prompt, 16)


def test_the_recomputation_stops_at_the_end_of_sequence(loaded: g.LoadedModel) -> None:
    ids = loaded.tokenizer.encode("If the")
    first = bench.recompute_generate(loaded, ids, 1)[0]
    eos_there = g.LoadedModel(
        loaded.session, loaded.tokenizer, g.ModelInfo(**{**loaded.info.__dict__, "eos_token_id": first})
    )
    assert bench.recompute_generate(eos_there, ids, 10) == [first]


def test_requests_are_cut_to_the_context(tiny: Path, loaded: g.LoadedModel) -> None:
    requests = load.plan(load.Workload(rate=1.0, requests=20, prompt_words=(20, 40), max_tokens=(80, 90)))
    fitted = bench.fit_context(requests, tiny)
    for before, after in zip(requests, fitted, strict=True):
        room = CONTEXT - len(loaded.tokenizer.encode(before.prompt))
        assert after.max_tokens == max(1, min(before.max_tokens, room))
    assert any(a.max_tokens < b.max_tokens for a, b in zip(fitted, requests, strict=True))


def test_the_in_process_closed_loop_keeps_its_sequences_in_flight(loaded: g.LoadedModel) -> None:
    params = g.default_params(max_running=4)
    mix = bench.clamp_to_context(
        load.plan(load.Workload(rate=1.0, requests=8, prompt_words=(3, 6), max_tokens=(4, 8))),
        loaded.tokenizer,
        loaded.info,
    )
    result = bench.inprocess_closed(loaded, params, mix, concurrency=4, duration_s=0.5, warmup_s=0.1)
    assert result["tokens"] > 0 and result["tokens_per_s"] == pytest.approx(result["tokens"] / 0.5)
    assert 1.0 < result["decode_batch_mean"] <= 4.0


def test_the_generation_repository_serves_both_schedulings_on_the_same_files(
    tiny: Path, tmp_path: Path
) -> None:
    repository = bench.write_repository(tmp_path / "repository", tiny)
    params = bench.served_params(bench.generate_spec())
    for name in ("model.onnx", "tokenizer.json", "generation.json"):
        assert (repository / params.model / "1" / name).resolve() == (tiny / name).resolve()
    continuous = (repository / bench.GENERATE / "config.pbtxt").read_text()
    static = (repository / bench.STATIC / "config.pbtxt").read_text()
    assert "decoupled: true" in continuous and "decoupled: true" in static
    assert '"static"' in static and '"static"' not in continuous
    assert (repository / "identity" / "1" / "model.py").is_file()
