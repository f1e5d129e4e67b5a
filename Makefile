# kiln: the commands the README names. Each target installs what it needs (scripts/setup.sh).
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
KILN := $(VENV)/bin/kiln
PYTEST_ARGS ?=
LOADTEST_ARGS ?=
BENCH_ARGS ?=
MODEL ?=
TUNE_ARGS ?=

.PHONY: setup generate check-generated build-engines serve test test-unit test-integration test-numeric-variation loadtest bench tune soak lint clean image lint-deploy capacity

setup:  ## create .venv and install kiln with every extra, Debian packages included
	@scripts/setup.sh

generate: setup  ## write model_repository/*/config.pbtxt from the spec
	$(KILN) generate

check-generated: setup  ## fail when a committed config.pbtxt differs from the spec
	$(KILN) generate --check

build-engines: setup  ## train/export/check every model and publish it into model_repository/
	$(KILN) build

serve: build-engines  ## the main job: build, then serve on the embedded Triton and show a prediction
	$(KILN) serve --demo

test: build-engines  ## the whole suite (unit, then integration on a real tritonserver), then the unit tests again with other float kernels
	$(PY) -m pytest $(PYTEST_ARGS)
	$(PY) scripts/numeric_variation.py

test-numeric-variation: setup  ## the unit tests with PyTorch's instruction set capped and ONNX Runtime's threads/fusions changed (as on another CPU)
	$(PY) scripts/numeric_variation.py $(PYTEST_ARGS)

test-unit: setup
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

test-integration: build-engines
	$(PY) -m pytest tests/integration $(PYTEST_ARGS)

loadtest: build-engines  ## load-test suites (steady, step, spike) against a server it starts; SLO gates set the exit status
	$(PY) -m loadtests.run $(LOADTEST_ARGS)

bench: build-engines  ## kiln vs the in-process pipeline and FastAPI + PyTorch, side by side; results/bench-<UTC>-<commit>/
	$(PY) -m benchmarks.run $(BENCH_ARGS)

ifneq ($(filter tune,$(MAKECMDGOALS)),)
ifeq ($(MODEL),)
$(error usage: make tune MODEL=<served model> [TUNE_ARGS='--form fused --write'])
endif
endif
tune: build-engines  ## sweep MODEL's dynamic batching with perf_analyzer, choose by a stated rule: make tune MODEL=fraud TUNE_ARGS=--write
	$(PY) -m kiln.cli tune $(MODEL) $(TUNE_ARGS)

soak: build-engines  ## the 10-minute soak at 70% of measured capacity (CI runs a 25 s form in make test)
	KILN_SOAK_SECONDS=600 $(PY) -m pytest -s -m soak tests/integration/test_reliability_soak.py

lint: setup
	$(VENV)/bin/ruff check kiln build backends clients models tests loadtests benchmarks scripts deploy
	$(PY) scripts/unasync.py --check

clean:  ## remove build outputs (not the virtual environment)
	rm -rf artifacts .setuptools-build
	find model_repository -mindepth 3 -type f -not -name .gitkeep -delete 2>/dev/null || true

capacity: build-engines  ## calibrate the cluster model here (~2 min, under the bench lock), validate it, the replicas-for-load table and a load step; results/cluster-* (docs/capacity.md)
	flock /tmp/kiln-bench.lock $(PY) -m benchmarks.cluster_calibrate
	$(PY) -m benchmarks.cluster_sim validate
	$(PY) -m benchmarks.cluster_sim curve
	$(PY) -m benchmarks.cluster_sim step --from 2000 --to 8000

IMAGE ?= kiln-triton:0.1.0
image:  ## build deploy/Dockerfile's serving image IMAGE (needs a Docker engine with BuildKit; builds the models first)
	@if ! docker info >/dev/null 2>&1; then \
		echo "make image: no Docker engine answers here (docker info failed), so no image was built; run it where Docker runs (docs/deploy.md)" >&2; \
		exit 1; \
	fi
	$(MAKE) build-engines
	DOCKER_BUILDKIT=1 docker build -f deploy/Dockerfile -t $(IMAGE) .

lint-deploy: setup  ## hadolint deploy/Dockerfile; render, lint and validate the Helm chart and the KServe objects offline
	$(VENV)/bin/hadolint -t style deploy/Dockerfile
	$(PY) -m pytest tests/unit/test_deploy_manifests.py
