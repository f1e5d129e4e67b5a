"""kiln.tune without a server: the choice rule on given medians, the grid, the candidates, the
specs they render to, the spec line, and the record (tuning.json, tuning.md)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from kiln import tune
from kiln.spec import DynamicBatching, EnsembleSpec, Fused, InstanceGroup, ModelSpec, validate
from kiln.tune import Candidate, Figures, Grid, Rule, TuneError, choose

LOW, HIGH = 1, 16


def figs(p50_low: float, throughput: float, p99_high: float) -> dict[int, Figures]:
    """A candidate's medians: its p50 at c=1 and its throughput and p99 at c=16."""
    return {
        LOW: Figures(throughput=1000.0, p50_ms=p50_low, p99_ms=p50_low * 2, repeats=3),
        HIGH: Figures(throughput=throughput, p50_ms=1.0, p99_ms=p99_high, repeats=3),
    }


A = Candidate(0, (), 1)
B = Candidate(100, (), 1)
C = Candidate(500, (8, 16), 1)
D = Candidate(0, (), 2)


def test_the_highest_throughput_within_both_bounds_wins() -> None:
    choice = choose([A, B, C], [figs(0.50, 5000, 4.0), figs(0.54, 6000, 5.0), figs(0.52, 7000, 6.0)], Rule())
    assert choice.chosen == 2
    assert choice.verdicts[2] == "chosen"
    assert choice.best_throughput == 7000
    assert choice.verdicts[0].startswith("eligible: 71%")


def test_a_p50_at_low_concurrency_more_than_the_slack_above_the_best_is_out() -> None:
    choice = choose([A, B], [figs(0.50, 5000, 4.0), figs(0.56, 9000, 4.0)], Rule())
    assert choice.chosen == 0
    assert choice.verdicts[1] == "out: p50 at c=1 0.560 ms > 1.10 x best 0.500 ms"
    assert choose([A, B], [figs(0.50, 5000, 4.0), figs(0.56, 9000, 4.0)], Rule(p50_slack=0.2)).chosen == 1


def test_a_p99_at_high_concurrency_above_the_factor_or_the_bound_is_out() -> None:
    medians = [figs(0.50, 5000, 4.0), figs(0.50, 9000, 8.5)]
    choice = choose([A, B], medians, Rule())
    assert choice.chosen == 0
    assert choice.verdicts[1] == "out: p99 at c=16 8.500 ms > limit 8.000 ms"
    assert choose([A, B], medians, Rule(p99_factor=3)).chosen == 1
    bounded = choose([A, B], medians, Rule(p99_factor=3, p99_ms=5))
    assert bounded.chosen == 0 and "limit 5.000 ms" in bounded.verdicts[1]


def test_throughputs_within_the_tie_go_to_the_cheapest() -> None:
    # D (2 instances) is 3% faster than A: equal on this measurement, A costs less.
    choice = choose([D, A], [figs(0.50, 6180, 4.0), figs(0.50, 6000, 4.0)], Rule())
    assert choice.chosen == 1
    assert choice.verdicts[1] == "chosen: cheapest of 2 within 5%"
    assert choice.verdicts[0] == "eligible: 100% of the best throughput (tied, costlier)"
    assert choose([D, A], [figs(0.50, 6180, 4.0), figs(0.50, 6000, 4.0)], Rule(tie=0.01)).chosen == 0
    # among equal instance counts, the shorter queue delay, then fewer preferred sizes
    assert choose([C, B], [figs(0.5, 6000, 4.0), figs(0.5, 6000, 4.0)], Rule()).chosen == 1
    assert choose([Candidate(0, (8,), 1), A], [figs(0.5, 6000, 4.0)] * 2, Rule()).chosen == 1


def test_a_candidate_measured_in_under_half_its_repeats_is_out_and_no_eligible_one_chooses_none() -> None:
    failed = {LOW: Figures(None, None, None, errors=("no measurement (timed out): x",)), HIGH: figs(1, 1, 1)[HIGH]}
    choice = choose([A, B], [failed, figs(0.5, 5000, 4.0)], Rule())
    assert choice.chosen == 1 and choice.verdicts[0] == "out: measured in fewer than half of its repeats"
    one_of_three = {LOW: Figures(1000.0, 0.5, 1.0, repeats=1, errors=("a", "b")), HIGH: figs(1, 1, 1)[HIGH]}
    assert choose([A, B], [one_of_three, figs(0.5, 5000, 4.0)], Rule()).chosen == 1
    two_of_three = {LOW: Figures(1000.0, 0.5, 1.0, repeats=2, errors=("a",)), HIGH: figs(0.5, 9000, 4.0)[HIGH]}
    assert choose([A, B], [two_of_three, figs(0.5, 5000, 4.0)], Rule()).chosen == 0
    assert choose([A], [failed], Rule()).chosen is None
    # A has the best p50 but the worst tail, B the best tail but a slow lone request: neither passes
    split = choose([A, B], [figs(0.5, 9000, 20.0), figs(1.0, 5000, 4.0)], Rule())
    assert split.chosen is None
    assert [v.split(":")[0] for v in split.verdicts] == ["out", "out"]


def test_figures_are_medians_of_the_repeats_without_the_failed_ones() -> None:
    runs = [
        {"throughput": 100.0, "p50_ms": 1.0, "p99_ms": 3.0, "average_batch": 2.0, "error": None},
        {"throughput": 300.0, "p50_ms": 2.0, "p99_ms": 1.0, "average_batch": None, "error": None},
        {"throughput": 200.0, "p50_ms": 3.0, "p99_ms": 2.0, "average_batch": 4.0, "error": None},
        {"throughput": None, "p50_ms": None, "p99_ms": None, "average_batch": None, "error": "boom"},
    ]
    figures = Figures.of(runs)
    assert (figures.throughput, figures.p50_ms, figures.p99_ms, figures.average_batch) == (200.0, 2.0, 2.0, 3.0)
    assert figures.repeats == 3 and figures.errors == ("boom",) and figures.complete
    assert Figures.of(runs[2:]).complete and not Figures.of(runs[3:]).complete  # 1 of 2 is half; 0 of 1 is not


def test_the_grid_parses_each_axis_and_keeps_the_defaults_of_the_others() -> None:
    grid = Grid.parse("delays=0,250; preferred=none/4,8/16; instances=2")
    assert grid == Grid((0, 250), ((), (4, 8), (16,)), (2,))
    assert Grid.parse("instances=1") == Grid(tune.DEFAULT_DELAYS_US, ((), (8, 16)), (1,))
    assert Grid.parse("", 32).preferred == ((), (16, 32))
    assert len(Grid.default().candidates()) == 16


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("delay=0", "--grid part 'delay=0' must be delays=..., preferred=... or instances=..."),
        ("delays=0,x", "--grid delays='0,x': values must be integers separated by ','"),
        ("preferred=8;16", "--grid part '16' must be delays=..., preferred=... or instances=..."),
    ],
)
def test_a_bad_grid_names_the_part(text: str, message: str) -> None:
    with pytest.raises(TuneError) as error:
        Grid.parse(text)
    assert str(error.value).startswith(message)


def test_grid_and_rule_problems_name_the_value() -> None:
    assert Grid((0, -1), ((16, 8), (512,)), (0,)).problems(256) == [
        "delays must be integers in 0..10000000 us, got [0, -1]",
        "instances must be integers in 1..64, got [0]",
        "preferred set 16,8 must be ascending distinct sizes in 1..256 (the model's max_batch_size)",
        "preferred set 512 must be ascending distinct sizes in 1..256 (the model's max_batch_size)",
    ]
    assert Grid().problems(256) == []
    assert Rule(16, 1, p99_factor=0.5, tie=1.5).problems() == [
        "concurrencies must be integers with 1 <= low < high, got 16 and 1",
        "p99 factor must be >= 1, got 0.5",
        "tie must be in 0..1 (a share), got 1.5",
    ]


def test_resolve_finds_models_and_fused_pipelines_and_refuses_the_rest() -> None:
    fraud = tune.resolve("fraud")
    assert isinstance(fraud.spec, ModelSpec) and fraud.form == "model" and fraud.folder.name == "fraud"
    assert tune.resolve("fraud_int8").spec.name == "fraud_int8"
    fused = tune.resolve("fraud_scorer", "fused")
    assert isinstance(fused.spec, EnsembleSpec) and fused.spec.form == "fused" and fused.form == "fused"
    with pytest.raises(TuneError, match="'fraud_scorer' is a pipeline in the ensemble form"):
        tune.resolve("fraud_scorer", "ensemble")
    with pytest.raises(TuneError, match="'fraud_scorer' is a pipeline, not a model: tune it with --form fused"):
        tune.resolve("fraud_scorer", "model")
    with pytest.raises(TuneError, match="'fraud' is a model, not a pipeline"):
        tune.resolve("fraud", "fused")
    with pytest.raises(TuneError, match=r"no served model named 'nope'; known: .*fraud_scorer"):
        tune.resolve("nope")


def test_the_current_settings_come_first_and_a_grid_point_equal_to_them_is_not_repeated() -> None:
    fraud = tune.resolve("fraud")
    batching = fraud.spec.dynamic_batching
    current = fraud.current()
    assert current == Candidate(
        batching.max_queue_delay_us, batching.preferred_batch_sizes,
        sum(g.count for g in fraud.spec.instance_groups), current=True,
    )
    other_sizes = () if current.preferred_batch_sizes else (8, 16)
    grid = Grid((current.max_queue_delay_us, current.max_queue_delay_us + 1),
                (current.preferred_batch_sizes, other_sizes), (current.instances,))
    candidates = tune.candidates_for(fraud, grid)
    assert candidates[0] == current and len(candidates) == 4 and sum(c.current for c in candidates) == 1
    assert [c.current for c in tune.candidates_for(fraud, grid, False)] == [False] * 4
    unbatched = tune.Target("x", dataclasses.replace(fraud.spec, dynamic_batching=None), fraud.folder, "model")
    assert unbatched.current().label() == "no dynamic batcher, 1 inst (current)"


def test_candidates_render_to_valid_specs_served_beside_their_dependencies() -> None:
    fraud = tune.resolve("fraud")
    names = [tune.candidate_name("fraud", i) for i in range(2)]
    rendered = [fraud.render(Candidate(100, (8, 16), 2), names[0]), fraud.render(Candidate(0, (), 1), names[1])]
    assert rendered[0].name == "fraud__tune00" and rendered[0].build is None
    assert rendered[0].dynamic_batching == DynamicBatching((8, 16), 100)
    assert rendered[0].instance_groups == (InstanceGroup("CPU", 2),)
    deps = tune.dependencies(fraud)
    assert sorted(s.name for s in deps) == ["fraud", "fraud_features", "fraud_threshold"]
    assert [v.precision for v in next(s for s in deps if s.name == "fraud").build.variants] == ["fp32"]
    validate([*deps, *rendered])
    fused = tune.resolve("fraud_scorer", "fused")
    spec = fused.render(Candidate(500, (16,), 1), "fraud_scorer__tune00")
    assert spec.form == "fused" and spec.fused == Fused(DynamicBatching((16,), 500), (InstanceGroup("CPU", 1),))
    validate([*tune.dependencies(fused), spec])
    int8 = tune.dependencies(tune.resolve("fraud_int8"))
    assert [v.precision for v in next(s for s in int8 if s.name == "fraud").build.variants] == ["fp32", "int8"]


def test_the_spec_line_is_python_that_gives_the_candidate() -> None:
    names = {"DynamicBatching": DynamicBatching, "InstanceGroup": InstanceGroup, "Fused": Fused}
    fraud = tune.resolve("fraud")
    line = tune.spec_line(fraud, Candidate(100, (8, 16), 2))
    assert line == (
        "dynamic_batching=DynamicBatching(preferred_batch_sizes=(8, 16), max_queue_delay_us=100),\n"
        'instance_groups=(InstanceGroup(kind="CPU", count=2),),'
    )
    fields = eval(f"dict({line})", names)  # noqa: S307 - our own output, checked to round-trip
    assert fields == {"dynamic_batching": DynamicBatching((8, 16), 100), "instance_groups": (InstanceGroup("CPU", 2),)}
    fused = tune.resolve("fraud_scorer", "fused")
    fields = eval(f"dict({tune.spec_line(fused, Candidate(0, (), 1))})", names)  # noqa: S307
    assert fields == {"form": "fused", "fused": Fused(DynamicBatching((), 0), (InstanceGroup("CPU", 1),))}
    assert tune.batching_line(Candidate(0, (), 1, batching=False)) == "None"


def _record(model: str, form: str, chosen_fast: bool = True) -> dict:
    fraud = tune.resolve("fraud")
    candidates = [Candidate(200, (32, 64, 128, 256), 1, current=True), Candidate(0, (), 1)]
    fast = {"throughput": 6000.0, "p50_ms": 0.4, "p99_ms": 5.0, "average_batch": 6.0, "error": None}
    slow = {"throughput": 5000.0, "p50_ms": 0.7, "p99_ms": 6.0, "average_batch": 8.0, "error": None}
    runs = [{LOW: [slow] * 3, HIGH: [slow] * 3}, {LOW: [fast] * 3, HIGH: [fast] * 3}]
    settings = {"command": "kiln tune fraud", "repeats": 3, "window_ms": 500, "inputs": "test", "wall_s": 1.0}
    record = tune.make_record(fraud, candidates, ["fraud__tune00", "fraud__tune01"], runs, Grid(), Rule(), settings)
    return {**record, "model": model, "form": form}


def test_the_record_holds_the_medians_the_rule_and_a_choice_that_follows_from_them() -> None:
    record = _record("fraud", "model")
    assert record["rule"]["text"] == Rule().describe()
    assert [c["verdict"] for c in record["candidates"]] == [
        "out: p50 at c=1 0.700 ms > 1.10 x best 0.400 ms", "chosen"
    ]
    assert record["candidates"][1]["medians"]["16"]["throughput"] == 6000.0
    assert len(record["candidates"][1]["runs"]["1"]) == 3
    choice = record["choice"]
    assert choice["name"] == "fraud__tune01" and choice["settings"]["max_queue_delay_us"] == 0
    assert choice["against_current"] == {"throughput_c16": 1.2, "p99_c16": 5 / 6, "p50_c1": 0.4 / 0.7}
    assert {"machine", "date", "commit", "command", "grid"} <= set(record)
    json.dumps(record)


def test_writing_records_replaces_the_same_model_and_form_and_keeps_the_others(tmp_path: Path) -> None:
    tune.write_record(_record("fraud", "model"), tmp_path)
    tune.write_record(_record("fraud_scorer", "fused"), tmp_path)
    again = _record("fraud", "model")
    again["date"] = "2030-01-01T00:00:00Z"
    json_path, md_path = tune.write_record(again, tmp_path)
    document = json.loads(json_path.read_text())
    assert [(t["model"], t["form"]) for t in document["tunings"]] == [("fraud", "model"), ("fraud_scorer", "fused")]
    assert document["tunings"][0]["date"] == "2030-01-01T00:00:00Z"
    text = md_path.read_text()
    assert "## fraud (model)" in text and "## fraud_scorer (fused)" in text
    assert "| **fraud__tune01** | delay 0 us, preferred none, 1 inst |" in text
    assert "dynamic_batching=DynamicBatching(max_queue_delay_us=0)," in text


def test_a_foreign_tuning_json_is_refused_by_name(tmp_path: Path) -> None:
    (tmp_path / "tuning.json").write_text('{"something": "else"}')
    with pytest.raises(TuneError, match=r"tuning.json is not a kiln tuning record \(format 1\)"):
        tune.write_record(_record("fraud", "model"), tmp_path)
    (tmp_path / "tuning.json").write_text("{")
    with pytest.raises(TuneError, match="tuning.json is not JSON"):
        tune.write_record(_record("fraud", "model"), tmp_path)


def test_within_noise_compares_the_repeats_throughput_ranges_of_the_choice_and_the_current() -> None:
    record = _record("fraud", "model")
    assert tune.within_noise(record) is False  # 6000/s every repeat against 5000/s
    assert "at c=16 do not overlap." in tune.render_markdown({"tunings": [record]}, "fraud")
    record["candidates"][0]["runs"]["16"][1] = {**record["candidates"][0]["runs"]["16"][1], "throughput": 6100.0}
    assert tune.within_noise(record) is True
    assert "within this run's noise" in tune.render_markdown({"tunings": [record]}, "fraud")
    record["choice"] = {**record["choice"], "name": "fraud__tune00"}
    assert tune.within_noise(record) is None


def test_a_candidate_without_batching_drops_the_ragged_flag_with_the_batcher() -> None:
    encoder = tune.resolve("text_encoder")
    assert any(t.allow_ragged_batch for t in encoder.spec.inputs)
    rendered = encoder.render(Candidate(0, (), 1, batching=False), tune.candidate_name("text_encoder", 0))
    assert rendered.dynamic_batching is None and not any(t.allow_ragged_batch for t in rendered.inputs)
    validate([rendered])
