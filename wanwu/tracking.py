"""MLflow tracking shared by the stages: one store, one experiment, one run per stage under the pipeline's run.

The pipeline flow opens a parent run and exports its id as ``WANWU_PARENT_RUN_ID``; a stage run (from the flow,
from ``wanwu stage`` or from ``dvc repro``) nests under it when it is set and stands alone otherwise.

A process killed with SIGKILL (or a power cut) never ends its run, which would then stay RUNNING forever. Every
run opened here carries its owner (host, pid, the process's start time), and :func:`setup` (which every stage and
the pipeline call first) ends the runs of this host whose owner is gone as KILLED, the children with them.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

EXPERIMENT = "wanwu"
PARENT_ENV = "WANWU_PARENT_RUN_ID"
HOST_TAG, PID_TAG, STARTED_TAG = "wanwu.host", "wanwu.pid", "wanwu.pid_started"


def owner_tags() -> dict[str, str]:
    """Tags naming the process that runs a run, so a later process can tell whether it is still alive."""
    import socket

    import psutil

    return {
        HOST_TAG: socket.gethostname(),
        PID_TAG: str(os.getpid()),
        STARTED_TAG: f"{psutil.Process().create_time():.2f}",
    }


def _owner_alive(tags: dict[str, str]) -> bool:
    import psutil

    try:
        proc = psutil.Process(int(tags[PID_TAG]))
        # the same pid reused by a later process is not the owner
        return abs(proc.create_time() - float(tags.get(STARTED_TAG, proc.create_time()))) < 1.0
    except (psutil.NoSuchProcess, ValueError):
        return False


def close_orphaned_runs() -> list[str]:
    """End as KILLED the runs left RUNNING by a process of this host that is gone, and their RUNNING children.

    Returns their ids. KILLED, not FAILED: MLflow's status for a run whose process was stopped from outside
    (the train stage's resume link uses it too); the tag ``wanwu.ended_by`` says who closed it and why.
    """
    import socket

    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    exp = client.get_experiment_by_name(EXPERIMENT)
    if exp is None:
        return []
    running = client.search_runs([exp.experiment_id], filter_string="attributes.status = 'RUNNING'", max_results=1000)
    host = socket.gethostname()
    dead = {
        r.info.run_id: f"process {r.data.tags[PID_TAG]} on {host} was gone"
        for r in running
        if r.data.tags.get(HOST_TAG) == host and PID_TAG in r.data.tags and not _owner_alive(r.data.tags)
    }
    children = True
    while children:  # nested runs opened by the dead process (a stage under the pipeline, a training under a stage)
        children = False
        for r in running:
            parent = r.data.tags.get("mlflow.parentRunId")
            if r.info.run_id not in dead and parent in dead and PID_TAG not in r.data.tags:
                dead[r.info.run_id] = f"its parent run {parent} was closed: {dead[parent]}"
                children = True
    for run_id, why in dead.items():
        client.set_tag(run_id, "wanwu.ended_by", f"closed by process {os.getpid()}: {why}")
        client.set_terminated(run_id, status="KILLED")
    return list(dead)


def setup(root: str | Path = ".") -> str:
    """Point mlflow at the project's store (after offline.harden) and return the tracking URI."""
    import mlflow

    from wanwu.offline import artifact_root, harden, tracking_uri

    root = harden(root)
    uri = tracking_uri(root)
    mlflow.set_tracking_uri(uri)
    if mlflow.get_experiment_by_name(EXPERIMENT) is None:
        with contextlib.suppress(Exception):  # a concurrent process may have created it first
            mlflow.create_experiment(EXPERIMENT, artifact_location=artifact_root(root))
    mlflow.set_experiment(EXPERIMENT)
    close_orphaned_runs()
    return uri


@contextlib.contextmanager
def stage_run(stage: str, root: str | Path = ".", params: dict[str, Any] | None = None) -> Iterator[Any]:
    """A run for one stage, nested under the pipeline's run when there is one; FAILED if the body raises."""
    import mlflow

    setup(root)
    parent = os.environ.get(PARENT_ENV)
    tags = {"wanwu.stage": stage, **owner_tags()}
    if parent:
        tags["mlflow.parentRunId"] = parent
    run = mlflow.start_run(run_name=stage, tags=tags, nested=mlflow.active_run() is not None)
    try:
        if params:
            mlflow.log_params({k: str(v)[:500] for k, v in params.items()})
        yield run
    except BaseException:
        mlflow.end_run(status="FAILED")
        raise
    else:
        mlflow.end_run(status="FINISHED")
