"""train stage: the baseline student, ultralytics on the quality stage's dataset with hard labels.

Reads ``quality/dataset/data.yaml``; starts from ``train.model`` (the proposer's weights, pretrained on the generic
corpus, when they exist; else ``train.fallback_model``, a yaml trained from scratch). Writes ``train/best.pt``,
``train/metrics.json`` (mAP50, mAP50-95 on the val split) and one MLflow run (parameters, per-epoch metrics, the
weights). ``train/run/`` is ultralytics' run folder: a killed run resumes from its ``last.pt`` when the stage is
started again with the same params.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

from tasks import lazy_task
from wanwu.config import DistillParams, Params, ProjectParams, TrainParams


class StageInputMissing(FileNotFoundError):
    """A file the stage reads is not there; the message says which stage writes it."""


class TrainResult(BaseModel):
    """What a train (or distill) run produced."""

    best: str
    metrics_file: str
    metrics: dict[str, float] = {}  # mAP50, mAP50-95, precision, recall on the val split (best weights)
    start_model: str = ""
    epochs: int = 0
    resumed: bool = False
    seconds: float = 0.0
    run_id: str | None = None


def dataset_yaml(project: ProjectParams) -> Path:
    path = Path(project.data_dir) / "quality" / "dataset" / "data.yaml"
    if not path.is_file():
        raise StageInputMissing(f"{path}: the dataset is not there. Run `wanwu stage quality` first (it writes it).")
    return path


_KEYS = {
    "metrics/mAP50(B)": "mAP50",
    "metrics/mAP50-95(B)": "mAP50-95",
    "metrics/precision(B)": "precision",
    "metrics/recall(B)": "recall",
}


def fit_stage(
    stage: str,
    params: TrainParams | DistillParams,
    project: ProjectParams,
    start_model: str,
    out_dir: Path,
    *,
    trainer_factory: Callable[..., Any] | None = None,
    extra_args: dict[str, Any] | None = None,
    log_params: dict[str, Any] | None = None,
    callbacks: dict[str, Callable] | None = None,
    mlflow_run: Literal["stage", "nested", "active"] = "stage",
) -> TrainResult:
    """One ultralytics run logged to MLflow: params, per-epoch metrics, weights, metrics.json.

    ``mlflow_run``: ``stage`` opens the stage's run (nested under the pipeline's); ``active`` logs into the run
    the caller opened (the distill stage's); ``nested`` opens a child of it (the feature-distillation teacher).
    """
    import mlflow

    from wanwu import tracking
    from wanwu.training import check_args, enable_ultralytics_mlflow, fit, mlflow_run_link_callbacks

    root = Path(project.data_dir).parent
    data = dataset_yaml(project)
    args = {**params.ultralytics_args(project.seed), **(extra_args or {})}
    check_args(args)  # a misspelt key fails here, before an MLflow run is opened
    logged = {f"{stage}.{k}": v for k, v in params.model_dump().items()}
    logged.update({f"{stage}.start_model": start_model, **(log_params or {})})
    enable_ultralytics_mlflow(True)
    if mlflow_run == "stage":
        ctx: Any = tracking.stage_run(stage, root, params=logged)
    elif mlflow_run == "nested":
        tracking.setup(root)
        ctx = mlflow.start_run(run_name=stage, nested=True, tags={"wanwu.stage": stage})
    else:
        if mlflow.active_run() is None:
            raise RuntimeError("fit_stage(mlflow_run='active') needs an active MLflow run")
        ctx = contextlib.nullcontext(mlflow.active_run())
    with ctx as run:
        if mlflow_run != "stage":
            mlflow.log_params({k: str(v)[:500] for k, v in logged.items()})
        cbs = mlflow_run_link_callbacks(run.info.run_id)
        for event, fn in (callbacks or {}).items():
            cbs = _chain(cbs, event, fn)
        result = fit(
            data,
            out_dir,
            model=start_model,
            model_param=f"{stage}.model",
            device=project.device,
            trainer_factory=trainer_factory,
            progress=stage,
            callbacks=cbs,
            val_period=params.val_period,
            **args,
        )
        # ultralytics' callback switched on mlflow.autolog() for every library; later stages in this process
        # (sklearn in evaluate, …) must not start logging runs of their own
        mlflow.autolog(disable=True)
        metrics = {short: result.metrics[k] for k, short in _KEYS.items() if k in result.metrics}
        summary = {
            **metrics,
            "split": "val",
            "epochs": result.epochs,
            "resumed": result.resumed,
            "seconds": round(result.seconds, 1),
            "start_model": start_model,
        }
        metrics_file = out_dir / "metrics.json"
        tmp = metrics_file.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(summary, indent=2, ensure_ascii=False))
        os.replace(tmp, metrics_file)
        mlflow.log_metrics({f"best/{k}": v for k, v in metrics.items()})
        mlflow.log_artifact(str(metrics_file))
        mlflow.set_tag("wanwu.resumed", str(result.resumed).lower())
    return TrainResult(
        best=str(result.best),
        metrics_file=str(metrics_file),
        metrics=metrics,
        start_model=start_model,
        epochs=result.epochs,
        resumed=result.resumed,
        seconds=result.seconds,
        run_id=run.info.run_id,
    )


def _chain(cbs: dict[str, Callable], event: str, fn: Callable) -> dict[str, Callable]:
    if event not in cbs:
        return {**cbs, event: fn}
    first = cbs[event]

    def both(trainer: Any) -> None:
        first(trainer)
        fn(trainer)

    return {**cbs, event: both}


def run(params: TrainParams, project: ProjectParams) -> TrainResult:
    """Train the baseline student; a killed run resumes when called again with the same params."""
    from wanwu.offline import harden
    from wanwu.training import resolve_start_model

    root = harden(Path(project.data_dir).parent)
    start = resolve_start_model(params.model, params.fallback_model, root)
    return fit_stage("train", params, project, start, Path(project.data_dir) / "train")


def run_stage(params: Params) -> TrainResult:
    """`wanwu stage train` (what `dvc repro` calls)."""
    result = run(params.train, params.project)
    m = result.metrics
    print(
        f"train: {result.epochs} epochs in {result.seconds:.0f} s{' (resumed)' if result.resumed else ''} from "
        f"{result.start_model}; val mAP50 {m.get('mAP50', 0):.3f}, mAP50-95 {m.get('mAP50-95', 0):.3f} → {result.best}"
    )
    return result


def _task() -> Any:
    import prefect

    # No retries: a failed training is not an I/O hiccup, and a killed one resumes on the next run by itself.
    return prefect.task(run, name="train")


__getattr__ = lazy_task(globals(), "train", _task)
