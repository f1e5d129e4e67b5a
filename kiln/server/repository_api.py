"""kiln's HTTP client of a tritonserver: health, metadata, metrics, and the model-repository API.

The repository API (load, unload, index) can be restricted to clients sending a key
(`repository_key`, Triton's --http-restricted-api/--grpc-restricted-protocol);
`RepositoryApi` sends that key on its own calls, and `repository_headers` gives the headers
any other client sends.
"""

from __future__ import annotations

import json
import re
import secrets
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from kiln.server.errors import RepositoryApiError, TritonServerError
from kiln.server.logs import clean_model_error

HTTP_PROBE_TIMEOUT_S = 2.0
"""Timeout of one readiness/metadata request to Triton's HTTP endpoint."""
REPOSITORY_CALL_TIMEOUT_S = 300.0
"""Timeout of a repository load/unload call: Triton answers once the model is loaded."""

HEALTH_READY_PATH = "/v2/health/ready"
HEALTH_LIVE_PATH = "/v2/health/live"
SERVER_METADATA_PATH = "/v2"
REPOSITORY_INDEX_PATH = "/v2/repository/index"
REPOSITORY_MODEL_PATH = "/v2/repository/models/{model}/{action}"
MODEL_CONFIG_PATH = "/v2/models/{model}/config"
METRICS_PATH = "/metrics"
HTTP_OK = 200
UNLOADED_STATE = "UNLOADED"

REPOSITORY_API = "model-repository"
"""Triton's name of the load/unload/index API in --http-restricted-api/--grpc-restricted-protocol."""
DEFAULT_REPOSITORY_KEY_HEADER = "kiln-repository-key"
"""The header a client sends the repository key in (HTTP); see `repository_headers`."""
GRPC_RESTRICTED_HEADER_PREFIX = "triton-grpc-protocol-"
"""Triton 2.51 expects a restricted gRPC protocol's header under this prefix (gRPC metadata)."""
MIN_REPOSITORY_KEY_CHARS = 16
_REPOSITORY_KEY = re.compile(rf"^[A-Za-z0-9_.~+/-]{{{MIN_REPOSITORY_KEY_CHARS},}}$")
"""A key Triton's `<apis>:<header>=<value>` flag carries unchanged (no ',', ':', '=' or spaces)."""
_HEADER_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,63}$")
"""A header name valid in HTTP and as gRPC metadata (lowercase)."""
_MODEL_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
"""A repository model name (one path segment, as kiln.spec requires)."""
_METRIC_SAMPLE = re.compile(r"^(?P<name>[A-Za-z_:][\w:]*)(?:\{(?P<labels>[^}]*)\})? (?P<value>\S+)$", re.M)
"""One sample line of the Prometheus text format: name{labels} value."""
_METRIC_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def generate_repository_key() -> str:
    """A random key for `repository_key` (43 URL-safe characters, 256 bits)."""
    return secrets.token_urlsafe(32)


def check_repository_key(key: str | None, header: str) -> None:
    """Raises ValueError unless `key` (None: no key) and `header` can go on Triton's command line."""
    if key is not None and not _REPOSITORY_KEY.match(key):
        raise ValueError(
            f"repository_key must be at least {MIN_REPOSITORY_KEY_CHARS} characters of "
            "A-Z a-z 0-9 _ . ~ + / - (kiln.server.generate_repository_key() makes one); got "
            f"{len(key)} characters"
            + ("" if len(key) < MIN_REPOSITORY_KEY_CHARS else " with others")
        )
    if not _HEADER_NAME.match(header):
        raise ValueError(
            "repository_key_header must be lowercase letters, digits and '-' (at most 64), "
            f"got {header!r}"
        )


def restricted_api_args(key: str | None, header: str) -> list[str]:
    """tritonserver's flags restricting the repository API to `key` in `header` ([] for no key)."""
    if key is None:
        return []
    restriction = f"{REPOSITORY_API}:{header}={key}"
    return [f"--http-restricted-api={restriction}", f"--grpc-restricted-protocol={restriction}"]


def repository_headers(key: str | None, header: str, protocol: str = "http") -> dict[str, str]:
    """The headers a client sends to use the model-repository API ({} when it is open).

    Args:
        key: The repository key; None when the API is open.
        header: The header carrying it.
        protocol: "http" (the header as named) or "grpc" (Triton 2.51 reads a restricted
            gRPC protocol's key from the metadata key `triton-grpc-protocol-<header>`).
    """
    if protocol not in ("http", "grpc"):
        raise ValueError(f"protocol must be 'http' or 'grpc', got {protocol!r}")
    if key is None:
        return {}
    prefix = GRPC_RESTRICTED_HEADER_PREFIX if protocol == "grpc" else ""
    return {prefix + header: key}


def model_path(model: str, action: str) -> str:
    """The repository-API path of `action` ("load", "unload") on `model`."""
    return REPOSITORY_MODEL_PATH.format(model=_quoted(model), action=action)


def _quoted(model: str) -> str:
    if not isinstance(model, str) or not _MODEL_NAME.match(model):
        raise ValueError(f"{model!r} is not a model name (one path segment, {_MODEL_NAME.pattern})")
    return urllib.parse.quote(model, safe="")


class Target(Protocol):
    """What `RepositoryApi` needs of a server; read at each call (the ports are picked at start)."""

    @property
    def http_url(self) -> str: ...

    @property
    def metrics_url(self) -> str: ...

    @property
    def log_path(self) -> Path | None: ...

    def repository_headers(self, protocol: str = "http") -> dict[str, str]: ...


class RepositoryApi:
    """Calls a tritonserver's HTTP endpoint (and its metrics page) on behalf of `target`.

    Errors name the server and the call; repository-API errors carry Triton's own message.
    """

    def __init__(self, target: Target) -> None:
        self._target = target

    # --- health, metadata, metrics ---

    def status(self, path: str) -> int | None:
        """The HTTP status of GET `path`; None when the server did not answer."""
        try:
            with urllib.request.urlopen(self._url(path), timeout=HTTP_PROBE_TIMEOUT_S) as response:
                return response.status
        except urllib.error.HTTPError as error:
            return error.code
        except (urllib.error.URLError, OSError):
            return None

    def json(self, method: str, path: str, body: bytes | None = None) -> Any:
        """The JSON answer of `method path` (no repository key sent).

        Raises:
            TritonServerError: the server did not answer, or not with JSON.
        """
        request = urllib.request.Request(self._url(path), data=body, method=method)
        try:
            with urllib.request.urlopen(request, timeout=HTTP_PROBE_TIMEOUT_S) as response:
                return json.loads(response.read().decode("utf-8"))
        except (urllib.error.URLError, OSError, ValueError) as error:
            raise TritonServerError(
                f"tritonserver at {self._target.http_url} did not answer {method} {path}: {error}",
                log_path=self._target.log_path,
            ) from error

    def metric(self, name: str, **labels: str) -> float:
        """The sum of the samples of metric `name` whose labels include `labels` (0.0: none).

        Raises:
            TritonServerError: the metrics page did not answer.
        """
        url = self._target.metrics_url
        try:
            with urllib.request.urlopen(url, timeout=HTTP_PROBE_TIMEOUT_S) as response:
                text = response.read().decode("utf-8")
        except (urllib.error.URLError, OSError) as error:
            raise TritonServerError(f"tritonserver's metrics at {url} did not answer: {error}",
                                    log_path=self._target.log_path) from error
        total = 0.0
        for match in _METRIC_SAMPLE.finditer(text):
            if match.group("name") != name:
                continue
            found = dict(_METRIC_LABEL.findall(match.group("labels") or ""))
            if all(found.get(key) == value for key, value in labels.items()):
                total += float(match.group("value"))
        return total

    # --- the model-repository API ---

    def failed(self) -> dict[str, str]:
        """Model name -> Triton's reason, for every model the index lists as UNAVAILABLE with a
        reason (a model that failed to load)."""
        index = self.call("POST", REPOSITORY_INDEX_PATH, b"{}", HTTP_PROBE_TIMEOUT_S)
        return {
            entry["name"]: clean_model_error(entry.get("reason") or "no reason given")
            for entry in index
            if entry.get("state") == "UNAVAILABLE" and entry.get("reason")
        }

    def models(self) -> dict[str, str]:
        """Model name -> state from the repository index ("UNLOADED" when it has none)."""
        index = self.call("POST", REPOSITORY_INDEX_PATH, b"{}", HTTP_PROBE_TIMEOUT_S)
        return {entry["name"]: entry.get("state") or UNLOADED_STATE for entry in index}

    def load(
        self, model: str, config: Mapping[str, Any] | None, timeout: float
    ) -> None:
        """POST .../load, with `config` (a model config as JSON) as an override when given."""
        body = {"parameters": {"config": json.dumps(config)}} if config is not None else {}
        self.call("POST", model_path(model, "load"), json.dumps(body).encode(), timeout)

    def unload(self, model: str, unload_dependents: bool, timeout: float) -> None:
        """POST .../unload."""
        body = {"parameters": {"unload_dependents": unload_dependents}}
        self.call("POST", model_path(model, "unload"), json.dumps(body).encode(), timeout)

    def config(self, model: str) -> Any:
        """`model`'s current config as JSON (GET /v2/models/<model>/config)."""
        return self.call(
            "GET", MODEL_CONFIG_PATH.format(model=_quoted(model)), None, HTTP_PROBE_TIMEOUT_S
        )

    def call(self, method: str, path: str, body: bytes | None, timeout: float) -> Any:
        """A repository-API (or config) call with the key's header; Triton's error as the message.

        Raises:
            RepositoryApiError: Triton refused (with its status and message), did not answer,
                or answered with no JSON.
        """
        http_url, log_path = self._target.http_url, self._target.log_path
        request = urllib.request.Request(
            self._url(path), data=body, method=method,
            headers=self._target.repository_headers("http"),
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                text = response.read().decode("utf-8")
        except urllib.error.HTTPError as error:
            try:
                detail = json.loads(error.read().decode("utf-8")).get("error") or error.reason
            except (ValueError, AttributeError, OSError):
                detail = error.reason
            raise RepositoryApiError(
                f"tritonserver at {http_url} refused {method} {path} (HTTP {error.code}): {detail}",
                error.code,
                log_path=log_path,
            ) from None
        except (urllib.error.URLError, OSError) as error:
            raise RepositoryApiError(
                f"tritonserver at {http_url} did not answer {method} {path}: {error}",
                None,
                log_path=log_path,
            ) from error
        try:
            return json.loads(text) if text.strip() else None
        except ValueError as error:
            raise RepositoryApiError(
                f"tritonserver at {http_url} answered {method} {path} with no JSON: {error}",
                None,
                log_path=log_path,
            ) from error

    def _url(self, path: str) -> str:
        return f"http://{self._target.http_url}{path}"
