"""`kiln tune` on a real tritonserver with perf_analyzer: a tiny sweep (two candidates, short
windows, two repeats) of the fraud model and of fraud_scorer's fused form. The record must hold
every candidate's repeats and medians, and its choice must follow the stated rule from the
numbers it recorded (recomputed here by hand, not through `kiln.tune.choose`). No timing
thresholds: what is fast on this machine is the sweep's output, not the test's."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

import pytest

from kiln import paths, tune
from kiln.cli import main

GRID = "delays=0,1000;preferred=none;instances=1"
REPEATS = 2
WINDOW_MS = 200
LOW, HIGH = 1, 8


def expected_choice(record: dict[str, Any]) -> str | None:
    """The rule of the module docstring of kiln.tune, applied by hand to the recorded medians."""
    rule = record["rule"]
    rows = [(c, c["medians"][str(LOW)], c["medians"][str(HIGH)]) for c in record["candidates"]]
    # measured in at least half of the repeats at both concurrencies
    rows = [r for r in rows if all(m["repeats"] >= max(1, len(m["errors"])) for m in r[1:])]
    if not rows:
        return None
    best_p50 = min(low["p50_ms"] for _, low, _ in rows)
    best_p99 = min(high["p99_ms"] for _, _, high in rows)
    ok = [
        (c, high) for c, low, high in rows
        if low["p50_ms"] <= best_p50 * (1 + rule["p50_slack"]) and high["p99_ms"] <= best_p99 * rule["p99_factor"]
    ]
    if not ok:
        return None
    best = max(high["throughput"] for _, high in ok)
    tied = [c for c, high in ok if high["throughput"] >= best * (1 - rule["tie"])]
    cheapest = min(tied, key=lambda c: (c["instances"], c["max_queue_delay_us"], len(c["preferred_batch_sizes"])))
    return cheapest["name"]


@pytest.mark.parametrize(("model", "form"), [("fraud", None), ("fraud_scorer", "fused")])
def test_a_tiny_sweep_records_every_candidate_and_chooses_by_the_rule(
    model: str, form: str | None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    built = paths.model_repository() / "fraud" / "1" / "model.onnx"
    if not built.is_file():
        pytest.fail(f"the fraud model is not built ({built} is missing); run `make build-engines` first")
    out = tmp_path / "record.json"
    argv = ["tune", model, "--grid", GRID, "--no-current", "--repeats", str(REPEATS),
            "--window-ms", str(WINDOW_MS), "--concurrency", f"{LOW},{HIGH}", "--json", str(out)]
    code = main([*argv, *(["--form", form] if form else [])])
    printed = capsys.readouterr().out
    record = json.loads(out.read_text())

    assert record["model"] == model and record["form"] == (form or "model")
    assert record["grid"] == {"delays_us": [0, 1000], "preferred_batch_sizes": [[]], "instances": [1]}
    assert record["command"].startswith(f"kiln tune {model} ") and f"--grid '{GRID}'" in record["command"]
    assert record["repeats"] == REPEATS and record["window_ms"] == WINDOW_MS
    source = "load-test mix of fraud_scorer" if form else "tensors fraud_scorer's load-test mix feeds its step fraud"
    assert source in record["inputs"]
    assert [c["name"] for c in record["candidates"]] == [f"{model}__tune00", f"{model}__tune01"]
    assert [c["max_queue_delay_us"] for c in record["candidates"]] == [0, 1000]
    for candidate in record["candidates"]:
        for level in (LOW, HIGH):
            runs = candidate["runs"][str(level)]
            assert [r["repeat"] for r in runs] == [1, 2]
            # a loaded machine may leave a perf_analyzer run unstable: it is kept with its reason
            measured = [r for r in runs if r["error"] is None]
            medians = candidate["medians"][str(level)]
            assert medians["repeats"] == len(measured)
            assert medians["errors"] == [r["error"] for r in runs if r["error"] is not None]
            if measured:
                assert medians["throughput"] == statistics.median(r["throughput"] for r in measured) > 0
                assert medians["p99_ms"] == statistics.median(r["p99_ms"] for r in measured)
                assert medians["average_batch"] >= 1

    expected = expected_choice(record)
    chosen = record["choice"]["name"] if record["choice"] else None
    assert chosen == expected
    assert code == (0 if expected else 1)
    if expected:
        winner = next(c for c in record["candidates"] if c["name"] == expected)
        assert winner["verdict"].startswith("chosen")
        target = tune.resolve(model, form)
        settings = tune.Candidate(winner["max_queue_delay_us"], tuple(winner["preferred_batch_sizes"]), 1)
        assert record["choice"]["spec_line"] == tune.spec_line(target, settings)
        assert record["choice"]["spec_line"].splitlines()[0] in printed
    json_path, md_path = tune.write_record(record, tmp_path)
    assert json.loads(json_path.read_text())["tunings"] == [record]
    assert f"## {model} ({record['form']})" in md_path.read_text()
