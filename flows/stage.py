"""One stage as a flow of its own: what the gpu work pool runs (deployments ``stage/<name>`` in prefect.yaml).

Wiring only. The worker parses the params file itself (the path is relative to the project root, which the pull
step of prefect.yaml makes the working directory), runs the stage's task and nests the stage's MLflow run under the
pipeline's run when ``parent_run_id`` is given.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from wanwu.config import STAGES, load_params


class StageNotBuiltError(RuntimeError):
    """The deployment names a stage whose tasks/<stage>.py is not in this checkout."""


def _jsonable(result: Any) -> Any:
    # Stage results are small pydantic records; a plain dict survives any result serializer and any reader.
    dump = getattr(result, "model_dump", None)
    return dump(mode="json") if callable(dump) else result


@flow(name="stage", log_prints=True)
def stage(
    name: str,
    params_path: str = "params.yaml",
    overrides: dict[str, Any] | None = None,
    parent_run_id: str | None = None,
) -> Any:
    """Run the stage ``name`` on ``params_path`` (plus dotted-key ``overrides``); returns the stage's result."""
    from flows.dispatch import stage_task
    from wanwu import tracking
    from wanwu.offline import harden

    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}: choose from {list(STAGES)}")
    params = load_params(params_path, overrides)
    harden(Path(params_path).resolve().parent)
    task = stage_task(name)
    if task is None:
        raise StageNotBuiltError(
            f"stage {name!r}: tasks/{name}.py is not in the checkout at {Path.cwd()}; rebuild the worker image."
        )
    get_run_logger().info("stage %s on %s (data under %s)", name, params_path, params.project.data_dir)
    previous = os.environ.get(tracking.PARENT_ENV)
    if parent_run_id:
        os.environ[tracking.PARENT_ENV] = parent_run_id
    try:
        return _jsonable(task(getattr(params, name), params.project))
    finally:
        if previous is None:
            os.environ.pop(tracking.PARENT_ENV, None)
        else:
            os.environ[tracking.PARENT_ENV] = previous
