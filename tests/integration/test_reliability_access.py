"""Limits and access (issue 7, item 5): who may load and unload models, where the server listens,
what a spec may name, and the size limits in force.

- The model-repository API (load, unload, index) restricted with a key (`repository_key`, `kiln
  serve --repository-key-env`): over HTTP and gRPC a client without the key, or with a wrong one,
  cannot load or unload a model (HTTP 403 / gRPC UNAVAILABLE, "This API is restricted"); with the
  key it can; inference stays open.
- The embedded server binds to loopback unless told otherwise: its ports cannot be reached on a
  non-loopback address of this machine; bound to 0.0.0.0 they can (the check can fail).
- Spec names and paths: model, tensor, ensemble and file names are one path segment; nothing a
  spec names can point outside the repository, parameters naming files or models included (their
  kind is "name": one path segment, checked by `kiln generate` and again at load).
- Size limits: Triton 2.51 has no request-body limit of its own (its help lists no
  --http-max-input-size; a later release added one): a test notices when an upgrade brings it.
  The limits kiln sets are per item in the preprocessing steps' parameters (exercised for every
  pipeline in test_reliability_inputs.py).
"""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from kiln import paths
from kiln.cli.serve import add_serve_command, server_from_args
from kiln.models.fraud import pipeline as fraud_pipelines
from kiln.registry import by_name
from kiln.server import (
    DEFAULT_HOST,
    FREE_PORT,
    TritonServer,
    find_tritonserver,
    generate_repository_key,
)
from kiln.serving.adapter import LoadContext
from kiln.spec import SpecError, TensorSpec, validate

FREE_PORTS = {"http_port": FREE_PORT, "grpc_port": FREE_PORT, "metrics_port": FREE_PORT}
HEADER = "kiln-repository-key"
RESTRICTED = "This API is restricted, expecting header '{header}'"
GRPC_RESTRICTED = "This protocol is restricted, expecting header 'triton-grpc-protocol-{header}'"
REFUSED = {"http": "403", "grpc": "StatusCode.UNAVAILABLE"}
CONNECT_TIMEOUT_S = 2.0
BACKENDS = tuple(sorted(paths.available_backends()))


# --- the repository API key --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def key() -> str:
    return generate_repository_key()


@pytest.fixture
def protected(make_repository, add_one, key: str, tmp_path: Path) -> Iterator[TritonServer]:
    with TritonServer(
        make_repository(), model_control_mode="explicit", load_models=[add_one.name], repository_key=key,
        log_file=tmp_path / "tritonserver.log", **FREE_PORTS,
    ) as server:
        yield server


def client_for(server: TritonServer, protocol: str):
    if protocol == "http":
        return httpclient.InferenceServerClient(server.http_url)
    return grpcclient.InferenceServerClient(server.grpc_url)


def infer_ok(client, add_one, protocol: str) -> bool:
    module = httpclient if protocol == "http" else grpcclient
    x = np.ones((1, add_one.features), np.float32)
    tensor = module.InferInput(add_one.input, list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    return bool((client.infer(add_one.name, [tensor]).as_numpy(add_one.output) == x + 1).all())


def test_loading_and_unloading_need_the_key(protected: TritonServer, add_one, key: str) -> None:
    for protocol in ("http", "grpc"):
        check_restricted(protected, add_one, key, protocol)
    assert protected.models() == {add_one.name: "READY"}  # kiln's own calls send the key


def check_restricted(protected: TritonServer, add_one, key: str, protocol: str) -> None:
    expected = (RESTRICTED if protocol == "http" else GRPC_RESTRICTED).format(header=HEADER)
    wrong = {HEADER: "x" * len(key)} if protocol == "http" else {f"triton-grpc-protocol-{HEADER}": "x"}
    client = client_for(protected, protocol)
    try:
        for headers in (None, wrong):
            for call in (client.unload_model, client.load_model):
                with pytest.raises(InferenceServerException) as caught:
                    call(add_one.name, headers=headers)
                assert caught.value.status() == REFUSED[protocol] and expected in caught.value.message()
            with pytest.raises(InferenceServerException, match="restricted"):
                client.get_model_repository_index(headers=headers)
        # Refused calls changed nothing; inference needs no key.
        assert client.is_model_ready(add_one.name) and infer_ok(client, add_one, protocol)
        headers = protected.repository_headers(protocol)
        client.unload_model(add_one.name, headers=headers)
        assert not client.is_model_ready(add_one.name)
        client.load_model(add_one.name, headers=headers)
        assert client.is_model_ready(add_one.name) and infer_ok(client, add_one, protocol)
    finally:
        client.close()


def test_repository_headers_name_the_key_per_protocol(key: str) -> None:
    server = TritonServer(paths.model_repository(), repository_key=key, repository_key_header="x-admin")
    assert server.repository_headers("http") == {"x-admin": key}
    assert server.repository_headers("grpc") == {"triton-grpc-protocol-x-admin": key}
    assert TritonServer(paths.model_repository()).repository_headers("grpc") == {}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"repository_key": "short"}, "repository_key must be at least 16 characters"),
        ({"repository_key": "a" * 20 + ",b=c"}, "with others"),
        ({"repository_key": "a" * 20, "repository_key_header": "Bad Header"}, "repository_key_header must be"),
    ],
)
def test_bad_keys_are_refused_before_start(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TritonServer(paths.model_repository(), **kwargs)


def serve_args(*argv: str):
    import argparse

    parser = argparse.ArgumentParser(prog="kiln")
    add_serve_command(parser.add_subparsers())
    return parser.parse_args(["serve", *argv])


def test_kiln_serve_takes_the_key_from_the_environment(monkeypatch, key: str) -> None:
    monkeypatch.setenv("ADMIN_KEY", key)
    server = server_from_args(serve_args("--repository-key-env", "ADMIN_KEY", "--repository-key-header", "x-admin"))
    assert (server.repository_key, server.repository_key_header) == (key, "x-admin")
    assert server_from_args(serve_args()).repository_key is None
    monkeypatch.delenv("ADMIN_KEY")
    with pytest.raises(ValueError, match="--repository-key-env names ADMIN_KEY, which is not set or empty"):
        server_from_args(serve_args("--repository-key-env", "ADMIN_KEY"))


# --- loopback unless told otherwise -----------------------------------------------------------------------


def non_loopback_addresses() -> list[str]:
    """IPv4 addresses of this machine other than 127.0.0.0/8 (from `hostname -I`, else DNS)."""
    found: list[str] = []
    try:
        output = subprocess.run(["hostname", "-I"], capture_output=True, text=True, timeout=5).stdout
        found = output.split()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        found += [info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)]
    except OSError:
        pass
    return sorted({a for a in found if "." in a and not a.startswith("127.")})


def reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S):
            return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def address() -> str:
    addresses = non_loopback_addresses()
    if not addresses:
        pytest.skip("this machine has no non-loopback IPv4 address to try the ports on")
    return addresses[0]


def test_the_default_host_is_loopback() -> None:
    assert DEFAULT_HOST == "127.0.0.1"
    assert TritonServer(paths.model_repository()).host == DEFAULT_HOST
    assert server_from_args(serve_args()).host == DEFAULT_HOST


@pytest.mark.parametrize("host", [DEFAULT_HOST, "0.0.0.0"])
def test_ports_are_reachable_off_loopback_only_when_asked(make_repository, address: str, host: str) -> None:
    with TritonServer(make_repository(), host=host, **FREE_PORTS) as server:
        ports = server.ports
        assert all(reachable("127.0.0.1", port) for port in ports)
        outside = {name: reachable(address, port) for name, port in ports._asdict().items()}
    expected = host != DEFAULT_HOST
    assert outside == dict.fromkeys(outside, expected), f"on {address}: {outside}"


# --- spec names and paths stay inside the repository ------------------------------------------------------

FRAUD = by_name("fraud")
ESCAPES = ["..", ".", "../fraud", "/etc", "a/b", "a\\b", "", " x", "x\x00", "~root", "a" * 129]


def problems_of(*specs) -> tuple[str, ...]:
    with pytest.raises(SpecError) as caught:
        validate(specs, BACKENDS)
    return caught.value.problems


@pytest.mark.parametrize("name", ESCAPES)
def test_a_model_name_is_one_path_segment(name: str) -> None:
    spec = dataclasses.replace(FRAUD, name=name)
    assert any("field 'name' must be one path segment" in p for p in problems_of(spec)), name


@pytest.mark.parametrize("name", ESCAPES)
def test_an_ensemble_name_is_one_path_segment(name: str) -> None:
    ensemble = dataclasses.replace(fraud_pipelines.SPECS[-1], name=name)
    specs = [*[s for s in fraud_pipelines.SPECS if s is not fraud_pipelines.SPECS[-1]], FRAUD, ensemble]
    assert any("field 'name' must be one path segment" in p for p in problems_of(*specs)), name


@pytest.mark.parametrize("name", ["../x", "a/b", "..", "/abs"])
def test_tensor_and_file_names_are_one_path_segment(name: str) -> None:
    tensor = dataclasses.replace(FRAUD, inputs=(TensorSpec(name, "FP32", (16,)),))
    assert any("field 'inputs[0].name' must match" in p for p in problems_of(tensor))
    files = dataclasses.replace(FRAUD, files={name: "text"})
    assert any("field 'files' key must be a file name" in p for p in problems_of(files))


def test_an_ensemble_step_names_a_served_model_only() -> None:
    ensemble = fraud_pipelines.SPECS[-1]
    step = dataclasses.replace(ensemble.steps[0], model="../fraud")
    broken = dataclasses.replace(ensemble, steps=(step, *ensemble.steps[1:]))
    specs = [*fraud_pipelines.SPECS[:-1], FRAUD, broken]
    assert any("must name another served model; '../fraud' is not one" in p for p in problems_of(*specs))


def test_a_backend_reads_files_of_its_own_folder_or_a_named_model_only(tmp_path: Path) -> None:
    """What the served steps check at load (kiln.serving.adapter.LoadContext)."""
    context = LoadContext("m", tmp_path / "m", tmp_path / "m" / "1", {}, {})
    for name in ("../secret", "/etc/passwd", "a/b"):
        with pytest.raises(FileNotFoundError):
            context.model_file(name)
    for model in ("..", "../x", "/etc"):
        with pytest.raises(ValueError, match="is not a model name"):
            context.artifact(model, "tokenizer.json")


@pytest.mark.parametrize(
    ("spec_name", "key"),
    [("fraud", "model_filename"), ("text_tokenizer", "tokenizer_file"), ("fraud_features", "stats_file")],
)
def test_a_parameter_naming_a_file_cannot_leave_the_repository(spec_name: str, key: str) -> None:
    spec = dataclasses.replace(by_name(spec_name), parameters={key: "../../../../etc/passwd"})
    assert any(
        f"parameter '{key}' must be one path segment" in p and "'../../../../etc/passwd'" in p
        for p in problems_of(spec)
    )


# --- size limits ----------------------------------------------------------------------------------------


def tritonserver_help() -> str:
    binary = find_tritonserver()
    env = dict(os.environ)
    libs = binary.resolve().parents[3] / "nvidia_pytriton.libs"
    if libs.is_dir():
        env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(libs), env.get("LD_LIBRARY_PATH")]))
    result = subprocess.run([str(binary), "--help"], capture_output=True, text=True, env=env, timeout=60)
    return result.stdout + result.stderr


def test_this_tritonserver_has_no_request_size_flag() -> None:
    """Triton 2.51 reads any request body whole (docs/operations.md has the measurements). When an
    upgrade brings --http-max-input-size, this fails: set it in kiln.server then."""
    text = tritonserver_help()
    assert "--http-restricted-api" in text and "--grpc-restricted-protocol" in text
    assert "max-input-size" not in text

