"""Offline validation of the Kubernetes deployment files under ``deploy/``.

No cluster, no network, no kubectl: every document of every ``deploy/*.yaml`` is checked against a JSON Schema.

* Built-in kinds (Deployment, StatefulSet, Service, Secret, PersistentVolumeClaim, ...) use the strict
  Kubernetes OpenAPI schemas (``additionalProperties: false``) shipped by the ``kubernetes-validate`` package,
  pinned to Kubernetes ``K8S_VERSION``. A kind without a schema FAILS: the package's own CLI only prints a
  WARN and exits 0 for kinds it does not know (RayCluster, RayJob, typos in ``kind``).
* ``ray.io/v1`` RayCluster and RayJob use ``deploy/schemas/{raycluster,rayjob}.json``, a transcription of
  KubeRay's v1 Go API types (see ``deploy/schemas/README.md``). Their pod templates ``$ref`` the same strict
  Kubernetes ``PodTemplateSpec`` schema, so a typo inside a container spec is caught too.

The remaining tests check what a schema cannot: the entrypoint, the GPU group, the MLflow Service behind
``MLFLOW_TRACKING_URI``, and that the RayJob's embedded cluster is the RayCluster manifest's spec.
"""

from __future__ import annotations

import copy
import fnmatch
import functools
import json
import re
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
SCHEMAS = DEPLOY / "schemas"

#: Kubernetes version whose schemas the built-in kinds are validated against.
K8S_VERSION = "1.30.0"
#: The pip requirement (pyproject.toml's ``test`` extra) that provides those schemas.
KV_REQUIREMENT = "kubernetes-validate==1.37.0"

#: (apiVersion, kind) -> vendored schema file.
RAY_SCHEMAS = {("ray.io/v1", "RayCluster"): "raycluster.json", ("ray.io/v1", "RayJob"): "rayjob.json"}

#: Sweep files the RayJob entrypoint may name even before they are committed.
PLANNED_SWEEPS = {"sweeps/kappa.yaml"}

try:  # jsonschema and referencing are dependencies of kubernetes-validate.
    import importlib.resources

    import jsonschema
    import kubernetes_validate
    from kubernetes_validate.version import __version__ as KV_VERSION
    from referencing import Registry, Resource

    _KV_MISSING: ImportError | None = None
except ImportError as exc:  # pragma: no cover - exercised only on a broken install
    _KV_MISSING = exc


def _require_kubernetes_validate() -> None:
    if _KV_MISSING is not None:
        pytest.fail(
            f"tests/platform/test_kubernetes_manifests.py needs the kubernetes-validate package for the Kubernetes OpenAPI schemas "
            f"({_KV_MISSING}). Install the test extra (pip install -e \".[test]\") or: pip install "
            f"'{KV_REQUIREMENT}'",
            pytrace=False,
        )


class SchemaMissing(Exception):
    """A document whose kind/apiVersion has no schema: never treated as valid."""


# ----------------------------------------------------------------------------------------------------------
# schema store and validator
# ----------------------------------------------------------------------------------------------------------


@functools.cache
def _store():
    """(directory of the strict k8s schemas, registry with k8s definitions + Ray schemas, Ray schemas)."""
    _require_kubernetes_validate()
    root = importlib.resources.files("kubernetes_validate").joinpath("kubernetes-json-schema").joinpath(
        f"v{K8S_VERSION}-local-strict")
    if not root.joinpath("_definitions.json").is_file():
        pytest.fail(f"kubernetes-validate {KV_VERSION} does not ship Kubernetes {K8S_VERSION} schemas; "
                    f"install '{KV_REQUIREMENT}'", pytrace=False)
    definitions = json.loads(root.joinpath("_definitions.json").read_text())
    registry = Registry().with_resource(definitions["$id"], Resource.from_contents(definitions))
    ray = {}
    for key, name in RAY_SCHEMAS.items():
        schema = json.loads((SCHEMAS / name).read_text())
        jsonschema.Draft202012Validator.check_schema(schema)
        registry = registry.with_resource(schema["$id"], Resource.from_contents(schema))
        ray[key] = schema
    return root, registry, ray


def schema_for(doc: dict) -> dict:
    root, _, ray = _store()
    api_version, kind = doc.get("apiVersion"), doc.get("kind")
    if not isinstance(api_version, str) or not isinstance(kind, str):
        raise SchemaMissing(f"document without apiVersion/kind: {str(doc)[:80]}")
    if (api_version, kind) in ray:
        return ray[(api_version, kind)]
    if "ray.io" in api_version:
        raise SchemaMissing(f"no vendored schema for {kind} {api_version} (deploy/schemas has {sorted(ray)})")
    # kubernetes-validate's file naming: apps/v1 -> apps-v1, networking.k8s.io/v1 -> networking-v1, v1 -> v1.
    group_version = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)
    path = root.joinpath(f"{kind.lower()}-{group_version}.json")
    if not path.is_file():
        raise SchemaMissing(f"no Kubernetes {K8S_VERSION} schema for kind {kind} with apiVersion {api_version}")
    return json.loads(path.read_text())


def _where(error) -> str:
    out = ""
    for part in error.absolute_path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "<document>"


def validate_document(doc: dict) -> list[str]:
    """Every schema violation of one manifest document as ``Kind/name: path: message``; [] when valid."""
    _, registry, _ = _store()
    validator = jsonschema.Draft202012Validator(schema_for(doc), registry=registry)
    name = (doc.get("metadata") or {}).get("name", "?")
    errors = sorted(validator.iter_errors(doc), key=lambda e: [str(p) for p in e.absolute_path])
    return [f"{doc.get('kind')}/{name}: {_where(e)}: {e.message}" for e in errors]


# ----------------------------------------------------------------------------------------------------------
# manifests
# ----------------------------------------------------------------------------------------------------------

MANIFESTS = sorted(DEPLOY.glob("*.yaml"))


def load(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def only(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


@pytest.fixture(scope="module")
def cluster() -> dict:
    return only(load(DEPLOY / "raycluster.yaml"), "RayCluster")


@pytest.fixture(scope="module")
def job() -> dict:
    return only(load(DEPLOY / "rayjob.yaml"), "RayJob")


@pytest.fixture(scope="module")
def mlflow_docs() -> list[dict]:
    return load(DEPLOY / "mlflow.yaml")


def all_ray_objects() -> list[dict]:
    return [d for p in MANIFESTS for d in load(p) if d["apiVersion"].startswith("ray.io/")]


def cluster_specs() -> list[tuple[str, dict]]:
    """(label, RayClusterSpec) for every RayCluster and every RayJob with an embedded cluster."""
    out = []
    for d in all_ray_objects():
        spec = d["spec"] if d["kind"] == "RayCluster" else d["spec"].get("rayClusterSpec")
        if spec is not None:
            out.append((f"{d['kind']}/{d['metadata']['name']}", spec))
    return out


def groups(spec: dict) -> dict[str, dict]:
    return {g["groupName"]: g for g in spec.get("workerGroupSpecs", [])}


def ray_containers(spec: dict) -> list[dict]:
    """The Ray container (containers[0], as KubeRay uses it) of the head and of every worker group."""
    templates = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec.get("workerGroupSpecs", [])]
    return [t["spec"]["containers"][0] for t in templates]


def env_of(container: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def pyproject_pin(package: str) -> str:
    text = (REPO / "pyproject.toml").read_text()
    match = re.search(rf'"{re.escape(package)}(?:\[[^\]]*\])?==([^"]+)"', text)
    assert match, f"pyproject.toml pins no {package}=="
    return match.group(1)


# ----------------------------------------------------------------------------------------------------------
# schema validation of every document
# ----------------------------------------------------------------------------------------------------------


def test_kubernetes_validate_is_installed_with_the_pinned_schemas():
    _require_kubernetes_validate()
    root, _, _ = _store()
    assert root.joinpath("deployment-apps-v1.json").is_file()


def test_the_expected_manifests_exist():
    names = {p.name for p in MANIFESTS}
    assert {"raycluster.yaml", "rayjob.yaml", "mlflow.yaml", "storage.yaml"} <= names, names


@pytest.mark.parametrize("path", MANIFESTS, ids=[p.name for p in MANIFESTS])
def test_every_document_validates(path):
    docs = load(path)
    assert docs, f"{path.name} holds no documents"
    problems = []
    for doc in docs:
        try:
            problems += validate_document(doc)
        except SchemaMissing as exc:
            problems.append(f"{path.name}: {exc}")
    assert not problems, "\n".join(problems)


def test_a_kind_without_a_schema_fails_instead_of_passing():
    with pytest.raises(SchemaMissing, match="Deploymnet"):
        validate_document({"apiVersion": "apps/v1", "kind": "Deploymnet", "metadata": {"name": "x"}})
    with pytest.raises(SchemaMissing, match="RayService"):
        validate_document({"apiVersion": "ray.io/v1", "kind": "RayService", "metadata": {"name": "x"}})
    with pytest.raises(SchemaMissing, match="v1alpha1"):
        validate_document({"apiVersion": "ray.io/v1alpha1", "kind": "RayCluster", "metadata": {"name": "x"}})


def test_builtin_kinds_agree_with_the_kubernetes_validate_api(cluster):
    """Cross-check with the package's own Python API, and pin down why Ray kinds need vendored schemas."""
    _require_kubernetes_validate()
    builtin = [d for p in MANIFESTS for d in load(p) if not d["apiVersion"].startswith("ray.io/")]
    assert {d["kind"] for d in builtin} >= {"Secret", "Service", "StatefulSet", "Deployment"}
    for doc in builtin:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)  # raises on any error
    with pytest.raises(kubernetes_validate.SchemaNotFoundError):
        kubernetes_validate.validate(cluster, K8S_VERSION, strict=True)


# ----------------------------------------------------------------------------------------------------------
# negative tests: broken copies of the real manifests must fail, naming the field
# ----------------------------------------------------------------------------------------------------------


def names_field(errors: list[str], field: str) -> bool:
    """Whether some error names ``field``: quoted in the message, or as the last step of its path."""
    for error in errors:
        _, path, message = error.split(": ", 2)
        if f"'{field}'" in message or re.split(r"[.\[]", path)[-1] == field:
            return True
    return False


def _rename_worker_groups(d):
    d["spec"]["workerGroupSpec"] = d["spec"].pop("workerGroupSpecs")


def _replicas_as_text(d):
    d["spec"]["workerGroupSpecs"][0]["replicas"] = "two"


def _drop_min_replicas(d):
    del d["spec"]["workerGroupSpecs"][0]["minReplicas"]


def _drop_head_template(d):
    del d["spec"]["headGroupSpec"]["template"]


def _container_field_typo(d):
    container = d["spec"]["workerGroupSpecs"][1]["template"]["spec"]["containers"][0]
    container["resource"] = container.pop("resources")


def _numeric_ray_start_param(d):
    d["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0


def _bad_upscaling_mode(d):
    d["spec"]["autoscalerOptions"]["upscalingMode"] = "Fast"


@pytest.mark.parametrize(
    "mutate, field",
    [
        (_rename_worker_groups, "workerGroupSpec"),
        (_replicas_as_text, "replicas"),
        (_drop_min_replicas, "minReplicas"),
        (_drop_head_template, "template"),
        (_container_field_typo, "resource"),
        (_numeric_ray_start_param, "num-cpus"),
        (_bad_upscaling_mode, "upscalingMode"),
    ],
    ids=["typo-workerGroupSpec", "replicas-two", "missing-minReplicas", "missing-head-template",
         "container-typo-resource", "rayStartParams-not-string", "enum-upscalingMode"],
)
def test_broken_raycluster_fails_naming_the_field(cluster, mutate, field):
    broken = copy.deepcopy(cluster)
    mutate(broken)
    errors = validate_document(broken)
    assert errors, f"a RayCluster with a broken {field} passed validation"
    assert names_field(errors, field), errors


def _job_cluster_typo(d):
    d["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParam"] = {}


def _job_missing_max_replicas(d):
    del d["spec"]["rayClusterSpec"]["workerGroupSpecs"][1]["maxReplicas"]


def _job_ttl_as_text(d):
    d["spec"]["ttlSecondsAfterFinished"] = "ten minutes"


def _job_bad_submission_mode(d):
    d["spec"]["submissionMode"] = "K8sJob"


def _job_spec_typo(d):
    d["spec"]["shutdownAfterJobFinish"] = d["spec"].pop("shutdownAfterJobFinishes")


@pytest.mark.parametrize(
    "mutate, field",
    [
        (_job_cluster_typo, "rayStartParam"),
        (_job_missing_max_replicas, "maxReplicas"),
        (_job_ttl_as_text, "ttlSecondsAfterFinished"),
        (_job_bad_submission_mode, "submissionMode"),
        (_job_spec_typo, "shutdownAfterJobFinish"),
    ],
    ids=["embedded-typo", "embedded-missing-maxReplicas", "ttl-not-integer", "enum-submissionMode",
         "typo-shutdownAfterJobFinish"],
)
def test_broken_rayjob_fails_naming_the_field(job, mutate, field):
    broken = copy.deepcopy(job)
    mutate(broken)
    errors = validate_document(broken)
    assert errors, f"a RayJob with a broken {field} passed validation"
    assert names_field(errors, field), errors


def test_broken_builtin_manifests_fail_naming_the_field(mlflow_docs):
    deployment = copy.deepcopy(only(mlflow_docs, "Deployment", "mlflow"))
    deployment["spec"]["replica"] = deployment["spec"].pop("replicas")
    assert names_field(validate_document(deployment), "replica")

    service = copy.deepcopy(only(mlflow_docs, "Service", "mlflow"))
    service["spec"]["ports"][0]["port"] = "five thousand"
    assert names_field(validate_document(service), "port")

    statefulset = copy.deepcopy(only(mlflow_docs, "StatefulSet"))
    del statefulset["spec"]["selector"]
    assert names_field(validate_document(statefulset), "selector")


# ----------------------------------------------------------------------------------------------------------
# what the schemas cannot see
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("obj", all_ray_objects(), ids=lambda d: f"{d['kind']}/{d['metadata']['name']}")
def test_ray_object_names_are_dns1035_labels(obj):
    name = obj["metadata"]["name"]
    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= 63, name


ENTRYPOINT = re.compile(r"python -m vipe_ray\.sweep (sweeps/[\w.-]+\.ya?ml)((?: --[\w-]+ \S+)*)")


def sweep_options(job: dict) -> dict[str, str]:
    """The ``--option value`` pairs after the sweep YAML in a RayJob's entrypoint."""
    match = ENTRYPOINT.fullmatch(job["spec"]["entrypoint"])
    assert match, f"entrypoint {job['spec']['entrypoint']!r} is not `python -m vipe_ray.sweep sweeps/<name>.yaml ...`"
    words = match.group(2).split()
    return dict(zip(words[::2], words[1::2]))


def test_rayjob_runs_the_kappa_sweep(job):
    spec = job["spec"]
    match = ENTRYPOINT.fullmatch(spec["entrypoint"])
    assert match, f"entrypoint {spec['entrypoint']!r} is not `python -m vipe_ray.sweep sweeps/<name>.yaml ...`"
    shipped = {p.relative_to(REPO).as_posix() for p in (REPO / "sweeps").glob("*.y*ml")}
    assert match.group(1) in PLANNED_SWEEPS | shipped, match.group(1)
    assert match.group(1) == "sweeps/kappa.yaml"
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] > 0
    assert spec["submissionMode"] == "K8sJobMode"


def test_every_rayjob_names_a_sweep_and_a_cluster():
    jobs = [d for d in all_ray_objects() if d["kind"] == "RayJob"]
    cluster_names = {d["metadata"]["name"] for d in all_ray_objects() if d["kind"] == "RayCluster"}
    for job in jobs:
        spec = job["spec"]
        assert ENTRYPOINT.fullmatch(spec["entrypoint"]), spec["entrypoint"]
        # KubeRay's ValidateRayJobSpec: one of rayClusterSpec / clusterSelector.
        selector = spec.get("clusterSelector") or {}
        assert ("rayClusterSpec" in spec) != bool(selector), job["metadata"]["name"]
        if selector:  # looked up by name under the ray.io/cluster key; the operator never deletes it
            assert selector.get("ray.io/cluster") in cluster_names, selector
            assert not spec.get("shutdownAfterJobFinishes")
        # The working_dir uploaded by the submitter is the repo copy the image has at its WORKDIR.
        runtime_env = yaml.safe_load(spec.get("runtimeEnvYAML", "")) or {}
        assert runtime_env.get("working_dir") == "/app", runtime_env


def test_rayjob_embeds_exactly_the_raycluster_spec(cluster, job):
    assert job["spec"]["rayClusterSpec"] == cluster["spec"], (
        "deploy/rayjob.yaml's rayClusterSpec drifted from deploy/raycluster.yaml's spec")


@pytest.mark.parametrize("label, spec", cluster_specs(), ids=[label for label, _ in cluster_specs()])
def test_cluster_shape(label, spec):
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["rayVersion"] == pyproject_pin("ray"), "rayVersion must match the ray pin in pyproject.toml"
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    assert head["rayStartParams"]["num-cpus"] == "0", "trials must not be scheduled on the head"
    head_resources = head["template"]["spec"]["containers"][0]["resources"]
    assert {"cpu", "memory"} <= set(head_resources["requests"]) and {"cpu", "memory"} <= set(
        head_resources["limits"])

    by_name = groups(spec)
    assert set(by_name) == {"cpu-workers", "gpu-workers"}, set(by_name)
    for name, group in by_name.items():
        assert 0 <= group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"], name
        assert group["maxReplicas"] > 0, name

    cpu = by_name["cpu-workers"]["template"]["spec"]
    assert not any("nvidia.com/gpu" in c.get("resources", {}).get("limits", {}) for c in cpu["containers"])

    gpu = by_name["gpu-workers"]["template"]["spec"]
    gpu_limits = gpu["containers"][0]["resources"]["limits"]
    assert int(gpu_limits["nvidia.com/gpu"]) >= 1, "the GPU group must request nvidia.com/gpu"
    assert any(t.get("key") == "nvidia.com/gpu" for t in gpu.get("tolerations", [])), "no nvidia.com/gpu toleration"


@pytest.mark.parametrize("label, spec", cluster_specs(), ids=[label for label, _ in cluster_specs()])
def test_ray_pods_log_to_the_mlflow_service(label, spec, mlflow_docs):
    services = {d["metadata"]["name"]: d for d in mlflow_docs if d["kind"] == "Service"}
    server = only(mlflow_docs, "Deployment", "mlflow")
    pod_labels = server["spec"]["template"]["metadata"]["labels"]
    container = server["spec"]["template"]["spec"]["containers"][0]
    named_ports = {p.get("name"): p["containerPort"] for p in container["ports"]}
    args = container["args"]
    allowed_hosts = args[args.index("--allowed-hosts") + 1].split(",")

    for ray in ray_containers(spec):
        env = env_of(ray)
        assert env.get("RAY_USAGE_STATS_ENABLED") == "0", ray["name"]
        uri = urlparse(env.get("MLFLOW_TRACKING_URI") or "")
        assert uri.scheme == "http" and uri.hostname and uri.port, f"{ray['name']}: {env.get('MLFLOW_TRACKING_URI')}"
        service = services.get(uri.hostname)
        assert service, f"MLFLOW_TRACKING_URI names {uri.hostname!r}, mlflow.yaml has Services {sorted(services)}"
        port = next((p for p in service["spec"]["ports"] if p["port"] == uri.port), None)
        assert port, f"Service {uri.hostname} has no port {uri.port}"
        assert service["spec"]["selector"].items() <= pod_labels.items(), "Service does not select the MLflow pods"
        target = port.get("targetPort", port["port"])
        assert named_ports.get(target, target) in named_ports.values(), f"targetPort {target} is not exposed"
        # MLflow 3 answers 403 to a Host header it does not allow; the Ray pods send "<service>:<port>".
        assert any(fnmatch.fnmatch(uri.netloc, h) if "*" in h else uri.netloc == h for h in allowed_hosts), (
            f"--allowed-hosts does not admit {uri.netloc}")


def test_mlflow_server_uses_postgres_and_serves_artifacts(mlflow_docs):
    server = only(mlflow_docs, "Deployment", "mlflow")
    pod = server["spec"]["template"]["spec"]
    container = pod["containers"][0]
    argv = container["command"] + container["args"]
    assert argv[:2] == ["mlflow", "server"]

    def arg(flag):
        assert flag in argv, f"mlflow server has no {flag}"
        return argv[argv.index(flag) + 1]

    assert "--serve-artifacts" in argv
    assert arg("--host") == "0.0.0.0"
    assert int(arg("--port")) == 5000 == {p.get("name"): p["containerPort"] for p in container["ports"]}["http"]

    backend = urlparse(arg("--backend-store-uri"))
    assert backend.scheme == "postgresql+psycopg2", (
        "use postgresql+psycopg2:// (SQLAlchemy 2.1 maps postgresql:// to psycopg 3, which the image lacks)")
    postgres_service = only(mlflow_docs, "Service", backend.hostname)
    assert backend.port in [p["port"] for p in postgres_service["spec"]["ports"]]
    statefulset = only(mlflow_docs, "StatefulSet")
    assert statefulset["spec"]["serviceName"] == postgres_service["metadata"]["name"]
    assert statefulset["spec"]["volumeClaimTemplates"], "PostgreSQL needs a PVC"
    assert postgres_service["spec"]["selector"].items() <= statefulset["spec"]["template"]["metadata"][
        "labels"].items()

    # Every $(VAR) in the URI comes from the credentials Secret, which the StatefulSet uses as well.
    secret = only(mlflow_docs, "Secret")
    refs = set(re.findall(r"\$\((\w+)\)", arg("--backend-store-uri")))
    assert refs == {"POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB"} <= set(secret["stringData"])
    for spec in (pod, statefulset["spec"]["template"]["spec"]):
        assert {"secretRef": {"name": secret["metadata"]["name"]}} in spec["containers"][0]["envFrom"]
    assert "REPLACE_ME" in secret["stringData"]["POSTGRES_PASSWORD"], "the placeholder password must stay marked"

    # Artifacts: --artifacts-destination is a mounted PVC (or an s3:// URI).
    destination = arg("--artifacts-destination")
    if not destination.startswith("s3://"):
        mount = next(m for m in container["volumeMounts"] if m["mountPath"] == destination)
        volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
        only(mlflow_docs, "PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])
        assert server["spec"]["strategy"]["type"] == "Recreate", "a ReadWriteOnce volume needs Recreate"

    assert container["readinessProbe"]["httpGet"]["path"] == "/health"

    dockerfile = (DEPLOY / "mlflow.Dockerfile").read_text()
    assert f'"mlflow=={pyproject_pin("mlflow")}"' in dockerfile
    assert "psycopg2-binary" in dockerfile


_QUANTITY = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)(([KMGTPE]i)|[numkMGTPE]|[eE][+-]?\d+)?$")


def _containers(obj):
    """Every dict with name+image below obj (containers, initContainers, submitter templates...)."""
    if isinstance(obj, dict):
        if "name" in obj and "image" in obj:
            yield obj
        for value in obj.values():
            yield from _containers(value)
    elif isinstance(obj, list):
        for value in obj:
            yield from _containers(value)


@pytest.mark.parametrize("path", MANIFESTS, ids=[p.name for p in MANIFESTS])
def test_every_container_has_requests_and_limits_with_valid_quantities(path):
    """The OpenAPI schema types quantities as string-or-number only; check the Kubernetes quantity syntax."""
    for doc in load(path):
        for container in _containers(doc):
            resources = container.get("resources", {})
            assert resources.get("requests") and resources.get("limits"), f"{path.name}: {container['name']}"
            for kind in ("requests", "limits"):
                for resource, quantity in resources[kind].items():
                    assert _QUANTITY.match(str(quantity)), f"{container['name']}: {resource}={quantity!r}"


def test_dockerfile_builds_the_cpu_image_from_the_repo():
    text = (DEPLOY / "Dockerfile").read_text()
    instructions = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert "ARG PYTHON_IMAGE=python:3.11-slim" in instructions and "FROM ${PYTHON_IMAGE}" in instructions
    assert f"ARG TORCH_VERSION={pyproject_pin('torch')}" in instructions
    assert re.search(r'pip install "torch==\$\{TORCH_VERSION\}" --index-url', text)
    assert 'pip install ".[platform]"' in text
    assert "WORKDIR /app" in instructions
    assert "CUDA" in text, "say how a GPU image differs"
    # The dataset is baked in, never fetched when a pod starts.
    assert (REPO / "data" / "cmu_h36m17_30fps.parquet").is_file()
    assert "!data/cmu_h36m17_30fps.parquet" in (DEPLOY / "Dockerfile.dockerignore").read_text()
    assert not re.search(r"\b(curl|wget)\b[^\n]*https?://", text), "no downloads at build or run time besides pip"


def test_schema_readme_records_the_transcribed_sources():
    readme = (SCHEMAS / "README.md").read_text()
    for name in RAY_SCHEMAS.values():
        schema = json.loads((SCHEMAS / name).read_text())
        commit = re.search(r"at commit ([0-9a-f]{40})", schema["$comment"]).group(1)
        assert commit in readme, f"{name} was transcribed at {commit}, which deploy/schemas/README.md omits"
    assert "raycluster_types.go" in readme and "rayjob_types.go" in readme


# ----------------------------------------------------------------------------------------------------------
# shared object storage, autoscaling limits, trial drivers, the image's commit
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def storage_secret() -> dict:
    return only(load(DEPLOY / "storage.yaml"), "Secret")


def _jobs_with_clusters() -> list[tuple[dict, dict]]:
    """(RayJob, the RayClusterSpec it runs on: embedded, or the RayCluster its clusterSelector names)."""
    clusters = {d["metadata"]["name"]: d["spec"] for d in all_ray_objects() if d["kind"] == "RayCluster"}
    out = []
    for job in (d for d in all_ray_objects() if d["kind"] == "RayJob"):
        spec = job["spec"].get("rayClusterSpec") or clusters[job["spec"]["clusterSelector"]["ray.io/cluster"]]
        out.append((job, spec))
    return out


def test_storage_secret_holds_the_standard_aws_variables(storage_secret):
    from vipe_ray.storage import S3_ENV

    assert set(storage_secret["stringData"]) == set(S3_ENV)
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"):
        assert "REPLACE_ME" in storage_secret["stringData"][key], f"the placeholder {key} must stay marked"


@pytest.mark.parametrize("label, spec", cluster_specs(), ids=[label for label, _ in cluster_specs()])
def test_every_ray_pod_loads_the_storage_secret(label, spec, storage_secret):
    ref = {"secretRef": {"name": storage_secret["metadata"]["name"]}}
    for container in ray_containers(spec):
        assert ref in container.get("envFrom", []), f"{label}: {container['name']} lacks {ref}"


def test_sweeps_and_mlflow_artifacts_share_the_bucket(mlflow_docs, storage_secret):
    """Every RayJob's sweep stores results on S3, in the bucket where MLflow keeps its artifacts, and the
    MLflow server has the credentials and boto3 for it."""
    from vipe_ray.storage import is_uri

    server = only(mlflow_docs, "Deployment", "mlflow")
    container = server["spec"]["template"]["spec"]["containers"][0]
    argv = container["command"] + container["args"]
    artifacts = urlparse(argv[argv.index("--artifacts-destination") + 1])
    assert artifacts.scheme == "s3" and artifacts.netloc, artifacts
    assert {"secretRef": {"name": storage_secret["metadata"]["name"]}} in container["envFrom"]
    assert re.search(r'"boto3[^"]*"', (DEPLOY / "mlflow.Dockerfile").read_text()), "boto3 serves s3:// artifacts"
    for job, _ in _jobs_with_clusters():
        results = sweep_options(job).get("--storage", "")
        assert is_uri(results) and urlparse(results).scheme == "s3", f"{job['metadata']['name']}: --storage {results!r}"
        assert urlparse(results).netloc == artifacts.netloc, "one bucket for results and MLflow artifacts"
        assert urlparse(results).path.strip("/") != artifacts.path.strip("/")


def _quantity(value) -> float:
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def _ray_resources(group: dict) -> dict[str, float]:
    """What one pod of a group offers Ray: CPUs/GPUs from its Ray container's limits (or rayStartParams),
    custom resources from rayStartParams' ``resources`` (KubeRay's quoted JSON)."""
    params = group["rayStartParams"]
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    out = {"CPU": _quantity(params.get("num-cpus", limits.get("cpu", 0))),
           "GPU": _quantity(params.get("num-gpus", limits.get("nvidia.com/gpu", 0)))}
    if "resources" in params:
        out.update(json.loads(json.loads(params["resources"])))
    return out


def test_cluster_max_is_what_the_autoscaler_can_reach():
    """`--cluster-max` (the sweep plans its concurrency for it) = each worker group's maxReplicas x what one
    of its pods offers, plus the head."""
    from vipe_ray.platform.resources import TRIAL_DRIVER_RESOURCE
    from vipe_ray.platform.sweep_spec import parse_resources

    for job, spec in _jobs_with_clusters():
        expected: dict[str, float] = {}
        head = {"CPU": _quantity(spec["headGroupSpec"]["rayStartParams"].get("num-cpus", 0))}
        for resources, count in [(head, 1)] + [(_ray_resources(g), g["maxReplicas"])
                                               for g in spec["workerGroupSpecs"]]:
            for key, value in resources.items():
                expected[key] = expected.get(key, 0.0) + count * value
        given = parse_resources(sweep_options(job).get("--cluster-max"), "--cluster-max")
        assert given == {k: v for k, v in expected.items() if v}, job["metadata"]["name"]
        assert given[TRIAL_DRIVER_RESOURCE] > 0


@pytest.mark.parametrize("label, spec", cluster_specs(), ids=[label for label, _ in cluster_specs()])
def test_trial_drivers_are_offered_only_by_the_cpu_group(label, spec):
    from vipe_ray.platform.resources import TRIAL_DRIVER_RESOURCE

    by_name = groups(spec)
    assert _ray_resources(by_name["cpu-workers"]).get(TRIAL_DRIVER_RESOURCE, 0) >= 1
    assert TRIAL_DRIVER_RESOURCE not in _ray_resources(by_name["gpu-workers"])
    assert "resources" not in spec["headGroupSpec"]["rayStartParams"]


def test_the_image_records_its_git_commit():
    from vipe_ray.platform.tracking import COMMIT_ENV, COMMIT_FILE

    lines = [line for line in (DEPLOY / "Dockerfile").read_text().splitlines() if line and not line.startswith("#")]
    arg = lines.index("ARG GIT_COMMIT=unknown")
    assert arg > max(i for i, line in enumerate(lines) if "pip install" in line), (
        "declare GIT_COMMIT after the dependency layers, or every commit rebuilds them")
    assert 'LABEL org.opencontainers.image.revision="${GIT_COMMIT}"' in lines
    assert f'ENV {COMMIT_ENV}="${{GIT_COMMIT}}"' in lines
    assert any(f'"${{GIT_COMMIT}}" > {COMMIT_FILE}' in line for line in lines[arg:]), "the commit file beside the code"
    assert "--build-arg GIT_COMMIT=$(git rev-parse HEAD)" in (DEPLOY / "README.md").read_text()


def test_git_commit_falls_back_to_what_the_image_recorded(tmp_path, monkeypatch):
    """Real git and real directories: a checkout answers with git; the image's /app copy (also when a RayJob
    uploads it) with its GIT_COMMIT file; the pip-installed package with VIPE_RAY_GIT_COMMIT; a developer's
    uploaded checkout (a source tree without either) with `unknown`."""
    import subprocess

    from vipe_ray.platform.tracking import COMMIT_ENV, COMMIT_FILE, git_commit

    monkeypatch.setenv(COMMIT_ENV, "c0ffee")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    assert git_commit(REPO) == head
    image_copy = tmp_path / "app"
    image_copy.mkdir()
    (image_copy / "pyproject.toml").write_text("")
    (image_copy / COMMIT_FILE).write_text("abc123\n")
    assert git_commit(image_copy) == "abc123"
    site_packages = tmp_path / "site-packages"
    site_packages.mkdir()
    assert git_commit(site_packages) == "c0ffee"
    upload = tmp_path / "upload"
    upload.mkdir()
    (upload / "pyproject.toml").write_text("")
    assert git_commit(upload) == "unknown"
    monkeypatch.delenv(COMMIT_ENV)
    assert git_commit(site_packages) == "unknown"
