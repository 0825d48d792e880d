"""Check the infrastructure files offline, against schemas that ship inside installed packages.

No Docker engine or Kubernetes cluster is needed, and nothing is downloaded:

* ``docker-compose.yml`` against the compose-spec JSON schema vendored by check-jsonschema, plus the references
  the schema cannot see (``depends_on`` targets, named volumes, build files);
* ``k8s/*.yaml`` against the Kubernetes OpenAPI schemas of kubernetes-validate, strict (unknown keys fail);
* the gpu pool's base job templates: checked the way the Prefect server checks a work pool, rendered with the
  workers' own code (prefect-kubernetes, prefect-docker) for a sample flow run, and the result validated: the Job
  manifest against the Kubernetes schema, the container settings through docker-py's own HostConfig;
* ``prefect.yaml`` with Prefect's own model of the file.

Run it from anywhere: ``python infra/check.py`` (exit status 1 and one line per problem when something is wrong).
"""

from __future__ import annotations

import asyncio
import copy
import json
import sys
import uuid
from pathlib import Path
from typing import Any

import yaml

INFRA = Path(__file__).resolve().parent
ROOT = INFRA.parent
K8S_VERSION = "1.30"  # oldest Kubernetes minor the manifests promise to fit
GPU_RESOURCE = "nvidia.com/gpu"
DOCKER_API_VERSION = "1.44"  # Docker Engine 25+; device requests need 1.40 or later

# prefect-kubernetes requires these two Job fields inside the pod template spec (its own base manifest puts them
# there and its validator insists); the API server drops them as unknown fields with a warning. Validation skips
# exactly these two keys so every other unknown key still fails.
_PREFECT_POD_SPEC_QUIRKS = ("parallelism", "completions")


class InfraError(ValueError):
    """An infrastructure file does not validate; the message names the file, the place and the rule broken."""


# ---- YAML --------------------------------------------------------------------------------------------------
def load_docs(path: Path) -> list[dict[str, Any]]:
    """Every document of a YAML file (a manifest may hold several, separated by ---)."""
    try:
        docs = [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]
    except yaml.YAMLError as e:
        raise InfraError(f"{path}: not valid YAML ({e})") from e
    for d in docs:
        if not isinstance(d, dict):
            raise InfraError(f"{path}: a document is a {type(d).__name__}, not a mapping")
    return docs


def _where(error: Any) -> str:
    return "/".join(str(p) for p in error.absolute_path) or "(top)"


# ---- Kubernetes ---------------------------------------------------------------------------------------------
def validate_k8s(doc: dict[str, Any], source: str = "manifest", version: str = K8S_VERSION) -> str:
    """Validate one Kubernetes object against the strict schema of ``version``; returns ``kind/name``."""
    import kubernetes_validate

    for key in ("apiVersion", "kind"):
        if key not in doc:
            raise InfraError(f"{source}: no {key!r}; every Kubernetes object needs apiVersion and kind")
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as e:
        raise InfraError(f"{source}: {doc['kind']} at {_where(e)}: {e.message}") from None
    except kubernetes_validate.SchemaNotFoundError as e:
        raise InfraError(f"{source}: {e.message}") from None
    name = doc.get("metadata", {}).get("name") or doc.get("metadata", {}).get("generateName", "?")
    return f"{doc['kind']}/{name}"


def check_manifests(folder: Path = INFRA / "k8s") -> list[str]:
    """Validate every object in ``folder``; the kustomization must list exactly the manifest files."""
    checked: list[str] = []
    manifests = sorted(p for p in folder.glob("*.yaml") if p.name != "kustomization.yaml")
    if not manifests:
        raise InfraError(f"{folder}: no manifests")
    for path in manifests:
        for doc in load_docs(path):
            checked.append(validate_k8s(doc, str(path.relative_to(ROOT))))
    kustomization = folder / "kustomization.yaml"
    if kustomization.is_file():
        listed = set(load_docs(kustomization)[0].get("resources", []))
        present = {p.name for p in manifests}
        if listed != present:
            raise InfraError(
                f"{kustomization}: resources {sorted(listed)} differ from the manifests in the folder "
                f"{sorted(present)}; list every manifest once"
            )
    return checked


# ---- compose ------------------------------------------------------------------------------------------------
def compose_schema() -> dict[str, Any]:
    """The compose-spec schema as vendored by check-jsonschema (``--builtin-schema vendor.compose-spec``)."""
    from check_jsonschema.builtin_schemas import get_builtin_schema

    return get_builtin_schema("vendor.compose-spec")


def check_compose(path: Path = INFRA / "docker-compose.yml", base: Path | None = None) -> list[str]:
    """Validate a compose file against the compose spec and its cross-references; returns the service names.

    Relative paths (bind mounts, build contexts) resolve against ``base``, the compose file's folder by default.
    """
    base = base or path.parent
    from jsonschema import Draft202012Validator

    (doc,) = load_docs(path)
    errors = sorted(Draft202012Validator(compose_schema()).iter_errors(doc), key=lambda e: list(e.absolute_path))
    if errors:
        first = errors[0]
        raise InfraError(f"{path}: {len(errors)} schema error(s); first at {_where(first)}: {first.message}")
    services: dict[str, Any] = doc.get("services", {})
    volumes = set(doc.get("volumes", {}) or {})
    for name, svc in services.items():
        deps = svc.get("depends_on", {})
        for dep in deps if isinstance(deps, (list, dict)) else []:
            if dep not in services:
                raise InfraError(f"{path}: service {name!r} depends on {dep!r}, which is not a service")
        for mount in svc.get("volumes", []):
            source = mount.split(":", 1)[0] if isinstance(mount, str) else mount.get("source", "")
            if source.startswith((".", "/")):
                if source.startswith(".") and not (base / source).exists():
                    raise InfraError(f"{path}: service {name!r} mounts {source!r}, which does not exist")
            elif source and source not in volumes:
                raise InfraError(f"{path}: service {name!r} mounts volume {source!r}, not declared under volumes:")
        build = svc.get("build")
        if isinstance(build, dict):
            context = (base / build.get("context", ".")).resolve()
            dockerfile = context / build.get("dockerfile", "Dockerfile")
            if not dockerfile.is_file():
                raise InfraError(f"{path}: service {name!r} builds from {dockerfile}, which does not exist")
    return sorted(services)


# ---- Prefect work-pool templates ----------------------------------------------------------------------------
def load_template(path: Path) -> dict[str, Any]:
    """A base job template, checked as the Prefect server checks one when a work pool is created."""
    from prefect.server.schemas.actions import validate_base_job_template

    template = json.loads(path.read_text(encoding="utf-8"))
    try:
        validate_base_job_template(template)
    except ValueError as e:
        raise InfraError(f"{path}: not a valid base job template: {e}") from None
    return template


def _sample_flow_run() -> Any:
    from prefect.client.schemas.objects import FlowRun

    return FlowRun(flow_id=uuid.uuid4(), deployment_id=uuid.uuid4(), name="sample-run", parameters={"name": "train"})


async def _configuration(cls: Any, template: dict[str, Any], values: dict[str, Any]) -> Any:
    from prefect.client.orchestration import PrefectClient

    # A client that is never reached: the templates use no blocks and no Prefect variables, and passing one keeps
    # Prefect from starting a temporary API server just to resolve nothing.
    client = PrefectClient(api="http://127.0.0.1:9/api")
    return await cls.from_template_and_values(copy.deepcopy(template), values, client=client)


def render_kubernetes_job(template: dict[str, Any], values: dict[str, Any] | None = None) -> dict[str, Any]:
    """The Job manifest the kubernetes worker would submit for a sample flow run (its own code renders it)."""
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    try:
        config = asyncio.run(_configuration(KubernetesWorkerJobConfiguration, template, values or {}))
    except ValueError as e:  # pydantic: the worker's own checks on the rendered configuration
        raise InfraError(f"kubernetes job configuration: {e}") from None
    config.prepare_for_flow_run(_sample_flow_run())
    return config.job_manifest


def validate_job_manifest(manifest: dict[str, Any], source: str = "rendered Job") -> str:
    doc = copy.deepcopy(manifest)
    pod_spec = doc.get("spec", {}).get("template", {}).get("spec", {})
    for key in _PREFECT_POD_SPEC_QUIRKS:
        pod_spec.pop(key, None)
    doc.setdefault("metadata", {}).setdefault("name", "rendered")
    return validate_k8s(doc, source)


def render_docker_container(template: dict[str, Any], values: dict[str, Any] | None = None) -> dict[str, Any]:
    """The container-create arguments the docker worker would pass for a sample flow run, split as docker-py does.

    Returns docker-py's own ``create_container`` keyword arguments with ``host_config`` built by its HostConfig,
    which refuses unknown or ill-typed settings (device requests, shm size, mounts) the way the engine API would.
    """
    import docker.errors
    from docker.models.containers import _create_container_args
    from prefect_docker.worker import DockerWorker, DockerWorkerJobConfiguration

    values = {"env": {"PREFECT_API_URL": "http://prefect-server:4200/api"}, **(values or {})}
    try:
        config = asyncio.run(_configuration(DockerWorkerJobConfiguration, template, values))
    except ValueError as e:
        raise InfraError(f"docker job configuration: {e}") from None
    config.prepare_for_flow_run(_sample_flow_run())
    worker = DockerWorker.__new__(DockerWorker)  # only its pure settings builder is used: no engine, no API
    settings = worker._build_container_settings(None, config)
    settings = {k: v for k, v in settings.items() if v is not None}
    settings.pop("name", None)
    try:
        # What ContainerCollection.create does before calling the engine, with the API version it would negotiate.
        create = _create_container_args({**settings, "version": DOCKER_API_VERSION})
    except (TypeError, ValueError, docker.errors.DockerException) as e:
        raise InfraError(f"docker container settings rejected by docker-py: {e}") from None
    return create


# ---- prefect.yaml -------------------------------------------------------------------------------------------
def load_prefect_yaml(path: Path = ROOT / "prefect.yaml") -> Any:
    """prefect.yaml parsed by Prefect's own model of the file, its schedules built as `prefect deploy` builds them."""
    from prefect.cli.deploy._models import PrefectYamlModel

    (doc,) = load_docs(path)
    try:
        model = PrefectYamlModel.model_validate(doc)
    except ValueError as e:
        raise InfraError(f"{path}: {e}") from None
    deployment_schedules(path)
    return model


def deployment_schedules(path: Path = ROOT / "prefect.yaml") -> dict[str, list[Any]]:
    """Each deployment's schedules as Prefect schedule objects (cron expressions and time zones checked)."""
    from prefect.cli.deploy._schedules import _schedule_config_to_deployment_schedule

    (doc,) = load_docs(path)
    out: dict[str, list[Any]] = {}
    for dep in doc.get("deployments", []):
        name = f"{dep.get('entrypoint')} ({dep.get('name')})"
        try:
            out[dep["name"]] = [
                _schedule_config_to_deployment_schedule(item)["schedule"] for item in dep.get("schedules") or []
            ]
        except (ValueError, KeyError) as e:
            raise InfraError(f"{path}: deployment {name}: bad schedule: {e}") from None
    return out


# ---- everything ---------------------------------------------------------------------------------------------
def check_all() -> list[str]:
    """Run every check; returns one line per thing that passed, raises InfraError on the first failure."""
    done = [f"compose: {len(check_compose())} services valid (compose-spec)"]
    done += [f"k8s: {name} valid (Kubernetes {K8S_VERSION}, strict)" for name in check_manifests()]
    k8s = INFRA / "prefect" / "gpu-kubernetes.json"
    job = render_kubernetes_job(load_template(k8s))
    validate_job_manifest(job, f"{k8s.name} rendered")
    gpus = job["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"].get(GPU_RESOURCE)
    done.append(f"prefect: {k8s.name} renders a valid Job with {GPU_RESOURCE}={gpus}")
    docker_t = INFRA / "prefect" / "gpu-docker.json"
    create = render_docker_container(load_template(docker_t))
    done.append(f"prefect: {docker_t.name} renders container settings docker-py accepts ({create['image']})")
    model = load_prefect_yaml()
    done.append(f"prefect.yaml: {len(model.deployments)} deployments parse")
    return done


def main() -> int:
    try:
        for line in check_all():
            print(f"ok  {line}")
    except InfraError as e:
        print(f"FAIL  {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
