"""infra/ and prefect.yaml, checked offline against schemas that ship in installed packages (no Docker engine,
no cluster): compose-spec (check-jsonschema), Kubernetes (kubernetes-validate, strict), the gpu pool's job templates
rendered by the Prefect workers' own code, prefect.yaml by Prefect's own model. Each check is also shown to fail
on a broken copy, so a pass means something.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"


def _load_check():
    spec = importlib.util.spec_from_file_location("infra_check", INFRA / "check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


check = _load_check()


@pytest.fixture(scope="module")
def k8s_template() -> dict:
    return check.load_template(INFRA / "prefect" / "gpu-kubernetes.json")


@pytest.fixture(scope="module")
def rendered_job(k8s_template: dict) -> dict:
    return check.render_kubernetes_job(k8s_template)


# ---- compose ------------------------------------------------------------------------------------------------
def test_compose_file_is_valid_and_has_the_stack() -> None:
    services = check.check_compose()
    assert {"postgres", "minio", "prefect-server", "mlflow", "worker-cpu", "worker-gpu", "setup"} <= set(services)
    (doc,) = check.load_docs(INFRA / "docker-compose.yml")
    svc = doc["services"]
    assert svc["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"].startswith("postgresql+asyncpg")
    mlflow_cmd = " ".join(svc["mlflow"]["command"])
    assert "--backend-store-uri=postgresql://" in mlflow_cmd
    assert "--serve-artifacts" in mlflow_cmd and "--artifacts-destination=s3://" in mlflow_cmd
    assert svc["mlflow"]["environment"]["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    devices = svc["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert "--pool" in svc["worker-cpu"]["command"] and "cpu" in svc["worker-cpu"]["command"]


def test_compose_holds_no_secrets() -> None:
    """Passwords come from infra/.env through ${VAR:?...}; the example file holds placeholders; .env is ignored."""
    text = (INFRA / "docker-compose.yml").read_text()
    for key, value in re.findall(r"^\s*(\w*(?:PASSWORD|SECRET)\w*):\s+(\S+)", text, re.M):
        assert value.startswith("${"), f"{key} has a literal value in docker-compose.yml: use ${{{key}:?...}}"
    for url in re.findall(r"postgres\S*://[^@\s]+@", text):
        assert "${POSTGRES_PASSWORD:?" in url, url
    example = (INFRA / ".env.example").read_text()
    assert all("CHANGE-ME" in line for line in example.splitlines() if "PASSWORD=" in line)
    assert ".env" in (INFRA / ".gitignore").read_text().split()


def test_compose_check_jsonschema_cli_accepts_it_and_rejects_a_broken_copy(tmp_path: Path) -> None:
    cli = Path(sys.executable).with_name("check-jsonschema")
    good = subprocess.run(
        [cli, "--builtin-schema", "vendor.compose-spec", INFRA / "docker-compose.yml"], capture_output=True, text=True
    )
    assert good.returncode == 0, good.stdout + good.stderr
    (doc,) = check.load_docs(INFRA / "docker-compose.yml")
    doc["services"]["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] = "gpu"
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(yaml.safe_dump(doc))
    bad = subprocess.run([cli, "--builtin-schema", "vendor.compose-spec", broken], capture_output=True, text=True)
    assert bad.returncode != 0 and "capabilities" in bad.stdout + bad.stderr


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        (lambda d: d["services"]["mlflow"].update(imagee="x"), "imagee"),
        (lambda d: d["services"]["worker-cpu"].update(depends_on=["prefect"]), "'prefect', which is not a service"),
        (lambda d: d["services"]["worker-cpu"].update(volumes=["wanwu-dta:/app/data"]), "not declared"),
    ],
)
def test_broken_compose_fails(tmp_path: Path, breakage, message: str) -> None:
    (doc,) = check.load_docs(INFRA / "docker-compose.yml")
    breakage(doc)
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(yaml.safe_dump(doc))
    with pytest.raises(check.InfraError, match=re.escape(message)):
        check.check_compose(broken, base=INFRA)


# ---- Kubernetes manifests -----------------------------------------------------------------------------------
def test_k8s_manifests_are_valid() -> None:
    names = check.check_manifests()
    assert {
        "Namespace/wanwu",
        "ServiceAccount/prefect-worker",
        "Role/prefect-worker",
        "RoleBinding/prefect-worker",
        "ConfigMap/wanwu-config",
        "PersistentVolumeClaim/wanwu-data",
        "Deployment/prefect-worker-gpu",
    } == set(names)
    role = next(d for d in check.load_docs(INFRA / "k8s" / "rbac.yaml") if d["kind"] == "Role")
    jobs = next(r for r in role["rules"] if "jobs" in r["resources"])
    assert {"create", "watch", "delete"} <= set(jobs["verbs"])
    (worker,) = check.load_docs(INFRA / "k8s" / "gpu-worker.yaml")
    args = worker["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[:3] == ["prefect", "worker", "start"] and "kubernetes" in args and "gpu" in args


def _container(doc: dict) -> dict:
    return doc["spec"]["template"]["spec"]["containers"][0]


@pytest.mark.parametrize(
    ("path", "breakage", "message"),
    [
        ("gpu-worker.yaml", lambda d: d["spec"].update(replicas="one"), "spec/replicas"),
        ("gpu-worker.yaml", lambda d: _container(d).update(imagePolicy="Always"), "'imagePolicy' was unexpected"),
        ("gpu-worker.yaml", lambda d: _container(d).pop("name"), "'name' is a required property"),
        ("rbac.yaml", lambda d: d.update(kind="ServiceAcount"), "Couldn't find schema for kind ServiceAcount"),
    ],
)
def test_broken_manifest_fails(path: str, breakage, message: str) -> None:
    doc = check.load_docs(INFRA / "k8s" / path)[0]
    breakage(doc)
    with pytest.raises(check.InfraError, match=re.escape(message)):
        check.validate_k8s(doc, path)


def test_kubernetes_validate_cli_agrees(tmp_path: Path) -> None:
    """The command README gives (kubernetes-validate's own CLI) passes on the manifests and fails on a broken one."""
    cli = Path(sys.executable).with_name("kubernetes-validate")
    manifests = sorted(p for p in (INFRA / "k8s").glob("*.yaml") if p.name != "kustomization.yaml")
    good = subprocess.run([cli, "--strict", "-k", check.K8S_VERSION, *manifests], capture_output=True, text=True)
    assert good.returncode == 0, good.stdout + good.stderr
    (doc,) = check.load_docs(INFRA / "k8s" / "gpu-worker.yaml")
    doc["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "eighty"
    broken = tmp_path / "broken.yaml"
    broken.write_text(yaml.safe_dump(doc))
    bad = subprocess.run([cli, "--strict", "-k", check.K8S_VERSION, broken], capture_output=True, text=True)
    assert bad.returncode != 0


# ---- the gpu pool's Kubernetes job template -----------------------------------------------------------------
def test_gpu_job_template_renders_a_valid_gpu_job(rendered_job: dict) -> None:
    check.validate_job_manifest(rendered_job)
    pod = rendered_job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert {"name": "data", "persistentVolumeClaim": {"claimName": "wanwu-data"}} in pod["volumes"]
    assert container["args"] == ["prefect", "flow-run", "execute"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["WANWU_ROOT"] == "/app" and "PREFECT__FLOW_RUN_ID" in env
    assert rendered_job["metadata"]["namespace"] == "wanwu"
    assert "runtimeClassName" not in pod  # unset variables vanish instead of rendering empty
    print("\nrendered gpu Job:\n" + yaml.safe_dump(rendered_job, sort_keys=False)[:2500])


def test_gpu_job_template_takes_deployment_overrides(k8s_template: dict) -> None:
    job = check.render_kubernetes_job(
        k8s_template,
        {
            "gpu_count": 4,
            "image": "registry.example/wanwu-worker:1.2.3",
            "runtime_class_name": "nvidia",
            "node_selector": {"cloud.google.com/gke-accelerator": "nvidia-l4"},
        },
    )
    check.validate_job_manifest(job)
    pod = job["spec"]["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 4
    assert pod["containers"][0]["image"] == "registry.example/wanwu-worker:1.2.3"
    assert pod["runtimeClassName"] == "nvidia"
    assert pod["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-l4"}


def test_broken_gpu_job_templates_fail(k8s_template: dict, tmp_path: Path) -> None:
    # 1. a placeholder with no variable: the Prefect server refuses the work pool
    t = copy.deepcopy(k8s_template)
    t["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["priorityClassName"] = "{{ priority }}"
    broken = tmp_path / "gpu-kubernetes.json"
    broken.write_text(json.dumps(t))
    with pytest.raises(check.InfraError, match="priority"):
        check.load_template(broken)
    # 2. a template the kubernetes worker itself rejects (its container must be named prefect-job)
    t = copy.deepcopy(k8s_template)
    t["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0]["name"] = "gpu"
    with pytest.raises(check.InfraError, match="prefect-job"):
        check.render_kubernetes_job(t)
    # 3. a key Kubernetes does not know, caught by the strict schema after rendering
    t = copy.deepcopy(k8s_template)
    t["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["nodeSelecter"] = {"gpu": "yes"}
    with pytest.raises(check.InfraError, match="nodeSelecter"):
        check.validate_job_manifest(check.render_kubernetes_job(t))
    # 4. a wrong type from a deployment's job variables
    job = check.render_kubernetes_job(k8s_template, {"active_deadline_seconds": "forever"})
    with pytest.raises(check.InfraError, match="activeDeadlineSeconds"):
        check.validate_job_manifest(job)


# ---- the Docker variant -------------------------------------------------------------------------------------
def test_gpu_docker_template_renders_settings_docker_accepts() -> None:
    create = check.render_docker_container(check.load_template(INFRA / "prefect" / "gpu-docker.json"))
    host = create["host_config"]
    (request,) = host["DeviceRequests"]
    assert request["Driver"] == "nvidia" and request["Count"] == -1 and request["Capabilities"] == [["gpu"]]
    assert host["NetworkMode"] == "wanwu"
    assert "wanwu-data:/app/data" in host["Binds"]
    assert host["ShmSize"] == 2 * 1024**3
    assert create["command"] == "prefect flow-run execute"
    # the same names the compose file gives its network and data volume
    (doc,) = check.load_docs(INFRA / "docker-compose.yml")
    assert doc["networks"]["default"]["name"] == "wanwu" and doc["volumes"]["wanwu-data"]["name"] == "wanwu-data"


def test_broken_docker_template_fails() -> None:
    t = check.load_template(INFRA / "prefect" / "gpu-docker.json")
    t["variables"]["properties"]["container_create_kwargs"]["default"]["device_requests"] = [{"count": "all"}]
    with pytest.raises(check.InfraError, match="count"):
        check.render_docker_container(t)


# ---- prefect.yaml -------------------------------------------------------------------------------------------
def test_prefect_yaml_deployments_and_schedules() -> None:
    from prefect.client.schemas.schedules import CronSchedule

    from flows.dispatch import STAGE_FLOW, deployment_name
    from wanwu.config import OrchestrationParams

    model = check.load_prefect_yaml()
    by_entry: dict[str, list] = {}
    for d in model.deployments:
        by_entry.setdefault(d.entrypoint, []).append(d)
    (pipeline,) = by_entry["flows/pipeline.py:pipeline"]
    assert pipeline.work_pool.name == "cpu" and pipeline.name == "pipeline"

    schedules = check.deployment_schedules()

    def cron(entrypoint: str) -> CronSchedule:
        (dep,) = by_entry[entrypoint]
        assert dep.work_pool.name == "cpu"
        (schedule,) = schedules[dep.name]
        assert isinstance(schedule, CronSchedule) and schedule.timezone == "Asia/Shanghai"
        return schedule

    weekly, daily = cron("flows/retrain.py:retrain"), cron("flows/monitor.py:monitor")
    assert weekly.cron.split()[2:] == ["*", "*", "1"], weekly.cron  # one day of the week
    assert daily.cron.split()[2:] == ["*", "*", "*"], daily.cron  # every day
    assert all(not schedules[name] for name in ("pipeline", *OrchestrationParams().gpu_stages))  # on demand

    stages = {d.parameters["name"]: d for d in by_entry["flows/stage.py:stage"]}
    defaults = OrchestrationParams()
    assert set(stages) == set(defaults.gpu_stages)
    for name, dep in stages.items():
        assert dep.name == name and dep.work_pool.name == defaults.gpu_pool
        assert deployment_name(name) == f"{STAGE_FLOW}/{dep.name}"

    raw = yaml.safe_load((REPO / "prefect.yaml").read_text())
    (step,) = raw["pull"]
    assert step["prefect.deployments.steps.set_working_directory"]["directory"] == "{{ $WANWU_ROOT }}"


def test_prefect_yaml_entrypoints_are_flows() -> None:
    """Each entrypoint that exists is a Prefect flow with the name the deployments expect."""
    from prefect.flows import load_flow_from_entrypoint

    from flows.dispatch import STAGE_FLOW

    model = check.load_prefect_yaml()
    expected = {"flows/pipeline.py:pipeline": "pipeline", "flows/stage.py:stage": STAGE_FLOW}
    for entrypoint in {d.entrypoint for d in model.deployments}:
        if not (REPO / entrypoint.split(":")[0]).is_file():
            continue  # retrain / monitor: checked once those flows exist
        flow = load_flow_from_entrypoint(str(REPO / entrypoint))
        if entrypoint in expected:
            assert flow.name == expected[entrypoint]
    for entrypoint in expected:
        assert (REPO / entrypoint.split(":")[0]).is_file()


def test_broken_prefect_yaml_fails(tmp_path: Path) -> None:
    raw = yaml.safe_load((REPO / "prefect.yaml").read_text())
    raw["deployments"][1]["schedules"][0]["cron"] = "every monday"
    broken = tmp_path / "prefect.yaml"
    broken.write_text(yaml.safe_dump(raw))
    with pytest.raises(check.InfraError, match=r"(?s)weekly.*every monday"):
        check.load_prefect_yaml(broken)


# ---- the worker image ---------------------------------------------------------------------------------------
def test_worker_image_installs_from_the_lock_and_holds_the_code() -> None:
    dockerfile = (INFRA / "Dockerfile.worker").read_text()
    assert re.search(r"^FROM python:3\.11-slim\b", dockerfile, re.M)
    assert "pip install --no-deps -r requirements.lock" in dockerfile
    copied = " ".join(re.findall(r"^COPY (.+)$", dockerfile, re.M))
    for path in ("requirements.lock", "prefect.yaml", "params.yaml", "ontology.yaml", "wanwu", "tasks", "flows"):
        assert path in copied, f"Dockerfile.worker does not copy {path}"
        assert (REPO / path).exists()
    ignore = (INFRA / "Dockerfile.worker.dockerignore").read_text().split()
    for path in ("requirements.lock", "prefect.yaml", "wanwu/", "tasks/", "flows/"):
        assert f"!{path}" in ignore, f"the dockerignore keeps {path} out of the build context"
    (doc,) = check.load_docs(INFRA / "docker-compose.yml")
    build = doc["services"]["worker-cpu"]["build"]
    assert (INFRA / build["context"] / build["dockerfile"]).resolve() == (INFRA / "Dockerfile.worker").resolve()


def test_check_script_passes_on_the_repository(capsys: pytest.CaptureFixture[str]) -> None:
    assert check.main() == 0
    out = capsys.readouterr().out
    assert "nvidia.com/gpu=1" in out and "FAIL" not in out
    print(out)


def test_templates_are_json_prefect_can_read() -> None:
    for path in sorted((INFRA / "prefect").glob("*.json")):
        template = json.loads(path.read_text())
        assert set(template) == {"job_configuration", "variables"}, path


# ---- orchestration params and dispatch wiring (no server needed) ---------------------------------------------
def test_orchestration_params_and_dispatch_wiring(tmp_path: Path) -> None:
    from prefect.task_runners import ThreadPoolTaskRunner
    from prefect_dask import DaskTaskRunner

    from flows import dispatch
    from wanwu.config import OrchestrationParams, ParamsError, load_params

    params_file = tmp_path / "params.yaml"
    params_file.write_text("orchestration:\n  dispatch: pools\n  gpu_stages: [train]\n")
    orch = load_params(params_file).orchestration
    assert dispatch.runs_remotely("train", orch) and not dispatch.runs_remotely("collect", orch)
    assert not dispatch.runs_remotely("train", OrchestrationParams())  # local by default
    params_file.write_text("orchestration:\n  gpu_stages: [trian]\n")
    with pytest.raises(ParamsError, match="trian"):
        load_params(params_file)

    assert dispatch.portable_params_path(REPO / "params.yaml", REPO) == "params.yaml"
    assert dispatch.portable_params_path("configs/p.yaml", REPO) == "configs/p.yaml"
    assert dispatch.portable_params_path(tmp_path / "params.yaml", REPO) == str(tmp_path / "params.yaml")

    assert isinstance(dispatch.task_runner(OrchestrationParams()), ThreadPoolTaskRunner)
    runner = dispatch.task_runner(OrchestrationParams(task_runner="dask", dask_address="tcp://127.0.0.1:8786"))
    assert isinstance(runner, DaskTaskRunner) and runner.address == "tcp://127.0.0.1:8786"
    with pytest.raises(dispatch.DispatchError, match="unknown stage"):
        dispatch.stage_task("colect")


# ---- the installer: uv with pip's registries ----------------------------------------------------------------
def _uv_pairs(env: dict[str, str]) -> list[tuple[str, str]]:
    done = subprocess.run(
        [sys.executable, str(INFRA / "uv_args.py")], capture_output=True, text=True, check=True, env=env
    )
    args = done.stdout.split()
    return list(zip(args[::2], args[1::2], strict=True))


def test_uv_gets_the_indexes_pip_would_use_environment_over_config_file(tmp_path: Path) -> None:
    conf = tmp_path / "pip.conf"
    conf.write_text(
        "[global]\nindex-url = https://a.example/simple\n"
        "extra-index-url = https://b.example/simple https://c.example/simple\nfind-links = /wheels/here\n"
    )
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PIP_CONFIG_FILE": str(conf)}
    pairs = _uv_pairs(env)
    assert ("--index-url", "https://a.example/simple") in pairs
    assert [v for k, v in pairs if k == "--extra-index-url"] == ["https://b.example/simple", "https://c.example/simple"]
    assert ("--find-links", "/wheels/here") in pairs

    env["PIP_INDEX_URL"] = "https://d.example/simple"  # an environment variable beats every file, as in pip
    pairs = _uv_pairs(env)
    assert [v for k, v in pairs if k == "--index-url"] == ["https://d.example/simple"]


def test_uv_finds_every_pin_of_the_lock_on_this_machines_registries(tmp_path: Path) -> None:
    """What `make` installs with: if uv could not see a pin, make would fall back to pip and only be slow, so the
    fallback would hide it. A dry run into an empty environment resolves all of them (~3 s from uv's cache)."""
    uv = Path(sys.executable).parent / "uv"
    lock = (REPO / "requirements.lock").read_text().split()
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "empty")], check=True)
    extra = subprocess.run([sys.executable, str(INFRA / "uv_args.py")], capture_output=True, text=True, check=True)
    done = subprocess.run(
        [
            str(uv),
            "pip",
            "install",
            "--dry-run",
            "--no-deps",
            "--index-strategy",
            "unsafe-best-match",
            "--python",
            str(tmp_path / "empty" / "bin" / "python"),
            *extra.stdout.split(),
            "-r",
            str(REPO / "requirements.lock"),
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-2000:]

    def pinned(specs) -> set[tuple[str, str]]:
        return {(canonicalize_name(s.split("==")[0]), s.split("==")[1]) for s in specs}

    would = pinned(re.findall(r"^ \+ (\S+==\S+)$", done.stderr + done.stdout, re.M))
    pins = pinned(line for line in lock if "==" in line)
    assert len(pins) > 250 and would == pins
