"""Where a stage runs: in this process, or as the deployment ``stage/<name>`` on the gpu work pool.

Wiring only. ``orchestration.dispatch: local`` (the default) calls the stage's Prefect task here;
``orchestration.dispatch: pools`` sends the stages listed in ``orchestration.gpu_stages`` to the deployment
``stage/<name>`` (flows/stage.py, declared in prefect.yaml on the gpu pool) with ``run_deployment`` and waits for it.
The remote run gets the params file path (relative to the project root, so it means the same on the worker) and
the overrides, never the parsed params: the worker parses them itself against its own checkout and data volume.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any

from wanwu.config import STAGES, OrchestrationParams, Params

STAGE_FLOW = "stage"  # the flow name of flows/stage.py; deployments are named after the stage they run


class DispatchError(RuntimeError):
    """A stage could not be run where orchestration asked for it; the message says where to look."""


def deployment_name(stage: str) -> str:
    """``stage/<stage>``: the name ``run_deployment`` takes (flow name / deployment name)."""
    return f"{STAGE_FLOW}/{stage}"


def stage_task(stage: str) -> Any | None:
    """The Prefect task of tasks/<stage>.py, or None while that module is not built yet."""
    if stage not in STAGES:
        raise DispatchError(f"unknown stage {stage!r}: choose from {list(STAGES)}")
    try:
        module = importlib.import_module(f"tasks.{stage}")
    except ModuleNotFoundError as e:
        if e.name == f"tasks.{stage}":
            return None
        raise
    return getattr(module, f"{stage}_task")


def runs_remotely(stage: str, orchestration: OrchestrationParams) -> bool:
    return orchestration.dispatch == "pools" and stage in orchestration.gpu_stages


def portable_params_path(params_path: str | Path, root: str | Path | None = None) -> str:
    """The params path as the worker should see it: relative to the project root when it lies inside it."""
    path = Path(params_path)
    if not path.is_absolute():
        return path.as_posix()
    base = Path(root or os.environ.get("WANWU_ROOT", ".")).resolve()
    try:
        return path.resolve().relative_to(base).as_posix()
    except ValueError:
        return str(path)


def run_stage(
    stage: str,
    params: Params,
    *,
    params_path: str | Path = "params.yaml",
    overrides: dict[str, Any] | None = None,
    timeout: float | None = None,
) -> Any:
    """Run one stage where ``params.orchestration`` says; returns the stage's result (a dict when it ran remotely).

    Returns None when the stage's module is not built yet (local dispatch only; the caller decides what that means).
    """
    if runs_remotely(stage, params.orchestration):
        return run_remote(
            stage,
            params_path=params_path,
            overrides=overrides,
            pool=params.orchestration.gpu_pool,
            timeout=timeout,
        )
    task = stage_task(stage)
    if task is None:
        return None
    return task(getattr(params, stage), params.project)


def run_remote(
    stage: str,
    *,
    params_path: str | Path = "params.yaml",
    overrides: dict[str, Any] | None = None,
    pool: str = "gpu",
    timeout: float | None = None,
    poll_interval: float = 2.0,
) -> Any:
    """Run ``stage/<stage>`` with ``run_deployment`` and wait; a run that does not complete raises DispatchError."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound

    from wanwu.tracking import PARENT_ENV

    name = deployment_name(stage)
    with get_client(sync_client=True) as client:
        try:
            deployment = client.read_deployment_by_name(name)
        except ObjectNotFound:
            raise DispatchError(
                f"orchestration.dispatch is 'pools' but the Prefect server at {client.api_url} has no deployment "
                f"{name!r}. Create it from the project folder with `prefect deploy --name {stage}` (prefect.yaml), "
                "or set orchestration.dispatch: local."
            ) from None
    if deployment.work_pool_name != pool:
        raise DispatchError(
            f"deployment {name!r} runs on work pool {deployment.work_pool_name!r} but orchestration.gpu_pool is "
            f"{pool!r}: redeploy it on {pool!r} (prefect.yaml) or set orchestration.gpu_pool to match."
        )
    parameters = {
        "name": stage,
        "params_path": portable_params_path(params_path),
        "overrides": dict(overrides or {}),
        "parent_run_id": os.environ.get(PARENT_ENV),
    }
    flow_run = run_deployment(
        name,
        parameters=parameters,
        timeout=timeout,
        poll_interval=poll_interval,
        tags=["wanwu", f"stage:{stage}"],
    )
    state = flow_run.state
    if state is None or not state.is_completed():
        kind = state.type.value if state else "no state"
        detail = f": {state.message}" if state and state.message else ""
        raise DispatchError(
            f"stage {stage!r} ran as deployment {name!r} on pool {pool!r} (flow run {flow_run.name} {flow_run.id}) "
            f"and ended {kind}{detail}. Its logs: `prefect flow-run logs {flow_run.id}`."
        )
    try:
        return state.result(raise_on_failure=True)
    except Exception as e:  # the run completed; only its returned value is out of reach from here
        from prefect.logging import get_logger

        get_logger("wanwu.dispatch").warning(
            "stage %s completed remotely (flow run %s) but its result could not be read here (%s): give the "
            "server and the workers a shared result store (PREFECT_RESULTS_PERSIST_BY_DEFAULT=true and "
            "PREFECT_DEFAULT_RESULT_STORAGE_BLOCK) to get it back. Its outputs are under data/%s/.",
            stage,
            flow_run.id,
            type(e).__name__,
            stage,
        )
        return {"flow_run_id": str(flow_run.id), "state": state.type.value}


def task_runner(orchestration: OrchestrationParams) -> Any:
    """The task runner for fan-out work: threads, or a Dask cluster (at ``dask_address``, else a local one)."""
    if orchestration.task_runner == "dask":
        from prefect_dask import DaskTaskRunner

        if orchestration.dask_address:
            return DaskTaskRunner(address=orchestration.dask_address)
        return DaskTaskRunner(cluster_kwargs={"processes": False})
    from prefect.task_runners import ThreadPoolTaskRunner

    return ThreadPoolTaskRunner()
