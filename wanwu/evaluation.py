"""Measure detectors on one gold set: mAP, per-class precision and recall with Chinese names, plots, CPU latency.

Every model (each candidate and the current champion) goes through :func:`evaluate_model` with the same data,
split, image size and thresholds, so the figures the promotion gate compares are like for like. Accuracy comes
from ultralytics' own validator (``model.val(split="test")``); its confusion matrix and PR curves are drawn with
the CJK font registered by :func:`wanwu.offline.harden`, so Chinese class names show as glyphs.

Latency is what a caller waits for on this machine's CPU: ultralytics ``predict`` on one gold image (pre-process,
forward, NMS), batch 1, after a warm-up, over N runs; p50 and p95 in milliseconds.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import yaml

# the keys every evaluation uses: metrics.json, MLflow metrics, registry tags and the gate all speak these
MAP50 = "mAP50"
MAP = "mAP50-95"
LAT50 = "latency_ms_p50"
LAT95 = "latency_ms_p95"


class EvaluationError(RuntimeError):
    """An evaluation cannot run (missing weights, data or split); the message names the path and the fix."""


def model_imgsz(weights: str | Path, default: int = 640) -> int:
    """The image size the checkpoint was trained at (ultralytics keeps its train args in the checkpoint)."""
    import torch

    ckpt = torch.load(str(weights), map_location="cpu", weights_only=False)
    args = ckpt.get("train_args") or {}
    imgsz = args.get("imgsz", default)
    return int(imgsz[0] if isinstance(imgsz, (list, tuple)) else imgsz)


def inference_imgsz(train_imgsz: int, scale: float, stride: int = 32) -> int:
    """The size to run a model trained at ``train_imgsz`` at: ``train_imgsz × scale``, to the nearest multiple of
    the stride (ultralytics would round a misaligned size up, not to the nearest)."""
    return max(stride, round(train_imgsz * scale / stride) * stride)


def evaluated_imgsz(params: Any, train_imgsz: int) -> int:
    """The size the evaluate stage (and so export and serving) runs a model trained at ``train_imgsz`` at:
    ``evaluate.imgsz``, else the training size × ``evaluate.imgsz_scale``. ``params``: an EvaluateParams."""
    return params.imgsz or inference_imgsz(train_imgsz, params.imgsz_scale)


def split_images(data_yaml: str | Path, split: str) -> list[Path]:
    """The image files of one split of an ultralytics data.yaml (folder, list file or list of either)."""
    data_yaml = Path(data_yaml)
    if not data_yaml.is_file():
        raise EvaluationError(f"{data_yaml}: data.yaml not found. Run the quality stage first (`wanwu stage quality`).")
    data = yaml.safe_load(data_yaml.read_text(encoding="utf-8"))
    base = Path(data.get("path") or data_yaml.parent)
    if not base.is_absolute():
        base = (data_yaml.parent / base).resolve()
    entry = data.get(split)
    if not entry:
        raise EvaluationError(f"{data_yaml}: has no {split!r} split. The gold set must be the {split!r} split.")
    out: list[Path] = []
    for item in entry if isinstance(entry, list) else [entry]:
        p = Path(item) if Path(item).is_absolute() else base / item
        if p.is_dir():
            out += sorted(q for q in p.rglob("*") if q.suffix.lower() in {".jpg", ".jpeg", ".png", ".bmp", ".webp"})
        elif p.suffix == ".txt":
            out += [
                Path(line.strip()) if Path(line.strip()).is_absolute() else base / line.strip()
                for line in p.read_text().splitlines()
                if line.strip()
            ]
        elif p.is_file():
            out.append(p)
    return out


def _percentiles(samples_s: Iterable[float]) -> tuple[float, float]:
    ms = sorted(1000.0 * s for s in samples_s)
    q = statistics.quantiles(ms, n=100, method="inclusive")
    return statistics.median(ms), q[94]


def time_calls(fn: Callable[[], Any], runs: int, warmup: int) -> tuple[float, float]:
    """p50 and p95 in ms of ``fn()`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(max(runs, 2)):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return _percentiles(samples)


def predict_latency(
    weights: str | Path, image: str | Path, imgsz: int, runs: int = 30, warmup: int = 5
) -> tuple[float, float]:
    """End-to-end CPU latency of ultralytics predict (batch 1): p50, p95 in ms."""
    from PIL import Image
    from ultralytics import YOLO

    model = YOLO(str(weights))
    img = Image.open(image).convert("RGB")
    return time_calls(lambda: model.predict(img, imgsz=imgsz, device="cpu", verbose=False), runs, warmup)


def evaluate_model(
    weights: str | Path,
    data_yaml: str | Path,
    *,
    split: str = "test",
    imgsz: int = 640,
    batch: int = 16,
    conf: float = 0.001,
    iou: float = 0.7,
    plots_dir: str | Path | None = None,
    names_en: dict[int, str] | None = None,
    latency_runs: int = 30,
    latency_warmup: int = 5,
) -> dict[str, Any]:
    """mAP50, mAP50-95, precision, recall, per class (keyed by Chinese name, with id, English name and instance
    count) and CPU latency of one checkpoint on one split. Plots go to ``plots_dir`` when given."""
    from ultralytics import YOLO

    weights = Path(weights)
    if not weights.is_file():
        raise EvaluationError(f"{weights}: weights not found. Run the stage that writes them (train or distill).")
    images = split_images(data_yaml, split)
    if not images:
        raise EvaluationError(f"{data_yaml}: the {split!r} split has no images.")
    model = YOLO(str(weights))
    val_args: dict[str, Any] = {
        "data": str(data_yaml),
        "split": split,
        "imgsz": imgsz,
        "batch": batch,
        "conf": conf,
        "iou": iou,
        "device": "cpu",
        "verbose": False,
        "plots": plots_dir is not None,
        "workers": 0,
    }
    with tempfile.TemporaryDirectory(prefix="wanwu-val-") as scratch:
        # ultralytics always makes a save folder: without plots it goes to a scratch folder, not ./runs
        target = Path(plots_dir).resolve() if plots_dir is not None else Path(scratch) / "val"
        val_args.update(project=str(target.parent), name=target.name, exist_ok=True)
        m = model.val(**val_args)
    box = m.box
    names = {int(k): v for k, v in m.names.items()}
    nt = m.nt_per_class if m.nt_per_class is not None else []
    per_class: dict[str, dict[str, Any]] = {}
    for i, c in enumerate(box.ap_class_index):
        c = int(c)
        p, r, ap50, ap = box.class_result(i)
        per_class[names.get(c, str(c))] = {
            "id": c,
            "name_en": (names_en or {}).get(c, ""),
            "instances": int(nt[c]) if c < len(nt) else 0,
            "precision": round(float(p), 5),
            "recall": round(float(r), 5),
            MAP50: round(float(ap50), 5),
            MAP: round(float(ap), 5),
        }
    p50, p95 = predict_latency(weights, images[0], imgsz, latency_runs, latency_warmup)
    out = {
        "weights": str(weights),
        "imgsz": imgsz,
        MAP50: round(float(box.map50), 5),
        MAP: round(float(box.map), 5),
        "precision": round(float(box.mp), 5),
        "recall": round(float(box.mr), 5),
        LAT50: round(p50, 3),
        LAT95: round(p95, 3),
        "per_class": per_class,
    }
    if plots_dir is not None:
        out["plots"] = sorted(str(p) for p in Path(plots_dir).glob("*.png"))
    return out


def recall_by_id(metrics: dict[str, Any]) -> dict[int, float]:
    """Per-class recall keyed by ontology id (names can change between ontology versions, ids cannot)."""
    return {int(v["id"]): float(v["recall"]) for v in (metrics.get("per_class") or {}).values()}


def per_class_rows(models: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Long-format rows (model, class, precision, recall) for the DVC bar plot."""
    rows = []
    for name, m in models.items():
        for cls, v in (m.get("per_class") or {}).items():
            rows.append(
                {
                    "model": name,
                    "class": cls,
                    "class_en": v.get("name_en", ""),
                    "id": v["id"],
                    "precision": v["precision"],
                    "recall": v["recall"],
                }
            )
    return rows


def best_candidate(models: dict[str, dict[str, Any]], exclude: Iterable[str] = ("champion",)) -> str | None:
    """The candidate with the highest mAP50-95 (the first on a tie); the champion is not a candidate."""
    skip = set(exclude)
    ranked = [(m[MAP], -i, name) for i, (name, m) in enumerate(models.items()) if name not in skip]
    return max(ranked)[2] if ranked else None
