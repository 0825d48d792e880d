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

from flows.caching import cached, missing_outputs, stage_key
from flows.dispatch import run_stage, runs_remotely
from wanwu.config import STAGES, load_params


def _stage_module(stage: str):
    """The stage's module, or None while the stage is not built yet (the run then goes as far as stages exist)."""
    try:
        return importlib.import_module(f"tasks.{stage}")
    except ModuleNotFoundError as e:
        if e.name == f"tasks.{stage}":
            return None
        raise


@flow(name="pipeline")
def pipeline(
    params_path: str = "params.yaml",
    overrides: dict[str, str] | None = None,
    stages: list[str] | None = None,
) -> dict[str, Any]:
    """Run the stages in order on ``params_path``; returns each stage's result."""
    from wanwu import tracking
    from wanwu.locks import stage_lock

    logger = get_run_logger()
    params = load_params(params_path, overrides)
    root = Path(params_path).resolve().parent
    tracking.setup(root)
    import mlflow

    results: dict[str, Any] = {}
    timings: dict[str, float] = {}
    report: Path | None = None
    try:
        # one pipeline at a time per project (a second one waits), each stage under its own lock as `wanwu stage` takes
        with (
            stage_lock(root, "pipeline"),
            mlflow.start_run(run_name="pipeline", tags={"wanwu.stage": "pipeline", **tracking.owner_tags()}) as parent,
        ):
            os.environ[tracking.PARENT_ENV] = parent.info.run_id
            try:
                for stage in stages or STAGES:
                    module = _stage_module(stage)
                    if module is None:
                        logger.warning("stage %s is not built yet: the run stops before it", stage)
                        break
                    started = time.perf_counter()
                    if runs_remotely(stage, params.orchestration):  # a deployment on the gpu pool
                        results[stage] = run_stage(stage, params, params_path=params_path, overrides=overrides)
                    else:
                        key, refresh = stage_key(root, stage, params), bool(missing_outputs(root, stage))
                        task = cached(getattr(module, f"{stage}_task"), key, refresh=refresh)
                        with stage_lock(root, stage):
                            results[stage] = task(getattr(params, stage), params.project)
                    timings[stage] = time.perf_counter() - started
                    mlflow.log_metric(f"seconds_{stage}", timings[stage])
                    if hasattr(module, "print_summary"):
                        module.print_summary(results[stage])
            finally:
                os.environ.pop(tracking.PARENT_ENV, None)
                report = _report(params.project.data_dir, root, timings, parent.info.run_id)
    finally:
        # the report, what ran and how long, whatever happened: a refused promotion is what a user wants to read
        if timings:
            _print_timings(timings, params.project.data_dir, tracking.setup(root))
        if report is not None:
            print(f"run report: {report}")
    return results


def _report(data_dir: Path, root: Path, timings: dict[str, float], run_id: str) -> Path | None:
    import mlflow

    from wanwu import run_report

    try:
        page = run_report.write(data_dir, root, timings, run_id)
    except Exception as e:  # never hide the stage's own error behind a report error
        get_run_logger().warning("run report not written: %s", e)
        return None
    mlflow.log_artifacts(str(page.parent), artifact_path="report")
    return page


def _print_timings(timings: dict[str, float], data_dir: Path, uri: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="wanwu pipeline")
    table.add_column("stage")
    table.add_column("seconds", justify="right")
    table.add_column("outputs")
    for stage, seconds in timings.items():
        table.add_row(stage, f"{seconds:.1f}", str(data_dir / stage) if (data_dir / stage).exists() else str(data_dir))
    table.add_row("total", f"{sum(timings.values()):.1f}", "")
    console = Console()
    console.print(table)
    console.print(f"MLflow store: {uri}  (browse: mlflow ui --backend-store-uri {uri})")
