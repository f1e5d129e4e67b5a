"""One error story for the backends: every step's errors under two bases, causes kept, and no two
of kiln's error classes with one name."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import numpy as np

import kiln
import kiln.build
import kiln.clients
from kiln.serving import classify, image, pool, tabular, text
from kiln.serving.batch import TensorContract, run_batch
from kiln.serving.errors import ModelLoadError, RequestError
from kiln.serving.onnx import ModelLoadError as OnnxModelLoadError


def test_each_step_s_load_errors_are_model_load_errors() -> None:
    assert OnnxModelLoadError is ModelLoadError
    for error in (classify.ClassifyLoadError, image.ImageLoadError, pool.PoolLoadError, text.TextLoadError):
        assert issubclass(error, ModelLoadError), error


def test_each_step_s_request_errors_are_request_errors() -> None:
    for error in (image.ImageError, text.TextInputError, tabular.RecordError, pool.PoolInputError):
        assert issubclass(error, RequestError) and issubclass(error, ValueError), error


def _error_classes(package: object) -> dict[str, list[str]]:
    names: dict[str, list[str]] = {}
    for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):  # type: ignore[attr-defined]
        if info.name.endswith(".__main__"):
            continue  # `python -m` entry points run their command when imported
        module = importlib.import_module(info.name)
        for name, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, BaseException) and cls.__module__ == module.__name__:
                names.setdefault(name, []).append(f"{module.__name__}.{name}")
    return names


def test_no_two_error_classes_share_a_name() -> None:
    found: dict[str, list[str]] = {}
    for package in (kiln, kiln.build, kiln.clients):
        for name, where in _error_classes(package).items():
            found.setdefault(name, []).extend(where)
    twins = {name: sorted(set(where)) for name, where in found.items() if len(set(where)) > 1}
    assert not twins, twins


def test_a_model_failing_on_a_batch_keeps_its_cause_for_every_request() -> None:
    contract = TensorContract("x", np.dtype(np.float32), (2,))
    cause = ZeroDivisionError("division by zero in the model")

    def broken(feed: dict) -> dict:
        raise cause

    requests = [{"x": np.zeros((1, 2), np.float32)}, {"x": np.ones((2, 2), np.float32)}]
    output = TensorContract("y", np.dtype(np.float32), (2,))
    results = run_batch(requests, [contract], [output], broken, batched=True, reject_non_finite=True)
    assert all(isinstance(r, RuntimeError) and r.__cause__ is cause for r in results)
    assert str(results[0]) == "inference failed on a batch of 2 request(s): division by zero in the model"
