"""The benchmark against its floor (issue 13): the identity model's definition and checks, figures
as ratios to the floor's, the verdicts of ratio targets, both pipeline forms in the variant
repository, perf_analyzer's rate-mode figures, and the capacity search's account of its generator.
No server: the integration test `tests/integration/test_bench_capacity.py` runs a real one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from benchmarks import capacity, floor, perf, report, variants
from benchmarks import run as bench_run
from kiln import tensors
from loadtests import checks

# --- the floor model ------------------------------------------------------------------------------


def test_the_floor_model_is_written_as_a_python_backend_model(tmp_path: Path) -> None:
    folder = floor.write(tmp_path)
    config = text_format.Parse((folder / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert (config.name, config.backend, config.max_batch_size) == (floor.IDENTITY, "python", 256)
    assert [(t.name, list(t.dims)) for t in config.input] == [("x", [16])]
    assert [(t.name, list(t.dims)) for t in config.output] == [("y", [16])]
    assert config.HasField("dynamic_batching")
    compile((folder / "1" / "model.py").read_text(), "model.py", "exec")
    with pytest.raises(FileExistsError, match="already has a model named 'identity'"):
        floor.write(tmp_path)


def test_the_floor_checker_accepts_the_copy_and_names_a_wrong_answer() -> None:
    item = floor.corpus().items[0]
    checker = floor.Checker()
    checker.check(item, {"y": item.inputs["x"].copy()})
    with pytest.raises(AssertionError, match="identity: output 'y' is not the input 'x'"):
        checker.check(item, {"y": np.zeros_like(item.inputs["x"])})
    with pytest.raises(AssertionError, match="got None"):
        checker.check(item, {})


def test_the_floor_input_file_holds_its_one_request(tmp_path: Path) -> None:
    import json

    data = json.loads(floor.input_file(tmp_path / "f.json").read_text())["data"]
    assert data == [{"x": {"content": [float(i) for i in range(16)], "shape": [16]}}]


# --- ratios and verdicts ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "base", "expected"),
    [(3.0, 2.0, 1.5), (None, 2.0, None), (3.0, None, None), (3.0, 0.0, None), (0.0, 2.0, 0.0)],
)
def test_a_ratio_to_the_floor(value: Any, base: Any, expected: Any) -> None:
    assert floor.ratio(value, base) == expected


@pytest.mark.parametrize(
    ("ratio", "limit", "at_most", "passed", "shown"),
    [
        (1.2, 1.5, True, True, "1.20x <= 1.5x: PASS"),
        (1.5, 1.5, True, True, "1.50x <= 1.5x: PASS"),
        (3.0, 1.5, True, False, "3.00x > 1.5x: MISS by 100%"),
        (0.45, 0.6, False, False, "0.45x < 0.6x: MISS by 25%"),
        (0.9, 0.6, False, True, "0.90x >= 0.6x: PASS"),
        (None, 0.6, False, None, "no figure (target >= 0.6x)"),
    ],
)
def test_verdicts_of_ratio_targets(ratio: Any, limit: float, at_most: bool, passed: Any, shown: str) -> None:
    verdict = floor.judge(ratio, limit, at_most)
    assert verdict.passed is passed
    assert verdict.describe() == shown


def test_a_ratio_target_needs_a_positive_limit() -> None:
    with pytest.raises(ValueError, match="limit must be > 0, got 0"):
        floor.judge(1.0, 0)


def _cell(id_: str, transport: str, level: int, throughput: float, p50: float, p99: float) -> dict[str, Any]:
    median = {"throughput": throughput, "p50_ms": p50, "p99_ms": p99}
    return {"id": id_, "mode": "closed", "transport": transport, "level": level, "median": median}


def test_every_cell_and_perf_run_gets_ratios_to_the_floor_at_the_same_load() -> None:
    cells = [
        _cell("floor/gRPC-c16", "gRPC", 16, 2000.0, 1.0, 4.0),
        _cell("4/x-on-c16", "gRPC", 16, 500.0, 3.0, 6.0),
        _cell("2/x-http-c16", "HTTP", 16, 100.0, 9.0, 9.0),  # no HTTP floor measured
    ]
    entries = [
        {"model": bench_run.FLOOR, "mode": "concurrency", "level": 1, "throughput": 1000.0, "p50_ms": 0.5, "p99_ms": 1.0},
        {"model": bench_run.FLOOR, "mode": "concurrency", "level": 1, "throughput": 1200.0, "p50_ms": 0.7, "p99_ms": 2.0},
        {"model": "fraud_scorer", "mode": "concurrency", "level": 1, "throughput": 550.0, "p50_ms": 1.2, "p99_ms": 3.0},
        {"model": "fraud_scorer", "mode": "rate", "level": 100, "throughput": 100.0, "p50_ms": 1.0, "p99_ms": 2.0},
    ]  # fmt: skip
    bench_run.add_floor_ratios(cells, entries)
    assert cells[1]["vs_floor"] == {"throughput": 0.25, "p50_ms": 3.0, "p99_ms": 1.5}
    assert cells[2]["vs_floor"] == {"throughput": None, "p50_ms": None, "p99_ms": None}
    assert "vs_floor" not in cells[0]
    assert entries[2]["vs_floor"] == {"throughput": 0.5, "p50_ms": pytest.approx(2.0), "p99_ms": 2.0}
    assert "vs_floor" not in entries[3]  # open loop: the capacity target is the ratio


def test_where_the_time_goes_names_the_server_side_split_and_the_steps() -> None:
    entry = {
        "p50_ms": 2.0,
        "server": {"total_us": 1500.0, "queue_us": 400.0, "compute_input_us": 100.0,
                   "compute_infer_us": 900.0, "compute_output_us": 50.0},
        "composing": [{"model": "fraud", "total_us": 300.0, "queue_us": 100.0, "inferences": 64, "executions": 16},
                      {"model": "fraud_features", "total_us": 900.0, "queue_us": 200.0}],
    }  # fmt: skip
    line = bench_run.where_time_goes(entry)
    assert line.startswith("server 1500 us per request (queue 400 us, compute 1050 us)")
    assert "about 500 us outside the server" in line
    assert line.endswith(
        "steps: fraud_features 900 us (queue 200), fraud 300 us (queue 100, average batch 4.0)"
    )
    assert bench_run.where_time_goes({"p50_ms": 1.0}) == "p50 1.0 ms; no server-side figure"
    fast_client = bench_run.where_time_goes({**entry, "p50_ms": 1.2, "composing": []})
    assert fast_client.endswith(
        "client p50 1200 us (not above the server's average: little time outside the server)"
    )


def test_the_forms_table_says_which_form_is_faster() -> None:
    def result(model: str, c: int, p50: float, throughput: float) -> perf.PerfResult:
        return perf.PerfResult(model, "concurrency", c, throughput=throughput, p50_ms=p50, p99_ms=p50 * 2)

    default = checks.served(tensors.FRAUD_SCORER)
    other = variants.other_form(default).name
    runs = {
        (tensors.FRAUD_SCORER, 1): [result(tensors.FRAUD_SCORER, 1, 3.0, 300.0)],
        (tensors.FRAUD_SCORER, 16): [result(tensors.FRAUD_SCORER, 16, 9.0, 900.0)],
        (other, 1): [result(other, 1, 1.0, 900.0), result(other, 1, 2.0, 800.0)],
        (other, 16): [result(other, 16, 6.0, 1500.0)],
    }
    floors = {1: {"p50_ms": 0.5, "p99_ms": 1.0}, 16: {"throughput": 3000.0}}
    rows = bench_run.form_rows(tensors.FRAUD_SCORER, runs, floors, 16)
    assert [(r["model"], r["default"]) for r in rows] == [(tensors.FRAUD_SCORER, True), (other, False)]
    assert rows[1]["p50_ms"] == 1.5
    assert rows[1]["p50_vs_floor"] == 3.0
    assert rows[0]["throughput_vs_floor"] == pytest.approx(0.3)
    faster = variants.other_form(default).form
    assert {(r["faster_p50"], r["faster_throughput"]) for r in rows} == {(faster, faster)}
    assert "| fraud_scorer |" in report.forms_section({"forms": rows})


def test_the_text_step_batch_comes_from_the_statistics_deltas() -> None:
    before = {"text_encoder": (100, 50), "text_embedder": (100, 100)}
    after = {"text_encoder": (580, 110), "text_embedder": (580, 580)}
    delta = bench_run.stats_delta(before, after)
    assert delta == {"text_encoder": (480, 60), "text_embedder": (480, 480)}
    mixed = [
        perf.PerfResult("t", "concurrency", 16, throughput=t, p50_ms=1.0, p99_ms=2.0) for t in (90, 100, 95)
    ]
    single = [perf.PerfResult("t", "concurrency", 16, throughput=100.0, p50_ms=1.0, p99_ms=2.0)]
    summary = bench_run.text_summary(mixed, single, [delta, delta], "a text")
    assert summary["mixed"]["throughput"] == 95
    assert (summary["batch_model"], summary["inferences"], summary["executions"]) == (
        "text_encoder",
        960,
        120,
    )
    assert summary["average_batch"] == 8.0
    # A fused default form runs the step inside one model: the pipeline's own counts.
    fused = bench_run.text_summary(mixed, single, [{"text_encoder": (0, 0), "text_embedder": (64, 16)}], "a")
    assert (fused["batch_model"], fused["average_batch"]) == ("text_embedder", 4.0)


# --- both forms in the variant repository -----------------------------------------------------------


def test_the_other_form_of_a_pipeline_is_named_after_it() -> None:
    spec = checks.served(tensors.FRAUD_SCORER)
    other = variants.other_form(spec)
    assert other.form != spec.form
    assert other.name == f"{spec.name}_{other.form}"
    assert variants.other_form(other).form == spec.form
    with pytest.raises(ValueError, match="other_form needs a pipeline .* got ModelSpec 'fraud'"):
        variants.other_form(checks.served("fraud"))


def test_batching_off_strips_a_fused_pipelines_own_batcher(tmp_path: Path) -> None:
    from kiln.models.fraud import pipeline as fraud_pipeline
    from kiln.registry import by_name

    ensemble = checks.served(tensors.FRAUD_SCORER)
    fused = ensemble if ensemble.form == "fused" else variants.other_form(ensemble)
    specs = [by_name("fraud"), fraud_pipeline.FEATURES_SPEC, fraud_pipeline.THRESHOLD_SPEC, fused]
    repository = variants.variant_repository(tmp_path / "repo", variants.without_dynamic_batching, specs)
    for name in (fused.name, fraud_pipeline.FEATURES_SPEC.name, "fraud"):
        text = (repository / name / "config.pbtxt").read_text()
        config = text_format.Parse(text, model_config_pb2.ModelConfig())
        assert not config.HasField("dynamic_batching"), name
    fused_config = text_format.Parse(
        (repository / fused.name / "config.pbtxt").read_text(), model_config_pb2.ModelConfig()
    )
    assert fused_config.backend == "kiln_fused"
    assert fused_config.max_batch_size == fused.max_batch_size


# --- perf_analyzer's rate mode and the capacity search's generator ----------------------------------

RATE_BLOCK = """\
Request Rate: 4000 inference requests per seconds
  Client:
    Request count: 14625
    Avg send request rate: 3734.35 infer/sec
    [WARNING] Perf Analyzer was not able to keep up with the desired request rate. 7.61% of the requests were delayed.
    Throughput: 3698.32 infer/sec
    Avg latency: 6030 usec (standard deviation 11366 usec)
    p50 latency: 997 usec
    p90 latency: 19322 usec
    p95 latency: 36180 usec
    p99 latency: 51861 usec
  Server:
    Inference count: 14630
    Execution count: 7997
    Successful request count: 14630
    Avg request latency: 5261 usec (overhead 30 usec + queue 2041 usec + compute input 372 usec + compute infer 1257 usec + compute output 1560 usec)

Inferences/Second vs. Client Average Batch Latency
Request Rate: 4000.00, throughput: 3698.32 infer/sec, latency 6030 usec
"""


def _rate_result(text: str) -> perf.PerfResult:
    result = perf.PerfResult(floor.IDENTITY, "rate", 4000.0)
    perf.parse_output(floor.IDENTITY, text, result)
    return result


def test_perf_analyzer_says_when_it_could_not_keep_up() -> None:
    late = _rate_result(RATE_BLOCK)
    assert (late.send_rate, late.delayed_share, late.p99_ms) == (3734.35, pytest.approx(0.0761), 51.861)
    assert capacity.generator_limited(late, 4000.0, 0.97, 100.0) is True
    assert capacity.perf_rate_held(late, 4000.0, 100.0, 0.9) is False  # p99 fine, generator late
    # Keeping up, perf_analyzer 2.51 prints neither the send rate nor the warning.
    kept_up = "\n".join(
        line for line in RATE_BLOCK.splitlines() if "send request rate" not in line and "WARNING" not in line
    )
    on_time = _rate_result(kept_up.replace("3698.32", "3990.0") + "\n")
    assert (on_time.send_rate, on_time.delayed_share) == (None, 0.0)
    assert capacity.generator_limited(on_time, 4000.0, 0.97, 100.0) is False
    assert capacity.perf_rate_held(on_time, 4000.0, 100.0, 0.97) is True
    assert capacity.perf_rate_held(on_time, 4000.0, 10.0, 0.97) is False  # p99 51.9 ms


def test_late_sends_with_a_p99_over_the_limit_are_the_servers_miss() -> None:
    def late(p99_ms: float) -> perf.PerfResult:
        return perf.PerfResult(
            "m", "rate", 400.0, throughput=399.0, p99_ms=p99_ms, send_rate=399.0, delayed_share=0.05
        )

    assert capacity.generator_limited(late(31.0), 400.0, 0.97, 10.0) is False  # the server missed
    assert capacity.generator_limited(late(4.0), 400.0, 0.97, 10.0) is True  # a p99 hiding late sends
    assert capacity.perf_rate_held(late(4.0), 400.0, 10.0, 0.97) is False


def test_a_perf_probe_without_a_figure_does_not_hold() -> None:
    failed = perf.PerfResult(floor.IDENTITY, "rate", 100.0, error="no measurement (exit status 2)")
    assert capacity.perf_rate_held(failed, 100.0, 10.0, 0.97) is False
    assert capacity.generator_limited(failed, 100.0, 0.97, 10.0) is False


def test_a_search_limited_by_its_generator_says_so() -> None:
    def measure(rate: float) -> perf.PerfResult:
        sent = min(rate, 500.0)
        return perf.PerfResult(
            "m", "rate", rate, throughput=sent, p99_ms=2.0, send_rate=sent, delayed_share=0.0
        )

    search = capacity.Search(100.0, 1, 10.0, 10_000.0)
    bracket = search.run(measure, lambda rate, r: capacity.perf_rate_held(r, rate, 10.0, 0.97))
    found = capacity.summarize(
        "m", "perf_analyzer", bracket, lambda p: capacity.generator_limited(p.result, p.rate, 0.97, 10.0),
        lambda r: {"throughput": r.throughput},
    )  # fmt: skip
    assert (found.rate, found.high, found.limited) == (400.0, 600.0, True)
    assert found.note.startswith("400/s held; at 600/s perf_analyzer could not offer the rate")
    assert found.to_json()["probes"][-1] == {"rate": 600.0, "held": False, "generator_limited": True,
                                              "throughput": 500.0}  # fmt: skip


def test_a_search_that_never_holds_is_a_measurement_not_a_missing_one() -> None:
    bracket = capacity.Search(100.0, 0, 10.0, 1000.0).run(lambda rate: None, lambda rate, r: False)
    found = capacity.summarize("m", "loadgen", bracket, lambda p: False, lambda r: {})
    assert found.rate == 0.0
    assert found.note == (
        "no rate held down to 12/s (the server missed the limit there): measured, not 0 for want of a measurement"
    )


def test_the_batching_off_variant_of_every_served_model_generates(tmp_path: Path) -> None:
    """Removing a model's batcher also removes its inputs' ragged flag (text_encoder sets it), which
    kiln.spec refuses without a batcher: target 4's variant repository of everything generates."""
    from kiln.registry import specs as all_specs

    repository = variants.variant_repository(tmp_path / "repo", variants.without_dynamic_batching, all_specs())
    text = (repository / "text_encoder" / "config.pbtxt").read_text()
    assert "dynamic_batching" not in text and "allow_ragged_batch" not in text
    encoder = variants.without_dynamic_batching(next(s for s in all_specs() if s.name == "text_encoder"))
    assert encoder.dynamic_batching is None and not any(t.allow_ragged_batch for t in encoder.inputs)
