"""MLflow tracking shared by the stages: one store, one experiment, one run per stage under the pipeline's run.

The pipeline flow opens a parent run and exports its id as ``WANWU_PARENT_RUN_ID``; a stage run (from the flow,
from ``wanwu stage`` or from ``dvc repro``) nests under it when it is set and stands alone otherwise.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

EXPERIMENT = "wanwu"
PARENT_ENV = "WANWU_PARENT_RUN_ID"


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
    return uri


@contextlib.contextmanager
def stage_run(stage: str, root: str | Path = ".", params: dict[str, Any] | None = None) -> Iterator[Any]:
    """A run for one stage, nested under the pipeline's run when there is one; FAILED if the body raises."""
    import mlflow

    setup(root)
    parent = os.environ.get(PARENT_ENV)
    tags = {"wanwu.stage": stage}
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
