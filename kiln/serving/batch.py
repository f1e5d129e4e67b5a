"""Request validation and dynamic-batch execution, independent of Triton.

A dynamic batch is a list of requests. Each request is validated on its own; the valid ones are
concatenated along the batch axis (grouped by their non-batch shapes, so variable-length inputs
never mix), run once per group and split back. A request that fails validation gets its own
error and the others still run; an error raised by the model itself is delivered to every request
of the run that raised it (the convention of ray.serve's batching).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from kiln.serving.errors import RequestError

__all__ = ["RequestError", "TensorContract"]  # RequestError: defined in kiln.serving.errors

Tensors = dict[str, np.ndarray]


@dataclass(frozen=True)
class TensorContract:
    """What one input or output must look like.

    Attributes:
        name: Tensor name.
        dtype: numpy dtype.
        dims: Per-item dims, without the batch dim; -1 matches any size.
    """

    name: str
    dtype: np.dtype
    dims: tuple[int, ...]

    def shape_text(self, batched: bool) -> str:
        dims = ((-1,) if batched else ()) + self.dims
        return "[" + ", ".join(str(d) for d in dims) + "]"


def _fits(contract: TensorContract, shape: tuple[int, ...], batched: bool) -> bool:
    """Whether an array of `shape` has the contract's rank and dims (-1 matches any size)."""
    if len(shape) != len(contract.dims) + (1 if batched else 0):
        return False
    item = shape[1:] if batched else shape
    return item == contract.dims or all(
        want in (-1, got) for want, got in zip(contract.dims, item, strict=True)
    )


def validate_request(
    inputs: Mapping[str, np.ndarray | None],
    contracts: Sequence[TensorContract],
    *,
    batched: bool,
    reject_non_finite: bool,
) -> int:
    """Checks one request's inputs against the contracts.

    Runs once per request per step, so the common case is kept to a few attribute reads and
    comparisons (a dtype identity check before numpy's equality, a tuple comparison of dims,
    `dtype.kind` instead of `np.issubdtype`); the messages are built only on failure.

    Returns:
        The request's batch size (1 for a model without a batch dim).

    Raises:
        RequestError: naming the input and what was expected and given.
    """
    batch_size: int | None = None
    first_name = ""
    for contract in contracts:
        array = inputs.get(contract.name)
        if array is None:
            raise RequestError(f"missing input '{contract.name}'")
        dtype = array.dtype
        if dtype is not contract.dtype and dtype != contract.dtype:
            raise RequestError(
                f"input '{contract.name}' has dtype {array.dtype}; expected {contract.dtype}"
            )
        shape = array.shape
        if not _fits(contract, shape, batched):
            raise RequestError(
                f"input '{contract.name}' has shape {list(shape)}; "
                f"expected {contract.shape_text(batched)}"
            )
        size = shape[0] if batched else 1
        if size == 0:
            raise RequestError(f"input '{contract.name}' has an empty batch (batch size 0)")
        if batch_size is None:
            batch_size, first_name = size, contract.name
        elif size != batch_size:
            raise RequestError(
                f"inputs '{first_name}' and '{contract.name}' disagree on the batch size "
                f"({batch_size} and {size})"
            )
        if reject_non_finite and dtype.kind == "f":
            finite = np.isfinite(array)
            if not finite.all():
                bad = array.size - int(np.count_nonzero(finite))
                raise RequestError(
                    f"input '{contract.name}' contains NaN or infinity ({bad} of {array.size} values)"
                )
    return batch_size or 1


def run_batch(
    requests: Sequence[Mapping[str, np.ndarray | None]],
    inputs: Sequence[TensorContract],
    outputs: Sequence[TensorContract],
    run: Callable[[Tensors], Mapping[str, np.ndarray]],
    *,
    batched: bool,
    reject_non_finite: bool,
) -> list[Tensors | Exception]:
    """Runs a dynamic batch of requests: one model run per group of same-shaped requests.

    Args:
        requests: Each request's input arrays by name (None for an absent input).
        inputs: The input contracts every request is checked against.
        outputs: The outputs to return, cast to their contract's dtype.
        run: Runs the model on concatenated inputs and returns its outputs by name.
        batched: Whether the model has a batch dim (Triton max_batch_size > 0).
        reject_non_finite: Fail a request whose float inputs hold NaN or infinity.

    Returns:
        One entry per request, in order: its outputs, or the exception that is its error.
    """
    results: list[Tensors | Exception] = [RequestError("not run")] * len(requests)
    groups = _group_requests(requests, inputs, results, batched=batched, reject_non_finite=reject_non_finite)
    for members in groups:
        _run_group(members, requests, inputs, outputs, run, results, batched=batched)
    return results


def _group_requests(
    requests: Sequence[Mapping[str, np.ndarray | None]],
    inputs: Sequence[TensorContract],
    results: list[Tensors | Exception],
    *,
    batched: bool,
    reject_non_finite: bool,
) -> list[list[tuple[int, int]]]:
    """The valid requests as groups that run together, each member (index, batch size); an
    invalid request's error goes into `results`."""
    groups: dict[tuple, list[tuple[int, int]]] = {}
    for index, request in enumerate(requests):
        try:
            size = validate_request(
                request, inputs, batched=batched, reject_non_finite=reject_non_finite
            )
        except RequestError as error:
            results[index] = error
            continue
        if not batched:
            key: tuple = ("single", index)
        else:
            key = tuple(request[c.name].shape[1:] for c in inputs)  # type: ignore[union-attr]
        groups.setdefault(key, []).append((index, size))
    return list(groups.values())


def _run_group(
    members: Sequence[tuple[int, int]],
    requests: Sequence[Mapping[str, np.ndarray | None]],
    inputs: Sequence[TensorContract],
    outputs: Sequence[TensorContract],
    run: Callable[[Tensors], Mapping[str, np.ndarray]],
    results: list[Tensors | Exception],
    *,
    batched: bool,
) -> None:
    """Runs one group's requests as one model run; puts each member's outputs (its rows), or the
    run's error, into `results`."""
    if batched:
        feed = {
            c.name: np.concatenate([requests[i][c.name] for i, _ in members])  # type: ignore[misc]
            if len(members) > 1
            else requests[members[0][0]][c.name]
            for c in inputs
        }
    else:
        feed = {c.name: requests[members[0][0]][c.name] for c in inputs}
    try:
        produced = run(feed)  # type: ignore[arg-type]
        arrays = {o.name: np.asarray(produced[o.name], dtype=o.dtype) for o in outputs}
        total = sum(size for _, size in members)
        for name, array in arrays.items():
            if batched and (array.ndim == 0 or array.shape[0] != total):
                raise RuntimeError(
                    f"output '{name}' has shape {list(array.shape)}, "
                    f"but the batch holds {total} item(s)"
                )
    except Exception as error:  # the model failed: every request of this run gets the error
        for index, _ in members:
            failure = RuntimeError(f"inference failed on a batch of {len(members)} request(s): {error}")
            failure.__cause__ = error  # the original error stays reachable (logs, tests)
            results[index] = failure
        return
    offset = 0
    for index, size in members:
        if batched:
            results[index] = {name: a[offset : offset + size] for name, a in arrays.items()}
        else:
            results[index] = arrays
        offset += size
