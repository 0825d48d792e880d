"""distill stage: the student fine-tuned from the baseline with the teacher's knowledge.

``distill.mode``:

- ``soft`` (default): the teacher's soft labels (``quality/soft_labels.parquet``, top-k over the ontology for
  every box in the dataset) enter the loss as ``alpha · T² · KL`` on the anchors assigned to each box
  (:mod:`wanwu.distill`), added to the normal detection loss;
- ``feature``: ultralytics' own feature distillation (``distill_model``) from a larger detector
  (``distill.teacher_model``: a checkpoint, or a yaml trained here first for ``teacher_epochs`` on the same data,
  logged as a nested MLflow run ``distill-teacher``);
- ``both``: the two together.

Writes ``distill/best.pt``, ``distill/metrics.json`` (val split) and one MLflow run; resumes after a kill like
the train stage.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tasks import lazy_task
from tasks.train import StageInputMissing, TrainResult, fit_stage
from wanwu.config import DistillParams, Params, ProjectParams, TrainParams


class DistillResult(TrainResult):
    mode: str = "soft"
    teacher: str | None = None  # feature/both: the larger detector's weights
    soft_boxes_matched: int | None = None  # soft/both: training boxes that found their teacher row
    soft_boxes: int | None = None


def _teacher(params: DistillParams, project: ProjectParams, root: Path) -> str:
    """The larger detector for feature distillation: a checkpoint as given, or trained here from its yaml."""
    from wanwu.training import resolve_start_model

    model = resolve_start_model(params.teacher_model, None, root)
    if model.endswith(".pt"):
        return model
    # trained from scratch like the baseline (train's optimizer defaults), at the distill run's sizes, precision
    # and memory layout (distill.amp / distill.channels_last: a GPU profile's fp16 AMP reaches the teacher too)
    shared = {
        "imgsz",
        "batch",
        "nbs",
        "seed",
        "deterministic",
        "cache",
        "workers",
        "amp",
        "channels_last",
        "val_period",
        "extra",
    }
    teacher_params = TrainParams(
        **params.model_dump(include=shared), epochs=params.teacher_epochs, model=model, fallback_model=model
    )
    result = fit_stage(
        "distill-teacher",
        teacher_params,
        project,
        model,
        Path(project.data_dir) / "distill" / "teacher",
        mlflow_run="nested",
    )
    return result.best


def run(params: DistillParams, project: ProjectParams) -> DistillResult:
    """Distill into the baseline student; a killed run resumes when called again with the same params."""
    import mlflow

    from wanwu import tracking
    from wanwu.offline import harden
    from wanwu.training import resolve_start_model

    root = harden(Path(project.data_dir).parent)
    start = resolve_start_model(params.model, None, root)
    if not start.endswith(".pt"):
        raise StageInputMissing(f"{params.model}: distill starts from the baseline. Run `wanwu stage train` first.")
    extra: dict[str, Any] = {}
    factory = None
    stats: dict[str, int] = {}
    if params.mode in ("soft", "both"):
        from wanwu.distill import soft_label_trainer

        soft = Path(project.data_dir) / "quality" / "soft_labels.parquet"
        if not soft.is_file():
            raise StageInputMissing(f"{soft}: soft labels not found. Run `wanwu stage quality` first (it writes them).")
        st = soft.stat()
        factory = soft_label_trainer(soft, params.temperature, params.alpha, tag=f"{st.st_size}:{st.st_mtime_ns}")

    # The teacher trains in a nested run under this stage's run, so open the stage run first.
    with tracking.stage_run("distill", root, params={f"distill.{k}": v for k, v in params.model_dump().items()}):
        teacher = None
        if params.mode in ("feature", "both"):
            teacher = _teacher(params, project, root)
            extra.update(distill_model=teacher, dis=params.dis)
            mlflow.set_tag("wanwu.teacher", teacher)
        result = fit_stage(
            "distill",
            params,
            project,
            start,
            Path(project.data_dir) / "distill",
            trainer_factory=factory,
            extra_args=extra,
            mlflow_run="active",
            callbacks={"on_train_start": lambda t: _soft_stats(t, stats)},
        )
    return DistillResult(
        **result.model_dump(),
        mode=params.mode,
        teacher=teacher,
        soft_boxes_matched=stats.get("matched"),
        soft_boxes=stats.get("boxes"),
    )


def _soft_stats(trainer: Any, into: dict[str, int]) -> None:
    """How many training boxes found their teacher row (the rest learn one-hot on their hard label)."""
    import mlflow

    stats = getattr(trainer, "soft_stats", None)
    if stats:
        into.update(stats)
        mlflow.log_metrics({f"soft_labels/{k}": float(v) for k, v in stats.items()})


def run_stage(params: Params) -> DistillResult:
    """`wanwu stage distill` (what `dvc repro` calls)."""
    result = run(params.distill, params.project)
    m = result.metrics
    print(
        f"distill ({result.mode}): {result.epochs} epochs in {result.seconds:.0f} s"
        f"{' (resumed)' if result.resumed else ''}; val mAP50 {m.get('mAP50', 0):.3f}, "
        f"mAP50-95 {m.get('mAP50-95', 0):.3f} → {result.best}"
    )
    return result


def _task() -> Any:
    import prefect

    return prefect.task(run, name="distill")


__getattr__ = lazy_task(globals(), "distill", _task)
