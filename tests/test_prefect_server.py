"""A real Prefect server on loopback, real work pools and workers, the deployments of prefect.yaml.

What a user of the scaled-out set-up checks: `prefect deploy` accepts prefect.yaml, a process worker on the `cpu`
pool picks up the pipeline deployment and the run ends Completed with the stage's outputs on disk; with
``orchestration.dispatch: pools`` a GPU stage runs as the deployment ``stage/<name>`` on the `gpu` pool (a process
worker stands in for the Kubernetes one here) and its result comes back; a misconfigured dispatch says what to fix.

Everything is bounded in time, bound to 127.0.0.1, and the server and workers are stopped at the end.
Run with ``-s`` to see the flow runs' states and logs.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
PREFECT = str(Path(sys.executable).with_name("prefect"))
TINY_WORLD = "sample://?n=12&seed=1&size=64&catalogue_train=1&catalogue_val=1&generic_train=2&generic_val=1"
SERVER_START_TIMEOUT = 90.0
RUN_TIMEOUT = 120.0

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]


@dataclass
class Server:
    url: str
    env: dict[str, str]
    home: Path
    log: Path


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen) -> None:
    """Stop a process we started (and the flow-run children in its own process group)."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)


def _tail(path: Path, lines: int = 15) -> str:
    text = path.read_text(errors="replace") if path.exists() else ""
    return "\n".join(text.splitlines()[-lines:])


def _cli(server: Server, *args: str, timeout: float = 60) -> str:
    out = subprocess.run(
        [PREFECT, *args], cwd=REPO, env=server.env, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert out.returncode == 0, f"prefect {' '.join(args)} failed:\n{out.stdout}\n{out.stderr}"
    return out.stdout


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    home = tmp_path_factory.mktemp("prefect")
    port = _free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(home / "home"),
        "PREFECT_API_URL": url,
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home / 'prefect.db'}",
        "PREFECT_UI_ENABLED": "false",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_LOGGING_LEVEL": "WARNING",
        "PREFECT_LOGGING_LEVEL": "INFO",
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        # Results on a store the test process reads too, so a remote stage's return value comes back.
        "PREFECT_RESULTS_PERSIST_BY_DEFAULT": "true",
        "PREFECT_LOCAL_STORAGE_PATH": str(home / "results"),
        "WANWU_ROOT": str(REPO),
        "MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow.db'}",
    }
    log = home / "server.log"
    started = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen(
            [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        import httpx

        deadline = time.monotonic() + SERVER_START_TIMEOUT
        while True:
            if proc.poll() is not None:
                pytest.fail(f"prefect server exited with {proc.returncode}:\n{_tail(log, 40)}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                pytest.fail(f"prefect server not healthy after {SERVER_START_TIMEOUT:.0f} s:\n{_tail(log, 40)}")
            time.sleep(0.5)
        print(f"\n[server] Prefect server healthy at {url} after {time.perf_counter() - started:.1f} s")
        yield Server(url=url, env=env, home=home, log=log)
    finally:
        _stop(proc)


@contextlib.contextmanager
def _worker(server: Server, pool: str, name: str) -> Iterator[Path]:
    log = server.home / f"worker-{name}.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [PREFECT, "worker", "start", "--pool", pool, "--type", "process", "--name", name, "--limit", "1"],
            cwd=server.home,
            env=server.env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield log
    finally:
        _stop(proc)


@contextlib.contextmanager
def _api(server: Server) -> Iterator[None]:
    """Point this process's Prefect client at the test server."""
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_LOCAL_STORAGE_PATH,
        PREFECT_RESULTS_PERSIST_BY_DEFAULT,
        temporary_settings,
    )

    with temporary_settings(
        updates={
            PREFECT_API_URL: server.url,
            PREFECT_LOCAL_STORAGE_PATH: server.env["PREFECT_LOCAL_STORAGE_PATH"],
            PREFECT_RESULTS_PERSIST_BY_DEFAULT: True,
        }
    ):
        yield


def _tiny_project(root: Path) -> Path:
    """A params file for a 12-image sample world, everything written under ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    params = {
        "project": {"data_dir": str(root / "data"), "ontology": str(REPO / "ontology.yaml")},
        "collect": {"sources": [{"uri": TINY_WORLD}], "workers": 2},
    }
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(params), encoding="utf-8")
    return path


def _report(server: Server, flow_run, title: str, worker_log: Path) -> None:
    """Print what a user would look at: the run's state and its logs as the server holds them."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.client.schemas.sorting import LogSort

    log_filter = LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run.id]))
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(flow_run.id)
        deadline = time.monotonic() + 10  # the run's last log lines reach the server in the next batch
        while True:
            logs = client.read_logs(log_filter=log_filter, sort=LogSort.TIMESTAMP_ASC)
            if any("Finished in state" in e.message for e in logs if e.task_run_id is None) or (
                time.monotonic() > deadline
            ):
                break
            time.sleep(0.5)
    took = (run.end_time - run.start_time).total_seconds() if run.end_time and run.start_time else float("nan")
    print(f"\n[{title}] flow run {run.name!r} ({run.id}) → {run.state.type.value} {run.state.name!r}, ran {took:.1f} s")
    for entry in logs:
        print(f"[{title}]   {entry.timestamp:%H:%M:%S} {entry.level:>2} {entry.name}: {entry.message[:200]}")
    print(f"[{title}] worker log (tail):\n" + "\n".join(f"    {line}" for line in _tail(worker_log, 8).splitlines()))


def test_pipeline_deployment_runs_on_a_process_worker(server: Server, tmp_path: Path) -> None:
    import pandas as pd
    from prefect.deployments import run_deployment

    params = _tiny_project(tmp_path / "world")
    print("\n" + _cli(server, "work-pool", "create", "cpu", "--type", "process").splitlines()[0])
    # The worker starts while `prefect deploy` reads prefect.yaml: both take a few seconds of imports.
    with _worker(server, "cpu", "cpu-1") as worker_log, _api(server):
        deployed = _cli(server, "deploy", "--name", "pipeline", "--no-prompt", "--prefect-file", "prefect.yaml")
        assert "pipeline/pipeline" in deployed
        started = time.perf_counter()
        flow_run = run_deployment(
            "pipeline/pipeline",
            parameters={"params_path": str(params), "stages": ["collect"]},
            timeout=RUN_TIMEOUT,
            poll_interval=1,
        )
        print(f"[pipeline] run_deployment returned after {time.perf_counter() - started:.1f} s")
        _report(server, flow_run, "pipeline", worker_log)

    assert flow_run.state is not None and flow_run.state.is_completed(), (
        f"pipeline run ended {flow_run.state}:\n{_tail(worker_log, 60)}"
    )
    manifest = pd.read_parquet(tmp_path / "world" / "data" / "collect" / "manifest.parquet")
    assert len(manifest) == 12
    assert set(manifest["split"]) <= {"gold", "seed", "pool"}


@pytest.fixture(scope="module")
def gpu_stage_collect(server: Server) -> str:
    """Pool `gpu` (a process pool stands in for the Kubernetes one) with the deployment stage/collect."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate

    from flows.stage import stage

    with _api(server):
        with get_client(sync_client=True) as client:
            client.create_work_pool(WorkPoolCreate(name="gpu", type="process"))
        stage.from_source(source=str(REPO), entrypoint="flows/stage.py:stage").deploy(
            name="collect", work_pool_name="gpu", parameters={"name": "collect"}, print_next_steps=False
        )
    return "stage/collect"


def test_dispatch_pools_runs_a_stage_as_a_gpu_pool_deployment(
    server: Server, gpu_stage_collect: str, tmp_path: Path
) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    from flows import dispatch
    from wanwu.config import load_params

    params_path = _tiny_project(tmp_path / "world")
    overrides = {"orchestration.dispatch": "pools", "orchestration.gpu_stages": ["collect"]}
    params = load_params(params_path, overrides)
    assert dispatch.runs_remotely("collect", params.orchestration)
    assert dispatch.deployment_name("collect") == gpu_stage_collect

    with _api(server), _worker(server, "gpu", "gpu-1") as worker_log:
        started = time.perf_counter()
        result = dispatch.run_stage(
            "collect", params, params_path=params_path, overrides=overrides, timeout=RUN_TIMEOUT
        )
        print(f"\n[dispatch] {gpu_stage_collect} returned after {time.perf_counter() - started:.1f} s: {result!r:.300}")
        with get_client(sync_client=True) as client:
            runs = client.read_flow_runs(
                deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["collect"]))
            )
        assert len(runs) == 1
        _report(server, runs[0], "dispatch", worker_log)

    assert runs[0].state.is_completed()
    assert runs[0].parameters["params_path"] == str(params_path)
    assert isinstance(result, dict) and result.get("images_total") == 12, result
    assert Path(result["manifest"]).is_file()


def test_dispatch_says_what_to_fix_when_the_deployment_is_missing_or_elsewhere(
    server: Server, gpu_stage_collect: str, tmp_path: Path
) -> None:
    from flows import dispatch
    from wanwu.config import load_params

    params_path = _tiny_project(tmp_path / "world")
    pools = {"orchestration.dispatch": "pools"}
    with _api(server):
        missing = load_params(params_path, {**pools, "orchestration.gpu_stages": ["quality"]})
        with pytest.raises(
            dispatch.DispatchError, match=r"no deployment 'stage/quality'.*prefect deploy --name quality"
        ):
            dispatch.run_stage("quality", missing, params_path=params_path)

        # stage/collect lives on pool gpu: a config naming another pool must not silently send work there.
        elsewhere = load_params(
            params_path, {**pools, "orchestration.gpu_stages": ["collect"], "orchestration.gpu_pool": "gpu-a100"}
        )
        with pytest.raises(dispatch.DispatchError, match=r"runs on work pool 'gpu' but orchestration.gpu_pool"):
            dispatch.run_stage("collect", elsewhere, params_path=params_path)
