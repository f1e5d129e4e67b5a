"""The cluster model (`benchmarks.cluster_sim`), no server: properties that must hold, each of which
a wrong simulation or a wrong controller would fail. Seeded and deterministic.

- one replica with exponential execution times is an M/M/c queue: its mean wait matches Erlang C;
- the offered load rate / (N mu) is the measured instance utilization;
- p99 falls as replicas are added, and `replicas_for` answers the smallest N meeting the SLO;
- the HPA's arithmetic (formula, tolerance, missing metrics, stabilization, rate policy) on
  hand-computed examples;
- under a load step the first new replica serves only after a sync period and the pod start
  delay, never before.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from benchmarks import cluster_sim as cs

MEAN_S = 0.001
"""Exponential executions of 1 ms: one instance completes 1,000 requests/s."""


def erlang_c_wait(rate: float, mean_s: float, servers: int) -> float:
    """The M/M/c mean wait in queue, Wq = C(c, a) / (c mu - lambda), from the textbook formula."""
    a = rate * mean_s
    top = a**servers / math.factorial(servers) * servers / (servers - a)
    p_wait = top / (sum(a**k / math.factorial(k) for k in range(servers)) + top)
    return p_wait / (servers / mean_s - rate)


def exponential(instances: int = 1, overhead_s: float = 0.0) -> cs.ReplicaModel:
    return cs.ReplicaModel(instances=instances, exponential_mean_s=MEAN_S, overhead_s=overhead_s)


# --- the queue -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("instances", "load"), [(1, 0.5), (2, 0.7), (4, 0.8)])
def test_one_replica_with_exponential_times_matches_erlang_c(instances: int, load: float) -> None:
    """100,000 requests: over seeds 0-7 the mean wait was within 8% of Erlang C at these loads
    (the spread grows with the load); one instance too few or too many is off by 50% or more."""
    rate = load * instances / MEAN_S
    sim = cs.Simulation(
        exponential(instances), cs.LoadProfile(rate, 100_000 / rate), 1, seed=0, measure_from=2.0
    )
    sim.run()
    expected = erlang_c_wait(rate, MEAN_S, instances)
    assert np.mean(sim.waits) == pytest.approx(expected, rel=0.1)
    assert np.mean(sim.latencies) == pytest.approx(expected + MEAN_S, rel=0.05)


def test_utilization_is_the_rate_over_n_mu() -> None:
    model = exponential(instances=2)
    assert model.capacity == pytest.approx(2000.0)
    point = cs.steady(model, 3000.0, 3, requests=100_000, seed=3)
    assert point.offered_load == pytest.approx(3000.0 / (3 * 2000.0))
    assert point.utilization == pytest.approx(0.5, abs=0.01)


def test_the_same_seed_gives_the_same_run_and_another_seed_another() -> None:
    runs = [cs.steady(exponential(), 600.0, 2, requests=5000, seed=s) for s in (1, 1, 2)]
    assert runs[0] == runs[1]
    assert runs[0].p99_ms != runs[2].p99_ms


def test_p99_falls_as_replicas_rise() -> None:
    curve = [cs.steady(exponential(), 2500.0, n, requests=40_000, seed=0) for n in range(3, 8)]
    p99s = [point.p99_ms for point in curve]
    assert all(a > b for a, b in zip(p99s, p99s[1:], strict=False)), p99s
    assert not cs.steady(exponential(), 2500.0, 2).stable  # 2 x 1,000/s cannot carry 2,500/s


def test_replicas_answers_the_smallest_n_meeting_the_slo() -> None:
    answer = cs.replicas_for(exponential(), 2500.0, 10.0, requests=40_000, seed=0)
    by_n = {point.replicas: point for point in answer.curve}
    n = answer.replicas
    assert n is not None and n >= 4
    assert by_n[n].meets(10.0)
    assert by_n[n - 1].stable and not by_n[n - 1].meets(10.0)  # stable, but too slow
    assert all(not by_n[m].meets(10.0) for m in by_n if m < n)
    assert max(by_n) == n + 2  # the curve goes two past the answer


def test_overhead_samples_add_to_latency_but_occupy_no_instance() -> None:
    base = exponential()
    slow_outside = cs.ReplicaModel(instances=1, exponential_mean_s=MEAN_S, overhead_samples_s=(0.001, 0.009))
    a = cs.Simulation(base, cs.LoadProfile(500.0, 40.0), 1, seed=4).run()
    b = cs.Simulation(slow_outside, cs.LoadProfile(500.0, 40.0), 1, seed=4).run()
    assert np.mean(b.waits) == pytest.approx(np.mean(a.waits), rel=0.1)  # the queue is the same
    assert np.mean(b.latencies) - np.mean(a.latencies) == pytest.approx(0.005, rel=0.05)


def test_round_robin_per_request_spreads_the_requests_evenly() -> None:
    sim = cs.Simulation(exponential(), cs.LoadProfile(2000.0, 5.0), 3, seed=0).run()
    counts = [pod.completed for pod in sim.pods]
    assert sum(counts) > 9000 and max(counts) - min(counts) <= 1, counts


def test_connections_are_spread_at_the_start_and_stay_pinned() -> None:
    sim = cs.Simulation(exponential(), cs.LoadProfile(100.0, 1.0), 3, lb="connection", connections=6, seed=0)
    assert sorted(sim.connections.count(pod) for pod in sim.pods) == [2, 2, 2]
    sim._make_ready(sim._new_pod())  # a pod added later gets no connection of the open ones
    assert sim.connections.count(sim.pods[-1]) == 0


def test_a_connection_pinned_balancer_is_slower_than_per_request_with_few_connections() -> None:
    per_request = cs.steady(exponential(), 2400.0, 4, requests=40_000, seed=0)
    pinned = cs.steady(exponential(), 2400.0, 4, requests=40_000, seed=0, lb="connection", connections=6)
    assert pinned.p99_ms > 1.5 * per_request.p99_ms


# --- batching ------------------------------------------------------------------------------------


def test_the_batcher_takes_the_largest_preferred_size_queued_else_everything() -> None:
    batching = cs.Batching(max_batch=32, preferred=(8, 16), fixed_s=0.0003, per_request_s=0.0002)
    assert [batching.size(q) for q in (1, 5, 8, 12, 16, 40)] == [1, 5, 8, 8, 16, 16]
    assert batching.factor(1) == 1.0
    assert batching.factor(8) == pytest.approx((0.0003 + 8 * 0.0002) / 0.0005)
    model = cs.ReplicaModel(instances=1, exponential_mean_s=0.0005, batching=batching)
    assert model.capacity == pytest.approx(16 / (0.0003 + 16 * 0.0002))


def test_a_calibration_file_becomes_a_replica_without_extrapolating_batches(tmp_path) -> None:
    calibration = {
        "kind": cs.CALIBRATION_KIND,
        "instances": 1,
        "load_time_s": 1.5,
        "service": {"samples_us": [400.0, 500.0, 600.0], "overhead_us": 250.0, "server_execution_mean_us": 500.0},
        "batching": {
            "max_batch": 256, "preferred": [8, 16], "fixed_us": 300.0, "per_request_us": 200.0,
            "table": [{"batch": 1}, {"batch": 2}, {"batch": 8}],
        },
    }  # fmt: skip
    path = tmp_path / "cluster-calibration-x.json"
    path.write_text(json.dumps(calibration))
    model = cs.replica_model(cs.load_calibration(path))
    assert model.mean_service_s == pytest.approx(0.0005)
    assert model.overhead_s == pytest.approx(0.00025)
    assert model.batching is not None and model.batching.max_batch == 8
    assert cs.replica_model(calibration, batching=False).batching is None
    with pytest.raises(ValueError, match="no open-loop run"):
        cs.replica_model(calibration, service="open")
    # the open-loop run: client latencies 1.0, 2.0, 9.0 ms (samples + overhead) less the hot
    # execution (0.5 ms) are each request's time outside the instance; the instance is unchanged
    calibration["service_open"] = {"samples_us": [200.0, 1200.0, 8200.0], "overhead_us": 800.0}
    opened = cs.replica_model(calibration)
    assert opened.service_s == model.service_s
    assert opened.overhead_samples_s == pytest.approx((0.0005, 0.0015, 0.0085))
    assert opened.capacity == model.capacity
    assert cs.replica_model(calibration, service="closed").overhead_samples_s == ()
    path.write_text('{"kind": "something else"}')
    with pytest.raises(ValueError, match="is not a cluster calibration"):
        cs.load_calibration(path)


# --- the HPA ---------------------------------------------------------------------------------------


def hpa(**overrides) -> cs.Hpa:
    return cs.Hpa(cs.HpaConfig(target_queue_s=0.001, **overrides))


def test_the_hpa_formula_is_ceil_of_current_times_metric_over_target() -> None:
    # avg(2, 2, 2.5 ms) / 1 ms = 2.1667; ceil(3 x 2.1667) = 7; within +100% / +4 of 3.
    assert hpa().desired(15.0, 3, [0.002, 0.002, 0.0025]) == 7
    # |1.05 - 1| <= 0.1: no change.
    assert hpa().desired(15.0, 3, [0.00105, 0.00105, 0.00105]) == 3
    # a pod with no metric counts as 0 when scaling up: avg(2, 2, 0, 0) = 1.0, within tolerance.
    assert hpa().desired(15.0, 4, [0.002, 0.002, None, None]) == 4
    # ... and as the target when scaling down: avg(0.5, 1, 1) = 0.833 -> ceil(3 x 0.833) = 3.
    assert hpa().desired(15.0, 3, [0.0005, None, None]) == 3


def test_the_hpa_scale_up_policy_allows_plus_100_percent_or_4_pods_per_period() -> None:
    controller = hpa(max_replicas=50)
    assert controller.desired(15.0, 2, [0.1, 0.1]) == 6  # wants 200; max(2 x 2, 2 + 4) = 6
    assert controller.desired(30.0, 6, [0.1] * 6) == 12  # a new period: 6 x 2
    assert hpa(max_replicas=5).desired(15.0, 2, [0.1, 0.1]) == 5  # clamped to maxReplicas


def test_the_scale_down_stabilization_window_keeps_the_highest_recommendation_for_300_s() -> None:
    controller = hpa()
    assert controller.desired(0.0, 10, [0.001] * 10) == 10
    for t in range(15, 300, 15):  # 0.2 ms: recommends ceil(10 x 0.2) = 2, but 10 is in the window
        assert controller.desired(float(t), 10, [0.0002] * 10) == 10, t
    assert controller.desired(300.0, 10, [0.0002] * 10) == 2  # the 10 of t = 0 left the window


def test_hpa_settings_are_checked_with_the_field_named() -> None:
    with pytest.raises(ValueError, match="window_s .* must span two scrapes"):
        cs.HpaConfig(target_queue_s=0.001, scrape_s=30.0, window_s=30.0)
    with pytest.raises(ValueError, match="target_queue_s must be > 0"):
        cs.HpaConfig(target_queue_s=0.0)


# --- a load step --------------------------------------------------------------------------------------


SLOW = cs.ReplicaModel(instances=1, exponential_mean_s=0.01)
"""100 requests/s a replica: the step tests simulate minutes in few events."""


def test_a_load_step_scales_up_after_a_sync_and_the_pod_start_delay_not_before() -> None:
    config = cs.HpaConfig(
        target_queue_s=0.01, start_delay_s=20.0, readiness_period_s=5.0, endpoint_delay_s=1.0, max_replicas=10
    )
    profile = cs.LoadProfile(30.0, 200.0, step_at_s=60.0, step_to=150.0)
    sim = cs.Simulation(SLOW, profile, 1, hpa=config, seed=1).run()
    ups = [t for t, d in zip(sim.timeline.t, sim.timeline.desired, strict=True) if d > 1]
    decided = ups[0]
    assert decided > 60.0 and decided % 15.0 == 0  # at a sync after the step
    assert all(d == 1 for t, d in zip(sim.timeline.t, sim.timeline.desired, strict=True) if t <= 60.0)
    new = [p for p in sim.pods if p.index > 0]
    assert new and min(p.created_s for p in new) == decided
    # 20 s start -> the probe at 20 s passes -> endpoints 1 s later
    assert min(p.ready_s for p in new if p.ready_s is not None) == pytest.approx(decided + 21.0)
    assert all(r == 1 for t, r in zip(sim.timeline.t, sim.timeline.ready, strict=True) if t < decided + 21.0)
    assert max(sim.timeline.ready) >= 2


def test_step_reports_the_lag_and_when_p99_is_back_under_the_slo() -> None:
    config = cs.HpaConfig(target_queue_s=0.01, start_delay_s=20.0, max_replicas=10)
    result = cs.step(
        SLOW, 30.0, 150.0, config, start_replicas=1, before_s=60.0, after_s=140.0, p99_ms=100.0, seed=1
    )
    assert result.first_scale_up_s is not None and result.first_new_ready_s == pytest.approx(
        result.first_scale_up_s + 21.0
    )
    assert result.slo_broken  # 1 replica cannot carry 150/s: p99 breaks until the new ones serve
    assert result.recovered_s is not None and result.recovered_s >= result.first_new_ready_s
    assert result.breaches[0][0] >= 60.0
    assert cs.slo_breaches(
        [{"t_s": t, "p99_ms": p} for t, p in [(0, 50), (5, 1), (10, 20), (15, 30), (20, None), (25, 40)]],
        5.0,
        10.0,
    ) == [(10, 20), (25, 30)]
    # recovered: the end of the first breach with 30 s clear after it
    assert cs.recovery([(120, 580)], 600.0) is None
    assert cs.recovery([], 600.0) == 0.0
    assert cs.recovery([(120, 155), (490, 505)], 600.0) == 155
    assert cs.recovery([(120, 125), (130, 135), (140, 200)], 600.0) == 200
    assert cs.recovery([(120, 600)], 600.0) is None


# --- the command line ----------------------------------------------------------------------------


def test_the_command_line_answers_from_a_stored_calibration_and_writes_markdown_and_json(
    tmp_path, capsys
) -> None:
    calibration = {
        "kind": cs.CALIBRATION_KIND,
        "instances": 1,
        "load_time_s": 1.5,
        "service": {
            "samples_us": [800.0, 1000.0, 1200.0],
            "overhead_us": 300.0,
            "server_execution_mean_us": 1000.0,
        },
        "batching": {"max_batch": 1, "preferred": [], "fixed_us": None, "per_request_us": None, "table": []},
        "validation": [{"rate": 400.0, "p50_ms": 2.0, "p99_ms": 8.0, "delayed_share": 0.0}],
    }
    path = tmp_path / "cluster-calibration-20990101T000000Z.json"
    path.write_text(json.dumps(calibration))
    out = tmp_path / "results"
    assert (
        cs.main(
            [
                "--calibration",
                str(path),
                "--out",
                str(out),
                "--requests",
                "4000",
                "replicas",
                "--rate",
                "1500",
                "--p99-ms",
                "20",
            ]
        )
        == 0
    )
    written = json.loads(next(out.glob("cluster-replicas-*.json")).read_text())
    assert written["answer"]["replicas"] == next(
        p["replicas"] for p in written["answer"]["curve"] if p["stable"] and p["p99_ms"] < 20
    )
    assert written["calibration"] == str(path) and written["service_source"] == "closed"
    assert written["machine"]["logical_cpus"] and "replicas --rate 1500" in written["command"]
    assert "replicas** hold 1,500 req/s" in next(out.glob("cluster-replicas-*.md")).read_text()
    assert cs.main(["--calibration", str(path), "--out", str(out), "--requests", "4000", "validate"]) == 0
    check = json.loads(next(out.glob("cluster-validate-*.json")).read_text())["checks"][0]
    assert check["error_p99"] == pytest.approx((check["model"]["p99_ms"] - 8.0) / 8.0)
    capsys.readouterr()
