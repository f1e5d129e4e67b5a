"""kiln's load tests: one locust suite per served pipeline, SLO gates, load shapes and a runner.

- `loadtests.slo`: the service levels (p95/p99 latency, failure ratio, minimum throughput) and
  the load each pipeline is held to, declared once.
- `loadtests.inputs`: the realistic request mix (photographs, texts, transaction records), built
  once and shared with the benchmark.
- `loadtests.checks`: what every response must contain, checked on every response.
- `loadtests.shapes`: steady, step-ramp (the knee) and spike load shapes.
- `loadtests.common`: the locust plumbing: HTTP and gRPC users, the recorder and the SLO listener.
- `loadtests/<pipeline>.py`: the locustfiles; `python -m loadtests.run` runs them headless.
"""
