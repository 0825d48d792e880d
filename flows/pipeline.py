"""The pipeline flow: collect → autolabel → quality → train → distill → evaluate → export → promote.

Wiring only: each stage is the Prefect task of ``tasks/<stage>.py``, called with its own params section and the
project section. The flow opens the pipeline's MLflow run so every stage run nests under it.
"""

from __future__ import annotations

import importlib
import os
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from wanwu.config import STAGES, load_params


def _stage_task(stage: str):
    """The stage's task, or None while the stage is not built yet (the run then goes as far as stages exist)."""
    try:
        module = importlib.import_module(f"tasks.{stage}")
    except ModuleNotFoundError as e:
        if e.name == f"tasks.{stage}":
            return None
        raise
    return getattr(module, f"{stage}_task")


@flow(name="pipeline", log_prints=True)
def pipeline(
    params_path: str = "params.yaml",
    overrides: dict[str, str] | None = None,
    stages: list[str] | None = None,
) -> dict[str, Any]:
    """Run the stages in order on ``params_path``; returns each stage's result."""
    from wanwu import tracking

    logger = get_run_logger()
    params = load_params(params_path, overrides)
    root = Path(params_path).resolve().parent
    tracking.setup(root)
    import mlflow

    results: dict[str, Any] = {}
    timings: dict[str, float] = {}
    with mlflow.start_run(run_name="pipeline", tags={"wanwu.stage": "pipeline"}) as parent:
        os.environ[tracking.PARENT_ENV] = parent.info.run_id
        try:
            for stage in stages or STAGES:
                task = _stage_task(stage)
                if task is None:
                    logger.info("stage %s is not built yet: the run stops before it", stage)
                    break
                started = time.perf_counter()
                results[stage] = task(getattr(params, stage), params.project)
                timings[stage] = time.perf_counter() - started
                mlflow.log_metric(f"seconds_{stage}", timings[stage])
        finally:
            os.environ.pop(tracking.PARENT_ENV, None)
    for stage, seconds in timings.items():
        print(f"{stage:>10}: {seconds:7.1f} s  {results[stage]}")
    return results
