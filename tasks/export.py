"""export stage: the best candidate to ONNX, checked against PyTorch, INT8 where it pays, registered in MLflow.

Reads ``evaluate/metrics.json`` (the best candidate, its gold-set figures, the gold set and image size). Writes
``export/model.onnx`` (+ ``model.pt``, the weights it came from), ``export/parity.json`` (raw-output difference
and box agreement after NMS; a failed check stops the stage), ``export/int8.json`` (the INT8 decision and its
figures, kept or not), ``export/registered.json`` and a registered version of ``wanwu-detector`` tagged with
the gold-set metrics, the data version (DVC hash) and the git commit. The version is marked complete only
after its artifacts were listed back from the store.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from tasks import lazy_task
from wanwu.config import ExportParams, Params, ProjectParams


class StageInputMissing(FileNotFoundError):
    """A file the stage reads is not there; the message says which stage writes it."""


class ExportResult(BaseModel):
    candidate: str
    onnx: str
    served_onnx: str
    parity_file: str
    parity: dict[str, Any]
    int8: dict[str, Any]
    model_name: str | None = None
    version: str | None = None
    model_uri: str | None = None


def run(params: ExportParams, project: ProjectParams) -> ExportResult:
    """Export, check, quantize where it pays, log and register the best candidate of the evaluate stage."""
    import mlflow

    from wanwu import export as ex
    from wanwu import registry, tracking
    from wanwu.evaluation import LAT50, LAT95, MAP, split_images
    from wanwu.offline import harden

    root = harden(Path(project.data_dir).parent)
    evaluation = Path(project.data_dir) / "evaluate" / "metrics.json"
    if not evaluation.is_file():
        raise StageInputMissing(f"{evaluation}: not there. Run `wanwu stage evaluate` first (it picks the candidate).")
    ev = json.loads(evaluation.read_text(encoding="utf-8"))
    best = ev.get("best")
    if not best:
        raise StageInputMissing(f"{evaluation}: names no best candidate. Re-run `wanwu stage evaluate`.")
    cand = ev["models"][best]
    gold, split = ev["gold"]["data"], ev["gold"]["split"]
    imgsz = params.imgsz or int(ev["gold"]["imgsz"])
    out = Path(project.data_dir) / "export"
    logged = {f"export.{k}": v for k, v in params.model_dump().items()} | {"export.candidate": best}
    with tracking.stage_run("export", root, params=logged):
        onnx_path, pt = ex.export_onnx(cand["weights"], out, imgsz, params.dynamic, params.simplify, params.opset)
        gold_images = split_images(gold, split)
        report = ex.parity(
            pt,
            onnx_path,
            gold_images[: params.parity_images],
            imgsz,
            conf=params.parity_conf,
            iou=params.parity_iou,
            box_iou_min=params.parity_box_iou,
            max_abs_diff=params.parity_max_abs_diff,
            min_agreement=params.parity_min_agreement,
        )
        ex.write_json(out / "parity.json", report)
        mlflow.log_metrics({f"parity/{k}": float(v) for k, v in report.items() if isinstance(v, (int, float))})
        mlflow.log_artifact(str(out / "parity.json"))
        ex.check_parity(report, onnx_path)

        served = onnx_path
        fp32_run = ex.onnx_runner(onnx_path, gold_images[0], imgsz)
        int8: dict[str, Any] = {"kept": False, "reason": "export.int8 is false", "tried": False}
        if not params.int8:
            fp32_lat = ex.interleaved_latency({"fp32": fp32_run}, params.latency_runs, params.latency_warmup)["fp32"]
        else:
            calib = split_images(gold, "train")[: params.int8_calibration_images]
            q = ex.quantize_int8(onnx_path, out / "model.int8.onnx", calib, imgsz, params.int8_per_channel)
            lat = ex.interleaved_latency(
                {"fp32": fp32_run, "int8": ex.onnx_runner(q, gold_images[0], imgsz)},
                params.latency_runs,
                params.latency_warmup,
            )
            fp32_lat, int8_lat = lat["fp32"], lat["int8"]
            fp32 = {**ex.onnx_map(onnx_path, gold, imgsz, split), LAT50: fp32_lat[0], LAT95: fp32_lat[1]}
            i8 = {**ex.onnx_map(q, gold, imgsz, split), LAT50: int8_lat[0], LAT95: int8_lat[1]}
            int8 = {
                **ex.int8_decision(
                    fp32, i8, max_map_drop=params.int8_max_map_drop, min_speedup=params.int8_min_speedup
                ),
                "tried": True,
                "calibration_images": len(calib),
            }
            if int8["kept"]:
                served = q
            mlflow.log_metrics(
                {
                    "int8/speedup_p50": int8["speedup_p50"],
                    "int8/map50_95_drop": int8["map50_95_drop"],
                    "int8/kept": float(int8["kept"]),
                }
            )
        ex.write_json(out / "int8.json", int8)
        mlflow.log_artifact(str(out / "int8.json"))
        served_lat = int8["int8"] if int8["kept"] else {LAT50: fp32_lat[0], LAT95: fp32_lat[1]}

        result = ExportResult(
            candidate=best,
            onnx=str(onnx_path),
            served_onnx=str(served),
            parity_file=str(out / "parity.json"),
            parity=report,
            int8=int8,
        )
        if params.log_model:
            metrics = {k: v for k, v in cand.items() if k not in {"plots", "weights"}}
            metrics |= {"onnx_latency_ms_p50": served_lat[LAT50], "onnx_latency_ms_p95": served_lat[LAT95]}
            tags = {
                "wanwu.candidate": best,
                "wanwu.precision": "int8" if int8["kept"] else "fp32",
                "wanwu.data_version": registry.data_version(Path(gold).parent, root),
                "wanwu.git_commit": registry.git_commit(root),
                "wanwu.gold": f"{gold}:{split}",
                "wanwu.parity": {k: report[k] for k in ("max_abs_diff", "box_agreement", "passed")},
            }
            labels = ex.labels_for(pt, imgsz, project.ontology)
            mv = registry.log_and_register(served, pt, labels, metrics, tags, conf=params.conf, iou=params.iou)
            result.model_name, result.version = mv.name, str(mv.version)
            result.model_uri = f"models:/{mv.name}/{mv.version}"
            mlflow.set_tag("wanwu.registered_version", str(mv.version))
        ex.write_json(
            out / "registered.json",
            {
                "candidate": best,
                "model_name": result.model_name,
                "version": result.version,
                "model_uri": result.model_uri,
                "served_onnx": str(served),
                "precision": "int8" if int8["kept"] else "fp32",
                MAP: cand[MAP],
            },
        )
    return result


def print_summary(r: ExportResult) -> None:
    p = r.parity
    print(
        f"export: {r.candidate} → {r.onnx}; parity max diff {p['max_abs_diff']:.2g}, box agreement "
        f"{p['box_agreement']:.3f}; INT8 {'kept' if r.int8.get('kept') else 'not kept'} ({r.int8.get('reason')})"
        + (f"; registered {r.model_uri}" if r.model_uri else "")
    )


def run_stage(params: Params) -> ExportResult:
    """`wanwu stage export` (what `dvc repro` calls)."""
    r = run(params.export, params.project)
    print_summary(r)
    return r


def _task() -> Any:
    import prefect

    return prefect.task(run, name="export")  # no retries: a retry would register twice


__getattr__ = lazy_task(globals(), "export", _task)
