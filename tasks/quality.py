"""quality stage: the gate between labels and training. Nothing trains on labels this stage has not passed.

Reads ``collect/manifest.parquet``, ``collect/human_labels.parquet``, ``autolabel/labels.parquet`` (when the
autolabel stage ran), ``collect/truth.parquet`` (sample world only, to *measure* auto labels) and
``quality/reference.json`` (the last accepted dataset's statistics). Writes under ``data/quality/``:

* always: ``report/index.html`` (plots, counts, every expectation; GE data docs in ``report/gx/``),
  ``metrics.json``, ``review/tasks.json`` (Label Studio import of the worst-scored boxes);
* only when every expectation passes: ``dataset/`` (ultralytics: ``data.yaml`` with Chinese names,
  ``images/{train,val,test}``: hard links to ``raw/``, or a PNG copy where unsure auto boxes are painted grey as
  ignore regions (``quality.ignore_reasons``); ``labels/{train,val,test}``), ``soft_labels.parquet`` (the
  dataset's boxes in label-file order), ``splits.parquet`` and ``reference.json`` (the next run's drift baseline).

On failure it removes any older dataset, writes the report, and raises :class:`QualityGateFailed` naming every
failed expectation with the observed value and the threshold. The logic lives in :mod:`wanwu.quality`.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from pathlib import Path
from typing import Any

import pandas as pd
from pydantic import BaseModel

from tasks import lazy_task
from wanwu import contracts
from wanwu import quality as q
from wanwu.config import Params, ProjectParams, QualityParams
from wanwu.ontology import Ontology
from wanwu.quality import QualityError, QualityGateFailed

__all__ = ["QualityError", "QualityGateFailed", "QualityResult", "run", "run_stage"]


class QualityResult(BaseModel):
    """A passed gate: where the dataset and the report are, and the figures behind the verdict."""

    passed: bool
    data_yaml: str
    soft_labels: str
    splits: str
    report: str
    metrics: str
    review_tasks: str
    images: dict[str, int]
    boxes: dict[str, int]
    expectations: int
    drift_max_psi: float | None = None
    autolabel_precision: float | None = None
    autolabel_recall: float | None = None
    label_issues: int = 0
    seconds: float = 0.0


def _paths(data_dir: Path) -> dict[str, Path]:
    out = data_dir / "quality"
    return {
        "out": out,
        "dataset": out / "dataset",
        "soft_labels": out / "soft_labels.parquet",
        "splits": out / "splits.parquet",
        "report_dir": out / "report",
        "docs": out / "report" / "gx",
        "metrics": out / "metrics.json",
        "reference": out / "reference.json",
        "review": out / "review" / "tasks.json",
    }


def read_reference(path: Path) -> dict | None:
    """The last accepted dataset's statistics, or None (first run, or a file from an older format)."""
    if not path.is_file():
        return None
    try:
        ref = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return ref if isinstance(ref, dict) and ref.get("version") == q.REFERENCE_VERSION else None


def _metrics(analysis: q.Analysis, results: list[q.CheckResult], passed: bool, timings: dict, review: int) -> dict:
    drift = {r["feature"]: r["psi"] for r in analysis.drift}
    ls = analysis.label_scores
    return {
        "passed": passed,
        "counts": analysis.counts,
        "expectations": [r.as_dict() for r in results],
        "failed": [r.id for r in results if not r.success],
        "drift": {
            "psi": drift or None,
            "max_psi": max(drift.values()) if drift else None,
            "note": None if drift else "no reference yet: first accepted run",
        },
        "autolabel": analysis.pr,
        "label_issues": {
            "source": analysis.counts.get("label_issue_source"),
            "scored_boxes": 0 if ls is None else len(ls),
            "mean_image_score": None if analysis.image_scores.empty else float(analysis.image_scores["score"].mean()),
            "review_tasks": review,
        },
        "notes": analysis.notes,
        "timings_s": timings,
    }


def _remove_stale(paths: dict[str, Path]) -> None:
    """A failed gate leaves no dataset behind: an older one would be trained on without anyone noticing."""
    shutil.rmtree(paths["dataset"], ignore_errors=True)
    for k in ("soft_labels", "splits"):
        paths[k].unlink(missing_ok=True)


def run(
    params: QualityParams,
    project: ProjectParams,
    *,
    ontology: Ontology | None = None,
    track: bool = True,
) -> QualityResult:
    """Check the labels, write the report, and (only if every expectation passes) the dataset.

    Entry points (CLI, flows, tests) have already called ``wanwu.offline.harden``; GE's analytics switch is set
    again right before great_expectations is imported, so a bare call stays offline too.
    """
    root = project.data_dir.parent
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    onto = ontology or Ontology.load(project.ontology)
    paths = _paths(project.data_dir)
    inputs = q.load_inputs(project.data_dir)
    if params.champion is not None:
        weights = params.champion if params.champion.is_absolute() else root / params.champion
        if not weights.is_file():
            raise QualityError(
                f"quality.champion = {params.champion}: no such checkpoint. Point it at a .pt or set null."
            )
        man = inputs.manifest
        labeled = man["split"].isin(["seed", "gold"]) | ((man["split"] == "pool") & (inputs.auto is not None))
        inputs.champion_predictions = q.champion_predictions(weights, man[labeled], project.data_dir)
    reference = read_reference(paths["reference"])
    timings["read"] = time.perf_counter() - t0

    ctx = contextlib.nullcontext()
    if track:
        from wanwu.tracking import stage_run

        ctx = stage_run("quality", root, params=params.model_dump(mode="json"))
    with ctx:
        t = time.perf_counter()
        shutil.rmtree(paths["docs"], ignore_errors=True)  # GE appends pages; only this run's belong there
        analysis = q.analyse(inputs, params, onto, reference)
        timings["analyse"] = time.perf_counter() - t
        t = time.perf_counter()
        results = q.validate(analysis.tables, params, onto, paths["docs"])
        timings["expectations"] = time.perf_counter() - t
        passed = all(r.success for r in results)

        t = time.perf_counter()
        _, n_tasks = q.review_queue(
            analysis.label_scores,
            analysis.boxes,
            analysis.images,
            onto,
            params.label_issue_threshold,
            params.review_worst,
            paths["review"].parent,
        )
        index = q.write_report(
            analysis,
            results,
            paths["report_dir"],
            onto,
            params,
            root=root,
            autolabel_metrics=inputs.autolabel_metrics,
            review_path=paths["review"],
            docs_index=paths["docs"] / "index.html",
        )
        timings["report"] = time.perf_counter() - t
        metrics = _metrics(analysis, results, passed, timings, n_tasks)
        q.write_json(paths["metrics"], metrics)
        if track:
            _log(metrics, paths, index)
        if not passed:
            _remove_stale(paths)
            failures = [r for r in results if not r.success]
            raise QualityGateFailed(failures, len(results), index)

        t = time.perf_counter()
        ignore = q.ignore_regions(analysis.auto_scored, analysis.images, params.ignore_reasons)
        data_yaml = q.write_dataset(
            paths["dataset"], project.data_dir, analysis.images, analysis.boxes, onto, ignore=ignore
        )
        metrics["counts"]["ignore_regions"] = len(ignore)
        metrics["counts"]["ignore_images"] = int(ignore["sha256"].nunique()) if len(ignore) else 0
        contracts.write("labels", analysis.boxes, paths["soft_labels"])
        _write_splits(analysis.images, paths["splits"])
        q.write_json(paths["reference"], analysis.reference)
        timings["dataset"] = time.perf_counter() - t
        timings["total"] = time.perf_counter() - t0
        metrics["timings_s"] = timings
        q.write_json(paths["metrics"], metrics)

    pr = (analysis.pr or {}).get("accepted") or {}
    ls = analysis.label_scores
    return QualityResult(
        passed=True,
        data_yaml=str(data_yaml),
        soft_labels=str(paths["soft_labels"]),
        splits=str(paths["splits"]),
        report=str(index),
        metrics=str(paths["metrics"]),
        review_tasks=str(paths["review"]),
        images=analysis.counts["images"],
        boxes=analysis.counts["boxes"],
        expectations=len(results),
        drift_max_psi=metrics["drift"]["max_psi"],
        autolabel_precision=pr.get("precision"),
        autolabel_recall=pr.get("recall"),
        label_issues=0 if ls is None or ls.empty else int((ls["score"] < params.label_issue_threshold).sum()),
        seconds=round(time.perf_counter() - t0, 3),
    )


def _write_splits(images: pd.DataFrame, path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"sha256": images["sha256"].astype(str).tolist(), "split": images["split"].astype(str).tolist()})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".parquet.tmp")
    pq.write_table(table, tmp)
    tmp.replace(path)


def _log(metrics: dict, paths: dict[str, Path], index: Path) -> None:
    import mlflow

    flat: dict[str, float] = {"passed": float(metrics["passed"]), "failed_expectations": float(len(metrics["failed"]))}
    for s, n in metrics["counts"]["images"].items():
        flat[f"images_{s}"] = n
    flat["boxes_total"] = metrics["counts"]["boxes_total"]
    if metrics["drift"]["max_psi"] is not None:
        flat["drift_max_psi"] = metrics["drift"]["max_psi"]
    acc = (metrics.get("autolabel") or {}).get("accepted") or {}
    for k in ("precision", "recall"):
        if acc.get(k) is not None:
            flat[f"autolabel_{k}"] = acc[k]
    mlflow.log_metrics(flat)
    mlflow.log_artifact(str(paths["metrics"]))
    mlflow.log_artifact(str(index), artifact_path="report")
    mlflow.log_artifacts(str(index.parent / "figures"), artifact_path="report/figures")


def print_summary(result: QualityResult) -> None:
    from rich.console import Console

    con = Console()
    con.print(f"[green]quality gate passed[/] ({result.expectations} expectations, {result.seconds:.1f} s)")
    con.print(f"  images {result.images}  boxes {result.boxes}")
    if result.drift_max_psi is not None:
        con.print(f"  drift: max PSI {result.drift_max_psi:.3f}")
    if result.autolabel_precision is not None:
        con.print(f"  auto labels: precision {result.autolabel_precision:.3f}, recall {result.autolabel_recall:.3f}")
    con.print(f"  dataset {result.data_yaml}\n  report  {result.report}")


def run_stage(params: Params) -> QualityResult:
    """`wanwu stage quality` (what `dvc repro` calls): run, print the summary, or the refusal and exit 1."""
    try:
        result = run(params.quality, params.project)
    except QualityGateFailed as e:
        import sys

        from rich.console import Console

        Console(stderr=True).print(str(e), style="red", markup=False, highlight=False)
        sys.exit(1)  # the message is the whole story; a traceback would bury it
    print_summary(result)
    return result


def _retry_on_io(task: Any, task_run: Any, state: Any) -> bool:
    """Retry a failed run only when the file system hiccuped, never when the gate said no."""
    try:
        state.result()
    except QualityGateFailed:
        return False
    except OSError:
        return True
    except Exception:
        return False
    return False


def _task() -> Any:
    import prefect

    return prefect.task(run, name="quality", retries=1, retry_delay_seconds=5, retry_condition_fn=_retry_on_io)


__getattr__ = lazy_task(globals(), "quality", _task)
