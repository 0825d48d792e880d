"""evaluate stage: every candidate and the current champion, measured on the same gold set.

Reads ``quality/dataset/data.yaml`` (its ``test`` split is the gold set: human labels only), the candidates
(``train/best.pt``, ``distill/best.pt`` when present) and the registry's champion (its ``artifacts/model.pt``, so
it goes through the same ultralytics validator as the candidates). Writes ``evaluate/metrics.json`` (per model:
mAP50, mAP50-95, precision, recall, per-class precision and recall keyed by Chinese name, CPU latency p50/p95;
plus the best candidate), ``evaluate/plots/<model>/`` (confusion matrices and PR curves with Chinese names),
``evaluate/per_class.csv`` (the best candidate's per-class precision and recall: the DVC bar plot) and one MLflow
run. The champion is registry state, not a DVC dependency: when it moves after this stage ran, the promote stage
gates against the champion it finds (with that version's recorded figures).
"""

from __future__ import annotations

import csv
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from tasks import lazy_task
from wanwu.config import EvaluateParams, Params, ProjectParams


class StageInputMissing(FileNotFoundError):
    """A file the stage reads is not there; the message says which stage writes it."""


class EvaluateResult(BaseModel):
    metrics_file: str
    best: str | None
    best_weights: str | None
    champion_version: str | None = None
    imgsz: int
    summary: dict[str, dict[str, float]] = {}  # model → mAP50, mAP50-95, latency p95


def gold_yaml(project: ProjectParams) -> Path:
    path = Path(project.data_dir) / "quality" / "dataset" / "data.yaml"
    if not path.is_file():
        raise StageInputMissing(f"{path}: the gold set is not there. Run `wanwu stage quality` first (it writes it).")
    return path


def candidates(params: EvaluateParams, project: ProjectParams) -> dict[str, Path]:
    """name (the stage that wrote it) → weights, for the candidates that exist."""
    out: dict[str, Path] = {}
    for rel in params.candidates:
        p = Path(rel) if Path(rel).is_absolute() else Path(project.data_dir) / rel
        if p.is_file():
            name = Path(rel).parts[0] if not Path(rel).is_absolute() else p.parent.name
            out[name if name not in out else f"{name}-{len(out)}"] = p
    return out


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, ensure_ascii=False, indent=2), encoding="utf-8")
    os.replace(tmp, path)


def run(params: EvaluateParams, project: ProjectParams) -> EvaluateResult:
    """Measure each candidate and the champion on the gold split; pick the best candidate by mAP50-95."""
    import mlflow

    from wanwu import evaluation as ev
    from wanwu import registry, tracking
    from wanwu.offline import cjk_font, harden, register_matplotlib_font
    from wanwu.ontology import Ontology

    root = harden(Path(project.data_dir).parent)
    register_matplotlib_font(cjk_font(root))
    data = gold_yaml(project)
    cands = candidates(params, project)
    if not cands:
        raise StageInputMissing(
            f"none of {params.candidates} exists under {project.data_dir}. Run `wanwu stage train` first."
        )
    imgsz = ev.evaluated_imgsz(params, ev.model_imgsz(next(iter(cands.values()))))
    names_en: dict[int, str] = {}
    if Path(project.ontology).is_file():
        onto = Ontology.load(project.ontology)
        names_en = {c.id: c.en for c in onto.classes}
    out = Path(project.data_dir) / "evaluate"
    plots = out / "plots"
    common = {
        "split": params.split,
        "imgsz": imgsz,
        "batch": params.batch,
        "conf": params.conf,
        "iou": params.iou,
        "names_en": names_en,
        "latency_runs": params.latency_runs,
        "latency_warmup": params.latency_warmup,
    }
    logged = {f"evaluate.{k}": v for k, v in params.model_dump().items()} | {"evaluate.imgsz_used": imgsz}
    plots.mkdir(parents=True, exist_ok=True)  # a declared DVC output, even with plots off
    with tracking.stage_run("evaluate", root, params=logged):
        models: dict[str, dict[str, Any]] = {}
        for name, weights in cands.items():
            models[name] = ev.evaluate_model(weights, data, plots_dir=plots / name if params.plots else None, **common)
        champion_version = None
        if params.include_champion:
            champ = registry.get_alias(registry.CHAMPION)
            if champ is not None:
                champion_version = champ.version
                with tempfile.TemporaryDirectory() as tmp:
                    w = registry.download_file(champ.version, "artifacts/model.pt", tmp)
                    m = ev.evaluate_model(w, data, plots_dir=plots / "champion" if params.plots else None, **common)
                m["weights"] = f"models:/{registry.model_name()}/{champ.version}"
                models["champion"] = {**m, "version": champ.version}
        best = ev.best_candidate(models)
        n_images = len(ev.split_images(data, params.split))
        metrics = {
            "gold": {"data": str(data), "split": params.split, "images": n_images, "imgsz": imgsz},
            "best": best,
            # the best candidate's figures at the top level: `dvc exp show --sort-by` ranks a sweep by them
            "best_mAP50": models[best][ev.MAP50] if best else None,
            "best_mAP50-95": models[best][ev.MAP] if best else None,
            "champion_version": champion_version,
            "models": models,
        }
        _write_json(out / "metrics.json", metrics)
        # the best candidate's per-class figures: the DVC bar plot (`dvc plots diff` compares them across commits)
        rows = ev.per_class_rows({best: models[best]}) if best else []
        with open(out / "per_class.csv", "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=["model", "class", "class_en", "id", "precision", "recall"])
            w.writeheader()
            w.writerows(rows)
        for name, m in models.items():
            mlflow.log_metrics(
                {
                    f"{name}/{k.replace('-', '_')}": m[k]
                    for k in (ev.MAP50, ev.MAP, "precision", "recall", ev.LAT50, ev.LAT95)
                }
            )
        mlflow.log_artifact(str(out / "metrics.json"))
        mlflow.log_artifact(str(out / "per_class.csv"))
        if params.plots:
            mlflow.log_artifacts(str(plots), artifact_path="plots")
        mlflow.set_tag("wanwu.best_candidate", best or "")
    summary = {n: {k: m[k] for k in (ev.MAP50, ev.MAP, ev.LAT95)} for n, m in models.items()}
    return EvaluateResult(
        metrics_file=str(out / "metrics.json"),
        best=best,
        best_weights=str(cands[best]) if best else None,
        champion_version=champion_version,
        imgsz=imgsz,
        summary=summary,
    )


def print_summary(result: EvaluateResult) -> None:
    for name, m in result.summary.items():
        tag = " (best candidate)" if name == result.best else ""
        tag = f" (version {result.champion_version})" if name == "champion" else tag
        print(
            f"evaluate: {name}{tag}: mAP50 {m['mAP50']:.3f}, mAP50-95 {m['mAP50-95']:.3f}, "
            f"CPU p95 {m['latency_ms_p95']:.1f} ms"
        )


def run_stage(params: Params) -> EvaluateResult:
    """`wanwu stage evaluate` (what `dvc repro` calls)."""
    result = run(params.evaluate, params.project)
    print_summary(result)
    return result


def _task() -> Any:
    import prefect

    return prefect.task(run, name="evaluate", retries=1, retry_delay_seconds=5)  # a registry read may hiccup: one retry


__getattr__ = lazy_task(globals(), "evaluate", _task)
