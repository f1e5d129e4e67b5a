"""Fixtures for the integration tests: real tritonservers on free ports, no mocks.

- `server`: one session-scoped tritonserver serving the generated model repository
  (`kiln.paths.model_repository()`); fails (not skips) when the repository is not built.
- `add_one`: the tiny model's name and tensor contract.
- `make_repository`: writes a tiny model repository into tmp_path: `add_one` (y = x + 1, FP32,
  [batch, 4]) served by the kiln_onnx backend, optionally with `parameters` (e.g. a bad one, to
  make the load fail).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import NamedTuple

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from kiln import paths
from kiln.server import FREE_PORT, TritonServer

ADD_ONE = "add_one"
"""The tiny test model: y = x + 1."""
ADD_ONE_INPUT = "x"
ADD_ONE_OUTPUT = "y"
ADD_ONE_FEATURES = 4
ADD_ONE_MAX_BATCH = 8
ONNX_BACKEND = "kiln_onnx"
ONNX_FILENAME = "model.onnx"
ONNX_OPSET = 13
ONNX_IR_VERSION = 8
"""An IR version every supported ONNX Runtime reads (the newest onnx writes a newer one)."""
VERSION = "1"
ENSEMBLE_PLATFORM = "ensemble"
CONFIG_NAME = "config.pbtxt"
BUILD_HINT = "run `make build-engines` first"


def write_add_one_onnx(path: Path) -> None:
    """Writes the ONNX model y = x + 1 (float32, input [batch, ADD_ONE_FEATURES])."""
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info(ADD_ONE_INPUT, TensorProto.FLOAT, [None, ADD_ONE_FEATURES])
    y = helper.make_tensor_value_info(ADD_ONE_OUTPUT, TensorProto.FLOAT, [None, ADD_ONE_FEATURES])
    one = helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0])
    graph = helper.make_graph(
        [helper.make_node("Add", [ADD_ONE_INPUT, "one"], [ADD_ONE_OUTPUT])],
        "add_one", [x], [y], initializer=[one],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", ONNX_OPSET)])
    model.ir_version = ONNX_IR_VERSION
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, path)


def add_one_config(name: str, parameters: Mapping[str, str]) -> str:
    """config.pbtxt of an add_one model, written through Triton's ModelConfig schema."""
    config = model_config_pb2.ModelConfig(
        name=name, backend=ONNX_BACKEND, max_batch_size=ADD_ONE_MAX_BATCH
    )
    for tensor, field in ((ADD_ONE_INPUT, config.input), (ADD_ONE_OUTPUT, config.output)):
        entry = field.add(name=tensor, data_type=model_config_pb2.TYPE_FP32)
        entry.dims.append(ADD_ONE_FEATURES)
    config.instance_group.add(kind=model_config_pb2.ModelInstanceGroup.KIND_CPU, count=1)
    for key, value in parameters.items():
        config.parameters[key].string_value = value
    return text_format.MessageToString(config)


class AddOne(NamedTuple):
    """The tensor contract of the tiny test model (what `make_repository` writes)."""

    name: str
    input: str
    output: str
    features: int
    max_batch_size: int


@pytest.fixture(scope="session")
def add_one() -> AddOne:
    """The tiny model's name and tensor contract, for tests that send it requests."""
    return AddOne(ADD_ONE, ADD_ONE_INPUT, ADD_ONE_OUTPUT, ADD_ONE_FEATURES, ADD_ONE_MAX_BATCH)


RepositoryFactory = Callable[..., Path]


@pytest.fixture
def make_repository(tmp_path: Path) -> RepositoryFactory:
    """Factory: `make_repository({"add_one": {}, "broken": {"intra_op_threads": "abc"}})`.

    Each key becomes an add_one model of that name; the value is its `parameters`. Returns the
    repository folder (a new one per call).
    """
    counter = iter(range(1_000_000))

    def make(models: Mapping[str, Mapping[str, str]] | None = None) -> Path:
        root = tmp_path / f"repository-{next(counter)}"
        for name, parameters in (models if models is not None else {ADD_ONE: {}}).items():
            write_add_one_onnx(root / name / VERSION / ONNX_FILENAME)
            (root / name / CONFIG_NAME).write_text(add_one_config(name, parameters))
        return root

    return make


def unbuilt_models(repository: Path) -> list[str]:
    """Why `repository` cannot be served: models whose artifacts are missing (empty when fine).

    Every folder holding a config.pbtxt needs a version folder `1/`; a model other than an
    ensemble also needs a file in it (its ONNX model, plan, ...).
    """
    if not repository.is_dir():
        return [f"{repository} does not exist"]
    configs = sorted(repository.glob(f"*/{CONFIG_NAME}"))
    if not configs:
        return [f"{repository} holds no model (no */{CONFIG_NAME})"]
    problems = []
    for config_path in configs:
        model_dir = config_path.parent
        config = text_format.Parse(config_path.read_text(), model_config_pb2.ModelConfig())
        version_dir = model_dir / VERSION
        if not version_dir.is_dir():
            problems.append(f"{model_dir.name}: no version folder {VERSION}/")
        elif config.platform != ENSEMBLE_PLATFORM and not any(
            p.is_file() for p in version_dir.rglob("*")
        ):
            problems.append(f"{model_dir.name}: {VERSION}/ holds no artifact")
    return problems


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    """One tritonserver on free ports serving the generated repository, for the whole session.

    Its log is saved in the session's temp folder (`.log_path`, `.log_text()`). Set
    KILN_TEST_MODELS to a comma-separated list of models (ensembles bring their steps) to serve
    only those, in explicit model-control mode: quicker while working on a few pipelines.
    """
    repository = paths.model_repository()
    only = [m.strip() for m in os.environ.get("KILN_TEST_MODELS", "").split(",") if m.strip()]
    problems = unbuilt_models(repository)
    if problems:
        pytest.fail(
            f"the model repository {repository} is not built ({'; '.join(problems)}); "
            f"{BUILD_HINT}",
            pytrace=False,
        )
    log_file = tmp_path_factory.mktemp("tritonserver") / "tritonserver.log"
    with TritonServer(
        repository,
        http_port=FREE_PORT,
        grpc_port=FREE_PORT,
        metrics_port=FREE_PORT,
        log_file=log_file,
        model_control_mode="explicit" if only else "none",
        load_models=only,
    ) as running:
        yield running
